"""Frames the benchmark test-runs and injects, built byte by byte with valid checksums.

Only the lab's documentation/benchmark addresses ever appear in them: they are made
from the running cluster's own nodes and pods.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

ETH_P_IP = 0x0800
IPPROTO_TCP, IPPROTO_UDP = 6, 17
ETH_HLEN, IP_HLEN, UDP_HLEN, TCP_HLEN, VXLAN_HLEN = 14, 20, 8, 20, 8
VXLAN_FLAG_VNI = 0x08
IP_DF = 0x4000


def mac_bytes(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def inet_csum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    return IPv4Address(src).packed + IPv4Address(dst).packed + struct.pack("!HH", proto, length)


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ttl: int = 64) -> bytes:
    """An IPv4 packet without options, DF set and IP ID 0 (as the kernel sends TCP)."""
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        IP_HLEN + len(payload),
        0,
        IP_DF,
        ttl,
        proto,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    return hdr[:10] + struct.pack("!H", inet_csum(hdr)) + hdr[12:] + payload


def _l4_checksum(src: str, dst: str, proto: int, segment: bytes, partial: bool) -> int:
    """The full checksum, or (partial) only the folded pseudo-header sum: what a
    CHECKSUM_PARTIAL skb from a veth carries and what the receiver must complete."""
    if partial:
        return ones_sum(_pseudo(src, dst, proto, len(segment)))
    csum = inet_csum(_pseudo(src, dst, proto, len(segment)) + segment)
    return csum or (0xFFFF if proto == IPPROTO_UDP else 0)


def udp(
    src: str, dst: str, sport: int, dport: int, payload: bytes, *, partial: bool = False, ttl=64
) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, UDP_HLEN + len(payload), 0) + payload
    csum = _l4_checksum(src, dst, IPPROTO_UDP, seg, partial)
    return ipv4(src, dst, IPPROTO_UDP, seg[:6] + struct.pack("!H", csum) + seg[8:], ttl=ttl)


def tcp(
    src: str, dst: str, sport: int, dport: int, payload: bytes, *, partial: bool = False, ttl=64
) -> bytes:
    """A TCP data segment (ACK|PSH, 20-byte header)."""
    seg = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, TCP_HLEN // 4 << 4, 0x18, 65535, 0, 0)
    seg += payload
    csum = _l4_checksum(src, dst, IPPROTO_TCP, seg, partial)
    return ipv4(src, dst, IPPROTO_TCP, seg[:16] + struct.pack("!H", csum) + seg[18:], ttl=ttl)


def ethernet(dst_mac: str, src_mac: str, payload: bytes, ethertype: int = ETH_P_IP) -> bytes:
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ethertype) + payload


def vxlan(
    *,
    outer_dst_mac: str,
    outer_src_mac: str,
    outer_src: str,
    outer_dst: str,
    vni: int,
    port: int,
    inner_frame: bytes,
    sport: int = 49152,
) -> bytes:
    """A VXLAN frame as a flannel peer puts it on the wire (outer UDP checksum 0)."""
    vx = struct.pack("!B3xI", VXLAN_FLAG_VNI, vni << 8)
    seg = struct.pack("!HHHH", sport, port, UDP_HLEN + VXLAN_HLEN + len(inner_frame), 0)
    outer = ipv4(outer_src, outer_dst, IPPROTO_UDP, seg + vx + inner_frame)
    return ethernet(outer_dst_mac, outer_src_mac, outer)


def payload_bytes(size: int) -> bytes:
    return bytes(i & 0xFF for i in range(size))
