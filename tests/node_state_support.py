"""What a lab node holds, to compare before and after a fault: its BPF objects, its pins
and the state of its netns; and the fixture that checks none of a lab's BPF objects
outlives it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from flannel_xdp.lab import process
from flannel_xdp.lab.agentcluster import AgentCluster, LabNode


def _bpftool(*args: str) -> list | dict:
    res = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def system_bpf_ids() -> tuple[set[int], set[int]]:
    """Every BPF program and map id on the machine (other tests run labs too)."""
    return {p["id"] for p in _bpftool("prog", "show")}, {m["id"] for m in _bpftool("map", "show")}


@dataclasses.dataclass(frozen=True)
class NodeBpf:
    """The BPF objects of one node: its pins, whatever is attached in its netns, every
    program using one of its maps, and every map those programs use. A leaked object of
    the node is in this set (an old program still attached, or still holding our maps;
    a map made anew and held by one of those): unpinned maps nothing references are
    freed by the kernel once their last process is gone."""

    pinned_maps: dict[str, int]  # pin path -> map id
    progs: frozenset[int]
    maps: frozenset[int]


def node_bpf(node: LabNode) -> NodeBpf:
    def pinned(kind: str) -> dict[str, int]:
        pin_dir = os.path.join(node.bpffs, kind + "s")
        return {
            path: _bpftool(kind, "show", "pinned", path)["id"]
            for path in (os.path.join(pin_dir, name) for name in sorted(os.listdir(pin_dir)))
        }

    pinned_maps, pinned_progs = pinned("map"), set(pinned("prog").values())
    net = json.loads(process.run(node.netns, ["bpftool", "-j", "net", "show"]).stdout)[0]
    attached = {p["id"] for hook in ("xdp", "tc") for p in net.get(hook, [])}
    maps = set(pinned_maps.values())
    progs = pinned_progs | attached
    everything = _bpftool("prog", "show")
    for p in everything:
        if maps & set(p.get("map_ids", [])):
            progs.add(p["id"])
    for p in everything:
        if p["id"] in progs:
            maps |= set(p.get("map_ids", []))
    return NodeBpf(pinned_maps, frozenset(progs), frozenset(maps))


def wait_gone(progs: set[int], maps: set[int], timeout: float = 15.0) -> tuple[set, set]:
    """Wait until none of these ids exist (the kernel frees programs after an RCU grace
    period); what is still there after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        all_progs, all_maps = system_bpf_ids()
        left = progs & all_progs, maps & all_maps
        if not any(left) or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def pins(node: LabNode) -> set[str]:
    out = set()
    for root, dirs, files in os.walk(node.bpffs):
        out |= {os.path.relpath(os.path.join(root, n), node.bpffs) for n in dirs + files}
    return out


_IDS = re.compile(r"\b(id|tag)[ \t]+\S+")
_COUNTERS = re.compile(r"\[\d+:\d+\]")
_LINK_KEYS = ("ifindex", "ifname", "flags", "mtu", "qdisc", "address", "master", "link_netnsid")
_LINK_KEYS += ("promiscuity", "gso_max_size", "gso_max_segs", "gro_max_size")


def _link_line(link: dict) -> str:
    """What a link is (not its timers or operstate): kind, addresses, sizes, XDP program."""
    fields = {k: link.get(k) for k in _LINK_KEYS}
    fields["kind"] = link.get("linkinfo", {}).get("info_kind")
    xdp = link.get("xdp")
    if xdp:
        fields["xdp"] = (xdp.get("mode"), xdp.get("prog", {}).get("name"))
    return json.dumps(fields, sort_keys=True)


def netns_state(ns: str) -> dict[str, str]:
    """Links, addresses, routes, qdiscs, filters and iptables rules of a netns, with
    program ids (a restarted agent attaches fresh programs) and counters masked."""
    links = json.loads(process.run(ns, ["ip", "-j", "-d", "link", "show"]).stdout)
    out = {"ip -d link show": "\n".join(_link_line(link) for link in links)}
    cmds = [["ip", "-o", "addr", "show"], ["ip", "route", "show", "table", "all"]]
    cmds.append(["tc", "qdisc", "show"])
    for link in links:
        for where in ("ingress", "egress"):
            cmds.append(["tc", "filter", "show", "dev", link["ifname"], where])
    cmds.append(["iptables-save"])
    for argv in cmds:
        text = process.run(ns, argv).stdout
        if argv[0] == "iptables-save":
            text = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        out[" ".join(argv)] = _COUNTERS.sub("[n:n]", _IDS.sub(r"\1 N", text))
    return out


def state_diff(before: dict[str, str], after: dict[str, str]) -> str:
    out = []
    for cmd in sorted(set(before) | set(after)):
        a, b = before.get(cmd, ""), after.get(cmd, "")
        if a != b:
            diff = difflib.unified_diff(a.splitlines(), b.splitlines(), lineterm="", n=1)
            out.append(f"$ {cmd}\n" + "\n".join(diff))
    return "\n".join(out)


@dataclasses.dataclass
class Seen:
    """Every BPF object each node had at some point (by netns): all gone after teardown."""

    progs: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    maps: dict[str, set[int]] = dataclasses.field(default_factory=dict)

    def add(self, lab: AgentCluster) -> None:
        for node in lab.agent_nodes:
            got = node_bpf(node)
            self.progs.setdefault(node.netns, set()).update(got.progs)
            self.maps.setdefault(node.netns, set()).update(got.maps)

    def all(self) -> tuple[set[int], set[int]]:
        return set().union(*self.progs.values()), set().union(*self.maps.values())


@pytest.fixture
def seen() -> Iterator[Seen]:
    """Torn down after lab: then none of the objects the lab ever had may exist."""
    before = system_bpf_ids()
    objects = Seen()
    yield objects
    # agent_cluster checked netns, pins, processes and the run dir; now the BPF objects
    progs, maps = objects.all()
    left_progs, left_maps = wait_gone(progs, maps)
    after = system_bpf_ids()
    print(
        f"teardown: the lab's {len(progs)} programs and {len(maps)} maps, "
        f"{len(left_progs)} and {len(left_maps)} left; system-wide (other labs run "
        f"concurrently) programs {len(before[0])} -> {len(after[0])}, "
        f"maps {len(before[1])} -> {len(after[1])}"
    )
    assert not left_progs and not left_maps, (
        f"after teardown the lab's programs {sorted(left_progs)} and maps "
        f"{sorted(left_maps)} still exist"
    )
