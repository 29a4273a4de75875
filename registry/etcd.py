"""The subnet registry on etcd v3, as flanneld uses it.

Layout under the prefix (default /coreos.com/network): ``config`` holds the
network config, ``subnets/<net>-<len>`` one lease per node. A lease key is
written with an etcd lease (TTL), created only if absent (a transaction on
create_revision == 0) so that two nodes can never own one subnet.

Several endpoints may be given: every call goes to the current one and, when
it cannot be reached, moves on to the next (wrapping around) before failing
with RegistryUnavailable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import TypeVar
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions
import grpc

from flannel_xdp.registry import acquire as acquisition
from flannel_xdp.registry.base import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    ConfigMissing,
    EventKind,
    Lease,
    LeaseEvent,
    Registry,
    RegistryError,
    RegistryUnavailable,
    Snapshot,
    Update,
)
from flannel_xdp.registry.config import ConfigError, NetworkConfig, parse_config
from flannel_xdp.registry.lease import LeaseAttrs, LeaseError, parse_subnet_key, subnet_key_name

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PREFIX = "/coreos.com/network"
DEFAULT_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"
CALL_TIMEOUT = 5.0
# etcd's clientv3.WithRequireLeader: fail instead of hanging on a member without a leader.
REQUIRE_LEADER = (("hasleader", "true"),)
# gRPC shares one subchannel per address among all channels, with its reconnect backoff
# (growing to 120 s): after an outage, a fresh client kept failing with the old error for
# up to that long although etcd was back. Each client gets a subchannel of its own, and
# gRPC's own backoff stays within the agent's (which sets the pace of the retries).
CHANNEL_OPTIONS = {
    "grpc.use_local_subchannel_pool": 1,
    "grpc.max_reconnect_backoff_ms": 5000,
}

# flanneld's lease: 24 h, renewed an hour (--subnet-lease-renew-margin) before it ends;
# a failed renewal is retried every minute.
LEASE_TTL = 24 * 3600
RENEW_MARGIN = 60 * 60.0
RENEW_RETRY = 60.0
# A watch that stayed up this long means the registry had recovered: its next failure
# starts the backoff over (a watch rarely ends cleanly, so success alone cannot reset it).
HEALTHY_WATCH_SECONDS = 30.0
# A watch on a hung member waits for ever: a cheap read beside it notices.
PROBE_INTERVAL = 1.0

_UNREACHABLE = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.WatchTimeoutError,
    aetcd.exceptions.InternalError,
    asyncio.TimeoutError,
    grpc.RpcError,
    OSError,
)


class Compacted(RegistryError):
    """The watch start revision was compacted away: list again and diff."""

    def __init__(self, revision: int):
        super().__init__(f"revision {revision} has been compacted")
        self.revision = revision


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool
    unix_path: str | None = None  # unix:///path: reachable from any network namespace

    @property
    def target(self) -> str:
        return f"unix://{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        if self.unix_path:
            return f"unix://{self.unix_path}"
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


def parse_endpoints(text: str) -> list[Endpoint]:
    """'http://127.0.0.1:2379,https://[::1]:2379,unix:///run/etcd.sock' -> endpoints."""
    out: list[Endpoint] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item.startswith("unix://"):
            path = item.removeprefix("unix://")
            if not path.startswith("/"):
                raise ValueError(f"etcd endpoint {item!r}: expected unix:///absolute/path")
            out.append(Endpoint("", 0, False, unix_path=path))
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"etcd endpoint {item!r}: expected http(s)://host:port")
        try:
            port = url.port or 2379
        except ValueError as exc:
            raise ValueError(f"etcd endpoint {item!r}: {exc}") from exc
        out.append(Endpoint(url.hostname, port, url.scheme == "https"))
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


@dataclass(frozen=True)
class TlsFiles:
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.cafile),
            private_key=read(self.keyfile),
            certificate_chain=read(self.certfile),
        )


class _Client(aetcd.Client):
    """aetcd's client, with TLS: aetcd 1.0 only makes insecure channels."""

    def __init__(self, endpoint: Endpoint, tls: TlsFiles | None, **kwargs):
        super().__init__(host=endpoint.host, port=endpoint.port, **kwargs)
        self._target = endpoint.target
        self._plain = not endpoint.tls and endpoint.unix_path is None
        self._credentials = (tls or TlsFiles()).credentials() if endpoint.tls else None
        self.metadata = REQUIRE_LEADER

    async def connect(self) -> None:
        if self._plain:
            return await super().connect()
        if self._connected.is_set():
            return None
        # aetcd's set-up, on a channel it cannot make itself (TLS, unix socket).
        from aetcd import rpc, watcher

        options = self._options.items()
        if self._credentials is not None:
            self.channel = grpc.aio.secure_channel(self._target, self._credentials, options)
        else:
            self.channel = grpc.aio.insecure_channel(self._target, options)
        if self._username is not None and self._password is not None:
            auth = rpc.AuthStub(self.channel)
            resp = await auth.Authenticate(
                rpc.AuthenticateRequest(name=self._username, password=self._password),
                timeout=self._timeout,
            )
            self.metadata = (*REQUIRE_LEADER, ("token", resp.token))
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()
        return None


@dataclass(frozen=True)
class Listing:
    leases: dict[IPv4Network, LeaseAttrs]
    revision: int
    skipped: list[str]  # keys whose value was malformed


class EtcdRegistry(Registry):
    def __init__(
        self,
        endpoints: list[Endpoint],
        prefix: str = DEFAULT_PREFIX,
        tls: TlsFiles | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = CALL_TIMEOUT,
        lease_ttl: int = LEASE_TTL,
        renew_margin: float = RENEW_MARGIN,
    ):
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        super().__init__()
        self.endpoints = endpoints
        self.prefix = prefix.rstrip("/")
        self.config_source = f"etcd {self.prefix}/config"
        self.lease_ttl = lease_ttl
        self.renew_margin = renew_margin
        self._tls = tls
        self._auth = {"username": username, "password": password} if username else {}
        self._timeout = timeout
        self._current = 0
        self._client: _Client | None = None

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self._current]

    def _key(self, *parts: str) -> bytes:
        return "/".join((self.prefix, *parts)).encode()

    @property
    def subnets_prefix(self) -> bytes:
        return self._key("subnets", "")

    def subnet_key(self, subnet: IPv4Network) -> bytes:
        return self._key("subnets", subnet_key_name(subnet))

    async def _client_now(self) -> _Client:
        if self._client is None:
            self._client = _Client(
                self.endpoint,
                self._tls,
                timeout=self._timeout,
                options=dict(CHANNEL_OPTIONS),
                **self._auth,
            )
        return self._client

    async def _drop_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.close()
            except Exception as exc:  # closing a broken channel may fail in many ways
                log.debug("closing etcd client: %s", exc)

    async def _call(self, op: Callable[[_Client], Awaitable[T]], what: str) -> T:
        """Run op on the current endpoint, failing over through all of them once."""
        last: BaseException | None = None
        for _ in range(len(self.endpoints)):
            client = await self._client_now()
            try:
                return await asyncio.wait_for(op(client), self._timeout)
            except _UNREACHABLE as exc:
                last = exc
                log.warning(
                    "etcd %s: %s failed (%s); trying the next endpoint",
                    self.endpoint,
                    what,
                    type(exc).__name__,
                )
                await self._drop_client()
                self._current = (self._current + 1) % len(self.endpoints)
        raise RegistryUnavailable(
            f"{what}: no etcd endpoint answered ({', '.join(map(str, self.endpoints))}): {last}"
        )

    async def close(self) -> None:
        await self._drop_client()

    # -- config ---------------------------------------------------------------------------

    async def get_config(self) -> NetworkConfig:
        key = self._key("config")
        got = await self._call(lambda c: c.get(key), "read the network config")
        if got is None:
            raise ConfigMissing(f"no network config at {key.decode()} in etcd")
        try:
            return parse_config(got.value)
        except ConfigError as exc:  # name the etcd key too: the prefix is a flag
            raise ConfigError(f"{key.decode()}: {exc}") from exc

    # -- leases ---------------------------------------------------------------------------

    async def list_leases(self) -> Listing:
        prefix = self.subnets_prefix
        rng = await self._call(lambda c: c.get_prefix(prefix), "list leases")
        leases: dict[IPv4Network, LeaseAttrs] = {}
        skipped: list[str] = []
        for kv in rng:
            key = kv.key.decode(errors="replace")
            try:
                leases[parse_subnet_key(key)] = LeaseAttrs.from_json(kv.value)
            except LeaseError as exc:
                log.warning("skipping malformed lease %s: %s", key, exc)
                skipped.append(key)
        return Listing(leases=leases, revision=rng.header.revision, skipped=skipped)

    async def get_lease(self, subnet: IPv4Network) -> tuple[LeaseAttrs, int] | None:
        """The lease of subnet and its etcd lease id, or None."""
        key = self.subnet_key(subnet)
        got = await self._call(lambda c: c.get(key), f"read lease {subnet}")
        if got is None:
            return None
        return LeaseAttrs.from_json(got.value), got.lease

    async def create_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int) -> bool:
        """Create the lease only if nobody holds subnet; True when it is ours now."""
        key, value = self.subnet_key(subnet), attrs.to_json().encode()

        async def op(c: _Client) -> bool:
            grant = await c.lease(ttl)
            ok, _ = await c.transaction(
                compare=[c.transactions.create(key) == 0],
                success=[c.transactions.put(key, value, lease=grant)],
                failure=[],
            )
            if not ok:
                await grant.revoke()
            return ok

        return await self._call(op, f"create lease {subnet}")

    async def renew_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int) -> None:
        """Put our lease again under a fresh etcd lease, as flanneld renews."""
        key, value = self.subnet_key(subnet), attrs.to_json().encode()

        async def op(c: _Client) -> None:
            grant = await c.lease(ttl)
            await c.put(key, value, lease=grant)

        await self._call(op, f"renew lease {subnet}")

    async def delete_lease(self, subnet: IPv4Network) -> None:
        key = self.subnet_key(subnet)
        await self._call(lambda c: c.delete(key), f"delete lease {subnet}")

    async def watch_leases(self, start_revision: int) -> AsyncIterator[LeaseEvent]:
        """Lease events from start_revision on. Raises Compacted, RegistryUnavailable."""
        prefix = self.subnets_prefix
        client = await self._client_now()
        try:
            watch = await asyncio.wait_for(
                client.watch_prefix(prefix, start_revision=start_revision), self._timeout
            )
            async for ev in watch:
                event = self._event(ev)
                if event is not None:
                    yield event
        except aetcd.exceptions.RevisionCompactedError as exc:
            raise Compacted(getattr(exc, "compacted_revision", start_revision)) from exc
        except _UNREACHABLE as exc:
            await self._drop_client()
            self._current = (self._current + 1) % len(self.endpoints)
            raise RegistryUnavailable(f"watch on {self.endpoint} broke: {exc}") from exc

    def _event(self, ev) -> LeaseEvent | None:
        key = ev.kv.key.decode(errors="replace")
        try:
            subnet = parse_subnet_key(key)
        except LeaseError as exc:
            log.warning("ignoring event on %s: %s", key, exc)
            return None
        revision = ev.kv.mod_revision
        if ev.kind == "DELETE":
            return LeaseEvent(EventKind.REMOVED, subnet, None, revision)
        try:
            attrs = LeaseAttrs.from_json(ev.kv.value)
        except LeaseError as exc:
            log.warning("skipping malformed lease %s: %s", key, exc)
            return None
        return LeaseEvent(EventKind.ADDED, subnet, attrs, revision)

    # -- the Registry interface -----------------------------------------------------------

    async def network_config(self) -> NetworkConfig:
        backoff = BACKOFF_MIN
        while True:
            try:
                config = await self.get_config()
                self._up = True
                return config
            except (RegistryUnavailable, ConfigMissing) as exc:
                self._errors += 1
                log.warning("waiting for the network config: %s", exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def acquire(
        self, config: NetworkConfig, attrs: LeaseAttrs, previous: IPv4Network | None
    ) -> Lease:
        subnet = await acquisition.acquire(self, config, attrs, self.lease_ttl, previous=previous)
        self._held = Lease(subnet, attrs, time.time() + self.lease_ttl)
        return self._held

    async def hold(self, lease: Lease) -> None:
        self._held = lease
        while True:
            expiry = self._held.expiry or time.time()
            await asyncio.sleep(max(expiry - time.time() - self.renew_margin, 1.0))
            try:
                await self.renew_lease(lease.subnet, lease.attrs, self.lease_ttl)
            except RegistryError as exc:
                self._errors += 1
                log.warning(
                    "renewing lease %s failed (%s); retrying in %.0f s",
                    lease.subnet,
                    exc,
                    RENEW_RETRY,
                )
                await asyncio.sleep(RENEW_RETRY)
                continue
            self._held = Lease(lease.subnet, lease.attrs, time.time() + self.lease_ttl)
            log.info("renewed lease %s", lease.subnet)

    async def updates(self) -> AsyncIterator[Update]:
        """List, then watch from the listing's revision; after a compaction list again;
        after a broken watch or a failed probe back off (0.1 s doubling to 5 s, starting
        over once a watch had stayed up) and list again."""
        listing = await self._listing_when_up()
        yield listing
        revision = int(listing.revision)
        backoff = BACKOFF_MIN
        while True:
            started = time.monotonic()
            try:
                async for event in self._watch_with_probe(revision + 1):
                    revision = int(event.revision)
                    yield event
            except Compacted as exc:
                log.warning("watch: %s; listing again", exc)
                relisted = await self._relist()
                if relisted is not None:
                    revision = int(relisted.revision)
                    yield relisted
                    continue
            except RegistryError as exc:
                self._up = False
                self._errors += 1
                if time.monotonic() - started >= HEALTHY_WATCH_SECONDS:
                    backoff = BACKOFF_MIN
                log.warning("registry unreachable (%s); retrying in %.1f s", exc, backoff)
            await self._sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            relisted = await self._relist()
            if relisted is not None:
                revision = int(relisted.revision)
                yield relisted

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _listing_when_up(self) -> Snapshot:
        backoff = BACKOFF_MIN
        while True:
            got = await self._relist()
            if got is not None:
                return got
            await self._sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _relist(self) -> Snapshot | None:
        try:
            listing = await self.list_leases()
        except RegistryError as exc:
            self._up = False
            self._errors += 1
            log.debug("listing leases failed: %s", exc)
            return None
        self._up = True
        return Snapshot(listing.leases, listing.revision, skipped=len(listing.skipped))

    async def _watch_with_probe(self, start_revision: int) -> AsyncIterator[LeaseEvent]:
        """watch_leases() until it or the probe beside it fails (RegistryError)."""
        queue: asyncio.Queue[LeaseEvent | BaseException] = asyncio.Queue()

        async def consume() -> None:
            try:
                async for event in self.watch_leases(start_revision):
                    queue.put_nowait(event)
                queue.put_nowait(RegistryUnavailable("the watch ended"))
            except BaseException as exc:  # handed to the consumer, who re-raises it
                queue.put_nowait(exc)

        async def probe() -> None:
            while True:
                await asyncio.sleep(PROBE_INTERVAL)
                try:
                    await self.get_config()
                    self._up = True
                except (RegistryError, ConfigError) as exc:
                    queue.put_nowait(RegistryUnavailable(f"probe: {exc}"))
                    return

        tasks = [asyncio.create_task(consume()), asyncio.create_task(probe())]
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in tasks:
                task.cancel()
