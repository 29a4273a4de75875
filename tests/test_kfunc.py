"""Kfunc calls from bcc-compiled programs (loader/kfunc.py, bpf/kfuncs.h), against the
kernel's real conntrack table.

A probe program asks bpf_skb_ct_lookup() for the flow of the frame it is given and
returns the entry's status bits. Flows are made by real UDP traffic between sockets in
a test netns, one of them through an iptables DNAT rule, so conntrack has an entry
for each, NATed or not; a flow that never happened must have none.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flannel_xdp import netns
from flannel_xdp.lab.frames import eth
from flannel_xdp.lab.traffic import udp_socket
from flannel_xdp.loader import btf
from flannel_xdp.loader.compile import expand_includes
from flannel_xdp.loader.kfunc import KFUNCS, KfuncError, kfunc_cflags, load, patch_calls
from flannel_xdp.loader.libbpf import prog_test_run
from tests.packet_support import ip, run, temp_netns, udp_packet
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.bpf

NS = f"fxdp-kf-{os.getpid()}"
PROBE = Path(__file__).with_name("ct_probe.c")
CLIENT, SERVICE, BACKEND = "198.18.0.1", "198.18.0.7", "198.18.0.2"
SERVICE_PORT, BACKEND_PORT = 7000, 9000
IPS_CONFIRMED, IPS_SRC_NAT, IPS_DST_NAT = 1 << 3, 1 << 4, 1 << 5
BPF_PROG_TYPE_SCHED_CLS = 3


@pytest.fixture(scope="module")
def requirements():
    require_root_and_bcc("ip", "iptables")


@pytest.fixture(scope="module")
def probe(requirements) -> Iterator[int]:
    from bcc import BPF

    module = BPF(text=expand_includes(PROBE).encode(), cflags=kfunc_cflags())
    fd, _ = load(module, "ct_probe", BPF_PROG_TYPE_SCHED_CLS)
    try:
        yield fd
    finally:
        os.close(fd)
        module.cleanup()


@pytest.fixture(scope="module")
def ns(requirements) -> Iterator[str]:
    """A netns with conntrack on (an iptables rule that needs it) and a DNAT rule from
    SERVICE:7000 to BACKEND:9000, as kube-proxy writes for a Service."""
    with temp_netns(NS) as name:
        ip(name, "link set lo up")
        ip(name, "link add v0 type veth peer name v1")
        for dev in ("v0", "v1"):
            ip(name, f"link set {dev} up")
        for addr in (CLIENT, BACKEND):
            ip(name, f"addr add {addr}/32 dev v0")
        ip(name, f"route add {SERVICE}/32 dev v0")
        ipt = ["ip", "netns", "exec", name, "iptables", "-w"]
        run(*ipt, "-A", "INPUT", "-m", "conntrack", "--ctstate", "NEW,ESTABLISHED", "-j", "ACCEPT")
        dnat = ["-j", "DNAT", "--to-destination", f"{BACKEND}:{BACKEND_PORT}"]
        run(*ipt, "-t", "nat", "-A", "OUTPUT", "-d", SERVICE, "-p", "udp", "--dport",
            str(SERVICE_PORT), *dnat)  # fmt: skip
        yield name


def exchange(ns: str, client_port: int, dst: str, dst_port: int) -> None:
    """One datagram CLIENT:client_port -> dst:dst_port, received by the backend socket."""
    with (
        udp_socket(ns, BACKEND, BACKEND_PORT, timeout=2) as server,
        udp_socket(ns, CLIENT, client_port, timeout=2) as c,
    ):
        c.sendto(b"ping", (dst, dst_port))
        data, _ = server.recvfrom(64)
        assert data == b"ping"


def status(probe: int, ns: str, src: str, sport: int, dst: str, dport: int) -> int:
    frame = eth("02:00:00:00:00:02", "02:00:00:00:00:01") + udp_packet(src, dst, sport, dport, b"x")
    with netns.entered(ns):
        rv, _, _ = prog_test_run(probe, frame)
    return struct.unpack("<i", struct.pack("<I", rv))[0]


def test_the_placeholder_calls_become_kfunc_calls(requirements):
    from bcc import BPF

    module = BPF(text=expand_includes(PROBE).encode(), cflags=kfunc_cflags())
    try:
        insns, patched = patch_calls(module.dump_func(b"ct_probe"))
    finally:
        module.cleanup()
    assert patched == {"bpf_skb_ct_lookup": 1, "bpf_ct_release": 1}
    kernel = btf.vmlinux()
    calls = [
        struct.unpack_from("<BBhi", insns, pos) for pos in range(0, len(insns), 8)
        if insns[pos] == 0x85
    ]  # fmt: skip
    kfunc_calls = {(regs >> 4, imm) for _, regs, _, imm in calls if regs >> 4 == 2}
    assert kfunc_calls == {(2, kernel.func_id(name)) for name in patched}
    assert not any(imm in {k.placeholder for k in KFUNCS} for _, _, _, imm in calls)


def test_no_entry_for_a_flow_that_never_happened(probe, ns):
    assert status(probe, ns, CLIENT, 41000, BACKEND, BACKEND_PORT) == 0


def test_a_plain_flow_is_confirmed_and_not_nated(probe, ns):
    exchange(ns, 41001, BACKEND, BACKEND_PORT)
    st = status(probe, ns, CLIENT, 41001, BACKEND, BACKEND_PORT)
    assert st & IPS_CONFIRMED, f"status {st:#x}"
    assert not st & (IPS_SRC_NAT | IPS_DST_NAT), f"status {st:#x}"
    # the reply direction finds the same entry
    assert status(probe, ns, BACKEND, BACKEND_PORT, CLIENT, 41001) == st


def test_a_dnated_flow_says_so_in_both_directions(probe, ns):
    exchange(ns, 41002, SERVICE, SERVICE_PORT)
    st = status(probe, ns, CLIENT, 41002, SERVICE, SERVICE_PORT)
    assert st & IPS_CONFIRMED and st & IPS_DST_NAT, f"status {st:#x}"
    # the backend's reply, as it leaves the backend (before un-DNAT)
    assert status(probe, ns, BACKEND, BACKEND_PORT, CLIENT, 41002) == st
    # the original tuple is not the post-NAT one: no entry for client -> backend
    assert status(probe, ns, CLIENT, 41002, BACKEND, BACKEND_PORT) == 0


def test_a_kernel_without_the_kfunc_is_a_clear_error(monkeypatch, requirements):
    kernel = btf.vmlinux()
    real = kernel.func_id

    def missing(name: str) -> int:
        if name == "bpf_skb_ct_lookup":
            raise btf.BtfError(f"{btf.VMLINUX_BTF}: no function {name!r}")
        return real(name)

    monkeypatch.setattr(kernel, "func_id", missing)
    with pytest.raises(KfuncError, match=r"conntrack kfuncs unavailable.*bpf_skb_ct_lookup"):
        kfunc_cflags()


def test_btf_reader_agrees_with_bpftool(requirements):
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(btf.VMLINUX_BTF), "format", "raw"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    kernel = btf.vmlinux()
    for k in KFUNCS:
        assert f"[{kernel.func_id(k.name)}] FUNC '{k.name}'" in out
    struct_at = out.index("] STRUCT 'nf_conn' ")
    member = out[struct_at:].split("'status' ", 1)[1].split("\n", 1)[0]
    assert f"bits_offset={kernel.member_offset('nf_conn', 'status') * 8}" in member


def test_btf_reader_follows_member_paths_as_pahole_lays_them_out(requirements):
    """A nested path adds up its members' offsets and its array elements' sizes:
    ip_ct_tcp_state is 20 bytes (four u32 and two u8, padded), seen[] leads ip_ct_tcp."""
    kernel = btf.vmlinux()
    proto = kernel.member_offset("nf_conn", "proto")
    assert kernel.member_offset("nf_conn", "proto.tcp.seen[0].flags") == proto + 17
    assert kernel.member_offset("nf_conn", "proto.tcp.seen[1].flags") == proto + 20 + 17
    assert kernel.member_offset("nf_conn", "proto.tcp.state") == proto + 40
    with pytest.raises(btf.BtfError, match="has 2 elements"):
        kernel.member_offset("nf_conn", "proto.tcp.seen[2].flags")
    with pytest.raises(btf.BtfError, match="no member 'nope'"):
        kernel.member_offset("nf_conn", "proto.nope")
