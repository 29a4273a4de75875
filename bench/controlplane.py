"""Control-plane benchmark: python -m flannel_xdp.bench.controlplane

A real `flannel-xdp agent` process against a real etcd, measured from outside:

* full sync: 5,000 leases in etcd -> all 5,000 peers in the agent's pinned
  subnets map. Timed from the agent's "wrote <subnet file>" line (it has its lease
  and its data path; next come the ip-masq rules, the listing and the sync) to the
  moment the bench sees the last entry in the map; also the agent's own figure for
  the sync and the time to "ready" (map *and* 5,000 routes).
* one lease added -> in the map, and reachable: an etcd put of a new lease, then the
  pinned map polled every millisecond until the entry is there, then the node's routing
  table until an address of the subnet routes into flannel.1; p50/p99 over 200
  additions, each timed from just before the put. Removals likewise (no target).
* a restart at that size: the agent stopped and started again, adopting the pinned map
  and the routes (its sync should change nothing): listing -> ready, the fewest map
  entries and routes sampled meanwhile (every one must stay), and pings lost meanwhile to
  the one real peer (the peer namespace, a kernel vxlan device as flanneld makes it, whose
  lease is among the N) from the node, every 10 ms from 1 s before the stop to 1 s after
  ready.
* churn: 100 leases replaced per second for 60 s (the oldest deleted, a new one put):
  each new one's put -> reachable, p50/p99, and the agent's CPU meanwhile.
* agent memory: VmRSS at 5,000 leases (and after the additions).
* CPU while idle: utime + stime of the agent process over 10 s with nothing changing
  (its registry probe keeps running, as in production).

Targets (targets()): ready (map and routes) 2 s after the listing at 5,000 leases, 8 s at
20,000 (the same for a restart, which adopts the pinned state); a lease added -> in the map
p99 < 100 ms, reachable (map and route) p99 < 50 ms, under churn p99 < 200 ms; RSS
100 MB at 5,000, 200 MB at 20,000; idle CPU < 1 %.

Set-up, all throwaway: etcd 3.4 on a free 127.0.0.1 port and on a unix socket (the
agent reaches it through the socket from its network namespace); two network
namespaces joined by a veth pair named eth0 on both sides, 192.0.2.1/24 on the node's
side (inside the namespace only: the host's own network is never touched); the agent
started with `nsenter --net` so that its bpffs pins (under /sys/fs/bpf/<unique>) stay
visible to the bench. Everything is torn down at the end, also on failure or Ctrl-C:
agent SIGTERM, `flannel-xdp teardown`, namespaces deleted, etcd stopped.

Writes a table to stdout and bench/controlplane.json; exits 0 when the measurement
ran (whether or not the targets were met: see "ok" in the table), 1 when it could not.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime
import json
import logging
import os
import platform
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from socket import AF_INET

import aetcd
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_xdp import defaults, netns
from flannel_xdp.lab import process
from flannel_xdp.lab.etcd import ETCD, ETCDCTL, EtcdServer
from flannel_xdp.maps import libbpf
from flannel_xdp.maps.layout import RemoteSubnet, SubnetKey
from flannel_xdp.maps.views import SubnetsMap, subnet_key
from flannel_xdp.registry.config import parse_config
from flannel_xdp.registry.lease import LeaseAttrs, subnet_key_name

log = logging.getLogger("flannel_xdp.bench.controlplane")

DEFAULT_OUT = Path(__file__).resolve().parent / "controlplane.json"
TOOLS = ("ip", "nsenter", "bridge", "ping")
PREFIX = "/coreos.com/network"
# Documentation/benchmark ranges only: 198.18.0.0/15 holds 8,192 /28 pod subnets, or
# 32,768 /30 ones for the larger sizes.
NETWORK = "198.18.0.0/15"
SPARE_SUBNETS = 100  # of the Network, never leased: the node's own lease comes from there
NODE_ADDRESS = "192.0.2.1/24"  # inside the node's namespace only
# One lease is a real node: the peer namespace, with a kernel vxlan device as flanneld
# makes it, answers pings across the data path while the agent restarts.
LIVE_PEER_ADDRESS = "192.0.2.2"
LIVE_PEER_MAC = "02:fe:00:00:00:02"


def sizing(total: int) -> tuple[dict, int]:
    """The network config and the map capacity (--max-subnets) for total leases."""
    subnet_len = 28 if total + SPARE_SUBNETS <= 1 << 13 else 30
    config = {"Network": NETWORK, "SubnetLen": subnet_len, "Backend": {"Type": "vxlan"}}
    return config, max(1 << 13, 1 << total.bit_length())


MAX_LEASES = (1 << 15) - SPARE_SUBNETS
TXN_OPS = 100  # etcd's --max-txn-ops is 128
POLL_INTERVAL = 0.001
EVENT_TIMEOUT = 5.0
START_TIMEOUT = 120.0  # the agent compiles its BPF programs with bcc first

# Seconds from the listing to ready (map and routes), per lease: 2 s at 5,000, 8 s at 20,000.
READY_S_PER_LEASE = 2.0 / 5000
RSS_MB_PER_LEASE = 200.0 / 20000


def targets(leases: int) -> dict[str, float]:
    """Upper bounds by name; the ready ones (and memory) grow with the leases."""
    ready = max(2.0, leases * READY_S_PER_LEASE)
    return {
        # A peer is reachable once its route is there too: "ready" is the headline.
        "ready_after_listing_s": ready,
        "add_p99_ms": 100.0,
        "add_reachable_p99_ms": 50.0,
        "restart_ready_after_listing_s": ready,
        "churn_reachable_p99_ms": 200.0,
        "rss_mb": max(100.0, leases * RSS_MB_PER_LEASE),
        "idle_cpu_pct": 1.0,
    }


class BenchError(RuntimeError):
    pass


def _run(argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


# -- the node: two namespaces and the agent ------------------------------------------------------


@dataclass
class BenchNode:
    tag: str
    workdir: str
    namespaces: list[str] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"fxdp-cp-{self.tag}-node"

    @property
    def peer_netns(self) -> str:
        return f"fxdp-cp-{self.tag}-peer"

    @property
    def bpffs(self) -> str:
        return f"/sys/fs/bpf/fxdp-cp-{self.tag}"

    @property
    def maps_dir(self) -> str:
        return os.path.join(self.bpffs, "maps")

    @property
    def subnet_file(self) -> str:
        return os.path.join(self.workdir, "subnet.env")

    def nsenter(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]

    def create(self) -> None:
        for ns in (self.netns, self.peer_netns):
            _run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
        # Made inside the node's namespace, the peer end moved straight to the other one:
        # nothing ever appears in the host's namespace.
        _run(["ip", "-n", self.netns, "link", "add", "eth0", "type", "veth",
              "peer", "name", "eth0", "netns", self.peer_netns])  # fmt: skip
        _run(["ip", "-n", self.netns, "addr", "add", NODE_ADDRESS, "dev", "eth0"])
        for ns in (self.netns, self.peer_netns):
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        # Nodes forward (kubelet and kube-proxy see to it); bpf_fib_lookup needs it too.
        _run(["ip", "netns", "exec", self.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])

    def make_live_peer(self, subnet: IPv4Network) -> None:
        """The peer namespace as a flanneld node holding subnet (vxlan, VNI 1)."""
        ns, gw = self.peer_netns, str(subnet.network_address)
        _run(["ip", "-n", ns, "addr", "add", f"{LIVE_PEER_ADDRESS}/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "add", "flannel.1", "address", LIVE_PEER_MAC,
              "type", "vxlan", "id", "1", "local", LIVE_PEER_ADDRESS, "dev", "eth0",
              "dstport", "8472", "nolearning"])  # fmt: skip
        _run(["ip", "-n", ns, "addr", "add", f"{gw}/32", "dev", "flannel.1"])
        _run(["ip", "-n", ns, "link", "set", "flannel.1", "up"])

    def connect_live_peer(self) -> IPv4Network:
        """Program the live peer with this node's lease, as flanneld would from etcd."""
        with open(self.subnet_file) as f:
            values = dict(line.strip().split("=", 1) for line in f if "=" in line)
        own = IPv4Network(values["FLANNEL_SUBNET"], strict=False)
        link = json.loads(_run(["ip", "-n", self.netns, "-j", "link", "show", "flannel.1"]).stdout)
        mac, gw = link[0]["address"], str(own.network_address)
        ns = self.peer_netns
        _run(["ip", "-n", ns, "neigh", "replace", gw, "lladdr", mac, "dev", "flannel.1",
              "nud", "permanent"])  # fmt: skip
        _run(["bridge", "-n", ns, "fdb", "replace", mac, "dev", "flannel.1",
              "dst", NODE_ADDRESS.split("/")[0], "self", "permanent"])  # fmt: skip
        _run(["ip", "-n", ns, "route", "replace", str(own), "via", gw, "dev", "flannel.1",
              "onlink"])  # fmt: skip
        return own

    def agent_argv(self, etcd: EtcdServer, max_subnets: int) -> list[str]:
        return self.nsenter(
            [
                sys.executable, "-m", "flannel_xdp.cli", "agent",
                "--etcd-endpoints", etcd.endpoint,
                "--etcd-prefix", PREFIX,
                "--iface", "eth0",
                "--bpffs", self.bpffs,
                "--subnet-file", self.subnet_file,
                "--max-subnets", str(max_subnets),
            ]
        )  # fmt: skip

    def teardown(self) -> list[str]:
        """Remove everything; returns what went wrong (teardown goes on regardless)."""
        problems = []
        if self.netns in self.namespaces:
            res = _run(
                self.nsenter(
                    [sys.executable, "-m", "flannel_xdp.cli", "teardown",
                     "--bpffs", self.bpffs, "--iface", "eth0"]
                ),
                check=False,
            )  # fmt: skip
            if res.returncode != 0:
                problems.append(f"flannel-xdp teardown: {res.stderr.strip()[-500:]}")
        for ns in reversed(self.namespaces):
            res = _run(["ip", "netns", "del", ns], check=False)
            if res.returncode != 0:
                problems.append(f"ip netns del {ns}: {res.stderr.strip()}")
        self.namespaces.clear()
        if os.path.exists(self.bpffs):
            from flannel_xdp.loader.bpffs import PinDir

            try:
                PinDir(self.bpffs).remove()
            except OSError as exc:
                problems.append(f"removing {self.bpffs}: {exc}")
        return problems


class AgentProcess:
    """The agent's process; its log lines, each stamped when the bench read it."""

    def __init__(self, argv: list[str], log_path: str, extra_env: dict[str, str] | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra_env or {})
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            process.die_with_parent(argv, "TERM"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._log = open(log_path, "w")  # noqa: SIM115 (closed by the reader thread)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                now = time.monotonic()
                self._log.write(line)
                with self._cond:
                    self.lines.append((now, line.rstrip("\n")))
                    self._cond.notify_all()
        finally:
            self._log.close()
            with self._cond:
                self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float) -> tuple[float, re.Match]:
        """The first line matching pattern (regex) and when it was read."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for stamp, line in self.lines[seen:]:
                    if m := rx.search(line):
                        return stamp, m
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise BenchError(
                        f"the agent exited with {self.proc.returncode} before {pattern!r}; "
                        f"last lines:\n{self.tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(
                        f"no agent line {pattern!r} in {timeout:.0f} s:\n{self.tail()}"
                    )
                self._cond.wait(min(left, 0.2))

    def tail(self, n: int = 15) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def memory_mb(self) -> dict[str, float]:
        """VmRSS and its parts: RssAnon (heap), RssFile (mapped files: libraries)."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    out[name] = round(int(rest.split()[0]) / 1024, 1)
        if "VmRSS" not in out:
            raise BenchError("no VmRSS for the agent")
        return out

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode


# -- leases ------------------------------------------------------------------------------------


def lease_plan(
    count: int, additions: int, churn: int = 0
) -> tuple[list[IPv4Network], list[IPv4Network], list[IPv4Network]]:
    """Subnets preloaded, added one by one later, and brought in by the churn; the agent
    picks its own among the free subnets after the preloaded ones, so the others come
    from far above."""
    config, _ = sizing(count + additions + churn)
    subnets = parse_config(json.dumps(config)).subnets()
    if count + SPARE_SUBNETS + additions + churn > len(subnets):
        raise BenchError(f"{count} leases, {additions} additions and {churn} churned do not fit")
    late = subnets[len(subnets) - additions - churn :]
    return subnets[:count], late[:additions], late[additions:]


def lease_value(i: int, rng: random.Random) -> bytes:
    mac = [rng.getrandbits(8) for _ in range(6)]
    mac[0] = (mac[0] & 0xFE) | 0x02
    ip = IPv4Address(int(IPv4Address("198.51.100.0")) + 1 + i % 254)  # off-link: vxlan peers
    vtep = ":".join(f"{b:02x}" for b in mac)
    return LeaseAttrs(ip, "vxlan", vni=1, vtep_mac=vtep).to_json().encode()


def lease_key(subnet: IPv4Network) -> bytes:
    return f"{PREFIX}/subnets/{subnet_key_name(subnet)}".encode()


async def preload(
    client: aetcd.Client, config: dict, subnets: list[IPv4Network], rng: random.Random
) -> None:
    grant = await client.lease(24 * 3600)
    await client.put(f"{PREFIX}/config".encode(), json.dumps(config).encode())
    for start in range(0, len(subnets), TXN_OPS):
        ops = [
            client.transactions.put(lease_key(s), lease_value(start + j, rng), lease=grant)
            for j, s in enumerate(subnets[start : start + TXN_OPS])
        ]
        await client.transaction(compare=[], success=ops, failure=[])


# -- measuring ---------------------------------------------------------------------------------


def _present(fd: int, subnet: IPv4Network) -> bool:
    return libbpf.lookup(fd, subnet_key(subnet), RemoteSubnet())


class Routes:
    """The node's routing table, asked from a netlink socket opened inside its namespace:
    is a subnet routed into the tunnel (one `route get` of an address in it)? pyroute2's
    synchronous socket runs an event loop of its own, so it is made and used in one
    worker thread (ROUTES_THREAD), never in the bench's loop."""

    def __init__(self, netns_name: str):
        with netns.entered(netns_name):
            self.ipr = IPRoute()
        found = self.ipr.link_lookup(ifname=defaults.tunnel_device())
        if not found:
            raise BenchError(f"no {defaults.tunnel_device()} in {netns_name}")
        self.tunnel = found[0]

    def routed(self, subnet: IPv4Network) -> bool:
        try:
            got = self.ipr.route("get", dst=str(subnet.network_address + 1))
        except NetlinkError:
            return False
        return bool(got) and got[0].get_attr("RTA_OIF") == self.tunnel

    def count(self) -> int:
        return sum(
            1
            for r in self.ipr.get_routes(family=AF_INET, table=254)
            if r.get_attr("RTA_OIF") == self.tunnel
        )

    def close(self) -> None:
        self.ipr.close()


def poll(cond: Callable[[], bool], timeout: float) -> float | None:
    """Poll cond every POLL_INTERVAL; the time it became true, or None on timeout."""
    deadline = time.perf_counter() + timeout
    while True:
        if cond():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            return None
        time.sleep(POLL_INTERVAL)


def open_map(node: BenchNode, agent: AgentProcess, timeout: float) -> SubnetsMap:
    deadline = time.monotonic() + timeout
    path = os.path.join(node.maps_dir, "subnets")
    while not os.path.exists(path):
        if agent.proc.poll() is not None:
            raise BenchError(f"the agent exited with {agent.proc.returncode}:\n{agent.tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{path} did not appear in {timeout:.0f} s:\n{agent.tail()}")
        time.sleep(0.01)
    return SubnetsMap(node.maps_dir)


def count_entries(m: SubnetsMap) -> int:
    count, key, nxt = 0, None, SubnetKey()
    while libbpf.next_key(m.fd, key, nxt):
        count += 1
        key, nxt = nxt, SubnetKey()
    return count


ROUTES_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1)


async def in_routes_thread(fn: Callable, *args):
    return await asyncio.get_running_loop().run_in_executor(ROUTES_THREAD, fn, *args)


def _wait_event(
    m: SubnetsMap, routes: Routes, subnet: IPv4Network, remove: bool
) -> tuple[float | None, float | None]:
    """When the entry was in (out of) the map, and when the route too."""
    if remove:
        return (
            poll(lambda: not _present(m.fd, subnet), EVENT_TIMEOUT),
            poll(lambda: not routes.routed(subnet), EVENT_TIMEOUT),
        )
    return (
        poll(lambda: _present(m.fd, subnet), EVENT_TIMEOUT),
        poll(lambda: routes.routed(subnet), EVENT_TIMEOUT),
    )


@dataclass
class EventTimes:
    """Per lease event, ms from just before the etcd call: in (or out of) the map, and
    reachable (map and route; for a removal: neither); the etcd call alone."""

    in_map: list[float] = field(default_factory=list)
    reachable: list[float] = field(default_factory=list)
    etcd: list[float] = field(default_factory=list)


async def measure_events(
    client: aetcd.Client,
    m: SubnetsMap,
    routes: Routes,
    subnets: list[IPv4Network],
    rng: random.Random,
    remove: bool,
) -> EventTimes:
    out = EventTimes()
    for i, subnet in enumerate(subnets):
        key = lease_key(subnet)
        started = time.perf_counter()
        if remove:
            await client.delete(key)
        else:
            await client.put(key, lease_value(100_000 + i, rng))
        written = time.perf_counter()
        in_map, done = await in_routes_thread(_wait_event, m, routes, subnet, remove)
        if in_map is None or done is None:
            what = "removed from" if remove else "added to"
            where = "the map" if in_map is None else "the routes"
            raise BenchError(f"{subnet} not {what} {where} {EVENT_TIMEOUT} s after the etcd call")
        out.in_map.append((in_map - started) * 1000)
        out.reachable.append((max(in_map, done) - started) * 1000)
        out.etcd.append((written - started) * 1000)
        await asyncio.sleep(0.01 + rng.random() * 0.01)  # independent events, not a burst
    return out


async def measure_churn(
    client: aetcd.Client,
    m: SubnetsMap,
    routes: Routes,
    current: list[IPv4Network],
    fresh: list[IPv4Network],
    rate: int,
    rng: random.Random,
) -> list[float]:
    """rate leases replaced per second (the oldest deleted, a new one put) until fresh is
    used up; per new lease, ms from its put to reachable (map and route). A checker in
    the routes thread polls what is pending every POLL_INTERVAL."""
    pending: dict[IPv4Network, float] = {}
    done: list[float] = []
    stop = threading.Event()

    def check() -> None:
        while not stop.is_set() or pending:
            for subnet, started in list(pending.items()):
                if _present(m.fd, subnet) and routes.routed(subnet):
                    done.append((time.perf_counter() - started) * 1000)
                    del pending[subnet]
            if stop.is_set() and pending and time.perf_counter() > deadline[0]:
                raise BenchError(f"{sorted(pending)[:3]} never became reachable under churn")
            time.sleep(POLL_INTERVAL)

    deadline = [float("inf")]
    checker = asyncio.get_running_loop().run_in_executor(ROUTES_THREAD, check)
    queue = list(current)
    interval = 1.0 / rate
    next_at = time.perf_counter()
    try:
        for i, subnet in enumerate(fresh):
            await client.delete(lease_key(queue.pop(0)))
            pending[subnet] = time.perf_counter()
            await client.put(lease_key(subnet), lease_value(200_000 + i, rng))
            queue.append(subnet)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    finally:
        deadline[0] = time.perf_counter() + EVENT_TIMEOUT
        stop.set()
        await checker
    return done


@dataclass
class ControlPlaneSettings:
    leases: int
    additions: int
    idle_seconds: float
    out: Path
    keep: bool

    churn_rate: int = 100  # leases replaced per second
    churn_seconds: float = 60.0

    @property
    def churn(self) -> int:
        return int(self.churn_rate * self.churn_seconds)

    @property
    def config(self) -> dict:
        return sizing(self.leases + self.additions + self.churn)[0]

    @property
    def max_subnets(self) -> int:
        return sizing(self.leases + self.additions + self.churn)[1]


async def measure(
    settings: ControlPlaneSettings, etcd: EtcdServer, node: BenchNode, workdir: str
) -> dict:
    rng = random.Random(3)
    preloaded, added, churned = lease_plan(settings.leases, settings.additions, settings.churn)
    results: dict = {}
    client = aetcd.Client(host="127.0.0.1", port=etcd.client_port, timeout=10)
    agent: AgentProcess | None = None
    try:
        t = time.perf_counter()
        await preload(client, settings.config, preloaded, rng)
        live = preloaded[0]
        node.make_live_peer(live)
        live_attrs = LeaseAttrs(
            IPv4Address(LIVE_PEER_ADDRESS), "vxlan", vni=1, vtep_mac=LIVE_PEER_MAC
        )
        await client.put(lease_key(live), live_attrs.to_json().encode())
        results["preload_s"] = round(time.perf_counter() - t, 3)
        log.info("%d leases in etcd (%.2f s)", len(preloaded), results["preload_s"])

        argv = node.agent_argv(etcd, settings.max_subnets)
        agent = AgentProcess(argv, os.path.join(workdir, "agent.log"))
        results["agent_pid"] = agent.pid
        # The bench's "in the map" checks: the entry applied last (the listing is in key
        # order and applied in that order), then every entry.
        last = max(preloaded, key=subnet_key_name)
        m = open_map(node, agent, START_TIMEOUT)
        try:
            t_wrote, _ = agent.wait_line(r"wrote .*subnet\.env", START_TIMEOUT)
            if poll(lambda: _present(m.fd, last), 60) is None:
                raise BenchError(f"{last} never reached the map:\n{agent.tail()}")
            t_last = time.monotonic()
            if poll(lambda: count_entries(m) >= len(preloaded), 30) is None:
                raise BenchError(f"the map never held {len(preloaded)} entries")
            t_all = time.monotonic()
            t_ready, _ = agent.wait_line(r"ready: \d+ peers programmed", 120)
            _, synced = agent.wait_line(r"synced (\d+) peers .* in ([\d.]+) s", 5)
            results["entries_after_sync"] = count_entries(m)
            results["full_sync_s"] = round(t_all - t_wrote, 3)
            results["full_sync_last_entry_s"] = round(t_last - t_wrote, 3)
            results["agent_reported_sync_s"] = float(synced.group(2))
            results["agent_reported_peers"] = int(synced.group(1))
            results["ready_after_listing_s"] = round(t_ready - t_wrote, 3)
            results["start_to_map_complete_s"] = round(t_all - agent.started, 3)
            await asyncio.sleep(2)
            results["memory_mb"] = agent.memory_mb()
            results["rss_mb"] = results["memory_mb"]["VmRSS"]
            log.info(
                "full sync %.3f s (agent: %.3f s), ready after %.3f s, RSS %.1f MB",
                results["full_sync_s"],
                results["agent_reported_sync_s"],
                results["ready_after_listing_s"],
                results["rss_mb"],
            )

            routes = await in_routes_thread(Routes, node.netns)
            try:
                adds = await measure_events(client, m, routes, added, rng, remove=False)
                results["rss_after_additions_mb"] = agent.memory_mb()["VmRSS"]
                removes = await measure_events(client, m, routes, added, rng, remove=True)
                results["routes_before_restart"] = await in_routes_thread(routes.count)
            finally:
                await in_routes_thread(routes.close)
            results["add_ms"] = summarize(adds.in_map)
            results["add_reachable_ms"] = summarize(adds.reachable)
            results["add_etcd_put_ms"] = summarize(adds.etcd)
            results["remove_ms"] = summarize(removes.in_map)
            results["remove_reachable_ms"] = summarize(removes.reachable)
            results["remove_etcd_delete_ms"] = summarize(removes.etcd)
            log.info(
                "addition p50 %.1f ms p99 %.1f ms (reachable p99 %.1f ms); "
                "removal p50 %.1f ms p99 %.1f ms",
                results["add_ms"]["p50"],
                results["add_ms"]["p99"],
                results["add_reachable_ms"]["p99"],
                results["remove_ms"]["p50"],
                results["remove_ms"]["p99"],
            )

            if churned:
                routes = await in_routes_thread(Routes, node.netns)
                try:
                    cpu0, t0 = agent.cpu_seconds(), time.monotonic()
                    churn = await measure_churn(
                        client, m, routes, preloaded[1:], churned, settings.churn_rate, rng
                    )
                    cpu1, t1 = agent.cpu_seconds(), time.monotonic()
                finally:
                    await in_routes_thread(routes.close)
                results["churn_reachable_ms"] = summarize(churn)
                results["churn_cpu_pct"] = round((cpu1 - cpu0) / (t1 - t0) * 100, 1)
                results["churn_rate_per_s"] = round(len(churn) / (t1 - t0), 1)
                log.info(
                    "churn: %d replacements at %.0f/s, reachable p50 %.1f ms p99 %.1f ms, "
                    "agent CPU %.1f %%",
                    len(churn),
                    results["churn_rate_per_s"],
                    results["churn_reachable_ms"]["p50"],
                    results["churn_reachable_ms"]["p99"],
                    results["churn_cpu_pct"],
                )

            await asyncio.sleep(1)
            cpu0, t0 = agent.cpu_seconds(), time.monotonic()
            await asyncio.sleep(settings.idle_seconds)
            cpu1, t1 = agent.cpu_seconds(), time.monotonic()
            results["idle_cpu_pct"] = round((cpu1 - cpu0) / (t1 - t0) * 100, 3)
            results["idle_seconds"] = round(t1 - t0, 2)
            results["final_entries"] = count_entries(m)
            log.info("idle CPU %.3f %% over %.1f s", results["idle_cpu_pct"], t1 - t0)

            # A restart at this size adopts the pinned map and the routes: nothing to write,
            # and nothing of the data path may go meanwhile (sampled until it is ready).
            routes = await in_routes_thread(Routes, node.netns)
            held = count_entries(m), await in_routes_thread(routes.count)
            sampling = threading.Event()

            def sample() -> list[tuple[int, int]]:
                seen = []
                while not sampling.is_set():
                    seen.append((count_entries(m), routes.count()))
                    time.sleep(0.05)
                return seen

            node.connect_live_peer()
            target = str(live.network_address)
            check = _run(node.nsenter(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", target]),
                         check=False)  # fmt: skip
            if check.returncode != 0:
                seen = [
                    _run(node.nsenter(argv), check=False).stdout
                    for argv in (
                        ["ip", "route", "get", target],
                        [sys.executable, "-m", "flannel_xdp.cli", "inspect", "--bpffs", node.bpffs],
                    )
                ]
                raise BenchError(
                    f"the live peer {target} does not answer:\n{check.stdout}\n" + "\n".join(seen)
                )
            sampler = asyncio.get_running_loop().run_in_executor(ROUTES_THREAD, sample)
            pinger = subprocess.Popen(
                node.nsenter(["ping", "-n", "-i", "0.01", "-W", "1", target]),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            try:
                await asyncio.sleep(1)
                results["agent_exit"] = agent.stop()
                agent = AgentProcess(argv, os.path.join(workdir, "agent-restart.log"))
                t_wrote, _ = agent.wait_line(r"wrote .*subnet\.env", START_TIMEOUT)
                t_ready, _ = agent.wait_line(r"ready: \d+ peers programmed", 120)
                await asyncio.sleep(1)
            finally:
                pinger.send_signal(signal.SIGINT)
                out, _ = pinger.communicate(timeout=10)
                sampling.set()
                seen = await sampler
                await in_routes_thread(routes.close)
            sent = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            if sent is None:
                raise BenchError(f"ping printed no summary:\n{out[-500:]}")
            # the last one may still be on its way when ping is stopped
            lost = max(0, int(sent.group(1)) - int(sent.group(2)) - 1)
            results["restart_pings"] = {"sent": int(sent.group(1)), "lost": lost}
            results["restart_held"] = {"entries": held[0], "routes": held[1]}
            results["restart_fewest"] = {
                "entries": min(e for e, _ in seen),
                "routes": min(r for _, r in seen),
                "samples": len(seen),
            }
            _, synced = agent.wait_line(r"synced (\d+) peers .*\((.*)\) in ([\d.]+) s", 5)
            results["restart_ready_after_listing_s"] = round(t_ready - t_wrote, 3)
            results["restart_start_to_ready_s"] = round(t_ready - agent.started, 3)
            results["restart_sync"] = synced.group(2)
            log.info(
                "restart: ready %.3f s after the listing (%.1f s after the start; %s); "
                "fewest entries and routes meanwhile %s of %s",
                results["restart_ready_after_listing_s"],
                results["restart_start_to_ready_s"],
                results["restart_sync"],
                results["restart_fewest"],
                results["restart_held"],
            )
        finally:
            m.close()
    finally:
        if agent is not None:
            results["agent_exit"] = agent.stop()
            results["agent_log_tail"] = agent.tail(5)
        await client.close()
    return results


def summarize(ms: list[float]) -> dict:
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 2),
        "p99": round(percentile(ms, 99), 2),
        "max": round(max(ms), 2),
        "mean": round(statistics.fmean(ms), 2),
        # (index, ms) of the slowest five: are outliers early, periodic, random?
        "slowest": [(i, round(v, 2)) for i, v in sorted(enumerate(ms), key=lambda x: -x[1])[:5]],
    }


def verdicts(results: dict, leases: int) -> dict[str, dict]:
    values = {
        "ready_after_listing_s": results.get("ready_after_listing_s"),
        "add_p99_ms": results.get("add_ms", {}).get("p99"),
        "add_reachable_p99_ms": results.get("add_reachable_ms", {}).get("p99"),
        "restart_ready_after_listing_s": results.get("restart_ready_after_listing_s"),
        "churn_reachable_p99_ms": results.get("churn_reachable_ms", {}).get("p99"),
        "rss_mb": results.get("rss_mb"),
        "idle_cpu_pct": results.get("idle_cpu_pct"),
    }
    out = {}
    for name, bound in targets(leases).items():
        v = values[name]
        if v is None and name == "churn_reachable_p99_ms":
            continue  # --churn-seconds 0: not measured
        out[name] = {"value": v, "target": f"< {bound:g}", "ok": v is not None and v < bound}
    return out


def table(results: dict, checks: dict[str, dict], leases: int) -> str:
    add, rem = results.get("add_ms", {}), results.get("remove_ms", {})
    reach, unreach = results.get("add_reachable_ms", {}), results.get("remove_reachable_ms", {})
    churn = results.get("churn_reachable_ms", {})
    fewest, held = results.get("restart_fewest", {}), results.get("restart_held", {})
    pings = results.get("restart_pings", {})
    mem = results.get("memory_mb", {})
    rows = [
        ("metric", "value", "target", "ok"),
        (f"{leases} leases: listing -> ready (map + routes)",
         f"{results['ready_after_listing_s']:.3f} s",
         f"{checks['ready_after_listing_s']['target']} s",
         checks["ready_after_listing_s"]["ok"]),
        ("  listing -> map complete", f"{results['full_sync_s']:.3f} s", "", ""),
        ("  agent's own sync figure (map + routes)", f"{results['agent_reported_sync_s']:.3f} s",
         "", ""),
        ("  process start -> map complete", f"{results['start_to_map_complete_s']:.3f} s", "", ""),
        (f"lease added -> in map, p50 (n={add.get('n')})", f"{add.get('p50')} ms", "", ""),
        (f"lease added -> in map, p99 (n={add.get('n')})", f"{add.get('p99')} ms", "< 100 ms",
         checks["add_p99_ms"]["ok"]),
        ("lease added -> reachable (map + route), p50", f"{reach.get('p50')} ms", "", ""),
        ("lease added -> reachable (map + route), p99", f"{reach.get('p99')} ms", "< 50 ms",
         checks["add_reachable_p99_ms"]["ok"]),
        ("lease removed -> out of map, p50/p99", f"{rem.get('p50')} / {rem.get('p99')} ms", "",
         ""),
        ("lease removed -> unreachable, p50/p99",
         f"{unreach.get('p50')} / {unreach.get('p99')} ms", "", ""),
        (f"restart at {leases} leases: listing -> ready",
         f"{results['restart_ready_after_listing_s']:.3f} s",
         f"{checks['restart_ready_after_listing_s']['target']} s",
         checks["restart_ready_after_listing_s"]["ok"]),
        ("  process start -> ready", f"{results['restart_start_to_ready_s']:.3f} s", "", ""),
        ("  what the restart's sync changed", results["restart_sync"], "", ""),
        ("  pings to a live peer meanwhile, lost",
         f"{pings.get('lost')} of {pings.get('sent')}", "0", pings.get("lost") == 0),
        ("  fewest map entries / routes meanwhile",
         f"{fewest.get('entries')} / {fewest.get('routes')} of {held.get('entries')} / "
         f"{held.get('routes')} ({fewest.get('samples')} samples)", "all kept",
         fewest == {**held, "samples": fewest.get("samples")}),
        (f"agent RSS at {leases} leases", f"{results['rss_mb']:.1f} MB",
         f"{checks['rss_mb']['target']} MB",
         checks["rss_mb"]["ok"]),
        ("  of which anonymous / file-backed",
         f"{mem.get('RssAnon')} / {mem.get('RssFile')} MB", "", ""),
        (f"agent CPU idle ({results['idle_seconds']:.0f} s)", f"{results['idle_cpu_pct']:.3f} %",
         "< 1 %", checks["idle_cpu_pct"]["ok"]),
    ]  # fmt: skip
    if churn:
        at = rows.index(next(r for r in rows if str(r[0]).startswith("agent RSS")))
        rows[at:at] = [
            (f"churn ({results.get('churn_rate_per_s')}/s replaced): reachable, p50",
             f"{churn.get('p50')} ms", "", ""),
            ("  reachable, p99", f"{churn.get('p99')} ms",
             f"{checks['churn_reachable_p99_ms']['target']} ms",
             checks["churn_reachable_p99_ms"]["ok"]),
            ("  agent CPU during the churn", f"{results.get('churn_cpu_pct')} %", "", ""),
        ]  # fmt: skip
    return render_rows(rows)


def render_rows(rows: list[tuple]) -> str:
    """(metric, value, target, ok) rows as an aligned table, the first one its header; an
    ok that is a bool prints as yes or NO."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        cells = [str(c) for c in r]
        if isinstance(r[3], bool):
            cells[3] = "yes" if r[3] else "NO"
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    """The JSON report, replaced in one rename (a reader never sees half of it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root: network namespaces, BPF programs, bpffs pins")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    missing += [p for p in (ETCD, ETCDCTL) if not os.access(p, os.X_OK)]
    if missing:
        raise BenchError(f"missing {missing} (Debian: iproute2, util-linux, etcd-server)")


@contextlib.contextmanager
def _terminate_on_signals() -> Iterator[None]:
    """SIGTERM (and SIGINT) unwind through every finally: nothing is left behind."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(settings: ControlPlaneSettings) -> int:
    _check_prerequisites()
    tag = secrets.token_hex(3)
    root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    workdir = tempfile.mkdtemp(prefix=f"fxdp-cp-{tag}-", dir=root)
    etcd = EtcdServer(os.path.join(workdir, "etcd"))
    node = BenchNode(tag, workdir)
    results: dict = {}
    problems: list[str] = []
    error: BaseException | None = None
    with _terminate_on_signals():
        try:
            etcd.start(detach=False)
            node.create()
            results = asyncio.run(measure(settings, etcd, node, workdir))
        except BaseException as exc:  # report, tear down, then fail
            error = exc
        finally:
            problems += node.teardown()
            etcd.stop()
            if settings.keep:
                print(f"kept {workdir} (agent.log, etcd.log)", file=sys.stderr)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    for p in problems:
        log.warning("teardown: %s", p)
    if error is not None:
        if isinstance(error, KeyboardInterrupt):
            log.error("interrupted; everything torn down")
        else:
            log.error("control-plane benchmark failed: %s", error)
        return 1

    checks = verdicts(results, settings.leases)
    report = {
        "schema": 1,
        "benchmark": "control-plane",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": {
            "leases": settings.leases,
            "additions": settings.additions,
            "idle_seconds": settings.idle_seconds,
            "churn_rate": settings.churn_rate,
            "churn_seconds": settings.churn_seconds,
            "max_subnets": settings.max_subnets,
            "poll_interval_ms": POLL_INTERVAL * 1000,
            "config": settings.config,
        },
        "results": results,
        "targets": checks,
        "teardown_problems": problems,
    }
    write_report(settings.out, report)
    print(table(results, checks, settings.leases))
    print(f"\nwrote {settings.out}")
    return 0


def parse_args(argv: list[str] | None) -> ControlPlaneSettings:
    p = argparse.ArgumentParser(
        prog="python -m flannel_xdp.bench.controlplane",
        description="Control-plane benchmark: full sync of N leases, per-lease event latency, "
        "agent memory and idle CPU, against a real etcd and a real agent process.",
    )
    p.add_argument("--leases", type=int, default=5000, help="leases in etcd (default 5000)")
    p.add_argument("--additions", type=int, default=200, help="leases added one by one (200)")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU window (10 s)")
    p.add_argument(
        "--churn-seconds", type=float, default=60.0, help="seconds of churn, 0 for none (60)"
    )
    p.add_argument("--churn-rate", type=int, default=100, help="leases replaced per second (100)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output ({DEFAULT_OUT})")
    p.add_argument("--keep", action="store_true", help="keep the agent's and etcd's logs")
    a = p.parse_args(argv)
    if a.leases < 1 or a.additions < 1 or a.leases + a.additions > MAX_LEASES:
        p.error(f"need 1 <= leases, additions and leases + additions <= {MAX_LEASES}")
    if a.churn_seconds < 0 or a.churn_rate < 1:
        p.error("need --churn-seconds >= 0 and --churn-rate >= 1")
    settings = ControlPlaneSettings(
        a.leases, a.additions, a.idle_seconds, a.out, a.keep, a.churn_rate, a.churn_seconds
    )
    if settings.leases + settings.additions + settings.churn > MAX_LEASES:
        p.error(f"leases, additions and churned leases must be at most {MAX_LEASES} together")
    return settings


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        return run(parse_args(argv))
    except BenchError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
