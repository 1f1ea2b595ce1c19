"""The one table between gpupool exceptions and gRPC status codes, and the one translation at each RPC edge.

Status codes are `grpc.StatusCode` members everywhere; their names appear only on the wire (the op stream's
`Error.code`) and in metric labels. Servers raise these exceptions from domain code and install
`ErrorInterceptor`, which ends the call with the exception's status (anything else is a bug: logged, INTERNAL).
Clients turn a failure -- a `grpc.RpcError` or an in-band `Error` message of the op stream -- back into the same
exception class with `from_failure`, so both sides speak of failures the same way. A memory refusal carries the
bytes used and the limit as numbers (`ResourceExhausted.used_bytes`/`limit_bytes`, `Error` fields 20 and 21).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from gpupool._proto import tensor_pb2

log = logging.getLogger(__name__)


class GpupoolError(Exception):
    """Base of every gpupool failure; `code` is the gRPC status it travels as."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    # A daemon's error at a sync point: its session's handles that have no value (the op stream's `Error.poisoned`),
    # and the client session that raised it (client/session.py); client/torch/errors.py `clear_grads` reads both
    poisoned: frozenset[int] = frozenset()
    session: Any = None

    def __init__(self, message: str, *, op: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.op = op

    def __str__(self) -> str:
        return f"{self.op}: {self.message}" if self.op else self.message


class InvalidArgument(GpupoolError):
    """Malformed or unsupported input."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(GpupoolError):
    """Missing, forged or expired token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GpupoolError):
    """A handle of another session, a device the token does not grant."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(GpupoolError):
    """A quota or the pool is full; the message says what was asked and what is free. A memory refusal also
    says, as numbers, the bytes that would have been in use and the limit they ran into (None when unknown)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self, message: str, *, op: str = "", used_bytes: int | None = None, limit_bytes: int | None = None
    ) -> None:
        super().__init__(message, op=op)
        self.used_bytes = used_bytes
        self.limit_bytes = limit_bytes


class FailedPrecondition(GpupoolError):
    """The lease was released or expired, the session is closed."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(GpupoolError):
    """Host down or draining."""

    code = grpc.StatusCode.UNAVAILABLE


class NotFound(GpupoolError):
    """Unknown lease, session or handle."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(GpupoolError):
    """What a call would create is there already (a host id a live daemon holds)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Internal(GpupoolError):
    """A bug or an unexpected failure of the server itself."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[GpupoolError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        NotFound,
        AlreadyExists,
        Internal,
    )
}
_BY_NAME: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}


def status_code(name: str) -> grpc.StatusCode:
    """The status code a wire name stands for (`Error.code`); UNKNOWN for a name gRPC does not have."""
    return _BY_NAME.get(name, grpc.StatusCode.UNKNOWN)


def error_class(code: grpc.StatusCode) -> type[GpupoolError]:
    """The exception class of a status code."""
    return _BY_CODE.get(code, GpupoolError)


def from_status(
    code: grpc.StatusCode, message: str, op: str = "", *, used_bytes: int | None = None, limit_bytes: int | None = None
) -> GpupoolError:
    """Build the exception for a status code and message (and, for a memory refusal, its byte counts)."""
    cls = error_class(code)
    if cls is ResourceExhausted:
        return ResourceExhausted(message, op=op, used_bytes=used_bytes, limit_bytes=limit_bytes)
    exc = cls(message, op=op)
    if cls is GpupoolError:
        exc.code = code
    return exc


def to_proto(exc: GpupoolError) -> tensor_pb2.Error:
    """The op stream's `Error` message of an exception (the server side of `from_failure`)."""
    err = tensor_pb2.Error(code=exc.code.name, op=bounded(exc.op), message=bounded(exc.message))
    if isinstance(exc, ResourceExhausted):
        if exc.used_bytes is not None:
            err.used_bytes = exc.used_bytes
        if exc.limit_bytes is not None:
            err.limit_bytes = exc.limit_bytes
    return err


def from_failure(failure: grpc.RpcError | tensor_pb2.Error) -> GpupoolError:
    """The client's one translation: a failed call (UNAVAILABLE for a dead peer, ...) or an in-band `Error` of
    the op stream becomes the matching exception."""
    if isinstance(failure, tensor_pb2.Error):
        exc = from_status(
            status_code(failure.code),
            failure.message,
            failure.op,
            used_bytes=failure.used_bytes if failure.HasField("used_bytes") else None,
            limit_bytes=failure.limit_bytes if failure.HasField("limit_bytes") else None,
        )
        if failure.poisoned:
            exc.poisoned = frozenset(failure.poisoned)
        return exc
    code = failure.code() if hasattr(failure, "code") else grpc.StatusCode.UNKNOWN
    details = failure.details() if hasattr(failure, "details") else str(failure)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (too_large := _TOO_LARGE.search(details or "")):
        return MessageTooLarge(int(too_large[1]), int(too_large[2]))
    return from_status(code, details or code.name)


# gRPC's own RESOURCE_EXHAUSTED for a message over a receiver's limit ("SERVER: Received message larger than max
# (1048608 vs. 1048576)": the daemon's --max-message-size): the transport's
# words, not a status of ours - the stream that carried it is over.
_TOO_LARGE = re.compile(r"Received message larger than max \((\d+) vs\. (\d+)\)")


class MessageTooLarge(GpupoolError):
    """gRPC refused a message over the receiver's limit (the daemon's `--max-message-size`): RESOURCE_EXHAUSTED, but
    no memory quota's - not a ResourceExhausted, so the torch clients do not report it as an OutOfMemoryError (until
    round 47 they did). The session's stream ended with it: the session is over."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"a gRPC message of {size} bytes is over the limit of {limit} bytes (the daemon's --max-message-size, "
            f"`gpupool serve --max-message-size`; 16 MiB by default) and ended the session: send less at once, or "
            f"start the daemon with a larger --max-message-size"
        )
        self.size, self.limit = size, limit

    def __reduce__(self) -> tuple[Any, ...]:
        return MessageTooLarge, (self.size, self.limit)


MAX_DETAILS = 2000  # characters (and UTF-8 bytes) of an error's message a reply carries: see `bounded`


def bounded(details: str) -> str:
    """`details` cut to MAX_DETAILS characters and UTF-8 bytes. A status's message travels in a trailer, which gRPC
    refuses past 16 KiB (8 KiB by default on the client), percent-encoding every non-ASCII byte (3 bytes each): a
    message quoting a huge client-supplied string whole reached the client as the transport's RESOURCE_EXHAUSTED
    ("Stream removed") instead of its status. Cut here, a message is at most 6 KB on the wire."""
    if len(details) <= MAX_DETAILS and (details.isascii() or len(details.encode()) <= MAX_DETAILS):
        return details
    return details.encode()[:MAX_DETAILS].decode(errors="ignore") + "... (cut)"


def shown(text: str, limit: int = 64) -> str:
    """A caller's string as an error message quotes it: its repr, cut at `limit` characters. Round 32 quoted ids
    whole: a Renew of a 20,000-character lease id was answered NOT_FOUND with the id in its message, a trailer over
    gRPC's 16 KiB limit, and the client got the transport's RESOURCE_EXHAUSTED ("Stream removed") instead."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def abort(context: grpc.ServicerContext, exc: GpupoolError) -> NoReturn:
    """End an RPC with the exception's status (its message `bounded`); `context.abort` raises, so this never
    returns."""
    context.abort(exc.code, bounded(str(exc)))
    raise AssertionError("unreachable")  # pragma: no cover - context.abort always raises


class Malformed:
    """A request whose bytes do not parse as its method's message (`parsed`). gRPC answers a deserializer's
    exception INTERNAL ("Exception deserializing request!", with a traceback in the server's log), before any
    check of the caller: the wrong status, and to anyone. `ErrorInterceptor` answers it INVALID_ARGUMENT; an
    interceptor in front of it that checks credentials first (scheduler/auth.py) answers it once they pass."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"the request is not a well-formed message of this method ({self.kind})")


def parsed(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserialize` that returns a `Malformed` for bytes it cannot parse instead of raising (None stays None: a
    method that takes raw bytes parses them itself). Wrapping twice wraps once."""
    if deserialize is None or getattr(deserialize, "_gpupool_parsed", False):
        return deserialize

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or any error of a bad message
            return Malformed(type(exc).__name__)

    parse._gpupool_parsed = True  # type: ignore[attr-defined]
    return parse


def _answer(context: grpc.ServicerContext, name: str, exc: Exception) -> NoReturn:
    """End a call that raised: a gpupool error with its status, any other exception (a bug) as INTERNAL."""
    if isinstance(exc, GpupoolError):
        abort(context, exc)
    code = getattr(context, "code", None)
    if callable(code) and code() is not None:  # context.abort already ran: its exception passes through
        raise exc
    log.exception("%s failed", name)
    abort(context, Internal(f"{name}: {type(exc).__name__}: {exc}"))


class ErrorInterceptor(grpc.ServerInterceptor):
    """The server's one translation: every handler's gpupool exceptions end its call with their status; any
    other exception is a bug, logged and answered INTERNAL, and the server carries on. Streaming handlers
    (request or response streams) are covered as well as unary ones. A request whose bytes do not parse as its
    method's message is answered INVALID_ARGUMENT (`Malformed`) before its handler runs; in a request stream, the
    first such message ends the call so."""

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        name = details.method.rsplit("/", 1)[-1]
        parse = parsed(handler.request_deserializer)
        checked = parse is not None  # the handler's requests may be `Malformed`
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, name, _one if checked else None), parse, handler.response_serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _unary(handler.stream_unary, name, _each if checked else None), parse, handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, name, _one if checked else None), parse, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, name, _each if checked else None), parse, handler.response_serializer
        )


def _one(request: Any) -> Any:
    """A unary call's request, refused when it did not parse."""
    if isinstance(request, Malformed):
        raise request.error()
    return request


def _each(requests: Iterator[Any]) -> Iterator[Any]:
    """A request stream's messages; the first that did not parse ends the call (INVALID_ARGUMENT)."""
    for request in requests:
        yield _one(request)


Check = Callable[[Any], Any] | None


def _unary(behavior: Callable[[Any, grpc.ServicerContext], Any], name: str, check: Check) -> Callable[..., Any]:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request if check is None else check(request), context)
        except Exception as exc:  # noqa: BLE001 - the server must answer, never die
            _answer(context, name, exc)

    return call


def _streaming(
    behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], name: str, check: Check
) -> Callable[..., Any]:
    def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request if check is None else check(request), context)
        except Exception as exc:  # noqa: BLE001 - the server must answer, never die
            _answer(context, name, exc)

    return call
