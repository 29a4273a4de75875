"""Seeded frame generators for tests/test_fuzz.py.

Each generator draws every choice from one random.Random, so a (seed, program, scenario)
triple always yields the same frames in the same order. Frames are a mix of fully random
bytes and valid frames (VXLAN from registered peers, host-gw traffic, egress frames to
every kind of peer) that are then broken on purpose: wrong VNI/port/peer, spoofed inner
sources, cuts at and around every header boundary, bit flips, byte mutations, IPv4 options
and fragments, VLAN tags, odd ethertypes, IPv6 and ARP.

Addresses come only from 192.0.2.0/24, 198.51.100.0/24 and 198.18.0.0/15 (IPv6: 2001:db8::/32).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from itertools import islice

from flannel_xdp.backend import Backend
from flannel_xdp.lab.frames import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    eth,
    ipv4,
    l4_csum,
    pseudo_sum,
    vxlan_udp,
)
from flannel_xdp.mac import parse_mac
from tests.packet_support import (
    OWN_IP,
    OWN_SUBNET,
    OWN_VTEP,
    PEERS,
    PORT,
    UNDERLAY_MAC,
    VNI,
    RemotePeer,
)

# Below what a test run holds in one linear buffer: an XDP test run puts bytes beyond 3520
# into fragments even for a program without BPF_F_XDP_HAS_FRAGS (which no device would run,
# and which then sees and counts only the linear part); a tc test run refuses over 3712.
MAX_FRAME = 3000

# Peers beyond packet_support.PEERS, for paths the standard table does not reach: a host-gw
# peer with no neighbour entry, nested prefixes (the longest must win), a /32, and a peer
# whose public IP is our own (a local route: no underlay route for bpf_fib_lookup).
EXTRA_PEERS = (
    RemotePeer("F", IPv4Network("198.18.8.0/24"), IPv4Address("192.0.2.6"), Backend.HOST_GW),
    RemotePeer(
        "G",
        IPv4Network("198.18.16.0/20"),
        IPv4Address("192.0.2.2"),
        Backend.VXLAN,
        "02:00:00:00:02:02",
    ),
    RemotePeer(
        "N",
        IPv4Network("198.18.17.0/24"),
        IPv4Address("192.0.2.4"),
        Backend.VXLAN,
        "02:00:00:00:04:04",
    ),
    RemotePeer("S", IPv4Network("198.18.9.7/32"), IPv4Address("192.0.2.3"), Backend.HOST_GW),
    RemotePeer(
        "L",
        IPv4Network("198.18.11.0/24"),
        IPv4Address("192.0.2.1"),
        Backend.VXLAN,
        "02:00:00:00:0b:0b",
    ),
)
# An entry no agent writes (backend none): tunnel_egress must still drop it as no route.
NONE_BACKEND_PEER = RemotePeer("Z", IPv4Network("198.18.10.0/24"), IPv4Address("192.0.2.2"), None)


@dataclass(frozen=True)
class Scenario:
    """A node config and peer table the programs run under for part of the fuzz run."""

    name: str
    share: float  # of the frames of a run
    public_ip: IPv4Address = OWN_IP
    subnet: IPv4Network = OWN_SUBNET
    vni: int = VNI
    port: int = PORT
    vtep_mac: str = OWN_VTEP
    peers: tuple[RemotePeer, ...] = PEERS + EXTRA_PEERS

    def overrides(self) -> dict[str, object]:
        """Lab.settings() keyword arguments."""
        return dict(
            public_ip=self.public_ip,
            subnet=self.subnet,
            vni=self.vni,
            vxlan_port=self.port,
            vtep_mac=self.vtep_mac,
        )

    def table(self) -> list[RemotePeer]:
        return list(self.peers)


SCENARIOS = (
    Scenario("standard", 0.70),
    # Another VNI, port and VtepMAC; a public IP the underlay does not hold; an own subnet
    # that covers every peer's.
    Scenario(
        "alternate",
        0.20,
        public_ip=IPv4Address("192.0.2.9"),
        subnet=IPv4Network("198.18.0.0/16"),
        vni=0xABCDE,
        port=4789,
        vtep_mac="02:00:00:00:77:77",
        peers=PEERS + EXTRA_PEERS + (NONE_BACKEND_PEER,),
    ),
    # A /0 own subnet matches nothing (in_own_subnet): no host-gw delivery is counted.
    Scenario("own-subnet-/0", 0.05, subnet=IPv4Network("0.0.0.0/0")),
    Scenario("not-configured", 0.05, public_ip=IPv4Address("0.0.0.0")),
)


# --- building blocks -----------------------------------------------------------------------------

ODD_ETHERTYPES = (0x0000, 0x0001, 0x05DC, 0x0600, 0x0806, 0x0842, 0x86DD, 0x8847, 0x88CC, 0xFFFF)
PROTOS = (6, 17, 1, 47, 0, 255)  # TCP, UDP, ICMP, GRE, and two odd ones


class FrameMaker:
    """Frames for one scenario, every choice drawn from rng."""

    def __init__(self, scenario: Scenario, rng: random.Random):
        self.s = scenario
        self.rng = rng
        self.own_ip = scenario.public_ip.packed
        self.own_vtep = parse_mac(scenario.vtep_mac)
        self.underlay_mac = parse_mac(UNDERLAY_MAC)
        self.vxlan_peers = [p for p in scenario.peers if p.backend == Backend.VXLAN]
        self.hostgw_peers = [p for p in scenario.peers if p.backend == Backend.HOST_GW]
        self.all_peers = list(scenario.peers)

    # --- addresses

    def host_in(self, net: IPv4Network) -> bytes:
        if net.num_addresses <= 2:
            return net.network_address.packed
        return (int(net.network_address) + self.rng.randrange(1, net.num_addresses - 1)).to_bytes(
            4, "big"
        )

    def own_pod(self) -> bytes:
        # the standard pod subnet, inside every scenario's own subnet (or where it would be)
        return self.host_in(OWN_SUBNET)

    def pod_of(self, peer: RemotePeer) -> bytes:
        return self.host_in(peer.subnet)

    def unknown_pod(self) -> bytes:
        return self.rng.choice(
            (
                IPv4Address("198.18.100.1").packed,
                self.host_in(IPv4Network("198.19.0.0/16")),
                self.host_in(IPv4Network("198.51.100.0/24")),
            )
        )

    def stranger_ip(self) -> bytes:
        return self.rng.choice((b"\xc0\x00\x02\x63", b"\xc6\x33\x64\x07", b"\xc0\x00\x02\x05"))

    def any_address(self) -> bytes:
        r = self.rng.random()
        if r < 0.3:
            return self.pod_of(self.rng.choice(self.all_peers))
        if r < 0.45:
            return self.own_pod()
        if r < 0.6:
            return self.own_ip
        if r < 0.7:
            return self.rng.choice(self.all_peers).public_ip.packed
        if r < 0.8:
            return self.unknown_pod()
        return self.rng.randbytes(4)

    # --- payloads

    def payload_len(self, big: bool = False) -> int:
        r = self.rng.random()
        if r < 0.55:
            return self.rng.randrange(0, 65)
        if r < 0.8:
            return self.rng.randrange(64, 513)
        if r < 0.95 or not big:
            return self.rng.randrange(512, 1473)
        return self.rng.randrange(1400, MAX_FRAME - 100)

    def l4(self, src: bytes, dst: bytes, proto: int, big: bool = False) -> bytes:
        """A TCP/UDP/other payload whose checksum is correct, partial (as a veth leaves it
        with CHECKSUM_PARTIAL), zero or random."""
        rng = self.rng
        data = rng.randbytes(self.payload_len(big))
        if proto == 6:
            seg = struct.pack(
                "!HHIIBBHHH", rng.randrange(65536), rng.randrange(65536), 1, 2, 0x50, 0x18, 1, 0, 0
            )
            seg += data
            at = 16
        elif proto == 17:
            seg = struct.pack("!HHHH", rng.randrange(65536), rng.randrange(65536), 8 + len(data), 0)
            seg += data
            at = 6
        else:
            return data
        r = rng.random()
        if r < 0.45:
            value = l4_csum(src, dst, proto, seg)
            if proto == 17 and value == 0:
                value = 0xFFFF
        elif r < 0.8:
            value = pseudo_sum(src, dst, proto, len(seg))
        elif r < 0.9:
            value = 0
        else:
            value = rng.randrange(65536)
        return seg[:at] + value.to_bytes(2, "big") + seg[at + 2 :]

    def ip_packet(self, src: bytes, dst: bytes, big: bool = False, **kw) -> bytes:
        proto = self.rng.choice(PROTOS) if self.rng.random() < 0.3 else self.rng.choice((6, 17))
        tos = self.rng.randrange(256) if self.rng.random() < 0.3 else 0
        return ipv4(src, dst, proto, self.l4(src, dst, proto, big), tos=tos, **kw)

    # --- underlay frames

    def vxlan(
        self,
        inner_ip: bytes,
        *,
        outer_src: bytes,
        outer_dst: bytes | None = None,
        dport: int | None = None,
        vni: int | None = None,
        flags: int = 0x08,
        inner_dst: bytes | None = None,
        inner_src: bytes = b"\x02\x00\x00\x00\x02\x02",
        inner_type: int = ETH_P_IP,
        **outer_kw,
    ) -> bytes:
        inner = eth(inner_dst or self.own_vtep, inner_src, inner_type) + inner_ip
        vni = self.s.vni if vni is None else vni
        sport = self.rng.randrange(32768, 61000)
        port = self.s.port if dport is None else dport
        outer = ipv4(
            outer_src,
            outer_dst or self.own_ip,
            17,
            vxlan_udp(sport, port, vni, inner, flags),
            **outer_kw,
        )
        return eth(self.underlay_mac, b"\x02\x00\x00\x00\x00\x02", ETH_P_IP) + outer

    def valid_vxlan(self, big: bool = False) -> bytes:
        """VXLAN that the node must decapsulate: a registered peer (any backend: the source
        check only asks who owns the inner source) sending from a pod of its own subnet."""
        peer = self.rng.choice(self.all_peers)
        rng = self.rng
        inner_kw: dict[str, object] = {}
        if rng.random() < 0.1:  # inner options and fragments are the stack's business
            inner_kw["options"] = rng.randbytes(4 * rng.randrange(1, 11))
        if rng.random() < 0.1:
            inner_kw["flags_frag"] = rng.randrange(65536)
        inner_ip = self.ip_packet(self.pod_of(peer), self.own_pod(), big, **inner_kw)
        if rng.random() < 0.05:  # trailing bytes beyond tot_len
            inner_ip += rng.randbytes(rng.randrange(1, 40))
        outer_kw = {"flags_frag": rng.choice((0x4000, 0x0000, 0x8000))}
        if rng.random() < 0.2:
            outer_kw["tos"] = rng.randrange(256)
            outer_kw["ttl"] = rng.randrange(256)
        return self.vxlan(
            inner_ip,
            outer_src=peer.public_ip.packed,
            inner_src=parse_mac(peer.vtep_mac),
            **outer_kw,
        )

    def wrong_tunnel(self) -> bytes:
        """Right peer and inner frame, but not our VNI, port, flags or address."""
        peer = self.rng.choice(self.vxlan_peers)
        inner = self.ip_packet(self.pod_of(peer), self.own_pod())
        what = self.rng.randrange(5)
        kw: dict[str, object] = {"outer_src": peer.public_ip.packed}
        if what == 0:
            kw["vni"] = self.rng.choice((0, self.s.vni ^ 1, self.rng.randrange(1 << 24)))
        elif what == 1:
            kw["dport"] = self.rng.choice((4789, 8472, 0, 6081, self.rng.randrange(65536)))
        elif what == 2:
            kw["flags"] = self.rng.randrange(256) & ~0x08
        elif what == 3:
            kw["outer_dst"] = self.any_address()
        else:
            kw["flags"] = self.rng.randrange(256)  # the I flag with anything around it
        return self.vxlan(inner, **kw)

    def wrong_sender(self) -> bytes:
        """Our VNI and port, but a sender that may not use the inner source it claims."""
        rng = self.rng
        peer, other = rng.choice(self.all_peers), rng.choice(self.all_peers)
        what = rng.randrange(4)
        if what == 0:  # a stranger on the underlay, claiming a registered pod
            outer_src, inner_src = self.stranger_ip(), self.pod_of(peer)
        elif what == 1:  # a registered peer claiming another peer's pod
            outer_src, inner_src = peer.public_ip.packed, self.pod_of(other)
        elif what == 2:  # a registered peer claiming an address nobody owns
            outer_src, inner_src = peer.public_ip.packed, self.unknown_pod()
        else:  # a registered peer claiming our own pods
            outer_src, inner_src = peer.public_ip.packed, self.own_pod()
        return self.vxlan(self.ip_packet(inner_src, self.own_pod()), outer_src=outer_src)

    def wrong_inner(self) -> bytes:
        """Ours on the outside; the inner Ethernet or IPv4 header is wrong."""
        rng = self.rng
        peer = rng.choice(self.vxlan_peers)
        inner = self.ip_packet(self.pod_of(peer), self.own_pod())
        what = rng.randrange(4)
        kw: dict[str, object] = {"outer_src": peer.public_ip.packed}
        if what == 0:
            kw["inner_dst"] = rng.choice((b"\xff" * 6, rng.randbytes(6), parse_mac(OWN_VTEP)))
        elif what == 1:
            kw["inner_type"] = rng.choice((*ODD_ETHERTYPES, ETH_P_8021Q, rng.randrange(65536)))
        elif what == 2:
            inner = bytes([rng.randrange(256)]) + inner[1:]  # version and IHL
        else:
            inner = arp() if rng.random() < 0.5 else ipv6_packet(rng)
            kw["inner_type"] = ETH_P_ARP if len(inner) == 28 else ETH_P_IPV6
        return self.vxlan(inner, **kw)

    def outer_ip_oddities(self) -> bytes:
        """Valid VXLAN behind an outer IPv4 header with options, fragment bits, a short IHL
        or another version."""
        rng = self.rng
        frame = self.valid_vxlan()
        payload = frame[34:]
        peer_ip = frame[26:30]
        what = rng.randrange(4)
        kw: dict[str, object] = {}
        if what == 0:
            kw["options"] = rng.randbytes(4 * rng.randrange(1, 11))
        elif what == 1:
            kw["flags_frag"] = rng.choice((0x2000, 0x0001, 0x1FFF, 0x6000, rng.randrange(65536)))
        elif what == 2:
            kw["ihl"] = rng.randrange(0, 16)
        else:
            kw["version"] = rng.randrange(16)
        return frame[:14] + ipv4(peer_ip, frame[30:34], 17, payload, **kw)

    def host_gw(self) -> bytes:
        """Plain IPv4 on the underlay: host-gw peers' pods to ours (delivery), and nearby
        traffic that is not: to other addresses, from vxlan pods, to our VXLAN port."""
        rng = self.rng
        r = rng.random()
        peer = rng.choice(self.hostgw_peers)
        src = self.pod_of(peer) if r < 0.7 else self.pod_of(rng.choice(self.all_peers))
        dst = self.own_pod() if rng.random() < 0.7 else self.any_address()
        if rng.random() < 0.15:  # UDP to the VXLAN port: not VXLAN, as the address is a pod's
            inner = self.ip_packet(self.pod_of(peer), self.own_pod())
            return self.vxlan(inner, outer_src=src, outer_dst=dst)
        kw = {}
        if rng.random() < 0.1:
            kw["options"] = rng.randbytes(4)
        frame = eth(self.underlay_mac, b"\x02\x00\x00\x00\x00\x03", ETH_P_IP) + self.ip_packet(
            src, dst, **kw
        )
        if rng.random() < 0.2:
            frame = frame[: rng.randrange(14, len(frame) + 1)]
        return frame

    def l2_oddities(self) -> bytes:
        """VLAN tags, odd ethertypes, IPv6, ARP."""
        rng = self.rng
        what = rng.randrange(5)
        if what == 0:  # one or two tags in front of a valid VXLAN frame
            frame = self.valid_vxlan()
            for _ in range(rng.randrange(1, 3)):
                tpid = rng.choice((ETH_P_8021Q, ETH_P_8021AD))
                frame = frame[:12] + struct.pack("!HH", tpid, rng.randrange(4096)) + frame[12:]
            return frame
        if what == 1:
            frame = self.valid_vxlan()
            return frame[:12] + rng.choice(ODD_ETHERTYPES).to_bytes(2, "big") + frame[14:]
        if what == 2:
            return eth(self.underlay_mac, rng.randbytes(6), ETH_P_IPV6) + ipv6_packet(rng)
        if what == 3:
            return eth(b"\xff" * 6, rng.randbytes(6), ETH_P_ARP) + arp()
        return eth(self.underlay_mac, rng.randbytes(6), rng.randrange(65536)) + rng.randbytes(
            rng.randrange(0, 120)
        )

    def underlay_template(self) -> bytes:
        return self.rng.choice(
            (self.valid_vxlan, self.valid_vxlan, self.wrong_sender, self.wrong_inner, self.host_gw)
        )()

    # --- egress frames

    def to_peer(self, big: bool = False) -> bytes:
        """What the stack routes to flannel.<VNI>: a pod of ours to a remote pod."""
        rng = self.rng
        r = rng.random()
        if r < 0.8:
            dst = self.pod_of(rng.choice(self.all_peers))
        elif r < 0.9:
            dst = self.own_pod()
        else:
            dst = self.any_address()
        kw: dict[str, object] = {}
        if rng.random() < 0.05:
            kw["options"] = rng.randbytes(4 * rng.randrange(1, 11))
        if rng.random() < 0.3:  # without DF, or a fragment: one too big is not answered
            kw["flags_frag"] = rng.choice((0, 0x2000, 0x6000, 0x4001))
        pkt = self.ip_packet(self.own_pod(), dst, big, **kw)
        return eth(b"\x02\x00\x00\x00\x0f\x0f", self.own_vtep, ETH_P_IP) + pkt

    def near_mtu(self) -> bytes:
        """Around the underlay MTU: 1464 / 1514-byte frames are the largest a vxlan / host-gw
        peer takes (1500 - 50 + 14, 1500 + 14)."""
        frame = self.to_peer()
        target = self.rng.choice((1463, 1464, 1465, 1513, 1514, 1515)) + self.rng.randrange(-2, 3)
        if len(frame) < target:
            frame += self.rng.randbytes(target - len(frame))
        return frame[:target]

    def egress_oddities(self) -> bytes:
        rng = self.rng
        frame = self.to_peer()
        what = rng.randrange(4)
        if what == 0:
            return frame[:12] + rng.choice(ODD_ETHERTYPES).to_bytes(2, "big") + frame[14:]
        if what == 1:
            return eth(rng.randbytes(6), self.own_vtep, ETH_P_ARP) + arp()
        if what == 2:
            return eth(rng.randbytes(6), self.own_vtep, ETH_P_IPV6) + ipv6_packet(rng)
        return frame[:12] + struct.pack("!HH", ETH_P_8021Q, 7) + frame[12:]

    def egress_template(self) -> bytes:
        return self.to_peer()

    # --- mutations of either

    def random_frame(self) -> bytes:
        """Random bytes, often with enough structure to get past the first checks."""
        rng = self.rng
        n = rng.randrange(14, 200) if rng.random() < 0.85 else rng.randrange(14, 1600)
        frame = bytearray(rng.randbytes(n))
        r = rng.random()
        if r < 0.6 and n >= 14:
            frame[12:14] = b"\x08\x00"
            if r < 0.4 and n >= 34:  # IPv4, no options, not a fragment
                frame[14] = 0x45
                frame[20] &= 0x80
                if r < 0.3:
                    frame[23] = 17
                    frame[26:34] = rng.choice(self.all_peers).public_ip.packed + (
                        self.own_ip if rng.random() < 0.7 else self.any_address()
                    )
                    if n >= 38 and rng.random() < 0.8:
                        frame[36:38] = self.s.port.to_bytes(2, "big")
                    if n >= 50 and rng.random() < 0.7:
                        frame[42] |= 0x08
                        frame[46:49] = self.s.vni.to_bytes(3, "big")
                    if n >= 64 and rng.random() < 0.5:
                        frame[50:56] = self.own_vtep
                        frame[62:64] = b"\x08\x00"
        elif r < 0.7:
            frame[12:14] = rng.choice((ETH_P_8021Q, ETH_P_8021AD, ETH_P_IPV6, ETH_P_ARP)).to_bytes(
                2, "big"
            )
        return bytes(frame)

    def truncated(self, template: bytes) -> bytes:
        """Cut at, just before or just after a header boundary, or anywhere."""
        rng = self.rng
        if rng.random() < 0.7:
            boundary = rng.choice((14, 18, 34, 42, 50, 64, 84, 88, 104))
            cut = boundary + rng.randrange(-2, 3)
        else:
            cut = rng.randrange(14, len(template) + 1)
        return template[: max(14, cut)]

    def bit_flips(self, template: bytes) -> bytes:
        rng = self.rng
        frame = bytearray(template)
        reach = min(len(frame), 110 if rng.random() < 0.9 else len(frame))
        for _ in range(rng.randrange(1, 5)):
            pos = rng.randrange(reach)
            frame[pos] ^= 1 << rng.randrange(8)
        return bytes(frame)

    def byte_mutations(self, template: bytes) -> bytes:
        rng = self.rng
        frame = bytearray(template)
        reach = min(len(frame), 110)
        for _ in range(rng.randrange(1, 4)):
            frame[rng.randrange(reach)] = rng.randrange(256)
        if rng.random() < 0.2:  # and sometimes a cut too
            frame = frame[: rng.randrange(14, len(frame) + 1)]
        return bytes(frame)


def arp() -> bytes:
    return struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        ETH_P_IP,
        6,
        4,
        1,
        b"\x02\x00\x00\x00\x00\x02",
        IPv4Address("192.0.2.2").packed,
        b"\0" * 6,
        OWN_IP.packed,
    )


def ipv6_packet(rng: random.Random) -> bytes:
    src = bytes.fromhex("20010db8000000000000000000000002")
    dst = bytes.fromhex("20010db8000000000000000000000001")
    payload = struct.pack("!HHHH", rng.randrange(65536), PORT, 8, 0) + rng.randbytes(
        rng.randrange(0, 64)
    )
    return struct.pack("!IHBB", 6 << 28, len(payload), 17, 64) + src + dst + payload


# --- the mixes ----------------------------------------------------------------------------------

Kind = tuple[str, int, Callable[[FrameMaker], bytes]]

UNDERLAY_KINDS: list[Kind] = [
    ("valid-vxlan", 14, lambda m: m.valid_vxlan(big=m.rng.random() < 0.05)),
    ("wrong-vni-port-address", 8, FrameMaker.wrong_tunnel),
    ("wrong-sender", 8, FrameMaker.wrong_sender),
    ("wrong-inner", 6, FrameMaker.wrong_inner),
    ("outer-options-fragments", 6, FrameMaker.outer_ip_oddities),
    ("vlan-ethertype-ipv6-arp", 8, FrameMaker.l2_oddities),
    ("host-gw", 8, FrameMaker.host_gw),
    ("truncated", 12, lambda m: m.truncated(m.underlay_template())),
    ("bit-flips", 14, lambda m: m.bit_flips(m.underlay_template())),
    ("byte-mutations", 8, lambda m: m.byte_mutations(m.underlay_template())),
    ("random", 8, FrameMaker.random_frame),
]

EGRESS_KINDS: list[Kind] = [
    ("to-peers", 30, FrameMaker.to_peer),
    ("big", 5, lambda m: m.to_peer(big=True)),
    ("near-mtu", 8, FrameMaker.near_mtu),
    ("non-ipv4", 8, FrameMaker.egress_oddities),
    ("truncated", 10, lambda m: m.truncated(m.egress_template())),
    ("bit-flips", 14, lambda m: m.bit_flips(m.egress_template())),
    ("byte-mutations", 10, lambda m: m.byte_mutations(m.egress_template())),
    ("random", 15, FrameMaker.random_frame),
]


def frames(prog: str, scenario: Scenario, seed: int) -> Iterator[tuple[str, bytes]]:
    """Endless (kind, frame) of prog's mix under scenario, from seed."""
    rng = random.Random(f"{seed}/{prog}/{scenario.name}")
    maker = FrameMaker(scenario, rng)
    kinds = EGRESS_KINDS if prog == "egress" else UNDERLAY_KINDS
    table = [(name, make) for name, weight, make in kinds for _ in range(weight)]
    while True:
        name, make = rng.choice(table)
        frame = make(maker)
        yield name, frame[:MAX_FRAME]


def frame_at(prog: str, scenario: str, seed: int, index: int) -> bytes:
    """Frame number index of frames(prog, <scenario named so>, seed): a failure's replay."""
    (sc,) = (s for s in SCENARIOS if s.name == scenario)
    return next(islice(frames(prog, sc, seed), index, None))[1]
