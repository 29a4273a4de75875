"""Install, replace and remove the whole BPF data path of one node.

Order matters for "nothing half-applied": every check and every compile and
verification happens before the first attach; a failure before that point
leaves no pin and no device behind that was not there before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute

from flannel_xdp import defaults
from flannel_xdp.loader import attach, devices, kfunc
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.compile import BuildParams, compile_program
from flannel_xdp.maps import libbpf
from flannel_xdp.maps.views import (
    LocalPodsMap,
    NodeConfigMap,
    NodeSettings,
    PinnedMap,
    ReasonsMap,
    SubnetsMap,
    TrafficMap,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Program:
    name: str  # function in bpf/<name>.c, program name in the kernel and pin name
    hook: str  # "xdp" or "tc"
    direction: str = ""  # tc only


TUNNEL_EGRESS = Program("tunnel_egress", "tc", "egress")
UNDERLAY_XDP = Program("underlay_xdp", "xdp")
UNDERLAY_TC = Program("underlay_tc", "tc", "ingress")
TUNNEL_INGRESS = Program("tunnel_ingress", "tc", "ingress")  # kernel hook: on flannel.<VNI>
POD_INGRESS = Program("pod_ingress", "tc", "ingress")  # the fast path: on pods' veth ends
# Programs that call conntrack's kfuncs (bpf/kfuncs.h): loaded by loader/kfunc.py.
KFUNC_USERS = (UNDERLAY_TC, POD_INGRESS)


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


# Where a subnets map of another size waits while its replacement is filled, and maps of
# another layout while the new programs are loaded (in the pin root).
RESIZE_DIR = "resizing"
STALE_MAPS_DIR = "stale-maps"

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

    def __post_init__(self) -> None:
        if self.tcp_fast_path and not self.udp_fast_path:
            raise ValueError("the TCP fast path is part of the UDP fast path's build")


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


def install(cfg: DataPathConfig, node: NodeParams) -> InstalledDataPath:
    """Create or adopt the tunnel device, load, attach and pin both programs."""
    from bcc import BPF

    underlay_ifindex = devices.require_ifindex(cfg.underlay)
    tunnel_mtu = cfg.tunnel_mtu or devices.link_mtu(cfg.underlay) - defaults.VXLAN_OVERHEAD
    pins = PinDir(cfg.bpffs)
    fresh = not os.path.isdir(pins.maps)
    pins.ensure()
    params = BuildParams(
        maps_dir=pins.maps,
        max_subnets=cfg.max_subnets,
        kernel_decap=cfg.ingress_hook is IngressHook.KERNEL,
        udp_fast_path=cfg.udp_fast_path,
    )
    resized = _set_aside_resized_subnets(pins, cfg.max_subnets)
    stale = _set_aside_stale_maps(pins)

    kinds = {"xdp": BPF.XDP, "tc": BPF.SCHED_CLS}
    progs = programs(cfg.ingress_hook, cfg.udp_fast_path)
    modules, fds = [], {}
    own_fds: list[int] = []  # loaded outside bcc: closed here, not by module.cleanup()
    try:
        for prog in progs:
            module = compile_program(prog.name, params)
            modules.append(module)
            if params.udp_fast_path and prog in KFUNC_USERS:
                fds[prog.name] = kfunc.load(module, prog.name, kinds[prog.hook])
                own_fds.append(fds[prog.name])
            else:
                fds[prog.name] = module.load_func(prog.name.encode(), kinds[prog.hook]).fd
        if resized:
            _copy_subnets(resized, pins.maps)
    except Exception:
        for fd in own_fds:
            os.close(fd)
        if resized:
            _put_back_subnets(resized, pins.maps)
        if stale:
            _put_back(stale, pins)
        if fresh:
            pins.remove()
        raise

    tunnel = devices.ensure_tunnel(
        node.vni,
        node.vtep_mac,
        tunnel_mtu,
        kind=cfg.ingress_hook.tunnel_kind,
        port=node.vxlan_port,
    )
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
    with NodeConfigMap(pins.maps) as node_config:
        node_config.write(settings)

    attach.attach_tc(
        tunnel.name, TUNNEL_EGRESS.direction, fds[TUNNEL_EGRESS.name], TUNNEL_EGRESS.name
    )
    if TUNNEL_INGRESS in progs:
        # Before the underlay program lets VXLAN through to the device: never unchecked.
        attach.attach_tc(
            tunnel.name, TUNNEL_INGRESS.direction, fds[TUNNEL_INGRESS.name], TUNNEL_INGRESS.name
        )
    mode = _attach_underlay(cfg, fds)
    if POD_INGRESS in progs:
        # The pods' veth ends that run an older build get this one; the agent attaches
        # it to the others as it finds their pods (agent/local_pods.py).
        _move_pod_ports(pins, fds[POD_INGRESS.name])
    else:
        detach_pod_ports(pins.root)
    for prog in progs:
        _pin_replacing(fds[prog.name], pins.prog(prog.name))
    for prog in {*UNDERLAY_PROGRAM.values(), TUNNEL_INGRESS, POD_INGRESS}:
        if prog not in progs and os.path.exists(pins.prog(prog.name)):
            os.unlink(pins.prog(prog.name))
    if resized:  # the old programs, and with them the last users of the old map, are gone
        _drop_set_aside(resized)
    if stale:
        _drop_stale_maps(stale, pins)
    log.info(
        "data path installed: underlay %s (%s), tunnel %s, pins under %s",
        cfg.underlay,
        f"XDP {mode.value}" if mode else f"tc ingress, {cfg.ingress_hook.value} decap",
        tunnel.name,
        pins.root,
    )
    for module in modules:
        module.cleanup()
    for fd in own_fds:
        os.close(fd)
    return InstalledDataPath(
        pins=pins, tunnel=tunnel, underlay_ifindex=underlay_ifindex, xdp_mode=mode
    )


def _set_aside_resized_subnets(pins: PinDir, max_subnets: int) -> str | None:
    """Move a pinned subnets map of another size than max_subnets out of bcc's way.

    bcc reuses a pinned map whatever its max_entries, so a restart with another
    --max-subnets would silently keep the old capacity. Set aside (renamed, still pinned,
    still used by the attached programs), it is replaced by a map of the asked size;
    its entries are copied over before the new programs are attached."""
    if not os.path.exists(os.path.join(pins.maps, SubnetsMap.name)):
        return None
    with SubnetsMap(pins.maps) as old:
        if old.max_entries == max_subnets:
            return None
        held = sum(1 for _ in old.iter_keys())
        if held > max_subnets:
            raise RuntimeError(
                f"--max-subnets {max_subnets} is below the {held} remote subnets the "
                f"pinned map {old.path} holds; raise it (or `flannel-xdp teardown` first)"
            )
        log.info(
            "subnets map: max_entries %d -> %d (--max-subnets); copying its %d entries",
            old.max_entries,
            max_subnets,
            held,
        )
    aside = os.path.join(pins.root, RESIZE_DIR)
    os.makedirs(aside, mode=0o700, exist_ok=True)
    os.rename(os.path.join(pins.maps, SubnetsMap.name), os.path.join(aside, SubnetsMap.name))
    return aside


def _copy_subnets(aside: str, maps_dir: str) -> None:
    with SubnetsMap(aside) as old, SubnetsMap(maps_dir) as new:
        new.apply(old.peers().values())


def _put_back_subnets(aside: str, maps_dir: str) -> None:
    os.replace(os.path.join(aside, SubnetsMap.name), os.path.join(maps_dir, SubnetsMap.name))
    os.rmdir(aside)


def _drop_set_aside(aside: str) -> None:
    os.unlink(os.path.join(aside, SubnetsMap.name))
    os.rmdir(aside)


# Maps whose contents the agent makes anew (the node's config at install, the pods every
# scan, the counters from zero), so that a map of another layout can simply be replaced.
REBUILT_MAPS: tuple[type[PinnedMap], ...] = (NodeConfigMap, LocalPodsMap, TrafficMap, ReasonsMap)


def _set_aside_stale_maps(pins: PinDir) -> list[str]:
    """Move pinned maps that another version made with another layout (see REBUILT_MAPS)
    out of bcc's way: it would reuse them, and the programs would not load, or their
    counts be read under other labels. The new programs get new, empty maps; the agent
    fills them. Returns the names moved."""
    stale = []
    for view in REBUILT_MAPS:
        path = os.path.join(pins.maps, view.name)
        if not os.path.exists(path):
            continue
        fd = libbpf.obj_get(path)
        try:
            why = view.mismatch(libbpf.map_info(fd))
        finally:
            os.close(fd)
        if why:
            log.info("%s map pinned by another version (%s): starting it anew", view.name, why)
            stale.append(view.name)
    if stale:
        aside = os.path.join(pins.root, STALE_MAPS_DIR)
        os.makedirs(aside, mode=0o700, exist_ok=True)
        for name in stale:
            os.rename(os.path.join(pins.maps, name), os.path.join(aside, name))
    return stale


def _put_back(stale: list[str], pins: PinDir) -> None:
    aside = os.path.join(pins.root, STALE_MAPS_DIR)
    for name in stale:
        os.replace(os.path.join(aside, name), os.path.join(pins.maps, name))
    os.rmdir(aside)


def _drop_stale_maps(stale: list[str], pins: PinDir) -> None:
    aside = os.path.join(pins.root, STALE_MAPS_DIR)
    for name in stale:
        os.unlink(os.path.join(aside, name))
    os.rmdir(aside)


def _attach_underlay(cfg: DataPathConfig, fds: dict[str, int]) -> attach.XdpMode | None:
    """Attach the chosen ingress program, then remove the other one: both run for a
    moment rather than neither, so a switch of hook loses no packet."""
    if cfg.ingress_hook == IngressHook.XDP:
        mode = attach.attach_xdp(cfg.underlay, fds[UNDERLAY_XDP.name], cfg.xdp_mode)
        attach.detach_tc(cfg.underlay, UNDERLAY_TC.direction)
        return mode
    attach.attach_tc(cfg.underlay, UNDERLAY_TC.direction, fds[UNDERLAY_TC.name], UNDERLAY_TC.name)
    attach.detach_xdp(cfg.underlay)
    return None


def _runs_pod_ingress(index: int) -> bool:
    return POD_INGRESS.name in attach.tcx_programs(index, POD_INGRESS.direction)


def _interfaces() -> list[tuple[int, str]]:
    """(ifindex, name) of every interface in this netns."""
    with IPRoute() as ipr:
        return [(link["index"], link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]


def pod_ports_attached() -> list[str]:
    """The interfaces (pods' veth ends) whose tcx ingress runs our pod_ingress."""
    return [name for index, name in _interfaces() if _runs_pod_ingress(index)]


def _pod_link_pins(pins: PinDir) -> list[str]:
    if not os.path.isdir(pins.links):
        return []
    prefix = f"{POD_INGRESS.name}@"
    return [pins.link(n) for n in sorted(os.listdir(pins.links)) if n.startswith(prefix)]


def _attach_pod_link(pins: PinDir, prog_fd: int, index: int) -> bool:
    """Through a tcx link pinned as links/pod_ingress@<ifindex> (a clsact qdisc would
    drop what the port sends while it is added); False when the port is gone."""
    pin = pins.link(f"{POD_INGRESS.name}@{index}")
    try:
        attach.attach_tcx(index, POD_INGRESS.direction, prog_fd, POD_INGRESS.name, pin)
    except attach.NoSuchInterface:
        return False
    return True


def _forget_gone_pod_links(pins: PinDir) -> None:
    """Unpin the links of veth ends that are gone (their pods were deleted)."""
    for pin in _pod_link_pins(pins):
        fd = libbpf.obj_get(pin)
        try:
            gone = libbpf.link_info(fd).tcx_ifindex == 0
        finally:
            os.close(fd)
        if gone:
            os.unlink(pin)


def ensure_pod_ports(bpffs: str, ports: Iterable[str]) -> list[str]:
    """Attach the pinned pod_ingress to those of ports that lack it; the ones it attached."""
    pins = PinDir(bpffs)
    _forget_gone_pod_links(pins)
    with IPRoute() as ipr:
        indexes = {p: found[0] for p in ports if (found := ipr.link_lookup(ifname=p))}
    missing = {p: index for p, index in indexes.items() if not _runs_pod_ingress(index)}
    if not missing:
        return []
    fd = libbpf.obj_get(pins.prog(POD_INGRESS.name))
    try:
        return [p for p, index in missing.items() if _attach_pod_link(pins, fd, index)]
    finally:
        os.close(fd)


def _move_pod_ports(pins: PinDir, prog_fd: int) -> None:
    """Give the pods' veth ends that run an older build this one: each tcx link swaps
    its program; a veth end that an older release attached through a tc filter moves
    to a tcx link."""
    _forget_gone_pod_links(pins)
    for pin in _pod_link_pins(pins):
        fd = libbpf.obj_get(pin)
        try:
            libbpf.link_update(fd, prog_fd)
        finally:
            os.close(fd)
    for index, port in _tc_pod_ports():
        if _attach_pod_link(pins, prog_fd, index):
            attach.detach_tc(port, POD_INGRESS.direction)


def _tc_pod_ports() -> list[tuple[int, str]]:
    """(ifindex, name) of the interfaces where an older release attached pod_ingress as a
    tc filter."""
    return [
        (index, name)
        for index, name in _interfaces()
        if attach.tc_filter_name(name, POD_INGRESS.direction) == POD_INGRESS.name
    ]


def detach_pod_ports(bpffs: str) -> None:
    """Take our program off every pod's veth end that runs it."""
    for pin in _pod_link_pins(PinDir(bpffs)):
        os.unlink(pin)  # the link's last reference: the program is detached
    for _, port in _tc_pod_ports():
        attach.detach_tc(port, POD_INGRESS.direction)


def uninstall(bpffs: str, underlay: str | None, vni: int = defaults.VXLAN_VNI) -> None:
    """Detach everything, delete the tunnel device and unpin; safe to repeat."""
    tunnel, _ = devices.tunnel_names(vni)
    detach_pod_ports(bpffs)
    if underlay:
        attach.detach_xdp(underlay)
        attach.detach_tc(underlay, UNDERLAY_TC.direction)
    attach.detach_tc(tunnel, TUNNEL_EGRESS.direction)
    attach.detach_tc(tunnel, TUNNEL_INGRESS.direction)
    devices.remove_tunnel(vni)
    PinDir(bpffs).remove()
    log.info("data path removed (bpffs %s)", bpffs)
