"""A Flannel cluster in network namespaces: the integration tests' testbed, and later
`flannel-xdp lab up|down` and the benchmark's."""

from flannel_xdp.lab import flanneld, process
from flannel_xdp.lab.topology import (
    Cluster,
    ClusterSpec,
    Counters,
    Dataplane,
    LabError,
    Lease,
    NetworkBackend,
    Node,
    NodeSpec,
    Pod,
    plan,
)

__all__ = [
    "Cluster",
    "ClusterSpec",
    "Counters",
    "Dataplane",
    "LabError",
    "Lease",
    "NetworkBackend",
    "Node",
    "NodeSpec",
    "Pod",
    "flanneld",
    "plan",
    "process",
]
