"""Path MTU (bpf/pmtu.h): a packet too big for the route to its peer once sent (encapsulated,
for vxlan) is answered with ICMP "fragmentation needed" to its sender, announcing the route's
MTU less the encapsulation, when it has DF; without DF it is dropped as too_big.

First frame by frame (tunnel_egress in BPF_PROG_TEST_RUN, the answer compared byte for byte
with one built here), then on two-node labs with the route to the peer locked below the
tunnel MTU, on the stack path and on the fast path (which leaves such a packet to the stack
path): a DF ping gets the ICMP with the expected MTU and the pod's route learns it, a UDP
socket learns it, and a TCP stream completes, sha256-checked, at the smaller MSS.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from flannel_xdp import defaults, netns
from flannel_xdp.backend import Backend
from flannel_xdp.lab import Cluster, ClusterSpec, Node, Pod, process, traffic
from flannel_xdp.lab.frames import (
    ICMP_ERROR_MAX_LEN,
    IP_DF,
    IP_HLEN,
    icmp_frag_needed,
    ipv4,
    tcp,
    udp,
)
from flannel_xdp.lab.topology import UNDERLAY_IFNAME
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.loader.libbpf import prog_test_run
from tests.packet_support import (
    OWN_SUBNET,
    PEER_A,
    PEER_HOSTGW,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    Counters,
    program_lab,
    tunnel_frame,
    wait_out_fib_cache,
)
from tests.requirements import require_root_and_bcc

TAG = f"{os.getpid()}"
OWN_HOST = str(OWN_SUBNET.network_address + 5)
LOCKED_MTU = 1300  # the route to the peer, below the underlay's 1500
IPPROTO_ICMP = 1
IP_MF = 0x2000
ICMP_ECHO = bytes([8, 0, 0, 0, 0, 1, 0, 1])  # checksum left 0: nothing here checks it
ICMP_TIME_EXCEEDED = bytes([11, 0, 0, 0, 0, 0, 0, 0])


def encap(backend: Backend) -> int:
    """What a frame to a peer of this backend grows by on the way."""
    return defaults.VXLAN_OVERHEAD if backend is Backend.VXLAN else 0


# --- frame by frame ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab():
    require_root_and_bcc("ip", "bridge", "ethtool")
    with program_lab(f"fxdp-pmtu-{TAG}") as lab:
        lab.configure()
        yield lab


@contextlib.contextmanager
def route_locked(ns: str, peer_ip, device: str, mtu: int) -> Iterator[None]:
    """The route to peer_ip in ns with its MTU locked to mtu; removed afterwards. Waits
    out the per-CPU caches of answers checked against the old MTU, both ways."""
    route = f"{peer_ip}/32 dev {device}"
    process.run(ns, ["sh", "-c", f"ip route replace {route} mtu lock {mtu}"])
    try:
        wait_out_fib_cache()
        yield
    finally:
        process.run(ns, ["sh", "-c", f"ip route del {route}"])
        wait_out_fib_cache()


def big(peer, proto: str, size: int, flags: int = IP_DF) -> bytes:
    """An IPv4 packet of size bytes from our pod to the peer's, as a pod's stack sends it."""
    dst = peer.host(3)
    if proto == "udp":
        return udp(OWN_HOST, dst, 40000, 9000, bytes(size - IP_HLEN - 8), flags_frag=flags)
    if proto == "tcp":  # as it leaves a veth: the checksum left for the device to finish
        return tcp(OWN_HOST, dst, 40000, 9000, bytes(size - IP_HLEN - 20), partial=True)
    return ipv4(OWN_HOST, dst, IPPROTO_ICMP, ICMP_ECHO + bytes(size - IP_HLEN - 8))


@pytest.mark.bpf
@pytest.mark.parametrize("peer", [PEER_A, PEER_HOSTGW], ids=["vxlan", "host-gw"])
@pytest.mark.parametrize("proto", ["udp", "tcp", "icmp"])
def test_a_df_packet_too_big_is_answered_with_frag_needed(lab, peer, proto):
    """The answer, exactly: from the packet's destination to its source, IPv4 with DF, TTL
    64, ID 0, ICMP 3/4 with the route's MTU less the encapsulation, quoting the packet up to
    576 bytes in all, both checksums right; in to the tunnel device, whose MAC sent it.
    Counted as frag_needed with the packet's length."""
    mtu = LOCKED_MTU - encap(peer.backend)
    packet = big(peer, proto, mtu + 1)
    frame = tunnel_frame(packet)
    with route_locked(lab.ns, peer.public_ip, "u0", LOCKED_MTU):
        rv, out, delta = lab.counted("egress", frame)
        fits_rv, _, fits = lab.counted("egress", tunnel_frame(big(peer, proto, mtu)))
    assert rv == TC_ACT_REDIRECT
    reply = icmp_frag_needed(packet[16:20], packet[12:16], mtu, packet)
    assert len(reply) == ICMP_ERROR_MAX_LEN
    assert out.hex() == (frame[6:12] + frame[0:6] + frame[12:14] + reply).hex()
    assert delta == {("reason", peer.backend.value, "DROP_FRAG_NEEDED"): (1, len(frame))}
    sent = "encap" if peer.backend is Backend.VXLAN else "forward"
    assert (fits_rv, list(fits)) == (TC_ACT_REDIRECT, [("traffic", peer.backend.value, sent)])


@pytest.fixture(scope="module")
def tunnel_ingress(lab) -> Iterator[int]:
    """tunnel_ingress as the kernel ingress hook builds it, against the lab's maps: its fd."""
    from bcc import BPF

    from flannel_xdp.loader.compile import BuildParams, compile_program

    build = BuildParams(maps_dir=lab.maps_dir, max_subnets=64, kernel_decap=True)
    module = compile_program("tunnel_ingress", build)
    try:
        yield module.load_func(b"tunnel_ingress", BPF.SCHED_CLS).fd
    finally:
        module.cleanup()


@pytest.mark.bpf
def test_tunnel_ingress_lets_in_the_answer_and_nothing_else_without_metadata(lab, tunnel_ingress):
    """The answer comes in on flannel.<VNI> without tunnel metadata, which everything the
    kernel's vxlan device decapsulates has: tunnel_ingress lets in that ICMP (uncounted: it
    was counted as frag_needed) and still drops any other frame without it as malformed."""
    packet = big(PEER_A, "udp", 1251)
    answer = icmp_frag_needed(packet[16:20], packet[12:16], 1250, packet)
    echo = big(PEER_A, "icmp", 100)
    frames = {"answer": tunnel_frame(answer), "echo": tunnel_frame(echo)}
    got = {}
    for name, frame in frames.items():
        before = lab.counters.snapshot()
        with netns.entered(lab.ns):
            rv, _, _ = prog_test_run(tunnel_ingress, frame)
        got[name] = (rv, Counters.delta(before, lab.counters.snapshot()))
    assert got == {
        "answer": (TC_ACT_OK, {}),
        "echo": (
            TC_ACT_SHOT,
            {("reason", "vxlan", "DROP_MALFORMED"): (1, len(tunnel_frame(echo)))},
        ),
    }


@dataclass(frozen=True)
class Unanswered:
    packet: bytes
    route_mtu: int = LOCKED_MTU


UNANSWERED = {
    "no DF": Unanswered(big(PEER_A, "udp", 1251, flags=0)),
    "a first fragment": Unanswered(big(PEER_A, "udp", 1251, flags=IP_DF | IP_MF)),
    "an ICMP error": Unanswered(
        ipv4(OWN_HOST, PEER_A.host(3), IPPROTO_ICMP, ICMP_TIME_EXCEEDED + bytes(1223))
    ),
    # below the 576 bytes every host takes, no path MTU is announced
    "a route MTU below 576 + 50": Unanswered(big(PEER_A, "udp", 700), route_mtu=600),
}


@pytest.mark.bpf
@pytest.mark.parametrize("case", list(UNANSWERED))
def test_what_is_not_answered_is_dropped_as_too_big(lab, case):
    """No answer without DF (the stack would fragment: BPF cannot), for a fragment, for an
    ICMP error (never answered with another) or for a path MTU below 576: the packet is
    dropped as it came, counted as too_big."""
    c = UNANSWERED[case]
    frame = tunnel_frame(c.packet)
    with route_locked(lab.ns, PEER_A.public_ip, "u0", c.route_mtu):
        rv, out, delta = lab.counted("egress", frame)
    assert (rv, out) == (TC_ACT_SHOT, frame)
    assert delta == {("reason", "vxlan", "DROP_TOO_BIG"): (1, len(frame))}


# --- two-node labs ------------------------------------------------------------------------------

# name: (backend, ingress hook, fast path)
PATHS = {
    "vxlan-stack": (Backend.VXLAN, IngressHook.KERNEL, False),
    "vxlan-fast": (Backend.VXLAN, IngressHook.KERNEL, True),
    "host-gw-stack": (Backend.HOST_GW, IngressHook.TC, False),
    "host-gw-fast": (Backend.HOST_GW, IngressHook.TC, True),
}
SERVER_PORT = 9000
# linux/in.h (not in Python 3.11)
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO, IP_MTU = 10, 0, 2, 14


@pytest.fixture(scope="module", params=list(PATHS))
def cluster(request) -> Iterator[Cluster]:
    """Two nodes of one pod each, with flanneld's iptables rules (conntrack on, as on any
    Kubernetes node); the fast path (UDP and TCP) on or off."""
    require_root_and_bcc("ip", "iptables", "ping")
    backend, hook, fast = PATHS[request.param]
    spec = ClusterSpec.uniform(
        nodes=2,
        pods=1,
        backend=backend,
        ingress_hook=hook,
        udp_fast_path=fast,
        tcp_fast_path=fast,
        ip_masq=True,
    )
    with Cluster(spec) as c:
        yield c


@contextlib.contextmanager
def locked_toward_peer(cluster: Cluster) -> Iterator[int]:
    """Node 0's route to node 1 locked at LOCKED_MTU; yields the MTU left for a pod's
    packet. Afterwards the route goes, and so does what the pods' stacks learnt."""
    n0, n1 = cluster.nodes
    try:
        with route_locked(n0.netns, n1.public_ip, UNDERLAY_IFNAME, LOCKED_MTU):
            yield LOCKED_MTU - encap(cluster.spec.backend)
    finally:
        for pod in cluster.pods:
            process.run(pod.netns, ["ip", "route", "flush", "cache"])


def ping_df(pod: Pod, dst: Pod, size: int) -> str:
    """One DF ping of an IP length of size: ping's output."""
    argv = ["ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s", str(size - IP_HLEN - 8)]
    res = process.run(pod.netns, [*argv, str(dst.ip)], check=False)
    return res.stdout + res.stderr


def frag_needed(cluster: Cluster, node: Node, before) -> int:
    backend = cluster.spec.backend.value
    return cluster.counters(node).since(before).drops().get((backend, "DROP_FRAG_NEEDED"), 0)


@pytest.mark.lab
def test_a_df_ping_too_big_for_the_route_gets_frag_needed(cluster):
    """The pod's DF ping one byte over the MTU left gets "Frag needed and DF set" with that
    MTU from the remote pod's address (one answer, counted); the pod's route learns it, so
    the same ping then fails locally (message too long); one that fits gets through."""
    n0 = cluster.nodes[0]
    a, b = n0.pods[0], cluster.nodes[1].pods[0]
    with locked_toward_peer(cluster) as mtu:
        before = cluster.counters(n0)
        first = ping_df(a, b, mtu + 1)
        answers = frag_needed(cluster, n0, before)
        learnt = process.run(a.netns, ["ip", "route", "get", str(b.ip)]).stdout
        second = ping_df(a, b, mtu + 1)
        fits = ping_df(a, b, mtu)
    assert f"From {b.ip} icmp_seq=1 Frag needed and DF set (mtu = {mtu})" in first, first
    assert answers == 1
    assert re.search(rf"\bmtu {mtu}\b", learnt), learnt
    assert re.search(rf"message too long, mtu[:=] ?{mtu}\b", second), second
    assert traffic.parse_ping(fits).ok, fits


@pytest.mark.lab
def test_a_udp_socket_learns_the_smaller_mtu(cluster):
    """A connected UDP socket with IP_PMTUDISC_DO: datagrams of a flow conntrack confirmed
    (the fast path's, where it is on) fit until one is one byte too big: that one is
    answered, the socket's next send fails with EMSGSIZE and IP_MTU says the MTU left."""
    n0 = cluster.nodes[0]
    a, b = n0.pods[0], cluster.nodes[1].pods[0]
    backend = cluster.spec.backend.value
    with (
        locked_toward_peer(cluster) as mtu,
        traffic.udp_socket(b.netns, str(b.ip), SERVER_PORT, timeout=5) as server,
        traffic.udp_socket(a.netns, str(a.ip), timeout=5) as client,
    ):
        client.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        client.connect((str(b.ip), SERVER_PORT))
        client.send(b"confirm")
        server.recv(64)
        before = cluster.counters(n0)
        fitting = bytes(mtu - IP_HLEN - 8)
        for _ in range(5):
            client.send(fitting)
            assert server.recv(2048) == fitting
        client.send(fitting + b"!")
        with pytest.raises(OSError) as refused:
            for _ in range(50):  # until the answer has arrived
                time.sleep(0.02)
                client.send(fitting + b"!")
        learnt = client.getsockopt(socket.IPPROTO_IP, IP_MTU)
        counted = cluster.counters(n0).since(before)
    assert refused.value.errno == errno.EMSGSIZE
    assert learnt == mtu
    assert counted.drops().get((backend, "DROP_FRAG_NEEDED"), 0) >= 1
    if cluster.spec.udp_fast_path:
        assert counted.packets(backend, "fast_send") >= 4


@pytest.mark.lab
def test_a_tcp_stream_completes_at_the_smaller_mss(cluster):
    """A 16 MiB stream (sha256-checked by the receiver) from a pod whose first full-size
    segments the route cannot take: they are answered, the sender's TCP drops its MSS to
    fit the MTU left and the stream completes; the receiver saw no larger segment. Where
    the fast path is on, the stream's segments take it once they fit."""
    n0 = cluster.nodes[0]
    a, b = n0.pods[0], cluster.nodes[1].pods[0]
    backend = cluster.spec.backend.value
    server = traffic.start_probe_server(b.netns, str(b.ip), SERVER_PORT)
    try:
        with locked_toward_peer(cluster) as mtu:
            before = cluster.counters(n0)
            [result] = traffic.probe(
                a.netns, [str(b.ip)], size=16 << 20, udp_sizes=(512,), port=SERVER_PORT
            )
            counted = cluster.counters(n0).since(before)
    finally:
        traffic.stop([server])
    assert traffic.probe_ok(result), traffic.probe_problem(result)
    tcp_result = result["tcp"]
    assert tcp_result["bytes"] == 16 << 20
    # MSS: the MTU less the IP and TCP headers (timestamps take 12 more of each segment)
    assert tcp_result["rcv_mss"] <= mtu - IP_HLEN - 20, tcp_result
    assert counted.drops().get((backend, "DROP_FRAG_NEEDED"), 0) >= 1
    if cluster.spec.tcp_fast_path:
        fast_bytes = counted.traffic.get((backend, "fast_send"), (0, 0))[1]
        assert fast_bytes > tcp_result["bytes"] // 2, counted.traffic


@pytest.mark.lab
def test_a_datagram_without_df_too_big_for_the_route(cluster):
    """Without DF a packet may be fragmented, which BPF cannot do. Where flannel.<VNI> is
    the kernel's vxlan device (vxlan, kernel hook) it is handed to that device, which sends
    it in outer fragments as flanneld's device does: it arrives whole, counted as encap.
    Elsewhere (host-gw here) it is dropped, counted as too_big."""
    n0 = cluster.nodes[0]
    a, b = n0.pods[0], cluster.nodes[1].pods[0]
    backend = cluster.spec.backend.value
    with (
        locked_toward_peer(cluster) as mtu,
        traffic.udp_socket(b.netns, str(b.ip), SERVER_PORT, timeout=2) as server,
        traffic.udp_socket(a.netns, str(a.ip), timeout=2) as client,
    ):
        client.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        datagram = (bytes(range(256)) * 6)[: mtu + 1 - IP_HLEN - 8]
        before = cluster.counters(n0)
        client.sendto(datagram, (str(b.ip), SERVER_PORT))
        try:
            got = server.recv(4096)
        except TimeoutError:
            got = None
        counted = cluster.counters(n0).since(before)
    if cluster.spec.backend is Backend.VXLAN:
        assert got == datagram
        assert counted.drops() == {}
        assert counted.packets(backend, "encap") == 1
    else:
        assert got is None
        assert counted.drops() == {(backend, "DROP_TOO_BIG"): 1}
