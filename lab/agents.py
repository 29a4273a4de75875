"""The per-node processes of the agent-driven lab, and how to talk to them.

A flannel-xdp node runs ``flannel-xdp agent`` (flanneld's flags plus ``--bpffs``
and ``--metrics-port``); a stock node runs the real flanneld (``make peers``
builds it) in etcd mode with kube-flannel's flags. Both run inside the node's
netns through ``nsenter --net`` (so /sys/fs/bpf and its pins stay visible), reach
etcd through its unix socket (flanneld's etcd v3 client takes ``unix://`` endpoints
too), and write subnet.env where the CNI plugin of the node reads it.

Their health and metrics endpoints listen inside the node's netns (so the ports
may repeat from node to node); http_get() enters that netns for one request.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network

from prometheus_client.parser import text_string_to_metric_families

from flannel_xdp import netns
from flannel_xdp.lab import peers, process

HEALTHZ_PORT = 8081  # flannel's manifests use 8081 for flanneld's /healthz
METRICS_PORT = 9100
AGENT_LOG = "agent.log"
STOCK_LOG = "flanneld.log"


@dataclass(frozen=True)
class AgentRelease:
    """Which installation of flannel-xdp runs an agent: this one, or another release's
    venv beside it (the upgrade test installs the previous release from its git tag)."""

    python: str = sys.executable
    # The fast-path flags its agent gets instead of the lab's (None: the lab's): a release
    # from before --fast-path spells them its own way, and refuses unknown flags.
    fast_path_args: tuple[str, ...] | None = None


THIS_RELEASE = AgentRelease()


def agent_argv(
    *,
    endpoint: str,
    etcd_prefix: str,
    bpffs: str,
    subnet_file: str,
    ingress_hook: str,
    ip_masq: bool,
    healthz_port: int = HEALTHZ_PORT,
    metrics_port: int = METRICS_PORT,
    iface: str = "eth0",
    xdp_mode: str = "auto",
    fast_path: str | None = None,
    tcp_fast_path: bool = False,
    release: AgentRelease = THIS_RELEASE,
) -> list[str]:
    """fast_path: --fast-path's value; None gives none, so the agent's default."""
    argv = [
        release.python, "-m", "flannel_xdp.cli", "agent",
        "--etcd-endpoints", endpoint,
        "--etcd-prefix", etcd_prefix,
        "--iface", iface,
        "--bpffs", bpffs,
        "--subnet-file", subnet_file,
        "--ingress-hook", ingress_hook,
        "--xdp-mode", xdp_mode,
        "--healthz-port", str(healthz_port),
        "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    argv += fast_path_args(fast_path, tcp_fast_path, release)
    return [*argv, "--ip-masq"] if ip_masq else argv


def fast_path_args(
    fast_path: str | None, tcp_fast_path: bool, release: AgentRelease = THIS_RELEASE
) -> list[str]:
    """The agent's fast-path flags; none for its default."""
    if release.fast_path_args is not None:
        return list(release.fast_path_args)
    argv = [] if fast_path is None else ["--fast-path", fast_path]
    return [*argv, "--tcp-fast-path"] if tcp_fast_path else argv


def stock_argv(
    *,
    endpoint: str,
    etcd_prefix: str,
    subnet_file: str,
    ip_masq: bool,
    public_ip: str,
    healthz_port: int = HEALTHZ_PORT,
    iface: str = "eth0",
    flanneld: str | None = None,
) -> list[str]:
    """flanneld as kube-flannel runs it (``--ip-masq``, ``--healthz-port``), in etcd mode."""
    argv = [
        flanneld or peers.flanneld(),
        "--etcd-endpoints", endpoint,
        "--etcd-prefix", etcd_prefix,
        "--iface", iface,
        "--public-ip", public_ip,
        "--subnet-file", subnet_file,
        "--healthz-port", str(healthz_port),
    ]  # fmt: skip
    return [*argv, "--ip-masq"] if ip_masq else argv


def healthy(ns: str, port: int = HEALTHZ_PORT) -> bool:
    """flanneld's /healthz, what kube-flannel's liveness probe asks."""
    try:
        return http_get(ns, port, "/healthz", timeout=1.0)[0] == 200
    except OSError:
        return False


# The agent reads every flag also from the environment, as FLANNELD_<NAME> (as flanneld).
FLAG_ENV_PREFIX = "FLANNELD_"


def flag_env(**flags: str) -> dict[str, str]:
    """The environment that gives the agent these flags (build_cache="" as --build-cache '')."""
    return {f"{FLAG_ENV_PREFIX}{name.upper()}": value for name, value in flags.items()}


def start(
    argv: Sequence[str],
    ns: str,
    log_path: str,
    *,
    detach: bool,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start argv in ns, in the directory of log_path, appending its output to log_path."""
    node_dir = os.path.dirname(log_path)
    os.makedirs(node_dir, exist_ok=True)
    # FLANNELD_* in our environment would silently change the node's flags.
    env = {k: v for k, v in os.environ.items() if not k.startswith(FLAG_ENV_PREFIX)}
    env.update(extra_env or {})
    # Not in our working directory: `python -m` puts it first on sys.path, and in a
    # checkout its flannel_xdp.egg-info would give another release's agent our version.
    with open(log_path, "ab") as out:
        return process.start_daemon(argv, out, detach=detach, netns=ns, cwd=node_dir, env=env)


@dataclass(frozen=True)
class SubnetFile:
    """subnet.env as the flannel CNI plugin reads it."""

    network: IPv4Network
    subnet: IPv4Network
    gateway: IPv4Interface  # FLANNEL_SUBNET: the subnet's first address, for cni0
    mtu: int
    ip_masq: bool


def read_subnet_file(path: str) -> SubnetFile | None:
    """The file's values once it is complete (it is written in one rename), else None."""
    try:
        with open(path) as f:
            values = dict(line.strip().split("=", 1) for line in f if "=" in line and line.strip())
    except OSError:
        return None
    try:
        gateway = IPv4Interface(values["FLANNEL_SUBNET"])
        return SubnetFile(
            network=IPv4Network(values["FLANNEL_NETWORK"]),
            subnet=gateway.network,
            gateway=gateway,
            mtu=int(values["FLANNEL_MTU"]),
            ip_masq=values.get("FLANNEL_IPMASQ") == "true",
        )
    except (KeyError, ValueError):
        return None


def http_get(ns: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """GET http://127.0.0.1:<port><path> inside netns ns: (status, body)."""
    with netns.entered(ns):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()


def ready(ns: str, port: int = HEALTHZ_PORT) -> bool:
    try:
        return http_get(ns, port, "/readyz", timeout=1.0)[0] == 200
    except OSError:
        return False


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(ns: str, port: int = METRICS_PORT) -> Samples:
    """The node's Prometheus metrics: {(sample name, sorted labels): value}."""
    status, body = http_get(ns, port, "/metrics", timeout=5.0)
    if status != 200:
        raise OSError(f"metrics endpoint in {ns} answered {status}")
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called name whose labels include labels."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


__all__ = [
    "AGENT_LOG",
    "HEALTHZ_PORT",
    "METRICS_PORT",
    "STOCK_LOG",
    "THIS_RELEASE",
    "AgentRelease",
    "SubnetFile",
    "agent_argv",
    "healthy",
    "http_get",
    "read_subnet_file",
    "ready",
    "sample",
    "scrape",
    "start",
    "stock_argv",
]
