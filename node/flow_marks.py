"""Marking the TCP flows the fast path may carry, so that conntrack keeps accepting them.

conntrack does not see the segments the fast path carries (bpf/fastpath.h). With its
window checks on, it would judge the next segment of such a stream that it does see (a
FIN, or any segment once the stream is back on the stack) against windows long passed,
call it INVALID, and kube-proxy's `--ctstate INVALID -j DROP` drops it. So conntrack
must not check that stream's windows: this module sets IP_CT_TCP_FLAG_BE_LIBERAL on both
directions of the entry of each TCP flow between this node's pods and the rest of the
cluster network (ctnetlink, as `conntrack -U` would), as soon as conntrack confirms it,
and bpf/conntrack.h fast-paths only TCP entries marked so. The mark is conntrack's own
per-entry form of net.netfilter.nf_conntrack_tcp_be_liberal (it sets it itself on a
stream it picks up mid-way): every other flow of the node keeps its window checks, and
the marked ones keep everything else (state from SYN to FIN and RST, timeouts, NAT).

Missed events cost speed, never correctness: an unmarked flow just takes the stack.
The marker catches up with a dump when it starts and after its socket overran. The
events of flows it would not mark (UDP, DNS among them; flows within the node or leaving
the network) are dropped by the kernel before they reach its socket
(ctnetlink.events_filter): they neither wake it nor take its CPU.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from . import ctnetlink, sockfilter

log = logging.getLogger(__name__)

EVENTS_RCVBUF = 8 << 20  # a burst of new connections queues here while the marker works
RECV_SIZE = 1 << 16
# recv() calls (each reads one event) per on_events(): under a flood of new connections
# the caller's loop still gets its turn; what is left is read at the next call.
RECVS_PER_CALL = 256
DUMP_TIMEOUT_S = 10.0
# Marks per send(): 96 bytes each, one buffer the kernel allocates per send.
MARKS_PER_SEND = 64


@dataclass
class FlowMarker:
    """Marks, in the netns it was opened in, the TCP flows with one end in subnet (this
    node's pods) and the other elsewhere in network (a pod of another node)."""

    subnet: IPv4Network
    network: IPv4Network
    # conntrack's NEW events, and the kernel's answers to the marks, sent from it: one
    # socket to read (and to wake on) for both
    events: socket.socket
    dumps: socket.socket  # blocking, with DUMP_TIMEOUT_S
    marked: int = 0  # mark requests sent
    gone: int = 0  # entries that went before their mark arrived
    failed: int = 0  # refused for any other reason
    overruns: int = 0  # times events were lost (and a dump caught up)
    _seq: int = field(default=0, repr=False)
    _network: tuple[int, int] = field(init=False, repr=False)  # address, mask: integers
    _subnet: tuple[int, int] = field(init=False, repr=False)
    _buf: bytearray = field(init=False, repr=False)  # each event read into it in turn
    # whether more is queued: cheaper than a recv() that fails
    _queued: select.poll = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._network = int(self.network.network_address), int(self.network.netmask)
        self._subnet = int(self.subnet.network_address), int(self.subnet.netmask)
        self._buf = bytearray(RECV_SIZE)
        self._queued = select.poll()
        self._queued.register(self.events, select.POLLIN)

    @classmethod
    def open(
        cls, subnet: IPv4Network, network: IPv4Network, events_rcvbuf: int = EVENTS_RCVBUF
    ) -> FlowMarker:
        """Listening in this thread's netns, with the flows already there marked.
        OSError when ctnetlink is not there (no conntrack, no CAP_NET_ADMIN)."""
        opened: list[socket.socket] = []
        try:
            opened.append(ctnetlink.open_socket(ctnetlink.NEW_EVENTS, events_rcvbuf))
            opened.append(ctnetlink.open_socket())
        except OSError:
            for sock in opened:
                sock.close()
            raise
        events, dumps = opened
        try:
            sockfilter.attach(events, ctnetlink.events_filter(subnet, network))
        except OSError as exc:
            log.warning(
                "conntrack events: the kernel refused their filter (%s): the marker reads "
                "every new entry's event and skips what it does not mark",
                exc,
            )
        dumps.setblocking(True)
        dumps.settimeout(DUMP_TIMEOUT_S)
        marker = cls(subnet, network, events, dumps)
        try:
            marker.resync()
        except OSError:
            marker.close()
            raise
        return marker

    def close(self) -> None:
        self.events.close()
        self.dumps.close()

    def fileno(self) -> int:
        """Readable when conntrack confirmed new entries (or refused a mark)."""
        return self.events.fileno()

    def wants(self, flow: ctnetlink.TcpFlow) -> bool:
        """A flow the fast path may carry: default zone, between a pod of this node and
        one of another (either may have opened it)."""
        return self._wants(flow.raw())

    def _wants(self, flow: ctnetlink.RawFlow) -> bool:
        src, dst, _sport, _dport, zone = flow
        network, netmask = self._network
        if zone != 0 or src & netmask != network or dst & netmask != network:
            return False
        subnet, submask = self._subnet
        return (src & submask == subnet) != (dst & submask == subnet)

    def on_events(self) -> int:
        """Mark the wanted flows of the pending NEW events, and count the refused marks;
        returns how many messages it read (RECVS_PER_CALL: it may have left some for
        the next call)."""
        marks: list[ctnetlink.RawFlow] = []
        refused: list[int] = []
        buf, recv_into, wants, queued = self._buf, self.events.recv_into, self._wants, self._queued
        read = 0
        while read < RECVS_PER_CALL:
            try:
                size = recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                log.warning("conntrack events overran the marker's socket: catching up")
                self._count(refused)
                self.mark(marks)
                self.resync()
                return read
            read += 1
            for flow in ctnetlink.raw_flows(buf, size, refused):
                if wants(flow):
                    marks.append(flow)
            if not queued.poll(0):
                break
        self._count(refused)
        self.mark(marks)
        return read

    def resync(self) -> int:
        """Mark every wanted flow of the table not marked yet; returns how many."""
        self._seq += 1
        self.dumps.send(ctnetlink.dump_request(self._seq))
        marks = []
        done = False
        while not done:
            for msg in ctnetlink.messages(self.dumps.recv(RECV_SIZE)):
                if msg.type == ctnetlink.NLMSG_DONE:
                    done = True
                elif msg.type == ctnetlink.NLMSG_ERROR and msg.error():
                    raise OSError(msg.error(), f"conntrack dump: {os.strerror(msg.error())}")
                elif (flow := ctnetlink.tcp_flow(msg)) and not flow.liberal and self.wants(flow):
                    marks.append(flow.raw())
        return self.mark(marks)

    def mark(self, flows: list[ctnetlink.RawFlow]) -> int:
        """Mark flows; returns how many were asked. One send() carries up to
        MARKS_PER_SEND requests: the kernel handles each message of a send in turn and
        answers, on the events socket, each one it refused (on_events counts them)."""
        for first in range(0, len(flows), MARKS_PER_SEND):
            requests = []
            for flow in flows[first : first + MARKS_PER_SEND]:
                self._seq += 1
                requests.append(ctnetlink.mark_liberal_raw(flow, self._seq))
            self.events.send(b"".join(requests))
            self.marked += len(requests)
        return len(flows)

    def _count(self, refused: list[int]) -> None:
        for err in refused:
            if err == errno.ENOENT:
                self.gone += 1
            else:
                if not self.failed:
                    log.warning("conntrack refused a flow's mark: %s", errno.errorcode.get(err))
                self.failed += 1


def serve(marker: FlowMarker, stop: threading.Event, poll_s: float = 0.2) -> None:
    """Mark flows until stop is set: for a thread of its own (the lab's nodes)."""
    with select.epoll() as ready:
        ready.register(marker.fileno(), select.EPOLLIN)
        while not stop.is_set():
            if ready.poll(poll_s):
                marker.on_events()
