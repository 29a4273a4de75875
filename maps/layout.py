"""Python views of the layouts shared with bpf/ (its types header).

The enums are read from the header itself (flannel_xdp.bpf), so they cannot drift; the ctypes
structs are written out (bcc is not needed to read pinned maps) and a test
checks every field offset and size against the layout bcc compiles.
"""

from __future__ import annotations

import ctypes
import enum

from flannel_xdp.backend import Backend
from flannel_xdp.bpf import c_enums

ETH_ALEN = 6


def _make_enum(c_name: str, prefix: str) -> type[enum.IntEnum]:
    members = {
        k.removeprefix(prefix): v for k, v in c_enums()[c_name].items() if not k.endswith("_MAX")
    }
    return enum.IntEnum(c_name.title().replace("_", ""), members)


BackendCode = _make_enum("backend", "BACKEND_")
Direction = _make_enum("direction", "DIR_")
Reason = _make_enum("reason", "")
FastFlag = _make_enum("fast_flag", "FAST_")

BACKEND_MAX = c_enums()["backend"]["BACKEND_MAX"]
DIRECTION_MAX = c_enums()["direction"]["DIR_MAX"]
REASON_MAX = c_enums()["reason"]["REASON_MAX"]

# A backend's code in the maps; BackendCode.NONE counts traffic that is no peer's.
BACKEND_CODES = {Backend.VXLAN: BackendCode.VXLAN, Backend.HOST_GW: BackendCode.HOST_GW}


def backend_of(code: int) -> Backend:
    """The backend a map entry's code names; ValueError for NONE or an unknown code."""
    for backend, c in BACKEND_CODES.items():
        if c == code:
            return backend
    raise ValueError(f"backend code {code} names no backend")


def backend_label(code: int) -> str:
    """The metrics' backend label of a counter slot: the backend, or "none"."""
    return "none" if code == BackendCode.NONE else str(backend_of(code))


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
