"""Ethernet/IPv4/UDP/TCP/VXLAN frames built byte by byte, and Internet checksums: the one
builder behind the tests (BPF_PROG_TEST_RUN inputs, expected outputs, fuzz frames) and the
benchmark (frames it test-runs and injects).

Every header field a test may want to break is a keyword argument; the defaults are what
the kernel sends (IPv4 without options, DF set, IP ID 0, TTL 64). Addresses may be given
as text, as IPv4Address or as 4 packed bytes.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from flannel_xdp.mac import parse_mac

ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
ETH_P_8021Q, ETH_P_8021AD = 0x8100, 0x88A8
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
ETH_HLEN, IP_HLEN, UDP_HLEN, TCP_HLEN, VXLAN_HLEN = 14, 20, 8, 20, 8
VXLAN_OVERHEAD = ETH_HLEN + IP_HLEN + UDP_HLEN + VXLAN_HLEN  # 50
VXLAN_FLAG_VNI = 0x08
IP_DF = 0x4000
TCP_ACK_PSH = 0x18
ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED = 3, 4
# An ICMP error fills at most the 576 bytes every IPv4 host accepts (RFC 1812 4.3.2.3).
ICMP_ERROR_MAX_LEN = 576
ICMP_HLEN = 8

Address = str | bytes | IPv4Address


def packed(addr: Address) -> bytes:
    """The 4 bytes of an IPv4 address given as text, IPv4Address or bytes."""
    return addr if isinstance(addr, bytes) else IPv4Address(addr).packed


def mac_bytes(text: str) -> bytes:
    return parse_mac(text)


# --- checksums ---------------------------------------------------------------------------


def ones_sum(data: bytes) -> int:
    """Folded (not inverted) 16-bit ones' complement sum of data (odd length: zero-padded)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def inet_csum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def pseudo_header(src: Address, dst: Address, proto: int, l4len: int) -> bytes:
    return packed(src) + packed(dst) + struct.pack("!HH", proto, l4len)


def pseudo_sum(src: Address, dst: Address, proto: int, l4len: int) -> int:
    """Folded (not inverted) pseudo-header sum: what a CHECKSUM_PARTIAL skb carries."""
    return ones_sum(pseudo_header(src, dst, proto, l4len))


def l4_csum(src: Address, dst: Address, proto: int, segment: bytes) -> int:
    """The TCP/UDP checksum of segment (its checksum field zero), not mapped 0 -> 0xffff."""
    return inet_csum(pseudo_header(src, dst, proto, len(segment)) + segment)


def l4_csum_ok(ip_packet: bytes) -> bool:
    """Is the TCP/UDP checksum of this IPv4 packet (no options) valid?"""
    src, dst = ip_packet[12:16], ip_packet[16:20]
    proto, l4 = ip_packet[9], ip_packet[20:]
    return ones_sum(pseudo_header(src, dst, proto, len(l4)) + l4) == 0xFFFF


# --- IPv4 --------------------------------------------------------------------------------


def ipv4_header(
    src: Address,
    dst: Address,
    payload_len: int,
    *,
    proto: int = IPPROTO_UDP,
    tos: int = 0,
    ident: int = 0,
    flags_frag: int = IP_DF,
    ttl: int = 64,
    options: bytes = b"",
    ihl: int | None = None,
    version: int = 4,
    tot_len: int | None = None,
) -> bytes:
    """An IPv4 header with a valid header checksum; ihl, version and tot_len may lie."""
    hlen = IP_HLEN + len(options)
    ihl = hlen // 4 if ihl is None else ihl
    tot_len = hlen + payload_len if tot_len is None else tot_len
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        (version << 4) | ihl,
        tos,
        tot_len & 0xFFFF,
        ident,
        flags_frag,
        ttl,
        proto,
        0,
        packed(src),
        packed(dst),
    )
    hdr += options
    return hdr[:10] + struct.pack("!H", inet_csum(hdr)) + hdr[12:]


def ipv4(src: Address, dst: Address, proto: int, payload: bytes, **hdr_kw) -> bytes:
    """An IPv4 packet: ipv4_header() (its keyword arguments) and payload."""
    return ipv4_header(src, dst, len(payload), proto=proto, **hdr_kw) + payload


# --- UDP and TCP -------------------------------------------------------------------------


def _checksummed(src, dst, proto: int, segment: bytes, offset: int, partial: bool) -> bytes:
    """segment with its checksum field (at offset) filled in: the full checksum, or
    (partial) only the folded pseudo-header sum: what a CHECKSUM_PARTIAL skb from a veth
    carries and what the receiver must complete."""
    if partial:
        csum = pseudo_sum(src, dst, proto, len(segment))
    else:
        csum = l4_csum(src, dst, proto, segment)
        if proto == IPPROTO_UDP and csum == 0:
            csum = 0xFFFF  # 0 would mean "no checksum"
    return segment[:offset] + struct.pack("!H", csum) + segment[offset + 2 :]


def udp(
    src: Address,
    dst: Address,
    sport: int,
    dport: int,
    payload: bytes,
    *,
    partial: bool = False,
    **ip_kw,
) -> bytes:
    """An IPv4/UDP packet with a correct UDP checksum (or, partial, the pseudo-header sum)."""
    seg = struct.pack("!HHHH", sport, dport, UDP_HLEN + len(payload), 0) + payload
    seg = _checksummed(src, dst, IPPROTO_UDP, seg, 6, partial)
    return ipv4(src, dst, IPPROTO_UDP, seg, **ip_kw)


def tcp(
    src: Address,
    dst: Address,
    sport: int,
    dport: int,
    payload: bytes,
    *,
    flags: int = TCP_ACK_PSH,
    seq: int = 1,
    ack: int = 1,
    partial: bool = False,
    **ip_kw,
) -> bytes:
    """An IPv4/TCP segment (20-byte header) with a correct TCP checksum (or, partial, the
    pseudo-header sum)."""
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, TCP_HLEN // 4 << 4, flags, 65535, 0, 0)
    seg += payload
    seg = _checksummed(src, dst, IPPROTO_TCP, seg, 16, partial)
    return ipv4(src, dst, IPPROTO_TCP, seg, **ip_kw)


def with_l4_csum(ip_packet: bytes, value: int) -> bytes:
    """The packet (IPv4 without options) with its TCP/UDP checksum field set to value."""
    off = IP_HLEN + (16 if ip_packet[9] == IPPROTO_TCP else 6)
    return ip_packet[:off] + struct.pack("!H", value) + ip_packet[off + 2 :]


def partial_csum(ip_packet: bytes) -> bytes:
    """As a CHECKSUM_PARTIAL skb leaves a veth: the field holds the pseudo-header sum only."""
    src, dst = ip_packet[12:16], ip_packet[16:20]
    return with_l4_csum(ip_packet, pseudo_sum(src, dst, ip_packet[9], len(ip_packet) - IP_HLEN))


def icmp_frag_needed(src: Address, dst: Address, mtu: int, packet: bytes) -> bytes:
    """ICMP "fragmentation needed" from src to dst about packet (an IPv4 packet), announcing
    mtu and quoting as much of packet as fits in ICMP_ERROR_MAX_LEN."""
    quote = packet[: ICMP_ERROR_MAX_LEN - IP_HLEN - ICMP_HLEN]
    icmp = struct.pack("!BBHHH", ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, mtu) + quote
    icmp = icmp[:2] + struct.pack("!H", inet_csum(icmp)) + icmp[4:]
    return ipv4(src, dst, IPPROTO_ICMP, icmp)


# --- Ethernet and VXLAN ------------------------------------------------------------------


def eth(dst_mac: str | bytes, src_mac: str | bytes, ethertype: int = ETH_P_IP) -> bytes:
    """An Ethernet header (MACs as text or as 6 bytes)."""
    dst, src = (m if isinstance(m, bytes) else mac_bytes(m) for m in (dst_mac, src_mac))
    return dst + src + struct.pack("!H", ethertype)


def ethernet(dst_mac: str, src_mac: str, payload: bytes, ethertype: int = ETH_P_IP) -> bytes:
    """An Ethernet frame: eth() and payload."""
    return eth(dst_mac, src_mac, ethertype) + payload


def vxlan_header(vni: int, flags: int = VXLAN_FLAG_VNI) -> bytes:
    return struct.pack("!B3xI", flags, vni << 8)


def vxlan_udp(sport: int, dport: int, vni: int, inner_frame: bytes, flags=VXLAN_FLAG_VNI):
    """Outer UDP header (checksum 0, as flannel peers send) + VXLAN header + inner frame."""
    udp_hdr = struct.pack("!HHHH", sport, dport, UDP_HLEN + VXLAN_HLEN + len(inner_frame), 0)
    return udp_hdr + vxlan_header(vni, flags) + inner_frame


def vxlan(
    *,
    outer_dst_mac: str,
    outer_src_mac: str,
    outer_src: Address,
    outer_dst: Address,
    vni: int,
    port: int,
    inner_frame: bytes,
    sport: int = 49152,
) -> bytes:
    """A VXLAN frame as a flannel peer puts it on the wire (outer UDP checksum 0)."""
    outer = ipv4(outer_src, outer_dst, IPPROTO_UDP, vxlan_udp(sport, port, vni, inner_frame))
    return ethernet(outer_dst_mac, outer_src_mac, outer)


def payload_bytes(size: int) -> bytes:
    return bytes(i & 0xFF for i in range(size))
