"""Acquiring a subnet lease (agent/acquire.py) against a real etcd 3.4, in flanneld's
order: our own lease by PublicIP, then the subnet file's subnet, then a random free
one; racing nodes never share a subnet; a full pool fails with the reason."""

from __future__ import annotations

import asyncio
import json
import random
import re
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp.node.subnet_env import SubnetEnv, read_subnet, write
from flannel_xdp.registry.acquire import NoSubnetAvailable, acquire, fits
from flannel_xdp.registry.config import parse_config
from flannel_xdp.registry.etcd import LEASE_TTL
from flannel_xdp.registry.lease import LeaseAttrs, parse_subnet_key
from tests.etcd_support import EtcdCluster, etcd_cluster

pytestmark = pytest.mark.etcd

FLANNEL_KEY_RE = r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$"
CONFIG = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
MAC = "0a:11:22:33:44:55"


def attrs(ip: str, mac: str = MAC) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(ip), "vxlan", vni=1, vtep_mac=mac)


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def key_of(prefix: str, subnet: IPv4Network) -> str:
    return f"{prefix}/subnets/{subnet.network_address}-{subnet.prefixlen}"


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def acquire_once(etcd: EtcdCluster, prefix: str, lease: LeaseAttrs, config=CONFIG, **kw):
    reg = etcd.registry(prefix)
    try:
        return await acquire(reg, config, lease, kw.pop("ttl", LEASE_TTL), **kw)
    finally:
        await reg.close()


def owners(etcd: EtcdCluster, prefix: str) -> dict[IPv4Network, str]:
    """subnet -> PublicIP of every lease under prefix, read with etcdctl."""
    out = {}
    for key in etcd.keys(f"{prefix}/subnets/"):
        value = json.loads(etcd.get_raw(key))
        out[parse_subnet_key(key)] = value["PublicIP"]
    return out


def granted_ttl(etcd: EtcdCluster, key: str) -> tuple[int, int]:
    kv = etcd.get_kv(key)
    assert kv is not None and kv.get("lease"), f"{key} has no etcd lease"
    info = json.loads(etcd.etcdctl("lease", "timetolive", f"{kv['lease']:x}", "-w", "json"))
    return info["granted-ttl"], info["ttl"]


@pytest.fixture(scope="module")
def etcd():
    with etcd_cluster(1) as cluster:
        yield cluster


def test_fresh_node_gets_a_free_subnet_in_flanneld_format(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    mine = attrs("198.18.0.1")
    subnet = run(acquire_once(etcd, prefix, mine))
    assert fits(CONFIG, subnet)
    key = key_of(prefix, subnet)
    assert etcd.keys(prefix) == [key]
    assert re.search(FLANNEL_KEY_RE, key).group(0) == f"{subnet.network_address}-24"
    assert etcd.get_raw(key) == (
        b'{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"0a:11:22:33:44:55"}}'
    )
    granted, left = granted_ttl(etcd, key)
    assert granted == LEASE_TTL == 24 * 3600
    assert LEASE_TTL - 30 <= left <= LEASE_TTL


def test_random_choice_among_the_first_free_subnets(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    # Two subnets already held by other nodes: never handed out again.
    for i, subnet in enumerate(("10.244.1.0/24", "10.244.2.0/24")):
        etcd.put(key_of(prefix, net(subnet)), attrs(f"198.18.1.{i + 1}").to_json())
    got = run(acquire_once(etcd, prefix, attrs("198.18.0.1"), rng=random.Random(7)))
    assert got not in (net("10.244.1.0/24"), net("10.244.2.0/24"))
    # flanneld scans up to 100 free subnets from SubnetMin and picks one of them at random
    first_free = CONFIG.subnets()[2:102]
    assert got in first_free


def test_own_lease_is_reused_by_public_ip_and_renewed(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    held = net("10.244.77.0/24")
    # Our lease from an earlier run of this node (older VtepMAC), and another node's.
    etcd.put(key_of(prefix, net("10.244.5.0/24")), attrs("198.18.0.5").to_json())
    etcd.etcdctl("put", key_of(prefix, held), attrs("198.18.0.1", "0a:00:00:00:00:99").to_json())
    got = run(acquire_once(etcd, prefix, attrs("198.18.0.1"), previous=net("10.244.9.0/24")))
    assert got == held  # before the subnet file's subnet
    assert json.loads(etcd.get_raw(key_of(prefix, held)))["BackendData"]["VtepMAC"] == MAC
    assert granted_ttl(etcd, key_of(prefix, held))[0] == LEASE_TTL
    assert owners(etcd, prefix) == {net("10.244.5.0/24"): "198.18.0.5", held: "198.18.0.1"}


@pytest.mark.parametrize(
    "incompatible",
    ["10.244.77.0/25", "10.245.1.0/24", "10.244.0.0/24"],
    ids=["wrong-length", "outside-network", "below-subnet-min"],
)
def test_own_incompatible_lease_is_deleted(etcd: EtcdCluster, incompatible: str):
    prefix = etcd.new_prefix()
    old = net(incompatible)
    etcd.put(key_of(prefix, old), attrs("198.18.0.1").to_json())
    got = run(acquire_once(etcd, prefix, attrs("198.18.0.1")))
    assert got != old and fits(CONFIG, got)
    assert owners(etcd, prefix) == {got: "198.18.0.1"}


def test_subnet_file_subnet_is_taken_again_when_free(etcd: EtcdCluster, tmp_path):
    prefix = etcd.new_prefix()
    path = str(tmp_path / "subnet.env")
    write(path, SubnetEnv(CONFIG.network, net("10.244.200.0/24"), 1450, False))
    previous = read_subnet(path)
    assert previous == net("10.244.200.0/24")
    got = run(acquire_once(etcd, prefix, attrs("198.18.0.1"), previous=previous))
    assert got == previous
    assert owners(etcd, prefix) == {previous: "198.18.0.1"}


def test_subnet_file_subnet_held_by_another_node_is_not_taken(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    taken = net("10.244.200.0/24")
    etcd.put(key_of(prefix, taken), attrs("198.18.0.2").to_json())
    got = run(acquire_once(etcd, prefix, attrs("198.18.0.1"), previous=taken))
    assert got != taken
    assert owners(etcd, prefix) == {taken: "198.18.0.2", got: "198.18.0.1"}


def test_subnet_file_subnet_outside_the_config_is_not_taken(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    got = run(acquire_once(etcd, prefix, attrs("198.18.0.1"), previous=net("10.99.1.0/24")))
    assert fits(CONFIG, got)


def test_restart_keeps_the_subnet(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    first = run(acquire_once(etcd, prefix, attrs("198.18.0.1")))
    # A restarted node: new client, maybe a new VtepMAC, no subnet file.
    again = run(acquire_once(etcd, prefix, attrs("198.18.0.1", "0a:00:00:00:00:42")))
    assert again == first
    assert owners(etcd, prefix) == {first: "198.18.0.1"}
    assert json.loads(etcd.get_raw(key_of(prefix, first)))["BackendData"]["VtepMAC"] == (
        "0a:00:00:00:00:42"
    )


def test_twenty_nodes_at_once_get_twenty_distinct_subnets(etcd: EtcdCluster, caplog):
    prefix = etcd.new_prefix()
    # 31 subnets for 20 nodes: random picks collide, and lost races must be retried.
    config = parse_config(
        '{"Network": "10.250.0.0/24", "SubnetLen": 29, "Backend": {"Type": "vxlan"}}'
    )
    assert len(config.subnets()) == 31
    nodes = [attrs(f"198.18.2.{i + 1}", f"0a:00:00:00:02:{i + 1:02x}") for i in range(20)]
    caplog.set_level("INFO", logger="flannel_xdp.registry.acquire")

    async def scenario():
        regs = [etcd.registry(prefix) for _ in nodes]
        try:
            return await asyncio.gather(
                *(
                    acquire(reg, config, node, 600, rng=random.Random(i))
                    for i, (reg, node) in enumerate(zip(regs, nodes, strict=True))
                )
            )
        finally:
            await asyncio.gather(*(r.close() for r in regs))

    got = run(scenario())
    assert len(set(got)) == 20
    assert all(fits(config, s) for s in got)
    held = owners(etcd, prefix)
    assert held == {s: str(n.public_ip) for s, n in zip(got, nodes, strict=True)}
    lost = [r for r in caplog.records if "was taken meanwhile" in r.getMessage()]
    print(f"{len(lost)} lost creation races among 20 nodes")


def test_pool_too_small_fails_for_the_extra_nodes_with_the_reason(etcd: EtcdCluster):
    prefix = etcd.new_prefix()
    # /28 -> SubnetLen defaults to 30; SubnetMin is the second /30: 3 usable subnets.
    config = parse_config('{"Network": "10.251.0.0/28", "Backend": {"Type": "vxlan"}}')
    assert config.subnet_len == 30 and len(config.subnets()) == 3
    nodes = [attrs(f"198.18.3.{i + 1}") for i in range(5)]

    async def scenario():
        regs = [etcd.registry(prefix) for _ in nodes]
        try:
            return await asyncio.gather(
                *(
                    acquire(reg, config, node, 600, rng=random.Random(i))
                    for i, (reg, node) in enumerate(zip(regs, nodes, strict=True))
                ),
                return_exceptions=True,
            )
        finally:
            await asyncio.gather(*(r.close() for r in regs))

    results = run(scenario())
    won = [r for r in results if isinstance(r, IPv4Network)]
    failed = [r for r in results if not isinstance(r, IPv4Network)]
    assert sorted(won) == config.subnets()
    assert len(failed) == 2
    for exc in failed:
        assert isinstance(exc, NoSubnetAvailable), repr(exc)
        msg = str(exc)
        assert "no free subnet in 10.251.0.0/28" in msg
        assert "/30 from 10.251.0.4 to 10.251.0.12" in msg
        assert "all 3 are leased" in msg
    assert len(owners(etcd, prefix)) == 3
