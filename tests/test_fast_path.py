"""The fast path (bpf/fastpath.h) on two-node labs, vxlan (kernel hook) and host-gw
(tc hook), with flanneld's iptables rules (so conntrack runs in the node netns, as on
any Kubernetes node), for UDP and (FAST_TCP, of flows each node marked in conntrack:
node/flow_marks.py) TCP.

What must hold: UDP of a flow conntrack has confirmed un-NATed skips the stack on both
nodes (counted as fast_send on the sender, fast_deliver on the receiver, every datagram
delivered intact): sent from the pod's veth end to the peer, delivered straight into the
pod's netns when local_pods knows the pod, through cni0 when it does not. A flow NATed
on either node never does, in either direction (the stack must undo the NAT, or the
client's connected socket drops the replies). A TCP stream's segments do, aggregates
whole, once conntrack has seen its handshake, but its SYN, FIN and RST never (conntrack
follows its state), and none while FAST_TCP is off. (Under kube-proxy's rules and
conntrack's window checks: test_fast_path_conntrack.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from flannel_xdp import defaults, netns
from flannel_xdp.agent import local_pods
from flannel_xdp.backend import Backend
from flannel_xdp.bench.progcost import TC_ACT_OK, TC_ACT_REDIRECT, skb_ctx_on
from flannel_xdp.lab import (
    Cluster,
    ClusterSpec,
    Node,
    Pod,
    frames,
    process,
)
from flannel_xdp.lab.topology import CNI_BRIDGE, UNDERLAY_IFNAME, link_index
from flannel_xdp.loader import libbpf, pod_ports
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.loader.programs import POD_INGRESS
from flannel_xdp.maps.views import LocalPodsMap, NodeConfigMap
from tests.fast_path_support import (
    DATAGRAMS,
    RCVBUF,
    SERVER_PORT,
    SO_RCVBUFFORCE,
    STREAM,
    echo_server,
    send_and_receive,
    tcp_connection,
    tcp_stream,
    udp_socket,
    veth_tx_packets,
    wait_out_flow_cache,
)
from tests.node_support import someone_elses_filter, someone_elses_tcx
from tests.pod_ports_support import pod_ports_attached
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.lab

SERVICE_IP, SERVICE_PORT = "198.19.0.53", 53  # a "Service" DNATed on the client's node
# Client ports of the DNATed flows, outside the ephemeral range: their conntrack entries
# outlive their tests, and a later flow from the same port to SERVER_PORT would clash
# with their reply tuple, get its source port remapped (SNAT) and rightly stay off the
# fast path.
NATED_SPORTS = (20053, 20054, 20055, 20056)
# conntrack's TCP states once a FIN has gone through it (nf_conntrack_proto_tcp.c)
CLOSING = {"FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE"}
# Segments a stream may send before its node has marked its flow: the lab's markers are
# threads of the test's process, so a busy test delays them (node/flow_marks.py).
BEFORE_MARKED = 20
# linux/in.h (not in Python 3.11): DF on every datagram, whatever the route's path MTU
IP_MTU_DISCOVER, IP_PMTUDISC_PROBE = 10, 3
# The hook each backend's fast path is built into (datapath.udp_fast_path_fits).
HOOKS = {Backend.VXLAN: IngressHook.KERNEL, Backend.HOST_GW: IngressHook.TC}
# The counters (direction label per backend) of a packet sent and of one received.
SENT = {Backend.VXLAN: "encap", Backend.HOST_GW: "forward"}
RECEIVED = {Backend.VXLAN: "decap", Backend.HOST_GW: "deliver"}


@pytest.fixture(scope="module", params=list(HOOKS), ids=lambda b: b.value)
def cluster(request) -> Iterator[Cluster]:
    require_root_and_bcc("ip", "iptables")
    spec = ClusterSpec.uniform(
        nodes=2,
        pods=1,
        backend=request.param,
        ingress_hook=HOOKS[request.param],
        udp_fast_path=True,
        tcp_fast_path=True,
        ip_masq=True,
    )
    with Cluster(spec) as c:
        yield c


@contextlib.contextmanager
def on_one_cpu() -> Iterator[None]:
    """Keep this thread on one CPU, so that test runs share that CPU's kept decisions."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


def packets(cluster: Cluster, node_index: int, before, direction: str) -> int:
    """Packets counted since before under the cluster's backend and this direction:
    fast_send, fast_deliver, sent (encap/forward) or received (decap/deliver)."""
    backend = cluster.spec.backend
    label = {"sent": SENT[backend], "received": RECEIVED[backend]}.get(direction, direction)
    node = cluster.nodes[node_index]
    return cluster.counters(node).since(before).traffic.get((backend.value, label), (0, 0))[0]


def exchange(client: Pod, sport: int, dst: tuple[str, int], count: int) -> list[bytes]:
    """count request/reply round trips over a connected socket; the replies."""
    replies = []
    with udp_socket(client, sport) as s:
        s.connect(dst)
        for i in range(count):
            s.send(b"req %05d " % i + bytes(50))
            replies.append(s.recv(2048))
    return replies


@contextlib.contextmanager
def local_pods_emptied(cluster: Cluster, node: Node) -> Iterator[None]:
    with LocalPodsMap(PinDir(node.bpffs).maps) as m:
        held = list(m.pods().values())
        m.apply([])
    try:
        yield
    finally:
        with LocalPodsMap(PinDir(node.bpffs).maps) as m:
            m.apply(held)


@contextlib.contextmanager
def dnat(node: Node, protocol: str, dst: str, dport: int, to: Pod) -> Iterator[None]:
    """A DNAT of dst:dport to the pod's SERVER_PORT in the node's PREROUTING (a Service on
    the client's node, a hostPort on the server's), for the block."""
    match = ["PREROUTING", "-d", dst, "-p", protocol, "--dport", str(dport)]
    rule = [*match, "-j", "DNAT", "--to-destination", f"{to.ip}:{SERVER_PORT}"]
    process.run(node.netns, ["iptables", "-w", "-t", "nat", "-A", *rule])
    try:
        yield
    finally:
        process.run(node.netns, ["iptables", "-w", "-t", "nat", "-D", *rule])


def test_confirmed_udp_skips_the_stack_on_both_nodes(cluster):
    a, b = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    before = [cluster.counters(n) for n in cluster.nodes]
    veth_before = veth_tx_packets(cluster, b)
    send_and_receive(a, b)
    sent, fast_sent = (
        packets(cluster, 0, before[0], "sent"),
        packets(cluster, 0, before[0], "fast_send"),
    )
    received = packets(cluster, 1, before[1], "received")
    fast = packets(cluster, 1, before[1], "fast_deliver")
    assert sent == received == DATAGRAMS
    # the first datagram has no conntrack entry yet: the stack takes it and confirms one
    assert DATAGRAMS - 5 <= fast_sent < DATAGRAMS, f"fast send {fast_sent} of {DATAGRAMS}"
    assert DATAGRAMS - 5 <= fast < DATAGRAMS, f"fast delivery {fast} of {DATAGRAMS}"
    # only what the stack delivered crossed the pod's veth end (and maybe an ARP probe)
    assert veth_tx_packets(cluster, b) - veth_before <= DATAGRAMS - fast + 2


def test_a_pod_local_pods_does_not_know_is_reached_through_cni0(cluster):
    a, b = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    with local_pods_emptied(cluster, cluster.nodes[1]):
        before, veth_before = cluster.counters(cluster.nodes[1]), veth_tx_packets(cluster, b)
        send_and_receive(a, b)
        assert packets(cluster, 1, before, "fast_deliver") >= DATAGRAMS - 5
        assert veth_tx_packets(cluster, b) - veth_before >= DATAGRAMS


def test_the_reply_leg_of_a_dnated_flow_takes_the_stack(cluster):
    client_node, server_node = cluster.nodes
    a, b = client_node.pods[0], server_node.pods[0]
    with dnat(client_node, "udp", SERVICE_IP, SERVICE_PORT, b), echo_server(b):
        before = [cluster.counters(n) for n in cluster.nodes]
        replies = exchange(a, NATED_SPORTS[0], (SERVICE_IP, SERVICE_PORT), 100)
    # A connected socket takes replies from SERVICE_IP:53 only: un-DNATed by the stack.
    assert replies == [b"req %05d " % i + bytes(50) for i in range(100)]
    assert packets(cluster, 0, before[0], "received") == 100
    assert packets(cluster, 0, before[0], "fast_deliver") == 0, "a DNATed flow skipped the stack"
    assert packets(cluster, 0, before[0], "fast_send") == 0, "a DNATed flow skipped the stack"
    # The server's node saw a plain flow (the DNAT happened on the client's node).
    assert packets(cluster, 1, before[1], "fast_deliver") >= 95
    assert packets(cluster, 1, before[1], "fast_send") >= 95


def test_a_flow_dnated_on_the_servers_node_takes_the_stack_there(cluster):
    """As a hostPort or a NodePort's DNAT: the client's node sees a plain flow, the
    server's node must rewrite the replies' source port back, on the sending side."""
    client_node, server_node = cluster.nodes
    a, b = client_node.pods[0], server_node.pods[0]
    with dnat(server_node, "udp", str(b.ip), SERVICE_PORT, b), echo_server(b):
        before = [cluster.counters(n) for n in cluster.nodes]
        replies = exchange(a, NATED_SPORTS[1], (str(b.ip), SERVICE_PORT), 100)
    # A connected socket takes replies from port 53 only: un-DNATed by the server's stack.
    assert replies == [b"req %05d " % i + bytes(50) for i in range(100)]
    assert packets(cluster, 1, before[1], "fast_deliver") == 0, "a DNATed flow skipped the stack"
    assert packets(cluster, 1, before[1], "fast_send") == 0, "a DNATed flow skipped the stack"
    assert packets(cluster, 1, before[1], "sent") == 100
    assert packets(cluster, 0, before[0], "fast_send") >= 95
    assert packets(cluster, 0, before[0], "fast_deliver") >= 95


def test_a_flow_whose_source_port_conntrack_remapped_takes_the_stack(cluster):
    """A new flow whose reply tuple clashes with an older entry's (here: the same client
    port, to the backend that an earlier Service flow was DNATed to) gets its source port
    remapped by conntrack, an implicit SNAT: every datagram must leave with the stack's
    port, none on the fast path with the pod's."""
    client_node, server_node = cluster.nodes
    a, b = client_node.pods[0], server_node.pods[0]
    sport = NATED_SPORTS[2]
    with dnat(client_node, "udp", SERVICE_IP, SERVICE_PORT, b), echo_server(b):
        assert len(exchange(a, sport, (SERVICE_IP, SERVICE_PORT), 5)) == 5
    before = cluster.counters(client_node)
    with udp_socket(b, SERVER_PORT) as server, udp_socket(a, sport) as client:
        for i in range(50):
            client.sendto(b"%02d" % i, (str(b.ip), SERVER_PORT))
        got = [server.recvfrom(64) for _ in range(50)]
    assert sorted(data for data, _ in got) == [b"%02d" % i for i in range(50)]
    ports = {source[1] for _, source in got}
    assert len(ports) == 1 and ports != {sport}, f"source ports {ports}"
    assert packets(cluster, 0, before, "fast_send") == 0


def test_the_sending_side_runs_on_the_pods_veth_end(cluster):
    """The lab attached pod_ingress to each pod's veth end (as the agent does once it
    found the pod); without it the pod's UDP takes the stack, with it again the fast path."""
    node, a, b = cluster.nodes[0], cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    with netns.entered(node.netns):
        assert pod_ports_attached() == [a.host_veth]
        pod_ports.detach_pod_ports(node.bpffs)
        assert pod_ports_attached() == []
    before = cluster.counters(node)
    send_and_receive(a, b)
    assert packets(cluster, 0, before, "fast_send") == 0
    with netns.entered(node.netns):
        assert pod_ports.ensure_pod_ports(node.bpffs, [a.host_veth]) == [a.host_veth]
        assert pod_ports.ensure_pod_ports(node.bpffs, [a.host_veth]) == []  # there already
    before = cluster.counters(node)
    send_and_receive(a, b)
    assert packets(cluster, 0, before, "fast_send") >= DATAGRAMS - 5


def test_attaching_the_sending_side_drops_nothing_the_pod_is_sent(cluster):
    """pod_ingress goes onto a pod's veth end through a tcx link, without a qdisc:
    adding (or deleting) a clsact qdisc deactivates the veth's queues for a moment, and
    what the node sends the pod then is dropped (about 17 datagrams per change in a
    flood). The node streams numbered datagrams to the pod through cni0 and that veth
    end while its sending side is detached and attached again, ten times and more."""
    node, b = cluster.nodes[1], cluster.nodes[1].pods[0]
    rounds, stop = [0], threading.Event()

    def churn() -> None:
        with netns.entered(node.netns):
            while not stop.is_set():
                pod_ports.detach_pod_ports(node.bpffs)
                assert pod_ports.ensure_pod_ports(node.bpffs, [b.host_veth]) == [b.host_veth]
                rounds[0] += 1

    got: list[int] = []
    with udp_socket(b, SERVER_PORT) as server:
        server.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        server.settimeout(0.5)

        def receive() -> None:
            with contextlib.suppress(TimeoutError):
                while True:
                    got.append(int(server.recv(64)))

        receiver = threading.Thread(target=receive)
        receiver.start()
        with netns.entered(node.netns):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        churner = threading.Thread(target=churn)
        sent = 0
        with client:
            churner.start()
            try:
                while rounds[0] < 10 and sent < 500_000:
                    client.sendto(b"%d" % sent, (str(b.ip), SERVER_PORT))
                    sent += 1
                    if sent % 50 == 0:
                        time.sleep(0.0002)  # the receiver keeps up
            finally:
                stop.set()
                churner.join()
        receiver.join()
    assert sorted(got) == list(range(sent)), f"{sent - len(set(got))} of {sent} lost"
    assert rounds[0] >= 10
    with netns.entered(node.netns):
        assert pod_ports_attached() == [b.host_veth]


def test_a_pod_local_pods_does_not_know_sends_through_the_stack(cluster):
    """pod_ingress sends only for the pod local_pods puts on its veth end, from that
    pod's address and MAC: anything else is left to cni0 and the stack."""
    node, a, b = cluster.nodes[0], cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    with local_pods_emptied(cluster, node):
        before = cluster.counters(node)
        send_and_receive(a, b)
        assert packets(cluster, 0, before, "sent") == DATAGRAMS
        assert packets(cluster, 0, before, "fast_send") == 0


def test_pod_ingress_sends_only_what_the_pod_on_that_veth_would_route(cluster):
    """pod_ingress on its own (BPF_PROG_TEST_RUN of the pinned program, on the pod's
    veth end, the flow confirmed by real traffic): the pod's datagram to its gateway is
    sent; the same with another source MAC, on another port, to another MAC than the
    gateway's, with a broken header checksum or with trailing bytes is left to the stack.
    Each right after the pod's own datagram on the same CPU: the decision kept for the
    flow (fastpath.h) must not carry over to a frame the pod would not have sent."""
    node, a, b = cluster.nodes[0], cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    sport, dport = 40123, SERVER_PORT
    with udp_socket(b, dport) as server, udp_socket(a, sport) as client:
        client.sendto(b"confirm", (str(b.ip), dport))
        server.recv(64)
    with LocalPodsMap(PinDir(node.bpffs).maps) as m:
        pod = m.pods()[a.ip]
    datagram = frames.udp(str(a.ip), str(b.ip), sport, dport, bytes(32))
    good = frames.ethernet(pod.gateway_mac, pod.mac, datagram)
    bad_csum = bytearray(good)
    bad_csum[frames.ETH_HLEN + 10] ^= 0xFF
    cases = {
        "the pod's datagram": (good, pod.ifindex, TC_ACT_REDIRECT),
        "another source MAC": (
            frames.ethernet(pod.gateway_mac, "02:00:00:00:00:42", datagram),
            pod.ifindex,
            TC_ACT_OK,
        ),
        "another port": (good, link_index(node.netns, CNI_BRIDGE), TC_ACT_OK),
        "not to the gateway": (frames.ethernet(pod.mac, pod.mac, datagram), pod.ifindex, TC_ACT_OK),
        "bad header checksum": (bytes(bad_csum), pod.ifindex, TC_ACT_OK),
        "trailing bytes": (good + bytes(6), pod.ifindex, TC_ACT_OK),
    }
    fd = libbpf.obj_get(PinDir(node.bpffs).prog(POD_INGRESS.name))
    own_port = skb_ctx_on(pod.ifindex)
    got, primed = {}, {}
    try:
        with netns.entered(node.netns), on_one_cpu():
            for name, (frame, port, _) in cases.items():
                primed[name] = libbpf.prog_test_run(fd, good, ctx=own_port)[0]
                got[name] = libbpf.prog_test_run(fd, frame, ctx=skb_ctx_on(port))[0]
    finally:
        os.close(fd)
    assert primed == {name: TC_ACT_REDIRECT for name in cases}
    assert got == {name: want for name, (_, _, want) in cases.items()}


def test_what_the_route_to_the_peer_cannot_take_is_left_to_the_stack(cluster):
    """pod_ingress asks the FIB about the route to the peer with the datagram's size
    (after encapsulation): with that route's MTU locked lower, a datagram that no longer
    fits is left to the stack, which answers it as it would without the fast path
    (tunnel_egress sends ICMP frag-needed, counted as frag_needed: tests/test_pmtu.py);
    one that fits still takes the fast path. The big ones follow small ones of the same
    flow, whose kept decision must not cover them. The client sends with DF whatever its
    route learns (IP_PMTUDISC_PROBE), so every big one reaches pod_ingress whole."""
    node, a, b = cluster.nodes[0], cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    backend = cluster.spec.backend.value
    peer = cluster.nodes[1].public_ip
    route = [f"{peer}/32", "dev", UNDERLAY_IFNAME]
    process.run(node.netns, ["ip", "route", "replace", *route, "mtu", "lock", "1000"])
    try:
        wait_out_flow_cache()
        before = cluster.counters(node)
        with udp_socket(a) as client:
            client.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
            for _ in range(20):
                client.sendto(bytes(1200), (str(b.ip), SERVER_PORT))
        time.sleep(0.2)
        counted = cluster.counters(node).since(before)
        assert counted.packets(backend, "fast_send") == 0
        assert counted.drops() == {(backend, "DROP_FRAG_NEEDED"): 20}
        before = cluster.counters(node)
        with udp_socket(b, SERVER_PORT) as server, udp_socket(a) as client, on_one_cpu():
            client.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
            for _ in range(20):
                client.sendto(bytes(500), (str(b.ip), SERVER_PORT))
                client.sendto(bytes(1200), (str(b.ip), SERVER_PORT))
            got = [server.recv(2048) for _ in range(20)]
            time.sleep(0.2)
            server.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                got.append(server.recv(2048))
        counted = cluster.counters(node).since(before)
        assert got == [bytes(500)] * 20
        assert counted.packets(backend, "fast_send") >= 19
        assert counted.drops() == {(backend, "DROP_FRAG_NEEDED"): 20}
    finally:
        process.run(node.netns, ["ip", "route", "del", *route])
        process.run(a.netns, ["ip", "route", "flush", "cache"])  # the MTU the pod learnt
        wait_out_flow_cache()


def conntrack_state(node: Node, sport: int) -> str:
    """The TCP state of the node's conntrack entry for the stream from sport."""
    with netns.entered(node.netns), open("/proc/thread-self/net/nf_conntrack") as f:
        for line in f:
            fields = line.split()
            if fields[2] == "tcp" and f" sport={sport} dport={SERVER_PORT} " in line:
                return fields[5]
    raise LookupError(f"no conntrack entry for port {sport} in {node.netns}")


@contextlib.contextmanager
def tcp_fast_path_off(cluster: Cluster) -> Iterator[None]:
    """FAST_TCP off on every node (the data path as built without --tcp-fast-path)."""
    for node in cluster.nodes:
        with NodeConfigMap(PinDir(node.bpffs).maps) as m:
            assert m.set_tcp_fast_path(False)
    try:
        yield
    finally:
        for node in cluster.nodes:
            with NodeConfigMap(PinDir(node.bpffs).maps) as m:
                m.set_tcp_fast_path(True)


def test_an_established_tcp_stream_skips_the_stack_but_opens_and_closes_through_it(cluster):
    """The client's segments: the SYN, the handshake's last ACK (conntrack has not assured
    the stream before it), what it sends before its node has marked the flow, and the
    FIN take the stack on both nodes, everything between takes the fast path, in GSO
    aggregates larger than the pods' MTU. conntrack, having seen the FINs, has the stream
    closing on both nodes."""
    a, b = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    backend = cluster.spec.backend.value
    before = [cluster.counters(n) for n in cluster.nodes]
    sport = tcp_stream(a, b)
    sent = cluster.counters(cluster.nodes[0]).since(before[0])
    received = cluster.counters(cluster.nodes[1]).since(before[1])
    fast_sent, fast_bytes = sent.traffic.get((backend, "fast_send"), (0, 0))
    stack_sent = packets(cluster, 0, before[0], "sent") - fast_sent
    stack_received = packets(cluster, 1, before[1], "received") - packets(
        cluster, 1, before[1], "fast_deliver"
    )
    most = 6 + BEFORE_MARKED
    assert 3 <= stack_sent <= most, f"{stack_sent} of the client's packets took the stack"
    assert 3 <= stack_received <= most, f"{stack_received} of them took the stack at the server"
    assert fast_bytes > fast_sent * cluster.spec.pod_mtu, "no aggregate took the fast path"
    assert received.traffic.get((backend, "fast_deliver"), (0, 0))[1] >= len(STREAM) * 0.9
    for node in cluster.nodes:
        assert conntrack_state(node, sport) in CLOSING


def test_tcp_streams_both_ways_take_the_fast_path_intact(cluster):
    """Aggregates both ways at once: each node sends and delivers one of the streams."""
    a, b = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    backend = cluster.spec.backend.value
    before = [cluster.counters(n) for n in cluster.nodes]
    tcp_stream(a, b, reply=STREAM[::-1])
    for i, node in enumerate(cluster.nodes):
        counted = cluster.counters(node).since(before[i]).traffic
        for direction in ("fast_send", "fast_deliver"):
            fast_bytes = counted.get((backend, direction), (0, 0))[1]
            assert fast_bytes >= len(STREAM) * 0.9, f"{node.netns} {direction}: {fast_bytes} B"


def test_tcp_takes_the_stack_while_fast_tcp_is_off(cluster):
    a, b = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    with tcp_fast_path_off(cluster):
        before = [cluster.counters(n) for n in cluster.nodes]
        tcp_stream(a, b)
        for i, node in enumerate(cluster.nodes):
            for direction in ("fast_send", "fast_deliver"):
                assert packets(cluster, i, before[i], direction) == 0, f"{node.netns} {direction}"
        assert packets(cluster, 1, before[1], "received") > 0


def test_a_dnated_tcp_stream_takes_the_stack_where_it_is_nated(cluster):
    client_node, server_node = cluster.nodes
    a, b = client_node.pods[0], server_node.pods[0]
    with dnat(client_node, "tcp", SERVICE_IP, SERVICE_PORT, b):
        before = [cluster.counters(n) for n in cluster.nodes]
        tcp_stream(a, b, dst=(SERVICE_IP, SERVICE_PORT), sport=NATED_SPORTS[3])
    for direction in ("fast_send", "fast_deliver"):
        assert packets(cluster, 0, before[0], direction) == 0, f"a DNATed stream: {direction}"
    # The server's node saw a plain stream (the DNAT happened on the client's node).
    assert packets(cluster, 1, before[1], "fast_deliver") > 0


def tcp_push(client: Pod, server: Pod, seconds: float) -> None:
    """Send STREAMs from client to server for that long, then reset the connection: for a
    stream that may stall (a path that drops its retransmissions), where only what was
    sent counts."""
    with tcp_connection(client, server) as (cli, conn):
        stop = threading.Event()

        def drain() -> None:
            conn.settimeout(0.2)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    if not conn.recv(1 << 16):
                        return

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        cli.settimeout(0.2)
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while time.monotonic() < deadline:
                cli.send(STREAM)
        stop.set()
        reader.join(5)
        linger = struct.pack("ii", 1, 0)  # close with a RST, whatever is still queued
        for s in (cli, conn):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)


def test_a_tcp_aggregate_whose_segments_the_route_cannot_take_is_left_to_the_stack(cluster):
    """pod_ingress sizes a GSO aggregate by the segments it will be cut into, as
    ip_forward() does. Full-size segments (pod MTU, plus the VXLAN headers for vxlan) just
    fit the route to the peer; with the route locked one byte below them, the stream's
    first aggregates take the stack, which answers them with ICMP frag-needed
    (tests/test_pmtu.py); the sender's TCP lowers its MSS, and the aggregates of the
    smaller segments, which fit, take the fast path."""
    node, a, b = cluster.nodes[0], cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    backend = cluster.spec.backend.value
    encap = defaults.VXLAN_OVERHEAD if cluster.spec.backend is Backend.VXLAN else 0
    route = [f"{cluster.nodes[1].public_ip}/32", "dev", UNDERLAY_IFNAME]
    lock = str(cluster.spec.pod_mtu + encap - 1)
    process.run(node.netns, ["ip", "route", "replace", *route, "mtu", "lock", lock])
    try:
        wait_out_flow_cache()
        before = cluster.counters(node)
        tcp_push(a, b, 1.0)
        counted = cluster.counters(node).since(before)
    finally:
        process.run(node.netns, ["ip", "route", "del", *route])
        process.run(a.netns, ["ip", "route", "flush", "cache"])  # the MTU the pod learnt
        wait_out_flow_cache()
    assert counted.drops().get((backend, "DROP_FRAG_NEEDED"), 0) >= 1, counted.drops()
    fast, fast_bytes = counted.traffic.get((backend, "fast_send"), (0, 0))
    assert fast_bytes > 100_000 and fast_bytes > fast * int(lock), (
        f"the fast path sent {fast_bytes} B in {fast} packets: no aggregates"
    )


def test_the_agents_cni0_scan_finds_the_pods_that_talked(cluster):
    """agent/local_pods.scan() reads cni0's neighbours and forwarding database: a pod
    appears once the node has resolved it and the bridge has learned its MAC (its port
    may run our pod_ingress); a port with a qdisc of its own (the CNI bandwidth plugin's
    tbf, a clsact) or someone else's tc or tcx program is left to the bridge."""
    a, b = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    node = cluster.nodes[1]
    send_and_receive(a, b)
    with LocalPodsMap(PinDir(node.bpffs).maps) as m:
        want = m.pods()[b.ip]  # what the lab programmed: the pod's veth end and MAC
    with netns.entered(node.netns), IPRoute() as ipr:
        assert local_pods.scan(ipr, defaults.CNI_BRIDGE) == [want]
    tbf = ["tc", "qdisc", "add", "dev", b.host_veth, "root", "tbf"]
    process.run(node.netns, [*tbf, "rate", "1gbit", "burst", "64kb", "latency", "10ms"])
    try:
        with netns.entered(node.netns), IPRoute() as ipr:
            assert local_pods.scan(ipr, defaults.CNI_BRIDGE) == []
    finally:
        process.run(node.netns, ["tc", "qdisc", "del", "dev", b.host_veth, "root"])
    fd = someone_elses_filter(node.netns, b.host_veth, prio=7)
    try:
        with netns.entered(node.netns), IPRoute() as ipr:
            assert local_pods.scan(ipr, defaults.CNI_BRIDGE) == []
    finally:
        os.close(fd)
        process.run(node.netns, ["tc", "qdisc", "del", "dev", b.host_veth, "clsact"])
    fd = someone_elses_tcx(node.netns, b.host_veth)
    try:
        with netns.entered(node.netns), IPRoute() as ipr:
            assert local_pods.scan(ipr, defaults.CNI_BRIDGE) == []
    finally:
        os.close(fd)
    with netns.entered(node.netns), IPRoute() as ipr:
        assert local_pods.scan(ipr, defaults.CNI_BRIDGE) == [want]


def test_inspect_lists_the_local_pods(cluster):
    node, b = cluster.nodes[1], cluster.nodes[1].pods[0]
    argv = [sys.executable, "-m", "flannel_xdp.cli", "inspect", "--bpffs", node.bpffs]
    report = json.loads(subprocess.run([*argv, "--json"], capture_output=True, text=True,
                                       check=True).stdout)  # fmt: skip
    with LocalPodsMap(PinDir(node.bpffs).maps) as m:
        pod = m.pods()[b.ip]
    assert report["local_pods"] == [
        {"ip": str(b.ip), "ifindex": pod.ifindex, "mac": pod.mac, "gateway_mac": pod.gateway_mac}
    ]
    text = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert f"  {b.ip}" in text.split("local pods (fast path", 1)[1]
    assert report["node"]["tcp_fast_path"] == "True"
    assert "TCP fast path on" in text.split("peers", 1)[0]
