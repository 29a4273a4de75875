"""Prometheus metrics of the agent's control plane, computed at scrape time.

The HTTP server's thread calls a function for a ControlPlane: an immutable snapshot the
agent assembles from what its loop published, so a scrape never walks a dict that the
loop is changing."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flannel_xdp.metrics.datapath import PREFIX, DataPathCollector

SYNC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def version() -> str:
    try:
        return metadata.version("flannel-xdp")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ControlPlane:
    """What the agent's control plane has done, as of one moment."""

    leases_by_backend: Mapping[str, int] = field(default_factory=dict)
    ignored: int = 0
    events: int = 0
    event_errors: int = 0
    registry_errors: int = 0
    subnets_wanted: int = 0
    capacity_refusals: int = 0
    registry_up: bool = False
    ready: bool = False
    # proto ("udp", "tcp") -> "" while it takes the fast path, else why not (the agent's
    # loader.fast_path.OffReason)
    fast_path: Mapping[str, str] = field(default_factory=dict)
    last_sync: float = 0.0  # Unix time; 0: never
    lease_expiry: float = 0.0  # Unix time
    ingress_hook: str = ""


class AgentCollector(Collector):
    def __init__(self, status: Callable[[], ControlPlane]):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        leases = GaugeMetricFamily(
            PREFIX + "leases",
            "Remote leases programmed into the data path, by backend.",
            labels=["backend"],
        )
        for backend in ("vxlan", "host-gw"):
            leases.add_metric([backend], s.leases_by_backend.get(backend, 0))
        yield leases
        yield GaugeMetricFamily(
            PREFIX + "leases_ignored",
            "Leases in the registry that this node cannot use (refused, each subnet once).",
            value=s.ignored,
        )
        yield CounterMetricFamily(
            PREFIX + "registry_events", "Lease events received from the registry.", value=s.events
        )
        yield CounterMetricFamily(
            PREFIX + "registry_errors",
            "Failed registry calls and broken watches (each retried with backoff).",
            value=s.registry_errors,
        )
        yield CounterMetricFamily(
            PREFIX + "event_errors",
            "Lease events that could not be applied.",
            value=s.event_errors,
        )
        yield GaugeMetricFamily(
            PREFIX + "subnets_wanted",
            "Remote subnets the registry asks this node to reach (compare with "
            'flannel_xdp_map_capacity{map="subnets"}).',
            value=s.subnets_wanted,
        )
        yield CounterMetricFamily(
            PREFIX + "map_capacity_exceeded",
            "Syncs that found more remote subnets than the subnets map holds (the map then "
            "keeps the peers it has and takes no new one; the agent is not ready).",
            value=s.capacity_refusals,
        )
        yield GaugeMetricFamily(
            PREFIX + "registry_up", "1 while the registry answers.", value=int(s.registry_up)
        )
        yield GaugeMetricFamily(PREFIX + "ready", "1 once ready (see /readyz).", value=int(s.ready))
        on = GaugeMetricFamily(
            PREFIX + "fast_path",
            "1 while the protocol takes the fast path (docs/fast-path.md), by proto.",
            labels=["proto"],
        )
        off = GaugeMetricFamily(
            PREFIX + "fast_path_off",
            "1 for each protocol that does not take the fast path, with why (reason).",
            labels=["proto", "reason"],
        )
        for proto, reason in s.fast_path.items():
            on.add_metric([proto], int(not reason))
            if reason:
                off.add_metric([proto, reason], 1)
        yield on
        yield off
        yield GaugeMetricFamily(
            PREFIX + "last_sync_age_seconds",
            "Seconds since the maps were last brought in line with the registry.",
            value=time.time() - s.last_sync if s.last_sync else float("nan"),
        )
        yield GaugeMetricFamily(
            PREFIX + "lease_expiry_timestamp_seconds",
            "When this node's own subnet lease expires unless renewed (Unix time).",
            value=s.lease_expiry,
        )
        info = GaugeMetricFamily(
            PREFIX + "build_info",
            "Version and kernel; always 1.",
            labels=["version", "kernel", "ingress_hook"],
        )
        info.add_metric([version(), platform.release(), s.ingress_hook], 1)
        yield info


class AgentMetrics:
    """The agent's registry: data path counters, control plane figures, sync timings."""

    def __init__(self, status: Callable[[], ControlPlane], maps_dir: str):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DataPathCollector(maps_dir))
        self.registry.register(AgentCollector(status))
        self.sync_seconds = Histogram(
            PREFIX + "map_sync_seconds",
            "Time to bring maps and routes in line with the registry (full syncs and events).",
            labelnames=["kind"],
            buckets=SYNC_BUCKETS,
            registry=self.registry,
        )

    def observe_sync(self, kind: str, seconds: float) -> None:
        self.sync_seconds.labels(kind).observe(seconds)

    def serve(self, addr: str, port: int) -> None:
        start_http_server(port, addr=addr, registry=self.registry)
