"""64-byte UDP packet rates with a generator that is never the bottleneck.

BPF_PROG_TEST_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES) runs an XDP program
on `count` frames as if they had arrived on an interface and carries out its verdict.
No user-space sender competes for the CPU (one iperf3 sendto() per datagram costs more
than either data path), so the figure is what one CPU can push through the path, up to
the receiving pod's UDP socket. Two injection points:

* `measure_path` (workload udp64): at the sender pod's veth end in its node, the frame
  the pod itself would send (to cni0's MAC, from the pod's address to the receiver
  pod's). XDP_PASS hands it to the node's stack exactly where the pod's packets enter
  it, so it crosses the whole pod-to-pod path: cni0, routing, the sender node's
  encapsulation or host-gw route, the underlay, the receiver node's ingress, cni0 and
  the receiving pod's veth. The stages after each veth run from the same CPU's
  backlog, so the injecting CPU does all the work.
* `measure_rx` (workload rx_pps): the receive path alone, at the receiving node's eth0.
  vxlan variants get the VXLAN frame the peer node would send (its public IP, our
  VNI, inner UDP from the peer's pod to ours); host-gw variants get the plain frame.
  With flannel-xdp's XDP hook the injected program chains (tail call) to the node's
  pinned underlay_xdp, which decapsulates and redirects to the tunnel veth; otherwise
  it returns XDP_PASS, so the frames enter the stack on eth0 (tc ingress and the
  kernel's vxlan socket take them from there).

Either way the injected program first restores the template frame (bpfprogs.py says
why). What counts is what reached the receiving pod's UDP socket (InDatagrams after
draining the socket, plus RcvbufErrors), divided by the wall time of the injecting call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import time

from flannel_xdp import netns
from flannel_xdp.backend import Backend
from flannel_xdp.lab import frames, traffic
from flannel_xdp.lab.topology import CNI_BRIDGE, POD_IFNAME, link_index, link_mac
from flannel_xdp.loader import libbpf
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.datapath import IngressHook
from flannel_xdp.loader.programs import UNDERLAY_XDP

from .bpfprogs import GeneratorCache
from .variants import Bed
from .workloads import UDP_PAYLOAD, udp_counters

BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
RX_PORT = 9000
RX_SPORT = 40000  # the injected flow's source port
# Larger batches overflow the tunnel veth's 256-frame XDP ring with the XDP hook: its
# NAPI runs deferred (ksoftirqd on the injecting CPU), so frames beyond the ring are
# dropped at redirect time (batch 64: about half were lost). 16 lets every variant
# deliver everything it is given; the same size is used for all.
DEFAULT_BATCH = 16


class XdpMd(ctypes.Structure):
    """struct xdp_md (uapi) as BPF_PROG_TEST_RUN takes it for its ctx."""

    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


def udp64(bed: Bed, ttl: int = 64) -> bytes:
    """The 64-byte UDP datagram (IPv4 packet) from the sender pod to the receiver pod."""
    payload = frames.payload_bytes(UDP_PAYLOAD)
    return frames.udp(str(bed.sender.ip), str(bed.receiver.ip), RX_SPORT, RX_PORT, payload, ttl=ttl)


def rx_frame(bed: Bed, inner_ip: bytes | None = None) -> bytes:
    """A packet from the sender pod to the receiver pod (default: udp64()), as it arrives
    on the receiver node's underlay for this backend."""
    sender_node, receiver_node = bed.sender_node, bed.receiver_node
    sender_mac, receiver_mac = bed.underlay_macs
    if inner_ip is None:
        inner_ip = udp64(bed)
    spec = bed.cluster.spec
    if spec.backend is Backend.HOST_GW:
        return frames.ethernet(receiver_mac, sender_mac, inner_ip)
    inner = frames.ethernet(receiver_node.vtep_mac, sender_node.vtep_mac, inner_ip)
    return frames.vxlan(
        outer_dst_mac=receiver_mac,
        outer_src_mac=sender_mac,
        outer_src=str(sender_node.public_ip),
        outer_dst=str(receiver_node.public_ip),
        vni=spec.vni,
        port=spec.vxlan_port,
        inner_frame=inner,
    )


def _drain(sock: socket.socket) -> int:
    n = 0
    sock.setblocking(False)
    while True:
        try:
            sock.recv(2048)
        except BlockingIOError:
            return n
        n += 1


def pod_frame(bed: Bed, inner_ip: bytes | None = None) -> bytes:
    """A packet from the sender pod to the receiver pod (default: udp64()), as the sender
    pod puts it on its veth: addressed to its gateway's (cni0's) MAC."""
    pod_mac = link_mac(bed.sender.netns, POD_IFNAME)
    cni_mac = link_mac(bed.sender_node.netns, CNI_BRIDGE)
    return frames.ethernet(cni_mac, pod_mac, udp64(bed) if inner_ip is None else inner_ip)


def measure_path(bed: Bed, generators: GeneratorCache, count: int, batch: int) -> dict:
    """Inject count frames where the sender pod's packets enter its node; what the
    receiver pod received."""
    frame = pod_frame(bed)
    gen = generators.get(frame)
    ifindex = link_index(bed.sender_node.netns, bed.sender.host_veth)
    how = "restore + XDP_PASS into the sender node's stack on the pod's veth"
    result = _inject(bed, gen.pass_fd, frame, bed.sender_node.netns, ifindex, count, batch)
    return result | {"program": how, "injected_at": bed.sender.host_veth}


def measure_rx(bed: Bed, generators: GeneratorCache, count: int, batch: int) -> dict:
    """Inject count frames at the receiving node's underlay; what the pod received."""
    frame = rx_frame(bed)
    gen = generators.get(frame)
    pinned_fd = -1
    if bed.variant.is_xdp and bed.variant.hook is IngressHook.XDP:
        pin = PinDir(bed.receiver_node.bpffs).prog(UNDERLAY_XDP.name)
        pinned_fd = libbpf.obj_get(pin)
        prog_fd, how = gen.chain_to(pinned_fd), "restore + tail call to underlay_xdp"
    else:
        prog_fd, how = gen.pass_fd, "restore + XDP_PASS into the stack on eth0"
    try:
        ifindex = bed.underlay_ifindexes[1]
        result = _inject(bed, prog_fd, frame, bed.receiver_node.netns, ifindex, count, batch)
    finally:
        if pinned_fd >= 0:
            os.close(pinned_fd)
    return result | {"program": how, "injected_at": "eth0"}


def _inject(
    bed: Bed, prog_fd: int, frame: bytes, ns: str, ifindex: int, count: int, batch: int
) -> dict:
    """Run prog_fd on count live frames arriving on ifindex in ns; count what reached
    the receiver pod's UDP socket and what the receiving node's program counted."""
    ctx = bytes(XdpMd(data=0, data_end=len(frame), ingress_ifindex=ifindex))
    receiver = bed.receiver
    counted = bed.cluster.counters(bed.receiver_node) if bed.variant.is_xdp else None
    try:
        with traffic.udp_socket(receiver.netns, str(receiver.ip), RX_PORT) as sock:
            before = udp_counters(receiver.netns)
            with netns.entered(ns):
                t0 = time.perf_counter()
                _, _, ns_per_frame = libbpf.prog_test_run(
                    prog_fd,
                    frame,
                    repeat=count,
                    ctx=ctx,
                    flags=BPF_F_TEST_XDP_LIVE_FRAMES,
                    batch_size=batch,
                )
                elapsed = time.perf_counter() - t0
            time.sleep(0.1)  # the backlog and NAPI queues empty within microseconds
            queued = _drain(sock)
            after = udp_counters(receiver.netns)
    except libbpf.BpfError as exc:
        if exc.errno == errno.EINTR:
            raise KeyboardInterrupt from exc
        raise
    delta = {k: after[k] - before[k] for k in after}
    delivered = delta["InDatagrams"] + delta["RcvbufErrors"]
    bpf_counted = None
    if counted is not None:  # what the node's ingress program counted: one per frame
        grown = bed.cluster.counters(bed.receiver_node).since(counted)
        bpf_counted = {f"{b}/{d}": v[0] for (b, d), v in grown.traffic.items() if v[0]}
        bpf_counted |= {f"{b}/{r}": v[0] for (b, r), v in grown.reasons.items() if v[0]}
    return {
        "delivered_pps": delivered / elapsed,
        "injected": count,
        "delivered": delivered,
        "delivered_fraction": delivered / count,
        "queued_in_socket": queued,
        "rcvbuf_errors": delta["RcvbufErrors"],
        "csum_errors": delta.get("InCsumErrors", 0),
        "no_ports": delta["NoPorts"],
        "elapsed_s": elapsed,
        "kernel_ns_per_frame": ns_per_frame,
        "frame_bytes": len(frame),
        "batch_size": batch,
        "bpf_counted": bpf_counted,
    }
