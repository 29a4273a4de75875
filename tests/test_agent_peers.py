"""From leases to peers (agent/peers.py): which backend each remote lease gets, and
which leases are ignored and why; and the agent's count of the ignored ones
(flannel_xdp_leases_ignored) over full syncs and watch events, with an in-memory subnets
map. Pure logic: no etcd, no kernel."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp.agent.agent import Agent, AgentOptions
from flannel_xdp.agent.reconcile import Reconciler
from flannel_xdp.backend import Backend
from flannel_xdp.maps.views import Peer
from flannel_xdp.metrics.agent import AgentCollector
from flannel_xdp.node.peers import Ignored, desired_peers, on_link, peer_for
from flannel_xdp.registry.base import EventKind, LeaseEvent
from flannel_xdp.registry.config import parse_config
from flannel_xdp.registry.etcd import Endpoint
from flannel_xdp.registry.lease import LeaseAttrs
from tests.fakes import FakeRoutes, FakeSubnetsMap

pytestmark = pytest.mark.unit

UNDERLAY = IPv4Network("198.18.0.0/24")  # the node's own L2 network
ON_LINK_IP = IPv4Address("198.18.0.7")
OFF_LINK_IP = IPv4Address("198.19.5.7")
MAC = "c6:d2:32:6f:8f:44"
SUBNET = IPv4Network("10.244.3.0/24")


def vxlan_config(**backend):
    return parse_config(
        json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", **backend}})
    )


HOST_GW = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
UDP = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}')


def vxlan_lease(ip: IPv4Address = OFF_LINK_IP, vni: int = 1, mac: str | None = MAC) -> LeaseAttrs:
    return LeaseAttrs(ip, "vxlan", vni=vni, vtep_mac=mac)


def test_vxlan_lease_becomes_a_vxlan_peer():
    got = peer_for(SUBNET, vxlan_lease(), vxlan_config(), [UNDERLAY])
    assert got == Peer(SUBNET, OFF_LINK_IP, Backend.VXLAN, MAC)


def test_vxlan_lease_on_link_without_direct_routing_stays_vxlan():
    got = peer_for(SUBNET, vxlan_lease(ON_LINK_IP), vxlan_config(), [UNDERLAY])
    assert got == Peer(SUBNET, ON_LINK_IP, Backend.VXLAN, MAC)


def test_direct_routing_with_on_link_public_ip_is_host_gw():
    got = peer_for(SUBNET, vxlan_lease(ON_LINK_IP), vxlan_config(DirectRouting=True), [UNDERLAY])
    assert isinstance(got, Peer)
    assert (got.backend, got.public_ip) == (Backend.HOST_GW, ON_LINK_IP)


def test_direct_routing_with_off_link_public_ip_stays_vxlan():
    got = peer_for(SUBNET, vxlan_lease(), vxlan_config(DirectRouting=True), [UNDERLAY])
    assert got == Peer(SUBNET, OFF_LINK_IP, Backend.VXLAN, MAC)


def test_host_gw_lease_on_link_is_a_host_gw_peer():
    got = peer_for(SUBNET, LeaseAttrs(ON_LINK_IP, "host-gw"), HOST_GW, [UNDERLAY])
    assert got == Peer(SUBNET, ON_LINK_IP, Backend.HOST_GW)


def test_host_gw_lease_off_link_is_ignored_with_the_reason():
    got = peer_for(SUBNET, LeaseAttrs(OFF_LINK_IP, "host-gw"), HOST_GW, [UNDERLAY])
    assert isinstance(got, Ignored)
    assert got.subnet == SUBNET
    assert str(OFF_LINK_IP) in got.why
    assert "directly connected" in got.why and "L2" in got.why


@pytest.mark.parametrize(
    ("attrs", "config", "words"),
    [
        (LeaseAttrs(ON_LINK_IP, "host-gw"), vxlan_config(), ("'host-gw'", "'vxlan'")),
        (vxlan_lease(ON_LINK_IP), HOST_GW, ("'vxlan'", "'host-gw'")),
        (LeaseAttrs(ON_LINK_IP, "udp"), vxlan_config(), ("'udp'", "'vxlan'")),
        (vxlan_lease(vni=2), vxlan_config(), ("VNI 2", "(1)")),
        (vxlan_lease(vni=1), vxlan_config(VNI=4096), ("VNI 1", "(4096)")),
        (vxlan_lease(mac=None), vxlan_config(), ("VtepMAC",)),
        (LeaseAttrs(ON_LINK_IP, "udp"), UDP, ("'udp'", "no BPF data path")),
    ],
    ids=[
        "host-gw-lease-in-vxlan-network",
        "vxlan-lease-in-host-gw-network",
        "udp-lease-in-vxlan-network",
        "vni-2-in-vni-1-network",
        "vni-1-in-vni-4096-network",
        "vxlan-without-mac",
        "udp-network",
    ],
)
def test_mismatched_leases_are_ignored_with_the_reason(attrs, config, words):
    got = peer_for(SUBNET, attrs, config, [UNDERLAY])
    assert isinstance(got, Ignored), got
    for word in words:
        assert word in got.why, got.why


@pytest.mark.parametrize(
    ("attrs", "config"),
    [
        (vxlan_lease(IPv4Address("10.244.9.1")), vxlan_config()),
        (vxlan_lease(IPv4Address("10.244.9.1")), vxlan_config(DirectRouting=True)),
        (vxlan_lease(IPv4Address("10.244.3.1")), vxlan_config()),  # inside its own subnet
        (LeaseAttrs(IPv4Address("10.244.9.1"), "host-gw"), HOST_GW),
    ],
    ids=["vxlan", "vxlan-direct-routing", "vxlan-own-subnet", "host-gw"],
)
def test_lease_with_public_ip_inside_the_network_is_refused(attrs, config):
    """Its tunnel endpoint would be routed into the tunnel: a routing loop."""
    got = peer_for(SUBNET, attrs, config, [UNDERLAY, IPv4Network("10.244.9.0/24")])
    assert isinstance(got, Ignored), got
    assert got.subnet == SUBNET
    assert str(attrs.public_ip) in got.why and "10.244.0.0/16" in got.why, got.why
    assert "routing loop" in got.why, got.why


def test_desired_peers_refuses_only_the_lease_inside_the_network():
    own = IPv4Network("10.244.1.0/24")
    looping = IPv4Network("10.244.4.0/24")
    good = {
        IPv4Network("10.244.2.0/24"): vxlan_lease(IPv4Address("198.19.0.2")),
        IPv4Network("10.244.3.0/24"): vxlan_lease(IPv4Address("198.19.0.3")),
    }
    leases = {
        own: vxlan_lease(IPv4Address("198.19.0.1")),
        looping: vxlan_lease(IPv4Address("10.244.2.5")),  # a pod address of 10.244.2.0/24
        **good,
    }
    got = desired_peers(leases, own, vxlan_config(), [UNDERLAY])
    assert got.peers == {s: Peer(s, a.public_ip, Backend.VXLAN, MAC) for s, a in good.items()}
    assert [i.subnet for i in got.ignored] == [looping]
    assert "10.244.2.5" in got.ignored[0].why


def test_desired_peers_skips_own_subnet_and_collects_ignored():
    own = IPv4Network("10.244.1.0/24")
    leases = {
        own: vxlan_lease(IPv4Address("198.18.0.2")),
        IPv4Network("10.244.2.0/24"): vxlan_lease(IPv4Address("198.19.0.2")),
        IPv4Network("10.244.3.0/24"): vxlan_lease(ON_LINK_IP),
        IPv4Network("10.244.4.0/24"): vxlan_lease(vni=7),
        IPv4Network("10.244.5.0/24"): LeaseAttrs(ON_LINK_IP, "host-gw"),
    }
    got = desired_peers(leases, own, vxlan_config(DirectRouting=True), [UNDERLAY])
    assert got.peers == {
        IPv4Network("10.244.2.0/24"): Peer(
            IPv4Network("10.244.2.0/24"), IPv4Address("198.19.0.2"), Backend.VXLAN, MAC
        ),
        IPv4Network("10.244.3.0/24"): Peer(
            IPv4Network("10.244.3.0/24"), ON_LINK_IP, Backend.HOST_GW, MAC
        ),
    }
    assert sorted(str(i.subnet) for i in got.ignored) == ["10.244.4.0/24", "10.244.5.0/24"]


def test_on_link():
    assert on_link(ON_LINK_IP, [IPv4Network("10.0.0.0/8"), UNDERLAY])
    assert not on_link(OFF_LINK_IP, [UNDERLAY])
    assert not on_link(ON_LINK_IP, [])


def test_ingress_hook_follows_the_backend_when_not_given():
    from flannel_xdp.agent.bootstrap import ingress_hook_for
    from flannel_xdp.loader.datapath import DEFAULT_INGRESS_HOOK, IngressHook

    assert ingress_hook_for("host-gw") is IngressHook.TC
    assert ingress_hook_for("vxlan") is DEFAULT_INGRESS_HOOK


# -- flannel_xdp_leases_ignored: the refused leases of the agent's current desired state ------


def kernel_free_agent(config, own: IPv4Network, own_attrs: LeaseAttrs) -> Agent:
    """An Agent past bootstrap whose reconciler has an in-memory map and route table."""
    agent = Agent(AgentOptions(etcd_endpoints=[Endpoint("127.0.0.1", 1, tls=False)]))
    agent.reconciler = Reconciler(
        config, own, own_attrs, FakeSubnetsMap(), FakeRoutes(), [UNDERLAY]
    )
    return agent


def ignored_gauge(agent: Agent) -> float:
    (family,) = [
        m
        for m in AgentCollector(agent.control_plane).collect()
        if m.name == "flannel_xdp_leases_ignored"
    ]
    (sample,) = family.samples
    return sample.value


def test_ignored_leases_gauge_follows_full_syncs_and_watch_events():
    """After every applied change, full sync or watch event, the gauge is the number of
    leases the agent currently refuses: as many as a full sync of the same leases finds,
    each subnet once however often it is refused."""
    config = vxlan_config()
    own, own_attrs = IPv4Network("10.244.1.0/24"), vxlan_lease(IPv4Address("198.19.0.1"))
    good, loop, other = (IPv4Network(f"10.244.{i}.0/24") for i in (2, 4, 5))
    good_attrs = vxlan_lease(IPv4Address("198.19.0.2"))
    looping = vxlan_lease(IPv4Address("10.244.2.5"))  # PublicIP inside the Network: refused
    agent = kernel_free_agent(config, own, own_attrs)
    rec = agent.reconciler
    assert rec is not None
    revision = 10

    def event(subnet: IPv4Network, attrs: LeaseAttrs | None) -> LeaseEvent:
        nonlocal revision
        revision += 1
        kind = EventKind.ADDED if attrs is not None else EventKind.REMOVED
        return LeaseEvent(kind, subnet, attrs, revision)

    def refused_now() -> int:
        return len(desired_peers(rec.leases, own, config, [UNDERLAY]).ignored)

    async def scenario() -> list[tuple[str, float, int]]:
        seen = []
        await rec.full_sync({own: own_attrs, good: good_attrs, loop: looping}, revision)
        seen.append(("full sync", ignored_gauge(agent), refused_now()))
        steps = [
            ("refused PUT", event(other, vxlan_lease(vni=7))),
            ("same subnet refused again", event(other, vxlan_lease(mac=None))),
            ("refused lease made valid", event(loop, vxlan_lease(IPv4Address("198.19.0.4")))),
            ("refused lease deleted", event(other, None)),
            ("valid lease made refused", event(good, looping)),
            ("own lease renewed", event(own, own_attrs)),
        ]
        for what, ev in steps:
            await rec.apply(ev)
            seen.append((what, ignored_gauge(agent), refused_now()))
        await rec.full_sync({**rec.leases}, revision)
        seen.append(("full sync again", ignored_gauge(agent), refused_now()))
        return seen

    seen = asyncio.run(scenario())
    assert [(what, gauge) for what, gauge, _ in seen] == [
        ("full sync", 1),
        ("refused PUT", 2),
        ("same subnet refused again", 2),
        ("refused lease made valid", 1),
        ("refused lease deleted", 0),
        ("valid lease made refused", 1),
        ("own lease renewed", 1),
        ("full sync again", 1),
    ]
    assert all(gauge == refused for _, gauge, refused in seen), seen
    assert set(rec.programmed) == {loop}
    assert rec.status.event_errors == 0


def test_leases_by_backend_follow_events_as_a_full_sync_counts_them():
    """Status.leases_by_backend, kept as events program and unprogram peers, equals what
    a full sync of the same leases counts; a backend with none left is not listed."""
    config = vxlan_config(DirectRouting=True)
    own, own_attrs = IPv4Network("10.244.1.0/24"), vxlan_lease(IPv4Address("198.18.0.1"))
    a, b, c = (IPv4Network(f"10.244.{i}.0/24") for i in (2, 3, 4))
    rec = Reconciler(config, own, own_attrs, FakeSubnetsMap(), FakeRoutes(), [UNDERLAY])
    revision = 1

    def event(subnet: IPv4Network, attrs: LeaseAttrs | None) -> LeaseEvent:
        nonlocal revision
        revision += 1
        kind = EventKind.ADDED if attrs is not None else EventKind.REMOVED
        return LeaseEvent(kind, subnet, attrs, revision)

    async def scenario() -> list[dict[str, int]]:
        seen = []
        await rec.full_sync({own: own_attrs, a: vxlan_lease()}, revision)
        seen.append(dict(rec.status.leases_by_backend))
        for ev in (
            event(b, vxlan_lease(ON_LINK_IP)),  # DirectRouting: on the link, host-gw
            event(c, vxlan_lease()),
            event(a, vxlan_lease(IPv4Address("198.18.0.9"))),  # now on the link too
            event(c, None),
            event(b, None),
        ):
            await rec.apply(ev)
            seen.append(dict(rec.status.leases_by_backend))
        await rec.full_sync({**rec.leases}, revision)
        seen.append(dict(rec.status.leases_by_backend))
        return seen

    assert asyncio.run(scenario()) == [
        {"vxlan": 1},
        {"vxlan": 1, "host-gw": 1},
        {"vxlan": 2, "host-gw": 1},
        {"vxlan": 1, "host-gw": 2},
        {"host-gw": 2},
        {"host-gw": 1},
        {"host-gw": 1},
    ]
