"""The benchmark's own small BPF programs: empty floors and a live-frames generator.

Why the generator rewrites every frame: in BPF_PROG_TEST_RUN live-frames mode the
kernel copies the frame into each page of its page pool once, and on later
repetitions resets only the data pointers, not the bytes (kernel documentation,
bpf_prog_run.rst: a program "has to be prepared to see either the original or the
modified version"). Frames passed to the stack come back to the pool as the stack
left them: the forwarding path decrements the inner TTL, writes the next hop's
Ethernet header and, through the 16-byte aligned hard-header cache, two bytes in
front of it that are the VXLAN header's last VNI byte and reserved byte. Measured
without the rewrite, only the first ~128-270 frames were valid and every later one was
dropped as "other VNI" or by the vxlan device. So the injected program first copies
the template frame over the packet (one ~150-byte copy, the same cost for every
variant), then returns XDP_PASS (the stack, and tc ingress, take it from the
underlay) or tail-calls flannel-xdp's pinned underlay_xdp.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any

EMPTY_SOURCE = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

int empty_xdp(struct xdp_md *ctx) { return XDP_PASS; }
int empty_tc(struct __sk_buff *skb) { return TC_ACT_OK; }
"""

GENERATOR_SOURCE = r"""
#include <uapi/linux/bpf.h>

struct frame_template { __u8 bytes[FRAME_LEN]; };
BPF_ARRAY(frame_template, struct frame_template, 1);
BPF_PROG_ARRAY(next_program, 1);

static __always_inline int restore_frame(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct frame_template *t;
	__u32 zero = 0;

	t = frame_template.lookup(&zero);
	if (!t || data + FRAME_LEN > data_end)
		return -1;
	__builtin_memcpy(data, t->bytes, FRAME_LEN);
	return 0;
}

int generate_pass(struct xdp_md *ctx)
{
	if (restore_frame(ctx))
		return XDP_ABORTED;
	return XDP_PASS;
}

int generate_chain(struct xdp_md *ctx)
{
	if (restore_frame(ctx))
		return XDP_ABORTED;
	next_program.call(ctx, 0);
	return XDP_ABORTED;	/* the tail call failed */
}
"""


def _bcc() -> Any:
    from bcc import BPF  # Debian's python3-bpfcc; late import keeps --help usable without it

    return BPF


class EmptyPrograms:
    """empty_xdp (XDP_PASS) and empty_tc (TC_ACT_OK): the floor of a test run."""

    def __init__(self) -> None:
        bpf = _bcc()
        self._module = bpf(text=EMPTY_SOURCE.encode())
        self.xdp_fd: int = self._module.load_func(b"empty_xdp", bpf.XDP).fd
        self.tc_fd: int = self._module.load_func(b"empty_tc", bpf.SCHED_CLS).fd

    def close(self) -> None:
        self._module.cleanup()


class FrameGenerator:
    """Live-frames programs that restore one template frame and pass or chain it."""

    def __init__(self, frame_len: int) -> None:
        bpf = _bcc()
        self.frame_len = frame_len
        self._module = bpf(text=GENERATOR_SOURCE.encode(), cflags=[f"-DFRAME_LEN={frame_len}"])
        self.pass_fd: int = self._module.load_func(b"generate_pass", bpf.XDP).fd
        self.chain_fd: int = self._module.load_func(b"generate_chain", bpf.XDP).fd

    def set_frame(self, frame: bytes) -> None:
        """The template every generated frame is restored to."""
        if len(frame) != self.frame_len:
            raise ValueError(f"frame of {len(frame)} bytes, generator for {self.frame_len}")
        table = self._module["frame_template"]
        value = table.Leaf()
        ctypes.memmove(ctypes.addressof(value), frame, len(frame))
        table[ctypes.c_int(0)] = value

    def chain_to(self, prog_fd: int) -> int:
        """Make generate_chain tail-call prog_fd; returns generate_chain's fd."""
        self._module["next_program"][ctypes.c_int(0)] = ctypes.c_int(prog_fd)
        return self.chain_fd

    def close(self) -> None:
        with contextlib.suppress(Exception):
            del self._module["next_program"][ctypes.c_int(0)]
        self._module.cleanup()


class GeneratorCache:
    """One compiled generator per frame length, loaded with the frame asked for."""

    def __init__(self) -> None:
        self._by_len: dict[int, FrameGenerator] = {}

    def get(self, frame: bytes) -> FrameGenerator:
        gen = self._by_len.get(len(frame))
        if gen is None:
            gen = self._by_len[len(frame)] = FrameGenerator(len(frame))
        gen.set_frame(frame)
        return gen

    def close(self) -> None:
        for gen in self._by_len.values():
            gen.close()
        self._by_len.clear()
