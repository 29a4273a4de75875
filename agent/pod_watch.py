"""What wakes the pod scan before its second is up: the kernel's link and neighbour news.

A pod becomes one the scan finds in steps the kernel announces on routing netlink: its
veth end appears (RTM_NEWLINK), the node resolves its address on cni0 (an IPv4
neighbour of cni0) and cni0 learns its MAC on the port (a forwarding-database entry, an
AF_BRIDGE neighbour). Any of those wakes the scan, after a short pause that gathers a
pod's burst of them into one scan (defaults.POD_EVENTS_SETTLE_S), so a new pod's first
flows reach the fast path in a fraction of a second rather than up to a second. Nothing
is read from the messages beyond their kind, family and interface: the scan reads the
kernel's tables itself. The scan's periodic run stays, for what no message says (a qdisc
added to a port) and for messages the socket could not hold (ENOBUFS wakes it too).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct

from flannel_xdp.netlink import NLMSGHDR, MalformedMessage, headers
from flannel_xdp.rtnl import (
    AF_BRIDGE,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
)

log = logging.getLogger(__name__)

RECV_BYTES = 65536

NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type


def concerns_pods(data: bytes, bridge_index: int) -> bool:
    """A read of routing-netlink notifications holds one that can change what the pod
    scan finds: a link added, changed or removed, a bridge port's forwarding entry, or a
    neighbour of the bridge (bridge_index: 0 while there is no bridge)."""
    try:
        for offset, length, kind, _flags, _seq in headers(data):
            if kind in (RTM_NEWLINK, RTM_DELLINK):
                return True
            body = offset + NLMSGHDR.size
            if kind in (RTM_NEWNEIGH, RTM_DELNEIGH) and body + NDMSG.size <= offset + length:
                family, ifindex, *_ = NDMSG.unpack_from(data, body)
                if family == AF_BRIDGE or (bridge_index and ifindex == bridge_index):
                    return True
    except MalformedMessage:
        pass  # what came before it did not concern the pods; the periodic scan stays
    return False


def _index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


class PodWatch:
    """A routing-netlink socket in the current netns, subscribed to link and neighbour
    notifications; woken is set when one concerns the pods on bridge."""

    def __init__(self, bridge: str):
        self.bridge = bridge
        self.woken = asyncio.Event()
        self._sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            socket.NETLINK_ROUTE,
        )
        try:
            self._sock.bind((0, RTMGRP_LINK | RTMGRP_NEIGH))
        except OSError:
            self._sock.close()
            raise
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Read notifications as they come, on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self.read)

    def read(self) -> None:
        """Drain the socket; wake the scan if any of it concerns the pods. A socket that
        fails is no longer watched: the periodic scan finds the pods from then on."""
        bridge_index = _index(self.bridge)
        while True:
            try:
                data = self._sock.recv(RECV_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.woken.set()  # some were lost: they may have concerned the pods
                    continue
                log.warning(
                    "fast path: link and neighbour notifications failed (%s): new pods "
                    "are found by the periodic scan only",
                    exc,
                )
                self._stop_reading()
                return
            if not data:
                return
            if concerns_pods(data, bridge_index):
                self.woken.set()

    async def wait(self, timeout: float, settle: float) -> bool:
        """Until a notification concerns the pods and settle more seconds have passed
        (True), or timeout passed without one (False). What comes during the pause
        belongs to this wake; what comes after it returned wakes the next wait."""
        woken = True
        try:
            await asyncio.wait_for(self.woken.wait(), timeout)
        except TimeoutError:
            woken = False
        else:
            await asyncio.sleep(settle)
        self.woken.clear()
        return woken

    def _stop_reading(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None

    def close(self) -> None:
        self._stop_reading()
        self._sock.close()
