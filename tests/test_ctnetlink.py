"""ctnetlink messages (node/ctnetlink.py) and the flow marker (node/flow_marks.py).

The messages are checked against each other and against the kernel: a mark request
parses back to the flow it names, with both directions liberal; the marker, in a netns
of the test's, marks a TCP flow between its subnet and the rest of its network as
conntrack confirms it, and leaves others (loopback, within its subnet) as they are.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import socket
import struct
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp import netns
from flannel_xdp.lab import process
from flannel_xdp.lab.topology import delete_netns, new_netns, new_prefix
from flannel_xdp.netlink import MalformedMessage
from flannel_xdp.node import ctnetlink, flow_marks, sockfilter
from flannel_xdp.node.ctnetlink import TcpFlow
from flannel_xdp.node.flow_marks import FlowMarker
from tests.requirements import require_root_and_bcc

SUBNET, NETWORK = IPv4Network("198.18.0.0/24"), IPv4Network("198.18.0.0/16")
POD, OTHER_NODES_POD, NEIGHBOUR = "198.18.0.2", "198.18.1.2", "198.18.0.3"


def marker_for_tests() -> FlowMarker:
    """A marker whose sockets are never used: for wants()."""
    return FlowMarker(SUBNET, NETWORK, socket.socket(), socket.socket())


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
    with pytest.raises(MalformedMessage):
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


# A NEW event as kernel 6.18 sent it for 198.18.0.2:57757 -> 198.18.1.2:57415 (the
# original and reply tuples, id, status, timeout, TCP protoinfo).
EVENT = bytes.fromhex(
    "02000000340001801400018008000100c612000208000200c61201021c0002800500010006000000"
    "06000200e19d000006000300e0470000340002801400018008000100c612010208000200c6120002"
    "1c000280050001000600000006000200e047000006000300e19d000008000c004185d3ae08000300"
    "000000080800070000000078300004802c0001800500010001000000050002000a00000005000300"
    "0000000006000400030000000600050000000000"
)
ZONE_AT = 4 + 52 + 52  # after the nfgenmsg and both tuples
EVENT_FLOW = TcpFlow(IPv4Address(POD), IPv4Address(OTHER_NODES_POD), 57757, 57415)


def ct_message(payload: bytes, seq: int = 0) -> bytes:
    """payload (nfgenmsg and attributes) as a conntrack NEW message."""
    mtype = ctnetlink.CT_MESSAGE | ctnetlink.IPCTNL_MSG_CT_NEW
    return struct.pack("=IHHII", 16 + len(payload), mtype, 0, seq, 0) + payload


def raw_flows(buf: bytes) -> list[ctnetlink.RawFlow]:
    refused: list[int] = []
    flows = list(ctnetlink.raw_flows(buf, len(buf), refused))
    assert not refused
    return flows


def without_nested_flags(payload: bytes) -> bytes:
    """The same attributes with NLA_F_NESTED cleared in every header (as older kernels
    send them), walking the nests the event's layout has."""
    out = bytearray(payload)

    def walk(pos: int, end: int, depth: int) -> None:
        while pos + 4 <= end:
            length, atype = struct.unpack_from("=HH", out, pos)
            if atype & ctnetlink.NLA_F_NESTED:
                struct.pack_into("=HH", out, pos, length, atype & ~ctnetlink.NLA_F_NESTED)
                walk(pos + 4, pos + length, depth + 1)
            pos += (length + 3) & ~3

    walk(4, len(out), 0)
    return bytes(out)


@pytest.mark.unit
def test_an_event_parses_to_its_flow_by_either_layout(monkeypatch):
    (msg,) = ctnetlink.messages(ct_message(EVENT))
    assert ctnetlink.tcp_flow(msg) == EVENT_FLOW
    assert raw_flows(ct_message(EVENT)) == [EVENT_FLOW.raw()]
    other = ct_message(without_nested_flags(EVENT))
    assert other != ct_message(EVENT)
    assert raw_flows(other) == [EVENT_FLOW.raw()], "the walk's answer"
    zone = struct.pack("=HH", 6, ctnetlink.CTA_ZONE) + struct.pack("!H", 3) + bytes(2)
    zoned = EVENT[:ZONE_AT] + zone + EVENT[ZONE_AT:]  # where the kernel puts it
    for layout in (zoned, without_nested_flags(zoned)):
        assert raw_flows(ct_message(layout)) == [(*EVENT_FLOW.raw()[:4], 3)]
    with monkeypatch.context() as m:
        m.setattr(ctnetlink, "_attrs", None)
        assert raw_flows(ct_message(EVENT)) == [EVENT_FLOW.raw()], "the kernel's, in one read"
    reused = bytearray(ct_message(EVENT)) + bytes(range(64))  # a longer event's leftovers
    assert list(ctnetlink.raw_flows(reused, len(ct_message(EVENT)), [])) == [EVENT_FLOW.raw()]


@pytest.mark.unit
def test_events_of_other_protocols_are_skipped_and_a_broken_one_refused():
    udp = bytearray(EVENT)
    udp[36] = socket.IPPROTO_UDP  # the original tuple's CTA_PROTO_NUM
    other_family = bytes([socket.AF_INET6]) + EVENT[1:]
    buf = ct_message(bytes(udp), 1) + ct_message(other_family, 2) + ct_message(EVENT, 3)
    assert raw_flows(buf) == [EVENT_FLOW.raw()]
    with pytest.raises(ctnetlink.CtnetlinkError):
        raw_flows(ct_message(EVENT[:40]))  # within the original tuple
    no_ports = bytearray(without_nested_flags(EVENT))
    no_ports[50] = 9  # the original tuple's CTA_PROTO_DST_PORT: another type
    with pytest.raises(ctnetlink.CtnetlinkError, match="attribute 3"):
        raw_flows(ct_message(bytes(no_ports)))


@pytest.mark.unit
def test_a_dumped_entry_says_whether_both_directions_are_liberal():
    (request,) = ctnetlink.messages(ctnetlink.mark_liberal_request(EVENT_FLOW, 1))
    assert ctnetlink.tcp_flow(request).liberal
    one_way = bytearray(request.payload)
    one_way[-4] = 0  # the flags of CTA_PROTOINFO_TCP_FLAGS_REPLY, the last attribute
    assert not ctnetlink.tcp_flow(ctnetlink.Message(request.type, 0, 1, bytes(one_way))).liberal


@pytest.mark.unit
def test_a_mark_names_a_zone_only_where_it_is_not_the_default():
    plain = ctnetlink.mark_liberal_request(EVENT_FLOW, 1)
    zoned = ctnetlink.mark_liberal_request(
        TcpFlow(EVENT_FLOW.src, EVENT_FLOW.dst, EVENT_FLOW.sport, EVENT_FLOW.dport, zone=3), 1
    )
    assert len(plain) == 96
    assert zoned[: len(plain)][4:] == plain[4:] and len(zoned) == len(plain) + 8


def error_message(errno_: int, seq: int) -> bytes:
    """The kernel's answer to a request (errno_ 0: an acknowledgement)."""
    payload = struct.pack("=i", -errno_) + bytes(16)
    return struct.pack("=IHHII", 16 + len(payload), ctnetlink.NLMSG_ERROR, 0, seq, 0) + payload


@pytest.mark.unit
def test_refusals_come_among_the_events():
    buf = error_message(errno.ENOENT, 1) + ct_message(EVENT) + error_message(0, 2)
    refused: list[int] = []
    assert list(ctnetlink.raw_flows(buf, len(buf), refused)) == [EVENT_FLOW.raw()]
    assert refused == [errno.ENOENT], "an acknowledgement is no refusal"


@pytest.mark.unit
def test_marks_go_in_batches_and_the_refusals_are_counted():
    pod, other = int(IPv4Address(POD)), int(IPv4Address(OTHER_NODES_POD))
    flows = [(pod, other, port, 80, 0) for port in range(1000, 1130)]
    events, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    events.setblocking(False)
    marker = FlowMarker(SUBNET, NETWORK, events, socket.socket())
    try:
        assert marker.mark(flows) == 130
        sent = [kernel.recv(1 << 16) for _ in range(3)]
        assert [len(b) // 96 for b in sent] == [64, 64, 2]
        parsed = [m for b in sent for m in ctnetlink.messages(b)]
        assert [m.seq for m in parsed] == list(range(1, 131))
        assert [ctnetlink.tcp_flow(m).sport for m in parsed] == list(range(1000, 1130))
        for err, seq in ((errno.ENOENT, 1), (errno.EPERM, 2), (0, 3)):
            kernel.send(error_message(err, seq))
        kernel.send(ct_message(EVENT))
        assert marker.on_events() == 4
        assert (marker.marked, marker.gone, marker.failed) == (131, 1, 1), "and the event's"
    finally:
        marker.close()
        kernel.close()


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


@contextlib.contextmanager
def marker_after_connections(
    connections: int, events_rcvbuf: int = flow_marks.EVENTS_RCVBUF
) -> Iterator[tuple[str, FlowMarker]]:
    """A marker in a conntrack netns, then that many connections from POD to
    OTHER_NODES_POD opened and closed, their events queued and not read yet."""
    with conntrack_netns() as ns:
        with netns.entered(ns):
            server = socket.socket()
            marker = FlowMarker.open(SUBNET, NETWORK, events_rcvbuf=events_rcvbuf)
        with contextlib.closing(server), contextlib.closing(marker):
            server.bind((OTHER_NODES_POD, 0))
            server.listen(connections)
            opened = [connect(ns, POD, OTHER_NODES_POD, server) for _ in range(connections)]
            for s in opened:
                s.close()
            yield ns, marker


@pytest.mark.lab
def test_a_marker_whose_events_overran_catches_up_with_a_dump():
    """Events lost (the socket's buffer full) are not flows lost: the marker sees the
    overrun and marks what the table holds."""
    require_root_and_bcc("ip", "iptables")
    connections = 200
    # events_rcvbuf=1: the kernel's least
    with marker_after_connections(connections, events_rcvbuf=1) as (ns, marker):
        marker.on_events()
        assert marker.overruns >= 1
        found = [f for f in entries(ns) if (str(f.src), str(f.dst)) == (POD, OTHER_NODES_POD)]
        assert len(found) == connections
        assert all(f.liberal for f in found), f"{sum(not f.liberal for f in found)} unmarked"


@pytest.mark.lab
def test_the_kernel_takes_every_mark_of_a_send_past_a_refused_one():
    """A send carries many marks: one for an entry that has gone is refused (ENOENT)
    and the kernel goes on with the rest."""
    require_root_and_bcc("ip", "iptables")
    connections = 100
    with marker_after_connections(connections) as (ns, marker):
        flows = [f.raw() for f in entries(ns) if str(f.src) == POD and not f.liberal]
        assert len(flows) == connections
        gone = (int(IPv4Address(POD)), int(IPv4Address(OTHER_NODES_POD)), 1, 1, 0)
        assert marker.mark([gone, *flows[:50], gone, *flows[50:]]) == connections + 2
        marker.on_events()  # the refusals, and the events of the connections
        assert (marker.gone, marker.failed) == (2, 0)
        found = [f for f in entries(ns) if str(f.src) == POD]
        assert len(found) == connections
        assert all(f.liberal for f in found), f"{sum(not f.liberal for f in found)} unmarked"


@pytest.mark.lab
def test_a_flood_of_events_is_read_in_bounded_turns():
    """One on_events() reads at most RECVS_PER_CALL events, says that more are left, and
    the next call marks the rest."""
    require_root_and_bcc("ip", "iptables")
    connections = flow_marks.RECVS_PER_CALL + 44
    with marker_after_connections(connections) as (ns, marker):
        assert marker.on_events() == flow_marks.RECVS_PER_CALL
        assert marker.marked == flow_marks.RECVS_PER_CALL
        assert marker.on_events() == connections - flow_marks.RECVS_PER_CALL
        assert marker.on_events() == 0
        assert (marker.marked, marker.gone, marker.failed) == (connections, 0, 0)
        found = [f for f in entries(ns) if str(f.src) == POD]
        assert len(found) == connections and all(f.liberal for f in found)


@pytest.mark.lab
def test_the_kernel_drops_the_events_of_flows_the_marker_would_not_mark(caplog):
    """Its filter (ctnetlink.events_filter) keeps UDP flows and TCP flows within the
    node, or leaving the network, off the marker's socket: reading finds nothing until a
    flow it marks comes, which it reads and marks."""
    require_root_and_bcc("ip", "iptables")
    with conntrack_netns() as ns:
        with netns.entered(ns):
            server = socket.socket()
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            marker = FlowMarker.open(SUBNET, NETWORK)
        with contextlib.closing(server), contextlib.closing(udp), contextlib.closing(marker):
            assert "refused their filter" not in caplog.text
            server.bind(("0.0.0.0", 0))
            server.listen(64)
            udp.bind((OTHER_NODES_POD, 0))
            unwanted = [connect(ns, POD, NEIGHBOUR, server) for _ in range(20)]
            unwanted += [connect(ns, "127.0.0.1", "127.0.0.1", server) for _ in range(20)]
            for _ in range(20):  # UDP between the same pods as the wanted flow below
                with netns.entered(ns):
                    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                with contextlib.closing(sender):
                    sender.bind((POD, 0))
                    sender.sendto(b"x", udp.getsockname())
            udp_entries = [f for f in entries_of(ns, "udp") if f.startswith(f"src={POD} ")]
            assert len(udp_entries) == 20, udp_entries
            assert marker.on_events() == 0, "an event of a flow it does not mark was read"
            wanted = connect(ns, POD, OTHER_NODES_POD, server)
            deadline = time.monotonic() + 5
            read = 0
            while not read and time.monotonic() < deadline:
                read = marker.on_events()
                time.sleep(0.01)
            for s in (*unwanted, wanted):
                s.close()
            assert read == 1
            assert (marker.marked, marker.gone, marker.failed) == (1, 0, 0)


def entries_of(ns: str, proto: str) -> list[str]:
    """conntrack -L's lines for proto in ns, from the first address on."""
    out = process.run(ns, ["conntrack", "-L", "-p", proto], check=False).stdout
    return [line[line.index("src=") :] for line in out.splitlines() if "src=" in line]


@pytest.mark.unit
def test_a_filter_program_jumps_forward_to_named_steps_only():
    ret, keep = sockfilter.RET_K, sockfilter.KEEP_ALL
    program = sockfilter.assemble(
        [
            sockfilter.Step(sockfilter.LD_W_LEN),
            sockfilter.Step(sockfilter.JGE_K, 20, jt="keep", jf="drop"),
            sockfilter.Step(ret, keep, label="keep"),
            sockfilter.Step(ret, sockfilter.DROP, label="drop"),
        ]
    )
    assert struct.unpack("=HBBI", program[8:16]) == (sockfilter.JGE_K, 0, 1, 20)
    with pytest.raises(sockfilter.FilterError, match="no step"):
        sockfilter.assemble([sockfilter.Step(sockfilter.JEQ_K, 1, jf="nowhere")])
    backward = [
        sockfilter.Step(ret, keep, label="start"),
        sockfilter.Step(sockfilter.JEQ_K, jt="start"),
    ]
    with pytest.raises(sockfilter.FilterError, match="steps on"):
        sockfilter.assemble(backward)


@pytest.mark.unit
def test_the_events_filter_reads_a_real_event_where_the_parser_does():
    """Each attribute header events_filter() compares is the real event's at that place,
    and it loads the protocol and both addresses from where they are."""
    program = ctnetlink.events_filter(SUBNET, NETWORK)
    steps = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    message = ct_message(EVENT)
    word = {
        k: struct.unpack_from("!I", message, k)[0] for c, *_, k in steps if c == sockfilter.LD_W_ABS
    }
    compared = [
        (load[3], test[3])
        for load, test in itertools.pairwise(steps)
        if load[0] == sockfilter.LD_W_ABS and test[0] == sockfilter.JEQ_K
    ]  # the headers: an address is masked between its load and its test
    assert len(compared) == 9
    assert all(word[at] == want for at, want in compared), compared
    assert {int(IPv4Address(POD)), int(IPv4Address(OTHER_NODES_POD))} <= set(word.values())
    protocol_at = [k for c, *_, k in steps if c == sockfilter.LD_B_ABS][-1]
    assert message[protocol_at] == socket.IPPROTO_TCP
