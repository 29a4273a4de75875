"""The virtual cluster end to end: real agents, a real etcd, pods made as the CNI plugin does.

Module-scoped clusters of three nodes with two pods each (one per network config:
vxlan, host-gw, vxlan with DirectRouting), built from the registry alone: the
agents take their leases, write subnet.env, and the lab makes cni0 and the pods
from it. On them: every pod pair in every protocol, node hosts and pods both ways,
a kube-proxy style Service, ip-masq towards a host outside the cluster, MTU, and
nodes joining and leaving while traffic runs. Then a mixed cluster (one stock
flanneld node), `flannel-xdp lab up|status|down` from separate processes, and the
demo entry point itself. Every cluster is removed afterwards and checked for
leftovers (netns, pins, processes, run directory).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from itertools import product

import pytest

from flannel_xdp.backend import Backend
from flannel_xdp.lab import process, traffic
from flannel_xdp.lab.agentcluster import (
    ETCD_PREFIX,
    SERVICE_NETWORK,
    AgentCluster,
    LabNode,
    random_name,
    run_dir_for,
)
from flannel_xdp.lab.etcd import ETCDCTL
from flannel_xdp.lab.topology import Counters, Dataplane, Pod
from tests.lab_support import (
    IP_ICMP_HEADERS,
    IP_TCP_HEADERS,
    TCP_TIMESTAMP_OPTION,
    agent_cluster,
    check_all_pairs,
    cross_node_pairs,
    leftovers,
    probe_servers,
    require_lab,
)

pytestmark = pytest.mark.lab

CONFIGS = {
    "vxlan": {"backend": Backend.VXLAN},
    "host-gw": {"backend": Backend.HOST_GW},
    "directrouting": {"backend": Backend.VXLAN, "direct_routing": True},
}
# What each config's peers become in the subnets map: all nodes share one L2 segment.
EXPECTED_BACKEND = {
    "vxlan": Backend.VXLAN,
    "host-gw": Backend.HOST_GW,
    "directrouting": Backend.HOST_GW,
}
MEMBERSHIP_DEADLINE = 1.0
VIP = SERVICE_NETWORK.network_address + 10
VIP_PORT = 80
VXLAN_ONLY = pytest.mark.parametrize("cluster", ["vxlan"], indirect=True)


@pytest.fixture(scope="module", params=list(CONFIGS))
def cluster(request: pytest.FixtureRequest) -> Iterator[AgentCluster]:
    with agent_cluster(
        nodes=3, pods=2, ip_masq=True, outside=True, **CONFIGS[request.param]
    ) as lab:
        lab.config_name = request.param  # type: ignore[attr-defined]
        yield lab


def traffic_counters(lab: AgentCluster) -> dict[int, Counters]:
    return {n.index: lab.counters(n) for n in lab.agent_nodes}


def df_ping(dst: Pod, payload: int, count: int) -> list[str]:
    """ping with Don't Fragment set and payload bytes of ICMP data."""
    argv = ["ping", "-n", "-M", "do", "-s", str(payload), "-c", str(count), "-i", "0.2"]
    return [*argv, "-W", "2", str(dst.ip)]


# -- every config -------------------------------------------------------------------------


def test_every_pod_pair_talks_icmp_tcp_udp(cluster: AgentCluster):
    """24 ordered pairs: ping, a payload-checked TCP transfer, UDP echoes up to a fragmented
    datagram; over the backend the config asks for, counted as such, nothing dropped."""
    mtu = cluster.nodes[0].mtu
    assert mtu is not None
    before = traffic_counters(cluster)
    sizes = (1, 512, mtu - IP_ICMP_HEADERS, mtu - IP_ICMP_HEADERS + 1, 4000)
    problems = check_all_pairs(cluster, udp_sizes=sizes)
    assert not problems, "\n".join(problems)

    want = EXPECTED_BACKEND[cluster.config_name]  # type: ignore[attr-defined]
    label = "vxlan" if want is Backend.VXLAN else "host-gw"
    outbound, inbound = ("encap", "decap") if want is Backend.VXLAN else ("forward", "deliver")
    for node in cluster.agent_nodes:
        peers = cluster.map_peers(node)
        others = {n.subnet for n in cluster.nodes if n is not node}
        assert set(peers) == others, f"{node.netns}: map has {set(peers)}, want {others}"
        assert {p.backend for p in peers.values()} == {want}, peers
        grown = cluster.counters(node).since(before[node.index])
        assert grown.packets(label, outbound) > 0, f"{node.netns}: {grown.traffic}"
        assert grown.packets(label, inbound) > 0, f"{node.netns}: {grown.traffic}"
        assert not grown.drops(), f"{node.netns}: dropped {grown.drops()}"


def test_node_host_reaches_remote_pods(cluster: AgentCluster):
    """From each node's own netns (its host) to every pod on the other nodes: ping and TCP."""
    jobs = [(n.netns, p) for n in cluster.nodes for p in cluster.pods if p.node != n.index]
    pings = traffic.ping_many([(ns, str(p.ip)) for ns, p in jobs])
    failed = [
        f"{ns} -> {p.ip}: {r.received}/{r.sent}"
        for (ns, p), r in zip(jobs, pings, strict=True)
        if not r.ok
    ]
    assert not failed, failed
    with probe_servers([(p.netns, str(p.ip)) for p in cluster.pods]):
        for node in cluster.nodes:
            targets = [str(p.ip) for p in cluster.pods if p.node != node.index]
            for r in traffic.probe(node.netns, targets, size=64 << 10):
                assert traffic.probe_ok(r), (
                    f"{node.netns} -> {r['dst']}: {traffic.probe_problem(r)}"
                )
                # the host talks from its tunnel address, <subnet>.0, as with flanneld
                assert r["tcp"]["peer"] == str(node.tunnel_ip), r


def test_remote_pod_reaches_node_host(cluster: AgentCluster):
    """From every pod to every other node's host: its cni0 gateway (through the tunnel or
    host-gw route) and its underlay address."""
    jobs = []
    for pod in cluster.pods:
        for node in cluster.nodes:
            if node.index != pod.node:
                jobs += [(pod.netns, str(node.gateway)), (pod.netns, str(node.public_ip))]
    results = traffic.ping_many(jobs)
    failed = [
        f"{ns} -> {dst}: {r.received}/{r.sent}"
        for (ns, dst), r in zip(jobs, results, strict=True)
        if not r.ok
    ]
    assert not failed, failed


def test_full_size_segments_cross_and_df_over_mtu_fails(cluster: AgentCluster):
    """The pods got FLANNEL_MTU; TCP runs at the matching MSS and full-size segments arrive;
    a DF ping at the MTU crosses, one byte more fails at once, naming the MTU."""
    a, b = cluster.nodes[0].pods[0], cluster.nodes[1].pods[1]
    mtu = cluster.nodes[0].mtu
    assert mtu == (1450 if cluster.spec.backend is Backend.VXLAN else 1500)
    for pod in (a, b):
        link = json.loads(process.run(pod.netns, ["ip", "-j", "link", "show", "eth0"]).stdout)
        assert link[0]["mtu"] == mtu, f"{pod.netns}: MTU {link[0]['mtu']}, subnet.env says {mtu}"
    with probe_servers([(b.netns, str(b.ip))]):
        (r,) = traffic.probe(a.netns, [str(b.ip)], size=4 << 20, udp_sizes=())
    assert r["tcp"]["ok"], r
    snd_mss = r["tcp"]["snd_mss"]
    assert mtu - IP_TCP_HEADERS - TCP_TIMESTAMP_OPTION <= snd_mss <= mtu - IP_TCP_HEADERS, r
    assert r["tcp"]["rcv_mss"] == snd_mss, (
        f"largest segment received {r['tcp']['rcv_mss']} < MSS {snd_mss}"
    )

    ok = process.run(a.netns, df_ping(b, mtu - IP_ICMP_HEADERS, count=3), check=False)
    assert traffic.parse_ping(ok.stdout).received == 3, (
        f"full-size DF ping:\n{ok.stdout}{ok.stderr}"
    )
    started = time.monotonic()
    over = process.run(a.netns, df_ping(b, mtu - IP_ICMP_HEADERS + 1, count=1), check=False)
    output = over.stdout + over.stderr
    assert over.returncode != 0, f"an oversized DF ping got through:\n{output}"
    assert str(mtu) in output, f"the error does not name the MTU {mtu}:\n{output}"
    assert time.monotonic() - started < 2.0, "silence and a timeout, not an error"


# -- vxlan only ---------------------------------------------------------------------------


@VXLAN_ONLY
def test_kube_proxy_service_dnat_carries_tcp_and_replies(cluster: AgentCluster):
    """A Service VIP on node A, DNATed as kube-proxy does (nat PREROUTING for pods, OUTPUT
    for the host) to a pod on node B: a pod on A and A's host talk to it through the BPF
    tunnel, replies un-NATed by conntrack on A, payload intact."""
    node_a, node_b = cluster.nodes[0], cluster.nodes[1]
    client, backend = node_a.pods[0], node_b.pods[0]
    target = f"{backend.ip}:{traffic.PROBE_PORT}"
    rules = [
        [chain, "-d", f"{VIP}/32", "-p", proto, "--dport", str(VIP_PORT), "-m", "comment",
         "--comment", "test service", "-j", "DNAT", "--to-destination", target]
        for chain in ("PREROUTING", "OUTPUT")
        for proto in ("tcp", "udp")
    ]  # fmt: skip
    for rule in rules:
        process.run(node_a.netns, ["iptables", "-w", "-t", "nat", "-A", *rule])
    # A real node finds a route for a VIP (its default route) before OUTPUT DNAT re-routes
    # the packet; the lab's nodes have no default route, so the service range gets one.
    service_route = ["route", "add", str(SERVICE_NETWORK), "dev", "eth0"]
    process.run(node_a.netns, ["ip", *service_route])
    before = cluster.counters(node_a)
    try:
        with probe_servers([(backend.netns, str(backend.ip))]):
            (from_pod,) = traffic.probe(client.netns, [str(VIP)], port=VIP_PORT, size=1 << 20)
            (from_host,) = traffic.probe(node_a.netns, [str(VIP)], port=VIP_PORT, size=1 << 20)
    finally:
        for rule in rules:
            process.run(node_a.netns, ["iptables", "-w", "-t", "nat", "-D", *rule], check=False)
        process.run(node_a.netns, ["ip", "route", "del", str(SERVICE_NETWORK)], check=False)
    assert traffic.probe_ok(from_pod), traffic.probe_problem(from_pod)
    assert traffic.probe_ok(from_host), traffic.probe_problem(from_host)
    # no SNAT on the way: the backend pod sees the client pod itself
    assert from_pod["tcp"]["peer"] == str(client.ip), from_pod
    grown = cluster.counters(node_a).since(before)
    assert grown.packets("vxlan", "encap") > 0 and grown.packets("vxlan", "decap") > 0, (
        grown.traffic
    )
    left = process.run(node_a.netns, ["iptables", "-w", "-t", "nat", "-S"]).stdout
    assert "test service" not in left


@VXLAN_ONLY
def test_ip_masq_to_a_host_outside_the_cluster(cluster: AgentCluster):
    """With --ip-masq a pod reaches 198.51.100.254 (no route back to the pod network) and
    the outside host sees the node's address, not the pod's."""
    outside = str(cluster.outside_ip)
    with probe_servers([(cluster.outside_ns, outside)]):
        for node in cluster.nodes:
            pod = node.pods[0]
            (r,) = traffic.probe(pod.netns, [outside], size=256 << 10)
            assert traffic.probe_ok(r), f"{pod.netns} -> {outside}: {traffic.probe_problem(r)}"
            assert r["tcp"]["peer"] == str(node.outside_ip), (
                f"outside host saw {r['tcp']['peer']}, not {node.netns}'s {node.outside_ip}"
            )
            p = traffic.ping(pod.netns, outside)
            assert p.ok, p.output
    rules = process.run(
        cluster.nodes[0].netns, ["iptables", "-w", "-t", "nat", "-S", "FLANNEL-POSTRTG"]
    ).stdout
    assert "MASQUERADE" in rules and "flanneld masq" in rules, rules


class _LeaseWatch:
    """etcdctl watch under the network prefix: when each lease key was put or deleted.

    Established before it returns (a sentinel key outside subnets/, which no agent
    watches, must come through), so no lease event can slip by unseen or be replayed
    late from history."""

    SENTINEL = f"{ETCD_PREFIX}/lab-test-watch"

    def __init__(self, lab: AgentCluster):
        self.events: list[tuple[float, str, str]] = []  # (monotonic time, PUT|DELETE, key)
        self.proc = subprocess.Popen(
            [ETCDCTL, f"--endpoints={lab.etcd.url}", "watch", "--prefix", f"{ETCD_PREFIX}/"],
            env={**os.environ, "ETCDCTL_API": "3"},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not any(name == self.SENTINEL for _, _, name in self.events):
            assert time.monotonic() < deadline, "etcdctl watch did not start"
            lab.etcd.put(self.SENTINEL, "1")
            time.sleep(0.1)
        lab.etcd.delete(self.SENTINEL)

    def _read(self) -> None:
        assert self.proc.stdout
        kind = None
        for line in self.proc.stdout:
            line = line.strip()
            if line in ("PUT", "DELETE"):
                kind = line
            elif kind and line.startswith(ETCD_PREFIX):
                self.events.append((time.monotonic(), kind, line))
                kind = None

    def first_put(self, other_than: set[str], timeout: float = 30.0) -> tuple[float, str]:
        """The first lease key put that is not in other_than: (when, key)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, k, name in self.events:
                if k == "PUT" and "/subnets/" in name and name not in other_than:
                    return t, name
            time.sleep(0.002)
        raise AssertionError(f"no new lease appeared in etcd within {timeout} s")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def _programmed(lab: AgentCluster, node: LabNode, subnet) -> bool:
    if subnet not in lab.routes(node):
        return False
    return not node.is_agent or subnet in lab.map_peers(node)


def _first_time(cond, timeout: float = 10.0, step: float = 0.005) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.monotonic()
        time.sleep(step)
    return None


@VXLAN_ONLY
def test_nodes_join_and_leave_while_traffic_runs(cluster: AgentCluster):
    """A fourth node joins: every other node routes to its subnet (route and map entry)
    within 1 s of its lease appearing in etcd, and its pods answer the first ping from
    every other pod as soon as they exist. Its lease is deleted (etcdctl del): every other
    node drops the route and map entry within 1 s and its agent exits ("Lease has been
    revoked"). Pod traffic between the other nodes runs at 100 pings/s throughout and
    loses nothing."""
    old_nodes = list(cluster.nodes)
    a, b = old_nodes[0].pods[0], old_nodes[1].pods[0]
    background = process.spawn(a.netns, ["ping", "-n", "-q", "-i", "0.009", "-W", "1", str(b.ip)])
    watch = _LeaseWatch(cluster)
    known = {cluster.lease_key(n) for n in old_nodes}
    new = None
    try:
        new = cluster.add_node(wait=False)  # returns once its agent runs
        appeared, key = watch.first_put(known)
        subnet = IPv4Network(key.rsplit("/", 1)[1].replace("-", "/"))
        late = []
        for node in old_nodes:
            seen = _first_time(lambda node=node: _programmed(cluster, node, subnet))
            took = None if seen is None else round(seen - appeared, 3)
            print(f"join: {node.netns} programmed {subnet} {took} s after its lease appeared")
            if took is None or took > MEMBERSHIP_DEADLINE:
                late.append(f"{node.netns}: {took} s")
        assert not late, f"joined node's subnet {subnet} programmed too late: {late}"
        cluster.finish_node(new)  # subnet.env written: the CNI side makes its pods
        assert new.subnet == subnet

        pods_ready = time.monotonic()
        jobs = [(p.netns, str(q.ip)) for p in cluster.pods for q in new.pods if p.node != new.index]
        procs = [process.spawn(ns, ["ping", "-n", "-c", "1", "-W", "1", dst]) for ns, dst in jobs]
        failed = [
            f"{ns} -> {dst}" for (ns, dst), p in zip(jobs, procs, strict=True) if p.wait(5) != 0
        ]
        assert not failed, f"new pods not reachable within 1 s of existing: {failed}"
        assert time.monotonic() - pods_ready < 2.0

        deleted = time.monotonic()  # before etcdctl runs: the measured time is an upper bound
        cluster.delete_lease(new)
        late = []
        for node in old_nodes:
            gone = _first_time(lambda node=node: not _programmed(cluster, node, new.subnet))
            took = None if gone is None else round(gone - deleted, 3)
            print(f"leave: {node.netns} removed {new.subnet} {took} s after the lease was deleted")
            if took is None or took > MEMBERSHIP_DEADLINE:
                late.append(f"{node.netns}: {took} s")
        assert not late, f"left node's subnet {new.subnet} removed too late: {late}"
        for node in old_nodes:
            if node.is_agent:
                assert new.subnet not in cluster.map_peers(node)
        assert _first_time(lambda: not cluster.process_alive(new), timeout=10) is not None, (
            "the agent whose lease was deleted kept running"
        )
        with open(new.log_file) as f:
            assert "Lease has been revoked" in f.read()
    finally:
        watch.close()
        background.send_signal(signal.SIGINT)
        out, _ = background.communicate(timeout=10)
        if new is not None and new in cluster.nodes:
            cluster.remove_node(new)
    result = traffic.parse_ping(out)
    assert result.sent > 100, out
    assert result.lost == 0, f"background traffic lost {result.lost} of {result.sent} pings"
    assert cluster.converged() == []


# -- a mixed cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed() -> Iterator[AgentCluster]:
    with agent_cluster(nodes=3, pods=2, stock=1, ip_masq=True, outside=False) as lab:
        yield lab


def test_mixed_cluster_all_pairs_both_ways(mixed: AgentCluster):
    """One stock flanneld node (kernel vxlan device, programmed as flanneld does from the
    same etcd) and two flannel-xdp nodes: every pod pair, both ways, all protocols."""
    stock = [n for n in mixed.nodes if n.dataplane is Dataplane.FLANNELD]
    assert len(stock) == 1 and len(mixed.agent_nodes) == 2
    (kernel,) = stock
    problems = check_all_pairs(mixed)
    assert not problems, "\n".join(problems)
    assert {
        (mixed.node_of(a).is_agent, mixed.node_of(b).is_agent) for a, b in cross_node_pairs(mixed)
    } == {(True, True), (True, False), (False, True)}
    # the stock node runs the kernel's vxlan device, with FDB entries for the agents' VtepMACs
    link = json.loads(
        process.run(kernel.netns, ["ip", "-j", "-d", "link", "show", "flannel.1"]).stdout
    )
    assert link[0]["linkinfo"]["info_kind"] == "vxlan"
    fdb = process.run(kernel.netns, ["bridge", "fdb", "show", "dev", "flannel.1"]).stdout
    leases = mixed.leases()
    for node in mixed.agent_nodes:
        mac = leases[f"{node.subnet.network_address}-{node.subnet.prefixlen}"]["BackendData"][
            "VtepMAC"
        ]
        assert f"{mac} dst {node.public_ip}" in fdb, fdb
        peer = mixed.map_peers(node)[kernel.subnet]
        assert peer.backend is Backend.VXLAN
        assert peer.vtep_mac == link[0]["address"], "agent does not use the stock node's VtepMAC"


# -- the lab CLI and the demo -------------------------------------------------------------


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flannel_xdp.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_lab_cli_up_status_down_from_separate_processes():
    """`lab up` returns with the cluster running (here: host-gw, one stock node); `status`
    from another process sees it ready; pods talk; `down` removes everything and is safe
    to repeat."""
    require_lab()
    name = random_name()
    lab = None
    try:
        up = _cli(
            "lab",
            "up",
            "--name",
            name,
            "--nodes",
            "2",
            "--pods",
            "1",
            "--backend",
            "host-gw",
            "--stock",
            "1",
        )
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"flannel-xdp lab down --name {name}" in up.stdout
        status = _cli("lab", "status", "--name", name, "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        state = json.loads(status.stdout)
        assert [n["dataplane"] for n in state["nodes"]] == ["flannel-xdp", "flanneld"]
        assert all(n["ready"] and n["running"] and n["routes"] == 1 for n in state["nodes"]), state
        lab = AgentCluster.load(name)
        a, b = lab.pods
        assert traffic.ping(a.netns, str(b.ip)).ok and traffic.ping(b.netns, str(a.ip)).ok
        down = _cli("lab", "down", "--name", name)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not leftovers(lab), leftovers(lab)
        again = _cli("lab", "down", "--name", name)
        assert again.returncode == 0 and "nothing to remove" in again.stdout, (
            again.stdout + again.stderr
        )
        gone = _cli("lab", "status", "--name", name)
        assert gone.returncode == 3, gone.stdout
    finally:
        _cli("lab", "down", "--name", name)
        if lab is not None:
            assert not leftovers(lab)


ROW = re.compile(
    r"^\s+n(\d)/p(\d) (\S+)\s+->\s+n(\d)/p(\d) (\S+)\s+(\S+)\s+(\d)/(\d)\s+([\d.]+) ms\s+"
    r"([\d.]+) (Gbit|Mbit)/s\s+(\S+)$"
)


def test_demo_entry_point_passes_and_prints_its_table():
    """`flannel-xdp demo` (what `make demo` runs): exit 0, a row per cross-node pod pair
    (24), each reachable with an RTT, a throughput and an intact payload; per-node counters;
    and nothing left behind."""
    require_lab()
    name = random_name()
    started = time.monotonic()
    try:
        res = _cli("demo", "--name", name, timeout=300)
    finally:
        lab = AgentCluster.load(name)
        if lab.exists():
            lab.down()
    elapsed = time.monotonic() - started
    output = res.stdout + res.stderr
    assert res.returncode == 0, output
    rows = [m for line in res.stdout.splitlines() if (m := ROW.match(line))]
    assert len(rows) == 24, f"want 24 pair rows:\n{res.stdout}"
    pairs = {(m.group(1), m.group(2), m.group(4), m.group(5)) for m in rows}
    assert pairs == {(a, pa, b, pb) for a, pa, b, pb in product("012", "01", "012", "01") if a != b}
    for m in rows:
        assert m.group(7) == "vxlan" and m.group(8) == m.group(9) == "3", m.group(0)
        assert float(m.group(11)) > 0 and m.group(13) == "ok", m.group(0)
    for node in ("n0", "n1", "n2"):
        assert re.search(
            rf"^\s+{node}\s+http://192\.0\.2\.\d+:9100/metrics\s+2\s+[1-9]", res.stdout, re.M
        ), res.stdout
    assert "bpftool map dump pinned" in res.stdout and "flannel-xdp inspect --bpffs" in res.stdout
    assert "demo passed" in res.stdout
    assert not os.path.exists(run_dir_for(name))
    assert not leftovers(lab), leftovers(lab)
    assert elapsed < 120, f"the demo took {elapsed:.0f} s"
