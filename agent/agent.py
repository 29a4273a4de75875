"""The node agent: bootstrap, then three loops until SIGTERM.

Data flows one way: registry updates -> desired peers -> BPF maps and routes
(agent.reconcile). The data path outlives the agent: on SIGTERM (or a crash) programs,
maps and routes stay, and traffic keeps flowing; a restarted agent adopts them (same
tunnel device, same VtepMAC, same lease) and reconciles by diff.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator

from flannel_xdp.agent import health
from flannel_xdp.agent.bootstrap import AgentExit, AgentOptions, NodeSetup, bootstrap
from flannel_xdp.agent.pod_scan import PodScan
from flannel_xdp.agent.reconcile import Reconciler
from flannel_xdp.agent.tcp_marks import TcpMarks
from flannel_xdp.loader import fast_path
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.maps.views import SubnetsMap
from flannel_xdp.metrics.agent import AgentMetrics, ControlPlane
from flannel_xdp.node.routes import KernelRoutes
from flannel_xdp.registry.base import LeaseRevoked, Registry, Update
from flannel_xdp.registry.etcd import EtcdRegistry
from flannel_xdp.registry.kube import KubeRegistry

__all__ = ["Agent", "AgentExit", "AgentOptions"]

log = logging.getLogger(__name__)


def etcd_registry(opts: AgentOptions) -> EtcdRegistry:
    return EtcdRegistry(
        opts.etcd_endpoints,
        prefix=opts.etcd_prefix,
        tls=opts.tls,
        username=opts.etcd_username,
        password=opts.etcd_password,
        renew_margin=opts.renew_margin_minutes * 60.0,
    )


def kube_registry(opts: AgentOptions) -> KubeRegistry:
    assert opts.kube is not None
    return KubeRegistry(opts.kube)


def registry_for(opts: AgentOptions) -> Registry:
    """--kube-subnet-mgr: the Kubernetes API; otherwise etcd."""
    return kube_registry(opts) if opts.kube is not None else etcd_registry(opts)


class Agent:
    def __init__(self, opts: AgentOptions, registry: Registry | None = None):
        self.opts = opts
        self.registry = registry or registry_for(opts)
        self.setup: NodeSetup | None = None
        self.reconciler: Reconciler | None = None
        self.pod_scan: PodScan | None = None
        self.tcp_marks: TcpMarks | None = None
        self.metrics = AgentMetrics(self.control_plane, PinDir(opts.bpffs).maps)
        self._subnets_map: SubnetsMap | None = None
        self._updates: AsyncIterator[Update] | None = None

    # -- what others read (other threads included) ------------------------------------

    def is_ready(self) -> bool:
        r = self.reconciler
        return (
            r is not None
            and r.status.synced
            and self.registry.up
            and not r.status.capacity_exceeded
        )

    def not_ready_why(self) -> str:
        """Why is_ready() is False, in words (each of its conditions that fails)."""
        status = self.reconciler.status if self.reconciler else None
        why = []
        if status is None or not status.synced:
            why.append("the first full sync has not finished")
        if not self.registry.up:
            why.append("the registry does not answer")
        if status is not None and status.capacity_exceeded:
            why.append(
                f"{status.subnets_wanted} remote subnets wanted, "
                f"{status.programmed} programmed: the subnets map holds {status.capacity} "
                "(--max-subnets); /readyz answers 503 until they fit"
            )
        return "; ".join(why)

    def control_plane(self) -> ControlPlane:
        """The metrics' view, from immutable snapshots only."""
        status = self.reconciler.status if self.reconciler else None
        lease = self.registry.held()
        hook = self.setup.ingress_hook if self.setup else self.opts.ingress_hook
        return ControlPlane(
            leases_by_backend=dict(status.leases_by_backend) if status else {},
            ignored=status.ignored if status else 0,
            events=status.events if status else 0,
            event_errors=status.event_errors if status else 0,
            registry_errors=self.registry.errors,
            subnets_wanted=status.subnets_wanted if status else 0,
            capacity_refusals=status.capacity_refusals if status else 0,
            registry_up=self.registry.up,
            ready=self.is_ready(),
            fast_path={
                proto: state.reason or "" for proto, state in self.fast_path_states().items()
            },
            last_sync=status.last_sync if status else 0.0,
            lease_expiry=(lease.expiry or 0.0) if lease else 0.0,
            ingress_hook=str(hook) if hook else "",
        )

    def fast_path_states(self) -> dict[str, fast_path.State]:
        """Whether UDP and TCP take the fast path now, each with why not."""
        if self.setup is None:
            return {"udp": fast_path.STARTING, "tcp": fast_path.STARTING}
        udp = self.setup.udp_fast_path
        scan = self.pod_scan
        if not udp.on:
            tcp = (
                udp
                if udp.reason is fast_path.OffReason.TURNED_OFF
                else fast_path.State.off(fast_path.OffReason.UDP_OFF, "TCP rides on UDP's build")
            )
        elif self.opts.fast_path.tcp is fast_path.Mode.OFF:
            tcp = fast_path.State.off(fast_path.OffReason.TURNED_OFF, "--fast-path off")
        elif scan is None or scan.tcp_on is None:
            tcp = fast_path.STARTING
        elif scan.tcp_on and self.tcp_marks is not None and not self.tcp_marks.running:
            tcp = fast_path.State.off(fast_path.OffReason.CONNTRACK_TCP, self.tcp_marks.why)
        elif scan.tcp_on:
            tcp = fast_path.ON
        else:
            tcp = fast_path.State.off(fast_path.OffReason.CONNTRACK_TCP, scan.tcp_off_why)
        return {"udp": udp, "tcp": tcp}

    # -- running ------------------------------------------------------------------------

    async def start(self) -> None:
        """Bootstrap, then the first full sync."""
        self.setup = setup = await bootstrap(self.opts, self.registry)
        self._subnets_map = SubnetsMap(PinDir(self.opts.bpffs).maps)
        self.reconciler = Reconciler(
            setup.config,
            setup.lease.subnet,
            setup.lease.attrs,
            self._subnets_map,
            KernelRoutes(setup.config.backend.vxlan.vni, setup.underlay.index),
            [setup.underlay.network],
            observe_sync=self.metrics.observe_sync,
        )

    async def follow(self, updates: AsyncIterator[Update]) -> None:
        """Apply the registry's updates, for ever."""
        assert self.reconciler is not None
        async for update in updates:
            await self.reconciler.apply(update)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = None
        tasks: list[asyncio.Task] = []
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
            if not await self._until_stopped(self._start_and_sync(), stop):
                log.info("stopped during start-up")
                return 0
            if self.is_ready():
                log.info("ready: %d peers programmed", self.reconciler.status.programmed)
            else:
                log.warning("started but NOT ready: %s", self.not_ready_why())
            assert self.setup is not None
            tasks = [
                asyncio.create_task(self.follow(self._updates)),
                asyncio.create_task(self.registry.hold(self.setup.lease)),
            ]
            if self.setup.udp_fast_path.on:
                self.pod_scan = PodScan(self.opts.bpffs, self.opts.fast_path.tcp)
                tasks.append(asyncio.create_task(self.pod_scan.run()))
                if self.opts.fast_path.tcp is not fast_path.Mode.OFF:
                    self.tcp_marks = TcpMarks(self.setup.lease.subnet, self.setup.config.network)
                    tasks.append(asyncio.create_task(self.tcp_marks.run()))
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopping and t.exception():
                    raise t.exception()  # type: ignore[misc]
            log.info("stopping; the data path stays in place (flannel-xdp teardown removes it)")
            return 0
        except LeaseRevoked as exc:
            log.error("%s", exc)
            return 1
        except AgentExit as exc:
            log.error("%s", exc)
            return exc.code
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if server is not None:
                server.close()
            if self._subnets_map is not None:
                self._subnets_map.close()
            await self.registry.close()

    async def _start_and_sync(self) -> None:
        await self.start()
        assert self.reconciler is not None
        self._updates = self.registry.updates()
        started = time.monotonic()
        first = await anext(self._updates)
        await self.reconciler.apply(first)
        log.debug("first sync %.3f s after start-up", time.monotonic() - started)

    @staticmethod
    async def _until_stopped(work, stop: asyncio.Event) -> bool:
        """Run work unless stop is set first; True when work finished (its errors raised)."""
        working = asyncio.create_task(work)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({working, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not working.done():
            working.cancel()
            return False
        working.result()
        return True
