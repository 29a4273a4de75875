"""The BPF programs of the data path: the C function each is built from and where it runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Program:
    name: str  # bpf/<name>.c and the pin name; the kernel names each build (compile.py)
    hook: str  # "xdp" or "tc"
    direction: str = ""  # tc only


TUNNEL_EGRESS = Program("tunnel_egress", "tc", "egress")
UNDERLAY_XDP = Program("underlay_xdp", "xdp")
UNDERLAY_TC = Program("underlay_tc", "tc", "ingress")
TUNNEL_INGRESS = Program("tunnel_ingress", "tc", "ingress")  # kernel hook: on flannel.<VNI>
POD_INGRESS = Program("pod_ingress", "tc", "ingress")  # the fast path: on pods' veth ends
# Programs that call conntrack's kfuncs (bpf/kfuncs.h): loaded by loader/kfunc.py.
KFUNC_USERS = (UNDERLAY_TC, POD_INGRESS)
