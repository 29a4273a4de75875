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
from ipaddress import IPv4Address, IPv4Network

from flannel_xdp.netlink import NLMSG_DONE, NLMSG_ERROR, NLMSGHDR, MalformedMessage, headers

from .sockfilter import (
    AND_K,
    DROP,
    JEQ_K,
    JGE_K,
    KEEP_ALL,
    LD_B_ABS,
    LD_H_ABS,
    LD_W_ABS,
    LD_W_LEN,
    RET_K,
    Step,
    assemble,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
NFNLGRP_CONNTRACK_NEW = 1
NFNETLINK_V0 = 0

NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_PROTOINFO, CTA_ZONE = 1, 2, 4, 18
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY = 4, 5
# Per direction: conntrack does not judge that side's segments against its windows.
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08

_NFGENMSG = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")  # nlmsgerr's error: minus an errno
_U8, _U16, _U32 = struct.Struct("B"), struct.Struct("!H"), struct.Struct("!I")
CT_MESSAGE = NFNL_SUBSYS_CTNETLINK << 8
_AF_INET = int(socket.AF_INET)


class CtnetlinkError(MalformedMessage):
    """A message that is not the ctnetlink its header says it is."""


# A TCP entry as the marker handles it, cheaper than a TcpFlow: (src, dst, sport, dport,
# zone), the addresses as integers.
RawFlow = tuple[int, int, int, int, int]
# Where the data of each attribute of a message starts and ends, by type.
Attrs = dict[int, tuple[int, int]]
Buffer = bytes | bytearray


@dataclass(frozen=True)
class TcpFlow:
    """A TCP conntrack entry, by its original-direction tuple."""

    src: IPv4Address
    dst: IPv4Address
    sport: int
    dport: int
    zone: int = 0
    liberal: bool = False  # both directions IP_CT_TCP_FLAG_BE_LIBERAL, where the message says

    @classmethod
    def of(cls, raw: RawFlow, liberal: bool = False) -> TcpFlow:
        src, dst, sport, dport, zone = raw
        return cls(IPv4Address(src), IPv4Address(dst), sport, dport, zone, liberal)

    def raw(self) -> RawFlow:
        return int(self.src), int(self.dst), self.sport, self.dport, self.zone


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
        return -_ERRNO.unpack_from(self.payload)[0]


def messages(buf: bytes) -> Iterator[Message]:
    """The netlink messages one recv() returned."""
    for pos, length, mtype, flags, seq in headers(buf):
        yield Message(mtype, flags, seq, buf[pos + NLMSGHDR.size : pos + length])


# How the kernel lays out the message of an IPv4 TCP (or UDP) entry, event or dump
# (ctnetlink_fill_info, ctnetlink_conntrack_event): the original tuple first, the reply
# tuple (as long) next, then CTA_ZONE where the zone is not the default one. The tuple is
# read in one unpack: the attribute headers as bytes (compared whole with
# _KERNEL_HEADERS), the protocol number, addresses and ports. Any other layout takes the
# walk through the attributes. (Were CTA_ZONE further on, an entry of another zone would
# read as the default zone's: its mark, which names no zone, would be refused, ENOENT, or
# mark the default zone's entry of the same flow, which is wanted anyway.)
_KERNEL_FIELDS = (
    ("orig_h", "4s"),
    ("ip_h", "4s"),
    ("src_h", "4s"),
    ("src", "I"),
    ("dst_h", "4s"),
    ("dst", "I"),
    ("proto_h", "4s"),
    ("num_h", "4s"),
    ("number", "B3x"),
    ("sport_h", "4s"),
    ("sport", "H2x"),
    ("dport_h", "4s"),
    ("dport", "H2x"),
    ("reply_h", "4s"),
)
_KERNEL_HEAD = struct.Struct("!" + "".join(fmt for _name, fmt in _KERNEL_FIELDS))
# Where each field starts, from the first attribute.
_KERNEL_AT = {
    name: struct.calcsize("!" + "".join(fmt for _n, fmt in _KERNEL_FIELDS[:i]))
    for i, (name, _fmt) in enumerate(_KERNEL_FIELDS)
}
# A tuple's attributes, with their headers: CTA_TUPLE_IP (two addresses), CTA_TUPLE_PROTO
# (number and ports)
_TUPLE_IP_SIZE = 4 + 8 + 8
_TUPLE_PROTO_SIZE = 4 + 8 + 8 + 8
_TUPLE_SIZE = _TUPLE_IP_SIZE + _TUPLE_PROTO_SIZE
_KERNEL_HEADERS = tuple(
    _NLATTR.pack(length, atype)
    for length, atype in (
        (4 + _TUPLE_SIZE, CTA_TUPLE_ORIG | NLA_F_NESTED),
        (_TUPLE_IP_SIZE, CTA_TUPLE_IP | NLA_F_NESTED),
        (8, CTA_IP_V4_SRC),
        (8, CTA_IP_V4_DST),
        (_TUPLE_PROTO_SIZE, CTA_TUPLE_PROTO | NLA_F_NESTED),
        (5, CTA_PROTO_NUM),
        (6, CTA_PROTO_SRC_PORT),
        (6, CTA_PROTO_DST_PORT),
        (4 + _TUPLE_SIZE, CTA_TUPLE_REPLY | NLA_F_NESTED),
    )
)
_ZONE_HEADER = _NLATTR.pack(_NLATTR.size + _U16.size, CTA_ZONE)
# The fields of _KERNEL_HEAD that are attribute headers, in _KERNEL_HEADERS' order.
_HEADER_FIELDS = tuple(name for name, _fmt in _KERNEL_FIELDS if name.endswith("_h"))


def _as_loaded(raw: bytes) -> int:
    """What a classic BPF load of raw's bytes reads: they are taken in network order."""
    return int.from_bytes(raw, "big")


def events_filter(subnet: IPv4Network, network: IPv4Network) -> bytes:
    """A socket filter (node/sockfilter.py) that drops, before they are queued, the NEW
    events of IPv4 entries that flow_marks.FlowMarker skips: another protocol than TCP,
    or not between subnet and the rest of network. It reads only the kernel's layout
    (_KERNEL_HEAD): anything else (other messages, the kernel's refusals of marks, another
    layout) it keeps for the marker, which checks every message it reads (the zone too)."""
    first = NLMSGHDR.size + _NFGENMSG.size  # the first attribute

    def at(name: str) -> int:
        return first + _KERNEL_AT[name]

    new_event = _as_loaded(struct.pack("=H", CT_MESSAGE | IPCTNL_MSG_CT_NEW))
    mask, net = int(network.netmask), int(network.network_address)
    submask, sub = int(subnet.netmask), int(subnet.network_address)
    steps = [
        Step(LD_W_LEN),
        Step(JGE_K, first + _KERNEL_HEAD.size, jf="keep"),
        Step(LD_H_ABS, 4),  # nlmsg_type
        Step(JEQ_K, new_event, jf="keep"),
        Step(LD_B_ABS, NLMSGHDR.size),  # nfgen_family
        Step(JEQ_K, _AF_INET, jf="drop"),
    ]
    for name, header in zip(_HEADER_FIELDS, _KERNEL_HEADERS, strict=True):
        steps += [Step(LD_W_ABS, at(name)), Step(JEQ_K, _as_loaded(header), jf="keep")]
    steps += [
        Step(LD_B_ABS, at("number")),
        Step(JEQ_K, socket.IPPROTO_TCP, jf="drop"),
        Step(LD_W_ABS, at("src")),
        Step(AND_K, mask),
        Step(JEQ_K, net, jf="drop"),
        Step(LD_W_ABS, at("dst")),
        Step(AND_K, mask),
        Step(JEQ_K, net, jf="drop"),
        # one end in the subnet, the other not
        Step(LD_W_ABS, at("src")),
        Step(AND_K, submask),
        Step(JEQ_K, sub, jf="src_elsewhere"),
        Step(LD_W_ABS, at("dst")),
        Step(AND_K, submask),
        Step(JEQ_K, sub, jt="drop", jf="keep"),
        Step(LD_W_ABS, at("dst"), label="src_elsewhere"),
        Step(AND_K, submask),
        Step(JEQ_K, sub, jt="keep", jf="drop"),
        Step(RET_K, KEEP_ALL, label="keep"),
        Step(RET_K, DROP, label="drop"),
    ]
    return assemble(steps)


def _attrs(buf: Buffer, pos: int, end: int) -> Attrs:
    """The attributes in buf[pos:end]."""
    out: Attrs = {}
    unpack = _NLATTR.unpack_from
    while pos + 4 <= end:
        length, atype = unpack(buf, pos)
        if length < 4 or pos + length > end:
            raise CtnetlinkError(f"attribute of {length} bytes at {pos} of {end}")
        out[atype & NLA_TYPE_MASK] = (pos + 4, pos + length)
        pos = (pos + length + 3) & ~3
    return out


def _nested(buf: Buffer, attrs: Attrs, atype: int) -> Attrs:
    span = attrs.get(atype)
    return _attrs(buf, *span) if span is not None else {}


def _value(buf: Buffer, span: tuple[int, int], field: struct.Struct) -> int:
    start, end = span
    if end - start != field.size:
        raise CtnetlinkError(f"attribute of {end - start} bytes where {field.size} belong")
    return field.unpack_from(buf, start)[0]


def _entry(buf: Buffer, pos: int, end: int) -> RawFlow | None:
    """The IPv4 TCP entry the conntrack message whose payload is buf[pos:end]
    describes; None for any other protocol or family."""
    if end - pos < _NFGENMSG.size or buf[pos] != _AF_INET:
        return None
    pos += _NFGENMSG.size
    if pos + _KERNEL_HEAD.size + _TUPLE_SIZE <= end:
        (
            orig_h,
            ip_h,
            src_h,
            src,
            dst_h,
            dst,
            proto_h,
            num_h,
            number,
            sport_h,
            sport,
            dport_h,
            dport,
            reply_h,
        ) = _KERNEL_HEAD.unpack_from(buf, pos)
        got = (orig_h, ip_h, src_h, dst_h, proto_h, num_h, sport_h, dport_h, reply_h)
        if got == _KERNEL_HEADERS:
            if number != socket.IPPROTO_TCP:
                return None
            after = pos + _KERNEL_HEAD.size + _TUPLE_SIZE
            zone = 0
            if after + 8 <= end and buf[after : after + 4] == _ZONE_HEADER:
                zone = _U16.unpack_from(buf, after + 4)[0]
            return src, dst, sport, dport, zone
    top = _attrs(buf, pos, end)
    orig = top.get(CTA_TUPLE_ORIG)
    tuple_ = _tcp_tuple(buf, *orig) if orig is not None else None
    if tuple_ is None:
        return None
    src, dst, sport, dport = tuple_
    return src, dst, sport, dport, _value(buf, top[CTA_ZONE], _U16) if CTA_ZONE in top else 0


def _tcp_tuple(buf: Buffer, pos: int, end: int) -> tuple[int, int, int, int] | None:
    """src, dst, sport, dport of the tuple in buf[pos:end]; None if not TCP."""
    tuple_ = _attrs(buf, pos, end)
    proto = _nested(buf, tuple_, CTA_TUPLE_PROTO)
    num = proto.get(CTA_PROTO_NUM)
    if num is None or _value(buf, num, _U8) != socket.IPPROTO_TCP:
        return None
    ip = _nested(buf, tuple_, CTA_TUPLE_IP)
    try:
        src, dst = _value(buf, ip[CTA_IP_V4_SRC], _U32), _value(buf, ip[CTA_IP_V4_DST], _U32)
        sport = _value(buf, proto[CTA_PROTO_SRC_PORT], _U16)
        dport = _value(buf, proto[CTA_PROTO_DST_PORT], _U16)
    except KeyError as exc:
        raise CtnetlinkError(f"a TCP tuple without its attribute {exc}") from None
    return src, dst, sport, dport


def _liberal(buf: Buffer, top: Attrs) -> bool:
    """Whether both directions of the entry are IP_CT_TCP_FLAG_BE_LIBERAL."""
    tcp = _nested(buf, _nested(buf, top, CTA_PROTOINFO), CTA_PROTOINFO_TCP)
    for direction in (CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY):
        span = tcp.get(direction)
        if span is None or span[1] <= span[0] or not buf[span[0]] & IP_CT_TCP_FLAG_BE_LIBERAL:
            return False
    return True


def raw_flows(buf: Buffer, size: int, refused: list[int]) -> Iterator[RawFlow]:
    """The IPv4 TCP entries the conntrack messages in buf[:size] (what one recv_into()
    read: events) describe. The errno of each error message among them (the kernel
    refusing a request sent from the same socket) goes to refused; other messages are
    skipped."""
    for pos, length, mtype, _flags, _seq in headers(buf, size):
        if mtype & ~0xFF == CT_MESSAGE:
            flow = _entry(buf, pos + NLMSGHDR.size, pos + length)
            if flow is not None:
                yield flow
        elif mtype == NLMSG_ERROR:
            if length < NLMSGHDR.size + 4:
                raise CtnetlinkError(f"netlink error message of {length} bytes")
            err = -_ERRNO.unpack_from(buf, pos + NLMSGHDR.size)[0]
            if err:
                refused.append(err)


def tcp_flow(msg: Message) -> TcpFlow | None:
    """The IPv4 TCP entry a conntrack message (event or dump) describes; None for
    any other protocol or family."""
    if msg.type & ~0xFF != CT_MESSAGE:
        return None
    raw = _entry(msg.payload, 0, len(msg.payload))
    if raw is None:
        return None
    return TcpFlow.of(
        raw, _liberal(msg.payload, _attrs(msg.payload, _NFGENMSG.size, len(msg.payload)))
    )


def _message(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    payload = _NFGENMSG.pack(socket.AF_INET, NFNETLINK_V0, 0) + body
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), mtype, flags, seq, 0) + payload


def dump_request(seq: int) -> bytes:
    """Every IPv4 entry of the netns's table, as messages ending in NLMSG_DONE."""
    return _message(CT_MESSAGE | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, b"")


# A mark request, attribute by attribute (each header: length, type); with a zone other
# than the default, _ZONE follows.
_MARK = struct.Struct(
    "=IHHI4x"  # nlmsghdr: length, type, flags, seq; port id 0, the kernel
    "BB2x"  # nfgenmsg: family, version; resource id 0
    "HH"  # CTA_TUPLE_ORIG
    "HH"  # CTA_TUPLE_IP
    "HHI"  # CTA_IP_V4_SRC: addresses and ports are passed in network order
    "HHI"  # CTA_IP_V4_DST
    "HH"  # CTA_TUPLE_PROTO
    "HHB3x"  # CTA_PROTO_NUM
    "HHH2x"  # CTA_PROTO_SRC_PORT
    "HHH2x"  # CTA_PROTO_DST_PORT
    "HH"  # CTA_PROTOINFO
    "HH"  # CTA_PROTOINFO_TCP
    "HHBB2x"  # CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: flags, mask
    "HHBB2x"  # CTA_PROTOINFO_TCP_FLAGS_REPLY: flags, mask
)
_ZONE = struct.Struct("=HHH2x")  # CTA_ZONE (network order)
_TCP_FLAGS_SIZE = 4 + 8 + 8


def mark_liberal_request(flow: TcpFlow, seq: int, liberal: bool = True) -> bytes:
    """Set (or clear) IP_CT_TCP_FLAG_BE_LIBERAL on both directions of flow's entry, if
    it exists; the kernel answers only an error."""
    return mark_liberal_raw(flow.raw(), seq, liberal)


def mark_liberal_raw(flow: RawFlow, seq: int, liberal: bool = True) -> bytes:
    """mark_liberal_request for a RawFlow."""
    src, dst, sport, dport, zone = flow
    mark = IP_CT_TCP_FLAG_BE_LIBERAL if liberal else 0
    head = _MARK.pack(
        _MARK.size + (_ZONE.size if zone else 0),
        CT_MESSAGE | IPCTNL_MSG_CT_NEW,
        NLM_F_REQUEST,
        seq,
        _AF_INET,
        NFNETLINK_V0,
        4 + _TUPLE_SIZE,
        CTA_TUPLE_ORIG | NLA_F_NESTED,
        _TUPLE_IP_SIZE,
        CTA_TUPLE_IP | NLA_F_NESTED,
        8,
        CTA_IP_V4_SRC,
        socket.htonl(src),
        8,
        CTA_IP_V4_DST,
        socket.htonl(dst),
        _TUPLE_PROTO_SIZE,
        CTA_TUPLE_PROTO | NLA_F_NESTED,
        5,
        CTA_PROTO_NUM,
        socket.IPPROTO_TCP,
        6,
        CTA_PROTO_SRC_PORT,
        socket.htons(sport),
        6,
        CTA_PROTO_DST_PORT,
        socket.htons(dport),
        4 + _TCP_FLAGS_SIZE,
        CTA_PROTOINFO | NLA_F_NESTED,
        _TCP_FLAGS_SIZE,
        CTA_PROTOINFO_TCP | NLA_F_NESTED,
        6,
        CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
        mark,
        IP_CT_TCP_FLAG_BE_LIBERAL,
        6,
        CTA_PROTOINFO_TCP_FLAGS_REPLY,
        mark,
        IP_CT_TCP_FLAG_BE_LIBERAL,
    )
    return (
        head + _ZONE.pack(_NLATTR.size + _U16.size, CTA_ZONE, socket.htons(zone)) if zone else head
    )


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
