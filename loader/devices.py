"""The tunnel device: a veth pair standing in for flanneld's vxlan device.

flannel.<VNI> is the stack's side: it holds the node's <subnet>.0/32, remote
subnets are routed to it, and decapsulated packets arrive on it, so netfilter
and routing see what they see with flanneld. fxdp.<VNI> is the BPF side: the
XDP program on the underlay redirects decapsulated frames into it.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_xdp import defaults

log = logging.getLogger(__name__)

# Keep encapsulated GSO packets within IPv4's 64 KiB even after the 50-byte outer headers.
TUNNEL_GSO_MAX_SIZE = 65536 - 2 * defaults.VXLAN_OVERHEAD


class DeviceError(RuntimeError):
    pass


@dataclass(frozen=True)
class TunnelDevice:
    name: str
    ifindex: int
    peer_name: str
    peer_ifindex: int


def tunnel_names(vni: int) -> tuple[str, str]:
    return (
        defaults.TUNNEL_DEVICE_FORMAT.format(vni=vni),
        defaults.TUNNEL_PEER_FORMAT.format(vni=vni),
    )


def ifindex(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def require_ifindex(name: str) -> int:
    with IPRoute() as ipr:
        idx = ifindex(ipr, name)
    if idx is None:
        raise DeviceError(f"interface {name!r} does not exist in this network namespace")
    return idx


def _link_kind(ipr: IPRoute, idx: int) -> str | None:
    link = ipr.get_links(idx)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def _sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        log.warning("could not set %s=%s: %s", path, value, exc)


def ensure_tunnel(vni: int, vtep_mac: str, mtu: int) -> TunnelDevice:
    """Create (or adopt) the tunnel veth pair and bring it up with our settings."""
    name, peer = tunnel_names(vni)
    with IPRoute() as ipr:
        idx = ifindex(ipr, name)
        if idx is None:
            try:
                ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer})
            except NetlinkError as exc:
                raise DeviceError(f"cannot create tunnel device {name}: {exc}") from exc
            idx = ifindex(ipr, name)
            log.info("created tunnel device %s (peer %s)", name, peer)
        kind = _link_kind(ipr, idx)
        peer_idx = ifindex(ipr, peer)
        if kind != "veth" or peer_idx is None:
            raise DeviceError(
                f"{name} exists but is not a flannel-xdp tunnel (kind {kind}, peer {peer} "
                f"{'missing' if peer_idx is None else 'present'}): is flanneld running here?"
            )
        # No IPv6 link-local chatter on a device that only carries routed IPv4.
        for dev in (name, peer):
            _sysctl(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6", "1")
        # Setting the MAC, even to the one it has, makes the kernel flush the device's
        # neighbours (NETDEV_CHANGEADDR), permanent ones included: an adopting restart
        # would leave every peer without its neighbour until the agent re-adds it, and
        # packets to the peers would queue for ARP and overflow. Only set a new MAC.
        settings = {"mtu": mtu, "gso_max_size": TUNNEL_GSO_MAX_SIZE}
        current = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS") or ""
        if current.lower() != vtep_mac.lower():
            settings["address"] = vtep_mac
        try:
            ipr.link("set", index=idx, **settings)
            ipr.link("set", index=peer_idx, mtu=mtu)
            ipr.link("set", index=peer_idx, state="up")
            ipr.link("set", index=idx, state="up")
        except NetlinkError as exc:
            raise DeviceError(f"cannot configure tunnel device {name}: {exc}") from exc
    _enable_gro(name)
    return TunnelDevice(name=name, ifindex=idx, peer_name=peer, peer_ifindex=peer_idx)


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
        if _link_kind(ipr, idx) != "veth":
            log.warning("not removing %s: it is not our veth tunnel", name)
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
    "ensure_tunnel",
    "link_mtu",
    "remove_tunnel",
    "require_ifindex",
    "tunnel_names",
]
