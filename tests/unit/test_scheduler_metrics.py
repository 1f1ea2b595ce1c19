"""Scheduler metrics follow the core's decisions: every counter, the pool gauges, one registry per instance."""

from __future__ import annotations

import time

import pytest
from gpupool.scheduler.hosts import DeviceSpec
from gpupool.scheduler.leases import Core, CoreConfig
from gpupool.scheduler.metrics import SchedulerMetrics
from gpupool.scheduler.placement import Request
from gpupool.scheduler.store import MemoryStore
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpupool.errors import InvalidArgument, ResourceExhausted

GiB = 1024**3


def samples(metrics: SchedulerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_counters_and_gauges_follow_the_core() -> None:
    metrics = SchedulerMetrics()
    core = Core(MemoryStore(), b"k" * 32, CoreConfig(host_timeout=5), metrics)
    metrics.watch(core)
    core.hosts.register(
        "a", "127.0.0.1:1", [DeviceSpec(0, "GPU-a", "T4", 16 * GiB), DeviceSpec(1, "GPU-b", "T4", 16 * GiB)]
    )
    # (smi54) device 0's free memory as its daemon measures it; device 1 not measured: no series
    core.hosts.heartbeat("a", [], {0: 0, 1: 0}, False, measured={0: (5 * GiB, {}), 1: (None, {})})
    released = core.allocate(Request(1, fraction=0.5))
    expiring = core.allocate(Request(1, fraction=1.0), ttl=1)
    lost = core.allocate(Request(1, memory_bytes=4 * GiB))
    with pytest.raises(ResourceExhausted):
        core.allocate(Request(2, fraction=1.0))
    with pytest.raises(ResourceExhausted):
        core.allocate(Request(1, fraction=1.0), wait=0.2)
    with pytest.raises(InvalidArgument):
        core.allocate(Request(0, fraction=1.0))
    s = samples(metrics)
    assert s[
        ("gpupool_pool_share_allocated", (("UUID", "GPU-a"), ("device", "0"), ("host", "a"), ("model", "T4")))
    ] in (
        0.75,
        1.0,
    )
    assert (
        sum(v for (n, _), v in s.items() if n == "gpupool_pool_memory_allocated_bytes") == 8 * GiB + 16 * GiB + 4 * GiB
    )
    assert s[("gpupool_leases", (("state", "active"),))] == 3
    assert [(labels, v) for (n, labels), v in s.items() if n == "gpupool_pool_memory_free_bytes"] == [
        ((("UUID", "GPU-a"), ("device", "0"), ("host", "a"), ("model", "T4")), 5 * GiB)
    ]
    core.release(released.lease_id)
    core.sweep(time.time() + 2)  # expires `expiring`
    core.sweep(time.time() + 10)  # host silent: `lost` is lost
    s = samples(metrics)
    for event in ("granted", "released", "expired", "lost"):
        want = 3 if event == "granted" else 1
        assert s[("gpupool_lease_events_total", (("event", event),))] == want, event
    for result, want in (("granted", 3), ("exhausted", 1), ("timeout", 1), ("invalid", 1)):
        assert s[("gpupool_allocations_total", (("result", result),))] == want, result
    assert s[("gpupool_allocation_duration_seconds_count", ())] == 6
    assert s[("gpupool_pool_hosts", (("state", "down"),))] == 1
    assert s[("gpupool_pool_devices", (("state", "down"),))] == 2
    assert not [n for (n, _) in s if n == "gpupool_pool_memory_free_bytes"]  # a down host's measure: none
    assert s[("gpupool_leases", (("state", "active"),))] == 0
    assert s[("gpupool_allocation_requests_waiting", ())] == 0
    assert lost.lease_id and expiring.lease_id


def test_each_instance_has_its_own_registry() -> None:
    one, two = SchedulerMetrics(), SchedulerMetrics()
    one.lease_event("granted")
    assert samples(two)[("gpupool_lease_events_total", (("event", "granted"),))] == 0
