"""torch.distributed.checkpoint (DCP) of a state dict holding gpupool device tensors.

DCP's file writer (`FileSystemWriter`, `dcp.save`'s default) copies each tensor to the CPU in a loader: with one
writer thread, on a machine with an accelerator, torch's `_OverlappingCpuLoader`, which moves to the CPU only the
tensors of the device type that `torch._utils._get_available_device_type()` names and asserts that every tensor it
hands on is on the CPU. A gpupool tensor missed both ways until round 39: under `--cuda` the available type is `cuda`
and a tensor's is `gpupool` ("Tensor must be on CPU"); without `--cuda` the types match and its non-blocking copy to
the CPU asked PrivateUse1 for a pinned-memory allocator, which neither client registers.

Here the loader is given the tensor's CPU copy (`tensor.cpu()`, a download, as the serial loader makes it) for a
gpupool tensor, and DCP's own code does the rest. Loading needs nothing: DCP reads each tensor from the file on the
CPU and `copy_`s it into the state dict's tensor, an upload to the device.

The patch goes in when torch's module is imported (client/fsdp.py `after_import`), never by importing DCP itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from .fsdp import after_import

MODULE = "torch.distributed.checkpoint.filesystem"
_installed: list[bool] = []


def _on_cpu(resolve: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`resolve` (DCP's planner.resolve_data), with a gpupool tensor's CPU copy in its place."""

    @functools.wraps(resolve)
    def resolved(item: Any) -> Any:
        data = resolve(item)
        if isinstance(data, torch.Tensor) and data.device.type == torch._C._get_privateuse1_backend_name():
            return data.detach().cpu()
        return data

    return resolved


def _patch(module: ModuleType) -> None:
    """A loader class that resolves gpupool tensors to the CPU (torch 2.13 has `_OverlappingCpuLoader`; a torch
    without it keeps its own)."""
    loader = getattr(module, "_OverlappingCpuLoader", None)
    if loader is None or getattr(loader, "_gpupool", False):
        return

    class Loader(loader):  # type: ignore[misc,valid-type]
        _gpupool = True

        def __init__(self, resolve_fun: Callable[[Any], Any], *args: Any, **kwargs: Any) -> None:
            super().__init__(_on_cpu(resolve_fun), *args, **kwargs)

    Loader.__name__ = Loader.__qualname__ = loader.__name__
    module._OverlappingCpuLoader = Loader  # type: ignore[attr-defined]


def install() -> None:
    """Idempotent: patch DCP's file writer now if it is imported, else when it is."""
    if not _installed:
        _installed.append(True)
        after_import(MODULE, _patch)
