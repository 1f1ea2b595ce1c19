"""`import gpupool.torch` under `gpupool run --native-client`: the part of the Python client's API the C++ client has.

`device()`, `device_count()`, `current_index()`, `synchronize()`, step capture (`capture`, `CapturedStep`: capture.py)
and the error classes (`RemoteError`, `OutOfMemoryError`, `DeviceLost`: the very classes of client/torch/errors.py,
which the C++ client raises; `CaptureError`: client/capture_record.py's, as the Python client's), for each of the
lease's devices. Every other name of gpupool.torch (`attach`, ...) raises `Unsupported` with one message naming it and
the way out (`refuse`).
"""

from __future__ import annotations

from typing import Any

import torch

from . import backend as _backend
from . import check_index, current_index, device_count, enable, ensure_session, refuse
from .capture import CapturedStep, capture

enable()  # idempotent: torch's backend entry point has usually run it at `import torch` already

_errors = _backend.errors()
RemoteError = _errors.RemoteError
OutOfMemoryError = _errors.OutOfMemoryError
DeviceLost = _errors.DeviceLost
CaptureError = _errors.CaptureError

# what each missing name is, in the refusal's words
_MISSING = {
    "attach": "attaching a daemon by hand (gpupool.torch.attach)",
    "attach_lease": "attaching a lease by hand (gpupool.torch.attach_lease)",
    "detach_all": "gpupool.torch.detach_all",
    "RemoteTensor": "gpupool.torch.RemoteTensor (the Python client's tensor class)",
    "meta_cache": "gpupool.torch.meta_cache (the Python client's meta cache)",
}

__all__ = ["CaptureError", "CapturedStep", "DeviceLost", "OutOfMemoryError", "RemoteError", "capture", "current_index",
           "device", "device_count", "synchronize"]  # fmt: skip


def device(index: int = 0) -> torch.device:
    """`gpupool:<index>`, the lease's device <index>, its session attached now (as the Python client's)."""
    ensure_session(check_index(index))
    return torch.device("gpupool", index)


def synchronize(device: Any = None) -> None:
    """Wait until the daemon has run every queued op of the device (None: of every device); raise the first error
    among them."""
    if device is not None:
        index = device if isinstance(device, int) else torch.device(device).index
        device = None if index is None else check_index(index)
    torch.gpupool.synchronize(device)  # type: ignore[attr-defined]


def __getattr__(name: str) -> Any:
    if name in _MISSING:
        refuse(_MISSING[name])
    raise AttributeError(f"module 'gpupool.torch' has no attribute {name!r}")
