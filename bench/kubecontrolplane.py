"""Control-plane benchmark in Kubernetes mode: python -m flannel_xdp.bench.kubecontrolplane

A real `flannel-xdp agent --kube-subnet-mgr` process against the real kube-apiserver of
`make peers` (with its own etcd), measured from outside, as bench/controlplane.py does
for etcd mode:

* full sync: N Node objects (1,000 by default) with podCIDRs and the annotations
  flanneld writes -> every peer in the agent's pinned subnets map, and ready (map and
  routes); timed from the agent's "wrote <subnet file>" line.
* one Node added -> in the map, and reachable (map and route): a POST of a Node that
  carries flanneld's annotations, then the map and the node's routing table polled
  every millisecond; p50/p99 over the additions.
* agent memory: VmRSS with N peers.
* requests the agent makes while idle: apiserver_request_total for nodes over the idle
  window, from the apiserver's own metrics (nothing else asks for nodes meanwhile); the
  agent's watch stays open and is not a request per second.

Targets: N = 1,000: < 3 s to the map, addition p99 < 200 ms, RSS < 120 MB, idle ~0
requests per second beyond the watch.

Set-up, all throwaway: the apiserver on 127.0.0.1 (lab/kube.py), one node namespace
whose loopback relays to it (lab.kube.relay), the agent in that namespace with the admin
kubeconfig and NODE_NAME; torn down at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import platform
import secrets
import shutil
import ssl
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from flannel_xdp.bench.controlplane import (
    AgentProcess,
    BenchError,
    BenchNode,
    Routes,
    _check_prerequisites,
    _present,
    count_entries,
    in_routes_thread,
    open_map,
    poll,
    render_rows,
    summarize,
    write_report,
)
from flannel_xdp.lab.kube import KubeApiServer, relay
from flannel_xdp.registry.config import parse_config
from flannel_xdp.registry.kube_annotations import Annotations, lease_annotations
from flannel_xdp.registry.lease import LeaseAttrs

log = logging.getLogger("flannel_xdp.bench.kubecontrolplane")

DEFAULT_OUT = Path(__file__).resolve().parent / "kubecontrolplane.json"
NODE_NAME = "bench-node"
# Documentation/benchmark ranges only: 8,192 /28 podCIDRs in 198.18.0.0/15.
NET_CONF = {"Network": "198.18.0.0/15", "SubnetLen": 28, "Backend": {"Type": "vxlan"}}
EVENT_TIMEOUT = 5.0
START_TIMEOUT = 120.0
TARGETS = {"map_complete_s": 3.0, "add_p99_ms": 200.0, "rss_mb": 120.0, "idle_requests_per_s": 0.1}


@dataclass
class Settings:
    nodes: int
    additions: int
    idle_seconds: float
    out: Path
    keep: bool


class Api:
    """The apiserver's REST API with the admin certificate (faster than kubectl)."""

    def __init__(self, kube: KubeApiServer):
        self.url = kube.url
        self.ctx: ssl.SSLContext = kube.ssl_context()

    def call(self, method: str, path: str, body: dict | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30, context=self.ctx) as resp:
            return resp.read()

    def node_requests(self) -> int:
        """apiserver_request_total for nodes, every verb and code, summed."""
        text = self.call("GET", "/metrics").decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("apiserver_request_total{") and 'resource="nodes"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return int(total)


def node_object(name: str, cidr: IPv4Network, attrs: LeaseAttrs | None) -> dict:
    annotations = lease_annotations(Annotations(), attrs, {}) if attrs else {}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"podCIDR": str(cidr), "podCIDRs": [str(cidr)]},
    }


def peer_attrs(i: int) -> LeaseAttrs:
    mac = f"02:00:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
    ip = IPv4Address(int(IPv4Address("198.51.100.0")) + 1 + i % 254)  # off-link: vxlan
    return LeaseAttrs(ip, "vxlan", vni=1, vtep_mac=mac)


async def measure(settings: Settings, kube: KubeApiServer, node: BenchNode, work: str) -> dict:
    api = Api(kube)
    subnets = parse_config(json.dumps(NET_CONF)).subnets()
    own, others = subnets[0], subnets[1 : 1 + settings.nodes]
    added = subnets[len(subnets) - settings.additions :]
    results: dict = {}
    t = time.perf_counter()
    api.call("POST", "/api/v1/nodes", node_object(NODE_NAME, own, None))
    for i, cidr in enumerate(others):
        api.call("POST", "/api/v1/nodes", node_object(f"peer-{i}", cidr, peer_attrs(i)))
    results["create_nodes_s"] = round(time.perf_counter() - t, 2)
    log.info("%d Node objects in the apiserver (%.1f s)", settings.nodes, results["create_nodes_s"])

    conf = os.path.join(work, "net-conf.json")
    Path(conf).write_text(json.dumps(NET_CONF))
    argv = node.nsenter(
        [
            sys.executable, "-m", "flannel_xdp.cli", "agent", "--kube-subnet-mgr",
            f"--kubeconfig-file={kube.kubeconfig}", f"--net-config-path={conf}",
            "--iface", "eth0", "--bpffs", node.bpffs, "--subnet-file", node.subnet_file,
        ]
    )  # fmt: skip
    agent = AgentProcess(argv, os.path.join(work, "agent.log"), {"NODE_NAME": NODE_NAME})
    try:
        m = open_map(node, agent, START_TIMEOUT)
        try:
            t_wrote, _ = agent.wait_line(r"wrote .*subnet\.env", START_TIMEOUT)
            if poll(lambda: count_entries(m) >= settings.nodes, 60) is None:
                raise BenchError(f"the map never held {settings.nodes} entries:\n{agent.tail()}")
            t_all = time.monotonic()
            t_ready, _ = agent.wait_line(r"ready: \d+ peers programmed", 120)
            results["map_complete_s"] = round(t_all - t_wrote, 3)
            results["ready_after_listing_s"] = round(t_ready - t_wrote, 3)
            results["start_to_ready_s"] = round(t_ready - agent.started, 3)
            await asyncio.sleep(2)
            results["rss_mb"] = agent.memory_mb()["VmRSS"]
            log.info(
                "map complete %.3f s, ready %.3f s after the listing, RSS %.1f MB",
                results["map_complete_s"],
                results["ready_after_listing_s"],
                results["rss_mb"],
            )
            routes = await in_routes_thread(Routes, node.netns)
            in_map, reachable = [], []
            requests_before_additions = api.node_requests()
            try:
                for i, cidr in enumerate(added):
                    started = time.perf_counter()
                    obj = node_object(f"added-{i}", cidr, peer_attrs(100_000 + i))
                    api.call("POST", "/api/v1/nodes", obj)

                    def wait(c: IPv4Network = cidr) -> tuple[float | None, float | None]:
                        return (
                            poll(lambda: _present(m.fd, c), EVENT_TIMEOUT),
                            poll(lambda: routes.routed(c), EVENT_TIMEOUT),
                        )

                    got_map, got_route = await in_routes_thread(wait)
                    if got_map is None or got_route is None:
                        raise BenchError(f"Node added-{i} ({cidr}) not programmed in 5 s")
                    in_map.append((got_map - started) * 1000)
                    reachable.append((max(got_map, got_route) - started) * 1000)
                    await asyncio.sleep(0.01)
            finally:
                await in_routes_thread(routes.close)
            results["add_ms"] = summarize(in_map)
            results["add_reachable_ms"] = summarize(reachable)
            log.info(
                "Node added -> in map p50 %.1f ms p99 %.1f ms, reachable p99 %.1f ms",
                results["add_ms"]["p50"],
                results["add_ms"]["p99"],
                results["add_reachable_ms"]["p99"],
            )
            await asyncio.sleep(2)  # the last additions' status patches settle
            before, cpu0, t0 = api.node_requests(), agent.cpu_seconds(), time.monotonic()
            # the metric's sanity: the additions' POSTs alone are node requests
            if before - requests_before_additions < settings.additions:
                raise BenchError("apiserver_request_total did not count the Node POSTs")
            await asyncio.sleep(settings.idle_seconds)
            after, cpu1, t1 = api.node_requests(), agent.cpu_seconds(), time.monotonic()
            # the two metric scrapes are not node requests; nothing but the agent asks
            results["idle_node_requests"] = after - before
            results["idle_requests_per_s"] = round((after - before) / (t1 - t0), 3)
            results["idle_cpu_pct"] = round((cpu1 - cpu0) / (t1 - t0) * 100, 3)
            results["idle_seconds"] = round(t1 - t0, 1)
            log.info(
                "idle: %d node requests in %.0f s, CPU %.2f %%",
                results["idle_node_requests"],
                t1 - t0,
                results["idle_cpu_pct"],
            )
        finally:
            m.close()
    finally:
        results["agent_exit"] = agent.stop()
        results["agent_log_tail"] = agent.tail(5)
    return results


def table(results: dict, nodes: int) -> tuple[str, dict]:
    add, reach = results["add_ms"], results["add_reachable_ms"]
    checks = {
        "map_complete_s": results["map_complete_s"],
        "add_p99_ms": add["p99"],
        "rss_mb": results["rss_mb"],
        "idle_requests_per_s": results["idle_requests_per_s"],
    }
    ok = {k: v < TARGETS[k] for k, v in checks.items()}
    rows = [
        ("metric", "value", "target", "ok"),
        (f"{nodes} Nodes: listing -> map complete", f"{results['map_complete_s']:.3f} s",
         f"< {TARGETS['map_complete_s']:g} s", ok["map_complete_s"]),
        ("  listing -> ready (map + routes)", f"{results['ready_after_listing_s']:.3f} s", "", ""),
        ("  process start -> ready", f"{results['start_to_ready_s']:.3f} s", "", ""),
        (f"Node added -> in map, p50 (n={add['n']})", f"{add['p50']} ms", "", ""),
        (f"Node added -> in map, p99 (n={add['n']})", f"{add['p99']} ms",
         f"< {TARGETS['add_p99_ms']:g} ms", ok["add_p99_ms"]),
        ("Node added -> reachable (map + route), p50/p99", f"{reach['p50']} / {reach['p99']} ms",
         "", ""),
        (f"agent RSS at {nodes} peers", f"{results['rss_mb']:.1f} MB",
         f"< {TARGETS['rss_mb']:g} MB", ok["rss_mb"]),
        (f"node requests while idle ({results['idle_seconds']:.0f} s)",
         f"{results['idle_requests_per_s']} /s", "~0 /s", ok["idle_requests_per_s"]),
        ("agent CPU while idle", f"{results['idle_cpu_pct']} %", "", ""),
    ]  # fmt: skip
    return render_rows(rows), ok


def run(settings: Settings) -> int:
    _check_prerequisites()
    tag = secrets.token_hex(3)
    root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = tempfile.mkdtemp(prefix=f"fxdp-kcp-{tag}-", dir=root)
    kube = KubeApiServer(os.path.join(work, "kube"))
    node = BenchNode(tag, work)
    listener = None
    results: dict = {}
    problems: list[str] = []
    error: BaseException | None = None
    try:
        kube.start()
        node.create()
        listener = relay(node.netns, kube.port)
        results = asyncio.run(measure(settings, kube, node, work))
    except BaseException as exc:  # report, tear down, then fail
        error = exc
    finally:
        if listener is not None:
            listener.close()
        problems += node.teardown()
        kube.stop(clean=False)
        if settings.keep:
            print(f"kept {work} (agent.log, kube/kube-apiserver.log)", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    for p in problems:
        log.warning("teardown: %s", p)
    if error is not None:
        if isinstance(error, KeyboardInterrupt):
            log.error("interrupted; everything torn down")
        else:
            log.error("kube control-plane benchmark failed: %s", error)
        return 1
    text, ok = table(results, settings.nodes)
    report = {
        "schema": 1,
        "benchmark": "control-plane, kube mode",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "settings": {
            "nodes": settings.nodes,
            "additions": settings.additions,
            "idle_seconds": settings.idle_seconds,
            "net_conf": NET_CONF,
        },
        "results": results,
        "targets": {k: {"target": f"< {v:g}", "ok": ok[k]} for k, v in TARGETS.items()},
        "teardown_problems": problems,
    }
    write_report(settings.out, report)
    print(text)
    print(f"\nwrote {settings.out}")
    return 0


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m flannel_xdp.bench.kubecontrolplane",
        description="Control-plane benchmark in kube mode: N Node objects in the real "
        "kube-apiserver, the agent's full sync, per-Node latency, memory and idle requests.",
    )
    p.add_argument("--nodes", type=int, default=1000, help="Node objects besides ours (1000)")
    p.add_argument("--additions", type=int, default=100, help="Nodes added one by one (100)")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="idle window (10 s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output ({DEFAULT_OUT})")
    p.add_argument("--keep", action="store_true", help="keep the agent's and apiserver's logs")
    a = p.parse_args(argv)
    limit = len(parse_config(json.dumps(NET_CONF)).subnets()) - 1
    if a.nodes < 1 or a.additions < 1 or a.nodes + a.additions > limit:
        p.error(f"need 1 <= nodes, additions and nodes + additions <= {limit}")
    return Settings(a.nodes, a.additions, a.idle_seconds, a.out, a.keep)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return run(parse_args(argv))
    except BenchError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
