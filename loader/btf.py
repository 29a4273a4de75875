"""Just enough of the kernel's BTF (/sys/kernel/btf/vmlinux) to call kfuncs.

A program compiled by bcc cannot name a kernel function (kfunc) the verifier knows by
BTF id, and it cannot use CO-RE to find a kernel struct's field. This reader gives the
loader both: the id of a FUNC by name, and the byte offset of a struct's member, also
of one nested in members and array elements ("proto.tcp.seen[1].flags"). The
format is the kernel's (Documentation/bpf/btf.rst): a header, a type section of
variable-length records, and a string section.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F

# Kinds (btf.h) and the bytes each record carries after its 12-byte common part;
# a callable takes vlen.
KIND_INT, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FUNC = 1, 3, 4, 5, 6, 12
KIND_ENUM64 = 19
# Kinds that only qualify or rename the type they point to.
_ALIASES = {8, 9, 10, 11, 18}  # TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG
_PATH_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?")
_TRAILER = {
    1: lambda v: 4,  # INT
    2: lambda v: 0,  # PTR
    3: lambda v: 12,  # ARRAY
    4: lambda v: 12 * v,  # STRUCT
    5: lambda v: 12 * v,  # UNION
    6: lambda v: 8 * v,  # ENUM
    7: lambda v: 0,  # FWD
    8: lambda v: 0,  # TYPEDEF
    9: lambda v: 0,  # VOLATILE
    10: lambda v: 0,  # CONST
    11: lambda v: 0,  # RESTRICT
    12: lambda v: 0,  # FUNC
    13: lambda v: 8 * v,  # FUNC_PROTO
    14: lambda v: 4,  # VAR
    15: lambda v: 12 * v,  # DATASEC
    16: lambda v: 0,  # FLOAT
    17: lambda v: 4,  # DECL_TAG
    18: lambda v: 0,  # TYPE_TAG
    19: lambda v: 12 * v,  # ENUM64
}


class BtfError(LookupError):
    """The kernel's BTF is missing, unreadable, or lacks what was asked for."""


@dataclass(frozen=True)
class _Type:
    name: str
    kind: int
    vlen: int
    kind_flag: bool
    size_or_type: int  # the size of an INT, STRUCT, UNION, ENUM; the type others refer to
    trailer: bytes


class KernelBtf:
    """The types of one BTF blob, looked up by name."""

    def __init__(self, blob: bytes, source: str = "BTF"):
        self.source = source
        if len(blob) < 24:
            raise BtfError(f"{source}: too short for a BTF header")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob)
        if magic != BTF_MAGIC:
            raise BtfError(f"{source}: not BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        types = blob[hdr_len + type_off : hdr_len + type_off + type_len]
        self._strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
        self._types: list[_Type | None] = [None]  # id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        pos = 0
        while pos < len(types):
            name_off, info, size_or_type = struct.unpack_from("<III", types, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind not in _TRAILER:
                raise BtfError(f"{source}: unknown BTF kind {kind} at type {len(self._types)}")
            end = pos + 12 + _TRAILER[kind](vlen)
            name = self._string(name_off)
            self._types.append(
                _Type(name, kind, vlen, bool(info >> 31), size_or_type, types[pos + 12 : end])
            )
            if name:
                self._by_name.setdefault((kind, name), len(self._types) - 1)
            pos = end

    def _string(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def func_id(self, name: str) -> int:
        """The BTF id of the kernel function name (what a kfunc call's imm holds)."""
        try:
            return self._by_name[(KIND_FUNC, name)]
        except KeyError:
            raise BtfError(f"{self.source}: no function {name!r}") from None

    def member_offset(self, struct_name: str, member: str) -> int:
        """Byte offset of member in struct struct_name; member may be a path through
        nested members and array elements, as C writes it: "proto.tcp.seen[1].flags"."""
        try:
            type_id = self._by_name[(KIND_STRUCT, struct_name)]
        except KeyError:
            raise BtfError(f"{self.source}: no struct {struct_name!r}") from None
        offset = 0
        where = struct_name
        for step in member.split("."):
            m = _PATH_STEP.fullmatch(step)
            if not m:
                raise BtfError(f"{self.source}: {member!r} is not a member path")
            name, index = m.group(1), m.group(2)
            at, type_id = self._member(where, self._resolve(type_id), name)
            offset += at
            where = f"{where}.{name}"
            if index is not None:
                elem, count = self._array(where, self._resolve(type_id))
                if int(index) >= count:
                    raise BtfError(f"{self.source}: {where} has {count} elements")
                offset += int(index) * self._size(elem)
                type_id = elem
        return offset

    def _resolve(self, type_id: int) -> int:
        """type_id without typedefs and qualifiers."""
        t = self._types[type_id]
        while t is not None and t.kind in _ALIASES:
            type_id = t.size_or_type
            t = self._types[type_id]
        return type_id

    def _member(self, where: str, type_id: int, member: str) -> tuple[int, int]:
        """(byte offset, type id) of member in the struct or union type_id."""
        t = self._types[type_id]
        if t is None or t.kind not in (KIND_STRUCT, KIND_UNION):
            raise BtfError(f"{self.source}: {where} is not a struct or union")
        for i in range(t.vlen):
            name_off, member_type, offset = struct.unpack_from("<III", t.trailer, 12 * i)
            if self._string(name_off) == member:
                bits = offset & 0xFFFFFF if t.kind_flag else offset
                if bits % 8:
                    raise BtfError(f"{self.source}: {where}.{member} is a bitfield")
                return bits // 8, member_type
        raise BtfError(f"{self.source}: {where} has no member {member!r}")

    def _array(self, where: str, type_id: int) -> tuple[int, int]:
        """(element type id, element count) of the array type_id."""
        t = self._types[type_id]
        if t is None or t.kind != KIND_ARRAY:
            raise BtfError(f"{self.source}: {where} is not an array")
        elem, _index_type, count = struct.unpack_from("<III", t.trailer)
        return elem, count

    def _size(self, type_id: int) -> int:
        t = self._types[self._resolve(type_id)]
        if t is None or t.kind not in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64):
            raise BtfError(f"{self.source}: no size for type {type_id}")
        return t.size_or_type


@cache
def vmlinux() -> KernelBtf:
    """The running kernel's BTF (CONFIG_DEBUG_INFO_BTF); BtfError when there is none."""
    try:
        blob = VMLINUX_BTF.read_bytes()
    except OSError as exc:
        raise BtfError(
            f"cannot read {VMLINUX_BTF} ({exc.strerror}): the kernel needs CONFIG_DEBUG_INFO_BTF"
        ) from exc
    return KernelBtf(blob, str(VMLINUX_BTF))
