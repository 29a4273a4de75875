"""Pod-to-pod workloads across nodes: TCP throughput, UDP 64-byte packet rate, latency,
new TCP connections per second.

Traffic always goes from the pod on node 0 to the pod on node 1 (the receiver), so
node 0 encapsulates (or forwards) and node 1 decapsulates (or delivers). Offloads stay
at their defaults, as the lab leaves them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from flannel_xdp import netns
from flannel_xdp.lab import Pod, process, traffic
from flannel_xdp.lab.topology import POD_IFNAME

from .variants import Bed

IPERF_PORT = 5201
SOCKPERF_PORT = 11111
CRR_PORT = 5301
UDP_PAYLOAD = 64


class WorkloadError(RuntimeError):
    """A tool failed or printed nothing usable; the message says what it printed."""


# --- CPU time from /proc/stat --------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


@dataclass(frozen=True)
class CpuTimes:
    """Machine-wide CPU seconds by kind (the first line of /proc/stat)."""

    seconds: dict[str, float]

    @classmethod
    def now(cls) -> CpuTimes:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1 : 1 + len(_STAT_FIELDS)]
        return cls({k: int(v) / _CLK_TCK for k, v in zip(_STAT_FIELDS, fields, strict=True)})

    def since(self, before: CpuTimes) -> dict[str, float]:
        return {k: round(v - before.seconds[k], 3) for k, v in self.seconds.items()}


# --- helpers ---------------------------------------------------------------------------------


def wait_listening(pod: Pod, port: int, proto: str = "t", timeout: float = 5.0) -> None:
    if not traffic.wait_listening(pod.netns, port, proto, timeout):
        raise WorkloadError(f"nothing listens on {pod.ip}:{port} ({proto}) after {timeout} s")


@contextmanager
def servers(pod: Pod, argvs: list[list[str]], ports: list[int], proto: str) -> Iterator[None]:
    """Servers started in pod, listening before the block runs, killed after it."""
    procs = [process.spawn(pod.netns, argv) for argv in argvs]
    try:
        for port in ports:
            wait_listening(pod, port, proto)
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            with suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)


def link_counters(ns: str, ifname: str) -> tuple[int, int]:
    """(rx packets, rx bytes) of ifname in netns ns, from /proc/net/dev."""
    with netns.entered(ns), open("/proc/thread-self/net/dev") as f:
        for line in f:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == ifname:
                fields = rest.split()
                return int(fields[1]), int(fields[0])
    raise WorkloadError(f"no interface {ifname} in {ns}")


def warm_up(bed: Bed) -> int:
    """One ping each way before a measurement, so that no neighbour resolution happens
    inside it; returns how many of the two first pings were lost (each lost one is
    retried once; a loss that persists raises)."""
    lost = 0
    for src, dst in ((bed.sender, bed.receiver), (bed.receiver, bed.sender)):
        argv = ["ping", "-n", "-c", "1", "-W", "1", str(dst.ip)]
        if process.run(src.netns, argv, check=False).returncode != 0:
            lost += 1
            process.run(src.netns, argv)  # CommandError if the path is really down
    return lost


def resolve_underlay(bed: Bed) -> None:
    """Have both nodes resolve each other's underlay address through the kernel, so that
    the programs' FIB lookups find a valid neighbour (per-program cost measurements)."""
    for src, dst in ((bed.sender_node, bed.receiver_node), (bed.receiver_node, bed.sender_node)):
        argv = ["ping", "-n", "-c", "1", "-W", "1", str(dst.public_ip)]
        process.run(src.netns, argv, check=False)


def udp_counters(ns: str) -> dict[str, int]:
    """The Udp line of /proc/net/snmp in netns ns."""
    with netns.entered(ns), open("/proc/thread-self/net/snmp") as f:
        lines = [line.split() for line in f if line.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


def _iperf_json(res: subprocess.CompletedProcess[str], what: str) -> dict:
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise WorkloadError(
            f"{what}: iperf3 rc {res.returncode}, no JSON: {res.stdout[-300:]} {res.stderr[-300:]}"
        ) from None
    if res.returncode != 0 or "error" in report:
        raise WorkloadError(f"{what}: iperf3 rc {res.returncode}: {report.get('error')}")
    return report


# --- TCP --------------------------------------------------------------------------------------


def tcp(bed: Bed, seconds: float, streams: int) -> dict:
    """iperf3 TCP pod to pod; Gbit/s as received, CPU seconds per Gbit over the run."""
    client, server = bed.sender, bed.receiver
    argv = ["iperf3", "-s", "-1", "-B", str(server.ip), "-p", str(IPERF_PORT)]
    with servers(server, [argv], [IPERF_PORT], "t"):
        cmd = ["iperf3", "-c", str(server.ip), "-p", str(IPERF_PORT), "-t", f"{seconds:g}"]
        cmd += ["-P", str(streams), "-J", "--connect-timeout", "3000"]
        rx0 = link_counters(server.netns, POD_IFNAME)
        cpu0, t0 = CpuTimes.now(), time.monotonic()
        res = process.run(client.netns, cmd, check=False, timeout=seconds + 30)
        cpu, wall = CpuTimes.now().since(cpu0), time.monotonic() - t0
        rx1 = link_counters(server.netns, POD_IFNAME)
    end = _iperf_json(res, f"TCP x{streams}")["end"]
    received = end["sum_received"]
    gbits = received["bytes"] * 8 / 1e9
    rx_packets, rx_bytes = rx1[0] - rx0[0], rx1[1] - rx0[1]
    return {
        "gbps": received["bits_per_second"] / 1e9,
        "sender_gbps": end["sum_sent"]["bits_per_second"] / 1e9,
        "retransmits": end["sum_sent"].get("retransmits"),
        "gbit_transferred": gbits,
        "seconds": received["seconds"],
        "wall_seconds": round(wall, 3),
        "cpu_seconds": cpu,
        "softirq_cpu_s_per_gbit": cpu["softirq"] / gbits if gbits else None,
        "system_cpu_s_per_gbit": cpu["system"] / gbits if gbits else None,
        "iperf3_cpu_percent": end.get("cpu_utilization_percent"),
        # Packets as the receiving pod's eth0 gets them: ~MTU when something on the way
        # segmented the aggregates, tens of KB when GRO/GSO kept them whole.
        "pod_rx_packets": rx_packets,
        "pod_rx_avg_bytes": rx_bytes / rx_packets if rx_packets else None,
    }


# --- UDP 64-byte packets -------------------------------------------------------------------


def udp64(bed: Bed, seconds: float, senders: int) -> dict:
    """Several iperf3 UDP senders (64-byte payload, no rate limit, one process and port
    each) to as many iperf3 servers in the receiving pod. The figure is what reached the
    receiving pod's UDP sockets, from its /proc/net/snmp: datagrams read by the servers
    (InDatagrams) plus those the full socket buffers dropped (RcvbufErrors)."""
    client, server = bed.sender, bed.receiver
    ports = [IPERF_PORT + i for i in range(senders)]
    argvs = [["iperf3", "-s", "-1", "-B", str(server.ip), "-p", str(p)] for p in ports]
    with servers(server, argvs, ports, "t"):
        before = udp_counters(server.netns)
        cmds = [
            [
                *("iperf3", "-c", str(server.ip), "-p", str(p), "-u", "-l", str(UDP_PAYLOAD)),
                *("-b", "0", "-t", f"{seconds:g}", "-J", "--connect-timeout", "3000"),
            ]
            for p in ports
        ]
        procs = [process.spawn(client.netns, cmd) for cmd in cmds]
        results = []
        for cmd, proc in zip(cmds, procs, strict=True):
            try:
                out, err = proc.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
        time.sleep(0.2)  # let the servers drain their sockets
        after = udp_counters(server.netns)
    reports = [_iperf_json(r, "UDP 64 B")["end"]["sum"] for r in results]
    duration = sum(r["seconds"] for r in reports) / len(reports)
    delta = {k: after[k] - before[k] for k in after}
    delivered = delta["InDatagrams"] + delta["RcvbufErrors"]
    sent = sum(r["packets"] for r in reports)
    return {
        "delivered_pps": delivered / duration,
        "sent_pps": sent / duration,
        "delivered": delivered,
        "sent": sent,
        "read_by_servers": delta["InDatagrams"],
        "rcvbuf_errors": delta["RcvbufErrors"],
        "csum_errors": delta.get("InCsumErrors", 0),
        "no_ports": delta["NoPorts"],
        "senders": senders,
        "seconds": duration,
    }


# --- latency ------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PERCENTILE = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_AVG = re.compile(r"avg-(?:latency|rtt)=([\d.]+)")
_OBS = re.compile(r"Total\s+(\d+)\s+observations")


def parse_sockperf(text: str) -> dict:
    text = _ANSI.sub("", text)
    pct = {float(p): float(v) for p, v in _PERCENTILE.findall(text)}
    if 50.0 not in pct or 99.0 not in pct:
        raise WorkloadError(f"sockperf printed no percentiles: {text[-500:]}")
    avg, obs = _AVG.search(text), _OBS.search(text)
    return {
        "p50_us": pct[50.0],
        "p99_us": pct[99.0],
        "p99_9_us": pct.get(99.9),
        "avg_us": float(avg.group(1)) if avg else None,
        "observations": int(obs.group(1)) if obs else None,
    }


def latency_cpu() -> int:
    return (os.cpu_count() or 1) - 1


def latency(bed: Bed, seconds: float) -> dict:
    """sockperf ping-pong, UDP 64-byte messages; round-trip times in microseconds.

    Client and server are pinned to the same CPU: unpinned, the scheduler sometimes puts
    them on one CPU and sometimes on two, and the cross-CPU wake-ups of this VM make the
    median jump between ~25 and ~80 us from one run to the next (seen: +-40 % spread);
    pinned, repetitions agree within a few percent and the path's cost shows.
    """
    client, server = bed.sender, bed.receiver
    pin = ["taskset", "-c", str(latency_cpu())]
    argv = [*pin, "sockperf", "sr", "-i", str(server.ip), "-p", str(SOCKPERF_PORT)]
    with servers(server, [argv], [SOCKPERF_PORT], "u"):
        cmd = [*pin, "sockperf", "pp", "-i", str(server.ip), "-p", str(SOCKPERF_PORT)]
        cmd += ["-m", "64", "-t", f"{max(1, round(seconds))}", "--full-rtt"]
        res = process.run(client.netns, cmd, check=False, timeout=seconds + 30)
    if res.returncode != 0:
        raise WorkloadError(f"sockperf rc {res.returncode}: {res.stderr[-300:]}")
    result = parse_sockperf(res.stdout + res.stderr)
    result["cpu"] = latency_cpu()
    return result


# --- new TCP connections -------------------------------------------------------------------


def crr(bed: Bed, seconds: float) -> dict:
    """TCP connect, 1-byte request and reply, close, back to back (bench/crr.py): the
    first packets of every flow take the stack on every data path (the fast path only
    carries confirmed flows), so this is what connection set-up costs. Client and server
    share one CPU, as in latency()."""
    client, server = bed.sender, bed.receiver
    # pinned as latency() pins sockperf, for the same reason: repeatable figures
    tool = ["taskset", "-c", str(latency_cpu()), sys.executable, "-m", "flannel_xdp.bench.crr"]
    with servers(server, [[*tool, "server", str(server.ip), str(CRR_PORT)]], [CRR_PORT], "t"):
        cmd = [*tool, "client", str(server.ip), str(CRR_PORT), f"{seconds:g}"]
        cpu0 = CpuTimes.now()
        res = process.run(client.netns, cmd, check=False, timeout=seconds + 30)
        cpu = CpuTimes.now().since(cpu0)
    try:
        result = json.loads(res.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise WorkloadError(
            f"crr rc {res.returncode}, no JSON: {res.stdout[-300:]} {res.stderr[-300:]}"
        ) from None
    if res.returncode != 0 or not result["transactions"]:
        raise WorkloadError(f"crr rc {res.returncode}: {result}")
    result["softirq_cpu_us_per_conn"] = cpu["softirq"] / result["transactions"] * 1e6
    return result
