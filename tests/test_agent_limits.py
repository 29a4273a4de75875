"""Capacity of the remote subnets map, and the agent's listening addresses and pin modes.

A real agent (in a network namespace of its own, against a real etcd) runs with
--max-subnets 4. The semantics checked (agent/agent.py, Agent._fit): while the registry
has more usable remote leases than the map holds, the map is never filled with an
arbitrary part of them. It keeps the peers it holds that are still wanted (a changed
lease updates its entry, a removed one goes), takes no new one, the agent logs an error,
counts flannel_xdp_map_capacity_exceeded_total, exports flannel_xdp_subnets_wanted next
to flannel_xdp_map_capacity{map="subnets"}, and /readyz says 503. When the leases fit
again, the map becomes exactly the wanted set and the agent ready.

The map size is --max-subnets end to end: the pinned map's max_entries is what was asked,
also when a restart asks for another size (the map is replaced, entries copied); a size
below what the pinned map holds is refused (exit 2), leaving the data path as it was.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator

import pytest

from flannel_xdp.loader.bpffs import PinDir
from tests.agent_run_support import (
    HEALTHZ,
    METRICS,
    AgentRun,
    agent_run_on,
    delete_lease,
    put_lease,
    subnet,
    wait_programmed,
    wait_until,
)
from tests.etcd_support import etcd_cluster
from tests.node_support import AGENT_TIMEOUT, node_netns
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.lab

CAPACITY = 4


@pytest.fixture(scope="module")
def etcd():
    with etcd_cluster(1, unix_socket=True) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    require_root_and_bcc("ip", "tc", "nsenter", "setpriv", "iptables-save", "ss", "bpftool")
    with node_netns("fxcap") as ns:
        yield ns


@pytest.fixture
def agent_run(etcd, node, tmp_path) -> Iterator[AgentRun]:
    with agent_run_on(etcd, node, tmp_path) as run:
        yield run


def test_more_peers_than_the_map_holds(agent_run: AgentRun):
    run = agent_run
    flags = (
        "--max-subnets", str(CAPACITY),
        "--metrics-ip", METRICS[0], "--metrics-port", str(METRICS[1]),
        "--healthz-ip", HEALTHZ[0], "--healthz-port", str(HEALTHZ[1]),
    )  # fmt: skip
    peers = {p.subnet: p for p in (put_lease(run, i) for i in (1, 2))}
    run.start(*flags)
    run.wait_started()
    assert " INFO flannel_xdp.agent.agent: ready: 2 peers programmed" in str(run.start_line())
    assert run.max_entries() == CAPACITY, "--max-subnets did not size the pinned map"
    wait_programmed(run, peers, "the two first peers")
    assert run.readyz() == 200
    for i in (3, 4):  # up to the capacity: still fine
        p = put_lease(run, i)
        peers[p.subnet] = p
    wait_programmed(run, peers, "four peers, a full map")
    assert run.readyz() == 200
    m = run.metrics()
    assert m["flannel_xdp_map_capacity_exceeded_total"] == 0
    assert m["flannel_xdp_map_capacity{map=subnets}"] == CAPACITY

    # Two more than the map holds: the map keeps exactly the four, and says so.
    extra = {p.subnet: p for p in (put_lease(run, i) for i in (5, 6))}
    wait_until(lambda: run.metrics()["flannel_xdp_subnets_wanted"] == 6, "6 wanted subnets")
    assert run.map() == peers and run.routes() == set(peers), "the full map changed"
    m = run.metrics()
    print(
        "over capacity:",
        {k: v for k, v in m.items() if "capacity" in k or "wanted" in k or "leases" in k},
    )
    assert m["flannel_xdp_map_capacity_exceeded_total"] >= 1
    assert m["flannel_xdp_map_entries{map=subnets}"] == CAPACITY
    assert m["flannel_xdp_ready"] == 0
    assert run.readyz() == 503
    # one error per change of the wanted count: 5 (one lease over), then 6
    errors = [ln for ln in run.log().splitlines() if "subnets map full" in ln]
    error = errors[-1]
    print(error)
    assert " ERROR " in error
    assert "6 remote subnets, the map holds 4 (--max-subnets)" in error
    assert "not programming 2 (198.18.105.0/24, 198.18.106.0/24)" in error

    # While over: a kept peer's changed lease is applied, a removed one goes, nothing new.
    changed = put_lease(run, 2, gen=1)
    peers[changed.subnet] = changed
    wait_programmed(run, peers, "the changed VtepMAC of peer 2")
    delete_lease(run, 1)
    del peers[subnet(1)]
    wait_programmed(run, peers, "peer 1 removed, no newcomer (5 wanted, 4 room)")
    time.sleep(1.0)  # and it stays so
    assert run.map() == peers and run.readyz() == 503

    # Below the capacity again: everything wanted is programmed, and the agent is ready.
    delete_lease(run, 3)
    del peers[subnet(3)]
    peers |= extra
    wait_programmed(run, peers, "the two pending peers once the leases fit")
    wait_until(lambda: run.readyz() == 200, "/readyz 200 once everything fits")
    m = run.metrics()
    assert m["flannel_xdp_subnets_wanted"] == CAPACITY and m["flannel_xdp_ready"] == 1
    assert "fit the subnets map again" in run.log()

    # Hygiene: the endpoints listen where they were told to, the pins are root's only.
    listening = subprocess.run(
        ["nsenter", f"--net=/run/netns/{run.ns}", "ss", "-ltnH"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ports = {line.split()[3] for line in listening.splitlines()}
    assert ports == {f"{METRICS[0]}:{METRICS[1]}", f"{HEALTHZ[0]}:{HEALTHZ[1]}"}, listening
    pins = PinDir(run.bpffs)
    for d in (pins.root, pins.maps, pins.progs):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    assert run.metrics()["flannel_xdp_event_errors_total"] == 0
    assert run.stop() == 0
    assert "Traceback" not in run.log(), run.log()

    # A restart with a bigger --max-subnets gets a bigger map, entries carried over.
    peers |= {p.subnet: p for p in (put_lease(run, i) for i in (7, 8))}
    run.start("--max-subnets", "8", "--healthz-ip", HEALTHZ[0], "--healthz-port", str(HEALTHZ[1]))
    run.wait_started()
    assert run.max_entries() == 8
    wait_programmed(run, peers, "six peers in the resized map")
    wait_until(lambda: run.readyz() == 200, "/readyz after the resize")
    assert not os.path.exists(os.path.join(run.bpffs, "resizing"))
    assert "subnets map: max_entries 4 -> 8" in run.log()
    assert run.stop() == 0
    assert "Traceback" not in run.log(), run.log()

    # A size below what the map holds is refused up front; the data path stays as it was.
    run.start("--max-subnets", "2")
    assert run.proc is not None and run.proc.wait(AGENT_TIMEOUT) == 2
    assert (
        "ERROR flannel_xdp.agent.flags: --max-subnets 2 is below the 6 remote subnets" in run.log()
    )
    assert run.max_entries() == 8 and run.map() == peers and run.routes() == set(peers)


def test_a_fresh_start_over_capacity_programs_nothing_until_it_fits(agent_run: AgentRun):
    """With nothing programmed yet there is nothing to keep: the map stays empty (no
    arbitrary two of the three), the agent is not ready; one lease fewer and all is in."""
    run = agent_run
    peers = {p.subnet: p for p in (put_lease(run, i) for i in (1, 2, 3))}
    run.start("--max-subnets", "2", "--healthz-ip", HEALTHZ[0], "--healthz-port", str(HEALTHZ[1]))
    run.wait_started()
    assert run.max_entries() == 2
    assert run.map() == {} and run.routes() == set()
    assert run.readyz() == 503
    assert "revision" in run.log() and "has 3 remote subnets, the map holds 2" in run.log()
    # The start-up line says so too, as /readyz does: not "ready" with 0 of 3 programmed.
    start_line = run.start_line()
    print(start_line)
    assert start_line is not None and " WARNING " in start_line, start_line
    assert (
        "started but NOT ready: 3 remote subnets wanted, 0 programmed: "
        "the subnets map holds 2 (--max-subnets)"
    ) in start_line, start_line
    assert "flannel_xdp.agent.agent: ready: " not in run.log()
    delete_lease(run, 2)
    del peers[subnet(2)]
    wait_programmed(run, peers, "both peers once they fit")
    wait_until(lambda: run.readyz() == 200, "/readyz 200")
    assert run.stop() == 0
    assert "Traceback" not in run.log(), run.log()
