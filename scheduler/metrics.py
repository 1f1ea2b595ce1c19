"""The scheduler's Prometheus metrics (names and labels fixed by docs/metrics.md), one registry per instance.

Counters and the histogram are updated as the core decides (it calls the `Events` methods); the pool
gauges are read from the live core at scrape time by a custom collector, so they can never go stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpupool.protocol import HostState, LeaseState

from .capacity import SHARE_UNITS
from .leases import Events

if TYPE_CHECKING:
    from .leases import Core

LEASE_EVENTS = ("granted", "released", "expired", "lost", "changed")
ALLOCATION_RESULTS = ("granted", "exhausted", "invalid", "timeout")
HOST_STATES = (HostState.UP, HostState.DOWN, HostState.DRAINING)


class SchedulerMetrics(Events):
    """Counters fed by the core, plus the pool collector once `watch(core)` is called."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.lease_events = Counter(
            "gpupool_lease_events_total", "Lease lifecycle events", ["event"], registry=self.registry
        )
        self.allocations = Counter(
            "gpupool_allocations_total", "Allocate requests by result", ["result"], registry=self.registry
        )
        self.duration = Histogram(
            "gpupool_allocation_duration_seconds",
            "Time from Allocate received to answered (waiting included)",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
            registry=self.registry,
        )
        for event in LEASE_EVENTS:
            self.lease_events.labels(event)
        for result in ALLOCATION_RESULTS:
            self.allocations.labels(result)

    def lease_event(self, event: str) -> None:
        self.lease_events.labels(event).inc()

    def allocation(self, result: str, seconds: float) -> None:
        self.allocations.labels(result).inc()
        self.duration.observe(max(0.0, seconds))

    def watch(self, core: Core) -> None:
        self.registry.register(PoolCollector(core))


class PoolCollector(Collector):
    """Pool gauges computed from the core's state at scrape time."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        hosts = GaugeMetricFamily("gpupool_pool_hosts", "Hosts in the pool by state", labels=["state"])
        devices = GaugeMetricFamily("gpupool_pool_devices", "Devices in the pool by host state", labels=["state"])
        dev_labels = ["host", "device", "UUID", "model"]
        capacity = GaugeMetricFamily("gpupool_pool_memory_capacity_bytes", "Memory of each device", labels=dev_labels)
        allocated = GaugeMetricFamily(
            "gpupool_pool_memory_allocated_bytes", "Memory quota leased out on each device", labels=dev_labels
        )
        share = GaugeMetricFamily(
            "gpupool_pool_share_allocated", "Compute share leased out on each device (0..1)", labels=dev_labels
        )
        free = GaugeMetricFamily(
            "gpupool_pool_memory_free_bytes",
            "Free memory of each device as its daemon last measured it (absent where not measured or its host is down)",
            labels=dev_labels,
        )
        leases = GaugeMetricFamily("gpupool_leases", "Leases by state", labels=["state"])
        waiting = GaugeMetricFamily("gpupool_allocation_requests_waiting", "Allocate requests waiting for room")
        with self.core.lock:
            host_counts = dict.fromkeys(HOST_STATES, 0)
            dev_counts = dict.fromkeys(HOST_STATES, 0)
            for h in self.core.pool.hosts.values():
                host_counts[h.state] = host_counts.get(h.state, 0) + 1
                dev_counts[h.state] = dev_counts.get(h.state, 0) + len(h.devices)
                for d in h.devices.values():
                    values = [h.host_id, str(d.index), d.uuid, d.model]
                    capacity.add_metric(values, d.capacity_bytes)
                    allocated.add_metric(values, d.allocated_bytes)
                    share.add_metric(values, d.allocated_units / SHARE_UNITS)
                    measured = h.measured_free(d)
                    if measured is not None:
                        free.add_metric(values, measured)
            active = sum(1 for x in self.core.leases.values() if x.state == LeaseState.ACTIVE)
            n_waiting = len(self.core.waiters)
        for state, n in host_counts.items():
            hosts.add_metric([state], n)
        for state, n in dev_counts.items():
            devices.add_metric([state], n)
        leases.add_metric([LeaseState.ACTIVE.value], active)
        waiting.add_metric([], n_waiting)
        yield from (hosts, devices, capacity, allocated, share, free, leases, waiting)
