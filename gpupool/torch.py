"""`import gpupool.torch` registers the PyTorch device `gpupool` and the torch.distributed backend `gpupool`
(gpupool.client.distributed); the API lives in gpupool.client.torch."""

import gpupool.client.distributed as _distributed
from gpupool.client.torch import (
    DeviceLost,
    OutOfMemoryError,
    RemoteError,
    RemoteTensor,
    attach,
    attach_lease,
    current_index,
    detach_all,
    device,
    device_count,
    meta_cache,
    synchronize,
)

_distributed.register()

__all__ = [
    "DeviceLost",
    "OutOfMemoryError",
    "RemoteError",
    "RemoteTensor",
    "attach",
    "attach_lease",
    "current_index",
    "detach_all",
    "device",
    "device_count",
    "meta_cache",
    "synchronize",
]
