"""The daemon's ledger books each slice under one lock (`Ledger.slice_done`): the same counts as booking its parts
call by call, and the slice-duration histogram exactly as a prometheus Histogram would expose it."""

from __future__ import annotations

import time

from gpupool.server.daemon import Daemon, DaemonConfig
from gpupool.server.front import FrontSession
from gpupool.server.metrics import BATCH_BUCKETS, Ledger
from gpupool.server.slices import LEARNED_OPS, NATIVE_OPS
from grpc import StatusCode
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gpupool.tokens import TokenClaims

# on and between the bounds, zero, and past the last bound (the +Inf bucket)
DURATIONS = [0.0, 0.0001, 0.00011, 0.0004, 0.003, 0.005, 0.2, 2.5, 7.0]


def _session(daemon: Daemon, tenant: str) -> FrontSession:
    claims = TokenClaims("lease", "h", 0, 0, 1.0, time.time() + 60, tenant)
    return FrontSession("s", 1, claims, daemon.device_list[0], 1 << 20, tenant)


def test_a_slice_booked_at_once_counts_as_booked_call_by_call() -> None:
    d = Daemon(DaemonConfig(fake_gpus=1, host_id="h", metrics_listen=""))  # not started: no threads
    s = _session(d, "acme")
    once, by_call = Ledger(), Ledger()
    events = {"replayed": 1, LEARNED_OPS: 3, NATIVE_OPS: 2}
    errors = {StatusCode.INVALID_ARGUMENT: 1}
    for k, seconds in enumerate(DURATIONS):
        once.slice_done(s, k, errors if k % 2 else {}, 10 * k, k, events if k % 3 else {}, seconds)
        by_call.add(s, k, errors if k % 2 else {}, 10 * k, k)
        by_call.charge(s, seconds)
    a, b = once.snapshot(), by_call.snapshot()
    assert a.pop("slices")[0][:2] == b.pop("slices")[0][:2]  # bucket counts and sum (not the creation time)
    with_events = sum(1 for k in range(len(DURATIONS)) if k % 3)
    assert a.pop("graphs") == {(0, "acme", "replayed"): with_events} and not b.pop("graphs")
    assert a.pop("learned") == {(0, "acme"): 3 * with_events} and b.pop("learned") == {(0, "acme"): 0}
    assert a.pop("native") == {(0, "acme"): 2 * with_events} and b.pop("native") == {(0, "acme"): 0}
    assert a == b
    assert a["ops"] == {(0, "acme"): sum(range(len(DURATIONS)))} and a["busy"] == {(0, "acme"): sum(DURATIONS)}


def test_the_slice_histogram_is_exposed_as_a_prometheus_histogram_would_be() -> None:
    d = Daemon(DaemonConfig(fake_gpus=1, host_id="h", metrics_listen=""))
    s = _session(d, "acme")
    reference = CollectorRegistry()
    hist = Histogram(
        "gpupool_batch_duration_seconds",
        "Duration of one executed slice of a session's commands",
        ["host", "device"],
        registry=reference,
        buckets=BATCH_BUCKETS,
    )
    assert "gpupool_batch_duration_seconds_count" not in generate_latest(d.metrics.registry).decode()  # no slice yet
    for seconds in DURATIONS:
        d.ledger.slice_done(s, 1, {}, 0, 0, None, seconds)
        hist.labels("h", "0").observe(seconds)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [x for x in text.splitlines() if x.startswith("gpupool_batch_duration_seconds")]

    ours, theirs = lines(d.metrics.registry), lines(reference)
    assert len(ours) == len(BATCH_BUCKETS) + 4  # the buckets, +Inf, count, sum, created
    created = [x for x in ours if "_created" in x]
    assert [x for x in ours if x not in created] == [x for x in theirs if "_created" not in x]
    assert created[0].startswith('gpupool_batch_duration_seconds_created{device="0",host="h"} ')
