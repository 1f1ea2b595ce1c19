"""`import gpupool.torch` registers the PyTorch device `gpupool`; the API lives in gpupool.client.torch."""

from gpupool.client.torch import (
    CapturedStep,
    CaptureError,
    DeviceLost,
    OutOfMemoryError,
    RemoteError,
    RemoteTensor,
    attach,
    attach_lease,
    capture,
    current_index,
    detach_all,
    device,
    device_count,
    meta_cache,
    synchronize,
)

__all__ = [
    "CaptureError",
    "CapturedStep",
    "DeviceLost",
    "OutOfMemoryError",
    "RemoteError",
    "RemoteTensor",
    "attach",
    "attach_lease",
    "capture",
    "current_index",
    "detach_all",
    "device",
    "device_count",
    "meta_cache",
    "synchronize",
]
