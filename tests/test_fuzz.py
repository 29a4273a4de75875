"""Fuzzing the BPF programs: random and mutated frames through BPF_PROG_TEST_RUN, every
outcome checked against a Python reference model (tests/reference_classifier.py).

For each program (underlay_xdp, underlay_tc in both builds, tunnel_egress), at least
FRAMES frames that the test run accepts (100,000 by default), generated from a seed by
tests/fuzz_frames.py under four node configurations (SCENARIOS). For every frame:

- the verdict is the reference's (or both agree the kernel's test run refuses the frame);
- the counter the reference names moved by exactly one packet and the reference's bytes,
  read just before and just after the run, and at the end of the run the sum of all counter
  movements equals the sum of these predictions: no frame moved a second counter, none
  went uncounted, and refused frames moved nothing;
- the frame the program leaves is the reference's, byte for byte (decapsulated and
  encapsulated frames included; only the outer UDP source port of an encapsulation, a
  flow hash, is checked for its range instead).

And the kernel log gains no warnings, BUGs or BPF splats while the programs run.

Replay: a failure names the seed, the program, the scenario, the frame's index and its hex.
FXDP_FUZZ_SEED=<seed> reruns the same frames; FXDP_FUZZ_FRAMES changes how many.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from ipaddress import IPv4Interface

import pytest

from flannel_xdp import netns
from flannel_xdp.lab.frames import mac_bytes as mac
from flannel_xdp.loader.libbpf import BpfError, prog_test_run
from flannel_xdp.maps import layout, libbpf
from tests.fuzz_frames import SCENARIOS, Scenario, frames
from tests.packet_support import (
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    UNDERLAY_MAC,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    Counters,
    Lab,
    ip,
    program_lab,
)
from tests.reference_classifier import (
    DROP,
    PASS,
    REDIRECT,
    REFUSED,
    SPORT_MAX,
    SPORT_MIN,
    CounterKey,
    Node,
    Outcome,
    PeerTable,
    Underlay,
    egress,
    underlay,
)
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.bpf

SEED = int(os.environ.get("FXDP_FUZZ_SEED", "0x7F022"), 0)
FRAMES = int(os.environ.get("FXDP_FUZZ_FRAMES", "100000"))
MAX_REPORTED = 10  # mismatches listed in a failure (the run goes on to count them all)
TAG = f"{os.getpid()}"

VERDICTS = {
    "xdp": {PASS: XDP_PASS, DROP: XDP_DROP, REDIRECT: XDP_REDIRECT},
    "tc": {PASS: TC_ACT_OK, DROP: TC_ACT_SHOT, REDIRECT: TC_ACT_REDIRECT},
    "kernel": {PASS: TC_ACT_OK, DROP: TC_ACT_SHOT, REDIRECT: TC_ACT_OK},  # accepted: whole
    "egress": {DROP: TC_ACT_SHOT, REDIRECT: TC_ACT_REDIRECT},
}

# What a run must reach for its verdicts to mean something: every outcome each program can
# produce through a test run in this lab. Not reachable here: DROP_ENCAP_FAILED (the kernel
# refuses no adjustment of a linear, non-GSO test skb), DROP_MALFORMED after the first
# checks of tunnel_egress (the test run refuses such short IPv4 frames), and the encap's
# DROP_TOO_BIG for frames over 64 KiB.
UNDERLAY_OUTCOMES = {
    ("traffic", "vxlan", "decap"),
    ("traffic", "host-gw", "deliver"),
    *(
        ("reason", "none", name)
        for name in (
            "PASS_NOT_CONFIGURED",
            "PASS_TRUNCATED",
            "PASS_VLAN",
            "PASS_NOT_IPV4",
            "PASS_IP_OPTIONS",
            "PASS_IP_FRAGMENT",
            "PASS_NOT_UDP",
            "PASS_OTHER_ADDRESS",
            "PASS_OTHER_PORT",
            "PASS_OTHER_VNI",
        )
    ),
    *(
        ("reason", "vxlan", name)
        for name in (
            "DROP_MALFORMED",
            "DROP_INNER_NOT_IPV4",
            "DROP_WRONG_INNER_MAC",
            "DROP_UNKNOWN_SOURCE",
            "DROP_SPOOFED_SOURCE",
        )
    ),
}
EGRESS_OUTCOMES = {
    ("traffic", "vxlan", "encap"),
    ("traffic", "host-gw", "forward"),
    ("reason", "none", "DROP_NOT_CONFIGURED"),
    ("reason", "none", "DROP_INNER_NOT_IPV4"),
    ("reason", "none", "DROP_NO_ROUTE"),
    ("reason", "vxlan", "DROP_NO_UNDERLAY_ROUTE"),
    ("reason", "vxlan", "DROP_TOO_BIG"),
    ("reason", "vxlan", "DROP_FRAG_NEEDED"),
    ("reason", "host-gw", "DROP_NO_UNDERLAY_ROUTE"),
    ("reason", "host-gw", "DROP_TOO_BIG"),
    ("reason", "host-gw", "DROP_FRAG_NEEDED"),
}
MIN_PER_OUTCOME = max(1, FRAMES // 2000)  # 50 in a run of 100,000


# --- the lab ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab():
    require_root_and_bcc("ip")
    with program_lab(f"fxdp-fuzz-{TAG}") as lab:
        yield lab


def underlay_model(ns: str) -> Underlay:
    """The underlay as the lab set it up, read back from the netns (what bpf_fib_lookup
    sees): u0's network, MTU and neighbours, and the addresses that are local to it."""
    addrs = json.loads(ip(ns, "-j addr show dev u0"))[0]
    (inet,) = (a for a in addrs["addr_info"] if a["family"] == "inet")
    iface = IPv4Interface(f"{inet['local']}/{inet['prefixlen']}")
    neighbours = {
        bytes(int(x) for x in n["dst"].split(".")): mac(n["lladdr"])
        for n in json.loads(ip(ns, "-j -4 neigh show dev u0"))
        if "lladdr" in n and "PERMANENT" in n.get("state", [])
    }
    assert addrs["address"] == UNDERLAY_MAC
    return Underlay(
        network=iface.network,
        own_mac=mac(addrs["address"]),
        mtu=addrs["mtu"],
        neighbours=neighbours,
        local=frozenset({iface.ip.packed, iface.network.broadcast_address.packed}),
    )


# --- counters, one slot at a time -----------------------------------------------------------------

BACKENDS = {layout.backend_label(code): int(code) for code in layout.BackendCode}


class Slots:
    """Reads single counter slots (summed over CPUs): two lookups per frame are cheap, a
    whole snapshot (78 lookups) is not."""

    def __init__(self, counters: Counters):
        self.ncpu = libbpf.num_possible_cpus()
        self.maps = {"traffic": counters.traffic.fd, "reason": counters.reasons.fd}
        self.value = (layout.Counter * self.ncpu)()
        self.key = ctypes.c_uint32()

    @staticmethod
    def slot(key: CounterKey) -> int:
        kind, backend, what = key
        if kind == "traffic":
            return BACKENDS[backend] * layout.DIRECTION_MAX + layout.Direction[what.upper()]
        return BACKENDS[backend] * layout.REASON_MAX + layout.Reason[what]

    def read(self, key: CounterKey) -> tuple[int, int]:
        self.key.value = self.slot(key)
        libbpf.lookup(self.maps[key[0]], self.key, self.value)
        return sum(v.packets for v in self.value), sum(v.bytes for v in self.value)


# --- the kernel log -------------------------------------------------------------------------------

SPLAT = re.compile(r"WARNING:|BUG:|Oops|Call Trace|general protection|UBSAN|KASAN|\bbpf", re.I)


class KernelLog:
    """New kernel log records since construction, from /dev/kmsg (what dmesg reads)."""

    def __init__(self):
        try:
            self.fd = os.open("/dev/kmsg", os.O_RDWR | os.O_NONBLOCK)
            with contextlib.suppress(BlockingIOError):  # an empty log has nothing to read
                os.read(self.fd, 8192)
        except OSError as exc:
            pytest.fail(f"cannot read the kernel log (/dev/kmsg): {exc}: run as root")
        os.lseek(self.fd, 0, os.SEEK_END)

    def mark(self, text: str) -> None:
        """Log text (at info level): seeing it come back proves the reader works."""
        os.write(self.fd, f"<6>{text}\n".encode())

    def new_records(self) -> list[str]:
        records = []
        while True:
            try:
                rec = os.read(self.fd, 8192)
            except BlockingIOError:
                return records
            except BrokenPipeError:  # overwritten before we read it: go on with the next
                records.append("(kernel log records lost: the ring buffer wrapped)")
                continue
            records.append(rec.decode(errors="replace").split(";", 1)[-1].rstrip("\n"))

    def close(self) -> None:
        os.close(self.fd)


# --- the run --------------------------------------------------------------------------------------


@dataclass
class Run:
    prog: str
    seed: int
    sent: int = 0
    refused: int = 0
    outcomes: Tally = field(default_factory=Tally)
    kinds: Tally = field(default_factory=Tally)
    predicted: dict[CounterKey, list[int]] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    mismatch_count: int = 0

    def mismatch(self, sc: Scenario, index: int, kind: str, frame: bytes, what: str) -> None:
        self.mismatch_count += 1
        if len(self.mismatches) < MAX_REPORTED:
            self.mismatches.append(
                f"seed {self.seed:#x} prog {self.prog} scenario {sc.name} frame {index} "
                f"({kind}): {what}\n  frame {frame.hex()}\n  replay: tests.fuzz_frames."
                f"frame_at({self.prog!r}, {sc.name!r}, {self.seed:#x}, {index})"
            )


def predict(prog: str, frame: bytes, node: Node, peers: PeerTable, net: Underlay) -> Outcome:
    if prog == "egress":
        return egress(frame, node, peers, net)
    return underlay(prog, frame, node, peers)


def output_matches(want: Outcome, out: bytes) -> bool:
    expected = want.output
    assert expected is not None
    if want.sport_at is None:
        return out == expected
    at = want.sport_at
    if len(out) < at + 2 or not SPORT_MIN <= int.from_bytes(out[at : at + 2], "big") <= SPORT_MAX:
        return False
    return out[:at] + out[at + 2 :] == expected[:at] + expected[at + 2 :]


def run_scenario(lab: Lab, run: Run, sc: Scenario, quota: int, net: Underlay) -> None:
    """quota accepted frames of run.prog under scenario sc."""
    settings = lab.settings(**sc.overrides())
    lab.configure(settings, peers=sc.table())
    node, peers = Node.from_settings(settings), PeerTable(sc.table())
    fd = {"xdp": lab.xdp_fd, "tc": lab.tc_fd, "kernel": lab.kernel_fd, "egress": lab.egress_fd}[
        run.prog
    ]
    verdicts = VERDICTS[run.prog]
    slots = Slots(lab.counters)
    accepted = 0
    index = -1
    with netns.entered(lab.ns):  # bpf_fib_lookup resolves in the calling thread's netns
        for kind, frame in frames(run.prog, sc, run.seed):
            if accepted >= quota:
                break
            index += 1
            run.sent += 1
            run.kinds[kind] += 1
            want = predict(run.prog, frame, node, peers, net)
            if want.verdict == REFUSED:
                run.refused += 1
                try:
                    rv, _, _ = prog_test_run(fd, frame)
                except BpfError as exc:
                    if exc.errno != errno.EINVAL:
                        run.mismatch(sc, index, kind, frame, f"refused with {exc}, not EINVAL")
                else:
                    run.mismatch(sc, index, kind, frame, f"expected EINVAL, got verdict {rv}")
                continue
            accepted += 1
            key = want.counter
            assert key is not None
            before = slots.read(key)
            try:
                rv, out, _ = prog_test_run(fd, frame)
            except BpfError as exc:
                run.mismatch(sc, index, kind, frame, f"expected {want.label}, test run: {exc}")
                continue
            after = slots.read(key)
            run.outcomes[key] += 1
            moved = [after[0] - before[0], after[1] - before[1]]
            total = run.predicted.setdefault(key, [0, 0])
            total[0] += 1
            total[1] += want.nbytes
            problems = []
            if rv != verdicts[want.verdict]:
                problems.append(f"verdict {rv}, expected {verdicts[want.verdict]} ({want.label})")
            if moved != [1, want.nbytes]:
                problems.append(
                    f"{'/'.join(key)} moved by {moved[0]} packets, {moved[1]} bytes; "
                    f"expected 1, {want.nbytes} ({want.label})"
                )
            if not output_matches(want, out):
                assert want.output is not None
                problems.append(
                    f"output differs ({want.label})\n  got      {out.hex()}\n"
                    f"  expected {want.output.hex()}"
                )
            if problems:
                run.mismatch(sc, index, kind, frame, "; ".join(problems))


def quotas(total: int) -> list[tuple[Scenario, int]]:
    out = [(sc, round(total * sc.share)) for sc in SCENARIOS]
    out[0] = (out[0][0], total - sum(q for _, q in out[1:]))
    return out


@pytest.mark.parametrize("seed", [SEED], ids=lambda s: f"seed={s:#x}")
@pytest.mark.parametrize("prog", ["xdp", "tc", "kernel", "egress"])
def test_fuzz_against_the_reference(lab, prog, seed):
    net = underlay_model(lab.ns)
    run = Run(prog, seed)
    log = KernelLog()
    start = lab.counters.snapshot()
    t0 = time.monotonic()
    try:
        for sc, quota in quotas(FRAMES):
            run_scenario(lab, run, sc, quota, net)
    finally:
        elapsed = time.monotonic() - t0
        lab.configure()
        marker = f"flannel-xdp test_fuzz: {prog} run with seed {seed:#x} done"
        log.mark(marker)
        records = log.new_records()
        log.close()
    moved = Counters.delta(start, lab.counters.snapshot())

    accepted = run.sent - run.refused
    print(
        f"\n{prog} seed {seed:#x}: {run.sent} frames sent, {accepted} run, {run.refused} refused "
        f"by the test run, in {elapsed:.1f} s ({elapsed / run.sent * 1e6:.0f} us per frame)"
    )
    for key, n in sorted(run.outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {n:7d}  {'/'.join(key)}")
    print("  frame kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(run.kinds.items())))

    assert not run.mismatch_count, (
        f"{run.mismatch_count} of {run.sent} frames differ from the reference "
        f"(first {len(run.mismatches)}; replay with FXDP_FUZZ_SEED={seed:#x}):\n"
        + "\n".join(run.mismatches)
    )
    # Every frame run moved exactly one counter, by one packet, and nothing else moved.
    assert sum(p for p, _ in moved.values()) == accepted, moved
    assert {k: list(v) for k, v in moved.items()} == run.predicted
    assert accepted >= FRAMES
    wanted = EGRESS_OUTCOMES if prog == "egress" else UNDERLAY_OUTCOMES
    rare = {"/".join(k): run.outcomes[k] for k in wanted if run.outcomes[k] < MIN_PER_OUTCOME}
    assert not rare, f"the mix reached these outcomes fewer than {MIN_PER_OUTCOME} times: {rare}"
    assert marker in records, f"the kernel log reader did not see its own marker: {records}"
    splats = [r for r in records if SPLAT.search(r)]
    assert not splats, "the kernel logged during the run:\n" + "\n".join(splats)
