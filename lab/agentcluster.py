"""A virtual Flannel cluster run by real agents: what `flannel-xdp lab up` and the demo build.

Unlike Cluster (topology.py), which programs every node's data path itself from a
plan, an AgentCluster only builds the wiring and lets the control plane do the rest,
as on real machines:

* a switch (a bridge in netns ``<prefix>-sw``) for the underlay 192.0.2.0/24, and
  optionally an "outside" host (netns ``<prefix>-out``, 198.51.100.254/24) on the
  same switch, with every node holding a second address 198.51.100.<i+1>/24;
* a local etcd (loopback port for etcdctl, unix socket for the agents and flanneld)
  holding flannel's network config under /coreos.com/network;
* per node a netns ``<prefix>-n<i>`` with ``eth0`` on the switch, running
  ``flannel-xdp agent`` or, for stock nodes, the real flanneld (``make peers``) in
  etcd mode with kube-flannel's flags; either takes a lease, makes its data path
  and writes subnet.env;
* then the pods, made by the real CNI chain once subnet.env exists (lab/cni.py:
  kube-flannel's conflist through cnitool, flannel -> bridge -> host-local, then
  portmap): ``cni0``, a veth per pod, an address from host-local, read back from
  the CNI result.

Nothing here imitates flanneld or the CNI plugins any more; the static
topology.Cluster still does, for the packet and benchmark beds that need nodes
programmed from a plan (see topology.py).

State lives in a run directory (``/run/flannel-xdp-lab/<name>/state.json``, with
etcd's data, subnet.env files, the CNI plugins' files and process logs), so another
process can find, inspect and tear down the lab by its name alone; down() also
works from the name alone when the state file is gone (everything is named from the
prefix). Deleting a node's netns takes flanneld's flannel.1, routes and iptables
chains (FLANNEL-POSTRTG, FLANNEL-FWD) with it. Nothing is ever added to the root
network namespace.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from socket import AF_INET

from flannel_xdp import defaults, netns
from flannel_xdp.backend import Backend
from flannel_xdp.lab import agents, cni, kubelab, peers, process
from flannel_xdp.lab.etcd import EtcdError, EtcdServer
from flannel_xdp.lab.kube import KubeApiServer, kubeconfig_text, relay_argv
from flannel_xdp.lab.topology import (
    BPFFS_ROOT,
    DEFAULT_MTU,
    DEFAULT_NETWORK,
    DEFAULT_UNDERLAY,
    UNDERLAY_IFNAME,
    Counters,
    Dataplane,
    LabError,
    Pod,
    _iproute,
    delete_netns,
    make_node_netns,
    make_switch,
    new_netns,
    plug_into_switch,
)
from flannel_xdp.loader import datapath
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.fast_path import Mode
from flannel_xdp.maps.views import Peer, ReasonsMap, SubnetsMap, TrafficMap

log = logging.getLogger(__name__)

RUN_ROOT = "/run/flannel-xdp-lab"
STATE_FILE = "state.json"
ETCD_PREFIX = "/coreos.com/network"
DEFAULT_OUTSIDE = IPv4Network("198.51.100.0/24")
SERVICE_NETWORK = IPv4Network("198.19.0.0/16")  # for kube-proxy style virtual IPs
DEFAULT_NAME = "lab"
START_TIMEOUT = 60.0
CONVERGE_TIMEOUT = 30.0
_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
# Where a DaemonSet pod's agent pins, below the /sys/fs/bpf it mounts from its node.
DAEMONSET_PINS = defaults.BPFFS_DIR.removeprefix(BPFFS_ROOT)
KUBE_PROXY_LOG = "kube-proxy.log"
RELAY_LOG = "apiserver-relay.log"


def prefix_for(name: str) -> str:
    """Every netns and pin of lab `name` starts with this (plus "-")."""
    return f"fxlab-{name}"


def run_dir_for(name: str, run_root: str = RUN_ROOT) -> str:
    return os.path.join(run_root, name)


def random_name() -> str:
    return "t" + secrets.token_hex(3)


@dataclass(frozen=True)
class AgentClusterSpec:
    """What to build. The last `stock` nodes run the real flanneld."""

    name: str = DEFAULT_NAME
    nodes: int = 3
    pods: int = 2
    backend: Backend = Backend.VXLAN
    direct_routing: bool = False
    stock: int = 0
    ingress_hook: datapath.IngressHook = datapath.DEFAULT_INGRESS_HOOK
    fast_path: Mode | None = None  # the agents' --fast-path; None: theirs by default
    # the agents' --tcp-fast-path (--fast-path on, TCP required)
    tcp_fast_path: bool = False
    # net.netfilter.nf_conntrack_tcp_be_liberal=1 on the nodes (the fast path does not
    # need it: the agents mark the flows it carries)
    conntrack_tcp_be_liberal: bool = False
    ip_masq: bool = True
    outside: bool = True
    network: IPv4Network = DEFAULT_NETWORK
    underlay: IPv4Network = DEFAULT_UNDERLAY
    outside_network: IPv4Network = DEFAULT_OUTSIDE
    underlay_mtu: int = DEFAULT_MTU
    xdp_mode: str = "auto"
    healthz_port: int = agents.HEALTHZ_PORT
    metrics_port: int = agents.METRICS_PORT
    run_root: str = RUN_ROOT
    bpffs_root: str = BPFFS_ROOT
    detach: bool = False  # processes outlive the creating process (lab up, demo --keep)
    kube: bool = False  # the Kubernetes API as the registry (kubelab.py), not etcd

    def validate(self) -> None:
        if not _NAME.match(self.name):
            raise LabError(f"lab name {self.name!r}: want [a-z][a-z0-9]*, at most 12 characters")
        if self.nodes < 1 or self.nodes > 200:
            raise LabError(f"{self.nodes} nodes: want 1..200")
        if not 0 <= self.pods <= 200:
            raise LabError(f"{self.pods} pods per node: want 0..200")
        if not 0 <= self.stock <= self.nodes:
            raise LabError(f"--stock {self.stock}: more stock nodes than nodes ({self.nodes})")
        if self.direct_routing and self.backend is not Backend.VXLAN:
            raise LabError("DirectRouting is a vxlan option")
        fast_on = self.fast_path is Mode.ON or self.tcp_fast_path
        if fast_on and not datapath.udp_fast_path_fits(self.backend, self.ingress_hook):
            raise LabError(f"--fast-path on: the fast path fits {datapath.UDP_FAST_PATH_FITS}")
        if self.tcp_fast_path and self.fast_path is Mode.OFF:
            raise LabError("--tcp-fast-path contradicts --fast-path off")

    def net_conf(self) -> dict:
        """flannel's network config (net-conf.json), as put at <prefix>/config."""
        backend: dict = {"Type": self.backend.value}
        if self.direct_routing:
            backend["DirectRouting"] = True
        return {"Network": str(self.network), "Backend": backend}

    @property
    def backend_label(self) -> str:
        return self.backend.value + (" DirectRouting" if self.direct_routing else "")

    def to_state(self) -> dict:
        return {
            k: str(v) if not isinstance(v, bool | int | None) else v
            for k, v in asdict(self).items()
        }

    @classmethod
    def from_state(cls, d: dict) -> AgentClusterSpec:
        return cls(
            **{
                **d,
                "backend": Backend(d["backend"]),
                "ingress_hook": datapath.IngressHook(d["ingress_hook"]),
                "fast_path": Mode(d["fast_path"]) if d.get("fast_path") else None,
                "network": IPv4Network(d["network"]),
                "underlay": IPv4Network(d["underlay"]),
                "outside_network": IPv4Network(d["outside_network"]),
            }
        )


@dataclass
class LabNode:
    """One node. subnet, mtu and pods are known once its agent has written subnet.env."""

    index: int
    netns: str
    dataplane: Dataplane
    public_ip: IPv4Address
    underlay_prefixlen: int
    outside_ip: IPv4Address | None
    switch_port: str
    bpffs: str
    dir: str
    pods_wanted: int
    pid: int | None = None
    subnet: IPv4Network | None = None
    mtu: int | None = None
    pods: list[Pod] = field(default_factory=list)
    kube: bool = False  # runs as a DaemonSet pod would (kubelab.PodSandbox)

    @property
    def name(self) -> str:
        """Also its Node object's name in kube mode."""
        return f"n{self.index}"

    @property
    def bpffs_root(self) -> str:
        """What the node's processes see as /sys/fs/bpf in kube mode (a DaemonSet pod
        mounts the host's)."""
        return self.bpffs.removesuffix(DAEMONSET_PINS)

    @property
    def is_agent(self) -> bool:
        return self.dataplane is Dataplane.FLANNEL_XDP

    @property
    def subnet_file(self) -> str:
        if self.kube:  # flanneld's default, /run/flannel/subnet.env, on the node's host
            return os.path.join(self.dir, "host", "run", "flannel", "subnet.env")
        return os.path.join(self.dir, "subnet.env")

    @property
    def log_file(self) -> str:
        return os.path.join(self.dir, agents.AGENT_LOG if self.is_agent else agents.STOCK_LOG)

    @property
    def gateway(self) -> IPv4Address:
        assert self.subnet is not None, f"{self.netns} has no lease yet"
        return self.subnet.network_address + 1

    @property
    def tunnel_ip(self) -> IPv4Address:
        """<subnet>.0 on flannel.<VNI>: the node's own address in the pod network."""
        assert self.subnet is not None, f"{self.netns} has no lease yet"
        return self.subnet.network_address

    def to_state(self) -> dict:
        d = asdict(self)
        d["dataplane"] = self.dataplane.value
        for k in ("public_ip", "outside_ip", "subnet"):
            d[k] = None if d[k] is None else str(d[k])
        d["pods"] = [{**asdict(p), "ip": str(p.ip), "gateway": str(p.gateway)} for p in self.pods]
        return d

    @classmethod
    def from_state(cls, d: dict) -> LabNode:
        pods = [
            Pod(**{**p, "ip": IPv4Address(p["ip"]), "gateway": IPv4Address(p["gateway"])})
            for p in d.get("pods", [])
        ]
        return cls(
            **{
                **d,
                "dataplane": Dataplane(d["dataplane"]),
                "public_ip": IPv4Address(d["public_ip"]),
                "outside_ip": IPv4Address(d["outside_ip"]) if d.get("outside_ip") else None,
                "subnet": IPv4Network(d["subnet"]) if d.get("subnet") else None,
                "pods": pods,
            }
        )


class AgentCluster:
    """Build (up) and remove (down) one agent-driven lab; also a context manager.

    up() cleans up after itself when it fails; down() is safe to repeat and works
    from another process (AgentCluster.load(name)).
    """

    def __init__(self, spec: AgentClusterSpec, release: agents.AgentRelease = agents.THIS_RELEASE):
        """release: the installation the agents run from, until set_release() moves one."""
        spec.validate()
        self.daemonset: kubelab.DaemonSetPod | None = None
        if spec.kube:  # the agent's ports are the DaemonSet's
            self.daemonset = kubelab.daemonset_pod()
            spec = replace(
                spec,
                healthz_port=self.daemonset.port_arg("--healthz-port"),
                metrics_port=self.daemonset.port_arg("--metrics-port"),
            )
        self.spec = spec
        self.prefix = prefix_for(spec.name)
        self.run_dir = run_dir_for(spec.name, spec.run_root)
        self.switch = f"{self.prefix}-sw"
        self.outside_ns = f"{self.prefix}-out"
        self.etcd = EtcdServer(os.path.join(self.run_dir, "etcd"))
        self.kube: KubeApiServer | None = None
        if spec.kube:  # over the lab's etcd, as a cluster's control plane
            self.kube = KubeApiServer(
                os.path.join(self.run_dir, "kube"), etcd=self.etcd, detach=spec.detach
            )
        first_stock = spec.nodes - spec.stock
        self.nodes: list[LabNode] = [
            self._plan_node(i, Dataplane.FLANNELD if i >= first_stock else Dataplane.FLANNEL_XDP)
            for i in range(spec.nodes)
        ]
        self._procs: dict[int, subprocess.Popen] = {}
        self._release = release
        self._releases: dict[int, agents.AgentRelease] = {}  # nodes moved by set_release()
        self._flags: dict[int, dict[str, str]] = {}  # set_flags()

    # -- naming ----------------------------------------------------------------------------

    def _plan_node(self, i: int, dataplane: Dataplane, pods: int | None = None) -> LabNode:
        spec = self.spec
        if i + 2 >= spec.underlay.num_addresses:
            raise LabError(f"node {i} does not fit the underlay {spec.underlay}")
        outside = spec.outside_network.network_address + 1 + i if spec.outside else None
        bpffs = os.path.join(spec.bpffs_root, f"{self.prefix}-n{i}")
        return LabNode(
            index=i,
            netns=f"{self.prefix}-n{i}",
            dataplane=dataplane,
            public_ip=spec.underlay.network_address + 1 + i,
            underlay_prefixlen=spec.underlay.prefixlen,
            outside_ip=outside,
            switch_port=f"n{i}",
            bpffs=bpffs + DAEMONSET_PINS if spec.kube else bpffs,
            dir=os.path.join(self.run_dir, f"n{i}"),
            pods_wanted=spec.pods if pods is None else pods,
            kube=spec.kube,
        )

    @property
    def outside_ip(self) -> IPv4Address:
        """The host outside the cluster network, on the underlay switch."""
        return self.spec.outside_network.broadcast_address - 1

    @property
    def pods(self) -> list[Pod]:
        return [p for n in self.nodes for p in n.pods]

    @property
    def agent_nodes(self) -> list[LabNode]:
        return [n for n in self.nodes if n.is_agent]

    @property
    def config_key(self) -> str:
        return f"{ETCD_PREFIX}/config"

    def lease_key(self, node: LabNode) -> str:
        assert node.subnet is not None
        return f"{ETCD_PREFIX}/subnets/{node.subnet.network_address}-{node.subnet.prefixlen}"

    def node_of(self, pod: Pod) -> LabNode:
        return next(n for n in self.nodes if n.index == pod.node)

    def namespaces(self) -> list[str]:
        """Every netns of this lab that exists now (found by prefix: also nodes added later)."""
        res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
        names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
        return [n for n in names if n.startswith(self.prefix + "-")]

    def pin_dirs(self) -> list[str]:
        found = set(glob.glob(os.path.join(self.spec.bpffs_root, f"{self.prefix}-n*")))
        found |= set(glob.glob(os.path.join(self.spec.bpffs_root, f"{self.prefix}-n*",
                                            DAEMONSET_PINS.strip("/"))))  # fmt: skip
        found |= {n.bpffs for n in self.nodes if os.path.exists(n.bpffs)}
        return sorted(found)

    # -- state -----------------------------------------------------------------------------

    @property
    def state_path(self) -> str:
        return os.path.join(self.run_dir, STATE_FILE)

    def save_state(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        state = {
            "spec": self.spec.to_state(),
            "prefix": self.prefix,
            "etcd": self.etcd.state(),
            "kube": self.kube.state() if self.kube is not None else None,
            "nodes": [n.to_state() for n in self.nodes],
            "switch": self.switch,
            "outside": self.outside_ns if self.spec.outside else None,
        }
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, self.state_path)

    @classmethod
    def load(cls, name: str, run_root: str = RUN_ROOT) -> AgentCluster:
        """The lab called name, from its state file; without one, a cluster object that
        knows only the names (enough for down())."""
        path = os.path.join(run_dir_for(name, run_root), STATE_FILE)
        try:
            with open(path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return cls(AgentClusterSpec(name=name, nodes=1, pods=0, run_root=run_root))
        except (OSError, ValueError) as exc:
            log.warning("unreadable lab state %s (%s): tearing down by name", path, exc)
            return cls(AgentClusterSpec(name=name, nodes=1, pods=0, run_root=run_root))
        lab = cls(AgentClusterSpec.from_state(state["spec"]))
        lab.nodes = [LabNode.from_state(n) for n in state["nodes"]]
        lab.etcd = EtcdServer.from_state(state["etcd"])
        if state.get("kube"):
            lab.kube = KubeApiServer.from_state(state["kube"], etcd=lab.etcd)
        return lab

    def exists(self) -> bool:
        return bool(os.path.exists(self.run_dir) or self.namespaces() or self.pin_dirs())

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> AgentCluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, progress=None) -> AgentCluster:
        """Build everything and wait until every node routes to every other.

        progress: an optional callable(str) told about each step (the demo prints it).
        """
        say = progress or (lambda msg: log.info("lab %s: %s", self.spec.name, msg))
        if self.exists():
            raise LabError(
                f"a lab named {self.spec.name!r} exists already ({self.run_dir}, netns "
                f"{self.prefix}-*): `flannel-xdp lab down --name {self.spec.name}` removes it"
            )
        os.makedirs(self.run_dir)
        self.save_state()  # from here on, down() from another process finds everything
        try:
            started = time.monotonic()
            self.etcd.start(detach=self.spec.detach)
            if self.kube is None:
                self.etcd.put(self.config_key, json.dumps(self.spec.net_conf()))
            self.save_state()
            say(
                f"etcd on {self.etcd.url} (agents: {self.etcd.endpoint}) "
                f"({time.monotonic() - started:.1f} s)"
            )
            if self.kube is None:
                say(f"network config {self.config_key} = {json.dumps(self.spec.net_conf())}")
            else:
                self._start_control_plane(say)
            make_switch(self.switch)
            if self.spec.outside:
                self._make_outside_host()
            for node in self.nodes:
                self._make_node(node)
            outside = (
                f", outside host {self.outside_ip} (netns {self.outside_ns})"
                if self.spec.outside
                else ""
            )
            say(
                f"underlay switch (netns {self.switch}) with {len(self.nodes)} nodes on "
                f"{self.spec.underlay}{outside}"
            )
            started = time.monotonic()
            # Stock flanneld in etcd mode exits when another node takes the subnet it has
            # just picked (v0.28.9 does not pick again; its DaemonSet would restart it): so
            # each one starts once every lease before it is taken. Agents pick again.
            together = [n for n in self.nodes if n.is_agent or self.kube is not None]
            for node in self.nodes:
                self._start_node_services(node)
            for node in together:
                self._start_process(node)
            self.save_state()
            self._wait_leases(together)
            for node in (n for n in self.nodes if n not in together):
                self._start_process(node)
                self.save_state()
                self._wait_leases([node])
            for node in self.nodes:
                self._make_pods(node)
                kind = "flannel-xdp agent" if node.is_agent else "stock flanneld"
                if self.kube is not None:
                    kind += (
                        " (DaemonSet pod), kube-proxy"
                        if node.is_agent
                        else " (kube mode), kube-proxy"
                    )
                say(
                    f"{node.name}: {kind}, lease {node.subnet}, MTU {node.mtu}, "
                    f"{len(node.pods)} pods"
                )
            self.save_state()
            self.wait_converged()
            say(f"every node routes to every other ({time.monotonic() - started:.1f} s)")
        except BaseException as exc:
            detail = self.logs_tail() if not isinstance(exc, KeyboardInterrupt) else ""
            log.error("lab %s: bring-up failed, tearing down", self.spec.name)
            try:
                self.down()
            except Exception as again:  # report the first failure, not the clean-up's
                log.error("lab %s: teardown after a failed bring-up: %s", self.spec.name, again)
            if isinstance(exc, LabError | EtcdError | peers.PeersMissing):
                raise LabError(f"{exc}\n{detail}") from exc
            raise
        return self

    def down(self) -> None:
        """Remove every process, netns, pin and the run directory; safe to repeat."""
        for node in self.nodes:
            self._stop_process(node)
        # Anything else that names our run directory (an agent started by a process that
        # has since exited, a stray loader child): by pid, never by name.
        for pid in process.pids_with(self.run_dir + os.sep):
            process.kill_pid(pid, self.run_dir + os.sep)
        if self.kube is not None:
            self.kube.stop_apiserver()
        self.etcd.stop()
        namespaces = set(self.namespaces())
        for node in self.nodes:
            if node.is_agent and node.netns in namespaces:
                try:
                    with netns.entered(node.netns):
                        datapath.uninstall(node.bpffs, UNDERLAY_IFNAME)
                except Exception as exc:  # the netns and pins go below regardless
                    log.warning("lab %s: uninstall on %s: %s", self.spec.name, node.netns, exc)
        # pods first, the switch last: deleting a netns deletes its end of every veth
        for ns in sorted(namespaces, key=lambda n: (-n.count("-"), n != self.switch, n)):
            delete_netns(ns, f"lab {self.spec.name}")
        for pins in sorted(self.pin_dirs(), key=len, reverse=True):  # a pod's pins first
            PinDir(pins).remove()
            with contextlib.suppress(OSError):
                os.rmdir(pins)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        left = self.namespaces() + self.pin_dirs()
        left += [f"pid {p}" for p in process.pids_with(self.run_dir + os.sep)]
        if os.path.exists(self.run_dir):
            left.append(self.run_dir)
        if left:
            raise LabError(f"lab {self.spec.name}: could not remove {left}")

    # -- building --------------------------------------------------------------------------

    def _make_outside_host(self) -> None:
        ns = self.outside_ns
        new_netns(ns)
        plug_into_switch(self.switch, "out", ns, self.spec.underlay_mtu)
        with _iproute(ns) as ipr:
            eth = ipr.link_lookup(ifname=UNDERLAY_IFNAME)[0]
            ipr.addr(
                "add",
                index=eth,
                address=str(self.outside_ip),
                prefixlen=self.spec.outside_network.prefixlen,
            )
        # No route to the pod network: a reply can only come back to a masqueraded source.

    def _make_node(self, node: LabNode) -> None:
        addresses = [(node.public_ip, node.underlay_prefixlen)]
        if node.outside_ip is not None:
            addresses.append((node.outside_ip, self.spec.outside_network.prefixlen))
        make_node_netns(
            node.netns,
            self.switch,
            node.switch_port,
            addresses,
            self.spec.underlay_mtu,
            tcp_be_liberal=self.spec.conntrack_tcp_be_liberal,
        )
        os.makedirs(node.dir, exist_ok=True)
        if self.kube is not None:
            # Nodes have a default route; without --iface (the DaemonSet has none) the
            # agent and flanneld take its interface and that interface's first address.
            via = self.outside_ip if self.spec.outside else self.spec.underlay[-2]
            process.run(node.netns, ["ip", "route", "add", "default", "via", str(via)])
            self._register_node(node)

    # -- kube mode -------------------------------------------------------------------------

    def _start_control_plane(self, say) -> None:
        """kube-apiserver over the lab's etcd, and deploy/'s objects but the DaemonSet."""
        assert self.kube is not None
        started = time.monotonic()
        self.kube.start()
        self.save_state()
        kubelab.bootstrap(self.kube, self.spec.net_conf())
        say(
            f"kube-apiserver on {self.kube.url} ({time.monotonic() - started:.1f} s); "
            f"applied {os.path.basename(kubelab.MANIFEST)} but its DaemonSet, with "
            f"net-conf.json = {json.dumps(self.spec.net_conf())}"
        )

    def _register_node(self, node: LabNode) -> None:
        """The Node object, as kubelet registers it and the controller-manager gives it a
        podCIDR (the cluster network's /24s in node order)."""
        assert self.kube is not None
        cidr = kubelab.pod_cidr(self.spec.network, node.index)
        kubelab.register_node(self.kube, node.name, cidr, node.public_ip)
        if node.is_agent:  # the label that moves a node over (docs/kubernetes.md)
            self.kube.kubectl("label", "node", node.name, "flannel-xdp.io/data-path=xdp")

    def sandbox(self, node: LabNode) -> kubelab.PodSandbox:
        assert self.kube is not None and self.daemonset is not None
        return kubelab.PodSandbox(
            pod=self.daemonset,
            node_name=node.name,
            node_dir=node.dir,
            bpffs_root=node.bpffs_root,
            api_port=self.kube.port,
        )

    def _start_node_services(self, node: LabNode) -> None:
        """What a kube node runs besides its network agent: the relay to the apiserver
        (the node's 127.0.0.1:<port>) and kube-proxy."""
        if self.kube is None:
            return
        # The relay lives here, in the apiserver's netns, listening in the node's.
        with open(os.path.join(node.dir, RELAY_LOG), "ab") as out:
            process.start_daemon(
                relay_argv(node.netns, self.kube.port, node.dir + os.sep),
                out,
                detach=self.spec.detach,
            )
        token = self.kube.token_for(kubelab.KUBE_PROXY_SA, "kube-system")
        kubeconfig = os.path.join(node.dir, "kube-proxy.kubeconfig")
        with open(kubeconfig, "w") as f:
            f.write(kubeconfig_text(self.kube.url, self.kube.ca, token=token))
        agents.start(
            kubelab.kube_proxy_argv(node.name, kubeconfig, self.spec.network),
            node.netns,
            os.path.join(node.dir, KUBE_PROXY_LOG),
            detach=self.spec.detach,
        )

    def _argv(self, node: LabNode) -> list[str]:
        if self.kube is not None:
            box = self.sandbox(node)
            box.prepare(self.kube)
            if node.is_agent:
                release = self.release(node)
                command = box.agent_command(os.path.dirname(release.python))
                fast = agents.fast_path_args(self.spec.fast_path, self.spec.tcp_fast_path, release)
                return box.argv([*command, *fast])
            # kube-flannel.yml's flanneld, and the health port the lab watches
            argv = [peers.flanneld(), "--kube-subnet-mgr"]
            argv.append(f"--healthz-port={self.spec.healthz_port}")
            return box.argv([*argv, "--ip-masq"] if self.spec.ip_masq else argv)
        if node.is_agent:
            return agents.agent_argv(
                endpoint=self.etcd.endpoint,
                etcd_prefix=ETCD_PREFIX,
                bpffs=node.bpffs,
                subnet_file=node.subnet_file,
                ingress_hook=self.spec.ingress_hook.value,
                ip_masq=self.spec.ip_masq,
                healthz_port=self.spec.healthz_port,
                metrics_port=self.spec.metrics_port,
                xdp_mode=self.spec.xdp_mode,
                fast_path=self.spec.fast_path,
                tcp_fast_path=self.spec.tcp_fast_path,
                release=self.release(node),
            )
        return agents.stock_argv(
            endpoint=self.etcd.endpoint,
            etcd_prefix=ETCD_PREFIX,
            subnet_file=node.subnet_file,
            ip_masq=self.spec.ip_masq,
            public_ip=str(node.public_ip),
            healthz_port=self.spec.healthz_port,
        )

    def _start_process(self, node: LabNode) -> None:
        env = dict(self._flags.get(node.index, {}))  # flags as the agent reads them from env
        if self.kube is not None:
            env |= {**self.sandbox(node).env(), process.MARKER_ENV: node.dir + os.sep}
        proc = agents.start(
            self._argv(node), node.netns, node.log_file, detach=self.spec.detach, extra_env=env
        )
        self._procs[node.index] = proc
        node.pid = proc.pid

    def _stop_process(self, node: LabNode, sig: int = signal.SIGKILL) -> None:
        proc = self._procs.get(node.index)
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        elif node.pid is not None:
            process.kill_pid(node.pid, node.dir, sig)

    def _wait_leases(self, nodes: Sequence[LabNode], timeout: float = START_TIMEOUT) -> None:
        """Until each node's process wrote subnet.env; fails when one exits first."""
        deadline = time.monotonic() + timeout
        pending = list(nodes)
        while pending:
            for node in list(pending):
                got = agents.read_subnet_file(node.subnet_file)
                if got is not None:
                    node.subnet, node.mtu = got.subnet, got.mtu
                    pending.remove(node)
                elif not self.process_alive(node):
                    raise LabError(
                        f"{node.netns}: {node.dataplane} exited before writing subnet.env"
                    )
            if pending and time.monotonic() > deadline:
                names = ", ".join(n.netns for n in pending)
                raise LabError(f"no subnet.env from {names} after {timeout:.0f} s")
            if pending:
                time.sleep(0.05)

    def cni(self, node: LabNode) -> cni.NodeCni:
        return cni.NodeCni(node.netns, node.dir, node.subnet_file)

    def _make_pods(self, node: LabNode) -> None:
        """The node's pods, each through the real CNI chain (cnitool add), as kubelet's
        runtime makes them once subnet.env exists."""
        assert node.subnet is not None and node.mtu is not None
        plugins = self.cni(node)
        plugins.install()
        for j in range(node.pods_wanted):
            ns = f"{node.netns}-p{j}"
            new_netns(ns)
            try:
                got = plugins.add(ns)
            except cni.CniError as exc:
                raise LabError(str(exc)) from exc
            node.pods.append(
                Pod(
                    netns=ns,
                    node=node.index,
                    index=j,
                    ip=got.ip,
                    gateway=got.gateway,
                    prefixlen=got.prefixlen,
                    mtu=node.mtu,
                    host_veth=got.host_veth,
                )
            )

    # -- membership ------------------------------------------------------------------------

    def add_node(
        self,
        dataplane: Dataplane = Dataplane.FLANNEL_XDP,
        pods: int | None = None,
        *,
        wait: bool = True,
    ) -> LabNode:
        """A new node joins: netns and process, then (wait) its pods once its subnet.env
        exists. wait=False returns right after starting the process: call finish_node()
        later. The other nodes learn of it through the registry (see wait_converged).

        Call from the thread that will outlive the node's process: it is started with a
        parent-death signal, which the kernel sends when the starting *thread* ends.
        """
        node = self._plan_node(max(n.index for n in self.nodes) + 1, dataplane, pods)
        self.nodes.append(node)
        self._make_node(node)
        self._start_node_services(node)
        self._start_process(node)
        self.save_state()
        if wait:
            self.finish_node(node)
        return node

    def finish_node(self, node: LabNode) -> None:
        """Wait for the node's subnet.env, then make its cni0 and pods."""
        self._wait_leases([node])
        self._make_pods(node)
        self.save_state()

    def remove_node(self, node: LabNode) -> None:
        """The node's process, namespaces and pins go (its lease stays: delete_lease; in
        kube mode its Node object goes, as when a node is drained and deleted)."""
        self._stop_process(node)
        for pid in process.pids_with(node.dir + os.sep):  # kube-proxy, the relay
            process.kill_pid(pid, node.dir + os.sep)
        if self.kube is not None:
            self.kube.kubectl("delete", "node", node.name, "--wait=false")
        if node.is_agent and process.netns_exists(node.netns):
            with contextlib.suppress(Exception), netns.entered(node.netns):
                datapath.uninstall(node.bpffs, UNDERLAY_IFNAME)
        for pod in node.pods:
            delete_netns(pod.netns)
        delete_netns(node.netns)
        if os.path.exists(node.bpffs):
            PinDir(node.bpffs).remove()
        self.nodes.remove(node)
        self._procs.pop(node.index, None)
        self.save_state()

    def delete_lease(self, node: LabNode) -> None:
        """Delete the node's lease in etcd, as an operator would (etcdctl del)."""
        if self.etcd.delete(self.lease_key(node)) != 1:
            raise LabError(f"no lease {self.lease_key(node)} in etcd")

    def leases(self) -> dict[str, dict]:
        raw = self.etcd.get_prefix(f"{ETCD_PREFIX}/subnets/")
        return {k.rsplit("/", 1)[1]: json.loads(v) for k, v in raw.items()}

    # -- processes -------------------------------------------------------------------------

    def process_alive(self, node: LabNode) -> bool:
        proc = self._procs.get(node.index)
        if proc is not None:
            return proc.poll() is None
        return node.pid is not None and process.pid_alive(node.pid, node.dir)

    def kill_process(self, node: LabNode, sig: int = signal.SIGKILL, tree: bool = False) -> None:
        """Kill the node's agent (or stock controller); its data path stays. tree: its
        children too (the loader child), in one sweep, as when a container's cgroup is
        killed."""
        if tree and node.pid is not None and self.process_alive(node):
            pids = [node.pid, *process.descendants(node.pid)]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        self._stop_process(node, sig)

    def start_process(self, node: LabNode) -> None:
        """Start the node's process again, without waiting for it (see restart_process)."""
        if self.process_alive(node):
            raise LabError(f"{node.netns}: its process still runs")
        self._start_process(node)
        self.save_state()

    def release(self, node: LabNode) -> agents.AgentRelease:
        """The installation the node's agent runs from."""
        return self._releases.get(node.index, self._release)

    def set_release(self, node: LabNode, release: agents.AgentRelease) -> None:
        """Run the node's agent from another installation from its next start on: an
        upgrade (or downgrade) is stop_process(), set_release(), restart_process()."""
        if self.process_alive(node):
            raise LabError(f"{node.netns}: stop its agent before changing its release")
        self._releases[node.index] = release

    def set_flags(self, node: LabNode, **flags: str) -> None:
        """Give the node's agent these flags (build_cache="" for --build-cache '') from its
        next start on, besides the lab's; set_flags(node) gives none again."""
        self._flags[node.index] = agents.flag_env(**flags)

    def stop_process(self, node: LabNode, timeout: float = 30.0) -> int | None:
        """SIGTERM the node's process, as a rolling update does, and wait until it exits
        (its data path stays); its exit code, None when another process started it."""
        proc = self._procs.get(node.index)
        if proc is None:
            self._stop_process(node, signal.SIGTERM)
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LabError(f"{node.netns}: still running {timeout:.0f} s after SIGTERM") from None

    def restart_process(self, node: LabNode, timeout: float = CONVERGE_TIMEOUT) -> float:
        """Start the node's process again and wait until it is ready; seconds taken."""
        started = time.monotonic()
        self.start_process(node)
        self.wait_converged(timeout)
        return time.monotonic() - started

    def replace_dataplane(
        self, node: LabNode, dataplane: Dataplane, timeout: float = CONVERGE_TIMEOUT
    ) -> float:
        """Move the node from flanneld to a flannel-xdp agent or back, as a rollout does:
        the old process gets SIGTERM (its kernel state stays and keeps forwarding), the new
        one starts with the same flags and subnet file, finds its own lease in etcd (same
        public IP) and the VtepMAC on flannel.<VNI>. Either way flannel.<VNI> is swapped
        under traffic (loader.handover): the agent's loader takes flanneld's, and going
        back the agent's data path is handed over (datapath.hand_over) before flanneld
        starts. Seconds until every node routes to every other again."""
        if dataplane is node.dataplane:
            raise LabError(f"{node.netns} runs {dataplane} already")
        self._stop_process(node, signal.SIGTERM)
        if self.process_alive(node):
            self._stop_process(node)
        self._procs.pop(node.index, None)
        if node.is_agent:
            with netns.entered(node.netns):
                # As an operator moving a node back would: flanneld adopts a flannel.<VNI>
                # of its own kind with the same VtepMAC, and the routes on it, as they are.
                datapath.hand_over(node.bpffs, UNDERLAY_IFNAME, self.spec.backend)
        node.dataplane = dataplane
        started = time.monotonic()
        self._start_process(node)
        self.save_state()
        self.wait_converged(timeout)
        took = time.monotonic() - started
        got = agents.read_subnet_file(node.subnet_file)
        if got is None or got.subnet != node.subnet:
            raise LabError(f"{node.netns}: lease {node.subnet} became {got and got.subnet}")
        return took

    def ready(self, node: LabNode) -> bool:
        """/readyz of the node's agent; flanneld's /healthz on stock nodes."""
        if not node.is_agent:
            return self.process_alive(node) and agents.healthy(node.netns, self.spec.healthz_port)
        return agents.ready(node.netns, self.spec.healthz_port)

    # -- observing -------------------------------------------------------------------------

    def routes(self, node: LabNode) -> dict[IPv4Network, str]:
        """Routes of the node to other pod subnets: {subnet: output device}."""
        out = {}
        with _iproute(node.netns) as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            for msg in ipr.get_routes(family=AF_INET, table=254):
                dst = msg.get_attr("RTA_DST")
                if dst is None:
                    continue
                net = IPv4Network(f"{dst}/{msg['dst_len']}")
                if net.subnet_of(self.spec.network) and net != node.subnet:
                    out[net] = names.get(msg.get_attr("RTA_OIF"), "?")
        return out

    def map_peers(self, node: LabNode) -> dict[IPv4Network, Peer]:
        """The entries of the node's subnets map (flannel-xdp nodes)."""
        with SubnetsMap(PinDir(node.bpffs).maps) as m:
            return m.peers()

    def converged(self) -> list[str]:
        """What is still missing before every node routes to every other node's subnet."""
        missing = []
        for node in self.nodes:
            if not self.process_alive(node):
                missing.append(f"{node.netns}: process not running")
                continue
            if not self.ready(node):
                missing.append(f"{node.netns}: {node.dataplane} not ready")
                continue
            have = self.routes(node)
            for other in self.nodes:
                if other is not node and other.subnet is not None and other.subnet not in have:
                    missing.append(f"{node.netns}: no route to {other.subnet}")
        return missing

    def wait_converged(self, timeout: float = CONVERGE_TIMEOUT) -> float:
        started = time.monotonic()
        deadline = started + timeout
        while missing := self.converged():
            if time.monotonic() > deadline:
                raise LabError(f"not converged after {timeout:.0f} s: {'; '.join(missing)}")
            time.sleep(0.05)
        return time.monotonic() - started

    def counters(self, node: LabNode) -> Counters:
        """The node's BPF counters, read from its pins."""
        if not node.is_agent:
            raise LabError(f"{node.netns} runs stock flanneld: it has no BPF counters")
        maps = PinDir(node.bpffs).maps
        with TrafficMap(maps) as traffic, ReasonsMap(maps) as reasons:
            return Counters(traffic.by_label(), reasons.by_label())

    def scrape(self, node: LabNode) -> agents.Samples:
        """The node agent's Prometheus endpoint, scraped from inside its netns."""
        return agents.scrape(node.netns, self.spec.metrics_port)

    def run(self, ns: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess[str]:
        return process.run(ns, argv, **kwargs)

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for node in self.nodes:
            try:
                with open(node.log_file, errors="replace") as f:
                    tail = f.readlines()[-lines:]
            except OSError:
                tail = ["(no log)\n"]
            out.append(f"--- {node.log_file}:\n" + "".join(t[:300] for t in tail))
        if self.etcd.pid is not None:
            out.append(f"--- {self.etcd.log_path}:\n{self.etcd.log_tail(5)}")
        return "\n".join(out)

    def diagnostics(self) -> str:
        """Processes, links, routes, neighbours, counters and log tails of every node."""
        out = []
        for node in self.nodes:
            alive = "running" if self.process_alive(node) else "NOT RUNNING"
            out.append(
                f"=== {node.netns} ({node.dataplane}, {node.public_ip}, {node.subnet}, "
                f"pid {node.pid} {alive})"
            )
            if not process.netns_exists(node.netns):
                continue
            for argv in (["ip", "-s", "addr"], ["ip", "route"], ["ip", "neigh"]):
                res = process.run(node.netns, argv, check=False, keep_mounts=True)
                out.append(f"$ {' '.join(argv)}\n{res.stdout}{res.stderr}")
            if node.is_agent and os.path.exists(node.bpffs):
                try:
                    c = self.counters(node)
                    out.append(f"traffic: { {k: v for k, v in c.traffic.items() if v[0]} }")
                    out.append(f"reasons: { {k: v for k, v in c.reasons.items() if v[0]} }")
                except Exception as exc:
                    out.append(f"counters unavailable: {exc}")
        out.append(self.logs_tail())
        return "\n".join(out)

    def status(self) -> dict:
        """Everything `flannel-xdp lab status` shows, as data."""
        nodes = []
        for node in self.nodes:
            entry = {
                "node": node.name,
                "netns": node.netns,
                "dataplane": node.dataplane.value,
                "public_ip": str(node.public_ip),
                "subnet": str(node.subnet) if node.subnet else None,
                "pid": node.pid,
                "running": self.process_alive(node),
                "ready": False,
                "pods": [{"netns": p.netns, "ip": str(p.ip)} for p in node.pods],
                "log": node.log_file,
                "bpffs": node.bpffs if node.is_agent else None,
                "routes": 0,
            }
            if process.netns_exists(node.netns):
                entry["ready"] = entry["running"] and self.ready(node)
                entry["routes"] = len(self.routes(node))
            nodes.append(entry)
        return {
            "name": self.spec.name,
            "run_dir": self.run_dir,
            "backend": self.spec.backend_label,
            "ingress_hook": self.spec.ingress_hook.value,
            "ip_masq": self.spec.ip_masq,
            "etcd": {
                "url": self.etcd.url,
                "endpoint": self.etcd.endpoint,
                "pid": self.etcd.pid,
                "healthy": self.etcd.healthy(),
            },
            "kube": None
            if self.kube is None
            else {
                "url": self.kube.url,
                "kubeconfig": self.kube.kubeconfig,
                "ready": self.kube.ready(),
            },
            "outside_host": str(self.outside_ip) if self.spec.outside else None,
            "outside_netns": self.outside_ns if self.spec.outside else None,
            "healthz_port": self.spec.healthz_port,
            "metrics_port": self.spec.metrics_port,
            "nodes": nodes,
        }


__all__ = [
    "DEFAULT_NAME",
    "ETCD_PREFIX",
    "RUN_ROOT",
    "SERVICE_NETWORK",
    "AgentCluster",
    "AgentClusterSpec",
    "LabNode",
    "prefix_for",
    "random_name",
    "run_dir_for",
]
