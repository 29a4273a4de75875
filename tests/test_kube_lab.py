"""A Kubernetes cluster in a box (`flannel-xdp lab up --kube`): a mixed cluster of
flannel-xdp agents and the real flanneld in kube mode, with the real kube-proxy on every
node, over vxlan and host-gw.

The lab runs the real kube-apiserver; every node is a Node object with a podCIDR, runs
kube-proxy (iptables mode) and its network agent as deploy/kube-flannel-xdp.yml's
DaemonSet runs it (that manifest's arguments, environment, volumes and ServiceAccount
token), or flanneld --kube-subnet-mgr on the last node; pods come from the real CNI chain.
Asserted, per backend:

* every pod reaches every other pod (a sha256-checked TCP transfer and UDP echoes);
* a ClusterIP and a NodePort Service, with an EndpointSlice listing a pod on every node,
  created through the API: kube-proxy on every node DNATs them; each node's pod reaches
  the ClusterIP, and the host outside the cluster reaches the NodePort on every node and
  the ClusterIP through a node, every transfer intact;
* a restart of a DaemonSet pod keeps its node's subnet and VtepMAC;
* a Node added through the API (with the annotations flanneld publishes) is routed on
  every node within 1 s of the request, and unrouted within 1 s of its deletion.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp.backend import Backend
from flannel_xdp.lab import kubelab, traffic
from flannel_xdp.lab.agentcluster import AgentCluster, AgentClusterSpec, LabNode, random_name
from flannel_xdp.lab.topology import Dataplane
from flannel_xdp.registry.kube_annotations import Annotations, lease_annotations
from flannel_xdp.registry.lease import LeaseAttrs
from tests.requirements import require_root_and_bcc

pytestmark = [pytest.mark.kube, pytest.mark.timeout(900)]

SERVICE = "probe"
SERVICE_PORT = 80
NODE_PORT = 30080
CONNECTIONS = 4  # per source and address: kube-proxy picks an endpoint at random each time
PROGRAM_WITHIN = 1.0  # seconds from the API request to a route on every node
ADDED_NODE = ("ext0", IPv4Network("198.18.200.0/24"), IPv4Address("192.0.2.200"))


@pytest.fixture(params=[Backend.VXLAN, Backend.HOST_GW], ids=["vxlan", "host-gw"])
def lab(request: pytest.FixtureRequest):
    require_root_and_bcc("ip", "nsenter", "unshare", "iptables")
    spec = AgentClusterSpec(
        name=random_name(), nodes=3, stock=1, pods=1, backend=request.param, kube=True
    )
    with AgentCluster(spec) as cluster:
        try:
            yield cluster
        except BaseException:
            print(cluster.diagnostics())
            raise


def check(results: list[list[dict]], what: str, diagnostics) -> None:
    bad = [
        f"{what} {r['dst']}: {traffic.probe_problem(r)}"
        for per_source in results
        for r in per_source
        if not traffic.probe_ok(r)
    ]
    assert not bad, "\n".join(bad) + "\n" + diagnostics()


def kube_proxy_serves(lab: AgentCluster, node: LabNode, cluster_ip: str) -> bool:
    out = lab.run(node.netns, ["iptables", "-t", "nat", "-S", "KUBE-SERVICES"], check=False)
    return cluster_ip in out.stdout and "KUBE-NODEPORTS" in out.stdout


def wait_for(what: str, cond, timeout: float, diagnostics) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout:.0f} s\n{diagnostics()}")
        time.sleep(0.2)


def routed_everywhere(lab: AgentCluster, cidr: IPv4Network) -> dict[str, bool]:
    return {n.netns: cidr in lab.routes(n) for n in lab.nodes}


def watch_routes(lab: AgentCluster, cidr: IPv4Network, want: bool, t0: float) -> dict[str, float]:
    """Seconds after t0 at which each node's route to cidr came (want) or went."""
    seen: dict[str, float] = {}
    deadline = t0 + 10 * PROGRAM_WITHIN
    while len(seen) < len(lab.nodes) and time.monotonic() < deadline:
        now = time.monotonic()
        for ns, has in routed_everywhere(lab, cidr).items():
            if has is want and ns not in seen:
                seen[ns] = now - t0
        time.sleep(0.01)
    return seen


def published(lab: AgentCluster, node: LabNode) -> tuple[str, str, str]:
    """The node's podCIDR, and the backend data and public IP its agent annotated."""
    assert lab.kube is not None
    obj = json.loads(lab.kube.kubectl("get", "node", node.name, "-o", "json"))
    ann = obj["metadata"]["annotations"]
    p = "flannel.alpha.coreos.com"
    return obj["spec"]["podCIDR"], ann[f"{p}/backend-data"], ann[f"{p}/public-ip"]


def added_node(backend: Backend) -> dict:
    """A Node as flanneld leaves it on a node of its own: podCIDR and annotations."""
    name, cidr, public_ip = ADDED_NODE
    if backend is Backend.VXLAN:
        attrs = LeaseAttrs(public_ip, "vxlan", vni=1, vtep_mac="02:00:00:00:02:00")
    else:
        attrs = LeaseAttrs(public_ip, "host-gw")
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": lease_annotations(Annotations(), attrs, {})},
        "spec": {"podCIDR": str(cidr), "podCIDRs": [str(cidr)]},
    }


def test_mixed_kube_cluster_with_kube_proxy_services(lab: AgentCluster) -> None:
    assert lab.kube is not None
    kinds = [n.dataplane for n in lab.nodes]
    assert kinds == [Dataplane.FLANNEL_XDP, Dataplane.FLANNEL_XDP, Dataplane.FLANNELD]
    # The agents took the podCIDR the API gave their Node, and published flanneld's
    # annotations on it.
    for node in lab.nodes:
        obj = json.loads(lab.kube.kubectl("get", "node", node.name, "-o", "json"))
        assert node.subnet == IPv4Network(obj["spec"]["podCIDR"]), obj["spec"]
        ann = obj["metadata"]["annotations"]
        assert ann["flannel.alpha.coreos.com/public-ip"] == str(node.public_ip), ann
        assert ann["flannel.alpha.coreos.com/backend-type"] == lab.spec.backend.value, ann

    pods = lab.pods
    servers = [traffic.start_probe_server(p.netns, str(p.ip)) for p in pods]
    try:
        check(
            traffic.probe_many([(p.netns, [str(q.ip) for q in pods if q is not p]) for p in pods]),
            "pod to pod",
            lab.diagnostics,
        )
        lab.kube.apply(kubelab.service(SERVICE, SERVICE_PORT, traffic.PROBE_PORT, NODE_PORT))
        endpoints = [(str(p.ip), lab.node_of(p).name) for p in pods]
        lab.kube.apply(kubelab.endpoint_slice(SERVICE, traffic.PROBE_PORT, endpoints))
        svc = json.loads(lab.kube.kubectl("get", "service", SERVICE, "-o", "json"))
        cluster_ip = svc["spec"]["clusterIP"]
        for node in lab.nodes:
            wait_for(
                f"kube-proxy on {node.netns} serving {cluster_ip}",
                lambda node=node: kube_proxy_serves(lab, node, cluster_ip),
                60,
                lab.diagnostics,
            )
        # from every node's pods to the ClusterIP
        check(
            traffic.probe_many(
                [(p.netns, [cluster_ip] * CONNECTIONS) for p in pods],
                port=SERVICE_PORT,
                udp_sizes=(),
            ),
            "ClusterIP",
            lab.diagnostics,
        )
        # from outside the cluster: the NodePort on every node, the ClusterIP via a node
        outside = [str(n.outside_ip) for n in lab.nodes for _ in range(CONNECTIONS)]
        check(
            [traffic.probe(lab.outside_ns, outside, port=NODE_PORT, udp_sizes=())],
            "NodePort from outside",
            lab.diagnostics,
        )
        via = lab.nodes[0]
        lab.run(
            lab.outside_ns, ["ip", "route", "add", f"{cluster_ip}/32", "via", str(via.outside_ip)]
        )
        check(
            [
                traffic.probe(
                    lab.outside_ns, [cluster_ip] * CONNECTIONS, port=SERVICE_PORT, udp_sizes=()
                )
            ],
            f"ClusterIP from outside via {via.netns}",
            lab.diagnostics,
        )
    finally:
        traffic.stop(servers)

    # A node joins and leaves through the API: every node follows within a second.
    # A restart of a DaemonSet pod keeps its node's subnet and VtepMAC (its annotations).
    node = lab.nodes[0]
    before = published(lab, node)
    lab.kill_process(node, signal.SIGTERM)
    lab.restart_process(node)
    assert published(lab, node) == before
    assert lab.run(node.netns, ["cat", node.subnet_file]).stdout.count(str(node.gateway)) == 1

    # Timed from the moment the request is sent: the API's event comes within it.
    name, cidr, _ = ADDED_NODE
    sent = time.monotonic()
    lab.kube.api("POST", "/api/v1/nodes", added_node(lab.spec.backend))
    answered = time.monotonic() - sent
    came = watch_routes(lab, cidr, True, sent)
    sent = time.monotonic()
    lab.kube.api("DELETE", f"/api/v1/nodes/{name}")
    went = watch_routes(lab, cidr, False, sent)
    report = (
        f"added (the API answered in {answered * 1000:.0f} ms): "
        + ", ".join(f"{ns} {s * 1000:.0f} ms" for ns, s in sorted(came.items()))
        + "; deleted: "
        + ", ".join(f"{ns} {s * 1000:.0f} ms" for ns, s in sorted(went.items()))
    )
    print(report)
    for ns in (n.netns for n in lab.nodes):
        assert came.get(ns, 99.0) <= PROGRAM_WITHIN, report + "\n" + lab.diagnostics()
        assert went.get(ns, 99.0) <= PROGRAM_WITHIN, report + "\n" + lab.diagnostics()


def test_lab_up_kube_from_the_command_line(tmp_path) -> None:
    """`flannel-xdp lab up --kube` leaves a cluster that outlives it; status reads it back
    and down removes every process, namespace and pin."""
    require_root_and_bcc("ip", "nsenter", "unshare", "iptables")
    name = random_name()
    cli = [sys.executable, "-m", "flannel_xdp.cli", "lab"]
    try:
        up = subprocess.run(
            [*cli, "up", "--kube", "--name", name, "--nodes", "2", "--pods", "1"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        assert "kube-apiserver" in up.stdout and "kubectl --kubeconfig" in up.stdout, up.stdout
        status = subprocess.run(
            [*cli, "status", "--name", name, "--json"], capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0, status.stdout + status.stderr
        state = json.loads(status.stdout)
        assert state["kube"]["ready"], state
        assert all(n["ready"] and n["routes"] == 1 for n in state["nodes"]), state
    finally:
        down = subprocess.run(
            [*cli, "down", "--name", name], capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stdout + down.stderr
    lab = AgentCluster.load(name)
    assert not lab.exists(), (lab.namespaces(), lab.pin_dirs())
