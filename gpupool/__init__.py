"""gpupool: remote, fractional GPUs for PyTorch.

`gpupool.lease(gpus=1, fraction=0.5)` leases (part of) a GPU from the pool's scheduler. The public client
API is imported lazily on first use, so `import gpupool` stays cheap and never imports torch or gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpupool.client.pool import Lease, LeasedDevice, lease

__all__ = ["Lease", "LeasedDevice", "lease"]

_LAZY = {"lease": "gpupool.client.pool", "Lease": "gpupool.client.pool", "LeasedDevice": "gpupool.client.pool"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gpupool' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
