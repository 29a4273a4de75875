"""Forged VXLAN against a live cluster: what decapsulation lets through and what it counts.

A lab of three nodes (n0 and n1 flannel-xdp agents, n2 a stock flanneld node with the
kernel's vxlan device), one pod each, built once per ingress hook (XDP, tc, kernel). Frames
are forged with an ordinary UDP socket (outer UDP checksum 0, as flannel-xdp's encap
sends), so the outer headers are the kernel's and only the VXLAN header and the inner
frame are hand-made: the right VNI and port (read from the target's own data path), the target's
VtepMAC (from its lease), an inner IPv4/UDP datagram to a pod of the target node.

* An unregistered host (a netns plugged into the lab's underlay switch at 192.0.2.200)
  sends them at an agent node: the pod receives nothing, and the agent counts exactly
  the frames sent under the reason that applies; the same frames from n1's own address
  arrive (the control). Once a lease names 192.0.2.200 (anyone who may write to etcd
  can do that), its frames from that lease's subnet are delivered: the lease check is
  what stopped them.
* A registered peer (n1, from its real underlay address) forges another node's pod
  source: nothing through, counted as spoofed; the same frames with n1's own pod
  source are delivered (so the forging itself works).
* The unregistered host's attack against the stock flanneld node succeeds: the
  payload reaches its pod. That is the weakness of stock flannel the checks fix.

About 25 s for the three hooks on 2 cores, 45 s under load (the two cluster bring-ups dominate).
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp import netns
from flannel_xdp.lab import agents, process
from flannel_xdp.lab.agentcluster import ETCD_PREFIX, AgentCluster, LabNode
from flannel_xdp.lab.frames import eth, vxlan_header
from flannel_xdp.lab.topology import (
    UNDERLAY_IFNAME,
    Counters,
    Dataplane,
    Pod,
    _iproute,
    delete_netns,
    new_netns,
    plug_into_switch,
)
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.maps.layout import Reason, reason_label
from flannel_xdp.maps.views import NodeConfigMap
from tests.lab_support import agent_cluster
from tests.packet_support import udp_packet

pytestmark = pytest.mark.lab

ATTACKER_IP = IPv4Address("192.0.2.200")
ATTACKER_PORT = "atk"  # its port on the underlay switch
LISTEN_PORT = 7001  # the pods' UDP listener
FORGED = 10  # frames per attack
CONTROLS = 3  # legitimate frames of the positive control
SO_NO_CHECK = 11  # socket(7): send UDP with checksum 0, as flannel-xdp's encap does
COUNT_TIMEOUT = 10.0
GRACE = 0.5  # after the last expected packet: time for a late forged one to show up
XDP_ONLY = pytest.mark.parametrize("cluster", [IngressHook.XDP], indirect=True)


@dataclass(frozen=True)
class Vtep:
    """What a sender must match to be taken for VXLAN by a node."""

    public_ip: IPv4Address
    vni: int
    port: int
    vtep_mac: str


@pytest.fixture(scope="module", params=list(IngressHook), ids=str)
def cluster(request: pytest.FixtureRequest) -> Iterator[AgentCluster]:
    with agent_cluster(nodes=3, pods=1, stock=1, ingress_hook=request.param, outside=False) as lab:
        n0, n1, n2 = lab.nodes
        assert n0.is_agent and n1.is_agent and n2.dataplane is Dataplane.FLANNELD
        yield lab


@pytest.fixture(scope="module")
def attacker(cluster: AgentCluster) -> Iterator[str]:
    """A host on the underlay that holds no lease: a netns on the lab's switch."""
    ns = f"{cluster.prefix}-atk"  # the lab's prefix: lab.down() would also remove it
    assert ATTACKER_IP not in {n.public_ip for n in cluster.nodes}
    assert str(ATTACKER_IP) not in {v["PublicIP"] for v in cluster.leases().values()}
    new_netns(ns)
    try:
        plug_into_switch(cluster.switch, ATTACKER_PORT, ns, cluster.spec.underlay_mtu)
        with _iproute(ns) as ipr:
            eth0 = ipr.link_lookup(ifname=UNDERLAY_IFNAME)[0]
            ipr.addr(
                "add",
                index=eth0,
                address=str(ATTACKER_IP),
                prefixlen=cluster.spec.underlay.prefixlen,
            )
        yield ns
    finally:
        delete_netns(ns, "test_security")
        assert not process.netns_exists(ns), f"{ns} left behind"


# -- helpers --------------------------------------------------------------------------------


def lease_of(lab: AgentCluster, node: LabNode) -> dict:
    assert node.subnet is not None
    return lab.leases()[f"{node.subnet.network_address}-{node.subnet.prefixlen}"]


def vtep_of(lab: AgentCluster, node: LabNode) -> Vtep:
    """The target as an attacker sees it: VtepMAC from its lease (anyone who can read
    etcd or sniff the underlay knows it), VNI and port from what the node listens on."""
    mac = lease_of(lab, node)["BackendData"]["VtepMAC"]
    if node.is_agent:
        with NodeConfigMap(PinDir(node.bpffs).maps) as m:
            cfg = m.read()
        assert cfg is not None, f"{node.netns}: no node_config"
        assert cfg.vtep_mac == mac, f"{node.netns}: map VtepMAC {cfg.vtep_mac}, lease {mac}"
        return Vtep(node.public_ip, cfg.vni, cfg.vxlan_port, mac)
    link = json.loads(
        process.run(node.netns, ["ip", "-j", "-d", "link", "show", "flannel.1"]).stdout
    )[0]
    info = link["linkinfo"]["info_data"]
    assert link["address"] == mac, f"{node.netns}: flannel.1 has {link['address']}, lease {mac}"
    return Vtep(node.public_ip, info["id"], info["port"], mac)


def forged_frames(
    target: Vtep, src_ip: IPv4Address, src_mac: str, dst: Pod, tag: str, count: int
) -> list[bytes]:
    """VXLAN payloads (header + inner Ethernet/IPv4/UDP) carrying tag-<i> to dst's listener."""
    return [
        vxlan_header(target.vni)
        + eth(target.vtep_mac, src_mac)
        + udp_packet(str(src_ip), str(dst.ip), 40000 + i, LISTEN_PORT, f"{tag}-{i}".encode())
        for i in range(count)
    ]


def send_udp(ns: str, src: IPv4Address, target: Vtep, payloads: list[bytes]) -> None:
    """Send each payload as one UDP datagram from src (an address of ns) to the target's
    VXLAN port: the outer Ethernet/IPv4/UDP headers are the kernel's."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        sock.bind((str(src), 0))
        for p in payloads:
            sock.sendto(p, (str(target.public_ip), target.port))
    finally:
        sock.close()


class Listener:
    """A UDP socket in a pod: what actually reached the workload."""

    def __init__(self, pod: Pod):
        with netns.entered(pod.netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((str(pod.ip), LISTEN_PORT))
        self.sock.setblocking(False)
        self.received: list[bytes] = []

    def collect(self, seconds: float, until: set[bytes] | None = None) -> list[bytes]:
        """Everything that arrives within seconds (sooner once all of until arrived)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if until is not None and until <= set(self.received):
                break
            if select.select([self.sock], [], [], left)[0]:
                self.received.append(self.sock.recv(65535))
        return self.received

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listen() -> Iterator[Callable[[Pod], Listener]]:
    made: list[Listener] = []

    def make(pod: Pod) -> Listener:
        made.append(Listener(pod))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def drop_sample(lab: AgentCluster, node: LabNode, reason: Reason) -> float:
    return agents.sample(
        lab.scrape(node), "flannel_xdp_drops_total", backend="vxlan", reason=reason_label(reason)
    )


def wait_drops(
    lab: AgentCluster, node: LabNode, before: Counters, reason: Reason, want: int
) -> Counters:
    """Counters grown since before, once reason reached want drops (or the timeout)."""
    deadline = time.monotonic() + COUNT_TIMEOUT
    while True:
        grown = lab.counters(node).since(before)
        if grown.drops().get(("vxlan", reason.name), 0) >= want or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(GRACE)  # one more frame than sent would show up now
    return lab.counters(node).since(before)


def wait_peer(lab: AgentCluster, node: LabNode, subnet: IPv4Network, present: bool) -> None:
    """Until the node's agent applied a registry change for subnet: map entry and route
    (without the route, the stack's reverse-path filter drops the decapsulated packet)."""
    deadline = time.monotonic() + COUNT_TIMEOUT
    while True:
        have = (subnet in lab.map_peers(node), subnet in lab.routes(node))
        if have == (present, present):
            return
        assert time.monotonic() < deadline, f"{node.netns}: {subnet} (map, route): {have}"
        time.sleep(0.05)


def payloads(tag: str, count: int) -> set[bytes]:
    return {f"{tag}-{i}".encode() for i in range(count)}


# -- the tests ------------------------------------------------------------------------------


def test_lab_runs_the_hook_asked_for(cluster: AgentCluster, request: pytest.FixtureRequest):
    """The parametrization is real: each agent says which hook it attached, and its pin
    directory is private to root."""
    hook = request.node.callspec.params["cluster"]
    for node in cluster.agent_nodes:
        info = [
            dict(labels)
            for (name, labels), _ in cluster.scrape(node).items()
            if name == "flannel_xdp_build_info"
        ]
        assert [i["ingress_hook"] for i in info] == [hook.value], f"{node.netns}: {info}"
        for d in (node.bpffs, PinDir(node.bpffs).maps, PinDir(node.bpffs).progs):
            mode = stat.S_IMODE(os.stat(d).st_mode)
            assert mode == 0o700, f"{d}: mode {mode:o}"


@pytest.mark.parametrize(
    "impersonate, reason",
    [(True, Reason.DROP_SPOOFED_SOURCE), (False, Reason.DROP_UNKNOWN_SOURCE)],
    ids=["as-n1-pod", "unleased-source"],
)
def test_unregistered_host_forging_vxlan_gets_nothing_through(
    cluster: AgentCluster, attacker: str, listen, impersonate: bool, reason: Reason
):
    """192.0.2.200 holds no lease. It sends VXLAN with the right port, VNI and VtepMAC to
    n0's pod, with an inner source that is n1's pod (as-n1-pod) or an address no lease
    covers: none arrives; n0 counts every frame, once, under the matching reason. Then n1
    sends the as-n1-pod frames from its own address (the control): those arrive."""
    n0, n1, _ = cluster.nodes
    target_pod, n1_pod = n0.pods[0], n1.pods[0]
    target = vtep_of(cluster, n0)
    n1_mac = lease_of(cluster, n1)["BackendData"]["VtepMAC"]
    if impersonate:
        src_ip, src_mac = n1_pod.ip, n1_mac
    else:
        src_ip, src_mac = cluster.spec.network.broadcast_address - 1, "0e:66:78:00:ee:ee"
        assert not any(n.subnet and src_ip in n.subnet for n in cluster.nodes)
    tag = f"forged-{reason.name}"
    listener = listen(target_pod)
    before = cluster.counters(n0)
    scraped_before = drop_sample(cluster, n0, reason)

    forged = forged_frames(target, src_ip, src_mac, target_pod, tag, FORGED)
    send_udp(attacker, ATTACKER_IP, target, forged)
    control = forged_frames(target, n1_pod.ip, n1_mac, target_pod, "control", CONTROLS)
    send_udp(n1.netns, n1.public_ip, target, control)
    listener.collect(COUNT_TIMEOUT, until=payloads("control", CONTROLS))
    grown = wait_drops(cluster, n0, before, reason, FORGED)
    got = listener.collect(GRACE)

    assert payloads("control", CONTROLS) <= set(got), (
        f"the control from n1 did not arrive, the forging method is broken: {got}"
    )
    leaked = [p for p in got if p.startswith(tag.encode())]
    assert not leaked, f"forged frames reached {target_pod.ip}: {leaked}"
    assert grown.drops() == {("vxlan", reason.name): FORGED}, grown.drops()
    assert grown.packets("vxlan", "decap") == CONTROLS, grown.traffic
    assert drop_sample(cluster, n0, reason) - scraped_before == FORGED


def test_a_lease_is_what_lets_the_unregistered_host_in(
    cluster: AgentCluster, attacker: str, listen
):
    """The registry is the root of trust: once a lease names 192.0.2.200 as its public
    IP (as anyone who may write to etcd can do), the same kind of frames from that host,
    with sources from that lease's subnet, are delivered. So nothing but the lease check
    stopped them before. The lease is removed again afterwards."""
    n0 = cluster.nodes[0]
    target_pod = n0.pods[0]
    target = vtep_of(cluster, n0)
    subnet = IPv4Network((cluster.spec.network.broadcast_address - 255, 24))
    assert not any(n.subnet and n.subnet.overlaps(subnet) for n in cluster.nodes)
    key = f"{ETCD_PREFIX}/subnets/{subnet.network_address}-{subnet.prefixlen}"
    mac = "0e:66:78:00:ee:ee"
    lease = {
        "PublicIP": str(ATTACKER_IP),
        "BackendType": "vxlan",
        "BackendData": {"VNI": target.vni, "VtepMAC": mac},
    }
    listener = listen(target_pod)
    frames = forged_frames(target, subnet.network_address + 5, mac, target_pod, "leased", FORGED)

    cluster.etcd.put(key, json.dumps(lease))
    try:
        wait_peer(cluster, n0, subnet, present=True)
        before = cluster.counters(n0)
        send_udp(attacker, ATTACKER_IP, target, frames)
        got = listener.collect(COUNT_TIMEOUT, until=payloads("leased", FORGED))
        grown = cluster.counters(n0).since(before)
    finally:
        cluster.etcd.delete(key)
        wait_peer(cluster, n0, subnet, present=False)

    assert payloads("leased", FORGED) <= set(got), f"with a lease, only {sorted(got)} arrived"
    assert grown.packets("vxlan", "decap") == FORGED, grown.traffic
    assert not grown.drops(), grown.drops()


def test_registered_peer_cannot_forge_another_nodes_pods(cluster: AgentCluster, listen):
    """n1, from its real underlay address, sends n0's pod frames whose inner source is
    n2's pod: none arrives, each counted as spoofed. The same frames with n1's own pod
    as the source (the positive control) are delivered and counted as decapsulated."""
    n0, n1, n2 = cluster.nodes
    target_pod = n0.pods[0]
    target = vtep_of(cluster, n0)
    n1_mac = lease_of(cluster, n1)["BackendData"]["VtepMAC"]
    listener = listen(target_pod)
    before = cluster.counters(n0)
    scraped_before = drop_sample(cluster, n0, Reason.DROP_SPOOFED_SOURCE)

    spoofed = forged_frames(target, n2.pods[0].ip, n1_mac, target_pod, "spoofed", FORGED)
    control = forged_frames(target, n1.pods[0].ip, n1_mac, target_pod, "control", CONTROLS)
    send_udp(n1.netns, n1.public_ip, target, spoofed + control)
    listener.collect(COUNT_TIMEOUT, until=payloads("control", CONTROLS))
    grown = wait_drops(cluster, n0, before, Reason.DROP_SPOOFED_SOURCE, FORGED)
    got = listener.collect(GRACE)

    assert payloads("control", CONTROLS) <= set(got), (
        f"the positive control did not arrive, the forging method is broken: {got}"
    )
    leaked = [p for p in got if p.startswith(b"spoofed")]
    assert not leaked, f"frames with n2's pod source reached {target_pod.ip}: {leaked}"
    assert grown.drops() == {("vxlan", Reason.DROP_SPOOFED_SOURCE.name): FORGED}, grown.drops()
    assert grown.packets("vxlan", "decap") == CONTROLS, grown.traffic
    scraped = drop_sample(cluster, n0, Reason.DROP_SPOOFED_SOURCE) - scraped_before
    assert scraped == FORGED


def test_another_vni_gets_nothing_through(cluster: AgentCluster, listen):
    """n1, registered, sends frames that would be accepted but for their VNI (ours + 1).
    The xdp and tc hooks leave them to the stack, where no socket takes them; with the
    kernel hook the vxlan device (external mode: every VNI) decapsulates them and
    tunnel_ingress drops each one as DROP_FOREIGN_TUNNEL. Nothing reaches the pod."""
    n0, n1, _ = cluster.nodes
    target_pod = n0.pods[0]
    target = vtep_of(cluster, n0)
    other = Vtep(target.public_ip, target.vni + 1, target.port, target.vtep_mac)
    n1_mac = lease_of(cluster, n1)["BackendData"]["VtepMAC"]
    listener = listen(target_pod)
    before = cluster.counters(n0)

    send_udp(n1.netns, n1.public_ip, target, forged_frames(
        other, n1.pods[0].ip, n1_mac, target_pod, "other-vni", FORGED))  # fmt: skip
    control = forged_frames(target, n1.pods[0].ip, n1_mac, target_pod, "control", CONTROLS)
    send_udp(n1.netns, n1.public_ip, target, control)
    listener.collect(COUNT_TIMEOUT, until=payloads("control", CONTROLS))
    kernel = cluster.spec.ingress_hook is IngressHook.KERNEL
    if kernel:
        wait_drops(cluster, n0, before, Reason.DROP_FOREIGN_TUNNEL, FORGED)
    got = listener.collect(GRACE)
    grown = lab_counters_since(cluster, n0, before)

    assert payloads("control", CONTROLS) <= set(got), f"the control did not arrive: {got}"
    leaked = [p for p in got if p.startswith(b"other-vni")]
    assert not leaked, f"frames for VNI {other.vni} reached {target_pod.ip}: {leaked}"
    assert grown.drops() == ({("vxlan", "DROP_FOREIGN_TUNNEL"): FORGED} if kernel else {})


def test_a_pod_tunnelling_vxlan_to_the_node_gets_nothing_through(cluster: AgentCluster, listen):
    """A pod on n1 (a legitimate source) sends UDP to port 8472 of n0's cni0 address,
    carrying VXLAN whose inner source is n2's pod. n1 encapsulates it, n0 accepts and
    delivers it to its own stack. With the xdp and tc hooks nothing listens there; with
    the kernel hook the vxlan device's socket (any address) decapsulates it again, and
    tunnel_ingress drops it: not to our public IP (DROP_FOREIGN_TUNNEL). Without that
    check any pod could inject packets under any other pod's address."""
    n0, n1, n2 = cluster.nodes
    target_pod = n0.pods[0]
    target = vtep_of(cluster, n0)
    via_gateway = Vtep(n0.gateway, target.vni, target.port, target.vtep_mac)
    listener = listen(target_pod)
    before = cluster.counters(n0)

    inner = forged_frames(via_gateway, n2.pods[0].ip, "0e:66:78:00:ee:01", target_pod,
                          "nested", FORGED)  # fmt: skip
    send_udp(n1.pods[0].netns, n1.pods[0].ip, via_gateway, inner)
    kernel = cluster.spec.ingress_hook is IngressHook.KERNEL
    if kernel:
        wait_drops(cluster, n0, before, Reason.DROP_FOREIGN_TUNNEL, FORGED)
    got = listener.collect(COUNT_TIMEOUT if not kernel else GRACE)
    grown = lab_counters_since(cluster, n0, before)

    leaked = [p for p in got if p.startswith(b"nested")]
    assert not leaked, f"nested VXLAN with n2's pod source reached {target_pod.ip}: {leaked}"
    assert grown.packets("vxlan", "decap") == FORGED, grown.traffic  # the outer tunnel
    assert grown.drops() == ({("vxlan", "DROP_FOREIGN_TUNNEL"): FORGED} if kernel else {})


def lab_counters_since(lab: AgentCluster, node: LabNode, before: Counters) -> Counters:
    time.sleep(GRACE)  # a late frame would be counted by now
    return lab.counters(node).since(before)


@XDP_ONLY
def test_stock_flannel_accepts_the_unregistered_hosts_frames(
    cluster: AgentCluster, attacker: str, listen
):
    """The first attack again, at the stock flanneld node n2 (the kernel's vxlan device):
    every forged frame reaches its pod. Stock flannel does not check who sends VXLAN."""
    _, n1, n2 = cluster.nodes
    target_pod = n2.pods[0]
    target = vtep_of(cluster, n2)
    n1_mac = lease_of(cluster, n1)["BackendData"]["VtepMAC"]
    listener = listen(target_pod)

    frames = forged_frames(target, n1.pods[0].ip, n1_mac, target_pod, "forged", FORGED)
    send_udp(attacker, ATTACKER_IP, target, frames)
    got = listener.collect(COUNT_TIMEOUT, until=payloads("forged", FORGED))

    assert payloads("forged", FORGED) <= set(got), (
        f"stock flannel let only {sorted(got)} of {FORGED} forged frames through"
    )
