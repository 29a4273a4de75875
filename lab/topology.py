"""A Flannel cluster built from network namespaces, veth pairs and bridges.

One netns plays the underlay switch (a bridge), one netns per node holds the
node's underlay interface ``eth0``, its ``cni0`` bridge and its data path,
and one netns per pod holds the pod's ``eth0``. Nodes run either flannel-xdp
(the BPF data path plus the node state the agent will own) or the kernel data
path exactly as stock flanneld programs it (lab/flanneld.py).

This cluster imitates the control plane on purpose: no agent, no flanneld, no
registry and no CNI plugin run; subnets, VtepMACs and pod addresses come from a
plan, and cni0 and the pods are made as the bridge plugin makes them. The packet,
integration and fast-path tests and the benchmark's flannel-xdp variants need that:
exact frames built from addresses known in advance, and node state a test can change
under a running data path. Everything that should behave like a real cluster (lab up,
the demo, mixed clusters, migrations, the benchmark's stock variants) uses
agentcluster.py, with the real agent, flanneld and CNI plugins.

Everything is named from one unique prefix (netns ``<prefix>-sw``,
``<prefix>-n<i>``, ``<prefix>-n<i>-p<j>``, pins ``<bpffs root>/<prefix>-n<i>``),
so several labs can run side by side and ``down()`` can find every piece from
the plan alone, even in a process other than the one that built it.
Offloads are left at their defaults: the point of the lab is to see the data
path the way a real node runs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute

from flannel_xdp import defaults, netns
from flannel_xdp.backend import Backend
from flannel_xdp.lab import flanneld, process
from flannel_xdp.loader import datapath, pod_ports
from flannel_xdp.loader.attach import XdpMode
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.maps.views import (
    LocalPod,
    LocalPodsMap,
    Peer,
    ReasonsMap,
    SubnetsMap,
    TrafficMap,
)
from flannel_xdp.node import conntrack, flow_marks, masq, routes

log = logging.getLogger(__name__)

# Documentation and benchmark ranges only (RFC 5737, RFC 2544): never anything routable.
DEFAULT_UNDERLAY = IPv4Network("192.0.2.0/24")
DEFAULT_NETWORK = IPv4Network("198.18.0.0/16")
DEFAULT_SUBNET_LEN = 24
DEFAULT_MTU = 1500
UNDERLAY_IFNAME = "eth0"
SWITCH_BRIDGE = "br0"
CNI_BRIDGE = defaults.CNI_BRIDGE
POD_IFNAME = "eth0"
BPFFS_ROOT = "/sys/fs/bpf"
# Loose reverse-path filtering, the systemd default on most distributions, set
# explicitly rather than inherited from the host (see Cluster._make_node).
RP_FILTER_LOOSE = "2"
ZERO_MAC = "00:00:00:00:00:00"

_PREFIX = re.compile(r"^[a-z][a-z0-9-]{0,19}$")


class LabError(RuntimeError):
    pass


class Dataplane(StrEnum):
    """What forwards a node's pod traffic."""

    FLANNEL_XDP = "flannel-xdp"  # BPF programs + node_state, as the agent will
    FLANNELD = "flanneld"  # the kernel's vxlan device or routes, as stock flanneld


def new_prefix() -> str:
    """A fresh name prefix: short enough for every name built from it."""
    return "fxl" + secrets.token_hex(3)


@dataclass(frozen=True)
class NodeSpec:
    dataplane: Dataplane = Dataplane.FLANNEL_XDP
    pods: int = 2


@dataclass(frozen=True)
class ClusterSpec:
    """What to build. Addresses are planned from it before anything is touched."""

    nodes: tuple[NodeSpec, ...] = (NodeSpec(), NodeSpec())
    backend: Backend = Backend.VXLAN
    prefix: str = field(default_factory=new_prefix)
    underlay: IPv4Network = DEFAULT_UNDERLAY
    network: IPv4Network = DEFAULT_NETWORK
    subnet_len: int = DEFAULT_SUBNET_LEN
    underlay_mtu: int = DEFAULT_MTU
    vni: int = defaults.VXLAN_VNI
    vxlan_port: int = defaults.VXLAN_PORT
    xdp_mode: XdpMode = XdpMode.AUTO
    ingress_hook: datapath.IngressHook = datapath.DEFAULT_INGRESS_HOOK
    udp_fast_path: bool = False  # kernel hook only (bpf/fastpath.h)
    # with udp_fast_path; each node marks its pods' TCP flows (node/flow_marks.py)
    tcp_fast_path: bool = False
    # net.netfilter.nf_conntrack_tcp_be_liberal=1 on every node (the benchmark's kernel
    # variants may set it, to compare data paths under one conntrack setting)
    conntrack_tcp_be_liberal: bool = False
    # flanneld's --ip-masq and forward rules on every node, as kube-flannel runs it; they
    # also turn conntrack on in the node netns, as on any Kubernetes node
    ip_masq: bool = False
    max_subnets: int = defaults.MAX_SUBNETS
    bpffs_root: str = BPFFS_ROOT

    @classmethod
    def uniform(
        cls,
        nodes: int,
        pods: int,
        dataplane: Dataplane = Dataplane.FLANNEL_XDP,
        backend: Backend = Backend.VXLAN,
        **kwargs,
    ) -> ClusterSpec:
        """nodes identical nodes of pods pods each."""
        return cls(nodes=(NodeSpec(dataplane, pods),) * nodes, backend=backend, **kwargs)

    @property
    def pod_mtu(self) -> int:
        """The MTU flannel gives pods (and its tunnel device): FLANNEL_MTU in subnet.env."""
        if self.backend is Backend.VXLAN:
            return self.underlay_mtu - defaults.VXLAN_OVERHEAD
        return self.underlay_mtu

    def validate(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise LabError(f"prefix {self.prefix!r}: want [a-z][a-z0-9-]*, at most 20 characters")
        if not self.nodes:
            raise LabError("a cluster needs at least one node")
        if len(self.nodes) > self.underlay.num_addresses - 2:
            raise LabError(f"{len(self.nodes)} nodes do not fit underlay {self.underlay}")
        if not self.network.prefixlen < self.subnet_len <= 30:
            raise LabError(f"subnet length {self.subnet_len} does not fit network {self.network}")
        if len(self.nodes) + 1 > 2 ** (self.subnet_len - self.network.prefixlen):
            raise LabError(f"{len(self.nodes)} /{self.subnet_len} subnets exceed {self.network}")
        pods_max = 2 ** (32 - self.subnet_len) - 3  # .0 tunnel, .1 gateway, broadcast
        for spec in self.nodes:
            if not 0 <= spec.pods <= pods_max:
                raise LabError(f"{spec.pods} pods do not fit a /{self.subnet_len}")
        if self.pod_mtu < 576:
            raise LabError(f"underlay MTU {self.underlay_mtu} leaves pods too little")
        if self.tcp_fast_path and not self.udp_fast_path:
            raise LabError("the TCP fast path is part of the UDP fast path")


@dataclass(frozen=True)
class PlannedLease:
    """What a node publishes in the registry (flannel-compat.md, lease value)."""

    subnet: IPv4Network
    public_ip: IPv4Address
    backend: Backend
    vtep_mac: str | None  # BackendData.VtepMAC; host-gw leases carry none

    def peer(self) -> Peer:
        """The lease as an entry of the subnets map (and of node_state)."""
        backend = Backend.VXLAN if self.backend is Backend.VXLAN else Backend.HOST_GW
        return Peer(self.subnet, self.public_ip, backend, self.vtep_mac or ZERO_MAC)


@dataclass(frozen=True)
class Pod:
    netns: str
    node: int
    index: int
    ip: IPv4Address
    gateway: IPv4Address
    prefixlen: int
    mtu: int
    host_veth: str  # the pod's veth end in the node netns, enslaved to cni0


@dataclass(frozen=True)
class Node:
    index: int
    netns: str
    dataplane: Dataplane
    public_ip: IPv4Address
    underlay_prefixlen: int
    subnet: IPv4Network
    vtep_mac: str
    switch_port: str  # the node's veth end in the switch netns
    bpffs: str  # pin directory (flannel-xdp nodes)
    pods: tuple[Pod, ...]

    @property
    def gateway(self) -> IPv4Address:
        return self.subnet.network_address + 1

    def lease(self, backend: Backend) -> PlannedLease:
        mac = self.vtep_mac if backend is Backend.VXLAN else None
        return PlannedLease(self.subnet, self.public_ip, backend, mac)


@dataclass(frozen=True)
class Counters:
    """A flannel-xdp node's counters: traffic by (backend, direction), reasons by
    (backend, reason name), as (packets, bytes)."""

    traffic: dict[tuple[str, str], tuple[int, int]]
    reasons: dict[tuple[str, str], tuple[int, int]]

    def since(self, before: Counters) -> Counters:
        """What grew since before (the maps only ever count up)."""

        def sub(now, then):
            return {
                k: (v[0] - then.get(k, (0, 0))[0], v[1] - then.get(k, (0, 0))[1])
                for k, v in now.items()
            }

        return Counters(sub(self.traffic, before.traffic), sub(self.reasons, before.reasons))

    def packets(self, backend: str, direction: str) -> int:
        return self.traffic.get((backend, direction), (0, 0))[0]

    def drops(self) -> dict[tuple[str, str], int]:
        """Nonzero DROP_* reasons, by (backend, reason)."""
        return {k: v[0] for k, v in self.reasons.items() if k[1].startswith("DROP_") and v[0]}


def plan(spec: ClusterSpec) -> list[Node]:
    """Names and addresses of every node and pod, without touching the system.

    Node i gets underlay address .i+1 and the (i+1)-th subnet of the network:
    flannel's default SubnetMin is the network's second subnet.
    """
    spec.validate()
    step = 2 ** (32 - spec.subnet_len)
    nodes = []
    for i, node_spec in enumerate(spec.nodes):
        name = f"{spec.prefix}-n{i}"
        subnet = IPv4Network((int(spec.network.network_address) + (i + 1) * step, spec.subnet_len))
        pods = tuple(
            Pod(
                netns=f"{name}-p{j}",
                node=i,
                index=j,
                ip=subnet.network_address + 2 + j,
                gateway=subnet.network_address + 1,
                prefixlen=spec.subnet_len,
                mtu=spec.pod_mtu,
                host_veth=f"veth{j}",
            )
            for j in range(node_spec.pods)
        )
        nodes.append(
            Node(
                index=i,
                netns=name,
                dataplane=node_spec.dataplane,
                public_ip=spec.underlay.network_address + 1 + i,
                underlay_prefixlen=spec.underlay.prefixlen,
                subnet=subnet,
                # locally administered unicast ("fx"), unique per node
                vtep_mac="0e:66:78:00:{:02x}:{:02x}".format(*divmod(i + 1, 256)),
                switch_port=f"n{i}",
                bpffs=os.path.join(spec.bpffs_root, name),
                pods=pods,
            )
        )
    return nodes


@contextlib.contextmanager
def _iproute(ns: str) -> Iterator[IPRoute]:
    """IPRoute on the current thread inside ns (pyroute2 binds its socket at creation)."""
    with netns.entered(ns), IPRoute() as ipr:
        yield ipr


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise LabError(f"interface {name} vanished")
    return found[0]


def _sysctl(name: str, value: str) -> None:
    """Write a sysctl in the current thread's netns (/proc/sys/net is per netns)."""
    with open(conntrack.sysctl_path(name), "w") as f:
        f.write(value)


# -- building blocks, shared with the agent-driven lab (agentcluster.py) -------------------


def link_index(ns: str, ifname: str) -> int:
    with _iproute(ns) as ipr:
        return _index(ipr, ifname)


def link_mac(ns: str, ifname: str) -> str:
    with _iproute(ns) as ipr:
        return ipr.get_links(_index(ipr, ifname))[0].get_attr("IFLA_ADDRESS")


def new_netns(ns: str) -> None:
    """An empty netns with lo up and IPv6 off."""
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, text=True)
    with netns.entered(ns):
        # IPv6 stays off: no DAD, router or MLD chatter on the wire and through
        # the tunnel, so counters and captures show only the tests' traffic.
        _sysctl("net.ipv6.conf.all.disable_ipv6", "1")
        _sysctl("net.ipv6.conf.default.disable_ipv6", "1")
        with IPRoute() as ipr:
            ipr.link("set", index=_index(ipr, "lo"), state="up")


def delete_netns(ns: str, owner: str = "lab") -> None:
    """Delete ns after killing what still runs in it; quiet when it is gone."""
    if not process.netns_exists(ns):
        return
    # Servers a test left behind would keep the netns (and its devices) alive.
    for pid in process.netns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
        if res.returncode == 0 or not process.netns_exists(ns):
            return
        time.sleep(0.1)
    log.error("%s: cannot delete netns %s: %s", owner, ns, res.stderr)


# A bridge hands what it forwards to iptables while these are 1, their value in every new
# netns once br_netfilter is in the kernel. A node needs that for its pods' bridge; the
# switch is the underlay network, not a host: conntrack and iptables there would charge
# every node's tunnel packets to the machine's CPUs, as no hardware switch does.
SWITCH_BRIDGE_NETFILTER = tuple(
    f"net.bridge.bridge-nf-call-{table}" for table in ("iptables", "ip6tables", "arptables")
)


def make_switch(ns: str) -> None:
    """The underlay switch: a bridge in a netns of its own, without netfilter."""
    new_netns(ns)
    with netns.entered(ns):
        for name in SWITCH_BRIDGE_NETFILTER:
            if os.path.exists(conntrack.sysctl_path(name)):  # br_netfilter is in the kernel
                _sysctl(name, "0")
    with _iproute(ns) as ipr:
        ipr.link("add", ifname=SWITCH_BRIDGE, kind="bridge")
        ipr.link("set", index=_index(ipr, SWITCH_BRIDGE), state="up")


def plug_into_switch(switch: str, port: str, ns: str, mtu: int) -> None:
    """A veth from the switch bridge (port) to eth0 in ns, both up."""
    with _iproute(switch) as ipr:
        ipr.link("add", ifname=port, kind="veth", peer={"ifname": UNDERLAY_IFNAME, "net_ns_fd": ns})
        idx = _index(ipr, port)
        ipr.link("set", index=idx, master=_index(ipr, SWITCH_BRIDGE), mtu=mtu)
        ipr.link("set", index=idx, state="up")
    with _iproute(ns) as ipr:
        eth = _index(ipr, UNDERLAY_IFNAME)
        ipr.link("set", index=eth, mtu=mtu)
        ipr.link("set", index=eth, state="up")


def make_node_netns(
    ns: str,
    switch: str,
    port: str,
    addresses: Sequence[tuple[IPv4Address, int]],
    mtu: int,
    *,
    tcp_be_liberal: bool = False,
) -> None:
    """A node: its netns, eth0 on the switch with addresses (the first is the underlay
    address), forwarding on and loose reverse-path filtering; with tcp_be_liberal,
    conntrack that leaves TCP windows unchecked (what --tcp-fast-path needs)."""
    new_netns(ns)
    plug_into_switch(switch, port, ns, mtu)
    with _iproute(ns) as ipr:
        eth = _index(ipr, UNDERLAY_IFNAME)
        for address, prefixlen in addresses:
            ipr.addr("add", index=eth, address=str(address), prefixlen=prefixlen)
        _sysctl("net.ipv4.ip_forward", "1")
        # Pinned, not inherited from the host: with strict filtering (1) the
        # host-gw replies arriving on eth0 fail the check, because flannel-xdp
        # routes remote subnets into the tunnel device.
        _sysctl("net.ipv4.conf.all.rp_filter", RP_FILTER_LOOSE)
        _sysctl("net.ipv4.conf.default.rp_filter", RP_FILTER_LOOSE)
        if tcp_be_liberal:
            _sysctl(conntrack.TCP_BE_LIBERAL, "1")


def make_cni_bridge(ipr: IPRoute, gateway: IPv4Address, prefixlen: int, mtu: int) -> None:
    """cni0 with the pods' gateway address, as the flannel CNI plugin's bridge makes it."""
    ipr.link("add", ifname=CNI_BRIDGE, kind="bridge", mtu=mtu)
    cni = _index(ipr, CNI_BRIDGE)
    ipr.addr("add", index=cni, address=str(gateway), prefixlen=prefixlen)
    ipr.link("set", index=cni, state="up")


def make_pod(node_ns: str, pod: Pod) -> None:
    """A pod: its netns, a veth into the node's cni0, its address and default route."""
    new_netns(pod.netns)
    with _iproute(node_ns) as ipr:
        ipr.link(
            "add",
            ifname=pod.host_veth,
            kind="veth",
            peer={"ifname": POD_IFNAME, "net_ns_fd": pod.netns},
        )
        host = _index(ipr, pod.host_veth)
        ipr.link("set", index=host, master=_index(ipr, CNI_BRIDGE), mtu=pod.mtu)
        ipr.link("set", index=host, state="up")
    with _iproute(pod.netns) as ipr:
        eth = _index(ipr, POD_IFNAME)
        ipr.link("set", index=eth, mtu=pod.mtu)
        ipr.addr("add", index=eth, address=str(pod.ip), prefixlen=pod.prefixlen)
        ipr.link("set", index=eth, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=str(pod.gateway))


class Cluster:
    """Build (up) and tear down (down) one lab cluster; also a context manager.

    Construction only plans; up() touches the system and, if anything fails,
    tears down what it made before re-raising. down() is safe to call twice and
    from a process that did not build the cluster (same spec, same prefix).
    """

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.nodes: list[Node] = plan(spec)
        self.switch = f"{spec.prefix}-sw"
        # tcp_fast_path: each node's flow marker, in a thread of this process
        self._markers: list[tuple[flow_marks.FlowMarker, threading.Thread]] = []
        self._stop_marking = threading.Event()

    # -- views -------------------------------------------------------------

    @property
    def pods(self) -> list[Pod]:
        return [p for n in self.nodes for p in n.pods]

    @property
    def namespaces(self) -> list[str]:
        """Every netns of the cluster, switch first, pods last."""
        return [self.switch, *(n.netns for n in self.nodes), *(p.netns for p in self.pods)]

    def leases(self) -> list[PlannedLease]:
        return [n.lease(self.spec.backend) for n in self.nodes]

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> Cluster:
        # Never adopt: a leftover pin dir would hand the new nodes stale map contents.
        taken = [ns for ns in self.namespaces if process.netns_exists(ns)]
        taken += [n.bpffs for n in self.nodes if os.path.exists(n.bpffs)]
        if taken:
            raise LabError(f"already exist: {taken} (prefix in use? down() clears a stale lab)")
        try:
            self._make_switch()
            for node in self.nodes:
                self._make_node(node)
                for pod in node.pods:
                    self._make_pod(node, pod)
            for node in self.nodes:
                self._install_dataplane(node)
            self.program_peers()
            if self.spec.tcp_fast_path:
                self._start_markers()
        except BaseException:
            log.exception("lab %s: bring-up failed, tearing down", self.spec.prefix)
            self.down()
            raise
        log.info("lab %s up: %d nodes, %d pods", self.spec.prefix, len(self.nodes), len(self.pods))
        return self

    def down(self) -> None:
        """Remove every netns and pin of this cluster; what is already gone is skipped."""
        self._stop_markers()
        for node in self.nodes:
            if node.dataplane is Dataplane.FLANNEL_XDP and process.netns_exists(node.netns):
                try:
                    with netns.entered(node.netns):
                        datapath.uninstall(node.bpffs, UNDERLAY_IFNAME, self.spec.vni)
                except Exception:  # the netns and pins go below regardless
                    log.exception("lab %s: uninstall on %s failed", self.spec.prefix, node.netns)
        for ns in reversed(self.namespaces):
            self._delete_netns(ns)
        for node in self.nodes:
            if os.path.exists(node.bpffs):
                PinDir(node.bpffs).remove()
        left = [ns for ns in self.namespaces if process.netns_exists(ns)]
        left += [n.bpffs for n in self.nodes if os.path.exists(n.bpffs)]
        if left:
            raise LabError(f"lab {self.spec.prefix}: could not remove {left}")

    def _start_markers(self) -> None:
        """What an agent with --tcp-fast-path does for its node: mark the flows between
        its pods and the other nodes' (node/flow_marks.py)."""
        self._stop_marking.clear()
        for node in self.nodes:
            if node.dataplane is not Dataplane.FLANNEL_XDP:
                continue
            with netns.entered(node.netns):
                marker = flow_marks.FlowMarker.open(node.subnet, self.spec.network)
            thread = threading.Thread(
                target=flow_marks.serve,
                args=(marker, self._stop_marking),
                name=f"flow-marks-{node.netns}",
                daemon=True,
            )
            thread.start()
            self._markers.append((marker, thread))

    def _stop_markers(self) -> None:
        self._stop_marking.set()
        for marker, thread in self._markers:
            thread.join(5)
            marker.close()
        self._markers.clear()

    def program_peers(self) -> None:
        """Give every node the leases of all others, the way its data path wants them."""
        leases = self.leases()
        for node in self.nodes:
            peers = [lease.peer() for lease in leases if lease.subnet != node.subnet]
            with netns.entered(node.netns):
                if node.dataplane is Dataplane.FLANNEL_XDP:
                    self._program_xdp_peers(node, peers)
                elif self.spec.backend is Backend.VXLAN:
                    for peer in peers:
                        flanneld.add_vxlan_peer(peer, self.spec.vni)
                else:
                    for peer in peers:
                        flanneld.add_host_gw_route(peer, UNDERLAY_IFNAME)

    # -- inspection --------------------------------------------------------

    def run(self, ns: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess[str]:
        """process.run() in one of this cluster's namespaces."""
        return process.run(ns, argv, **kwargs)

    def counters(self, node: Node) -> Counters:
        if node.dataplane is not Dataplane.FLANNEL_XDP:
            raise LabError(f"{node.netns} runs {node.dataplane}: it has no BPF counters")
        maps = PinDir(node.bpffs).maps
        with TrafficMap(maps) as traffic, ReasonsMap(maps) as reasons:
            return Counters(traffic.by_label(), reasons.by_label())

    def diagnostics(self) -> str:
        """Links with statistics, routes, neighbours and nonzero counters of every node:
        the first things to read when traffic does not flow."""
        out = []
        for node in self.nodes:
            out.append(f"=== {node.netns} ({node.dataplane}, {node.public_ip}, {node.subnet})")
            for argv in (
                ["ip", "-s", "addr"],
                ["ip", "route"],
                ["ip", "neigh"],
                ["bpftool", "net", "show"],
            ):
                res = process.run(node.netns, argv, check=False, keep_mounts=True)
                out.append(f"$ {' '.join(argv)}\n{res.stdout}{res.stderr}")
            if node.dataplane is Dataplane.FLANNEL_XDP:
                try:
                    c = self.counters(node)
                    out.append(f"traffic: { {k: v for k, v in c.traffic.items() if v[0]} }")
                    out.append(f"reasons: { {k: v for k, v in c.reasons.items() if v[0]} }")
                except Exception as exc:
                    out.append(f"counters unavailable: {exc}")
        return "\n".join(out)

    # -- building ----------------------------------------------------------

    def _delete_netns(self, ns: str) -> None:
        delete_netns(ns, self.spec.prefix)

    def _make_switch(self) -> None:
        make_switch(self.switch)

    def _make_node(self, node: Node) -> None:
        make_node_netns(
            node.netns,
            self.switch,
            node.switch_port,
            [(node.public_ip, node.underlay_prefixlen)],
            self.spec.underlay_mtu,
            tcp_be_liberal=self.spec.conntrack_tcp_be_liberal,
        )
        with _iproute(node.netns) as ipr:
            make_cni_bridge(ipr, node.gateway, node.subnet.prefixlen, self.spec.pod_mtu)

    def _make_pod(self, node: Node, pod: Pod) -> None:
        make_pod(node.netns, pod)

    def _install_dataplane(self, node: Node) -> None:
        spec = self.spec
        with netns.entered(node.netns):
            if node.dataplane is Dataplane.FLANNEL_XDP:
                datapath.install(
                    datapath.DataPathConfig(
                        underlay=UNDERLAY_IFNAME,
                        bpffs=node.bpffs,
                        max_subnets=spec.max_subnets,
                        xdp_mode=spec.xdp_mode,
                        ingress_hook=spec.ingress_hook,
                        tunnel_mtu=spec.pod_mtu,
                        udp_fast_path=spec.udp_fast_path,
                        tcp_fast_path=spec.tcp_fast_path,
                    ),
                    datapath.NodeParams(
                        public_ip=node.public_ip,
                        subnet=node.subnet,
                        vtep_mac=node.vtep_mac,
                        vni=spec.vni,
                        vxlan_port=spec.vxlan_port,
                    ),
                )
                with IPRoute() as ipr:
                    routes.set_tunnel_address(ipr, node.subnet, spec.vni)
            elif spec.backend is Backend.VXLAN:
                flanneld.ensure_vxlan_device(
                    node.public_ip,
                    node.subnet,
                    node.vtep_mac,
                    mtu=spec.pod_mtu,
                    underlay=UNDERLAY_IFNAME,
                    vni=spec.vni,
                    port=spec.vxlan_port,
                )
            if spec.ip_masq:
                masq.install(spec.network, node.subnet, ip_masq=True)
        if node.dataplane is Dataplane.FLANNEL_XDP and spec.udp_fast_path:
            self._program_local_pods(node)

    def _program_local_pods(self, node: Node) -> None:
        """What the agent's cni0 scan (agent/local_pods.py) finds once the pods have
        talked, and the sending side it then attaches; the lab knows it from the start."""
        gateway_mac = link_mac(node.netns, CNI_BRIDGE)
        pods = [
            LocalPod(
                pod.ip,
                link_index(node.netns, pod.host_veth),
                link_mac(pod.netns, POD_IFNAME),
                gateway_mac,
            )
            for pod in node.pods
        ]
        with LocalPodsMap(PinDir(node.bpffs).maps) as local_pods:
            local_pods.apply(pods)
        with netns.entered(node.netns):
            pod_ports.ensure_pod_ports(node.bpffs, [pod.host_veth for pod in node.pods])

    def _program_xdp_peers(self, node: Node, peers: list[Peer]) -> None:
        with SubnetsMap(PinDir(node.bpffs).maps) as subnets:
            subnets.apply(peers)
        with IPRoute() as ipr:
            routes.sync_next_hops(ipr, _index(ipr, UNDERLAY_IFNAME), peers)
            routes.sync_peers(ipr, peers, self.spec.vni)
