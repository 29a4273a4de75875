"""How the fast path (docs/fast-path.md) is asked for, what it needs of the kernel, and
the reasons it can be off.

The agent runs it by default wherever the kernel has what it needs: the conntrack kfuncs
(bpf/kfuncs.h, through loader/kfunc.py) and tcx (pod_ingress attaches through tcx
links, loader/attach.py). kernel_lacks() asks the running kernel for both at start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum

from flannel_xdp import defaults
from flannel_xdp.loader import attach, datapath, kfunc


class Mode(StrEnum):
    """--fast-path: auto runs it where it fits and the kernel has what it needs (and
    runs the stack path, saying why, where not); on makes either missing an error (exit
    2); off runs the stack path."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


DEFAULT_MODE = Mode(defaults.FAST_PATH)


class OffReason(StrEnum):
    """Why a protocol does not take the fast path: the `reason` label of
    flannel_xdp_fast_path_off."""

    TURNED_OFF = "turned_off"  # --fast-path off
    KERNEL_NO_KFUNCS = "kernel_no_conntrack_kfuncs"
    KERNEL_NO_TCX = "kernel_no_tcx"
    NOT_BUILT = "backend_or_hook"  # no fast-path build for the network's backend and hook
    UDP_OFF = "udp_off"  # TCP rides on the UDP fast path's build
    CONNTRACK_TCP = "conntrack_tcp"  # node.conntrack.tcp_fast_path_problem() says no
    STARTING = "starting"  # the agent has not decided yet


class Lack(StrEnum):
    """What the fast path needs of the kernel; also the words of LACK_ENV."""

    KFUNCS = "kfuncs"
    TCX = "tcx"


LACK_REASON = {Lack.KFUNCS: OffReason.KERNEL_NO_KFUNCS, Lack.TCX: OffReason.KERNEL_NO_TCX}

# Test-only: a comma-separated list of Lack words that kernel_lacks() reports missing
# whatever the kernel has, so that a test can run the agent as on a kernel without them
# (docs/testing.md). Nothing else reads it: the loader still builds what it is asked for.
LACK_ENV = "FXDP_TEST_KERNEL_LACKS"


def _pretended() -> set[Lack]:
    words = {w.strip() for w in os.environ.get(LACK_ENV, "").split(",") if w.strip()}
    unknown = words - {lack.value for lack in Lack}
    if unknown:
        raise ValueError(
            f"{LACK_ENV}: unknown {sorted(unknown)}; use {', '.join(lack for lack in Lack)}"
        )
    return {Lack(w) for w in words}


def kernel_lacks() -> dict[Lack, str]:
    """What the fast path needs that this kernel lacks, each with why; empty if none."""
    pretended = _pretended()
    lacks: dict[Lack, str] = {}
    if Lack.KFUNCS in pretended:
        lacks[Lack.KFUNCS] = f"conntrack kfuncs unavailable ({LACK_ENV} says so)"
    else:
        try:
            kfunc.kfunc_cflags()
        except kfunc.KfuncError as exc:
            lacks[Lack.KFUNCS] = str(exc)
    if Lack.TCX in pretended:
        lacks[Lack.TCX] = f"this kernel has no tcx hooks ({LACK_ENV} says so)"
    elif (problem := attach.tcx_problem()) is not None:
        lacks[Lack.TCX] = problem
    return lacks


@dataclass(frozen=True)
class Wanted:
    """What the flags ask of each protocol. TCP rides on the UDP fast path's build, so
    TCP on implies UDP on; TCP auto follows node.conntrack.tcp_fast_path_problem()."""

    udp: Mode = DEFAULT_MODE
    tcp: Mode = DEFAULT_MODE

    def __post_init__(self) -> None:
        if self.tcp is Mode.ON and self.udp is not Mode.ON:
            raise ValueError("TCP on the fast path needs UDP on it too (it extends that build)")
        if self.udp is Mode.OFF and self.tcp is not Mode.OFF:
            raise ValueError("with the UDP fast path off, TCP cannot take it either")


@dataclass(frozen=True)
class State:
    """One protocol's fast path: on, or off with a reason (a metric label) and why (words)."""

    on: bool
    reason: OffReason | None = None
    why: str = ""

    @classmethod
    def off(cls, reason: OffReason, why: str) -> State:
        return cls(False, reason, why)


ON = State(True)
STARTING = State.off(OffReason.STARTING, "the agent has not set up the data path yet")


def udp_state(mode: Mode, lacks: dict[Lack, str], fits: bool, where: str) -> State:
    """The UDP fast path of a node whose kernel lacks lacks and whose backend and hook
    (where, in words) have a build of it or not (fits). Raises ValueError, saying what is
    missing, when mode is on and something is."""
    if mode is Mode.OFF:
        return State.off(OffReason.TURNED_OFF, "--fast-path off")
    if lacks:
        state = State.off(LACK_REASON[next(iter(lacks))], "; ".join(lacks.values()))
    elif not fits:
        state = State.off(
            OffReason.NOT_BUILT, f"the fast path fits {datapath.UDP_FAST_PATH_FITS}; {where}"
        )
    else:
        return ON
    if mode is Mode.ON:
        raise ValueError(f"--fast-path on: {state.why}")
    return state
