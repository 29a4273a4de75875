"""Smoke test of `make bench`: a --quick run produces every raw figure and ratio, and the
bench leaves no namespace or pin behind, also when interrupted.

Performance targets are not asserted: this machine is too noisy for that, and the
bench is what measures them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flannel_xdp.backend import Backend
from flannel_xdp.bench.report import RATIOS, TARGETS
from flannel_xdp.bench.runner import WORKLOAD_KEYS, WORKLOADS
from flannel_xdp.bench.variants import (
    DEFAULT_HOOK,
    default_variant,
    direct_variant,
    fast_path_variant,
    flannel_xdp_variant,
    stock_variant,
)
from flannel_xdp.lab.topology import BPFFS_ROOT
from tests.conftest import LAB_TOOLS
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.lab

# The variants the headline ratios need, with the default ingress hook, each backend's
# fast-path variant (the agent's default here), and the direct veth pair.
VARIANTS = [
    stock_variant(Backend.VXLAN).name,
    flannel_xdp_variant(Backend.VXLAN, DEFAULT_HOOK).name,
    fast_path_variant(Backend.VXLAN).name,
    stock_variant(Backend.HOST_GW).name,
    flannel_xdp_variant(Backend.HOST_GW, DEFAULT_HOOK).name,
    fast_path_variant(Backend.HOST_GW).name,
    direct_variant().name,
]
DIRECT = direct_variant().name
ON_DIRECT = {w.key for w in WORKLOADS if w.direct}
PROGRAMS = ("underlay_xdp", "underlay_tc", "tunnel_egress", "underlay_kd_fp", "pod_ingress")
# The fast path's cases on a TCP segment of a stream held open for them, per backend.
# The fast path's receiving build is the kernel hook's for vxlan, the tc hook's for host-gw.
FAST_TCP_CASES = [
    f"{program}/{backend}_{case}"
    for backend, build in (("vxlan", "underlay_kd_fp"), ("hostgw", "underlay_tc_fp"))
    for program, case in ((build, "fast_tcp_full"), ("pod_ingress", "fast_send_tcp_full"))
]
_PREFIX_LINE = re.compile(r"lab prefix (\S+)\)")


@pytest.fixture(scope="module", autouse=True)
def requirements() -> None:
    require_root_and_bcc(*LAB_TOOLS, "sockperf")


def bench_argv(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "flannel_xdp.bench", "--quick", "--out", str(out), *args]


def leftovers(prefix: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in listed.splitlines() if line.strip()]
    pins = os.listdir(BPFFS_ROOT) if os.path.isdir(BPFFS_ROOT) else []
    return [n for n in names + pins if n.startswith(prefix)]


def positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    res = subprocess.run(
        bench_argv(out, "--only", ",".join(VARIANTS)), capture_output=True, text=True, timeout=240
    )
    assert res.returncode == 0, f"bench failed ({res.returncode}):\n{res.stderr[-3000:]}"
    assert "Ratios" in res.stdout and "Per-program cost" in res.stdout, res.stdout
    return json.loads(out.read_text())


def test_every_workload_has_raw_figures_for_every_variant(quick_run: dict):
    assert quick_run["variants_ran"] == VARIANTS, quick_run["variants_broken"]
    assert quick_run["errors"] == []
    figure = {
        "tcp1": "gbps",
        "tcp4": "gbps",
        "udp64": "delivered_pps",
        "udp64_iperf3": "delivered_pps",
        "rx_pps": "delivered_pps",
        "latency": "p50_us",
        "crr": "tps",
    }
    assert set(figure) == set(WORKLOAD_KEYS)
    assert {"tcp1", "tcp4", "udp64_iperf3", "latency", "crr"} == ON_DIRECT
    for workload, metric in figure.items():
        for variant in VARIANTS:
            if variant == DIRECT and workload not in ON_DIRECT:
                assert variant not in quick_run["raw"][workload]
                continue
            reps = quick_run["raw"][workload][variant]
            assert len(reps) == 1, (workload, variant, reps)
            assert positive(reps[0].get(metric)), (workload, variant, reps[0])
            assert positive(quick_run["medians"][workload][variant][metric])
    for variant in VARIANTS:
        tcp = quick_run["raw"]["tcp1"][variant][0]
        assert tcp["cpu_seconds"]["softirq"] >= 0 and tcp["softirq_cpu_s_per_gbit"] is not None
        latency = quick_run["raw"]["latency"][variant][0]
        assert latency["p99_us"] >= latency["p50_us"]


def test_named_ratios_are_positive_numbers(quick_run: dict):
    ratios = quick_run["ratios"]
    named = [r.name for r in RATIOS if r.headline]
    assert len(named) == 10
    for name in named:
        assert positive(ratios.get(name)), (name, ratios)
    # the headline ratios are those of what the agent runs by default on this machine
    assert quick_run["ratios_variants"] == {
        b.value: default_variant(b).name for b in (Backend.VXLAN, Backend.HOST_GW)
    }
    assert quick_run["ratios_by_hook"]["default"] == {
        k: v for k, v in ratios.items() if k != "prog_ns_vs_empty"
    }
    assert positive(ratios.get("vxlan_tcp_vs_direct_veth"))
    for target in TARGETS:
        got = quick_run["targets"][target.ratio]
        assert positive(got["ratio"]) and got["met"] in (True, False), (target, got)
    # the pair runs one stream: its own ratio against stock stands beside the target's
    single = quick_run["targets"]["vxlan_tcp_vs_flannel"]
    assert positive(single["direct_pair"]) and single["direct_pair_meets"] in (True, False)
    best = quick_run["best_hook"]
    assert set(best["scores"]) == {DEFAULT_HOOK.value, "fast"}  # the hooks that ran
    assert best["hook"] == max(best["scores"], key=best["scores"].get)


def test_every_program_has_its_cost_beside_the_empty_floor(quick_run: dict):
    per_program = quick_run["ratios"]["prog_ns_vs_empty"]
    for program in PROGRAMS:
        assert positive(per_program.get(program)), (program, per_program)
    summary = quick_run["progcost"]["summary"]
    assert positive(summary["empty_xdp"]["ns"])
    for name, case in summary.items():
        assert positive(case["ns"]), (name, case)
        assert case["method"] in ("single", "repeat")
    assert set(FAST_TCP_CASES) <= set(summary), sorted(summary)


def test_the_quick_run_left_nothing_behind(quick_run: dict):
    prefix = quick_run["machine"]["lab_prefix"]
    assert prefix.startswith("fxb")
    assert leftovers(prefix) == []


def test_an_interrupted_run_removes_its_clusters(tmp_path: Path):
    out = tmp_path / "results.json"
    # A measurement far longer than the wait below: however slow the clusters come up on a
    # loaded machine, the interrupt lands while they run (with 10 s, a run on a busy
    # machine had finished before it).
    argv = bench_argv(out, "--only", VARIANTS[1], "--seconds", "120", "--workloads", "tcp1")
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    prefix = None
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            match = _PREFIX_LINE.search(line)
            if match:
                prefix = match.group(1)
                break
        assert prefix, "the bench did not announce its lab prefix"
        # Interrupt in the middle of the first measurement, clusters up and iperf3 running.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            n.startswith(prefix) for n in leftovers(prefix)
        ):
            time.sleep(0.2)
        assert leftovers(prefix), f"no cluster of {prefix} came up within 30 s"
        time.sleep(4)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert leftovers(prefix) == []
    assert not out.exists()
