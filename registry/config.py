"""The network config at <prefix>/config, parsed and checked as flanneld does.

flanneld decodes the JSON with Go's encoding/json, which matches keys
case-insensitively; so do we. Every error names the offending key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Network
from typing import Any

from flannel_xdp import defaults

DEFAULT_SUBNET_LEN = 24  # when the network is /22 or wider
MAX_SUBNET_LEN = 30
MIN_SUBNET_BITS = 2  # SubnetLen >= Network prefix + 2: four subnets at least
SMALLEST_NETWORK_PREFIX = 28
DEFAULT_IPV6_SUBNET_LEN = 64
BACKEND_TYPES = ("vxlan", "host-gw", "udp")
DEFAULT_BACKEND = "udp"  # flanneld's choice when the config names none
UDP_DEFAULT_PORT = 8285


class ConfigError(ValueError):
    """The network config is invalid; the message names the key."""


def _lower_keys(obj: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        lk = k.lower()
        if lk in out:
            raise ConfigError(f"{where}: key {k!r} given twice (keys are case-insensitive)")
        out[lk] = v
    return out


def _typed(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], name: str, default=None):
    if key not in obj or obj[key] is None:
        return default
    value = obj[key]
    # JSON true/false are not numbers here, though Python's bool is an int.
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{name}: expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{name}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {bool: "true or false", int: "a whole number", str: "a string", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _uint(obj: dict[str, Any], key: str, name: str, default: int) -> int:
    value = _typed(obj, key, int, name, default)
    if value < 0:
        raise ConfigError(f"{name}: must not be negative, got {value}")
    return value


@dataclass(frozen=True)
class VxlanOptions:
    vni: int = defaults.VXLAN_VNI
    port: int = defaults.VXLAN_PORT
    mtu: int = 0  # 0: underlay MTU - overhead
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False


@dataclass(frozen=True)
class BackendConfig:
    type: str
    vxlan: VxlanOptions = field(default_factory=VxlanOptions)
    udp_port: int = UDP_DEFAULT_PORT


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend: BackendConfig
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    ipv6_network: IPv6Network | None = None
    ipv6_subnet_len: int = DEFAULT_IPV6_SUBNET_LEN
    enable_nftables: bool = False

    def subnets(self) -> list[IPv4Network]:
        """Every subnet from SubnetMin to SubnetMax, in order."""
        step = 1 << (32 - self.subnet_len)
        first, last = int(self.subnet_min), int(self.subnet_max)
        return [IPv4Network((a, self.subnet_len)) for a in range(first, last + 1, step)]


def _parse_backend(raw: Any) -> BackendConfig:
    if raw is None:
        return BackendConfig(type=DEFAULT_BACKEND)
    if not isinstance(raw, dict):
        raise ConfigError(f"Backend: expected an object, got {raw!r}")
    b = _lower_keys(raw, "Backend")
    kind = _typed(b, "type", str, "Backend.Type")
    if kind is None:
        raise ConfigError("Backend.Type: missing")
    if kind not in BACKEND_TYPES:
        raise ConfigError(
            f"Backend.Type: unknown backend type {kind!r} (flannel-xdp supports: "
            f"{', '.join(BACKEND_TYPES)})"
        )
    if kind == "vxlan":
        vni = _uint(b, "vni", "Backend.VNI", defaults.VXLAN_VNI)
        if not 0 < vni < 1 << 24:
            raise ConfigError(f"Backend.VNI: must be 1..16777215, got {vni}")
        port = _uint(b, "port", "Backend.Port", 0) or defaults.VXLAN_PORT
        if port > 65535:
            raise ConfigError(f"Backend.Port: must be 1..65535, got {port}")
        mtu = _uint(b, "mtu", "Backend.MTU", 0)
        if mtu and not 68 <= mtu <= 65535:
            raise ConfigError(f"Backend.MTU: must be 68..65535, got {mtu}")
        opts = VxlanOptions(
            vni=vni,
            port=port,
            mtu=mtu,
            gbp=_typed(b, "gbp", bool, "Backend.GBP", False),
            learning=_typed(b, "learning", bool, "Backend.Learning", False),
            direct_routing=_typed(b, "directrouting", bool, "Backend.DirectRouting", False),
        )
        if opts.gbp:
            raise ConfigError("Backend.GBP: group-based policy is not supported by flannel-xdp")
        return BackendConfig(type=kind, vxlan=opts)
    if kind == "udp":
        port = _uint(b, "port", "Backend.Port", UDP_DEFAULT_PORT) or UDP_DEFAULT_PORT
        return BackendConfig(type=kind, udp_port=port)
    return BackendConfig(type=kind)


def _parse_ip4(obj: dict[str, Any], key: str, name: str) -> IPv4Address | None:
    text = _typed(obj, key, str, name)
    if text is None:
        return None
    try:
        return IPv4Address(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: not an IPv4 address: {text!r}") from exc


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse <prefix>/config; raises ConfigError naming the key at fault."""
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a JSON object")
    c = _lower_keys(raw, "config")

    enable_ipv4 = _typed(c, "enableipv4", bool, "EnableIPv4", True)
    enable_ipv6 = _typed(c, "enableipv6", bool, "EnableIPv6", False)
    if not enable_ipv4:
        raise ConfigError("EnableIPv4: IPv6-only networks are not supported by flannel-xdp yet")
    if enable_ipv6:
        raise ConfigError("EnableIPv6: dual stack is not supported by flannel-xdp yet")

    net_text = _typed(c, "network", str, "Network")
    if net_text is None:
        raise ConfigError("Network: missing")
    try:
        network = IPv4Network(net_text, strict=False)
    except ValueError as exc:
        raise ConfigError(f"Network: not an IPv4 network: {net_text!r}") from exc

    subnet_len = _uint(c, "subnetlen", "SubnetLen", 0)
    if subnet_len:
        if subnet_len > MAX_SUBNET_LEN:
            raise ConfigError(f"SubnetLen: must be at most {MAX_SUBNET_LEN}, got {subnet_len}")
        # flanneld's rule: the first subnet is never leased, so a Network split in two
        # would serve a single node; it asks for room for at least four subnets.
        if subnet_len < network.prefixlen + MIN_SUBNET_BITS:
            raise ConfigError(
                f"SubnetLen: /{subnet_len} leaves Network {network} room for fewer than four "
                f"subnets (at least /{network.prefixlen + MIN_SUBNET_BITS})"
            )
    elif network.prefixlen > SMALLEST_NETWORK_PREFIX:
        raise ConfigError(
            f"Network: {network} is too small; the smallest useful network is "
            f"/{SMALLEST_NETWORK_PREFIX}"
        )
    elif network.prefixlen <= 22:
        subnet_len = DEFAULT_SUBNET_LEN
    else:
        subnet_len = network.prefixlen + 2

    size = 1 << (32 - subnet_len)
    mask = (0xFFFFFFFF << (32 - subnet_len)) & 0xFFFFFFFF
    subnet_min = _parse_ip4(c, "subnetmin", "SubnetMin")
    subnet_max = _parse_ip4(c, "subnetmax", "SubnetMax")
    # flanneld reads 0.0.0.0 as unset (the zero value of its IP4 type), so do we.
    if subnet_min is None or int(subnet_min) == 0:
        subnet_min = network.network_address + size
    elif subnet_min not in network:
        raise ConfigError(f"SubnetMin: {subnet_min} is not in Network {network}")
    if subnet_max is None or int(subnet_max) == 0:
        subnet_max = IPv4Address(int(network.broadcast_address) + 1 - size)
    elif subnet_max not in network:
        raise ConfigError(f"SubnetMax: {subnet_max} is not in Network {network}")
    for name, addr in (("SubnetMin", subnet_min), ("SubnetMax", subnet_max)):
        if int(addr) & mask != int(addr):
            raise ConfigError(f"{name}: {addr} is not on a /{subnet_len} boundary")
    if subnet_min > subnet_max:
        raise ConfigError(f"SubnetMin: {subnet_min} is above SubnetMax {subnet_max}")

    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        backend=_parse_backend(c.get("backend")),
        enable_ipv4=enable_ipv4,
        enable_ipv6=enable_ipv6,
        enable_nftables=_typed(c, "enablenftables", bool, "EnableNFTables", False),
    )


def check_underlay(
    config: NetworkConfig, iface: str, address: IPv4Interface, public_ip: IPv4Address
) -> None:
    """Refuse a pod Network that overlaps this node's underlay; ConfigError names the clash.

    flanneld makes no such check, but no data path survives one: every leased subnet is
    routed into the tunnel (and the BPF programs take any address inside one for a pod), so
    the node's own address, or an on-link neighbour's, inside the Network would be sent
    into the tunnel, encapsulated packets to a peer included (a loop), or shadowed by a
    lease. IPv6 networks cannot clash with an IPv4 underlay, and flannel-xdp runs IPv4 only.
    """
    net = config.network
    if public_ip in net:
        raise ConfigError(
            f"Network: {net} contains this node's public IP {public_ip}: the pod network "
            "must not overlap the underlay"
        )
    if address.ip in net:
        raise ConfigError(
            f"Network: {net} contains {address.ip}, the address of the underlay interface "
            f"{iface}: the pod network must not overlap the underlay"
        )
    if net.overlaps(address.network):
        raise ConfigError(
            f"Network: {net} overlaps {address.network}, the on-link network of the underlay "
            f"interface {iface}: its hosts would be routed into the tunnel"
        )
