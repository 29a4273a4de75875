"""Pod-to-pod traffic across two flannel-xdp nodes built in network namespaces.

One cluster per backend (module scope: built once, torn down at the end even
when tests fail): two nodes, two pods each, the BPF data path on both nodes.
What is checked is what breaks first in an XDP/tc data path: ICMP that works
while TCP checksums are wrong, full-size frames that vanish, redirects into a
veth without NAPI, counters that count the wrong thing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import product

import pytest

from flannel_xdp.backend import Backend
from flannel_xdp.lab import (
    Cluster,
    ClusterSpec,
    Dataplane,
    Node,
    NodeSpec,
    Pod,
    process,
    traffic,
)
from flannel_xdp.loader.compile import BuildParams
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.maps import layout

pytestmark = pytest.mark.lab

BACKENDS = [Backend.VXLAN, Backend.HOST_GW]
# Every backend with each place VXLAN can be decapsulated on the underlay.
CASES = [(b, h) for b in BACKENDS for h in IngressHook]
IPERF_SECONDS = 3
# Far below what a veth testbed does (Gbit/s), far above what a broken data path
# limps along at (a path that drops every GSO packet still moves some kbit/s).
IPERF_FLOOR_BITS = 100e6
PAYLOAD_BYTES = 8 << 20
IP_UDP_HEADERS = 28
IP_TCP_HEADERS = 40
TCP_TIMESTAMP_OPTION = 12

# Receives one TCP connection to EOF; prints its size, sha256 and tcpi_rcv_mss, which
# the kernel sets from the largest segment (gso_size after GRO) that arrived.
TCP_RECEIVER = r"""
import hashlib, json, socket, struct, sys
ip, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, port))
srv.listen(1)
srv.settimeout(30)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
digest, total = hashlib.sha256(), 0
while chunk := conn.recv(1 << 16):
    digest.update(chunk)
    total += len(chunk)
info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
conn.close()
rcv_mss = struct.unpack_from("I", info, 20)[0]
print(json.dumps({"bytes": total, "sha256": digest.hexdigest(), "rcv_mss": rcv_mss}))
"""

# Sends seeded random bytes, waits until the receiver has read all and closed;
# prints tcpi_snd_mss (the MSS in use, after options).
TCP_SENDER = r"""
import json, random, socket, struct, sys
ip, port, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = random.Random(seed).randbytes(size)
s = socket.create_connection((ip, port), timeout=30)
s.sendall(data)
info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(json.dumps({"snd_mss": struct.unpack_from("I", info, 16)[0]}))
"""

UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(30)
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    if data == b"bye":
        break
    s.sendto(data, peer)
"""

# One seeded datagram per size, echoed back; a datagram whose checksum went bad
# on the way is dropped by the receiving kernel, so "lost" is what that looks like.
UDP_CLIENT = r"""
import json, random, socket, sys
ip, port, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((ip, port))
s.settimeout(1.0)
results = {}
for i, size in enumerate(int(a) for a in sys.argv[4:]):
    payload = random.Random(seed + i).randbytes(size)
    outcome = "lost"
    for _ in range(3):
        s.send(payload)
        try:
            echoed = s.recv(65535)
        except TimeoutError:
            continue
        outcome = "intact" if echoed == payload else "corrupt"
        break
    results[size] = outcome
s.send(b"bye")
print(json.dumps(results))
"""


@pytest.fixture(scope="module", params=CASES, ids=[f"{b.value}-{h.value}" for b, h in CASES])
def cluster(request: pytest.FixtureRequest, lab_prerequisites: None) -> Iterator[Cluster]:
    backend, hook = request.param
    spec = ClusterSpec.uniform(nodes=2, pods=2, backend=backend, ingress_hook=hook)
    with Cluster(spec) as lab:
        yield lab


def cross_node_pairs(cluster: Cluster) -> list[tuple[Pod, Pod]]:
    """Every ordered (source, destination) pair of pods on different nodes."""
    return [(a, b) for a, b in product(cluster.pods, repeat=2) if a.node != b.node]


def backend_label(cluster: Cluster) -> str:
    return str(cluster.spec.backend)


def wait_listening(pod: Pod, port: int, proto: str = "t", timeout: float = 5.0) -> None:
    if not traffic.wait_listening(pod.netns, port, proto, timeout):
        pytest.fail(f"nothing listens on {pod.ip}:{port} after {timeout} s")


def start_server(pod: Pod, script: str, *args: object) -> subprocess.Popen[str]:
    """Start a Python server script in pod; returns once it printed "ready"."""
    proc = process.spawn(pod.netns, [sys.executable, "-c", script, str(pod.ip), *map(str, args)])
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=5)
        pytest.fail(f"server in {pod.netns} did not start: {line!r} {err}")
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 30.0) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
    return proc.returncode, out, err


def tcp_transfer(src: Pod, dst: Pod, port: int, seed: int) -> tuple[dict, dict, str]:
    """PAYLOAD_BYTES of seeded data from src to dst; (receiver, sender, expected sha256)."""
    receiver = start_server(dst, TCP_RECEIVER, port)
    try:
        args = [str(dst.ip), str(port), str(PAYLOAD_BYTES), str(seed)]
        sent = process.run(
            src.netns, [sys.executable, "-c", TCP_SENDER, *args], check=False, timeout=60
        )
    finally:
        rc, out, err = finish(receiver)
    assert sent.returncode == 0, f"sender {src.ip} -> {dst.ip} failed: {sent.stderr}"
    assert rc == 0, f"receiver {dst.ip} failed: {err}"
    expected = hashlib.sha256(random.Random(seed).randbytes(PAYLOAD_BYTES)).hexdigest()
    return json.loads(out), json.loads(sent.stdout), expected


def ping(dst: Pod, *args: str) -> list[str]:
    return ["ping", "-n", *args, str(dst.ip)]


def test_pods_ping_each_other_across_nodes(cluster: Cluster):
    pairs = cross_node_pairs(cluster)
    procs = [
        (src, dst, process.spawn(src.netns, ping(dst, "-c", "3", "-i", "0.2", "-W", "2")))
        for src, dst in pairs
    ]
    failed = []
    for src, dst, proc in procs:
        rc, out, err = finish(proc)
        if rc != 0:
            failed.append(f"{src.ip} -> {dst.ip}: rc {rc}\n{out}{err}")
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("reverse", [False, True], ids=["n0-to-n1", "n1-to-n0"])
def test_iperf3_tcp_across_nodes(cluster: Cluster, reverse: bool):
    client, server = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    port = 5201
    srv = process.spawn(server.netns, ["iperf3", "-s", "-1", "-B", str(server.ip), "-p", str(port)])
    try:
        wait_listening(server, port)
        argv = ["iperf3", "-c", str(server.ip), "-p", str(port), "-t", str(IPERF_SECONDS), "-J"]
        argv += ["--connect-timeout", "3000"] + (["-R"] if reverse else [])
        res = process.run(client.netns, argv, check=False, timeout=IPERF_SECONDS + 30)
    finally:
        srv_rc, _, srv_err = finish(srv, timeout=10)
    report = json.loads(res.stdout) if res.stdout.strip() else {}
    assert res.returncode == 0 and "error" not in report, (
        f"iperf3 failed (rc {res.returncode}): {report.get('error')} {res.stderr}"
    )
    assert srv_rc == 0, f"iperf3 server failed: {srv_err}"
    end = report["end"]
    assert end["sum_sent"]["bytes"] > 0
    assert end["sum_received"]["bytes"] > 0
    assert end["sum_received"]["seconds"] >= IPERF_SECONDS * 0.9
    assert end["sum_received"]["bits_per_second"] > IPERF_FLOOR_BITS, end["sum_received"]


def test_tcp_payload_arrives_intact_both_ways(cluster: Cluster):
    n0, n1 = cluster.nodes
    for seed, (src, dst) in enumerate([(n0.pods[0], n1.pods[1]), (n1.pods[0], n0.pods[1])]):
        received, _, expected = tcp_transfer(src, dst, 7000 + seed, seed)
        assert received["bytes"] == PAYLOAD_BYTES, f"{src.ip} -> {dst.ip}: short transfer"
        assert received["sha256"] == expected, f"{src.ip} -> {dst.ip}: payload corrupted"


def test_full_size_tcp_segments_cross(cluster: Cluster):
    mtu = cluster.spec.pod_mtu
    for pod in (cluster.nodes[0].pods[0], cluster.nodes[1].pods[1]):
        link = json.loads(process.run(pod.netns, ["ip", "-j", "link", "show", "eth0"]).stdout)
        assert link[0]["mtu"] == mtu, f"{pod.netns}: pod MTU is not flannel's"
    src, dst = cluster.nodes[0].pods[0], cluster.nodes[1].pods[1]
    received, sent, expected = tcp_transfer(src, dst, 7100, 42)
    assert received["sha256"] == expected
    # The MSS follows the pod MTU, and the receiver saw segments of exactly that size.
    assert mtu - IP_TCP_HEADERS - TCP_TIMESTAMP_OPTION <= sent["snd_mss"] <= mtu - IP_TCP_HEADERS
    assert received["rcv_mss"] == sent["snd_mss"], (
        f"largest segment received {received['rcv_mss']} < MSS {sent['snd_mss']}"
    )


def test_udp_datagrams_arrive_intact(cluster: Cluster):
    mtu = cluster.spec.pod_mtu
    # up to a full-size frame, one byte over (fragmented), and multi-fragment datagrams
    sizes = [1, 64, 512, mtu - IP_UDP_HEADERS, mtu - IP_UDP_HEADERS + 1, 4000, 8000]
    for src, dst in [(cluster.nodes[0].pods[1], cluster.nodes[1].pods[0])]:
        server = start_server(dst, UDP_ECHO, 7200)
        try:
            res = process.run(
                src.netns,
                [sys.executable, "-c", UDP_CLIENT, str(dst.ip), "7200", "7", *map(str, sizes)],
                check=False,
                timeout=60,
            )
        finally:
            finish(server, timeout=10)
        assert res.returncode == 0, res.stderr
        results = json.loads(res.stdout)
        bad = {size: outcome for size, outcome in results.items() if outcome != "intact"}
        assert not bad, f"{src.ip} -> {dst.ip}: datagrams not echoed intact: {bad}"


def test_df_ping_at_the_pod_mtu_crosses(cluster: Cluster):
    payload = cluster.spec.pod_mtu - IP_UDP_HEADERS  # ICMP header is 8 bytes, like UDP's
    src, dst = cluster.nodes[0].pods[0], cluster.nodes[1].pods[1]
    argv = ping(dst, "-M", "do", "-s", str(payload), "-c", "3", "-i", "0.2", "-W", "2")
    res = process.run(src.netns, argv, check=False, timeout=20)
    assert res.returncode == 0, f"full-size DF ping failed:\n{res.stdout}{res.stderr}"


def test_df_ping_over_the_pod_mtu_fails_loudly(cluster: Cluster):
    mtu = cluster.spec.pod_mtu
    src, dst = cluster.nodes[0].pods[0], cluster.nodes[1].pods[1]
    argv = ping(dst, "-M", "do", "-s", str(mtu - IP_UDP_HEADERS + 1), "-c", "1", "-W", "2")
    started = time.monotonic()
    res = process.run(src.netns, argv, check=False, timeout=20)
    elapsed = time.monotonic() - started
    output = res.stdout + res.stderr
    assert res.returncode != 0, f"an oversized DF ping got through:\n{output}"
    assert str(mtu) in output, f"the error does not name the MTU {mtu}:\n{output}"
    assert elapsed < 2.0, f"took {elapsed:.1f} s: silence and a timeout, not an error"


def test_counters_of_the_backend_grow(cluster: Cluster):
    n0, n1 = cluster.nodes
    label = backend_label(cluster)
    other = "host-gw" if label == "vxlan" else "vxlan"
    outbound, inbound = ("encap", "decap") if label == "vxlan" else ("forward", "deliver")
    before = {n.index: cluster.counters(n) for n in cluster.nodes}
    # 5 echo requests each way and their replies: 10 out of and 10 into each node
    for src, dst in [(n0.pods[0], n1.pods[0]), (n1.pods[1], n0.pods[1])]:
        res = process.run(src.netns, ping(dst, "-c", "5", "-i", "0.1", "-W", "2"), check=False)
        assert res.returncode == 0, res.stdout + res.stderr
    tcp_transfer(n0.pods[1], n1.pods[1], 7300, 3)
    for node in cluster.nodes:
        grown = cluster.counters(node).since(before[node.index])
        assert grown.packets(label, outbound) >= 10, f"{node.netns}: {grown.traffic}"
        assert grown.packets(label, inbound) >= 10, f"{node.netns}: {grown.traffic}"
        for direction in ("encap", "decap", "forward", "deliver"):
            assert grown.packets(other, direction) == 0, f"{node.netns}: {grown.traffic}"
        assert not grown.drops(), f"{node.netns}: packets dropped: {grown.drops()}"


def _bpftool(node: Node, *args: str):
    # keep_mounts: `ip netns exec` would hide the pins on /sys/fs/bpf
    res = process.run(node.netns, ["bpftool", "-j", *args], keep_mounts=True, timeout=30)
    return json.loads(res.stdout)


def test_bpftool_shows_programs_and_typed_maps(cluster: Cluster):
    for node in cluster.nodes:
        net = _bpftool(node, "net", "show")[0]
        tc = sorted((p["kind"], p["name"]) for p in net["tc"] if p["devname"] == "flannel.1")
        on_tunnel = [("clsact/egress", "tunnel_egress")]
        if cluster.spec.ingress_hook is IngressHook.KERNEL:
            on_tunnel.append(("clsact/ingress", "tunnel_ingress"))
        assert tc == sorted(on_tunnel), net
        xdp = [p for p in net["xdp"] if p["devname"] == "eth0"]
        underlay_tc = [(p["kind"], p["name"]) for p in net["tc"] if p["devname"] == "eth0"]
        if cluster.spec.ingress_hook is IngressHook.XDP:
            assert len(xdp) == 1 and not underlay_tc, net
            prog = _bpftool(node, "prog", "show", "id", str(xdp[0]["id"]))
            assert prog["name"] == "underlay_xdp"
        else:
            build = BuildParams(
                maps_dir=node.bpffs,
                kernel_decap=cluster.spec.ingress_hook is IngressHook.KERNEL,
                udp_fast_path=cluster.spec.udp_fast_path,
            ).program_name("underlay_tc")
            # On a tcx link (the underlay had no clsact qdisc), which bpftool shows pinned.
            assert not xdp and underlay_tc == [], net
            (pin,) = [p for p in os.listdir(f"{node.bpffs}/links") if p.startswith("underlay_tc@")]
            link = _bpftool(node, "link", "show", "pinned", f"{node.bpffs}/links/{pin}")
            prog = _bpftool(node, "prog", "show", "id", str(link["prog_id"]))
            assert prog["name"] == build

        entries = _bpftool(node, "map", "dump", "pinned", f"{node.bpffs}/maps/subnets")
        (peer,) = [n for n in cluster.nodes if n is not node]
        assert len(entries) == 1, entries
        key, value = entries[0]["formatted"]["key"], entries[0]["formatted"]["value"]
        assert set(key) == {"prefixlen", "addr"}
        assert {"public_ip", "vtep_mac", "backend"} <= set(value)
        assert key["prefixlen"] == peer.subnet.prefixlen
        assert key["addr"] == int.from_bytes(peer.subnet.network_address.packed, sys.byteorder)
        assert value["public_ip"] == int.from_bytes(peer.public_ip.packed, sys.byteorder)
        lease = peer.lease(cluster.spec.backend).peer()
        assert value["backend"] == layout.BACKEND_CODES[lease.backend]
        assert bytes(value["vtep_mac"]).hex(":") == lease.vtep_mac


@pytest.fixture(params=BACKENDS, ids=[b.value for b in BACKENDS])
def mixed_cluster(request: pytest.FixtureRequest, lab_prerequisites: None) -> Iterator[Cluster]:
    """One flannel-xdp node and one node programmed exactly as stock flanneld programs it."""
    nodes = (NodeSpec(Dataplane.FLANNEL_XDP, pods=1), NodeSpec(Dataplane.FLANNELD, pods=1))
    with Cluster(ClusterSpec(nodes=nodes, backend=request.param)) as lab:
        yield lab


def test_mixed_cluster_with_a_stock_flanneld_node(mixed_cluster: Cluster):
    xdp_pod, kernel_pod = mixed_cluster.pods
    for seed, (src, dst) in enumerate([(xdp_pod, kernel_pod), (kernel_pod, xdp_pod)]):
        res = process.run(src.netns, ping(dst, "-c", "3", "-i", "0.2", "-W", "2"), check=False)
        assert res.returncode == 0, f"{src.ip} -> {dst.ip}:\n{res.stdout}{res.stderr}"
        received, _, expected = tcp_transfer(src, dst, 7400 + seed, 100 + seed)
        assert received["sha256"] == expected, f"{src.ip} -> {dst.ip}: payload corrupted"
    counters = mixed_cluster.counters(mixed_cluster.nodes[0])
    label = backend_label(mixed_cluster)
    outbound, inbound = ("encap", "decap") if label == "vxlan" else ("forward", "deliver")
    assert counters.packets(label, outbound) > 0 and counters.packets(label, inbound) > 0
    assert not counters.drops(), counters.drops()
