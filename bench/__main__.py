"""`make bench`: python -m flannel_xdp.bench [--quick] [--reps N] [--seconds S]
[--only VARIANTS] [--out PATH]."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from flannel_xdp.lab import peers

from . import report
from .runner import WORKLOAD_KEYS, BenchSettings, RawResults, run_progcost, run_workloads
from .variants import VARIANT_NAMES, Testbed, select

DEFAULT_OUT = Path(__file__).resolve().parent / "results.json"
TOOLS = ("ip", "nsenter", "ethtool", "ping", "ss", "taskset", "iperf3", "sockperf")


def _names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {unknown or text!r}; choose from {', '.join(known)}"
        )
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flannel_xdp.bench",
        description="Stock flannel vs flannel-xdp (VXLAN and host-gw, XDP and tc ingress) "
        "on the lab's two-node testbed: TCP, UDP 64 B packet rate, receive packet rate, "
        "latency, per-program cost and CPU per Gbit.",
    )
    p.add_argument("--quick", action="store_true", help="1 repetition, short runs (smoke test)")
    p.add_argument("--reps", type=int, help="repetitions per variant and workload (default 3)")
    p.add_argument("--seconds", type=float, help="seconds per TCP/UDP/latency run (default 4)")
    p.add_argument(
        "--only",
        type=lambda t: _names(t, VARIANT_NAMES, "variant"),
        help=f"comma-separated variants (default all: {','.join(VARIANT_NAMES)})",
    )
    p.add_argument(
        "--workloads",
        type=lambda t: _names(t, WORKLOAD_KEYS, "workload"),
        help=f"comma-separated workloads (default all: {','.join(WORKLOAD_KEYS)})",
    )
    p.add_argument("--no-progcost", action="store_true", help="skip the per-program costs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    p.add_argument("-v", "--verbose", action="store_true", help="log lab set-up and teardown")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    if args.seconds is not None and args.seconds < 1:
        p.error("--seconds must be at least 1")
    return args


def settings_from(args: argparse.Namespace) -> BenchSettings:
    overrides: dict = {}
    if args.reps is not None:
        overrides["reps"] = args.reps
    if args.seconds is not None:
        overrides["seconds"] = args.seconds
    if args.only:
        overrides["variants"] = tuple(args.only)
    if args.workloads:
        overrides["workloads"] = tuple(args.workloads)
    return BenchSettings.quick_settings(**overrides) if args.quick else BenchSettings(**overrides)


def check_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "the bench needs root (network namespaces, BPF): run `make bench` as root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools {missing}: run `make setup`"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable: run `make setup` (Debian python3-bpfcc in the venv)"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    problem = check_prerequisites()
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    settings = settings_from(args)
    variants = select(list(settings.variants))
    machine = report.machine_info()
    raw = RawResults()
    t0 = time.monotonic()
    testbed = Testbed(variants)
    print(
        f"bench: bringing up {len(variants)} clusters (lab prefix {testbed.prefix})",
        file=sys.stderr,
        flush=True,
    )
    try:
        with testbed:
            beds = testbed.ready()
            if not beds:
                print("bench: no variant has a working cluster", file=sys.stderr)
                return 1
            run_workloads(beds, settings, raw)
            if not args.no_progcost:
                run_progcost(beds, settings, raw)
            ran = [b.variant.name for b in beds]
            broken = dict(testbed.broken)
    except KeyboardInterrupt as exc:
        print(f"bench: interrupted ({exc or 'Ctrl-C'}); clusters torn down", file=sys.stderr)
        return 130
    machine["lab_prefix"] = testbed.prefix
    if any(not v.is_xdp for v in variants):  # the stock variants' flanneld, by its own word
        machine["flanneld"] = peers.flanneld_version()
    results = report.build_results(raw, settings, machine, ran, broken, time.monotonic() - t0)
    report.write_json(results, args.out)
    print(report.render(results))
    print(f"\nraw figures and ratios: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
