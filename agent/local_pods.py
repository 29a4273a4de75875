"""The pods on this node's cni0, for the fast path.

bpf/fastpath.h hands a datagram for a local pod straight to the pod's netns
(bpf_redirect_peer on its veth end) when the local_pods map knows the pod, else
through cni0 as the bridge would send it; and it sends what a pod it knows routes to
a remote pod straight from the pod's veth end (pod_ingress, attached by the agent).
This module reads who is where from the kernel: cni0's neighbour table (pod IP ->
MAC, filled when the node first forwards to a pod) joined with its forwarding
database (MAC -> port, learned when the pod first sends). A port with a qdisc of its
own (the CNI bandwidth plugin's tbf or ingress policing, any clsact: pod_ingress is
attached through tcx) or someone else's tcx programs is left out: the fast path would
skip them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address

from pyroute2 import IPRoute

from flannel_xdp.loader import attach
from flannel_xdp.loader.programs import POD_INGRESS
from flannel_xdp.maps.views import ApplyResult, LocalPod, LocalPodsMap
from flannel_xdp.rtnl import (
    AF_BRIDGE,
    NUD_FAILED,
    NUD_INCOMPLETE,
    NUD_NOARP,
    NUD_PERMANENT,
)

UNUSABLE = NUD_INCOMPLETE | NUD_FAILED
TC_H_ROOT = 0xFFFFFFFF
PLAIN_ROOT_QDISCS = ("noqueue",)  # what a veth has until someone adds one


def _kind(link) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def _only_ours(index: int) -> bool:
    """The port's tcx hooks run nothing but our pod_ingress."""
    ours = (POD_INGRESS.direction, POD_INGRESS.name)
    return all(
        (direction, name) == ours
        for direction in attach.TCX_ATTACH_TYPE
        for name in attach.tcx_programs(index, direction)
    )


def _plain_ports(ipr: IPRoute, bridge: int) -> set[int]:
    """The bridge's veth ports with no qdisc but a veth's own and no tcx program but
    ours (bpf_redirect_peer works on veths only, and the fast path skips the rest)."""
    ports = {
        link["index"]
        for link in ipr.get_links()
        if link.get_attr("IFLA_MASTER") == bridge and _kind(link) == "veth"
    }
    for qdisc in ipr.get_qdiscs():
        index, kind = qdisc["index"], qdisc.get_attr("TCA_KIND")
        if qdisc["parent"] == TC_H_ROOT and kind in PLAIN_ROOT_QDISCS:
            continue
        ports.discard(index)
    return {index for index in ports if _only_ours(index)}


@dataclass(frozen=True)
class PodSync:
    applied: ApplyResult
    ports: list[str]  # the found pods' veth ends, for pod_ingress


def sync(maps_dir: str, bridge_name: str) -> PodSync:
    """Make the pinned local_pods map hold what scan() finds now."""
    with IPRoute() as ipr:
        pods = scan(ipr, bridge_name)
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        ports = [names[pod.ifindex] for pod in pods if pod.ifindex in names]
    with LocalPodsMap(maps_dir) as local_pods:
        return PodSync(local_pods.apply(pods), ports)


def scan(ipr: IPRoute, bridge_name: str) -> list[LocalPod]:
    """The pods on bridge_name whose address, MAC and port are all known."""
    found = ipr.link_lookup(ifname=bridge_name)
    if not found:
        return []
    bridge = found[0]
    gateway_mac = ipr.get_links(bridge)[0].get_attr("IFLA_ADDRESS")
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
            pods.append(LocalPod(IPv4Address(ip), port_of[mac], mac, gateway_mac))
    return pods
