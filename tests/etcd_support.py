"""A real etcd (Debian's /usr/bin/etcd, 3.4) for the registry tests, on top of the
project's one etcd runner (flannel_xdp.lab.etcd).

``etcd_cluster()`` starts one member (or a 3-member cluster, for failover) on free
loopback ports with its data under a fresh temporary directory (on /dev/shm when
there is one: etcd fsyncs every write), waits until every member answers
/health, yields an EtcdCluster and always kills the members and removes the
directory afterwards, also when the test or the start-up failed. Each member
can also listen on a unix socket, reachable from any network namespace.

What is here is for tests only: failing (never skipping) with the reason, and reading
and writing keys with etcdctl rather than with the code under test. The members die
with pytest (``setpriv --pdeathsig KILL``). Nothing here needs root.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from flannel_xdp.lab.etcd import (
    ETCD,
    ETCDCTL,
    EtcdError,
    EtcdServer,
    ServerTls,
    free_ports,
    start_cluster,
)
from flannel_xdp.registry.etcd import Endpoint, EtcdRegistry, parse_endpoints

__all__ = ["EtcdCluster", "etcd_cluster", "free_ports", "require_etcd", "require_root"]


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


@dataclass
class EtcdCluster:
    members: list[EtcdServer]
    tmpdir: str
    prefixes: list[str] = field(default_factory=list)
    tls: ServerTls | None = None

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
        tls = []
        if self.tls is not None:
            t = self.tls
            tls = [f"--cacert={t.ca}", f"--cert={t.client_cert}", f"--key={t.client_key}"]
        result = subprocess.run(
            [ETCDCTL, f"--endpoints={urls}", "--command-timeout=5s", *tls, *args],
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

    def close(self) -> None:
        for m in self.members:
            with contextlib.suppress(Exception):
                m.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def _tmp_root() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextlib.contextmanager
def etcd_cluster(
    size: int = 1, unix_socket: bool = False, tls: ServerTls | None = None
) -> Iterator[EtcdCluster]:
    """size etcd members on 127.0.0.1 (free ports), healthy; removed afterwards, always.
    tls: clients must speak TLS with a certificate from tls.ca."""
    require_etcd()
    tmpdir = tempfile.mkdtemp(prefix="fxdp-etcd-", dir=_tmp_root())
    try:
        members = start_cluster(size, tmpdir, unix_socket=unix_socket, tls=tls)
    except EtcdError as exc:
        shutil.rmtree(tmpdir, ignore_errors=True)
        pytest.fail(str(exc))
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    cluster = EtcdCluster(members=members, tmpdir=tmpdir, tls=tls)
    try:
        yield cluster
    finally:
        cluster.close()
