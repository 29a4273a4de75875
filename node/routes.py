"""The node state flanneld makes around its tunnel device, made for flannel.<VNI>.

flanneld's vxlan backend gives the device ``<own subnet .0>/32`` and, per remote
lease, a permanent neighbour ``<remote subnet .0> -> VtepMAC`` and a route
``<remote subnet> via <remote subnet .0> dev flannel.<VNI> onlink``
(shared/flannel-compat.md). flannel-xdp keeps that shape so that netfilter,
``ip route`` and everything that reads them see what they see with flanneld,
with one difference: *every* remote subnet goes to the tunnel device, host-gw
peers included. The device's tc egress program decides per destination
whether to encapsulate (vxlan) or only rewrite MACs (host-gw); for host-gw
peers the neighbour's MAC is a placeholder that only keeps the kernel from
sending ARP on a device that carries routed IPv4 only.

Every function is idempotent (replace semantics) and acts in the caller's
network namespace: enter the node's netns first (flannel_xdp.netns.entered).
pyroute2's sync IPRoute is used, so do not call these from a running asyncio
event loop (use asyncio.to_thread there).
"""

from __future__ import annotations

import errno
import json
import logging
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from socket import AF_INET

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.rtmsg import RTNH_F_ONLINK

from flannel_xdp import defaults
from flannel_xdp.backend import Backend
from flannel_xdp.maps.views import Peer
from flannel_xdp.rtnl import MAIN_TABLE, NUD_NONE, NUD_PERMANENT, NUD_VALID

log = logging.getLogger(__name__)

# Deleting what is already gone is success: removal must be repeatable.
_GONE = (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)


class NodeStateError(RuntimeError):
    """The tunnel device is missing, or the kernel refused a change."""


@dataclass(frozen=True)
class RouteSync:
    """What sync_peers() changed: peers written (their route or neighbour differed),
    stale entries removed."""

    written: int
    removed_routes: int
    removed_neighbours: int


def gateway(subnet: IPv4Network) -> IPv4Address:
    """flanneld's next hop for a remote subnet: its network address (the peer's flannel.N)."""
    return subnet.network_address


def tunnel_ifindex(ipr: IPRoute, vni: int = defaults.VXLAN_VNI) -> int:
    name = defaults.tunnel_device(vni)
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NodeStateError(f"tunnel device {name} does not exist in this network namespace")
    return found[0]


def set_tunnel_address(ipr: IPRoute, subnet: IPv4Network, vni: int = defaults.VXLAN_VNI) -> None:
    """Put <subnet .0>/32 on the tunnel device and drop any other IPv4 address there.

    Other addresses are what an earlier lease left behind; flanneld removes them
    too, otherwise the node would keep answering for a subnet it gave up.
    """
    idx = tunnel_ifindex(ipr, vni)
    want = gateway(subnet)
    try:
        held = [
            (IPv4Address(msg.get_attr("IFA_ADDRESS")), msg["prefixlen"])
            for msg in ipr.get_addr(family=AF_INET, index=idx)
        ]
        # The new address first: the kernel flushes a device's routes when its last IPv4
        # address goes. One it holds already is left alone (an adopting restart).
        if (want, 32) not in held:
            ipr.addr("replace", index=idx, address=str(want), prefixlen=32)
        for have, prefixlen in held:
            if (have, prefixlen) != (want, 32):
                ipr.addr("del", index=idx, address=str(have), prefixlen=prefixlen)
                log.info("removed stale address %s/%s from %s", have, prefixlen, idx)
    except NetlinkError as exc:
        raise NodeStateError(
            f"cannot set {want}/32 on {defaults.tunnel_device(vni)}: {exc}"
        ) from exc


def add_peer(
    ipr: IPRoute, peer: Peer, vni: int = defaults.VXLAN_VNI, idx: int | None = None
) -> None:
    """Permanent neighbour and onlink route for one remote subnet (replacing older ones);
    idx: the tunnel's ifindex when the caller knows it."""
    idx = idx or tunnel_ifindex(ipr, vni)
    gw = str(gateway(peer.subnet))
    try:
        ipr.neigh("replace", dst=gw, lladdr=peer.vtep_mac, ifindex=idx, state=NUD_PERMANENT)
        ipr.route(
            "replace",
            dst=str(peer.subnet),
            gateway=gw,
            oif=idx,
            flags=RTNH_F_ONLINK,
            table=MAIN_TABLE,
        )
    except NetlinkError as exc:
        raise NodeStateError(
            f"cannot route {peer.subnet} into {defaults.tunnel_device(vni)}: {exc}"
        ) from exc


def remove_peer(
    ipr: IPRoute, subnet: IPv4Network, vni: int = defaults.VXLAN_VNI, idx: int | None = None
) -> None:
    """Remove the route and neighbour of one remote subnet; absent entries are fine."""
    idx = idx or tunnel_ifindex(ipr, vni)
    gw = str(gateway(subnet))
    try:
        ipr.route("del", dst=str(subnet), gateway=gw, oif=idx, table=MAIN_TABLE)
    except NetlinkError as exc:
        if exc.code not in _GONE:
            raise NodeStateError(f"cannot remove route {subnet}: {exc}") from exc
    try:
        ipr.neigh("del", dst=gw, ifindex=idx)
    except NetlinkError as exc:
        if exc.code not in _GONE:
            raise NodeStateError(f"cannot remove neighbour {gw}: {exc}") from exc


def _ip_json(*args: str) -> list[dict]:
    run = subprocess.run(["ip", "-j", *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise NodeStateError(f"ip {' '.join(args)}: {run.stderr.strip()}")
    return json.loads(run.stdout or "[]")


def ip_batch(commands: list[str]) -> None:
    """Many route and neighbour changes through one `ip -batch`: iproute2 sends them back
    to back, about 25 us each where a pyroute2 call takes 350, so a full sync of
    thousands of peers takes a fraction of a second. Stops at the first failure."""
    if not commands:
        return
    run = subprocess.run(
        ["ip", "-batch", "-"], input="\n".join(commands) + "\n", capture_output=True, text=True
    )
    if run.returncode != 0:
        raise NodeStateError(f"ip -batch: {run.stderr.strip()[-1000:]}")


TunnelRoutes = dict[IPv4Network, IPv4Address | None]


def _tunnel_state(name: str) -> tuple[TunnelRoutes, dict[IPv4Address, str]]:
    """The tunnel's routes (subnet -> onlink gateway, None for any other kind) and its
    permanent neighbours (address -> MAC)."""
    routes = {}
    for r in _ip_json("route", "show", "table", "main", "dev", name):
        if r.get("dst") in (None, "default"):
            continue
        onlink = "onlink" in r.get("flags", [])
        gw = r.get("gateway")
        routes[IPv4Network(r["dst"])] = IPv4Address(gw) if gw and onlink else None
    neighbours = {
        IPv4Address(n["dst"]): n.get("lladdr", "").lower()
        for n in _ip_json("neigh", "show", "dev", name, "nud", "permanent")
        if n.get("dst")
    }
    return routes, neighbours


def sync_peers(ipr: IPRoute, peers: Iterable[Peer], vni: int = defaults.VXLAN_VNI) -> RouteSync:
    """Make the tunnel's routes and permanent neighbours exactly those of peers.

    Everything routed through flannel.<VNI> is ours (flanneld owns its device the
    same way), so a route or neighbour there that no peer wants is stale and goes.
    Only what differs is written (an adopting restart writes nothing), all of it in
    one batch: each neighbour before its route, each route removed before its
    neighbour.
    """
    tunnel_ifindex(ipr, vni)  # a clear error when the device is missing
    name = defaults.tunnel_device(vni)
    routes, neighbours = _tunnel_state(name)
    want = {p.subnet: p for p in peers}
    commands = []
    written = 0
    for peer in want.values():
        gw = gateway(peer.subnet)
        changed = False
        if neighbours.get(gw) != peer.vtep_mac.lower():
            commands.append(f"neigh replace {gw} lladdr {peer.vtep_mac} dev {name} nud permanent")
            changed = True
        if routes.get(peer.subnet) != gw:
            commands.append(f"route replace {peer.subnet} via {gw} dev {name} onlink")
            changed = True
        written += changed
    stale_routes = [subnet for subnet in routes if subnet not in want]
    commands += [f"route del {subnet} dev {name}" for subnet in stale_routes]
    gateways = {gateway(s) for s in want}
    stale_neighbours = [addr for addr in neighbours if addr not in gateways]
    commands += [f"neigh del {addr} dev {name}" for addr in stale_neighbours]
    ip_batch(commands)
    return RouteSync(
        written=written,
        removed_routes=len(stale_routes),
        removed_neighbours=len(stale_neighbours),
    )


# -- host-gw next hops on the underlay ----------------------------------------------------
#
# host-gw (and DirectRouting) frames leave through tunnel_egress, which asks the kernel's
# FIB for the next hop's MAC (bpf_fib_lookup). When the neighbour is not resolved yet,
# bpf_redirect_neigh() queues the frame for ARP, but the queued frame keeps its route
# into the tunnel device, and once ARP answers the kernel sends it with that route's
# neighbour: the tunnel's placeholder MAC, on the underlay. It is lost. So the agent keeps
# a *managed* neighbour entry (NTF_EXT_MANAGED, Linux 5.16+) for every host-gw next hop:
# the kernel resolves it at once and keeps it resolved, and the program always finds the
# MAC. Entries are marked with NEIGH_PROTOCOL so that only ours are ever removed.

NTF_EXT_MANAGED = 0x1
NEIGH_PROTOCOL = 0x66  # "f": flannel-xdp's underlay neighbours


def next_hops(peers: Iterable[Peer]) -> set[IPv4Address]:
    """The underlay next hops that need a resolved neighbour: host-gw peers' public IPs."""
    return {p.public_ip for p in peers if p.backend is Backend.HOST_GW}


def _neighbour(ipr: IPRoute, ifindex: int, addr: IPv4Address):
    try:
        found = ipr.neigh("get", dst=str(addr), ifindex=ifindex)
    except NetlinkError as exc:
        if exc.code in _GONE:
            return None
        raise
    return found[0] if found else None


def ensure_next_hop(ipr: IPRoute, underlay_ifindex: int, addr: IPv4Address) -> None:
    """A managed neighbour entry for addr on the underlay; an entry that is resolved
    already keeps its MAC and state (no moment without one)."""
    have = _neighbour(ipr, underlay_ifindex, addr)
    if (
        have is not None
        and have.get_attr("NDA_FLAGS_EXT", 0) & NTF_EXT_MANAGED
        and have.get_attr("NDA_PROTOCOL") == NEIGH_PROTOCOL
    ):
        return
    kwargs = {"state": NUD_NONE}
    if have is not None and have["state"] & NUD_VALID and have.get_attr("NDA_LLADDR"):
        kwargs = {"state": have["state"], "lladdr": have.get_attr("NDA_LLADDR")}
    try:
        ipr.neigh(
            "replace",
            dst=str(addr),
            ifindex=underlay_ifindex,
            NDA_FLAGS_EXT=NTF_EXT_MANAGED,
            NDA_PROTOCOL=NEIGH_PROTOCOL,
            **kwargs,
        )
    except NetlinkError as exc:
        raise NodeStateError(
            f"cannot keep the neighbour of next hop {addr} resolved: {exc}"
        ) from exc


def remove_next_hop(ipr: IPRoute, underlay_ifindex: int, addr: IPv4Address) -> None:
    """Remove our managed neighbour entry for addr, if there is one."""
    have = _neighbour(ipr, underlay_ifindex, addr)
    if have is None or have.get_attr("NDA_PROTOCOL") != NEIGH_PROTOCOL:
        return
    try:
        ipr.neigh("del", dst=str(addr), ifindex=underlay_ifindex)
    except NetlinkError as exc:
        if exc.code not in _GONE:
            raise NodeStateError(f"cannot remove the neighbour of {addr}: {exc}") from exc


def sync_next_hops(ipr: IPRoute, underlay_ifindex: int, peers: Iterable[Peer]) -> int:
    """Managed neighbours for exactly the host-gw next hops of peers; returns how many
    stale ones (ours) were removed."""
    want = next_hops(peers)
    for addr in want:
        ensure_next_hop(ipr, underlay_ifindex, addr)
    removed = 0
    for msg in ipr.get_neighbours(family=AF_INET, ifindex=underlay_ifindex):
        dst = msg.get_attr("NDA_DST")
        if msg.get_attr("NDA_PROTOCOL") == NEIGH_PROTOCOL and dst and IPv4Address(dst) not in want:
            remove_next_hop(ipr, underlay_ifindex, IPv4Address(dst))
            removed += 1
    return removed


__all__ = [
    "NodeStateError",
    "RouteSync",
    "add_peer",
    "ensure_next_hop",
    "gateway",
    "ip_batch",
    "next_hops",
    "remove_next_hop",
    "remove_peer",
    "set_tunnel_address",
    "sync_next_hops",
    "sync_peers",
    "tunnel_ifindex",
]


@dataclass
class KernelRoutes:
    """The kernel side of the peers: the tunnel's routes and neighbours, the underlay's
    next-hop neighbours (the agent's RouteTable; each call its own netlink socket, as
    they run in worker threads). The tunnel's ifindex is looked up once (a link dump per
    event cost as much as the event) and again when the device was replaced."""

    vni: int
    underlay_ifindex: int
    _tunnel: int | None = field(default=None, init=False, repr=False)

    def _on_tunnel(self, ipr: IPRoute, change: Callable[[int], None]) -> None:
        if self._tunnel is None:
            self._tunnel = tunnel_ifindex(ipr, self.vni)
        try:
            change(self._tunnel)
        except NodeStateError:
            fresh = tunnel_ifindex(ipr, self.vni)
            if fresh == self._tunnel:
                raise
            self._tunnel = fresh
            change(fresh)

    def sync(self, peers: list[Peer]) -> None:
        with IPRoute() as ipr:
            # host-gw next hops resolved before any route sends a packet their way
            sync_next_hops(ipr, self.underlay_ifindex, peers)
            sync_peers(ipr, peers, self.vni)
            self._tunnel = tunnel_ifindex(ipr, self.vni)

    def add(self, peer: Peer) -> None:
        with IPRoute() as ipr:
            if peer.backend is Backend.HOST_GW:
                ensure_next_hop(ipr, self.underlay_ifindex, peer.public_ip)
            self._on_tunnel(ipr, lambda idx: add_peer(ipr, peer, self.vni, idx))

    def remove(self, subnet: IPv4Network) -> None:
        with IPRoute() as ipr:
            self._on_tunnel(ipr, lambda idx: remove_peer(ipr, subnet, self.vni, idx))

    def forget_next_hop(self, addr: IPv4Address) -> None:
        with IPRoute() as ipr:
            remove_next_hop(ipr, self.underlay_ifindex, addr)
