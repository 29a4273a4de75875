"""Install, replace and remove the whole BPF data path of one node.

Order matters for "nothing half-applied": every check and every compile and
verification happens before the first attach; a failure before that point
leaves no pin and no device behind that was not there before.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_xdp import defaults
from flannel_xdp.backend import Backend
from flannel_xdp.loader import (
    attach,
    builds,
    bytecode,
    devices,
    handover,
    kfunc,
    libbpf,
    map_upgrades,
    pod_ports,
    underlay_tc,
)
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.compile import BuildParams, compile_program
from flannel_xdp.loader.programs import (
    KFUNC_USERS,
    POD_INGRESS,
    TUNNEL_EGRESS,
    TUNNEL_INGRESS,
    UNDERLAY_TC,
    UNDERLAY_XDP,
    Program,
)
from flannel_xdp.maps.views import NodeConfigMap, NodeSettings, SubnetsMap

log = logging.getLogger(__name__)


class IngressHook(StrEnum):
    """Where VXLAN from the wire is judged and decapsulated.

    - xdp: XDP on the underlay judges and decapsulates each frame, and redirects it
      into the veth tunnel (fewest instructions per frame, but on a veth underlay XDP
      turns GSO off on the wire's side, so TCP moves frame by frame).
    - tc: tc ingress judges and decapsulates the skb (keeps aggregates whole, but the
      stale UDP-tunnel GSO state makes the cni0 bridge segment them in software).
    - kernel: tc ingress judges; the kernel's vxlan device in external mode
      decapsulates what it accepted (clean aggregates: fastest TCP on veth underlays).
    """

    XDP = "xdp"
    TC = "tc"
    KERNEL = "kernel"

    @property
    def tunnel_kind(self) -> devices.TunnelKind:
        return devices.TunnelKind.VXLAN if self is IngressHook.KERNEL else devices.TunnelKind.VETH


UNDERLAY_PROGRAM = {
    IngressHook.XDP: UNDERLAY_XDP,
    IngressHook.TC: UNDERLAY_TC,
    IngressHook.KERNEL: UNDERLAY_TC,
}


DEFAULT_INGRESS_HOOK = IngressHook(defaults.INGRESS_HOOK)


UDP_FAST_PATH_FITS = "a vxlan network with the kernel ingress hook, or host-gw with tc or kernel"


def udp_fast_path_fits(backend_type: str, hook: IngressHook) -> bool:
    """Where the fast path (bpf/fastpath.h) is built: the receiving side is part of
    underlay_tc, after the kernel hook's judgement of VXLAN (the tc hook decapsulates
    in BPF already) or for host-gw deliveries, which both tc hooks see."""
    if backend_type == "vxlan":
        return hook is IngressHook.KERNEL
    return backend_type == "host-gw" and hook in (IngressHook.TC, IngressHook.KERNEL)


def programs(hook: IngressHook, udp_fast_path: bool = False) -> tuple[Program, ...]:
    fast = (POD_INGRESS,) if udp_fast_path else ()
    if hook is IngressHook.KERNEL:
        return TUNNEL_EGRESS, UNDERLAY_TC, TUNNEL_INGRESS, *fast
    return TUNNEL_EGRESS, UNDERLAY_PROGRAM[hook], *fast


@dataclass(frozen=True)
class NodeParams:
    """This node as its lease describes it."""

    public_ip: IPv4Address
    subnet: IPv4Network
    vtep_mac: str
    vni: int = defaults.VXLAN_VNI
    vxlan_port: int = defaults.VXLAN_PORT

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if k in ("public_ip", "subnet") else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NodeParams:
        return cls(
            public_ip=IPv4Address(raw["public_ip"]),
            subnet=IPv4Network(raw["subnet"]),
            vtep_mac=raw["vtep_mac"],
            vni=int(raw["vni"]),
            vxlan_port=int(raw["vxlan_port"]),
        )


@dataclass(frozen=True)
class DataPathConfig:
    underlay: str
    bpffs: str = defaults.BPFFS_DIR
    max_subnets: int = defaults.MAX_SUBNETS
    xdp_mode: attach.XdpMode = attach.XdpMode.AUTO
    ingress_hook: IngressHook = DEFAULT_INGRESS_HOOK
    tunnel_mtu: int | None = None  # default: underlay MTU - VXLAN overhead
    udp_fast_path: bool = False  # kernel hook: bpf/fastpath.h in underlay_tc
    tcp_fast_path: bool = False  # FAST_TCP too (agent/conntrack.py says when it may)
    build_cache: str = defaults.BUILD_CACHE_DIR  # "": compile every program (builds.py)

    def __post_init__(self) -> None:
        if self.tcp_fast_path and not self.udp_fast_path:
            raise ValueError("the TCP fast path is part of the UDP fast path's build")

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["xdp_mode"], raw["ingress_hook"] = self.xdp_mode.value, self.ingress_hook.value
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataPathConfig:
        return cls(
            underlay=raw["underlay"],
            bpffs=raw["bpffs"],
            max_subnets=int(raw["max_subnets"]),
            xdp_mode=attach.XdpMode(raw["xdp_mode"]),
            ingress_hook=IngressHook(raw["ingress_hook"]),
            tunnel_mtu=raw["tunnel_mtu"],
            udp_fast_path=bool(raw.get("udp_fast_path", False)),
            tcp_fast_path=bool(raw.get("tcp_fast_path", False)),
            build_cache=str(raw.get("build_cache", defaults.BUILD_CACHE_DIR)),
        )


@dataclass(frozen=True)
class InstallRequest:
    """What `python -m flannel_xdp.loader install` reads on stdin: one install() call."""

    config: DataPathConfig
    node: NodeParams

    def to_json(self) -> str:
        return json.dumps({"config": self.config.to_dict(), "node": self.node.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> InstallRequest:
        raw = json.loads(text)
        return cls(DataPathConfig.from_dict(raw["config"]), NodeParams.from_dict(raw["node"]))


@dataclass
class InstalledDataPath:
    pins: PinDir
    tunnel: devices.TunnelDevice
    underlay_ifindex: int
    xdp_mode: attach.XdpMode | None
    program_ids: dict[str, int] = field(default_factory=dict)


def _pin_replacing(fd: int, path: str) -> None:
    tmp = f"{path}_new"  # bpffs forbids dots in names
    if os.path.exists(tmp):
        os.unlink(tmp)
    libbpf.obj_pin(fd, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _exclusive(pins: PinDir) -> Iterator[None]:
    """One install at a time per pin directory. An agent killed while its loader child
    installs leaves that child running to its end; the next agent's install waits for
    it instead of racing it (both setting maps aside and swapping pins)."""
    fd = os.open(pins.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another install under %s is running: waiting for it", pins.root)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def install(cfg: DataPathConfig, node: NodeParams) -> InstalledDataPath:
    """Create or adopt the tunnel device, load, attach and pin both programs."""
    underlay_ifindex = devices.require_ifindex(cfg.underlay)
    tunnel_mtu = cfg.tunnel_mtu or devices.link_mtu(cfg.underlay) - defaults.VXLAN_OVERHEAD
    pins = PinDir(cfg.bpffs)
    pins.ensure()
    with _exclusive(pins):
        # Under the lock: an install that ran meanwhile may have made the first pins.
        fresh = not os.listdir(pins.maps) and not os.listdir(pins.progs)
        map_upgrades.recover_interrupted(pins)
        handover.recover(node.vni)
        if cfg.ingress_hook is IngressHook.KERNEL and devices.is_flanneld_tunnel(node.vni):
            # flanneld's device and ours both want the UDP port: through the tc hook's
            # veth tunnel, which holds none, each swap has a path at every moment.
            log.info("taking over flanneld's tunnel through the tc hook's veth tunnel")
            _install(veth_shape(cfg), node, pins, underlay_ifindex, tunnel_mtu, fresh)
            fresh = False
        return _install(cfg, node, pins, underlay_ifindex, tunnel_mtu, fresh)


def veth_shape(cfg: DataPathConfig) -> DataPathConfig:
    """The tc hook's data path for cfg's node: the step between a kernel vxlan device of
    ours and flanneld's (loader/handover.py). The fast path is not built for it."""
    return replace(cfg, ingress_hook=IngressHook.TC, udp_fast_path=False, tcp_fast_path=False)


def _install(
    cfg: DataPathConfig,
    node: NodeParams,
    pins: PinDir,
    underlay_ifindex: int,
    tunnel_mtu: int,
    fresh: bool,
) -> InstalledDataPath:
    params = BuildParams(
        maps_dir=pins.maps,
        max_subnets=cfg.max_subnets,
        kernel_decap=cfg.ingress_hook is IngressHook.KERNEL,
        udp_fast_path=cfg.udp_fast_path,
    )
    resized = map_upgrades.set_aside_resized_subnets(pins, cfg.max_subnets)
    stale = map_upgrades.set_aside_stale_maps(pins)

    kinds = {"xdp": libbpf.BPF_PROG_TYPE_XDP, "tc": libbpf.BPF_PROG_TYPE_SCHED_CLS}
    progs = programs(cfg.ingress_hook, cfg.udp_fast_path)
    modules, fds, names = [], {}, {}
    own_fds: list[int] = []  # not bcc's: closed here, not by module.cleanup()
    kept: list[str] = []
    loaded: list[str] = []
    try:
        # Compiles and loads below only add maps that were missing: what is pinned stays.
        pinned = builds.pinned_map_ids(pins.maps) if cfg.build_cache else {}
        for prog in progs:
            name = names[prog.name] = params.program_name(prog.name)
            build = None
            if cfg.build_cache:
                build = builds.Build.of(prog.name, params, kinds[prog.hook])
                found = builds.without_compile(
                    build, pins.prog(prog.name), pins.maps, pinned, cfg.build_cache
                )
                if found is not None:
                    fds[prog.name], was_pinned = found
                    own_fds.append(fds[prog.name])
                    (kept if was_pinned else loaded).append(name)
                    continue
            module = compile_program(prog.name, params)
            modules.append(module)
            if params.udp_fast_path and prog in KFUNC_USERS:
                fds[prog.name], insns = kfunc.load(module, name, kinds[prog.hook])
                own_fds.append(fds[prog.name])
            else:
                fds[prog.name] = module.load_func(name.encode(), kinds[prog.hook]).fd
                insns = module.dump_func(name.encode())
            if build is not None:
                code = bytecode.of_module(module, insns)
                builds.record(build, fds[prog.name], code, cfg.build_cache)
        if kept:
            log.info("kept the pinned %s: the builds asked for, no compile", ", ".join(kept))
        if loaded:
            log.info("loaded %s from the build cache, no compile", ", ".join(loaded))
        if resized:
            map_upgrades.copy_subnets(resized, pins.maps)
    except Exception:
        for fd in own_fds:
            os.close(fd)
        if resized:
            map_upgrades.put_back_subnets(resized, pins.maps)
        if stale:
            map_upgrades.put_back_stale_maps(stale, pins)
        if fresh:
            pins.remove()
        raise

    # flanneld's flannel.<VNI>, or ours of the other kind, is swapped for this one under
    # traffic (loader.handover): flanneld's peers go into the map before anything reads
    # it, the routes onto the new device at the switch. (install() and hand_over() have
    # finished or undone any swap a crash interrupted.)
    kind = cfg.ingress_hook.tunnel_kind
    swap = (
        handover.Swap.step_aside(node.vni)
        if devices.must_swap(node.vni, kind, node.vxlan_port)
        else None
    )
    # The tc build on the underlay decapsulates into node_config's tunnel: from a veth
    # to a vxlan device, it points at the veth until the kernel build has replaced it.
    config_after_underlay = (
        swap is not None and not swap.old_is_vxlan and kind is devices.TunnelKind.VXLAN
    )
    try:
        if swap is not None:
            with SubnetsMap(pins.maps) as subnets:
                for peer in swap.state.vxlan_peers():
                    subnets.upsert(peer)
        tunnel = devices.ensure_tunnel(
            node.vni,
            node.vtep_mac,
            tunnel_mtu,
            kind=cfg.ingress_hook.tunnel_kind,
            port=node.vxlan_port,
            up=swap is None,
        )
        if swap is not None:
            swap.prepare(tunnel.ifindex)
        settings = NodeSettings(
            public_ip=node.public_ip,
            subnet=node.subnet,
            vni=node.vni,
            vxlan_port=node.vxlan_port,
            vtep_mac=node.vtep_mac,
            underlay_ifindex=underlay_ifindex,
            tunnel_ifindex=tunnel.ifindex,
            tunnel_peer_ifindex=tunnel.peer_ifindex,
            tcp_fast_path=cfg.tcp_fast_path,
        )
        if not config_after_underlay:
            _write_node_config(pins, settings)
        attach.attach_tc(
            tunnel.name, TUNNEL_EGRESS.direction, fds[TUNNEL_EGRESS.name], TUNNEL_EGRESS.name
        )
        if TUNNEL_INGRESS in progs:
            # Before the underlay program lets VXLAN through to the device: never unchecked.
            attach.attach_tc(
                tunnel.name,
                TUNNEL_INGRESS.direction,
                fds[TUNNEL_INGRESS.name],
                TUNNEL_INGRESS.name,
            )
        if swap is not None:
            swap.switch(tunnel.ifindex)
    except Exception:
        if swap is not None:
            swap.abort()
        raise
    hook = _attach_underlay(cfg, pins, underlay_ifindex, fds, names)
    if config_after_underlay:
        _write_node_config(pins, settings)
    if swap is not None:
        swap.finish()
    if POD_INGRESS in progs:
        # The pods' veth ends that run an older build get this one; the agent attaches
        # it to the others as it finds their pods (agent/local_pods.py).
        pod_ports.move_pod_ports(pins, fds[POD_INGRESS.name])
    else:
        pod_ports.detach_pod_ports(pins.root)
    for prog in progs:
        _pin_replacing(fds[prog.name], pins.prog(prog.name))
    for prog in {*UNDERLAY_PROGRAM.values(), TUNNEL_INGRESS, POD_INGRESS}:
        if prog not in progs and os.path.exists(pins.prog(prog.name)):
            os.unlink(pins.prog(prog.name))
    if resized:  # the old programs, and with them the last users of the old map, are gone
        map_upgrades.drop_set_aside(resized)
    if stale:
        map_upgrades.drop_stale_maps(stale, pins)
    log.info(
        "data path installed: underlay %s (%s), tunnel %s, pins under %s",
        cfg.underlay,
        f"XDP {hook.value}"
        if isinstance(hook, attach.XdpMode)
        else f"{hook.value} ingress, {cfg.ingress_hook.value} decap",
        tunnel.name,
        pins.root,
    )
    for module in modules:
        module.cleanup()
    for fd in own_fds:
        os.close(fd)
    return InstalledDataPath(
        pins=pins,
        tunnel=tunnel,
        underlay_ifindex=underlay_ifindex,
        xdp_mode=hook if isinstance(hook, attach.XdpMode) else None,
    )


def _write_node_config(pins: PinDir, settings: NodeSettings) -> None:
    with NodeConfigMap(pins.maps) as node_config:
        if node_config.read() != settings:  # the programs attached read it
            node_config.write(settings)


def _attach_underlay(
    cfg: DataPathConfig, pins: PinDir, index: int, fds: dict[str, int], names: dict[str, str]
) -> attach.XdpMode | underlay_tc.Hook:
    """Attach the chosen ingress program, then remove the other one: both run for a
    moment rather than neither, so a switch of hook loses no packet."""
    if cfg.ingress_hook == IngressHook.XDP:
        mode = attach.attach_xdp(cfg.underlay, fds[UNDERLAY_XDP.name], cfg.xdp_mode)
        underlay_tc.detach_program(pins, cfg.underlay)
        return mode
    hook = underlay_tc.attach_program(
        pins, cfg.underlay, index, fds[UNDERLAY_TC.name], names[UNDERLAY_TC.name]
    )
    attach.detach_xdp(cfg.underlay)
    return hook


def hand_over(bpffs: str, underlay: str, backend: Backend, vni: int = defaults.VXLAN_VNI) -> None:
    """Leave the node's routes as flanneld keeps them for this backend, then uninstall,
    so that a flanneld started next on the same lease adopts them without a gap.

    vxlan: flannel.<VNI> becomes flanneld's kind of device (same VNI, VtepMAC, address
    and MTU) with an FDB entry, a neighbour and a route per vxlan peer; host-gw and
    DirectRouting peers are routed via their public IP on the underlay, as flanneld does.
    """
    pins = PinDir(bpffs)
    if not os.path.isdir(pins.maps):
        raise handover.HandoverError(f"no data path pinned under {bpffs}: nothing to hand over")
    with _exclusive(pins):
        handover.recover(vni)
        with NodeConfigMap(pins.maps) as node_config:
            settings = node_config.read()
        if settings is None:
            raise handover.HandoverError(
                f"no node_config pinned under {bpffs}: nothing to hand over"
            )
        with SubnetsMap(pins.maps) as subnets:
            peers = subnets.peers()
        direct = [p for p in peers.values() if p.backend is not Backend.VXLAN]
        try:
            with IPRoute() as ipr:
                for peer in direct:  # independent of the tunnel: one route replace each
                    ipr.route(
                        "replace", dst=str(peer.subnet), gateway=str(peer.public_ip),
                        oif=settings.underlay_ifindex, table=handover.MAIN_TABLE,
                    )  # fmt: skip
        except NetlinkError as exc:
            raise handover.HandoverError(
                f"cannot route host-gw peers via {underlay}: {exc}"
            ) from exc
        if backend is Backend.VXLAN and devices.is_our_vxlan_tunnel(vni):
            # Our vxlan device holds the UDP port flanneld's wants: first the tc hook's
            # veth tunnel, then (the port free) flanneld's device, each swap without a gap.
            log.info("handing over through the tc hook's veth tunnel")
            _install(
                veth_shape(_installed_config(pins, underlay)),
                NodeParams(
                    public_ip=settings.public_ip,
                    subnet=settings.subnet,
                    vtep_mac=settings.vtep_mac,
                    vni=vni,
                    vxlan_port=settings.vxlan_port,
                ),
                pins,
                settings.underlay_ifindex,
                devices.link_mtu(devices.tunnel_names(vni)[0]),
                fresh=False,
            )
        if backend is Backend.VXLAN:
            swap = handover.Swap.step_aside(vni)
            try:
                moved = {p.subnet for p in direct}
                swap.state.routes = [r for r in swap.state.routes if r.dst not in moved]
                new = handover.create_flanneld_device(
                    vni,
                    settings.public_ip,
                    settings.underlay_ifindex,
                    settings.vxlan_port,
                    settings.vtep_mac,
                    swap.state.mtu,
                )
                fdb = {
                    p.vtep_mac: p.public_ip for p in peers.values() if p.backend is Backend.VXLAN
                }
                swap.prepare(new, fdb)
                swap.switch(new)
            except Exception:
                swap.abort()
                raise
        # What stays of ours goes now: the underlay program last handed VXLAN to our
        # tunnel; from here the kernel's socket of flanneld's device takes it. A clsact
        # qdisc the underlay had stays, empty: deleting it would drop what the node sends
        # for a moment, and a later install finds it there.
        pod_ports.detach_pod_ports(bpffs)
        attach.detach_xdp(underlay)
        underlay_tc.detach_program(pins, underlay, keep_qdisc=True)
        if backend is Backend.VXLAN:
            swap.finish()
        else:
            devices.remove_tunnel(vni)
        map_upgrades.drop_leftovers(pins)
    pins.remove()
    log.info("data path handed over to flanneld (%s, %d peers)", backend, len(peers))


def _installed_config(pins: PinDir, underlay: str) -> DataPathConfig:
    """The config an install for the pinned data path takes (the subnets map's size kept)."""
    with SubnetsMap(pins.maps) as subnets:
        max_subnets = subnets.max_entries
    return DataPathConfig(underlay=underlay, bpffs=pins.root, max_subnets=max_subnets)


def uninstall(bpffs: str, underlay: str | None, vni: int = defaults.VXLAN_VNI) -> None:
    """Detach everything, delete the tunnel device and unpin; safe to repeat."""
    tunnel, _ = devices.tunnel_names(vni)
    pod_ports.detach_pod_ports(bpffs)
    if underlay:
        attach.detach_xdp(underlay)
        underlay_tc.detach_program(PinDir(bpffs), underlay)
    attach.detach_tc(tunnel, TUNNEL_EGRESS.direction)
    attach.detach_tc(tunnel, TUNNEL_INGRESS.direction)
    devices.remove_tunnel(vni)
    map_upgrades.drop_leftovers(PinDir(bpffs))
    PinDir(bpffs).remove()
    log.info("data path removed (bpffs %s)", bpffs)
