"""Classic BPF socket filters (SO_ATTACH_FILTER): a program the kernel runs on each
message before it queues it on the socket, returning how many bytes to keep (0: drop).

Programs are written as a list of steps with named jump targets and assembled here into
the kernel's struct sock_filter array. A load beyond the message's end makes the kernel
end the program with 0 (drop), so a program checks the length before it loads.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass

# linux/filter.h, linux/bpf_common.h
LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
LD_H_ABS = 0x00 | 0x08 | 0x20  # BPF_LD | BPF_H | BPF_ABS
LD_B_ABS = 0x00 | 0x10 | 0x20  # BPF_LD | BPF_B | BPF_ABS
LD_W_LEN = 0x00 | 0x00 | 0x80  # BPF_LD | BPF_W | BPF_LEN
AND_K = 0x04 | 0x50 | 0x00  # BPF_ALU | BPF_AND | BPF_K
JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x05 | 0x30 | 0x00  # BPF_JMP | BPF_JGE | BPF_K
RET_K = 0x06 | 0x00  # BPF_RET | BPF_K

KEEP_ALL = 0xFFFFFFFF
DROP = 0

SO_ATTACH_FILTER = 26  # asm-generic/socket.h
_SOCK_FILTER = struct.Struct("=HBBI")  # code, jt, jf, k
_SOCK_FPROG = struct.Struct("@HP")  # len, then the array's address (native alignment)


@dataclass(frozen=True)
class Step:
    """One instruction; a jump names its targets (labels), resolved at assembly."""

    code: int
    k: int = 0
    jt: str | None = None  # a conditional jump's targets; None: the next step
    jf: str | None = None
    label: str | None = None  # this step's own name, for jumps to it


class FilterError(ValueError):
    """A program that cannot be assembled: an unknown label, a backward or too long jump."""


def assemble(steps: list[Step]) -> bytes:
    """The kernel's struct sock_filter array for steps."""
    at = {s.label: i for i, s in enumerate(steps) if s.label is not None}

    def offset(i: int, target: str | None) -> int:
        if target is None:
            return 0
        if target not in at:
            raise FilterError(f"step {i} jumps to {target!r}, which no step is")
        distance = at[target] - i - 1
        if not 0 <= distance <= 0xFF:
            raise FilterError(f"step {i} jumps to {target!r}, {distance} steps on")
        return distance

    return b"".join(
        _SOCK_FILTER.pack(s.code, offset(i, s.jt), offset(i, s.jf), s.k & 0xFFFFFFFF)
        for i, s in enumerate(steps)
    )


def attach(sock: socket.socket, program: bytes) -> None:
    """Make program sock's filter (OSError if the kernel refuses it)."""
    count = len(program) // _SOCK_FILTER.size
    buf = ctypes.create_string_buffer(program, len(program))
    # The kernel copies the program during the call: buf only has to outlive it.
    sock.setsockopt(
        socket.SOL_SOCKET, SO_ATTACH_FILTER, _SOCK_FPROG.pack(count, ctypes.addressof(buf))
    )
