"""The pods on this node's cni0, for the UDP fast path's direct delivery.

bpf/fastpath.h hands a datagram for a local pod straight to the pod's netns
(bpf_redirect_peer on its veth end) when the local_pods map knows the pod; else it
goes through cni0 as the bridge would send it. This module reads who is where from
the kernel: cni0's neighbour table (pod IP -> MAC, filled when the node first
forwards to a pod) joined with its forwarding database (MAC -> port, learned when the
pod first sends). A port with any qdisc of its own (the CNI bandwidth plugin's tbf, a
clsact with someone's programs) is left out: bpf_redirect_peer would skip it.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address

from pyroute2 import IPRoute

from flannel_xdp.maps.views import ApplyResult, LocalPod, LocalPodsMap

AF_BRIDGE = 7
NUD_INCOMPLETE, NUD_FAILED, NUD_NOARP, NUD_PERMANENT = 0x01, 0x20, 0x40, 0x80
UNUSABLE = NUD_INCOMPLETE | NUD_FAILED
TC_H_ROOT = 0xFFFFFFFF
PLAIN_ROOT_QDISCS = ("noqueue",)  # what a veth has until someone adds one


def _kind(link) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def _plain_ports(ipr: IPRoute, bridge: int) -> set[int]:
    """The bridge's veth ports with no qdisc but a veth's own (bpf_redirect_peer works on
    veths only, and would skip any qdisc on the port)."""
    ports = {
        link["index"]
        for link in ipr.get_links()
        if link.get_attr("IFLA_MASTER") == bridge and _kind(link) == "veth"
    }
    for qdisc in ipr.get_qdiscs():
        index = qdisc["index"]
        if index in ports and not (
            qdisc["parent"] == TC_H_ROOT and qdisc.get_attr("TCA_KIND") in PLAIN_ROOT_QDISCS
        ):
            ports.discard(index)
    return ports


def sync(maps_dir: str, bridge_name: str) -> ApplyResult:
    """Make the pinned local_pods map hold what scan() finds now."""
    with IPRoute() as ipr:
        pods = scan(ipr, bridge_name)
    with LocalPodsMap(maps_dir) as local_pods:
        return local_pods.apply(pods)


def scan(ipr: IPRoute, bridge_name: str) -> list[LocalPod]:
    """The pods on bridge_name whose address, MAC and port are all known."""
    found = ipr.link_lookup(ifname=bridge_name)
    if not found:
        return []
    bridge = found[0]
    ports = _plain_ports(ipr, bridge)
    port_of: dict[str, int] = {}
    for entry in ipr.get_neighbours(family=AF_BRIDGE):
        mac, port = entry.get_attr("NDA_LLADDR"), entry["ifindex"]
        # learned entries only: the ports' own addresses are permanent
        if mac and port in ports and not entry["state"] & NUD_PERMANENT:
            port_of[mac] = port
    pods = []
    for entry in ipr.get_neighbours(family=socket.AF_INET, ifindex=bridge):
        ip, mac = entry.get_attr("NDA_DST"), entry.get_attr("NDA_LLADDR")
        if mac in port_of and not entry["state"] & (UNUSABLE | NUD_NOARP):
            pods.append(LocalPod(IPv4Address(ip), port_of[mac], mac))
    return pods
