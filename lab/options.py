"""Command-line options of `flannel-xdp demo` and `flannel-xdp lab`, without importing the lab
(the choices are spelled out here and checked against the enums by the unit tests)."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from flannel_xdp import defaults

BACKENDS = ("vxlan", "host-gw")  # topology.Backend
INGRESS_HOOKS = ("xdp", "tc", "kernel")  # loader.datapath.IngressHook
FAST_PATH_MODES = ("auto", "on", "off")  # loader.fast_path.Mode
DEFAULT_LAB_NAME = "lab"  # agentcluster.DEFAULT_NAME
DEFAULT_DEMO_NAME = "demo"
RUN_ROOT = "/run/flannel-xdp-lab"  # agentcluster.RUN_ROOT


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def call(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args)

    return call


def _cluster_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=3, help="nodes (%(default)s)")
    p.add_argument("--pods", type=int, default=2, help="pods per node (%(default)s)")
    p.add_argument("--backend", choices=BACKENDS, default="vxlan", help="backend (%(default)s)")
    p.add_argument("--direct-routing", action="store_true", help="vxlan with DirectRouting")
    p.add_argument(
        "--stock",
        type=int,
        default=0,
        metavar="N",
        help="run the last N nodes as stock flanneld (kernel data path)",
    )
    p.add_argument(
        "--ingress-hook",
        choices=INGRESS_HOOKS,
        default=defaults.INGRESS_HOOK,
        help="where the agents judge and decapsulate VXLAN (%(default)s)",
    )
    p.add_argument(
        "--fast-path",
        choices=FAST_PATH_MODES,
        help=f"the agents' --fast-path (default: none given, so the agent's: {defaults.FAST_PATH})",
    )
    p.add_argument(
        "--udp-fast-path",
        action="store_const",
        dest="fast_path",
        const="on",
        help="the same as --fast-path on",
    )
    p.add_argument(
        "--tcp-fast-path",
        action="store_true",
        help="agents run with --tcp-fast-path (--fast-path on, TCP required)",
    )


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    p.add_argument("--name", default=DEFAULT_DEMO_NAME, help="lab name (%(default)s)")
    _cluster_shape(p)
    p.set_defaults(func=_lazy("flannel_xdp.lab.demo", "run"))


def lab_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lab_command", metavar="up|down|status", required=True)
    up = sub.add_parser("up", help="build a virtual cluster that keeps running")
    up.add_argument(
        "--name", help=f"lab name: [a-z][a-z0-9]*, at most 12 (default {DEFAULT_LAB_NAME})"
    )
    _cluster_shape(up)
    up.add_argument(
        "--ip-masq",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="agents masquerade pod traffic leaving the cluster network (default: on)",
    )
    up.add_argument(
        "--kube",
        action="store_true",
        help="the Kubernetes API as the registry: a real kube-apiserver, a Node object per "
        "node, real kube-proxy on each, the agents run as deploy/kube-flannel-xdp.yml's "
        "DaemonSet runs them (--stock N: flanneld --kube-subnet-mgr)",
    )
    up.set_defaults(func=_lazy("flannel_xdp.lab.cli", "cmd_up"))
    down = sub.add_parser("down", help="remove a lab: processes, namespaces, pins, run dir")
    down.add_argument("--name", help="lab name (default: the only lab that is up)")
    down.add_argument("--all", action="store_true", help=f"every lab under {RUN_ROOT}")
    down.set_defaults(func=_lazy("flannel_xdp.lab.cli", "cmd_down"))
    status = sub.add_parser("status", help="nodes, leases, processes and readiness of a lab")
    status.add_argument("--name", help="lab name (default: the only lab that is up)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_lazy("flannel_xdp.lab.cli", "cmd_status"))
