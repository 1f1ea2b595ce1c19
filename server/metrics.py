"""Prometheus metrics of the daemon (names and labels per docs/metrics.md), read from live state at scrape time.

`Ledger` keeps the counters that outlive sessions (per-tenant busy time, ops, errors; transfer bytes);
`DaemonCollector` turns the ledger and the daemon's live devices and sessions into metric families.
Every daemon has its own CollectorRegistry, so several can run in one process (tests).
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from grpc import StatusCode
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gpupool.config import split_address
from gpupool.metrics_http import serve_metrics, stop_metrics
from gpupool.tls import TlsConfig

from .slices import LEARNED_OPS, NATIVE_OPS

if TYPE_CHECKING:
    from .daemon import Daemon
    from .front import FrontSession

BATCH_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Ledger:
    """Counters that persist after sessions close. Thread-safe; cheap enough to call per op."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.busy: dict[tuple[int, str], float] = defaultdict(float)  # (device, tenant) -> seconds
        self.ops: dict[tuple[int, str], int] = defaultdict(int)
        self.errors: dict[tuple[int, str, StatusCode], int] = defaultdict(int)  # (device, tenant, code)
        self.transfers: dict[str, int] = {"upload": 0, "download": 0}
        self.device_busy: dict[int, float] = defaultdict(float)
        self.graphs: dict[tuple[int, str, str], int] = defaultdict(int)  # (device, tenant, event)
        self.learned: dict[tuple[int, str], int] = defaultdict(int)  # (device, tenant) -> eager ops in learned runs
        self.native: dict[tuple[int, str], int] = defaultdict(int)  # (device, tenant) -> of them, run by the C++ runner
        self.slices: dict[int, SliceHistogram] = {}  # device -> its slices' durations (from its first slice on)

    def add(
        self, session: FrontSession, ops: int, errors: dict[StatusCode, int], uploaded: int, downloaded: int
    ) -> None:
        """What one slice of a session did (as its worker reported it)."""
        key = (session.device.index, session.tenant)
        with self._lock:
            if ops:
                self.ops[key] += ops
                self.learned[key] += 0  # a tenant that ran ops has a learned-run count, zero until one ran
                self.native[key] += 0
            for code, n in errors.items():
                self.errors[(session.device.index, session.tenant, code)] += n
            self.transfers["upload"] += uploaded
            self.transfers["download"] += downloaded

    def _events(self, key: tuple[int, str], events: dict[str, int]) -> None:
        """A slice's step-capture graph events (defined, rerecorded, replayed, dropped, traced), as its worker counted
        them, and its eager records run inside learned runs (`slices.LEARNED_OPS`; `NATIVE_OPS` of them in C++)."""
        for event, n in events.items():
            if event == LEARNED_OPS:
                self.learned[key] += n
            elif event == NATIVE_OPS:
                self.native[key] += n
            else:
                self.graphs[(*key, event)] += n

    def charge(self, session: FrontSession, seconds: float) -> None:
        """A slice that did nothing the daemon saw (its session closed, its worker died, the stream's end): its
        time, and its duration in the histogram."""
        self.slice_done(session, 0, _NO_ERRORS, 0, 0, None, seconds)

    def slice_done(
        self,
        session: FrontSession,
        ops: int,
        errors: dict[StatusCode, int],
        uploaded: int,
        downloaded: int,
        events: dict[str, int] | None,
        seconds: float,
    ) -> None:
        """One slice of a session, booked under one lock: what it did (`add`, and its `events`: graph events,
        learned and native ops), the `seconds` charged to its tenant and device, and the slice's duration in its
        device's histogram (gpupool_batch_duration_seconds). Every slice the daemon runs is booked once."""
        dev = session.device.index
        key = (dev, session.tenant)
        with self._lock:
            if ops:
                self.ops[key] += ops
                self.learned[key] += 0  # a tenant that ran ops has a learned-run count, zero until one ran
                self.native[key] += 0
            if errors:
                for code, n in errors.items():
                    self.errors[(dev, session.tenant, code)] += n
            if uploaded or downloaded:
                self.transfers["upload"] += uploaded
                self.transfers["download"] += downloaded
            if events:
                self._events(key, events)
            self.busy[key] += seconds
            self.device_busy[dev] += seconds
            hist = self.slices.get(dev)
            if hist is None:
                hist = self.slices[dev] = SliceHistogram()
            hist.counts[bisect_left(BATCH_BUCKETS, seconds)] += 1
            hist.sum += seconds

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "busy": dict(self.busy),
                "ops": dict(self.ops),
                "errors": dict(self.errors),
                "transfers": dict(self.transfers),
                "device_busy": dict(self.device_busy),
                "graphs": dict(self.graphs),
                "learned": dict(self.learned),
                "native": dict(self.native),
                "slices": {dev: (list(h.counts), h.sum, h.created) for dev, h in self.slices.items()},
            }


class SliceHistogram:
    """The durations of a device's slices in BATCH_BUCKETS (counts per bucket, not cumulative; the last: above
    them all), their sum and when the first was booked: what a prometheus Histogram child would hold, kept under
    the ledger's lock (a Histogram's `observe` takes two locks of its own per slice)."""

    __slots__ = ("counts", "created", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BATCH_BUCKETS) + 1)
        self.sum = 0.0
        self.created = time.time()


_NO_ERRORS: dict[StatusCode, int] = {}


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Any]:
        d = self.daemon
        host = d.host_id
        snap = d.ledger.snapshot()
        devices = {dev.index: dev for dev in d.device_list}
        ids = {i: (dev.uuid, dev.model) for i, dev in devices.items()}

        info = GaugeMetricFamily(
            "gpupool_device_info", "Devices of this host", labels=["host", "device", "UUID", "model", "fake"]
        )
        cap = GaugeMetricFamily(
            "gpupool_device_memory_capacity_bytes", "Device memory capacity", labels=["host", "device", "UUID", "model"]
        )
        used = GaugeMetricFamily(
            "gpupool_device_memory_used_bytes",
            "Device memory used by sessions",
            labels=["host", "device", "UUID", "model"],
        )
        busy = CounterMetricFamily(
            "gpupool_device_busy_seconds", "Measured execution time on the device", labels=["host", "device", "UUID"]
        )
        nsess = GaugeMetricFamily(
            "gpupool_device_sessions", "Sessions attached to the device", labels=["host", "device", "UUID"]
        )
        sessions = d.session_list()
        for i, dev in devices.items():
            uuid, model = ids[i]
            info.add_metric([host, str(i), uuid, model, str(dev.fake).lower()], 1)
            cap.add_metric([host, str(i), uuid, model], dev.capacity)
            used.add_metric([host, str(i), uuid, model], d.memory[i].used)
            busy.add_metric([host, str(i), uuid], snap["device_busy"].get(i, 0.0))
            nsess.add_metric([host, str(i), uuid], sum(1 for s in sessions if s.device.index == i))
        yield from (info, cap, used, busy, nsess)

        labels = ["host", "device", "UUID", "tenant", "lease"]
        s_used = GaugeMetricFamily("gpupool_session_memory_used_bytes", "Memory used by a session", labels=labels)
        s_limit = GaugeMetricFamily("gpupool_session_memory_limit_bytes", "Memory quota of a session", labels=labels)
        s_share = GaugeMetricFamily("gpupool_session_share", "Compute share of a session", labels=labels)
        s_graph = GaugeMetricFamily(
            "gpupool_session_graph_memory_bytes",
            "Host memory a session's captured graphs hold, estimated",
            labels=labels,
        )
        s_graph_limit = GaugeMetricFamily(
            "gpupool_session_graph_memory_limit_bytes",
            "A session's bound on its captured graphs' host memory (--max-graph-memory; 0: capture off)",
            labels=labels,
        )
        graph_limit = d.config.max_graph_memory
        for s in sessions:
            values = [host, str(s.device.index), s.device.uuid, s.tenant, s.lease_id]
            s_used.add_metric(values, s.used)
            s_limit.add_metric(values, s.quota)
            s_share.add_metric(values, s.share)
            s_graph.add_metric(values, s.graph_bytes)
            s_graph_limit.add_metric(values, graph_limit)
        yield from (s_used, s_limit, s_share, s_graph, s_graph_limit)

        tlabels = ["host", "device", "UUID", "tenant"]
        t_busy = CounterMetricFamily(
            "gpupool_tenant_busy_seconds", "Execution time charged to a tenant", labels=tlabels
        )
        t_ops = CounterMetricFamily("gpupool_tenant_ops", "Ops executed for a tenant", labels=tlabels)
        t_err = CounterMetricFamily("gpupool_tenant_errors", "Failed commands of a tenant", labels=tlabels + ["code"])
        for (i, tenant), v in snap["busy"].items():
            t_busy.add_metric([host, str(i), ids[i][0], tenant], v)
        for (i, tenant), n in snap["ops"].items():
            t_ops.add_metric([host, str(i), ids[i][0], tenant], n)
        for (i, tenant, code), n in snap["errors"].items():
            t_err.add_metric([host, str(i), ids[i][0], tenant, code.name], n)
        yield from (t_busy, t_ops, t_err)

        graphs = CounterMetricFamily(
            "gpupool_graph_events",
            "Captured-step graphs of a tenant by event: defined, rerecorded, replayed, dropped, traced",
            labels=tlabels + ["event"],
        )
        for (i, tenant, event), n in snap["graphs"].items():
            graphs.add_metric([host, str(i), ids[i][0], tenant, event], n)
        yield graphs

        for key, name, text in (
            ("learned", "gpupool_eager_learned_ops",
             "Eager ops of a tenant that its session worker ran inside learned runs of records (server/runs.py)"),
            ("native", "gpupool_eager_native_ops",
             "Of a tenant's eager ops in learned runs, those its session worker's C++ runner ran"),
        ):  # fmt: skip
            family = CounterMetricFamily(name, text, labels=tlabels)
            for (i, tenant), n in snap[key].items():
                family.add_metric([host, str(i), ids[i][0], tenant], n)
            yield family

        xfer = CounterMetricFamily(
            "gpupool_transfer_bytes", "Tensor bytes moved over the wire", labels=["host", "direction"]
        )
        for direction, n in snap["transfers"].items():
            xfer.add_metric([host, direction], n)
        yield xfer

        hist = HistogramMetricFamily(
            "gpupool_batch_duration_seconds",
            "Duration of one executed slice of a session's commands",
            labels=["host", "device"],
        )
        for i, (counts, total, created) in snap["slices"].items():
            cumulative, buckets = 0, []
            for bound, n in zip([*map(floatToGoString, BATCH_BUCKETS), "+Inf"], counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            hist.add_metric([host, str(i)], buckets, total)
            hist.add_sample("gpupool_batch_duration_seconds_created", {"host": host, "device": str(i)}, created)
        yield hist


class Metrics:
    """The registry of one daemon: the live collector (the slice duration histogram included: `Ledger.slice_done`)."""

    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(daemon))
        self._daemon = daemon  # (its revoked client certificates: a revoked scraper's is refused, `scraper_refusal`)
        self._server: Any = None
        self.port = 0

    def serve(self, address: str, tls_config: TlsConfig | None) -> int:
        """Serve /metrics on HOST:PORT (port 0 picks one) over TLS with `tls_config` (plaintext, warned about, when
        None or insecure: gpupool/metrics_http.py); returns the bound port. "0" or "" = off."""
        if address in ("", "0"):
            return 0
        host, port = split_address(address)
        server = serve_metrics(host, port, self.registry, tls_config, "the daemon", self._daemon.revoked_certs)
        self._server = server
        self.port = int(server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            stop_metrics(self._server)
            self._server = None
