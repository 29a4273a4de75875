"""node.routes against the kernel: the tunnel's routes and neighbours follow the peers.

A scratch network namespace with flannel.1 (a veth here: the routes and neighbours only
need a device that is up and holds the tunnel address).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from pyroute2 import IPRoute

from flannel_xdp import netns
from flannel_xdp.backend import Backend
from flannel_xdp.maps.views import Peer
from flannel_xdp.node import routes
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.lab

SUBNET = IPv4Network("198.18.0.0/24")


def _ip(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, *args], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def ns() -> Iterator[str]:
    require_root_and_bcc("ip")
    name = f"fxr-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        _ip(name, "link", "add", "flannel.1", "type", "veth", "peer", "name", "fxdp.1")
        for dev in ("flannel.1", "fxdp.1"):
            _ip(name, "link", "set", dev, "up")
        with netns.entered(name), IPRoute() as ipr:
            routes.set_tunnel_address(ipr, SUBNET)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _peer(i: int, mac: str = "02:00:00:00:00:01", backend: Backend = Backend.VXLAN) -> Peer:
    return Peer(IPv4Network(f"198.18.{i}.0/24"), IPv4Address(f"192.0.2.{i}"), backend, mac)


def _state(ns: str) -> tuple[dict[str, str], dict[str, str]]:
    """{subnet: gateway} of flannel.1's onlink routes, {address: MAC} of its neighbours."""
    got = json.loads(_ip(ns, "-j", "route", "show", "dev", "flannel.1"))
    neigh = json.loads(_ip(ns, "-j", "neigh", "show", "dev", "flannel.1", "nud", "permanent"))
    return (
        {r["dst"]: r["gateway"] for r in got if "onlink" in r.get("flags", [])},
        {n["dst"]: n["lladdr"] for n in neigh},
    )


def _sync(ns: str, peers: list[Peer]) -> routes.RouteSync:
    with netns.entered(ns), IPRoute() as ipr:
        return routes.sync_peers(ipr, peers)


def test_sync_writes_the_difference_and_removes_what_no_peer_wants(ns: str) -> None:
    peers = [_peer(1), _peer(2), _peer(3, "00:00:00:00:00:00", Backend.HOST_GW)]
    first = _sync(ns, peers)
    assert first == routes.RouteSync(written=3, removed_routes=0, removed_neighbours=0)
    assert _state(ns) == (
        {f"198.18.{i}.0/24": f"198.18.{i}.0" for i in (1, 2, 3)},
        {f"198.18.{i}.0": p.vtep_mac for i, p in zip((1, 2, 3), peers, strict=True)},
    )
    # an adopting restart: the kernel already holds every peer
    assert _sync(ns, peers) == routes.RouteSync(written=0, removed_routes=0, removed_neighbours=0)

    # a peer gone behind the agent's back, another with a new VtepMAC, a stranger's route
    _ip(ns, "route", "add", "198.18.9.0/24", "via", "198.18.9.0", "dev", "flannel.1", "onlink")
    _ip(ns, "neigh", "add", "198.18.9.0", "lladdr", "02:00:00:00:00:09", "dev", "flannel.1",
        "nud", "permanent")  # fmt: skip
    _ip(ns, "route", "del", "198.18.1.0/24")
    peers[1] = _peer(2, "02:00:00:00:00:22")
    again = _sync(ns, peers)
    assert again == routes.RouteSync(written=2, removed_routes=1, removed_neighbours=1)
    got_routes, got_neighbours = _state(ns)
    assert set(got_routes) == {f"198.18.{i}.0/24" for i in (1, 2, 3)}
    assert got_neighbours["198.18.2.0"] == "02:00:00:00:00:22"
    assert "198.18.9.0" not in got_neighbours


def test_sync_of_thousands_of_peers_and_back_to_none(ns: str) -> None:
    many = [
        Peer(IPv4Network(f"198.{18 + i // 65536}.{i // 256 % 256}.{i % 256}/32"),
             IPv4Address("192.0.2.2"), Backend.VXLAN, "02:00:00:00:00:02")
        for i in range(256, 256 + 3000)
    ]  # fmt: skip
    assert _sync(ns, many).written == len(many)
    got_routes, got_neighbours = _state(ns)
    assert len(got_routes) == len(many) and len(got_neighbours) == len(many)
    assert _sync(ns, []) == routes.RouteSync(
        written=0, removed_routes=len(many), removed_neighbours=len(many)
    )
    assert _state(ns) == ({}, {})


def test_sync_without_the_tunnel_is_a_clear_error(ns: str) -> None:
    _ip(ns, "link", "del", "flannel.1")
    with pytest.raises(routes.NodeStateError, match=r"flannel\.1 does not exist"):
        _sync(ns, [_peer(1)])


def test_an_unowned_subnet_is_not_routed_into_the_tunnel_and_a_removed_one_no_longer(
    ns: str,
) -> None:
    """One route per peer, as flanneld keeps them: an address of the Network that no lease
    owns (and one whose lease went) is not sent into flannel.1; the node's other routes
    answer for it (here none: unreachable), as on a flanneld node without
    --ip-blackhole-route."""

    def via(addr: str) -> str:
        res = subprocess.run(
            ["ip", "-n", ns, "-j", "route", "get", addr], capture_output=True, text=True
        )
        return json.loads(res.stdout)[0].get("dev", "") if res.returncode == 0 else "unreachable"

    _sync(ns, [_peer(1), _peer(2)])
    assert via("198.18.1.7") == "flannel.1"
    assert via("198.18.5.7") == "unreachable"
    _sync(ns, [_peer(1)])
    assert via("198.18.2.7") == "unreachable"
    assert via("198.18.1.7") == "flannel.1"
