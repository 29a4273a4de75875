"""Agent-driven labs for the end-to-end tests: built per module, always removed, checked clean.

agent_cluster() brings up an AgentCluster (real agents, a real etcd) under a random
name, yields it, and tears it down afterwards, also when the test failed; then it
checks that nothing is left: no netns with the lab's prefix, no pin directory, no
process naming the lab's run directory, no run directory. Missing root or tools fail
the test with the reason (never skip).
"""

from __future__ import annotations

import contextlib
import glob
import os
import subprocess
from collections.abc import Iterator
from itertools import product

import pytest

from flannel_xdp.lab import preflight, process, traffic
from flannel_xdp.lab.agentcluster import AgentCluster, AgentClusterSpec, LabNode, random_name
from flannel_xdp.lab.agents import THIS_RELEASE, AgentRelease
from flannel_xdp.lab.topology import LabError, Pod
from tests.conftest import LAB_TOOLS
from tests.etcd_support import require_etcd
from tests.requirements import require_root_and_bcc

IP_ICMP_HEADERS = 28  # 20 IPv4 + 8 ICMP (the same as IPv4 + UDP)
IP_TCP_HEADERS = 40
TCP_TIMESTAMP_OPTION = 12


def require_lab() -> None:
    require_root_and_bcc(*LAB_TOOLS)
    require_etcd()
    problems = preflight.problems()
    if problems:
        pytest.fail("the lab cannot run here: " + "; ".join(problems))


def leftovers(lab: AgentCluster) -> list[str]:
    """Whatever of lab still exists (nothing, after down())."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    left = [
        f"netns {line.split()[0]}"
        for line in res.stdout.splitlines()
        if line.startswith(lab.prefix + "-")
    ]
    left += [f"pins {p}" for p in glob.glob(os.path.join(lab.spec.bpffs_root, lab.prefix + "-*"))]
    left += [f"pid {p}" for p in process.pids_with(lab.run_dir + os.sep)]
    if os.path.exists(lab.run_dir):
        left.append(f"run dir {lab.run_dir}")
    return left


@contextlib.contextmanager
def agent_cluster(release: AgentRelease = THIS_RELEASE, **kwargs) -> Iterator[AgentCluster]:
    """kwargs: AgentClusterSpec's fields; release: the installation the agents run from."""
    require_lab()
    lab = AgentCluster(AgentClusterSpec(name=random_name(), **kwargs), release)
    try:
        lab.up()
    except LabError as exc:  # up() has removed what it made
        pytest.fail(f"the lab did not come up: {exc}")
    try:
        yield lab
    finally:
        with contextlib.suppress(LabError):  # the check below names what is left
            lab.down()
        left = leftovers(lab)
        assert not left, f"lab {lab.spec.name} left behind: {left}"


def cross_node_pairs(lab: AgentCluster) -> list[tuple[Pod, Pod]]:
    return [(a, b) for a, b in product(lab.pods, repeat=2) if a.node != b.node]


@contextlib.contextmanager
def probe_servers(endpoints: list[tuple[str, str]]) -> Iterator[None]:
    """A probe server (TCP sha256 + UDP echo) on each (netns, ip)."""
    procs = []
    try:
        for ns, ip in endpoints:
            procs.append(traffic.start_probe_server(ns, ip))
        yield
    finally:
        traffic.stop(procs)


def check_all_pairs(
    lab: AgentCluster, udp_sizes: tuple[int, ...] = (1, 512, 1400), tcp_bytes: int = 256 << 10
) -> list[str]:
    """ICMP, payload-checked TCP and UDP between every cross-node pod pair; problems found."""
    pairs = cross_node_pairs(lab)
    problems = []
    for (a, b), p in zip(
        pairs, traffic.ping_many([(a.netns, str(b.ip)) for a, b in pairs]), strict=True
    ):
        if not p.ok:
            problems.append(f"ping {a.ip} -> {b.ip}: {p.received}/{p.sent}\n{p.output}")
    with probe_servers([(p.netns, str(p.ip)) for p in lab.pods]):
        jobs = [(a.netns, [str(b.ip) for x, b in pairs if x is a]) for a in lab.pods]
        for (ns, _), results in zip(
            jobs, traffic.probe_many(jobs, size=tcp_bytes, udp_sizes=udp_sizes), strict=True
        ):
            problems += [
                f"{ns} -> {r['dst']}: {traffic.probe_problem(r)}"
                for r in results
                if not traffic.probe_ok(r)
            ]
    return problems


def node_label(node: LabNode) -> str:
    return f"{node.netns} ({node.dataplane}, {node.public_ip}, {node.subnet})"
