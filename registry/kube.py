"""The registry on the Kubernetes API, as flanneld's --kube-subnet-mgr.

* network config: a file (--net-config-path, the ConfigMap kube-flannel.yml mounts), the
  same JSON as etcd's <prefix>/config; SubnetLen/Min/Max mean nothing here;
* our lease: the node's podCIDR (assigned by kube-controller-manager), published with
  flanneld's annotations through the nodes/status subresource, then the condition
  NetworkUnavailable=False (reason FlannelIsUp); nothing to renew;
* the other leases: every node marked kube-subnet-manager=true, from a list and a watch
  from the list's resourceVersion; 410 Gone (the watch fell behind etcd's compaction) or a
  broken connection means a new list, handed over as a Snapshot.

The client is lightkube (asyncio, httpx); see docs/kubernetes.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

import httpx2 as httpx
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster
from lightkube.core.exceptions import ApiError
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.resources.core_v1 import Node, Pod
from lightkube.types import PatchType

from flannel_xdp.registry import kube_annotations as ka
from flannel_xdp.registry.base import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    EventKind,
    Lease,
    LeaseEvent,
    PermissionDenied,
    Registry,
    RegistryError,
    RegistryUnavailable,
    Snapshot,
    Update,
)
from flannel_xdp.registry.config import ConfigError, NetworkConfig, parse_config
from flannel_xdp.registry.lease import LeaseAttrs, LeaseError

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_NET_CONFIG_PATH = "/etc/kube-flannel/net-conf.json"
# flanneld's wait for its node and its patch: every 3 s, for up to 30 s.
PATCH_INTERVAL, PATCH_TIMEOUT = 3.0, 30.0
HEALTHY_WATCH_SECONDS = 30.0
CALL_TIMEOUT = 10.0

_UNREACHABLE = (httpx.HTTPError, OSError, asyncio.TimeoutError)


class Forbidden(PermissionDenied):
    """RBAC refused a call: the message names the verb and resource that is missing."""


class PodCidrNotAssigned(RegistryError):
    pass


@dataclass(frozen=True)
class KubeSettings:
    """flanneld's kube flags (and env) as the agent passes them."""

    api_url: str = ""
    kubeconfig_file: str = ""
    annotation_prefix: str = ka.DEFAULT_PREFIX
    net_config_path: str = DEFAULT_NET_CONFIG_PATH
    set_node_network_unavailable: bool = True
    node_name: str = ""  # NODE_NAME
    pod_name: str = ""  # POD_NAME, looked up in POD_NAMESPACE when NODE_NAME is empty
    pod_namespace: str = ""

    @classmethod
    def from_env(cls, **kw) -> KubeSettings:
        env = os.environ
        kw.setdefault("node_name", env.get("NODE_NAME", ""))
        kw.setdefault("pod_name", env.get("POD_NAME", ""))
        kw.setdefault("pod_namespace", env.get("POD_NAMESPACE", ""))
        return cls(**kw)


def kube_config(settings: KubeSettings) -> KubeConfig:
    """flanneld's clientcmd.BuildConfigFromFlags: the kubeconfig file with --kube-api-url
    as its server; only a URL: that server without credentials; neither: in-cluster."""
    try:
        if settings.kubeconfig_file:
            config = KubeConfig.from_file(settings.kubeconfig_file)
            if settings.api_url:
                ctx = config.contexts[config.current_context]
                old = config.clusters[ctx.cluster]
                fields = {f: getattr(old, f) for f in old.__struct_fields__}
                fields["server"] = settings.api_url
                config.clusters[ctx.cluster] = Cluster(**fields)
            return config
        if settings.api_url:
            return KubeConfig.from_server(settings.api_url)
        return KubeConfig.from_service_account()
    except (LightkubeConfigError, OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"no Kubernetes API configuration: {exc}") from exc


def _forbidden(exc: ApiError, what: str) -> Forbidden:
    return Forbidden(
        f"{what}: the API refused it (RBAC): {exc.status.message}; the agent's ServiceAccount "
        "needs flanneld's ClusterRole (pods get; nodes get, list, watch; nodes/status patch), "
        "see deploy/kube-flannel-xdp.yml"
    )


class KubeRegistry(Registry):
    def __init__(self, settings: KubeSettings, client: AsyncClient | None = None):
        super().__init__()
        self.settings = settings
        self.names = ka.Annotations(settings.annotation_prefix)
        self.config_source = f"file {settings.net_config_path}"
        self._client = client
        self._node_name = settings.node_name
        self._skipped = 0
        # httpx logs every request at INFO; the agent logs what they mean
        logging.getLogger("httpx2").setLevel(logging.WARNING)

    # -- plumbing -------------------------------------------------------------------------

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            self._client = AsyncClient(
                config=kube_config(self.settings),
                timeout=httpx.Timeout(CALL_TIMEOUT),
                trust_env=False,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.close()
            except Exception as exc:  # closing a broken connection may fail in many ways
                log.debug("closing the Kubernetes client: %s", exc)

    async def _call(self, what: str, coro):
        try:
            got = await coro
        except ApiError as exc:
            if exc.status.code == 403:
                raise _forbidden(exc, what) from exc
            raise RegistryError(f"{what}: {exc.status.code} {exc.status.message}") from exc
        except _UNREACHABLE as exc:
            self._up = False
            raise RegistryUnavailable(f"{what}: the API did not answer: {exc!r}") from exc
        self._up = True
        return got

    @property
    def skipped(self) -> int:
        """Nodes left out for malformed annotations, so far."""
        return self._skipped

    # -- the node -------------------------------------------------------------------------

    async def node_name(self) -> str:
        if self._node_name:
            return self._node_name
        s = self.settings
        if not (s.pod_name and s.pod_namespace):
            raise ConfigError(
                "kube subnet manager: set NODE_NAME, or POD_NAME and POD_NAMESPACE "
                "(the downward API in deploy/kube-flannel-xdp.yml does)"
            )
        pod = await self._call(
            f"get pod {s.pod_namespace}/{s.pod_name}",
            self.client.get(Pod, s.pod_name, namespace=s.pod_namespace),
        )
        self._node_name = pod.spec.nodeName
        if not self._node_name:
            raise RegistryError(f"pod {s.pod_namespace}/{s.pod_name} is not on a node yet")
        return self._node_name

    async def get_node(self) -> dict[str, Any]:
        name = await self.node_name()
        node = await self._call(f"get node {name}", self.client.get(Node, name))
        return node.to_dict()

    async def _node_when_there(self) -> dict[str, Any]:
        """The node, retried every 3 s for up to 30 s (flanneld's wait for its node)."""
        return await self._retrying(self.get_node)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """call(), again every PATCH_INTERVAL while it fails, for up to PATCH_TIMEOUT; a
        refused permission is final at once."""
        deadline = time.monotonic() + PATCH_TIMEOUT
        while True:
            try:
                return await call()
            except Forbidden:
                raise
            except RegistryError as exc:
                self._errors += 1
                if time.monotonic() >= deadline:
                    raise
                log.warning("%s; retrying in %.0f s", exc, PATCH_INTERVAL)
            await asyncio.sleep(PATCH_INTERVAL)

    async def previous_vtep_mac(self) -> str | None:
        """The VtepMAC in our node's own backend-data annotation, if any."""
        try:
            node = await self._node_when_there()
        except RegistryError as exc:
            log.warning("cannot read this node's annotations: %s", exc)
            return None
        ann = (node.get("metadata") or {}).get("annotations") or {}
        return ka.stored_vtep_mac(self.names, ann)

    async def public_ip_hint(self) -> IPv4Address | None:
        """The node-public-ip annotation (flanneld takes it as --public-ip)."""
        try:
            node = await self._node_when_there()
        except RegistryError:
            return None
        ann = (node.get("metadata") or {}).get("annotations") or {}
        return ka.node_public_ip(self.names, ann)

    # -- the Registry interface -----------------------------------------------------------

    async def network_config(self) -> NetworkConfig:
        path = self.settings.net_config_path
        backoff = BACKOFF_MIN
        while True:
            try:
                with open(path, "rb") as f:
                    text = f.read()
                break
            except FileNotFoundError:
                self._errors += 1
                log.warning("waiting for the network config: no file %s", path)
            except OSError as exc:
                raise ConfigError(f"{path}: {exc}") from exc
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
        return parse_config(text)

    async def acquire(
        self, config: NetworkConfig, attrs: LeaseAttrs, previous: IPv4Network | None
    ) -> Lease:
        """Our podCIDR (waiting while none is assigned), then flanneld's annotations and
        the NetworkUnavailable condition. previous (a subnet file) means nothing here."""
        backoff = BACKOFF_MIN
        while True:
            node = await self._node_when_there()
            try:
                subnet = ka.pod_cidr(node)
            except LeaseError as exc:
                raise ConfigError(str(exc)) from exc
            if subnet is not None:
                break
            self._errors += 1
            log.warning('node "%s" pod cidr not assigned; waiting', self._node_name)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
        if not subnet.subnet_of(config.network):
            raise ConfigError(
                f'subnet "{config.network}" specified in the flannel net config doesn\'t '
                f'contain "{subnet}" PodCIDR of the "{self._node_name}" node'
            )
        current = (node.get("metadata") or {}).get("annotations") or {}
        wanted = ka.lease_annotations(self.names, attrs, current)
        if ka.needs_patch(self.names, wanted, current):
            await self._patch_status({"metadata": {"annotations": wanted}}, "annotations")
        if self.settings.set_node_network_unavailable:
            log.info("Setting NodeNetworkUnavailable")
            try:
                await self._patch_status(ka.network_unavailable_false(), "NetworkUnavailable")
            except Forbidden:
                raise
            except RegistryError as exc:  # flanneld logs it and goes on
                log.error(
                    "Unable to set NetworkUnavailable to False for %r: %s", self._node_name, exc
                )
        else:
            log.info("Skip setting NodeNetworkUnavailable")
        public_ip = IPv4Address(wanted[self.names.public_ip])
        if public_ip != attrs.public_ip:
            log.info("Overriding public ip with '%s' from node annotation", public_ip)
        self._held = Lease(subnet, attrs, None)
        log.info("node %s: lease %s (its podCIDR)", self._node_name, subnet)
        return self._held

    async def _patch_status(self, patch: dict[str, Any], what: str) -> None:
        """A strategic-merge patch through nodes/status, every 3 s for up to 30 s."""
        name = self._node_name
        await self._retrying(
            lambda: self._call(
                f"patch nodes/status {name} ({what})",
                self.client.patch(Node.Status, name, patch, patch_type=PatchType.STRATEGIC),
            )
        )

    async def hold(self, lease: Lease) -> None:
        """Nothing expires in kube mode: hold for ever."""
        self._held = lease
        await asyncio.Event().wait()

    # -- the leases -----------------------------------------------------------------------

    def _lease_of(self, node: dict[str, Any]) -> tuple[IPv4Network, LeaseAttrs] | None:
        """node_lease(), malformed ones logged, counted and left out."""
        try:
            return ka.node_lease(self.names, node)
        except LeaseError as exc:
            self._skipped += 1
            name = (node.get("metadata") or {}).get("name", "?")
            log.warning("skipping node %s: malformed flannel annotations: %s", name, exc)
            return None

    async def _list(self) -> tuple[dict[str, tuple[IPv4Network, LeaseAttrs]], str, int]:
        skipped_before = self._skipped
        nodes = self.client.list(Node)
        found: dict[str, tuple[IPv4Network, LeaseAttrs]] = {}
        async for node in nodes:
            got = self._lease_of(node.to_dict())
            if got is not None:
                found[node.metadata.name] = got
        return found, nodes.resourceVersion, self._skipped - skipped_before

    async def _relist(self) -> tuple[dict[str, tuple[IPv4Network, LeaseAttrs]], str, int] | None:
        try:
            got = await self._call("list nodes", self._list())
        except RegistryError as exc:
            self._up = False
            self._errors += 1
            log.warning("listing nodes failed: %s", exc)
            return None
        self._up = True
        return got

    @staticmethod
    def _snapshot(known: dict[str, tuple[IPv4Network, LeaseAttrs]], rv: str, skipped: int):
        return Snapshot(dict(known.values()), rv, skipped=skipped)

    async def updates(self) -> AsyncIterator[Update]:
        """List, watch from the list's resourceVersion; on 410 Gone list again at once, on
        any other failure back off (0.1 s doubling to 5 s, starting over once a watch had
        stayed up) and list again; each list is handed over as a Snapshot."""
        backoff = BACKOFF_MIN
        listing = None
        while listing is None:
            listing = await self._relist()
            if listing is None:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        known, rv, skipped = listing
        yield self._snapshot(known, rv, skipped)
        backoff = BACKOFF_MIN
        while True:
            started = time.monotonic()
            gone = False
            try:
                async for kind, node in self.client.watch(Node, resource_version=rv):
                    self._up = True
                    rv = node.metadata.resourceVersion or rv
                    for event in self._events(known, kind, node.to_dict(), rv):
                        yield event
                raise RegistryUnavailable("the watch ended")
            except ApiError as exc:
                if exc.status.code == 410:
                    gone = True
                    log.info("watch: %s (410 Gone); listing again", exc.status.message)
                else:
                    self._errors += 1
                    log.warning("watch refused: %s %s", exc.status.code, exc.status.message)
            except (RegistryError, *_UNREACHABLE) as exc:
                self._up = False
                self._errors += 1
                if time.monotonic() - started >= HEALTHY_WATCH_SECONDS:
                    backoff = BACKOFF_MIN
                log.warning("watch broke (%r); retrying in %.1f s", exc, backoff)
            if not gone:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            listing = await self._relist()
            if listing is not None:
                known, rv, skipped = listing
                yield self._snapshot(known, rv, skipped)

    def _events(
        self,
        known: dict[str, tuple[IPv4Network, LeaseAttrs]],
        kind: str,
        node: dict[str, Any],
        rv: str,
    ) -> list[LeaseEvent]:
        """The lease events one watch event makes, updating known (node name -> lease)."""
        name = (node.get("metadata") or {}).get("name", "")
        old = known.get(name)
        new = None if kind == "DELETED" else self._lease_of(node)
        if new == old:
            return []  # nothing flannel reads changed (as flanneld's equality check)
        out = []
        if old is not None and (new is None or new[0] != old[0]):
            del known[name]
            out.append(LeaseEvent(EventKind.REMOVED, old[0], None, rv))
        if new is not None:
            known[name] = new
            out.append(LeaseEvent(EventKind.ADDED, new[0], new[1], rv))
        return out
