"""The lab's etcd: one Debian etcd 3.4 member holding the network config and the leases.

It runs in the root network namespace but listens on loopback only
(``127.0.0.1:<port>``, for etcdctl and the lab itself) and on a unix socket
(for the agents, which live in node namespaces and reach it through the file
system). etcd 3.4 names the socket after the URL's "host:port" and creates it
in its working directory, so it is started with cwd = its directory and
``unix://etcd.sock:<port>`` becomes the file ``<dir>/etcd.sock:<port>``.

Data lives under the lab's run directory (on /run, a tmpfs: etcd fsyncs every
write). Nothing here opens a port on any other address.

This is the one etcd runner of the project: the lab, the tests (tests/etcd_support.py,
which adds only test helpers) and the bench start their members here, one
(``EtcdServer.start()``) or a cluster (``start_cluster()``, for failover), optionally
serving clients over TLS.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass

from flannel_xdp.lab import process

log = logging.getLogger(__name__)

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
START_TIMEOUT = 15.0


class EtcdError(RuntimeError):
    pass


def free_ports(count: int) -> list[int]:
    """count distinct free TCP ports on 127.0.0.1 (loopback of the root namespace: nothing
    is added), held open together while chosen."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_ports(1)[0]


@dataclass(frozen=True)
class ServerTls:
    """Client-facing TLS of a member: its certificate and key, the CA its clients' certificates
    must chain to (--client-cert-auth), and a client certificate for its own health checks."""

    ca: str
    cert: str
    key: str
    client_cert: str
    client_key: str


# Short Raft timers: members on loopback elect a leader in well under a second.
HEARTBEAT_MS = 50
ELECTION_MS = 500


def member_argv(
    name: str,
    workdir: str,
    client_port: int,
    peer_port: int,
    initial_cluster: str,
    *,
    unix_socket: bool = True,
    token: str | None = None,
    tls: ServerTls | None = None,
) -> list[str]:
    """etcd's command line for one member on loopback; run it with cwd=workdir, where
    etcd creates the unix socket file `etcd.sock:<client_port>`."""
    scheme = "https" if tls else "http"
    url, peer = f"{scheme}://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    listen = f"{url},unix://etcd.sock:{client_port}" if unix_socket else url
    argv = [
        ETCD,
        "--name", name,
        "--data-dir", os.path.join(workdir, "data"),
        "--listen-client-urls", listen,
        "--advertise-client-urls", url,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", initial_cluster,
        "--initial-cluster-state", "new",
        "--heartbeat-interval", str(HEARTBEAT_MS),
        "--election-timeout", str(ELECTION_MS),
        "--logger", "zap",
        "--log-outputs", "stderr",
        "--log-level", "warn",
    ]  # fmt: skip
    if token is not None:
        argv += ["--initial-cluster-token", token]
    if tls is not None:
        argv += ["--cert-file", tls.cert, "--key-file", tls.key]
        argv += ["--trusted-ca-file", tls.ca, "--client-cert-auth"]
    return argv


@dataclass
class EtcdServer:
    """One member; start() it (alone), start_cluster() several, or attach to a running one
    from its state (pid, ports)."""

    workdir: str  # etcd's cwd: its data, its log and its unix socket file live here
    client_port: int = 0
    peer_port: int = 0
    pid: int | None = None
    name: str = "lab"
    unix_socket: bool = True
    tls: ServerTls | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def socket_path(self) -> str:
        return os.path.join(self.workdir, f"etcd.sock:{self.client_port}")

    @property
    def endpoint(self) -> str:
        """What the agents take as --etcd-endpoints (reachable from any netns)."""
        return f"unix://{self.socket_path}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "etcd.log")

    def state(self) -> dict:
        return {
            "workdir": self.workdir,
            "client_port": self.client_port,
            "peer_port": self.peer_port,
            "pid": self.pid,
        }

    @classmethod
    def from_state(cls, state: dict) -> EtcdServer:
        return cls(**state)

    def start(self, *, detach: bool) -> None:
        """Start etcd alone, on free ports; detach: outlive this process (lab up), else die
        with it (tests, bench)."""
        require_binaries()
        for _ in range(3):
            self.client_port, self.peer_port = free_ports(2)
            self.spawn(f"{self.name}={self.peer_url}", detach=detach)
            try:
                self.wait_healthy()
                return
            except EtcdError:
                clash = self.port_clash()
                self.stop()
                if not clash:
                    raise
        raise EtcdError("etcd: the free ports chosen were taken meanwhile, three times")

    def spawn(self, initial_cluster: str, *, token: str | None = None, detach: bool = False):
        """Start the process on the ports set, without waiting for it to be healthy."""
        os.makedirs(self.workdir, exist_ok=True)
        argv = member_argv(
            self.name,
            self.workdir,
            self.client_port,
            self.peer_port,
            initial_cluster,
            unix_socket=self.unix_socket,
            token=token,
            tls=self.tls,
        )
        with open(self.log_path, "ab") as out:
            proc = process.start_daemon(argv, out, cwd=self.workdir, detach=detach)
        self.pid = proc.pid
        self._proc = proc

    def port_clash(self) -> bool:
        """Did the member fail because a port chosen as free was taken meanwhile?"""
        return "address already in use" in self.log_tail(200)

    @property
    def running(self) -> bool:
        proc = getattr(self, "_proc", None)
        if proc is not None:  # ours: exact (its command line changes at exec)
            return proc.poll() is None
        return self.pid is not None and process.pid_alive(self.pid, self.workdir)

    def healthy(self) -> bool:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5, context=context) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def ready(self) -> bool:
        """Healthy, and its unix socket (the agents' way in) is there when it has one."""
        return self.healthy() and (not self.unix_socket or os.path.exists(self.socket_path))

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        wait_ready([self], timeout)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the member (SIGKILL by default: a crash, not a goodbye)."""
        proc = getattr(self, "_proc", None)
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(sig)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        elif self.pid is not None:
            process.kill_pid(self.pid, self.workdir)

    def pause(self) -> None:
        """SIGSTOP: the member hangs with its sockets open (no error reaches a client)."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not self._all_threads_stopped():
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd member {self.name} did not stop on SIGSTOP")
            time.sleep(0.005)

    def _all_threads_stopped(self) -> bool:
        task_dir = f"/proc/{self.pid}/task"
        for tid in os.listdir(task_dir):
            try:
                with open(f"{task_dir}/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                continue
            if state not in ("T", "t"):
                return False
        return True

    def resume(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(line[:400].rstrip() + "\n" for line in f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- etcdctl, as an operator (or another flanneld) would write ------------------------

    def etcdctl(self, *args: str, input: str | None = None) -> str:
        if not os.access(ETCDCTL, os.X_OK):
            raise EtcdError(f"{ETCDCTL} not found: run `make setup` (Debian etcd-client)")
        res = subprocess.run(
            [ETCDCTL, f"--endpoints={self.url}", "--command-timeout=5s", *args],
            env={**os.environ, "ETCDCTL_API": "3"},
            input=input,
            capture_output=True,
            text=True,
            timeout=20,
        )
        if res.returncode != 0:
            raise EtcdError(f"etcdctl {' '.join(args)} exited {res.returncode}: {res.stderr}")
        return res.stdout

    def put(self, key: str, value: str) -> None:
        self.etcdctl("put", "--", key, value)

    def delete(self, key: str) -> int:
        out = self.etcdctl("del", "--", key).strip()
        return int(out) if out.isdigit() else 0

    def get_prefix(self, prefix: str) -> dict[str, str]:
        out = json.loads(self.etcdctl("get", "--prefix", "-w", "json", "--", prefix))
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in out.get("kvs") or []
        }


def require_binaries() -> None:
    if not os.access(ETCD, os.X_OK):
        raise EtcdError(f"{ETCD} not found: run `make setup` (Debian etcd-server)")


def wait_ready(members: list[EtcdServer], timeout: float = START_TIMEOUT) -> None:
    """Until every member is ready; EtcdError (with the logs) when one exits or is late."""
    deadline = time.monotonic() + timeout
    pending = list(members)
    while pending:
        for m in list(pending):
            if not m.running:
                raise EtcdError(
                    f"etcd member {m.name} exited during start-up; its log:\n{m.log_tail()}"
                )
            if m.ready():
                pending.remove(m)
        if pending and time.monotonic() > deadline:
            tails = "\n".join(f"--- {m.name}:\n{m.log_tail()}" for m in pending)
            raise EtcdError(
                f"etcd members {[m.name for m in pending]} not healthy in {timeout:.0f} s:\n{tails}"
            )
        if pending:
            time.sleep(0.05)


def start_cluster(
    size: int, root: str, *, unix_socket: bool = False, tls: ServerTls | None = None
) -> list[EtcdServer]:
    """size members on free loopback ports, each in root/m<i>, all healthy; they die with
    the calling thread. Ports taken meanwhile by someone else are chosen anew (three tries);
    any other failure stops what was started and raises EtcdError."""
    require_binaries()
    for _ in range(3):
        ports = free_ports(2 * size)
        members = [
            EtcdServer(
                os.path.join(root, f"m{i}"),
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                name=f"m{i}",
                unix_socket=unix_socket,
                tls=tls,
            )
            for i in range(size)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        token = f"fxdp-{uuid.uuid4().hex[:8]}"
        try:
            for m in members:
                m.spawn(initial, token=token)
            wait_ready(members)
            return members
        except BaseException:
            clash = any(m.port_clash() for m in members)
            for m in members:
                with contextlib.suppress(Exception):
                    m.stop()
            if not clash:
                raise
            for m in members:  # a fresh start on new ports: no data of the failed one
                shutil.rmtree(m.workdir, ignore_errors=True)
    raise EtcdError("etcd: the free ports chosen were taken by someone else, three times")


def stop_by_state(state: dict | None) -> None:
    """Stop the etcd a state file names (from another process); quiet when gone."""
    if state and state.get("pid"):
        process.kill_pid(int(state["pid"]), state["workdir"])


__all__ = [
    "ETCD",
    "ETCDCTL",
    "EtcdError",
    "EtcdServer",
    "ServerTls",
    "free_port",
    "free_ports",
    "start_cluster",
    "stop_by_state",
    "wait_ready",
]
