"""`cuda` -> `gpupool`: device strings, objects and integer ids, `.cuda()`, `.to()`, `device=`, `is_cuda`.

The mapping wraps the torch functions that can take a device, found in torch itself at install time (so a factory
a new torch adds is wrapped with no change here): every builtin of torch's Python namespaces (`torch`, `torch.Tensor`,
`torch.fft`, `torch.nested`, `torch.sparse`, `torch._C._nn`, ...) that an aten schema with a `device` argument
names (`torch._C._jit_get_all_schemas()`: `zeros`, `randn`, `*_like`, `new_*`, `tensor`, `fft_fftfreq`, ...) or
whose docstring signature has one (the Python-only bindings: `asarray`, `new_tensor`, ...). Their `device=`
is rewritten before torch parses it; `Tensor.to`, `Tensor.cuda`, `torch._C._nn._parse_to` (what `Module.to`
parses) and `Tensor.is_cuda` have their own wrappers. Every other torch call (a module's forward, an
optimizer's `_foreach_` ops, autograd) runs untouched at torch's own speed: round 17 replaced a
TorchFunctionMode that saw every call (BENCHMARKS.md, "Round 17, cuda17"). `cuda` without an index is
`gpupool` without one, which the shim reads as the current device (`torch.cuda.set_device`).

CUDA numbers are the lease's: `cuda:i` is lease device i. Under torchrun a rank sees its own lease device
LOCAL_RANK as `gpupool:0` (client/torch/api.py), so there `cuda:i` is `gpupool:(i - LOCAL_RANK) mod n`:
`cuda:LOCAL_RANK`, `model.to(local_rank)` and `torch.cuda.set_device(local_rank)` land on the rank's own device.

torch.accelerator answers the script as CUDA would on a GPU machine: `current_accelerator()` is `cuda` and its device
numbers (`set_device_index(local_rank)`, `current_device_index()`, `device_index(i)`, `synchronize(i)`, ...) are CUDA's,
so an accelerator-style script (`torch.device(f"{acc}:{local_rank}")`) lands on the rank's own device too. torch's own
code, which hands torch.accelerator gpupool's numbers (a tensor's `device.index`) and expects its device type, still
gets gpupool's: the wrappers look at their caller's module (`_scripts_call`).

The wrappers replace module and class attributes, so every thread and every backward sees them; code that took
a reference to a torch function before `install()` (during `import torch`) keeps torch's own. Limits
(docs/cuda.md): `torch.device("cuda")` objects stay CUDA-typed (the mapping happens where they are used), and a
tensor's `.device` says `gpupool:N`.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

GPUPOOL = "gpupool"
_PATCHED: list[tuple[Any, str, Any]] = []  # (owner, name, what owner.__dict__ held: _MISSING if nothing)
_MISSING = object()
_SHIFT: list[tuple[int, int]] = []  # (LOCAL_RANK shift, leased devices), read once


def _shift() -> tuple[int, int]:
    if not _SHIFT:
        from ..pool import Lease

        lease = Lease.from_env() if os.environ.get("GPUPOOL_LEASE") else None
        n = len(lease.devices) if lease is not None else 1
        # a torchrun rank sees its own leased device as gpupool:0 (both clients: client/torch/api.py rank_shift)
        _SHIFT.append((int(os.environ.get("LOCAL_RANK") or 0) if n > 1 else 0, n))
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


def _is_mapped(device: Any) -> bool:
    """A device argument the mapping rewrites: a CUDA device or an integer id."""
    if isinstance(device, int):
        return device is not True and device is not False
    return is_cuda_device(device)


def _mapping_device_kwarg(func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` with a CUDA (or integer) `device=` keyword rewritten to gpupool (torch's factories take it by keyword)."""

    def mapped(*args: Any, **kwargs: Any) -> Any:
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _is_mapped(device):
                kwargs["device"] = to_gpupool(device)
            if kwargs.get("pin_memory"):  # plain host memory (`torch.empty(n, pin_memory=True)`): see tensor_to
                kwargs["pin_memory"] = False
        return func(*args, **kwargs)

    return _named_after(mapped, func)


def _named_after(wrapper: Callable[..., Any], func: Any) -> Callable[..., Any]:
    """`wrapper` with `func`'s name and docstring, and `func` as `_gpupool_cuda`. No `__wrapped__`: TorchScript
    would unwrap it to the builtin, which `dir(torch)` no longer shows, where the wrapper is its builtin op."""
    functools.update_wrapper(wrapper, func, updated=())
    del wrapper.__wrapped__  # type: ignore[attr-defined]
    wrapper._gpupool_cuda = func  # type: ignore[attr-defined]
    return wrapper


_TENSOR_TO = torch.Tensor.to
_TENSOR_IS_CUDA = vars(torch._C.TensorBase)["is_cuda"]  # the property's descriptor
_PARSE_TO = torch._C._nn._parse_to


def _device_first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    # A device given first (`.to("cuda")`, `.to(0)`, `Module.to(local_rank)`) or by keyword; a dtype or a tensor
    # given first stays as it is.
    if args and isinstance(args[0], str | int | torch.device) and not isinstance(args[0], bool):
        args = (to_gpupool(args[0]), *args[1:])
    if "device" in kwargs:
        kwargs["device"] = to_gpupool(kwargs["device"])
    return args


def sparse_refused(what: str, layout: Any) -> RuntimeError:
    """The one error for a sparse tensor that would live on a gpupool device, which holds strided tensors only. torch
    would fail later with its own words (COO: "Could not run '..._sparse_coo_tensor_with_dims_and_tensors' ... from
    the 'Sparsegpupool' backend", or the shim's "layout torch.sparse_coo is not supported"), or make a CSR tensor on
    the device whose every op fails ("values expected sparse tensor layout but got SparseCsr")."""
    return RuntimeError(
        f"sparse tensors are not available on a pooled GPU (gpupool run --cuda): {what} would put a {layout} tensor "
        "on the gpupool device, which holds dense (strided) tensors only; keep the sparse tensor and its ops on the "
        "CPU, or make it dense first (`.to_dense()`: torch.spmm and `@` take dense tensors too) (docs/cuda.md)"
    )


# Pinned host memory is plain host memory on a pooled GPU (uploads and downloads go over the network, not by DMA), as
# `tensor.pin_memory()` is (client/torch/backend.py `_pin_memory`). torch makes a pinned CPU tensor through the
# device's hooks (`getPinnedMemoryAllocator`), which neither client has: a factory's `pin_memory=True` and a
# non-blocking copy to the CPU (`x.to("cpu", non_blocking=True)`, which torch lands in pinned memory) raised torch's
# "You should register `PrivateUse1HooksInterface` ... `getPinnedMemoryAllocator`" until round 56. Now the factory
# makes plain memory and the copy waits for the tensor's value, which is what a non-blocking copy holds once the
# script synchronizes (a GPU script must synchronize before it reads it; here it need not).


def tensor_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Tensor.to(device=None, dtype=None, ...), Tensor.to(dtype), Tensor.to(other): only a device moves. A device
    tensor's non-blocking copy to the CPU is a blocking one (pinned memory: above)."""
    if self.layout is not torch.strided:
        return _sparse_to(self, *_device_first(args, kwargs), **kwargs)
    args = _device_first(args, kwargs)
    if (kwargs.get("non_blocking") or any(a is True for a in args)) and self.device.type == GPUPOOL:
        first = kwargs.get("device", args[0] if args else None)
        target = first.device if isinstance(first, torch.Tensor) else first
        if isinstance(target, str | torch.device) and torch.device(target).type == "cpu":
            if kwargs.get("non_blocking"):
                kwargs["non_blocking"] = False
            else:  # positional: `.to(device, dtype, non_blocking)` (Module.to's), `.to(dtype | other, non_blocking)`
                at = next(i for i, a in enumerate(args) if a is True)
                args = (*args[:at], False, *args[at + 1 :])
    return _TENSOR_TO(self, *args, **kwargs)


def _sparse_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    device = _PARSE_TO(*args, **kwargs)[0]
    if device is not None and device.type == GPUPOOL:
        raise sparse_refused(".to()", self.layout)
    return _TENSOR_TO(self, *args, **kwargs)


def tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    """Tensor.cuda(device=None, non_blocking=False, memory_format=torch.preserve_format)."""
    if self.layout is not torch.strided:
        raise sparse_refused(".cuda()", self.layout)
    target = torch.device(GPUPOOL) if device is None else to_gpupool(device)
    return _TENSOR_TO(self, target, non_blocking=non_blocking, **kwargs)


def _refusing_sparse_on_device(func: Callable[..., Any]) -> Callable[..., Any]:
    """A sparse factory (`torch.sparse_coo_tensor(..., device="cuda")`) with its device mapped, refused where that is
    gpupool; or a `Tensor.to_sparse*` method, refused on a gpupool tensor."""
    name = func.__name__

    def factory(*args: Any, **kwargs: Any) -> Any:
        device = kwargs.get("device")
        if device is not None and _is_mapped(device):
            kwargs["device"] = to_gpupool(device)
        if device is not None and torch.device(kwargs["device"]).type == GPUPOOL:
            raise sparse_refused(f"torch.{name}(device={str(device)!r})", "sparse " + name.split("_")[1].upper())
        return func(*args, **kwargs)

    def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.device.type == GPUPOOL:
            raise sparse_refused(f"Tensor.{name}() of a tensor on {self.device}", "sparse")
        return func(self, *args, **kwargs)

    return _named_after(method if name.startswith("to_sparse") else factory, func)


def parse_to(*args: Any, **kwargs: Any) -> Any:
    """torch._C._nn._parse_to, which Module.to(...) calls first: an integer id would become the accelerator's."""
    return _PARSE_TO(*_device_first(args, kwargs), **kwargs)


def _is_cuda(self: torch.Tensor) -> bool:
    return self.device.type == GPUPOOL or bool(_TENSOR_IS_CUDA.__get__(self))


# Where torch's device-taking builtins live, as Python sees them (a builtin reachable under two names, such as
# torch.fft.fftfreq and torch._C._fft.fft_fftfreq, is wrapped under both).
_NAMESPACES = ("torch", "torch.Tensor", "torch._C._nn", "torch.fft", "torch._C._fft", "torch.linalg",
               "torch._C._linalg", "torch.special", "torch._C._special", "torch.nested", "torch._C._nested",
               "torch.sparse", "torch._C._sparse")  # fmt: skip
_OWN = {"to", "cuda", "_parse_to"}  # their own wrappers above
# Sparse factories and conversions, refused onto a gpupool device (sparse_refused)
_SPARSE_FACTORIES = {"sparse_coo_tensor", "sparse_csr_tensor", "sparse_csc_tensor", "sparse_bsr_tensor",
                     "sparse_bsc_tensor", "sparse_compressed_tensor"}  # fmt: skip
_TO_SPARSE = ("to_sparse", "to_sparse_coo", "to_sparse_csr", "to_sparse_csc", "to_sparse_bsr", "to_sparse_bsc")
_UNDOCUMENTED = {"nested_tensor"}  # torch._C._nested.nested_tensor(list, *, dtype, device, ...): no schema nor doc
_SIGNATURE_DEVICE = re.compile(r"\bdevice\b")


def _namespace(dotted: str) -> Any:
    obj: Any = torch
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def device_functions() -> Iterator[tuple[Any, str, Callable[..., Any]]]:
    """(owner, attribute, builtin) for every torch builtin that can take a `device` argument."""
    schema_names = {
        schema.name.partition("::")[2]
        for schema in torch._C._jit_get_all_schemas()
        if any(arg.name == "device" for arg in schema.arguments)
    }
    for dotted in _NAMESPACES:
        owner = _namespace(dotted)
        for name, func in list(vars(owner).items()):
            if name in _OWN or not isinstance(func, types.BuiltinFunctionType | types.MethodDescriptorType):
                continue
            doc = (func.__doc__ or "").lstrip().split("\n", 1)[0]
            if func.__name__ in schema_names or func.__name__ in _UNDOCUMENTED or _SIGNATURE_DEVICE.search(doc):
                yield owner, name, func
        if owner is torch.Tensor:  # TensorBase's methods, as torch.Tensor shows them
            for name, func in list(vars(torch._C.TensorBase).items()):
                if name in _OWN or name in vars(owner) or not isinstance(func, types.MethodDescriptorType):
                    continue
                doc = (func.__doc__ or "").lstrip().split("\n", 1)[0]
                if func.__name__ in schema_names or _SIGNATURE_DEVICE.search(doc):
                    yield owner, name, func


def patch(owner: Any, name: str, new: Any) -> None:
    """`owner.name = new`, undone by `uninstall()` (TorchScript told that `new` stands for the builtin it replaces)."""
    old = vars(owner).get(name, _MISSING)
    _PATCHED.append((owner, name, old))
    setattr(owner, name, new)
    from torch.jit import _builtins  # TorchScript knows torch's builtins by identity (its table is built at import)

    op = _builtins._find_builtin(old) if old is not _MISSING else None
    if op is not None:
        _builtins._register_builtin(new, op)


_OWN_CODE = ("torch.", "gpupool.")  # modules whose torch.accelerator calls use gpupool's numbers (torch's, gpupool's)
_ACC_INDEX = torch.accelerator._get_device_index  # type: ignore[attr-defined]
_ACC_CURRENT = torch.accelerator.current_accelerator
_ACC_GUARD = torch.accelerator.device_index


def _scripts_call(depth: int) -> bool:
    """Whether the frame `depth` levels above the caller of this function is the script's code (or a library's), not
    torch's or gpupool's own: torch passes torch.accelerator gpupool's numbers (a tensor's `device.index`)."""
    name = sys._getframe(depth + 1).f_globals.get("__name__", "")
    return not (name == "torch" or name.startswith(_OWN_CODE))


def _accelerator_device(device: Any) -> Any:
    """A script's device argument to torch.accelerator in gpupool's numbers: an integer or a CUDA device mapped."""
    if isinstance(device, int) and not isinstance(device, bool):
        return pool_index(device)
    return to_gpupool(device) if is_cuda_device(device) else device


def accelerator_index(device: Any, optional: bool = False) -> int:
    """torch.accelerator's `_get_device_index` (set_device_index, synchronize, current_stream, the memory functions)
    with the script's CUDA numbers mapped; its callers' callers that are torch's own code pass gpupool's."""
    return _ACC_INDEX(_accelerator_device(device) if _scripts_call(2) else device, optional)  # type: ignore[no-any-return]


def current_accelerator(check_available: bool = False) -> torch.device | None:
    """`cuda` for the script where the accelerator is gpupool (torch's own code gets `gpupool`)."""
    acc = _ACC_CURRENT(check_available)
    return torch.device("cuda") if acc is not None and acc.type == GPUPOOL and _scripts_call(1) else acc


def current_device_index() -> int:
    """The current device in CUDA numbers for the script (torch's own code gets gpupool's)."""
    index = torch._C._accelerator_getDeviceIndex()
    return cuda_index(index) if _scripts_call(1) else index


def current_device_idx() -> int:
    """torch.accelerator's deprecated name of current_device_index, answering as it does (torch's alias wraps its own
    function, so until round 36 it answered gpupool's numbers where current_device_index answered CUDA's)."""
    warnings.warn("Use `current_device_index` instead.", FutureWarning, stacklevel=2)  # torch's own warning
    index = torch._C._accelerator_getDeviceIndex()
    return cuda_index(index) if _scripts_call(1) else index


class device_index(_ACC_GUARD):  # type: ignore[misc,valid-type]  # noqa: N801 - torch.accelerator's name
    """`with torch.accelerator.device_index(i):` in CUDA numbers for the script (torch's own code: gpupool's)."""

    def __init__(self, device: int | None, /) -> None:
        super().__init__(pool_index(device) if device is not None and _scripts_call(1) else device)


def _install_accelerator() -> None:
    import torch.accelerator.memory as memory

    patch(torch.accelerator, "_get_device_index", accelerator_index)
    patch(memory, "_get_device_index", accelerator_index)
    for new in (current_accelerator, current_device_index, current_device_idx, device_index):
        patch(torch.accelerator, new.__name__, new)


def install() -> None:
    """Wrap torch's device-taking functions (idempotent); `uninstall()` puts torch's own back."""
    if _PATCHED:
        return
    from torch.utils._device import _device_constructors

    _device_constructors()  # `with torch.device(...)`'s mode matches torch's own builtins: cache them unwrapped
    wrapped: dict[int, Callable[..., Any]] = {}
    for owner, name, func in list(device_functions()):
        if id(func) not in wrapped:
            sparse = name in _SPARSE_FACTORIES and owner is torch
            wrapped[id(func)] = _refusing_sparse_on_device(func) if sparse else _mapping_device_kwarg(func)
        patch(owner, name, wrapped[id(func)])
    for name in _TO_SPARSE:
        patch(torch.Tensor, name, _refusing_sparse_on_device(getattr(torch.Tensor, name)))
    patch(torch.Tensor, "to", _named_after(tensor_to, _TENSOR_TO))
    patch(torch.Tensor, "cuda", _named_after(tensor_cuda, torch._C.TensorBase.cuda))
    patch(torch.Tensor, "is_cuda", property(_is_cuda, doc=_TENSOR_IS_CUDA.__doc__))
    patch(torch._C._nn, "_parse_to", _named_after(parse_to, _PARSE_TO))
    _install_accelerator()


def uninstall() -> None:
    """Put torch's own functions back (benchmarks and tests that compare both in one process)."""
    while _PATCHED:
        owner, name, old = _PATCHED.pop()
        if old is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, old)


def installed() -> bool:
    return bool(_PATCHED)
