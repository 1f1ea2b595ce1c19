"""Unary calls whose request never comes: how long, and how many from one source, they may hold a server's threads.

gRPC Python hands a unary call to a worker thread as soon as its headers arrive; the worker then waits, without a
limit, for the call's one request message (grpc/_server.py `_unary_request`), before any handler or interceptor of
ours sees the call. A client that sends the headers of a call and never its message (an HTTP/2 stream left open; a
gRPC client's `stream_unary` call to a unary method whose request iterator never yields) so holds a worker for as
long as its connection lives. Until round 37 150 such calls from one client, no credential needed (health Check),
held every one of the scheduler's 64 workers and its 128 calls in progress: every tenant's Allocate and Renew, and
every host's heartbeat (so, after `--host-timeout`, every lease) was refused RESOURCE_EXHAUSTED or waited; two of
them held both threads of a `--health-listen` port and starved the probes. A unary-stream call (health Watch)
waits for its one request the same way.

`RequestGuard` serves each unary method as a request stream of one message instead (the worker reaches our code
before the message). A call waits for its request at most `REQUEST_SECONDS` (then it is cancelled). One that has
waited `GRACE_SECONDS` counts as a slow call, and slow calls are capped as the side port's and the collective hub's
unauthenticated connections are (`peers.push_out`): past `PER_SOURCE` of one source address (an IPv4 address, an
IPv6 /64) a call turning slow cancels that source's oldest slow call, past `TOTAL` in all the oldest of the source
with most. An honest client sends its request with the headers: its calls wait for the server's own hand-off of the
message (milliseconds, also in bursts of 64 from one process here at load 15), do not turn slow, and are not
cancelled for others' (a first version capped every waiting call and cancelled 76 of 1,280 honest calls sent 64 at
a time). A source's calls hold at most `PER_SOURCE` workers longer than `GRACE_SECONDS`. Put it first among a
server's interceptors (it serves the handler the others made).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from gpupool.peers import grpc_source, push_out

REQUEST_SECONDS = 10.0  # how long a unary call may wait for its request message
GRACE_SECONDS = 0.25  # a call waiting longer is slow: slow calls are capped
PER_SOURCE = 8  # slow calls of one source address at once
TOTAL = 32  # slow calls at once, in all


@dataclass
class _Call:
    source: str
    context: grpc.ServicerContext
    start: float
    slow: bool = False


class RequestGuard(grpc.ServerInterceptor):
    """Every method with one request message (unary-unary, unary-stream) served as one with a request stream, whose
    message is awaited at most `seconds`, slow calls (waiting past `grace`) at most `per_source` of one source and
    `total` in all (module docstring). Methods with request streams pass unchanged (their handlers start at once).
    One thread (started at the first call) cancels the calls to cancel."""

    def __init__(
        self,
        seconds: float = REQUEST_SECONDS,
        per_source: int = PER_SOURCE,
        total: int = TOTAL,
        grace: float = GRACE_SECONDS,
    ) -> None:
        self.seconds, self.per_source, self.total, self.grace = seconds, per_source, total, grace
        self._cond = threading.Condition()
        self._waiting: dict[int, _Call] = {}  # calls waiting for their message, by number
        self._slow: dict[int, _Call] = {}  # those of them past `grace`, in the order they became slow
        self._due: list[tuple[float, int]] = []  # (when to look at the call again, its number)
        self._numbers = itertools.count()
        self._thread: threading.Thread | None = None

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._guarded(handler.unary_unary, details.method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream is not None:  # (health Watch: its one request is awaited as a unary call's)
            return grpc.stream_stream_rpc_method_handler(
                self._guarded_stream(handler.unary_stream, details.method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler

    def _request(self, requests: Iterator[Any], context: grpc.ServicerContext, method: str) -> Any:
        """The call's one request message, waited for under the guard's bounds."""
        n = self._enter(grpc_source(context.peer()), context)
        try:
            request = next(requests, None)
        except grpc.RpcError:  # cancelled: by its client, at its bound, or by a newer slow call of its source
            request = None
        finally:
            self._leave(n)
        if request is None:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT if context.is_active() else grpc.StatusCode.CANCELLED,
                f"{method} takes one request message; none came",
            )
        return request

    def _guarded(self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable[..., Any]:
        def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behavior(self._request(requests, context, method), context)

        return call

    def _guarded_stream(
        self, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str
    ) -> Callable[..., Iterator[Any]]:
        def call(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            yield from behavior(self._request(requests, context, method), context)

        return call

    def _enter(self, source: str, context: grpc.ServicerContext) -> int:
        now = time.monotonic()
        with self._cond:
            n = next(self._numbers)
            self._waiting[n] = _Call(source, context, now)
            heapq.heappush(self._due, (now + self.grace, n))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="request-guard", daemon=True)
                self._thread.start()
            elif self._due[0][1] == n:  # due before whatever the thread sleeps toward (or it has no deadline)
                # Round 37 (fin37): only when nothing else was due (`len(self._due) == 1`): a slow call's `seconds`
                # bound put the thread to sleep for as long, and calls opened meanwhile were neither capped nor ended
                self._cond.notify()
            return n

    def _leave(self, n: int) -> None:
        with self._cond:
            self._waiting.pop(n, None)
            self._slow.pop(n, None)

    def _run(self) -> None:
        while True:
            cancel: list[grpc.ServicerContext] = []
            with self._cond:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    n = heapq.heappop(self._due)[1]
                    call = self._waiting.get(n)
                    if call is None:  # its message came
                        continue
                    if call.slow:  # past `seconds`
                        cancel.append(self._drop(n).context)
                        continue
                    numbers = list(self._slow)
                    out = push_out([self._slow[k].source for k in numbers], call.source, self.per_source, self.total)
                    if out is not None:
                        cancel.append(self._drop(numbers[out[0]]).context)
                    call.slow = True
                    self._slow[n] = call
                    heapq.heappush(self._due, (call.start + self.seconds, n))
                if not cancel:
                    # Not before 10 ms: a busy server's calls are due one after another, looked at in batches.
                    self._cond.wait(max(self._due[0][0] - now, 0.01) if self._due else None)
                    continue
            for context in cancel:
                context.cancel()  # wakes the worker waiting for the message: its request stream ends

    def _drop(self, n: int) -> _Call:
        """Take a call off the books (the caller holds the lock and cancels it); its worker's `_leave` finds nothing."""
        self._slow.pop(n, None)
        return self._waiting.pop(n)
