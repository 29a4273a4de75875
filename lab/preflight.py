"""What the machine needs before a lab can be built, named plainly when it is missing."""

from __future__ import annotations

import functools
import os
import shutil

from flannel_xdp.lab import peers
from flannel_xdp.lab.etcd import ETCD, ETCDCTL

TOOLS = (
    "ip", "nsenter", "setpriv", "bpftool", "ethtool", "ping", "iperf3", "ss",
    "iptables", "iptables-restore",
)  # fmt: skip


KUBE_PEERS = ("FXDP_KUBE_APISERVER", "FXDP_KUBE_PROXY", "FXDP_KUBECTL")


def problems(stock: bool = True, kube: bool = False) -> list[str]:
    """Each missing requirement, with what to do about it; empty when all is there.
    stock: the lab runs flanneld nodes, so flanneld is needed too; kube: the Kubernetes
    binaries."""
    out = []
    if os.geteuid() != 0:
        out.append("not running as root: the lab needs it (network namespaces, BPF programs)")
    try:
        import bcc  # noqa: F401
    except ImportError:
        out.append("bcc is not importable: run `make setup` (Debian python3-bpfcc in the venv)")
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        out.append("the kernel has no BTF (/sys/kernel/btf/vmlinux): BPF maps cannot be typed")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    missing += [p for p in (ETCD, ETCDCTL) if not os.access(p, os.X_OK)]
    if missing:
        out.append(f"missing tools {', '.join(missing)}: run `make setup`")
    # pods come from the real CNI chain, stock nodes run the real flanneld
    checks = [peers.cnitool, peers.cni_path, *([peers.flanneld] if stock else [])]
    checks += [functools.partial(peers.binary, key) for key in (KUBE_PEERS if kube else ())]
    for check in checks:
        try:
            check()
        except (peers.PeersMissing, OSError) as exc:
            out.append(str(exc))
    return out
