"""Traffic between lab namespaces: ping, payload-checked TCP and UDP, iperf3.

A probe server per endpoint (one Python process: a threaded TCP server that hashes
what it receives and answers with the sha256, the byte count, the largest segment
seen and the peer address it saw; a UDP echo on the same port) and one probe client
per source that runs its checks against every destination in turn, so a whole
cluster is checked with a handful of processes.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from flannel_xdp import netns
from flannel_xdp.lab import process

PROBE_PORT = 7500
IPERF_PORT = 5201

PROBE_SERVER = r"""
import hashlib, json, socket, socketserver, struct, sys, threading
ip, port = sys.argv[1], int(sys.argv[2])

class Tcp(socketserver.BaseRequestHandler):
    def handle(self):
        c = self.request
        c.settimeout(30)
        head = b""
        while len(head) < 8:
            chunk = c.recv(8 - len(head))
            if not chunk:
                return
            head += chunk
        want, got, digest = struct.unpack("!Q", head)[0], 0, hashlib.sha256()
        while got < want:
            chunk = c.recv(min(1 << 16, want - got))
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
        info = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        reply = {"bytes": got, "sha256": digest.hexdigest(), "peer": self.client_address[0],
                 "rcv_mss": struct.unpack_from("I", info, 20)[0]}
        c.sendall(json.dumps(reply).encode())

class Udp(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(data, self.client_address)

class TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

class UdpServer(socketserver.UDPServer):
    allow_reuse_address = True
    max_packet_size = 65535

tcp, udp = TcpServer((ip, port), Tcp), UdpServer((ip, port), Udp)
threading.Thread(target=udp.serve_forever, daemon=True).start()
print("ready", flush=True)
tcp.serve_forever()
"""

PROBE_CLIENT = r"""
import hashlib, json, random, socket, struct, sys, time
port, size, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
udp_sizes = json.loads(sys.argv[4])
results = []
for n, dst in enumerate(sys.argv[5:]):
    out = {"dst": dst}
    data = random.Random(seed + n).randbytes(size)
    try:
        started = time.monotonic()
        s = socket.create_connection((dst, port), timeout=5)
        s.settimeout(30)
        s.sendall(struct.pack("!Q", size) + data)
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        s.close()
        got = json.loads(reply)
        out["tcp"] = {
            "ok": got["bytes"] == size and got["sha256"] == hashlib.sha256(data).hexdigest(),
            "seconds": time.monotonic() - started,
            "snd_mss": struct.unpack_from("I", info, 16)[0],
            **got,
        }
    except (OSError, ValueError) as exc:
        out["tcp"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(1.0)
    udp = {}
    for i, n_bytes in enumerate(udp_sizes):
        payload = random.Random(seed * 1000 + i).randbytes(n_bytes)
        outcome = "lost"
        for _ in range(3):
            try:
                u.sendto(payload, (dst, port))
                echoed, _ = u.recvfrom(65535)
            except OSError:
                continue
            outcome = "intact" if echoed == payload else "corrupt"
            break
        udp[str(n_bytes)] = outcome
    u.close()
    out["udp"] = udp
    results.append(out)
print(json.dumps(results))
"""


class TrafficError(RuntimeError):
    pass


def start_probe_server(ns: str, ip: str, port: int = PROBE_PORT) -> subprocess.Popen[str]:
    """The probe server on ip:port in ns; returns once it listens."""
    proc = process.spawn(ns, [sys.executable, "-c", PROBE_SERVER, ip, str(port)])
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise TrafficError(f"probe server in {ns} did not start: {line!r} {err}")
    return proc


def stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            p.communicate(timeout=5)


def probe(
    ns: str,
    targets: Sequence[str],
    *,
    size: int = 1 << 20,
    udp_sizes: Sequence[int] = (1, 512, 1400),
    seed: int = 1,
    port: int = PROBE_PORT,
    timeout: float = 120.0,
) -> list[dict]:
    """From ns, a TCP transfer of size seeded bytes (checked by sha256 on the far side)
    and UDP echoes of udp_sizes to every target; one result dict per target."""
    argv = [sys.executable, "-c", PROBE_CLIENT, str(port), str(size), str(seed)]
    argv += [json.dumps(list(udp_sizes)), *targets]
    res = process.run(ns, argv, check=False, timeout=timeout)
    if res.returncode != 0:
        raise TrafficError(f"probe client in {ns} failed: {res.stderr.strip()}")
    return json.loads(res.stdout)


def probe_ok(result: dict) -> bool:
    return bool(result["tcp"].get("ok")) and all(v == "intact" for v in result["udp"].values())


def probe_problem(result: dict) -> str:
    tcp = result["tcp"]
    if not tcp.get("ok"):
        return f"TCP: {tcp.get('error') or 'payload mismatch'}"
    bad = {k: v for k, v in result["udp"].items() if v != "intact"}
    return f"UDP: {bad}" if bad else ""


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    rtt_avg_ms: float | None
    output: str

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent

    @property
    def lost(self) -> int:
        return self.sent - self.received


_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")
_RTT = re.compile(r"= [\d.]+/([\d.]+)/")


def parse_ping(output: str) -> PingResult:
    m = _SUMMARY.search(output)
    rtt = _RTT.search(output)
    sent, received = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return PingResult(sent, received, float(rtt.group(1)) if rtt else None, output)


def ping_argv(dst: str, count: int = 3, interval: float = 0.2, wait: float = 2.0) -> list[str]:
    return ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait), dst]


def ping(ns: str, dst: str, count: int = 3, interval: float = 0.2) -> PingResult:
    res = process.run(
        ns, ping_argv(dst, count, interval), check=False, timeout=count * interval + 30
    )
    return parse_ping(res.stdout + res.stderr)


def ping_many(jobs: Sequence[tuple[str, str]], count: int = 3) -> list[PingResult]:
    """(ns, dst) pings, all at once; results in the order of jobs."""
    procs = [process.spawn(ns, ping_argv(dst, count)) for ns, dst in jobs]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=count + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate(timeout=5)
        out.append(parse_ping(stdout + stderr))
    return out


def listening(ns: str, port: int, proto: str = "t") -> bool:
    """Whether a socket listens on port in ns (proto "t": TCP, "u": UDP)."""
    res = process.run(ns, ["ss", f"-Hl{proto}n", f"sport = :{port}"], check=False)
    return bool(res.stdout.strip())


def wait_listening(ns: str, port: int, proto: str = "t", timeout: float = 5.0) -> bool:
    """Wait until something listens on port in ns; False when timeout passed first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(ns, port, proto):
            return True
        time.sleep(0.05)
    return False


def start_iperf3_server(ns: str, ip: str, port: int = IPERF_PORT) -> subprocess.Popen[str]:
    proc = process.spawn(ns, ["iperf3", "-s", "-B", ip, "-p", str(port)])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if listening(ns, port):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise TrafficError(f"iperf3 server in {ns} did not start: {proc.communicate()[1]}")


def iperf3(ns: str, dst: str, nbytes: int = 64 << 20, port: int = IPERF_PORT) -> float:
    """TCP throughput (bit/s) of sending nbytes from ns to dst with iperf3."""
    argv = ["iperf3", "-c", dst, "-p", str(port), "-n", str(nbytes), "-J"]
    argv += ["--connect-timeout", "3000"]
    for attempt in range(3):
        res = process.run(ns, argv, check=False, timeout=60)
        report = json.loads(res.stdout) if res.stdout.strip() else {}
        if res.returncode == 0 and "error" not in report:
            return float(report["end"]["sum_received"]["bits_per_second"])
        error = report.get("error") or res.stderr.strip()
        if "busy" not in str(error) or attempt == 2:
            raise TrafficError(f"iperf3 {ns} -> {dst}: {error}")
        time.sleep(0.2)
    raise AssertionError("unreachable")


__all__ = [
    "IPERF_PORT",
    "PROBE_PORT",
    "PingResult",
    "TrafficError",
    "iperf3",
    "parse_ping",
    "ping",
    "ping_argv",
    "ping_many",
    "probe",
    "probe_many",
    "probe_ok",
    "probe_problem",
    "start_iperf3_server",
    "start_probe_server",
    "stop",
]


def probe_many(jobs: Sequence[tuple[str, Sequence[str]]], **kwargs) -> list[list[dict]]:
    """probe() from several namespaces at once: jobs are (ns, targets); results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        futures = [
            pool.submit(probe, ns, targets, seed=i + 1, **kwargs)
            for i, (ns, targets) in enumerate(jobs)
        ]
        return [f.result() for f in futures]


@contextlib.contextmanager
def udp_socket(
    ns: str, ip: str, port: int = 0, *, timeout: float | None = None, reuse_addr: bool = False
) -> Iterator[socket.socket]:
    """A UDP socket of netns ns (it stays there), bound to ip:port, closed after the block."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with contextlib.closing(sock):
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.settimeout(timeout)
        yield sock
