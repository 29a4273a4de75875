"""Where a workload's CPU time goes, per data path: `perf record -a -g` around the
bench's own workloads on the bench's own clusters, symbols grouped by category.

python -m flannel_xdp.bench.profile --workloads tcp1,crr \\
    --only stock-vxlan,xdp-vxlan-fast,direct-veth [--reps 2] [--seconds 4] [--keep DIR]

Repetitions visit the variants interleaved, as `make bench` does. The machine is shared:
the shares are of the workload's own samples (its tools, the process running the lab,
ksoftirqd and softirqs taken on idle CPUs), with idle CPUs and other commands counted
apart; compare shares between variants, not absolute rates.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import crr
from .__main__ import _names, check_prerequisites
from .bpfprogs import GeneratorCache
from .procname import set_comm
from .runner import WORKLOADS, BenchSettings, Workload, interleaved
from .symbols import CATEGORY_NAMES, Profile, parse_report
from .variants import VARIANT_NAMES, Bed, Testbed, select
from .workloads import warm_up

PERF = "perf"
PROFILER_COMM = "fxb-profile"  # this process and the nodes' flow markers it runs
WORKLOAD_COMMS = frozenset({PROFILER_COMM, "iperf3", "sockperf", crr.CLIENT_COMM, crr.SERVER_COMM})
PERF_START_S = 1.0  # perf synthesises the running tasks before it samples
PERF_STOP_TIMEOUT_S = 120.0
# What one unit of work is, for the CPU per unit row: (result key, scale, unit).
WORK_UNITS = {
    "tcp1": ("gbit_transferred", 1.0, "Gbit"),
    "tcp4": ("gbit_transferred", 1.0, "Gbit"),
    "crr": ("transactions", 1e-3, "1000 connections"),
}
HEADLINE_KEYS = {"tcp1": "gbps", "tcp4": "gbps", "crr": "tps", "latency": "p50_us"}


@dataclass
class Run:
    variant: str
    rep: int
    result: dict
    profile: Profile

    @property
    def label(self) -> str:
        return f"{self.variant} r{self.rep}"


def perf_report(data: Path) -> str:
    argv = [PERF, "report", "-i", str(data), "--no-children", "--sort", "comm,sym", "-n"]
    argv += ["-g", "none", "-t", "|", "--stdio"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"perf report rc {res.returncode}: {res.stderr[-500:]}")
    return res.stdout


@contextlib.contextmanager
def recording(data: Path, freq: int) -> Iterator[None]:
    """perf record -a -g for the duration of the block."""
    argv = [PERF, "record", "-a", "-g", "-F", str(freq), "-o", str(data)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(PERF_START_S)
        if proc.poll() is not None:
            raise RuntimeError(f"perf record exited {proc.returncode}: {proc.stderr.read()[-500:]}")
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=PERF_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGINT):
        raise RuntimeError(f"perf record rc {proc.returncode}: {err[-500:]}")


def profile_run(
    bed: Bed,
    wl: Workload,
    rep: int,
    settings: BenchSettings,
    freq: int,
    keep: Path,
    generators: GeneratorCache,
) -> Run:
    data = keep / f"{wl.key}-{bed.variant.name}-{rep}.data"
    if wl.warm_up:
        warm_up(bed)
    with recording(data, freq):
        result = wl.run(bed, settings, generators)
    rows = parse_report(perf_report(data))
    return Run(bed.variant.name, rep, result, Profile.of(rows, WORKLOAD_COMMS))


def _work(run: Run, key: str, freq: int) -> str:
    if key not in WORK_UNITS:
        return "-"
    field_, scale, _unit = WORK_UNITS[key]
    units = run.result[field_] * scale
    return f"{run.profile.busy / freq * 1e3 / units:.1f}" if units else "-"


def render(key: str, runs: list[Run], freq: int, top: int) -> str:
    """The category table and the top symbols of one workload's runs."""
    head = ["category, % of the workload's CPU", *(r.label for r in runs)]
    lines = [head]
    cats = [c for c in CATEGORY_NAMES if any(r.profile.by_category[c] for r in runs)]
    for cat in cats:
        lines.append([cat, *(f"{r.profile.share(cat):.1f}" for r in runs)])
    comms = sorted({c for r in runs for c in r.profile.by_comm})
    for comm in comms:
        lines.append([f"  command {comm}", *(f"{r.profile.comm_share(comm):.1f}" for r in runs)])
    what = HEADLINE_KEYS.get(key)
    lines.append([f"result ({what})", *(f"{r.result.get(what, 0):.2f}" for r in runs)])
    unit = WORK_UNITS.get(key, ("", 0, "unit"))[2]
    lines.append([f"workload CPU ms per {unit}", *(_work(r, key, freq) for r in runs)])
    lines.append(["workload samples", *(str(r.profile.busy) for r in runs)])
    for name, attr in (("idle samples", "idle"), ("other commands' samples", "elsewhere")):
        lines.append([name, *(str(getattr(r.profile, attr)) for r in runs)])
    out = [f"== {key}: perf record -a -g -F {freq}, self samples (--no-children)", _table(lines)]
    mean = {
        sym: statistics.fmean(r.profile.symbol_share(sym) for r in runs)
        for sym in {s for r in runs for s in r.profile.by_symbol}
    }
    best = sorted(mean, key=mean.__getitem__, reverse=True)[:top]
    sym_lines = [["symbol, % of the workload's CPU", *(r.label for r in runs)]]
    sym_lines += [[s, *(f"{r.profile.symbol_share(s):.1f}" for r in runs)] for s in best]
    out.append(_table(sym_lines))
    return "\n\n".join(out)


def _table(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    fmt = [
        line[0].ljust(widths[0])
        + "  "
        + "  ".join(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))
        for line in lines
    ]
    return "\n".join([fmt[0], "-" * len(fmt[0]), *fmt[1:]])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    keys = tuple(w.key for w in WORKLOADS)
    p = argparse.ArgumentParser(prog="python -m flannel_xdp.bench.profile", description=__doc__)
    p.add_argument("--workloads", required=True, type=lambda t: _names(t, keys, "workload"))
    p.add_argument("--only", required=True, type=lambda t: _names(t, VARIANT_NAMES, "variant"))
    p.add_argument("--reps", type=int, default=2, help="profiles per variant (default 2)")
    p.add_argument("--seconds", type=float, default=4.0, help="per run (default 4)")
    p.add_argument("--freq", type=int, default=999, help="samples per second per CPU")
    p.add_argument("--top", type=int, default=15, help="symbols listed (default 15)")
    p.add_argument("--keep", type=Path, help="keep the perf.data files in this directory")
    args = p.parse_args(argv)
    if args.reps < 1 or args.seconds < 1 or args.freq < 1 or args.top < 0:
        p.error("--reps, --seconds and --freq must be at least 1, --top at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_prerequisites() or (
        None if shutil.which(PERF) else "perf is not installed (Debian: linux-perf)"
    )
    if problem:
        print(f"profile: {problem}", file=sys.stderr)
        return 2
    set_comm(PROFILER_COMM)  # before the lab's marker threads start: they inherit it
    settings = BenchSettings(seconds=args.seconds)
    chosen = [w for w in WORKLOADS if w.key in args.workloads]
    keep = args.keep or Path(tempfile.mkdtemp(prefix="fxb-profile-"))
    keep.mkdir(parents=True, exist_ok=True)
    generators = GeneratorCache()
    try:
        with Testbed(select(list(args.only))) as testbed:
            beds = testbed.ready()
            if testbed.broken:
                print(f"profile: dropped {testbed.broken}", file=sys.stderr)
            for wl in chosen:
                runs = []
                for rep, bed in interleaved(beds, wl, args.reps):
                    run = profile_run(bed, wl, rep, settings, args.freq, keep, generators)
                    print(f"[{wl.key} {rep}/{args.reps}] {run.label}", file=sys.stderr)
                    runs.append(run)
                print(render(wl.key, runs, args.freq, args.top) + "\n", flush=True)
    except KeyboardInterrupt:
        print("profile: interrupted; clusters torn down", file=sys.stderr)
        return 130
    finally:
        generators.close()
        if args.keep is None:
            shutil.rmtree(keep, ignore_errors=True)
    if args.keep:
        print(f"perf.data files: {keep} (perf report -i FILE --no-children --sort sym)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
