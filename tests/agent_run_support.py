"""A real agent in a network namespace of its own, against a real etcd, driven by a test:
AgentRun starts and stops it and reads its log, /readyz, /metrics, its subnets map and its
routes; put_lease() and delete_lease() change the leases it watches.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from prometheus_client.parser import text_string_to_metric_families

from flannel_xdp import netns
from flannel_xdp.backend import Backend
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.maps.views import Peer, SubnetsMap
from tests.etcd_support import EtcdCluster
from tests.node_support import (
    AGENT_TIMEOUT,
    agent_argv,
    agent_env,
    in_node,
    made_on_node,
    new_bpffs,
    teardown_node,
)

CONFIG = {"Network": "198.18.0.0/16", "Backend": {"Type": "vxlan"}}
METRICS = ("127.0.0.1", 9100)  # loopback only
HEALTHZ = ("192.0.2.10", 8081)  # the underlay address only
WAIT = 30.0


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def http_get(ns: str, addr: tuple[str, int], path: str) -> tuple[int, str]:
    with netns.entered(ns):
        conn = http.client.HTTPConnection(*addr, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()


@dataclass
class AgentRun:
    ns: str
    etcd: EtcdCluster
    prefix: str
    bpffs: str
    subnet_file: str
    log_path: str
    proc: subprocess.Popen | None = None
    log_from: int = 0  # where the current run's output starts in the log file

    def start(self, *extra: str) -> None:
        argv = agent_argv(self.etcd, self.prefix, self.bpffs, self.subnet_file, *extra)
        with open(self.log_path, "a") as log:
            self.log_from = log.tell()
            self.proc = subprocess.Popen(
                in_node(self.ns, argv), stdout=log, stderr=subprocess.STDOUT, env=agent_env()
            )

    def log(self) -> str:
        """The current run's output."""
        with open(self.log_path) as f:
            f.seek(self.log_from)
            return f.read()

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(AGENT_TIMEOUT)

    def wait_started(self) -> None:
        """Until the agent has done its first sync (ready or not: see /readyz)."""
        assert self.proc is not None

        def started() -> bool:
            assert self.proc.poll() is None, f"agent exited {self.proc.returncode}:\n{self.log()}"
            return self.start_line() is not None

        wait_until(started, "the agent's start-up", timeout=AGENT_TIMEOUT)

    def start_line(self) -> str | None:
        """The line the agent logs once started: "ready: ..." or "started but NOT ready"."""
        for line in self.log().splitlines():
            if "flannel_xdp.agent.agent: ready: " in line or "started but NOT ready" in line:
                return line
        return None

    def readyz(self) -> int:
        return http_get(self.ns, HEALTHZ, "/readyz")[0]

    def metrics(self) -> dict[str, float]:
        status, body = http_get(self.ns, METRICS, "/metrics")
        assert status == 200
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def map(self) -> dict[IPv4Network, Peer]:
        with SubnetsMap(PinDir(self.bpffs).maps) as m:
            return m.peers()

    def max_entries(self) -> int:
        res = subprocess.run(
            ["bpftool", "-j", "map", "show", "pinned", f"{PinDir(self.bpffs).maps}/subnets"],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(res.stdout)["max_entries"]

    def routes(self) -> set[IPv4Network]:
        res = subprocess.run(
            ["ip", "-n", self.ns, "-j", "route", "show", "dev", "flannel.1"],
            capture_output=True,
            text=True,
            check=True,
        )
        return {IPv4Network(r["dst"]) for r in json.loads(res.stdout) if "/" in r["dst"]}


def subnet(i: int) -> IPv4Network:
    return IPv4Network(f"198.18.{100 + i}.0/24")


def mac(i: int, gen: int = 0) -> str:
    return f"0e:00:00:00:{gen:02x}:{i:02x}"


def public_ip(i: int) -> IPv4Address:
    return IPv4Address(f"192.0.2.{100 + i}")  # never sent to: no packet leaves the test


def put_lease(run: AgentRun, i: int, gen: int = 0) -> Peer:
    value = {
        "PublicIP": str(public_ip(i)),
        "PublicIPv6": None,
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": mac(i, gen)},
    }
    s = subnet(i)
    run.etcd.put(f"{run.prefix}/subnets/{s.network_address}-{s.prefixlen}", json.dumps(value))
    return Peer(s, public_ip(i), Backend.VXLAN, mac(i, gen))


def delete_lease(run: AgentRun, i: int) -> None:
    s = subnet(i)
    run.etcd.delete(f"{run.prefix}/subnets/{s.network_address}-{s.prefixlen}")


def wait_programmed(run: AgentRun, want: dict[IPv4Network, Peer], what: str) -> None:
    """Until map and routes are exactly want."""
    wait_until(lambda: run.map() == want and run.routes() == set(want), what)


@contextlib.contextmanager
def agent_run_on(etcd: EtcdCluster, node: str, tmp_path) -> Iterator[AgentRun]:
    """An AgentRun on node with CONFIG at a fresh etcd prefix (start it with run.start());
    killed afterwards, and everything it made checked gone."""
    run = AgentRun(
        node, etcd, etcd.new_prefix(), new_bpffs(), str(tmp_path / "subnet.env"),
        str(tmp_path / "agent.log"),
    )  # fmt: skip
    etcd.put(f"{run.prefix}/config", json.dumps(CONFIG))
    try:
        yield run
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        teardown_node(node, run.bpffs, run.subnet_file, etcd, run.prefix)
        left = made_on_node(node, run.bpffs, run.subnet_file, etcd, run.prefix)
        assert left == [], f"left behind: {left}"
