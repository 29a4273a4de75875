"""Support for tests/test_packets.py: a test network namespace, frame builders, counters.

Everything here talks to the real kernel: BPF_PROG_TEST_RUN on programs compiled from
bpf/, maps pinned in a private bpffs directory, and network namespaces made with `ip`.
Addresses come only from the documentation/benchmark ranges (192.0.2.0/24,
198.51.100.0/24, 198.18.0.0/15).
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from flannel_xdp import netns
from flannel_xdp.backend import Backend
from flannel_xdp.lab import frames
from flannel_xdp.lab.frames import ETH_P_IP, IPPROTO_UDP, eth
from flannel_xdp.lab.frames import mac_bytes as mac
from flannel_xdp.loader.libbpf import prog_test_run
from flannel_xdp.mac import parse_mac
from flannel_xdp.maps import layout, libbpf
from flannel_xdp.maps.layout import RemoteSubnet
from flannel_xdp.maps.views import (
    NodeConfigMap,
    NodeSettings,
    Peer,
    ReasonsMap,
    SubnetsMap,
    TrafficMap,
    subnet_key,
)

# Program return values (uapi linux/bpf.h, linux/pkt_cls.h).
XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7

SPORT_MIN, SPORT_MAX = 32768, 60999  # the kernel's default ephemeral range, inclusive

# --- the test node and its peers -------------------------------------------------------

UNDERLAY_MAC = "02:00:00:00:00:01"
OWN_IP = IPv4Address("192.0.2.1")
OWN_SUBNET = IPv4Network("198.18.1.0/24")
OWN_VTEP = "02:00:00:00:01:01"
VNI = 1
PORT = 8472
UNDERLAY_PREFIX = 24


@dataclass(frozen=True)
class RemotePeer:
    """A remote node as the subnets map and the test netns's neighbour table know it."""

    name: str
    subnet: IPv4Network
    public_ip: IPv4Address
    backend: Backend | None  # None: an entry no agent writes (backend code NONE)
    vtep_mac: str = "00:00:00:00:00:00"
    neigh_mac: str | None = None  # permanent neighbour entry for public_ip, if any

    def peer(self) -> Peer:
        assert self.backend is not None, f"{self.name} has no backend: write_raw() it"
        return Peer(self.subnet, self.public_ip, self.backend, self.vtep_mac)

    def write_raw(self, subnets: SubnetsMap) -> None:
        """The entry as the map holds it, backend code NONE included."""
        value = RemoteSubnet()
        value.public_ip[:] = self.public_ip.packed
        value.vtep_mac[:] = parse_mac(self.vtep_mac)
        value.backend = layout.BACKEND_CODES.get(self.backend, layout.BackendCode.NONE)
        libbpf.update(subnets.fd, subnet_key(self.subnet), value)

    def host(self, n: int) -> str:
        return str(self.subnet.network_address + n)


PEER_A = RemotePeer(
    "A",
    IPv4Network("198.18.2.0/24"),
    IPv4Address("192.0.2.2"),
    Backend.VXLAN,
    "02:00:00:00:02:02",
    "02:00:00:00:00:02",
)
PEER_HOSTGW = RemotePeer(
    "H",
    IPv4Network("198.18.3.0/24"),
    IPv4Address("192.0.2.3"),
    Backend.HOST_GW,
    neigh_mac="02:00:00:00:00:03",
)
PEER_B = RemotePeer(
    "B",
    IPv4Network("198.18.4.0/24"),
    IPv4Address("192.0.2.4"),
    Backend.VXLAN,
    "02:00:00:00:04:04",
    "02:00:00:00:00:04",
)
PEER_NO_NEIGH = RemotePeer(  # on the underlay subnet, but nobody has resolved its MAC yet
    "C", IPv4Network("198.18.5.0/24"), IPv4Address("192.0.2.5"), Backend.VXLAN, "02:00:00:00:05:05"
)
PEER_UNROUTABLE = RemotePeer(  # public IP with no route in the test netns
    "D",
    IPv4Network("198.18.6.0/24"),
    IPv4Address("198.51.100.9"),
    Backend.VXLAN,
    "02:00:00:00:06:06",
)
PEER_HOSTGW_UNROUTABLE = RemotePeer(
    "E", IPv4Network("198.18.7.0/24"), IPv4Address("198.51.100.10"), Backend.HOST_GW
)
PEERS = (PEER_A, PEER_HOSTGW, PEER_B, PEER_NO_NEIGH, PEER_UNROUTABLE, PEER_HOSTGW_UNROUTABLE)
UNKNOWN_HOST = "198.18.100.1"  # in the cluster range, in no subnet of the map


# --- commands and namespaces -------------------------------------------------------------


def run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def ip(ns: str, *args: str) -> str:
    """`ip -n ns ...`; a single argument is split on blanks."""
    if len(args) == 1:
        args = tuple(args[0].split())
    return run("ip", "-n", ns, *args)


def sysctl(ns: str, key: str, value: str) -> None:
    """Write a net sysctl of netns ns (/proc/sys/net follows the thread's netns)."""
    with netns.entered(ns), open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(value)


def ifindex(ns: str, dev: str) -> int:
    return int(ip(ns, "-o", "link", "show", "dev", dev).split(":", 1)[0])


@contextlib.contextmanager
def temp_netns(name: str) -> Iterator[str]:
    """A fresh netns (IPv6 off: no router solicitations in captures); always deleted."""
    run("ip", "netns", "add", name)
    try:
        for key in ("all", "default"):
            sysctl(name, f"net.ipv6.conf.{key}.disable_ipv6", "1")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        if os.path.exists(os.path.join(netns.NETNS_RUN_DIR, name)):
            raise RuntimeError(f"could not delete test netns {name}")


def setup_underlay(ns: str) -> tuple[int, int, int]:
    """Underlay veth u0/u1 and a tunnel veth flannel.1/fxdp.1 in ns, forwarding on (as on
    every Flannel node: bpf_fib_lookup refuses with FWD_DISABLED otherwise), permanent
    neighbours for the peers that have one. Returns (underlay, tunnel, tunnel peer) ifindexes.
    """
    ip(ns, f"link add u0 address {UNDERLAY_MAC} type veth peer name u1")
    ip(ns, f"link add flannel.1 address {OWN_VTEP} type veth peer name fxdp.1")
    ip(ns, f"addr add {OWN_IP}/{UNDERLAY_PREFIX} dev u0")
    for dev in ("u0", "u1", "flannel.1", "fxdp.1"):
        ip(ns, "link", "set", dev, "up")
    sysctl(ns, "net.ipv4.conf.all.forwarding", "1")
    for p in PEERS:
        if p.neigh_mac:
            ip(ns, f"neigh add {p.public_ip} lladdr {p.neigh_mac} dev u0 nud permanent")
    return ifindex(ns, "u0"), ifindex(ns, "flannel.1"), ifindex(ns, "fxdp.1")


# --- frames ---------------------------------------------------------------------------------
# Headers and checksums come from the project's one frame builder (flannel_xdp.lab.frames);
# what is here are the test node's own frames.


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes, **ip_kw) -> bytes:
    """An IPv4/UDP packet with a correct UDP checksum."""
    return frames.udp(src, dst, sport, dport, payload, **ip_kw)


def tcp_packet(
    src: str, dst: str, sport: int, dport: int, payload: bytes, *, flags: int = 0x18, **ip_kw
) -> bytes:
    """An IPv4/TCP packet (20-byte header) with a correct TCP checksum."""
    return frames.tcp(src, dst, sport, dport, payload, flags=flags, seq=1000, ack=2000, **ip_kw)


def vxlan_frame(
    inner_ip: bytes,
    *,
    outer_src: str = str(PEER_A.public_ip),
    outer_dst: str = str(OWN_IP),
    sport: int = 40000,
    dport: int = PORT,
    vni: int = VNI,
    vxlan_flags: int = 0x08,
    inner_dst_mac: str = OWN_VTEP,
    inner_src_mac: str = PEER_A.vtep_mac,
    inner_type: int = ETH_P_IP,
    outer_type: int = ETH_P_IP,
    **outer_ip_kw,
) -> bytes:
    """A VXLAN frame as a peer sends it to us on the underlay."""
    inner = eth(inner_dst_mac, inner_src_mac, inner_type) + inner_ip
    payload = frames.vxlan_udp(sport, dport, vni, inner, vxlan_flags)
    outer = frames.ipv4(outer_src, outer_dst, IPPROTO_UDP, payload, **outer_ip_kw)
    return eth(UNDERLAY_MAC, PEER_A.neigh_mac or "", outer_type) + outer


def tunnel_frame(inner_ip: bytes, ethertype: int = ETH_P_IP) -> bytes:
    """A frame as the stack hands it to flannel.1 (the addresses are ours to pick)."""
    return eth("02:00:00:00:0f:0f", OWN_VTEP, ethertype) + inner_ip


def arp_payload() -> bytes:
    return struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        ETH_P_IP,
        6,
        4,
        1,
        mac(PEER_A.neigh_mac or ""),
        PEER_A.public_ip.packed,
        b"\0" * 6,
        OWN_IP.packed,
    )


def ipv6_packet() -> bytes:
    src = bytes.fromhex("20010db8000000000000000000000002")
    dst = bytes.fromhex("20010db8000000000000000000000001")
    payload = struct.pack("!HHHH", 40000, PORT, 8, 0)
    return struct.pack("!IHBB", 6 << 28, len(payload), IPPROTO_UDP, 64) + src + dst + payload


# --- counters -------------------------------------------------------------------------------

CounterKey = tuple[str, str, str]  # ("traffic", backend, direction) / ("reason", backend, name)


class Counters:
    """Both counter maps, held open; snapshot() sums over CPUs."""

    def __init__(self, maps_dir: str):
        self.traffic = TrafficMap(maps_dir)
        self.reasons = ReasonsMap(maps_dir)

    def close(self) -> None:
        self.traffic.close()
        self.reasons.close()

    def snapshot(self) -> dict[CounterKey, tuple[int, int]]:
        out: dict[CounterKey, tuple[int, int]] = {}
        for (backend, direction), v in self.traffic.by_label().items():
            out[("traffic", backend, direction)] = v
        for (backend, reason), v in self.reasons.by_label().items():
            out[("reason", backend, reason)] = v
        return out

    @staticmethod
    def delta(
        before: dict[CounterKey, tuple[int, int]], after: dict[CounterKey, tuple[int, int]]
    ) -> dict[CounterKey, tuple[int, int]]:
        """Only the counters that changed: key -> (packets, bytes) added."""
        out = {}
        for key, (p, b) in after.items():
            p0, b0 = before.get(key, (0, 0))
            if (p, b) != (p0, b0):
                out[key] = (p - p0, b - b0)
        return out


# --- the lab --------------------------------------------------------------------------------


@dataclass
class Lab:
    """The programs, their pinned maps and a test netns to run them in."""

    ns: str
    maps_dir: str
    egress_fd: int
    xdp_fd: int
    tc_fd: int  # underlay_tc
    kernel_fd: int  # underlay_tc as the kernel ingress hook builds it (judges only)
    underlay_ifindex: int
    tunnel_ifindex: int
    tunnel_peer_ifindex: int
    counters: Counters

    def settings(self, **overrides) -> NodeSettings:
        base = dict(
            public_ip=OWN_IP,
            subnet=OWN_SUBNET,
            vni=VNI,
            vxlan_port=PORT,
            vtep_mac=OWN_VTEP,
            underlay_ifindex=self.underlay_ifindex,
            tunnel_ifindex=self.tunnel_ifindex,
            tunnel_peer_ifindex=self.tunnel_peer_ifindex,
        )
        base.update(overrides)
        return NodeSettings(**base)

    def configure(self, settings: NodeSettings | None = None, peers=PEERS) -> None:
        with NodeConfigMap(self.maps_dir) as m:
            m.write(settings or self.settings())
        with SubnetsMap(self.maps_dir) as m:
            raw = [p for p in peers if isinstance(p, RemotePeer) and p.backend is None]
            m.apply([p.peer() if isinstance(p, RemotePeer) else p for p in peers if p not in raw])
            for p in raw:
                p.write_raw(m)

    def run(self, prog: str, frame: bytes) -> tuple[int, bytes]:
        """Run prog ("egress", "xdp", "tc" or "kernel") on frame in the netns whose FIB it
        must see."""
        fd = {
            "egress": self.egress_fd,
            "xdp": self.xdp_fd,
            "tc": self.tc_fd,
            "kernel": self.kernel_fd,
        }[prog]
        with netns.entered(self.ns):
            rv, out, _ = prog_test_run(fd, frame)
        return rv, out

    def egress(self, frame: bytes) -> tuple[int, bytes]:
        """tunnel_egress on frame."""
        return self.run("egress", frame)

    def xdp(self, frame: bytes) -> tuple[int, bytes]:
        """underlay_xdp on frame."""
        return self.run("xdp", frame)

    def tc(self, frame: bytes) -> tuple[int, bytes]:
        """underlay_tc on frame."""
        return self.run("tc", frame)

    def counted(self, prog: str, frame: bytes):
        """Run prog on frame: (verdict, output, counter delta)."""
        before = self.counters.snapshot()
        rv, out = self.run(prog, frame)
        return rv, out, Counters.delta(before, self.counters.snapshot())


@contextlib.contextmanager
def program_lab(name: str) -> Iterator[Lab]:
    """Every program compiled against pinned maps under /sys/fs/bpf/<name>, in a netns
    <name> with an underlay; both removed afterwards, also on failure, and checked gone."""
    from bcc import BPF

    from flannel_xdp.loader.bpffs import PinDir
    from flannel_xdp.loader.compile import BuildParams, compile_program

    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(temp_netns(name))
        underlay, tunnel, tunnel_peer = setup_underlay(ns)
        pins = PinDir(f"/sys/fs/bpf/{name}")
        stack.callback(pins.remove)
        pins.ensure()

        def load(source: str, kind: int, **params) -> int:
            build = BuildParams(maps_dir=pins.maps, max_subnets=64, **params)
            module = compile_program(source, build)
            stack.callback(module.cleanup)
            return module.load_func(build.program_name(source).encode(), kind).fd

        fds = dict(
            egress_fd=load("tunnel_egress", BPF.SCHED_CLS),
            xdp_fd=load("underlay_xdp", BPF.XDP),
            tc_fd=load("underlay_tc", BPF.SCHED_CLS),
            kernel_fd=load("underlay_tc", BPF.SCHED_CLS, kernel_decap=True),
        )
        counters = Counters(pins.maps)  # the maps exist once a program made them
        stack.callback(counters.close)
        yield Lab(
            ns=ns,
            maps_dir=pins.maps,
            **fds,
            underlay_ifindex=underlay,
            tunnel_ifindex=tunnel,
            tunnel_peer_ifindex=tunnel_peer,
            counters=counters,
        )
    assert not os.path.exists(pins.root), f"{pins.root} left behind"
    assert not os.path.exists(os.path.join(netns.NETNS_RUN_DIR, ns)), f"netns {ns} left behind"
