"""A Kubernetes control plane for tests: one etcd and the real kube-apiserver, nothing else.

``KubeApiServer(workdir).start()`` makes, under workdir (all of it thrown away by stop()):

* with openssl, a CA, the apiserver's serving certificate (127.0.0.1 and localhost), an
  admin client certificate (``O=system:masters``: the bootstrap credential) and the
  service-account signing key, so that the TokenRequest API issues tokens
  (``token_for()``, what ``kubectl create token`` does) and RBAC can be tested with them;
* an etcd member on loopback (lab/etcd.py, the project's one etcd runner);
* kube-apiserver with RBAC on, listening on ``127.0.0.1:<free port>`` and advertising
  192.0.2.1 (it refuses a loopback advertise address for the ``kubernetes`` service
  endpoints; nothing ever connects to that address);
* ``admin.kubeconfig``, the admin credential as kubectl and the agent read it.

No kube-controller-manager or scheduler: a test sets a node's podCIDR itself. The binaries
are the Go-built peers of ``make peers`` (scripts/peers.sh --print-env).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from flannel_xdp import netns
from flannel_xdp.lab import peers, process
from flannel_xdp.lab.etcd import EtcdServer, free_port

log = logging.getLogger(__name__)

START_TIMEOUT = 90.0  # the first start on two cores compiles nothing but is slow to serve
ADVERTISE_ADDRESS = "192.0.2.1"
SERVICE_CIDR = "198.19.255.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "fxdp-admin"


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def relay(ns: str, port: int) -> socket.socket:
    """Listen on 127.0.0.1:port inside ns, forward each connection to 127.0.0.1:port here:
    the loopback-only apiserver, reached from a node's namespace at the same URL. Close
    the returned listener to stop it."""
    with netns.entered(ns):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)

    def serve() -> None:
        while True:
            try:
                inner, _ = listener.accept()
            except OSError:
                return
            try:
                outer = socket.create_connection(("127.0.0.1", port))
            except OSError:  # the apiserver is down: this client sees a closed connection
                inner.close()
                continue
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener


class KubeError(RuntimeError):
    pass


def peer_binary(key: str) -> str:
    """A Go-built peer's path (lab/peers.py); KubeError when `make peers` has not built it."""
    try:
        return peers.binary(key)
    except peers.PeersMissing as exc:
        raise KubeError(str(exc)) from exc


def _openssl(*args: str, cwd: str) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise KubeError(f"openssl {' '.join(args)} exited {res.returncode}: {res.stderr}")


def make_pki(pki: str) -> None:
    """CA, serving cert, admin client cert and the service-account key pair in pki/."""
    os.makedirs(pki, exist_ok=True)
    _openssl("genrsa", "-out", "ca.key", "2048", cwd=pki)
    _openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-days", "2", "-subj", "/CN=fxdp-test-ca",
        "-out", "ca.crt", cwd=pki,
    )  # fmt: skip
    for name, subj, ext in (
        (
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,IP:192.0.2.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
            "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
        ),
        (
            "admin",
            f"/O=system:masters/CN={ADMIN_USER}",
            "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
        ),
    ):
        Path(pki, f"{name}.ext").write_text(ext)
        _openssl("genrsa", "-out", f"{name}.key", "2048", cwd=pki)
        _openssl(
            "req", "-new", "-key", f"{name}.key", "-subj", subj, "-out", f"{name}.csr", cwd=pki
        )
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
            cwd=pki,
        )  # fmt: skip
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def kubeconfig_text(server: str, ca: str, *, cert: str = "", key: str = "", token: str = "") -> str:
    """A kubeconfig (JSON is YAML) with one cluster, one user and one context."""
    user: dict[str, str] = {}
    if cert:
        user = {"client-certificate": cert, "client-key": key}
    if token:
        user = {"token": token}
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "fxdp", "cluster": {"server": server, "certificate-authority": ca}}
            ],
            "users": [{"name": "fxdp", "user": user}],
            "contexts": [{"name": "fxdp", "context": {"cluster": "fxdp", "user": "fxdp"}}],
            "current-context": "fxdp",
        },
        indent=1,
    )


@dataclass
class KubeApiServer:
    workdir: str
    port: int = 0
    pid: int | None = None
    etcd: EtcdServer | None = None
    extra_args: list[str] = field(default_factory=list)
    detach: bool = False  # outlives the caller (lab up): found again by state()/from_state()

    def state(self) -> dict:
        return {"workdir": self.workdir, "port": self.port, "pid": self.pid}

    @classmethod
    def from_state(cls, d: dict, etcd: EtcdServer | None = None) -> KubeApiServer:
        return cls(d["workdir"], port=d["port"], pid=d["pid"], etcd=etcd, detach=True)

    @property
    def pki(self) -> str:
        return os.path.join(self.workdir, "pki")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> str:
        return os.path.join(self.pki, "ca.crt")

    @property
    def kubeconfig(self) -> str:
        """The admin kubeconfig (client certificate in group system:masters)."""
        return os.path.join(self.workdir, "admin.kubeconfig")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "kube-apiserver.log")

    def argv(self) -> list[str]:
        assert self.etcd is not None
        return [
            peer_binary("FXDP_KUBE_APISERVER"),
            f"--etcd-servers={self.etcd.url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--advertise-address={ADVERTISE_ADDRESS}",
            f"--tls-cert-file={self.pki}/apiserver.crt",
            f"--tls-private-key-file={self.pki}/apiserver.key",
            f"--client-ca-file={self.ca}",
            f"--service-account-key-file={self.pki}/sa.pub",
            f"--service-account-signing-key-file={self.pki}/sa.key",
            f"--service-account-issuer={ISSUER}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--cert-dir=" + os.path.join(self.workdir, "certs"),
            "--v=1",
            *self.extra_args,
        ]

    def start(self) -> None:
        """etcd, then the apiserver, then wait for /readyz; KubeError (with the log) when
        it does not come up. Everything started dies with the calling thread."""
        os.makedirs(self.workdir, exist_ok=True)
        if not os.path.exists(self.ca):
            make_pki(self.pki)
        if self.etcd is None:
            self.etcd = EtcdServer(os.path.join(self.workdir, "etcd"), unix_socket=False)
            self.etcd.start(detach=self.detach)
        Path(self.kubeconfig).parent.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self._spawn()
        Path(self.kubeconfig).write_text(
            kubeconfig_text(
                self.url,
                self.ca,
                cert=os.path.join(self.pki, "admin.crt"),
                key=os.path.join(self.pki, "admin.key"),
            )
        )
        self.wait_ready()

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as out:
            self._proc = process.start_daemon(
                self.argv(), out, cwd=self.workdir, detach=self.detach
            )
        self.pid = self._proc.pid

    def restart(self) -> None:
        """Stop the apiserver (not etcd) and start it again on the same port."""
        self.stop_apiserver()
        self.start_apiserver()

    def start_apiserver(self) -> None:
        """Start the apiserver again after stop_apiserver(), same port and etcd."""
        self._spawn()
        self.wait_ready()

    @property
    def running(self) -> bool:
        proc = getattr(self, "_proc", None)
        if proc is None:  # started by another process (lab up)
            return self.pid is not None and process.pid_alive(self.pid, self.workdir)
        return proc.poll() is None

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.load_cert_chain(
            os.path.join(self.pki, "admin.crt"), os.path.join(self.pki, "admin.key")
        )
        return ctx

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"{self.url}/readyz", timeout=2, context=self.ssl_context()
            ) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def api(self, method: str, path: str, obj: dict | None = None) -> dict:
        """One request to the API as the admin, without kubectl's start-up (for timing)."""
        req = urllib.request.Request(
            f"{self.url}{path}",
            method=method,
            data=json.dumps(obj).encode() if obj is not None else None,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ssl_context()) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise KubeError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from exc

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.running:
                raise KubeError(f"kube-apiserver exited during start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise KubeError(f"kube-apiserver not ready in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(line[:400].rstrip() + "\n" for line in f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop_apiserver(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is None:
            if self.pid is not None:
                process.kill_pid(self.pid, self.workdir, signal.SIGTERM)
                deadline = time.monotonic() + 15
                while process.pid_alive(self.pid, self.workdir) and time.monotonic() < deadline:
                    time.sleep(0.1)
                process.kill_pid(self.pid, self.workdir)
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self._proc = None

    def stop(self, *, clean: bool = True) -> None:
        """Stop the apiserver and etcd; clean: remove the workdir too."""
        self.stop_apiserver()
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None
        if clean:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- for tests, as an operator would do it ---------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        res = subprocess.run(
            [peer_binary("FXDP_KUBECTL"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and res.returncode != 0:
            raise KubeError(f"kubectl {' '.join(args)} exited {res.returncode}: {res.stderr}")
        return res.stdout + (res.stderr if not check else "")

    def apply(self, obj: dict) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def compact_etcd(self) -> int:
        """Compact etcd's history up to now (what the apiserver does every 5 minutes): a
        watch from an older resourceVersion then answers 410 Gone. Returns the revision."""
        assert self.etcd is not None
        status = json.loads(self.etcd.etcdctl("endpoint", "status", "-w", "json"))
        revision = int(status[0]["Status"]["header"]["revision"])
        self.etcd.etcdctl("compact", str(revision))
        return revision

    def token_for(self, service_account: str, namespace: str) -> str:
        """A bound token of a ServiceAccount (TokenRequest)."""
        return self.kubectl("create", "token", service_account, "-n", namespace).strip()

    def kubeconfig_for_token(self, token: str, path: str) -> str:
        Path(path).write_text(kubeconfig_text(self.url, self.ca, token=token))
        return path


def relay_argv(ns: str, port: int, marker: str) -> list[str]:
    """A relay (see relay()) as a process of its own, for a lab that outlives its maker;
    marker (the lab's run directory) names it in its command line."""
    return [sys.executable, "-m", "flannel_xdp.lab.kube", "relay", ns, str(port), marker]


def _relay_main(argv: list[str]) -> None:
    if len(argv) != 4 or argv[0] != "relay":
        raise SystemExit("usage: python -m flannel_xdp.lab.kube relay <netns> <port> <marker>")
    relay(argv[1], int(argv[2]))
    threading.Event().wait()


if __name__ == "__main__":
    _relay_main(sys.argv[1:])


__all__ = ["KubeApiServer", "KubeError", "kubeconfig_text", "peer_binary", "relay_argv"]
