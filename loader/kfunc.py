"""Loading bcc-compiled programs that call kernel functions (kfuncs).

bcc 0.26 refuses a call to an `extern ... __ksym` function ("cannot call non-static
helper function"), and its loader knows no kfunc relocations. So a program names
each kfunc it calls through a placeholder helper number (bpf/kfuncs.h); this module
takes the bytecode bcc compiled (maps already resolved to fds), turns every call to a
placeholder into a kfunc call (src_reg BPF_PSEUDO_KFUNC_CALL, imm = the function's
BTF id in vmlinux) and loads it with libbpf's bpf_prog_load(). The verifier then
checks the call against the kfunc's BTF prototype, as for a libbpf-built object.
The cflags that kfunc users need (placeholder numbers, struct offsets read from the
running kernel's BTF) come from kfunc_cflags(), so a layout is never written twice.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from flannel_xdp.loader import libbpf

from . import btf, kconfig

BPF_JMP_CALL = 0x85  # BPF_JMP | BPF_CALL
BPF_PSEUDO_KFUNC_CALL = 2


@dataclass(frozen=True)
class Kfunc:
    name: str  # the kernel function
    placeholder: int  # the helper number bpf/kfuncs.h calls it by


# The kfuncs flannel-xdp programs may call; bpf/kfuncs.h names the same placeholders.
KFUNCS = (
    Kfunc("bpf_skb_ct_lookup", 0x7FFF0001),
    Kfunc("bpf_ct_release", 0x7FFF0002),
    Kfunc("bpf_ct_change_timeout", 0x7FFF0003),
)

# -D name -> (struct, member path): the kernel fields bpf/conntrack.h reads, at the
# running kernel's offsets.
KERNEL_OFFSETS = {
    "FXDP_NF_CONN_STATUS_OFF": ("nf_conn", "status"),
    "FXDP_NF_CONN_TIMEOUT_OFF": ("nf_conn", "timeout"),
    "FXDP_NF_CONN_NET_OFF": ("nf_conn", "ct_net.net"),
    "FXDP_NF_CONN_TCP_STATE_OFF": ("nf_conn", "proto.tcp.state"),
    "FXDP_NF_CONN_TCP_FLAGS_ORIGINAL_OFF": ("nf_conn", "proto.tcp.seen[0].flags"),
    "FXDP_NF_CONN_TCP_FLAGS_REPLY_OFF": ("nf_conn", "proto.tcp.seen[1].flags"),
    "FXDP_NET_TCP_TIMEOUTS_OFF": ("net", "ct.nf_ct_proto.tcp.timeouts"),
    "FXDP_NET_UDP_TIMEOUTS_OFF": ("net", "ct.nf_ct_proto.udp.timeouts"),
}


class KfuncError(RuntimeError):
    """The kernel cannot run a kfunc-calling program: no BTF, no kfunc, or refused."""


def kfunc_cflags() -> list[str]:
    """-D flags for bpf/kfuncs.h and bpf/conntrack.h: placeholders, the running
    kernel's struct offsets and its jiffies per second."""
    try:
        kernel = btf.vmlinux()
        for k in KFUNCS:
            kernel.func_id(k.name)
        offsets = {d: kernel.member_offset(*where) for d, where in KERNEL_OFFSETS.items()}
        hz = kconfig.hz()
    except (btf.BtfError, kconfig.KconfigError) as exc:
        raise KfuncError(f"conntrack kfuncs unavailable: {exc}") from exc
    flags = [f"-DFXDP_KFUNC_{k.name.upper()}={k.placeholder:#x}" for k in KFUNCS]
    flags += [f"-D{d}={off}" for d, off in offsets.items()]
    return [*flags, f"-DFXDP_HZ={hz}"]


def patch_calls(insns: bytes) -> tuple[bytes, dict[str, int]]:
    """insns with every placeholder call turned into its kfunc call; also how many
    calls of each kfunc were patched."""
    if len(insns) % libbpf.BPF_INSN_SIZE:
        raise KfuncError(f"bytecode of {len(insns)} bytes is not whole instructions")
    ids = {k.placeholder: (k.name, btf.vmlinux().func_id(k.name)) for k in KFUNCS}
    out = bytearray(insns)
    patched: dict[str, int] = {}
    for pos in range(0, len(out), libbpf.BPF_INSN_SIZE):
        code, regs, _off, imm = struct.unpack_from("<BBhi", out, pos)
        src = regs >> 4
        if code != BPF_JMP_CALL or src != 0 or imm not in ids:
            continue
        name, btf_id = ids[imm]
        struct.pack_into(
            "<BBhi", out, pos, code, (BPF_PSEUDO_KFUNC_CALL << 4) | (regs & 0xF), 0, btf_id
        )
        patched[name] = patched.get(name, 0) + 1
    return bytes(out), patched


def load(module, name: str, prog_type: int) -> tuple[int, bytes]:
    """Load function name of the compiled bcc module with its kfunc calls resolved;
    returns the program fd (the caller owns it) and the bytecode loaded."""
    insns, patched = patch_calls(module.dump_func(name.encode()))
    if not patched:
        raise KfuncError(f"{name} calls no kfunc: load it with bcc's load_func()")
    try:
        return libbpf.prog_load(prog_type, name, insns), insns
    except libbpf.BpfError as exc:
        raise KfuncError(
            f"the kernel refused {name} with kfunc calls {sorted(patched)}: {exc}"
        ) from exc
