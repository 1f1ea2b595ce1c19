"""`import gpupool.torch` registers the PyTorch device `gpupool` and the torch.distributed backend `gpupool`
(gpupool.client.distributed); the API lives in gpupool.client.torch.
Under `gpupool run` with the C++ client (its default; $GPUPOOL_CLIENT=native) the C++ client owns the device instead,
and this module is gpupool.client.native.api: the part of the API it has, and one clear refusal for the rest."""

import gpupool.client.native as _native

if _native.requested():  # the C++ client (`gpupool run`'s default): docs/native-client.md
    import sys as _sys

    import gpupool.client.native.api as _api

    _sys.modules[__name__] = _api
else:
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
