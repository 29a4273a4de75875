"""The agent with --udp-fast-path: it finds the pods on cni0 (agent/local_pods.py) and
its node then delivers confirmed UDP straight into them. Real agents, a real etcd,
flanneld's iptables rules (conntrack on)."""

from __future__ import annotations

import time

import pytest

from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.maps.views import LocalPodsMap
from tests.lab_support import agent_cluster
from tests.test_fast_path import DATAGRAMS, FAST, send_and_receive, veth_tx_packets

pytestmark = pytest.mark.root

SCAN_WAIT_S = 10  # the agent scans every defaults.LOCAL_PODS_INTERVAL_S


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
        before, veth_before = lab.counters(node), veth_tx_packets(lab, b)
        send_and_receive(a, b)
        fast = lab.counters(node).since(before).traffic.get(FAST, (0, 0))[0]
        assert fast >= DATAGRAMS - 5
        assert veth_tx_packets(lab, b) - veth_before <= DATAGRAMS - fast + 2
        with open(node.log_file) as f:
            assert "local pods: 1 added, 0 changed, 0 removed" in f.read()
