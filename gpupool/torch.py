"""`import gpupool.torch` registers the PyTorch device `gpupool` and the torch.distributed backend `gpupool`
(gpupool.client.distributed); the API lives in gpupool.client.torch."""

import gpupool.client.distributed as _distributed
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

_distributed.register()

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
