"""FSDP2 (`torch.distributed.fsdp.fully_shard`) of a model built on the CPU, onto a gpupool mesh.

`fully_shard` moves the module's CPU tensors onto the mesh's device in place, `tensor.data = tensor.to(device)`
(`_fsdp_init._move_states_to_device`), which torch allows between its own dense backends only (c10's
`has_compatible_shallow_copy_type` knows no PrivateUse1 device): "Attempted to call `variable.set_data(tensor)`, but
`variable` and `tensor` have incompatible tensor type". Here each such tensor takes the moved one's contents with
`torch.utils.swap_tensors` (what torch itself does for tensor subclasses there, and what `--cuda`'s Module.to does:
client/cuda/patches.py), so it stays the same Python object, as on a GPU; torch's own function then finds everything
on the device.

FSDP2 frees an unsharded parameter's memory between its uses with `untyped_storage().resize_(0)` and gets it back with
`resize_(n)` before the next all-gather writes it (`_fsdp_param.free_storage`/`alloc_storage`): the daemon resizes the
storage in place (Command.resize_storage, server/storage_resize.py; until round 37 neither client could, and the
unsharded parameters stayed, as with `reshard_after_forward=False`). On the C++ client torch's own functions do it
(`resizePrivateUse1Bytes`, client/native/native_client.cpp). The Python client's tensors are wrappers whose storages
torch will not resize ("an invalid python storage"), so there both functions are replaced for gpupool tensors by
client/torch/tensor.py `resize_storage`, the size they compare kept on the tensor (`storage_nbytes`).

The patches are put in when torch's module is imported (a script imports `fully_shard` before making its process
group, so usually already), never by importing FSDP itself (~1 s).
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import itertools
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

MODULE = "torch.distributed.fsdp._fully_shard._fsdp_init"
PARAM_MODULE = "torch.distributed.fsdp._fully_shard._fsdp_param"
GROUP_MODULE = "torch.distributed.fsdp._fully_shard._fsdp_param_group"
_installed: list[bool] = []


def _moving_in_place(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def move(params: list[torch.nn.Parameter], buffers: list[torch.Tensor], device: torch.device) -> Any:
        if device.type == torch._C._get_privateuse1_backend_name():
            from torch.utils._python_dispatch import is_traceable_wrapper_subclass

            for tensor in itertools.chain(params, buffers):
                if tensor.device.type != "cpu" or is_traceable_wrapper_subclass(tensor):
                    continue  # meta (deferred init), already there, a DTensor: torch's own checks
                with torch.no_grad():
                    moved = tensor.to(device)
                if isinstance(tensor, torch.nn.Parameter):
                    moved = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
                torch.utils.swap_tensors(tensor, moved)
        return original(params, buffers, device)

    move._gpupool = True  # type: ignore[attr-defined]
    return move


def _shim_tensor(tensor: torch.Tensor) -> bool:
    """A Python-client tensor (a wrapper: `_gp_rt`); the C++ client's are plain tensors torch resizes itself."""
    return tensor.device.type == torch._C._get_privateuse1_backend_name() and "_gp_rt" in tensor.__dict__


def _freeing(original: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    @functools.wraps(original)
    def free_storage(tensor: torch.Tensor) -> None:
        if not _shim_tensor(tensor):
            return original(tensor)
        from .torch.tensor import resize_storage, storage_nbytes

        if storage_nbytes(tensor) != 0:  # type: ignore[arg-type]
            resize_storage(tensor, 0)  # type: ignore[arg-type]

    free_storage._gpupool = True  # type: ignore[attr-defined]
    return free_storage


def _allocating(original: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    @functools.wraps(original)
    def alloc_storage(tensor: torch.Tensor) -> None:
        if not _shim_tensor(tensor):
            return original(tensor)
        from .torch.tensor import resize_storage, storage_nbytes

        size = tensor.numel() * tensor.itemsize
        if storage_nbytes(tensor) != size:  # type: ignore[arg-type]
            resize_storage(tensor, size)  # type: ignore[arg-type]

    alloc_storage._gpupool = True  # type: ignore[attr-defined]
    return alloc_storage


def _wrap(module: Any, name: str, wrapper: Callable[[Any], Any]) -> None:
    fn = getattr(module, name, None)
    if fn is not None and not getattr(fn, "_gpupool", False):
        setattr(module, name, wrapper(fn))


def _patch(module: Any) -> None:
    """The wrappers, where this torch has the functions (2.13 has; a torch without them keeps its own: the
    failures above, never a broken import of FSDP). `_fsdp_param_group` imports `alloc_storage` by name."""
    move = getattr(module, "_move_states_to_device", None)
    if move is not None and not getattr(move, "_gpupool", False):
        module._move_states_to_device = _moving_in_place(move)
    param: Any = sys.modules.get(PARAM_MODULE) or importlib.import_module(PARAM_MODULE)  # MODULE's package has it
    _wrap(param, "free_storage", _freeing)
    _wrap(param, "alloc_storage", _allocating)
    group: Any = sys.modules.get(GROUP_MODULE) or importlib.import_module(GROUP_MODULE)
    _wrap(group, "alloc_storage", _allocating)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches module `name` right after it is first executed (then leaves sys.meta_path)."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            self.patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Idempotent: patch torch's FSDP2 init now if it is imported, else when it is."""
    if _installed:
        return
    _installed.append(True)
    after_import(MODULE, _patch)


def after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """`patch(module)` now if torch's module `name` is imported, else right after it is first executed."""
    if name in sys.modules:
        patch(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, patch))
