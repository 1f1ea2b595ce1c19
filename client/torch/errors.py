"""Errors of the gpupool device as PyTorch users expect them.

The session client raises `gpupool.errors.GpupoolError` subclasses (with `.op` and `.code`) at sync
points. Here they become what torch code is written to catch: a memory-quota refusal is a
`torch.OutOfMemoryError` (like CUDA's), everything else stays a `GpupoolError` that is also a
`RuntimeError`, naming the failed aten op and the daemon's message.

One class per status code (since round 39): a `RemoteError` (or `DeviceLost`) of a status that
`gpupool.errors` has a class for is an instance of a subclass that is also that class, so
`except gpupool.errors.InvalidArgument` catches the daemon's INVALID_ARGUMENT as it catches the clients' own
refusals, and `except RemoteError` still catches every daemon error. The subclasses keep their base's name
(`RemoteError`, `DeviceLost`): tracebacks and `type(exc).__name__` read as before. Until round 39 a daemon's
INVALID_ARGUMENT was a `RemoteError` with `code` INVALID_ARGUMENT only, which no `except InvalidArgument` caught.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import grpc
import torch
from gpupool.client.capture_record import CaptureError as CaptureError  # shared by both clients' step capture

from gpupool import errors


class RemoteError(RuntimeError, errors.GpupoolError):
    """An aten op (or a transfer) failed on the daemon; `op` names it, `code` is its gRPC status.

    Made with a code that `gpupool.errors` has a class for, it is an instance of `coded(cls, code)`: this class and
    that one (`except gpupool.errors.InvalidArgument` catches a daemon's INVALID_ARGUMENT)."""

    def __new__(
        cls, message: str = "", *, op: str = "", code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    ) -> RemoteError:
        return super().__new__(coded(cls, code), message)

    def __init__(self, message: str, *, op: str = "", code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        errors.GpupoolError.__init__(self, message, op=op)
        self.code = code

    def __str__(self) -> str:
        return errors.GpupoolError.__str__(self)

    def __reduce__(self) -> tuple[Any, ...]:  # a class of `coded` is found by its base and code, not by its name
        base = next(c for c in type(self).__mro__ if c in _BASES)
        return _rebuild, (base.__name__, self.message, self.op, self.code.name)


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


_BASES = {RemoteError: "RemoteError", DeviceLost: "DeviceLost"}
_CODED: dict[tuple[type, grpc.StatusCode], type] = {}


def coded(base: type[RemoteError], code: grpc.StatusCode) -> type[RemoteError]:
    """`base` (RemoteError, DeviceLost) for a daemon error of status `code`: its subclass that is also
    `gpupool.errors`' class of the code (`errors.InvalidArgument`, ...), named as `base`; `base` itself for a code
    without a class of its own (UNKNOWN, DATA_LOSS, ...) and for a subclass (one already coded, or a user's)."""
    family = errors.error_class(code)
    if base not in _BASES or family is errors.GpupoolError:
        return base
    got = _CODED.get((base, code))
    if got is None:
        extra = {"used_bytes": None, "limit_bytes": None} if family is errors.ResourceExhausted else {}
        names = {"__qualname__": base.__qualname__, "__module__": base.__module__, **extra}
        got = _CODED[(base, code)] = type(base.__name__, (base, family), names)
    return got


def _rebuild(base: str, message: str, op: str, code: str) -> RemoteError:
    cls = RemoteError if base == "RemoteError" else DeviceLost
    return cls(message, op=op, code=errors.status_code(code))


def over_quota(nbytes: int, quota: int, device: str, op: str = "") -> OutOfMemoryError:
    """A tensor larger than the session's whole memory quota, refused at the call that makes it, as CUDA's allocator
    refuses one (round 50): both clients' error (the shim's `remote._fits_quota`, the C++ client's `over_quota`
    operator, client/native/backend.py), an OutOfMemoryError as the daemon's quota refusal is."""
    return OutOfMemoryError(
        f"memory quota exceeded: {nbytes} bytes requested, more than the session's whole {quota} byte limit "
        f"({device}): refused at the call, nothing was allocated",
        op=op,
        limit_bytes=quota,
    )


# What a memory refusal raised the second time says (round 50). The daemon refuses an allocation at the op, but the
# script hears of it at the next sync, after the ops that followed it ran: their outputs carry the same error. A
# backward's gradient is one such output, and where a leaf had no `.grad` torch keeps it as the `.grad`, which every
# later backward adds to: a script that caught the error and went on with a smaller batch without `zero_grad` got the
# first refusal again (a GPU raises at the allocation, before any of that runs, and the `.grad` stays None). Since
# round 51 the sync sets such `.grad`s back to None (`clear_grads`): this is met where one is left (a daemon before
# round 51, more handles without a value than its reply names, such a tensor the script kept otherwise).
AGAIN = (
    " (the refusal a sync raised before, met again: a later op read a tensor the refused op left without a value; a"
    " .grad that the failed backward set is one, and every later backward adds to it: after catching the error, set"
    " the gradients to None with optimizer.zero_grad() or model.zero_grad(), and drop the tensors of the failed step)"
)
_last_refusal: list[tuple[str, str, int | None]] = []  # the last memory refusal translated: op, message, used bytes


# The client's wire handle of a device tensor (its storage's, or its own view handle) and the Session holding it, None
# for a tensor of no session: each client sets it on its copy of this module (the shim: client/torch/runtime.py; the
# C++ client: client/native/backend.py, which loads this file as a module of its own).
tensor_handle: Callable[[torch.Tensor], tuple[Any, int] | None] | None = None


def clear_grads(exc: BaseException) -> int:
    """Set back to None every `.grad` that a daemon's error at a sync names as having no value (`exc.poisoned` of
    `exc.session`, the op stream's `Error.poisoned`); how many. The daemon refuses an allocation at its op, but the
    script hears of it at the next sync, after the ops queued behind it ran on a tensor with no value: a backward's
    gradient is one, and where a leaf had no `.grad`, torch kept it as the `.grad`, which every later backward adds to
    (and `zero_grad(set_to_none=False)` zeroes in place: both failed again). CUDA raises at the allocation, and the
    `.grad` stays None (round 51: before, a script that caught the error had to `zero_grad()` before the next step, and
    `set_to_none=False` did not help). A `.grad` that held a value keeps it: a failed in-place op (the backward's
    accumulation, an optimizer's update) leaves its tensor as it was. The leaves are found among the objects Python's
    garbage collector tracks (every tensor object is one): a walk of the heap, on this error path only."""
    handles, session = getattr(exc, "poisoned", None), getattr(exc, "session", None)
    where = tensor_handle
    if not handles or session is None or where is None:
        return 0
    exc.session = None  # type: ignore[attr-defined]  # (translated twice, cleared once; and no Session to pickle)
    cleared = 0
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # (isinstance would read a proxy's __class__: warnings)
            continue
        try:
            grad = obj.grad if obj.is_leaf else None
            found = where(grad) if grad is not None else None
        except Exception:  # noqa: BLE001, S112 - a tensor of another kind (a meta or fake one): none of ours
            continue
        if found is not None and found[0] is session and found[1] in handles:
            obj.grad = None
            cleared += 1
    return cleared


def translate(exc: BaseException) -> BaseException:
    """The exception a torch user sees for an error of the session client (the `.grad`s it left without a value set
    back to None first: `clear_grads`)."""
    if getattr(exc, "poisoned", None):
        clear_grads(exc)
    if isinstance(exc, OutOfMemoryError | RemoteError):
        return exc
    if isinstance(exc, errors.MessageTooLarge):  # gRPC's limit, not a quota's: no OutOfMemoryError; the session ended
        return DeviceLost(exc.message, op=exc.op, code=exc.code)
    if isinstance(exc, errors.ResourceExhausted):
        again = getattr(exc, "_gp_again", None)  # (an error translated twice says the same both times)
        if again is None:
            seen = (exc.op, exc.message, exc.used_bytes)
            again = exc._gp_again = _last_refusal == [seen]  # type: ignore[attr-defined]
            _last_refusal[:] = [seen]
        message = exc.message + AGAIN if again else exc.message
        return OutOfMemoryError(message, op=exc.op, used_bytes=exc.used_bytes, limit_bytes=exc.limit_bytes)
    if isinstance(exc, errors.Unavailable | errors.FailedPrecondition):
        return DeviceLost(exc.message, op=exc.op, code=exc.code)
    if isinstance(exc, errors.GpupoolError):
        return RemoteError(exc.message, op=exc.op, code=exc.code)
    return exc
