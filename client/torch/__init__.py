"""The PyTorch device `gpupool`: tensors that live, and ops that run, on a remote (fraction of a) GPU.

    import gpupool.torch
    dev = gpupool.torch.device()          # the leased device: gpupool:0
    model = Model().to(dev)               # parameters uploaded once; ops then travel as descriptions

Importing this package registers the device. See DESIGN.md, "The PyTorch shim".
"""

from __future__ import annotations

import gpupool.client.torch.backend as _backend
import gpupool.client.torch.optim as _optim
from gpupool.client.torch.api import attach, attach_lease, current_index, detach_all, device, device_count, synchronize
from gpupool.client.torch.errors import DeviceLost, OutOfMemoryError, RemoteError
from gpupool.client.torch.meta import CACHE as meta_cache
from gpupool.client.torch.tensor import RemoteTensor

_backend.register()
_optim.enable_foreach_default()

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
