"""The header every netlink message begins with, whatever its family (linux/netlink.h),
and the walk over the messages that one recv() returned.

The kernel packs several messages into one read, each aligned to NLMSG_ALIGNTO; a length
that runs past the read, or is shorter than the header, means the read is not netlink's.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id
NLMSG_ALIGNTO = 4
NLMSG_ERROR, NLMSG_DONE = 2, 3

Buffer = bytes | bytearray | memoryview


class MalformedMessage(ValueError):
    """A message that is not what its header, or the header itself, says it is."""


def headers(buf: Buffer, size: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """(offset, length, type, flags, seq) of each message in buf[:size] (all of buf by
    default)."""
    end = len(buf) if size is None else size
    pos = 0
    unpack = NLMSGHDR.unpack_from
    while pos + NLMSGHDR.size <= end:
        length, mtype, flags, seq, _port = unpack(buf, pos)
        if length < NLMSGHDR.size or pos + length > end:
            raise MalformedMessage(f"netlink message of {length} bytes at {pos} of {end}")
        yield pos, length, mtype, flags, seq
        pos += (length + NLMSG_ALIGNTO - 1) & ~(NLMSG_ALIGNTO - 1)
