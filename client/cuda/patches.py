"""The rest of `--cuda`: torch.load's map_location, autocast/GradScaler, and the calls that cannot work.

- `torch.load`: CUDA map_locations go to gpupool; a checkpoint saved on a real GPU (locations `cuda:N`)
  loads onto `gpupool:N` without a map_location, like on the machine that saved it.
- `torch.autocast("cuda")`, `torch.amp.GradScaler("cuda")` and their `torch.cuda.amp` spellings use the
  gpupool device, with torch's CUDA cast policy (amp.py); so do the questions about it (`torch.is_autocast_enabled
  ("cuda")`, `get_autocast_dtype("cuda")`, ...) and `torch.amp.custom_fwd/custom_bwd(device_type="cuda")`.
- `torch.compile`: the model or function itself, run eagerly (one line on stderr the first time).
- CUDA extensions, `torch.nn.DataParallel` over "cuda" devices: one RuntimeError naming the call.
(`nccl` is mapped onto the gpupool collective backend by nccl.py; under the C++ client, which has no collectives,
it is refused there, and DataParallel here.)
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from .. import checkpoints
from . import amp, devices, nccl
from .devices import GPUPOOL, map_location, to_gpupool

_installed: list[Any] = []


def _gpupool_target(location: Any) -> torch.device | None:
    """The gpupool device a saved location (`cuda:N`, `gpupool:N`) or a map_location value means, else None."""
    mapped = map_location(location)
    if isinstance(mapped, str) and mapped.startswith(GPUPOOL):
        mapped = torch.device(mapped)
    return mapped if isinstance(mapped, torch.device) and mapped.type == GPUPOOL else None


def _saved_location(key: str) -> str:
    """The location this process saves for the device a dict map_location's key names: `{"cuda:0": "cpu"}` of a
    checkpoint saved here from `"cuda"` tensors (locations `gpupool:0`) loads onto the CPU, as on a GPU machine (until
    round 47 its tensors stayed on the device), and the DDP tutorial's `{"cuda:0": f"cuda:{rank}"}` onto the rank's
    own device."""
    mapped = map_location(key)
    return mapped if isinstance(mapped, str) else key


_MODULE_APPLY = torch.nn.Module._apply
_applying = threading.local()


def _apply_keeping_ties(self: torch.nn.Module, fn: Callable[..., Any], recurse: bool = True) -> Any:
    """Module._apply (what `.cuda()`, `.to(device)`, `.half()` run) keeping the module's tensors the same Python
    objects, as on a CUDA GPU. torch moves a CPU parameter onto a CUDA GPU in place (`param.data = moved`), so an
    optimizer built before `model.cuda()` still holds the model's parameters, and a weight tied between two modules
    (`decoder.weight = encoder.weight`: GPT-2, nanoGPT, word_language_model --tied) stays one Parameter. Onto a
    PrivateUse1 device torch cannot (c10's has_compatible_shallow_copy_type knows no PrivateUse1 backend): it makes a
    new Parameter at each module that holds one, so the optimizer updated nothing and tied weights trained apart.
    After torch's _apply, each tensor torch replaced takes the new one's contents (torch.utils.swap_tensors, what
    torch's own `swap_module_params_on_conversion` does) and goes back in its place, in every module that held it."""
    if getattr(_applying, "on", False) or not recurse:
        return _MODULE_APPLY(self, fn, recurse)
    held = [(table, name, t) for m in self.modules() for table in (m._parameters, m._buffers)
            for name, t in table.items() if t is not None]  # fmt: skip
    _applying.on = True
    try:
        out = _MODULE_APPLY(self, fn, recurse)
    finally:
        _applying.on = False
    kept: dict[int, Any] = {}
    for table, name, t in held:
        if id(t) not in kept:
            new = table[name]
            kept[id(t)] = new
            if new is not t:
                try:
                    torch.utils.swap_tensors(t, new)
                    kept[id(t)] = t
                except RuntimeError:  # t is referenced elsewhere (weakrefs, an autograd graph): keep torch's new one
                    pass
        table[name] = kept[id(t)]
    checkpoints.refresh_flat_weights(self)  # what torch's _apply left pointing at the objects it made
    return out


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


_CUSTOM_FWD = torch.amp.custom_fwd
_CUSTOM_BWD = torch.amp.custom_bwd


def _custom_fwd(fwd: Any = None, *, device_type: str, cast_inputs: torch.dtype | None = None) -> Any:
    """`torch.amp.custom_fwd(device_type="cuda")` (and `torch.cuda.amp.custom_fwd`, which calls it) on gpupool: torch's
    decorator asks the autocast state of its device_type and casts the inputs of that device type, so with "cuda" it
    saw CUDA's autocast off under `autocast("cuda")` (gpupool's): `cast_inputs=torch.float32` cast nothing (a
    bfloat16 input met a float32 one in the forward: "expected m1 and m2 to have the same dtype"), and the backward ran
    with autocast off where a GPU's runs it as its forward did."""
    return _CUSTOM_FWD(fwd, device_type=_device_type(device_type), cast_inputs=cast_inputs)


def _custom_bwd(bwd: Any = None, *, device_type: str) -> Any:
    """`torch.amp.custom_bwd(device_type="cuda")` on gpupool (see `_custom_fwd`)."""
    return _CUSTOM_BWD(bwd, device_type=_device_type(device_type))


def _autocast_query(func: Callable[..., Any], cuda_first: bool) -> Callable[..., Any]:
    """torch's autocast state function `func` with a `"cuda"` device_type read as gpupool's, as `autocast("cuda")`
    is gpupool's: `torch.is_autocast_enabled("cuda")` was False inside `torch.autocast("cuda")` and
    `get_autocast_dtype("cuda")` float16 under a bfloat16 one. `cuda_first`: the function's older form without a
    device_type is CUDA's (`is_autocast_enabled()`, `set_autocast_enabled(True)`)."""

    @functools.wraps(func)
    def query(*args: Any, **kwargs: Any) -> Any:
        if "device_type" in kwargs:
            kwargs["device_type"] = _device_type(kwargs["device_type"])
        elif args and isinstance(args[0], str):
            args = (_device_type(args[0]), *args[1:])
        elif cuda_first and len(args) + len(kwargs) < 2:
            args = (GPUPOOL, *args)
        return func(*args, **kwargs)

    return query


def _gpu_dtype(func: Callable[..., Any]) -> Callable[..., Any]:
    """torch's deprecated `get_autocast_gpu_dtype()` / `set_autocast_gpu_dtype(dtype)`: CUDA's, so gpupool's."""

    @functools.wraps(func)
    def gpu(*args: Any) -> Any:
        return func(GPUPOOL, *args)

    return gpu


def _map_autocast_queries() -> None:
    for name, cuda_first in (("is_autocast_enabled", True), ("get_autocast_dtype", False),
                             ("set_autocast_enabled", True), ("set_autocast_dtype", False)):  # fmt: skip
        devices.patch(torch, name, _autocast_query(getattr(torch, name), cuda_first))
    devices.patch(torch, "get_autocast_gpu_dtype", _gpu_dtype(torch.get_autocast_dtype))
    devices.patch(torch, "set_autocast_gpu_dtype", _gpu_dtype(torch.set_autocast_dtype))
    for module in (torch.amp, torch.amp.autocast_mode):
        devices.patch(module, "custom_fwd", _custom_fwd)
        devices.patch(module, "custom_bwd", _custom_bwd)


def _refuse(name: str, why: str) -> Callable[..., Any]:
    def refused(*_: Any, **__: Any) -> Any:
        raise RuntimeError(f"{name} is not available on a pooled GPU (gpupool run --cuda): {why}")

    return refused


_compile_said: list[bool] = []


def _compile_eagerly(model: Any = None, **options: Any) -> Any:
    """`torch.compile` under --cuda: the model or function itself, run eagerly, and one line on stderr the first time.
    Dynamo/Inductor cannot trace gpupool's tensors (and Triton kernels need a local GPU), so compiling fails; a
    compiled model computes what the eager one does, so the script's numbers are the same (nanoGPT's train.py compiles
    by default, timm's and torchvision's reference scripts on a flag; refused, with one RuntimeError, until round 42).
    `torch.compile(model)`, `@torch.compile`, `@torch.compile(mode=...)` and `model.compile()` (which calls this)."""
    if not _compile_said:
        _compile_said.append(True)
        logging.getLogger("gpupool.cuda").warning(
            "torch.compile runs eagerly on a pooled GPU: Dynamo/Inductor cannot trace gpupool's tensors (docs/cuda.md)"
        )
    if model is None:  # a decorator with options: @torch.compile(mode="max-autotune")
        return lambda fn: fn
    return model


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

    torch.load = checkpoints.wrap_load(checkpoints.unwrapped(torch.load), _gpupool_target, _saved_location)
    torch.serialization.load = torch.load
    amp.install()
    from torch.amp import GradScaler, autocast
    from torch.utils._device import DeviceContext

    _patch_init(autocast, "device_type", 0)
    _patch_init(DeviceContext, "device", 0)  # torch.set_default_device("cuda"), `with torch.device("cuda"):`
    _patch_init(GradScaler, "device", 0)
    _map_autocast_queries()
    torch.nn.Module._apply = _apply_keeping_ties  # type: ignore[method-assign]
    from .. import native

    nccl.install()
    if native.active():  # the C++ client: DataParallel refused here
        _refuse_data_parallel()
    else:
        from ..torch import backend

        backend.DATA_PARALLEL_REFUSED.add("cuda")  # DataParallel's "cuda" devices are gpupool's (backend.py says why)
    torch.compile = _compile_eagerly  # type: ignore[assignment]
    if CPP_EXTENSION in sys.modules:
        _refuse_extensions(sys.modules[CPP_EXTENSION])
    else:  # refused when the script imports it: its import (setuptools) is ~0.2-0.35 s of CPU a process that never does
        sys.meta_path.insert(0, _RefuseAtImport())
    _installed.append(True)


CPP_EXTENSION = "torch.utils.cpp_extension"


def _refuse_extensions(ext: ModuleType) -> None:
    why = "custom CUDA kernels run on a local GPU only; the daemon runs aten ops"
    for name in ("load", "load_inline", "CUDAExtension"):
        setattr(ext, name, _refuse(f"{CPP_EXTENSION}.{name}", why))


class _RefuseAtImport(importlib.abc.MetaPathFinder):
    """Finds torch.utils.cpp_extension's own spec (the finders after this one) and refuses its CUDA extensions as soon
    as the module has run: `import torch.utils.cpp_extension as ext; ext.load(...)` and `from torch.utils.cpp_extension
    import load` get the refusal as when install() imported it (until round 55, in every --cuda process)."""

    _looking = False  # (an import of the module holds its lock: one lookup at a time)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != CPP_EXTENSION or self._looking:
            return None
        self._looking = True  # the lookup below asks the finders after this one (sys.meta_path stays as it is: a list
        try:  # another thread's import may be walking)
            spec = importlib.util.find_spec(name)
        finally:
            self._looking = False
        if spec is not None and spec.loader is not None:
            spec.loader = _RefusingLoader(spec.loader)
        return spec


class _RefusingLoader(importlib.abc.Loader):
    """The module's own loader (its get_source and the rest, for tracebacks), but the refusals set after it ran."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _refuse_extensions(module)
