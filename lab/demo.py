"""`flannel-xdp demo` (`make demo`): a virtual Flannel cluster on this machine, with traffic.

Brings up an agent-driven lab (agentcluster.py: etcd, a switch, three nodes each
running `flannel-xdp agent`, two pods per node), sends traffic between every pair
of pods on different nodes (ping for reachability and round-trip time, iperf3 for
TCP throughput, a payload-checked TCP transfer and UDP echoes), prints what it saw
and what the data path counted (scraped from each agent's metrics endpoint),
shows where to look further, and tears everything down again (--keep: leaves it
running). Exit status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from itertools import product

from flannel_xdp.backend import Backend
from flannel_xdp.lab import agents, preflight, traffic
from flannel_xdp.lab.agentcluster import (
    ETCD_PREFIX,
    AgentCluster,
    AgentClusterSpec,
    LabNode,
)
from flannel_xdp.lab.etcd import EtcdError
from flannel_xdp.lab.topology import LabError, Pod
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.loader.fast_path import Mode

IPERF_BYTES = 64 << 20
PROBE_BYTES = 1 << 20
INDENT = "  "


def _say(text: str = "") -> None:
    print(text, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """A plain text table; columns listed in right are right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return (INDENT + "  ".join(parts)).rstrip()

    rule = INDENT + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def rate(bits_per_second: float | None) -> str:
    if bits_per_second is None:
        return "-"
    if bits_per_second >= 1e9:
        return f"{bits_per_second / 1e9:.2f} Gbit/s"
    return f"{bits_per_second / 1e6:.0f} Mbit/s"


def pod_label(lab: AgentCluster, pod: Pod) -> str:
    return f"{lab.node_of(pod).name}/p{pod.index} {pod.ip}"


def backends(lab: AgentCluster) -> dict[tuple[int, int], str]:
    """How each node reaches each other node: {(from, to): "vxlan" | "host-gw"}, read from
    the data path itself (the agent's subnets map, or a stock node's kernel routes)."""
    out = {}
    for node in lab.nodes:
        if node.is_agent:
            by_subnet = {s: p.backend for s, p in lab.map_peers(node).items()}
            for other in lab.nodes:
                b = by_subnet.get(other.subnet)  # type: ignore[arg-type]
                if b is not None:
                    out[(node.index, other.index)] = _label(lab, b is Backend.HOST_GW)
        else:
            routes = lab.routes(node)
            for other in lab.nodes:
                dev = routes.get(other.subnet)  # type: ignore[arg-type]
                if dev is not None:
                    out[(node.index, other.index)] = _label(lab, not dev.startswith("flannel"))
    return out


def _label(lab: AgentCluster, routed: bool) -> str:
    """vxlan, host-gw, or host-gw (DR): a vxlan network's DirectRouting to an L2 neighbour."""
    if not routed:
        return "vxlan"
    return "host-gw (DR)" if lab.spec.direct_routing else "host-gw"


def measure(lab: AgentCluster) -> tuple[list[list[str]], list[str]]:
    """Traffic between every cross-node pod pair: (table rows, problems)."""
    pods = lab.pods
    pairs = [(a, b) for a, b in product(pods, repeat=2) if a.node != b.node]
    mixed = any(not n.is_agent for n in lab.nodes)
    how = backends(lab)
    servers = []
    problems = []
    try:
        for pod in pods:
            servers.append(traffic.start_probe_server(pod.netns, str(pod.ip)))
            servers.append(traffic.start_iperf3_server(pod.netns, str(pod.ip)))
        pings = traffic.ping_many([(a.netns, str(b.ip)) for a, b in pairs])
        jobs = [(a.netns, [str(b.ip) for x, b in pairs if x is a]) for a in pods]
        probes = {}
        for (src_ns, _), results in zip(
            jobs, traffic.probe_many(jobs, size=PROBE_BYTES), strict=True
        ):
            for r in results:
                probes[(src_ns, r["dst"])] = r
        rows = []
        for (a, b), p in zip(pairs, pings, strict=True):
            result = probes[(a.netns, str(b.ip))]
            bps = None
            if p.ok:
                try:
                    bps = traffic.iperf3(a.netns, str(b.ip), IPERF_BYTES)
                except traffic.TrafficError as exc:
                    problems.append(str(exc))
            checked = "ok" if traffic.probe_ok(result) else "FAILED"
            if checked != "ok":
                problems.append(f"{a.ip} -> {b.ip}: {traffic.probe_problem(result)}")
            if not p.ok:
                problems.append(f"{a.ip} -> {b.ip}: ping {p.received}/{p.sent}")
            backend = how.get((a.node, b.node), "?")
            if mixed:
                src, dst = lab.node_of(a), lab.node_of(b)
                backend += f" {_plane(src)}->{_plane(dst)}"
            rows.append(
                [
                    pod_label(lab, a),
                    "->",
                    pod_label(lab, b),
                    backend,
                    f"{p.received}/{p.sent}",
                    f"{p.rtt_avg_ms:.3f} ms" if p.rtt_avg_ms is not None else "-",
                    rate(bps),
                    checked,
                ]
            )
        return rows, problems
    finally:
        traffic.stop(servers)


def _plane(node: LabNode) -> str:
    return "bpf" if node.is_agent else "kernel"


def counter_rows(lab: AgentCluster) -> tuple[list[list[str]], list[str]]:
    rows, problems = [], []
    for node in lab.nodes:
        if not node.is_agent:
            rows.append([node.name, "stock flanneld: no metrics endpoint", *["-"] * 7])
            continue
        try:
            s = lab.scrape(node)
        except OSError as exc:
            problems.append(f"{node.name}: cannot scrape metrics: {exc}")
            continue

        def pk(backend: str, direction: str, s=s) -> str:
            v = agents.sample(s, "flannel_xdp_packets_total", backend=backend, direction=direction)
            return f"{int(v)}"

        drops = agents.sample(s, "flannel_xdp_drops_total")
        passed = agents.sample(s, "flannel_xdp_passed_total")
        peers = agents.sample(s, "flannel_xdp_leases")
        rows.append(
            [
                node.name,
                f"http://{node.public_ip}:{lab.spec.metrics_port}/metrics",
                f"{int(peers)}",
                pk("vxlan", "encap"),
                pk("vxlan", "decap"),
                pk("host-gw", "forward"),
                pk("host-gw", "deliver"),
                f"{int(drops)}",
                f"{int(passed)}",
            ]
        )
        if drops:
            problems.append(f"{node.name}: the data path dropped {int(drops)} packets")
    return rows, problems


def self_command() -> str:
    """How to run flannel-xdp again from here: the command on PATH, else the venv's script."""
    script = os.path.join(os.path.dirname(sys.executable), "flannel-xdp")
    if shutil.which("flannel-xdp") and os.path.samefile(shutil.which("flannel-xdp"), script):
        return "flannel-xdp"
    if os.path.exists(script):
        rel = os.path.relpath(script)
        return rel if not rel.startswith("..") else script
    return f"{sys.executable} -m flannel_xdp.cli"


def explore(lab: AgentCluster, keep: bool) -> str:
    n0 = lab.agent_nodes[0] if lab.agent_nodes else lab.nodes[0]
    pods = lab.pods
    a = pods[0] if pods else None
    b = next((p for p in pods if a and p.node != a.node), None)
    ns = f"/run/netns/{n0.netns}"
    me = self_command()
    lines = [
        "Where to look (node n0 as the example; every node has the same):",
        f"  metrics    nsenter --net={ns} curl -s "
        f"http://127.0.0.1:{lab.spec.metrics_port}/metrics | grep ^flannel_xdp_",
        f"             (from inside the cluster: http://{n0.public_ip}:{lab.spec.metrics_port}"
        f"/metrics, health: http://{n0.public_ip}:{lab.spec.healthz_port}/readyz)",
        f"  programs   nsenter --net={ns} bpftool net",
        f"  maps       bpftool map dump pinned {n0.bpffs}/maps/subnets",
        f"  summary    {me} inspect --bpffs {n0.bpffs}",
        f"  routes     ip -n {n0.netns} route; ip -n {n0.netns} neigh show dev flannel.1",
        f"  registry   ETCDCTL_API=3 etcdctl --endpoints {lab.etcd.url} get --prefix {ETCD_PREFIX}",
        f"  agent log  {n0.log_file}",
    ]
    if keep:
        lines += [
            "",
            f"The cluster keeps running (lab {lab.spec.name!r}). Try:",
        ]
        if a and b:
            lines.append(f"  ip netns exec {a.netns} ping -c 3 {b.ip}")
            lines.append(
                f"  ip netns exec {a.netns} iperf3 -c {b.ip} -t 3   "
                f"(start a server first: ip netns exec {b.netns} iperf3 -s -D)"
            )
        lines += [
            f"  {me} lab status --name {lab.spec.name}",
            f"  {me} lab down --name {lab.spec.name}      <- tears it all down",
        ]
    return "\n".join(lines)


def _traffic_and_counters(lab: AgentCluster, keep: bool) -> list[str]:
    failed = []
    pairs = sum(1 for a, b in product(lab.pods, repeat=2) if a.node != b.node)
    _say(
        f"[3/5] traffic between every pod pair across nodes ({pairs} pairs): ping x3, "
        f"iperf3 {IPERF_BYTES >> 20} MiB,\n      a {PROBE_BYTES >> 20} MiB TCP transfer "
        "checked by sha256 and UDP echoes (payload)"
    )
    t = time.monotonic()
    rows, problems = measure(lab)
    failed += problems
    headers = ["from", "", "to", "backend", "ping", "RTT avg", "TCP throughput", "payload"]
    _say(table(headers, rows, right=[5, 6]))
    note = ""
    if lab.spec.ingress_hook is IngressHook.XDP:
        note = "; XDP decapsulates frame by frame, --ingress-hook kernel keeps GRO aggregates"
    _say(f"  ({time.monotonic() - t:.1f} s{note})\n")

    _say("[4/5] what the data path counted (scraped from each agent's metrics endpoint)")
    rows, problems = counter_rows(lab)
    failed += problems
    headers = ["node", "metrics endpoint", "peers", "vxlan encap", "vxlan decap",
               "host-gw fwd", "host-gw dlvr", "drops", "passed"]  # fmt: skip
    _say(table(headers, rows, right=[2, 3, 4, 5, 6, 7, 8]))
    _say(
        "  (packets. encap counts what the kernel hands the tunnel, TCP in GSO aggregates of up\n"
        "  to 64 KiB; decap counts what arrives on the underlay, aggregates too unless XDP is\n"
        "  the hook (it makes the wire deliver single frames). passed = underlay traffic that\n"
        "  was not VXLAN for us, left to the kernel, such as ARP.)\n"
    )
    _say(explore(lab, keep))
    _say("")
    return failed


def build_spec(args: argparse.Namespace, **overrides) -> AgentClusterSpec:
    """The cluster the shared flags (options._cluster_shape) describe, for the demo and
    `lab up`."""
    fields = dict(
        name=args.name,
        nodes=args.nodes,
        pods=args.pods,
        backend=Backend(args.backend),
        direct_routing=args.direct_routing,
        stock=args.stock,
        ingress_hook=IngressHook(args.ingress_hook),
        fast_path=Mode(args.fast_path) if args.fast_path else None,  # None: the agent's
        tcp_fast_path=args.tcp_fast_path,
        detach=True,  # --keep leaves it running after this process
    )
    return AgentClusterSpec(**{**fields, **overrides})


def quiet_logs(args: argparse.Namespace) -> None:
    """The demo and the lab commands narrate themselves: only warnings from the library,
    unless -v."""
    if not getattr(args, "verbose", False):
        logging.getLogger().setLevel(logging.WARNING)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM tears down like Ctrl-C does


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    quiet_logs(args)
    signal.signal(signal.SIGTERM, _interrupt)
    spec = build_spec(args)
    what = spec.backend_label + (f", {spec.stock} stock flanneld" if spec.stock else "")
    _say(
        f"flannel-xdp demo: a {spec.nodes}-node Flannel cluster ({what}) in network "
        "namespaces on this machine,\nrun by real agents against a local etcd, "
        f"{spec.pods} pods per node.\n"
    )
    _say("[1/5] checking the machine")
    problems = preflight.problems(stock=spec.stock > 0)
    if problems:
        for p in problems:
            _say(f"  missing: {p}")
        _say("\nThe demo cannot run here. `make demo` runs `make setup` first, as root.")
        return 1
    _say("  ok: root, bcc, BTF, iproute2, bpftool, etcd, iperf3\n")

    lab = AgentCluster(spec)
    if lab.exists():
        _say(f"  a lab named {spec.name!r} is still up (make demo KEEP=1?): removing it first")
        AgentCluster.load(spec.name, spec.run_root).down()
    _say("[2/5] bringing up the cluster")
    failed: list[str] = []
    measured = False
    try:
        lab.up(progress=lambda msg: _say(f"  {msg}"))
        _say("")
        measured = True
        failed += _traffic_and_counters(lab, args.keep)
    except KeyboardInterrupt:
        failed.append("interrupted")
        args.keep = False
    except (LabError, EtcdError, traffic.TrafficError, OSError) as exc:
        failed.append(f"{type(exc).__name__}: {exc}")
    finally:
        if failed and measured and not args.keep:
            _say("agent logs before teardown:\n" + lab.logs_tail(8))
        if args.keep and measured:
            note = "" if not failed else ", despite the failures, for a look"
            _say(f"[5/5] leaving the cluster running (--keep{note})")
        else:
            t = time.monotonic()
            _say("[5/5] tearing down")
            try:
                lab.down()
                _say(
                    f"  removed every namespace, pin, process and {lab.run_dir} "
                    f"({time.monotonic() - t:.1f} s)"
                )
            except LabError as exc:
                failed.append(str(exc))
    _say("")
    if failed:
        _say("FAILED:")
        for f in failed:
            _say(f"  {f}")
        return 1
    _say(
        f"demo passed: every pair reachable, every payload intact "
        f"({time.monotonic() - started:.0f} s)"
    )
    return 0
