"""Scrapes race the control loop: /metrics read in a tight loop while 200 leases come and
go. The HTTP server's thread builds every scrape from snapshots the loop publishes, so a
scrape never walks a dict the loop is changing ("dictionary changed size during
iteration" was the failure of a collector that read the loop's live state)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp import netns
from flannel_xdp.node.subnet_env import read_subnet
from tests.agent_run_support import METRICS, AgentRun, agent_run_on, wait_until
from tests.etcd_support import etcd_cluster
from tests.node_support import node_netns
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.lab

LEASES = 200


@pytest.fixture(scope="module")
def etcd():
    with etcd_cluster(1, unix_socket=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    require_root_and_bcc("ip", "tc", "nsenter", "setpriv", "iptables-save")
    with node_netns("fxchurn") as ns:
        yield ns


@pytest.fixture
def agent_run(etcd, node, tmp_path) -> Iterator[AgentRun]:
    with agent_run_on(etcd, node, tmp_path) as run:
        yield run


class Scraper(threading.Thread):
    """GET /metrics from inside the node's netns, back to back, until stopped."""

    def __init__(self, ns: str):
        super().__init__(daemon=True)
        self.ns = ns
        self.done = threading.Event()
        self.scrapes = 0
        self.errors: list[str] = []
        self.lease_gauges: set[float] = set()

    def run(self) -> None:
        with netns.entered(self.ns):
            while not self.done.is_set():
                conn = http.client.HTTPConnection(*METRICS, timeout=5)
                try:
                    conn.request("GET", "/metrics")
                    resp = conn.getresponse()
                    body = resp.read().decode()
                    if resp.status != 200:
                        self.errors.append(f"HTTP {resp.status}: {body[:200]}")
                    else:
                        self.scrapes += 1
                        self.lease_gauges.update(leases_gauge(body))
                except (OSError, http.client.HTTPException) as exc:
                    self.errors.append(repr(exc))
                finally:
                    conn.close()


def leases_gauge(body: str) -> list[float]:
    return [
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith('flannel_xdp_leases{backend="vxlan"}')
    ]


def lease_value(i: int) -> str:
    return json.dumps(
        {
            "PublicIP": str(IPv4Address("198.51.100.0") + i),
            "PublicIPv6": None,
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": f"0e:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}"},
        }
    )


def test_scrapes_during_200_leases_coming_and_going(agent_run: AgentRun):
    agent_run.start("--metrics-ip", METRICS[0], "--metrics-port", str(METRICS[1]))
    agent_run.wait_started()
    own = read_subnet(agent_run.subnet_file)
    assert own is not None
    subnets = [s for s in IPv4Network("198.18.0.0/16").subnets(new_prefix=24) if s != own]
    subnets = subnets[1 : LEASES + 1]

    def key(s: IPv4Network) -> str:
        return f"{agent_run.prefix}/subnets/{s.network_address}-{s.prefixlen}"

    scraper = Scraper(agent_run.ns)
    scraper.start()
    try:
        wait_until(lambda: scraper.scrapes > 0 or bool(scraper.errors), "the first scrape")
        for i, s in enumerate(subnets):
            agent_run.etcd.put(key(s), lease_value(i + 1))
        wait_until(lambda: len(agent_run.map()) == LEASES, "200 peers programmed")
        time.sleep(0.5)
        for s in subnets:
            agent_run.etcd.delete(key(s))
        wait_until(lambda: agent_run.map() == {}, "every peer removed")
        time.sleep(0.5)
    finally:
        scraper.done.set()
        scraper.join(10)
    log = agent_run.log()
    assert scraper.errors == [], scraper.errors[:5]
    assert scraper.scrapes >= 20, f"only {scraper.scrapes} scrapes"
    # the scrapes saw the loop at work, not only before and after it
    assert {0.0, float(LEASES)} <= scraper.lease_gauges
    assert any(0 < g < LEASES for g in scraper.lease_gauges), sorted(scraper.lease_gauges)
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
    metrics = agent_run.metrics()
    assert metrics["flannel_xdp_registry_events_total"] >= 2 * LEASES
    assert metrics["flannel_xdp_event_errors_total"] == 0
