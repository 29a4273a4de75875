"""A compiled build's bytecode, saved so that a node that has not got it loads it again
without compiling.

bcc compiles a program and makes its maps in one step (clang alone takes 0.5-1 s of CPU
a program) and hands the kernel bytecode whose map references are the fds of that run.
Saved with each reference named and each map described (its attributes and the BTF that
typed it), the same bytecode loads in milliseconds elsewhere: a shared map is opened
where it is pinned, or made and pinned as bcc would have made it; a program's own maps
(its caches) are made for it; the references get the new fds; and the verifier checks
the program as it checks a compile's. What is saved is the bytecode the kernel was given,
so a program loaded from it has the same tag (loader/builds.py checks that it does).
"""

from __future__ import annotations

import base64
import ctypes
import logging
import os
import struct
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

from flannel_xdp.loader import libbpf
from flannel_xdp.maps.layout import MAP_LAYOUTS

log = logging.getLogger(__name__)

BPF_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instructions, the map's fd in the first
BPF_PSEUDO_MAP_FD = 1
_INSN = struct.Struct("<BBhi")  # code, dst/src registers, offset, immediate


class BytecodeError(ValueError):
    """Saved bytecode that is malformed, or does not fit the maps pinned now."""


@dataclass(frozen=True)
class MapSpec:
    """One map a program refers to, as bcc made it."""

    name: str  # bcc's table name; a shared map's pin name (maps/layout.MAP_LAYOUTS)
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    btf: int  # index into Bytecode.btfs; -1: untyped
    btf_key_type_id: int
    btf_value_type_id: int

    @property
    def shared(self) -> bool:
        return self.name in MAP_LAYOUTS

    def matches(self, info: libbpf.MapInfo) -> bool:
        return (info.type, info.key_size, info.value_size, info.max_entries, info.map_flags) == (
            self.map_type,
            self.key_size,
            self.value_size,
            self.max_entries,
            self.flags,
        )


@dataclass(frozen=True)
class Bytecode:
    insns: bytes  # what the kernel was given, with every map reference zeroed
    maps: tuple[MapSpec, ...]  # every map the compile made or opened
    relocations: tuple[tuple[int, str], ...]  # (instruction index, map name)
    btfs: tuple[bytes, ...]  # the BTF blobs that typed the maps

    def to_json(self) -> dict[str, Any]:
        return {
            "insns": base64.b64encode(self.insns).decode(),
            "maps": [asdict(m) for m in self.maps],
            "relocations": [list(r) for r in self.relocations],
            "btfs": [base64.b64encode(b).decode() for b in self.btfs],
        }

    @classmethod
    def from_json(cls, raw: Any) -> Bytecode:
        try:
            code = cls(
                insns=base64.b64decode(raw["insns"], validate=True),
                maps=tuple(MapSpec(**m) for m in raw["maps"]),
                relocations=tuple((int(i), str(name)) for i, name in raw["relocations"]),
                btfs=tuple(base64.b64decode(b, validate=True) for b in raw["btfs"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BytecodeError(f"malformed saved bytecode: {exc!r}") from exc
        code._check()
        return code

    def _check(self) -> None:
        count = len(self.insns) // libbpf.BPF_INSN_SIZE
        names = {m.name for m in self.maps}
        if not count or len(self.insns) % libbpf.BPF_INSN_SIZE:
            raise BytecodeError(f"saved bytecode of {len(self.insns)} bytes")
        for index, name in self.relocations:
            if name not in names or not 0 <= index < count - 1:
                raise BytecodeError(f"saved reference to map {name!r} at {index} of {count}")
            code, regs, _, _ = _INSN.unpack_from(self.insns, index * libbpf.BPF_INSN_SIZE)
            if code != BPF_LD_IMM64 or regs >> 4 != BPF_PSEUDO_MAP_FD:
                raise BytecodeError(f"saved reference to map {name!r} at {index}: no map load")
        for m in self.maps:
            numbers = [v for k, v in asdict(m).items() if k != "name"]
            if not isinstance(m.name, str) or not all(type(v) is int for v in numbers):
                raise BytecodeError(f"malformed saved map {m!r}")
            if not -1 <= m.btf < len(self.btfs):
                raise BytecodeError(f"saved map {m.name!r} names BTF {m.btf}")

    def load(self, maps_dir: str, prog_type: int, name: str) -> int:
        """Load as program name, with the maps pinned in maps_dir (the shared ones missing
        there made and pinned first); its fd (the caller owns it). BytecodeError where a
        pinned map is not the one saved, BpfError where the kernel refuses."""
        used = {map_name for _, map_name in self.relocations}
        fds: dict[str, int] = {}
        btf_fds: dict[int, int] = {}
        try:
            # Every pinned map is checked before anything is made: a mismatch changes nothing.
            make = [m for m in self.maps if not m.shared and m.name in used]
            for spec in (m for m in self.maps if m.shared):
                path = os.path.join(maps_dir, spec.name)
                if not os.path.exists(path):
                    make.append(spec)
                    continue
                fds[spec.name] = libbpf.obj_get(path)
                if not spec.matches(libbpf.map_info(fds[spec.name])):
                    raise BytecodeError(f"the pinned {spec.name} is not the map saved")
            for spec in make:
                fds[spec.name] = self._create(spec, btf_fds)
                if spec.shared:
                    libbpf.obj_pin(fds[spec.name], os.path.join(maps_dir, spec.name))
            insns = bytearray(self.insns)
            for index, map_name in self.relocations:
                pos = index * libbpf.BPF_INSN_SIZE
                code, regs, off, _ = _INSN.unpack_from(insns, pos)
                _INSN.pack_into(insns, pos, code, regs, off, fds[map_name])
            return libbpf.prog_load(prog_type, name, bytes(insns))
        finally:
            for fd in (*fds.values(), *btf_fds.values()):
                os.close(fd)

    def _create(self, spec: MapSpec, btf_fds: dict[int, int]) -> int:
        if spec.btf >= 0 and spec.btf not in btf_fds:
            btf_fds[spec.btf] = libbpf.btf_load(self.btfs[spec.btf])
        return libbpf.map_create(
            spec.map_type,
            spec.name,
            spec.key_size,
            spec.value_size,
            spec.max_entries,
            spec.flags,
            btf_fd=btf_fds.get(spec.btf, 0),
            btf_key_type_id=spec.btf_key_type_id,
            btf_value_type_id=spec.btf_value_type_id,
        )


def of_module(module, insns: bytes) -> Bytecode | None:
    """The bytecode of a bcc module's program that was loaded as insns; None where a
    reference is not to one of the module's maps (nothing to name it by) or the kernel
    does not describe a map: then the build is only kept where it is pinned."""
    try:
        return _of_module(module, insns)
    except OSError as exc:
        log.info("cannot save the bytecode of a compile (%s): it is compiled again", exc)
        return None


def _of_module(module, insns: bytes) -> Bytecode | None:
    tables = _module_tables(module)
    by_fd = {fd: name for name, fd in tables.items()}
    out = bytearray(insns)
    relocations = []
    for pos in range(0, len(out) - libbpf.BPF_INSN_SIZE + 1, libbpf.BPF_INSN_SIZE):
        code, regs, off, imm = _INSN.unpack_from(out, pos)
        if code != BPF_LD_IMM64 or regs >> 4 == 0:
            continue
        if regs >> 4 != BPF_PSEUDO_MAP_FD or imm not in by_fd:
            return None
        relocations.append((pos // libbpf.BPF_INSN_SIZE, by_fd[imm]))
        _INSN.pack_into(out, pos, code, regs, off, 0)
    btfs: list[bytes] = []
    btf_index: dict[int, int] = {}
    maps = []
    for name, fd in sorted(tables.items()):
        info = libbpf.map_info(fd)
        if info.btf_id and info.btf_id not in btf_index:
            btf_index[info.btf_id] = len(btfs)
            btfs.append(libbpf.btf_blob_by_id(info.btf_id))
        maps.append(
            MapSpec(
                name=name,
                map_type=info.type,
                key_size=info.key_size,
                value_size=info.value_size,
                max_entries=info.max_entries,
                flags=info.map_flags,
                btf=btf_index.get(info.btf_id, -1),
                btf_key_type_id=info.btf_key_type_id,
                btf_value_type_id=info.btf_value_type_id,
            )
        )
    return Bytecode(bytes(out), tuple(maps), tuple(relocations), tuple(btfs))


@cache
def _libbcc():
    """bcc's library, with the two calls its Python module does not declare."""
    from bcc.libbcc import lib as bcc

    bcc.bpf_num_tables.restype = ctypes.c_size_t
    bcc.bpf_num_tables.argtypes = [ctypes.c_void_p]
    bcc.bpf_table_name.restype = ctypes.c_char_p
    bcc.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return bcc


def _module_tables(module) -> dict[str, int]:
    """{table name: fd} of every map a bcc module made or opened."""
    bcc = _libbcc()
    tables = {}
    for i in range(bcc.bpf_num_tables(module.module)):
        name = bcc.bpf_table_name(module.module, i)
        fd = bcc.bpf_table_fd(module.module, name)
        if fd >= 0:
            tables[name.decode()] = fd
    return tables
