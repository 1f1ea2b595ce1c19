"""`cuda` -> `gpupool`: device strings, objects and integer ids, `.cuda()`, `.to()`, `device=`, `is_cuda`.

One TorchFunctionMode, entered once and never left, sees every call of torch's Python API (factories,
Tensor methods, property reads) before it runs, so no list of patched functions can miss a factory. It
rewrites only CUDA device arguments; everything else passes through untouched. `cuda` without an index is
`gpupool` without one, which the shim reads as the current device (`torch.cuda.set_device`).

CUDA numbers are the lease's: `cuda:i` is lease device i. Under torchrun a rank sees its own lease device
LOCAL_RANK as `gpupool:0` (client/torch/api.py), so there `cuda:i` is `gpupool:(i - LOCAL_RANK) mod n`:
`cuda:LOCAL_RANK`, `model.to(local_rank)` and `torch.cuda.set_device(local_rank)` land on the rank's own device.

torch keeps TorchFunctionModes per thread, so threads started after `install()` enter the mode too, and every backward
runs with it (`_backward_in_mode`); threads that were running before do not. Limits (docs/cuda.md):
`torch.device("cuda")` objects stay CUDA-typed (the mapping happens where they are used), and a tensor's `.device`
says `gpupool:N`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

GPUPOOL = "gpupool"
_MODE: list[TorchFunctionMode] = []
_SHIFT: list[tuple[int, int]] = []  # (LOCAL_RANK shift, leased devices), read once


def _shift() -> tuple[int, int]:
    if not _SHIFT:
        from .. import native
        from ..pool import Lease

        lease = Lease.from_env() if os.environ.get("GPUPOOL_LEASE") else None
        n = len(lease.devices) if lease is not None else 1
        if native.active():  # the C++ client: one process holds the lease's devices in lease order, no torchrun shift
            _SHIFT.append((0, n))
        else:
            from ..torch.api import rank_shift

            _SHIFT.append((rank_shift(n), n))
    return _SHIFT[0]


def pool_index(cuda_index: int) -> int:
    """The gpupool index of CUDA device `cuda_index` (lease numbering; a torchrun rank's own device is gpupool:0)."""
    shift, n = _shift()
    return (cuda_index - shift) % n if shift and 0 <= cuda_index < n else cuda_index


def cuda_index(pool_index_: int) -> int:
    """The CUDA number a script sees for `gpupool:<pool_index_>` (the inverse of `pool_index`)."""
    shift, n = _shift()
    return (pool_index_ + shift) % n if shift and 0 <= pool_index_ < n else pool_index_


def is_cuda_device(value: Any) -> bool:
    """A CUDA device argument: "cuda", "cuda:N", torch.device("cuda", N)."""
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return isinstance(value, torch.device) and value.type == "cuda"


def to_gpupool(value: Any) -> Any:
    """The gpupool device for a CUDA device argument or an integer id; anything else unchanged."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return torch.device(GPUPOOL, pool_index(value))
    if isinstance(value, str) and is_cuda_device(value):
        value = torch.device(value)
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device(GPUPOOL) if value.index is None else torch.device(GPUPOOL, pool_index(value.index))
    return value


def map_location(value: Any) -> Any:
    """A `map_location` of torch.load with CUDA devices mapped (strings, devices, dicts of location strings)."""
    if isinstance(value, dict):
        return {k: _location_str(v) for k, v in value.items()}
    if isinstance(value, str | torch.device | int) and not isinstance(value, bool):
        mapped = to_gpupool(value)
        return str(mapped) if isinstance(value, str) and isinstance(mapped, torch.device) else mapped
    return value


def _location_str(value: Any) -> Any:
    mapped = to_gpupool(value)
    return str(mapped) if isinstance(mapped, torch.device) else mapped


def _to(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # Tensor.to(device=None, dtype=None, ...), Tensor.to(dtype), Tensor.to(other): only a device moves.
    if len(args) > 1 and (isinstance(args[1], str | int | torch.device)) and not isinstance(args[1], bool):
        args = (args[0], to_gpupool(args[1]), *args[2:])
    if "device" in kwargs:
        kwargs["device"] = to_gpupool(kwargs["device"])
    return func(*args, **kwargs)


def _cuda(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # Tensor.cuda(device=None, non_blocking=False, memory_format=torch.preserve_format)
    self, rest = args[0], list(args[1:])
    device = kwargs.pop("device", rest.pop(0) if rest else None)
    non_blocking = kwargs.pop("non_blocking", rest.pop(0) if rest else False)
    target = torch.device(GPUPOOL) if device is None else to_gpupool(device)
    return self.to(target, non_blocking=non_blocking, **kwargs)


def _parse_to(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # Module.to(device) parses its arguments here first: an integer id would become the accelerator's (gpupool:N)
    if args and isinstance(args[0], str | int | torch.device) and not isinstance(args[0], bool):
        args = (to_gpupool(args[0]), *args[1:])
    if "device" in kwargs:
        kwargs["device"] = to_gpupool(kwargs["device"])
    return func(*args, **kwargs)


def _is_cuda(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0].device.type == GPUPOOL or func(*args, **kwargs)


def _special(func: Any) -> Callable[..., Any] | None:
    if func is torch.Tensor.to:
        return _to
    if func is torch.Tensor.cuda:
        return _cuda
    if func is torch._C._nn._parse_to:
        return _parse_to
    owner = getattr(func, "__self__", None)  # a property read: `is_cuda.__get__`
    if getattr(func, "__name__", "") == "__get__" and getattr(owner, "__name__", "") == "is_cuda":
        return _is_cuda
    return None


class CudaToGpupool(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the leased gpupool devices."""

    def __init__(self) -> None:
        super().__init__()
        self._handlers: dict[Any, Callable[..., Any] | None] = {}

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        try:
            handler = self._handlers[func]
        except (KeyError, TypeError):
            handler = _special(func)
            try:
                self._handlers[func] = handler
            except TypeError:  # unhashable callables are looked at every time
                pass
        if handler is not None:
            return handler(func, args, dict(kwargs) if kwargs else {})
        if not kwargs:
            return func(*args)
        device = kwargs.get("device")
        if device is not None and (is_cuda_device(device) or (isinstance(device, int) and device is not False)):
            kwargs = {**kwargs, "device": to_gpupool(device)}
        return func(*args, **kwargs)


def install() -> None:
    """Enter the mode for good (idempotent), in this thread and in every thread started from now on."""
    if _MODE:
        return
    mode = CudaToGpupool()
    mode.__enter__()
    _MODE.append(mode)
    start = threading.Thread.start

    def start_with_mode(thread: threading.Thread) -> None:
        run = thread.run

        def run_with_mode() -> None:
            with _entered(mode):
                run()

        thread.run = run_with_mode  # type: ignore[method-assign]
        start(thread)

    threading.Thread.start = start_with_mode  # type: ignore[method-assign,assignment]
    _backward_in_mode(mode)


def _backward_in_mode(mode: TorchFunctionMode) -> None:
    """Run the autograd engine with the mode on. torch calls a mode's `__torch_function__` with the mode off, and
    `loss.backward()` and `torch.autograd.grad` reach the engine from inside it (`Tensor.backward` is a torch
    function): without this, Python `autograd.Function.backward` code that makes `device="cuda"` tensors would see
    plain torch and fail. The engine keeps the caller's thread-local state (the mode stack included) for the
    nodes it runs, on the calling thread (the shim: client/torch/backend.py) or on its device thread (the C++
    client)."""
    import torch.autograd as autograd

    inner = autograd._engine_run_backward
    if getattr(inner, "_gpupool_mode", False):
        return

    def run_backward(*args: Any, **kwargs: Any) -> Any:
        if mode in torch.overrides._get_current_function_mode_stack():
            return inner(*args, **kwargs)
        with _entered(mode):
            return inner(*args, **kwargs)

    run_backward._gpupool_mode = True  # type: ignore[attr-defined]
    autograd._engine_run_backward = run_backward


class _entered:
    """Enter a mode on this thread's stack for the duration (torch keeps mode stacks per thread)."""

    def __init__(self, mode: TorchFunctionMode) -> None:
        self.mode = mode

    def __enter__(self) -> None:
        self.mode.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)
