"""The kube-apiserver stopped for a minute under traffic, with Nodes changed meanwhile.

Two flannel-xdp nodes in kube mode (network namespaces on one veth link, each reaching the
loopback apiserver through lab.kube.relay). A ping at 100 per second and a sha256-checked
TCP stream (tests/traffic_support.py's Pinger and Stream) run between the nodes' tunnel
addresses, across both data paths, while the apiserver is stopped for OUTAGE_SECONDS.
Meanwhile a second apiserver on another port, over the same etcd, adds a Node and deletes
another: the agents, which only know the first, cannot see that happen. Asserted: no ping
lost, the stream whole, /readyz 503 on both agents during the outage, and once the
apiserver is back both agents route the added Node's podCIDR and no longer the deleted one's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp.lab import agents, process
from flannel_xdp.lab.kube import KubeApiServer
from flannel_xdp.lab.topology import Pod
from flannel_xdp.registry.kube_annotations import Annotations, lease_annotations
from flannel_xdp.registry.lease import LeaseAttrs
from tests.kube_support import kube_agent_argv, linked_nodes
from tests.requirements import require_root_and_bcc
from tests.traffic_support import Pinger, Stream

pytestmark = [pytest.mark.kube, pytest.mark.timeout(600)]

OUTAGE_SECONDS = 60.0
NET_CONF = '{"Network":"198.18.0.0/16","Backend":{"Type":"vxlan"}}'
NODES = {"node-a": ("192.0.2.70", "198.18.70.0/24"), "node-b": ("192.0.2.71", "198.18.71.0/24")}
ADDED = ("node-c", "198.18.72.0/24", "198.51.100.72")  # added while the apiserver is down
DELETED = ("node-d", "198.18.73.0/24", "198.51.100.73")  # deleted meanwhile
# The agents notice a dead apiserver when their watch breaks and the retry is refused.
NOT_READY_WITHIN = 15.0
RESYNC_TIMEOUT = 30.0


def node_object(name: str, cidr: str, public_ip: str | None = None) -> dict:
    """A Node as the controller-manager leaves it; with public_ip, as flanneld annotated it."""
    annotations = {}
    if public_ip is not None:
        mac = "02:00:00:00:00:" + public_ip.rsplit(".", 1)[1][-2:].zfill(2)
        attrs = LeaseAttrs(IPv4Address(public_ip), "vxlan", vni=1, vtep_mac=mac)
        annotations = lease_annotations(Annotations(), attrs, {})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    }


def tunnel_end(ns: str, cidr: str) -> Pod:
    """A node's tunnel address as a traffic end (Pinger and Stream take pods)."""
    net = IPv4Network(cidr)
    return Pod(ns, 0, 0, net.network_address, net.network_address, 32, 1450, "")


def routed(ns: str, cidr: str) -> bool:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "route", "show", cidr], capture_output=True, text=True
    ).stdout
    return any(r.get("dev") == "flannel.1" for r in json.loads(out or "[]"))


class Readiness:
    """Each agent's /readyz, polled every half second in a thread: [(time, ready)]."""

    def __init__(self, namespaces: list[str]):
        self.seen: dict[str, list[tuple[float, bool]]] = {ns: [] for ns in namespaces}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for ns, seen in self.seen.items():
                seen.append((time.monotonic(), agents.ready(ns)))
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, ns: str, start: float, end: float) -> list[bool]:
        return [ok for t, ok in self.seen[ns] if start <= t <= end]


def wait(what: str, check, timeout: float, logs) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what} not within {timeout:.0f} s\n{logs()}")
        time.sleep(0.2)
    return time.monotonic() - started


def test_apiserver_outage_keeps_traffic_and_applies_what_changed_meanwhile(tmp_path) -> None:
    require_root_and_bcc("ip", "nsenter", "ping")
    tag = uuid.uuid4().hex[:6]
    ns = {name: f"fxko{i}-{tag}" for i, name in enumerate(NODES)}
    kube = KubeApiServer(str(tmp_path / "kube"))
    other: KubeApiServer | None = None
    procs: list[subprocess.Popen] = []
    listeners = []
    kube.start()
    try:
        na, nb = ns["node-a"], ns["node-b"]
        ends = {ns[name]: f"{addr}/24" for name, (addr, _) in NODES.items()}
        listeners += linked_nodes(ends, kube.port)
        for name, (_, cidr) in NODES.items():
            kube.apply(node_object(name, cidr))
        kube.apply(node_object(*DELETED))
        conf = tmp_path / "net-conf.json"
        conf.write_text(NET_CONF)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
        logs_of = {name: tmp_path / f"{name}.log" for name in NODES}

        def logs() -> str:
            return "".join(
                f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}\n"
                for p in logs_of.values()
                if p.exists()
            )

        for name in NODES:
            argv = kube_agent_argv(
                kube.kubeconfig,
                str(conf),
                f"/sys/fs/bpf/fxko-{tag}-{name}",
                str(tmp_path / f"{name}.env"),
            )
            with open(logs_of[name], "wb") as out:
                procs.append(
                    process.start_daemon(
                        argv, out, detach=False, netns=ns[name], env={**env, "NODE_NAME": name}
                    )
                )
        for name in NODES:
            wait(f"{name}'s agent ready", lambda n=ns[name]: agents.ready(n), 120, logs)
        for n in (na, nb):
            wait(f"{n} routes {DELETED[0]}", lambda n=n: routed(n, DELETED[1]), 30, logs)

        a_end, b_end = tunnel_end(na, NODES["node-a"][1]), tunnel_end(nb, NODES["node-b"][1])
        pinger = Pinger(a_end, b_end, tmp_path / "ping.out")
        streams = []
        readiness = None
        try:
            streams = [Stream(a_end, b_end, seed=1), Stream(b_end, a_end, seed=2)]
            readiness = Readiness([na, nb])
            time.sleep(2.0)
            down_at = time.monotonic()
            kube.stop_apiserver()
            # Meanwhile, through another apiserver over the same etcd: one Node comes,
            # one goes. The agents know only the stopped one's address.
            other = KubeApiServer(str(tmp_path / "other"), etcd=kube.etcd)
            other.start()
            other.apply(node_object(*ADDED))
            other.kubectl("delete", "node", DELETED[0])
            other.stop_apiserver()
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
            back_at = time.monotonic()  # the agents may reconnect before it answers /readyz
            kube.start_apiserver()
            up_at = time.monotonic()
            took = {
                n: wait(
                    f"{n} programs the changes made during the outage",
                    lambda n=n: routed(n, ADDED[1]) and not routed(n, DELETED[1]),
                    RESYNC_TIMEOUT,
                    logs,
                )
                for n in (na, nb)
            }
            for n in (na, nb):
                wait(f"{n} ready again", lambda n=n: agents.ready(n), RESYNC_TIMEOUT, logs)
            time.sleep(1.0)
            pinged = pinger.stop()
            results = [s.stop() for s in streams]
        finally:
            if readiness is not None:
                readiness.stop()
            pinger.kill()
            for s in streams:
                s.kill()

        print(
            f"apiserver down {back_at - down_at:.0f} s, answering again {up_at - back_at:.1f} s "
            "after its start; changes programmed "
            + ", ".join(f"{n} {t:.1f} s" for n, t in took.items())
            + f" after it returned; ping {pinged.answered}/{pinged.sent}; "
            + "; ".join(Stream.figures(r) for r in results)
        )
        pinged.check()
        for r in results:
            Stream.check(r)
        for n in (na, nb):
            during = readiness.between(n, down_at + NOT_READY_WITHIN, back_at)
            assert len(during) >= (OUTAGE_SECONDS - NOT_READY_WITHIN) / 2, f"{n}: few polls"
            assert not any(during), f"{n}: /readyz said ready while the apiserver was down"
            assert readiness.between(n, down_at - 2, down_at)[-1], f"{n}: not ready before"
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        for listener in listeners:
            listener.close()
        for n in ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True, check=False)
        for name in NODES:
            shutil.rmtree(f"/sys/fs/bpf/fxko-{tag}-{name}", ignore_errors=True)
        if other is not None:
            other.stop_apiserver()
        kube.stop()
