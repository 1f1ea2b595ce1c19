"""Errors of the gpupool device as PyTorch users expect them.

The session client raises `gpupool.errors.GpupoolError` subclasses (with `.op` and `.code`) at sync
points. Here they become what torch code is written to catch: a memory-quota refusal is a
`torch.OutOfMemoryError` (like CUDA's), everything else stays a `GpupoolError` that is also a
`RuntimeError`, naming the failed aten op and the daemon's message.
"""

from __future__ import annotations

import grpc
import torch
from gpupool.client.capture_record import CaptureError as CaptureError  # shared by both clients' step capture

from gpupool import errors


class RemoteError(RuntimeError, errors.GpupoolError):
    """An aten op (or a transfer) failed on the daemon; `op` names it, `code` is its gRPC status."""

    def __init__(self, message: str, *, op: str = "", code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        errors.GpupoolError.__init__(self, message, op=op)
        self.code = code

    def __str__(self) -> str:
        return errors.GpupoolError.__str__(self)


class OutOfMemoryError(torch.OutOfMemoryError, errors.ResourceExhausted):
    """The session's memory quota refused an allocation; `used_bytes`/`limit_bytes` when the daemon sent them
    (the op stream's `Error` fields, never parsed out of the message).

    The session stays usable: free tensors (drop references) and carry on.
    """

    def __init__(
        self, message: str, *, op: str = "", used_bytes: int | None = None, limit_bytes: int | None = None
    ) -> None:
        errors.ResourceExhausted.__init__(self, message, op=op, used_bytes=used_bytes, limit_bytes=limit_bytes)

    def __str__(self) -> str:
        return errors.GpupoolError.__str__(self)


class DeviceLost(RemoteError):
    """The daemon went away (or the session was closed): tensors of that device are gone."""


def translate(exc: BaseException) -> BaseException:
    """The exception a torch user sees for an error of the session client."""
    if isinstance(exc, OutOfMemoryError | RemoteError):
        return exc
    if isinstance(exc, errors.ResourceExhausted):
        return OutOfMemoryError(exc.message, op=exc.op, used_bytes=exc.used_bytes, limit_bytes=exc.limit_bytes)
    if isinstance(exc, errors.Unavailable | errors.FailedPrecondition):
        return DeviceLost(exc.message, op=exc.op, code=exc.code)
    if isinstance(exc, errors.GpupoolError):
        return RemoteError(exc.message, op=exc.op, code=exc.code)
    return exc
