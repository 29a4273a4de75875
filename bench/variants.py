"""The data paths the benchmark compares, and the testbed that holds one lab cluster each.

Every variant is a two-node lab cluster (one pod per node) with one data path:
stock flannel, that is the real flanneld (``make peers``) in etcd mode on both nodes
with pods from the real CNI chain (an AgentCluster of stock nodes, seen through
FlanneldCluster), or flannel-xdp with either ingress hook (the lab's static Cluster,
which programs the agents' maps from a plan, so that no registry work runs while a
variant is measured). All clusters are
built once, before the first measurement, and stay up until the end: the workloads
then visit the variants interleaved (A, B, C, A, B, C, ...) without a rebuild between
repetitions, so a slow phase of this noisy machine lands on every variant alike
rather than on whichever was being rebuilt. An idle cluster costs no CPU (nothing
runs in it between measurements) and a few MB of memory.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from types import FrameType

from flannel_xdp import defaults
from flannel_xdp.backend import Backend
from flannel_xdp.lab import (
    Cluster,
    ClusterSpec,
    Dataplane,
    Node,
    Pod,
    process,
)
from flannel_xdp.lab.agentcluster import AgentCluster, AgentClusterSpec
from flannel_xdp.lab.topology import UNDERLAY_IFNAME, link_index, link_mac
from flannel_xdp.loader import fast_path
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.node.conntrack import TCP_BE_LIBERAL

from .directpair import DirectPair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str
    backend: Backend
    dataplane: Dataplane | None  # None: no node at all (directpair.py)
    hook: IngressHook | None  # flannel-xdp only
    code: str  # short tag in lab names
    description: str
    fast_path: bool = False  # --udp-fast-path and --tcp-fast-path: bpf/fastpath.h

    @property
    def is_xdp(self) -> bool:
        return self.dataplane is Dataplane.FLANNEL_XDP

    @property
    def is_direct(self) -> bool:
        return self.dataplane is None

    def spec(self, prefix: str) -> ClusterSpec:
        data_path = {}
        if self.is_xdp:
            assert self.hook is not None
            data_path = {
                "ingress_hook": self.hook,
                "udp_fast_path": self.fast_path,
                "tcp_fast_path": self.fast_path,
            }
        return ClusterSpec.uniform(
            nodes=2,
            pods=1,
            dataplane=self.dataplane,
            backend=self.backend,
            prefix=prefix,
            ip_masq=True,
            # Window checks off node-wide for the stack's variants, as before; the fast
            # path's variants run as kube-proxy leaves a node (checks on): the fast path
            # marks the flows it carries itself (node/flow_marks.py).
            conntrack_tcp_be_liberal=not self.fast_path,
            **data_path,
        )

    def as_dict(self) -> dict[str, str | None]:
        return {
            "backend": self.backend.value,
            "dataplane": self.dataplane.value if self.dataplane else "direct veth pair",
            "ingress_hook": self.hook.value if self.hook else None,
            "udp_fast_path": self.fast_path,
            "tcp_fast_path": self.fast_path,
            "description": self.description,
        }


VARIANTS: tuple[Variant, ...] = (
    Variant(
        "stock-vxlan",
        Backend.VXLAN,
        Dataplane.FLANNELD,
        None,
        "sv",
        "stock flannel vxlan: flanneld's kernel vxlan device flannel.1",
    ),
    Variant(
        "xdp-vxlan",
        Backend.VXLAN,
        Dataplane.FLANNEL_XDP,
        IngressHook.XDP,
        "xv",
        "flannel-xdp vxlan: encap in tc egress, decap in XDP on the underlay",
    ),
    Variant(
        "xdp-vxlan-tc",
        Backend.VXLAN,
        Dataplane.FLANNEL_XDP,
        IngressHook.TC,
        "xvt",
        "flannel-xdp vxlan: encap in tc egress, decap in tc ingress on the underlay",
    ),
    Variant(
        "xdp-vxlan-kernel",
        Backend.VXLAN,
        Dataplane.FLANNEL_XDP,
        IngressHook.KERNEL,
        "xvk",
        "flannel-xdp vxlan: encap in tc egress, tc ingress judges, the kernel's vxlan "
        "device (external mode) decapsulates",
    ),
    Variant(
        "xdp-vxlan-fast",
        Backend.VXLAN,
        Dataplane.FLANNEL_XDP,
        IngressHook.KERNEL,
        "xvf",
        "flannel-xdp vxlan, kernel hook with the UDP and TCP fast path: conntrack-confirmed, "
        "un-NATed UDP and established TCP are encapsulated at the pod's veth end, "
        "decapsulated in tc and delivered into the pod's netns",
        fast_path=True,
    ),
    Variant(
        "stock-hostgw",
        Backend.HOST_GW,
        Dataplane.FLANNELD,
        None,
        "sh",
        "stock flannel host-gw: flanneld's kernel routes via the peer's public IP",
    ),
    Variant(
        "xdp-hostgw",
        Backend.HOST_GW,
        Dataplane.FLANNEL_XDP,
        IngressHook.XDP,
        "xh",
        "flannel-xdp host-gw: MAC rewrite in tc egress, XDP (pass + count) on the underlay",
    ),
    Variant(
        "xdp-hostgw-tc",
        Backend.HOST_GW,
        Dataplane.FLANNEL_XDP,
        IngressHook.TC,
        "xht",
        "flannel-xdp host-gw: MAC rewrite in tc egress, tc ingress (pass + count)",
    ),
    Variant(
        "xdp-hostgw-fast",
        Backend.HOST_GW,
        Dataplane.FLANNEL_XDP,
        IngressHook.TC,
        "xhf",
        "flannel-xdp host-gw, tc hook with the UDP and TCP fast path: conntrack-confirmed, "
        "un-NATed UDP and established TCP are sent from the pod's veth end and delivered "
        "into the pod's netns",
        fast_path=True,
    ),
    Variant(
        "direct-veth",
        Backend.VXLAN,
        None,
        None,
        "dv",
        "the physical limit: two pods on one veth pair at the vxlan pods' MTU, no node "
        "between them",
    ),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
DEFAULT_HOOK = IngressHook(defaults.INGRESS_HOOK)


def by_name(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANT_NAMES)}")


def select(names: list[str] | None) -> list[Variant]:
    """The variants to run, in the canonical order whatever the order asked."""
    if not names:
        return list(VARIANTS)
    wanted = {by_name(n).name for n in names}
    return [v for v in VARIANTS if v.name in wanted]


def flannel_xdp_variant(backend: Backend, hook: IngressHook) -> Variant:
    if backend is Backend.HOST_GW and hook is IngressHook.KERNEL:
        # host-gw has nothing to decapsulate: under the kernel hook its packets take
        # exactly the tc hook's path (the same underlay_tc verdict, tunnel_egress rewrite).
        hook = IngressHook.TC
    for v in VARIANTS:
        if v.is_xdp and v.backend is backend and v.hook is hook and not v.fast_path:
            return v
    raise KeyError(f"no flannel-xdp variant for {backend} with hook {hook}")


def fast_path_variant(backend: Backend) -> Variant:
    """The fast path's variant of the backend (vxlan: kernel hook; host-gw: tc)."""
    for v in VARIANTS:
        if v.fast_path and v.backend is backend:
            return v
    raise KeyError(f"no fast-path variant for {backend}")


def stock_variant(backend: Backend) -> Variant:
    for v in VARIANTS:
        if v.dataplane is Dataplane.FLANNELD and v.backend is backend:
            return v
    raise KeyError(f"no stock variant for {backend}")


def direct_variant() -> Variant:
    for v in VARIANTS:
        if v.is_direct:
            return v
    raise KeyError("no direct veth pair variant")


@functools.cache
def agent_runs_fast_path() -> bool:
    """Whether the agent, as shipped, runs the fast path on this machine: its default
    mode, and this kernel's conntrack kfuncs and tcx (both backends' default hooks have
    a build of it)."""
    return fast_path.DEFAULT_MODE is not fast_path.Mode.OFF and not fast_path.kernel_lacks()


def default_variant(backend: Backend) -> Variant:
    """The data path the agent runs by default on this machine, for the backend."""
    if agent_runs_fast_path():
        return fast_path_variant(backend)
    return flannel_xdp_variant(backend, DEFAULT_HOOK)


@dataclass(frozen=True)
class FlanneldSpec:
    """What the workloads read of a cluster's spec (topology.ClusterSpec's names)."""

    prefix: str
    backend: Backend
    pod_mtu: int
    vni: int = defaults.VXLAN_VNI
    vxlan_port: int = defaults.VXLAN_PORT


@dataclass(frozen=True)
class FlanneldNode:
    """A flanneld node as the workloads see a node (topology.Node's names)."""

    index: int
    netns: str
    public_ip: IPv4Address
    vtep_mac: str
    pods: tuple[Pod, ...]
    bpffs: str = ""


class FlanneldCluster:
    """A stock variant's cluster: two real flanneld nodes (AgentCluster, stock=2), with
    the attributes the workloads use of topology.Cluster."""

    def __init__(self, variant: Variant, name: str):
        self.lab = AgentCluster(
            AgentClusterSpec(
                name=name, nodes=2, pods=1, stock=2, backend=variant.backend, outside=False
            )
        )
        self.spec = FlanneldSpec(self.lab.prefix, variant.backend, 0)
        self.nodes: list[FlanneldNode] = []

    def up(self) -> None:
        self.lab.up()
        leases = self.lab.leases()
        for n in self.lab.nodes:
            assert n.subnet is not None and n.mtu is not None
            # As the stack's flannel-xdp variants run (Variant.spec).
            process.run(n.netns, ["sysctl", "-qw", f"{TCP_BE_LIBERAL}=1"])
            data = leases[f"{n.subnet.network_address}-{n.subnet.prefixlen}"].get("BackendData")
            mac = data["VtepMAC"] if data else ""
            self.nodes.append(FlanneldNode(n.index, n.netns, n.public_ip, mac, tuple(n.pods)))
        mtu = self.lab.nodes[0].mtu
        assert mtu is not None
        self.spec = FlanneldSpec(self.lab.prefix, self.spec.backend, mtu)

    def down(self) -> None:
        self.lab.down()

    def diagnostics(self) -> str:
        return self.lab.diagnostics()

    def counters(self, node: FlanneldNode):
        raise RuntimeError(f"{node.netns} runs flanneld: it has no BPF counters")


@dataclass
class Bed:
    """One variant's running cluster, seen from the workloads: traffic goes from the
    pod on node 0 (sender) to the pod on node 1 (receiver)."""

    variant: Variant
    cluster: Cluster | FlanneldCluster | DirectPair
    underlay_macs: tuple[str, str] = ("", "")
    underlay_ifindexes: tuple[int, int] = (0, 0)

    @property
    def sender_node(self) -> Node | FlanneldNode:
        return self.cluster.nodes[0]

    @property
    def receiver_node(self) -> Node | FlanneldNode:
        return self.cluster.nodes[1]

    @property
    def sender(self) -> Pod:
        return self.sender_node.pods[0]

    @property
    def receiver(self) -> Pod:
        return self.receiver_node.pods[0]


class BenchInterrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, turned into an exception so that every cluster is torn
    down."""


# SIGINT is handled explicitly too: a process started with SIGINT ignored (a background
# job of a non-interactive shell, as CI and scripts start it) would otherwise never see
# Ctrl-C or an interrupt sent to it, and run on to the end.
_INTERRUPTING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise BenchInterrupted(f"signal {signal.Signals(signum).name}")


@dataclass
class Testbed:
    """Every selected variant's cluster, up at once; a context manager that tears all of
    them down on the way out, whether the run finished, failed or was interrupted
    (Ctrl-C, SIGTERM, SIGHUP). While tearing down, those signals are ignored so that no
    namespace is left half-removed. A variant whose cluster cannot be built or whose
    pods cannot reach each other is dropped (in `broken`, with the reason); the
    others are measured."""

    variants: list[Variant]
    beds: dict[str, Bed] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # variant -> why it was dropped
    run_id: str = field(default_factory=lambda: secrets.token_hex(2))
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _handlers: dict = field(default_factory=dict)  # signal handlers to restore

    def __enter__(self) -> Testbed:
        self._handlers = {
            signum: signal.signal(signum, _raise_interrupt) for signum in _INTERRUPTING
        }
        try:
            for variant in self.variants:
                self._bring_up(variant)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        held = {signum: signal.signal(signum, signal.SIG_IGN) for signum in _INTERRUPTING}
        try:
            self._stack.close()
        finally:
            for signum, handler in {**held, **self._handlers}.items():
                signal.signal(signum, handler)
            self._handlers = {}

    @property
    def prefix(self) -> str:
        """What every lab name of this run starts with (netns, bpffs pin directories)."""
        return f"fxb{self.run_id}-"

    def _bring_up(self, variant: Variant) -> None:
        prefix = self.prefix + variant.code
        if variant.is_xdp:
            cluster: Cluster | FlanneldCluster | DirectPair = Cluster(variant.spec(prefix))
        elif variant.is_direct:
            cluster = DirectPair(prefix)
        else:  # the lab's names allow no "-": fxlab-b<run id><code>-...
            cluster = FlanneldCluster(variant, f"b{self.run_id}{variant.code}")
        log.info("bringing up %s (%s)", variant.name, cluster.spec.prefix)
        # Registered first: down() skips what does not exist, so an interrupt at any
        # point of up() still has everything removed.
        self._stack.callback(self._tear_down, variant, cluster)
        try:
            cluster.up()
        except Exception as exc:  # the others can still be measured
            self.broken[variant.name] = f"bring-up failed: {type(exc).__name__}: {exc}"
            log.error("%s: bring-up failed, variant dropped: %s", variant.name, exc)
            return
        bed = Bed(variant, cluster)
        try:
            tx, rx = cluster.nodes
            if variant.is_direct:  # no underlay
                self._check_connectivity(bed)
                self.beds[variant.name] = bed
                return
            bed.underlay_macs = (
                link_mac(tx.netns, UNDERLAY_IFNAME),
                link_mac(rx.netns, UNDERLAY_IFNAME),
            )
            bed.underlay_ifindexes = (
                link_index(tx.netns, UNDERLAY_IFNAME),
                link_index(rx.netns, UNDERLAY_IFNAME),
            )
            self._check_connectivity(bed)
        except (OSError, subprocess.SubprocessError, process.CommandError) as exc:
            self.broken[variant.name] = f"{exc}\n{cluster.diagnostics()}"
            log.error("%s: pods cannot reach each other, variant dropped: %s", variant.name, exc)
            return
        self.beds[variant.name] = bed

    @staticmethod
    def _check_connectivity(bed: Bed) -> None:
        """Ping both ways (also resolves every neighbour before the first measurement)."""
        for src, dst in ((bed.sender, bed.receiver), (bed.receiver, bed.sender)):
            process.run(src.netns, ["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", str(dst.ip)])

    @staticmethod
    def _tear_down(variant: Variant, cluster: Cluster | FlanneldCluster | DirectPair) -> None:
        log.info("tearing down %s (%s)", variant.name, cluster.spec.prefix)
        try:
            cluster.down()
        except Exception:
            log.exception("%s: teardown failed; prefix %s", variant.name, cluster.spec.prefix)

    def ready(self) -> list[Bed]:
        return [self.beds[v.name] for v in self.variants if v.name in self.beds]
