"""The registry seam: what the agent needs from wherever flannel keeps its leases.

As flannel's subnet.Manager, one interface with one implementation per store (etcd
today, the Kubernetes API next). The agent's control loop sees only this: the network
config, its own lease taken and held, and one stream of updates about the other
leases. Everything about keeping that stream true (watch, probe, reconnect with
backoff, listing again after a compaction or a resync) belongs to the implementation.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network

from flannel_xdp.registry.config import NetworkConfig
from flannel_xdp.registry.lease import LeaseAttrs

# How a registry paces its retries: from the first failure up to the ceiling.
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0


class RegistryError(RuntimeError):
    pass


class RegistryUnavailable(RegistryError):
    """The registry did not answer."""


class ConfigMissing(RegistryError):
    """The registry answers but holds no network config (yet)."""


class LeaseRevoked(RegistryError):
    """Our own lease was deleted or taken over: flanneld logs this and exits."""


class NoSubnetAvailable(RegistryError):
    pass


class PermissionDenied(RegistryError):
    """The store refused a call for want of a permission (the message names it)."""


class EventKind(StrEnum):
    ADDED = "added"  # new or changed
    REMOVED = "removed"


@dataclass(frozen=True)
class LeaseEvent:
    """One lease added, changed or removed."""

    kind: EventKind
    subnet: IPv4Network
    attrs: LeaseAttrs | None  # None for REMOVED
    revision: int | str  # the store's position, for logs


@dataclass(frozen=True)
class Snapshot:
    """Every lease the registry holds: the first update of a stream, and the one after
    the registry had to list again (the watch lost its place, or a periodic resync).
    Subnets it does not name are gone; the consumer diffs it against what it has."""

    leases: dict[IPv4Network, LeaseAttrs]
    revision: int | str
    skipped: int = 0  # malformed leases left out (logged by the registry)


Update = Snapshot | LeaseEvent


@dataclass(frozen=True)
class Lease:
    """This node's own lease as the registry granted it."""

    subnet: IPv4Network
    attrs: LeaseAttrs
    expiry: float | None  # Unix time; None where leases do not expire (Kubernetes)


class Registry(abc.ABC):
    """One store of flannel's network config and subnet leases."""

    #: for logs and errors: where the network config lives ("etcd /coreos.com/network/config")
    config_source: str = ""

    def __init__(self) -> None:
        # Set by the implementations' calls; read by readiness and metrics from other threads.
        self._up = False
        self._errors = 0
        self._held: Lease | None = None

    @property
    def up(self) -> bool:
        """True while the registry answers (readiness and flannel_xdp_registry_up)."""
        return self._up

    @property
    def errors(self) -> int:
        """Failed calls and broken watches so far (each retried with backoff)."""
        return self._errors

    @abc.abstractmethod
    async def network_config(self) -> NetworkConfig:
        """The network config, waiting (with backoff) while it is missing or the registry
        is down; raises ConfigError for one that is there but invalid."""

    @abc.abstractmethod
    async def acquire(
        self, config: NetworkConfig, attrs: LeaseAttrs, previous: IPv4Network | None
    ) -> Lease:
        """Take this node's lease, publishing attrs (flanneld's order of preference;
        previous: the subnet of an existing subnet file). Raises NoSubnetAvailable."""

    @abc.abstractmethod
    async def hold(self, lease: Lease) -> None:
        """Keep our lease for as long as the caller runs this (renewing where leases
        expire); returns never. Leases held (renewed) are reported through held()."""

    @abc.abstractmethod
    def updates(self) -> AsyncIterator[Update]:
        """The other leases, for ever: a Snapshot first, then LeaseEvents, and a Snapshot
        again whenever the registry had to list again. Our own lease is included, so
        that the consumer notices when it is revoked."""

    def held(self) -> Lease | None:
        """Our lease as last granted or renewed."""
        return self._held

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def previous_vtep_mac(self) -> str | None:
        """The VtepMAC this node published before, where the registry keeps it apart from
        the lease (Kubernetes: its backend-data annotation); None: the tunnel device's."""
        return None

    async def public_ip_hint(self) -> IPv4Address | None:
        """A public IP the registry holds for this node (Kubernetes: node-public-ip)."""
        return None
