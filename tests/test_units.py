"""Pure logic: no kernel, no root."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_xdp.backend import Backend
from flannel_xdp.bpf import c_enums
from flannel_xdp.loader.compile import BuildParams, CompileError, expand_includes
from flannel_xdp.loader.libbpf import PROG_NAME_MAX
from flannel_xdp.maps import layout
from flannel_xdp.maps.views import (
    ApplyResult,
    NodeSettings,
    Peer,
    diff_entries,
    format_mac,
    parse_mac,
    peer_from_entry,
)

pytestmark = pytest.mark.unit


def test_expand_includes_inlines_local_headers_once_with_line_markers(tmp_path):
    (tmp_path / "a.h").write_text('#include "b.h"\nint a;\n')
    (tmp_path / "b.h").write_text("int b;\n")
    (tmp_path / "main.c").write_text('#include <x.h>\n#include "a.h"\n#include "b.h"\nint main;\n')
    text = expand_includes(tmp_path / "main.c")
    assert text.count("int b;") == 1
    assert text.index("int b;") < text.index("int a;") < text.index("int main;")
    assert "#include <x.h>" in text
    assert f'#line 3 "{tmp_path / "main.c"}"' in text
    assert f'#line 1 "{(tmp_path / "b.h").resolve()}"' in text


def test_expand_includes_names_a_missing_header(tmp_path):
    (tmp_path / "main.c").write_text('#include "gone.h"\n')
    with pytest.raises(CompileError, match=r"main.c:1: header 'gone.h' not found"):
        expand_includes(tmp_path / "main.c")


def test_build_params_validate():
    assert "-DFXDP_MAX_SUBNETS=8" in BuildParams(maps_dir="/sys/fs/bpf/x", max_subnets=8).cflags()
    with pytest.raises(CompileError, match="max subnets"):
        BuildParams(maps_dir="/x", max_subnets=0).cflags()
    with pytest.raises(CompileError, match="quotes"):
        BuildParams(maps_dir='/x"y').cflags()


@pytest.mark.parametrize("mac", ["", "02:00:00:00:00", "02:00:00:00:00:0g", "0200.0000.0001"])
def test_parse_mac_rejects_garbage(mac):
    with pytest.raises(ValueError):
        parse_mac(mac)


def test_mac_round_trip():
    assert format_mac(parse_mac("c6:D2:32:6f:8f:44")) == "c6:d2:32:6f:8f:44"


def test_peer_round_trips_through_the_c_layout():
    peer = Peer(
        subnet=IPv4Network("198.18.3.0/24"),
        public_ip=IPv4Address("192.0.2.3"),
        backend=Backend.VXLAN,
        vtep_mac="c6:d2:32:6f:8f:44",
    )
    key, value = peer.key(), peer.value()
    assert key.prefixlen == 24 and bytes(key.addr) == bytes([198, 18, 3, 0])
    assert bytes(value.public_ip) == bytes([192, 0, 2, 3]) and value.backend == 1
    assert peer_from_entry(key, value) == peer
    for backend in Backend:  # each backend has its own code and comes back as itself
        assert peer_from_entry(key, replace(peer, backend=backend).value()).backend is backend
    value.backend = layout.BackendCode.NONE  # an entry no agent writes: no peer
    assert peer_from_entry(key, value) is None


def test_node_settings_round_trip_and_validation():
    s = NodeSettings(
        public_ip=IPv4Address("192.0.2.1"),
        subnet=IPv4Network("198.18.1.0/24"),
        vni=4096,
        vxlan_port=4789,
        vtep_mac="02:00:00:00:01:01",
        underlay_ifindex=2,
        tunnel_ifindex=3,
        tunnel_peer_ifindex=4,
    )
    raw = s.value()
    assert bytes(raw.vxlan_port) == (4789).to_bytes(2, "big")
    assert raw.fast_flags == 0
    assert NodeSettings.from_value(raw) == s
    tcp = NodeSettings(**{**s.__dict__, "tcp_fast_path": True})
    assert tcp.value().fast_flags == c_enums()["fast_flag"]["FAST_TCP"]
    assert NodeSettings.from_value(tcp.value()) == tcp
    for bad in ({"vni": 0}, {"vni": 1 << 24}, {"vxlan_port": 0}, {"vxlan_port": 70000}):
        with pytest.raises(ValueError):
            NodeSettings(**{**s.__dict__, **bad}).value()


def test_reason_labels():
    assert layout.reason_label(layout.Reason.DROP_SPOOFED_SOURCE) == "spoofed_source"
    assert layout.reason_verdict(layout.Reason.DROP_SPOOFED_SOURCE) == "drop"
    assert layout.reason_verdict(layout.Reason.PASS_VLAN) == "pass"


def test_diff_entries_writes_new_and_changed_and_deletes_the_rest():
    have = {"a": 1, "b": 2, "c": 3}
    want = {"a": 1, "b": 20, "d": 4}
    upserts, removals, result = diff_entries(want, have)
    assert sorted(upserts) == [4, 20]
    assert removals == ["c"]
    assert result == ApplyResult(added=1, changed=1, removed=1)
    assert diff_entries(have, have) == ([], [], ApplyResult(0, 0, 0))


def test_install_request_round_trips_through_json():
    from flannel_xdp.loader import datapath
    from flannel_xdp.loader.attach import XdpMode

    request = datapath.InstallRequest(
        datapath.DataPathConfig(
            underlay="eth0",
            bpffs="/sys/fs/bpf/x",
            max_subnets=128,
            xdp_mode=XdpMode.AUTO,
            ingress_hook=datapath.IngressHook.KERNEL,
            tunnel_mtu=1400,
            udp_fast_path=True,
            tcp_fast_path=True,
            build_cache="/run/x",
        ),
        datapath.NodeParams(
            public_ip=IPv4Address("192.0.2.1"),
            subnet=IPv4Network("10.244.1.0/24"),
            vtep_mac="02:00:00:00:01:01",
            vni=7,
            vxlan_port=4789,
        ),
    )
    assert datapath.InstallRequest.from_json(request.to_json()) == request


def test_each_underlay_tc_build_has_a_kernel_name_of_its_own():
    names = {
        BuildParams("/x", kernel_decap=k, udp_fast_path=f).program_name("underlay_tc")
        for k in (False, True)
        for f in (False, True)
    }
    assert len(names) == 4 and all(len(n) <= PROG_NAME_MAX for n in names)
    assert BuildParams("/x", udp_fast_path=True).program_name("pod_ingress") == "pod_ingress"


def test_a_build_is_named_by_what_reaches_its_bytecode():
    from flannel_xdp.loader.builds import Build

    sched_cls = 3

    def digest(source: str = "tunnel_egress", prog_type: int = sched_cls, **params) -> str:
        return Build.of(source, BuildParams(**{"maps_dir": "/a", **params}), prog_type).digest

    # where the maps are pinned only tells bcc where to find them
    assert digest() == digest(maps_dir="/sys/fs/bpf/elsewhere/maps")
    assert digest() != digest(max_subnets=64)
    assert digest() != digest(prog_type=6)
    assert digest() != digest("tunnel_ingress")
    assert digest("underlay_tc") != digest("underlay_tc", kernel_decap=True)


def _saved_bytecode():
    import struct

    from flannel_xdp.loader.bytecode import BPF_LD_IMM64, BPF_PSEUDO_MAP_FD, Bytecode, MapSpec

    exit_insn = struct.pack("<BBhi", 0x95, 0, 0, 0)
    load_map = struct.pack("<BBhi", BPF_LD_IMM64, BPF_PSEUDO_MAP_FD << 4 | 1, 0, 0)
    spec = MapSpec("subnets", 11, 8, 16, 64, 1, 0, 3, 4)
    return Bytecode(load_map + bytes(8) + exit_insn, (spec,), ((0, "subnets"),), (b"btf",))


def test_a_build_cache_entry_round_trips_and_rejects_what_is_malformed():
    import dataclasses
    import json

    from flannel_xdp.loader.builds import Entry
    from flannel_xdp.loader.bytecode import BytecodeError

    code = _saved_bytecode()
    entry = Entry("00112233aabbccdd", code)
    assert Entry.from_json(entry.to_json()) == entry
    assert Entry.from_json(Entry("00112233aabbccdd", None).to_json()).code is None
    raw = json.loads(entry.to_json())
    spec = raw["bytecode"]["maps"][0]
    broken = {
        "not JSON": "{",
        "an old entry: the tag alone": "00112233aabbccdd\n",
        "a short tag": json.dumps({**raw, "tag": "0011"}),
        "no bytecode key": json.dumps({"tag": raw["tag"]}),
        "bad base64": json.dumps({**raw, "bytecode": {**raw["bytecode"], "insns": "!!"}}),
        "half an instruction": json.dumps(
            {**raw, "bytecode": {**raw["bytecode"], "insns": "AAAA"}}
        ),
        "a reference past the end": json.dumps(
            {**raw, "bytecode": {**raw["bytecode"], "relocations": [[2, "subnets"]]}}
        ),
        "a reference to no map load": json.dumps(
            {**raw, "bytecode": {**raw["bytecode"], "relocations": [[1, "subnets"]]}}
        ),
        "a reference to an unsaved map": json.dumps(
            {**raw, "bytecode": {**raw["bytecode"], "relocations": [[0, "traffic"]]}}
        ),
        "a map typed by missing BTF": json.dumps(
            {**raw, "bytecode": {**raw["bytecode"], "maps": [{**spec, "btf": 1}]}}
        ),
        "a map size that is no number": json.dumps(
            {**raw, "bytecode": {**raw["bytecode"], "maps": [{**spec, "key_size": "8"}]}}
        ),
        "a map with an unknown field": json.dumps(
            {**raw, "bytecode": {**raw["bytecode"], "maps": [{**spec, "pinned": True}]}}
        ),
    }
    for what, text in broken.items():
        with pytest.raises(BytecodeError):
            Entry.from_json(text)
            pytest.fail(f"accepted {what}")
    assert dataclasses.replace(code.maps[0], name="fib_cache").shared is False
    assert code.maps[0].shared


def test_the_build_cache_keeps_the_entries_used_last(tmp_path):
    import os

    from flannel_xdp.loader.builds import DIGEST_LEN, prune

    names = [f"{i:0{DIGEST_LEN}x}" for i in range(6)]
    for age, name in enumerate(names):
        (tmp_path / name).write_text("{}")
        os.utime(tmp_path / name, ns=(0, (100 - age) * 10**9))  # names[0] used last
    writing = f"{names[5]}.{os.getpid()}"  # a write under way: not an entry
    (tmp_path / writing).write_text("")
    gone = _a_pid_that_is_gone()
    (tmp_path / f"{names[4]}.{gone}").write_text("")  # its writer was killed
    prune(str(tmp_path), entries=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [*names[:4], writing]


def _a_pid_that_is_gone() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_the_daemonset_mounts_the_host_dirs_the_agent_keeps_state_in():
    """The pins and the build tags must outlive the agent's container: the manifest mounts
    the host's directories that hold defaults.BPFFS_DIR and defaults.BUILD_CACHE_DIR."""
    from pathlib import Path

    import yaml

    from flannel_xdp import defaults

    manifest = Path(__file__).resolve().parent.parent / "deploy" / "kube-flannel-xdp.yml"
    (ds,) = [d for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    (agent,) = [c for c in pod["containers"] if c["name"] == "flannel-xdp"]
    mounted = {m["mountPath"]: host[m["name"]] for m in agent["volumeMounts"] if m["name"] in host}
    for wanted in (defaults.BPFFS_DIR, defaults.BUILD_CACHE_DIR):
        at = [path for path in mounted if Path(wanted).is_relative_to(path)]
        assert at, f"nothing of the host is mounted where {wanted} is"
        assert all(mounted[path] == path for path in at), (wanted, mounted)


def test_bench_targets_are_met_on_the_right_side_of_their_bound():
    from flannel_xdp.bench.report import RATIOS, TARGETS, targets

    names = {r.name for r in RATIOS}
    assert {t.ratio for t in TARGETS} <= names
    got = targets({"vxlan_tcp_vs_flannel": 1.31, "vxlan_lat_p50_vs_flannel": 0.61})
    assert got["vxlan_tcp_vs_flannel"] == {"bound": ">= 1.3", "ratio": 1.31, "met": True}
    assert got["vxlan_lat_p50_vs_flannel"] == {"bound": "<= 0.6", "ratio": 0.61, "met": False}
    assert got["vxlan_crr_vs_flannel"] == {"bound": ">= 1", "ratio": None, "met": None}


def test_bench_targets_say_whether_the_direct_pair_itself_reaches_them():
    from flannel_xdp.bench.report import direct_ratios, targets

    med = {
        "tcp1": {
            "stock-vxlan": {"gbps": 10.0, "softirq_cpu_s_per_gbit": 0.04},
            "direct-veth": {"gbps": 14.0, "softirq_cpu_s_per_gbit": 0.025},
            "xdp-vxlan-fast": {"gbps": 12.0},
        },
        "crr": {"stock-vxlan": {"tps": 100.0}},
    }
    direct = direct_ratios(med)
    assert direct["vxlan_tcp_vs_flannel"] == 1.4
    assert direct["vxlan_softirq_per_gbit_vs_flannel"] == 0.625
    assert "vxlan_tcp_vs_direct_veth" not in direct  # the pair against itself
    assert "vxlan_crr_vs_flannel" not in direct  # the pair did not run it
    got = targets({"vxlan_softirq_per_gbit_vs_flannel": 0.6}, direct)
    assert got["vxlan_softirq_per_gbit_vs_flannel"] == {
        "bound": "<= 0.5",
        "ratio": 0.6,
        "met": False,
        "direct_pair": 0.625,
        "direct_pair_meets": False,
    }
    assert got["vxlan_tcp_vs_flannel"]["direct_pair_meets"] is True
    assert got["vxlan_crr_vs_flannel"]["direct_pair"] is None
    assert got["vxlan_crr_vs_flannel"]["direct_pair_meets"] is None
