"""The agent as shipped, no fast-path flag given: it finds the pods on cni0
(agent/local_pods.py), its node then delivers confirmed UDP straight into them, and it
keeps the sending side (pod_ingress) on their veth ends; it marks its pods' TCP flows in
conntrack (node/flow_marks.py), which then take the fast path with conntrack's window
checks on, while conntrack sends it events. On a kernel without the conntrack kfuncs or
tcx (simulated through the probe's test-only FXDP_TEST_KERNEL_LACKS) it runs the stack
path and says why, in its log and its metrics. Real agents, a real etcd, flanneld's
iptables rules (conntrack on)."""

from __future__ import annotations

import time

import pytest

from flannel_xdp import netns
from flannel_xdp.lab import agents
from flannel_xdp.loader import pod_ports
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.fast_path import LACK_ENV, Lack, OffReason
from flannel_xdp.maps.views import LocalPodsMap, NodeConfigMap
from flannel_xdp.node import conntrack
from tests.fast_path_support import (
    DATAGRAMS,
    FAST,
    STREAM,
    send_and_receive,
    tcp_stream,
    veth_tx_packets,
)
from tests.lab_support import agent_cluster
from tests.pod_ports_support import pod_ports_attached

pytestmark = pytest.mark.lab

SCAN_WAIT_S = 10
FAST_SEND = ("vxlan", "fast_send")  # the agent scans every defaults.LOCAL_PODS_INTERVAL_S


def test_the_agent_finds_its_pods_and_udp_goes_straight_to_them():
    with agent_cluster(nodes=2, pods=1, outside=False) as lab:
        a, b = lab.nodes[0].pods[0], lab.nodes[1].pods[0]
        node = lab.nodes[1]
        assert agents.sample(lab.scrape(node), "flannel_xdp_fast_path", proto="udp") == 1
        send_and_receive(a, b)  # node 1 resolves b, cni0 learns b's MAC
        deadline = time.monotonic() + SCAN_WAIT_S
        while True:
            with LocalPodsMap(PinDir(node.bpffs).maps) as m:
                found = m.pods().get(b.ip)
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert found is not None, f"the agent did not put {b.ip} in local_pods"
        wait_for_pod_program(lab.nodes[0].netns, a.host_veth)
        before, veth_before = lab.counters(node), veth_tx_packets(lab, b)
        sender_before = lab.counters(lab.nodes[0])
        send_and_receive(a, b)
        fast = lab.counters(node).since(before).traffic.get(FAST, (0, 0))[0]
        assert fast >= DATAGRAMS - 5
        assert veth_tx_packets(lab, b) - veth_before <= DATAGRAMS - fast + 2
        sent = lab.counters(lab.nodes[0]).since(sender_before).traffic.get(FAST_SEND, (0, 0))[0]
        assert sent >= DATAGRAMS - 5
        with open(node.log_file) as f:
            assert "local pods: 1 added, 0 changed, 0 removed" in f.read()


def pod_program_attached(ns: str, port: str) -> bool:
    with netns.entered(ns):
        return port in pod_ports_attached()


def attach_log_lines(node, port: str) -> int:
    with open(node.log_file) as f:
        return f.read().count(f"fast path: sending side attached to {port}")


def wait_for_pod_program(ns: str, port: str) -> None:
    deadline = time.monotonic() + SCAN_WAIT_S
    while not pod_program_attached(ns, port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pod_program_attached(ns, port), f"the agent did not attach pod_ingress to {port}"


def test_the_agent_puts_the_sending_side_back_on_a_pods_veth_end():
    """The agent attaches pod_ingress to the veth end of every pod it finds, within a
    scan, and again if it is taken off."""
    with agent_cluster(nodes=2, pods=1, outside=False) as lab:
        node = lab.nodes[0]
        a, b = node.pods[0], lab.nodes[1].pods[0]
        send_and_receive(a, b)  # the node resolves a, cni0 learns a's MAC
        wait_for_pod_program(node.netns, a.host_veth)
        attached_before = attach_log_lines(node, a.host_veth)
        with netns.entered(node.netns):
            pod_ports.detach_pod_ports(node.bpffs)
        assert not pod_program_attached(node.netns, a.host_veth)
        wait_for_pod_program(node.netns, a.host_veth)
        assert attach_log_lines(node, a.host_veth) >= attached_before + 1
        before = lab.counters(node)
        send_and_receive(a, b)
        sent = lab.counters(node).since(before).traffic.get(FAST_SEND, (0, 0))[0]
        assert sent >= DATAGRAMS - 5


def tcp_flag(node) -> bool:
    with NodeConfigMap(PinDir(node.bpffs).maps) as m:
        settings = m.read()
    assert settings is not None
    return settings.tcp_fast_path


def wait_for_tcp_flag(lab, node, want: bool) -> None:
    """FAST_TCP in node_config, and the agent's fast_path gauge for TCP, both as want."""

    def gauge() -> float:
        return agents.sample(lab.scrape(node), "flannel_xdp_fast_path", proto="tcp")

    deadline = time.monotonic() + SCAN_WAIT_S
    while (tcp_flag(node), gauge()) != (want, want) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tcp_flag(node) == want, f"FAST_TCP is not {want} on {node.netns}"
    assert gauge() == int(want)


def set_conntrack_events(node, value: str) -> None:
    with netns.entered(node.netns), open(conntrack.sysctl_path(conntrack.EVENTS), "w") as f:
        f.write(value)


def test_tcp_takes_the_fast_path_with_window_checks_on_while_conntrack_sends_events():
    """By default TCP follows conntrack.tcp_fast_path_problem(): on where the agent can
    mark its pods' TCP flows (conntrack's window checks stay on, a new netns's default),
    off while conntrack sends no events."""
    with agent_cluster(nodes=2, pods=1, outside=False) as lab:
        node = lab.nodes[0]
        with netns.entered(node.netns):
            assert conntrack.tcp_be_liberal() is False
        a, b = node.pods[0], lab.nodes[1].pods[0]
        send_and_receive(a, b)  # the node resolves a, cni0 learns a's MAC
        wait_for_pod_program(node.netns, a.host_veth)
        wait_for_tcp_flag(lab, node, True)
        off = {"proto": "tcp", "reason": OffReason.CONNTRACK_TCP.value}
        assert agents.sample(lab.scrape(node), "flannel_xdp_fast_path_off", **off) == 0
        before = lab.counters(node)
        tcp_stream(a, b)
        fast_bytes = lab.counters(node).since(before).traffic.get(FAST_SEND, (0, 0))[1]
        assert fast_bytes >= len(STREAM) * 0.9, f"{fast_bytes} B of the stream took the fast path"

        set_conntrack_events(node, "0")
        try:
            wait_for_tcp_flag(lab, node, False)
            assert agents.sample(lab.scrape(node), "flannel_xdp_fast_path_off", **off) == 1
            before = lab.counters(node)
            tcp_stream(a, b)
            assert lab.counters(node).since(before).traffic.get(FAST_SEND, (0, 0)) == (0, 0)
        finally:
            set_conntrack_events(node, "2")
        wait_for_tcp_flag(lab, node, True)
        with open(node.log_file) as f:
            log = f.read()
        assert "TCP fast path: on: marking TCP flows between" in log
        off_at = log.index("TCP fast path: off: TCP on the fast path needs conntrack's events")
        assert log.index("TCP fast path: on", off_at) > off_at


@pytest.mark.parametrize("lack", list(Lack), ids=[lack.value for lack in Lack])
def test_a_kernel_without_what_the_fast_path_needs_gets_the_stack_path(monkeypatch, lack):
    """The probe reports the kernel lacking the conntrack kfuncs, or tcx: the agent still
    starts and gets ready, logs one line saying what is missing, exports it, attaches no
    program to the pods' veth ends, and traffic crosses the stack path (no fast-path
    counter moves)."""
    monkeypatch.setenv(LACK_ENV, lack.value)  # the agents inherit it (lab.agents.start)
    with agent_cluster(nodes=2, pods=1, outside=False) as lab:
        node, other = lab.nodes
        a, b = node.pods[0], other.pods[0]
        before = lab.counters(node), lab.counters(other)
        send_and_receive(a, b)
        send_and_receive(b, a)
        tcp_stream(a, b)
        time.sleep(2 * SCAN_WAIT_S / 5)  # a scan would have attached pod_ingress by now
        for n, was in zip((node, other), before, strict=True):
            moved = lab.counters(n).since(was).traffic
            assert moved.get(FAST, (0, 0)) == (0, 0) and moved.get(FAST_SEND, (0, 0)) == (0, 0)
            with netns.entered(n.netns):
                assert not pod_ports_attached(), f"pod_ingress attached on {n.netns}"
            samples = lab.scrape(n)
            reason = {Lack.KFUNCS: OffReason.KERNEL_NO_KFUNCS, Lack.TCX: OffReason.KERNEL_NO_TCX}
            for proto, why in (("udp", reason[lack]), ("tcp", OffReason.UDP_OFF)):
                assert agents.sample(samples, "flannel_xdp_fast_path", proto=proto) == 0
                off = agents.sample(samples, "flannel_xdp_fast_path_off", proto=proto, reason=why)
                assert off == 1, f"{proto}: no flannel_xdp_fast_path_off{{reason={why}}}"
            assert agents.sample(samples, "flannel_xdp_ready") == 1
            with open(n.log_file) as f:
                lines = [line for line in f if "fast path: off" in line]
            assert len(lines) == 1, lines
            assert f"{LACK_ENV} says so" in lines[0] and "WARNING" in lines[0], lines[0]
            assert "the stack path carries all pod traffic" in lines[0]
