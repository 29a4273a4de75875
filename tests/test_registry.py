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
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp.agent.reconcile import Reconciler
from flannel_xdp.backend import Backend
from flannel_xdp.maps.views import Peer
from flannel_xdp.registry import etcd as etcd_module
from flannel_xdp.registry.base import LeaseRevoked, Snapshot
from flannel_xdp.registry.config import parse_config
from flannel_xdp.registry.etcd import (
    LEASE_TTL,
    Compacted,
    EtcdRegistry,
    EventKind,
    LeaseEvent,
    RegistryUnavailable,
    parse_endpoints,
)
from flannel_xdp.registry.lease import LeaseAttrs
from tests.etcd_support import EtcdCluster, etcd_cluster, free_ports
from tests.fakes import FakeRoutes, FakeSubnetsMap

# The key pattern flannel itself matches subnet keys with, verbatim.
FLANNEL_KEY_RE = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")
# A vxlan lease value as flanneld writes it (Go's encoding/json), byte for byte.
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
    return f'{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"host-gw"}}'


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


@pytest.mark.etcd
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


@pytest.mark.etcd
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


@pytest.mark.etcd
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


@pytest.mark.etcd
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


@pytest.mark.etcd
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


OWN = net("10.244.1.0/24")
OWN_ATTRS = LeaseAttrs(IPv4Address("198.18.0.10"), "vxlan", vni=1, vtep_mac="0a:00:00:00:00:01")


def peer(subnet: str, ip: str, mac: str) -> Peer:
    return Peer(net(subnet), IPv4Address(ip), Backend.VXLAN, mac)


class Follower:
    """The agent's control loop without a kernel: the registry's updates applied by a
    Reconciler to an in-memory map and a recorded route table."""

    def __init__(self, registry: EtcdRegistry):
        self.registry = registry
        self.map = FakeSubnetsMap()
        self.routes = FakeRoutes()
        self.reconciler = Reconciler(
            parse_config(VXLAN_CONFIG),
            OWN,
            OWN_ATTRS,
            self.map,
            self.routes,
            [IPv4Network("198.18.0.0/24")],
        )

    async def follow(self) -> None:
        async for update in self.registry.updates():
            await self.reconciler.apply(update)


def kernel_free_follower(cluster: EtcdCluster, prefix: str, **registry_kw) -> Follower:
    """A control loop past bootstrap: real registry, an in-memory map, routes recorded.

    The config and our own lease are put in etcd first, as bootstrap would have left them.
    """
    cluster.put(f"{prefix}/config", VXLAN_CONFIG)
    cluster.put(key_of(prefix, str(OWN)), OWN_ATTRS.to_json())
    return Follower(EtcdRegistry(cluster.endpoints, prefix=prefix, **registry_kw))


@pytest.fixture
def follower(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    return kernel_free_follower(etcd, prefix), prefix


async def _stop(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.mark.etcd
def test_agent_relists_after_compaction_and_goes_on_watching(etcd, follower, caplog):
    f, prefix = follower
    fake = f.map
    m2, m3, m5 = "0a:00:00:00:00:02", "0a:00:00:00:00:03", "0a:00:00:00:00:05"
    etcd.put(key_of(prefix, "10.244.2.0/24"), vxlan_value("198.18.0.2", m2))
    caplog.set_level(logging.INFO, logger="flannel_xdp")

    async def scenario():
        updates = f.registry.updates()
        try:
            first = await anext(updates)
            assert isinstance(first, Snapshot)
            await f.reconciler.apply(first)
            assert fake.entries == {net("10.244.2.0/24"): peer("10.244.2.0/24", "198.18.0.2", m2)}
            # While nobody is watching: one lease goes, two come, history is compacted.
            etcd.delete(key_of(prefix, "10.244.2.0/24"))
            etcd.put(key_of(prefix, "10.244.3.0/24"), vxlan_value("198.18.0.3", m3))
            etcd.put(key_of(prefix, "10.244.4.0/24"), host_gw_value("198.18.0.4"))
            etcd.compact(etcd.revision())

            async def follow() -> None:
                async for update in updates:
                    await f.reconciler.apply(update)

            task = asyncio.create_task(follow())
            await wait_until(lambda: f.reconciler.status.full_syncs == 2, what="the relist")
            assert fake.entries == {net("10.244.3.0/24"): peer("10.244.3.0/24", "198.18.0.3", m3)}
            assert net("10.244.4.0/24") in f.reconciler.leases  # listed, but ignored: host-gw
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
            await f.registry.close()

    run(scenario())
    assert fake.entries == {net("10.244.5.0/24"): peer("10.244.5.0/24", "198.18.0.5", m5)}
    assert f.reconciler.status.full_syncs == 2 and f.reconciler.status.event_errors == 0
    assert ("add", net("10.244.5.0/24")) in f.routes.calls
    assert ("remove", net("10.244.3.0/24")) in f.routes.calls
    assert f.routes.routes == {net("10.244.5.0/24")}
    assert any("has been compacted" in r.getMessage() for r in caplog.records)
    synced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("synced")]
    assert "(1 added, 0 changed, 0 removed)" in synced[0]
    assert "(1 added, 0 changed, 1 removed)" in synced[1]
    assert any("ignoring lease 10.244.4.0/24" in r.getMessage() for r in caplog.records)


@pytest.mark.etcd
def test_agent_exits_when_its_own_lease_is_deleted(etcd, follower):
    f, prefix = follower

    async def scenario():
        try:
            task = asyncio.create_task(f.follow())
            await wait_until(lambda: f.reconciler.status.synced, what="the first sync")
            await asyncio.to_thread(etcd.delete, key_of(prefix, str(OWN)))
            await asyncio.wait_for(asyncio.shield(task), 5)
        finally:
            await f.registry.close()

    with pytest.raises(LeaseRevoked) as caught:
        run(scenario())
    assert "Lease has been revoked" in str(caught.value)


# -- endpoints and failover ------------------------------------------------------------------


@pytest.mark.etcd
def test_unix_socket_endpoint(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    attrs = LeaseAttrs(IPv4Address("192.0.2.3"), "host-gw")

    async def scenario():
        reg = EtcdRegistry(parse_endpoints(etcd.members[0].endpoint), prefix=prefix)
        try:
            assert await reg.create_lease(net("10.244.7.0/24"), attrs, 60)
            return await reg.list_leases()
        finally:
            await reg.close()

    listing = run(scenario())
    assert listing.leases == {net("10.244.7.0/24"): attrs}
    assert etcd.get_raw(key_of(prefix, "10.244.7.0/24")) == attrs.to_json().encode()


@pytest.mark.etcd
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_dead_endpoint_first_fails_over_to_the_live_one(etcd: EtcdCluster, tmp_path, kind):
    prefix = etcd.new_prefix()
    etcd.put(f"{prefix}/config", VXLAN_CONFIG)
    if kind == "tcp":
        dead, live = f"http://127.0.0.1:{free_ports(1)[0]}", etcd.members[0].url
    else:
        dead, live = f"unix://{tmp_path}/absent.sock", etcd.members[0].endpoint
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


@pytest.mark.unit
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


@pytest.mark.etcd
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


@pytest.mark.etcd
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


@pytest.mark.etcd
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


@pytest.mark.etcd
def test_agent_keeps_following_the_registry_through_a_hung_and_a_dead_member():
    """The registry's update stream: a hung member is noticed by the probe beside the
    watch, a dead one by the watch itself; either way the stream goes on through the next
    member and misses no lease written meanwhile."""
    with etcd_cluster(3) as cluster:
        leader = cluster.leader()
        order = [i for i in range(3) if i != leader] + [leader]  # followers first
        members = [cluster.members[i] for i in order]
        prefix = cluster.new_prefix()
        f = kernel_free_follower(cluster, prefix, timeout=1)
        f.registry = EtcdRegistry(
            parse_endpoints(",".join(m.url for m in members)), prefix=prefix, timeout=1
        )
        fake = f.map
        mac = "0a:00:00:00:00:0{}".format

        async def put(subnet: str, i: int) -> None:
            await asyncio.to_thread(
                cluster.put, key_of(prefix, subnet), vxlan_value(f"198.18.0.{i}", mac(i))
            )

        async def scenario():
            timings = {}
            try:
                task = asyncio.create_task(f.follow())
                await wait_until(lambda: f.reconciler.status.synced, what="the first sync")
                await put("10.244.2.0/24", 2)
                await wait_until(lambda: net("10.244.2.0/24") in fake.entries, what="first")
                assert str(f.registry.endpoint) == members[0].url

                members[0].pause()  # hung: the watch on it just goes quiet
                started = time.monotonic()
                await put("10.244.3.0/24", 3)
                await wait_until(lambda: net("10.244.3.0/24") in fake.entries, 10, "hung")
                timings["hung"] = time.monotonic() - started
                assert str(f.registry.endpoint) == members[1].url
                members[0].resume()

                members[1].stop()  # dead: the watch on it breaks at once
                started = time.monotonic()
                await put("10.244.4.0/24", 4)
                await wait_until(lambda: net("10.244.4.0/24") in fake.entries, 10, "dead")
                timings["dead"] = time.monotonic() - started
                assert str(f.registry.endpoint) != members[1].url
                assert not task.done()
                await _stop(task)
                return timings
            finally:
                await f.registry.close()

        timings = run(scenario(), timeout=40)
    assert set(fake.entries) == {net("10.244.2.0/24"), net("10.244.3.0/24"), net("10.244.4.0/24")}
    assert f.reconciler.status.event_errors == 0
    # probe interval (1 s) + call timeout (1 s) + backoff; a dead member: backoff only
    assert timings["hung"] < 5, timings
    assert timings["dead"] < 3, timings


@pytest.mark.etcd
def test_watch_backoff_doubles_and_starts_over_after_a_healthy_watch(etcd, follower, monkeypatch):
    """Failing watches retry after 0.1, 0.2, 0.4 s ...; a watch that stayed up for
    HEALTHY_WATCH_SECONDS means the registry recovered, so its failure retries after 0.1 s
    again (watches rarely end cleanly, so a clean end alone would never reset it)."""
    f, _ = follower
    registry = f.registry
    monkeypatch.setattr(etcd_module, "HEALTHY_WATCH_SECONDS", 0.5)
    sleeps: list[float] = []

    class Over(Exception):
        pass

    async def recorded_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 6:
            raise Over
        await asyncio.sleep(0.01)

    # Three watches fail at once, the fourth stays up for 0.6 s before failing, then the
    # fifth and sixth fail at once; the sixth backoff ends the test.
    lifetimes = iter([0.0, 0.0, 0.0, 0.6, 0.0, 0.0])

    async def watch(start_revision: int):
        await asyncio.sleep(next(lifetimes))
        raise RegistryUnavailable("etcd gone (test)")
        yield  # an async generator, as the real one

    monkeypatch.setattr(registry, "_sleep", recorded_sleep)
    monkeypatch.setattr(registry, "_watch_with_probe", watch)

    async def scenario():
        try:
            await asyncio.wait_for(f.follow(), timeout=30)
        finally:
            await registry.close()

    with pytest.raises(Over):
        run(scenario())
    assert sleeps[:5] == [0.1, 0.2, 0.4, 0.1, 0.2], sleeps
    assert registry.errors == 6
