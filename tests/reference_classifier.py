"""A reference model of the BPF programs, for tests/test_fuzz.py.

What underlay_xdp, underlay_tc and tunnel_egress do with a frame, written in plain Python
from the rules bpf/*.c document (parse.h, underlay.h, vxlan.h, fib.h, csum.h and the three
programs), not from the compiled code: given a frame, the node config and the peer table
(and for tunnel_egress what the underlay's FIB knows), it predicts the verdict, the one
counter the frame moves and by how many bytes, and the frame the program leaves behind.

It also models what BPF_PROG_TEST_RUN itself refuses (EINVAL before the program runs), as
test_packets.py documents it: frames under 14 bytes, and for tc programs IPv4-typed frames
under 14 + 20 and IPv6-typed ones under 14 + 40 bytes.

Addresses are kept as 4-byte strings and MACs as 6-byte strings, as they are on the wire.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from flannel_xdp.backend import Backend
from flannel_xdp.lab.frames import (
    ICMP_ERROR_MAX_LEN,
    ICMP_HLEN,
    IPPROTO_ICMP,
    icmp_frag_needed,
    inet_csum,
    ipv4_header,
    ones_sum,
    vxlan_udp,
)
from flannel_xdp.mac import parse_mac
from flannel_xdp.maps.views import NodeSettings, Peer

ETH_HLEN, IPV4_HLEN, UDP_HLEN, VXLAN_HLEN = 14, 20, 8, 8
VXLAN_ENCAP_LEN = ETH_HLEN + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN  # 50
INNER_IPV4_END = VXLAN_ENCAP_LEN + ETH_HLEN + IPV4_HLEN  # 84: where classify stops reading
ETH_P_IP, ETH_P_IPV6 = b"\x08\x00", b"\x86\xdd"
VLAN_TYPES = (b"\x81\x00", b"\x88\xa8")
IPPROTO_TCP, IPPROTO_UDP = 6, 17
# ICMP errors, never answered with another (pmtu.h icmp_is_error())
ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})
IP_FRAG_MASK = 0x3FFF
VXLAN_FLAG_VNI = 0x08
VXLAN_OUTER_TTL = 64
CSUM_MAX_LEN = 16 * 256  # csum.h: CSUM_MAX_CHUNKS * CSUM_CHUNK
SPORT_MIN, SPORT_MAX = 32768, 60999

# What a program does with the frame, whatever its program type calls it.
PASS, DROP, REDIRECT, REFUSED = "pass", "drop", "redirect", "refused"

# Counter keys as tests/packet_support.Counters labels them.
CounterKey = tuple[str, str, str]


def reason(backend: str, name: str) -> CounterKey:
    return ("reason", backend, name)


def traffic(backend: str, direction: str) -> CounterKey:
    return ("traffic", backend, direction)


# --- what the programs know ----------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """struct node_config, as the programs read it."""

    public_ip: bytes
    subnet_addr: bytes
    subnet_prefixlen: int
    vni: int
    port: int
    vtep_mac: bytes

    @classmethod
    def from_settings(cls, s: NodeSettings) -> Node:
        return cls(
            public_ip=s.public_ip.packed,
            subnet_addr=s.subnet.network_address.packed,
            subnet_prefixlen=s.subnet.prefixlen,
            vni=s.vni,
            port=s.vxlan_port,
            vtep_mac=parse_mac(s.vtep_mac),
        )

    @property
    def configured(self) -> bool:
        return self.public_ip != b"\0\0\0\0"

    def in_own_subnet(self, addr: bytes) -> bool:
        """underlay.h in_own_subnet(): a prefix length of 0 (or over 32) matches nothing."""
        plen = self.subnet_prefixlen
        if plen == 0 or plen > 32:
            return False
        mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
        return int.from_bytes(addr, "big") & mask == int.from_bytes(self.subnet_addr, "big")


@dataclass(frozen=True)
class Entry:
    """struct remote_subnet."""

    public_ip: bytes
    vtep_mac: bytes
    backend: Backend | None  # None: an entry without a backend (code NONE)


class PeerTable:
    """The subnets LPM trie: the longest prefix holding an address wins."""

    def __init__(self, peers: Iterable[Peer]):  # or packet_support's RemotePeer
        self._by_len: dict[int, dict[int, Entry]] = {}
        for p in peers:
            net = int(p.subnet.network_address)
            entry = Entry(p.public_ip.packed, parse_mac(p.vtep_mac), p.backend)
            self._by_len.setdefault(p.subnet.prefixlen, {})[net] = entry
        self._lens = sorted(self._by_len, reverse=True)

    def lookup(self, addr: bytes) -> Entry | None:
        a = int.from_bytes(addr, "big")
        for plen in self._lens:
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
            entry = self._by_len[plen].get(a & mask)
            if entry is not None:
                return entry
        return None


@dataclass(frozen=True)
class Underlay:
    """What bpf_fib_lookup(BPF_FIB_LOOKUP_OUTPUT) finds in the netns the programs run in: one
    connected network on the underlay device (no default route), its MTU, our own MAC, the
    neighbours the test made, and the local/broadcast addresses (not unicast routes)."""

    network: IPv4Network
    own_mac: bytes
    mtu: int
    neighbours: dict[bytes, bytes] = field(default_factory=dict)
    local: frozenset[bytes] = frozenset()

    def fib(self, dst: bytes, tot_len: int) -> tuple[str, bytes | None]:
        """("no_route" | "frag_needed" | "no_neigh", None) or ("success", next hop MAC).
        The kernel checks in that order: route, then MTU, then neighbour."""
        if dst in self.local or IPv4Address(dst) not in self.network:
            return "no_route", None
        if tot_len > self.mtu:
            return "frag_needed", None
        neigh = self.neighbours.get(dst)
        if neigh is None:
            return "no_neigh", None
        return "success", neigh


# --- outcomes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A program's predicted outcome for one frame."""

    verdict: str  # PASS, DROP, REDIRECT or REFUSED (the test run itself says EINVAL)
    counter: CounterKey | None  # the one counter the frame moves (None: refused)
    nbytes: int  # by how many bytes it moves
    output: bytes | None  # the frame as the program leaves it (None: refused)
    # Offset of a VXLAN source port that the program takes from the flow hash: not
    # predicted, only its range (SPORT_MIN..SPORT_MAX).
    sport_at: int | None = None

    @property
    def label(self) -> str:
        return f"{self.verdict} {'/'.join(self.counter) if self.counter else ''}".strip()


REFUSAL = Outcome(REFUSED, None, 0, None)


def kernel_refuses(prog_type: str, frame: bytes) -> bool:
    """Does BPF_PROG_TEST_RUN refuse frame for an "xdp" or a "tc" program?"""
    if len(frame) < ETH_HLEN:
        return True
    if prog_type == "xdp":
        return False
    ethertype = frame[12:14]
    if ethertype == ETH_P_IP:
        return len(frame) < ETH_HLEN + IPV4_HLEN
    if ethertype == ETH_P_IPV6:
        return len(frame) < ETH_HLEN + 40
    return False


# --- underlay_xdp / underlay_tc ----------------------------------------------------------------

HOST_GW_DELIVERY_REASONS = frozenset(
    ("PASS_NOT_UDP", "PASS_OTHER_ADDRESS", "PASS_OTHER_PORT", "PASS_OTHER_VNI")
)


def _outer_pass_reason(frame: bytes, node: Node) -> str | None:
    """parse.h parse_eth_ipv4() then parse_vxlan(): the PASS_* reason, or None (ours)."""
    n = len(frame)
    ethertype = frame[12:14]
    if ethertype in VLAN_TYPES:
        return "PASS_VLAN"
    if ethertype != ETH_P_IP:
        return "PASS_NOT_IPV4"
    if n < ETH_HLEN + IPV4_HLEN:
        return "PASS_TRUNCATED"
    if frame[14] >> 4 != 4:
        return "PASS_NOT_IPV4"
    ihl = frame[14] & 0x0F
    if ihl != 5:
        return "PASS_TRUNCATED" if ihl < 5 else "PASS_IP_OPTIONS"
    if int.from_bytes(frame[20:22], "big") & IP_FRAG_MASK:
        return "PASS_IP_FRAGMENT"
    if frame[23] != IPPROTO_UDP:
        return "PASS_NOT_UDP"
    if frame[30:34] != node.public_ip:
        return "PASS_OTHER_ADDRESS"
    if n < 42:
        return "PASS_TRUNCATED"
    if int.from_bytes(frame[36:38], "big") != node.port:
        return "PASS_OTHER_PORT"
    if n < VXLAN_ENCAP_LEN:
        return "PASS_TRUNCATED"
    if not frame[42] & VXLAN_FLAG_VNI or int.from_bytes(frame[46:49], "big") != node.vni:
        return "PASS_OTHER_VNI"
    return None


def _inner_drop_reason(frame: bytes, node: Node, peers: PeerTable) -> str | None:
    """underlay.h inner_reason() and vxlan.h vxlan_source_reason(): a DROP_* reason or None."""
    if len(frame) < VXLAN_ENCAP_LEN + ETH_HLEN:
        return "DROP_MALFORMED"
    if frame[50:56] != node.vtep_mac:
        return "DROP_WRONG_INNER_MAC"
    if frame[62:64] != ETH_P_IP:
        return "DROP_INNER_NOT_IPV4"
    if len(frame) < INNER_IPV4_END:
        return "DROP_MALFORMED"
    if frame[64] >> 4 != 4 or frame[64] & 0x0F < 5:
        return "DROP_MALFORMED"
    owner = peers.lookup(frame[76:80])  # the inner source address
    if owner is None:
        return "DROP_UNKNOWN_SOURCE"
    if owner.public_ip != frame[26:30]:  # the outer source address
        return "DROP_SPOOFED_SOURCE"
    return None


def complete_l4_csum(frame: bytearray, ip: int) -> None:
    """csum.h complete_l4_csum() on the IPv4 header at offset ip: finish a TCP/UDP checksum
    that holds exactly the pseudo-header sum (and only such a one)."""
    end = len(frame)
    if frame[ip] & 0x0F != 5 or int.from_bytes(frame[ip + 6 : ip + 8], "big") & IP_FRAG_MASK:
        return
    proto, l4 = frame[ip + 9], ip + IPV4_HLEN
    if proto == IPPROTO_TCP:
        if l4 + 20 > end:
            return
        at = l4 + 16
    elif proto == IPPROTO_UDP:
        if l4 + UDP_HLEN > end or frame[l4 + 6 : l4 + 8] == b"\0\0":
            return
        at = l4 + 6
    else:
        return
    tot_len = int.from_bytes(frame[ip + 2 : ip + 4], "big")
    if tot_len <= IPV4_HLEN or tot_len - IPV4_HLEN > CSUM_MAX_LEN:
        return
    l4len = tot_len - IPV4_HLEN
    if l4 + l4len > end:
        return
    pseudo = ones_sum(bytes(frame[ip + 12 : ip + 20]) + struct.pack("!HH", proto, l4len))
    if int.from_bytes(frame[at : at + 2], "big") != pseudo:
        return
    full = inet_csum(bytes(frame[l4 : l4 + l4len]))
    if full == 0 and proto == IPPROTO_UDP:
        full = 0xFFFF
    frame[at : at + 2] = full.to_bytes(2, "big")


def underlay(prog_type: str, frame: bytes, node: Node, peers: PeerTable) -> Outcome:
    """underlay_xdp (prog_type "xdp"), underlay_tc ("tc") or underlay_tc as the kernel
    ingress hook builds it ("kernel": judges only) on frame."""
    if kernel_refuses(prog_type, frame):
        return REFUSAL
    n = len(frame)
    if not node.configured:
        return Outcome(PASS, reason("none", "PASS_NOT_CONFIGURED"), n, frame)
    why = _outer_pass_reason(frame, node)
    if why is not None:
        # underlay.h is_host_gw_delivery(): only once the IPv4 header was parsed (the
        # reasons from PASS_NOT_UDP on), to our pod subnet, from a host-gw peer's subnet.
        if why in HOST_GW_DELIVERY_REASONS and node.in_own_subnet(frame[30:34]):
            src = peers.lookup(frame[26:30])
            if src is not None and src.backend == Backend.HOST_GW:
                return Outcome(PASS, traffic("host-gw", "deliver"), n, frame)
        return Outcome(PASS, reason("none", why), n, frame)
    why = _inner_drop_reason(frame, node, peers)
    if why is not None:
        return Outcome(DROP, reason("vxlan", why), n, frame)
    if prog_type == "kernel":
        # Accepted whole, for the vxlan device to decapsulate; counted with the inner length.
        return Outcome(REDIRECT, traffic("vxlan", "decap"), n - VXLAN_ENCAP_LEN, frame)
    if prog_type == "xdp":
        # The inner Ethernet frame as it came, its L4 checksum finished if it was partial.
        out = bytearray(frame[VXLAN_ENCAP_LEN:])
        complete_l4_csum(out, ETH_HLEN)
        out = bytes(out)
    else:
        # Outer IPv4/UDP/VXLAN and the inner Ethernet header go; the Ethernet header left in
        # front is rewritten: our VtepMAC, the inner source MAC, IPv4.
        out = node.vtep_mac + frame[56:62] + ETH_P_IP + frame[64:]
    return Outcome(REDIRECT, traffic("vxlan", "decap"), len(out), out)


# --- tunnel_egress ------------------------------------------------------------------------------


def vxlan_outer_ecn(inner_tos: int) -> int:
    ecn = inner_tos & 0x03
    return 0x02 if ecn == 0x03 else ecn


def vxlan_encapsulated(frame: bytes, node: Node, peer: Entry) -> bytes:
    """vxlan.h vxlan_encap(): 50 bytes pushed after the frame's Ethernet header (which stays
    as it came until the next hop is known), the UDP source port left as 0 here."""
    inner_eth = peer.vtep_mac + node.vtep_mac + ETH_P_IP
    udp_vxlan = vxlan_udp(0, node.port, node.vni, inner_eth + frame[ETH_HLEN:])
    ip = ipv4_header(
        node.public_ip,
        peer.public_ip,
        len(udp_vxlan),
        proto=IPPROTO_UDP,
        tos=vxlan_outer_ecn(frame[15]),
        ttl=VXLAN_OUTER_TTL,
    )  # ID 0, DF
    return frame[:12] + ETH_P_IP + ip + udp_vxlan


def frag_needed_answerable(frame: bytes, mtu: int) -> bool:
    """pmtu.h frag_needed_answerable(), and a frame long enough to quote in full."""
    ihl = frame[ETH_HLEN] & 0x0F
    if mtu < ICMP_ERROR_MAX_LEN or frame[20:22] != b"\x40\x00" or frame[ETH_HLEN] >> 4 != 4:
        return False
    if ihl < 5 or len(frame) < ETH_HLEN + ICMP_ERROR_MAX_LEN - IPV4_HLEN - ICMP_HLEN:
        return False
    if frame[23] != IPPROTO_ICMP:
        return True
    return ihl == 5 and frame[ETH_HLEN + IPV4_HLEN] not in ICMP_ERROR_TYPES


def answer_too_big(frame: bytes, backend: str, mtu: int) -> Outcome:
    """pmtu.h answer_too_big(): ICMP "fragmentation needed" from the packet's destination
    to its source, in to the tunnel device (whose MAC sent it), or a drop."""
    n = len(frame)
    if not frag_needed_answerable(frame, mtu):
        return Outcome(DROP, reason(backend, "DROP_TOO_BIG"), n, frame)
    reply = icmp_frag_needed(frame[30:34], frame[26:30], mtu, frame[ETH_HLEN:])
    out = frame[6:12] + frame[0:6] + ETH_P_IP + reply
    return Outcome(REDIRECT, reason(backend, "DROP_FRAG_NEEDED"), n, out)


def egress(frame: bytes, node: Node, peers: PeerTable, net: Underlay) -> Outcome:
    """tunnel_egress on frame."""
    if kernel_refuses("tc", frame):
        return REFUSAL
    n = len(frame)
    if not node.configured:
        return Outcome(DROP, reason("none", "DROP_NOT_CONFIGURED"), n, frame)
    if frame[12:14] != ETH_P_IP:
        return Outcome(DROP, reason("none", "DROP_INNER_NOT_IPV4"), n, frame)
    if n < ETH_HLEN + IPV4_HLEN:  # the test run refuses these: kept for completeness
        return Outcome(DROP, reason("none", "DROP_MALFORMED"), n, frame)
    peer = peers.lookup(frame[30:34])
    if peer is None:
        return Outcome(DROP, reason("none", "DROP_NO_ROUTE"), n, frame)
    if peer.backend == Backend.VXLAN:
        backend, grow = "vxlan", VXLAN_ENCAP_LEN
    elif peer.backend == Backend.HOST_GW:
        backend, grow = "host-gw", 0
    else:
        return Outcome(DROP, reason("none", "DROP_NO_ROUTE"), n, frame)
    # send.h: the frame is sized against the route's MTU as it will leave, before it is
    # encapsulated; one the route cannot take is answered (pmtu.h) or dropped as it came.
    if n - ETH_HLEN + grow > 0xFFFF:
        return Outcome(DROP, reason(backend, "DROP_TOO_BIG"), n, frame)
    result, mac = net.fib(peer.public_ip, n - ETH_HLEN + grow)
    if result == "frag_needed":
        return answer_too_big(frame, backend, net.mtu - grow)
    if peer.backend == Backend.VXLAN:
        out = vxlan_encapsulated(frame, node, peer)
        counter, sport_at = traffic("vxlan", "encap"), ETH_HLEN + IPV4_HLEN
    else:
        out = frame
        counter, sport_at = traffic("host-gw", "forward"), None
    # fib.h redirect_to_next_hop(): dropped frames are returned as the program left them.
    if result == "no_route":
        return Outcome(DROP, reason(backend, "DROP_NO_UNDERLAY_ROUTE"), n, out, sport_at)
    if result == "success":
        assert mac is not None
        out = mac + net.own_mac + ETH_P_IP + out[ETH_HLEN:]
    # "no_neigh": bpf_redirect_neigh(), the Ethernet header left for the neighbour layer.
    return Outcome(REDIRECT, counter, n, out, sport_at)
