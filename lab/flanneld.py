"""A stock flanneld node's kernel data path, programmed the way flanneld programs it.

The agent-driven lab (agentcluster.py), the demo and the benchmark's stock variants run
the real flanneld. This imitation remains for the static topology.Cluster, whose packet
and fast-path tests need stock nodes with subnets and VtepMACs fixed before anything
runs and no registry, and for AgentCluster.replace_dataplane(), which leaves flanneld a
device of its own kind with the agent's MAC to adopt. It makes the exact kernel state
flanneld v0.28 makes:

vxlan
    ``ip link add flannel.<VNI> type vxlan id <VNI> local <public ip> dev <iface>
    dstport 8472 nolearning`` with its VtepMAC and MTU underlay - 50, holding
    ``<own subnet .0>/32``; per remote lease a permanent neighbour
    ``<remote subnet .0> -> VtepMAC``, an FDB entry ``VtepMAC dst <remote ip>
    self permanent`` and the route ``<remote subnet> via <remote subnet .0>
    dev flannel.<VNI> onlink``.
host-gw
    per remote lease ``<remote subnet> via <remote public ip> dev <iface>``.

Every function acts in the caller's network namespace (enter the node's netns
first) and is idempotent.
"""

from __future__ import annotations

import errno
import logging
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from flannel_xdp import defaults
from flannel_xdp.loader import handover
from flannel_xdp.maps.views import Peer
from flannel_xdp.node import routes

log = logging.getLogger(__name__)

_GONE = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)


class FlanneldStateError(RuntimeError):
    pass


def _ifindex(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise FlanneldStateError(f"interface {name!r} does not exist in this network namespace")
    return found[0]


def ensure_vxlan_device(
    public_ip: IPv4Address,
    subnet: IPv4Network,
    vtep_mac: str,
    mtu: int,
    underlay: str = "eth0",
    vni: int = defaults.VXLAN_VNI,
    port: int = defaults.VXLAN_PORT,
) -> int:
    """Create (or keep) flannel.<VNI> as a kernel vxlan device, up, with <subnet .0>/32."""
    name = defaults.tunnel_device(vni)
    with IPRoute() as ipr:
        lower = _ifindex(ipr, underlay)
        if not ipr.link_lookup(ifname=name):
            try:
                handover.create_flanneld_device(vni, public_ip, lower, port, vtep_mac, mtu)
            except handover.HandoverError as exc:
                raise FlanneldStateError(str(exc)) from exc
            log.info("created kernel vxlan device %s (vni %d, local %s)", name, vni, public_ip)
        idx = _ifindex(ipr, name)
        ipr.link("set", index=idx, address=vtep_mac, mtu=mtu)
        ipr.link("set", index=idx, state="up")
        routes.set_tunnel_address(ipr, subnet, vni)
    return idx


def add_vxlan_peer(peer: Peer, vni: int = defaults.VXLAN_VNI) -> None:
    """Neighbour, FDB entry and onlink route for one remote vxlan lease."""
    with IPRoute() as ipr:
        idx = routes.tunnel_ifindex(ipr, vni)
        try:
            # flanneld: netlink.NeighSet{Family: AF_BRIDGE, State: NUD_PERMANENT, Flags: NTF_SELF}
            ipr.fdb(
                "replace",
                ifindex=idx,
                lladdr=peer.vtep_mac,
                dst=str(peer.public_ip),
                state=ndmsg.states["permanent"],
                flags=ndmsg.flags["self"],
            )
        except NetlinkError as exc:
            raise FlanneldStateError(f"cannot add fdb entry for {peer.subnet}: {exc}") from exc
        routes.add_peer(ipr, peer, vni)


def remove_vxlan_peer(peer: Peer, vni: int = defaults.VXLAN_VNI) -> None:
    with IPRoute() as ipr:
        idx = routes.tunnel_ifindex(ipr, vni)
        routes.remove_peer(ipr, peer.subnet, vni)
        try:
            ipr.fdb(
                "del",
                ifindex=idx,
                lladdr=peer.vtep_mac,
                dst=str(peer.public_ip),
                flags=ndmsg.flags["self"],
            )
        except NetlinkError as exc:
            if exc.code not in _GONE:
                raise FlanneldStateError(
                    f"cannot remove fdb entry for {peer.subnet}: {exc}"
                ) from exc


def add_host_gw_route(peer: Peer, underlay: str = "eth0") -> None:
    """The host-gw route for one remote lease: via its public IP on the underlay."""
    with IPRoute() as ipr:
        try:
            ipr.route(
                "replace",
                dst=str(peer.subnet),
                gateway=str(peer.public_ip),
                oif=_ifindex(ipr, underlay),
            )
        except NetlinkError as exc:
            raise FlanneldStateError(f"cannot add host-gw route {peer.subnet}: {exc}") from exc


def remove_host_gw_route(peer: Peer, underlay: str = "eth0") -> None:
    with IPRoute() as ipr:
        try:
            ipr.route(
                "del",
                dst=str(peer.subnet),
                gateway=str(peer.public_ip),
                oif=_ifindex(ipr, underlay),
            )
        except NetlinkError as exc:
            if exc.code not in _GONE:
                raise FlanneldStateError(
                    f"cannot remove host-gw route {peer.subnet}: {exc}"
                ) from exc
