"""Kubernetes-mode nodes for the tests against the real kube-apiserver: network namespaces
on one veth link, each reaching the loopback apiserver through a relay, and the agent's
command line in kube mode.
"""

from __future__ import annotations

import socket
import subprocess
import sys

from flannel_xdp.lab import agents
from flannel_xdp.lab.kube import relay


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def linked_nodes(ends: dict[str, str], port: int) -> list[socket.socket]:
    """Network namespaces {name: address/24} on one veth link, forwarding as nodes do,
    each reaching the loopback apiserver on port through a relay; the relays' listeners."""
    (na, addr_a), (nb, addr_b) = ends.items()
    for ns in (na, nb):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # nodes forward (kubelet and kube-proxy see to it); bpf_fib_lookup needs it too
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh("ip", "-n", na, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
       "netns", nb)  # fmt: skip
    listeners = []
    for ns, addr in ((na, addr_a), (nb, addr_b)):
        sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        listeners.append(relay(ns, port))
    return listeners


def kube_agent_argv(kubeconfig: str, conf: str, bpffs: str, subnet_file: str) -> list[str]:
    """`flannel-xdp agent --kube-subnet-mgr` on eth0 (NODE_NAME comes from the environment)."""
    return [
        sys.executable, "-m", "flannel_xdp.cli", "agent", "--kube-subnet-mgr",
        f"--kubeconfig-file={kubeconfig}", f"--net-config-path={conf}",
        "--iface", "eth0", "--bpffs", bpffs, "--subnet-file", subnet_file,
        "--healthz-port", str(agents.HEALTHZ_PORT),
    ]  # fmt: skip
