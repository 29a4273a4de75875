"""The tunnel device flannel.<VNI>, in one of two kinds.

Either way flannel.<VNI> is the stack's side: it holds the node's <subnet>.0/32,
remote subnets are routed to it, tunnel_egress encapsulates on its egress, and
decapsulated packets arrive on it, so netfilter and routing see what they see
with flanneld.

- veth: a veth pair; fxdp.<VNI> is the BPF side, into which the underlay program
  redirects the frames it decapsulated itself (XDP and tc ingress hooks).
- vxlan: the kernel's vxlan device in external (collect_md) mode, with no
  forwarding table: it only receives, decapsulating what the underlay tc program
  accepted (kernel ingress hook). Its own transmit path is never used, because
  tunnel_egress redirects every packet it encapsulates straight to the underlay.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from enum import StrEnum

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_xdp import defaults

log = logging.getLogger(__name__)

IFF_UP = 0x1

# Keep encapsulated GSO packets within IPv4's 64 KiB even after the 50-byte outer headers.
TUNNEL_GSO_MAX_SIZE = 65536 - 2 * defaults.VXLAN_OVERHEAD


class DeviceError(RuntimeError):
    pass


class TunnelKind(StrEnum):
    VETH = "veth"
    VXLAN = "vxlan"


@dataclass(frozen=True)
class TunnelDevice:
    name: str
    ifindex: int
    kind: TunnelKind
    peer_name: str | None = None  # veth only
    peer_ifindex: int = 0


def tunnel_names(vni: int) -> tuple[str, str]:
    """The tunnel device and its BPF-side veth peer (the XDP hook's)."""
    return defaults.tunnel_device(vni), defaults.TUNNEL_PEER_FORMAT.format(vni=vni)


def ifindex(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def require_ifindex(name: str) -> int:
    with IPRoute() as ipr:
        idx = ifindex(ipr, name)
    if idx is None:
        raise DeviceError(f"interface {name!r} does not exist in this network namespace")
    return idx


def _link_info(ipr: IPRoute, idx: int):
    return ipr.get_links(idx)[0].get_attr("IFLA_LINKINFO")


def _link_kind(ipr: IPRoute, idx: int) -> str | None:
    info = _link_info(ipr, idx)
    return info.get_attr("IFLA_INFO_KIND") if info else None


def _tunnel_kind(ipr: IPRoute, idx: int) -> tuple[TunnelKind, int] | None:
    """Which of our tunnel kinds idx is, and (vxlan) the UDP port it listens on; None for
    anything else (flanneld's vxlan device has a VNI and a forwarding table, ours is
    external)."""
    info = _link_info(ipr, idx)
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    if kind == "veth":
        return TunnelKind.VETH, 0
    if kind == "vxlan":
        data = info.get_attr("IFLA_INFO_DATA")
        if data is not None and data.get_attr("IFLA_VXLAN_COLLECT_METADATA"):
            return TunnelKind.VXLAN, data.get_attr("IFLA_VXLAN_PORT")
    return None


def _is_flanneld_vxlan(ipr: IPRoute, idx: int) -> bool:
    """flanneld's flannel.<VNI>: a kernel vxlan device with a VNI and its own forwarding
    table (not external)."""
    info = _link_info(ipr, idx)
    if not info or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return False
    data = info.get_attr("IFLA_INFO_DATA")
    return data is not None and not data.get_attr("IFLA_VXLAN_COLLECT_METADATA")


def is_flanneld_tunnel(vni: int) -> bool:
    with IPRoute() as ipr:
        idx = ifindex(ipr, tunnel_names(vni)[0])
        return idx is not None and _is_flanneld_vxlan(ipr, idx)


def is_our_vxlan_tunnel(vni: int) -> bool:
    """flannel.<VNI> is our external vxlan device (the kernel hook's), which holds a UDP port."""
    with IPRoute() as ipr:
        idx = ifindex(ipr, tunnel_names(vni)[0])
        found = _tunnel_kind(ipr, idx) if idx is not None else None
        return found is not None and found[0] is TunnelKind.VXLAN


def must_swap(vni: int, kind: TunnelKind, port: int) -> bool:
    """Whether flannel.<VNI> is there but not to be adopted as a tunnel of this kind (and,
    vxlan, port): flanneld's device, or ours of the other kind or port. It carries
    traffic, so it is swapped under it (loader.handover), not deleted and made again."""
    with IPRoute() as ipr:
        idx = ifindex(ipr, tunnel_names(vni)[0])
        if idx is None:
            return False
        if _is_flanneld_vxlan(ipr, idx):
            return True
        found = _tunnel_kind(ipr, idx)
        if found is None:
            return False  # not ours: ensure_tunnel refuses it
        return found[0] is not kind or (kind is TunnelKind.VXLAN and found[1] != port)


def _sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        log.warning("could not set %s=%s: %s", path, value, exc)


def _create(ipr: IPRoute, kind: TunnelKind, name: str, peer: str, port: int) -> None:
    try:
        if kind is TunnelKind.VETH:
            ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer})
        else:
            # Not bound to the underlay device: the kernel never transmits on it, and
            # unbound its MTU is not capped at the underlay's minus 50 (host-gw peers
            # behind flannel.<VNI> use the underlay's full MTU).
            ipr.link(
                "add",
                ifname=name,
                kind="vxlan",
                vxlan_collect_metadata=1,
                vxlan_port=port,
                vxlan_learning=0,
            )
    except NetlinkError as exc:
        raise DeviceError(f"cannot create tunnel device {name} ({kind}): {exc}") from exc
    log.info("created tunnel device %s (%s)", name, kind.value)


def ensure_tunnel(
    vni: int,
    vtep_mac: str,
    mtu: int,
    kind: TunnelKind = TunnelKind.VETH,
    port: int = defaults.VXLAN_PORT,
    up: bool = True,
) -> TunnelDevice:
    """Create (or adopt) the tunnel device of this kind and bring it up with our settings
    (a new one stays down when not up: loader.handover brings it up at its switch).
    One that must_swap() names is swapped first, by the caller."""
    name, peer = tunnel_names(vni)
    with IPRoute() as ipr:
        idx = ifindex(ipr, name)
        if idx is not None:
            found = _tunnel_kind(ipr, idx)
            if found is None and _is_flanneld_vxlan(ipr, idx):
                raise DeviceError(
                    f"{name} is flanneld's vxlan device: swap it with loader.handover first"
                )
            if found is None:
                raise DeviceError(
                    f"{name} exists but is not a flannel-xdp tunnel (kind {_link_kind(ipr, idx)}): "
                    "is flanneld running here?"
                )
            if found[0] is not kind or (kind is TunnelKind.VXLAN and found[1] != port):
                raise DeviceError(
                    f"{name} is our {found[0]} tunnel (port {found[1]}), not a {kind} on "
                    f"port {port}: swap it with loader.handover first"
                )
        if idx is None:
            _create(ipr, kind, name, peer, port)
            idx = ifindex(ipr, name)
        peer_idx = ifindex(ipr, peer) if kind is TunnelKind.VETH else None
        if kind is TunnelKind.VETH and peer_idx is None:
            raise DeviceError(f"{name} is a veth without its peer {peer}: delete it and restart")
        devs = (name, peer) if kind is TunnelKind.VETH else (name,)
        # No IPv6 link-local chatter on a device that only carries routed IPv4.
        for dev in devs:
            _sysctl(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6", "1")
        # Setting the MAC, even to the one it has, makes the kernel flush the device's
        # neighbours (NETDEV_CHANGEADDR), permanent ones included: an adopting restart
        # would leave every peer without its neighbour until the agent re-adds it, and
        # packets to the peers would queue for ARP and overflow. Only set a new MAC.
        # An adopted device already carries traffic: only what differs is set.
        link = ipr.get_links(idx)[0]
        want = {"mtu": mtu, "gso_max_size": TUNNEL_GSO_MAX_SIZE}
        settings = {k: v for k, v in want.items() if link.get_attr(f"IFLA_{k.upper()}") != v}
        current = link.get_attr("IFLA_ADDRESS") or ""
        if current.lower() != vtep_mac.lower():
            settings["address"] = vtep_mac
        try:
            if settings:
                ipr.link("set", index=idx, **settings)
            if peer_idx is not None:
                _set_up(ipr, peer_idx, mtu)
            if up:
                _set_up(ipr, idx)
        except NetlinkError as exc:
            raise DeviceError(f"cannot configure tunnel device {name}: {exc}") from exc
    if kind is TunnelKind.VXLAN:
        return TunnelDevice(name=name, ifindex=idx, kind=kind)
    _enable_gro(name)
    return TunnelDevice(name=name, ifindex=idx, kind=kind, peer_name=peer, peer_ifindex=peer_idx)


def _set_up(ipr: IPRoute, idx: int, mtu: int | None = None) -> None:
    """Bring idx up (with mtu), unless it is so already."""
    link = ipr.get_links(idx)[0]
    if mtu is not None and link.get_attr("IFLA_MTU") != mtu:
        ipr.link("set", index=idx, mtu=mtu)
    if not link["flags"] & IFF_UP:
        ipr.link("set", index=idx, state="up")


def _enable_gro(name: str) -> None:
    # Frames XDP redirects into the peer are only delivered when this side runs
    # NAPI, which GRO switches on; GRO also re-aggregates the decapped segments.
    try:
        subprocess.run(
            ["ethtool", "-K", name, "gro", "on"], check=True, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise DeviceError(
            f"cannot enable GRO on {name} (needed for XDP redirect): {detail}"
        ) from exc


def remove_tunnel(vni: int) -> bool:
    name, _ = tunnel_names(vni)
    with IPRoute() as ipr:
        idx = ifindex(ipr, name)
        if idx is None:
            return False
        if _tunnel_kind(ipr, idx) is None:
            log.warning("not removing %s: it is not a flannel-xdp tunnel", name)
            return False
        ipr.link("del", index=idx)
    log.info("removed tunnel device %s", name)
    return True


def link_mtu(name: str) -> int:
    with IPRoute() as ipr:
        idx = ifindex(ipr, name)
        if idx is None:
            raise DeviceError(f"interface {name!r} does not exist in this network namespace")
        return ipr.get_links(idx)[0].get_attr("IFLA_MTU")


__all__ = [
    "DeviceError",
    "TunnelDevice",
    "TunnelKind",
    "ensure_tunnel",
    "is_flanneld_tunnel",
    "is_our_vxlan_tunnel",
    "link_mtu",
    "must_swap",
    "remove_tunnel",
    "require_ifindex",
    "tunnel_names",
]
