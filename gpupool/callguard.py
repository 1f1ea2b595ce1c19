"""Unary calls whose request never comes: how long, and how many from one source, they may hold a server's threads.

gRPC Python hands a unary call to a worker thread as soon as its headers arrive; the worker then waits, without a
limit, for the call's one request message (grpc/_server.py `_unary_request`), before any handler or interceptor of
ours sees the call. A client that sends the headers of a call and never its message (an HTTP/2 stream left open; a
gRPC client's `stream_unary` call to a unary method whose request iterator never yields) so holds a worker for as
long as its connection lives. Until round 37 150 such calls from one client, no credential needed (health Check),
held every one of the scheduler's 64 workers and its 128 calls in progress: every tenant's Allocate and Renew, and
every host's heartbeat (so, after `--host-timeout`, every lease) was refused RESOURCE_EXHAUSTED or waited; two of
them held both threads of a `--health-listen` port and starved the probes.

`RequestGuard` serves each unary method as a request stream of one message instead (the worker reaches our code
before the message): a call waits for its request at most `REQUEST_SECONDS` (then it is cancelled), and the calls
waiting are capped as the side port's and the collective hub's unauthenticated connections are (`peers.push_out`):
past `PER_SOURCE` of one source address (an IPv4 address, an IPv6 /64) a new call cancels that source's oldest
waiting call, past `TOTAL` in all the oldest of the source waiting most. A newcomer is never refused: an honest
client sends its request with the headers, so its calls wait microseconds and are never the oldest one waiting.
Put it first among a server's interceptors (it serves the handler the others made).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from gpupool.peers import grpc_source, push_out

REQUEST_SECONDS = 10.0  # how long a unary call may wait for its request message
PER_SOURCE = 8  # calls of one source address waiting for their request message at once
TOTAL = 32  # calls waiting for their request message at once, in all


class _Watchdog:
    """Cancels the calls whose request is late: one thread for the process, started at the first call."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, grpc.ServicerContext] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, n: int, context: grpc.ServicerContext, seconds: float) -> None:
        with self._cond:
            self._armed[n] = context
            heapq.heappush(self._heap, (time.monotonic() + seconds, n))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="request-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == n:  # due before whatever the thread sleeps for
                self._cond.notify()

    def disarm(self, n: int) -> None:
        with self._cond:
            self._armed.pop(n, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)  # disarmed
                if not self._heap:
                    self._cond.wait()
                    continue
                due, n = self._heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                late = self._armed.pop(n)
            late.cancel()  # wakes the worker waiting for the message: its request stream ends


_WATCHDOG = _Watchdog()
_NUMBERS = itertools.count()  # calls' numbers, one sequence for every guard of the process (one watchdog)


class _Waiting:
    """The calls waiting for their request message, in arrival order: (source, context) by call number."""

    def __init__(self, per_source: int, total: int) -> None:
        self.per_source = per_source
        self.total = total
        self._calls: dict[int, tuple[str, grpc.ServicerContext]] = {}
        self._lock = threading.Lock()

    def take(self, source: str, context: grpc.ServicerContext) -> int:
        """The new call's number; past the caps, the call it pushes out is cancelled (`peers.push_out`)."""
        with self._lock:
            n = next(_NUMBERS)
            numbers = list(self._calls)
            out = push_out([self._calls[k][0] for k in numbers], source, self.per_source, self.total)
            pushed = self._calls.pop(numbers[out[0]])[1] if out is not None else None
            self._calls[n] = (source, context)
        if pushed is not None:
            pushed.cancel()
        return n

    def give(self, n: int) -> None:
        with self._lock:
            self._calls.pop(n, None)

    def held(self) -> int:
        with self._lock:
            return len(self._calls)


class RequestGuard(grpc.ServerInterceptor):
    """Every unary-unary method served as a request stream whose one message is awaited at most `seconds`, by at
    most `per_source` calls of one source and `total` in all at once (module docstring). Other kinds of method pass
    unchanged."""

    def __init__(self, seconds: float = REQUEST_SECONDS, per_source: int = PER_SOURCE, total: int = TOTAL) -> None:
        self.seconds = seconds
        self.waiting = _Waiting(per_source, total)

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.stream_unary_rpc_method_handler(
            self._guarded(handler.unary_unary, details.method),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _guarded(self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable[..., Any]:
        def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            n = self.waiting.take(grpc_source(context.peer()), context)
            _WATCHDOG.arm(n, context, self.seconds)
            try:
                request = next(requests, None)
            except grpc.RpcError:  # cancelled: by its client, the watchdog, or a newer call pushing it out
                request = None
            finally:
                _WATCHDOG.disarm(n)
                self.waiting.give(n)
            if request is None:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT if context.is_active() else grpc.StatusCode.CANCELLED,
                    f"{method} takes one request message; none came",
                )
            return behavior(request, context)

        return call
