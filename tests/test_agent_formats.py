"""Flannel-compatible config and lease formats (pure logic)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp.registry.config import ConfigError, parse_config
from flannel_xdp.registry.lease import (
    LeaseAttrs,
    LeaseError,
    parse_subnet_key,
    subnet_key_name,
)

pytestmark = pytest.mark.unit


def test_config_defaults_like_flanneld():
    c = parse_config('{"Network": "198.18.0.0/16", "Backend": {"Type": "vxlan"}}')
    assert c.subnet_len == 24
    assert c.subnet_min == IPv4Address("198.18.1.0")
    assert c.subnet_max == IPv4Address("198.18.255.0")
    assert c.backend.type == "vxlan"
    assert (c.backend.vxlan.vni, c.backend.vxlan.port) == (1, 8472)
    assert len(c.subnets()) == 255


def test_config_small_network_gets_prefix_plus_two():
    c = parse_config('{"Network": "198.18.0.0/24", "Backend": {"Type": "host-gw"}}')
    assert c.subnet_len == 26
    assert c.subnets() == [
        IPv4Network("198.18.0.64/26"),
        IPv4Network("198.18.0.128/26"),
        IPv4Network("198.18.0.192/26"),
    ]


def test_config_keys_are_case_insensitive_like_go():
    c = parse_config(
        '{"network": "198.18.0.0/16", "subnetlen": 26, '
        '"backend": {"type": "vxlan", "vni": 4096, "port": 4789, "directrouting": true}}'
    )
    assert c.subnet_len == 26
    assert (c.backend.vxlan.vni, c.backend.vxlan.port) == (4096, 4789)
    assert c.backend.vxlan.direct_routing


def test_missing_backend_is_udp_like_flanneld():
    assert parse_config('{"Network": "198.18.0.0/16"}').backend.type == "udp"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("{", "JSON"),
        ("[]", "object"),
        ('{"Backend": {"Type": "vxlan"}}', "Network"),
        ('{"Network": "198.18.0.0/33"}', "Network"),
        ('{"Network": 5}', "Network"),
        ('{"Network": "198.18.0.0/16", "SubnetLen": 31}', "SubnetLen"),
        ('{"Network": "198.18.0.0/16", "SubnetLen": 16}', "SubnetLen"),
        ('{"Network": "198.18.0.0/16", "SubnetLen": "24"}', "SubnetLen"),
        ('{"Network": "198.18.0.0/16", "SubnetLen": true}', "SubnetLen"),
        ('{"Network": "198.18.0.0/29"}', "Network"),
        ('{"Network": "198.18.0.0/16", "SubnetMin": "198.19.0.0"}', "SubnetMin"),
        ('{"Network": "198.18.0.0/16", "SubnetMax": "198.18.3.7"}', "SubnetMax"),
        (
            '{"Network": "198.18.0.0/16", "SubnetMin": "198.18.9.0", "SubnetMax": "198.18.3.0"}',
            "SubnetMin",
        ),
        ('{"Network": "198.18.0.0/16", "Backend": {"Type": "ipsec"}}', "Backend.Type"),
        ('{"Network": "198.18.0.0/16", "Backend": {"Type": "vxlan", "VNI": 0}}', "Backend.VNI"),
        (
            '{"Network": "198.18.0.0/16", "Backend": {"Type": "vxlan", "Port": 70000}}',
            "Backend.Port",
        ),
        ('{"Network": "198.18.0.0/16", "Backend": "vxlan"}', "Backend"),
        ('{"Network": "198.18.0.0/16", "EnableIPv6": true}', "EnableIPv6"),
        ('{"Network": "198.18.0.0/16", "network": "198.19.0.0/16"}', "network"),
    ],
)
def test_bad_config_names_the_key(text, names):
    with pytest.raises(ConfigError, match=names):
        parse_config(text)


def test_lease_json_is_byte_compatible_with_flanneld():
    attrs = LeaseAttrs(IPv4Address("192.0.2.3"), "vxlan", vni=1, vtep_mac="c6:d2:32:6f:8f:44")
    assert attrs.to_json() == (
        '{"PublicIP":"192.0.2.3","PublicIPv6":null,"BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
    )
    assert LeaseAttrs.from_json(attrs.to_json()) == attrs
    hostgw = LeaseAttrs(IPv4Address("192.0.2.4"), "host-gw")
    # what flanneld v0.28.9 writes for host-gw (BackendData omitted, not null)
    assert hostgw.to_json() == '{"PublicIP":"192.0.2.4","PublicIPv6":null,"BackendType":"host-gw"}'
    assert LeaseAttrs.from_json(hostgw.to_json()) == hostgw
    null_data = (
        '{"PublicIP":"192.0.2.4","PublicIPv6":null,"BackendType":"host-gw","BackendData":null}'
    )
    assert LeaseAttrs.from_json(null_data) == hostgw


def test_lease_keys():
    assert subnet_key_name(IPv4Network("198.18.3.0/24")) == "198.18.3.0-24"
    assert parse_subnet_key("/coreos.com/network/subnets/198.18.3.0-24") == IPv4Network(
        "198.18.3.0/24"
    )
    with pytest.raises(LeaseError, match="dual stack"):
        parse_subnet_key("/coreos.com/network/subnets/198.18.3.0-24&2001:db8::-64")
    with pytest.raises(LeaseError):
        parse_subnet_key("/coreos.com/network/subnets/nonsense")


@pytest.mark.parametrize(
    "value",
    [
        "not json",
        "[]",
        '{"PublicIP":"192.0.2.300","BackendType":"vxlan"}',
        '{"PublicIP":"192.0.2.3","BackendType":"vxlan","BackendData":null}',
        '{"PublicIP":"192.0.2.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"x"}}',
        '{"PublicIP":"192.0.2.3","BackendType":"vxlan",'
        '"BackendData":{"VNI":"1","VtepMAC":"c6:d2:32:6f:8f:44"}}',
        '{"PublicIP":"192.0.2.3","BackendType":7}',
    ],
)
def test_malformed_lease_values_are_errors(value):
    with pytest.raises(LeaseError):
        LeaseAttrs.from_json(value)
