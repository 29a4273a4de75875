"""The fast path and conntrack on a node as kube-proxy leaves it: window checks on
(net.netfilter.nf_conntrack_tcp_be_liberal=0) and kube-proxy's `--ctstate INVALID -j
DROP` in KUBE-FORWARD, with counting rules before it (INVALID packets, RST segments).

What must hold: TCP streams both ways at once, opened and closed again and again, and
a stream moved between the fast path and the stack mid-flow, arrive byte for byte with
no INVALID packet and no RST (the nodes mark the pods' TCP flows, node/flow_marks.py,
and only marked flows take the fast path); a UDP flow and a TCP stream that outlive
their conntrack timeout keep one entry (bpf/conntrack.h refreshes it); a FORWARD rule
still drops a new flow, and `conntrack -D` ends an established one at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from flannel_xdp import netns
from flannel_xdp.backend import Backend
from flannel_xdp.lab import Cluster, ClusterSpec, Node, Pod, process
from flannel_xdp.loader import pod_ports
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.maps.views import NodeConfigMap
from flannel_xdp.node import conntrack, ctnetlink
from tests.fast_path_support import (
    SERVER_PORT,
    echo_server,
    tcp_connection,
    udp_socket,
    wait_out_flow_cache,
)
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.lab

# kube-proxy's iptables proxier (pkg/proxy/iptables/proxier.go, v1.36): FORWARD jumps
# first (prepended) to KUBE-FORWARD, whose first rule drops what conntrack calls INVALID,
# installed whenever nf_conntrack_tcp_be_liberal is 0 (with an nfacct match where nfacct
# works, which only counts).
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_JUMP = ["-m", "comment", "--comment", "kubernetes forwarding rules", "-j", KUBE_FORWARD]
INVALID = ["-m", "conntrack", "--ctstate", "INVALID"]
RST = ["-p", "tcp", "--tcp-flags", "RST", "RST"]
COUNTED = {"invalid": 1, "rst": 2}  # KUBE-FORWARD's counting rules, by line number

CYCLES = 20  # connections opened, streamed both ways at once, closed
CYCLE_S = 1.5  # each: 30 s of streaming in all
MOVING_S = 8.0  # the stream moved between the fast path and the stack
MOVE_EVERY_S = 0.4
# The conntrack timeouts a flow must outlive. The program refreshes an entry once less
# than half of it is left, so a flow outlives a pause of half of it (2 s here): longer
# than the test process is ever descheduled on a loaded machine.
SHORT_TIMEOUT_S = 4
OUTLIVE_S = 3 * SHORT_TIMEOUT_S
BLOCK = 1 << 16
FAST_SEND = ("vxlan", "fast_send")
SENT = ("vxlan", "encap")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_root_and_bcc("ip", "iptables", "conntrack")
    spec = ClusterSpec.uniform(
        nodes=2,
        pods=1,
        backend=Backend.VXLAN,
        ingress_hook=IngressHook.KERNEL,
        udp_fast_path=True,
        tcp_fast_path=True,
        ip_masq=True,
    )
    with Cluster(spec) as c:
        for node in c.nodes:
            with netns.entered(node.netns):
                assert conntrack.tcp_be_liberal() is False, "conntrack must check windows"
            kube_proxy_rules(node)
        yield c


def kube_proxy_rules(node: Node) -> None:
    """kube-proxy's forwarding chain, with the counting rules before its drop."""
    for argv in (
        ["-N", KUBE_FORWARD],
        ["-I", "FORWARD", "1", *KUBE_JUMP],
        ["-A", KUBE_FORWARD, *INVALID],
        ["-A", KUBE_FORWARD, *RST],
        ["-A", KUBE_FORWARD, *INVALID, "-j", "DROP"],
    ):
        process.run(node.netns, ["iptables", "-w", *argv])


def counted(cluster: Cluster) -> dict[str, int]:
    """Packets the counting rules saw on all nodes so far: INVALID ones, RST segments."""
    total = dict.fromkeys(COUNTED, 0)
    for node in cluster.nodes:
        out = process.run(
            node.netns, ["iptables", "-w", "-L", KUBE_FORWARD, "-v", "-x", "-n", "--line-numbers"]
        ).stdout
        lines = {
            int(f[0]): int(f[1])
            for f in (line.split() for line in out.splitlines())
            if f and f[0].isdigit()
        }
        for what, number in COUNTED.items():
            total[what] += lines[number]
    return total


@contextlib.contextmanager
def no_invalid_and_no_rst(cluster: Cluster) -> Iterator[None]:
    before = counted(cluster)
    yield
    after = counted(cluster)
    assert {k: after[k] - before[k] for k in COUNTED} == dict.fromkeys(COUNTED, 0)


def fast_bytes(cluster: Cluster, before: list) -> list[int]:
    """fast_send bytes of each node since before."""
    return [
        cluster.counters(n).since(b).traffic.get(FAST_SEND, (0, 0))[1]
        for n, b in zip(cluster.nodes, before, strict=True)
    ]


def duplex(a: Pod, b: Pod, seconds: float) -> int:
    """One TCP connection from a to b; both ends send for seconds at once, then close.
    Every byte must arrive, both ways (length and digest). Returns a's port."""
    results: dict[str, tuple[int, bytes]] = {}
    errors: list[BaseException] = []
    base = os.urandom(BLOCK)

    def send(sock: socket.socket, key: str) -> None:
        digest, n, i = hashlib.sha256(), 0, 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            block = struct.pack("<Q", i) + base[8:]  # each block differs: order counts
            sock.sendall(block)
            digest.update(block)
            n, i = n + len(block), i + 1
        sock.shutdown(socket.SHUT_WR)
        results[key] = (n, digest.digest())

    def receive(sock: socket.socket, key: str) -> None:
        digest, n = hashlib.sha256(), 0
        while chunk := sock.recv(1 << 18):
            digest.update(chunk)
            n += len(chunk)
        results[key] = (n, digest.digest())

    def guarded(fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # reported below, with the socket's name
            errors.append(exc)

    with tcp_connection(a, b) as (cli, conn):
        for s in (cli, conn):
            s.settimeout(seconds + 10)
        threads = [
            threading.Thread(target=guarded, args=(send, cli, "a->b sent")),
            threading.Thread(target=guarded, args=(receive, conn, "a->b got")),
            threading.Thread(target=guarded, args=(send, conn, "b->a sent")),
            threading.Thread(target=guarded, args=(receive, cli, "b->a got")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 15)
        port = cli.getsockname()[1]
    assert not errors, errors
    assert results["a->b got"] == results["a->b sent"], "a->b lost or changed bytes"
    assert results["b->a got"] == results["b->a sent"], "b->a lost or changed bytes"
    assert results["a->b sent"][0] > 0 and results["b->a sent"][0] > 0
    return port


def test_tcp_streams_both_ways_opened_and_closed_again_and_again(cluster):
    """CYCLES connections of CYCLE_S each, both ways at once: no INVALID packet, no RST,
    every byte, and most of them on the fast path."""
    a, b = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    before = [cluster.counters(n) for n in cluster.nodes]
    stack_before = cluster.counters(cluster.nodes[0])
    with no_invalid_and_no_rst(cluster):
        for _ in range(CYCLES):
            duplex(a, b, CYCLE_S)
    fast = fast_bytes(cluster, before)
    sent = cluster.counters(cluster.nodes[0]).since(stack_before).traffic.get(SENT, (0, 0))[1]
    assert fast[0] >= sent * 0.5, f"{fast[0]} of {sent} B took the fast path from node 0"
    assert fast[1] > 0


def receive_exactly(sock: socket.socket, n: int) -> bytes:
    """n bytes (MSG_WAITALL does not wait on a socket with a timeout)."""
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"the peer closed after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


def flow_of(cli: socket.socket) -> ctnetlink.TcpFlow:
    src, sport = cli.getsockname()
    dst, dport = cli.getpeername()
    return ctnetlink.TcpFlow(IPv4Address(src), IPv4Address(dst), sport, dport)


def marked(cluster: Cluster, flow: ctnetlink.TcpFlow) -> list[bool | None]:
    """Whether each node's entry of flow is marked (None: no entry)."""
    key = (flow.src, flow.dst, flow.sport, flow.dport)
    found = []
    for n in cluster.nodes:
        with netns.entered(n.netns):
            entries = ctnetlink.tcp_entries()
        found.append(
            next((f.liberal for f in entries if (f.src, f.dst, f.sport, f.dport) == key), None)
        )
    return found


def test_tcp_of_a_flow_whose_mark_is_cleared_takes_the_stack(cluster):
    """Only marked flows take the fast path: one whose mark is cleared on both nodes
    goes through the stack, where conntrack checks its windows, and arrives whole."""
    a, b = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    with tcp_connection(a, b) as (cli, conn):
        flow = flow_of(cli)
        deadline = time.monotonic() + 5
        while marked(cluster, flow) != [True, True] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marked(cluster, flow) == [True, True], "the nodes did not mark the flow"
        for node in cluster.nodes:
            with netns.entered(node.netns):
                sock = ctnetlink.open_socket()
            with contextlib.closing(sock):
                sock.send(ctnetlink.mark_liberal_request(flow, 1, liberal=False))
        assert marked(cluster, flow) == [False, False]
        wait_out_flow_cache()
        before = [cluster.counters(n) for n in cluster.nodes]
        with no_invalid_and_no_rst(cluster):
            data = os.urandom(4 << 20)
            sender = threading.Thread(target=cli.sendall, args=(data,))
            sender.start()
            got = receive_exactly(conn, len(data))
            sender.join(10)
        assert got == data
    assert fast_bytes(cluster, before) == [0, 0]


def move_between_paths(cluster: Cluster, stop: threading.Event) -> None:
    """Until stop: take the sending side off node 0's pod and TCP off node 1's fast
    path (as a pod scan that loses the pod, or a restart, would), then put them back."""
    sender, receiver = cluster.nodes
    ports = [p.host_veth for p in sender.pods]
    with netns.entered(sender.netns):
        while not stop.is_set():
            pod_ports.detach_pod_ports(sender.bpffs)
            with NodeConfigMap(PinDir(receiver.bpffs).maps) as m:
                m.set_tcp_fast_path(False)
            stop.wait(MOVE_EVERY_S)
            pod_ports.ensure_pod_ports(sender.bpffs, ports)
            with NodeConfigMap(PinDir(receiver.bpffs).maps) as m:
                m.set_tcp_fast_path(True)
            stop.wait(MOVE_EVERY_S)


def test_a_stream_moved_between_the_fast_path_and_the_stack_mid_flow(cluster):
    a, b = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    stop = threading.Event()
    mover = threading.Thread(target=move_between_paths, args=(cluster, stop))
    before = [cluster.counters(n) for n in cluster.nodes]
    with no_invalid_and_no_rst(cluster):
        mover.start()
        try:
            duplex(a, b, MOVING_S)
        finally:
            stop.set()
            mover.join(10)
    node0 = cluster.counters(cluster.nodes[0]).since(before[0]).traffic
    fast, sent = node0.get(FAST_SEND, (0, 0))[1], node0.get(SENT, (0, 0))[1]
    assert 0 < fast < sent * 0.9, f"{fast} of {sent} B on the fast path: the stream did not move"


@contextlib.contextmanager
def sysctls(cluster: Cluster, values: dict[str, str]) -> Iterator[None]:
    """values in every node's netns, for the block."""
    held = []
    for node in cluster.nodes:
        with netns.entered(node.netns):
            for name, value in values.items():
                path = conntrack.sysctl_path(name)
                with open(path) as f:
                    held.append((node.netns, path, f.read()))
                with open(path, "w") as f:
                    f.write(value)
    try:
        yield
    finally:
        for ns, path, value in held:
            with netns.entered(ns), open(path, "w") as f:
                f.write(value)


def entry_ids(cluster: Cluster, protocol: str, sport: int, context: str = "") -> list[str]:
    """The id of the conntrack entry of the flow from sport, on each node (context: what a
    failure should also say)."""
    ids = []
    for node in cluster.nodes:
        out = process.run(
            node.netns,
            ["conntrack", "-L", "-p", protocol, "--orig-port-src", str(sport), "-o", "id"],
        ).stdout
        found = re.findall(r"\bid=(\d+)", out)
        assert len(found) == 1, f"{node.netns}: {out!r} {context}"
        ids.append(found[0])
    return ids


def test_a_udp_flow_outliving_its_conntrack_timeout_keeps_its_entry(cluster):
    a, b = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    short = str(SHORT_TIMEOUT_S)
    timeouts = {
        "net.netfilter.nf_conntrack_udp_timeout": short,
        "net.netfilter.nf_conntrack_udp_timeout_stream": short,
    }
    with sysctls(cluster, timeouts), echo_server(b), udp_socket(a) as s:
        s.connect((str(b.ip), SERVER_PORT))
        s.send(b"first")
        assert s.recv(2048) == b"first"
        sport = s.getsockname()[1]
        first = entry_ids(cluster, "udp", sport)
        before = [cluster.counters(n) for n in cluster.nodes]
        deadline, sent, pause = time.monotonic() + OUTLIVE_S, 0, 0.0
        while (start := time.monotonic()) < deadline:
            payload = b"datagram %06d" % sent
            s.send(payload)
            assert s.recv(2048) == payload
            sent += 1
            time.sleep(0.02)
            pause = max(pause, time.monotonic() - start)
        last = entry_ids(cluster, "udp", sport, f"the longest exchange took {pause:.2f} s")
        fast = [
            cluster.counters(n).since(b_).traffic.get(FAST_SEND, (0, 0))[0]
            for n, b_ in zip(cluster.nodes, before, strict=True)
        ]
    assert min(fast) >= sent - 5, f"{fast} of {sent} datagrams took the fast path"
    assert last == first, "conntrack made a new entry mid-flow"


def test_a_tcp_stream_outliving_its_conntrack_timeout_keeps_its_entry(cluster):
    a, b = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    timeout = {"net.netfilter.nf_conntrack_tcp_timeout_established": str(SHORT_TIMEOUT_S)}
    with sysctls(cluster, timeout), tcp_connection(a, b) as (cli, conn):
        cli.send(b"hello")
        assert conn.recv(16) == b"hello"
        sport = cli.getsockname()[1]
        first = entry_ids(cluster, "tcp", sport)
        before = [cluster.counters(n) for n in cluster.nodes]
        deadline = time.monotonic() + OUTLIVE_S
        while time.monotonic() < deadline:
            for _ in range(16):
                cli.sendall(b"x" * 1000)
                assert receive_exactly(conn, 1000) == b"x" * 1000
            time.sleep(0.05)
        last = entry_ids(cluster, "tcp", sport)
        fast = fast_bytes(cluster, before)
    assert fast[0] > 0, "the stream did not take the fast path"
    assert last == first, "conntrack made a new entry mid-stream"


def forward_drop(node: Node, a: Pod, b: Pod, protocol: str) -> list[str]:
    return ["FORWARD", "-s", str(a.ip), "-d", str(b.ip), "-p", protocol, "-j", "DROP"]


@contextlib.contextmanager
def rule(node: Node, spec: list[str]) -> Iterator[None]:
    process.run(node.netns, ["iptables", "-w", "-I", *spec[:1], "1", *spec[1:]])
    try:
        yield
    finally:
        process.run(node.netns, ["iptables", "-w", "-D", *spec])


def test_a_forward_rule_drops_a_new_flow(cluster):
    node = cluster.nodes[0]
    a, b = node.pods[0], cluster.nodes[1].pods[0]
    with netns.entered(a.netns):
        sock = socket.socket()
    with rule(node, forward_drop(node, a, b, "tcp")), contextlib.closing(sock):
        sock.settimeout(2)
        sock.bind((str(a.ip), 0))
        with pytest.raises(TimeoutError):
            sock.connect((str(b.ip), SERVER_PORT))
    with rule(node, forward_drop(node, a, b, "udp")), echo_server(b), udp_socket(a) as s:
        s.settimeout(1)
        s.connect((str(b.ip), SERVER_PORT))
        s.send(b"dropped")
        with pytest.raises(TimeoutError):
            s.recv(2048)


def test_an_established_flow_outlasts_a_new_rule_until_conntrack_d(cluster):
    """The rule is not applied to an established flow's fast-path packets: it flows on;
    deleting its entry (`conntrack -D`) sends its next packet through the stack, where
    the rule drops it."""
    node = cluster.nodes[0]
    a, b = node.pods[0], cluster.nodes[1].pods[0]
    with echo_server(b), udp_socket(a) as s:
        s.settimeout(1)
        s.connect((str(b.ip), SERVER_PORT))

        def round_trip(payload: bytes) -> None:
            s.send(payload)
            assert s.recv(2048) == payload

        round_trip(b"confirm")
        sport = s.getsockname()[1]
        with rule(node, forward_drop(node, a, b, "udp")):
            for i in range(50):
                round_trip(b"still flowing %d" % i)
                time.sleep(0.01)
            process.run(node.netns, ["conntrack", "-D", "-p", "udp", "--orig-port-src", str(sport)])
            time.sleep(0.01)  # past FLOW_CACHE_NS
            s.send(b"after conntrack -D")
            with pytest.raises(TimeoutError):
                s.recv(2048)
