"""The PyTorch device `gpupool`: tensors that live, and ops that run, on a remote (fraction of a) GPU.

    import gpupool.torch
    dev = gpupool.torch.device()          # the leased device: gpupool:0
    model = Model().to(dev)               # parameters uploaded once; ops then travel as descriptions

Importing this package registers the device. See DESIGN.md, "The PyTorch shim".

Layers, top to bottom (each module imports only modules below it; `.importlinter` enforces it):
backend, optim (registration with torch), capture (step capture) -> dispatch (routing of each op) ->
transfer (copies, sync points, aliases) -> remote (the generic remote op) -> encode (arguments as wire Args) ->
meta (output metadata) -> tensor (the wrapper class, uploads/downloads) -> api (attach, leases, the device
registry) -> runtime (one session: handles, frees, commands) -> errors; native (the C++ device guard, which
`backend` registers) imports none of them.
"""

from __future__ import annotations

from gpupool.client import native as _native

if _native.active():  # the C++ client owns the `gpupool` device (PrivateUse1) in this process: one message, not two
    _native.refuse("the Python client (gpupool.client.torch)")  # half-registered devices

from . import backend as _backend
from . import optim as _optim
from .api import attach, attach_lease, current_index, detach_all, device, device_count, synchronize
from .capture import CapturedStep, capture
from .errors import CaptureError, DeviceLost, OutOfMemoryError, RemoteError
from .meta import CACHE as meta_cache
from .tensor import RemoteTensor

_backend.register()
_optim.enable_foreach_default()

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
