"""A real Prometheus scrapes the agents of a lab through their own metrics endpoints.

Prometheus runs inside the lab's "outside" namespace (198.51.100.254, on the underlay
switch) and scrapes each agent at its node's 198.51.100.x address: nothing listens
or is queried outside the lab's namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from flannel_xdp.lab import traffic
from tests.lab_support import agent_cluster
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.lab

PROM_PORT = 9099


def query(ns: str, expr: str) -> list[dict]:
    res = subprocess.run(
        [
            "nsenter",
            f"--net=/run/netns/{ns}",
            "curl",
            "-sf",
            "--max-time",
            "2",
            f"http://127.0.0.1:{PROM_PORT}/api/v1/query",
            "--data-urlencode",
            f"query={expr}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        return []
    return json.loads(res.stdout)["data"]["result"]


def test_prometheus_scrapes_two_agents():
    require_root_and_bcc("prometheus", "curl")
    with agent_cluster(nodes=2, pods=1, ip_masq=False, outside=True) as lab:
        nodes = lab.agent_nodes
        targets = [f"{n.outside_ip}:{lab.spec.metrics_port}" for n in nodes]
        src, dst = nodes[0].pods[0], nodes[1].pods[0]
        assert traffic.ping(src.netns, str(dst.ip), count=5).received == 5
        workdir = tempfile.mkdtemp(prefix="fxdp-prom-")
        with open(f"{workdir}/prometheus.yml", "w") as f:
            f.write(
                "global:\n  scrape_interval: 1s\n"
                "scrape_configs:\n  - job_name: flannel-xdp-agents\n"
                f"    static_configs:\n      - targets: {json.dumps(targets)}\n"
            )
        prom = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{lab.outside_ns}",
                "prometheus",
                f"--config.file={workdir}/prometheus.yml",
                f"--storage.tsdb.path={workdir}/data",
                f"--web.listen-address=127.0.0.1:{PROM_PORT}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            series: list[dict] = []
            while time.monotonic() < deadline:
                series = query(lab.outside_ns, "flannel_xdp_packets_total")
                up = query(lab.outside_ns, "up")
                if {s["metric"]["instance"] for s in series} == set(targets) and all(
                    s["value"][1] == "1" for s in up
                ):
                    break
                time.sleep(0.5)
            got = {
                (s["metric"]["instance"], s["metric"]["backend"], s["metric"]["direction"]): float(
                    s["value"][1]
                )
                for s in series
            }
            assert {i for i, _, _ in got} == set(targets), f"Prometheus returned {series}"
            assert {b for _, b, _ in got} == {"vxlan", "host-gw"}
            assert got[(targets[0], "vxlan", "encap")] >= 5
            assert got[(targets[1], "vxlan", "decap")] >= 5
            leases = query(lab.outside_ns, 'flannel_xdp_leases{backend="vxlan"}')
            assert sorted(float(s["value"][1]) for s in leases) == [1.0, 1.0]
            ready = query(lab.outside_ns, "flannel_xdp_ready")
            assert [s["value"][1] for s in ready] == ["1", "1"]
        finally:
            prom.terminate()
            prom.wait(timeout=10)
            shutil.rmtree(workdir, ignore_errors=True)


def readyz(ns: str, port: int) -> int:
    res = subprocess.run(
        [
            "nsenter",
            f"--net=/run/netns/{ns}",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "2",
            f"http://127.0.0.1:{port}/readyz",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(res.stdout or 0)


def test_readyz_follows_the_registry():
    """Not ready while etcd does not answer (paused), ready again once it does; traffic flows
    throughout on what the maps hold."""
    require_root_and_bcc("curl")
    with agent_cluster(nodes=2, pods=1, ip_masq=False, outside=False) as lab:
        node = lab.agent_nodes[0]
        port = lab.spec.healthz_port
        assert readyz(node.netns, port) == 200
        pid = lab.etcd.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and readyz(node.netns, port) != 503:
                time.sleep(0.3)
            assert readyz(node.netns, port) == 503
            src, dst = node.pods[0], lab.agent_nodes[1].pods[0]
            assert traffic.ping(src.netns, str(dst.ip), count=5).received == 5
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and readyz(node.netns, port) != 200:
            time.sleep(0.3)
        assert readyz(node.netns, port) == 200
