"""Pods made by the real CNI chain, as kubelet's container runtime makes them.

Every lab node, flannel-xdp or flanneld, gets kube-flannel's ``cni-conf.json``
(``cbr0``: the ``flannel`` meta-plugin delegating to ``bridge`` with hairpin mode
and the default gateway, then ``portmap``) and ``cnitool add cbr0 <pod netns>``
runs inside the node's netns with the pod's netns as the CNI netns. The flannel
plugin reads the ``subnet.env`` the node's agent or flanneld wrote; ``bridge``
makes ``cni0`` and the veth, ``host-local`` hands out the address. The pod's
address, gateway and host-side veth come back from the CNI result.

Per node, as on a real machine: the conflist (``<node dir>/net.d``), the flannel
plugin's ``dataDir`` and everything the plugins keep under ``/var/lib/cni``
(host-local's allocations, libcni's result cache) live in the node's run
directory. The plugins hard-code ``/var/lib/cni`` for host-local, so cnitool runs
in a private mount namespace where the node's directory is bind-mounted there:
nothing is written to the host's own /var/lib/cni, and two nodes (or two labs)
never share allocations.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from flannel_xdp.lab import peers, process

NETWORK_NAME = "cbr0"
POD_IFNAME = "eth0"
HOST_CNI_DIR = "/var/lib/cni"  # host-local's and libcni's default, bind-mounted per node
TIMEOUT = 60.0

# kube-flannel.yml's ConfigMap kube-flannel-cfg, key cni-conf.json, verbatim.
KUBE_FLANNEL_CNI_CONF = {
    "name": "cbr0",
    "cniVersion": "0.3.1",
    "plugins": [
        {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


class CniError(RuntimeError):
    pass


def conflist(subnet_file: str, data_dir: str) -> dict:
    """kube-flannel's conflist, its flannel plugin pointed at the node's own files."""
    conf = json.loads(json.dumps(KUBE_FLANNEL_CNI_CONF))
    conf["plugins"][0].update({"subnetFile": subnet_file, "dataDir": data_dir})
    return conf


@dataclass(frozen=True)
class PodNet:
    """What the CNI result says about one pod."""

    ip: IPv4Address
    prefixlen: int
    gateway: IPv4Address
    host_veth: str
    mac: str


def parse_result(out: str) -> PodNet:
    """The pod's address, gateway, MAC and host veth from a CNI 0.3.x result."""
    try:
        res = json.loads(out)
        ifaces = res["interfaces"]
        ip = next(i for i in res["ips"] if i.get("version", "4") == "4" or ":" not in i["address"])
        addr = IPv4Interface(ip["address"])
        pod_if = ifaces[ip["interface"]] if "interface" in ip else None
        if pod_if is None:
            pod_if = next(i for i in ifaces if i.get("sandbox"))
        host = next(i["name"] for i in ifaces if not i.get("sandbox") and i["name"] != "cni0")
        gateway = IPv4Address(ip["gateway"])
    except (ValueError, KeyError, StopIteration, TypeError) as exc:
        raise CniError(f"unexpected CNI result ({exc!r}): {out[:2000]}") from exc
    return PodNet(addr.ip, addr.network.prefixlen, gateway, host, pod_if.get("mac", ""))


class NodeCni:
    """The CNI set-up of one node: its conflist, data directories and the calls."""

    def __init__(self, node_ns: str, node_dir: str, subnet_file: str):
        self.node_ns = node_ns
        self.dir = os.path.join(node_dir, "cni")
        self.netconf_dir = os.path.join(self.dir, "net.d")
        self.var_lib = os.path.join(self.dir, "var-lib-cni")
        self.subnet_file = subnet_file

    def install(self) -> None:
        """The conflist, as kube-flannel's init container copies it to /etc/cni/net.d."""
        os.makedirs(self.netconf_dir, exist_ok=True)
        os.makedirs(os.path.join(self.var_lib, "flannel"), exist_ok=True)
        conf = conflist(self.subnet_file, os.path.join(HOST_CNI_DIR, "flannel"))
        with open(os.path.join(self.netconf_dir, "10-flannel.conflist"), "w") as f:
            json.dump(conf, f, indent=2)

    def _run(self, command: str, pod_ns: str) -> subprocess.CompletedProcess[str]:
        os.makedirs(HOST_CNI_DIR, exist_ok=True)  # the mount point, empty on the host
        inner = (
            f"mount --make-rprivate / && mount --bind {shlex.quote(self.var_lib)} {HOST_CNI_DIR}"
            f" && exec {shlex.quote(peers.cnitool())} {command} {NETWORK_NAME}"
            f" {shlex.quote(process.netns_path(pod_ns))}"
        )
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_PATH": peers.cni_path(),
            "NETCONFPATH": self.netconf_dir,
            "CNI_IFNAME": POD_IFNAME,
        }
        argv = [
            "nsenter", f"--net={process.netns_path(self.node_ns)}", "--",
            "unshare", "--mount", "--", "sh", "-c", inner,
        ]  # fmt: skip
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
        )

    def add(self, pod_ns: str) -> PodNet:
        res = self._run("add", pod_ns)
        if res.returncode != 0:
            raise CniError(
                f"cnitool add {NETWORK_NAME} {pod_ns} in {self.node_ns} exited "
                f"{res.returncode}: {res.stderr.strip()} {res.stdout.strip()}"
            )
        return parse_result(res.stdout)

    def delete(self, pod_ns: str) -> None:
        res = self._run("del", pod_ns)
        if res.returncode != 0:
            raise CniError(
                f"cnitool del {NETWORK_NAME} {pod_ns} in {self.node_ns} exited "
                f"{res.returncode}: {res.stderr.strip()} {res.stdout.strip()}"
            )


__all__ = ["KUBE_FLANNEL_CNI_CONF", "CniError", "NodeCni", "PodNet", "conflist", "parse_result"]
