"""The node agent: lease, data path, and the loop that keeps the maps equal to the registry.

Data flows one way: registry events -> desired peers -> BPF maps and routes.
The data path outlives the agent: on SIGTERM (or a crash) programs, maps and
routes stay, and traffic keeps flowing; a restarted agent adopts them
(same tunnel device, same VtepMAC, same lease) and reconciles by diff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_xdp import defaults
from flannel_xdp.agent import acquire, conntrack, health, local_pods, masq, node_state, subnet_env
from flannel_xdp.agent.config import ConfigError, NetworkConfig, check_underlay
from flannel_xdp.agent.interface import Underlay, find_underlay
from flannel_xdp.agent.lease import LeaseAttrs
from flannel_xdp.agent.peers import Ignored, desired_peers, peer_for
from flannel_xdp.agent.registry import (
    Compacted,
    ConfigMissing,
    Endpoint,
    EtcdRegistry,
    EventKind,
    LeaseEvent,
    RegistryError,
    RegistryUnavailable,
    TlsFiles,
)
from flannel_xdp.loader import __main__ as loader_main
from flannel_xdp.loader import datapath, devices
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.maps.layout import Backend
from flannel_xdp.maps.views import CapacityError, NodeConfigMap, Peer, SubnetsMap
from flannel_xdp.metrics.agent import AgentMetrics

log = logging.getLogger(__name__)

LEASE_TTL = 24 * 3600
RENEW_RETRY = 60.0
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
# A watch that stayed up this long means the registry had recovered: its next failure
# starts the backoff over (a watch rarely ends cleanly, so success alone cannot reset it).
HEALTHY_WATCH_SECONDS = 30.0
PROBE_INTERVAL = 1.0


class _ProbeFailed(Exception):
    pass


class AgentExit(Exception):
    """Stop the agent with an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AgentOptions:
    etcd_endpoints: list[Endpoint]
    etcd_prefix: str = "/coreos.com/network"
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
    udp_fast_path: bool = False  # kernel hook, vxlan: bpf/fastpath.h
    tcp_fast_path: bool = False  # and TCP, while conntrack.tcp_be_liberal()
    max_subnets: int = defaults.MAX_SUBNETS
    lease_ttl: int = LEASE_TTL


@dataclass
class Stats:
    """What the agent has done, for logs now and metrics later."""

    events: int = 0
    event_errors: int = 0
    registry_errors: int = 0
    full_syncs: int = 0
    last_sync: float = 0.0
    last_sync_seconds: float = 0.0
    registry_ok: bool = False
    lease_expiry: float = 0.0
    subnets_wanted: int = 0  # remote subnets the registry asks for
    capacity_exceeded: bool = False  # wanted > capacity: see Agent._fit
    capacity_refusals: int = 0  # syncs that could not program every wanted subnet
    tcp_fast_path: bool = False  # FAST_TCP as the agent last set it in node_config


def ingress_hook_for(backend_type: str) -> datapath.IngressHook:
    """The hook `make bench` favours per backend: host-gw has nothing to decapsulate and
    keeps its aggregates with tc (XDP on a veth underlay turns GSO off: TCP 0.23x of the
    kernel against 0.87x with tc); vxlan takes the default, the kernel hook."""
    if backend_type == "host-gw":
        return datapath.IngressHook.TC
    return datapath.DEFAULT_INGRESS_HOOK


def random_vtep_mac(rng: random.Random | None = None) -> str:
    """Locally administered, unicast, as flanneld's VtepMAC."""
    rng = rng or random.SystemRandom()
    raw = bytearray(rng.getrandbits(8) for _ in range(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def _existing_tunnel_mac(vni: int) -> str | None:
    name, _ = devices.tunnel_names(vni)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        return ipr.get_links(found[0])[0].get_attr("IFLA_ADDRESS")


class Agent:
    def __init__(self, opts: AgentOptions):
        self.opts = opts
        self.registry = EtcdRegistry(
            opts.etcd_endpoints,
            prefix=opts.etcd_prefix,
            tls=opts.tls,
            username=opts.etcd_username,
            password=opts.etcd_password,
        )
        self.stats = Stats()
        self.config: NetworkConfig | None = None
        self.underlay: Underlay | None = None
        self.subnet: IPv4Network | None = None
        self.attrs: LeaseAttrs | None = None
        self.leases: dict[IPv4Network, LeaseAttrs] = {}
        self.programmed: dict[IPv4Network, Peer] = {}
        # The remote leases in self.leases that peer_for refuses, by subnet (each once):
        # flannel_xdp_leases_ignored is its size.
        self.ignored: dict[IPv4Network, Ignored] = {}
        self.subnets_map: SubnetsMap | None = None
        self.ready = False
        self.ingress_hook = opts.ingress_hook or datapath.DEFAULT_INGRESS_HOOK
        self.metrics = AgentMetrics(self, PinDir(opts.bpffs).maps)
        self._revision = 0
        self._stop = asyncio.Event()

    # -- start-up ---------------------------------------------------------------------------

    async def _fetch_config(self) -> NetworkConfig:
        backoff = BACKOFF_MIN
        while True:
            try:
                return await self.registry.get_config()
            except ConfigError as exc:
                raise AgentExit(2, f"invalid network config in etcd: {exc}") from exc
            except (RegistryUnavailable, ConfigMissing) as exc:
                self.stats.registry_errors += 1
                log.warning("waiting for the network config: %s", exc)
            await self._sleep_or_stop(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _tunnel_mtu(self, config: NetworkConfig, underlay: Underlay) -> int:
        if config.backend.type == "vxlan":
            return config.backend.vxlan.mtu or underlay.mtu - defaults.VXLAN_OVERHEAD
        return underlay.mtu

    async def start(self) -> None:
        opts = self.opts
        self.config = config = await self._fetch_config()
        if self.opts.ingress_hook is None:
            self.ingress_hook = ingress_hook_for(config.backend.type)
        if config.backend.type not in ("vxlan", "host-gw"):
            raise AgentExit(
                2,
                f"backend {config.backend.type!r} has no BPF data path "
                "(flannel-xdp runs vxlan and host-gw)",
            )
        if opts.udp_fast_path and not datapath.udp_fast_path_fits(
            config.backend.type, self.ingress_hook
        ):
            raise AgentExit(
                2,
                f"--udp-fast-path fits {datapath.UDP_FAST_PATH_FITS}; "
                f"this node runs {config.backend.type} with the {self.ingress_hook} hook",
            )
        try:
            self.underlay = underlay = await asyncio.to_thread(
                find_underlay, opts.ifaces, opts.iface_regex
            )
        except RuntimeError as exc:
            raise AgentExit(2, str(exc)) from exc
        public_ip = opts.public_ip or underlay.address.ip
        try:
            check_underlay(config, underlay.name, underlay.address, public_ip)
        except ConfigError as exc:
            raise AgentExit(
                2, f"network config {opts.etcd_prefix}/config does not fit this node: {exc}"
            ) from exc
        vni = config.backend.vxlan.vni
        if config.backend.type == "host-gw" and public_ip != underlay.address.ip:
            raise AgentExit(
                2,
                f"host-gw needs the public IP on {underlay.name} "
                f"({underlay.address.ip}), not {public_ip}",
            )
        vtep_mac = await asyncio.to_thread(_existing_tunnel_mac, vni) or random_vtep_mac()
        if config.backend.type == "vxlan":
            self.attrs = LeaseAttrs(public_ip, "vxlan", vni=vni, vtep_mac=vtep_mac)
        else:
            self.attrs = LeaseAttrs(public_ip, "host-gw")
        log.info(
            "underlay %s (%s), public IP %s, backend %s",
            underlay.name,
            underlay.address,
            public_ip,
            config.backend.type,
        )

        previous = subnet_env.read_subnet(opts.subnet_file)
        try:
            self.subnet = await acquire.acquire(
                self.registry, config, self.attrs, opts.lease_ttl, previous=previous
            )
        except acquire.NoSubnetAvailable as exc:
            raise AgentExit(1, str(exc)) from exc
        self.stats.lease_expiry = time.time() + opts.lease_ttl

        mtu = self._tunnel_mtu(config, underlay)
        await self._install_data_path(vtep_mac, public_ip, mtu)
        subnet_env.write(
            opts.subnet_file,
            subnet_env.SubnetEnv(config.network, self.subnet, mtu, opts.ip_masq),
        )
        log.info("wrote %s: subnet %s, MTU %d", opts.subnet_file, self.subnet, mtu)
        await asyncio.to_thread(masq.install, config.network, self.subnet, opts.ip_masq)

        listing = await self.registry.list_leases()
        await self._full_sync(listing.leases, listing.revision)
        self.ready = True

    async def _install_data_path(self, vtep_mac: str, public_ip: IPv4Address, mtu: int) -> None:
        """Compile and attach in a child process: bcc and LLVM stay out of the agent."""
        assert self.config and self.underlay and self.subnet
        cfg = datapath.DataPathConfig(
            underlay=self.underlay.name,
            bpffs=self.opts.bpffs,
            max_subnets=self.opts.max_subnets,
            xdp_mode=datapath.attach.XdpMode(self.opts.xdp_mode),
            ingress_hook=self.ingress_hook,
            tunnel_mtu=mtu,
            udp_fast_path=self.opts.udp_fast_path,
            tcp_fast_path=self.opts.tcp_fast_path,
        )
        node = datapath.NodeParams(
            public_ip=public_ip,
            subnet=self.subnet,
            vtep_mac=vtep_mac,
            vni=self.config.backend.vxlan.vni,
            vxlan_port=self.config.backend.vxlan.port,
        )
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "flannel_xdp.loader",
            "install",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await child.communicate(loader_main.request_json(cfg, node).encode())
        if child.returncode != 0:
            raise AgentExit(1, f"installing the data path failed (loader exit {child.returncode})")
        log.debug("loader: %s", out.decode().strip())
        await asyncio.to_thread(self._set_tunnel_address, self.subnet, node.vni)
        self.subnets_map = SubnetsMap(PinDir(self.opts.bpffs).maps)

    @staticmethod
    def _set_tunnel_address(subnet: IPv4Network, vni: int) -> None:
        with IPRoute() as ipr:
            node_state.set_tunnel_address(ipr, subnet, vni)

    # -- keeping the maps equal to the registry ---------------------------------------------

    def _direct_networks(self) -> list[IPv4Network]:
        return [self.underlay.network] if self.underlay else []

    async def _full_sync(self, leases: dict[IPv4Network, LeaseAttrs], revision: int) -> None:
        assert self.config and self.subnet and self.subnets_map
        started = time.monotonic()
        own = leases.get(self.subnet)
        if own is None or own.public_ip != self.attrs.public_ip:  # type: ignore[union-attr]
            raise AgentExit(1, f"Lease has been revoked: {self.subnet} is no longer ours")
        self.leases = dict(leases)
        want = desired_peers(leases, self.subnet, self.config, self._direct_networks())
        for ignored in want.ignored:
            log.warning("ignoring lease %s: %s", ignored.subnet, ignored.why)
        self.ignored = {i.subnet: i for i in want.ignored}
        have = self.subnets_map.peers()
        target = self._fit(want.peers, have, revision)
        peers = list(target.values())
        vni, underlay = self.config.backend.vxlan.vni, self._underlay_index()
        leaving = [p for s, p in have.items() if s not in target]
        # Map entries before routes, routes removed before map entries: no packet is
        # routed into the tunnel without an entry telling the program where it goes.
        if len(have) + sum(1 for s in target if s not in have) <= self.subnets_map.max_entries:
            first = self.subnets_map.apply(peers + leaving)
            await asyncio.to_thread(self._sync_routes, peers, vni, underlay)
            second = self.subnets_map.apply(peers)  # only removals are left to do here
        else:
            # No room for the leaving and the arriving peers side by side: withdraw the
            # leaving ones (routes, then entries) before the newcomers get theirs.
            staying = [p for p in peers if p.subnet in have]
            await asyncio.to_thread(self._sync_routes, staying, vni, underlay)
            first = self.subnets_map.apply(staying)
            second = self.subnets_map.apply(peers)
            await asyncio.to_thread(self._sync_routes, peers, vni, underlay)
        self.programmed = target
        self._revision = revision
        self.stats.full_syncs += 1
        self.stats.last_sync = time.time()
        self.stats.last_sync_seconds = time.monotonic() - started
        self.metrics.sync_seconds.labels("full").observe(self.stats.last_sync_seconds)
        log.info(
            "synced %d peers from revision %d (%d added, %d changed, %d removed) in %.3f s",
            len(peers),
            revision,
            first.added + second.added,
            first.changed + second.changed,
            first.removed + second.removed,
            self.stats.last_sync_seconds,
        )

    def _fit(
        self, want: dict[IPv4Network, Peer], have: dict[IPv4Network, Peer], revision: int
    ) -> dict[IPv4Network, Peer]:
        """The peers to program: every wanted one, when they fit the subnets map.

        When they do not, the map is never filled with an arbitrary part of them: it keeps
        the peers it holds that are still wanted (updated to their current leases; those
        whose lease went are removed) and takes no new one, so every entry in it is right
        and the ones missing are the newest. The agent says so (an error in the log,
        flannel_xdp_map_capacity_exceeded_total, flannel_xdp_subnets_wanted above
        flannel_xdp_map_capacity{map="subnets"}) and is not ready until the wanted set fits
        again; then the next sync, full or by event, programs all of it.
        """
        assert self.subnets_map is not None
        capacity = self.subnets_map.max_entries
        was = (self.stats.capacity_exceeded, self.stats.subnets_wanted)
        self.stats.subnets_wanted = len(want)
        if len(want) <= capacity:
            if was[0]:
                log.warning(
                    "the %d wanted remote subnets fit the subnets map again (max_entries %d): "
                    "programming all of them",
                    len(want),
                    capacity,
                )
            self.stats.capacity_exceeded = False
            return dict(want)
        keep = {s: p for s, p in want.items() if s in have}
        missing = sorted(s for s in want if s not in keep)
        self.stats.capacity_exceeded = True
        self.stats.capacity_refusals += 1
        if was != (True, len(want)):
            shown = ", ".join(str(s) for s in missing[:5]) + (", ..." if len(missing) > 5 else "")
            log.error(
                "subnets map full: revision %d has %d remote subnets, the map holds %d "
                "(--max-subnets); keeping the %d peers programmed, not programming %d (%s); "
                "not ready until they fit: raise --max-subnets",
                revision,
                len(want),
                capacity,
                len(keep),
                len(missing),
                shown,
            )
        return keep

    def _underlay_index(self) -> int:
        assert self.underlay is not None
        return self.underlay.index

    @staticmethod
    def _sync_routes(peers: list[Peer], vni: int, underlay_index: int) -> None:
        with IPRoute() as ipr:
            # host-gw next hops resolved before any route sends a packet their way
            node_state.sync_next_hops(ipr, underlay_index, peers)
            node_state.sync_peers(ipr, peers, vni)

    async def _on_event(self, ev: LeaseEvent) -> None:
        started = time.monotonic()
        try:
            await self._apply_event(ev)
        finally:
            self.metrics.sync_seconds.labels("event").observe(time.monotonic() - started)
            self.stats.last_sync = time.time()

    async def _apply_event(self, ev: LeaseEvent) -> None:
        assert self.config and self.subnet and self.subnets_map and self.attrs
        self.stats.events += 1
        self._revision = ev.revision
        if ev.subnet == self.subnet:
            if ev.kind == EventKind.REMOVED or (
                ev.attrs and ev.attrs.public_ip != self.attrs.public_ip
            ):
                raise AgentExit(1, f"Lease has been revoked: {self.subnet}")
            return
        if ev.kind == EventKind.ADDED and ev.attrs is not None:
            self.leases[ev.subnet] = ev.attrs
            got: Peer | Ignored | None = peer_for(
                ev.subnet, ev.attrs, self.config, self._direct_networks()
            )
        else:
            self.leases.pop(ev.subnet, None)
            got = None
        if isinstance(got, Ignored):
            self.ignored[ev.subnet] = got
        else:
            self.ignored.pop(ev.subnet, None)
        old = self.programmed.get(ev.subnet)
        if self.stats.capacity_exceeded or (
            isinstance(got, Peer)
            and old is None
            and len(self.programmed) >= self.subnets_map.max_entries
        ):
            # The map is full, or this peer would overfill it: decide over the whole
            # desired state (see _fit), never entry by entry.
            await self._full_sync(self.leases, ev.revision)
            return
        vni = self.config.backend.vxlan.vni
        underlay = self._underlay_index()
        if isinstance(got, Peer):
            if got != old:
                self.subnets_map.upsert(got)
                await asyncio.to_thread(self._add_route, got, vni, underlay)
                self.programmed[ev.subnet] = got
                if old is not None:
                    await asyncio.to_thread(self._drop_next_hop, old, underlay)
                log.info("peer %s via %s (%s)", got.subnet, got.public_ip, got.backend.name)
            return
        if isinstance(got, Ignored):
            log.warning("ignoring lease %s: %s", got.subnet, got.why)
        if old is not None:
            await asyncio.to_thread(self._remove_route, ev.subnet, vni)
            self.subnets_map.remove(ev.subnet)
            del self.programmed[ev.subnet]
            await asyncio.to_thread(self._drop_next_hop, old, underlay)
            log.info("peer %s removed", ev.subnet)

    @staticmethod
    def _add_route(peer: Peer, vni: int, underlay_index: int) -> None:
        with IPRoute() as ipr:
            if peer.backend is Backend.HOST_GW:
                node_state.ensure_next_hop(ipr, underlay_index, peer.public_ip)
            node_state.add_peer(ipr, peer, vni)

    @staticmethod
    def _remove_route(subnet: IPv4Network, vni: int) -> None:
        with IPRoute() as ipr:
            node_state.remove_peer(ipr, subnet, vni)

    def _drop_next_hop(self, gone: Peer, underlay_index: int) -> None:
        """Forget gone's next hop unless another programmed peer still uses it."""
        if gone.backend is not Backend.HOST_GW:
            return
        if gone.public_ip not in node_state.next_hops(self.programmed.values()):
            with IPRoute() as ipr:
                node_state.remove_next_hop(ipr, underlay_index, gone.public_ip)

    # -- loops -----------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await self._watch_once()
                backoff = BACKOFF_MIN
                continue
            except Compacted as exc:
                log.warning("watch: %s; listing again", exc)
                if await self._relist_quietly():
                    continue
                self.stats.registry_ok = False
            except (RegistryError, _ProbeFailed) as exc:
                self.stats.registry_ok = False
                self.stats.registry_errors += 1
                if time.monotonic() - started >= HEALTHY_WATCH_SECONDS:
                    backoff = BACKOFF_MIN
                log.warning("registry unreachable (%s); retrying in %.1f s", exc, backoff)
            await self._sleep_or_stop(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            if not self._stop.is_set():
                await self._relist_quietly()

    async def _watch_once(self) -> None:
        """Apply watch events until the watch or the probe beside it fails."""

        async def consume() -> None:
            async for ev in self.registry.watch_leases(self._revision + 1):
                try:
                    await self._on_event(ev)
                except AgentExit:
                    raise
                except Exception:
                    self.stats.event_errors += 1
                    log.exception("applying %s %s failed", ev.kind, ev.subnet)

        tasks = {asyncio.create_task(consume()), asyncio.create_task(self._probe())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
        for t in done:
            t.result()  # re-raises what ended it

    async def _relist(self) -> None:
        listing = await self.registry.list_leases()
        await self._full_sync(listing.leases, listing.revision)
        self.stats.registry_ok = True

    async def _relist_quietly(self) -> bool:
        try:
            await self._relist()
            return True
        except RegistryError as exc:
            log.debug("relist failed: %s", exc)
            return False

    async def _probe(self) -> None:
        """A watch on a dead member can wait forever: probe the registry beside it."""
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self.registry.get_config()
                self.stats.registry_ok = True
            except (RegistryError, ConfigError) as exc:
                self.stats.registry_ok = False
                raise _ProbeFailed(str(exc)) from exc

    async def _renew_loop(self) -> None:
        assert self.subnet and self.attrs
        ttl, margin = self.opts.lease_ttl, self.opts.renew_margin_minutes * 60
        while not self._stop.is_set():
            await self._sleep_or_stop(max(self.stats.lease_expiry - time.time() - margin, 1.0))
            if self._stop.is_set():
                return
            try:
                await self.registry.renew_lease(self.subnet, self.attrs, ttl)
                self.stats.lease_expiry = time.time() + ttl
                log.info("renewed lease %s", self.subnet)
            except RegistryError as exc:
                log.warning(
                    "renewing lease %s failed (%s); retrying in %.0f s",
                    self.subnet,
                    exc,
                    RENEW_RETRY,
                )
                await self._sleep_or_stop(RENEW_RETRY)

    async def _fast_path_loop(self) -> None:
        """Keep the fast path's view of the pods current: local_pods equal to the pods
        on cni0 (a pod not in it yet is reached through cni0, and sends through it), and
        pod_ingress attached to each of their veth ends (the sending side)."""
        maps_dir = PinDir(self.opts.bpffs).maps
        bridge = defaults.CNI_BRIDGE
        failing = False
        tcp: bool | None = None  # as node_config has it; None: not written yet
        while not self._stop.is_set():
            if self.opts.tcp_fast_path:
                tcp = await asyncio.to_thread(self._keep_tcp_fast_path, maps_dir, tcp)
                self.stats.tcp_fast_path = bool(tcp)
            try:
                done = await asyncio.to_thread(local_pods.sync, maps_dir, bridge)
                attached = await asyncio.to_thread(
                    datapath.ensure_pod_ports, self.opts.bpffs, done.ports
                )
            except (OSError, CapacityError, NetlinkError, datapath.attach.AttachError) as exc:
                if not failing:
                    log.warning("fast path: keeping up with the pods on %s failed: %s", bridge, exc)
                failing = True
            else:
                if failing:
                    log.info("fast path: keeping up with the pods on %s works again", bridge)
                failing = False
                applied = done.applied
                if applied.added or applied.changed or applied.removed:
                    log.info(
                        "local pods: %d added, %d changed, %d removed",
                        applied.added,
                        applied.changed,
                        applied.removed,
                    )
                if attached:
                    log.info("fast path: sending side attached to %s", ", ".join(attached))
            await self._sleep_or_stop(defaults.LOCAL_PODS_INTERVAL_S)

    @staticmethod
    def _keep_tcp_fast_path(maps_dir: str, was: bool | None) -> bool | None:
        """FAST_TCP in node_config as conntrack's window checks allow it now; returns
        what node_config holds."""
        problem = conntrack.tcp_fast_path_problem()
        want = problem is None
        if want == was:
            return was
        try:
            with NodeConfigMap(maps_dir) as node_config:
                if not node_config.set_tcp_fast_path(want):
                    return was
        except OSError as exc:
            log.warning("TCP fast path: cannot update node_config: %s", exc)
            return was
        if want:
            log.info("TCP fast path: on (%s=1)", conntrack.TCP_BE_LIBERAL)
        elif was is None:
            log.warning("TCP fast path: off: %s", problem)
        else:
            log.warning(
                "TCP fast path: off: %s; streams it carried may now be judged out of window",
                problem,
            )
        return want

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def is_ready(self) -> bool:
        return self.ready and self.stats.registry_ok and not self.stats.capacity_exceeded

    def _not_ready_why(self) -> str:
        """Why is_ready() is False, in words (each of its conditions that fails)."""
        why = []
        if not self.ready:
            why.append("the first full sync has not finished")
        if not self.stats.registry_ok:
            why.append("the registry does not answer")
        if self.stats.capacity_exceeded:
            capacity = self.subnets_map.max_entries if self.subnets_map else 0
            why.append(
                f"{self.stats.subnets_wanted} remote subnets wanted, "
                f"{len(self.programmed)} programmed: the subnets map holds {capacity} "
                "(--max-subnets); /readyz answers 503 until they fit"
            )
        return "; ".join(why)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        server = None
        try:
            if self.opts.metrics_port:
                self.metrics.serve(self.opts.metrics_ip, self.opts.metrics_port)
                log.info(
                    "metrics on http://%s:%d/metrics", self.opts.metrics_ip, self.opts.metrics_port
                )
            if self.opts.healthz_port:
                server = await health.serve(
                    self.opts.healthz_ip, self.opts.healthz_port, self.is_ready
                )
            starting = asyncio.create_task(self.start())
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                log.info("stopped during start-up")
                return 0
            stopping.cancel()
            starting.result()
            self.stats.registry_ok = True
            if self.is_ready():
                log.info("ready: %d peers programmed", len(self.programmed))
            else:
                log.warning("started but NOT ready: %s", self._not_ready_why())
            tasks = [
                asyncio.create_task(self._watch_loop()),
                asyncio.create_task(self._renew_loop()),
            ]
            if self.opts.udp_fast_path:
                tasks.append(asyncio.create_task(self._fast_path_loop()))
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            for t in (*tasks, stop):
                t.cancel()
            for t in done:
                if t is not stop and t.exception():
                    raise t.exception()  # type: ignore[misc]
            log.info("stopping; the data path stays in place (flannel-xdp teardown removes it)")
            return 0
        except AgentExit as exc:
            log.error("%s", exc)
            return exc.code
        finally:
            if server is not None:
                server.close()
            if self.subnets_map is not None:
                self.subnets_map.close()
            await self.registry.close()
