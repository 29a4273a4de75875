"""`flannel-xdp agent --kube-subnet-mgr` next to the real flanneld in kube mode.

Two nodes in network namespaces on one veth link (192.0.2.60 and .61), both registered with
a real kube-apiserver (lab/kube.py) with podCIDRs in 198.18.0.0/16: node-a runs our agent
(the BPF data path), node-b runs flanneld v0.28.9 (the kernel's vxlan). Each reaches the
loopback-only apiserver through a relay on its namespace's loopback. The agent publishes
flanneld's annotations, flanneld programs the agent's lease (its FDB entry carries the
agent's VtepMAC), the agent programs flanneld's, and the two tunnel addresses ping each
other across the two data paths.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from flannel_xdp.lab import agents, process
from flannel_xdp.lab.kube import KubeApiServer, peer_binary
from flannel_xdp.netns import NETNS_RUN_DIR
from tests.kube_support import kube_agent_argv, linked_nodes
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.kube

P = "flannel.alpha.coreos.com"
NET_CONF = '{"Network":"198.18.0.0/16","Backend":{"Type":"vxlan"}}'


def wait(what: str, check, timeout: float, logs) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout:.0f} s\n{logs()}")
        time.sleep(0.5)


def test_agent_and_flanneld_in_kube_mode_reach_each_other(tmp_path) -> None:
    require_root_and_bcc("ip", "nsenter", "bridge", "ping")
    tag = uuid.uuid4().hex[:6]
    na, nb = f"fxka-{tag}", f"fxkb-{tag}"
    bpffs = f"/sys/fs/bpf/fxk-{tag}"
    kube = KubeApiServer(str(tmp_path / "kube"))
    procs: list[subprocess.Popen] = []
    listeners = []
    kube.start()
    try:
        listeners += linked_nodes({na: "192.0.2.60/24", nb: "192.0.2.61/24"}, kube.port)
        for name, cidr in (("node-a", "198.18.60.0/24"), ("node-b", "198.18.61.0/24")):
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
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
        a_log, b_log = tmp_path / "agent.log", tmp_path / "flanneld.log"

        def logs() -> str:
            state = "".join(
                f"--- {ns} {' '.join(cmd)}:\n"
                + subprocess.run(
                    ["ip", "-n", ns, *cmd], capture_output=True, text=True, check=False
                ).stdout
                for ns in (na, nb)
                for cmd in (["route"], ["neigh"], ["addr"])
            )
            state += subprocess.run(
                [sys.executable, "-m", "flannel_xdp.cli", "inspect", "--bpffs", bpffs],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            return state + "".join(
                f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}\n"
                for p in (a_log, b_log)
                if p.exists()
            )

        b_argv = [
            "nsenter", f"--net={NETNS_RUN_DIR}/{nb}", "--",
            peer_binary("FXDP_FLANNELD"), "--kube-subnet-mgr",
            f"--kubeconfig-file={kube.kubeconfig}", f"--net-config-path={conf}",
            "--iface=eth0", f"--subnet-file={tmp_path / 'b.env'}",
        ]  # fmt: skip
        a_argv = kube_agent_argv(kube.kubeconfig, str(conf), bpffs, str(tmp_path / "a.env"))
        with open(b_log, "wb") as out:
            procs.append(
                process.start_daemon(b_argv, out, detach=False, env={**env, "NODE_NAME": "node-b"})
            )
        with open(a_log, "wb") as out:
            procs.append(
                process.start_daemon(
                    a_argv, out, detach=False, netns=na, env={**env, "NODE_NAME": "node-a"}
                )
            )
        wait("the agent ready", lambda: agents.ready(na), 120, logs)

        node_a = json.loads(kube.kubectl("get", "node", "node-a", "-o", "json"))
        ann = node_a["metadata"]["annotations"]
        assert ann[f"{P}/kube-subnet-manager"] == "true"
        assert ann[f"{P}/public-ip"] == "192.0.2.60"
        link = json.loads(
            subprocess.run(
                ["ip", "-n", na, "-j", "link", "show", "flannel.1"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )[0]
        mac = link["address"]
        assert json.loads(ann[f"{P}/backend-data"]) == {"VNI": 1, "VtepMAC": mac}
        conds = {c["type"]: c for c in node_a["status"]["conditions"]}
        assert conds["NetworkUnavailable"]["reason"] == "FlannelIsUp"

        def flanneld_has_our_lease() -> bool:
            out = subprocess.run(
                ["bridge", "-n", nb, "fdb", "show", "dev", "flannel.1"],
                capture_output=True,
                text=True,
            ).stdout
            return mac in out and "192.0.2.60" in out

        wait("flanneld's FDB entry for the agent's lease", flanneld_has_our_lease, 60, logs)
        for src, dst in ((na, "198.18.61.0"), (nb, "198.18.60.0")):
            res = subprocess.run(
                ["ip", "netns", "exec", src, "ping", "-c", "3", "-i", "0.2", "-W", "2", dst],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert res.returncode == 0, f"{src} -> {dst}: {res.stdout}{res.stderr}\n{logs()}"
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        for listener in listeners:
            listener.close()
        for ns in (na, nb):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(bpffs, ignore_errors=True)
        kube.stop()
