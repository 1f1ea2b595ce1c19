"""Data crossing between the CPU and a gpupool device, and the ops that do it.

`x.to("gpupool")` arrives as `empty` (on the backend) + `copy_` (on the remote tensor): the empty is
held back (`lazy_empty`) so that the copy becomes a single upload into its handle. `.cpu()`,
`.item()`, `bool(t)`, `.tolist()` and printing read back (sync points); `copy_` across devices
uploads or downloads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from gpupool.client.torch import meta
from gpupool.client.torch.runtime import DeviceRuntime
from gpupool.client.torch.tensor import RemoteTensor, wrap

aten = torch.ops.aten
Special = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]
SPECIAL: dict[Any, Special] = {}
LAZY_EMPTY = {aten.empty.memory_format, aten.empty_strided.default}


def _special(*funcs: Any) -> Callable[[Special], Special]:
    def register(fn: Special) -> Special:
        for f in funcs:
            SPECIAL[f] = fn
        return fn

    return register


# ---- building blocks ----


def lazy_empty(rt: DeviceRuntime, sch: meta.Schema, args: tuple[Any, ...], kwargs: dict[str, Any]) -> RemoteTensor:
    from gpupool.client.torch import encode

    _, key, wire_args, wire_kwargs = encode.build(rt, sch, args, kwargs)
    (m,) = meta.CACHE.outputs(sch, args, kwargs, key).metas
    assert m is not None
    h = rt.new_handle()
    rt.pending[h] = (sch.name, wire_args, wire_kwargs)
    return wrap(rt, h, m.shape, m.stride, m.offset, m.dtype, m)


def materialize_pending(rt: DeviceRuntime) -> None:
    """Send the held-back empties (in creation order) before anything that might use them."""
    while rt.pending:
        h = next(iter(rt.pending))
        name, args, kwargs = rt.pending.pop(h)
        rt.op(name, args, kwargs, [h])


def upload_new(rt: DeviceRuntime, t: torch.Tensor) -> RemoteTensor:
    """A new remote tensor with the contents of a CPU tensor (made contiguous)."""
    local = t.detach()
    if local.device.type != "cpu":
        local = local.cpu()
    local = local.contiguous()
    h = rt.upload(local)
    return wrap(rt, h, tuple(local.shape), local.stride(), 0, local.dtype)


def to_cpu(t: RemoteTensor) -> torch.Tensor:
    """The contents of a remote tensor as a new CPU tensor of the same shape (a sync point)."""
    rt = t._gp_rt
    if rt.pending:
        materialize_pending(rt)
    local = rt.download(t._gp_h)
    if tuple(local.shape) != tuple(t.shape) or local.dtype != t.dtype:
        raise RuntimeError(
            f"{t.device}: daemon returned {tuple(local.shape)} {local.dtype} for a tensor of "
            f"{tuple(t.shape)} {t.dtype}"
        )
    return local


def copy_into(dst: RemoteTensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for a CPU src (broadcasting and dtype conversion happen on the daemon)."""
    rt = dst._gp_rt
    if (
        dst._gp_h in rt.pending
        and src.dtype == dst.dtype
        and src.shape == dst.shape
        and dst.is_contiguous()
        and dst.storage_offset() == 0
    ):
        # The held-back empty becomes the upload itself: one command, no extra memory.
        del rt.pending[dst._gp_h]
        rt.call("upload", src.detach().cpu().contiguous(), dst._gp_h)
        return
    from gpupool.client.torch.dispatch import run_remote

    tmp = upload_new(rt, src)
    run_remote(rt, meta.schema_of(aten.copy_.default), (dst, tmp), {})


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
        materialize_pending(rt)
    (value,) = rt.sync([t._gp_h])
    return _as_python(value, t.dtype)


@_special(aten._to_copy.default)
def _to_copy(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    from gpupool.client.torch import api
    from gpupool.client.torch.dispatch import run_remote

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
    from gpupool.client.torch.dispatch import run_remote

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
        materialize_pending(rt)
    rt.share(t._gp_h)
    return wrap(rt, t._gp_h, t.shape, t.stride(), int(t.storage_offset()), t.dtype)


def unshare(t: RemoteTensor) -> None:
    """Before an op changes `t`'s own metadata on the daemon (t_, resize_): give it a tensor of its own."""
    rt = t._gp_rt
    if t._gp_h in rt.shared:
        from gpupool.client.torch.encode import handle_arg

        h = rt.new_handle()
        rt.op("aten::alias", [handle_arg(t._gp_h)], {}, [h])
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
        from gpupool.client.torch.dispatch import run_remote

        run_remote(dst._gp_rt, meta.schema_of(aten.resize_.default), (dst, list(src.shape)), {})
    return _copy(aten.copy_.default, (dst, src), {})


@_special(aten._conj.default, aten._neg_view.default)
def _lazy_bit_view(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # Conjugate/negative *views* are a bit on the tensor, which remote wrappers do not carry (and which
    # a download would not apply): compute them instead (conj_physical, neg), as backends may.
    from gpupool.client.torch.dispatch import run_remote

    physical = aten.conj_physical.default if func is aten._conj.default else aten.neg.default
    return run_remote(None, meta.schema_of(physical), args, kwargs)


@_special(aten.is_pinned.default)
def _is_pinned(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return False
