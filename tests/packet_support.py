"""Support for the packet tests (tests/test_packets.py and the tests that reuse its frames and
caches): a test network namespace, frame builders, counters.

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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from flannel_xdp import netns
from flannel_xdp.backend import Backend
from flannel_xdp.lab import frames
from flannel_xdp.lab.frames import (
    ETH_HLEN,
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_UDP,
    eth,
    ipv4_header,
)
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
from tests.bpf_support import c_define

# Program return values (uapi linux/bpf.h, linux/pkt_cls.h).
XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7

SPORT_MIN, SPORT_MAX = 32768, 60999  # the kernel's default ephemeral range, inclusive
CLOCK_MONOTONIC_COARSE = 6  # linux/time.h: the clock bpf_ktime_get_coarse_ns() reads

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


# --- frames the underlay programs must not take as theirs, and the caches they keep ---------


OWN_HOST = str(OWN_SUBNET.network_address + 5)


def tc_test_run_refuses(frame: bytes) -> bool:
    """BPF_PROG_TEST_RUN for tc refuses (EINVAL) frames shorter than an Ethernet header,
    and IPv4 / IPv6 typed frames shorter than Ethernet + the fixed IP header (20 / 40)."""
    ethertype = frame[12:14] if len(frame) >= ETH_HLEN else b""
    minimum = {b"\x08\x00": ETH_HLEN + 20, b"\x86\xdd": ETH_HLEN + 40}.get(ethertype, ETH_HLEN)
    return len(frame) < minimum


def refused_by_test_run(prog: str, frame: bytes) -> bool:
    """Does BPF_PROG_TEST_RUN refuse frame for prog (an XDP or a tc program)?"""
    return len(frame) < ETH_HLEN if prog == "xdp" else tc_test_run_refuses(frame)


def wait_out_cache(window_ns: int) -> None:
    """Past every CPU's cached answer of a BPF cache that keeps answers window_ns on the
    coarse clock (which lags by up to one tick): what the kernel says now applies."""
    time.sleep(window_ns / 1e9 + 2 * time.clock_getres(CLOCK_MONOTONIC_COARSE))


def wait_out_fib_cache() -> None:
    wait_out_cache(c_define("fib.h", "FIB_CACHE_NS"))


def inner_from_a(proto: str, payload: bytes = b"hello from A", **ip_kw) -> bytes:
    make = tcp_packet if proto == "tcp" else udp_packet
    return make(PEER_A.host(7), OWN_HOST, 443, 51000, payload, **ip_kw)


GOOD_INNER = inner_from_a("udp")


GOOD = vxlan_frame(GOOD_INNER)


def replace(frame: bytes, offset: int, data: bytes) -> bytes:
    return frame[:offset] + data + frame[offset + len(data) :]


def vlan_tagged(frame: bytes, tpid: int) -> bytes:
    return frame[:12] + struct.pack("!HH", tpid, 100) + frame[12:]


def outer_ip_variant(**kw) -> bytes:
    """GOOD with a differently built outer IPv4 header (same payload)."""
    payload = GOOD[34:]
    outer = ipv4_header(str(PEER_A.public_ip), str(OWN_IP), len(payload), **kw)
    return GOOD[:14] + outer + payload


def fragment(flags_frag: int) -> bytes:
    return outer_ip_variant(proto=IPPROTO_UDP, flags_frag=flags_frag)


UNDERLAY_CASES = {
    # name: (frame, verdict, counter key)
    "ipv4-options": (
        outer_ip_variant(proto=IPPROTO_UDP, options=b"\x01\x01\x01\x00"),
        XDP_PASS,
        ("reason", "none", "PASS_IP_OPTIONS"),
    ),
    "ipv4-ihl-below-5": (
        outer_ip_variant(proto=IPPROTO_UDP, ihl=4),
        XDP_PASS,
        ("reason", "none", "PASS_TRUNCATED"),
    ),
    "fragment-mf": (fragment(0x2000), XDP_PASS, ("reason", "none", "PASS_IP_FRAGMENT")),
    "fragment-offset": (fragment(0x00B9), XDP_PASS, ("reason", "none", "PASS_IP_FRAGMENT")),
    "fragment-last-df-clear": (fragment(0x0001), XDP_PASS, ("reason", "none", "PASS_IP_FRAGMENT")),
    "df-clear-is-fine": (fragment(0x0000), XDP_REDIRECT, ("traffic", "vxlan", "decap")),
    "wrong-vni": (vxlan_frame(GOOD_INNER, vni=2), XDP_PASS, ("reason", "none", "PASS_OTHER_VNI")),
    "vxlan-i-flag-clear": (
        vxlan_frame(GOOD_INNER, vxlan_flags=0x00),
        XDP_PASS,
        ("reason", "none", "PASS_OTHER_VNI"),
    ),
    "wrong-udp-port": (
        vxlan_frame(GOOD_INNER, dport=4789),
        XDP_PASS,
        ("reason", "none", "PASS_OTHER_PORT"),
    ),
    "not-udp": (
        eth(UNDERLAY_MAC, PEER_A.neigh_mac)
        + tcp_packet(str(PEER_A.public_ip), str(OWN_IP), 40000, PORT, b"tcp"),
        XDP_PASS,
        ("reason", "none", "PASS_NOT_UDP"),
    ),
    "arp": (
        eth("ff:ff:ff:ff:ff:ff", PEER_A.neigh_mac, ETH_P_ARP) + arp_payload(),
        XDP_PASS,
        ("reason", "none", "PASS_NOT_IPV4"),
    ),
    "ipv6": (
        eth(UNDERLAY_MAC, PEER_A.neigh_mac, ETH_P_IPV6) + ipv6_packet(),
        XDP_PASS,
        ("reason", "none", "PASS_NOT_IPV4"),
    ),
    "ipv4-type-version-6": (
        replace(GOOD, 14, bytes([0x65])),
        XDP_PASS,
        ("reason", "none", "PASS_NOT_IPV4"),
    ),
    "vlan-802.1q": (vlan_tagged(GOOD, ETH_P_8021Q), XDP_PASS, ("reason", "none", "PASS_VLAN")),
    "vlan-802.1ad": (vlan_tagged(GOOD, ETH_P_8021AD), XDP_PASS, ("reason", "none", "PASS_VLAN")),
    "other-destination": (
        vxlan_frame(GOOD_INNER, outer_dst="192.0.2.99"),
        XDP_PASS,
        ("reason", "none", "PASS_OTHER_ADDRESS"),
    ),
    "inner-arp": (
        vxlan_frame(arp_payload(), inner_type=ETH_P_ARP),
        XDP_DROP,
        ("reason", "vxlan", "DROP_INNER_NOT_IPV4"),
    ),
    "inner-ipv6": (
        vxlan_frame(ipv6_packet(), inner_type=ETH_P_IPV6),
        XDP_DROP,
        ("reason", "vxlan", "DROP_INNER_NOT_IPV4"),
    ),
    "inner-ipv4-version-6": (
        vxlan_frame(bytes([0x65]) + GOOD_INNER[1:]),
        XDP_DROP,
        ("reason", "vxlan", "DROP_MALFORMED"),
    ),
    "inner-ihl-below-5": (
        vxlan_frame(bytes([0x44]) + GOOD_INNER[1:]),
        XDP_DROP,
        ("reason", "vxlan", "DROP_MALFORMED"),
    ),
    "wrong-inner-dst-mac": (
        vxlan_frame(GOOD_INNER, inner_dst_mac="02:00:00:00:99:99"),
        XDP_DROP,
        ("reason", "vxlan", "DROP_WRONG_INNER_MAC"),
    ),
    "broadcast-inner-dst-mac": (
        vxlan_frame(GOOD_INNER, inner_dst_mac="ff:ff:ff:ff:ff:ff"),
        XDP_DROP,
        ("reason", "vxlan", "DROP_WRONG_INNER_MAC"),
    ),
    "unknown-inner-source": (
        vxlan_frame(udp_packet(UNKNOWN_HOST, OWN_HOST, 1, 2, b"who?")),
        XDP_DROP,
        ("reason", "vxlan", "DROP_UNKNOWN_SOURCE"),
    ),
    "spoofed-source-from-peer-a": (
        vxlan_frame(udp_packet(PEER_B.host(7), OWN_HOST, 1, 2, b"I am B")),
        XDP_DROP,
        ("reason", "vxlan", "DROP_SPOOFED_SOURCE"),
    ),
    "spoofed-source-from-stranger": (
        vxlan_frame(GOOD_INNER, outer_src="192.0.2.99"),
        XDP_DROP,
        ("reason", "vxlan", "DROP_SPOOFED_SOURCE"),
    ),
    "plain-ipv4-from-a-vxlan-peer": (
        eth(UNDERLAY_MAC, PEER_A.neigh_mac) + GOOD_INNER,
        XDP_PASS,
        ("reason", "none", "PASS_OTHER_ADDRESS"),
    ),
}
