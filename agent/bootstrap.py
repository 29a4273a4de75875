"""Bootstrap: from flags to a node that forwards. The network config, the underlay, our
lease, the data path installed (in a loader child), subnet.env and masquerade rules.

Every refusal here happens before anything is changed on the node, and says what to fix.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute

from flannel_xdp import defaults
from flannel_xdp.loader import datapath, fast_path
from flannel_xdp.mac import random_vtep_mac
from flannel_xdp.node import conntrack, masq, routes, subnet_env
from flannel_xdp.node.underlay import Underlay, find_underlay
from flannel_xdp.registry.base import Lease, NoSubnetAvailable, PermissionDenied, Registry
from flannel_xdp.registry.config import ConfigError, NetworkConfig, check_underlay
from flannel_xdp.registry.etcd import DEFAULT_PREFIX, Endpoint, TlsFiles
from flannel_xdp.registry.kube import KubeSettings
from flannel_xdp.registry.lease import LeaseAttrs

log = logging.getLogger(__name__)


class AgentExit(Exception):
    """Stop the agent with an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AgentOptions:
    etcd_endpoints: list[Endpoint]
    etcd_prefix: str = DEFAULT_PREFIX
    tls: TlsFiles | None = None
    etcd_username: str | None = None
    etcd_password: str | None = None
    ifaces: list[str] = field(default_factory=list)
    iface_regex: list[str] = field(default_factory=list)
    public_ip: IPv4Address | None = None
    subnet_file: str = subnet_env.DEFAULT_PATH
    renew_margin_minutes: int = 60
    ip_masq: bool = False
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    metrics_ip: str = "0.0.0.0"
    metrics_port: int = 0
    bpffs: str = defaults.BPFFS_DIR
    ingress_hook: datapath.IngressHook | None = None  # None: chosen by backend, see below
    xdp_mode: str = "auto"
    fast_path: fast_path.Wanted = field(default_factory=fast_path.Wanted)
    max_subnets: int = defaults.MAX_SUBNETS
    build_cache: str = defaults.BUILD_CACHE_DIR  # "": compile at every start
    kube: KubeSettings | None = None  # --kube-subnet-mgr: the Kubernetes API, not etcd


@dataclass(frozen=True)
class NodeSetup:
    """What bootstrap settled, for the loops that follow."""

    config: NetworkConfig
    underlay: Underlay
    lease: Lease
    ingress_hook: datapath.IngressHook
    tunnel_mtu: int
    udp_fast_path: fast_path.State  # TCP's follows conntrack (agent/pod_scan.py)


def ingress_hook_for(backend_type: str) -> datapath.IngressHook:
    """The hook `make bench` favours per backend: host-gw has nothing to decapsulate and
    keeps its aggregates with tc (XDP on a veth underlay turns GSO off: TCP 0.23x of the
    kernel against 0.87x with tc); vxlan takes the default, the kernel hook."""
    if backend_type == "host-gw":
        return datapath.IngressHook.TC
    return datapath.DEFAULT_INGRESS_HOOK


def tunnel_mtu(config: NetworkConfig, underlay: Underlay) -> int:
    if config.backend.type == "vxlan":
        return config.backend.vxlan.mtu or underlay.mtu - defaults.VXLAN_OVERHEAD
    return underlay.mtu


def _existing_tunnel_mac(vni: int) -> str | None:
    """The VtepMAC of the tunnel device a previous run left: a restart keeps it, so that
    peers' FDB and neighbour entries stay right."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=defaults.tunnel_device(vni))
        if not found:
            return None
        return ipr.get_links(found[0])[0].get_attr("IFLA_ADDRESS")


async def bootstrap(opts: AgentOptions, registry: Registry) -> NodeSetup:
    try:
        config = await registry.network_config()
    except ConfigError as exc:
        raise AgentExit(2, f"invalid network config in {registry.config_source}: {exc}") from exc
    hook = opts.ingress_hook or ingress_hook_for(config.backend.type)
    if config.backend.type not in ("vxlan", "host-gw"):
        raise AgentExit(
            2,
            f"backend {config.backend.type!r} has no BPF data path "
            "(flannel-xdp runs vxlan and host-gw)",
        )
    udp_fast_path = await settle_fast_path(opts.fast_path.udp, config.backend.type, hook)
    try:
        underlay = await asyncio.to_thread(find_underlay, opts.ifaces, opts.iface_regex)
    except RuntimeError as exc:
        raise AgentExit(2, str(exc)) from exc
    public_ip = opts.public_ip or await registry.public_ip_hint() or underlay.address.ip
    try:
        check_underlay(config, underlay.name, underlay.address, public_ip)
    except ConfigError as exc:
        raise AgentExit(
            2, f"network config {registry.config_source} does not fit this node: {exc}"
        ) from exc
    vni = config.backend.vxlan.vni
    if config.backend.type == "host-gw" and public_ip != underlay.address.ip:
        raise AgentExit(
            2,
            f"host-gw needs the public IP on {underlay.name} "
            f"({underlay.address.ip}), not {public_ip}",
        )
    vtep_mac = (
        await asyncio.to_thread(_existing_tunnel_mac, vni)
        or await registry.previous_vtep_mac()
        or random_vtep_mac()
    )
    if config.backend.type == "vxlan":
        attrs = LeaseAttrs(public_ip, "vxlan", vni=vni, vtep_mac=vtep_mac)
    else:
        attrs = LeaseAttrs(public_ip, "host-gw")
    log.info(
        "underlay %s (%s), public IP %s, backend %s",
        underlay.name,
        underlay.address,
        public_ip,
        config.backend.type,
    )

    previous = subnet_env.read_subnet(opts.subnet_file)
    try:
        lease = await registry.acquire(config, attrs, previous)
    except ConfigError as exc:  # e.g. a podCIDR outside Network
        raise AgentExit(2, f"{registry.config_source}: {exc}") from exc
    except (NoSubnetAvailable, PermissionDenied) as exc:
        raise AgentExit(1, str(exc)) from exc

    mtu = tunnel_mtu(config, underlay)
    setup = NodeSetup(config, underlay, lease, hook, mtu, udp_fast_path)
    await install_data_path(opts, setup, vtep_mac, public_ip)
    subnet_env.write(
        opts.subnet_file,
        subnet_env.SubnetEnv(config.network, lease.subnet, mtu, opts.ip_masq),
    )
    log.info("wrote %s: subnet %s, MTU %d", opts.subnet_file, lease.subnet, mtu)
    await asyncio.to_thread(masq.install, config.network, lease.subnet, opts.ip_masq)
    return setup


async def settle_fast_path(
    mode: fast_path.Mode, backend_type: str, hook: datapath.IngressHook
) -> fast_path.State:
    """Whether UDP takes the fast path on this node, logged in one line; AgentExit(2)
    when it is asked for (on) and the kernel, backend or hook lacks what it needs."""
    fits = datapath.udp_fast_path_fits(backend_type, hook)
    try:
        lacks = (
            {} if mode is fast_path.Mode.OFF else await asyncio.to_thread(fast_path.kernel_lacks)
        )
        state = fast_path.udp_state(
            mode, lacks, fits, f"this node runs {backend_type} with the {hook} hook"
        )
    except ValueError as exc:
        raise AgentExit(2, str(exc)) from exc
    if state.on:
        log.info(
            "fast path: on (the conntrack kfuncs and tcx are there; %s, %s hook)",
            backend_type,
            hook,
        )
    elif state.reason is fast_path.OffReason.TURNED_OFF:
        log.info("fast path: off (%s): the stack path carries all pod traffic", state.why)
    else:
        log.warning(
            "fast path: off, the stack path carries all pod traffic: %s (%s)",
            state.why,
            state.reason,
        )
    return state


async def install_data_path(
    opts: AgentOptions, setup: NodeSetup, vtep_mac: str, public_ip: IPv4Address
) -> None:
    """Compile and attach in a child process: bcc and LLVM stay out of the agent."""
    cfg = datapath.DataPathConfig(
        underlay=setup.underlay.name,
        bpffs=opts.bpffs,
        max_subnets=opts.max_subnets,
        build_cache=opts.build_cache,
        xdp_mode=datapath.attach.XdpMode(opts.xdp_mode),
        ingress_hook=setup.ingress_hook,
        tunnel_mtu=setup.tunnel_mtu,
        udp_fast_path=setup.udp_fast_path.on,
        # Where the pod scan starts from; it keeps FAST_TCP to conntrack from then on.
        tcp_fast_path=setup.udp_fast_path.on
        and opts.fast_path.tcp is not fast_path.Mode.OFF
        and conntrack.tcp_fast_path_problem() is None,
    )
    node = datapath.NodeParams(
        public_ip=public_ip,
        subnet=setup.lease.subnet,
        vtep_mac=vtep_mac,
        vni=setup.config.backend.vxlan.vni,
        vxlan_port=setup.config.backend.vxlan.port,
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "flannel_xdp.loader",
        "install",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await child.communicate(datapath.InstallRequest(cfg, node).to_json().encode())
    if child.returncode != 0:
        raise AgentExit(1, f"installing the data path failed (loader exit {child.returncode})")
    log.debug("loader: %s", out.decode().strip())
    await asyncio.to_thread(_set_tunnel_address, setup.lease.subnet, node.vni)


def _set_tunnel_address(subnet: IPv4Network, vni: int) -> None:
    with IPRoute() as ipr:
        routes.set_tunnel_address(ipr, subnet, vni)
