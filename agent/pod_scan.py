"""The pod scan: keep the fast path's view of this node's pods current, once a second and
whenever the kernel announces a link or a neighbour that concerns them (agent/pod_watch.py).

local_pods equals the pods on cni0 (a pod not in it yet is reached through cni0, and
sends through it), pod_ingress is attached to each of their veth ends (the sending
side), and FAST_TCP in node_config follows whether conntrack lets the agent mark TCP
flows (agent/tcp_marks.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from flannel_xdp import defaults
from flannel_xdp.agent import local_pods
from flannel_xdp.agent.pod_watch import PodWatch
from flannel_xdp.loader import attach, pod_ports
from flannel_xdp.loader.bpffs import PinDir
from flannel_xdp.loader.fast_path import Mode
from flannel_xdp.maps.views import CapacityError, NodeConfigMap
from flannel_xdp.node import conntrack

log = logging.getLogger(__name__)


@dataclass
class PodScan:
    bpffs: str
    tcp: Mode  # as --fast-path and --tcp-fast-path ask for TCP
    bridge: str = defaults.CNI_BRIDGE
    # FAST_TCP as the scan last wrote it to node_config; None: not written yet.
    tcp_on: bool | None = None
    tcp_off_why: str = ""  # while tcp_on is False: conntrack.tcp_fast_path_problem()

    async def run(self) -> None:
        try:
            watch = PodWatch(self.bridge)
        except OSError as exc:
            log.warning(
                "fast path: cannot follow link and neighbour notifications (%s): "
                "new pods are found by the scan every %g s",
                exc,
                defaults.LOCAL_PODS_INTERVAL_S,
            )
            await self._scan_every(None)
            return
        watch.start()
        try:
            await self._scan_every(watch)
        finally:
            watch.close()

    async def _scan_every(self, watch: PodWatch | None) -> None:
        maps_dir = PinDir(self.bpffs).maps
        failing = False
        while True:
            if self.tcp is not Mode.OFF:
                self.tcp_on, self.tcp_off_why = await asyncio.to_thread(
                    keep_tcp_fast_path, maps_dir, self.tcp_on, self.tcp is Mode.ON
                )
            try:
                done = await asyncio.to_thread(local_pods.sync, maps_dir, self.bridge)
                attached = await asyncio.to_thread(
                    pod_ports.ensure_pod_ports, self.bpffs, done.ports
                )
            except (OSError, CapacityError, NetlinkError, attach.AttachError) as exc:
                if not failing:
                    log.warning(
                        "fast path: keeping up with the pods on %s failed: %s", self.bridge, exc
                    )
                failing = True
            else:
                if failing:
                    log.info("fast path: keeping up with the pods on %s works again", self.bridge)
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
            if watch is None:
                await asyncio.sleep(defaults.LOCAL_PODS_INTERVAL_S)
            else:
                await watch.wait(defaults.LOCAL_PODS_INTERVAL_S, defaults.POD_EVENTS_SETTLE_S)


def keep_tcp_fast_path(maps_dir: str, was: bool | None, asked: bool) -> tuple[bool | None, str]:
    """FAST_TCP in node_config as conntrack allows it now (the one predicate,
    conntrack.tcp_fast_path_problem()); returns what node_config holds and, while it is
    off, why. asked: TCP was asked for explicitly (--tcp-fast-path), so its being off at
    start is a warning rather than news."""
    problem = conntrack.tcp_fast_path_problem()
    want = problem is None
    why = problem or ""
    if want == was:
        return was, why
    try:
        with NodeConfigMap(maps_dir) as node_config:
            if not node_config.set_tcp_fast_path(want):
                return was, why
    except OSError as exc:
        log.warning("TCP fast path: cannot update node_config: %s", exc)
        return was, why
    if want:
        log.info("TCP fast path: on (of the flows the agent marks in conntrack)")
    elif was is None:
        log.log(logging.WARNING if asked else logging.INFO, "TCP fast path: off: %s", problem)
    else:
        log.warning("TCP fast path: off: %s", problem)
    return want, why
