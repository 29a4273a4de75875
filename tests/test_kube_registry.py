"""registry/kube.py against the real kube-apiserver (lab/kube.py: etcd + kube-apiserver,
RBAC on), as flanneld's --kube-subnet-mgr would meet it."""

from __future__ import annotations

import asyncio
import json
import os
import re
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp.lab.kube import KubeApiServer
from flannel_xdp.registry.base import EventKind, LeaseEvent, Snapshot
from flannel_xdp.registry.config import ConfigError, parse_config
from flannel_xdp.registry.kube import Forbidden, KubeRegistry, KubeSettings
from flannel_xdp.registry.lease import LeaseAttrs

pytestmark = pytest.mark.kube

P = "flannel.alpha.coreos.com"
MAC = "0e:11:22:33:44:55"
CONFIG = parse_config('{"Network":"198.18.0.0/16","Backend":{"Type":"vxlan"}}')


@pytest.fixture(scope="module")
def kube(tmp_path_factory) -> KubeApiServer:
    server = KubeApiServer(str(tmp_path_factory.mktemp("kube")))
    server.start()
    yield server
    server.stop()


def make_node(kube: KubeApiServer, name: str, cidr: str | None, annotations=None) -> None:
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
    if annotations:
        node["metadata"]["annotations"] = annotations
    if cidr:
        node["spec"] = {"podCIDR": cidr, "podCIDRs": [cidr]}
    kube.apply(node)


def get_node(kube: KubeApiServer, name: str) -> dict:
    return json.loads(kube.kubectl("get", "node", name, "-o", "json"))


def registry(kube: KubeApiServer, node: str, **kw) -> KubeRegistry:
    return KubeRegistry(KubeSettings(kubeconfig_file=kube.kubeconfig, node_name=node, **kw))


def managed(ip: str, mac: str = MAC) -> dict[str, str]:
    return {
        f"{P}/backend-type": "vxlan",
        f"{P}/backend-data": json.dumps({"VNI": 1, "VtepMAC": mac}, separators=(",", ":")),
        f"{P}/public-ip": ip,
        f"{P}/kube-subnet-manager": "true",
    }


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_acquire_writes_flanneld_annotations_and_condition(kube: KubeApiServer) -> None:
    make_node(kube, "acq", "198.18.1.0/24")
    attrs = LeaseAttrs(IPv4Address("192.0.2.11"), "vxlan", vni=1, vtep_mac=MAC)

    async def go():
        reg = registry(kube, "acq")
        try:
            return await reg.acquire(CONFIG, attrs, None)
        finally:
            await reg.close()

    lease = run(go())
    assert lease.subnet == IPv4Network("198.18.1.0/24") and lease.expiry is None
    node = get_node(kube, "acq")
    ann = node["metadata"]["annotations"]
    assert ann[f"{P}/backend-type"] == "vxlan"
    assert ann[f"{P}/backend-data"] == '{"VNI":1,"VtepMAC":"0e:11:22:33:44:55"}'
    assert ann[f"{P}/public-ip"] == "192.0.2.11"
    assert ann[f"{P}/kube-subnet-manager"] == "true"
    conds = {c["type"]: c for c in node["status"]["conditions"]}
    cond = conds["NetworkUnavailable"]
    assert (cond["status"], cond["reason"], cond["message"]) == (
        "False",
        "FlannelIsUp",
        "Flannel is running on this node",
    )


def test_host_gw_backend_data_is_null_and_overwrite_wins(kube: KubeApiServer) -> None:
    make_node(kube, "hgw", "198.18.2.0/24", {f"{P}/public-ip-overwrite": "198.51.100.7"})
    attrs = LeaseAttrs(IPv4Address("192.0.2.12"), "host-gw")

    async def go():
        reg = registry(kube, "hgw", set_node_network_unavailable=False)
        try:
            await reg.acquire(CONFIG, attrs, None)
        finally:
            await reg.close()

    run(go())
    node = get_node(kube, "hgw")
    ann = node["metadata"]["annotations"]
    assert ann[f"{P}/backend-data"] == "null"
    assert ann[f"{P}/backend-type"] == "host-gw"
    assert ann[f"{P}/public-ip"] == "198.51.100.7"
    assert "NetworkUnavailable" not in {
        c["type"] for c in (node.get("status") or {}).get("conditions") or []
    }


def test_restart_reuses_its_published_vtep_mac(kube: KubeApiServer) -> None:
    make_node(kube, "mac", "198.18.3.0/24", managed("192.0.2.13", "0e:aa:bb:cc:dd:ee"))

    async def go():
        reg = registry(kube, "mac")
        try:
            return await reg.previous_vtep_mac()
        finally:
            await reg.close()

    assert run(go()) == "0e:aa:bb:cc:dd:ee"


def test_pod_cidr_not_assigned_waits_then_proceeds(kube: KubeApiServer, caplog) -> None:
    make_node(kube, "late", None)
    attrs = LeaseAttrs(IPv4Address("192.0.2.14"), "vxlan", vni=1, vtep_mac=MAC)

    async def go():
        reg = registry(kube, "late")
        try:
            task = asyncio.create_task(reg.acquire(CONFIG, attrs, None))
            await asyncio.sleep(2)
            assert not task.done()
            await asyncio.to_thread(
                kube.kubectl,
                "patch",
                "node",
                "late",
                "-p",
                '{"spec":{"podCIDR":"198.18.4.0/24","podCIDRs":["198.18.4.0/24"]}}',
            )
            return await task
        finally:
            await reg.close()

    lease = run(go())
    assert lease.subnet == IPv4Network("198.18.4.0/24")
    assert 'node "late" pod cidr not assigned' in caplog.text


def test_pod_cidr_outside_network_is_refused(kube: KubeApiServer) -> None:
    make_node(kube, "outside", "198.19.7.0/24")
    attrs = LeaseAttrs(IPv4Address("192.0.2.15"), "vxlan", vni=1, vtep_mac=MAC)

    async def go():
        reg = registry(kube, "outside")
        try:
            await reg.acquire(CONFIG, attrs, None)
        finally:
            await reg.close()

    with pytest.raises(ConfigError, match=re.escape('doesn\'t contain "198.19.7.0/24" PodCIDR')):
        run(go())
    ann = get_node(kube, "outside")["metadata"].get("annotations") or {}
    assert f"{P}/kube-subnet-manager" not in ann  # refused before writing anything


async def _next(updates, timeout: float = 20.0):
    return await asyncio.wait_for(anext(updates), timeout)


def test_updates_follow_nodes(kube: KubeApiServer) -> None:
    make_node(kube, "w-a", "198.18.10.0/24", managed("192.0.2.21"))
    make_node(kube, "w-plain", "198.18.11.0/24")  # not flannel's: never a lease
    make_node(kube, "w-bad", "198.18.12.0/24", {**managed("192.0.2.23"), f"{P}/backend-data": "{"})

    async def go():
        reg = registry(kube, "w-a")
        updates = reg.updates()
        try:
            first = await _next(updates)
            assert isinstance(first, Snapshot)
            assert IPv4Network("198.18.10.0/24") in first.leases
            assert IPv4Network("198.18.11.0/24") not in first.leases
            assert IPv4Network("198.18.12.0/24") not in first.leases
            assert first.skipped >= 1 and reg.skipped >= 1

            await asyncio.to_thread(make_node, kube, "w-b", "198.18.13.0/24", managed("192.0.2.24"))
            ev = await _next(updates)
            assert isinstance(ev, LeaseEvent) and ev.kind is EventKind.ADDED
            assert ev.subnet == IPv4Network("198.18.13.0/24")
            assert ev.attrs.public_ip == IPv4Address("192.0.2.24") and ev.attrs.vtep_mac == MAC

            # a label changes nothing flannel reads: no event; then the public IP does
            await asyncio.to_thread(kube.kubectl, "label", "node", "w-b", "x=y")
            await asyncio.to_thread(
                kube.kubectl, "annotate", "--overwrite", "node", "w-b", f"{P}/public-ip=192.0.2.25"
            )
            ev = await _next(updates)
            assert ev.kind is EventKind.ADDED and ev.attrs.public_ip == IPv4Address("192.0.2.25")

            await asyncio.to_thread(kube.kubectl, "delete", "node", "w-b")
            ev = await _next(updates)
            assert ev.kind is EventKind.REMOVED and ev.subnet == IPv4Network("198.18.13.0/24")

            # the apiserver goes away and comes back: a Snapshot again, then events (restarted
            # from this thread: the apiserver dies with the thread that started it)
            kube.restart()
            while not isinstance(ev := await _next(updates, 60), Snapshot):
                pass
            assert IPv4Network("198.18.10.0/24") in ev.leases
            assert reg.errors >= 1
            await asyncio.to_thread(make_node, kube, "w-c", "198.18.14.0/24", managed("192.0.2.26"))
            ev = await _next(updates, 30)
            assert ev.kind is EventKind.ADDED and ev.subnet == IPv4Network("198.18.14.0/24")
            assert reg.up
        finally:
            await updates.aclose()
            await reg.close()

    run(go(), timeout=180)


RBAC_NO_STATUS = [
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fx"}},
    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "weak", "namespace": "fx"}},
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "fx-weak"},
        "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "fx-weak"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "fx-weak",
        },
        "subjects": [{"kind": "ServiceAccount", "name": "weak", "namespace": "fx"}],
    },
]


def test_missing_nodes_status_patch_right_is_named(kube: KubeApiServer, tmp_path) -> None:
    for obj in RBAC_NO_STATUS:
        kube.apply(obj)
    make_node(kube, "rbac", "198.18.20.0/24")
    token = kube.token_for("weak", "fx")
    cfg = kube.kubeconfig_for_token(token, os.path.join(tmp_path, "weak.kubeconfig"))
    attrs = LeaseAttrs(IPv4Address("192.0.2.31"), "vxlan", vni=1, vtep_mac=MAC)

    async def go():
        reg = KubeRegistry(KubeSettings(kubeconfig_file=cfg, node_name="rbac"))
        try:
            await reg.acquire(CONFIG, attrs, None)
        finally:
            await reg.close()

    with pytest.raises(Forbidden) as err:
        run(go())
    msg = str(err.value)
    assert 'cannot patch resource "nodes/status"' in msg, msg
    assert "system:serviceaccount:fx:weak" in msg, msg


def test_node_name_from_pod(kube: KubeApiServer) -> None:
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "fxpods"}})
    # no controller manager here: the namespace's default ServiceAccount is made by hand
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "default", "namespace": "fxpods"},
        }
    )
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "agent-x", "namespace": "fxpods"},
            "spec": {"nodeName": "from-pod", "containers": [{"name": "c", "image": "none"}]},
        }
    )

    async def go():
        reg = KubeRegistry(
            KubeSettings(
                kubeconfig_file=kube.kubeconfig, pod_name="agent-x", pod_namespace="fxpods"
            )
        )
        try:
            return await reg.node_name()
        finally:
            await reg.close()

    assert run(go()) == "from-pod"


def test_410_gone_lists_again(tmp_path) -> None:
    """The watch fell behind etcd's compaction (listed at R, changes and a compaction past R
    before the watch starts): the apiserver answers 410 Gone, and the registry lists again
    at once (a Snapshot, not counted as an error) and watches on. Without the watch cache,
    so that the apiserver watches etcd itself."""
    kube = KubeApiServer(str(tmp_path / "kube"), extra_args=["--watch-cache=false"])
    kube.start()
    try:
        _lists_again_after_410(kube)
    finally:
        kube.stop()


def _lists_again_after_410(kube: KubeApiServer) -> None:
    make_node(kube, "g-a", "198.18.30.0/24", managed("192.0.2.41"))

    async def go():
        reg = registry(kube, "g-a")
        real_list = reg._list
        calls = 0

        async def list_then_fall_behind():
            nonlocal calls
            calls += 1
            known, rv, skipped = await real_list()
            if calls == 1:
                # two changes: etcd keeps the compaction's own revision, and a watch that
                # starts there gets a 500 (no previous value), not a 410
                for value in ("on", "again"):
                    await asyncio.to_thread(
                        kube.kubectl, "label", "--overwrite", "node", "g-a", f"moved={value}"
                    )
                await asyncio.to_thread(kube.compact_etcd)
            return known, rv, skipped

        reg._list = list_then_fall_behind
        updates = reg.updates()
        try:
            first = await _next(updates)
            assert isinstance(first, Snapshot)
            again = await _next(updates)
            assert isinstance(again, Snapshot) and int(again.revision) > int(first.revision)
            assert IPv4Network("198.18.30.0/24") in again.leases
            assert calls == 2 and reg.errors == 0
            await asyncio.to_thread(make_node, kube, "g-b", "198.18.31.0/24", managed("192.0.2.42"))
            ev = await _next(updates)
            assert ev.kind is EventKind.ADDED and ev.subnet == IPv4Network("198.18.31.0/24")
        finally:
            await updates.aclose()
            await reg.close()

    run(go())
