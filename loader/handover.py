"""Swapping flannel.<VNI> for a device of another kind, under traffic.

A node that moves from flanneld to flannel-xdp (or back) keeps its lease, so the other
nodes have nothing to relearn; what changes is the device every packet to another node
is routed into (flanneld's vxlan device, our veth tunnel or our external vxlan device).
Deleting the old device first would drop those packets until the routes are back. So:

1. the old device steps aside under another name (a live rename: its routes,
   neighbours, FDB and UDP socket stay and keep carrying traffic);
2. the new device is made under the name, down, with the old one's address and
   permanent neighbours (and, for flanneld, an FDB entry per peer), its programs
   attached and the maps filled by the caller;
3. the switch: the new device comes up and the routes move onto it, each atomically;
   the caller then puts the underlay program for the new device in place;
4. the old device is deleted.

Two kernel vxlan devices of different kinds cannot hold the same UDP port, and one
releases it only as it closes, which waits for RCU grace periods. So when both are vxlan
the old one goes down first, and nothing receives VXLAN until the new one is up: the
caller (loader/datapath.py) avoids that by going through the veth tunnel, which holds no
port, whenever flanneld's device and ours are both vxlan devices.

A crash between 1 and 4 leaves the old device under its aside name; the next attempt
puts it back (or, after the switch, deletes it) before it starts.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from socket import AF_BRIDGE, AF_INET

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.rtmsg import RTNH_F_ONLINK

from flannel_xdp import defaults
from flannel_xdp.backend import Backend
from flannel_xdp.maps.views import Peer
from flannel_xdp.rtnl import MAIN_TABLE, NUD_PERMANENT

log = logging.getLogger(__name__)

NTF_SELF = 0x2
IFNAMSIZ = 16


class HandoverError(RuntimeError):
    pass


def aside_name(vni: int) -> str:
    """The old device's name while the new one takes flannel.<VNI>."""
    return f"fx-old.{vni}"[: IFNAMSIZ - 1]


@dataclass(frozen=True)
class Route:
    dst: IPv4Network
    gateway: IPv4Address | None
    flags: int
    priority: int
    proto: int
    scope: int


@dataclass
class TunnelState:
    """What routing hangs on a tunnel device: enough to rebuild it on another one."""

    addresses: list[tuple[IPv4Address, int]] = field(default_factory=list)
    neighbours: dict[IPv4Address, str] = field(default_factory=dict)  # permanent only
    routes: list[Route] = field(default_factory=list)
    fdb: dict[str, IPv4Address] = field(default_factory=dict)  # VtepMAC -> PublicIP
    mtu: int = 0
    mac: str = ""

    def vxlan_peers(self) -> list[Peer]:
        """The peers flanneld programmed: route -> next hop's neighbour -> its FDB entry."""
        peers = []
        for r in self.routes:
            mac = self.neighbours.get(r.gateway) if r.gateway else None
            public_ip = self.fdb.get(mac) if mac else None
            if public_ip is not None:
                peers.append(Peer(r.dst, public_ip, Backend.VXLAN, mac))
        return peers


def read_state(ipr: IPRoute, idx: int) -> TunnelState:
    link = ipr.get_links(idx)[0]
    state = TunnelState(mtu=link.get_attr("IFLA_MTU"), mac=link.get_attr("IFLA_ADDRESS") or "")
    for msg in ipr.get_addr(family=AF_INET, index=idx):
        state.addresses.append((IPv4Address(msg.get_attr("IFA_ADDRESS")), msg["prefixlen"]))
    for msg in ipr.get_neighbours(family=AF_INET, ifindex=idx):
        if msg["state"] & NUD_PERMANENT and msg.get_attr("NDA_DST") and msg.get_attr("NDA_LLADDR"):
            state.neighbours[IPv4Address(msg.get_attr("NDA_DST"))] = msg.get_attr("NDA_LLADDR")
    for msg in ipr.get_routes(family=AF_INET, table=MAIN_TABLE):
        if msg.get_attr("RTA_OIF") != idx or msg.get_attr("RTA_DST") is None:
            continue
        gw = msg.get_attr("RTA_GATEWAY")
        state.routes.append(
            Route(
                dst=IPv4Network(f"{msg.get_attr('RTA_DST')}/{msg['dst_len']}"),
                gateway=IPv4Address(gw) if gw else None,
                flags=msg["flags"] & RTNH_F_ONLINK,
                priority=msg.get_attr("RTA_PRIORITY") or 0,
                proto=msg["proto"],
                scope=msg["scope"],
            )
        )
    for msg in ipr.get_neighbours(family=AF_BRIDGE, ifindex=idx):
        dst, mac = msg.get_attr("NDA_DST"), msg.get_attr("NDA_LLADDR")
        if dst and mac and mac != "00:00:00:00:00:00":
            state.fdb[mac] = IPv4Address(dst)
    return state


def _ifindex(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _is_vxlan(ipr: IPRoute, idx: int) -> bool:
    info = ipr.get_links(idx)[0].get_attr("IFLA_LINKINFO")
    return bool(info) and info.get_attr("IFLA_INFO_KIND") == "vxlan"


def _has_routes(ipr: IPRoute, idx: int) -> bool:
    return any(
        msg.get_attr("RTA_OIF") == idx and msg.get_attr("RTA_DST") is not None
        for msg in ipr.get_routes(family=AF_INET, table=MAIN_TABLE)
    )


def recover(vni: int) -> None:
    """Finish or undo a swap a crash interrupted (the aside device is still there)."""
    name, aside = defaults.tunnel_device(vni), aside_name(vni)
    with IPRoute() as ipr:
        old = _ifindex(ipr, aside)
        if old is None:
            return
        new = _ifindex(ipr, name)
        if new is not None and not _has_routes(ipr, old):
            log.warning("deleting %s, left behind by an interrupted swap of %s", aside, name)
            ipr.link("del", index=old)
            return
        if new is not None:
            log.warning("undoing an interrupted swap: %s goes, %s is %s again", name, aside, name)
            ipr.link("del", index=new)
        else:
            log.warning("undoing an interrupted swap: %s is %s again", aside, name)
        ipr.link("set", index=old, ifname=name)


@dataclass
class Swap:
    """One swap of flannel.<VNI>, from step 1 to step 4 (see the module's docstring)."""

    vni: int
    old_ifindex: int
    state: TunnelState
    old_is_vxlan: bool  # holds a UDP port (else a veth tunnel, which holds none)
    switched: bool = False

    @classmethod
    def step_aside(cls, vni: int) -> Swap:
        name = defaults.tunnel_device(vni)
        with IPRoute() as ipr:
            idx = _ifindex(ipr, name)
            if idx is None:
                raise HandoverError(f"{name} does not exist: nothing to swap")
            state = read_state(ipr, idx)
            old_is_vxlan = _is_vxlan(ipr, idx)
            try:
                ipr.link("set", index=idx, ifname=aside_name(vni))
            except NetlinkError as exc:
                raise HandoverError(f"cannot rename {name} aside: {exc}") from exc
        log.info(
            "%s steps aside as %s (%d routes, %d neighbours on it)",
            name, aside_name(vni), len(state.routes), len(state.neighbours),
        )  # fmt: skip
        return cls(vni, idx, state, old_is_vxlan)

    def prepare(self, new_ifindex: int, fdb: dict[str, IPv4Address] | None = None) -> None:
        """The old device's address and neighbours (and fdb) on the new, still down."""
        with IPRoute() as ipr:
            try:
                for addr, prefixlen in self.state.addresses:
                    ipr.addr("replace", index=new_ifindex, address=str(addr), prefixlen=prefixlen)
                for dst, mac in self.state.neighbours.items():
                    ipr.neigh(
                        "replace", dst=str(dst), lladdr=mac, ifindex=new_ifindex,
                        state=NUD_PERMANENT,
                    )  # fmt: skip
                for mac, public_ip in (fdb or {}).items():
                    ipr.fdb(
                        "replace", ifindex=new_ifindex, lladdr=mac, dst=str(public_ip),
                        state=NUD_PERMANENT, flags=NTF_SELF,
                    )  # fmt: skip
            except NetlinkError as exc:
                raise HandoverError(f"cannot prepare the new {self.name}: {exc}") from exc

    @property
    def name(self) -> str:
        return defaults.tunnel_device(self.vni)

    def switch(self, new_ifindex: int) -> None:
        """Bring the new device up and move every route onto it.

        One `ip -batch` does it: iproute2 sends the messages back to back, a quarter of
        the time per message pyroute2 takes. Between old down and new up (both vxlan, see
        the module's docstring) packets through this node would have no path.
        """
        with IPRoute() as ipr:
            both_vxlan = _is_vxlan(ipr, self.old_ifindex) and _is_vxlan(ipr, new_ifindex)
        commands = []
        if both_vxlan:  # the UDP port is the old one's until it goes down
            commands.append(f"link set dev {aside_name(self.vni)} down")
        commands.append(f"link set dev {self.name} up")
        for r in self.state.routes:
            via = f" via {r.gateway}" if r.gateway else ""
            onlink = " onlink" if r.flags & RTNH_F_ONLINK else ""
            commands.append(
                f"route replace {r.dst}{via} dev {self.name}{onlink} "
                f"proto {r.proto} metric {r.priority} scope {r.scope}"
            )
        run = subprocess.run(
            ["ip", "-batch", "-"], input="\n".join(commands) + "\n", capture_output=True, text=True
        )
        if run.returncode != 0:
            raise HandoverError(f"cannot switch {self.name} over: {run.stderr.strip()}")
        self.switched = True
        log.info("%s switched over (%d routes moved)", self.name, len(self.state.routes))

    def finish(self) -> None:
        with IPRoute() as ipr:
            try:
                ipr.link("del", index=self.old_ifindex)
            except NetlinkError as exc:
                log.warning("could not delete %s: %s", aside_name(self.vni), exc)

    def abort(self) -> None:
        """Before the switch: the new device goes and the old one gets its name back."""
        if self.switched:
            return
        with IPRoute() as ipr:
            new = _ifindex(ipr, self.name)
            if new is not None and new != self.old_ifindex:
                try:
                    ipr.link("del", index=new)
                except NetlinkError as exc:
                    log.warning("could not delete the new %s: %s", self.name, exc)
            ipr.link("set", index=self.old_ifindex, ifname=self.name)
        log.warning("swap of %s abandoned: the old device is %s again", self.name, self.name)


def create_flanneld_device(
    vni: int,
    public_ip: IPv4Address,
    underlay_ifindex: int,
    port: int,
    vtep_mac: str,
    mtu: int,
) -> int:
    """flannel.<VNI> as flanneld makes it (a VNI, local address, bound to the underlay, no
    learning), down: a flanneld started next adopts it as its own."""
    name = defaults.tunnel_device(vni)
    with IPRoute() as ipr:
        try:
            ipr.link(
                "add",
                ifname=name,
                kind="vxlan",
                vxlan_id=vni,
                vxlan_local=str(public_ip),
                vxlan_link=underlay_ifindex,
                vxlan_port=port,
                vxlan_learning=0,
            )
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=idx, address=vtep_mac, mtu=mtu)
        except NetlinkError as exc:
            raise HandoverError(f"cannot create flanneld's {name}: {exc}") from exc
    return idx


__all__ = [
    "HandoverError",
    "Swap",
    "TunnelState",
    "aside_name",
    "create_flanneld_device",
    "read_state",
    "recover",
]
