"""Packets through the BPF programs with BPF_PROG_TEST_RUN: exact bytes, verdicts, counters.

Three programs: tunnel_egress (tc, on flannel.1), and the two interchangeable underlay
programs underlay_xdp (XDP) and underlay_tc (tc ingress), which share classify_underlay()
and must give every frame the same verdict (XDP_PASS/TC_ACT_OK, XDP_DROP/TC_ACT_SHOT,
XDP_REDIRECT/TC_ACT_REDIRECT) and count it the same way. The underlay tests are
parametrized over both ("xdp", "tc"); where the two differ, the test says so.

The programs are compiled once for the module, with their maps pinned in a private bpffs
directory. They run inside a test netns (bpf_fib_lookup resolves in the netns of the
calling thread) that holds the underlay veth u0 (192.0.2.1/24) and permanent neighbours
for the peers. Every test starts from the same node config and peer set (PEERS).

Kernel limits that shape the tests: BPF_PROG_TEST_RUN refuses frames shorter than an
Ethernet header (14 bytes) with EINVAL for XDP and tc alike, so "truncated Ethernet" can
only be tested as that refusal. For tc programs it also refuses IPv4-typed frames shorter
than Ethernet + 20 and IPv6-typed ones shorter than Ethernet + 40 (tc_test_run_refuses), so
underlay_tc's PASS_TRUNCATED for a cut outer IPv4 header cannot be reached either. A tc
test run builds a linear skb (CHECKSUM_NONE, the whole frame in the head), so where
underlay_tc pulls headers or counts the linear part (data_end - data) instead of skb->len,
it cannot show here: for a non-linear skb (a GSO aggregate off a veth) only real traffic
tells. Redirects are not performed by a test run, the verdict and the frame as it would
leave are returned.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import socket
import struct
import time
from ipaddress import IPv4Address

import pytest

from flannel_xdp import netns
from flannel_xdp.backend import Backend
from flannel_xdp.lab.frames import (
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IPV6,
    IP_DF,
    IPPROTO_TCP,
    IPPROTO_UDP,
    UDP_HLEN,
    VXLAN_HLEN,
    VXLAN_OVERHEAD,
    eth,
    inet_csum,
    ipv4_header,
    l4_csum_ok,
    partial_csum,
    vxlan_udp,
    with_l4_csum,
)
from flannel_xdp.lab.frames import mac_bytes as mac
from flannel_xdp.loader.libbpf import BpfError, prog_test_run
from tests.packet_support import (
    GOOD,
    GOOD_INNER,
    OWN_HOST,
    OWN_IP,
    OWN_SUBNET,
    OWN_VTEP,
    PEER_A,
    PEER_B,
    PEER_HOSTGW,
    PEER_HOSTGW_UNROUTABLE,
    PEER_NO_NEIGH,
    PEER_UNROUTABLE,
    PORT,
    SPORT_MAX,
    SPORT_MIN,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    UNDERLAY_CASES,
    UNDERLAY_MAC,
    UNKNOWN_HOST,
    VNI,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    Counters,
    RemotePeer,
    arp_payload,
    ifindex,
    inner_from_a,
    ip,
    ipv6_packet,
    program_lab,
    refused_by_test_run,
    run,
    sysctl,
    tc_test_run_refuses,
    tcp_packet,
    temp_netns,
    tunnel_frame,
    udp_packet,
    vxlan_frame,
    wait_out_fib_cache,
)
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.bpf

TAG = f"{os.getpid()}"

XDP_VERDICTS = {XDP_PASS, XDP_DROP, XDP_REDIRECT}
TC_VERDICTS = {TC_ACT_SHOT, TC_ACT_REDIRECT}  # tunnel_egress has no PASS_* reason

# The underlay programs, and each one's verdict for what the tables below state as XDP's.
UNDERLAY_PROGS = ["xdp", "tc"]
UNDERLAY_VERDICTS = {
    "xdp": {v: v for v in XDP_VERDICTS},
    "tc": {XDP_PASS: TC_ACT_OK, XDP_DROP: TC_ACT_SHOT, XDP_REDIRECT: TC_ACT_REDIRECT},
}


def verdict_of(prog: str, xdp_verdict: int) -> int:
    """prog's verdict for a frame underlay_xdp gives xdp_verdict."""
    return UNDERLAY_VERDICTS[prog][xdp_verdict]


def decapped(prog: str, frame: bytes) -> bytes:
    """The frame an underlay program makes of a VXLAN frame that is ours (built from the
    frame's bytes, not from the C code). underlay_xdp: the inner Ethernet frame as it came
    (the checks guarantee its destination is our VtepMAC and its type IPv4). underlay_tc:
    the inner IPv4 packet behind an Ethernet header it writes itself: our VtepMAC, the inner
    source MAC, IPv4. Either way, the same bytes for a frame whose checksums are complete."""
    if prog == "xdp":
        return frame[VXLAN_OVERHEAD:]
    inner_src = frame[VXLAN_OVERHEAD + 6 : VXLAN_OVERHEAD + 12]
    return mac(OWN_VTEP) + inner_src + b"\x08\x00" + frame[VXLAN_OVERHEAD + ETH_HLEN :]


@pytest.fixture(scope="module", autouse=True)
def requirements():
    """Fail (never skip) when the machine cannot run these tests."""
    require_root_and_bcc("ip", "bridge", "ethtool")


@pytest.fixture(scope="module")
def lab(requirements):
    with program_lab(f"fxdp-pkt-{TAG}") as lab:
        yield lab


@pytest.fixture(autouse=True)
def standard_config(lab):
    """Every test starts from the same node config and peers (tests may change both)."""
    lab.configure()
    return lab


def one(delta, key, packets=1, nbytes=None):
    """Assert that exactly one counter moved: key, by packets (and nbytes)."""
    assert list(delta) == [key], f"expected only {key} to move, got {delta}"
    got_packets, got_bytes = delta[key]
    assert got_packets == packets, delta
    if nbytes is not None:
        assert got_bytes == nbytes, delta


# --- 1. encapsulation --------------------------------------------------------------------


def expected_encap(inner_ip, peer, *, sport, outer_dst, outer_src, vni=VNI, port=PORT):
    """The frame tunnel_egress must produce, built independently of the C code."""
    inner = eth(peer.vtep_mac, OWN_VTEP) + inner_ip
    payload = vxlan_udp(sport, port, vni, inner)
    outer_ip = ipv4_header(
        str(OWN_IP),
        str(peer.public_ip),
        len(payload),
        proto=IPPROTO_UDP,
        tos=outer_ecn(inner_ip[1]),  # ECN copied out (CE as ECT(0)), DSCP not
        ident=0,
        flags_frag=0x4000,  # DF
        ttl=64,
    )
    return eth(outer_dst, outer_src) + outer_ip + payload


def outer_ecn(inner_tos: int) -> int:
    """INET_ECN_encapsulate(): the inner ECN bits, except CE, which goes out as ECT(0)."""
    ecn = inner_tos & 0x03
    return 0x02 if ecn == 0x03 else ecn


def outer_sport(frame: bytes) -> int:
    return struct.unpack_from("!H", frame, ETH_HLEN + 20)[0]


INNER_PACKETS = {
    # DSCP AF41 + ECT(1): outer gets the ECN bits only
    "tcp": lambda: tcp_packet(OWN_HOST, PEER_A.host(7), 43210, 80, b"GET / HTTP/1.1\r\n", tos=0x89),
    "udp": lambda: udp_packet(OWN_HOST, PEER_A.host(7), 5353, 53, b"\x12\x34" * 21, tos=0x02),
}


@pytest.mark.parametrize(("vni", "port"), [(VNI, PORT), (0xABCDE, 4789)], ids=["8472", "4789"])
@pytest.mark.parametrize("kind", sorted(INNER_PACKETS))
def test_encap_produces_the_exact_vxlan_frame(lab, kind, vni, port):
    lab.configure(lab.settings(vni=vni, vxlan_port=port))
    inner_ip = INNER_PACKETS[kind]()
    frame = tunnel_frame(inner_ip)

    rv, out, delta = lab.counted("egress", frame)

    assert rv == TC_ACT_REDIRECT
    sport = outer_sport(out)
    assert SPORT_MIN <= sport <= SPORT_MAX
    want = expected_encap(
        inner_ip,
        PEER_A,
        sport=sport,
        outer_dst=PEER_A.neigh_mac,  # the permanent neighbour of 192.0.2.2 on u0
        outer_src=UNDERLAY_MAC,
        vni=vni,
        port=port,
    )
    assert out.hex() == want.hex()
    assert inet_csum(out[ETH_HLEN : ETH_HLEN + 20]) == 0, "outer IPv4 header checksum"
    assert out[VXLAN_OVERHEAD + ETH_HLEN :] == inner_ip, "inner packet must be byte-for-byte"
    one(delta, ("traffic", "vxlan", "encap"), 1, len(frame))

    rv2, out2 = lab.egress(frame)
    assert (rv2, out2) == (rv, out), "same flow, same frame: the source port must be stable"


def test_encap_source_port_is_a_stable_per_flow_hash(lab):
    def sport_of(inner_sport: int, payload: bytes) -> int:
        rv, out = lab.egress(
            tunnel_frame(udp_packet(OWN_HOST, PEER_A.host(7), inner_sport, 53, payload))
        )
        assert rv == TC_ACT_REDIRECT
        return outer_sport(out)

    ports = {s: sport_of(s, b"x") for s in range(20000, 20032)}
    assert all(SPORT_MIN <= p <= SPORT_MAX for p in ports.values())
    assert len(set(ports.values())) > 16, f"32 flows share few source ports: {ports}"
    for s in (20000, 20017):  # the payload is not part of the flow
        assert sport_of(s, b"another payload, longer") == ports[s]


def test_encap_to_a_peer_without_neighbour_is_handed_to_the_neighbour_subsystem(lab):
    """NO_NEIGH: bpf_fib_lookup cannot fill the MACs; the program uses bpf_redirect_neigh,
    so the verdict is TC_ACT_REDIRECT, counted as encap, and the outer Ethernet addresses
    are left as they came (the neighbour layer writes them when it resolves 192.0.2.5)."""
    inner_ip = udp_packet(OWN_HOST, PEER_NO_NEIGH.host(9), 4000, 4001, b"no neighbour yet")
    frame = tunnel_frame(inner_ip)

    rv, out, delta = lab.counted("egress", frame)

    assert rv == TC_ACT_REDIRECT
    want = expected_encap(
        inner_ip,
        PEER_NO_NEIGH,
        sport=outer_sport(out),
        outer_dst="02:00:00:00:0f:0f",  # tunnel_frame()'s own addresses, untouched
        outer_src=OWN_VTEP,
    )
    assert out.hex() == want.hex()
    one(delta, ("traffic", "vxlan", "encap"), 1, len(frame))


def test_encap_with_forwarding_off_is_a_counted_drop(lab):
    """bpf_fib_lookup answers FWD_DISABLED when IPv4 forwarding is off on the underlay
    device, even for BPF_FIB_LOOKUP_OUTPUT. Flannel nodes forward (their pods need it);
    where one does not, the program drops with a reason, never silently."""
    frame = to(PEER_A)
    sysctl(lab.ns, "net.ipv4.conf.u0.forwarding", "0")
    try:
        wait_out_fib_cache()
        rv, _, delta = lab.counted("egress", frame)
    finally:
        sysctl(lab.ns, "net.ipv4.conf.u0.forwarding", "1")
        wait_out_fib_cache()
    assert rv == TC_ACT_SHOT
    one(delta, ("reason", "vxlan", "DROP_NO_UNDERLAY_ROUTE"), 1, len(frame))


# --- 4. host-gw -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_host_gw_rewrites_only_the_macs(lab, kind):
    make = tcp_packet if kind == "tcp" else udp_packet
    inner_ip = make(OWN_HOST, PEER_HOSTGW.host(9), 33000, 8080, b"host-gw payload")
    frame = tunnel_frame(inner_ip)

    rv, out, delta = lab.counted("egress", frame)

    assert rv == TC_ACT_REDIRECT
    # TTL is not decremented here: the stack already did when it forwarded to flannel.1.
    assert out.hex() == (eth(PEER_HOSTGW.neigh_mac, UNDERLAY_MAC) + inner_ip).hex()
    one(delta, ("traffic", "host-gw", "forward"), 1, len(frame))


@pytest.mark.parametrize(
    ("peer", "inner_len", "df", "verdict", "key"),
    [
        (PEER_A, 1450, True, TC_ACT_REDIRECT, ("traffic", "vxlan", "encap")),
        (PEER_A, 1451, True, TC_ACT_REDIRECT, ("reason", "vxlan", "DROP_FRAG_NEEDED")),
        (PEER_A, 1451, False, TC_ACT_SHOT, ("reason", "vxlan", "DROP_TOO_BIG")),
        (PEER_HOSTGW, 1500, True, TC_ACT_REDIRECT, ("traffic", "host-gw", "forward")),
        (PEER_HOSTGW, 1501, True, TC_ACT_REDIRECT, ("reason", "host-gw", "DROP_FRAG_NEEDED")),
        (PEER_HOSTGW, 1501, False, TC_ACT_SHOT, ("reason", "host-gw", "DROP_TOO_BIG")),
    ],
    ids=[
        "vxlan-1450",
        "vxlan-1451",
        "vxlan-1451-no-df",
        "host-gw-1500",
        "host-gw-1501",
        "host-gw-1501-no-df",
    ],
)
def test_underlay_mtu_boundary(lab, peer, inner_len, df, verdict, key):
    """u0 has MTU 1500: a VXLAN frame is 50 bytes more than its inner packet. One too big
    is answered with ICMP "fragmentation needed" when it has DF (tests/test_pmtu.py shows
    the answer), dropped when it has not (the stack would fragment it; BPF cannot)."""
    payload = b"m" * (inner_len - 28)
    flags = IP_DF if df else 0
    frame = tunnel_frame(udp_packet(OWN_HOST, peer.host(3), 1, 2, payload, flags_frag=flags))
    rv, _, delta = lab.counted("egress", frame)
    assert rv == verdict
    one(delta, key, 1, len(frame))


# --- the FIB cache (fib.h) ---------------------------------------------------------------


def test_a_changed_neighbour_reaches_the_wire_once_the_cache_window_passed(lab):
    frame = to(PEER_A)
    rv, out = lab.egress(frame)
    assert (rv, out[: ETH_HLEN - 2]) == (TC_ACT_REDIRECT, mac(PEER_A.neigh_mac) + mac(UNDERLAY_MAC))
    moved = "02:00:00:00:00:99"
    ip(lab.ns, f"neigh replace {PEER_A.public_ip} lladdr {moved} dev u0 nud permanent")
    try:
        wait_out_fib_cache()
        rv, out = lab.egress(frame)
        assert (rv, out[:6]) == (TC_ACT_REDIRECT, mac(moved)), "the old neighbour is still used"
    finally:
        ip(
            lab.ns,
            f"neigh replace {PEER_A.public_ip} lladdr {PEER_A.neigh_mac} dev u0 nud permanent",
        )
        wait_out_fib_cache()


@pytest.mark.parametrize("peer", [PEER_A, PEER_HOSTGW], ids=["vxlan", "host-gw"])
def test_a_cached_next_hop_still_checks_every_frame_against_the_mtu(lab, peer):
    """The cache remembers the largest frame the route's MTU allowed; a larger one right
    after a cached answer is still sized by bpf_fib_lookup and dropped (it has no DF: one
    with DF would be answered, test_underlay_mtu_boundary)."""
    limit = 1450 if peer.backend is Backend.VXLAN else 1500

    def sized(inner_len: int) -> bytes:
        payload = b"m" * (inner_len - 28)
        return tunnel_frame(udp_packet(OWN_HOST, peer.host(3), 1, 2, payload, flags_frag=0))

    for inner_len, verdict in ((100, TC_ACT_REDIRECT), (limit, TC_ACT_REDIRECT),
                               (limit + 1, TC_ACT_SHOT), (limit, TC_ACT_REDIRECT),
                               (limit + 1, TC_ACT_SHOT)):  # fmt: skip
        rv, _ = lab.egress(sized(inner_len))
        assert rv == verdict, f"{inner_len}-byte inner packet after a cached answer"


# --- 2. field by field against the Linux vxlan driver -------------------------------------

KERNEL_NS_A, KERNEL_NS_B = f"fxdp-kva-{TAG}", f"fxdp-kvb-{TAG}"


@pytest.fixture
def kernel_vxlan(lab):
    """Netns A holds a vxlan device configured exactly as flanneld does, netns B the other
    end of the underlay veth. Yields (A, B)."""
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(temp_netns(KERNEL_NS_A))
        b = stack.enter_context(temp_netns(KERNEL_NS_B))
        peer_ip, peer_mac = PEER_A.public_ip, PEER_A.neigh_mac
        ip(a, f"link add u0 address {UNDERLAY_MAC} type veth peer u1 netns {b} address {peer_mac}")
        ip(a, f"addr add {OWN_IP}/24 dev u0")
        ip(b, f"addr add {peer_ip}/24 dev u1")
        ip(a, "link set u0 up")
        ip(b, "link set u1 up")
        ip(a, f"neigh add {peer_ip} lladdr {peer_mac} dev u0 nud permanent")
        # A real NIC finishes the outer UDP checksum; a veth leaves it partial on the wire.
        run("ip", "netns", "exec", a, "ethtool", "-K", "u0", "tx", "off")
        # As flanneld (flannel-compat.md): device, <own subnet>.0/32, neighbour, FDB, route.
        ip(
            a,
            f"link add flannel.1 address {OWN_VTEP} type vxlan id {VNI} local {OWN_IP} dev u0 "
            f"dstport {PORT} nolearning",
        )
        ip(a, f"addr add {OWN_SUBNET.network_address}/32 dev flannel.1")
        ip(a, "link set flannel.1 up")
        gw, vtep = PEER_A.subnet.network_address, PEER_A.vtep_mac
        ip(a, f"neigh add {gw} lladdr {vtep} dev flannel.1 nud permanent")
        run(*f"bridge -n {a} fdb append {vtep} dev flannel.1 dst {peer_ip} self permanent".split())
        ip(a, f"route add {PEER_A.subnet} via {gw} dev flannel.1 onlink")
        # Our program runs in A too: its FIB lookup needs forwarding on, as on any node.
        sysctl(a, "net.ipv4.conf.all.forwarding", "1")
        yield a, b


def capture_kernel_frame(a: str, b: str, send) -> bytes:
    """Run send() in netns A; return the first VXLAN frame that arrives on B's u1."""
    with netns.entered(b):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    with contextlib.closing(cap), contextlib.ExitStack() as cleanup:
        cap.bind(("u1", 0))
        with netns.entered(a):
            cleanup.enter_context(contextlib.closing(send()))
        deadline = time.monotonic() + 3
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([cap], [], [], left)[0]:
                break
            frame, addr = cap.recvfrom(65535)
            if addr[2] != socket.PACKET_HOST or len(frame) < VXLAN_OVERHEAD + ETH_HLEN:
                continue
            is_udp = frame[12:14] == b"\x08\x00" and frame[23] == IPPROTO_UDP
            if is_udp and struct.unpack_from("!H", frame, 36)[0] == PORT:
                return frame
    raise AssertionError("the kernel vxlan device sent nothing to the peer within 3 s")


def udp_sender(tos: int):
    def send():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
        s.sendto(b"compare me" * 7, (PEER_A.host(7), 5000))
        return s

    return send


def tcp_syn_sender():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((PEER_A.host(7), 80))
    return s


def vxlan_fields(frame: bytes) -> dict[str, object]:
    """Every field of a VXLAN frame up to the inner Ethernet header; the rest as one."""
    (ver_ihl, tos, tot_len, ident, flags_frag, ttl, proto, ip_csum, saddr, daddr) = (
        struct.unpack_from("!BBHHHBBH4s4s", frame, 14)
    )
    sport, dport, udp_len, udp_csum = struct.unpack_from("!HHHH", frame, 34)
    return {
        "eth.dst": frame[0:6].hex(),
        "eth.src": frame[6:12].hex(),
        "eth.type": frame[12:14].hex(),
        "ip.version": ver_ihl >> 4,
        "ip.ihl": ver_ihl & 0xF,
        "ip.dscp": tos >> 2,
        "ip.ecn": tos & 0x3,
        "ip.tot_len": tot_len,
        "ip.id": ident,
        "ip.flag.reserved": flags_frag >> 15,
        "ip.flag.df": (flags_frag >> 14) & 1,
        "ip.flag.mf": (flags_frag >> 13) & 1,
        "ip.frag_offset": flags_frag & 0x1FFF,
        "ip.ttl": ttl,
        "ip.protocol": proto,
        "ip.checksum": ip_csum,
        "ip.src": saddr.hex(),
        "ip.dst": daddr.hex(),
        "udp.sport": sport,
        "udp.dport": dport,
        "udp.len": udp_len,
        "udp.checksum": udp_csum,
        "vxlan.flags": frame[42],
        "vxlan.reserved1": frame[43:46].hex(),
        "vxlan.vni": int.from_bytes(frame[46:49], "big"),
        "vxlan.reserved2": frame[49],
        "inner.eth.dst": frame[50:56].hex(),
        "inner.eth.src": frame[56:62].hex(),
        "inner.eth.type": frame[62:64].hex(),
        "inner.packet": frame[64:].hex(),
    }


# What the Linux vxlan driver (kernel 6.18, device made as above) sends, and why we may differ.
LEGITIMATE_DIFFERENCES = {
    "ip.id": "kernel: from its IP ID generator (__ip_select_ident), needed because it sends "
    "DF=0; ours: 0, which RFC 6864 allows for atomic datagrams (DF=1)",
    "ip.flag.df": "kernel: 0 (vxlan 'df unset' is the default, flanneld sets none); ours: 1, "
    "so nothing fragments the outer packet on the underlay (an oversized frame is answered "
    "with ICMP fragmentation needed, or without DF dropped as DROP_TOO_BIG, before it leaves "
    "instead)",
    "ip.checksum": "follows from ip.id and ip.flag.df; both headers are checked to be valid",
    "udp.sport": "both are a per-flow hash in 32768..60999, but not the same hash: the kernel "
    "uses skb_get_hash() (a socket's random txhash where there is one) folded with "
    "hash ^= hash << 16, ours bpf_get_hash_recalc() of the inner flow",
    "udp.checksum": "kernel: a full checksum (a vxlan device made without 'noudpcsum' has "
    "udpcsum on, which flanneld never turns off); ours: 0, valid for IPv4 (RFC 7348 says "
    "SHOULD be 0) and accepted by every Linux receiver",
}

KERNEL_CASES = {
    "udp": (udp_sender(0x00), {}),
    "udp-dscp-ect0": (udp_sender(0xB8 | 0x02), {}),
    "udp-ect1": (udp_sender(0x01), {}),
    "udp-ce": (udp_sender(0x03), {}),
    "tcp-syn": (tcp_syn_sender, {}),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_encap_matches_the_linux_vxlan_driver_field_by_field(lab, kernel_vxlan, case):
    a, b = kernel_vxlan
    send, extra_differences = KERNEL_CASES[case]
    allowed = LEGITIMATE_DIFFERENCES | extra_differences
    kernel = capture_kernel_frame(a, b, send)

    # Feed our program the very IP packet the kernel encapsulated, as flannel.1 would.
    lab.configure(lab.settings(underlay_ifindex=ifindex(a, "u0")), peers=[PEER_A])
    with netns.entered(a):
        rv, ours, _ = prog_test_run(lab.egress_fd, tunnel_frame(kernel[VXLAN_OVERHEAD + 14 :]))
    assert rv == TC_ACT_REDIRECT

    k, o = vxlan_fields(kernel), vxlan_fields(ours)
    differing = {name for name in k if k[name] != o[name]}
    unexplained = differing - set(allowed)
    assert not unexplained, "fields differ from the kernel's without a listed reason: " + ", ".join(
        f"{n}: kernel {k[n]!r} ours {o[n]!r}" for n in sorted(unexplained)
    )
    # The listed fields: each side valid on its own terms.
    for frame in (kernel, ours):
        assert inet_csum(frame[14:34]) == 0, "outer IPv4 header checksum"
        assert SPORT_MIN <= outer_sport(frame) <= SPORT_MAX
    assert (o["ip.id"], o["ip.flag.df"], o["udp.checksum"]) == (0, 1, 0)
    if k["udp.checksum"]:
        assert l4_csum_ok(kernel[14:]), "the kernel's outer UDP checksum"
    diffs = ", ".join(f"{n}={k[n]!r}/{o[n]!r}" for n in sorted(differing))
    print(f"\n{case}: kernel/ours: {diffs}")


# --- 3. decapsulation -----------------------------------------------------------------------


def inner_frame(inner_ip: bytes, src_mac: str = PEER_A.vtep_mac) -> bytes:
    return eth(OWN_VTEP, src_mac) + inner_ip


@pytest.mark.parametrize("prog", UNDERLAY_PROGS)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_decap_returns_exactly_the_inner_frame(lab, proto, prog):
    inner_ip = inner_from_a(proto)
    frame = vxlan_frame(inner_ip)

    rv, out, delta = lab.counted(prog, frame)

    assert rv == verdict_of(prog, XDP_REDIRECT)
    assert out.hex() == inner_frame(inner_ip).hex()
    assert out[ETH_HLEN:] == inner_ip, "inner packet must be byte-for-byte"
    one(delta, ("traffic", "vxlan", "decap"), 1, len(frame) - VXLAN_OVERHEAD)


@pytest.mark.parametrize("prog", UNDERLAY_PROGS)
@pytest.mark.parametrize("size", [0, 1, 1000, 1460], ids=lambda n: f"payload-{n}")
def test_decap_of_every_size_is_exact(lab, prog, size):
    """From an empty TCP payload up to a 1500-byte inner packet (a 1550-byte frame)."""
    inner_ip = inner_from_a("tcp", bytes(random.Random(size).randbytes(size)))
    frame = vxlan_frame(inner_ip)
    rv, out, delta = lab.counted(prog, frame)
    assert rv == verdict_of(prog, XDP_REDIRECT)
    assert out.hex() == inner_frame(inner_ip).hex()
    one(delta, ("traffic", "vxlan", "decap"), 1, ETH_HLEN + len(inner_ip))


@pytest.mark.parametrize("prog", UNDERLAY_PROGS)
def test_decap_keeps_the_inner_source_mac(lab, prog):
    """The decapsulated frame comes from the sender's VtepMAC, whatever the outer Ethernet
    header said: underlay_xdp keeps the inner header, underlay_tc writes it from it."""
    inner_ip = inner_from_a("udp", b"from another VTEP")
    frame = vxlan_frame(inner_ip, inner_src_mac="02:00:00:00:ab:cd")
    assert frame[:ETH_HLEN] == eth(UNDERLAY_MAC, PEER_A.neigh_mac)  # the outer header

    rv, out = lab.run(prog, frame)

    assert rv == verdict_of(prog, XDP_REDIRECT)
    assert out.hex() == (eth(OWN_VTEP, "02:00:00:00:ab:cd") + inner_ip).hex()


@pytest.mark.parametrize("prog", UNDERLAY_PROGS)
def test_decap_with_a_configured_port_and_vni(lab, prog):
    lab.configure(lab.settings(vni=0xABCDE, vxlan_port=4789))
    inner_ip = inner_from_a("udp")
    old = vxlan_frame(inner_ip)
    assert lab.run(prog, old) == (verdict_of(prog, XDP_PASS), old)  # 8472 is not ours now
    rv, out = lab.run(prog, vxlan_frame(inner_ip, dport=4789, vni=0xABCDE))
    assert (rv, out) == (verdict_of(prog, XDP_REDIRECT), inner_frame(inner_ip))


@pytest.mark.parametrize("prog", UNDERLAY_PROGS)
def test_decap_with_another_vtep_mac(lab, prog):
    """The inner destination must be the configured VtepMAC; underlay_tc writes that one."""
    vtep = "02:00:00:00:77:77"
    lab.configure(lab.settings(vtep_mac=vtep))
    inner_ip = inner_from_a("udp")
    old = vxlan_frame(inner_ip)
    rv, out, delta = lab.counted(prog, old)
    assert (rv, out) == (verdict_of(prog, XDP_DROP), old)
    one(delta, ("reason", "vxlan", "DROP_WRONG_INNER_MAC"), 1, len(old))
    rv, out = lab.run(prog, vxlan_frame(inner_ip, inner_dst_mac=vtep))
    assert rv == verdict_of(prog, XDP_REDIRECT)
    assert out.hex() == (eth(vtep, PEER_A.vtep_mac) + inner_ip).hex()


CSUM_PAYLOAD_LENS = [0, 1, 2, 3, 255, 256, 257, 1001, 1400]


def partial_inner(proto: str, payload_len: int) -> tuple[bytes, bytes]:
    """(correct, partial): an inner packet from A, and the same with a partial checksum."""
    payload = bytes(random.Random(payload_len).randrange(256) for _ in range(payload_len))
    correct = inner_from_a(proto, payload)
    partial = partial_csum(correct)
    assert partial != correct and not l4_csum_ok(partial)
    return correct, partial


@pytest.mark.parametrize("payload_len", CSUM_PAYLOAD_LENS)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_xdp_decap_completes_a_partial_checksum(lab, proto, payload_len):
    """XDP_REDIRECT loses the skb's checksum state: underlay_xdp must finish the sum."""
    correct, partial = partial_inner(proto, payload_len)

    rv, out = lab.xdp(vxlan_frame(partial))

    assert rv == XDP_REDIRECT
    assert l4_csum_ok(out[ETH_HLEN:])
    assert out.hex() == inner_frame(correct).hex()


@pytest.mark.parametrize("payload_len", CSUM_PAYLOAD_LENS)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_tc_decap_leaves_a_partial_checksum_as_is(lab, proto, payload_len):
    """underlay_tc keeps the skb, and with it the checksum state (CHECKSUM_PARTIAL stays
    partial for the receiver to trust): the field must come out exactly as it came in.
    This is where the two underlay programs' outputs differ, and only here."""
    correct, partial = partial_inner(proto, payload_len)
    frame = vxlan_frame(partial)

    rv, out, delta = lab.counted("tc", frame)

    assert rv == TC_ACT_REDIRECT
    assert out.hex() == inner_frame(partial).hex()
    one(delta, ("traffic", "vxlan", "decap"), 1, len(frame) - VXLAN_OVERHEAD)
    assert lab.xdp(frame) == (XDP_REDIRECT, inner_frame(correct))


# struct __sk_buff (uapi linux/bpf.h): its size, and the fields a tc test run may set
# that are used here.
SKB_CTX_SIZE, SKB_CTX_GSO_SEGS, SKB_CTX_GSO_SIZE = 192, 164, 176


def test_tc_decap_the_kernel_refuses_is_a_counted_drop(lab):
    """bpf_skb_adjust_room() refuses to shrink a GSO skb whose gso_type is not TCP (a
    test run can make a GSO skb, gso_size in the __sk_buff context, but leaves its gso_type
    0). That is how underlay_tc's refusal branch is reached: the frame must come back
    untouched, dropped and counted as DROP_ENCAP_FAILED with its whole length."""
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("=I", ctx, SKB_CTX_GSO_SEGS, 2)
    struct.pack_into("=I", ctx, SKB_CTX_GSO_SIZE, len(GOOD_INNER) // 2)
    before = lab.counters.snapshot()
    with netns.entered(lab.ns):
        rv, out, _ = prog_test_run(lab.tc_fd, GOOD, ctx=bytes(ctx))
    assert (rv, out) == (TC_ACT_SHOT, GOOD)
    delta = Counters.delta(before, lab.counters.snapshot())
    one(delta, ("reason", "vxlan", "DROP_ENCAP_FAILED"), 1, len(GOOD))


@pytest.mark.parametrize(
    "inner_ip",
    [
        inner_from_a("tcp", b"already correct"),
        inner_from_a("udp", b"already correct"),
        with_l4_csum(inner_from_a("udp", b"no checksum"), 0),
        with_l4_csum(inner_from_a("tcp", b"corrupt"), 0x1234),  # never "repaired"
    ],
    ids=["tcp-correct", "udp-correct", "udp-zero", "tcp-corrupt"],
)
@pytest.mark.parametrize("prog", UNDERLAY_PROGS)
def test_decap_leaves_other_checksums_alone(lab, inner_ip, prog):
    rv, out = lab.run(prog, vxlan_frame(inner_ip))
    assert rv == verdict_of(prog, XDP_REDIRECT)
    assert out.hex() == inner_frame(inner_ip).hex()


@pytest.mark.parametrize("prog", UNDERLAY_PROGS)
def test_host_gw_delivery_passes_untouched_and_is_counted(lab, prog):
    frame = eth(UNDERLAY_MAC, PEER_HOSTGW.neigh_mac) + tcp_packet(
        PEER_HOSTGW.host(9), OWN_HOST, 80, 40000, b"via host-gw"
    )
    rv, out, delta = lab.counted(prog, frame)
    assert (rv, out) == (verdict_of(prog, XDP_PASS), frame)
    one(delta, ("traffic", "host-gw", "deliver"), 1, len(frame))


# --- 5. malformed and foreign frames --------------------------------------------------------


@pytest.mark.parametrize("prog", UNDERLAY_PROGS)
@pytest.mark.parametrize("case", list(UNDERLAY_CASES))
def test_underlay_verdict_and_reason(lab, case, prog):
    """The table states underlay_xdp's verdicts; underlay_tc must give the same, mapped."""
    frame, verdict, key = UNDERLAY_CASES[case]
    rv, out, delta = lab.counted(prog, frame)
    assert rv == verdict_of(prog, verdict)
    if verdict == XDP_REDIRECT:
        assert out.hex() == decapped(prog, frame).hex()
    else:
        assert out == frame, "a pass or a drop must leave the frame untouched"
    nbytes = len(frame) - VXLAN_OVERHEAD if verdict == XDP_REDIRECT else len(frame)
    one(delta, key, 1, nbytes)


# Where each header of GOOD starts, and its length.
HEADERS = {
    "eth": (0, ETH_HLEN),
    "ipv4": (14, 20),
    "udp": (34, UDP_HLEN),
    "vxlan": (42, VXLAN_HLEN),
    "inner-eth": (50, ETH_HLEN),
    "inner-ipv4": (64, 20),
}
INNER_IPV4_END = 84


def truncation_expectation(length: int):
    if length < VXLAN_OVERHEAD:  # outer headers incomplete: not (recognisably) ours
        return XDP_PASS, ("reason", "none", "PASS_TRUNCATED")
    if length < INNER_IPV4_END:  # ours, but the inner Ethernet or IPv4 header is cut
        return XDP_DROP, ("reason", "vxlan", "DROP_MALFORMED")
    # The inner IPv4 header is whole: decapped; a short inner L4 is the stack's to drop
    # (ip_rcv checks tot_len against the frame), as with a kernel vxlan device.
    return XDP_REDIRECT, ("traffic", "vxlan", "decap")


def check_truncated(lab, prog: str, length: int) -> None:
    frame = GOOD[:length]
    if refused_by_test_run(prog, frame):
        # XDP: under 14 bytes; tc: under 14, and (GOOD being IPv4-typed) under 34 bytes.
        assert length < (ETH_HLEN if prog == "xdp" else ETH_HLEN + 20), length
        before = lab.counters.snapshot()
        with pytest.raises(BpfError) as err:
            lab.run(prog, frame)
        assert err.value.errno == errno.EINVAL, f"cut at {length}"
        assert Counters.delta(before, lab.counters.snapshot()) == {}, f"cut at {length}"
        return
    verdict, key = truncation_expectation(length)
    rv, out, delta = lab.counted(prog, frame)
    assert rv == verdict_of(prog, verdict), f"cut at {length}"
    if verdict == XDP_REDIRECT:
        assert out.hex() == decapped(prog, frame).hex(), f"cut at {length}"
    else:
        assert out == frame, f"cut at {length}"
    nbytes = length - VXLAN_OVERHEAD if verdict == XDP_REDIRECT else length
    assert delta == {key: (1, nbytes)}, f"cut at {length}: {delta}"


@pytest.mark.parametrize("prog", UNDERLAY_PROGS)
@pytest.mark.parametrize("where", ["missing", "half", "one-byte-short"])
@pytest.mark.parametrize("header", list(HEADERS))
def test_underlay_truncated_in_each_header(lab, header, where, prog):
    """The frame ends before, in the middle of, or one byte short of the end of a header.
    Ethernet: BPF_PROG_TEST_RUN refuses frames under 14 bytes (EINVAL, nothing counted),
    so that is all that can be tested for it; for underlay_tc the same holds for the outer
    IPv4 header (an IPv4-typed tc frame under 34 bytes is refused)."""
    offset, size = HEADERS[header]
    check_truncated(
        lab, prog, {"missing": offset, "half": offset + size // 2}.get(where, offset + size - 1)
    )


@pytest.mark.parametrize("prog", UNDERLAY_PROGS)
def test_underlay_truncated_at_every_length(lab, prog):
    for length in range(INNER_IPV4_END + 8):
        check_truncated(lab, prog, length)


def test_tc_test_run_refusals_are_as_documented(lab):
    """What tc_test_run_refuses() (and so every tc test here) assumes of the kernel: for
    each ethertype, the shortest frame a tc test run accepts, and one byte less."""
    for ethertype, minimum in ((0x0800, 34), (0x86DD, 54), (0x0806, 14), (0x8100, 14)):
        frame = eth(UNDERLAY_MAC, PEER_A.neigh_mac, ethertype) + bytes(minimum - ETH_HLEN)
        assert not tc_test_run_refuses(frame) and tc_test_run_refuses(frame[:-1])
        with pytest.raises(BpfError) as err:
            lab.tc(frame[:-1])
        assert err.value.errno == errno.EINVAL, hex(ethertype)
        rv, out = lab.tc(frame)
        assert (rv, out) == (TC_ACT_OK, frame), hex(ethertype)


def test_not_configured(lab):
    lab.configure(lab.settings(public_ip=IPv4Address("0.0.0.0")))
    for prog in UNDERLAY_PROGS:
        rv, out, delta = lab.counted(prog, GOOD)
        assert (rv, out) == (verdict_of(prog, XDP_PASS), GOOD), prog
        one(delta, ("reason", "none", "PASS_NOT_CONFIGURED"), 1, len(GOOD))
    frame = tunnel_frame(inner_from_a("udp"))
    rv, _, delta = lab.counted("egress", frame)
    assert rv == TC_ACT_SHOT
    one(delta, ("reason", "none", "DROP_NOT_CONFIGURED"), 1, len(frame))


def to(peer_or_host, payload=b"payload") -> bytes:
    dst = peer_or_host.host(9) if isinstance(peer_or_host, RemotePeer) else peer_or_host
    return tunnel_frame(udp_packet(OWN_HOST, dst, 1000, 2000, payload))


EGRESS_CASES = {
    "arp": (tunnel_frame(arp_payload(), ETH_P_ARP), ("none", "DROP_INNER_NOT_IPV4")),
    "ipv6": (tunnel_frame(ipv6_packet(), ETH_P_IPV6), ("none", "DROP_INNER_NOT_IPV4")),
    "unknown-destination": (to(UNKNOWN_HOST), ("none", "DROP_NO_ROUTE")),
    "own-subnet-destination": (to(OWN_HOST), ("none", "DROP_NO_ROUTE")),
    "vxlan-peer-unroutable": (to(PEER_UNROUTABLE), ("vxlan", "DROP_NO_UNDERLAY_ROUTE")),
    "host-gw-peer-unroutable": (
        to(PEER_HOSTGW_UNROUTABLE),
        ("host-gw", "DROP_NO_UNDERLAY_ROUTE"),
    ),
}


@pytest.mark.parametrize("case", list(EGRESS_CASES))
def test_egress_drops_with_reason(lab, case):
    frame, (backend, reason) = EGRESS_CASES[case]
    rv, _, delta = lab.counted("egress", frame)
    assert rv == TC_ACT_SHOT
    one(delta, ("reason", backend, reason), 1, len(frame))


def test_egress_truncated_at_every_length(lab):
    """tunnel_egress's DROP_MALFORMED (an IPv4 frame without a whole IPv4 header) cannot be
    reached through BPF_PROG_TEST_RUN: the kernel refuses such frames itself. Check the
    refusal (nothing counted) and every length from there on."""
    frame = to(PEER_A)
    for length in range(len(frame) + 1):
        cut = frame[:length]
        if tc_test_run_refuses(cut):
            before = lab.counters.snapshot()
            with pytest.raises(BpfError) as err:
                lab.egress(cut)
            assert err.value.errno == errno.EINVAL, length
            assert Counters.delta(before, lab.counters.snapshot()) == {}, length
            continue
        assert length >= ETH_HLEN + 20
        rv, _, delta = lab.counted("egress", cut)
        # A whole IPv4 header is all the encap needs; the peer's stack checks the rest.
        assert rv == TC_ACT_REDIRECT, length
        assert delta == {("traffic", "vxlan", "encap"): (1, length)}, length


# --- 6. traffic counters --------------------------------------------------------------------

N = 17


@pytest.mark.parametrize(
    ("prog", "frame", "key", "counted_len"),
    [
        ("xdp", GOOD, ("traffic", "vxlan", "decap"), len(GOOD) - VXLAN_OVERHEAD),
        ("tc", GOOD, ("traffic", "vxlan", "decap"), len(GOOD) - VXLAN_OVERHEAD),
        ("egress", to(PEER_A, b"e" * 333), ("traffic", "vxlan", "encap"), None),
        ("egress", to(PEER_HOSTGW, b"h" * 99), ("traffic", "host-gw", "forward"), None),
    ],
    ids=["vxlan-decap-xdp", "vxlan-decap-tc", "vxlan-encap", "host-gw-forward"],
)
def test_traffic_counters_count_packets_and_inner_frame_bytes(lab, prog, frame, key, counted_len):
    """Bytes are the inner Ethernet frame: as it left the stack (encap, forward) or as it
    is after the outer headers are stripped (decap)."""
    counted_len = counted_len or len(frame)
    before = lab.counters.snapshot()
    for _ in range(N):
        rv, _ = lab.run(prog, frame)
        assert rv == (XDP_REDIRECT if prog == "xdp" else TC_ACT_REDIRECT)
    delta = Counters.delta(before, lab.counters.snapshot())
    one(delta, key, N, N * counted_len)


REASON_COUNTER_CASES = ["wrong-vni", "arp", "spoofed-source-from-peer-a", "inner-ipv6"]


@pytest.mark.parametrize("prog", UNDERLAY_PROGS)
@pytest.mark.parametrize("case", [*REASON_COUNTER_CASES, "host-gw-deliver"])
def test_underlay_pass_and_drop_counters_count_whole_frames(lab, case, prog):
    """A pass or a drop counts the frame as it came, N times N bytes exactly."""
    if case == "host-gw-deliver":
        frame = eth(UNDERLAY_MAC, PEER_HOSTGW.neigh_mac) + udp_packet(
            PEER_HOSTGW.host(9), OWN_HOST, 1, 2, b"d" * 301
        )
        verdict, key = XDP_PASS, ("traffic", "host-gw", "deliver")
    else:
        frame, verdict, key = UNDERLAY_CASES[case]
    before = lab.counters.snapshot()
    for _ in range(N):
        assert lab.run(prog, frame) == (verdict_of(prog, verdict), frame)
    one(Counters.delta(before, lab.counters.snapshot()), key, N, N * len(frame))


@pytest.mark.parametrize("decap_prog", UNDERLAY_PROGS)
def test_traffic_counters_sum_mixed_lengths(lab, decap_prog):
    sizes = (0, 1, 100, 1000, 1410)
    incoming = [inner_from_a("tcp", b"z" * n) for n in sizes]
    outgoing = [tcp_packet(OWN_HOST, PEER_A.host(7), 80, 443, b"z" * n) for n in sizes]
    before = lab.counters.snapshot()
    for inner_ip in incoming:
        assert lab.run(decap_prog, vxlan_frame(inner_ip))[0] == verdict_of(decap_prog, XDP_REDIRECT)
    for inner_ip in outgoing:
        assert lab.egress(tunnel_frame(inner_ip))[0] == TC_ACT_REDIRECT
    delta = Counters.delta(before, lab.counters.snapshot())
    inner_bytes = sum(ETH_HLEN + len(i) for i in incoming)
    assert delta == {
        ("traffic", "vxlan", "decap"): (len(sizes), inner_bytes),
        ("traffic", "vxlan", "encap"): (len(sizes), inner_bytes),
    }


# --- 7. every frame is accounted for exactly once -------------------------------------------

FUZZ_FRAMES = 1500


def xdp_templates() -> list[bytes]:
    return [
        GOOD,
        vxlan_frame(inner_from_a("tcp", b"t" * 200)),
        vxlan_frame(partial_csum(inner_from_a("tcp", b"p" * 77))),
        *(f for f, _, _ in UNDERLAY_CASES.values()),
        eth(UNDERLAY_MAC, PEER_HOSTGW.neigh_mac)
        + udp_packet(PEER_HOSTGW.host(9), OWN_HOST, 1, 2, b"hg"),
    ]


def egress_templates() -> list[bytes]:
    return [
        to(PEER_A),
        tunnel_frame(tcp_packet(OWN_HOST, PEER_A.host(8), 1, 2, b"t" * 300)),
        to(PEER_HOSTGW),
        to(PEER_NO_NEIGH),
        to(PEER_B, b"b" * 1400),
        to(PEER_A, b"big" * 500),
        *(f for f, _ in EGRESS_CASES.values()),
    ]


def fuzz_frames(seed: int, templates: list[bytes], refused=lambda frame: False) -> list[bytes]:
    """Random bytes, random truncations and random byte mutations of valid frames, except
    those the kernel's test run refuses anyway."""
    rng = random.Random(seed)
    frames: list[bytes] = []
    i = 0
    while len(frames) < FUZZ_FRAMES:
        kind = i % 3
        i += 1
        if kind == 0:
            n = rng.randint(ETH_HLEN, 120 if rng.random() < 0.8 else 1514)
            frame = bytearray(rng.randbytes(n))
            if rng.random() < 0.5:  # often an IPv4 ethertype, to get past the first check
                frame[12:14] = b"\x08\x00"
        else:
            frame = bytearray(rng.choice(templates))
            if kind == 1:
                frame = frame[: rng.randint(ETH_HLEN, len(frame))]
            else:
                for _ in range(rng.randint(1, 3)):
                    pos = rng.randrange(min(len(frame), 100))
                    frame[pos] = rng.randrange(256)
        if not refused(bytes(frame)):
            frames.append(bytes(frame))
    return frames


def reason_verdict(name: str) -> str:
    return "drop" if name.startswith("DROP_") else "pass"


def decap_matches(prog: str, frame: bytes, out: bytes) -> bool:
    """Is out what prog makes of frame when it decapsulates it? underlay_xdp may also have
    completed a partial L4 checksum: those two bytes are all it may change."""
    want = decapped(prog, frame)
    if out == want:
        return True
    if prog != "xdp" or len(out) != len(want):
        return False
    csum_at = ETH_HLEN + 20 + (16 if want[ETH_HLEN + 9] == IPPROTO_TCP else 6)
    return out[:csum_at] + out[csum_at + 2 :] == want[:csum_at] + want[csum_at + 2 :]


FUZZ_SEEDS = {"xdp": 0xF1A77E1, "egress": 0xF1A77E2, "tc": 0xF1A77E3}


def fuzz_frames_for(prog: str) -> list[bytes]:
    if prog == "egress":
        return fuzz_frames(FUZZ_SEEDS[prog], egress_templates(), tc_test_run_refuses)
    return fuzz_frames(FUZZ_SEEDS[prog], xdp_templates(), lambda f: refused_by_test_run(prog, f))


def check_underlay_outcome(prog, frame, rv, out, key, nbytes, where) -> None:
    """One fuzzed frame through an underlay program: a consistent verdict, counter, output."""
    kind, _, what = key
    verdicts = UNDERLAY_VERDICTS[prog]
    assert rv in verdicts.values(), where
    if rv == verdicts[XDP_REDIRECT]:
        assert key == ("traffic", "vxlan", "decap"), where
        assert nbytes == len(frame) - VXLAN_OVERHEAD == len(out), where
        assert decap_matches(prog, frame, out), where
    elif rv == verdicts[XDP_PASS]:
        assert out == frame, where
        assert nbytes == len(frame), where
        assert key == ("traffic", "host-gw", "deliver") or (
            kind == "reason" and reason_verdict(what) == "pass"
        ), where
    else:
        assert out == frame, where
        assert nbytes == len(frame), where
        assert kind == "reason" and reason_verdict(what) == "drop", where


@pytest.mark.parametrize("prog", ["xdp", "tc", "egress"])
def test_every_frame_is_counted_exactly_once(lab, prog):
    frames = fuzz_frames_for(prog)
    start = snapshot = lab.counters.snapshot()
    seen_verdicts: dict[int, int] = {}
    for i, frame in enumerate(frames):
        rv, out = lab.run(prog, frame)
        after = lab.counters.snapshot()
        delta = Counters.delta(snapshot, after)
        snapshot = after
        seen_verdicts[rv] = seen_verdicts.get(rv, 0) + 1
        where = f"frame {i} ({frame.hex()}): verdict {rv}, counters {delta}"
        assert len(delta) == 1, where
        key, (packets, nbytes) = next(iter(delta.items()))
        assert packets == 1, where
        if prog != "egress":
            check_underlay_outcome(prog, frame, rv, out, key, nbytes, where)
            continue
        kind, _, what = key
        assert rv in TC_VERDICTS, where
        assert nbytes == len(frame), where
        if rv == TC_ACT_REDIRECT:  # sent, or answered with ICMP (pmtu.h)
            assert (kind == "traffic" and what in ("encap", "forward")) or (
                kind == "reason" and what == "DROP_FRAG_NEEDED"
            ), where
        else:
            assert kind == "reason" and reason_verdict(what) == "drop", where
    total = Counters.delta(start, snapshot)
    assert sum(p for p, _ in total.values()) == len(frames)
    # The run must reach more than one outcome to mean anything.
    assert len(seen_verdicts) >= 2 and len(total) >= 6, (seen_verdicts, total)
    if prog != "egress":
        assert len(seen_verdicts) == 3, seen_verdicts  # pass, drop and decap all reached


def test_underlay_programs_agree_on_every_frame(lab):
    """underlay_xdp and underlay_tc share classify_underlay(): on every fuzzed frame (those
    a tc test run accepts) they must reach the same verdict, move the same counter by the
    same bytes, and produce the same frame, up to a partial checksum only XDP completes."""
    to_xdp = {tc: xdp for xdp, tc in UNDERLAY_VERDICTS["tc"].items()}
    snapshot = lab.counters.snapshot()
    for i, frame in enumerate(fuzz_frames_for("tc")):
        outcomes = []
        for prog in UNDERLAY_PROGS:
            rv, out = lab.run(prog, frame)
            after = lab.counters.snapshot()
            outcomes.append((rv if prog == "xdp" else to_xdp[rv], Counters.delta(snapshot, after)))
            snapshot = after
            if prog == "xdp":
                xdp_out = out
        where = f"frame {i} ({frame.hex()}): xdp, tc (as XDP verdicts) {outcomes}"
        assert outcomes[0] == outcomes[1], where
        if outcomes[0][0] == XDP_REDIRECT:
            assert decap_matches("xdp", frame, xdp_out) and out == decapped("tc", frame), where
        else:
            assert xdp_out == out == frame, where
