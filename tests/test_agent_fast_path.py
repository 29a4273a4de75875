"""The agent with --udp-fast-path: it finds the pods on cni0 (agent/local_pods.py), its
node then delivers confirmed UDP straight into them, and it keeps the sending side
(bridge_ingress) on cni0. Real agents, a real etcd, flanneld's iptables rules
(conntrack on)."""

from __future__ import annotations

import time

import pytest

from flannel_xdp import netns
from flannel_xdp.loader import datapath
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.maps.views import LocalPodsMap
from tests.lab_support import agent_cluster
from tests.test_fast_path import DATAGRAMS, FAST, send_and_receive, veth_tx_packets

pytestmark = pytest.mark.root

SCAN_WAIT_S = 10
FAST_SEND = ("vxlan", "fast_send")  # the agent scans every defaults.LOCAL_PODS_INTERVAL_S


def test_the_agent_finds_its_pods_and_udp_goes_straight_to_them():
    with agent_cluster(
        nodes=2, pods=1, ingress_hook=IngressHook.KERNEL, udp_fast_path=True, outside=False
    ) as lab:
        a, b = lab.nodes[0].pods[0], lab.nodes[1].pods[0]
        node = lab.nodes[1]
        send_and_receive(a, b)  # node 1 resolves b, cni0 learns b's MAC
        deadline = time.monotonic() + SCAN_WAIT_S
        while True:
            with LocalPodsMap(PinDir(node.bpffs).maps) as m:
                found = m.pods().get(b.ip)
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert found is not None, f"the agent did not put {b.ip} in local_pods"
        wait_for_bridge_program(lab.nodes[0].netns)
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


def bridge_program_attached(ns: str) -> bool:
    with netns.entered(ns):
        return datapath.bridge_program_attached()


def attach_log_lines(node) -> int:
    with open(node.log_file) as f:
        return f.read().count("UDP fast path: sending side attached to cni0")


def wait_for_bridge_program(ns: str) -> None:
    deadline = time.monotonic() + SCAN_WAIT_S
    while not bridge_program_attached(ns) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert bridge_program_attached(ns), "the agent did not attach bridge_ingress to cni0"


def test_the_agent_puts_the_sending_side_back_on_a_new_cni0():
    """cni0 comes with a node's first pod, and is made anew if it is ever deleted: the
    agent attaches bridge_ingress to whatever cni0 there is, within a scan."""
    with agent_cluster(
        nodes=2, pods=1, ingress_hook=IngressHook.KERNEL, udp_fast_path=True, outside=False
    ) as lab:
        node = lab.nodes[0]
        wait_for_bridge_program(node.netns)
        attached_before = attach_log_lines(node)
        with netns.entered(node.netns):
            datapath.detach_bridge()
        assert not bridge_program_attached(node.netns)
        wait_for_bridge_program(node.netns)
        assert attach_log_lines(node) >= attached_before + 1
        before = lab.counters(node)
        send_and_receive(node.pods[0], lab.nodes[1].pods[0])
        sent = lab.counters(node).since(before).traffic.get(FAST_SEND, (0, 0))[0]
        assert sent >= DATAGRAMS - 5
