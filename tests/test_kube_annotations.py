"""registry/kube_annotations.py: flanneld's node annotations, parsed and formatted."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp.registry import kube_annotations as ka
from flannel_xdp.registry.lease import LeaseAttrs, LeaseError

pytestmark = pytest.mark.unit

N = ka.Annotations()
P = ka.DEFAULT_PREFIX


def node(ann: dict[str, str] | None = None, cidrs=None, cidr=None, name="n1") -> dict:
    spec = {}
    if cidrs is not None:
        spec["podCIDRs"] = cidrs
    if cidr is not None:
        spec["podCIDR"] = cidr
    return {"metadata": {"name": name, "annotations": ann or {}}, "spec": spec}


VXLAN = {
    f"{P}/backend-type": "vxlan",
    f"{P}/backend-data": '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}',
    f"{P}/public-ip": "192.0.2.5",
    f"{P}/kube-subnet-manager": "true",
}


def test_vxlan_annotations_as_flanneld_writes_them() -> None:
    attrs = LeaseAttrs(IPv4Address("192.0.2.5"), "vxlan", vni=1, vtep_mac="12:c6:65:89:b4:e3")
    assert ka.lease_annotations(N, attrs, {}) == VXLAN


def test_host_gw_backend_data_is_null() -> None:
    got = ka.lease_annotations(N, LeaseAttrs(IPv4Address("192.0.2.5"), "host-gw"), {})
    assert got[f"{P}/backend-data"] == "null"
    assert got[f"{P}/backend-type"] == "host-gw"


def test_public_ip_overwrite_and_prefix() -> None:
    names = ka.Annotations("example.org")
    attrs = LeaseAttrs(IPv4Address("192.0.2.5"), "host-gw")
    got = ka.lease_annotations(names, attrs, {"example.org/public-ip-overwrite": "198.51.100.1"})
    assert got["example.org/public-ip"] == "198.51.100.1"
    assert got["example.org/kube-subnet-manager"] == "true"
    assert ka.node_public_ip(names, {"example.org/node-public-ip": "198.51.100.9"}) == IPv4Address(
        "198.51.100.9"
    )


def test_needs_patch_only_when_something_differs() -> None:
    assert not ka.needs_patch(N, VXLAN, {**VXLAN, "other": "x"})
    assert ka.needs_patch(N, VXLAN, {**VXLAN, f"{P}/public-ip": "192.0.2.6"})


def test_condition_patch() -> None:
    got = ka.network_unavailable_false(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    cond = got["status"]["conditions"][0]
    assert list(cond) == [
        "type",
        "status",
        "lastHeartbeatTime",
        "lastTransitionTime",
        "reason",
        "message",
    ]
    assert cond["reason"] == "FlannelIsUp" and cond["lastHeartbeatTime"] == "2026-01-02T03:04:05Z"


def test_node_lease() -> None:
    subnet, attrs = ka.node_lease(N, node(VXLAN, cidrs=["10.244.1.0/24"]))
    assert subnet == IPv4Network("10.244.1.0/24")
    assert attrs == LeaseAttrs(IPv4Address("192.0.2.5"), "vxlan", 1, "12:c6:65:89:b4:e3")


def test_pod_cidrs_dual_stack_and_fallback() -> None:
    assert ka.pod_cidr(node(cidrs=["fd00::/64", "10.244.2.0/24"])) == IPv4Network("10.244.2.0/24")
    assert ka.pod_cidr(node(cidr="10.244.3.0/24")) == IPv4Network("10.244.3.0/24")
    assert ka.pod_cidr(node()) is None
    with pytest.raises(LeaseError, match="IPv4/IPv6 only or dualstack"):
        ka.pod_cidr(node(cidrs=["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24"]))


def test_unmanaged_nodes_are_no_leases() -> None:
    ann = {**VXLAN, f"{P}/kube-subnet-manager": "false"}
    assert ka.node_lease(N, node(ann, cidrs=["10.244.1.0/24"])) is None


@pytest.mark.parametrize(
    "key,value",
    [
        (f"{P}/backend-data", "{"),
        (f"{P}/backend-data", '{"VNI":1,"VtepMAC":"zz"}'),
        (f"{P}/backend-data", "null"),
        (f"{P}/public-ip", "not-an-ip"),
    ],
)
def test_malformed_annotations_raise(key: str, value: str) -> None:
    with pytest.raises(LeaseError):
        ka.node_lease(N, node({**VXLAN, key: value}, cidrs=["10.244.1.0/24"]))


def test_stored_vtep_mac() -> None:
    assert ka.stored_vtep_mac(N, VXLAN) == "12:c6:65:89:b4:e3"
    assert ka.stored_vtep_mac(N, {f"{P}/backend-data": "null"}) is None
    assert ka.stored_vtep_mac(N, {f"{P}/backend-data": '{"VtepMAC":"bad"}'}) is None
    assert ka.stored_vtep_mac(N, {}) is None
