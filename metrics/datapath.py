"""Prometheus metrics of the BPF data path, read from the pinned maps at scrape time.

No polling loop: every scrape opens the pinned counter maps, sums the per-CPU
values and closes them again, so the figures are exactly what the programs
counted at that moment. Names: prefix flannel_xdp_, counters end in _total,
labels backend / direction / reason (bpf/types.h is where they come from).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flannel_xdp.maps import layout
from flannel_xdp.maps.libbpf import BpfError
from flannel_xdp.maps.views import LayoutMismatch, ReasonsMap, SubnetsMap, TrafficMap

log = logging.getLogger(__name__)

PREFIX = "flannel_xdp_"
# Unclassified underlay traffic carries backend "none" in the maps.
_CLASSIFIED = {str(b) for b in layout.BACKEND_CODES}


class DataPathCollector(Collector):
    def __init__(self, maps_dir: str):
        self.maps_dir = maps_dir

    def describe(self) -> list[Metric]:
        # Metric names without reading maps: lets the registry check for clashes at start.
        return list(self._families())

    @staticmethod
    def _families() -> Iterator[Metric]:
        yield CounterMetricFamily(
            PREFIX + "packets",
            "Packets the BPF programs sent on their way, by backend and direction "
            "(encap, decap: vxlan; forward, deliver: host-gw).",
            labels=["backend", "direction"],
        )
        yield CounterMetricFamily(
            PREFIX + "bytes",
            "Bytes of those packets (the inner Ethernet frame).",
            labels=["backend", "direction"],
        )
        yield CounterMetricFamily(
            PREFIX + "drops",
            "Packets the BPF programs dropped, by backend and reason.",
            labels=["backend", "reason"],
        )
        yield CounterMetricFamily(
            PREFIX + "passed",
            "Underlay packets left to the kernel stack untouched (not ours), by reason.",
            labels=["reason"],
        )
        yield GaugeMetricFamily(PREFIX + "map_entries", "Entries in a BPF map.", labels=["map"])
        yield GaugeMetricFamily(
            PREFIX + "map_capacity", "Capacity (max_entries) of a BPF map.", labels=["map"]
        )
        yield GaugeMetricFamily(
            PREFIX + "datapath_up", "1 when the pinned maps could be read at this scrape."
        )

    def collect(self) -> Iterator[Metric]:
        packets, nbytes, drops, passed, entries, capacity, up = self._families()
        try:
            with TrafficMap(self.maps_dir) as traffic:
                for (backend, direction), (p, b) in traffic.by_label().items():
                    if backend in _CLASSIFIED:
                        packets.add_metric([backend, direction], p)
                        nbytes.add_metric([backend, direction], b)
            with ReasonsMap(self.maps_dir) as reasons:
                for (backend, name), (p, _) in reasons.by_label().items():
                    label = layout.reason_label(layout.Reason[name])
                    if layout.reason_verdict(layout.Reason[name]) == "drop":
                        drops.add_metric([backend, label], p)
                    elif backend == "none":
                        passed.add_metric([label], p)
            with SubnetsMap(self.maps_dir) as subnets:
                entries.add_metric(["subnets"], sum(1 for _ in subnets.iter_keys()))
                capacity.add_metric(["subnets"], subnets.max_entries)
            up.add_metric([], 1)
        except (BpfError, OSError, LayoutMismatch) as exc:
            log.warning("cannot read the data path maps under %s: %s", self.maps_dir, exc)
            up.add_metric([], 0)
            yield up
            return
        yield from (packets, nbytes, drops, passed, entries, capacity, up)
