"""flannel_xdp_leases_ignored end to end: a real agent (in a network namespace of its own,
against a real etcd) counts a lease it refuses as soon as the watch brings it, and stops
counting it as soon as the watch says it went or became usable: no re-listing of the
registry in between (flannel_xdp_map_sync_seconds_count{kind="full"} does not move).

The agent, its node and the helpers are those of test_agent_limits.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from tests.agent_run_support import (
    METRICS,
    AgentRun,
    agent_run_on,
    put_lease,
    subnet,
    wait_programmed,
    wait_until,
)
from tests.etcd_support import etcd_cluster
from tests.node_support import node_netns
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.lab

GAUGE = "flannel_xdp_leases_ignored"
# observed once an event has been applied (the events counter moves before)
APPLIED = "flannel_xdp_map_sync_seconds_count{kind=event}"
FULL_SYNCS = "flannel_xdp_map_sync_seconds_count{kind=full}"
# Inside CONFIG's Network 198.18.0.0/16: peers.py refuses it (a routing loop).
LOOPING_IP = IPv4Address("198.18.101.5")


@pytest.fixture(scope="module")
def etcd():
    with etcd_cluster(1, unix_socket=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    require_root_and_bcc("ip", "tc", "nsenter", "setpriv", "iptables-save")
    with node_netns("fxign") as ns:
        yield ns


@pytest.fixture
def agent_run(etcd, node, tmp_path) -> Iterator[AgentRun]:
    with agent_run_on(etcd, node, tmp_path) as run:
        yield run


def put_refused_lease(run: AgentRun, i: int, vni: int = 1) -> None:
    value = {
        "PublicIP": str(LOOPING_IP),
        "PublicIPv6": None,
        "BackendType": "vxlan",
        "BackendData": {"VNI": vni, "VtepMAC": "0e:00:00:00:ff:01"},
    }
    s = subnet(i)
    run.etcd.put(f"{run.prefix}/subnets/{s.network_address}-{s.prefixlen}", json.dumps(value))


def test_leases_ignored_follows_watch_events(agent_run: AgentRun):
    run = agent_run
    good = put_lease(run, 1)
    run.start("--metrics-ip", METRICS[0], "--metrics-port", str(METRICS[1]))
    run.wait_started()
    wait_programmed(run, {good.subnet: good}, "the first peer")
    m = run.metrics()
    assert m[GAUGE] == 0
    full_syncs, applied = m[FULL_SYNCS], m.get(APPLIED, 0)

    def after_event(what: str) -> dict[str, float]:
        """The scrape once the agent has applied one more watch event."""
        nonlocal applied
        applied += 1
        wait_until(lambda: run.metrics().get(APPLIED, 0) >= applied, what)
        return run.metrics()

    put_refused_lease(run, 2)
    assert after_event("the refused lease's PUT")[GAUGE] == 1
    put_refused_lease(run, 2, vni=7)  # the same subnet, refused again: still one lease
    assert after_event("the refused lease's second PUT")[GAUGE] == 1
    run.etcd.delete(f"{run.prefix}/subnets/{subnet(2).network_address}-24")
    assert after_event("the refused lease's DELETE")[GAUGE] == 0

    put_refused_lease(run, 3)
    assert after_event("another refused lease's PUT")[GAUGE] == 1
    usable = put_lease(run, 3)  # the same subnet, now usable: a peer, no longer ignored
    assert after_event("the lease made usable")[GAUGE] == 0
    wait_programmed(run, {good.subnet: good, usable.subnet: usable}, "both peers")

    m = run.metrics()
    assert m[FULL_SYNCS] == full_syncs, "the registry was listed again: not the watch path"
    assert m["flannel_xdp_event_errors_total"] == 0
    assert run.stop() == 0
    log = run.log()
    assert "Traceback" not in log, log
    assert f"ignoring lease {subnet(2)}: lease PublicIP {LOOPING_IP} is inside" in log
