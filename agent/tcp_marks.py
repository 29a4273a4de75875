"""With --tcp-fast-path: mark, as conntrack confirms them, the TCP flows between this
node's pods and other nodes' (node/flow_marks.py), so that the fast path may carry
them and conntrack keeps accepting them.

A marker that fails is opened again every LOCAL_PODS_INTERVAL_S; meanwhile new TCP
flows take the stack (unmarked), flows already marked keep the fast path.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from ipaddress import IPv4Network

from flannel_xdp import defaults
from flannel_xdp.netlink import MalformedMessage
from flannel_xdp.node.flow_marks import FlowMarker

log = logging.getLogger(__name__)


@dataclass
class TcpMarks:
    subnet: IPv4Network  # this node's pods
    network: IPv4Network  # the cluster's
    running: bool = False  # marking new flows now
    why: str = "the agent has not opened ctnetlink yet"  # while not running

    async def run(self) -> None:
        failing = False
        while True:
            try:
                marker = await asyncio.to_thread(FlowMarker.open, self.subnet, self.network)
            except OSError as exc:
                self.why = f"cannot follow conntrack (ctnetlink): {exc}"
                if not failing:
                    log.warning("TCP fast path: off: %s", self.why)
                failing = True
                await asyncio.sleep(defaults.LOCAL_PODS_INTERVAL_S)
                continue
            self.running, failing = True, False
            log.info(
                "TCP fast path: on: marking TCP flows between %s and the rest of %s "
                "(%d already there)",
                self.subnet,
                self.network,
                marker.marked,
            )
            try:
                await self._follow(marker)
            except (OSError, MalformedMessage) as exc:
                self.why = f"following conntrack failed: {exc}"
                log.warning("TCP fast path: off: %s", self.why)
                failing = True
            finally:
                self.running = False
                marker.close()
            await asyncio.sleep(defaults.LOCAL_PODS_INTERVAL_S)

    async def _follow(self, marker: FlowMarker) -> None:
        """Mark flows as their events arrive, until the socket fails (raised)."""
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            try:
                marker.on_events()
            except (OSError, MalformedMessage) as exc:
                if not failed.done():
                    failed.set_exception(exc)

        loop.add_reader(marker.fileno(), ready)
        try:
            await failed
        finally:
            loop.remove_reader(marker.fileno())
