"""From leases to the peers the data path must reach: the desired state."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from flannel_xdp.backend import Backend
from flannel_xdp.maps.views import Peer
from flannel_xdp.registry.config import NetworkConfig
from flannel_xdp.registry.lease import LeaseAttrs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ignored:
    subnet: IPv4Network
    why: str


@dataclass
class DesiredPeers:
    peers: dict[IPv4Network, Peer] = field(default_factory=dict)
    ignored: list[Ignored] = field(default_factory=list)


def on_link(addr: IPv4Address, direct: Iterable[IPv4Network]) -> bool:
    return any(addr in net for net in direct)


def peer_for(
    subnet: IPv4Network,
    attrs: LeaseAttrs,
    config: NetworkConfig,
    direct: Iterable[IPv4Network],
) -> Peer | Ignored:
    """How to reach one remote lease, or why we cannot (flanneld ignores the same ones,
    except a PublicIP inside the Network, which flanneld would program into a loop)."""
    if attrs.public_ip in config.network:
        # Every leased subnet is routed into the tunnel, so the encapsulated packets to this
        # tunnel endpoint would be routed into the tunnel again (check_underlay refuses the
        # same for this node's own public IP).
        why = (
            f"lease PublicIP {attrs.public_ip} is inside the pod Network {config.network}: "
            "its tunnel endpoint would be routed into the tunnel (a routing loop)"
        )
        return Ignored(subnet, why)
    kind = config.backend.type
    if attrs.backend_type != kind:
        why = f"lease backend {attrs.backend_type!r} is not the network's {kind!r}"
        return Ignored(subnet, why)
    if kind == "vxlan":
        if attrs.vni != config.backend.vxlan.vni:
            why = f"lease VNI {attrs.vni} is not ours ({config.backend.vxlan.vni})"
            return Ignored(subnet, why)
        # DirectRouting: a peer on our own L2 network is reached without encapsulation.
        direct_route = config.backend.vxlan.direct_routing and on_link(attrs.public_ip, direct)
        backend = Backend.HOST_GW if direct_route else Backend.VXLAN
        if attrs.vtep_mac is None:
            return Ignored(subnet, "vxlan lease without a VtepMAC")
        return Peer(subnet, attrs.public_ip, backend, attrs.vtep_mac)
    if kind == "host-gw":
        if not on_link(attrs.public_ip, direct):
            return Ignored(
                subnet,
                f"host-gw peer {attrs.public_ip} is not on a directly "
                "connected network (host-gw needs L2 adjacency)",
            )
        return Peer(subnet, attrs.public_ip, Backend.HOST_GW)
    return Ignored(subnet, f"backend {kind!r} has no BPF data path")


def desired_peers(
    leases: Mapping[IPv4Network, LeaseAttrs],
    own: IPv4Network,
    config: NetworkConfig,
    direct: Iterable[IPv4Network],
) -> DesiredPeers:
    direct = list(direct)
    out = DesiredPeers()
    for subnet, attrs in leases.items():
        if subnet == own:
            continue
        got = peer_for(subnet, attrs, config, direct)
        if isinstance(got, Ignored):
            out.ignored.append(got)
        else:
            out.peers[subnet] = got
    return out
