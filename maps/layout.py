"""Python views of the layouts in bpf/layout.h.

The enums are read from the header itself, so they cannot drift; the ctypes
structs are written out (bcc is not needed to read pinned maps) and a test
checks every field offset and size against the layout bcc compiles.
"""

from __future__ import annotations

import ctypes
import enum
import re
from functools import cache

from flannel_xdp.loader.compile import bpf_source_dir

ETH_ALEN = 6
LAYOUT_HEADER = "layout.h"

_ENUM = re.compile(r"enum\s+(\w+)\s*\{(.*?)\};", re.S)
_MEMBER = re.compile(r"^\s*(\w+)\s*(?:=\s*(\d+))?\s*,?", re.M)


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


@cache
def c_enums() -> dict[str, dict[str, int]]:
    """Every enum of bpf/layout.h as {enum name: {member: value}}."""
    text = _strip_comments((bpf_source_dir() / LAYOUT_HEADER).read_text())
    enums: dict[str, dict[str, int]] = {}
    for name, body in _ENUM.findall(text):
        members: dict[str, int] = {}
        value = -1
        for member, explicit in _MEMBER.findall(body):
            value = int(explicit) if explicit else value + 1
            members[member] = value
        enums[name] = members
    return enums


@cache
def c_define(header: str, name: str) -> int:
    """The integer value of `#define name` in bpf/<header> (e.g. a time window that a
    test must wait out), so that it is written once, in C."""
    text = _strip_comments((bpf_source_dir() / header).read_text())
    found = re.search(
        rf"^#define\s+{re.escape(name)}\s+\(?(0x[0-9a-fA-F]+|\d+)[uUlL]*\)?\s*$", text, re.M
    )
    if not found:
        raise LookupError(f"no integer #define {name} in bpf/{header}")
    return int(found.group(1), 0)


def _make_enum(c_name: str, prefix: str) -> type[enum.IntEnum]:
    members = {
        k.removeprefix(prefix): v for k, v in c_enums()[c_name].items() if not k.endswith("_MAX")
    }
    return enum.IntEnum(c_name.title().replace("_", ""), members)


Backend = _make_enum("backend", "BACKEND_")
Direction = _make_enum("direction", "DIR_")
Reason = _make_enum("reason", "")
FastFlag = _make_enum("fast_flag", "FAST_")

BACKEND_MAX = c_enums()["backend"]["BACKEND_MAX"]
DIRECTION_MAX = c_enums()["direction"]["DIR_MAX"]
REASON_MAX = c_enums()["reason"]["REASON_MAX"]

# Labels as exported (metrics, inspect): lower case, '-' for host-gw.
BACKEND_LABELS = {Backend.NONE: "none", Backend.VXLAN: "vxlan", Backend.HOST_GW: "host-gw"}


def reason_verdict(reason: int) -> str:
    """'pass' or 'drop': what the programs do with a packet for this reason."""
    name = Reason(reason).name
    return "drop" if name.startswith("DROP_") else "pass"


def reason_label(reason: int) -> str:
    name = Reason(reason).name
    return name.split("_", 1)[1].lower() if "_" in name else name.lower()


MacBytes = ctypes.c_uint8 * ETH_ALEN


class SubnetKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 4)]


class RemoteSubnet(ctypes.Structure):
    _fields_ = [
        ("public_ip", ctypes.c_uint8 * 4),
        ("vtep_mac", MacBytes),
        ("backend", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class NodeConfig(ctypes.Structure):
    _fields_ = [
        ("public_ip", ctypes.c_uint8 * 4),
        ("subnet_addr", ctypes.c_uint8 * 4),
        ("subnet_prefixlen", ctypes.c_uint32),
        ("vni", ctypes.c_uint32),
        ("vxlan_port", ctypes.c_uint8 * 2),
        ("vtep_mac", MacBytes),
        ("underlay_ifindex", ctypes.c_uint32),
        ("tunnel_ifindex", ctypes.c_uint32),
        ("tunnel_peer_ifindex", ctypes.c_uint32),
        ("fast_flags", ctypes.c_uint32),
    ]


class LocalPodEntry(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("mac", MacBytes), ("gateway_mac", MacBytes)]


class Counter(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


# Map name (as pinned under <bpffs>/maps/) -> (key type, value type).
MAP_LAYOUTS: dict[str, tuple[type, type]] = {
    "subnets": (SubnetKey, RemoteSubnet),
    "node_config": (ctypes.c_uint32, NodeConfig),
    "local_pods": (ctypes.c_uint8 * 4, LocalPodEntry),
    "traffic": (ctypes.c_uint32, Counter),
    "reasons": (ctypes.c_uint32, Counter),
}
