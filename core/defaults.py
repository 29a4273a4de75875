"""Every default of flannel-xdp, in one place."""

from __future__ import annotations

# bpffs directory under which maps/, progs/ and links/ are pinned.
BPFFS_DIR = "/sys/fs/bpf/flannel-xdp"

# What each compile of a program saved (loader/builds.py): a restarted agent keeps a pinned
# program that is the build it asks for, a new data path loads the bytecode, rather than
# compiling it again. In /run, as pins do not outlive a reboot either; the DaemonSet
# mounts it from the host. The builds used last are kept, up to BUILD_CACHE_ENTRIES
# (20-50 KB each; a node asks for 3-4 at a time, an upgrade for as many more).
BUILD_CACHE_DIR = "/run/flannel-xdp/builds"
BUILD_CACHE_ENTRIES = 64

# Flannel's vxlan defaults (flannel-compat.md): VNI 1, port 0 meaning 8472.
VXLAN_VNI = 1
VXLAN_PORT = 8472

# Where VXLAN from the wire is judged and decapsulated: "xdp", "tc" or "kernel" (see
# loader/datapath.IngressHook). `make bench` chose "kernel": on veth underlays it keeps
# GSO aggregates whole (TCP 2.5x the XDP hook's), at a lower small-packet receive rate.
INGRESS_HOOK = "kernel"

# The fast path (docs/fast-path.md, loader/fast_path.Mode): "auto" runs it wherever the
# network's backend and hook have a build of it and the kernel has the conntrack kfuncs and
# tcx, and the stack path elsewhere; "on" makes a missing part an error; "off" never runs it.
FAST_PATH = "auto"

# Capacity of the remote subnets map: one entry per remote node.
MAX_SUBNETS = 16384

# Outer Ethernet + IPv4 + UDP + VXLAN that a VXLAN frame adds to the inner
# frame; checked against bpf/parse.h (VXLAN_ENCAP_LEN) in the tests.
VXLAN_OVERHEAD = 50

# The bridge flannel's CNI plugin puts pods on (its "bridge" option; cbr0's default).
CNI_BRIDGE = "cni0"

# How often the agent re-reads cni0's pods for the fast path's direct delivery, at the
# latest: a link or neighbour notification that concerns them (agent/pod_watch.py) brings
# the scan forward to POD_EVENTS_SETTLE_S after it, a pause that gathers a new pod's
# burst of notifications into one scan.
LOCAL_PODS_INTERVAL_S = 1.0
POD_EVENTS_SETTLE_S = 0.05

# Name of the tunnel device (flanneld: flannel.<VNI>) and of its BPF-side peer.
TUNNEL_DEVICE_FORMAT = "flannel.{vni}"
TUNNEL_PEER_FORMAT = "fxdp.{vni}"


def tunnel_device(vni: int = VXLAN_VNI) -> str:
    """The tunnel device of a VNI, named as flanneld names it."""
    return TUNNEL_DEVICE_FORMAT.format(vni=vni)


# One log line format for the agent and its loader child, whose lines share one log.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
