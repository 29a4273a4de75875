"""conntrack's netlink interface (ctnetlink), as much of it as marking TCP flows takes.

Three messages: the NEW events conntrack sends when it confirms an entry (the multicast
group NFNLGRP_CONNTRACK_NEW), a dump of the table, and an update of one entry's TCP
flags that never creates an entry (IPCTNL_MSG_CT_NEW without NLM_F_CREATE, so one that
has gone answers ENOENT). Layouts are the kernel's uapi:
linux/netfilter/nfnetlink_conntrack.h, nfnetlink.h and nf_conntrack_tcp.h.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
NFNLGRP_CONNTRACK_NEW = 1
NFNETLINK_V0 = 0

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

CTA_TUPLE_ORIG, CTA_PROTOINFO, CTA_ZONE = 1, 4, 18
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY = 4, 5
# Per direction: conntrack does not judge that side's segments against its windows.
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
CT_MESSAGE = NFNL_SUBSYS_CTNETLINK << 8


class CtnetlinkError(ValueError):
    """A message that is not the ctnetlink its header says it is."""


@dataclass(frozen=True)
class TcpFlow:
    """A TCP conntrack entry, by its original-direction tuple."""

    src: IPv4Address
    dst: IPv4Address
    sport: int
    dport: int
    zone: int = 0
    liberal: bool = False  # both directions IP_CT_TCP_FLAG_BE_LIBERAL, where the message says


@dataclass(frozen=True)
class Message:
    type: int  # nlmsg_type: NLMSG_ERROR, NLMSG_DONE or CT_MESSAGE | IPCTNL_MSG_*
    flags: int
    seq: int
    payload: bytes  # after the netlink header

    def error(self) -> int:
        """An NLMSG_ERROR's errno (0: an acknowledgement)."""
        if self.type != NLMSG_ERROR or len(self.payload) < 4:
            raise CtnetlinkError("not a netlink error message")
        return -struct.unpack_from("=i", self.payload)[0]


def messages(buf: bytes) -> Iterator[Message]:
    """The netlink messages one recv() returned."""
    pos = 0
    while pos + _NLMSGHDR.size <= len(buf):
        length, mtype, flags, seq, _pid = _NLMSGHDR.unpack_from(buf, pos)
        if length < _NLMSGHDR.size or pos + length > len(buf):
            raise CtnetlinkError(f"netlink message of {length} bytes at {pos} of {len(buf)}")
        yield Message(mtype, flags, seq, buf[pos + _NLMSGHDR.size : pos + length])
        pos += (length + 3) & ~3


def _attrs(buf: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + _NLATTR.size <= len(buf):
        length, atype = _NLATTR.unpack_from(buf, pos)
        if length < _NLATTR.size or pos + length > len(buf):
            raise CtnetlinkError(f"attribute of {length} bytes at {pos} of {len(buf)}")
        out[atype & NLA_TYPE_MASK] = buf[pos + _NLATTR.size : pos + length]
        pos += (length + 3) & ~3
    return out


def tcp_flow(msg: Message) -> TcpFlow | None:
    """The IPv4 TCP entry a conntrack message (event or dump) describes; None for
    any other protocol or family."""
    if msg.type & ~0xFF != CT_MESSAGE or len(msg.payload) < _NFGENMSG.size:
        return None
    family, _version, _res = _NFGENMSG.unpack_from(msg.payload)
    if family != socket.AF_INET:
        return None
    top = _attrs(msg.payload[_NFGENMSG.size :])
    if CTA_TUPLE_ORIG not in top:
        return None
    tuple_ = _attrs(top[CTA_TUPLE_ORIG])
    ip, proto = _attrs(tuple_.get(CTA_TUPLE_IP, b"")), _attrs(tuple_.get(CTA_TUPLE_PROTO, b""))
    if proto.get(CTA_PROTO_NUM) != bytes([socket.IPPROTO_TCP]):
        return None
    try:
        src, dst = ip[CTA_IP_V4_SRC], ip[CTA_IP_V4_DST]
        (sport,) = struct.unpack("!H", proto[CTA_PROTO_SRC_PORT])
        (dport,) = struct.unpack("!H", proto[CTA_PROTO_DST_PORT])
    except (KeyError, struct.error) as exc:
        raise CtnetlinkError(f"a TCP tuple without its addresses or ports: {exc}") from None
    zone = struct.unpack("!H", top[CTA_ZONE])[0] if CTA_ZONE in top else 0
    tcp = _attrs(_attrs(top.get(CTA_PROTOINFO, b"")).get(CTA_PROTOINFO_TCP, b""))
    liberal = all(
        len(tcp.get(a, b"")) >= 1 and tcp[a][0] & IP_CT_TCP_FLAG_BE_LIBERAL
        for a in (CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY)
    )
    return TcpFlow(IPv4Address(src), IPv4Address(dst), sport, dport, zone, liberal)


def _attr(atype: int, data: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(data), atype) + data
    return raw + bytes(-len(raw) % 4)


def _nested(atype: int, *attrs: bytes) -> bytes:
    return _attr(atype | NLA_F_NESTED, b"".join(attrs))


def _message(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    payload = _NFGENMSG.pack(socket.AF_INET, NFNETLINK_V0, 0) + body
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), mtype, flags, seq, 0) + payload


def dump_request(seq: int) -> bytes:
    """Every IPv4 entry of the netns's table, as messages ending in NLMSG_DONE."""
    return _message(CT_MESSAGE | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, b"")


def mark_liberal_request(flow: TcpFlow, seq: int, liberal: bool = True) -> bytes:
    """Set (or clear) IP_CT_TCP_FLAG_BE_LIBERAL on both directions of flow's entry, if
    it exists; the kernel answers only an error."""
    tuple_ = _nested(
        CTA_TUPLE_ORIG,
        _nested(
            CTA_TUPLE_IP,
            _attr(CTA_IP_V4_SRC, flow.src.packed),
            _attr(CTA_IP_V4_DST, flow.dst.packed),
        ),
        _nested(
            CTA_TUPLE_PROTO,
            _attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP])),
            _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", flow.sport)),
            _attr(CTA_PROTO_DST_PORT, struct.pack("!H", flow.dport)),
        ),
    )
    mark = IP_CT_TCP_FLAG_BE_LIBERAL if liberal else 0
    flags = bytes([mark, IP_CT_TCP_FLAG_BE_LIBERAL])  # flags, mask
    protoinfo = _nested(
        CTA_PROTOINFO,
        _nested(
            CTA_PROTOINFO_TCP,
            _attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, flags),
            _attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, flags),
        ),
    )
    zone = _attr(CTA_ZONE, struct.pack("!H", flow.zone)) if flow.zone else b""
    return _message(CT_MESSAGE | IPCTNL_MSG_CT_NEW, NLM_F_REQUEST, seq, tuple_ + protoinfo + zone)


def tcp_entries(timeout: float = 5.0) -> list[TcpFlow]:
    """Every IPv4 TCP entry of this thread's netns, from a dump."""
    sock = open_socket()
    try:
        sock.setblocking(True)
        sock.settimeout(timeout)
        sock.send(dump_request(1))
        found = []
        while True:
            for msg in messages(sock.recv(1 << 16)):
                if msg.type == NLMSG_DONE:
                    return found
                if msg.type == NLMSG_ERROR and msg.error():
                    raise OSError(msg.error(), f"conntrack dump: {os.strerror(msg.error())}")
                if (flow := tcp_flow(msg)) is not None:
                    found.append(flow)
    finally:
        sock.close()


def open_socket(groups: int = 0, rcvbuf: int = 0) -> socket.socket:
    """A non-blocking ctnetlink socket in this thread's netns, in the multicast groups
    bitmask groups (1 << (NFNLGRP_CONNTRACK_NEW - 1): confirmed entries)."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, NETLINK_NETFILTER
    )
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        sock.bind((0, groups))
    except OSError:
        sock.close()
        raise
    return sock


SO_RCVBUFFORCE = 33  # asm-generic/socket.h: root may exceed net.core.rmem_max
NEW_EVENTS = 1 << (NFNLGRP_CONNTRACK_NEW - 1)
