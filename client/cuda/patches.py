"""The rest of `--cuda`: torch.load's map_location, autocast/GradScaler, and the calls that cannot work.

- `torch.load`: CUDA map_locations go to gpupool; a checkpoint saved on a real GPU (locations `cuda:N`)
  loads onto `gpupool:N` without a map_location, like on the machine that saved it.
- `torch.autocast("cuda")`, `torch.amp.GradScaler("cuda")` and their `torch.cuda.amp` spellings use the
  gpupool device, with torch's CUDA cast policy (amp.py).
- `torch.compile`, CUDA extensions, `torch.nn.DataParallel` over "cuda" devices: one RuntimeError naming the call.
(`nccl` is mapped onto the gpupool collective backend by nccl.py; under the C++ client, which has no collectives,
it is refused there, and DataParallel here.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.serialization import default_restore_location
from torch.utils._pytree import tree_map_only

from . import amp, nccl
from .devices import GPUPOOL, map_location, to_gpupool

_installed: list[Any] = []


def _gpupool_target(location: Any) -> torch.device | None:
    """The gpupool device a saved location (`cuda:N`, `gpupool:N`) or a map_location value means, else None."""
    mapped = map_location(location)
    if isinstance(mapped, str) and mapped.startswith(GPUPOOL):
        mapped = torch.device(mapped)
    return mapped if isinstance(mapped, torch.device) and mapped.type == GPUPOOL else None


def _wrap_load(load: Callable[..., Any]) -> Callable[..., Any]:
    """torch.load that lands CUDA (and gpupool) storages on gpupool devices.

    Storages are restored on the CPU and the loaded tensors then moved (torch restores a storage onto a
    device through `torch.<device>.device(...)`/untyped storages, which the gpupool shim has no use for).
    A callable map_location, or one naming the CPU, goes to torch unchanged."""

    @functools.wraps(load)
    def wrapped(f: Any, map_location_: Any = None, *args: Any, **kwargs: Any) -> Any:
        if "map_location" in kwargs:
            map_location_ = kwargs.pop("map_location")
        if callable(map_location_):
            return load(f, map_location_, *args, **kwargs)
        fixed = None if map_location_ is None or isinstance(map_location_, dict) else _gpupool_target(map_location_)
        if map_location_ is not None and not isinstance(map_location_, dict) and fixed is None:
            return load(f, map_location_, *args, **kwargs)  # e.g. "cpu"
        table = map_location_ if isinstance(map_location_, dict) else {}
        targets: dict[int, torch.device] = {}

        def restore(storage: Any, location: str) -> Any:
            location = table.get(location, location)
            target = fixed or _gpupool_target(location)
            if target is None:
                return default_restore_location(storage, location)
            targets[storage.data_ptr()] = target
            return storage

        loaded = load(f, restore, *args, **kwargs)
        return tree_map_only(torch.Tensor, lambda t: _move(t, targets), loaded)

    return wrapped


def _move(t: torch.Tensor, targets: dict[int, torch.device]) -> torch.Tensor:
    target = targets.get(t.untyped_storage().data_ptr()) if t.device.type == "cpu" else None
    if target is None:
        return t
    moved = t.to(target)
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(moved, requires_grad=t.requires_grad)
    return moved


def _device_type(value: Any) -> Any:
    """Autocast's device_type "cuda", or a CUDA device (DeviceContext's), on gpupool."""
    return GPUPOOL if value == "cuda" else to_gpupool(value)


def _patch_init(cls: type, arg: str, position: int) -> None:
    """Map a `"cuda"` device_type/device argument of `cls.__init__` (by keyword or at `position`)."""
    original = cls.__init__  # type: ignore[misc]

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if arg in kwargs:
            kwargs[arg] = _device_type(kwargs[arg])
        elif len(args) > position:
            args = (*args[:position], _device_type(args[position]), *args[position + 1 :])
        original(self, *args, **kwargs)

    cls.__init__ = init  # type: ignore[misc]


def _refuse(name: str, why: str) -> Callable[..., Any]:
    def refused(*_: Any, **__: Any) -> Any:
        raise RuntimeError(f"{name} is not available on a pooled GPU (gpupool run --cuda): {why}")

    return refused


def _refuse_data_parallel() -> None:
    """Under the C++ client, as the shim does (client/torch/backend.py): DataParallel over "cuda" devices would fail
    at its first forward in torch.cuda.comm's scatter, which torch builds for CUDA GPUs only. Refused before torch's
    __init__ runs (its balance check divides by the leased GPU's multiprocessor count, 0)."""
    from torch.nn.parallel import DataParallel
    from torch.nn.parallel.data_parallel import _get_available_device_type

    original = DataParallel.__init__

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if _get_available_device_type() in ("cuda", GPUPOOL):
            _refuse("torch.nn.DataParallel", "it scatters and gathers through CUDA-only kernels (torch.cuda.comm); "
                    "place the layers on the device yourself")()  # fmt: skip
        original(self, *args, **kwargs)

    DataParallel.__init__ = init  # type: ignore[method-assign]


def install() -> None:
    if _installed:
        return
    import torch.serialization

    torch.load = _wrap_load(torch.load)
    torch.serialization.load = torch.load
    amp.install()
    from torch.amp import GradScaler, autocast
    from torch.utils._device import DeviceContext

    _patch_init(autocast, "device_type", 0)
    _patch_init(DeviceContext, "device", 0)  # torch.set_default_device("cuda"), `with torch.device("cuda"):`
    _patch_init(GradScaler, "device", 0)
    from .. import native

    nccl.install()
    if native.active():  # the C++ client: DataParallel refused here
        _refuse_data_parallel()
    else:
        from ..torch import backend

        backend.DATA_PARALLEL_REFUSED.add("cuda")  # DataParallel's "cuda" devices are gpupool's (backend.py says why)
    torch.compile = _refuse("torch.compile", "Dynamo/Inductor cannot trace gpupool's tensors; run eagerly")
    import torch.utils.cpp_extension as ext

    why = "custom CUDA kernels run on a local GPU only; the daemon runs aten ops"
    for name in ("load", "load_inline", "CUDAExtension"):
        setattr(ext, name, _refuse(f"torch.utils.cpp_extension.{name}", why))
    _installed.append(True)
