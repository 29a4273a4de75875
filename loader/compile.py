"""Compile the C programs in bpf/ with bcc.

bcc rewrites map operations (``map.lookup(&key)``) only in the main source
file, not in included headers, so local headers are inlined into one text
before compiling; ``#line`` markers keep compiler messages pointing at the
real file and line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from flannel_xdp import defaults
from flannel_xdp.bpf import source_dir
from flannel_xdp.loader.libbpf import PROG_NAME_MAX

log = logging.getLogger(__name__)

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


class CompileError(RuntimeError):
    """A program in bpf/ failed to compile or load."""


def expand_includes(path: Path, seen: set[Path] | None = None) -> str:
    """Inline every ``#include "x.h"`` of path (recursively, each header once)."""
    seen = set() if seen is None else seen
    out: list[str] = [f'#line 1 "{path}"']
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        m = _LOCAL_INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        header = (path.parent / m.group(1)).resolve()
        if not header.is_file():
            raise CompileError(f"{path}:{lineno}: header {m.group(1)!r} not found")
        if header not in seen:
            seen.add(header)
            out.append(expand_includes(header, seen))
        out.append(f'#line {lineno + 1} "{path}"')
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class BuildParams:
    """The -D parameters a program is compiled with (see bpf/maps.h)."""

    maps_dir: str
    max_subnets: int = defaults.MAX_SUBNETS
    kernel_decap: bool = False  # underlay_tc only judges; the vxlan device decapsulates
    udp_fast_path: bool = False  # bpf/fastpath.h (where: datapath.udp_fast_path_fits)

    def cflags(self, with_maps_dir: bool = True) -> list[str]:
        """The compiler's flags; with_maps_dir=False leaves out where the maps are pinned,
        which bcc reads and the bytecode does not hold (loader/builds.py)."""
        if '"' in self.maps_dir or "\\" in self.maps_dir:
            raise CompileError(f"bpffs path may not contain quotes: {self.maps_dir!r}")
        if not 1 <= self.max_subnets <= 1 << 24:
            raise CompileError(f"max subnets must be 1..16777216, not {self.max_subnets}")
        flags = [
            *([f'-DFXDP_MAPS_DIR="{self.maps_dir}"'] if with_maps_dir else []),
            f"-DFXDP_MAX_SUBNETS={self.max_subnets}",
            "-Wno-unused-function",
        ]
        if self.kernel_decap:
            flags.append("-DFXDP_KERNEL_DECAP")
        if self.udp_fast_path:
            from .kfunc import kfunc_cflags

            flags += ["-DFXDP_FAST_PATH", *kfunc_cflags()]
        return flags

    def program_name(self, source: str) -> str:
        """The name of this build of bpf/<source>.c: its entry function, which the kernel
        and `bpftool prog show` name it by (and its tc filter's name). underlay_tc.c is
        built four ways, each under a name of its own: "kd" where the kernel's vxlan
        device decapsulates (the kernel hook), "fp" with the fast path."""
        if source != UNDERLAY_TC_SOURCE:
            return source
        name = "underlay_kd" if self.kernel_decap else "underlay_tc"
        return f"{name}_fp" if self.udp_fast_path else name


UNDERLAY_TC_SOURCE = "underlay_tc"


def program_source(source: str) -> Path:
    """bpf/<source>.c, which must exist."""
    path = source_dir() / f"{source}.c"
    if not path.is_file():
        raise CompileError(f"no BPF program {source!r} at {path}")
    return path


def compile_program(source: str, params: BuildParams):
    """Compile bpf/<source>.c; returns the bcc.BPF module (maps created or reused pinned),
    whose entry function is params.program_name(source)."""
    return compile_file(program_source(source), params, params.program_name(source))


def compile_file(path: Path, params: BuildParams, name: str):
    """Compile the C file at path as a build named name (see BuildParams.program_name)."""
    from bcc import (
        BPF,
    )  # Debian's python3-bpfcc; imported late so pure-Python tools work without it

    if len(name) > PROG_NAME_MAX:
        raise CompileError(f"program name {name!r} is longer than the kernel keeps")
    text = expand_includes(path)
    try:
        return BPF(text=text.encode(), cflags=[*params.cflags(), f"-DFXDP_PROG_NAME={name}"])
    except Exception as exc:  # bcc raises bare Exception; compiler output went to stderr
        raise CompileError(f"bcc failed to compile {path}: {exc}") from exc
