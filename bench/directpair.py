"""The physical limit of the testbed: two pods joined by one veth pair, no node between
them, at the MTU flannel gives vxlan pods. What TCP and latency reach here is what this
machine's veths, stacks and copies allow; the report says how close each data path comes.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from pyroute2 import IPRoute

from flannel_xdp import defaults, netns
from flannel_xdp.backend import Backend
from flannel_xdp.lab import Pod
from flannel_xdp.lab.topology import DEFAULT_MTU, POD_IFNAME, delete_netns, new_netns

# Inside the lab's pod range; nothing else lives in these two namespaces.
SIDES = (IPv4Address("198.19.255.1"), IPv4Address("198.19.255.2"))
PREFIXLEN = 30
POD_MTU = DEFAULT_MTU - defaults.VXLAN_OVERHEAD


@dataclass(frozen=True)
class PairSpec:
    """What the workloads read of a cluster's spec (topology.ClusterSpec's names)."""

    prefix: str
    backend: Backend
    pod_mtu: int


@dataclass(frozen=True)
class Side:
    """One end of the pair as the workloads see a node (topology.Node's names)."""

    index: int
    netns: str
    pods: tuple[Pod, ...]


class DirectPair:
    """Two namespaces, each a pod with eth0 on one veth pair; seen by the workloads as a
    cluster of two nodes of one pod each (topology.Cluster's names)."""

    def __init__(self, prefix: str):
        self.spec = PairSpec(prefix, Backend.VXLAN, POD_MTU)
        self.pods = tuple(
            Pod(
                netns=f"{prefix}-p{i}",
                node=i,
                index=0,
                ip=ip,
                gateway=SIDES[1 - i],  # on-link: no route beyond the pair
                prefixlen=PREFIXLEN,
                mtu=POD_MTU,
                host_veth="",
            )
            for i, ip in enumerate(SIDES)
        )
        # each side is its own node
        self.nodes = [Side(p.node, p.netns, (p,)) for p in self.pods]

    def up(self) -> None:
        a, b = self.pods
        try:
            for pod in self.pods:
                new_netns(pod.netns)
            with netns.entered(a.netns), IPRoute() as ipr:
                ipr.link(
                    "add",
                    ifname=POD_IFNAME,
                    kind="veth",
                    peer={"ifname": POD_IFNAME, "net_ns_fd": b.netns},
                )
            for pod in self.pods:
                with netns.entered(pod.netns), IPRoute() as ipr:
                    (eth,) = ipr.link_lookup(ifname=POD_IFNAME)
                    ipr.link("set", index=eth, mtu=pod.mtu)
                    ipr.addr("add", index=eth, address=str(pod.ip), prefixlen=pod.prefixlen)
                    ipr.link("set", index=eth, state="up")
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        for pod in self.pods:
            delete_netns(pod.netns, owner="bench")

    def diagnostics(self) -> str:
        return f"direct veth pair {self.pods[0].netns} <-> {self.pods[1].netns}"

    def counters(self, node: Side):
        raise RuntimeError(f"{node.netns} is a bare pod: it has no BPF counters")
