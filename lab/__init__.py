"""A Flannel cluster in network namespaces: the integration tests' testbed (Cluster, which
programs every node itself), the agent-driven lab behind `flannel-xdp lab` and the demo
(AgentCluster, whose nodes run real agents against a local etcd), and the benchmark's.

Names are loaded on first use, so that `flannel-xdp agent` does not pay for the lab.
"""

from __future__ import annotations

import importlib
from typing import Any

_FROM = {
    **dict.fromkeys(
        (
            "Cluster", "ClusterSpec", "Counters", "Dataplane", "LabError", "PlannedLease",
            "Node", "NodeSpec", "Pod", "plan",
        ),
        "topology",
    ),
    **dict.fromkeys(("AgentCluster", "AgentClusterSpec", "LabNode"), "agentcluster"),
}  # fmt: skip
_SUBMODULES = (
    "agentcluster", "agents", "cli", "cni", "demo", "etcd", "flanneld", "options", "peers",
    "preflight", "process", "topology", "traffic",
)  # fmt: skip

__all__ = [*_FROM, "flanneld", "process"]


def __getattr__(name: str) -> Any:
    if name in _FROM:
        return getattr(importlib.import_module(f"{__name__}.{_FROM[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_FROM, *_SUBMODULES])
