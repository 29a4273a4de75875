"""Reconcile: the registry's leases -> the peers this node programs, in the subnets map
and the kernel's routes, in an order that never routes a packet into the tunnel
without a map entry saying where it goes.

The Reconciler sees the data path through two small interfaces (PeerMap, RouteTable),
so it runs against the pinned map and the kernel in the agent and against in-memory
fakes in unit tests. After every change it publishes a Status: an immutable snapshot
that the metrics thread reads while the loop goes on changing its own state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from flannel_xdp.backend import Backend
from flannel_xdp.maps.views import ApplyResult, Peer
from flannel_xdp.node.peers import Ignored, desired_peers, peer_for
from flannel_xdp.registry.base import EventKind, LeaseEvent, LeaseRevoked, Snapshot, Update
from flannel_xdp.registry.config import NetworkConfig
from flannel_xdp.registry.lease import LeaseAttrs

log = logging.getLogger(__name__)


class PeerMap(Protocol):
    """The subnets map as the reconciler uses it (maps.views.SubnetsMap)."""

    max_entries: int

    def peers(self) -> dict[IPv4Network, Peer]: ...
    def apply(self, desired: Iterable[Peer]) -> ApplyResult: ...
    def upsert(self, peer: Peer) -> None: ...
    def remove(self, subnet: IPv4Network) -> bool: ...


class RouteTable(Protocol):
    """The kernel state beside the map (node.routes.KernelRoutes): a route (and for vxlan
    a neighbour) per peer, a resolved neighbour per host-gw next hop."""

    def sync(self, peers: list[Peer]) -> None: ...
    def add(self, peer: Peer) -> None: ...
    def remove(self, subnet: IPv4Network) -> None: ...
    def forget_next_hop(self, addr: IPv4Address) -> None: ...


@dataclass(frozen=True)
class Status:
    """What the control loop has done, as of its last change (read by metrics and
    /readyz from other threads; replaced whole, never changed in place)."""

    synced: bool = False  # the first full sync has finished
    leases_by_backend: Mapping[str, int] = field(default_factory=dict)
    programmed: int = 0
    ignored: int = 0
    events: int = 0
    event_errors: int = 0
    full_syncs: int = 0
    last_sync: float = 0.0  # Unix time
    subnets_wanted: int = 0  # remote subnets the registry asks for
    capacity: int = 0  # what the subnets map holds
    capacity_exceeded: bool = False  # wanted > capacity: see Reconciler._fit
    capacity_refusals: int = 0  # syncs that could not program every wanted subnet


class Reconciler:
    def __init__(
        self,
        config: NetworkConfig,
        own: IPv4Network,
        own_attrs: LeaseAttrs,
        peer_map: PeerMap,
        routes: RouteTable,
        direct_networks: list[IPv4Network],
        observe_sync: Callable[[str, float], None] | None = None,
    ):
        self.config = config
        self.own = own
        self.own_attrs = own_attrs
        self.map = peer_map
        self.routes = routes
        self.direct_networks = direct_networks
        self.leases: dict[IPv4Network, LeaseAttrs] = {}
        self.programmed: dict[IPv4Network, Peer] = {}
        # programmed's peers by backend label, kept as it changes: a Status is published
        # after every event, and counting thousands of peers each time costs more than
        # the event itself.
        self._by_backend: Counter[str] = Counter()
        # Remote leases that peer_for refuses, by subnet (each once).
        self.ignored: dict[IPv4Network, Ignored] = {}
        self.status = Status(capacity=peer_map.max_entries)
        self._observe_sync = observe_sync or (lambda kind, seconds: None)

    # -- entry points -------------------------------------------------------------------

    async def apply(self, update: Update) -> None:
        """Apply one registry update. A LeaseEvent that cannot be applied is logged and
        counted (the next Snapshot corrects it); LeaseRevoked is raised."""
        if isinstance(update, Snapshot):
            await self.full_sync(update.leases, update.revision)
            return
        started = time.monotonic()
        try:
            await self._apply_event(update)
        except LeaseRevoked:
            raise
        except Exception:
            self._publish(event_errors=self.status.event_errors + 1)
            log.exception("applying %s %s failed", update.kind, update.subnet)
        finally:
            self._observe_sync("event", time.monotonic() - started)
            self._publish(events=self.status.events + 1, last_sync=time.time())

    async def full_sync(self, leases: dict[IPv4Network, LeaseAttrs], revision: int | str) -> None:
        started = time.monotonic()
        own = leases.get(self.own)
        if own is None or own.public_ip != self.own_attrs.public_ip:
            raise LeaseRevoked(f"Lease has been revoked: {self.own} is no longer ours")
        self.leases = dict(leases)
        want = desired_peers(leases, self.own, self.config, self.direct_networks)
        for ignored in want.ignored:
            log.warning("ignoring lease %s: %s", ignored.subnet, ignored.why)
        self.ignored = {i.subnet: i for i in want.ignored}
        have = self.map.peers()
        target = self._fit(want.peers, have, revision)
        peers = list(target.values())
        leaving = [p for s, p in have.items() if s not in target]
        # Map entries before routes, routes removed before map entries: no packet is
        # routed into the tunnel without an entry telling the program where it goes.
        if len(have) + sum(1 for s in target if s not in have) <= self.map.max_entries:
            first = self.map.apply(peers + leaving)
            await asyncio.to_thread(self.routes.sync, peers)
            second = self.map.apply(peers)  # only removals are left to do here
        else:
            # No room for the leaving and the arriving peers side by side: withdraw the
            # leaving ones (routes, then entries) before the newcomers get theirs.
            staying = [p for p in peers if p.subnet in have]
            await asyncio.to_thread(self.routes.sync, staying)
            first = self.map.apply(staying)
            second = self.map.apply(peers)
            await asyncio.to_thread(self.routes.sync, peers)
        self.programmed = target
        self._by_backend = Counter(str(p.backend) for p in target.values())
        took = time.monotonic() - started
        self._observe_sync("full", took)
        self._publish(synced=True, full_syncs=self.status.full_syncs + 1, last_sync=time.time())
        log.info(
            "synced %d peers from revision %s (%d added, %d changed, %d removed) in %.3f s",
            len(peers),
            revision,
            first.added + second.added,
            first.changed + second.changed,
            first.removed + second.removed,
            took,
        )

    # -- one event ----------------------------------------------------------------------

    async def _apply_event(self, ev: LeaseEvent) -> None:
        if ev.subnet == self.own:
            if ev.kind == EventKind.REMOVED or (
                ev.attrs and ev.attrs.public_ip != self.own_attrs.public_ip
            ):
                raise LeaseRevoked(f"Lease has been revoked: {self.own}")
            return
        got: Peer | Ignored | None = None
        if ev.kind == EventKind.ADDED and ev.attrs is not None:
            self.leases[ev.subnet] = ev.attrs
            got = peer_for(ev.subnet, ev.attrs, self.config, self.direct_networks)
        else:
            self.leases.pop(ev.subnet, None)
        if isinstance(got, Ignored):
            self.ignored[ev.subnet] = got
        else:
            self.ignored.pop(ev.subnet, None)
        old = self.programmed.get(ev.subnet)
        if self.status.capacity_exceeded or (
            isinstance(got, Peer) and old is None and len(self.programmed) >= self.map.max_entries
        ):
            # The map is full, or this peer would overfill it: decide over the whole
            # desired state (see _fit), never entry by entry.
            await self.full_sync(self.leases, ev.revision)
            return
        if isinstance(got, Peer):
            if got != old:
                self.map.upsert(got)
                await asyncio.to_thread(self.routes.add, got)
                self.programmed[ev.subnet] = got
                self._by_backend[str(got.backend)] += 1
                if old is not None:
                    self._by_backend[str(old.backend)] -= 1
                    await asyncio.to_thread(self._drop_next_hop, old)
                log.info("peer %s via %s (%s)", got.subnet, got.public_ip, got.backend)
            return
        if isinstance(got, Ignored):
            log.warning("ignoring lease %s: %s", got.subnet, got.why)
        if old is not None:
            await asyncio.to_thread(self.routes.remove, ev.subnet)
            self.map.remove(ev.subnet)
            del self.programmed[ev.subnet]
            self._by_backend[str(old.backend)] -= 1
            await asyncio.to_thread(self._drop_next_hop, old)
            log.info("peer %s removed", ev.subnet)

    def _drop_next_hop(self, gone: Peer) -> None:
        """Forget gone's next hop unless another programmed peer still uses it."""
        if gone.backend is not Backend.HOST_GW:
            return
        if all(
            p.public_ip != gone.public_ip or p.backend is not Backend.HOST_GW
            for p in self.programmed.values()
        ):
            self.routes.forget_next_hop(gone.public_ip)

    # -- capacity -----------------------------------------------------------------------

    def _fit(
        self, want: dict[IPv4Network, Peer], have: dict[IPv4Network, Peer], revision: int | str
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
        capacity = self.map.max_entries
        was = (self.status.capacity_exceeded, self.status.subnets_wanted)
        if len(want) <= capacity:
            if was[0]:
                log.warning(
                    "the %d wanted remote subnets fit the subnets map again (max_entries %d): "
                    "programming all of them",
                    len(want),
                    capacity,
                )
            self._publish(subnets_wanted=len(want), capacity_exceeded=False)
            return dict(want)
        keep = {s: p for s, p in want.items() if s in have}
        missing = sorted(s for s in want if s not in keep)
        self._publish(
            subnets_wanted=len(want),
            capacity_exceeded=True,
            capacity_refusals=self.status.capacity_refusals + 1,
        )
        if was != (True, len(want)):
            shown = ", ".join(str(s) for s in missing[:5]) + (", ..." if len(missing) > 5 else "")
            log.error(
                "subnets map full: revision %s has %d remote subnets, the map holds %d "
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

    # -- status -------------------------------------------------------------------------

    def _publish(self, **changed) -> None:
        self.status = replace(
            self.status,
            leases_by_backend=dict(+self._by_backend),
            programmed=len(self.programmed),
            ignored=len(self.ignored),
            capacity=self.map.max_entries,
            **changed,
        )
