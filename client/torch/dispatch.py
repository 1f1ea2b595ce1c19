"""Every aten op on a remote tensor (`RemoteTensor.__torch_dispatch__`) and every factory that reaches the
gpupool backend without one: route it to its special handler (`transfer.SPECIAL`), the generic remote path
(`remote.run_remote`) or the CPU (`remote.cpu_fallback`).
"""

from __future__ import annotations

from typing import Any

import torch

from . import api, meta, transfer
from .remote import cpu_fallback, find_runtime, lazy_empty, run_remote, unshare
from .tensor import RemoteTensor, _compiler, _eager_disabled, upload_new

aten = torch.ops.aten
LAZY_EMPTY = {aten.empty.memory_format, aten.empty_strided.default}


_PLAIN, _SPECIAL, _OTHER = 0, 1, 2
# Namespaces of custom ops whose PrivateUse1 kernel is Python written in aten ops (FSDP2's `fsdp::all_gather_copy_in`,
# `fsdp::split_with_sizes_copy`: copies into and out of its all-gather buffer, whose outputs alias their inputs): run
# on remote tensors like a composite op, not on the CPU, which would return copies where FSDP2 needs views.
PYTHON_DEVICE_KERNELS = {"fsdp"}


def _route(func: Any) -> tuple[int, Any, bool]:
    """How `dispatch` handles an op, worked out once and kept on the OpOverload itself (`_gp_route`): reading
    an attribute costs less than the dict lookups it replaces (OpOverload.__hash__ is a Python function). The third
    item: whether it is a view op (`Schema.views`: made outside torch.inference_mode, `_outside_inference`)."""
    special = transfer.SPECIAL.get(func)
    sch = meta.schema_of(func)
    if special is not None:
        route: tuple[int, Any, bool] = (_SPECIAL, special, sch.views)
    else:  # (a random op takes `_other`, which sees its generator; the C path still runs it without one)
        route = (_PLAIN if sch.plain and sch.generator_at < 0 else _OTHER, sch, sch.views)
    func._gp_sch = sch  # for the C path's view ops (native_ops.cpp `fast_view`)
    func._gp_route = route
    return route


_inference_on = torch.is_inference_mode_enabled  # (a C builtin)
_InferenceMode = torch._C._InferenceMode


def _normal_base(args: tuple[Any, ...]) -> bool:
    """Whether a view op's base (its first argument) is a remote tensor and no inference tensor."""
    return bool(args) and isinstance(args[0], RemoteTensor) and not args[0].is_inference()


def _outside_inference(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A view op of a normal remote tensor under torch.inference_mode: its outputs made outside inference mode.
    torch (its ADInplaceOrView kernel, which runs for a normal tensor's view in inference mode too) makes the output a
    view of its base, sharing its version counter; an output made in inference mode is an inference tensor, which has
    none ("Cannot set version_counter for inference tensor": every `x[0]`, `x.t()`, `x.unsqueeze(1)` of a model's
    tensors in `with torch.inference_mode():` failed on the shim until round 41). On a CPU or CUDA tensor torch makes
    the view from its base's key set, outside inference mode's: a normal tensor."""
    with _InferenceMode(False):  # (which turns grad mode on: off again for the op, as it was)
        with torch.no_grad():
            return dispatch(func, args, kwargs)


def dispatch(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An op on remote tensors routed from elsewhere than `__torch_dispatch__` (the backend kernels of `backend.py`,
    the Dynamo-disabled path): the same routing as `torch_dispatch` below."""
    try:
        kind, how, views = func._gp_route
    except AttributeError:
        kind, how, views = _route(func)
    if views and _inference_on() and _normal_base(args):
        return _outside_inference(func, args, kwargs)
    if kind == _PLAIN:
        return run_remote(None, how, args, kwargs)
    if kind == _SPECIAL:
        return how(func, args, kwargs)
    return _other(func, how, args, kwargs)


def torch_dispatch(cls: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
    """`RemoteTensor.__torch_dispatch__` itself once the device is registered (`tensor.set_dispatcher`): `dispatch`
    with the Dynamo check in front, one Python frame less on every op than a method calling it."""
    if _compiler._is_compiling_flag:  # Dynamo traced into here: run the op eagerly instead (a graph break)
        return _eager_disabled()(func, args, kwargs or {})
    if kwargs is None:  # torch passes a fresh dict (often empty: `kwargs or {}` would make another one)
        kwargs = {}
    try:
        kind, how, views = func._gp_route
    except AttributeError:
        kind, how, views = _route(func)
    if views and _inference_on() and _normal_base(args):
        return _outside_inference(func, args, kwargs)
    if kind == _PLAIN:
        return run_remote(None, how, args, kwargs)
    if kind == _SPECIAL:
        return how(func, args, kwargs)
    return _other(func, how, args, kwargs)


def _given_generator(sch: meta.Schema, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a random op was given a generator: a gpupool device's is a CPU generator of the client's
    (client/rng.py `Generator`), which the op draws from on the CPU (torch's own CPU generators alike)."""
    if sch.generator_at < 0:
        return False
    if kwargs.get("generator") is not None:
        return True
    return len(args) > sch.generator_at and args[sch.generator_at] is not None


def _other(func: Any, sch: meta.Schema, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    rt = find_runtime(args, kwargs)
    if rt is None:  # only possible for ops whose remote tensors hide in unusual places
        raise RuntimeError(f"{func}: no gpupool tensor among the arguments")
    if sch.generator_at >= 0 and _given_generator(sch, args, kwargs):
        return cpu_fallback(rt, func, args, kwargs)
    if sch.implicit:
        out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
    if not sch.aten:
        if sch.composite:  # a custom op written in aten ops: run its body, whose ops then come back here
            return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        if func.namespace in PYTHON_DEVICE_KERNELS:  # the same, where the body is the op's PrivateUse1 kernel
            return func._op_dk(torch._C.DispatchKey.PrivateUse1, *args, **kwargs)
        return cpu_fallback(rt, func, args, kwargs)
    device = kwargs.get("device")
    if sch.has_device_arg and device is not None and torch.device(device).type == "cpu":
        return cpu_fallback(rt, func, args, kwargs)
    if not sch.returns_tensors:
        return cpu_fallback(rt, func, args, kwargs)
    if sch.inplace_view and args and isinstance(args[0], RemoteTensor):
        unshare(args[0])  # before its handle goes into the op's arguments
    return run_remote(rt, sch, args, kwargs)


def _plain_upload(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """`x.to("gpupool")` of a contiguous CPU tensor: the tensor to upload as it is (converted to the asked dtype
    here), or None where the generic path must decide (strides to keep, other layouts, extra arguments). It saves
    the daemon a copy of the uploaded tensor and the client an op."""
    if len(args) != 1 or not set(kwargs) <= _TO_COPY_KWARGS:
        return None
    src = args[0]
    if type(src) is not torch.Tensor or src.device.type != "cpu" or not src.is_contiguous():
        return None
    if kwargs.get("layout") not in (None, torch.strided) or kwargs.get("memory_format") not in _KEEPS_CONTIGUOUS:
        return None
    dtype = kwargs.get("dtype")
    return src if dtype is None or dtype == src.dtype else src.to(dtype)


def _keeps_strides(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """`x.to("gpupool")` (`.cuda()` under --cuda) of a CPU tensor whose layout the copy keeps (preserve_format, the
    default) and which is not contiguous: a channels_last batch, a transposed matrix. torch's own composition runs
    (`_to_copy`'s CompositeExplicitAutograd kernel: `empty_strided` with the source's strides, then `copy_` from the
    CPU: an upload and a copy on the daemon), as on a CUDA GPU and on the C++ client. The generic path uploaded a
    contiguous copy and left the result contiguous: `x.is_contiguous(memory_format=torch.channels_last)` was False on
    the device for a channels_last x (until round 42)."""
    if len(args) != 1 or kwargs.get("memory_format") not in (None, torch.preserve_format):
        return False
    src = args[0]
    return (
        isinstance(src, torch.Tensor)
        and src.device.type == "cpu"
        and src.layout == torch.strided
        and not (isinstance(src, RemoteTensor) or src.is_contiguous())
    )


_TO_COPY_KWARGS = {"dtype", "layout", "device", "pin_memory", "non_blocking", "memory_format"}
_KEEPS_CONTIGUOUS = (None, torch.preserve_format, torch.contiguous_format)


def factory(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An op with no remote tensor that reached the gpupool backend (torch.empty(..., device="gpupool"))."""
    device = kwargs.get("device")
    index = torch.device(device).index if device is not None else None
    rt = api.runtime_for(index if index is not None else api.current_index())
    if func is aten._to_copy.default:
        local = _plain_upload(args, kwargs)
        if local is not None:
            return upload_new(rt, local)
        if _keeps_strides(args, kwargs):
            return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
    sch = meta.schema_of(func)
    if func in LAZY_EMPTY:
        return lazy_empty(rt, sch, args, kwargs)
    if not sch.returns_tensors or _given_generator(sch, args, kwargs):
        return cpu_fallback(rt, func, args, kwargs)
    return run_remote(rt, sch, args, kwargs)
