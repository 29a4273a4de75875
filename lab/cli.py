"""`flannel-xdp lab up|down|status`: a virtual cluster that outlives the command.

`up` builds an agent-driven lab (agentcluster.py) whose etcd and agents keep running
after the command returns; its state is in /run/flannel-xdp-lab/<name>/state.json,
so `status` and `down` find it from any later process. `down` is safe to repeat.
"""

from __future__ import annotations

import argparse
import json
import os

from flannel_xdp.lab import preflight
from flannel_xdp.lab.agentcluster import (
    DEFAULT_NAME,
    ETCD_PREFIX,
    RUN_ROOT,
    AgentCluster,
)
from flannel_xdp.lab.demo import build_spec, quiet_logs, self_command

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NO_LAB = 0, 1, 2, 3


def running_labs(run_root: str = RUN_ROOT) -> list[str]:
    try:
        return sorted(d for d in os.listdir(run_root) if os.path.isdir(os.path.join(run_root, d)))
    except FileNotFoundError:
        return []


def _pick_name(args: argparse.Namespace) -> str | None:
    """--name, else the only lab there is; None (after saying why) when ambiguous."""
    if args.name:
        return args.name
    labs = running_labs()
    if len(labs) > 1:
        print(f"several labs are up ({', '.join(labs)}): pick one with --name")
        return None
    return labs[0] if labs else DEFAULT_NAME


def cmd_up(args: argparse.Namespace) -> int:
    quiet_logs(args)
    problems = preflight.problems(stock=args.stock > 0, kube=args.kube)
    if problems:
        for p in problems:
            print(f"missing: {p}")
        return EXIT_FAILURE
    spec = build_spec(args, name=args.name or DEFAULT_NAME, ip_masq=args.ip_masq, kube=args.kube)
    lab = AgentCluster(spec)
    try:
        lab.up(progress=lambda msg: print(f"  {msg}", flush=True))
    except KeyboardInterrupt:  # up() has removed what it made
        print("interrupted: nothing left behind")
        return 130
    print()
    print(render_status(lab.status()))
    me = self_command()
    where = lab.pods[0].netns if lab.pods else lab.nodes[0].netns
    if lab.kube is not None:
        registry = f"kubectl --kubeconfig {lab.kube.kubeconfig} get nodes -o wide"
    else:
        registry = f"ETCDCTL_API=3 etcdctl --endpoints {lab.etcd.url} get --prefix {ETCD_PREFIX}"
    print(
        f"\nexplore:  ip netns exec {where} ping <pod IP>\n"
        f"          {me} inspect --bpffs {lab.nodes[0].bpffs}\n"
        f"          {registry}\n"
        f"remove:   {me} lab down --name {spec.name}"
    )
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    quiet_logs(args)
    names = running_labs() if args.all else [_pick_name(args)]
    if None in names:
        return EXIT_USAGE
    for name in names:
        lab = AgentCluster.load(name)  # type: ignore[arg-type]
        if not lab.exists():
            print(f"lab {name!r}: nothing to remove")
            continue
        lab.down()
        print(f"lab {name!r}: removed (namespaces {lab.prefix}-*, pins, processes, {lab.run_dir})")
    if args.all and not names:
        print("no lab is up")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    quiet_logs(args)
    name = _pick_name(args)
    if name is None:
        return EXIT_USAGE
    lab = AgentCluster.load(name)
    if not os.path.exists(lab.state_path):
        print(f"lab {name!r} is not up" + (" (but leftovers exist: lab down)" if lab.exists()
                                           else ""))  # fmt: skip
        return EXIT_NO_LAB
    status = lab.status()
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    healthy = status["etcd"]["healthy"] and all(n["ready"] for n in status["nodes"])
    return EXIT_OK if healthy else EXIT_FAILURE


def render_status(s: dict) -> str:
    etcd = s["etcd"]
    lines = [
        f"lab {s['name']!r}: backend {s['backend']}, ingress hook {s['ingress_hook']}, "
        f"ip-masq {'on' if s['ip_masq'] else 'off'}; state in {s['run_dir']}",
        f"etcd: {etcd['url']} ({'healthy' if etcd['healthy'] else 'NOT HEALTHY'}), "
        f"agents use {etcd['endpoint']}",
    ]
    if s.get("kube"):
        kube = s["kube"]
        lines.append(
            f"kube-apiserver: {kube['url']} ({'ready' if kube['ready'] else 'NOT READY'}), "
            f"kubeconfig {kube['kubeconfig']}; per node kube-proxy and the DaemonSet's agent"
        )
    if s["outside_host"]:
        lines.append(f"outside host: {s['outside_host']} (netns {s['outside_netns']})")
    for n in s["nodes"]:
        state = "ready" if n["ready"] else ("running" if n["running"] else "NOT RUNNING")
        lines.append(
            f"  {n['node']:<4} {n['netns']:<20} {n['dataplane']:<12} {n['public_ip']:<12} "
            f"lease {n['subnet'] or '-':<16} {state:<11} pid {n['pid']}, "
            f"routes to {n['routes']} peers"
        )
        for p in n["pods"]:
            lines.append(f"         pod {p['netns']:<24} {p['ip']}")
    lines.append(
        f"health and metrics inside each node netns: :{s['healthz_port']}/readyz, "
        f":{s['metrics_port']}/metrics"
    )
    return "\n".join(lines)
