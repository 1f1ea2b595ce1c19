"""Errors of the gpupool device as PyTorch users expect them.

The session client raises `gpupool.errors.GpupoolError` subclasses (with `.op` and `.code`) at sync
points. Here they become what torch code is written to catch: a memory-quota refusal is a
`torch.OutOfMemoryError` (like CUDA's), everything else stays a `GpupoolError` that is also a
`RuntimeError`, naming the failed aten op and the daemon's message.
"""

from __future__ import annotations

import re

import torch

from gpupool import errors


class RemoteError(RuntimeError, errors.GpupoolError):
    """An aten op (or a transfer) failed on the daemon; `op` names it, `code` is the gRPC status name."""

    def __init__(self, message: str, *, op: str = "", code: str = "UNKNOWN") -> None:
        errors.GpupoolError.__init__(self, message, op=op)
        self.code_name = code

    def __str__(self) -> str:
        return errors.GpupoolError.__str__(self)


class OutOfMemoryError(torch.OutOfMemoryError, errors.ResourceExhausted):
    """The session's memory quota refused an allocation; `used_bytes`/`limit_bytes` when the daemon said so.

    The session stays usable: free tensors (drop references) and carry on.
    """

    def __init__(self, message: str, *, op: str = "") -> None:
        errors.ResourceExhausted.__init__(self, message, op=op)
        self.used_bytes, self.limit_bytes = _used_and_limit(message)

    def __str__(self) -> str:
        return errors.GpupoolError.__str__(self)


class CaptureError(RuntimeError):
    """A step given to `gpupool.torch.capture` cannot be captured (a sync inside it, Python numbers that change
    from step to step, ...); the message says what and how to fix it."""


class DeviceLost(RemoteError):
    """The daemon went away (or the session was closed): tensors of that device are gone."""


_NUM = r"(\d[\d,_]*)"


def _used_and_limit(message: str) -> tuple[int | None, int | None]:
    """Best-effort parse of the used and limit byte counts out of the daemon's quota message
    ("... 123 used of a 456 byte limit", "used: 123, limit: 456")."""
    used = re.search(_NUM + r" (?:bytes )?used", message) or re.search(r"used:? " + _NUM, message)
    limit = re.search(_NUM + r" bytes? (?:limit|quota)", message) or re.search(r"(?:limit|quota):? " + _NUM, message)

    def num(m: re.Match[str] | None) -> int | None:
        return int(m.group(1).replace(",", "").replace("_", "")) if m else None

    return num(used), num(limit)


def translate(exc: BaseException) -> BaseException:
    """The exception a torch user sees for an error of the session client."""
    if isinstance(exc, OutOfMemoryError | RemoteError):
        return exc
    if isinstance(exc, errors.ResourceExhausted):
        return OutOfMemoryError(exc.message, op=exc.op)
    if isinstance(exc, errors.Unavailable | errors.FailedPrecondition):
        return DeviceLost(exc.message, op=exc.op, code=exc.code.name)
    if isinstance(exc, errors.GpupoolError):
        code = exc.code.name if hasattr(exc.code, "name") else str(exc.code)
        return RemoteError(exc.message, op=exc.op, code=code)
    return exc
