"""The etcd registry against a real etcd 3.4: flanneld's key and value format, foreign
writers, watch events, compaction recovery (registry and the agent's relist path) and
endpoint failover. No network namespace and no BPF: everything here talks to etcd on
127.0.0.1 or over its unix socket only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from flannel_xdp.agent import agent as agent_module
from flannel_xdp.agent.agent import LEASE_TTL, Agent, AgentExit, AgentOptions
from flannel_xdp.agent.config import parse_config
from flannel_xdp.agent.interface import Underlay
from flannel_xdp.agent.lease import LeaseAttrs
from flannel_xdp.agent.registry import (
    Compacted,
    EtcdRegistry,
    EventKind,
    LeaseEvent,
    RegistryUnavailable,
    parse_endpoints,
)
from flannel_xdp.maps.layout import Backend
from flannel_xdp.maps.views import ApplyResult, Peer
from tests.etcd_support import EtcdCluster, etcd_cluster, free_ports

# The key pattern flannel itself uses (shared/flannel-compat.md), verbatim.
FLANNEL_KEY_RE = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")
# The lease value of shared/flannel-compat.md, byte for byte.
FLANNEL_VXLAN_VALUE = (
    b'{"PublicIP":"192.0.2.3","PublicIPv6":null,"BackendType":"vxlan",'
    b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
)
VXLAN_CONFIG = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'


def vxlan_value(ip: str, mac: str, vni: int = 1) -> str:
    """A lease value as flanneld writes it (Go's encoding/json, field order, no spaces)."""
    return (
        f'{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan",'
        f'"BackendData":{{"VNI":{vni},"VtepMAC":"{mac}"}}}}'
    )


def host_gw_value(ip: str) -> str:
    return f'{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"host-gw","BackendData":null}}'


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def key_of(prefix: str, subnet: str) -> str:
    n = net(subnet)
    return f"{prefix}/subnets/{n.network_address}-{n.prefixlen}"


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def next_events(gen: AsyncIterator[LeaseEvent], n: int, timeout: float = 5.0):
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(anext(gen), timeout))
    return out


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or cond}")
        await asyncio.sleep(0.01)


def summary(events: Iterable[LeaseEvent]) -> list[tuple[str, str, LeaseAttrs | None]]:
    return [(e.kind.value, str(e.subnet), e.attrs) for e in events]


@pytest.fixture(scope="module")
def etcd() -> Iterable[EtcdCluster]:
    with etcd_cluster(1, unix_socket=True) as cluster:
        yield cluster


# -- format -------------------------------------------------------------------------------


def test_written_leases_match_flanneld_key_json_and_ttl(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    vxlan = LeaseAttrs(IPv4Address("192.0.2.3"), "vxlan", vni=1, vtep_mac="c6:d2:32:6f:8f:44")
    host_gw = LeaseAttrs(IPv4Address("192.0.2.4"), "host-gw")

    async def scenario():
        reg = etcd.registry(prefix)
        try:
            assert await reg.create_lease(net("10.244.3.0/24"), vxlan, LEASE_TTL)
            assert await reg.create_lease(net("10.244.4.0/24"), host_gw, 600)
            # Created only if absent: a second writer for the same subnet loses.
            assert not await reg.create_lease(net("10.244.3.0/24"), host_gw, 600)
        finally:
            await reg.close()

    run(scenario())

    k3, k4 = key_of(prefix, "10.244.3.0/24"), key_of(prefix, "10.244.4.0/24")
    assert etcd.keys(prefix) == [k3, k4]
    m = FLANNEL_KEY_RE.search(k3)
    assert m is not None and m.groups() == ("10.244.3.0", "24", None, None)
    assert k3.removesuffix(m.group(0)) == f"{prefix}/subnets/"
    assert etcd.get_raw(k3) == FLANNEL_VXLAN_VALUE
    assert etcd.get_raw(k4) == host_gw_value("192.0.2.4").encode()

    for key, ttl in ((k3, LEASE_TTL), (k4, 600)):
        kv = etcd.get_kv(key)
        assert kv is not None and kv.get("lease"), f"{key} is not attached to an etcd lease"
        info = json.loads(etcd.etcdctl("lease", "timetolive", f"{kv['lease']:x}", "-w", "json"))
        assert info["granted-ttl"] == ttl
        assert ttl - 30 <= info["ttl"] <= ttl


def test_renewal_keeps_the_format_under_a_fresh_etcd_lease(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    attrs = LeaseAttrs(IPv4Address("192.0.2.3"), "vxlan", vni=1, vtep_mac="c6:d2:32:6f:8f:44")

    async def scenario():
        reg = etcd.registry(prefix)
        try:
            assert await reg.create_lease(net("10.244.3.0/24"), attrs, 300)
            before = etcd.get_kv(key_of(prefix, "10.244.3.0/24"))
            await reg.renew_lease(net("10.244.3.0/24"), attrs, LEASE_TTL)
            return before
        finally:
            await reg.close()

    before = run(scenario())
    after = etcd.get_kv(key_of(prefix, "10.244.3.0/24"))
    assert after is not None and after["lease"] and after["lease"] != before["lease"]
    assert etcd.get_raw(key_of(prefix, "10.244.3.0/24")) == FLANNEL_VXLAN_VALUE
    info = json.loads(etcd.etcdctl("lease", "timetolive", f"{after['lease']:x}", "-w", "json"))
    assert info["granted-ttl"] == LEASE_TTL


# -- foreign writers, listing and watching -------------------------------------------------

MALFORMED = {
    "10.244.20.0/24": "this is not JSON",
    "10.244.21.0/24": '["PublicIP"]',
    "10.244.22.0/24": vxlan_value("192.0.2.22", "not-a-mac"),
    "10.244.23.0/24": vxlan_value("192.0.2.23", "c6:d2:32:6f:8f:23", vni=0),
    "10.244.24.0/24": '{"PublicIP":"192.0.2.300","BackendType":"host-gw"}',
}


def test_foreign_leases_are_listed_and_malformed_ones_skipped(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    etcd.put(f"{prefix}/config", VXLAN_CONFIG)
    etcd.put(key_of(prefix, "10.244.3.0/24"), FLANNEL_VXLAN_VALUE.decode())
    etcd.put(key_of(prefix, "10.244.4.0/24"), host_gw_value("192.0.2.4"))
    # Go decodes JSON keys case-insensitively; a hand-written lease may rely on it.
    etcd.put(key_of(prefix, "10.244.5.0/24"), '{"publicip":"192.0.2.5","backendtype":"host-gw"}')
    for subnet, value in MALFORMED.items():
        etcd.put(key_of(prefix, subnet), value)
    etcd.put(f"{prefix}/subnets/not-a-subnet", host_gw_value("192.0.2.9"))
    etcd.put(f"{prefix}/subnets/10.244.6.0-24&fd00:12:13::-56", FLANNEL_VXLAN_VALUE.decode())

    async def scenario():
        reg = etcd.registry(prefix)
        try:
            return await reg.get_config(), await reg.list_leases()
        finally:
            await reg.close()

    config, listing = run(scenario())
    assert str(config.network) == "10.244.0.0/16"
    assert listing.leases == {
        net("10.244.3.0/24"): LeaseAttrs(
            IPv4Address("192.0.2.3"), "vxlan", vni=1, vtep_mac="c6:d2:32:6f:8f:44"
        ),
        net("10.244.4.0/24"): LeaseAttrs(IPv4Address("192.0.2.4"), "host-gw"),
        net("10.244.5.0/24"): LeaseAttrs(IPv4Address("192.0.2.5"), "host-gw"),
    }
    assert sorted(listing.skipped) == sorted(
        [key_of(prefix, s) for s in MALFORMED]
        + [f"{prefix}/subnets/not-a-subnet", f"{prefix}/subnets/10.244.6.0-24&fd00:12:13::-56"]
    )
    assert listing.revision == etcd.revision()


def test_watch_delivers_foreign_adds_changes_and_removals_past_malformed_values(
    etcd: EtcdCluster,
):
    prefix = etcd.new_prefix()
    etcd.put(key_of(prefix, "10.244.9.0/24"), host_gw_value("192.0.2.9"))
    mac1, mac2 = "c6:d2:32:6f:8f:01", "c6:d2:32:6f:8f:02"
    a1 = LeaseAttrs(IPv4Address("192.0.2.1"), "vxlan", vni=1, vtep_mac=mac1)
    a1b = LeaseAttrs(IPv4Address("192.0.2.1"), "vxlan", vni=1, vtep_mac=mac2)
    a3 = LeaseAttrs(IPv4Address("192.0.2.3"), "host-gw")
    a4 = LeaseAttrs(IPv4Address("192.0.2.4"), "vxlan", vni=1, vtep_mac="c6:d2:32:6f:8f:04")

    async def scenario():
        reg = etcd.registry(prefix)
        try:
            listing = await reg.list_leases()
            assert list(listing.leases) == [net("10.244.9.0/24")]
            gen = reg.watch_leases(listing.revision + 1)
            # Written before the first event is read: replayed from the start revision.
            etcd.put(key_of(prefix, "10.244.1.0/24"), vxlan_value("192.0.2.1", mac1))
            first = await next_events(gen, 1)
            # Written while the watch is open: delivered live.
            for subnet, value in MALFORMED.items():
                await asyncio.to_thread(etcd.put, key_of(prefix, subnet), value)
            await asyncio.to_thread(etcd.put, f"{prefix}/subnets/junk", "{}")
            await asyncio.to_thread(
                etcd.put, key_of(prefix, "10.244.3.0/24"), host_gw_value("192.0.2.3")
            )
            await asyncio.to_thread(
                etcd.put, key_of(prefix, "10.244.1.0/24"), vxlan_value("192.0.2.1", mac2)
            )
            await asyncio.to_thread(etcd.delete, key_of(prefix, "10.244.1.0/24"))
            await asyncio.to_thread(etcd.delete, key_of(prefix, "10.244.9.0/24"))
            await asyncio.to_thread(etcd.put, key_of(prefix, "10.244.4.0/24"), a4.to_json())
            rest = await next_events(gen, 5)
            await gen.aclose()
            return first + rest
        finally:
            await reg.close()

    events = run(scenario())
    assert summary(events) == [
        ("added", "10.244.1.0/24", a1),
        ("added", "10.244.3.0/24", a3),
        ("added", "10.244.1.0/24", a1b),
        ("removed", "10.244.1.0/24", None),
        ("removed", "10.244.9.0/24", None),
        ("added", "10.244.4.0/24", a4),
    ]
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert events[-1].revision == etcd.revision()
    assert events[0].kind is EventKind.ADDED


# -- compaction ----------------------------------------------------------------------------


def test_watch_from_a_compacted_revision_raises_compacted_and_a_relist_recovers(
    etcd: EtcdCluster,
):
    prefix = etcd.new_prefix()
    etcd.put(key_of(prefix, "10.244.1.0/24"), host_gw_value("192.0.2.1"))
    etcd.put(key_of(prefix, "10.244.2.0/24"), host_gw_value("192.0.2.2"))

    async def scenario():
        reg = etcd.registry(prefix)
        try:
            before = await reg.list_leases()
            etcd.delete(key_of(prefix, "10.244.1.0/24"))
            etcd.put(key_of(prefix, "10.244.3.0/24"), host_gw_value("192.0.2.3"))
            etcd.put(key_of(prefix, "10.244.2.0/24"), host_gw_value("192.0.2.22"))
            compacted_at = etcd.revision()
            etcd.compact(compacted_at)
            with pytest.raises(Compacted) as caught:
                gen = reg.watch_leases(before.revision + 1)
                await next_events(gen, 1)
            after = await reg.list_leases()
            # After the relist the watch goes on from the new revision.
            gen = reg.watch_leases(after.revision + 1)
            etcd.put(key_of(prefix, "10.244.4.0/24"), host_gw_value("192.0.2.4"))
            (ev,) = await next_events(gen, 1)
            await gen.aclose()
            return before, after, caught.value, compacted_at, ev
        finally:
            await reg.close()

    before, after, exc, compacted_at, ev = run(scenario())
    assert exc.revision == compacted_at
    assert "compacted" in str(exc)
    # list + diff gives the state the missed events would have produced
    added = {s: a for s, a in after.leases.items() if before.leases.get(s) != a}
    removed = set(before.leases) - set(after.leases)
    assert added == {
        net("10.244.2.0/24"): LeaseAttrs(IPv4Address("192.0.2.22"), "host-gw"),
        net("10.244.3.0/24"): LeaseAttrs(IPv4Address("192.0.2.3"), "host-gw"),
    }
    assert removed == {net("10.244.1.0/24")}
    assert (ev.kind, ev.subnet) == (EventKind.ADDED, net("10.244.4.0/24"))


class FakeSubnetsMap:
    """The pinned subnets map's interface, in memory (the agent's view of the data path)."""

    max_entries = 16384

    def __init__(self):
        self.entries: dict[IPv4Network, Peer] = {}

    def peers(self) -> dict[IPv4Network, Peer]:
        return dict(self.entries)

    def apply(self, desired) -> ApplyResult:
        want = {p.subnet: p for p in desired}
        added = sum(1 for s in want if s not in self.entries)
        changed = sum(1 for s, p in want.items() if s in self.entries and self.entries[s] != p)
        removed = sum(1 for s in self.entries if s not in want)
        self.entries = want
        return ApplyResult(added=added, changed=changed, removed=removed)

    def upsert(self, peer: Peer) -> None:
        self.entries[peer.subnet] = peer

    def remove(self, subnet: IPv4Network) -> bool:
        return self.entries.pop(subnet, None) is not None

    def close(self) -> None:
        pass


OWN = net("10.244.1.0/24")
OWN_ATTRS = LeaseAttrs(IPv4Address("198.18.0.10"), "vxlan", vni=1, vtep_mac="0a:00:00:00:00:01")


def peer(subnet: str, ip: str, mac: str) -> Peer:
    return Peer(net(subnet), IPv4Address(ip), Backend.VXLAN, mac)


def kernel_free_agent(monkeypatch, cluster: EtcdCluster, prefix: str, **registry_kw) -> Agent:
    """An Agent past start(): real registry, an in-memory map, routes only recorded.

    The config and our own lease are put in etcd first, as start() would have left them.
    """
    cluster.put(f"{prefix}/config", VXLAN_CONFIG)
    cluster.put(key_of(prefix, str(OWN)), OWN_ATTRS.to_json())
    routes: list[tuple[str, object]] = []
    monkeypatch.setattr(
        Agent, "_sync_routes", staticmethod(lambda peers, vni, *_: routes.append(("sync", peers)))
    )
    monkeypatch.setattr(
        Agent, "_add_route", staticmethod(lambda p, vni, *_: routes.append(("add", p.subnet)))
    )
    monkeypatch.setattr(
        Agent, "_remove_route", staticmethod(lambda s, vni: routes.append(("remove", s)))
    )
    agent = Agent(AgentOptions(etcd_endpoints=cluster.endpoints, etcd_prefix=prefix))
    if registry_kw:
        agent.registry = EtcdRegistry(cluster.endpoints, prefix=prefix, **registry_kw)
    agent.config = parse_config(VXLAN_CONFIG)
    agent.underlay = Underlay("eth0", 2, IPv4Interface("198.18.0.10/24"), 1500)
    agent.subnet, agent.attrs = OWN, OWN_ATTRS
    agent.subnets_map = FakeSubnetsMap()  # type: ignore[assignment]
    agent.routes = routes  # type: ignore[attr-defined]
    return agent


@pytest.fixture
def agent_without_kernel(monkeypatch, etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    return kernel_free_agent(monkeypatch, etcd, prefix), prefix


async def _stop(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_agent_relists_after_compaction_and_goes_on_watching(etcd, agent_without_kernel, caplog):
    agent, prefix = agent_without_kernel
    fake: FakeSubnetsMap = agent.subnets_map
    m2, m3, m5 = "0a:00:00:00:00:02", "0a:00:00:00:00:03", "0a:00:00:00:00:05"
    etcd.put(key_of(prefix, "10.244.2.0/24"), vxlan_value("198.18.0.2", m2))
    caplog.set_level(logging.INFO, logger="flannel_xdp.agent")

    async def scenario():
        try:
            await agent._relist()
            assert fake.entries == {net("10.244.2.0/24"): peer("10.244.2.0/24", "198.18.0.2", m2)}
            seen = agent._revision
            # While the agent is not watching: one lease goes, two come, history is compacted.
            etcd.delete(key_of(prefix, "10.244.2.0/24"))
            etcd.put(key_of(prefix, "10.244.3.0/24"), vxlan_value("198.18.0.3", m3))
            etcd.put(key_of(prefix, "10.244.4.0/24"), host_gw_value("198.18.0.4"))
            etcd.compact(etcd.revision())
            task = asyncio.create_task(agent._watch_loop())
            await wait_until(lambda: agent.stats.full_syncs == 2, what="the relist")
            assert agent._revision > seen
            assert fake.entries == {net("10.244.3.0/24"): peer("10.244.3.0/24", "198.18.0.3", m3)}
            assert net("10.244.4.0/24") in agent.leases  # listed, but ignored: host-gw lease
            # and the watch goes on from the relisted revision
            await asyncio.to_thread(
                etcd.put, key_of(prefix, "10.244.5.0/24"), vxlan_value("198.18.0.5", m5)
            )
            await wait_until(lambda: net("10.244.5.0/24") in fake.entries, what="10.244.5.0/24")
            await asyncio.to_thread(etcd.delete, key_of(prefix, "10.244.3.0/24"))
            await wait_until(lambda: net("10.244.3.0/24") not in fake.entries, what="removal")
            assert not task.done()
            await _stop(task)
        finally:
            await agent.registry.close()

    run(scenario())
    assert fake.entries == {net("10.244.5.0/24"): peer("10.244.5.0/24", "198.18.0.5", m5)}
    assert agent.stats.full_syncs == 2 and agent.stats.event_errors == 0
    assert ("add", net("10.244.5.0/24")) in agent.routes
    assert ("remove", net("10.244.3.0/24")) in agent.routes
    assert any("has been compacted" in r.getMessage() for r in caplog.records)
    synced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("synced")]
    assert "(1 added, 0 changed, 0 removed)" in synced[0]
    assert "(1 added, 0 changed, 1 removed)" in synced[1]
    assert any("ignoring lease 10.244.4.0/24" in r.getMessage() for r in caplog.records)


def test_agent_exits_when_its_own_lease_is_deleted(etcd, agent_without_kernel):
    agent, prefix = agent_without_kernel

    async def scenario():
        try:
            await agent._relist()
            task = asyncio.create_task(agent._watch_loop())
            await asyncio.sleep(0.2)
            await asyncio.to_thread(etcd.delete, key_of(prefix, str(OWN)))
            await asyncio.wait_for(asyncio.shield(task), 5)
        finally:
            await agent.registry.close()

    with pytest.raises(AgentExit) as caught:
        run(scenario())
    assert caught.value.code == 1
    assert "Lease has been revoked" in str(caught.value)


# -- endpoints and failover ------------------------------------------------------------------


def test_unix_socket_endpoint(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    attrs = LeaseAttrs(IPv4Address("192.0.2.3"), "host-gw")

    async def scenario():
        reg = EtcdRegistry(parse_endpoints(etcd.members[0].unix_url), prefix=prefix)
        try:
            assert await reg.create_lease(net("10.244.7.0/24"), attrs, 60)
            return await reg.list_leases()
        finally:
            await reg.close()

    listing = run(scenario())
    assert listing.leases == {net("10.244.7.0/24"): attrs}
    assert etcd.get_raw(key_of(prefix, "10.244.7.0/24")) == attrs.to_json().encode()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_dead_endpoint_first_fails_over_to_the_live_one(etcd: EtcdCluster, tmp_path, kind):
    prefix = etcd.new_prefix()
    etcd.put(f"{prefix}/config", VXLAN_CONFIG)
    if kind == "tcp":
        dead, live = f"http://127.0.0.1:{free_ports(1)[0]}", etcd.members[0].url
    else:
        dead, live = f"unix://{tmp_path}/absent.sock", etcd.members[0].unix_url
    attrs = LeaseAttrs(IPv4Address("192.0.2.3"), "host-gw")

    async def scenario():
        reg = EtcdRegistry(parse_endpoints(f"{dead},{live}"), prefix=prefix, timeout=2)
        try:
            started = time.monotonic()
            config = await reg.get_config()
            took = time.monotonic() - started
            assert str(reg.endpoint) == live
            assert await reg.create_lease(net("10.244.8.0/24"), attrs, 60)
            listing = await reg.list_leases()
            return config, listing, took
        finally:
            await reg.close()

    config, listing, took = run(scenario())
    assert str(config.network) == "10.244.0.0/16"
    assert listing.leases == {net("10.244.8.0/24"): attrs}
    assert took < 2.0, f"failing over from a refused endpoint took {took:.2f} s"


def test_no_live_endpoint_raises_registry_unavailable(tmp_path):
    dead = [f"http://127.0.0.1:{p}" for p in free_ports(2)] + [f"unix://{tmp_path}/none.sock"]

    async def scenario():
        reg = EtcdRegistry(parse_endpoints(",".join(dead)), timeout=2)
        try:
            await reg.list_leases()
        finally:
            await reg.close()

    with pytest.raises(RegistryUnavailable) as caught:
        run(scenario())
    for url in dead:
        assert url in str(caught.value)


def test_three_members_stop_the_one_in_use_and_calls_go_on():
    with etcd_cluster(3) as cluster:
        leader = cluster.leader()
        # The member in use is a follower: the survivors keep their leader and quorum.
        order = [i for i in range(3) if i != leader] + [leader]
        urls = [cluster.members[i].url for i in order]
        prefix = cluster.new_prefix()
        cluster.put(f"{prefix}/config", VXLAN_CONFIG)
        a1 = LeaseAttrs(IPv4Address("192.0.2.1"), "host-gw")
        a2 = LeaseAttrs(IPv4Address("192.0.2.2"), "host-gw")
        a3 = LeaseAttrs(IPv4Address("192.0.2.3"), "host-gw")

        async def scenario():
            reg = EtcdRegistry(parse_endpoints(",".join(urls)), prefix=prefix, timeout=3)
            try:
                await reg.get_config()
                assert str(reg.endpoint) == urls[0]
                listing = await reg.list_leases()
                gen = reg.watch_leases(listing.revision + 1)
                await asyncio.to_thread(cluster.put, key_of(prefix, "10.244.1.0/24"), a1.to_json())
                (first,) = await next_events(gen, 1)
                cluster.members[order[0]].stop()
                # The open watch on the stopped member breaks ...
                with pytest.raises(RegistryUnavailable):
                    await next_events(gen, 1)
                # ... meanwhile another node writes through the survivors ...
                await asyncio.to_thread(cluster.put, key_of(prefix, "10.244.2.0/24"), a2.to_json())
                # ... and our calls go on through the next member,
                assert await reg.create_lease(net("10.244.3.0/24"), a3, 60)
                assert str(reg.endpoint) == urls[1]
                listing = await reg.list_leases()
                # and a watch resumed after the last event seen misses nothing.
                gen = reg.watch_leases(first.revision + 1)
                resumed = await next_events(gen, 2)
                await gen.aclose()
                return first, listing, resumed
            finally:
                await reg.close()

        first, listing, resumed = run(scenario())
    assert (first.kind, first.subnet, first.attrs) == (EventKind.ADDED, net("10.244.1.0/24"), a1)
    assert listing.leases == {
        net("10.244.1.0/24"): a1,
        net("10.244.2.0/24"): a2,
        net("10.244.3.0/24"): a3,
    }
    assert summary(resumed) == [
        ("added", "10.244.2.0/24", a2),
        ("added", "10.244.3.0/24", a3),
    ]


def test_three_members_stop_the_leader_and_calls_resume_after_the_election():
    with etcd_cluster(3) as cluster:
        leader = cluster.leader()
        order = [leader] + [i for i in range(3) if i != leader]
        urls = [cluster.members[i].url for i in order]
        prefix = cluster.new_prefix()
        cluster.put(f"{prefix}/config", VXLAN_CONFIG)

        async def scenario():
            reg = EtcdRegistry(parse_endpoints(",".join(urls)), prefix=prefix, timeout=2)
            try:
                await reg.get_config()
                cluster.members[leader].stop()
                started = time.monotonic()
                attempts = 0
                while True:  # what the agent's loops do: retry with a short backoff
                    attempts += 1
                    try:
                        await reg.get_config()
                        break
                    except RegistryUnavailable:
                        if time.monotonic() - started > 15:
                            raise
                        await asyncio.sleep(0.1)
                return time.monotonic() - started, attempts, str(reg.endpoint)
            finally:
                await reg.close()

        took, attempts, endpoint = run(scenario(), timeout=40)
    assert endpoint in urls[1:]
    assert took < 10, f"no answer {took:.1f} s after the leader stopped ({attempts} attempts)"


def test_hung_member_calls_time_out_and_fail_over():
    with etcd_cluster(3) as cluster:
        leader = cluster.leader()
        order = [i for i in range(3) if i != leader] + [leader]
        urls = [cluster.members[i].url for i in order]
        prefix = cluster.new_prefix()
        cluster.put(f"{prefix}/config", VXLAN_CONFIG)

        async def scenario():
            reg = EtcdRegistry(parse_endpoints(",".join(urls)), prefix=prefix, timeout=1)
            try:
                await reg.get_config()
                cluster.members[order[0]].pause()
                started = time.monotonic()
                await reg.get_config()
                return time.monotonic() - started, str(reg.endpoint)
            finally:
                await reg.close()

        took, endpoint = run(scenario())
    assert endpoint == urls[1]
    assert 0.9 < took < 3, f"failing over from a hung member took {took:.2f} s"


def test_agent_keeps_following_the_registry_through_a_hung_and_a_dead_member(monkeypatch):
    """The agent's watch loop: a hung member is noticed by the probe beside the watch, a
    dead one by the watch itself; either way the agent goes on through the next member
    and misses no lease written meanwhile."""
    with etcd_cluster(3) as cluster:
        leader = cluster.leader()
        order = [i for i in range(3) if i != leader] + [leader]  # followers first
        members = [cluster.members[i] for i in order]
        prefix = cluster.new_prefix()
        endpoints = parse_endpoints(",".join(m.url for m in members))
        agent = kernel_free_agent(monkeypatch, cluster, prefix)
        agent.registry = EtcdRegistry(endpoints, prefix=prefix, timeout=1)
        fake: FakeSubnetsMap = agent.subnets_map
        mac = "0a:00:00:00:00:0{}".format

        async def put(subnet: str, i: int) -> None:
            await asyncio.to_thread(
                cluster.put, key_of(prefix, subnet), vxlan_value(f"198.18.0.{i}", mac(i))
            )

        async def scenario():
            timings = {}
            try:
                await agent._relist()
                task = asyncio.create_task(agent._watch_loop())
                await put("10.244.2.0/24", 2)
                await wait_until(lambda: net("10.244.2.0/24") in fake.entries, what="first")
                assert str(agent.registry.endpoint) == members[0].url

                members[0].pause()  # hung: the watch on it just goes quiet
                started = time.monotonic()
                await put("10.244.3.0/24", 3)
                await wait_until(lambda: net("10.244.3.0/24") in fake.entries, 10, "hung")
                timings["hung"] = time.monotonic() - started
                assert str(agent.registry.endpoint) == members[1].url
                members[0].resume()

                members[1].stop()  # dead: the watch on it breaks at once
                started = time.monotonic()
                await put("10.244.4.0/24", 4)
                await wait_until(lambda: net("10.244.4.0/24") in fake.entries, 10, "dead")
                timings["dead"] = time.monotonic() - started
                assert str(agent.registry.endpoint) != members[1].url
                assert not task.done()
                await _stop(task)
                return timings
            finally:
                await agent.registry.close()

        timings = run(scenario(), timeout=40)
    assert set(fake.entries) == {net("10.244.2.0/24"), net("10.244.3.0/24"), net("10.244.4.0/24")}
    assert agent.stats.event_errors == 0
    # probe interval (1 s) + call timeout (1 s) + backoff; a dead member: backoff only
    assert timings["hung"] < 5, timings
    assert timings["dead"] < 3, timings


def test_watch_backoff_doubles_and_starts_over_after_a_healthy_watch(
    etcd, agent_without_kernel, monkeypatch
):
    """Failing watches retry after 0.1, 0.2, 0.4 s ...; a watch that stayed up for
    HEALTHY_WATCH_SECONDS means the registry recovered, so its failure retries after 0.1 s
    again (watches rarely end cleanly, so a clean end alone would never reset it)."""
    agent, _ = agent_without_kernel
    monkeypatch.setattr(agent_module, "HEALTHY_WATCH_SECONDS", 0.5)
    sleeps: list[float] = []
    real_sleep = agent._sleep_or_stop

    async def recorded_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await real_sleep(0.01)

    # Three watches fail at once, the fourth stays up for 0.6 s before failing, then the
    # fifth fails at once; the sixth ends the test.
    lifetimes = iter([0.0, 0.0, 0.0, 0.6, 0.0])

    async def watch_once() -> None:
        try:
            lifetime = next(lifetimes)
        except StopIteration:
            agent._stop.set()
            raise RegistryUnavailable("test over") from None
        await asyncio.sleep(lifetime)
        raise RegistryUnavailable("etcd gone (test)")

    monkeypatch.setattr(agent, "_sleep_or_stop", recorded_sleep)
    monkeypatch.setattr(agent, "_watch_once", watch_once)

    async def scenario():
        try:
            await agent._relist()
            await asyncio.wait_for(agent._watch_loop(), timeout=30)
        finally:
            await agent.registry.close()

    run(scenario())
    assert sleeps[:5] == [0.1, 0.2, 0.4, 0.1, 0.2], sleeps
    assert agent.stats.registry_errors == 6
