"""torch.accelerator's synchronize and memory API on the `gpupool` accelerator (the C++ client, and `--cuda`).

torch.accelerator's device-agnostic calls (`torch.accelerator.synchronize()`, `memory_allocated()`,
`max_memory_allocated()`, `memory_stats()`, `reset_peak_memory_stats()`, `empty_cache()`, `get_memory_info()`) end in
`torch._C._accelerator_*` functions that ask the device's C++ guard and caching allocator, which a PrivateUse1 device
of gpupool has not: until round 49 `synchronize()` raised "Backend doesn't support synchronizing all streams on
device." and every memory call torch's INTERNAL ASSERT "Allocator for gpupool is not a DeviceAllocator". Those
`torch._C` functions are replaced here by the facade's answers (client/cuda/facade.py: a sync of the device, the
session's bytes on the daemon, the quota as the total), keyed by gpupool's numbers: torch.accelerator maps the
script's numbers (CUDA's under `--cuda`, client/cuda/devices.py `accelerator_index`) before it calls them. Installed
by client/cuda's `autoload` after it loads the C++ client and by its `enable()` (`--cuda`, either client).
"""

from __future__ import annotations

from typing import Any

import torch

from .devices import GPUPOOL


def _device(index: int | None) -> torch.device:
    return torch.device(GPUPOOL) if index is None or index < 0 else torch.device(GPUPOOL, index)


def synchronize_device(index: int | None) -> None:
    from . import facade

    facade.synchronize(_device(index))


def device_stats(index: int | None) -> dict[str, Any]:
    """The nested stats torch.accelerator.memory_stats flattens: {"allocated_bytes": {"all": {"current": ...}}}."""
    from . import facade

    nested: dict[str, Any] = {}
    for key, value in facade.memory_stats(_device(index)).items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def reset_peak_stats(index: int | None) -> None:
    from . import facade

    facade.reset_peak_memory_stats(_device(index))


def memory_info(index: int | None) -> tuple[int, int]:
    from . import facade

    return facade.mem_get_info(_device(index))


_HOOKS = {
    "_accelerator_synchronizeDevice": synchronize_device,
    "_accelerator_isAllocatorInitialized": lambda: True,
    "_accelerator_getDeviceStats": device_stats,
    "_accelerator_resetPeakStats": reset_peak_stats,
    "_accelerator_resetAccumulatedStats": lambda index: None,  # no cumulative counts are kept (facade.memory_stats)
    "_accelerator_emptyCache": lambda: None,  # the daemon frees a session's dead tensors itself
    "_accelerator_getMemoryInfo": memory_info,
}


_ORIGINALS: dict[str, Any] = {}  # torch's own, while replaced (not devices.patch: that list is `--cuda`'s mapping)


def install() -> None:
    """Replace the `torch._C._accelerator_*` functions above where the accelerator is gpupool (idempotent)."""
    if _ORIGINALS or torch._C._get_accelerator().type != GPUPOOL:
        return
    for name, hook in _HOOKS.items():
        _ORIGINALS[name] = getattr(torch._C, name)
        setattr(torch._C, name, hook)


def uninstall() -> None:
    """Put torch's own back (tests that compare both in one process)."""
    for name, original in _ORIGINALS.items():
        setattr(torch._C, name, original)
    _ORIGINALS.clear()
