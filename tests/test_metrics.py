"""Prometheus metrics and `flannel-xdp inspect` against a real two-node lab.

The exporters read the pinned maps of lab nodes at scrape time, as the agent's
endpoint does; they listen on loopback only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from flannel_xdp.backend import Backend
from flannel_xdp.lab import Cluster, ClusterSpec, Node, Pod, process
from flannel_xdp.lab.etcd import free_port
from flannel_xdp.loader.compile import BuildParams
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.loader.datapath import programs as datapath_programs
from flannel_xdp.metrics.datapath import DataPathCollector
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.lab

DATAGRAMS = 50
PAYLOAD = 100
# What the counters count: the inner Ethernet frame (Ethernet + IPv4 + UDP + payload).
FRAME = 14 + 20 + 8 + PAYLOAD

SENDER = r"""
import socket, sys
dst, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    s.sendto(bytes([i % 256]) * size, (dst, port))
"""

SINK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(5)
print("ready", flush=True)
got = 0
try:
    while got < int(sys.argv[3]):
        s.recv(65535)
        got += 1
except TimeoutError:
    pass
print(got, flush=True)
"""


class Exporter:
    """A /metrics endpoint on loopback for one node's pins."""

    def __init__(self, node: Node):
        self.registry = CollectorRegistry()
        self.registry.register(DataPathCollector(os.path.join(node.bpffs, "maps")))
        self.port = free_port()
        self.server, self.thread = start_http_server(
            self.port, addr="127.0.0.1", registry=self.registry
        )

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def close(self) -> None:
        assert isinstance(self.server, WSGIServer)
        self.server.shutdown()
        self.server.server_close()


def sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if not labels and line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
        if line.startswith(name + "{"):
            got = line[len(name) + 1 : line.index("}")]
            if ",".join(sorted(got.split(","))) == want:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{want}}} in the scrape")


@pytest.fixture(scope="module", params=list(IngressHook), ids=[h.value for h in IngressHook])
def lab(request: pytest.FixtureRequest) -> Iterator[tuple[Cluster, list[Exporter]]]:
    require_root_and_bcc("promtool", "prometheus")
    spec = ClusterSpec.uniform(nodes=2, pods=1, backend=Backend.VXLAN, ingress_hook=request.param)
    with Cluster(spec) as cluster:
        exporters = [Exporter(n) for n in cluster.nodes]
        try:
            yield cluster, exporters
        finally:
            for e in exporters:
                e.close()


def send_udp(src: Pod, dst: Pod, port: int) -> int:
    sink = process.spawn(dst.netns, ["python3", "-c", SINK, str(dst.ip), str(port), str(DATAGRAMS)])
    try:
        assert sink.stdout is not None
        assert sink.stdout.readline().strip() == "ready"
        process.run(
            src.netns,
            ["python3", "-c", SENDER, str(dst.ip), str(port), str(DATAGRAMS), str(PAYLOAD)],
        )
        out, _ = sink.communicate(timeout=10)
        return int(out.strip())
    finally:
        if sink.poll() is None:
            sink.kill()


def test_counters_match_the_traffic(lab):
    cluster, (exp0, exp1) = lab
    src, dst = cluster.nodes[0].pods[0], cluster.nodes[1].pods[0]
    before0, before1 = exp0.scrape(), exp1.scrape()
    delivered = send_udp(src, dst, 7600)
    after0, after1 = exp0.scrape(), exp1.scrape()
    assert delivered == DATAGRAMS

    def grown(before: str, after: str, name: str, direction: str) -> float:
        labels = {"backend": "vxlan", "direction": direction}
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grown(before0, after0, "flannel_xdp_packets_total", "encap") == DATAGRAMS
    assert grown(before0, after0, "flannel_xdp_bytes_total", "encap") == DATAGRAMS * FRAME
    assert grown(before1, after1, "flannel_xdp_packets_total", "decap") == DATAGRAMS
    assert grown(before1, after1, "flannel_xdp_bytes_total", "decap") == DATAGRAMS * FRAME
    assert sample(after0, "flannel_xdp_map_entries", map="subnets") == 1
    assert sample(after0, "flannel_xdp_datapath_up") == 1


def test_promtool_accepts_a_live_scrape(lab):
    _, (exp0, _) = lab
    text = exp0.scrape()
    res = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for name in (
        "flannel_xdp_packets_total",
        "flannel_xdp_bytes_total",
        "flannel_xdp_drops_total",
        "flannel_xdp_passed_total",
    ):
        assert f"# TYPE {name} counter" in text


def test_a_real_prometheus_scrapes_both_nodes(lab):
    cluster, exporters = lab
    send_udp(cluster.nodes[1].pods[0], cluster.nodes[0].pods[0], 7601)
    workdir = tempfile.mkdtemp(prefix="fxdp-prom-")
    port = free_port()
    targets = [f"127.0.0.1:{e.port}" for e in exporters]
    with open(os.path.join(workdir, "prometheus.yml"), "w") as f:
        f.write(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n  - job_name: flannel-xdp\n"
            f"    static_configs:\n      - targets: {json.dumps(targets)}\n"
        )
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={workdir}/prometheus.yml",
            f"--storage.tsdb.path={workdir}/data",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = f"http://127.0.0.1:{port}/api/v1/query?query=flannel_xdp_packets_total"
        deadline = time.monotonic() + 30
        series: list = []
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(query, timeout=2) as r:
                    series = json.load(r)["data"]["result"]
            except OSError:
                series = []
            if {s["metric"]["instance"] for s in series} == set(targets):
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
        assert got[(targets[1], "vxlan", "encap")] >= DATAGRAMS
        assert got[(targets[0], "vxlan", "decap")] >= DATAGRAMS
    finally:
        prom.terminate()
        prom.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_inspect_shows_the_known_peers(lab):
    cluster, _ = lab
    for node in cluster.nodes:
        res = subprocess.run(
            [".venv/bin/flannel-xdp", "inspect", "--bpffs", node.bpffs, "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(res.stdout)
        (peer,) = [n for n in cluster.nodes if n is not node]
        lease = peer.lease(cluster.spec.backend).peer()
        assert report["peers"] == [
            {
                "subnet": str(lease.subnet),
                "public_ip": str(lease.public_ip),
                "vtep_mac": lease.vtep_mac,
                "backend": "vxlan",
            }
        ]
        assert report["node"]["subnet"] == str(node.subnet)
        assert report["node"]["public_ip"] == str(node.public_ip)
        programs = {p["pin"]: p["name"] for p in report["programs"]}
        build = BuildParams(
            maps_dir=node.bpffs,
            kernel_decap=cluster.spec.ingress_hook is IngressHook.KERNEL,
            udp_fast_path=cluster.spec.udp_fast_path,
        )
        assert programs == {
            p.name: build.program_name(p.name)
            for p in datapath_programs(cluster.spec.ingress_hook, cluster.spec.udp_fast_path)
        }
        if cluster.spec.ingress_hook is not IngressHook.XDP:  # underlay_tc on a tcx link
            (link,) = [x for x in report["links"] if x["pin"].startswith("underlay_tc@")]
            assert link["program"] == build.program_name("underlay_tc"), link
            underlay = int(report["node"]["underlay_ifindex"])
            assert (link["ifindex"], link["direction"]) == (underlay, "ingress"), link
        text = subprocess.run(
            [".venv/bin/flannel-xdp", "inspect", "--bpffs", node.bpffs],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert str(lease.subnet) in text and str(lease.public_ip) in text


def test_every_metric_the_dashboard_queries_exists(lab):
    """Scrape an agent's full registry (data path + control plane) and check the dashboard."""
    from prometheus_client import generate_latest

    from flannel_xdp.agent.agent import Agent, AgentOptions
    from flannel_xdp.registry.etcd import parse_endpoints

    cluster, _ = lab
    agent = Agent(
        AgentOptions(
            etcd_endpoints=parse_endpoints("http://127.0.0.1:1"), bpffs=cluster.nodes[0].bpffs
        )
    )
    agent.metrics.sync_seconds.labels("full").observe(0.01)
    scraped = generate_latest(agent.metrics.registry).decode()
    names = {
        line.split("{")[0].split(" ")[0]
        for line in scraped.splitlines()
        if line and not line.startswith("#")
    }
    path = os.path.join(os.path.dirname(__file__), "..", "metrics", "grafana-dashboard.json")
    with open(path) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    queried = {m for e in exprs for m in re.findall(r"flannel_xdp_\w+", e)}
    assert queried, "the dashboard queries no flannel_xdp metric"
    missing = queried - names
    assert not missing, f"the dashboard queries metrics the agent does not export: {missing}"
