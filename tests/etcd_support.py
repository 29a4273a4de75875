"""A real etcd (Debian's /usr/bin/etcd, 3.4) for the registry tests.

``etcd_cluster()`` starts one member (or a 3-member cluster, for failover) on free
loopback ports with its data under a fresh temporary directory (on /dev/shm when
there is one: etcd fsyncs every write), waits until every member answers
/health, yields an EtcdCluster and always kills the members and removes the
directory afterwards, also when the test or the start-up failed. Each member
can also listen on a unix socket, reachable from any network namespace.

Members are started under `setpriv --pdeathsig KILL`, so even a killed pytest leaves
no etcd behind. (Not with a preexec_fn: that makes subprocess fork() a process in
which gRPC runs, and gRPC's fork handlers can abort the child before it execs.)
Nothing here needs root; missing binaries fail the test (never skip).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from flannel_xdp.agent.registry import Endpoint, EtcdRegistry, parse_endpoints
from flannel_xdp.lab.etcd import ETCD, ETCDCTL, member_argv

START_TIMEOUT = 15.0


def require_etcd() -> None:
    """Fail (not skip) when etcd or etcdctl is missing."""
    missing = [p for p in (ETCD, ETCDCTL) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: the registry tests run a real etcd "
            "(Debian: apt-get install etcd-server etcd-client)"
        )


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"this test needs root ({why}): run it as root")


def free_ports(count: int) -> list[int]:
    """count distinct free TCP ports on 127.0.0.1 (held open together while chosen)."""
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


def die_with_parent(argv: list[str]) -> list[str]:
    """argv, killed when the process that started it dies (setpriv, where there is one)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    workdir: str  # etcd's cwd: the unix socket file is created here
    unix_socket: bool
    proc: subprocess.Popen | None = None
    log_path: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def socket_path(self) -> str:
        """etcd names the socket file after the URL's host:port, in its cwd."""
        return os.path.join(self.workdir, f"etcd.sock:{self.client_port}")

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, initial_cluster: str, token: str) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        argv = member_argv(
            self.name,
            self.workdir,
            self.client_port,
            self.peer_port,
            initial_cluster,
            unix_socket=self.unix_socket,
            token=token,
        )
        self.log_path = os.path.join(self.workdir, "etcd.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                die_with_parent(argv),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the member (SIGKILL by default: a crash, not a goodbye)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        """SIGSTOP: the member hangs with its sockets open (no error reaches a client)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not self._all_threads_stopped():
            if time.monotonic() > deadline:
                raise AssertionError(f"etcd member {self.name} did not stop on SIGSTOP")
            time.sleep(0.005)

    def _all_threads_stopped(self) -> bool:
        assert self.proc is not None
        task_dir = f"/proc/{self.proc.pid}/task"
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
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def log_tail(self, lines: int = 12, width: int = 400) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(line[:width].rstrip() + "\n" for line in f.readlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class EtcdCluster:
    members: list[EtcdMember]
    tmpdir: str
    prefixes: list[str] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def endpoints_text(self) -> str:
        return ",".join(self.urls)

    @property
    def endpoints(self) -> list[Endpoint]:
        return parse_endpoints(self.endpoints_text)

    def registry(self, prefix: str, **kwargs) -> EtcdRegistry:
        return EtcdRegistry(self.endpoints, prefix=prefix, **kwargs)

    def etcdctl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        """Run etcdctl (API v3) against the running members; its stdout."""
        urls = ",".join(m.url for m in self.members if m.running)
        result = subprocess.run(
            [ETCDCTL, f"--endpoints={urls}", "--command-timeout=5s", *args],
            env={**os.environ, "ETCDCTL_API": "3"},
            input=input,
            capture_output=True,
            text=True,
            timeout=20,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"etcdctl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result.stdout

    def get_raw(self, key: str) -> bytes | None:
        """The value of key as stored, read with etcdctl (not with the code under test)."""
        out = self.etcdctl("get", key, "-w", "json")
        kvs = json.loads(out).get("kvs") or []
        if not kvs:
            return None
        return base64.b64decode(kvs[0].get("value", ""))

    def get_kv(self, key: str) -> dict | None:
        """key's record as etcdctl shows it (key/value base64, lease id, revisions)."""
        kvs = json.loads(self.etcdctl("get", key, "-w", "json")).get("kvs") or []
        return kvs[0] if kvs else None

    def keys(self, prefix: str) -> list[str]:
        out = self.etcdctl("get", prefix, "--prefix", "--keys-only")
        return [line for line in out.splitlines() if line]

    def put(self, key: str, value: str) -> None:
        """A foreign writer: etcdctl put, as an operator or another flanneld would."""
        # "--" so that values starting with "-" are not taken for flags.
        self.etcdctl("put", "--", key, value)

    def delete(self, key: str) -> None:
        self.etcdctl("del", key)

    def revision(self) -> int:
        out = json.loads(self.etcdctl("get", "/", "--prefix", "--limit=1", "-w", "json"))
        return int(out["header"]["revision"])

    def compact(self, revision: int) -> None:
        self.etcdctl("compaction", str(revision))

    def leader(self) -> int:
        """Index of the member that is the Raft leader."""
        out = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))
        by_url = {s["Endpoint"]: s["Status"] for s in out}
        for i, m in enumerate(self.members):
            st = by_url.get(m.url)
            if st and st["header"]["member_id"] == st["leader"]:
                return i
        raise AssertionError(f"no leader among {self.urls}: {out}")

    def new_prefix(self) -> str:
        """A fresh flannel prefix, so tests sharing one etcd never see each other's keys."""
        prefix = f"/fxdp-test-{uuid.uuid4().hex[:10]}/coreos.com/network"
        self.prefixes.append(prefix)
        return prefix

    def wait_healthy(self, members: list[EtcdMember], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        pending = list(members)
        while pending:
            for m in list(pending):
                if not m.running:
                    pytest.fail(
                        f"etcd member {m.name} exited with {m.proc.returncode if m.proc else '?'} "
                        f"during start-up; its log:\n{m.log_tail()}"
                    )
                if m.healthy():
                    pending.remove(m)
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {m.name}:\n{m.log_tail()}" for m in pending)
                pytest.fail(
                    f"etcd members {[m.name for m in pending]} not healthy in "
                    f"{timeout:.0f} s:\n{tails}"
                )
            if pending:
                time.sleep(0.05)

    def close(self) -> None:
        for m in self.members:
            with contextlib.suppress(Exception):
                m.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _tmp_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _start_cluster(size: int, unix_socket: bool) -> EtcdCluster | None:
    """A healthy cluster; None when a chosen port was taken meanwhile (try again)."""
    tmpdir = tempfile.mkdtemp(prefix="fxdp-etcd-", dir=_tmp_root())
    ports = free_ports(2 * size)
    members = [
        EtcdMember(
            name=f"m{i}",
            client_port=ports[2 * i],
            peer_port=ports[2 * i + 1],
            workdir=os.path.join(tmpdir, f"m{i}"),
            unix_socket=unix_socket,
        )
        for i in range(size)
    ]
    cluster = EtcdCluster(members=members, tmpdir=tmpdir)
    try:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        token = f"fxdp-test-{uuid.uuid4().hex[:8]}"
        for m in members:
            m.start(initial, token)
        cluster.wait_healthy(members)
        return cluster
    except BaseException:  # pytest.fail is a BaseException too
        clash = any("address already in use" in m.log_tail(200) for m in members)
        cluster.close()
        if clash:
            return None
        raise


@contextlib.contextmanager
def etcd_cluster(size: int = 1, unix_socket: bool = False) -> Iterator[EtcdCluster]:
    """size etcd members on 127.0.0.1 (free ports), healthy; removed afterwards, always."""
    require_etcd()
    cluster = None
    for _ in range(3):
        cluster = _start_cluster(size, unix_socket)
        if cluster is not None:
            break
    if cluster is None:
        pytest.fail("etcd: the free ports chosen were taken by someone else, three times")
    try:
        yield cluster
    finally:
        cluster.close()
