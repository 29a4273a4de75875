"""Per-program cost: ns per packet for each BPF program on its typical packet.

The programs are the ones the lab's flannel-xdp nodes run, opened from their pins
(or, for the ingress program of the other hook, compiled against the same node's
pinned maps), so they see the node's real configuration and peers. Each runs in its
node's netns (tunnel_egress resolves next hops with bpf_fib_lookup there).

BPF_PROG_TEST_RUN does not reset the packet between repetitions, so a program that
rewrites its packet (encap, decap) would see its own output from the second
repetition on. Two methods, each beside the same floor measured the same way:

* single: repeat=1, called many times; the kernel's duration then includes its timer
  (about 100 ns here), which the empty program measures too. The figure is the mean
  of the middle 90 % of the calls (durations come in 10 ns steps; the trimmed mean
  resolves below that and ignores preempted calls).
* repeat: one call with a large repeat count; used where the packet comes out as it
  went in, or rewritten idempotently (XDP_PASS of non-tunnel traffic, host-gw MAC
  rewrite), and for the empty programs.

A case's headline figure uses repeat where it is valid, else single; `vs_empty` is
that figure over empty_xdp's by the same method, `net_ns` the difference.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flannel_xdp import netns
from flannel_xdp.backend import Backend
from flannel_xdp.lab import Node, frames, traffic
from flannel_xdp.lab.topology import link_index
from flannel_xdp.loader import libbpf
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.compile import BuildParams, compile_program
from flannel_xdp.loader.programs import POD_INGRESS, UNDERLAY_TC, UNDERLAY_XDP
from flannel_xdp.node import ctnetlink

from .bpfprogs import EmptyPrograms
from .livepps import RX_PORT, RX_SPORT, pod_frame, rx_frame, udp64
from .variants import DEFAULT_HOOK, Bed

XDP_PASS, XDP_REDIRECT = 2, 4
TC_ACT_OK, TC_ACT_REDIRECT = 0, 7
SINGLE, REPEAT = "single", "repeat"
FLOOR = "empty_xdp"
TRIM = 0.05


@dataclass(frozen=True)
class CostCase:
    name: str  # "<program>/<packet>"
    program: str
    netns: str
    fd: int
    frame: bytes
    expect: int  # the verdict the packet must get
    methods: tuple[str, ...]
    typical: bool = False  # the program's typical packet: its prog_ns_vs_empty entry
    description: str = ""
    # run before each repetition: state the packet needs (a conntrack entry)
    prepare: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    ctx: bytes | None = None  # a struct __sk_buff for the test run (tc only)

    @property
    def headline_method(self) -> str:
        return REPEAT if REPEAT in self.methods else SINGLE


def _trimmed_mean(values: list[int]) -> float:
    values = sorted(values)
    cut = int(len(values) * TRIM)
    kept = values[cut : len(values) - cut] or values
    return statistics.fmean(kept)


def measure_single(case: CostCase, calls: int) -> dict:
    durations, verdicts = [], set()
    with netns.entered(case.netns):
        for _ in range(calls):
            verdict, _, ns = libbpf.prog_test_run(case.fd, case.frame, ctx=case.ctx)
            durations.append(ns)
            verdicts.add(verdict)
    return {
        "ns": _trimmed_mean(durations),
        "median_ns": statistics.median(durations),
        "min_ns": min(durations),
        "calls": calls,
        "verdicts": sorted(verdicts),
    }


def measure_repeat(case: CostCase, repeat: int) -> dict:
    with netns.entered(case.netns):
        verdict, _, ns = libbpf.prog_test_run(case.fd, case.frame, repeat=repeat, ctx=case.ctx)
    return {"ns": float(ns), "repeat": repeat, "verdicts": [verdict]}


@dataclass
class Programs:
    """Program fds by (node netns, program name), opened from pins or compiled."""

    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _fds: dict[tuple[str, str], int] = field(default_factory=dict)

    def fd(self, node: Node, name: str, hook: str, *, kernel_decap: bool | None = None) -> int:
        """The node's pinned program (compiled if the node's hook has none of that name);
        with kernel_decap (underlay_tc only), that build of it compiled against the node's
        pinned maps, whichever is pinned."""
        pins = PinDir(node.bpffs)
        pinned = kernel_decap is None and os.path.exists(pins.prog(name))
        build = "" if pinned else "+kernel" if kernel_decap else "+compiled"
        key = (node.netns, name + build)
        if key in self._fds:
            return self._fds[key]
        if pinned:
            fd = libbpf.obj_get(pins.prog(name))
            self.stack.callback(os.close, fd)
        else:  # the other hook's ingress program, against the same pinned maps
            from bcc import BPF

            params = BuildParams(pins.maps, kernel_decap=bool(kernel_decap))
            module = compile_program(name, params)
            self.stack.callback(module.cleanup)
            kind = BPF.XDP if hook == "xdp" else BPF.SCHED_CLS
            fd = module.load_func(params.program_name(name).encode(), kind).fd
        self._fds[key] = fd
        return fd


def _pick(beds: list[Bed], backend: Backend) -> Bed | None:
    """A flannel-xdp bed of this backend, the default hook's if it runs."""
    candidates = [b for b in beds if b.variant.is_xdp and b.variant.backend is backend]
    candidates.sort(key=lambda b: b.variant.hook is not DEFAULT_HOOK)
    return candidates[0] if candidates else None


def _tunnel_frame(bed: Bed, inner_ip: bytes) -> bytes:
    """An IPv4 packet as the stack hands it to flannel.<VNI> on the sender node."""
    dst = bed.receiver_node.vtep_mac  # the neighbour entry of <remote subnet>.0
    return frames.ethernet(dst, bed.sender_node.vtep_mac, inner_ip)


def _full_size_tcp(
    bed: Bed, *, partial: bool, ttl: int, ports: tuple[int, int] = (40001, 5201)
) -> bytes:
    """A full-size data segment (ACK|PSH) from the sender pod to the receiver pod."""
    mtu = bed.cluster.spec.pod_mtu
    payload = frames.payload_bytes(mtu - frames.IP_HLEN - frames.TCP_HLEN)
    return frames.tcp(
        str(bed.sender.ip), str(bed.receiver.ip), *ports, payload, partial=partial, ttl=ttl
    )


def confirm_flow(bed: Bed) -> None:
    """One real datagram of rx_frame()'s and pod_frame()'s flow, so that both nodes'
    conntrack have the confirmed entry the fast path asks for (a UDP entry lives 30 s
    unreplied)."""
    sender, receiver = bed.sender, bed.receiver
    with (
        traffic.udp_socket(receiver.netns, str(receiver.ip), RX_PORT, timeout=2) as rx_sock,
        traffic.udp_socket(sender.netns, str(sender.ip), RX_SPORT, reuse_addr=True) as tx_sock,
    ):
        tx_sock.sendto(b"confirm", (str(receiver.ip), RX_PORT))
        rx_sock.recv(64)


def build_name(fd: int) -> str:
    """The kernel's name of the program: underlay_tc's builds each have their own."""
    return libbpf.prog_info(fd).name.decode()


def _case(
    name: str,
    node_ns: str,
    fd: int,
    frame: bytes,
    expect: int,
    description: str,
    *,
    repeat_ok: bool = False,
    typical: bool = False,
    prepare: Callable[[], None] | None = None,
    ctx: bytes | None = None,
) -> CostCase:
    methods = (SINGLE, REPEAT) if repeat_ok else (SINGLE,)
    program = name.split("/", 1)[0]
    return CostCase(
        name, program, node_ns, fd, frame, expect, methods, typical, description, prepare, ctx
    )


# struct __sk_buff up to ifindex: BPF_PROG_TEST_RUN takes the device a tc program runs
# on from it (and sets pkt_type against that device's MAC, as a real receive does).
SKB_IFINDEX_OFFSET = 40


def skb_ctx_on(ifindex: int) -> bytes:
    return bytes(SKB_IFINDEX_OFFSET) + ifindex.to_bytes(4, sys.byteorder)


def build_cases(beds: list[Bed], programs: Programs, empty: EmptyPrograms) -> list[CostCase]:
    """The cases the running variants allow: vxlan ones need a flannel-xdp vxlan bed,
    host-gw ones a flannel-xdp host-gw bed."""
    vx = _pick(beds, Backend.VXLAN)
    hg = _pick(beds, Backend.HOST_GW)
    any_bed = vx or hg
    if any_bed is None:
        return []
    floor_frame, ns = rx_frame(any_bed), any_bed.receiver_node.netns
    cases = [
        _case(FLOOR, ns, empty.xdp_fd, floor_frame, XDP_PASS, "empty XDP program: the floor",
              repeat_ok=True, typical=True),
        _case("empty_tc", ns, empty.tc_fd, floor_frame, TC_ACT_OK, "empty tc program",
              repeat_ok=True, typical=True),
    ]  # fmt: skip
    if vx is not None:
        rx, tx = vx.receiver_node, vx.sender_node
        xdp = programs.fd(rx, UNDERLAY_XDP.name, "xdp")
        tc = programs.fd(rx, UNDERLAY_TC.name, "tc", kernel_decap=False)
        judge = programs.fd(rx, UNDERLAY_TC.name, "tc", kernel_decap=True)
        egress = programs.fd(tx, "tunnel_egress", "tc")
        decap_udp = rx_frame(vx)
        decap_tcp = rx_frame(vx, _full_size_tcp(vx, partial=True, ttl=64))
        encap_udp = _tunnel_frame(vx, udp64(vx, ttl=63))
        encap_tcp = _tunnel_frame(vx, _full_size_tcp(vx, partial=False, ttl=63))
        not_vxlan = frames.ethernet(
            vx.underlay_macs[1],
            vx.underlay_macs[0],
            frames.udp(str(tx.public_ip), str(rx.public_ip), 40000, 53, b"\0" * 32),
        )
        cases += [
            _case("underlay_xdp/vxlan_decap_udp64", rx.netns, xdp, decap_udp, XDP_REDIRECT,
                  "VXLAN, inner UDP 64 B (full checksum): decap, redirect", typical=True),
            _case("underlay_xdp/vxlan_decap_tcp_full_partial_csum", rx.netns, xdp, decap_tcp,
                  XDP_REDIRECT, "VXLAN, inner full-size TCP segment whose partial checksum "
                  "the program completes (what veth senders' segments carry): decap, redirect"),
            _case("underlay_xdp/not_vxlan_pass", rx.netns, xdp, not_vxlan, XDP_PASS,
                  "plain UDP to the node (port 53): XDP_PASS", repeat_ok=True),
            _case("underlay_tc/vxlan_decap_udp64", rx.netns, tc, decap_udp, TC_ACT_REDIRECT,
                  "VXLAN, inner UDP 64 B: decap, redirect to flannel.1 ingress", typical=True),
            _case("underlay_tc/vxlan_decap_tcp_full", rx.netns, tc, decap_tcp, TC_ACT_REDIRECT,
                  "VXLAN, inner full-size TCP segment: decap, redirect"),
            _case(f"{build_name(judge)}/vxlan_accept_udp64", rx.netns, judge, decap_udp, TC_ACT_OK,
                  "kernel hook: VXLAN, inner UDP 64 B: judged, passed whole to the vxlan "
                  "device", repeat_ok=True, typical=True),
            _case("tunnel_egress/vxlan_encap_udp64", tx.netns, egress, encap_udp,
                  TC_ACT_REDIRECT, "UDP 64 B to a remote pod: encap, FIB lookup, redirect",
                  typical=True),
            _case("tunnel_egress/vxlan_encap_tcp_full", tx.netns, egress, encap_tcp,
                  TC_ACT_REDIRECT, "full-size TCP segment: encap, FIB lookup, redirect"),
        ]  # fmt: skip
    for fast in (b for b in beds if b.variant.fast_path):
        cases += _fast_path_cases(fast, programs)
    if hg is not None:
        rx, tx = hg.receiver_node, hg.sender_node
        egress = programs.fd(tx, "tunnel_egress", "tc")
        xdp = programs.fd(rx, UNDERLAY_XDP.name, "xdp")
        cases += [
            _case("tunnel_egress/hostgw_udp64", tx.netns, egress, _tunnel_frame(hg, udp64(hg, 63)),
                  TC_ACT_REDIRECT, "host-gw, UDP 64 B: FIB lookup, MAC rewrite, redirect",
                  repeat_ok=True),
            _case("underlay_xdp/hostgw_deliver_udp64", rx.netns, xdp, rx_frame(hg), XDP_PASS,
                  "host-gw, UDP 64 B from a peer's pod to ours: counted, XDP_PASS",
                  repeat_ok=True),
        ]  # fmt: skip
    return cases


def hold_tcp_stream(bed: Bed, stack: contextlib.ExitStack) -> tuple[int, int]:
    """An established TCP stream from the sender pod to the receiver pod, held open until
    stack closes: both nodes' conntrack then hold the assured, un-NATed entry that the
    fast path asks about for the TCP cases' segments. Returns (client port, server port)."""
    sender, receiver = bed.sender, bed.receiver
    with netns.entered(receiver.netns):
        server = stack.enter_context(socket.socket())
    with netns.entered(sender.netns):
        client = stack.enter_context(socket.socket())
    server.bind((str(receiver.ip), 0))
    server.listen(1)
    for s in (server, client):
        s.settimeout(5)
    client.connect(server.getsockname())
    conn = stack.enter_context(server.accept()[0])
    conn.settimeout(5)
    client.sendall(b"ping")  # a segment each way after the handshake: assured on both nodes
    conn.recv(4)
    conn.sendall(b"pong")
    client.recv(4)
    sport, dport = client.getsockname()[1], server.getsockname()[1]
    # ... and marked by both nodes (node/flow_marks.py), a moment after conntrack confirmed it
    deadline = time.monotonic() + 5
    for node in (bed.sender_node, bed.receiver_node):
        while not _marked(node.netns, sport, dport) and time.monotonic() < deadline:
            time.sleep(0.01)
    return sport, dport


def _marked(ns: str, sport: int, dport: int) -> bool:
    with netns.entered(ns):
        flows = ctnetlink.tcp_entries()
    return any(f.liberal for f in flows if (f.sport, f.dport) == (sport, dport))


def _fast_path_cases(bed: Bed, programs: Programs) -> list[CostCase]:
    """The fast path's two programs on a fast-path bed, each on a datagram of a flow
    conntrack has confirmed (both nodes see the one real datagram sent first), and on a
    full-size segment of a TCP stream held open for them."""
    rx, tx = bed.receiver_node, bed.sender_node
    backend = bed.variant.backend.value.replace("-", "")
    deliver = programs.fd(rx, UNDERLAY_TC.name, "tc")  # the pinned build: with the fast path
    send = programs.fd(tx, POD_INGRESS.name, "tc")
    on_pod_veth = skb_ctx_on(link_index(tx.netns, bed.sender.host_veth))
    packet = "VXLAN, inner UDP 64 B" if backend == "vxlan" else "UDP 64 B"
    typical = backend == "vxlan"  # a program's prog_ns_vs_empty: vxlan, as tunnel_egress's

    def confirm() -> None:
        confirm_flow(bed)

    ports = hold_tcp_stream(bed, programs.stack)
    segment = _full_size_tcp(bed, partial=False, ttl=64, ports=ports)
    return [
        _case(f"{build_name(deliver)}/{backend}_fast_udp64", rx.netns, deliver, rx_frame(bed),
              TC_ACT_REDIRECT, f"UDP fast path, receiving: {packet} of a conntrack-confirmed "
              "flow to a local pod: judged, conntrack and FIB lookups, "
              f"{'decap, ' if backend == 'vxlan' else ''}redirect into the pod's netns",
              typical=typical, prepare=confirm),
        _case(f"{POD_INGRESS.name}/{backend}_fast_send_udp64", tx.netns, send,
              pod_frame(bed), TC_ACT_REDIRECT, "UDP fast path, sending: a pod's UDP 64 B of a "
              "conntrack-confirmed flow, at its veth end's ingress: pod, header, peer and "
              f"conntrack checks, MTU check, {'encap, ' if backend == 'vxlan' else ''}next hop, "
              "redirect", typical=typical, prepare=confirm, ctx=on_pod_veth),
        _case(f"{build_name(deliver)}/{backend}_fast_tcp_full", rx.netns, deliver,
              rx_frame(bed, segment),
              TC_ACT_REDIRECT, "TCP fast path, receiving: a full-size segment of an "
              f"established stream, {'VXLAN, ' if backend == 'vxlan' else ''}to a local pod"),
        _case(f"{POD_INGRESS.name}/{backend}_fast_send_tcp_full", tx.netns, send,
              pod_frame(bed, segment),
              TC_ACT_REDIRECT, "TCP fast path, sending: a pod's full-size segment of an "
              "established stream, at its veth end's ingress", ctx=on_pod_veth),
    ]  # fmt: skip


def run_case(case: CostCase, method: str, calls: int, repeat: int) -> dict:
    measure: Callable[[], dict]
    if method == SINGLE:

        def measure() -> dict:
            return measure_single(case, calls)
    else:

        def measure() -> dict:
            return measure_repeat(case, repeat)

    if case.prepare is not None:
        case.prepare()
    try:
        result = measure()
    except libbpf.BpfError as exc:
        if exc.errno == errno.EINTR:
            raise KeyboardInterrupt from exc
        raise
    if result["verdicts"] != [case.expect]:
        result["error"] = f"verdicts {result['verdicts']}, expected {case.expect}"
    return result


def summarize(cases: list[CostCase], medians: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Headline ns, net ns over the floor and ratio to the floor, per case."""
    floor = medians.get(FLOOR, {})
    out: dict[str, dict] = {}
    for case in cases:
        got = medians.get(case.name, {})
        method = case.headline_method
        if method not in got:
            continue
        ns = got[method]
        base = floor.get(method)
        out[case.name] = {
            "program": case.program,
            "method": method,
            "ns": ns,
            "net_ns": ns - base if base is not None else None,
            "vs_empty": ns / base if base else None,
            "single_ns": got.get(SINGLE),
            "repeat_ns": got.get(REPEAT),
            "typical": case.typical,
            "description": case.description,
        }
    return out
