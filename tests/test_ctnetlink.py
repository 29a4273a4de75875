"""ctnetlink messages (node/ctnetlink.py) and the flow marker (node/flow_marks.py).

The messages are checked against each other and against the kernel: a mark request
parses back to the flow it names, with both directions liberal; the marker, in a netns
of the test's, marks a TCP flow between its subnet and the rest of its network as
conntrack confirms it, and leaves others (loopback, within its subnet) as they are.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp import netns
from flannel_xdp.lab import process
from flannel_xdp.lab.topology import delete_netns, new_netns, new_prefix
from flannel_xdp.node import ctnetlink
from flannel_xdp.node.ctnetlink import TcpFlow
from flannel_xdp.node.flow_marks import FlowMarker
from tests.requirements import require_root_and_bcc

SUBNET, NETWORK = IPv4Network("198.18.0.0/24"), IPv4Network("198.18.0.0/16")
POD, OTHER_NODES_POD, NEIGHBOUR = "198.18.0.2", "198.18.1.2", "198.18.0.3"


def marker_for_tests() -> FlowMarker:
    """A marker whose sockets are never used: for wants()."""
    a, b = socket.socketpair()
    return FlowMarker(SUBNET, NETWORK, a, b, socket.socket())


@pytest.mark.unit
def test_a_mark_request_names_the_flow_and_both_directions():
    flow = TcpFlow(IPv4Address(POD), IPv4Address(OTHER_NODES_POD), 40000, 9000, zone=3)
    raw = ctnetlink.mark_liberal_request(flow, seq=7)
    (msg,) = ctnetlink.messages(raw)
    assert msg.type == ctnetlink.CT_MESSAGE | ctnetlink.IPCTNL_MSG_CT_NEW
    assert msg.flags == ctnetlink.NLM_F_REQUEST, "it must never create an entry"
    assert msg.seq == 7
    assert ctnetlink.tcp_flow(msg) == TcpFlow(
        flow.src, flow.dst, flow.sport, flow.dport, zone=3, liberal=True
    )


@pytest.mark.unit
def test_a_request_may_clear_the_mark():
    flow = TcpFlow(IPv4Address(POD), IPv4Address(OTHER_NODES_POD), 40000, 9000)
    (msg,) = ctnetlink.messages(ctnetlink.mark_liberal_request(flow, 1, liberal=False))
    assert ctnetlink.tcp_flow(msg) == flow


@pytest.mark.unit
def test_messages_split_a_buffer_and_refuse_a_truncated_one():
    flow = TcpFlow(IPv4Address(POD), IPv4Address(OTHER_NODES_POD), 1, 2)
    raw = ctnetlink.mark_liberal_request(flow, 1) + ctnetlink.dump_request(2)
    assert [m.seq for m in ctnetlink.messages(raw)] == [1, 2]
    with pytest.raises(ctnetlink.CtnetlinkError):
        list(ctnetlink.messages(raw[:-4]))


@pytest.mark.unit
def test_an_error_message_carries_its_errno():
    payload = struct.pack("=i", -2) + bytes(16)
    msg = ctnetlink.Message(ctnetlink.NLMSG_ERROR, 0, 1, payload)
    assert msg.error() == 2
    assert ctnetlink.Message(ctnetlink.NLMSG_ERROR, 0, 1, bytes(20)).error() == 0


@pytest.mark.unit
def test_a_flow_is_marked_when_it_joins_this_subnet_to_the_rest_of_the_network():
    m = marker_for_tests()
    try:

        def flow(src: str, dst: str, zone: int = 0) -> TcpFlow:
            return TcpFlow(IPv4Address(src), IPv4Address(dst), 1, 2, zone)

        assert m.wants(flow(POD, OTHER_NODES_POD))
        assert m.wants(flow(OTHER_NODES_POD, POD))
        assert not m.wants(flow(POD, NEIGHBOUR)), "within the node: never on the fast path"
        assert not m.wants(flow(POD, "192.0.2.1")), "outside the network"
        assert not m.wants(flow("198.51.100.1", POD))
        assert not m.wants(flow(POD, OTHER_NODES_POD, zone=1)), "the fast path looks up zone 0"
    finally:
        m.close()


@contextlib.contextmanager
def conntrack_netns() -> Iterator[str]:
    """A netns whose loopback has the test's addresses, with conntrack on (a conntrack
    match in its filter table hooks it in)."""
    ns = f"{new_prefix()}-ct"
    new_netns(ns)
    try:
        for address in (POD, OTHER_NODES_POD, NEIGHBOUR):
            process.run(ns, ["ip", "addr", "add", f"{address}/32", "dev", "lo"])
        process.run(ns, ["iptables", "-w", "-A", "INPUT", "-m", "conntrack", "--ctstate", "NEW"])
        yield ns
    finally:
        delete_netns(ns, "test")


def entries(ns: str) -> list[TcpFlow]:
    """Every TCP entry in ns."""
    with netns.entered(ns):
        return ctnetlink.tcp_entries()


def connect(ns: str, src: str, dst: str, server: socket.socket) -> socket.socket:
    with netns.entered(ns):
        c = socket.socket()
    c.bind((src, 0))
    c.connect((dst, server.getsockname()[1]))
    server.accept()[0].close()
    return c


@pytest.mark.lab
def test_the_marker_marks_the_flows_the_fast_path_may_carry_and_no_other():
    require_root_and_bcc("ip", "iptables")
    with conntrack_netns() as ns:
        with netns.entered(ns):
            server = socket.socket()
        with contextlib.closing(server):
            server.bind(("0.0.0.0", 0))
            server.listen(8)
            before = connect(ns, POD, OTHER_NODES_POD, server)  # found by the start's dump
            with netns.entered(ns):
                marker = FlowMarker.open(SUBNET, NETWORK)
            with contextlib.closing(marker), contextlib.closing(before):
                assert marker.marked == 1
                wanted = connect(ns, OTHER_NODES_POD, POD, server)
                local = connect(ns, POD, NEIGHBOUR, server)
                loopback = connect(ns, "127.0.0.1", "127.0.0.1", server)
                deadline = time.monotonic() + 5
                while marker.marked < 2 and time.monotonic() < deadline:
                    marker.on_events()
                    time.sleep(0.01)
                for s in (wanted, local, loopback):
                    s.close()
                found = {(str(f.src), str(f.dst)): f.liberal for f in entries(ns)}
                assert found[(POD, OTHER_NODES_POD)] is True
                assert found[(OTHER_NODES_POD, POD)] is True
                assert found[(POD, NEIGHBOUR)] is False
                assert found[("127.0.0.1", "127.0.0.1")] is False
                assert (marker.marked, marker.gone, marker.failed) == (2, 0, 0)


@pytest.mark.lab
def test_a_marker_whose_events_overran_catches_up_with_a_dump():
    """Events lost (the socket's buffer full) are not flows lost: the marker sees the
    overrun and marks what the table holds."""
    require_root_and_bcc("ip", "iptables")
    connections = 200
    with conntrack_netns() as ns:
        with netns.entered(ns):
            server = socket.socket()
            marker = FlowMarker.open(SUBNET, NETWORK, events_rcvbuf=1)  # the kernel's least
        with contextlib.closing(server), contextlib.closing(marker):
            server.bind((OTHER_NODES_POD, 0))
            server.listen(connections)
            opened = [connect(ns, POD, OTHER_NODES_POD, server) for _ in range(connections)]
            for s in opened:
                s.close()
            marker.on_events()
            assert marker.overruns >= 1
            found = [f for f in entries(ns) if (str(f.src), str(f.dst)) == (POD, OTHER_NODES_POD)]
            assert len(found) == connections
            assert all(f.liberal for f in found), f"{sum(not f.liberal for f in found)} unmarked"
