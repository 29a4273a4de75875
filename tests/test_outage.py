"""Faults the data path must ride out: a registry outage and agent crashes.

Real agents in a three-node VXLAN lab (tests/lab_support.py). Traffic runs between
pods on different nodes throughout: a ping at 100 per second, whose every reply is
accounted for, and a paced TCP stream whose receiver hashes every byte (sha256,
checked against the sender's at the end) and records the longest pause between
arrivals.

* Registry outage: etcd is killed for OUTAGE_SECONDS and started again on the same
  data directory. No ping is lost and the stream never pauses; every agent stays up,
  reports not-ready (/readyz and the registry_up gauge) and retries with a growing
  backoff. Leases are changed "meanwhile": the restarted etcd first serves only its
  loopback port (its unix socket, which the agents use, is created elsewhere and only
  moved into place once the changes are written), so the agents cannot see the
  changes happen and must resync on their own; their maps and routes then hold
  exactly the changed set and they are ready again.
* Agent crash: one node's agent is SIGKILLed and restarted CRASH_ROUNDS times while
  the traffic crosses that node (and, KILL_ROUNDS times, killed with its loader child at
  a random moment of its start, every other start compiling its programs, with and
  without the fast path); nothing is lost, and
  afterwards the node holds the same pins (same map ids), the same number of BPF
  programs and maps, and the same links, addresses, routes, qdiscs, filters and
  iptables rules as after its first start. Every BPF object the lab ever had is gone
  once the lab is torn down.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from flannel_xdp.backend import Backend
from flannel_xdp.lab import agents, process
from flannel_xdp.lab.agentcluster import ETCD_PREFIX, AgentCluster
from flannel_xdp.loader.fast_path import Mode
from flannel_xdp.maps.views import Peer
from flannel_xdp.registry.lease import LeaseAttrs
from tests import node_state_support
from tests.lab_support import agent_cluster
from tests.node_state_support import (
    Seen,
    netns_state,
    node_bpf,
    pins,
    state_diff,
    system_bpf_ids,
    wait_gone,
)
from tests.traffic_support import POD_SCAN_SETTLE, Stream, traffic_through

pytestmark = pytest.mark.lab

OUTAGE_SECONDS = 60.0  # how long etcd is down: a whole minute, not a blip
CRASH_ROUNDS = 20  # SIGKILL + restart cycles of one agent, once ready
KILL_ROUNDS = 20  # SIGKILL (agent and loader child) at a random moment of a start
# The agents notice a dead registry within a probe interval plus one call timeout
# (agent.PROBE_INTERVAL + registry.CALL_TIMEOUT); from then on /readyz must say 503.
NOT_READY_WITHIN = 10.0
# etcd back -> every agent ready with the changed leases: its next retry comes within
# agent.BACKOFF_MAX (5 s), plus a call timeout at worst (registry.CALL_TIMEOUT, 5 s).
RESYNC_TIMEOUT = 15.0
VXLAN_DEV = "flannel.1"


# -- the lab ----------------------------------------------------------------------------

seen = node_state_support.seen  # the fixture: none of the lab's BPF objects outlives it


@pytest.fixture
def lab(seen: Seen, request: pytest.FixtureRequest) -> Iterator[AgentCluster]:
    """Three vxlan nodes; a test parametrized indirectly adds spec fields (the fast path)."""
    extra = getattr(request, "param", {})
    # ip-masq on: its iptables rules are part of what a restart must not duplicate
    with agent_cluster(
        nodes=3, pods=1, backend=Backend.VXLAN, ip_masq=True, outside=False, **extra
    ) as cluster:
        seen.add(cluster)
        yield cluster


def drop_counts(lab: AgentCluster) -> dict[str, dict[tuple[str, str], int]]:
    """Packets each node's programs dropped, by (backend, reason)."""
    out = {}
    for node in lab.agent_nodes:
        reasons = lab.counters(node).reasons
        out[node.netns] = {k: v[0] for k, v in reasons.items() if k[1].startswith("DROP")}
    return out


def check_no_drops(before: dict, after: dict) -> None:
    grew = {
        ns: {k: n - before[ns].get(k, 0) for k, n in counts.items() if n > before[ns].get(k, 0)}
        for ns, counts in after.items()
    }
    assert not any(grew.values()), f"the programs dropped packets meanwhile: {grew}"


def lease_key(subnet: IPv4Network) -> str:
    return f"{ETCD_PREFIX}/subnets/{subnet.network_address}-{subnet.prefixlen}"


def vxlan_peer(subnet: IPv4Network, attrs: LeaseAttrs) -> Peer:
    assert attrs.vtep_mac is not None
    return Peer(subnet, attrs.public_ip, Backend.VXLAN, attrs.vtep_mac)


def leases_as_peers(lab: AgentCluster) -> dict[IPv4Network, Peer]:
    out = {}
    for name, value in lab.leases().items():
        subnet = IPv4Network(name.replace("-", "/"))
        out[subnet] = vxlan_peer(subnet, LeaseAttrs.from_json(json.dumps(value)))
    return out


def programmed_differences(lab: AgentCluster, peers: dict[IPv4Network, Peer]) -> list[str]:
    """Where a node's map or routes differ from the leases peers (empty: all in line)."""
    problems = []
    for node in lab.agent_nodes:
        want = {s: p for s, p in peers.items() if s != node.subnet}
        have = lab.map_peers(node)
        if have != want:
            problems.append(f"{node.netns}: map {sorted(map(str, have.values()))}")
        routes = lab.routes(node)
        if routes != {s: VXLAN_DEV for s in want}:
            problems.append(f"{node.netns}: routes {routes}")
    return problems


def wait_programmed(lab: AgentCluster, peers: dict[IPv4Network, Peer], timeout: float) -> float:
    """Until every agent is ready with exactly peers in its map and routes; seconds taken."""
    started = time.monotonic()
    while True:
        problems = programmed_differences(lab, peers)
        problems += [f"{n.netns}: not ready" for n in lab.agent_nodes if not lab.ready(n)]
        if not problems:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            want = sorted(map(str, peers.values()))
            raise AssertionError(
                f"not programmed after {timeout:.0f} s (want {want}):\n" + "\n".join(problems)
            )
        time.sleep(0.1)


def free_subnets(lab: AgentCluster, count: int) -> list[IPv4Network]:
    """Subnets of the network nobody leases (from the top, away from what agents took)."""
    taken = {n.subnet for n in lab.nodes}
    subnets = reversed(list(lab.spec.network.subnets(new_prefix=24)))
    return [s for s in subnets if s not in taken][:count]


# -- etcd outage --------------------------------------------------------------------------


class ReadinessLog:
    """Polls every agent's /readyz (and its registry_up gauge) in a thread."""

    def __init__(self, lab: AgentCluster, interval: float = 0.5):
        self.lab, self.interval = lab, interval
        self.samples: list[tuple[float, str, bool, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for node in self.lab.agent_nodes:
                ready = self.lab.ready(node)
                try:
                    up = agents.sample(self.lab.scrape(node), "flannel_xdp_registry_up")
                except OSError:
                    up = None
                self.samples.append((time.monotonic(), node.netns, ready, up))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def between(self, ns: str, start: float, end: float) -> list[tuple[bool, float | None]]:
        return [(r, up) for t, n, r, up in self.samples if n == ns and start <= t <= end]


def etcd_argv(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def restart_etcd_hidden(lab: AgentCluster, argv: list[str]) -> str:
    """Start etcd again with its old command line (same data dir, same ports) but in
    another working directory: it makes its unix socket, the agents' only way in, there.
    Returns that socket's path; rename it to lab.etcd.socket_path to let the agents in."""
    hidden = os.path.join(lab.etcd.workdir, "hidden")
    os.makedirs(hidden, exist_ok=True)
    with open(lab.etcd.log_path, "ab") as out:
        proc = process.start_daemon(argv, out, cwd=hidden, detach=False)
    # the lab's teardown stops what lab.etcd holds
    lab.etcd._proc = proc  # type: ignore[attr-defined]
    lab.etcd.pid = proc.pid
    deadline = time.monotonic() + 30
    sock = os.path.join(hidden, os.path.basename(lab.etcd.socket_path))
    while not (lab.etcd.healthy() and os.path.exists(sock)):
        assert proc.poll() is None, f"etcd did not restart:\n{lab.etcd.log_tail()}"
        assert time.monotonic() < deadline, f"etcd not healthy again:\n{lab.etcd.log_tail()}"
        time.sleep(0.05)
    return sock


_RETRY = re.compile(r"registry unreachable \((.*)\); retrying in ([\d.]+) s")


def test_etcd_outage_keeps_traffic_and_resyncs_changed_leases(
    lab: AgentCluster, seen: Seen, tmp_path: Path
):
    """etcd killed for OUTAGE_SECONDS: traffic flows on, the agents stay up, say not ready
    and back off; changes made before they can reach etcd again are all applied."""
    n0, n1, n2 = lab.agent_nodes
    # Two leases of made-up nodes, to be deleted and changed while etcd is down; a third
    # to be added then. Public IPs on the underlay that no namespace holds.
    gone_net, changed_net, added_net = free_subnets(lab, 3)
    gone = LeaseAttrs(IPv4Address("192.0.2.201"), "vxlan", vni=1, vtep_mac="02:00:00:00:02:01")
    changed = LeaseAttrs(IPv4Address("192.0.2.202"), "vxlan", vni=1, vtep_mac="02:00:00:00:02:02")
    changed2 = LeaseAttrs(IPv4Address("192.0.2.212"), "vxlan", vni=1, vtep_mac="02:00:00:00:02:12")
    added = LeaseAttrs(IPv4Address("192.0.2.203"), "vxlan", vni=1, vtep_mac="02:00:00:00:02:03")
    for subnet, attrs in ((gone_net, gone), (changed_net, changed)):
        lab.etcd.put(lease_key(subnet), attrs.to_json())
    wait_programmed(lab, leases_as_peers(lab), 20)
    seen.add(lab)
    real = {n.subnet for n in lab.nodes}
    assert set(leases_as_peers(lab)) == real | {gone_net, changed_net}
    log_offsets = {n.netns: os.path.getsize(n.log_file) for n in lab.agent_nodes}
    errors_before = {
        n.netns: agents.sample(lab.scrape(n), "flannel_xdp_registry_errors_total")
        for n in lab.agent_nodes
    }

    drops_before = drop_counts(lab)
    readiness = ReadinessLog(lab)
    try:
        with traffic_through(lab, (n0.pods[0], n1.pods[0]), (n2.pods[0], n0.pods[0]), tmp_path) as (
            pinger,
            stream,
        ):
            time.sleep(2.0)
            assert lab.etcd.pid is not None
            argv = etcd_argv(lab.etcd.pid)
            lab.etcd.stop()  # SIGKILL: etcd is gone, its data dir stays
            assert not lab.etcd.running
            down_at = time.monotonic()
            time.sleep(OUTAGE_SECONDS / 2)
            mid = {n.netns: lab.scrape(n) for n in lab.agent_nodes}
            time.sleep(max(0.0, down_at + OUTAGE_SECONDS - time.monotonic()))
            alive = {n.netns: lab.process_alive(n) for n in lab.agent_nodes}

            hidden_sock = restart_etcd_hidden(lab, argv)
            # "meanwhile": etcd answers on loopback, the agents still cannot reach it
            assert lab.etcd.delete(lease_key(gone_net)) == 1
            lab.etcd.put(lease_key(changed_net), changed2.to_json())
            lab.etcd.put(lease_key(added_net), added.to_json())
            expected = leases_as_peers(lab)
            assert set(expected) == real | {changed_net, added_net}
            still_down = [n.netns for n in lab.agent_nodes if lab.ready(n)]
            back_offsets = {n.netns: os.path.getsize(n.log_file) for n in lab.agent_nodes}
            os.replace(hidden_sock, lab.etcd.socket_path)  # the agents' way in is back
            up_at = time.monotonic()
            outage = up_at - down_at

            resync = wait_programmed(lab, expected, RESYNC_TIMEOUT)
            time.sleep(1.0)
            pinged = pinger.stop()
            streamed = stream.stop()
    finally:
        readiness.stop()
    seen.add(lab)

    print(
        f"etcd down {outage:.1f} s; agents resynced {resync:.1f} s after it came back; "
        f"ping {pinged.label}: {pinged.answered}/{pinged.sent} in {pinged.elapsed:.1f} s; "
        f"{Stream.figures(streamed)}"
    )
    assert all(alive.values()), f"an agent exited during the outage: {alive}"
    assert not still_down, f"{still_down} reported ready while they could not reach etcd"
    pinged.check()
    Stream.check(streamed)
    check_no_drops(drops_before, drop_counts(lab))

    for node in lab.agent_nodes:
        ns = node.netns
        # /readyz: ready before, 503 from shortly after the kill until etcd returned
        before = readiness.between(ns, 0, down_at)
        assert before and all(r for r, _ in before), f"{ns} not ready before the outage"
        during = readiness.between(ns, down_at + NOT_READY_WITHIN, up_at)
        assert len(during) >= (OUTAGE_SECONDS - NOT_READY_WITHIN) / 2, f"{ns}: few polls"
        assert not any(r for r, _ in during), f"{ns} reported ready during the outage"
        assert all(up == 0 for _, up in during), f"{ns}: registry_up not 0 during the outage"
        assert agents.sample(mid[ns], "flannel_xdp_registry_up") == 0
        assert agents.sample(mid[ns], "flannel_xdp_ready") == 0
        errors_now = agents.sample(lab.scrape(node), "flannel_xdp_registry_errors_total")
        assert errors_now > errors_before[ns]
        assert lab.ready(node) and agents.sample(lab.scrape(node), "flannel_xdp_registry_up") == 1

        # retries with a growing backoff, capped (agent.BACKOFF_MIN .. BACKOFF_MAX)
        with open(node.log_file, errors="replace") as f:
            f.seek(log_offsets[ns])
            log = f.read()
        delays = [float(m.group(2)) for m in _RETRY.finditer(log)]
        print(f"{ns}: {len(delays)} retries, delays {delays}")
        assert len(delays) >= 5, f"{ns}: retries logged: {delays}\n{log[-3000:]}"
        assert delays == sorted(delays), f"{ns}: the backoff shrank: {delays}"
        assert delays[0] <= 0.2 and delays[-1] == 5.0, f"{ns}: backoff {delays}"
        # a retry every <= 5 s (plus a call timeout) over the whole outage
        assert len(delays) >= OUTAGE_SECONDS / 15, f"{ns}: only {len(delays)} retries"

    # each agent caught up by itself: one full sync with exactly the three changes, or
    # (when its watch from the last revision it saw came up first) the three events
    full = re.compile(r"synced \d+ peers from revision \d+ \(1 added, 1 changed, 1 removed\)")
    events = [
        f"peer {gone_net} removed",
        f"peer {changed_net} via {changed2.public_ip}",
        f"peer {added_net} via {added.public_ip}",
    ]
    for node in lab.agent_nodes:
        with open(node.log_file, errors="replace") as f:
            f.seek(back_offsets[node.netns])
            log = f.read()
        how = (
            "full sync" if full.search(log) else "events" if all(e in log for e in events) else None
        )
        print(f"{node.netns}: caught up by {how}")
        assert how, f"{node.netns} applied the changes how?\n{log[-3000:]}"

    # exactly the changed leases, on every node (maps and routes), checked once more
    assert not programmed_differences(lab, expected)
    for node in lab.agent_nodes:
        peers = lab.map_peers(node)
        assert gone_net not in peers
        assert peers[changed_net] == vxlan_peer(changed_net, changed2)
        assert peers[added_net] == vxlan_peer(added_net, added)


# -- agent crashes ------------------------------------------------------------------------


def test_sigkill_agent_repeatedly_during_traffic_leaks_nothing(
    lab: AgentCluster, seen: Seen, tmp_path: Path
):
    """CRASH_ROUNDS x (SIGKILL the agent, restart it) under traffic through its node:
    nothing lost, and the node ends as it began (pins, BPF objects, links, rules)."""
    victim, other, third = lab.agent_nodes
    rng = random.Random(7)

    took: list[float] = []
    # the ping goes through the victim both ways; the stream leaves from its pod
    with traffic_through(
        lab, (other.pods[0], victim.pods[0]), (victim.pods[0], third.pods[0]), tmp_path
    ) as (pinger, stream):
        # The fast path (the default) attaches its pod links to pods that have talked: the
        # node's picture is taken with the traffic on.
        time.sleep(POD_SCAN_SETTLE)
        first_pins = pins(victim)
        first_bpf = node_bpf(victim)
        first_state = netns_state(victim.netns)
        system_before = system_bpf_ids()
        drops_before = drop_counts(lab)
        for i in range(CRASH_ROUNDS):
            lab.kill_process(victim, signal.SIGKILL)
            assert not lab.process_alive(victim), f"round {i}: the agent survived SIGKILL"
            time.sleep(rng.uniform(0.1, 1.0))  # the data path runs on its own meanwhile
            took.append(lab.restart_process(victim))
            seen.add(lab)
        time.sleep(1.0)
        pinged = pinger.stop()
        streamed = stream.stop()

    system_after = system_bpf_ids()
    print(
        f"{CRASH_ROUNDS} SIGKILL + restart rounds: restart to ready {min(took):.1f}-"
        f"{max(took):.1f} s (median {sorted(took)[len(took) // 2]:.1f}); ping {pinged.label}: "
        f"{pinged.answered}/{pinged.sent} in {pinged.elapsed:.1f} s; "
        f"{Stream.figures(streamed)}; "
        f"system-wide programs {len(system_before[0])} -> {len(system_after[0])}, "
        f"maps {len(system_before[1])} -> {len(system_after[1])}"
    )
    pinged.check()
    Stream.check(streamed)
    check_no_drops(drops_before, drop_counts(lab))

    # the same pins, the same maps behind them (adopted, not made anew)
    assert pins(victim) == first_pins
    now = node_bpf(victim)
    assert now.pinned_maps == first_bpf.pinned_maps, "a restart replaced pinned maps"
    assert len(now.progs) == len(first_bpf.progs), (
        f"programs of the node: {sorted(first_bpf.progs)} -> {sorted(now.progs)}"
    )
    assert len(now.maps) == len(first_bpf.maps), (
        f"maps of the node: {sorted(first_bpf.maps)} -> {sorted(now.maps)}"
    )
    # every program and map an earlier incarnation had and the current one does not use
    left = wait_gone(seen.progs[victim.netns] - now.progs, seen.maps[victim.netns] - now.maps)
    assert not any(left), f"programs {sorted(left[0])} and maps {sorted(left[1])} leaked"
    diff = state_diff(first_state, netns_state(victim.netns))
    assert not diff, f"the node's links, routes, qdiscs, filters or rules changed:\n{diff}"
    assert lab.process_alive(victim) and lab.ready(victim)
    assert len(lab.leases()) == 3


@pytest.mark.parametrize(
    "lab",
    # default: no fast-path flag, TCP on the fast path too, conntrack's window checks on
    # (the agent marks the flows the fast path carries; a killed agent leaves them marked)
    [{"fast_path": Mode.OFF}, {}],
    indirect=True,
    ids=["stack-path", "default"],
)
def test_sigkill_at_any_moment_of_the_agents_life(lab: AgentCluster, seen: Seen, tmp_path: Path):
    """Kubelet restarts a crashing agent whenever it crashes, and kills the whole container:
    KILL_ROUNDS x (start the agent, SIGKILL it and its loader child at a random moment of
    its start: before, during or after the install, in the first sync, or once ready),
    then a last start. Every other start has an empty build cache of its own, so that the
    kills also land while bcc compiles and replaces the pinned programs; the others keep
    them. Meanwhile a ping crosses the node both ways and a stream runs each way through
    it: nothing lost, no stream broken, and the node ends as it began."""
    victim, other, third = lab.agent_nodes
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    # how long each kind of start takes here and now: the kills spread over it and beyond
    lab.kill_process(victim, signal.SIGKILL)
    start_took = lab.restart_process(victim)
    lab.kill_process(victim, signal.SIGKILL)
    lab.set_flags(victim, build_cache=str(tmp_path / "builds-first"))
    compile_took = lab.restart_process(victim)

    moments: list[float] = []
    with traffic_through(
        lab, (other.pods[0], victim.pods[0]), (victim.pods[0], third.pods[0]), tmp_path
    ) as (pinger, outbound):
        inbound = Stream(third.pods[0], victim.pods[0], seed=9)
        try:
            # The fast path attaches its pod links to pods that have talked: the node's
            # picture is taken with the traffic on.
            time.sleep(POD_SCAN_SETTLE)
            first_pins = pins(victim)
            first_bpf = node_bpf(victim)
            first_state = netns_state(victim.netns)
            drops_before = drop_counts(lab)
            for i in range(KILL_ROUNDS):
                lab.kill_process(victim, signal.SIGKILL, tree=True)
                assert not lab.process_alive(victim), f"round {i}: the agent survived SIGKILL"
                time.sleep(rng.uniform(0.0, 0.3))
                compiles = i % 2 == 0
                if compiles:
                    lab.set_flags(victim, build_cache=str(tmp_path / f"builds-{i}"))
                else:
                    lab.set_flags(victim)
                lab.start_process(victim)
                moments.append(rng.uniform(0.0, 1.2 * (compile_took if compiles else start_took)))
                time.sleep(moments[-1])
                seen.add(lab)
            lab.kill_process(victim, signal.SIGKILL, tree=True)
            lab.set_flags(victim)
            last_took = lab.restart_process(victim)
            time.sleep(POD_SCAN_SETTLE)
            pinged = pinger.stop()
            streamed = [outbound.stop(), inbound.stop()]
        finally:
            inbound.kill()

    print(
        f"{KILL_ROUNDS} kills (seed {seed}) at {', '.join(f'{m:.1f}' for m in moments)} s "
        f"into a start that takes {compile_took:.1f} s compiling (even rounds), "
        f"{start_took:.1f} s keeping; last start {last_took:.1f} s; ping "
        f"{pinged.label}: {pinged.answered}/{pinged.sent}; "
        + "; ".join(Stream.figures(r) for r in streamed)
    )
    where = f" (seed {seed}; kills at {[round(m, 2) for m in moments]} s into a start)"
    try:
        pinged.check()
        for result in streamed:
            Stream.check(result)
        check_no_drops(drops_before, drop_counts(lab))
    except AssertionError as exc:
        raise AssertionError(f"{exc}{where}") from None
    now_pins = pins(victim)
    assert now_pins == first_pins, (
        f"pins gone {sorted(first_pins - now_pins)}, new {sorted(now_pins - first_pins)}{where}"
    )
    now = node_bpf(victim)
    assert now.pinned_maps == first_bpf.pinned_maps, f"a restart replaced pinned maps{where}"
    assert len(now.progs) == len(first_bpf.progs), where
    assert len(now.maps) == len(first_bpf.maps), where
    left = wait_gone(seen.progs[victim.netns] - now.progs, seen.maps[victim.netns] - now.maps)
    assert not any(left), f"programs {sorted(left[0])} and maps {sorted(left[1])} leaked{where}"
    diff = state_diff(first_state, netns_state(victim.netns))
    assert not diff, f"the node's links, routes, qdiscs, filters or rules changed{where}:\n{diff}"
    assert lab.process_alive(victim) and lab.ready(victim)
