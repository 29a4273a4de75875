"""Medians, ratios, the table for a person and results.json for a machine."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flannel_xdp.backend import Backend
from flannel_xdp.loader.datapath import IngressHook

from . import progcost
from .runner import WORKLOADS, BenchSettings, RawResults
from .variants import (
    VARIANTS,
    Variant,
    default_variant,
    direct_variant,
    fast_path_variant,
    flannel_xdp_variant,
    stock_variant,
)

SCHEMA = 1
VXLAN, HOST_GW = Backend.VXLAN, Backend.HOST_GW

# --- medians ---------------------------------------------------------------------------------


def _numeric(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def medians(raw: RawResults) -> dict[str, dict[str, dict[str, float]]]:
    """workload -> variant -> metric -> median over the successful repetitions, plus
    `reps_ok` and `spread` (max - min over median, per metric)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for wl, per_variant in raw.workloads.items():
        for variant, reps in per_variant.items():
            ok = [r for r in reps if "error" not in r]
            if not ok:
                continue
            keys = [k for k, v in ok[0].items() if _numeric(v) and k not in ("rep", "took_s")]
            summary: dict[str, float] = {"reps_ok": len(ok)}
            for key in keys:
                values = [r[key] for r in ok if _numeric(r.get(key))]
                if values:
                    med = statistics.median(values)
                    summary[key] = med
                    if med:
                        summary[f"{key}__spread"] = (max(values) - min(values)) / abs(med)
            out.setdefault(wl, {})[variant] = summary
    return out


def progcost_medians(raw: RawResults) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for case, methods in raw.progcost.items():
        for method, reps in methods.items():
            values = [r["ns"] for r in reps if "error" not in r]
            if values:
                out.setdefault(case, {})[method] = statistics.median(values)
    return out


# --- ratios ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RatioDef:
    name: str
    workload: str
    metric: str
    backend: Backend  # of the flannel-xdp variant (numerator)
    baseline: Backend  # of the stock variant (denominator)
    higher_is_better: bool = True
    headline: bool = True  # one of the named ratios the report leads with
    against_direct: bool = False  # the denominator is the direct veth pair, not stock

    def variants(self, hook: IngressHook | str) -> tuple[Variant, Variant]:
        if hook == AGENT_DEFAULT:
            xdp = default_variant(self.backend)
        elif hook == FAST_PATH:
            xdp = fast_path_variant(self.backend)
        else:
            xdp = flannel_xdp_variant(self.backend, IngressHook(hook))
        return xdp, direct_variant() if self.against_direct else stock_variant(self.baseline)


RATIOS: tuple[RatioDef, ...] = (
    RatioDef("vxlan_tcp_vs_flannel", "tcp1", "gbps", VXLAN, VXLAN),
    RatioDef("vxlan_tcp4_vs_flannel", "tcp4", "gbps", VXLAN, VXLAN),
    RatioDef("vxlan_udp64_pps_vs_flannel", "udp64", "delivered_pps", VXLAN, VXLAN),
    RatioDef("vxlan_rx_pps_vs_flannel", "rx_pps", "delivered_pps", VXLAN, VXLAN),
    RatioDef("vxlan_lat_p50_vs_flannel", "latency", "p50_us", VXLAN, VXLAN, False),
    RatioDef("vxlan_lat_p99_vs_flannel", "latency", "p99_us", VXLAN, VXLAN, False),
    RatioDef("hostgw_tcp_vs_kernel", "tcp1", "gbps", HOST_GW, HOST_GW),
    RatioDef("hostgw_udp64_pps_vs_kernel", "udp64", "delivered_pps", HOST_GW, HOST_GW),
    RatioDef("vxlan_tcp_vs_kernel_hostgw", "tcp1", "gbps", VXLAN, HOST_GW),
    RatioDef("vxlan_crr_vs_flannel", "crr", "tps", VXLAN, VXLAN),
    # beyond the headline ratios
    RatioDef("hostgw_tcp4_vs_kernel", "tcp4", "gbps", HOST_GW, HOST_GW, headline=False),
    RatioDef(
        "hostgw_rx_pps_vs_kernel", "rx_pps", "delivered_pps", HOST_GW, HOST_GW, headline=False
    ),
    RatioDef("hostgw_lat_p50_vs_kernel", "latency", "p50_us", HOST_GW, HOST_GW, False, False),
    RatioDef("hostgw_lat_p99_vs_kernel", "latency", "p99_us", HOST_GW, HOST_GW, False, False),
    RatioDef(
        "vxlan_softirq_per_gbit_vs_flannel",
        "tcp1",
        "softirq_cpu_s_per_gbit",
        VXLAN,
        VXLAN,
        False,
        False,
    ),
    RatioDef(
        "hostgw_softirq_per_gbit_vs_kernel",
        "tcp1",
        "softirq_cpu_s_per_gbit",
        HOST_GW,
        HOST_GW,
        False,
        False,
    ),
    RatioDef("hostgw_crr_vs_kernel", "crr", "tps", HOST_GW, HOST_GW, headline=False),
    RatioDef(
        "vxlan_tcp_vs_direct_veth",
        "tcp1",
        "gbps",
        VXLAN,
        VXLAN,
        headline=False,
        against_direct=True,
    ),
    RatioDef(
        "vxlan_tcp4_vs_direct_veth",
        "tcp4",
        "gbps",
        VXLAN,
        VXLAN,
        headline=False,
        against_direct=True,
    ),
)
# The ratio columns: each ingress hook, each backend's fast-path variant (vxlan: the
# kernel hook's; host-gw: the tc hook's), and what the agent runs by default here
# (variants.default_variant: one of the others, named for what it is).
FAST_PATH = "fast"
AGENT_DEFAULT = "default"
HOOKS: tuple[IngressHook | str, ...] = (*IngressHook, FAST_PATH, AGENT_DEFAULT)


@dataclass(frozen=True)
class Target:
    """What the agent's default data path should reach against its baseline."""

    ratio: str  # a RatioDef name
    bound: float  # at least this (higher is better) or at most (lower is better)


TARGETS: tuple[Target, ...] = (
    Target("vxlan_tcp_vs_flannel", 1.3),
    Target("vxlan_tcp4_vs_flannel", 1.5),
    Target("vxlan_udp64_pps_vs_flannel", 3.0),
    Target("vxlan_rx_pps_vs_flannel", 3.0),
    Target("vxlan_lat_p50_vs_flannel", 0.6),
    Target("vxlan_lat_p99_vs_flannel", 0.7),
    # the first packets of every flow take the stack: set-up must not get slower
    Target("vxlan_crr_vs_flannel", 1.0),
    Target("vxlan_softirq_per_gbit_vs_flannel", 0.5),
    Target("vxlan_tcp_vs_direct_veth", 0.9),
)


def _meets(ratio: float | None, t: Target, better: bool) -> bool | None:
    return None if ratio is None else ratio >= t.bound if better else ratio <= t.bound


def targets(ratios: dict[str, float], direct: dict[str, float] | None = None) -> dict[str, dict]:
    """Each target with the agent's default ratio and whether it is met (None: not run);
    with direct (direct_ratios()), also the direct veth pair's ratio against the same
    baseline and whether the pair itself meets the bound: where the pair is the testbed's
    limit (one stream, latency, CPU per Gbit) a target it misses is beyond any data path."""
    by_name = {r.name: r for r in RATIOS}
    out = {}
    for t in TARGETS:
        better = by_name[t.ratio].higher_is_better
        got = ratios.get(t.ratio)
        out[t.ratio] = {
            "bound": f"{'>=' if better else '<='} {t.bound:g}",
            "ratio": got,
            "met": _meets(got, t, better),
        }
        if direct is not None:
            pair = direct.get(t.ratio)
            out[t.ratio] |= {"direct_pair": pair, "direct_pair_meets": _meets(pair, t, better)}
    return out


def direct_ratios(med: dict) -> dict[str, float]:
    """The ratios against stock flannel as the direct veth pair scores them (in the place of
    flannel-xdp), for the workloads it runs: how far the testbed's physical limit goes."""
    direct = direct_variant()
    out: dict[str, float] = {}
    for r in RATIOS:
        if not r.against_direct:
            _put_ratio(out, med, r, direct, stock_variant(r.baseline))
    return out


BEST_HOOK_RULE = (
    "the hook with the highest geometric mean over the headline ratios that every "
    "hook has (latency ratios inverted, so higher is better throughout)"
)


def ratios_for_hook(med: dict, hook: IngressHook | str) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in RATIOS:
        _put_ratio(out, med, r, *r.variants(hook))
    return out


def _put_ratio(out: dict[str, float], med: dict, r: RatioDef, num: Variant, den: Variant) -> None:
    """out[r.name] = num's median of r's metric over den's, where both ran it."""
    a = med.get(r.workload, {}).get(num.name, {}).get(r.metric)
    b = med.get(r.workload, {}).get(den.name, {}).get(r.metric)
    if _numeric(a) and _numeric(b) and b:
        out[r.name] = a / b


def best_hook(by_hook: dict[str, dict[str, float]]) -> dict:
    by_hook = {h: r for h, r in by_hook.items() if h != AGENT_DEFAULT}  # one of the others
    headline = {r.name: r for r in RATIOS if r.headline}
    common = [n for n in headline if all(n in ratios for ratios in by_hook.values())]
    scores: dict[str, float] = {}
    for hook, ratios in by_hook.items():
        vals = [
            ratios[n] if headline[n].higher_is_better else 1 / ratios[n]
            for n in common
            if ratios[n] > 0
        ]
        if vals:
            scores[hook] = math.exp(statistics.fmean(math.log(v) for v in vals))
    if not scores:
        return {"hook": None, "rule": BEST_HOOK_RULE, "scores": {}, "over": common}
    best = max(scores, key=lambda h: scores[h])
    return {
        "hook": best,
        "rule": BEST_HOOK_RULE,
        "scores": scores,
        "over": common,
        "ratios": by_hook[best],
    }


def ratio_definitions() -> dict[str, str]:
    out = {}
    for r in RATIOS:
        xdp, base = r.variants(IngressHook.XDP)
        better = "higher is better" if r.higher_is_better else "lower is better"
        out[r.name] = (
            f"{r.workload}.{r.metric}: flannel-xdp {r.backend.value} "
            f"({xdp.name}, its other hooks' twins or the fast path's) / {base.name}; {better}"
        )
    out["prog_ns_vs_empty"] = (
        "ns per packet of each program on its typical packet / ns of the empty XDP program, "
        "same test-run method"
    )
    return out


def prog_ratios(summary: dict[str, dict]) -> dict[str, float]:
    """Per program (its typical packet) and per case (`program/packet`)."""
    out: dict[str, float] = {}
    for name, s in summary.items():
        if name == progcost.FLOOR or s["vs_empty"] is None:
            continue
        out[name] = s["vs_empty"]
        if s["typical"]:
            out[s["program"]] = s["vs_empty"]
    return out


# --- machine ---------------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str | None:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (res.stdout or res.stderr).strip()
    return text.splitlines()[0] if text else None


def _cpu_model() -> str | None:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _mem_total_gib() -> float | None:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def load_average() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def machine_info() -> dict:
    repo = Path(__file__).resolve().parent.parent
    commit = _first_line(["git", "-C", str(repo), "rev-parse", "HEAD"])
    dirty = _first_line(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    return {
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_gib": _mem_total_gib(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "iperf3": _first_line(["iperf3", "--version"]),
        "sockperf": _first_line(["sockperf", "--version"]),
        "git_commit": commit,
        "git_dirty": bool(dirty),
        "load_average_at_start": load_average(),
    }


# --- what limits each figure -----------------------------------------------------------------

LIMITS = {
    "tcp1": (
        "2 cores: the iperf3 sender and receiver each keep one busy (copies + the stack), "
        "and all softirq work shares them. Beyond that, how many packets a byte costs on "
        "the way: XDP on a veth underlay turns GSO off on its peer (the switch port), so "
        "the switch segments every super-packet and the XDP hook handles MTU-size frames "
        "(GRO on flannel.1 re-aggregates them before the pod); with the tc hook a "
        "decapsulated VXLAN aggregate keeps its UDP-tunnel GSO type and is segmented in "
        "software at cni0, so the pod gets MTU-size frames ('avg packet into the pod'); "
        "the kernel hook (the vxlan device decapsulates) and host-gw with the tc hook keep "
        "aggregates whole end to end, and then the copies and the TCP stack, the same for "
        "stock and flannel-xdp, set the figure (flannel-xdp's resized aggregates also carry "
        "SKB_GSO_DODGY, which each later transmit re-validates: ~1% of the CPU). The fast "
        "path (every variant runs with conntrack's TCP windows unchecked, which it needs) "
        "carries an established stream's aggregates from the sender pod's veth end to the "
        "receiving pod's netns: no bridge, routing, netfilter or vxlan device on either "
        "node, so the pods' own stacks and copies are what is left."
    ),
    "tcp4": "as TCP 1 stream; 4 streams on 2 cores add contention, not capacity.",
    "udp64": (
        "one CPU, no user-space sender: frames injected with BPF_PROG_TEST_RUN live frames "
        "at the sender pod's veth end run the whole pod-to-pod path (both nodes' data "
        "paths, to the receiving pod's UDP socket) on the injecting CPU, plus a ~100-byte "
        "template restore per frame that every variant pays alike."
    ),
    "udp64_iperf3": (
        "for reference only: CPU-bound on 2 cores shared by the iperf3 senders (one "
        "sendto() per datagram), the iperf3 readers and all softirq work; 'sent' and "
        "'delivered' are close, so the sender, not the data path, sets this figure."
    ),
    "rx_pps": (
        "one CPU, no sender: frames injected with BPF_PROG_TEST_RUN live frames run the "
        "whole receive path (eth0 to the pod's UDP socket) on the injecting CPU, plus a "
        "~150-byte template restore per frame that every variant pays alike."
    ),
    "latency": (
        "sockperf client and server pinned to one CPU (stable to a few percent; unpinned, "
        "cross-CPU wake-ups on this VM swing the median between ~25 and ~80 us); the "
        "figure is the round trip through both nodes' data paths plus two context "
        "switches; p99 still carries scheduler noise."
    ),
    "progcost": (
        "the kernel's test-run timer: ~100 ns per repeat=1 call (measured by the empty "
        "program alike), durations in 10 ns steps; repeat-method loops add ~20 ns of "
        "per-iteration overhead (bh disable/enable), also in the floor."
    ),
    "warm-up": (
        "before each TCP, UDP and latency run the pods ping each other once each way; a "
        "lost first ping is retried and counted (flannel-xdp host-gw loses the first "
        "packet to a peer whose neighbour entry the kernel has garbage-collected)."
    ),
    "crr": (
        "every connection's handshake and teardown take the stack on every data path (the "
        "fast path carries confirmed flows only); client and server pinned to one CPU, as "
        "for latency (unpinned, spreads of +-40 % were seen); bench/crr.py is Python, one "
        "blocking socket per transaction on each side, so the interpreter adds a fixed "
        "share to each transaction alike (netperf's TCP_CRR is not in Debian's main "
        "archive): compare variants within a run, not with netperf figures."
    ),
    "direct-veth": (
        "two pods on one veth pair at the vxlan pods' MTU with no node between them: the "
        "physical limit of this testbed (the same stacks, copies and veth hops less the "
        "nodes'); it runs the workloads that need no node (no live frames)."
    ),
    "cpu": (
        "machine-wide /proc/stat over each TCP run (both pods, both nodes, the tools); "
        "system time includes the socket copies, softirq the network path proper."
    ),
}


# --- results.json ----------------------------------------------------------------------------


def build_results(
    raw: RawResults,
    settings: BenchSettings,
    machine: dict,
    ran: list[str],
    broken: dict[str, str],
    runtime_s: float,
) -> dict:
    med = medians(raw)
    cost_med = progcost_medians(raw)
    cost = progcost.summarize(raw.progcost_cases, cost_med)
    by_hook = {str(h): ratios_for_hook(med, h) for h in HOOKS}
    default = dict(by_hook.get(AGENT_DEFAULT, {}))
    prog = prog_ratios(cost)
    # A hook competes only on the variants of its own that ran: host-gw under the kernel
    # hook is the tc hook's variant, so without xdp-vxlan-tc the tc hook has nothing of its own.
    headline = [r.name for r in RATIOS if r.headline]
    complete = {h: r for h, r in by_hook.items() if r and all(n in r for n in headline)}
    best = best_hook(complete or {h: r for h, r in by_hook.items() if r})
    if "ratios" in best:
        best["ratios"] = {**best["ratios"], "prog_ns_vs_empty": prog}
    machine = {**machine, "load_average_at_end": load_average()}
    return {
        "schema": SCHEMA,
        "machine": machine,
        "settings": settings.as_dict(),
        "runtime_s": round(runtime_s, 1),
        "variants": {v.name: v.as_dict() for v in VARIANTS if v.name in ran or v.name in broken},
        "variants_ran": ran,
        "variants_broken": broken,
        "workloads": {w.key: w.title for w in WORKLOADS},
        "raw": raw.workloads,
        "medians": med,
        "progcost": {
            "cases": {
                c.name: {
                    "program": c.program,
                    "methods": list(c.methods),
                    "expected_verdict": c.expect,
                    "typical": c.typical,
                    "frame_bytes": len(c.frame),
                    "description": c.description,
                }
                for c in raw.progcost_cases
            },
            "raw": raw.progcost,
            "medians": cost_med,
            "summary": cost,
        },
        # The headline ratios for what the agent runs by default on this machine (its
        # default ingress hook, with the fast path where the kernel has what it needs).
        "ratios": {**default, "prog_ns_vs_empty": prog},
        "ratios_variants": {b.value: default_variant(b).name for b in Backend},
        "targets": targets(default, direct_ratios(med)),
        "ratios_by_hook": by_hook,
        "best_hook": best,
        "ratio_definitions": ratio_definitions(),
        "limits": LIMITS,
        "errors": raw.errors,
    }


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# --- the table -------------------------------------------------------------------------------

ROWS: tuple[tuple[str, str, str, float, str], ...] = (
    ("TCP 1 stream, Gbit/s", "tcp1", "gbps", 1, "{:.2f}"),
    ("  avg packet into the pod, B", "tcp1", "pod_rx_avg_bytes", 1, "{:.0f}"),
    ("TCP 4 streams, Gbit/s", "tcp4", "gbps", 1, "{:.2f}"),
    ("  avg packet into the pod, B", "tcp4", "pod_rx_avg_bytes", 1, "{:.0f}"),
    ("UDP 64 B pod to pod, live frames, kpps", "udp64", "delivered_pps", 1e-3, "{:.0f}"),
    ("  delivered of injected, %", "udp64", "delivered_fraction", 100, "{:.1f}"),
    ("UDP 64 B iperf3 (sender-bound), kpps", "udp64_iperf3", "delivered_pps", 1e-3, "{:.0f}"),
    ("  sent by iperf3, kpps", "udp64_iperf3", "sent_pps", 1e-3, "{:.0f}"),
    ("RX 64 B live frames, kpps", "rx_pps", "delivered_pps", 1e-3, "{:.0f}"),
    ("  delivered of injected, %", "rx_pps", "delivered_fraction", 100, "{:.1f}"),
    ("Latency p50 RTT, us", "latency", "p50_us", 1, "{:.1f}"),
    ("Latency p99 RTT, us", "latency", "p99_us", 1, "{:.1f}"),
    ("TCP connections/s (connect, 1 B each way, close)", "crr", "tps", 1, "{:.0f}"),
    ("  softirq CPU us per connection", "crr", "softirq_cpu_us_per_conn", 1, "{:.1f}"),
    ("softirq CPU s/Gbit, TCP 1", "tcp1", "softirq_cpu_s_per_gbit", 1, "{:.3f}"),
    ("system CPU s/Gbit, TCP 1", "tcp1", "system_cpu_s_per_gbit", 1, "{:.3f}"),
    ("softirq CPU s/Gbit, TCP 4", "tcp4", "softirq_cpu_s_per_gbit", 1, "{:.3f}"),
    ("system CPU s/Gbit, TCP 4", "tcp4", "system_cpu_s_per_gbit", 1, "{:.3f}"),
)
NO_SPREAD = {"delivered_fraction", "pod_rx_avg_bytes"}


def _cell(summary: dict | None, metric: str, scale: float, fmt: str) -> str:
    if not summary or not _numeric(summary.get(metric)):
        return "n/a"
    text = fmt.format(summary[metric] * scale)
    spread = summary.get(f"{metric}__spread")
    if summary.get("reps_ok", 0) > 1 and spread is not None and metric not in NO_SPREAD:
        text += f" ±{spread * 50:.0f}%"
    return text


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def render(results: dict) -> str:
    ran: list[str] = results["variants_ran"]
    med = results["medians"]
    s = results["settings"]
    m = results["machine"]
    dirty = " (uncommitted changes)" if m["git_dirty"] else ""
    out = [
        f"flannel-xdp bench: kernel {m['kernel']}, {m['cpu_count']} x {m['cpu_model']}, "
        f"{m['date']}, commit {(m['git_commit'] or '?')[:10]}{dirty}",
        f"medians of {s['reps']} interleaved repetitions; {s['seconds']:g} s per TCP/UDP/"
        f"latency run, {s['live_frames']} live frames per udp64 and rx run; ±x% = half the "
        f"min-max spread; load average {m['load_average_at_start']} -> "
        f"{m['load_average_at_end']}; runtime {results['runtime_s']:.0f} s",
        "",
    ]
    rows = []
    for label, wl, metric, scale, fmt in ROWS:
        if wl not in med:  # not run (--workloads) or failed everywhere
            continue
        rows.append([label] + [_cell(med.get(wl, {}).get(v), metric, scale, fmt) for v in ran])
    rows.append(["warm-up first pings lost", *(_warmup_losses(results["raw"], v) for v in ran)])
    out += _grid(["workload", *ran], rows)

    by_hook = {h: r for h, r in results["ratios_by_hook"].items() if r}
    best = results["best_hook"]
    if by_hook:
        out += [
            "",
            "Ratios, flannel-xdp / stock (throughput: >1 is faster; latency, CPU: <1 is less)",
        ]
        rows = []
        for name in (r.name for r in RATIOS):
            if any(name in by_hook[h] for h in by_hook):
                cells = [
                    f"{by_hook[h][name]:.2f}" if name in by_hook[h] else "n/a" for h in by_hook
                ]
                rows.append([name + ("" if _is_headline(name) else " *"), *cells])
        out += _grid(["ratio", *(f"{h} hook" for h in by_hook)], rows)
        scores = ", ".join(f"{h} {v:.2f}" for h, v in best.get("scores", {}).items())
        defaults_ran = ", ".join(f"{b}: {v}" for b, v in results["ratios_variants"].items())
        out.append(
            f"default = what the agent runs by default on this machine ({defaults_ran}); "
            f"best hook: {best.get('hook')} ({scores}: geometric mean of the named ratios "
            "that every hook has, latency inverted)"
        )
        out.append("* not among the headline ratios")
        rows = [
            [
                name,
                t["bound"],
                f"{t['ratio']:.2f}" if t["ratio"] is not None else "n/a",
                {True: "met", False: "NOT met", None: "not run"}[t["met"]],
                _direct_pair_cell(t),
            ]
            for name, t in results["targets"].items()
        ]
        out += ["", "Targets, the agent's default data path"]
        out += _grid(["ratio", "target", "default", "met?", "direct pair"], rows)
        out.append(
            "direct pair: the same ratio scored by the two pods on one veth pair in "
            "flannel-xdp's place (no node, no program); misses: the pair itself does not "
            "reach the target"
        )
    else:
        out += ["", "No ratios: no flannel-xdp variant ran beside its stock baseline."]

    summary = results["progcost"]["summary"]
    if summary:
        out += ["", "Per-program cost, BPF_PROG_TEST_RUN (ns per packet)"]
        rows = []
        for name, c in summary.items():
            rows.append(
                [
                    name,
                    c["method"],
                    f"{c['ns']:.1f}",
                    f"{c['net_ns']:.1f}" if c["net_ns"] is not None else "n/a",
                    f"{c['vs_empty']:.2f}" if c["vs_empty"] is not None else "n/a",
                    f"{c['single_ns']:.1f}" if c["single_ns"] is not None else "-",
                    f"{c['repeat_ns']:.1f}" if c["repeat_ns"] is not None else "-",
                ]
            )
        out += _grid(
            ["program/packet", "method", "ns", "net ns", "vs empty", "single", "repeat"], rows
        )
        out.append(
            "single: repeat=1 calls (timer included, so is the floor's); repeat: one call, "
            "repeat count; vs empty = ns / empty_xdp ns by the same method"
        )

    out += ["", "What limits each figure:"]
    for key, text in results["limits"].items():
        out.append(f"  {key}: {text}")
    if results["variants_broken"]:
        out += ["", "Variants dropped:"]
        out += [f"  {v}: {why.splitlines()[0]}" for v, why in results["variants_broken"].items()]
    if results["errors"]:
        out += ["", f"{len(results['errors'])} measurement(s) failed:"]
        out += [f"  {e.splitlines()[0][:200]}" for e in results["errors"]]
    return "\n".join(out)


def _warmup_losses(raw: dict, variant: str) -> str:
    """Lost first pings over all warm-ups (two per measurement) of a variant."""
    runs = [r for reps in raw.values() for r in reps.get(variant, []) if "warmup_pings_lost" in r]
    return f"{sum(r['warmup_pings_lost'] for r in runs)}/{2 * len(runs)}"


def _direct_pair_cell(t: dict) -> str:
    pair = t.get("direct_pair")
    if pair is None:
        return "n/a"
    return f"{pair:.2f}" + ("" if t["direct_pair_meets"] else " (misses)")


def _is_headline(name: str) -> bool:
    return any(r.name == name and r.headline for r in RATIOS)
