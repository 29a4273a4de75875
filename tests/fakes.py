"""In-memory stand-ins for the data path's two sides, for the reconciler's unit tests:
the subnets map (agent.reconcile.PeerMap) and the kernel's routes (RouteTable)."""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from flannel_xdp.maps.views import ApplyResult, Peer


class FakeSubnetsMap:
    """The pinned subnets map's interface, in memory."""

    def __init__(self, max_entries: int = 16384):
        self.max_entries = max_entries
        self.entries: dict[IPv4Network, Peer] = {}

    def peers(self) -> dict[IPv4Network, Peer]:
        return dict(self.entries)

    def apply(self, desired: Iterable[Peer]) -> ApplyResult:
        want = {p.subnet: p for p in desired}
        added = sum(1 for s in want if s not in self.entries)
        changed = sum(1 for s, p in want.items() if s in self.entries and self.entries[s] != p)
        removed = sum(1 for s in self.entries if s not in want)
        self.entries = want
        return ApplyResult(added=added, changed=changed, removed=removed)

    def upsert(self, peer: Peer) -> None:
        self.entries[peer.subnet] = peer

    def remove(self, subnet: IPv4Network) -> bool:
        return self.entries.pop(subnet, None) is not None


class FakeRoutes:
    """The kernel's routes, recorded as (operation, argument) in calls."""

    def __init__(self):
        self.calls: list[tuple[str, object]] = []
        self.routes: set[IPv4Network] = set()

    def sync(self, peers: list[Peer]) -> None:
        self.calls.append(("sync", [p.subnet for p in peers]))
        self.routes = {p.subnet for p in peers}

    def add(self, peer: Peer) -> None:
        self.calls.append(("add", peer.subnet))
        self.routes.add(peer.subnet)

    def remove(self, subnet: IPv4Network) -> None:
        self.calls.append(("remove", subnet))
        self.routes.discard(subnet)

    def forget_next_hop(self, addr: IPv4Address) -> None:
        self.calls.append(("forget", addr))
