"""A CPU profile's symbols in the categories the benchmark reasons about.

`perf report --no-children --sort comm,sym -n -g none -t '|'` prints, per command and
symbol, the samples taken in that symbol's own code. Each symbol falls in the first
category whose pattern it matches (CATEGORIES, in order); samples of idle CPUs and of
commands outside the workload (the machine is shared) are counted apart, so the shares
are of the workload's own CPU time.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

IDLE = "idle"
USER = "user space"
OTHER_KERNEL = "other kernel"
# What a kernel symbol is doing, first match wins: the specific machinery before the
# generic prefixes it shares (vxlan_gro_receive is GRO, tcp4_gro_receive too).
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        (
            IDLE,
            r"^(default_idle|pv_native_safe_halt|native_safe_halt|arch_cpu_idle|do_idle"
            r"|cpuidle|cpu_idle_poll|acpi_idle|mwait_idle|intel_idle|poll_idle)",
        ),
        ("BPF programs", r"^bpf_prog_"),
        ("BPF helpers, kfuncs", r"^(__)?bpf_|^tcx_|^sk_filter"),
        ("GRO, GSO", r"gro_|_gro|gso|skb_segment|napi_gro"),
        ("checksum", r"csum|checksum"),
        (
            "copy",
            r"copy_user|copy_to_iter|copy_from_iter|rep_movs|rep_stos|memcpy|memmove"
            r"|memset|skb_copy|datagram_iter|copy_page|clear_page|simple_copy",
        ),
        (
            "vxlan, UDP tunnel",
            r"vxlan|udp_tunnel|iptunnel|ip_tunnel|ip_md_tunnel|skb_tunnel"
            r"|dst_cache|metadata_dst",
        ),
        (
            "conntrack events, netlink",
            r"^(__)?(ctnetlink|nfnetlink|nfnl|netlink)|ct_event"
            r"|nf_conntrack_eventmask|nf_ct_deliver_cached_events|ecache",
        ),
        (
            "conntrack",
            r"^(__)?(nf_conntrack|nf_ct_|nf_nat|hash_conntrack|ipv4_conntrack)"
            r"|tcp_in_window|^(__)?nf_confirm|^init_conntrack|^resolve_normal_ct",
        ),
        ("iptables, nf hooks", r"^(__)?(ipt_|xt_|nft_|nf_|br_nf|ebt_|iptable_|masq)"),
        ("bridge", r"^(__)?br_"),
        ("veth", r"^veth_"),
        ("locks", r"spin_|spinlock|mutex|_raw_(read|write)|rwsem"),
        (
            "IP, routing, neighbours",
            r"^(__)?(ip_|ipv4_|ip4_|fib|inet_addr|neigh|dst_|rt_"
            r"|mkroute|icmp|raw_)",
        ),
        ("UDP stack", r"^(__)?udp"),
        ("syscalls, entry", r"syscall|^(__)?(x64_)?sys_|^__do_sys|^entry_|exit_to_user|^do_sys"),
        (
            "TCP stack, sockets",
            r"^(__)?(tcp|inet|sk_|sock|lock_sock|release_sock|reqsk"
            r"|secure_tcp|skb_entail|sk_stream)",
        ),
        (
            "skb, memory",
            r"alloc|free|kmem_cache|kmalloc|slab|page_frag|skb_release|skb_clone"
            r"|pskb_expand|build_skb|page_pool|put_page|folio|^consume_skb|skb_attempt_defer",
        ),
        (
            "softirq, netdev core",
            r"softirq|net_rx_action|napi|process_backlog|^irq_exit"
            r"|local_bh|^(__)?(netif|dev_|skb_|qdisc|sch_|pfifo|enqueue_to_backlog|eth_)",
        ),
        (
            "scheduler, timers",
            r"schedule|wake_up|ttwu|sched_|enqueue_task|dequeue_task"
            r"|pick_next|update_curr|update_load|task_switch|switch_to|select_task_rq|psi_"
            r"|hrtimer|sysvec|^tick_|timerqueue|^(__)?(enqueue|dequeue)_entity",
        ),
    )
)
CATEGORY_NAMES: tuple[str, ...] = (
    *(name for name, _ in CATEGORIES if name != IDLE),
    USER,
    OTHER_KERNEL,
)
KERNEL_TAG = "[k]"


def category(symbol: str, kernel: bool) -> str:
    """The category of a symbol; user-space symbols are one category, whatever they are."""
    if not kernel:
        return USER
    for name, pattern in CATEGORIES:
        if pattern.search(symbol):
            return name
    return OTHER_KERNEL


@dataclass(frozen=True)
class Row:
    """One line of the report: samples of one command in one symbol's own code."""

    comm: str
    symbol: str
    kernel: bool
    samples: int


def parse_report(text: str) -> list[Row]:
    """The rows of `perf report ... -n -t '|'`; comment and blank lines skipped.
    ValueError for a data line that is not overhead|samples|comm|symbol."""
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("|", 3)]
        if len(fields) != 4 or not fields[1].isdigit():
            raise ValueError(f"not a perf report line (overhead|samples|comm|symbol): {line!r}")
        _overhead, samples, comm, sym = fields
        tag, _, name = sym.partition(" ")
        rows.append(Row(comm, name.strip() or tag, tag == KERNEL_TAG, int(samples)))
    return rows


def is_workload_comm(comm: str, workload_comms: frozenset[str]) -> bool:
    """A command whose samples are the workload's: its own tools, the process that runs
    the lab (the nodes' flow markers) and the kernel's contexts that run softirqs."""
    return comm in workload_comms or comm.startswith("ksoftirqd/") or comm == "swapper"


@dataclass
class Profile:
    """A profile's samples: the workload's by category and symbol, the rest apart."""

    by_category: Counter[str] = field(default_factory=Counter)
    by_symbol: Counter[str] = field(default_factory=Counter)
    by_comm: Counter[str] = field(default_factory=Counter)
    idle: int = 0
    elsewhere: int = 0  # samples of commands outside the workload

    @classmethod
    def of(cls, rows: list[Row], workload_comms: frozenset[str]) -> Profile:
        profile = cls()
        for row in rows:
            if not is_workload_comm(row.comm, workload_comms):
                profile.elsewhere += row.samples
                continue
            cat = category(row.symbol, row.kernel)
            if cat == IDLE:
                profile.idle += row.samples
                continue
            profile.by_category[cat] += row.samples
            profile.by_symbol[row.symbol if row.kernel else f"{row.comm} (user)"] += row.samples
            profile.by_comm[row.comm] += row.samples
        return profile

    @property
    def busy(self) -> int:
        """The workload's samples with its CPUs not idle: what the shares are of."""
        return sum(self.by_category.values())

    def share(self, cat: str) -> float:
        """Percent of the workload's busy samples in cat."""
        return 100.0 * self.by_category[cat] / self.busy if self.busy else 0.0

    def comm_share(self, comm: str) -> float:
        return 100.0 * self.by_comm[comm] / self.busy if self.busy else 0.0

    def symbol_share(self, symbol: str) -> float:
        return 100.0 * self.by_symbol[symbol] / self.busy if self.busy else 0.0
