"""Data crossing between the CPU and a gpupool device, and the other ops that need more than `run_remote`.

`x.to("gpupool")` arrives as `empty` (on the backend) + `copy_` (on the remote tensor): the empty is
held back (`remote.lazy_empty`) so that the copy becomes a single upload into its handle. `.cpu()`,
`.item()`, `bool(t)`, `.tolist()` and printing read back (sync points); `copy_` across devices
uploads or downloads; detach/alias share the daemon tensor. `SPECIAL` maps each such op to its handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import api, encode, meta
from .remote import copy_into, run_remote
from .tensor import RemoteTensor, to_cpu, upload_new, wrap

aten = torch.ops.aten
Special = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]
SPECIAL: dict[Any, Special] = {}


def _special(*funcs: Any) -> Callable[[Special], Special]:
    def register(fn: Special) -> Special:
        for f in funcs:
            SPECIAL[f] = fn
        return fn

    return register


def _as_python(value: Any, dtype: torch.dtype) -> Any:
    if dtype == torch.bool:
        return bool(value)
    if dtype.is_complex:
        return complex(value)
    if dtype.is_floating_point:
        return float(value)
    return int(value)


# ---- special ops ----


@_special(aten._local_scalar_dense.default)
def _item(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    t = args[0]
    rt = t._gp_rt
    if rt.pending:
        rt.materialize_pending()
    (value,) = rt.sync([t._gp_h])
    return _as_python(value, t.dtype)


@_special(aten._to_copy.default)
def _to_copy(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:

    src = args[0]
    device = kwargs.get("device")
    target = torch.device(device) if device is not None else src.device
    rt = src._gp_rt
    if target.type == "gpupool" and (target.index is None or target.index == rt.index):
        return run_remote(rt, meta.schema_of(func), args, kwargs)
    local = to_cpu(src)
    dtype = kwargs.get("dtype") or local.dtype
    memory_format = kwargs.get("memory_format") or torch.preserve_format
    if target.type == "gpupool":
        return upload_new(api.runtime_for(target.index), local.to(dtype=dtype))
    return local.to(device=target, dtype=dtype, memory_format=memory_format)


@_special(aten.copy_.default)
def _copy(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:

    dst, src = args[0], args[1]
    if isinstance(dst, RemoteTensor):
        if isinstance(src, RemoteTensor) and src._gp_rt is dst._gp_rt:
            return run_remote(dst._gp_rt, meta.schema_of(func), args, kwargs)
        copy_into(dst, to_cpu(src) if isinstance(src, RemoteTensor) else src)
        return dst
    dst.copy_(to_cpu(src))
    return dst


@_special(aten.detach.default, aten.alias.default)
def _alias(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> RemoteTensor:
    # Same storage and metadata: the new tensor shares the daemon tensor (a client-side refcount),
    # which saves an op per parameter per step (autograd and optimizers detach a lot).
    t = args[0]
    rt = t._gp_rt
    if rt.pending:
        rt.materialize_pending()
    rt.share(t._gp_h)
    key = t._gp_key  # (shape, stride, offset, dtype), as the tensor has it
    return wrap(rt, t._gp_h, key[0], key[1], key[2], key[3], key)


def unshare(t: RemoteTensor) -> None:
    """Before an op changes `t`'s own metadata on the daemon (t_, resize_): give it a tensor of its own."""
    rt = t._gp_rt
    if t._gp_h in rt.shared:
        h = rt.new_handle()
        rt.op("aten::alias", [encode.handle_arg(t._gp_h)], {}, [h])
        rt.release(t._gp_h)
        t._gp_h = h


@_special(aten._copy_from.default)
def _copy_from(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # What copy_ calls for backend tensors: _copy_from(src, dst, non_blocking) copies src into dst.
    return _copy(aten.copy_.default, (args[1], args[0]), {})


@_special(aten._copy_from_and_resize.default)
def _copy_from_and_resize(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    src, dst = args[0], args[1]
    if not isinstance(dst, RemoteTensor):
        dst.resize_(src.shape)
        return _copy(aten.copy_.default, (dst, src), {})
    if dst.shape != src.shape:
        run_remote(dst._gp_rt, meta.schema_of(aten.resize_.default), (dst, list(src.shape)), {})
    return _copy(aten.copy_.default, (dst, src), {})


@_special(aten._conj.default, aten._neg_view.default)
def _lazy_bit_view(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # Conjugate/negative *views* are a bit on the tensor, which remote wrappers do not carry (and which
    # a download would not apply): compute them instead (conj_physical, neg), as backends may.

    physical = aten.conj_physical.default if func is aten._conj.default else aten.neg.default
    return run_remote(None, meta.schema_of(physical), args, kwargs)


@_special(aten.is_pinned.default)
def _is_pinned(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return False
