"""The loader against the real kernel: install, replace, remove, refuse bad input."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import TypeVar

import pytest
from pyroute2 import IPRoute

from flannel_xdp import netns
from flannel_xdp.backend import Backend
from flannel_xdp.loader import (
    attach,
    builds,
    bytecode,
    datapath,
    devices,
    handover,
    libbpf,
    map_upgrades,
    pod_ports,
)
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.compile import BuildParams
from flannel_xdp.loader.programs import POD_INGRESS
from flannel_xdp.maps import layout
from flannel_xdp.maps import libbpf as map_libbpf
from flannel_xdp.maps.views import (
    CapacityError,
    LayoutMismatch,
    LocalPodsMap,
    NodeConfigMap,
    Peer,
    SubnetsMap,
    TrafficMap,
)
from flannel_xdp.node import routes
from tests.node_support import prepare_downgrade, someone_elses_filter, underlay_programs
from tests.pod_ports_support import pod_ports_attached
from tests.requirements import require_root_and_bcc

pytestmark = pytest.mark.bpf

NODE = datapath.NodeParams(
    public_ip=IPv4Address("192.0.2.1"),
    subnet=IPv4Network("198.18.1.0/24"),
    vtep_mac="02:00:00:00:01:01",
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


@pytest.fixture
def node():
    """A netns with an underlay veth 'eth0'; yields (netns name, bpffs dir)."""
    require_root_and_bcc("bpftool")
    tag = uuid.uuid4().hex[:8]
    name, bpffs = f"fxl-{tag}", f"/sys/fs/bpf/fxl-{tag}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        _ip("-n", name, "addr", "add", "192.0.2.1/24", "dev", "eth0")
        for dev in ("eth0", "eth0p"):
            _ip("-n", name, "link", "set", dev, "up")
        yield name, bpffs
    finally:
        with netns.entered(name):
            datapath.uninstall(bpffs, "eth0", NODE.vni)
        _ip("netns", "del", name)
        assert not os.path.exists(bpffs)


def _bpftool_net(ns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "bpftool", "net"], capture_output=True, text=True, check=True
    ).stdout


def test_missing_underlay_is_a_clear_error_and_changes_nothing(node):
    ns, bpffs = node
    with netns.entered(ns), pytest.raises(devices.DeviceError, match="'nosuch0' does not exist"):
        datapath.install(datapath.DataPathConfig(underlay="nosuch0", bpffs=bpffs), NODE)
    assert not os.path.exists(bpffs)
    assert (
        "flannel.1"
        not in subprocess.run(
            ["ip", "-n", ns, "link"], capture_output=True, text=True, check=True
        ).stdout
    )


def _underlay_prog_id(ns: str, hook: datapath.IngressHook) -> int:
    """Id of the program on eth0's ingress hook: XDP, or tcx on an underlay that had no
    clsact qdisc (as every node of these tests)."""
    on = underlay_programs(ns)
    where = "xdp" if hook is datapath.IngressHook.XDP else "tcx"
    assert len(on[where]) == 1 and sum(map(len, on.values())) == 1, on
    return on[where][0]


def _tunnel_kind(ns: str) -> str:
    res = subprocess.run(
        ["ip", "-n", ns, "-d", "-j", "link", "show", "flannel.1"], capture_output=True, text=True
    )
    (link,) = json.loads(res.stdout)
    info = link["linkinfo"]
    kind = info["info_kind"]
    if kind == "vxlan":
        assert info["info_data"].get("external") is True, info  # collect_md, no FDB
    return kind


@pytest.mark.parametrize("hook", list(datapath.IngressHook))
def test_install_replace_and_uninstall(node, hook):
    ns, bpffs = node
    # without the build cache every install is a new build, which replaces the pinned one
    cfg = datapath.DataPathConfig(underlay="eth0", bpffs=bpffs, ingress_hook=hook, build_cache="")
    with netns.entered(ns):
        first = datapath.install(cfg, NODE)
        with NodeConfigMap(first.pins.maps) as m:
            settings = m.read()
        assert settings is not None
        assert settings.tunnel_ifindex == first.tunnel.ifindex
        assert settings.tunnel_peer_ifindex == first.tunnel.peer_ifindex
        assert settings.underlay_ifindex == first.underlay_ifindex
        assert devices.link_mtu("flannel.1") == devices.link_mtu("eth0") - 50
    first_id = _underlay_prog_id(ns, hook)
    assert _tunnel_kind(ns) == hook.tunnel_kind.value

    with netns.entered(ns):
        second = datapath.install(cfg, NODE)  # replace in place: same devices, new programs
    second_id = _underlay_prog_id(ns, hook)
    assert second.tunnel == first.tunnel
    assert second_id != first_id
    assert "tunnel_egress" in _bpftool_net(ns)
    wanted = sorted(p.name for p in datapath.programs(hook))
    assert sorted(os.listdir(os.path.join(bpffs, "progs"))) == wanted
    assert ("tunnel_ingress" in wanted) == (hook is datapath.IngressHook.KERNEL)

    with netns.entered(ns):
        datapath.uninstall(bpffs, "eth0", NODE.vni)
        assert attach.xdp_state("eth0") == (0, 0)
    assert "tunnel_egress" not in _bpftool_net(ns)
    assert underlay_programs(ns) == {"xdp": [], "tc": [], "tcx": []}
    links = subprocess.run(["ip", "-n", ns, "link"], capture_output=True, text=True).stdout
    assert "flannel.1" not in links and "fxdp.1" not in links
    assert not os.path.exists(bpffs)


T = TypeVar("T")


def _pinned_progs(bpffs: str, of: Callable[[int], T]) -> dict[str, T]:
    """of(fd) for each program pinned under bpffs, by pin name."""
    found = {}
    for name in os.listdir(PinDir(bpffs).progs):
        fd = libbpf.obj_get(PinDir(bpffs).prog(name))
        try:
            found[name] = of(fd)
        finally:
            os.close(fd)
    return found


def _prog_id(fd: int) -> int:
    return libbpf.prog_info(fd).id


def _prog_tag(fd: int) -> str:
    return bytes(libbpf.prog_info(fd).tag).hex()


def _maps_used(fd: int) -> dict[str, int]:
    """{name: id} of the maps the program uses."""
    return {libbpf.map_name_by_id(i): i for i in libbpf.prog_map_ids(fd)}


def test_a_reinstall_keeps_the_pinned_programs_that_are_its_builds(node, tmp_path, caplog):
    """An install that finds its builds pinned keeps them (no compile: the same programs);
    a cache entry that names another tag, or a map pinned anew under the program, makes
    it compile again; and a compile puts the right tag back."""
    ns, bpffs = node
    cache = tmp_path / "builds"
    cfg = datapath.DataPathConfig(
        underlay="eth0", bpffs=bpffs, udp_fast_path=True, tcp_fast_path=True,
        build_cache=str(cache),
    )  # fmt: skip

    def install() -> tuple[dict[str, int], float]:
        started = time.monotonic()
        with netns.entered(ns):
            datapath.install(cfg, NODE)
        return _pinned_progs(bpffs, _prog_id), time.monotonic() - started

    first, compiled = install()
    assert len(os.listdir(cache)) == len(first) == len(datapath.programs(cfg.ingress_hook, True))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again, kept = install()
    assert again == first, "a pinned program that is its build was compiled again"
    assert "kept the pinned" in caplog.text
    print(f"install: {compiled:.2f} s compiling, {kept:.2f} s keeping {len(first)} programs")

    for entry in cache.iterdir():
        raw = json.loads(entry.read_text())
        entry.write_text(json.dumps({**raw, "tag": "00" * 8}))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        lied, _ = install()
    assert not set(lied.values()) & set(first.values()), "kept on a tag that is not its own"
    assert "has another tag: compiling it" in caplog.text  # not loaded from the cache either
    kept_again, _ = install()
    assert kept_again == lied, "the compile did not record its builds' tags"

    os.unlink(os.path.join(PinDir(bpffs).maps, "subnets"))  # the next install pins a new one
    anew, _ = install()
    assert not set(anew.values()) & set(lied.values()), "kept a program of the old map"
    pinned_maps = builds.pinned_map_ids(PinDir(bpffs).maps)
    for name, used in _pinned_progs(bpffs, _maps_used).items():
        assert used["subnets"] == pinned_maps["subnets"], f"{name} kept the old subnets map"


def test_a_new_node_loads_its_builds_from_the_bytecode_a_compile_saved(
    node, tmp_path, caplog, monkeypatch
):
    """A node with nothing pinned loads what the cache saved of its builds, with no
    compile: the same programs (tags) on maps made as the compile made them (typed, so
    bpftool shows fields). Saved bytecode that the kernel refuses is compiled again, and
    the compile saves it right; an entry that another user could write is not used."""
    ns, bpffs = node
    cache = tmp_path / "builds"
    cfg = datapath.DataPathConfig(
        underlay="eth0", bpffs=bpffs, udp_fast_path=True, tcp_fast_path=True,
        build_cache=str(cache),
    )  # fmt: skip
    progs = datapath.programs(cfg.ingress_hook, True)

    def fresh_install() -> dict[str, str]:
        with netns.entered(ns):
            datapath.uninstall(bpffs, "eth0", NODE.vni)
            datapath.install(cfg, NODE)
        return _pinned_progs(bpffs, _prog_tag)

    compiled = fresh_install()
    assert len(os.listdir(cache)) == len(compiled) == len(progs)

    def no_compile(*args):
        raise AssertionError(f"compiled {args} with its bytecode saved")

    for entry in cache.iterdir():
        os.utime(entry, (0, 0))
    with monkeypatch.context() as m, caplog.at_level(logging.INFO):
        m.setattr(datapath, "compile_program", no_compile)
        started = time.monotonic()
        loaded = fresh_install()
        took = time.monotonic() - started
    assert loaded == compiled, "the saved bytecode loaded as other programs"
    assert "from the build cache, no compile" in caplog.text
    assert all(e.stat().st_mtime > 0 for e in cache.iterdir()), "a use left no mark to prune by"
    print(f"fresh install from the build cache: {took:.2f} s for {len(loaded)} programs")
    assert sorted(os.listdir(PinDir(bpffs).maps)) == sorted(layout.MAP_LAYOUTS)
    pinned = builds.pinned_map_ids(PinDir(bpffs).maps)
    for name, used in _pinned_progs(bpffs, _maps_used).items():
        assert {n: i for n, i in used.items() if n in pinned} == {
            n: pinned[n] for n in used if n in pinned
        }, f"{name} does not use the pinned maps"
        assert "reasons" in used, name
    dump = subprocess.run(
        ["bpftool", "-j", "map", "dump", "pinned", f"{PinDir(bpffs).maps}/node_config"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (config,) = json.loads(dump.stdout)
    assert config["formatted"]["value"]["public_ip"] == int.from_bytes(
        NODE.public_ip.packed, sys.byteorder
    )

    # Every saved program's exit overwritten: the kernel refuses it, the build is
    # compiled, and the compile saves what it loaded. (A saved tag that is not the one the
    # bytecode loads with: test_a_reinstall_keeps_the_pinned_programs_that_are_its_builds.)
    for entry in cache.iterdir():
        raw = json.loads(entry.read_text())
        insns = bytearray(base64.b64decode(raw["bytecode"]["insns"]))
        insns[-8:] = struct.pack("<BBhi", 0xB7, 0, 0, 7)  # r0 = 7 where it exits
        raw["bytecode"]["insns"] = base64.b64encode(bytes(insns)).decode()
        entry.write_text(json.dumps(raw))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert fresh_install() == compiled
    assert "last insn is not an exit" in caplog.text
    assert "from the build cache, no compile" not in caplog.text
    with monkeypatch.context() as m:
        m.setattr(datapath, "compile_program", no_compile)
        assert fresh_install() == compiled

    # What another user could have written is not loaded into the kernel.
    for entry in cache.iterdir():
        entry.chmod(0o646)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert fresh_install() == compiled
    assert caplog.text.count("only the agent's user may write it") == len(progs), caplog.text
    assert "from the build cache, no compile" not in caplog.text


def test_saved_bytecode_does_not_load_over_a_pinned_map_of_another_shape(node, tmp_path):
    ns, bpffs = node
    cache = tmp_path / "builds"
    cfg = datapath.DataPathConfig(underlay="eth0", bpffs=bpffs, build_cache=str(cache))
    with netns.entered(ns):
        datapath.install(cfg, NODE)
    params = BuildParams(maps_dir=PinDir(bpffs).maps, kernel_decap=True)
    build = builds.Build.of("tunnel_egress", params, libbpf.BPF_PROG_TYPE_SCHED_CLS)
    code = builds.Entry.from_json((cache / build.digest).read_text()).code
    assert code is not None
    other = [
        dataclasses.replace(m, max_entries=m.max_entries * 2) if m.name == "subnets" else m
        for m in code.maps
    ]
    before = sorted(os.listdir(PinDir(bpffs).maps))
    with pytest.raises(bytecode.BytecodeError, match="pinned subnets is not the map saved"):
        dataclasses.replace(code, maps=tuple(other)).load(
            PinDir(bpffs).maps, build.prog_type, build.name
        )
    assert sorted(os.listdir(PinDir(bpffs).maps)) == before


def _qdiscs(ns: str) -> str:
    return subprocess.run(
        ["tc", "-n", ns, "qdisc", "show", "dev", "eth0"], capture_output=True, text=True
    ).stdout


def _underlay_link_id(bpffs: str) -> int:
    (pin,) = os.listdir(PinDir(bpffs).links)
    assert pin.startswith("underlay_tc@"), pin
    fd = map_libbpf.obj_get(os.path.join(PinDir(bpffs).links, pin))
    try:
        return libbpf.link_info(fd).id
    finally:
        os.close(fd)


def test_the_underlay_gets_no_qdisc_it_did_not_have(node):
    """The underlay carries traffic when we attach: adding a clsact qdisc would drop what
    it sends for a moment. So underlay_tc goes on a tcx link, and a new build replaces
    the link's program; an underlay that has a clsact qdisc (an older release's) gets
    the program as its filter there, and keeps the qdisc when we leave."""
    ns, bpffs = node
    cfg = datapath.DataPathConfig(underlay="eth0", bpffs=bpffs, build_cache="")  # new builds
    with netns.entered(ns):
        datapath.install(cfg, NODE)
    first = underlay_programs(ns)
    link = _underlay_link_id(bpffs)
    with netns.entered(ns):
        datapath.install(cfg, NODE)
    second = underlay_programs(ns)
    assert len(first["tcx"]) == 1 and second["tcx"] != first["tcx"], (first, second)
    assert second["tc"] == [] and "clsact" not in _qdiscs(ns), _qdiscs(ns)
    assert _underlay_link_id(bpffs) == link, "the link was made again, not updated"
    with netns.entered(ns):
        datapath.uninstall(bpffs, "eth0", NODE.vni)
    assert underlay_programs(ns) == {"xdp": [], "tc": [], "tcx": []}

    _ip("netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "clsact")
    with netns.entered(ns):
        datapath.install(cfg, NODE)
    on = underlay_programs(ns)
    assert on["tcx"] == [] and len(on["tc"]) == 1, on
    assert os.listdir(PinDir(bpffs).links) == []
    with netns.entered(ns):
        datapath.hand_over(bpffs, "eth0", Backend.VXLAN, NODE.vni)
    assert underlay_programs(ns) == {"xdp": [], "tc": [], "tcx": []}
    assert "clsact" in _qdiscs(ns), "the qdisc eth0 had was deleted"


def test_prepare_downgrade_moves_the_underlay_program_to_a_clsact_filter(node):
    """0.1.0 knows underlay_tc only as a clsact filter: `flannel-xdp prepare-downgrade`
    makes the program the tcx link runs that filter, and unpins the link."""
    ns, bpffs = node
    with netns.entered(ns):
        datapath.install(datapath.DataPathConfig(underlay="eth0", bpffs=bpffs), NODE)
    on_tcx = underlay_programs(ns)["tcx"]

    def prepare(iface: str) -> subprocess.CompletedProcess[str]:
        return prepare_downgrade(ns, bpffs, iface)

    moved = prepare("eth0")
    assert moved.returncode == 0, moved.stderr
    assert underlay_programs(ns) == {"xdp": [], "tc": on_tcx, "tcx": []}
    assert [p for p in os.listdir(PinDir(bpffs).links) if p.startswith("underlay")] == []
    again = prepare("eth0")
    assert again.returncode == 0 and "nothing to move" in again.stderr, again.stderr
    missing = prepare("eth9")
    assert missing.returncode == 1 and "'eth9' does not exist" in missing.stderr, missing.stderr
    with netns.entered(ns):
        datapath.install(datapath.DataPathConfig(underlay="eth0", bpffs=bpffs), NODE)
    on = underlay_programs(ns)  # this version again: the filter stays where it is now
    assert on["tcx"] == [] and len(on["tc"]) == 1, on


def test_switching_hooks_replaces_the_tunnel_kind(node):
    """kernel -> xdp -> kernel: the vxlan device gives way to the veth pair and back,
    swapped with the routes on it (loader.handover), and only the current hook's underlay
    program stays attached and pinned."""
    ns, bpffs = node
    for i, hook in enumerate(
        (datapath.IngressHook.KERNEL, datapath.IngressHook.XDP, datapath.IngressHook.KERNEL)
    ):
        cfg = datapath.DataPathConfig(underlay="eth0", bpffs=bpffs, ingress_hook=hook)
        with netns.entered(ns):
            installed = datapath.install(cfg, NODE)
            xdp_attached = attach.xdp_state("eth0") != (0, 0)
            if i == 0:
                with IPRoute() as ipr:
                    routes.set_tunnel_address(ipr, NODE.subnet, NODE.vni)
                    routes.sync_peers(ipr, [FLANNELD_PEER], NODE.vni)
        assert _routed_via(ns, FLANNELD_PEER.subnet) == ("flannel.1", "198.18.2.0")
        assert _link(ns, handover.aside_name(1)) is None
        assert _tunnel_kind(ns) == hook.tunnel_kind.value
        assert installed.tunnel.kind is hook.tunnel_kind
        assert xdp_attached == (hook is datapath.IngressHook.XDP)
        links = subprocess.run(["ip", "-n", ns, "link"], capture_output=True, text=True).stdout
        assert ("fxdp.1" in links) == (hook.tunnel_kind is devices.TunnelKind.VETH)
        assert sorted(os.listdir(os.path.join(bpffs, "progs"))) == sorted(
            p.name for p in datapath.programs(hook)
        )


def test_refuses_to_adopt_a_foreign_flannel_device(node):
    ns, bpffs = node
    _ip("-n", ns, "link", "add", "flannel.1", "type", "bridge")
    with netns.entered(ns), pytest.raises(devices.DeviceError, match="is flanneld running here"):
        datapath.install(datapath.DataPathConfig(underlay="eth0", bpffs=bpffs), NODE)
    _ip("-n", ns, "link", "del", "flannel.1")


FLANNELD_PEER = Peer(
    subnet=IPv4Network("198.18.2.0/24"),
    public_ip=IPv4Address("192.0.2.2"),
    backend=Backend.VXLAN,
    vtep_mac="02:00:00:00:02:02",
)


def _flanneld_node(ns: str) -> None:
    """flanneld's flannel.1 as it leaves it: a VNI device with our address, and one
    peer's FDB entry, neighbour and onlink route."""
    _ip(
        "-n", ns, "link", "add", "flannel.1", "address", NODE.vtep_mac, "type", "vxlan",
        "id", "1", "local", "192.0.2.1", "dev", "eth0", "dstport", "8472", "nolearning",
    )  # fmt: skip
    _ip("-n", ns, "addr", "add", "198.18.1.0/32", "dev", "flannel.1")
    _ip("-n", ns, "link", "set", "flannel.1", "up")
    p = FLANNELD_PEER
    _ip("-n", ns, "neigh", "add", "198.18.2.0", "lladdr", p.vtep_mac, "dev", "flannel.1",
        "nud", "permanent")  # fmt: skip
    _ip("-n", ns, "link", "set", "flannel.1", "up")
    subprocess.run(
        ["bridge", "-n", ns, "fdb", "add", p.vtep_mac, "dev", "flannel.1", "dst",
         str(p.public_ip), "self", "permanent"], check=True,
    )  # fmt: skip
    _ip("-n", ns, "route", "add", str(p.subnet), "via", "198.18.2.0", "dev", "flannel.1",
        "onlink")  # fmt: skip


def _link(ns: str, name: str) -> dict | None:
    res = subprocess.run(
        ["ip", "-n", ns, "-d", "-j", "link", "show", name], capture_output=True, text=True
    )
    return json.loads(res.stdout)[0] if res.returncode == 0 else None


def _routed_via(ns: str, subnet: IPv4Network) -> tuple[str, str]:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "route", "show", str(subnet)], capture_output=True, text=True
    ).stdout
    (route,) = json.loads(out)
    return route["dev"], route.get("gateway", "")


@pytest.mark.parametrize("hook", [datapath.IngressHook.KERNEL, datapath.IngressHook.TC])
def test_takes_over_flanneld_vxlan_device_with_its_routes(node, hook):
    """A node moving over from flanneld: our tunnel takes flannel.1's name, VtepMAC,
    address, neighbours and routes (swapped under traffic, loader.handover), and the
    peers flanneld programmed are in the map before anything reads it."""
    ns, bpffs = node
    _flanneld_node(ns)
    cfg = datapath.DataPathConfig(underlay="eth0", bpffs=bpffs, ingress_hook=hook)
    with netns.entered(ns):
        datapath.install(cfg, NODE)
        with SubnetsMap(PinDir(bpffs).maps) as subnets:
            assert subnets.peers() == {FLANNELD_PEER.subnet: FLANNELD_PEER}
    assert _tunnel_kind(ns) == hook.tunnel_kind.value
    link = _link(ns, "flannel.1")
    assert link["address"] == NODE.vtep_mac and "UP" in link["flags"]
    assert _link(ns, handover.aside_name(1)) is None, "flanneld's device was left behind"
    assert _routed_via(ns, FLANNELD_PEER.subnet) == ("flannel.1", "198.18.2.0")
    neigh = subprocess.run(
        ["ip", "-n", ns, "neigh", "show", "198.18.2.0", "dev", "flannel.1"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert FLANNELD_PEER.vtep_mac in neigh and "PERMANENT" in neigh
    addr = subprocess.run(
        ["ip", "-n", ns, "-4", "addr", "show", "flannel.1"], capture_output=True, text=True
    ).stdout
    assert "198.18.1.0/32" in addr


def test_an_interrupted_takeover_is_undone_and_done_again(node):
    """Killed between stepping aside and the switch: flanneld's device waits under its
    aside name beside an unfinished flannel.1 of ours; the next install starts over."""
    ns, bpffs = node
    _flanneld_node(ns)
    _ip("-n", ns, "link", "set", "flannel.1", "name", handover.aside_name(1))
    _ip("-n", ns, "link", "add", "flannel.1", "type", "vxlan", "external", "dstport", "8472")
    cfg = datapath.DataPathConfig(underlay="eth0", bpffs=bpffs)
    with netns.entered(ns):
        datapath.install(cfg, NODE)
    assert _link(ns, handover.aside_name(1)) is None
    assert _routed_via(ns, FLANNELD_PEER.subnet) == ("flannel.1", "198.18.2.0")


def test_a_takeover_killed_between_its_two_swaps_is_finished(node):
    """The kernel hook takes flanneld's device over through the tc hook's veth tunnel:
    killed in the second swap (the veth aside, our vxlan device not switched yet), the
    next install puts the veth back and swaps it for the vxlan device, with the routes."""
    ns, bpffs = node
    _flanneld_node(ns)
    tc_hook = datapath.DataPathConfig(
        underlay="eth0", bpffs=bpffs, ingress_hook=datapath.IngressHook.TC
    )
    with netns.entered(ns):
        datapath.install(tc_hook, NODE)
    _ip("-n", ns, "link", "set", "flannel.1", "name", handover.aside_name(1))
    _ip("-n", ns, "link", "add", "flannel.1", "type", "vxlan", "external", "dstport", "8472")
    with netns.entered(ns):
        datapath.install(datapath.DataPathConfig(underlay="eth0", bpffs=bpffs), NODE)
    assert _tunnel_kind(ns) == "vxlan"
    assert _link(ns, handover.aside_name(1)) is None and _link(ns, "fxdp.1") is None
    assert _routed_via(ns, FLANNELD_PEER.subnet) == ("flannel.1", "198.18.2.0")


@pytest.mark.parametrize("hook", [datapath.IngressHook.KERNEL, datapath.IngressHook.XDP])
def test_hand_over_leaves_flanneld_its_kind_of_device(node, hook):
    """Moving back: flannel.1 becomes a VNI device as flanneld makes it (same VtepMAC,
    address, MTU), with an FDB entry, neighbour and route per vxlan peer, a host-gw peer
    routed via its public IP on the underlay, and nothing of ours left."""
    ns, bpffs = node
    cfg = datapath.DataPathConfig(underlay="eth0", bpffs=bpffs, ingress_hook=hook)
    hostgw = Peer(IPv4Network("198.18.3.0/24"), IPv4Address("192.0.2.3"), Backend.HOST_GW)
    with netns.entered(ns):
        installed = datapath.install(cfg, NODE)
        with IPRoute() as ipr:
            routes.set_tunnel_address(ipr, NODE.subnet, NODE.vni)
            routes.sync_peers(ipr, [FLANNELD_PEER, hostgw], NODE.vni)
        with SubnetsMap(installed.pins.maps) as subnets:
            subnets.apply([FLANNELD_PEER, hostgw])
        mtu = devices.link_mtu("flannel.1")
        datapath.hand_over(bpffs, "eth0", Backend.VXLAN, NODE.vni)
    link = _link(ns, "flannel.1")
    data = link["linkinfo"]["info_data"]
    assert link["linkinfo"]["info_kind"] == "vxlan" and not data.get("external")
    assert (data["id"], data["local"], data["port"]) == (1, "192.0.2.1", 8472)
    assert link["address"] == NODE.vtep_mac and link["mtu"] == mtu and "UP" in link["flags"]
    fdb = subprocess.run(
        ["bridge", "-n", ns, "fdb", "show", "dev", "flannel.1"], capture_output=True, text=True
    ).stdout
    assert f"{FLANNELD_PEER.vtep_mac} dst {FLANNELD_PEER.public_ip}" in fdb
    assert _routed_via(ns, FLANNELD_PEER.subnet) == ("flannel.1", "198.18.2.0")
    assert _routed_via(ns, hostgw.subnet) == ("eth0", "192.0.2.3")
    assert _link(ns, handover.aside_name(1)) is None
    assert not os.path.exists(bpffs)
    assert "xdp" not in json.dumps(_link(ns, "eth0")), "an XDP program stayed on eth0"
    tc = subprocess.run(
        ["ip", "netns", "exec", ns, "bpftool", "net", "show", "dev", "eth0"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "underlay" not in tc, tc
    assert underlay_programs(ns) == {"xdp": [], "tc": [], "tcx": []}
    # Neither added nor deleted: either would drop what eth0 sends for a moment.
    assert "clsact" not in _qdiscs(ns), _qdiscs(ns)


def test_hand_over_without_a_data_path_is_a_clear_error(node):
    ns, bpffs = node
    with netns.entered(ns), pytest.raises(handover.HandoverError, match="nothing to hand over"):
        datapath.hand_over(bpffs, "eth0", Backend.VXLAN, NODE.vni)


def _peer(i: int, backend: Backend = Backend.VXLAN) -> Peer:
    return Peer(
        subnet=IPv4Network(f"198.18.{i}.0/24"),
        public_ip=IPv4Address(f"192.0.2.{i}"),
        backend=backend,
        vtep_mac=f"02:00:00:00:{i:02x}:01",
    )


def test_subnets_apply_is_a_diff_and_respects_capacity(node):
    ns, bpffs = node
    cfg = datapath.DataPathConfig(underlay="eth0", bpffs=bpffs, max_subnets=4)
    with netns.entered(ns):
        installed = datapath.install(cfg, NODE)
    with SubnetsMap(installed.pins.maps) as m:
        assert m.max_entries == 4
        r = m.apply([_peer(2), _peer(3), _peer(4)])
        assert (r.added, r.changed, r.removed) == (3, 0, 0)
        r = m.apply([_peer(2), _peer(3, Backend.HOST_GW), _peer(5)])
        assert (r.added, r.changed, r.removed) == (1, 1, 1)
        assert m.peers() == {p.subnet: p for p in [_peer(2), _peer(3, Backend.HOST_GW), _peer(5)]}
        r = m.apply([_peer(2), _peer(3, Backend.HOST_GW), _peer(5)])
        assert (r.added, r.changed, r.removed) == (0, 0, 0)
        before = m.peers()
        with pytest.raises(CapacityError, match="5 remote subnets do not fit"):
            m.apply([_peer(i) for i in range(2, 7)])
        assert m.peers() == before


def test_xdp_falls_back_to_generic_with_a_warning(node, caplog):
    """A bridge has no native XDP: AUTO must fall back to generic and say so."""
    ns, _ = node
    from bcc import BPF

    prog = BPF(text=b"int pass_all(struct xdp_md *ctx) { return XDP_PASS; }")
    fd = prog.load_func(b"pass_all", BPF.XDP).fd
    _ip("-n", ns, "link", "add", "br-x", "type", "bridge")
    with netns.entered(ns):
        with caplog.at_level("WARNING"):
            mode = attach.attach_xdp("br-x", fd, attach.XdpMode.AUTO)
        assert mode == attach.XdpMode.GENERIC
        assert "falling back to generic XDP" in caplog.text
        assert attach.xdp_state("br-x")[0] == attach.XDP_ATTACHED_SKB
        with pytest.raises(attach.AttachError, match="br-x: native XDP attach failed"):
            attach.attach_xdp("br-x", fd, attach.XdpMode.NATIVE)
        assert attach.detach_xdp("br-x")
        assert attach.xdp_state("br-x") == (0, 0)


def test_kernel_hook_follows_a_changed_vxlan_port(node):
    """The vxlan device's socket listens where the network config says: a restart with
    another port replaces the adopted device (an adopted one would keep the old port)."""
    ns, bpffs = node
    cfg = datapath.DataPathConfig(
        underlay="eth0", bpffs=bpffs, ingress_hook=datapath.IngressHook.KERNEL
    )

    def port() -> int:
        res = subprocess.run(
            ["ip", "-n", ns, "-d", "-j", "link", "show", "flannel.1"],
            capture_output=True,
            text=True,
        )
        (link,) = json.loads(res.stdout)
        assert link["linkinfo"]["info_data"].get("external") is True, link
        return link["linkinfo"]["info_data"]["port"]

    with netns.entered(ns):
        first = datapath.install(cfg, NODE)
    assert port() == NODE.vxlan_port
    with netns.entered(ns):
        same = datapath.install(cfg, NODE)
    assert same.tunnel.ifindex == first.tunnel.ifindex, "an unchanged port must be adopted"
    with netns.entered(ns):
        datapath.install(cfg, dataclasses.replace(NODE, vxlan_port=4789))
    assert port() == 4789


def test_maps_pinned_by_another_layout_start_anew(node, caplog):
    """A traffic map with another number of slots (a version with other directions)
    would be reused by bcc and read under the wrong labels, a local_pods map with a
    shorter value would not load, nor would a node_config without fast_flags (the
    versions before the TCP fast path): install sets them aside and starts new ones;
    until then, readers refuse them rather than misread them."""
    from bcc import BPF

    ns, bpffs = node
    cfg = datapath.DataPathConfig(underlay="eth0", bpffs=bpffs)
    pins = PinDir(bpffs)
    pins.ensure()
    old = BPF(
        text=(
            "struct counter { u64 packets; u64 bytes; };\n"
            "struct old_pod { u32 ifindex; u8 mac[6]; u8 pad[2]; };\n"
            f'BPF_TABLE_PINNED("percpu_array", u32, struct counter, traffic, 3, '
            f'"{pins.maps}/traffic");\n'
            f'BPF_TABLE_PINNED("hash", u32, struct old_pod, local_pods, 16, '
            f'"{pins.maps}/local_pods");\n'
            "struct old_config { u8 before_fast_flags[36]; };\n"
            f'BPF_TABLE_PINNED("array", u32, struct old_config, node_config, 1, '
            f'"{pins.maps}/node_config");'
        ).encode()
    )
    old.cleanup()
    with pytest.raises(LayoutMismatch, match="3 counters, this build counts in"):
        TrafficMap(pins.maps)
    with pytest.raises(LayoutMismatch, match="key/value size 4/36"):
        NodeConfigMap(pins.maps)
    caplog.set_level(logging.INFO, logger="flannel_xdp.loader.map_upgrades")
    with netns.entered(ns):
        datapath.install(cfg, NODE)
    with TrafficMap(pins.maps) as traffic:
        assert traffic.max_entries == TrafficMap.slots
        assert all(total == (0, 0) for total in traffic.by_label().values())
    assert "traffic map pinned by another version (3 counters, this build counts in" in caplog.text
    assert "local_pods map pinned by another version (key/value size 4/12" in caplog.text
    assert "node_config map pinned by another version (key/value size 4/36" in caplog.text
    with NodeConfigMap(pins.maps) as node_config:
        settings = node_config.read()
    assert settings is not None and settings.public_ip == NODE.public_ip
    with LocalPodsMap(pins.maps) as local_pods:
        assert local_pods.pods() == {}
    assert sorted(os.listdir(bpffs)) == ["links", "maps", "progs"]


def test_the_fast_paths_sending_side_comes_and_goes_with_the_flag(node):
    """--udp-fast-path pins pod_ingress; the agent attaches it to pods' veth ends through
    tcx links; a new install moves those to the new build (as it moves a veth end that
    an older release gave a tc filter), one without the flag takes it off them (leaving
    other filters alone) and unpins it."""
    ns, bpffs = node
    _ip("-n", ns, "link", "add", "cni0", "type", "bridge")
    _ip("-n", ns, "link", "add", "vpod0", "type", "veth", "peer", "name", "vpod0p")
    _ip("-n", ns, "link", "set", "vpod0", "master", "cni0")
    keep_fd = someone_elses_filter(ns, "vpod0", prio=7)
    fast = datapath.DataPathConfig(
        underlay="eth0", bpffs=bpffs, udp_fast_path=True, build_cache=""
    )  # every install a new build
    pin = PinDir(bpffs).prog(POD_INGRESS.name)
    try:
        with netns.entered(ns):
            datapath.install(fast, NODE)
            assert os.path.exists(pin) and pod_ports_attached() == []
            assert pod_ports.ensure_pod_ports(bpffs, ["vpod0"]) == ["vpod0"]
            first = _tcx_prog_ids("vpod0")
            datapath.install(fast, NODE)
            assert pod_ports_attached() == ["vpod0"]
            assert len(_tcx_prog_ids("vpod0")) == 1 and _tcx_prog_ids("vpod0") != first
            datapath.install(dataclasses.replace(fast, udp_fast_path=False), NODE)
            assert pod_ports_attached() == [] and not os.path.exists(pin)
            assert [p for p in os.listdir(PinDir(bpffs).links) if p.startswith("pod_")] == []

            datapath.install(fast, NODE)
            fd = libbpf.obj_get(pin)
            try:  # as an older release attached it
                attach.attach_tc("vpod0", "ingress", fd, POD_INGRESS.name)
            finally:
                os.close(fd)
            datapath.install(fast, NODE)
            assert pod_ports_attached() == ["vpod0"]
            assert attach.tc_filter_name("vpod0", "ingress") is None

            datapath.uninstall(bpffs, "eth0", NODE.vni)
            assert pod_ports_attached() == []
        filters = subprocess.run(
            ["tc", "-n", ns, "filter", "show", "dev", "vpod0", "ingress"],
            capture_output=True,
            text=True,
        )
        assert "pod_ingress" not in filters.stdout
        assert "pref 7 bpf" in filters.stdout and "someone_elses" in filters.stdout
    finally:
        os.close(keep_fd)


def test_the_link_of_a_gone_veth_end_is_unpinned_at_the_next_scan(node):
    """A deleted pod takes its veth end with it; its tcx link stays pinned, attached to
    nothing, until ensure_pod_ports() (the agent's scan) unpins it."""
    ns, bpffs = node
    _ip("-n", ns, "link", "add", "vpod1", "type", "veth", "peer", "name", "vpod1p")
    fast = datapath.DataPathConfig(underlay="eth0", bpffs=bpffs, udp_fast_path=True)
    links = PinDir(bpffs).links

    def pod_links() -> list[str]:
        return [p for p in os.listdir(links) if p.startswith("pod_")]

    with netns.entered(ns):
        datapath.install(fast, NODE)
        try:
            assert pod_ports.ensure_pod_ports(bpffs, ["vpod1"]) == ["vpod1"]
            assert len(pod_links()) == 1
            _ip("-n", ns, "link", "del", "vpod1")
            assert len(pod_links()) == 1
            assert pod_ports.ensure_pod_ports(bpffs, []) == []
            assert pod_links() == []
        finally:
            datapath.uninstall(bpffs, "eth0", NODE.vni)


def _tcx_prog_ids(dev: str) -> list[int]:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=dev)[0]
    return libbpf.prog_query(index, libbpf.BPF_TCX_INGRESS)


# Every build of the underlay's ingress program, by (hook, fast path): its name in the kernel.
UNDERLAY_BUILDS = [
    (datapath.IngressHook.XDP, False, "underlay_xdp"),
    (datapath.IngressHook.TC, False, "underlay_tc"),
    (datapath.IngressHook.TC, True, "underlay_tc_fp"),
    (datapath.IngressHook.KERNEL, False, "underlay_kd"),
    (datapath.IngressHook.KERNEL, True, "underlay_kd_fp"),
]


@pytest.mark.parametrize(("hook", "fast", "build"), UNDERLAY_BUILDS)
def test_each_build_runs_under_its_own_name(node, hook, fast, build):
    """bpftool tells the builds apart: a program's kernel name says which build it is."""
    ns, bpffs = node
    cfg = datapath.DataPathConfig(
        underlay="eth0", bpffs=bpffs, ingress_hook=hook, udp_fast_path=fast
    )
    with netns.entered(ns):
        datapath.install(cfg, NODE)
    pins = PinDir(bpffs)
    names = {}
    for prog in datapath.programs(hook, fast):
        shown = subprocess.run(
            ["bpftool", "-j", "prog", "show", "pinned", pins.prog(prog.name)],
            capture_output=True,
            text=True,
            check=True,
        )
        names[prog.name] = json.loads(shown.stdout)["name"]
    underlay = datapath.UNDERLAY_PROGRAM[hook].name
    assert names.pop(underlay) == build
    assert all(name == source for source, name in names.items()), names
    listed = json.loads(
        subprocess.run(
            ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert build in {p.get("name") for p in listed}
    if hook is not datapath.IngressHook.XDP:  # and what runs on the underlay's tcx hook
        with netns.entered(ns), IPRoute() as ipr:
            index = devices.ifindex(ipr, "eth0")
        assert index is not None
        with netns.entered(ns):
            assert attach.tcx_programs(index, "ingress") == [build]


def test_a_resize_killed_part_way_is_put_back_and_done_again(node):
    """An install killed (with its agent) after setting the subnets map aside, before it
    attached: the set-aside map is the one in use, the one in its place may be empty. The
    next install puts it back and resizes it again, copying every entry."""
    ns, bpffs = node
    with netns.entered(ns):
        installed = datapath.install(
            datapath.DataPathConfig(underlay="eth0", bpffs=bpffs, max_subnets=4), NODE
        )
        with SubnetsMap(installed.pins.maps) as m:
            m.apply([_peer(2), _peer(3)])
        # what the killed install left: the map in use set aside, an empty one in its place
        assert map_upgrades.set_aside_resized_subnets(installed.pins, 8)
        fd = map_libbpf.obj_get(os.path.join(bpffs, map_upgrades.RESIZE_DIR, SubnetsMap.name))
        in_use = map_libbpf.map_info(fd).id
        os.close(fd)
        datapath.install(datapath.DataPathConfig(underlay="eth0", bpffs=bpffs, max_subnets=8), NODE)
        assert not os.path.exists(os.path.join(bpffs, map_upgrades.RESIZE_DIR))
        with SubnetsMap(installed.pins.maps) as m:
            assert m.max_entries == 8
            assert m.peers() == {p.subnet: p for p in [_peer(2), _peer(3)]}
        # the map set aside was put back, then replaced by the resize it was waiting for
        fd = map_libbpf.obj_get(os.path.join(installed.pins.maps, SubnetsMap.name))
        assert map_libbpf.map_info(fd).id != in_use
        os.close(fd)


def test_teardown_unpins_what_an_interrupted_install_set_aside(node):
    ns, bpffs = node
    with netns.entered(ns):
        installed = datapath.install(
            datapath.DataPathConfig(underlay="eth0", bpffs=bpffs, max_subnets=4), NODE
        )
        assert map_upgrades.set_aside_resized_subnets(installed.pins, 8)
        datapath.uninstall(bpffs, "eth0", NODE.vni)
    assert not os.path.exists(bpffs)
