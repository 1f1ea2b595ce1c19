"""gpupool/callguard.py's guard thread, through a real gRPC server on loopback: a call that arrives while the guard
sleeps toward a later deadline (a slow call's `seconds` bound) is still looked at after `grace`. Round 37 (fin37):
the thread was woken only when no call was due at all, so one silent call that had turned slow put it to sleep for
its whole `seconds` bound (10 s in the scheduler and daemons), and silent calls opened meanwhile were neither capped
nor cancelled: a source held every worker until then, and again each time, keeping 8 slow calls alive."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from scheduler_fixtures import wait_until

from gpupool.callguard import RequestGuard

CHECK = "/grpc.health.v1.Health/Check"


def _never(stop: threading.Event) -> Iterator[bytes]:
    """A request stream that sends no message: the call's headers arrive, its one request never does."""
    stop.wait()
    yield from ()


def test_calls_opened_while_a_slow_call_waits_are_capped_after_grace() -> None:
    guard = RequestGuard(seconds=120.0, per_source=2, total=4, grace=0.25)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), interceptors=[guard])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    raw = channel.stream_unary(CHECK, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        first = raw.future(_never(stop))
        wait_until(lambda: len(guard._slow) == 1, timeout=30, what="the first silent call to turn slow")
        later = [raw.future(_never(stop)) for _ in range(6)]
        # 2 of the source's slow calls are left, the others cancelled as they turn slow (a8e633c: none of them
        # before the first call's 120 s bound)
        wait_until(lambda: sum(f.done() for f in [first, *later]) >= 5, timeout=60, what="the cap")
        assert all(f.exception().code() == grpc.StatusCode.CANCELLED for f in [first, *later] if f.done())
        stub = health_pb2_grpc.HealthStub(channel)  # an honest call is served meanwhile
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop.set()
        channel.close()
        server.stop(grace=0)
