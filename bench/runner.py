"""What one `make bench` run does: every workload, repetitions interleaved across variants.

For each workload, repetition r visits every variant in turn (A, B, C, ... then
again A, B, C, ...), so slow phases of a noisy machine spread over all variants;
a failed measurement is recorded with its error and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from flannel_xdp.lab.process import CommandError
from flannel_xdp.maps.libbpf import BpfError

from . import livepps, progcost, workloads
from .bpfprogs import EmptyPrograms, GeneratorCache
from .variants import VARIANT_NAMES, Bed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSettings:
    reps: int = 3
    seconds: float = 4.0  # per TCP, UDP and latency measurement
    udp_senders: int = 2
    live_frames: int = 1_000_000  # per udp64 and rx_pps measurement
    live_batch: int = livepps.DEFAULT_BATCH
    prog_calls: int = 20_000  # repeat=1 calls per single-method measurement
    prog_repeat: int = 1_000_000  # repeat count of a repeat-method measurement
    variants: tuple[str, ...] = VARIANT_NAMES
    workloads: tuple[str, ...] = ()  # empty: all
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides) -> BenchSettings:
        base = dict(reps=1, seconds=1.0, live_frames=100_000, prog_calls=2_000, prog_repeat=100_000)
        base.update(overrides)
        return cls(quick=True, **base)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    run: Callable[[Bed, BenchSettings, GeneratorCache], dict]
    warm_up: bool = True  # pods exchange a ping each way first (see workloads.warm_up)
    direct: bool = True  # also on the direct veth pair (needs no node)


WORKLOADS: tuple[Workload, ...] = (
    Workload("tcp1", "TCP, 1 stream", lambda b, s, g: workloads.tcp(b, s.seconds, 1)),
    Workload("tcp4", "TCP, 4 streams", lambda b, s, g: workloads.tcp(b, s.seconds, 4)),
    Workload(
        "udp64",
        "UDP 64 B live frames at the sender pod's veth, pod to pod",
        lambda b, s, g: livepps.measure_path(b, g, s.live_frames, s.live_batch),
        direct=False,  # injected at the sender pod's veth end in its node
    ),
    Workload(
        "udp64_iperf3",
        "UDP 64 B, iperf3 senders (sender-bound: for reference)",
        lambda b, s, g: workloads.udp64(b, s.seconds, s.udp_senders),
    ),
    Workload(
        "rx_pps",
        "UDP 64 B live frames at the receiver's underlay",
        lambda b, s, g: livepps.measure_rx(b, g, s.live_frames, s.live_batch),
        warm_up=False,  # injected at the receiver: no neighbour to resolve
        direct=False,  # injected at the receiving node's underlay
    ),
    Workload("latency", "sockperf ping-pong", lambda b, s, g: workloads.latency(b, s.seconds)),
    Workload(
        "crr",
        "new TCP connections: connect, 1 B request, 1 B reply, close",
        lambda b, s, g: workloads.crr(b, s.seconds),
    ),
)
WORKLOAD_KEYS = tuple(w.key for w in WORKLOADS)
# What a single measurement may fail with without ending the run.
MEASUREMENT_ERRORS = (
    workloads.WorkloadError,
    CommandError,
    subprocess.SubprocessError,
    OSError,
    BpfError,
    ValueError,
    KeyError,
)


@dataclass
class RawResults:
    # workload -> variant -> one dict per repetition (an "error" key when it failed)
    workloads: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    # case -> method -> one dict per repetition
    progcost: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    progcost_cases: list[progcost.CostCase] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _headline(key: str, result: dict) -> str:
    if "error" in result:
        return f"FAILED: {result['error'].splitlines()[0][:160]}"
    if key in ("tcp1", "tcp4"):
        return f"{result['gbps']:.2f} Gbit/s"
    if key == "udp64_iperf3":
        return f"{result['delivered_pps'] / 1e3:.0f} kpps (sent {result['sent_pps'] / 1e3:.0f})"
    if key in ("udp64", "rx_pps"):
        frac = result["delivered_fraction"] * 100
        return f"{result['delivered_pps'] / 1e3:.0f} kpps ({frac:.1f} % delivered)"
    if key == "latency":
        return f"p50 {result['p50_us']:.1f} us, p99 {result['p99_us']:.1f} us"
    if key == "crr":
        return f"{result['tps']:.0f} connections/s ({result['failed']} failed)"
    return ""


def interleaved(beds: list[Bed], wl: Workload, reps: int) -> Iterator[tuple[int, Bed]]:
    """(repetition from 1, bed) in the order runs are taken: each repetition visits every
    variant in turn, so a slow phase of the machine lands on all alike; the direct pair
    only for the workloads it runs."""
    for rep in range(1, reps + 1):
        for bed in beds:
            if not bed.variant.is_direct or wl.direct:
                yield rep, bed


def run_workloads(beds: list[Bed], settings: BenchSettings, raw: RawResults) -> None:
    selected = [w for w in WORKLOADS if not settings.workloads or w.key in settings.workloads]
    generators = GeneratorCache()
    try:
        for wl in selected:
            per_variant = raw.workloads.setdefault(wl.key, {})
            for rep, bed in interleaved(beds, wl, settings.reps):
                name = bed.variant.name
                t0 = time.monotonic()
                try:
                    lost = workloads.warm_up(bed) if wl.warm_up else 0
                    result = wl.run(bed, settings, generators)
                    if wl.warm_up:
                        result["warmup_pings_lost"] = lost
                except MEASUREMENT_ERRORS as exc:
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                    raw.errors.append(f"{wl.key} rep {rep} {name}: {result['error']}")
                    log.debug("%s %s failed", wl.key, name, exc_info=True)
                result["rep"] = rep
                result["took_s"] = round(time.monotonic() - t0, 2)
                per_variant.setdefault(name, []).append(result)
                _say(f"[{wl.key} {rep}/{settings.reps}] {name:<14} {_headline(wl.key, result)}")
    finally:
        generators.close()


def run_progcost(beds: list[Bed], settings: BenchSettings, raw: RawResults) -> None:
    with contextlib.ExitStack() as stack:
        empty = EmptyPrograms()
        stack.callback(empty.close)
        programs = progcost.Programs()
        stack.enter_context(programs.stack)
        cases = progcost.build_cases(beds, programs, empty)
        raw.progcost_cases = cases
        for rep in range(settings.reps):
            for bed in beds:
                if bed.variant.is_xdp:
                    workloads.resolve_underlay(bed)
            for case in cases:
                for method in case.methods:
                    try:
                        result = progcost.run_case(
                            case, method, settings.prog_calls, settings.prog_repeat
                        )
                    except BpfError as exc:
                        result = {"error": f"{type(exc).__name__}: {exc}"}
                    if "error" in result:
                        raw.errors.append(f"progcost {case.name} {method}: {result['error']}")
                    result["rep"] = rep + 1
                    raw.progcost.setdefault(case.name, {}).setdefault(method, []).append(result)
            _say(f"[progcost {rep + 1}/{settings.reps}] {len(cases)} cases measured")
