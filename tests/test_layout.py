"""The Python view of every map layout equals what bcc compiles from bpf/types.h and maps.h."""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import uuid

import pytest

from flannel_xdp import defaults
from flannel_xdp.bpf import TYPES_HEADER, c_enums, source_dir
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.compile import BuildParams, compile_program
from flannel_xdp.maps import layout
from tests.requirements import require_root_and_bcc


@pytest.fixture(scope="module")
def compiled():
    require_root_and_bcc()
    pins = PinDir(f"/sys/fs/bpf/fxdp-layout-{uuid.uuid4().hex[:8]}")
    pins.ensure()
    try:
        yield compile_program("underlay_xdp", BuildParams(maps_dir=pins.maps, max_subnets=64)), pins
    finally:
        pins.remove()


def _fields(ctype) -> list[tuple[str, int, int]]:
    """(name, offset, size) of every field of a ctypes struct, recursively flattened."""
    if not hasattr(ctype, "_fields_"):
        return [("", 0, ctypes.sizeof(ctype))]
    return [
        (name, getattr(ctype, name).offset, getattr(ctype, name).size)
        for name, *_ in ctype._fields_
    ]


@pytest.mark.bpf
@pytest.mark.parametrize("map_name", sorted(layout.MAP_LAYOUTS))
def test_map_layout_matches_bcc(compiled, map_name):
    key_type, value_type = layout.MAP_LAYOUTS[map_name]
    module, _ = compiled
    table = module[map_name.encode()]
    assert ctypes.sizeof(table.Key) == ctypes.sizeof(key_type)
    bcc_leaf = table.Leaf
    if map_name in ("traffic", "reasons"):
        # bcc views per-CPU values as an array over CPUs of the C struct
        bcc_leaf = bcc_leaf._type_ if hasattr(bcc_leaf, "_type_") else table.sLeaf
    assert ctypes.sizeof(bcc_leaf) == ctypes.sizeof(value_type)
    assert _fields(bcc_leaf) == _fields(value_type)
    if hasattr(table.Key, "_fields_"):
        assert _fields(table.Key) == _fields(key_type)


@pytest.mark.unit
def test_enums_come_from_the_header():
    text = (source_dir() / TYPES_HEADER).read_text()
    for member in layout.Reason:
        assert re.search(rf"\b{member.name}\b", text)
    assert layout.Reason.REASON_NONE == 0
    assert layout.BackendCode.VXLAN == 1 and layout.BackendCode.HOST_GW == 2
    assert [r.name for r in layout.Reason][1:] == [
        m for m in c_enums()["reason"] if m not in ("REASON_NONE", "REASON_MAX")
    ]
    for reason in layout.Reason:
        if reason != layout.Reason.REASON_NONE:
            assert layout.reason_verdict(reason) in ("pass", "drop")
            assert reason.name.startswith(("PASS_", "DROP_"))


@pytest.mark.unit
def test_vxlan_overhead_default_matches_the_c_constant():
    parse_h = (source_dir() / "parse.h").read_text()
    # VXLAN_ENCAP_LEN = Ethernet + IPv4 + UDP + VXLAN headers
    assert "#define VXLAN_ENCAP_LEN\t(ETH_HLEN + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN)" in parse_h
    assert re.search(r"#define VXLAN_HLEN\s+8\b", parse_h)
    assert defaults.VXLAN_OVERHEAD == 14 + 20 + 8 + 8


@pytest.mark.bpf
def test_pinned_maps_are_btf_typed_and_private(compiled):
    _, pins = compiled
    for d in (pins.root, pins.maps, pins.progs):
        assert os.stat(d).st_mode & 0o777 == 0o700
    assert sorted(os.listdir(pins.maps)) == sorted(layout.MAP_LAYOUTS)
    dump = subprocess.run(
        ["bpftool", "-j", "map", "dump", "pinned", os.path.join(pins.maps, "node_config")],
        capture_output=True,
        text=True,
        check=True,
    )
    entry = json.loads(dump.stdout)[0]
    assert set(entry["formatted"]["value"]) == {name for name, *_ in layout.NodeConfig._fields_}
