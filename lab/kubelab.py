"""The Kubernetes side of ``flannel-xdp lab up --kube``: what kubelet, the
controller-manager and a DaemonSet would do on each lab node, done by hand.

* ``DaemonSetPod`` reads deploy/kube-flannel-xdp.yml: the agent container's command,
  arguments, environment and volume mounts are taken from there, never repeated.
* ``bootstrap()`` applies that manifest's Namespace, ServiceAccount, RBAC and ConfigMap
  (its ``net-conf.json`` set to the lab's network, as an operator edits it) and gives
  kube-proxy the ServiceAccount and binding kubeadm gives it.
* ``node_object()`` is a Node as the controller-manager and kubelet leave it: a podCIDR
  in order from the cluster network, the node's InternalIP.
* ``PodSandbox`` runs a DaemonSet container on a node: in the node's network namespace
  (hostNetwork) and a mount namespace of its own where each volume of the manifest is
  mounted where the manifest says, the ServiceAccount token is where client libraries
  look for it (``/var/run/secrets/kubernetes.io/serviceaccount``) and
  ``KUBERNETES_SERVICE_HOST``/``PORT`` point at the apiserver, as kubelet sets them.
  A node's "host" paths live in its run directory (``<node dir>/host``), except
  ``/sys/fs/bpf`` (the node's own bpffs directory) and the read-only kernel trees.
  The container's ``/run`` is a fresh tmpfs and ``/etc`` an overlay, as in a container:
  nothing is created on the machine's own file systems.
* ``kube_proxy_argv()``: the real kube-proxy, iptables mode, one per node netns.
* ``service()`` and ``endpoint_slice()``: what a Service and the EndpointSlice
  controller's slice look like, for objects created through the API.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import yaml

from flannel_xdp.lab.kube import KubeApiServer, KubeError, peer_binary

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kube-flannel-xdp.yml"
NAMESPACE = "kube-flannel"
DAEMONSET = "kube-flannel-xdp-ds"
AGENT_CONTAINER = "flannel-xdp"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_DURATION = "8760h"  # a lab lives for hours; kubelet would rotate a projected token
KUBE_PROXY_SA = "kube-proxy"
KUBE_PROXY_ROLE = "system:node-proxier"  # RBAC bootstrap's role for kube-proxy
KUBE_PROXY_HEALTHZ = "127.0.0.1:10256"
KUBE_PROXY_METRICS = "127.0.0.1:10249"
# The node's own trees that a container sees as they are: bcc reads the kernel's headers.
SHARED_HOST_PATHS = ("/lib/modules", "/usr/src")
BPFFS = "/sys/fs/bpf"


@dataclass(frozen=True)
class Mount:
    path: str  # inside the container
    host_path: str | None = None  # a hostPath volume
    config_map: str | None = None  # a configMap volume
    read_only: bool = False


@dataclass(frozen=True)
class DaemonSetPod:
    """The agent container of the DaemonSet, as deploy/ states it."""

    command: tuple[str, ...]
    args: tuple[str, ...]
    env_from_fields: dict[str, str]  # NAME -> fieldPath
    mounts: tuple[Mount, ...]
    service_account: str
    namespace: str

    def port_arg(self, flag: str) -> int:
        """The value of --flag=N in the container's arguments."""
        for arg in self.args:
            if arg.startswith(f"{flag}="):
                return int(arg.split("=", 1)[1])
        raise KubeError(f"{MANIFEST}: the {AGENT_CONTAINER} container has no {flag}=")


def manifest_objects(path: Path = MANIFEST) -> list[dict]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def daemonset_pod(objects: list[dict] | None = None) -> DaemonSetPod:
    objects = objects if objects is not None else manifest_objects()
    ds = next(o for o in objects if o["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    container = next(c for c in spec["containers"] if c["name"] == AGENT_CONTAINER)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = []
    for m in container.get("volumeMounts", []):
        vol = volumes[m["name"]]
        mounts.append(
            Mount(
                path=m["mountPath"].rstrip("/") or "/",
                host_path=(vol.get("hostPath") or {}).get("path"),
                config_map=(vol.get("configMap") or {}).get("name"),
                read_only=bool(m.get("readOnly")),
            )
        )
    env = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in container.get("env", [])
        if "fieldRef" in e.get("valueFrom", {})
    }
    return DaemonSetPod(
        command=tuple(container["command"]),
        args=tuple(container.get("args", [])),
        env_from_fields=env,
        mounts=tuple(mounts),
        service_account=spec["serviceAccountName"],
        namespace=ds["metadata"]["namespace"],
    )


def bootstrap(kube: KubeApiServer, net_conf: dict) -> None:
    """The manifest's objects but the DaemonSet (nothing runs it here: the lab does),
    its ConfigMap carrying the lab's network config; kube-proxy's ServiceAccount."""
    docs = []
    for obj in manifest_objects():
        if obj["kind"] == "DaemonSet":
            continue
        if obj["kind"] == "ConfigMap":
            obj["data"]["net-conf.json"] = json.dumps(net_conf, indent=2)
        docs.append(obj)
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    kube.kubectl("create", "serviceaccount", KUBE_PROXY_SA, "-n", "kube-system")
    kube.kubectl(
        "create", "clusterrolebinding", "kubeadm:node-proxier",
        f"--clusterrole={KUBE_PROXY_ROLE}", f"--serviceaccount=kube-system:{KUBE_PROXY_SA}",
    )  # fmt: skip


def config_map_files(kube: KubeApiServer, name: str, namespace: str) -> dict[str, str]:
    """The ConfigMap's data as the API holds it (what kubelet projects into the pod)."""
    cm = json.loads(kube.kubectl("get", "configmap", name, "-n", namespace, "-o", "json"))
    return cm.get("data") or {}


def pod_cidr(network: IPv4Network, index: int, prefixlen: int = 24) -> IPv4Network:
    """The controller-manager's range allocator hands out the network's /24s in order."""
    return IPv4Network((int(network.network_address) + (index << (32 - prefixlen)), prefixlen))


def node_object(name: str, cidr: IPv4Network, internal_ip: IPv4Address) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux",
                                              "kubernetes.io/hostname": name}},
        "spec": {"podCIDR": str(cidr), "podCIDRs": [str(cidr)]},
    }  # fmt: skip


def register_node(kube: KubeApiServer, name: str, cidr: IPv4Network, ip: IPv4Address) -> None:
    """The Node, then its addresses in status (kubelet reports them; kube-proxy reads its
    node IP there)."""
    kube.apply(node_object(name, cidr, ip))
    status = {"status": {"addresses": [{"type": "InternalIP", "address": str(ip)},
                                       {"type": "Hostname", "address": name}]}}  # fmt: skip
    kube.kubectl(
        "patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )


@dataclass
class PodSandbox:
    """One DaemonSet pod on one lab node (see the module doc)."""

    pod: DaemonSetPod
    node_name: str
    node_dir: str
    bpffs_root: str  # the node's /sys/fs/bpf
    api_port: int  # where the node reaches the apiserver (its relay on 127.0.0.1)
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # configMap -> files

    @property
    def pod_name(self) -> str:
        return f"{DAEMONSET}-{self.node_name}"

    @property
    def dir(self) -> str:
        return os.path.join(self.node_dir, "pod")

    def host_path(self, path: str) -> str:
        """Where the node's host path is on this machine."""
        if path == BPFFS:
            return self.bpffs_root
        if path in SHARED_HOST_PATHS:
            return path
        return os.path.join(self.node_dir, "host", path.lstrip("/"))

    def env(self) -> dict[str, str]:
        fields = {
            "spec.nodeName": self.node_name,
            "metadata.name": self.pod_name,
            "metadata.namespace": self.pod.namespace,
        }
        env = {name: fields[path] for name, path in self.pod.env_from_fields.items()}
        env["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
        env["KUBERNETES_SERVICE_PORT"] = str(self.api_port)
        return env

    def prepare(self, kube: KubeApiServer) -> None:
        """The volumes' sources: host directories, ConfigMap files, the token."""
        for m in self.pod.mounts:
            if m.host_path is not None:
                src = self.host_path(m.host_path)
                if m.host_path.endswith(".lock"):  # hostPath type FileOrCreate
                    os.makedirs(os.path.dirname(src), exist_ok=True)
                    open(src, "a").close()
                else:
                    os.makedirs(src, exist_ok=True)
            elif m.config_map is not None:
                vol = os.path.join(self.dir, "configmaps", m.config_map)
                os.makedirs(vol, exist_ok=True)
                data = self.files.get(m.config_map) or config_map_files(
                    kube, m.config_map, self.pod.namespace
                )
                for name, text in data.items():
                    Path(vol, name).write_text(text)
        sa = os.path.join(self.dir, "serviceaccount")
        os.makedirs(sa, exist_ok=True)
        token = kube.kubectl(
            "create", "token", self.pod.service_account, "-n", self.pod.namespace,
            f"--duration={TOKEN_DURATION}",
        ).strip()  # fmt: skip
        Path(sa, "token").write_text(token)
        Path(sa, "namespace").write_text(self.pod.namespace)
        Path(sa, "ca.crt").write_bytes(Path(kube.ca).read_bytes())
        for d in ("etc-upper", "etc-work"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)

    def mount_script(self) -> str:
        """Shell that builds the container's file system view in a fresh mount namespace.
        Every source lies below the lab's run directory, itself in /run: all is mounted
        (the new /run at a staging point) before the new /run is moved over the old."""
        q = shlex.quote
        new_run = os.path.join(self.dir, "run")
        steps = [
            "mount -n --make-rprivate /",  # -n: no utab, the /run it lives in moves below
            # the container's own /etc and /run, as its image gives it
            f"mount -n -t overlay overlay -o lowerdir=/etc,upperdir={q(self.dir)}/etc-upper,"
            f"workdir={q(self.dir)}/etc-work /etc",
            f"mkdir -p {q(new_run)}",
            f"mount -n -t tmpfs -o mode=755 tmpfs {q(new_run)}",
        ]
        binds = [(os.path.join(self.dir, "serviceaccount"), SA_MOUNT, True)]
        for m in self.pod.mounts:
            if m.host_path is not None:
                src = self.host_path(m.host_path)
                if src == m.path:
                    continue
            else:
                src = os.path.join(self.dir, "configmaps", str(m.config_map))
            binds.append((src, m.path, m.read_only))
        in_run = [(s, new_run + _run_relative(d), ro) for s, d, ro in binds if _run_relative(d)]
        elsewhere = [b for b in binds if not _run_relative(b[1])]
        for src, dst, read_only in in_run + elsewhere:
            steps += _bind(src, dst, read_only)
        steps.append(f"mount -n --move {q(new_run)} /run")
        return " && ".join(steps)

    def argv(self, command: list[str]) -> list[str]:
        """command run as this pod's container (to be started in the node's netns)."""
        script = f"{self.mount_script()} && exec {shlex.join(command)}"
        return ["unshare", "--mount", "--", "sh", "-c", script]

    def agent_command(self, executable_dir: str) -> list[str]:
        """The container's command and arguments; its executable from our install."""
        first, *rest = self.pod.command
        return [os.path.join(executable_dir, first), *rest, *self.pod.args]


def _run_relative(path: str) -> str:
    """path below /run (or /var/run, its link) as "/<rest>"; "" when elsewhere."""
    for root in ("/var/run/", "/run/"):
        if path.startswith(root):
            return "/" + path.removeprefix(root)
    return ""


def _bind(src: str, dst: str, read_only: bool) -> list[str]:
    q = shlex.quote
    if os.path.isfile(src):
        steps = [f"mkdir -p {q(os.path.dirname(dst))}", f"touch {q(dst)}"]
    else:
        steps = [f"mkdir -p {q(dst)}"]
    steps.append(f"mount -n --bind {q(src)} {q(dst)}")
    if read_only:
        steps.append(f"mount -n -o remount,bind,ro {q(dst)}")
    return steps


def kube_proxy_argv(node_name: str, kubeconfig: str, cluster_cidr: IPv4Network) -> list[str]:
    """kube-proxy as kubeadm runs it, iptables mode; it leaves the host-wide conntrack
    table size alone (a node netns cannot set it)."""
    return [
        peer_binary("FXDP_KUBE_PROXY"),
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={node_name}",
        "--proxy-mode=iptables",
        f"--cluster-cidr={cluster_cidr}",
        "--conntrack-max-per-core=0",
        f"--healthz-bind-address={KUBE_PROXY_HEALTHZ}",
        f"--metrics-bind-address={KUBE_PROXY_METRICS}",
        "--v=1",
    ]


def service(name: str, port: int, target_port: int, node_port: int | None = None) -> dict:
    spec: dict = {
        "type": "NodePort" if node_port else "ClusterIP",
        "ports": [{"name": "probe", "protocol": "TCP", "port": port, "targetPort": target_port}],
    }
    if node_port:
        spec["ports"][0]["nodePort"] = node_port
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}  # fmt: skip


def endpoint_slice(service_name: str, port: int, endpoints: list[tuple[str, str]]) -> dict:
    """The slice the EndpointSlice controller would make: (pod IP, node name) each."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-lab",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service_name,
                       "endpointslice.kubernetes.io/managed-by": "flannel-xdp-lab"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "probe", "protocol": "TCP", "port": port}],
        "endpoints": [
            {"addresses": [ip], "nodeName": node, "conditions": {"ready": True}}
            for ip, node in endpoints
        ],
    }  # fmt: skip


__all__ = [
    "MANIFEST",
    "DaemonSetPod",
    "Mount",
    "PodSandbox",
    "bootstrap",
    "daemonset_pod",
    "endpoint_slice",
    "kube_proxy_argv",
    "manifest_objects",
    "node_object",
    "pod_cidr",
    "register_node",
    "service",
]
