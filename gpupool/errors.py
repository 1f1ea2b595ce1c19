"""The one table between gpupool exceptions and gRPC status codes.

Servers raise these from domain code and servicers turn them into `context.abort(code, details)`;
clients turn a `grpc.RpcError` (or an in-band `Error` message of the op stream) back into the same
exception class, so both sides speak of failures the same way.
"""

from __future__ import annotations

from typing import NoReturn

import grpc


class GpupoolError(Exception):
    """Base of every gpupool failure; `code` is the gRPC status it travels as."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

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
    """A quota or the pool is full; the message says what was asked and what is free."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(GpupoolError):
    """The lease was released or expired, the session is closed."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(GpupoolError):
    """Host down or draining."""

    code = grpc.StatusCode.UNAVAILABLE


class NotFound(GpupoolError):
    """Unknown lease, session or handle."""

    code = grpc.StatusCode.NOT_FOUND


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
        Internal,
    )
}
_BY_NAME: dict[str, type[GpupoolError]] = {code.name: cls for code, cls in _BY_CODE.items()}


def error_class(code: grpc.StatusCode | str) -> type[GpupoolError]:
    """The exception class of a status code (or its name, as carried by the op stream's Error)."""
    if isinstance(code, str):
        return _BY_NAME.get(code, GpupoolError)
    return _BY_CODE.get(code, GpupoolError)


def from_status(code: grpc.StatusCode | str, message: str, op: str = "") -> GpupoolError:
    """Build the exception for a status code and message."""
    cls = error_class(code)
    exc = cls(message, op=op)
    if cls is GpupoolError and isinstance(code, grpc.StatusCode):
        exc.code = code
    return exc


def from_rpc_error(err: grpc.RpcError) -> GpupoolError:
    """Translate a failed call into the matching exception (UNAVAILABLE for a dead peer, etc.)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return from_status(code, details or code.name)


def abort(context: grpc.ServicerContext, exc: GpupoolError) -> NoReturn:
    """End an RPC with the exception's status; `context.abort` raises, so this never returns."""
    context.abort(exc.code, str(exc))
    raise AssertionError("unreachable")  # pragma: no cover - context.abort always raises
