"""flannel-xdp next to the real flanneld (v0.28.9, `make peers`), per backend.

Each cluster has two flannel-xdp agents and one flanneld node (etcd mode, kube-flannel's
flags), pods made by the real CNI chain on all three, for vxlan, host-gw and vxlan with
DirectRouting:

* traffic: ping, a DF ping at the pod MTU, a sha256-checked TCP transfer and UDP echoes
  between every pod pair on different nodes, both ways;
* the registry: our leases sit next to flanneld's under the same key scheme, with the
  same JSON keys in the same order and the same value shapes;
* flanneld programs our nodes from our leases (its FDB, neighbour and route entries, or
  its host-gw / DirectRouting routes) and we program its node from its lease (our
  subnets map and routes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from flannel_xdp.backend import Backend
from flannel_xdp.lab import process, traffic
from flannel_xdp.lab.agentcluster import ETCD_PREFIX, AgentCluster, LabNode
from flannel_xdp.lab.topology import Dataplane
from tests.lab_support import IP_ICMP_HEADERS, agent_cluster, check_all_pairs, cross_node_pairs

pytestmark = pytest.mark.lab

KEY = re.compile(r"^(\d+\.\d+\.\d+\.\d+)-(\d+)$")
SHAPES = {
    "vxlan": ["PublicIP", "PublicIPv6", "BackendType", "BackendData"],
    # flanneld's BackendData is a json.RawMessage tagged omitempty: no key for host-gw
    "host-gw": ["PublicIP", "PublicIPv6", "BackendType"],
}

CASES = {
    "vxlan": {"backend": Backend.VXLAN},
    "host-gw": {"backend": Backend.HOST_GW},
    "directrouting": {"backend": Backend.VXLAN, "direct_routing": True},
}


@pytest.fixture(scope="module", params=list(CASES))
def mixed(request) -> Iterator[AgentCluster]:
    with agent_cluster(nodes=3, pods=1, stock=1, outside=False, **CASES[request.param]) as lab:
        yield lab


def _flanneld_node(lab: AgentCluster) -> LabNode:
    (node,) = [n for n in lab.nodes if n.dataplane is Dataplane.FLANNELD]
    assert len(lab.agent_nodes) == 2
    return node


def _json(ns: str, *argv: str) -> list[dict]:
    out = process.run(ns, list(argv)).stdout
    return json.loads(out) if out.strip() else []


def _vxlan_peers_expected(lab: AgentCluster) -> bool:
    """Whether the nodes reach each other through the tunnel (not by a plain route)."""
    return lab.spec.backend is Backend.VXLAN and not lab.spec.direct_routing


def test_traffic_every_pair_both_ways(mixed: AgentCluster):
    problems = check_all_pairs(mixed)
    assert not problems, "\n".join(problems)
    kinds = {
        (mixed.node_of(a).is_agent, mixed.node_of(b).is_agent) for a, b in cross_node_pairs(mixed)
    }
    assert kinds == {(True, True), (True, False), (False, True)}


def test_df_ping_at_the_pod_mtu(mixed: AgentCluster):
    pairs = [
        (a, b)
        for a, b in cross_node_pairs(mixed)
        if mixed.node_of(a).is_agent != mixed.node_of(b).is_agent
    ]
    for a, b in pairs:
        size = a.mtu - IP_ICMP_HEADERS
        argv = ["ping", "-c", "3", "-i", "0.2", "-W", "2", "-M", "do", "-s", str(size), str(b.ip)]
        res = process.run(a.netns, argv, check=False)
        got = traffic.parse_ping(res.stdout)
        assert got.ok, f"DF ping {a.ip} -> {b.ip} at {a.mtu}: {res.stdout}{res.stderr}"


def test_leases_have_flanneld_keys_and_shape(mixed: AgentCluster):
    raw = mixed.etcd.get_prefix(f"{ETCD_PREFIX}/subnets/")
    assert len(raw) == 3, raw
    by_node = {}
    for key, value in raw.items():
        m = KEY.match(key.rsplit("/", 1)[1])
        assert m and key.startswith(f"{ETCD_PREFIX}/subnets/"), key
        lease = json.loads(value)
        assert list(lease) == SHAPES[lease["BackendType"]], value
        # byte for byte the compact JSON flanneld's encoder writes
        assert json.dumps(lease, separators=(",", ":")) == value, value
        by_node[lease["PublicIP"]] = lease
    shapes = set()
    for lease in by_node.values():
        data = lease.get("BackendData")
        shapes.add((lease["BackendType"], tuple(data) if data is not None else None))
    assert len(shapes) == 1, f"flanneld's lease and ours differ in shape: {by_node}"
    (kind, data_keys) = shapes.pop()
    assert kind == mixed.spec.backend.value
    assert data_keys == (("VNI", "VtepMAC") if kind == "vxlan" else None)


def test_flanneld_programs_our_nodes_from_our_leases(mixed: AgentCluster):
    stock = _flanneld_node(mixed)
    leases = mixed.leases()
    routes = _json(stock.netns, "ip", "-j", "route", "show")
    by_dst = {r["dst"]: r for r in routes}
    fdb = _json(stock.netns, "bridge", "-j", "fdb", "show") if _vxlan_peers_expected(mixed) else []
    neigh = _json(stock.netns, "ip", "-j", "neigh", "show") if _vxlan_peers_expected(mixed) else []
    for node in mixed.agent_nodes:
        assert node.subnet is not None
        route = by_dst.get(str(node.subnet))
        assert route is not None, f"flanneld has no route to {node.subnet}: {routes}"
        if _vxlan_peers_expected(mixed):
            mac = leases[f"{node.subnet.network_address}-{node.subnet.prefixlen}"]["BackendData"][
                "VtepMAC"
            ]
            assert route["gateway"] == str(node.subnet.network_address), route
            assert route["dev"] == "flannel.1" and "onlink" in route.get("flags", []), route
            assert any(
                e.get("mac") == mac
                and e.get("dst") == str(node.public_ip)
                and e.get("ifname") == "flannel.1"
                for e in fdb
            ), f"no FDB entry {mac} dst {node.public_ip}: {fdb}"
            assert any(
                e.get("dst") == str(node.subnet.network_address)
                and e.get("lladdr") == mac
                and "PERMANENT" in e.get("state", [])
                for e in neigh
            ), f"no permanent neighbour {node.subnet.network_address} -> {mac}: {neigh}"
        else:  # host-gw, and DirectRouting between nodes on one network
            assert route["gateway"] == str(node.public_ip) and route["dev"] == "eth0", route


def test_we_program_flanneld_node_from_its_lease(mixed: AgentCluster):
    stock = _flanneld_node(mixed)
    assert stock.subnet is not None
    lease = mixed.leases()[f"{stock.subnet.network_address}-{stock.subnet.prefixlen}"]
    for node in mixed.agent_nodes:
        peer = mixed.map_peers(node)[stock.subnet]
        assert str(peer.public_ip) == lease["PublicIP"] == str(stock.public_ip)
        if _vxlan_peers_expected(mixed):
            assert peer.backend is Backend.VXLAN
            assert peer.vtep_mac == lease["BackendData"]["VtepMAC"]
            link = _json(stock.netns, "ip", "-j", "link", "show", "flannel.1")
            assert peer.vtep_mac == link[0]["address"], "flanneld's device has another MAC"
        else:
            assert peer.backend is Backend.HOST_GW
        assert stock.subnet in mixed.routes(node), f"{node.netns} has no route to {stock.subnet}"


GLOG_TIME = re.compile(r"^[IWE](\d{4}) (\d\d):(\d\d):(\d\d\.\d+) ")


def logged_at(node: LabNode, what: str) -> tuple[int, float]:
    """When (month and day, seconds into the day) the first line of node's flanneld log
    that has what was logged."""
    with open(node.log_file) as f:
        for line in f:
            if what in line and (m := GLOG_TIME.match(line)):
                return int(m[1]), int(m[2]) * 3600 + int(m[3]) * 60 + float(m[4])
    raise AssertionError(f"{node.name}: no {what!r} in {node.log_file}")


def test_each_flanneld_node_picks_its_subnet_once_the_others_have_theirs():
    """v0.28.9 exits when another node takes the subnet it has just picked (it does not
    pick again): so the lab starts each flanneld node once every node before it holds its
    lease, and no two of them pick at the same time."""
    with agent_cluster(nodes=3, pods=0, stock=3, outside=False) as lab:
        picked = [logged_at(n, "Picking subnet") for n in lab.nodes]
        leased = [logged_at(n, "Allocated lease") for n in lab.nodes]
    for k in range(1, len(picked)):
        assert picked[k] > max(leased[:k]), (picked, leased)
