"""What the real flanneld (v0.28.9, --kube-subnet-mgr) writes on its node, against what
registry/kube.py writes on a node of the same shape: the same annotations and condition, byte
for byte but for the MAC and the addresses. flanneld runs in a throwaway network namespace
(its vxlan device lands there) with a veth end holding its public IP; it reaches the
loopback-only apiserver through a small TCP relay listening on the namespace's loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import uuid
from ipaddress import IPv4Address

import pytest

from flannel_xdp import netns
from flannel_xdp.lab import process
from flannel_xdp.lab.kube import KubeApiServer, peer_binary, relay
from flannel_xdp.registry.config import parse_config
from flannel_xdp.registry.kube import KubeRegistry, KubeSettings
from flannel_xdp.registry.lease import LeaseAttrs
from tests.kube_support import sh
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.kube

P = "flannel.alpha.coreos.com"
NET_CONF = '{"Network":"198.18.0.0/16","Backend":{"Type":"vxlan"}}'
MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
IP_RE = re.compile(r"\b\d+\.\d+\.\d+\.\d+\b")


def normalized(ann: dict[str, str]) -> dict[str, str]:
    out = {}
    for k, v in ann.items():
        if k.startswith(P + "/"):
            out[k] = IP_RE.sub("IP", MAC_RE.sub("MAC", v))
    return out


def condition(node: dict) -> dict:
    conds = {c["type"]: c for c in node["status"].get("conditions") or []}
    c = dict(conds["NetworkUnavailable"])
    for k in ("lastHeartbeatTime", "lastTransitionTime"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", c.pop(k)), conds
    return c


def test_annotations_and_condition_match_real_flanneld(tmp_path) -> None:
    require_root_and_bcc("ip", "nsenter")
    flanneld = peer_binary("FXDP_FLANNELD")
    kube = KubeApiServer(str(tmp_path / "kube"))
    ns = f"fxk-{uuid.uuid4().hex[:6]}"
    listener = proc = None
    kube.start()
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # no dummy driver in this kernel: a veth pair, both ends in the namespace
        sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        sh("ip", "-n", ns, "addr", "add", "192.0.2.50/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "peer0", "up")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        listener = relay(ns, kube.port)
        for name, cidr in (("by-flanneld", "198.18.40.0/24"), ("by-xdp", "198.18.41.0/24")):
            kube.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": name},
                    "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
                }
            )
        conf = tmp_path / "net-conf.json"
        conf.write_text(NET_CONF)
        with open(tmp_path / "flanneld.log", "wb") as out:
            proc = process.start_daemon(
                [
                    "nsenter", f"--net={netns.NETNS_RUN_DIR}/{ns}", "--",
                    flanneld, "--kube-subnet-mgr", f"--kubeconfig-file={kube.kubeconfig}",
                    f"--net-config-path={conf}", "--iface=eth0",
                    f"--subnet-file={tmp_path / 'subnet.env'}",
                ],
                out,
                detach=False,
                env={**os.environ, "NODE_NAME": "by-flanneld"},
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            node = json.loads(kube.kubectl("get", "node", "by-flanneld", "-o", "json"))
            conds = (node.get("status") or {}).get("conditions") or []
            if any(c["type"] == "NetworkUnavailable" for c in conds):
                break
            assert proc.poll() is None, (tmp_path / "flanneld.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "flanneld.log").read_text()[-3000:]
            time.sleep(0.5)
        theirs = node

        attrs = LeaseAttrs(IPv4Address("192.0.2.51"), "vxlan", vni=1, vtep_mac="0e:01:02:03:04:05")

        async def ours() -> None:
            reg = KubeRegistry(KubeSettings(kubeconfig_file=kube.kubeconfig, node_name="by-xdp"))
            try:
                await reg.acquire(parse_config(NET_CONF), attrs, None)
            finally:
                await reg.close()

        asyncio.run(ours())
        mine = json.loads(kube.kubectl("get", "node", "by-xdp", "-o", "json"))
        t_ann, m_ann = theirs["metadata"]["annotations"], mine["metadata"]["annotations"]
        assert normalized(m_ann) == normalized(t_ann), (t_ann, m_ann)
        assert MAC_RE.fullmatch(json.loads(t_ann[f"{P}/backend-data"])["VtepMAC"])
        assert t_ann[f"{P}/public-ip"] == "192.0.2.50"
        assert condition(mine) == condition(theirs)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        if listener is not None:
            listener.close()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        kube.stop()
