"""Data crossing between the CPU and a gpupool device, and the other ops that need more than `run_remote`.

`x.to("gpupool")` arrives as `empty` (on the backend) + `copy_` (on the remote tensor): the empty is
held back (`remote.lazy_empty`) so that the copy becomes a single upload into its handle. `.cpu()`,
`.item()`, `bool(t)`, `.tolist()` and printing read back (sync points); `copy_` across devices
uploads or downloads; detach/alias share the daemon tensor; view ops send nothing (`_view`: a `RemoteView`
whose ops send its geometry). `SPECIAL` maps each such op to its handler.
"""

from __future__ import annotations

import weakref
from _thread import get_ident
from collections.abc import Callable
from typing import Any

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from gpupool import compact

from . import api, meta
from .remote import copy_into, run_remote
from .tensor import _STRIDED, RemoteTensor, RemoteView, _make_wrapper, own, to_cpu, upload_new, wrap, wrapper_args

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
    own(t)
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
    if memory_format is torch.preserve_format and _dense_not_contiguous(src):
        # The download is row-major; torch keeps a dense tensor's strides: `.cpu()` of a channels_last activation is
        # channels_last on a CUDA GPU and on the C++ client (it was contiguous here until round 42).
        return torch.empty_strided(src.shape, src.stride(), dtype=dtype, device=target).copy_(local)
    return local.to(device=target, dtype=dtype, memory_format=memory_format)


def _dense_not_contiguous(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill its storage span without overlap (torch's `is_non_overlapping_and_dense`) in an
    order other than row-major: what `_to_copy`'s preserve_format copies with the same strides."""
    return not t.is_contiguous() and is_non_overlapping_and_dense(t)


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
    arg = t.__dict__.get("_gp_v")
    if arg is not None:  # a lazy view: so is its alias, of the same daemon tensor
        out: RemoteTensor = _lazy_view(rt, t._gp_h, key, arg, *wrapper_args(key[0], key[1], key[2]))
    else:
        out = wrap(rt, t._gp_h, key[0], key[1], key[2], key[3], key)
    if rt.kept:
        _keep(rt, out)
    return out


def _keep(rt: Any, t: RemoteTensor) -> None:
    """`t` shares its handle with another tensor: where a captured step's graph writes that handle (a new `p.grad` a
    step), note it, so that a replay moves it to a handle of the old tensor (capture.py `_unalias`), as eagerly."""
    aliases = rt.kept.get(t._gp_h)
    if aliases is not None:
        aliases.append(weakref.ref(t))


def _lazy_view(rt: Any, base: int, m: Any, arg: bytes, strides: Any, offset: int | None) -> RemoteView:
    """A lazy `RemoteView` of daemon tensor `base` (one share of it already taken for it) with meta `m`, view
    argument `arg`, and `strides` and `offset` as `wrapper_args` gives them."""
    t = _make_wrapper(RemoteView, m[0], strides, offset, None, m[3], _STRIDED, rt.device)
    d = t.__dict__
    d["_gp_rt"] = rt
    d["_gp_h"] = base
    d["_gp_key"] = m
    d["_gp_v"] = arg
    return t  # type: ignore[no-any-return]


_VIEW_OPS = (
    aten.view.default,
    aten._unsafe_view.default,
    aten._reshape_alias.default,
    aten.t.default,
    aten.transpose.int,
    aten.permute.default,
    aten.expand.default,
    aten.select.int,
    aten.slice.Tensor,
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.as_strided.default,
)
_GEOMETRY: dict[Any, bytes] = {}  # a view's meta -> its view argument's bytes after the handle
_GEOMETRY_MAX = 4096
_VIEW_HEAD = compact.TAG_U64.pack


@_special(*_VIEW_OPS)
def _view(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A view op: metadata only. The result refers to its input's daemon tensor (the one a lazy input refers to)
    and its own sizes, strides and offset into that tensor's storage (`RemoteView`); no record is sent. Not while
    this thread records a step (its graph names daemon tensors), nor where the meta kernel cannot tell the result."""
    t = args[0]
    sch = meta.schema_of(func)
    rt = t._gp_rt if isinstance(t, RemoteTensor) else None
    if rt is None or kwargs or (rt.recorders and get_ident() in rt.recorders):
        return run_remote(None, sch, args, kwargs)
    key: list[Any] = [sch, t._gp_key]
    for a in args[1:]:
        ta = type(a)
        if ta is list or ta is tuple:
            if any(type(x) is not int for x in a):
                return run_remote(None, sch, args, kwargs)
            key.append(tuple(a))
        elif ta is int or ta is bool or a is None:
            key.append(a)
        else:  # a symbolic size, a tensor: the generic path
            return run_remote(None, sch, args, kwargs)
    try:
        outs = meta.CACHE.outputs(sch, args, kwargs, tuple(key))
    except meta.NoMeta:
        return run_remote(None, sch, args, kwargs)
    one = outs.one
    if one is None:
        return run_remote(None, sch, args, kwargs)
    m = one[0]
    geometry = _GEOMETRY.get(m)
    if geometry is None:
        try:
            geometry = compact.geometry(m.shape, m.stride, m.offset)
        except compact.Unencodable:
            return run_remote(None, sch, args, kwargs)
        if len(_GEOMETRY) >= _GEOMETRY_MAX:
            _GEOMETRY.clear()
        _GEOMETRY[m] = geometry
    if rt.closed:
        rt._check_open()
    if rt.pending:
        rt.materialize_pending()
    base = t._gp_h
    rt.share(base)
    out = _lazy_view(rt, base, m, _VIEW_HEAD(compact.VIEW, base) + geometry, one[2], one[3])
    if rt.kept:
        _keep(rt, out)
    return out


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


# Backwards that autograd sends from a device (of `x[:, :-1]`, `narrow`, `diagonal`, `masked_scatter`) and that the
# daemon's allowlist leaves out (scripts/gen_allowlist.py REVIEWED_OUT: they take the input's sizes from the client):
# run their CompositeExplicitAutograd kernel here (zeros, a view of them, copy_), whose ops then travel, as the C++
# client's dispatcher does for an op without a PrivateUse1 kernel. Until round 39 the shim sent them whole and the
# daemon denied them: any backward through a slice failed (`logits[..., :-1, :]` of a causal LM's shifted loss).
# `_is_all_true`/`_is_any_true` (`all()`/`any()` as a 0-d tensor) are what torch.distributions' argument validation
# (on by default) sends for every distribution made of device tensors: until round 40 the shim sent them whole and
# `Normal(loc, scale)` of device tensors failed ("aten::_is_all_true ... denied"); the C++ client sent `all`.
# `_pack_padded_sequence` (nn.utils.rnn.pack_padded_sequence) takes its lengths on the CPU and returns its batch sizes
# there, as on CUDA: its composite kernel gathers the device data with device ops; until round 41 the shim made the
# lengths meta to infer its outputs and failed ("'lengths' argument should be a 1D CPU int64 tensor").
# `affine_grid_generator` (F.affine_grid, a spatial transformer's grid): not on the daemon's allowlist, whose trace met
# its composition (a base grid and a bmm), which the C++ client sends; the shim sent it whole (denied until round 41).
COMPOSITE_HERE = (
    aten.slice_backward.default,
    aten.diagonal_backward.default,
    aten.masked_scatter_backward.default,
    aten._is_all_true.default,
    aten._is_any_true.default,
    aten._pack_padded_sequence.default,
    aten.affine_grid_generator.default,
)


@_special(*COMPOSITE_HERE)
def _composite_here(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)


@_special(aten.is_pinned.default)
def _is_pinned(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return False
