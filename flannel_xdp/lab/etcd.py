"""The lab's etcd: one Debian etcd 3.4 member holding the network config and the leases.

It runs in the root network namespace but listens on loopback only
(``127.0.0.1:<port>``, for etcdctl and the lab itself) and on a unix socket
(for the agents, which live in node namespaces and reach it through the file
system). etcd 3.4 names the socket after the URL's "host:port" and creates it
in its working directory, so it is started with cwd = its directory and
``unix://etcd.sock:<port>`` becomes the file ``<dir>/etcd.sock:<port>``.

Data lives under the lab's run directory (on /run, a tmpfs: etcd fsyncs every
write). Nothing here opens a port on any other address.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass

from flannel_xdp.lab import process

log = logging.getLogger(__name__)

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
START_TIMEOUT = 15.0


class EtcdError(RuntimeError):
    pass


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (loopback of the root namespace: nothing is added)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
) -> list[str]:
    """etcd's command line for one member on loopback; run it with cwd=workdir, where
    etcd creates the unix socket file `etcd.sock:<client_port>`."""
    url, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
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
    return argv


@dataclass
class EtcdServer:
    """One member; start() it, or attach to a running one from its state (pid, ports)."""

    workdir: str
    client_port: int = 0
    peer_port: int = 0
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

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
        """Start etcd; detach: outlive this process (lab up), else die with it (tests)."""
        if not os.access(ETCD, os.X_OK):
            raise EtcdError(f"{ETCD} not found: run `make setup` (Debian etcd-server)")
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(3):
            self.client_port, self.peer_port = free_port(), free_port()
            if self.client_port == self.peer_port:
                continue
            self._spawn(detach)
            try:
                self.wait_healthy()
                return
            except EtcdError:
                clash = "address already in use" in self.log_tail(50)
                self.stop()
                if not clash:
                    raise
        raise EtcdError("etcd: the free ports chosen were taken meanwhile, three times")

    def _spawn(self, detach: bool) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = member_argv("lab", self.workdir, self.client_port, self.peer_port, f"lab={peer}")
        with open(self.log_path, "ab") as out:
            proc = process.start_daemon(argv, out, cwd=self.workdir, detach=detach)
        self.pid = proc.pid
        self._proc = proc

    @property
    def running(self) -> bool:
        proc = getattr(self, "_proc", None)
        if proc is not None:  # ours: exact (its command line changes at exec)
            return proc.poll() is None
        return self.pid is not None and process.pid_alive(self.pid, self.workdir)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not (self.healthy() and os.path.exists(self.socket_path)):
            if not self.running:
                raise EtcdError(f"etcd exited during start-up; its log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd not healthy in {timeout:.0f} s; its log:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        elif self.pid is not None:
            process.kill_pid(self.pid, self.workdir)

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


def stop_by_state(state: dict | None) -> None:
    """Stop the etcd a state file names (from another process); quiet when gone."""
    if state and state.get("pid"):
        process.kill_pid(int(state["pid"]), state["workdir"])


__all__ = ["ETCD", "ETCDCTL", "EtcdError", "EtcdServer", "free_port", "stop_by_state"]
