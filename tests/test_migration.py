"""A rolling migration under traffic: flanneld -> flannel-xdp one node at a time, and back.

Three nodes start as real flanneld nodes (etcd mode, vxlan), one pod each made by the
real CNI chain. Throughout, every ordered pair of nodes has a ping at 100 per second
whose every reply is accounted for, and every pair of nodes a sha256-checked TCP stream
(tests/traffic_support.py's Pinger and Stream). Then each node in turn moves over
(AgentCluster.replace_dataplane: SIGTERM to flanneld, the agent started with the same
flags; it takes the lease whose PublicIP is its own and the VtepMAC of flanneld's
flannel.1), afterwards each moves back to flanneld, and then each moves over once more.
Each step keeps the node's lease exactly (subnet, PublicIP, VtepMAC): the other nodes have
nothing to relearn.

Per step the pings lost are printed (run with -s) and carried in the assertion messages.
flannel.<VNI> is swapped under traffic both ways (loader/handover.py), with the default
kernel hook through the tc hook's veth tunnel, so that no moment is without a path.
The underlay's program goes on a tcx link, as no qdisc is added to a device that carries
traffic (adding one drops what it sends for a moment; loader/underlay_tc.py).
Asserted: no step loses a ping; no stream breaks or loses a byte; every lease stays
exactly as it was.
"""

from __future__ import annotations

import time
from itertools import permutations
from pathlib import Path

import pytest

from flannel_xdp.lab.agentcluster import AgentCluster, LabNode
from flannel_xdp.lab.topology import Dataplane
from tests.lab_support import agent_cluster, node_label
from tests.traffic_support import PING_INTERVAL, POD_SCAN_SETTLE, Pinger, PingOutcome, Stream

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

# Seconds of traffic before and after each step: a step's pings are those of this window
# plus the step itself (an agent's start takes 3-6 s here, mostly compiling; flanneld's
# under a second). After a step, what the new data plane does on its own (the agent's pod
# scan attaching the fast path) happens within POD_SCAN_SETTLE: the window covers it, and
# the streams run through every step and are checked at the end.
SETTLE = POD_SCAN_SETTLE + 0.5
PING_MS = 1000 * float(PING_INTERVAL)  # one lost ping: this much outage on its pair


def _pingers(lab: AgentCluster, tmp: Path, step: int) -> list[Pinger]:
    pods = {n.index: n.pods[0] for n in lab.nodes}
    return [
        Pinger(pods[a], pods[b], tmp / f"ping-{step}-{a}-{b}.out") for a, b in permutations(pods, 2)
    ]


def _step(
    lab: AgentCluster, node: LabNode, to: Dataplane, tmp: Path, step: int
) -> tuple[str, list[PingOutcome], float]:
    before = lab.leases()
    pingers = _pingers(lab, tmp, step)
    try:
        time.sleep(SETTLE)
        took = lab.replace_dataplane(node, to)
        time.sleep(SETTLE)
    finally:
        outcomes = [p.stop() for p in pingers]
    after = lab.leases()
    assert after == before, f"step {step}: the leases changed:\n{before}\n{after}"
    return f"{node.name} -> {to.value}", outcomes, took


def test_rolling_migration_under_traffic(tmp_path: Path) -> None:
    with agent_cluster(nodes=3, pods=1, stock=3, ip_masq=True, outside=False) as lab:
        assert all(n.dataplane is Dataplane.FLANNELD for n in lab.nodes)
        pods = {n.index: n.pods[0] for n in lab.nodes}
        # one stream per pair of nodes, around the ring: each pod serves one (one port)
        ring = [(a, (a + 1) % len(pods)) for a in pods]
        streams = [Stream(pods[a], pods[b], seed=a * 10 + b) for a, b in ring]
        rows, problems = [], []
        try:
            plan = [(n, Dataplane.FLANNEL_XDP) for n in lab.nodes]
            plan += [(n, Dataplane.FLANNELD) for n in lab.nodes]
            plan += [(n, Dataplane.FLANNEL_XDP) for n in lab.nodes]
            for step, (node, to) in enumerate(plan, 1):
                label, outcomes, took = _step(lab, node, to, tmp_path, step)
                sent = sum(o.sent for o in outcomes)
                lost = sum(len(o.lost) for o in outcomes)
                per_pair = ", ".join(f"{o.label} {len(o.lost)}" for o in outcomes if o.lost)
                pairs = sum(1 for o in outcomes if o.lost)
                rows.append((step, label, sent, lost, took, per_pair, pairs))
                if lost:
                    problems.append(f"step {step} ({label}): {lost} of {sent} pings lost")
                assert lab.process_alive(node), node_label(node)
        finally:
            results = []
            for s in streams:
                try:
                    results.append(s.stop())
                except AssertionError as exc:
                    results.append({"label": s.label, "error": str(exc)})
        table = [
            f"step {step}: {label:16} {lost:5} of {sent:6} pings lost "
            f"({100 * lost / max(sent, 1):.2f} %, {lost / max(pairs, 1) * PING_MS:.0f} ms per "
            f"pair through the node), "
            f"converged in {took:.1f} s" + (f" [{per_pair}]" if per_pair else "")
            for step, label, sent, lost, took, per_pair, pairs in rows
        ]
        total_sent = sum(r[2] for r in rows)
        total_lost = sum(r[3] for r in rows)
        table.append(
            f"total: {total_lost} of {total_sent} pings lost "
            f"({100 * total_lost / max(total_sent, 1):.2f} %)"
        )
        for r in results:
            if "error" in r:
                table.append(f"stream {r['label']}: BROKEN {r['error']}")
            else:
                table.append(f"stream {r['label']}: " + Stream.figures(r))
        report = "\n".join(table)
        print("\nrolling migration flanneld -> flannel-xdp -> flanneld -> flannel-xdp\n" + report)
        for r in results:
            if "error" in r:
                problems.append(f"stream {r['label']} broke: {r['error']}")
            elif not (r["bytes"] == r["sent"] and r["sha_ok"]):
                problems.append(f"stream {r['label']}: {r['bytes']} of {r['sent']} bytes, sha256")
        assert not problems, "; ".join(problems) + "\n" + report
