"""An upgrade from the previous release to this tree under traffic, and a downgrade back.

The previous release is installed from its wheel (tests/release_support.py) into a venv
of its own. A three-node VXLAN lab comes up with every agent of that release. Traffic
crosses one node (the victim) as in tests/test_outage.py (tests/traffic_support.py): a
ping at 100 per second both ways through it, and a sha256-checked TCP stream each way.
Then, as a DaemonSet's rolling update does, the victim's agent gets SIGTERM (its pinned
data path stays and forwards) and this tree's agent starts on the node and adopts it;
later the same back to the previous release. The previous release pinned node_config in
another layout (without fast_flags): each install replaces that map in the layout it was
built with. Nothing may be lost, no stream break, no program drop a packet, and the node
ends as it began.

Three variants (VARIANTS): the stack path throughout (this tree's agents with --fast-path
off); no fast-path flag, the previous release's default being the stack path and this
tree's the fast path; and the fast path asked for, which the previous release has for UDP
only (--udp-fast-path) and this tree for TCP too (--fast-path on --tcp-fast-path). In the
last two the streams move from the stack onto the fast path at the upgrade and back at the
downgrade.

A node that began on this tree, whose underlay program runs on a tcx link the previous
release does not know, goes back to it after `flannel-xdp prepare-downgrade`, and returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from flannel_xdp.backend import Backend
from flannel_xdp.lab import agents
from flannel_xdp.lab.agentcluster import AgentCluster, LabNode
from flannel_xdp.lab.topology import UNDERLAY_IFNAME, Pod
from flannel_xdp.loader import map_upgrades
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.fast_path import Mode
from flannel_xdp.maps import libbpf
from flannel_xdp.maps.layout import Counter, NodeConfig, Reason
from flannel_xdp.maps.views import NodeConfigMap, ReasonsMap, TrafficMap
from tests import node_state_support
from tests.lab_support import agent_cluster
from tests.node_state_support import Seen, netns_state, node_bpf, pins, state_diff, wait_gone
from tests.node_support import prepare_downgrade, underlay_programs
from tests.release_support import PREVIOUS_RELEASE, InstalledRelease, install_release
from tests.traffic_support import POD_SCAN_SETTLE, Pinger, Stream, traffic_through

pytestmark = pytest.mark.lab

seen = node_state_support.seen  # the fixture: none of the lab's BPF objects outlives it

BUILD_INFO = "flannel_xdp_build_info"
FAST_PATH_GAUGE = "flannel_xdp_fast_path"  # {proto}: 1 while it takes the fast path
# What the fast path sent and delivered past the stack (traffic counters' labels).
FAST = (("vxlan", "fast_send"), ("vxlan", "fast_deliver"))


@pytest.fixture(scope="module")
def previous() -> Iterator[InstalledRelease]:
    with tempfile.TemporaryDirectory(prefix="fxdp-release-") as tmp:
        release = install_release(PREVIOUS_RELEASE, Path(tmp))
        assert release.version == PREVIOUS_RELEASE.version, (
            f"the wheel of {PREVIOUS_RELEASE} installed {release.version}"
        )
        this = metadata.version("flannel-xdp")
        assert release.version != this, (
            f"{PREVIOUS_RELEASE} and this tree both call themselves {this}: the upgrade "
            f"could not be told from a restart"
        )
        yield release


def versions(lab: AgentCluster) -> dict[str, str]:
    """The version each agent reports (flannel_xdp_build_info's label)."""
    out = {}
    for node in lab.agent_nodes:
        infos = [dict(labels) for name, labels in lab.scrape(node) if name == BUILD_INFO]
        out[node.netns] = infos[0]["version"] if infos else "?"
    return out


def node_config_size(node: LabNode) -> int:
    """The value size of the node's pinned node_config: which layout it was made in."""
    path = os.path.join(PinDir(node.bpffs).maps, NodeConfigMap.name)
    res = subprocess.run(
        ["bpftool", "-j", "map", "show", "pinned", path], capture_output=True, text=True
    )
    assert res.returncode == 0, f"bpftool map show pinned {path}: {res.stderr}"
    return json.loads(res.stdout)["bytes_value"]


@contextlib.contextmanager
def traffic_each_way(
    lab: AgentCluster, pinging: Pod, victim: Pod, streaming: Pod, tmp: Path
) -> Iterator[tuple[Pinger, Stream, Stream]]:
    """A ping from pinging to the victim pod, and a sha256-checked TCP stream each way
    between the victim and streaming (out, in); killed if the block fails before stopping
    them."""
    with traffic_through(lab, (pinging, victim), (victim, streaming), tmp) as (pinger, out):
        inbound = Stream(streaming, victim, seed=9)
        try:
            yield pinger, out, inbound
        finally:
            inbound.kill()


def replace_release(lab: AgentCluster, node: LabNode, release: agents.AgentRelease) -> float:
    """SIGTERM the node's agent, start it from release; seconds until all converged."""
    code = lab.stop_process(node)
    assert code == 0, f"{node.netns}: the agent exited with {code} on SIGTERM"
    lab.set_release(node, release)
    return lab.restart_process(node)


# A tc filter's program, by name: this tree names its builds of underlay_tc.c apart.
_FILTER_PROGRAM = re.compile(r"(flowid \S+ |name )\w+")


def without_program_names(state: dict[str, str]) -> dict[str, str]:
    return {cmd: _FILTER_PROGRAM.sub(r"\1P", text) for cmd, text in state.items()}


class DropsSeen:
    """The drops counted in every reasons map the nodes had while the test watched. An
    install that meets a reasons map of another layout (another release's list of
    reasons) replaces it and unpins the old one, which its programs count into until
    they are swapped out: so each map is held open from when it is first seen, and read
    with the reasons of the release that made it."""

    def __init__(self) -> None:
        self._maps: dict[int, tuple[str, int, tuple[str, ...], list[int]]] = {}

    def watch(self, node: LabNode, reasons: tuple[str, ...]) -> None:
        """Hold the node's reasons map, made by a release with these reasons. A map first
        seen now counts from now; one made since (by an install) counts from zero."""
        path = os.path.join(PinDir(node.bpffs).maps, ReasonsMap.name)
        fd = libbpf.obj_get(path)
        info = libbpf.map_info(fd)
        if info.id in self._maps:
            os.close(fd)
            return
        assert info.max_entries % len(reasons) == 0, f"{path}: not {len(reasons)} reasons"
        first = not any(ns == node.netns for ns, *_ in self._maps.values())
        start = self._drops(fd, reasons) if first else [0] * info.max_entries
        self._maps[info.id] = (node.netns, fd, reasons, start)

    @staticmethod
    def _drops(fd: int, reasons: tuple[str, ...]) -> list[int]:
        out = []
        for slot in range(libbpf.map_info(fd).max_entries):
            values = (Counter * libbpf.num_possible_cpus())()
            libbpf.lookup(fd, ctypes.c_uint32(slot), values)
            drop = reasons[slot % len(reasons)].startswith("DROP_")
            out.append(sum(v.packets for v in values) if drop else 0)
        return out

    def grown(self) -> dict[str, dict[str, int]]:
        """{netns: {reason: packets}} dropped since watched; closes the maps."""
        out: dict[str, dict[str, int]] = {}
        for ns, fd, reasons, start in self._maps.values():
            for slot, (now, then) in enumerate(zip(self._drops(fd, reasons), start, strict=True)):
                if now > then:
                    reason = reasons[slot % len(reasons)]
                    out.setdefault(ns, {})[reason] = out.get(ns, {}).get(reason, 0) + now - then
        self.close()
        return out

    def close(self) -> None:
        for _, fd, _, _ in self._maps.values():
            os.close(fd)
        self._maps.clear()

    def __enter__(self) -> DropsSeen:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_settled(node: LabNode) -> None:
    for aside in (map_upgrades.STALE_MAPS_DIR, map_upgrades.RESIZE_DIR):
        assert not os.path.exists(os.path.join(node.bpffs, aside)), f"{aside} left behind"


@dataclass(frozen=True)
class Variant:
    """What the agents are told about the fast path: this tree's flags (AgentClusterSpec
    fields), and the previous release's, in its own spelling (None: the same flags)."""

    spec: dict[str, Any]
    previous_args: tuple[str, ...] | None
    tcp_fast: bool  # established TCP takes this tree's fast path


VARIANTS = {
    # the stack path throughout
    "stack-path": Variant({"fast_path": Mode.OFF}, (), tcp_fast=False),
    # no fast-path flag: the previous release's default is the stack path, this tree's the
    # fast path (TCP too, with conntrack's TCP windows unchecked)
    "default": Variant({"conntrack_tcp_be_liberal": True}, None, tcp_fast=True),
    # the fast path asked for: UDP only in the previous release, TCP too in this tree
    "fast-path": Variant(
        {"fast_path": Mode.ON, "tcp_fast_path": True}, ("--udp-fast-path",), tcp_fast=True
    ),
}


@pytest.fixture
def lab(previous: InstalledRelease, seen: Seen, variant: str) -> Iterator[AgentCluster]:
    """Three vxlan nodes, every agent of the previous release, told about the fast path as
    the variant says."""
    args = VARIANTS[variant].previous_args
    release = previous.agent if args is None else previous.with_fast_path_args(*args)
    # ip-masq on: its iptables rules are part of what must end as it began
    with agent_cluster(
        release=release,
        nodes=3,
        pods=1,
        backend=Backend.VXLAN,
        ip_masq=True,
        outside=False,
        **VARIANTS[variant].spec,
    ) as cluster:
        seen.add(cluster)
        yield cluster


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_upgrade_and_downgrade_under_traffic(
    previous: InstalledRelease, variant: str, lab: AgentCluster, seen: Seen, tmp_path: Path
):
    """A rolling update of the three nodes to this tree and one back, under traffic
    through all three: nothing lost, every node's node_config in the layout of the agent
    running it, and each node ends as it began."""
    this = metadata.version("flannel-xdp")
    tcp_fast = VARIANTS[variant].tcp_fast
    victim, other, third = nodes = lab.agent_nodes
    old = lab.release(victim)
    assert set(versions(lab).values()) == {previous.version}
    assert {node_config_size(n) for n in nodes} == {previous.node_config_size}
    assert previous.node_config_size != ctypes.sizeof(NodeConfig), "no layout change"

    this_reasons = tuple(r.name for r in sorted(Reason))
    upgrade: list[float] = []
    downgrade: list[float] = []
    drops = DropsSeen()
    with (
        drops,
        traffic_each_way(lab, other.pods[0], victim.pods[0], third.pods[0], tmp_path) as (
            pinger,
            outbound,
            inbound,
        ),
    ):
        time.sleep(POD_SCAN_SETTLE)
        first = {n.netns: (pins(n), node_bpf(n), netns_state(n.netns)) for n in nodes}
        for node in nodes:
            drops.watch(node, previous.reasons)

        for node in nodes:
            upgrade.append(replace_release(lab, node, agents.THIS_RELEASE))
            drops.watch(node, this_reasons)
            seen.add(lab)
            assert versions(lab)[node.netns] == this
            assert node_config_size(node) == ctypes.sizeof(NodeConfig)
            check_settled(node)
        with TrafficMap(PinDir(victim.bpffs).maps) as traffic:
            before = traffic.by_label()
            time.sleep(POD_SCAN_SETTLE)
            upgraded = {k: n - before[k][0] for k, (n, _) in traffic.by_label().items()}
        tcp_gauge = agents.sample(lab.scrape(victim), FAST_PATH_GAUGE, proto="tcp")
        upgraded_state = netns_state(victim.netns)

        for node in reversed(nodes):
            downgrade.append(replace_release(lab, node, old))
            drops.watch(node, previous.reasons)
            seen.add(lab)
            assert versions(lab)[node.netns] == previous.version
            assert node_config_size(node) == previous.node_config_size
            check_settled(node)
        time.sleep(POD_SCAN_SETTLE)
        pinged = pinger.stop()
        streamed = [outbound.stop(), inbound.stop()]
        dropped = drops.grown()
    fast = {k: upgraded[k] for k in FAST}
    print(
        f"{previous.release} ({previous.version}) -> {this}: nodes ready again in "
        f"{', '.join(f'{t:.1f}' for t in upgrade)} s; back in "
        f"{', '.join(f'{t:.1f}' for t in downgrade)} s; ping {pinged.label}: "
        f"{pinged.answered}/{pinged.sent}; "
        + "; ".join(Stream.figures(r) for r in streamed)
        + f"; {victim.netns} on the fast path in {POD_SCAN_SETTLE} s upgraded: {fast} packets"
    )
    print(f"{victim.netns} upgraded, against the previous release:")
    print(state_diff(first[victim.netns][2], upgraded_state))
    pinged.check()
    for result in streamed:
        Stream.check(result)
    assert not dropped, f"the programs dropped packets meanwhile: {dropped}"
    diff = state_diff(
        without_program_names(first[victim.netns][2]), without_program_names(upgraded_state)
    )
    assert not diff, f"the upgrade changed more than the programs' names:\n{diff}"
    if tcp_fast:
        assert tcp_gauge == 1, "this tree's agent did not turn the TCP fast path on"
        assert all(fast.values()), f"the streams did not take the fast path: {fast}"
    else:
        assert tcp_gauge == 0 and not any(fast.values()), f"the fast path ran: {fast}"

    # every node ends as it began
    for node in nodes:
        first_pins, first_bpf, first_state = first[node.netns]
        assert pins(node) == first_pins, node.netns
        now = node_bpf(node)
        assert len(now.progs) == len(first_bpf.progs), node.netns
        assert len(now.maps) == len(first_bpf.maps), node.netns
        left = wait_gone(seen.progs[node.netns] - now.progs, seen.maps[node.netns] - now.maps)
        assert not any(left), (
            f"{node.netns}: programs {sorted(left[0])} and maps {sorted(left[1])} leaked"
        )
        diff = state_diff(first_state, netns_state(node.netns))
        assert not diff, f"{node.netns}: links, routes, qdiscs, filters or rules:\n{diff}"
        assert lab.process_alive(node) and lab.ready(node)


def test_a_node_begun_on_this_tree_goes_back_after_prepare_downgrade(
    previous: InstalledRelease, seen: Seen, tmp_path: Path
):
    """A node whose agent began on this tree runs its underlay program on a tcx link, which
    the previous release does not know. After this tree's agent stops, `flannel-xdp
    prepare-downgrade` makes that program the underlay's clsact filter; the previous
    release's agent then takes the filter over, and this tree's takes the node back, under
    a ping and a TCP stream each way through the node: nothing lost, no program drops."""
    with agent_cluster(nodes=2, pods=1, backend=Backend.VXLAN, outside=False) as lab:
        seen.add(lab)
        victim, other = lab.agent_nodes
        this_release = lab.release(victim)
        began = underlay_programs(victim.netns)
        assert began["tcx"] and not began["tc"], began
        this_reasons = tuple(r.name for r in sorted(Reason))
        drops = DropsSeen()
        with (
            drops,
            traffic_each_way(lab, other.pods[0], victim.pods[0], other.pods[0], tmp_path) as (
                pinger,
                outbound,
                inbound,
            ),
        ):
            time.sleep(POD_SCAN_SETTLE)
            for node in lab.agent_nodes:
                drops.watch(node, this_reasons)
            assert lab.stop_process(victim) == 0
            prepared = prepare_downgrade(victim.netns, victim.bpffs, UNDERLAY_IFNAME)
            moved = underlay_programs(victim.netns)
            lab.set_release(victim, previous.agent)
            lab.restart_process(victim)
            drops.watch(victim, previous.reasons)
            seen.add(lab)
            went_back = versions(lab)[victim.netns]
            downgraded = underlay_programs(victim.netns)
            config_size = node_config_size(victim)
            check_settled(victim)
            replace_release(lab, victim, this_release)
            drops.watch(victim, this_reasons)
            seen.add(lab)
            returned = underlay_programs(victim.netns)
            time.sleep(POD_SCAN_SETTLE)
            pinged = pinger.stop()
            streamed = [outbound.stop(), inbound.stop()]
            dropped = drops.grown()
    assert prepared.returncode == 0, prepared.stderr
    assert moved == {"xdp": [], "tc": began["tcx"], "tcx": []}, (began, moved)
    assert went_back == previous.version
    assert config_size == previous.node_config_size
    # the previous release's own build replaced the filter: one program, not the moved one
    assert len(downgraded["tc"]) == 1 and downgraded["tc"] != moved["tc"], downgraded
    assert not downgraded["tcx"] and not downgraded["xdp"], downgraded
    # this tree keeps the underlay's filter where it found one
    assert len(returned["tc"]) == 1 and not returned["tcx"], returned
    pinged.check()
    for result in streamed:
        Stream.check(result)
    assert not dropped, f"the programs dropped packets meanwhile: {dropped}"
