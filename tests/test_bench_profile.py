"""The profile's pure parts: perf report lines, symbol categories, the workload's shares,
and the comm the bench's tools name themselves with."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flannel_xdp.bench import crr, profile
from flannel_xdp.bench.procname import COMM_MAX, set_comm
from flannel_xdp.bench.symbols import (
    CATEGORY_NAMES,
    IDLE,
    OTHER_KERNEL,
    USER,
    Profile,
    Row,
    category,
    parse_report,
)

pytestmark = pytest.mark.unit

REPORT = """\
# Samples: 8K of event 'cpu-clock:ppp'
#
# Overhead|     Samples|Command        |Symbol
 30.00%  | 300        |iperf3         |[k] _copy_to_iter
 20.00%  | 200        |swapper        |[k] pv_native_safe_halt
 10.00%  | 100        |ksoftirqd/1    |[k] bpf_prog_3b185187f1855c4c_pod_ingress
 10.00%  | 100        |python         |[.] clang::Lexer::Lex
  5.00%  | 50         |crr-client     |[.] _PyEval_EvalFrameDefault
  5.00%  | 50         |iperf3         |[k] vxlan_xmit_one
  5.00%  | 50         |fxb-profile    |[k] ctnetlink_new_conntrack
  5.00%  | 50         |crr-server     |[k] operator|| weird
"""


@pytest.mark.parametrize(
    ("symbol", "expected"),
    [
        ("bpf_prog_3b185187f1855c4c_pod_ingress", "BPF programs"),
        ("bpf_skb_ct_lookup", "BPF helpers, kfuncs"),
        ("vxlan_gro_receive", "GRO, GSO"),
        ("skb_segment", "GRO, GSO"),
        ("tcp4_gro_receive", "GRO, GSO"),
        ("csum_partial", "checksum"),
        ("_copy_from_iter", "copy"),
        ("vxlan_rcv", "vxlan, UDP tunnel"),
        ("udp_tunnel_xmit_skb", "vxlan, UDP tunnel"),
        ("ctnetlink_new_conntrack", "conntrack events, netlink"),
        ("nf_conntrack_eventmask_report", "conntrack events, netlink"),
        ("__nf_conntrack_find_get", "conntrack"),
        ("tcp_in_window", "conntrack"),
        ("nf_conntrack_tcp_packet", "conntrack"),
        ("ipt_do_table", "iptables, nf hooks"),
        ("nf_hook_slow", "iptables, nf hooks"),
        ("br_handle_frame", "bridge"),
        ("veth_xmit", "veth"),
        ("_raw_spin_unlock_irqrestore", "locks"),
        ("fib_table_lookup", "IP, routing, neighbours"),
        ("ip_finish_output2", "IP, routing, neighbours"),
        ("__udp4_lib_rcv", "UDP stack"),
        ("__sys_connect", "syscalls, entry"),
        ("entry_SYSCALL_64", "syscalls, entry"),
        ("tcp_v4_connect", "TCP stack, sockets"),
        ("inet_csk_accept", "TCP stack, sockets"),
        ("kmem_cache_alloc_node_noprof", "skb, memory"),
        ("handle_softirqs", "softirq, netdev core"),
        ("__netif_receive_skb_core", "softirq, netdev core"),
        ("finish_task_switch.isra.0", "scheduler, timers"),
        ("pv_native_safe_halt", IDLE),
        ("read_tsc", OTHER_KERNEL),
    ],
)
def test_kernel_symbols_fall_in_their_category(symbol, expected):
    assert category(symbol, kernel=True) == expected
    assert expected == IDLE or expected in CATEGORY_NAMES


def test_user_symbols_are_one_category():
    assert category("bpf_prog_looks_like_one", kernel=False) == USER


def test_parse_report_reads_comm_symbol_and_samples():
    rows = parse_report(REPORT)
    assert rows[0] == Row("iperf3", "_copy_to_iter", True, 300)
    assert rows[3] == Row("python", "clang::Lexer::Lex", False, 100)
    assert rows[-1] == Row("crr-server", "operator|| weird", True, 50)  # '|' in a symbol
    assert sum(r.samples for r in rows) == 900


def test_parse_report_refuses_what_is_not_a_report():
    with pytest.raises(ValueError, match="not a perf report line"):
        parse_report("perf: no such file\n")


def test_shares_are_of_the_workload_busy_samples():
    prof = Profile.of(parse_report(REPORT), profile.WORKLOAD_COMMS)
    assert prof.idle == 200  # swapper halting
    assert prof.elsewhere == 100  # another engineer's python
    assert prof.busy == 600
    assert prof.share("copy") == pytest.approx(50.0)
    assert prof.share("BPF programs") == pytest.approx(100 / 6)
    assert prof.share(USER) == pytest.approx(100 / 12)
    assert prof.symbol_share("crr-client (user)") == pytest.approx(100 / 12)
    assert sum(prof.share(c) for c in CATEGORY_NAMES) == pytest.approx(100.0)
    assert prof.comm_share("fxb-profile") == pytest.approx(100 / 12)  # the lab's flow markers
    assert prof.comm_share("python") == 0.0


def test_render_lists_categories_results_and_cpu_per_unit():
    prof = Profile.of(parse_report(REPORT), profile.WORKLOAD_COMMS)
    run = profile.Run("xdp-vxlan-fast", 1, {"gbps": 10.0, "gbit_transferred": 40.0}, prof)
    text = profile.render("tcp1", [run], freq=1000, top=3)
    assert "xdp-vxlan-fast r1" in text
    # 600 samples at 1000 Hz = 600 ms of CPU for 40 Gbit
    assert "workload CPU ms per Gbit" in text and "15.0" in text
    assert "_copy_to_iter" in text
    assert "command crr-client" in text


def test_profile_args_need_workloads_and_variants():
    with pytest.raises(SystemExit):
        profile.parse_args(["--workloads", "tcp1"])
    with pytest.raises(SystemExit):
        profile.parse_args(["--workloads", "nope", "--only", "direct-veth"])
    args = profile.parse_args(["--workloads", "tcp1,crr", "--only", "direct-veth"])
    assert args.workloads == ("tcp1", "crr") and args.reps == 2


def test_tools_comms_fit_and_are_the_workload_s():
    for comm in (crr.CLIENT_COMM, crr.SERVER_COMM, profile.PROFILER_COMM):
        assert len(comm) <= COMM_MAX and comm in profile.WORKLOAD_COMMS
    with pytest.raises(ValueError, match="1 to 15 bytes"):
        set_comm("x" * (COMM_MAX + 1))


def test_set_comm_names_the_process():
    code = (
        "from flannel_xdp.bench.procname import set_comm; set_comm('fxb-comm-test');"
        "print(open('/proc/self/comm').read().strip())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fxb-comm-test"
