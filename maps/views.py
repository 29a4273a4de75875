"""Typed views of the pinned maps, and applying a desired state as a diff."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

from flannel_xdp.backend import Backend
from flannel_xdp.mac import format_mac, parse_mac
from flannel_xdp.maps import layout, libbpf
from flannel_xdp.maps.layout import (
    Counter,
    FastFlag,
    LocalPodEntry,
    MacBytes,
    NodeConfig,
    RemoteSubnet,
    SubnetKey,
)

log = logging.getLogger(__name__)

DEFAULT_BATCH = 512
# Kernels whose map type has no batch operations answer with one of these.
_NO_BATCH = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)


K, V = TypeVar("K"), TypeVar("V")


class CapacityError(RuntimeError):
    """The desired state does not fit the map: nothing was applied."""


class LayoutMismatch(RuntimeError):
    """A pinned map's key or value size differs from bpf/types.h as we know it."""


@dataclass(frozen=True, order=True)
class Peer:
    """One remote subnet and how to reach it."""

    subnet: IPv4Network
    public_ip: IPv4Address
    backend: Backend
    vtep_mac: str = "00:00:00:00:00:00"

    def key(self) -> SubnetKey:
        return subnet_key(self.subnet)

    def value(self) -> RemoteSubnet:
        v = RemoteSubnet()
        v.public_ip[:] = self.public_ip.packed
        v.vtep_mac[:] = parse_mac(self.vtep_mac)
        v.backend = layout.BACKEND_CODES[self.backend]
        return v


def subnet_key(subnet: IPv4Network) -> SubnetKey:
    k = SubnetKey()
    k.prefixlen = subnet.prefixlen
    k.addr[:] = subnet.network_address.packed
    return k


def peer_from_entry(key: SubnetKey, value: RemoteSubnet) -> Peer | None:
    """The peer an entry describes; None when its backend code names no backend."""
    try:
        backend = layout.backend_of(value.backend)
    except ValueError:
        return None
    return Peer(
        subnet=IPv4Network((bytes(key.addr), key.prefixlen)),
        public_ip=IPv4Address(bytes(value.public_ip)),
        backend=backend,
        vtep_mac=format_mac(value.vtep_mac),
    )


@dataclass(frozen=True)
class NodeSettings:
    """What the programs need to know about this node (struct node_config)."""

    public_ip: IPv4Address
    subnet: IPv4Network
    vni: int
    vxlan_port: int
    vtep_mac: str
    underlay_ifindex: int
    tunnel_ifindex: int
    tunnel_peer_ifindex: int
    tcp_fast_path: bool = False  # FAST_TCP: --tcp-fast-path (of flows the agent marked)

    def value(self) -> NodeConfig:
        if not 0 < self.vni < 1 << 24:
            raise ValueError(f"VNI must be 1..16777215, not {self.vni}")
        if not 0 < self.vxlan_port < 1 << 16:
            raise ValueError(f"VXLAN port must be 1..65535, not {self.vxlan_port}")
        c = NodeConfig()
        c.public_ip[:] = self.public_ip.packed
        c.subnet_addr[:] = self.subnet.network_address.packed
        c.subnet_prefixlen = self.subnet.prefixlen
        c.vni = self.vni
        c.vxlan_port[:] = self.vxlan_port.to_bytes(2, "big")
        c.vtep_mac[:] = parse_mac(self.vtep_mac)
        c.underlay_ifindex = self.underlay_ifindex
        c.tunnel_ifindex = self.tunnel_ifindex
        c.tunnel_peer_ifindex = self.tunnel_peer_ifindex
        c.fast_flags = FastFlag.TCP if self.tcp_fast_path else 0
        return c

    @classmethod
    def from_value(cls, c: NodeConfig) -> NodeSettings:
        return cls(
            public_ip=IPv4Address(bytes(c.public_ip)),
            subnet=IPv4Network((bytes(c.subnet_addr), c.subnet_prefixlen)),
            vni=c.vni,
            vxlan_port=int.from_bytes(bytes(c.vxlan_port), "big"),
            vtep_mac=format_mac(c.vtep_mac),
            underlay_ifindex=c.underlay_ifindex,
            tunnel_ifindex=c.tunnel_ifindex,
            tunnel_peer_ifindex=c.tunnel_peer_ifindex,
            tcp_fast_path=bool(c.fast_flags & FastFlag.TCP),
        )


class PinnedMap:
    """A map pinned at <maps_dir>/<name>, opened by path, checked against its layout."""

    name: str = ""

    def __init__(self, maps_dir: str):
        self.path = os.path.join(maps_dir, self.name)
        self.key_type, self.value_type = layout.MAP_LAYOUTS[self.name]
        self.fd = libbpf.obj_get(self.path)
        info = libbpf.map_info(self.fd)
        self.max_entries = info.max_entries
        why = self.mismatch(info)
        if why:
            self.close()
            raise LayoutMismatch(f"{self.path}: {why} (pinned by another version)")

    @classmethod
    def mismatch(cls, info: libbpf.MapInfo) -> str | None:
        """How a pinned map differs from this build's layout of it; None if it does not."""
        key_type, value_type = layout.MAP_LAYOUTS[cls.name]
        want = (ctypes.sizeof(key_type), ctypes.sizeof(value_type))
        if (info.key_size, info.value_size) != want:
            return f"key/value size {info.key_size}/{info.value_size}, expected {want[0]}/{want[1]}"
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def iter_keys(self) -> Iterator:
        key, nxt = None, self.key_type()
        while libbpf.next_key(self.fd, key, nxt):
            yield nxt
            key, nxt = nxt, self.key_type()

    def items(self) -> Iterator[tuple[Any, Any]]:
        """Every (key, value) the map holds; an entry deleted while walking is skipped."""
        for key in self.iter_keys():
            value = self.value_type()
            if libbpf.lookup(self.fd, key, value):
                yield key, value


@dataclass(frozen=True)
class ApplyResult:
    added: int
    changed: int
    removed: int


def diff_entries(want: dict[K, V], have: dict[K, V]) -> tuple[list[V], list[K], ApplyResult]:
    """What makes a map holding have hold exactly want: the values to write (new or
    changed), the keys to delete, and how many of each kind that is."""
    upserts = [v for k, v in want.items() if have.get(k) != v]
    removals = [k for k in have if k not in want]
    added = sum(1 for k in want if k not in have)
    return upserts, removals, ApplyResult(added, len(upserts) - added, len(removals))


class SubnetsMap(PinnedMap):
    name = "subnets"

    def entries(self) -> dict[IPv4Network, Peer | None]:
        """Every entry; None for one whose backend code names no backend (no agent writes
        such an entry: it is replaced or removed like any other that is not wanted)."""
        return {
            IPv4Network((bytes(key.addr), key.prefixlen)): peer_from_entry(key, value)
            for key, value in self.items()
        }

    def peers(self) -> dict[IPv4Network, Peer]:
        return {s: p for s, p in self.entries().items() if p is not None}

    def apply(self, desired: Iterable[Peer], batch: int = DEFAULT_BATCH) -> ApplyResult:
        """Make the map hold exactly desired: upserts first, then removals."""
        want = {p.subnet: p for p in desired}
        if len(want) > self.max_entries:
            raise CapacityError(
                f"{len(want)} remote subnets do not fit {self.path} "
                f"(max_entries {self.max_entries}); nothing applied"
            )
        upserts, removals, result = diff_entries(want, self.entries())
        for i in range(0, len(upserts), batch):
            self._update(upserts[i : i + batch])
        for i in range(0, len(removals), batch):
            self._delete(removals[i : i + batch])
        return result

    def upsert(self, peer: Peer) -> None:
        """Add or replace one entry (a single registry event)."""
        libbpf.update(self.fd, peer.key(), peer.value())

    def remove(self, subnet: IPv4Network) -> bool:
        return libbpf.delete(self.fd, subnet_key(subnet))

    def _update(self, peers: list[Peer]) -> None:
        keys = (SubnetKey * len(peers))(*(p.key() for p in peers))
        values = (RemoteSubnet * len(peers))(*(p.value() for p in peers))
        try:
            libbpf.update_batch(self.fd, keys, values, len(peers))
        except libbpf.BpfError as exc:
            if exc.errno not in _NO_BATCH:
                raise
            for k, v in zip(keys, values, strict=True):
                libbpf.update(self.fd, k, v)

    def _delete(self, subnets: list[IPv4Network]) -> None:
        keys = (SubnetKey * len(subnets))(*(subnet_key(s) for s in subnets))
        try:
            libbpf.delete_batch(self.fd, keys, len(subnets))
        except libbpf.BpfError as exc:
            if exc.errno not in _NO_BATCH:
                raise
            for k in keys:
                libbpf.delete(self.fd, k)


@dataclass(frozen=True)
class LocalPod:
    """A pod on cni0: its address, its veth end in the node netns, its MAC, and the MAC
    of its gateway (cni0)."""

    ip: IPv4Address
    ifindex: int
    mac: str
    gateway_mac: str


class LocalPodsMap(PinnedMap):
    """The pods the fast path delivers to directly and sends from (bpf/fastpath.h)."""

    name = "local_pods"

    def pods(self) -> dict[IPv4Address, LocalPod]:
        pods = (
            LocalPod(
                IPv4Address(bytes(key)),
                value.ifindex,
                format_mac(value.mac),
                format_mac(value.gateway_mac),
            )
            for key, value in self.items()
        )
        return {pod.ip: pod for pod in pods}

    def apply(self, desired: Iterable[LocalPod]) -> ApplyResult:
        """Make the map hold exactly desired (a node's few pods: one call per change)."""
        want = {p.ip: p for p in desired}
        if len(want) > self.max_entries:
            raise CapacityError(
                f"{len(want)} pods do not fit {self.path} (max_entries {self.max_entries})"
            )
        upserts, removals, result = diff_entries(want, self.pods())
        for p in upserts:
            value = LocalPodEntry(
                ifindex=p.ifindex,
                mac=MacBytes(*parse_mac(p.mac)),
                gateway_mac=MacBytes(*parse_mac(p.gateway_mac)),
            )
            libbpf.update(self.fd, (ctypes.c_uint8 * 4)(*p.ip.packed), value)
        for ip in removals:
            libbpf.delete(self.fd, (ctypes.c_uint8 * 4)(*ip.packed))
        return result


class NodeConfigMap(PinnedMap):
    name = "node_config"

    def read(self) -> NodeSettings | None:
        value = NodeConfig()
        if not libbpf.lookup(self.fd, ctypes.c_uint32(0), value) or not any(value.public_ip):
            return None
        return NodeSettings.from_value(value)

    def write(self, settings: NodeSettings) -> None:
        libbpf.update(self.fd, ctypes.c_uint32(0), settings.value())

    def set_tcp_fast_path(self, on: bool) -> bool:
        """Turn FAST_TCP on or off in the installed config; False if there is none."""
        settings = self.read()
        if settings is None:
            return False
        if settings.tcp_fast_path != on:
            self.write(replace(settings, tcp_fast_path=on))
        return True


class CounterMap(PinnedMap):
    """A per-CPU array of struct counter: values are summed over CPUs on read. A map
    with another number of slots was made by a build with other labels (types.h's
    enums): reading it would put its counts under the wrong ones."""

    slots: int = 0

    @classmethod
    def mismatch(cls, info: libbpf.MapInfo) -> str | None:
        why = super().mismatch(info)
        if why is None and info.max_entries != cls.slots:
            why = f"{info.max_entries} counters, this build counts in {cls.slots}"
        return why

    def totals(self) -> list[tuple[int, int]]:
        ncpu = libbpf.num_possible_cpus()
        out: list[tuple[int, int]] = []
        for slot in range(self.max_entries):
            values = (Counter * ncpu)()
            libbpf.lookup(self.fd, ctypes.c_uint32(slot), values)
            out.append((sum(v.packets for v in values), sum(v.bytes for v in values)))
        return out


class TrafficMap(CounterMap):
    name = "traffic"
    slots = layout.BACKEND_MAX * layout.DIRECTION_MAX

    def by_label(self) -> dict[tuple[str, str], tuple[int, int]]:
        out = {}
        for slot, total in enumerate(self.totals()):
            backend, direction = divmod(slot, layout.DIRECTION_MAX)
            label = layout.backend_label(backend)
            out[(label, layout.Direction(direction).name.lower())] = total
        return out


class ReasonsMap(CounterMap):
    name = "reasons"
    slots = layout.BACKEND_MAX * layout.REASON_MAX

    def by_label(self) -> dict[tuple[str, str], tuple[int, int]]:
        out = {}
        for slot, total in enumerate(self.totals()):
            backend, reason = divmod(slot, layout.REASON_MAX)
            if reason == layout.Reason.REASON_NONE:
                continue
            label = layout.backend_label(backend)
            out[(label, layout.Reason(reason).name)] = total
        return out
