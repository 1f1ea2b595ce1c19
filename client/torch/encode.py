"""Arguments of an aten op as wire `Arg`s, with CPU tensors moved where the op can see them.

Remote tensors travel as their handle; 0-dim CPU tensors (which torch lets mix with any device)
travel inline; larger CPU tensors, and CPU tensors inside tensor lists, are uploaded first
(`localize`) and their temporary handles freed once the op is queued (the temporaries' finalizers
queue the Free after the op, on the same ordered stream).
"""

from __future__ import annotations

from typing import Any

import torch

from gpupool import compact, wire
from gpupool._proto import tensor_pb2

from . import meta
from .runtime import DeviceRuntime
from .tensor import RemoteTensor, RemoteView, own, upload_new


def _is_local(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, RemoteTensor)


def localize(
    rt: DeviceRuntime, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Upload the CPU tensors (other than 0-dim ones passed directly) an op mixes with remote ones."""
    if not any(_needs_upload(v) for v in args) and not any(_needs_upload(v) for v in kwargs.values()):
        return args, kwargs
    new_args = tuple(_localize(rt, v) for v in args)
    new_kwargs = {k: _localize(rt, v) for k, v in kwargs.items()}
    return new_args, new_kwargs


def _needs_upload(v: Any) -> bool:
    if _is_local(v):
        return bool(v.dim() > 0)
    if isinstance(v, list | tuple):
        return any(_is_local(x) for x in v)
    return False


def _localize(rt: DeviceRuntime, v: Any) -> Any:
    if _is_local(v):
        return upload_new(rt, v) if v.dim() > 0 else v
    if isinstance(v, list | tuple):
        return type(v)(upload_new(rt, x) if _is_local(x) else x for x in v)
    return v


class NeedsUpload(Exception):
    """`build` met a CPU tensor that must be uploaded first (`localize`)."""


_ARG = tensor_pb2.Arg
_NONE = _ARG(none=tensor_pb2.NoneArg())  # session.op copies Args, so constants can be shared


def _scalar(v: Any) -> tensor_pb2.Arg:
    tv = type(v)
    if tv is float:
        return _ARG(f=v)
    if tv is int:
        return _ARG(i=v)
    if tv is bool:
        return _ARG(b=v)
    return wire.encode_arg(v, _no_tensor)


def _no_tensor(t: torch.Tensor) -> tensor_pb2.Arg:
    raise NeedsUpload


def _one(rt: DeviceRuntime | None, kind: str, v: Any, by_type: bool) -> tuple[Any, Any, DeviceRuntime | None]:
    """(cache-key part, wire Arg, runtime) of one argument."""
    tv = type(v)
    if tv is RemoteTensor or tv is RemoteView:
        if tv is RemoteView:
            own(v)  # an `Op` names daemon tensors by handle only
        vrt = v._gp_rt
        if rt is not None and vrt is not rt:
            raise _two_devices(rt, vrt)
        return v._gp_key, _ARG(tensor=v._gp_h), vrt
    if v is None:
        return None, _NONE, rt
    if kind == meta.T:
        if isinstance(v, torch.Tensor):
            if v.dim() > 0 or isinstance(v, RemoteTensor):
                raise NeedsUpload
            return meta.tensor_key(v), _ARG(inline=wire.inline_to_proto(v)), rt
        return type(v), _scalar(v), rt
    if kind == meta.TL:
        keys, handles, rt = _tensor_list(v, rt)
        return keys, _ARG(tensors=tensor_pb2.TensorList(handles=handles)), rt
    if kind == meta.S:
        return (type(v) if by_type else (type(v), v)), _scalar(v), rt
    if kind == meta.SL:
        return meta.arg_key(kind, v, by_type), wire.encode_arg(v, _no_tensor), rt
    if isinstance(v, torch.device) and v.type == "gpupool":
        return v, _ARG(device=tensor_pb2.DeviceRef(type="gpupool", index=-1 if v.index is None else v.index)), rt
    return meta.arg_key(kind, v, by_type), wire.encode_arg(v, _no_tensor), rt


def _tensor_list(v: Any, rt: Any) -> tuple[tuple[Any, ...], list[int], Any]:
    """A list of remote tensors (None allowed): their meta keys, their handles, and the one runtime they share."""
    handles: list[int] = []
    keys: list[Any] = []
    for x in v:
        if x is None:
            handles.append(0)
            keys.append(None)
            continue
        tx = type(x)
        if tx is not RemoteTensor:
            if tx is not RemoteView:
                raise NeedsUpload
            own(x)  # a tensor list holds handles only
        xrt = x._gp_rt
        if rt is None:
            rt = xrt
        elif xrt is not rt:
            raise _two_devices(rt, xrt)
        handles.append(x._gp_h)
        keys.append(x._gp_key)
    return tuple(keys), handles, rt


def _two_devices(a: DeviceRuntime, b: DeviceRuntime) -> RuntimeError:
    return RuntimeError(
        f"Expected all tensors to be on the same device, but found at least two devices, {a.device} and {b.device}!"
    )


def build(
    rt: DeviceRuntime | None, sch: meta.Schema, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[DeviceRuntime | None, tuple[Any, ...], list[tensor_pb2.Arg], dict[str, tensor_pb2.Arg]]:
    """One pass over the arguments: the device, the meta-cache key (as `meta.cache_key` makes it) and
    the wire Args. Raises NeedsUpload if a CPU tensor must be uploaded first."""
    by_type = sch.has_tensor_inputs
    kinds = sch.kinds
    key: list[Any] = [sch]  # the Schema (one per overload) hashes in C; an OpOverload in Python
    wire_args = []
    for i, v in enumerate(args):
        k, a, rt = _one(rt, kinds[i], v, by_type)
        key.append(k)
        wire_args.append(a)
    wire_kwargs = {}
    if kwargs:
        kk = sch.kwarg_kinds
        for name in sorted(kwargs):
            k, a, rt = _one(rt, kk.get(name, meta.V), kwargs[name], by_type)
            key.append((name, k))
            wire_kwargs[name] = a
    return rt, tuple(key), wire_args, wire_kwargs


# ---- the compact record (gpupool/compact.py) ----


def _c_view(rt: DeviceRuntime | None, sch: meta.Schema, v: Any) -> tuple[Any, bytes, DeviceRuntime | None]:
    """`_c_one` of a `RemoteView`: its view argument while it is lazy, unless the op may change its written
    arguments' metadata (it must then have a daemon tensor of its own: `own`)."""
    vrt = v._gp_rt
    if rt is not None and vrt is not rt:
        raise _two_devices(rt, vrt)
    arg = v._gp_v
    if arg is not None and sch.reshapes:
        own(v)
        arg = None
    return v._gp_key, arg if arg is not None else _TAG_U64(compact.TENSOR, v._gp_h), vrt


def _c_tensor_list(v: Any, rt: DeviceRuntime | None, reshapes: bool) -> tuple[Any, bytes, DeviceRuntime | None]:
    """`_c_one` of a tensor list (`_tensor_list`'s loop, once): while it holds lazy views (`RemoteView`), a list with
    views (`compact.VIEWS`: each view its view argument, no record of its own), unless the op may change its written
    arguments' metadata (`_c_view`) or the list holds a None: those views get daemon tensors of their own (`own`)
    and the list is the plain list of handles, as is a list without lazy views."""
    handles: list[int] = []
    keys: list[Any] = []
    lazy: list[tuple[int, Any, bytes]] | None = None
    for x in v:
        if x is None:
            handles.append(0)
            keys.append(None)
            continue
        tx = type(x)
        if tx is not RemoteTensor:
            if tx is not RemoteView:
                raise NeedsUpload
            arg = x.__dict__.get("_gp_v")
            if arg is not None:
                if lazy is None:
                    lazy = []
                lazy.append((len(handles), x, arg))
        xrt = x._gp_rt
        if rt is None:
            rt = xrt
        elif xrt is not rt:
            raise _two_devices(rt, xrt)
        handles.append(x._gp_h)
        keys.append(x._gp_key)
    if lazy is not None:
        if reshapes or 0 in handles:
            for j, x, _ in lazy:
                own(x)  # a plain list holds handles only
                handles[j] = x._gp_h
        else:
            parts = [_TAG_U64(_TENSOR, h) for h in handles]
            for j, _, arg in lazy:
                parts[j] = arg
            return tuple(keys), compact.tensors_with_views(parts), rt
    return tuple(keys), compact.tensors(handles), rt


def _c_one(
    rt: DeviceRuntime | None, kind: str, v: Any, by_type: bool, reshapes: bool = False
) -> tuple[Any, bytes, DeviceRuntime | None]:
    """(cache-key part, compact bytes, runtime) of one argument; the key parts are exactly `_one`'s. `reshapes`:
    the op's (`meta.Schema.reshapes`), which decides whether a tensor list may carry lazy views as views."""
    tv = type(v)
    if tv is RemoteTensor:
        vrt = v._gp_rt
        if rt is not None and vrt is not rt:
            raise _two_devices(rt, vrt)
        return v._gp_key, _TAG_U64(compact.TENSOR, v._gp_h), vrt
    if v is None:
        return None, _C_NONE, rt
    if kind == _V:
        if tv is bool:  # keepdim and the like: keyed by value (meta._value_key), two encodings
            return v, _C_BOOLS[v], rt
        if tv is int or (tv is list and list(map(type, v)).count(int) == len(v)):
            # Dims and sizes (ints, lists of ints: the usual argument besides tensors) are keyed and encoded once per
            # value. Only exact ints: equal values then encode alike (not so 0.0 and -0.0, nor 1 and True).
            ck = v if tv is int else tuple(v)
            hit = _INTS.get(ck)
            if hit is None:
                if len(_INTS) >= _INTS_MAX:
                    _INTS.clear()
                hit = _INTS[ck] = (meta.arg_key(kind, v, by_type), compact.encode_value(v))
            return hit[0], hit[1], rt
    if kind == meta.S or (kind == meta.T and (tv is float or tv is int or tv is bool)):
        return (tv if by_type else (tv, v)) if kind == meta.S else tv, compact.encode_value(v), rt
    if kind == meta.TL:
        return _c_tensor_list(v, rt, reshapes)
    if isinstance(v, torch.Tensor):
        raise compact.Unencodable  # a 0-dim CPU tensor travels inline in an Op (or must be uploaded first)
    if kind == meta.SL:
        return meta.arg_key(kind, v, by_type), compact.encode_value(v), rt
    if tv is torch.device and v.type == "gpupool":
        return v, compact.encode_value(v), rt
    return meta.arg_key(kind, v, by_type), compact.encode_value(v), rt


_TAG_U64 = compact.TAG_U64.pack
_V = meta.V
_INTS: dict[Any, tuple[Any, bytes]] = {}  # an int or a tuple of ints -> (its key part, its compact bytes)
_INTS_MAX = 4096
_C_NONE = compact.encode_value(None)
_C_BOOLS = {False: compact.encode_value(False), True: compact.encode_value(True)}  # indexed by bools only
_TENSOR = compact.TENSOR
_NO_KWARGS = b"\x00"


def build_compact(
    rt: DeviceRuntime | None, sch: meta.Schema, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[DeviceRuntime | None, tuple[Any, ...], bytes]:
    """`build` for a compact record: (device, meta-cache key, the record's argument bytes). Raises NeedsUpload
    as `build` does, and compact.Unencodable for arguments only an `Op` carries (then use `build`)."""
    key: list[Any] = [sch]  # the Schema (one per overload) hashes in C; an OpOverload in Python
    parts = [_U8_BYTES[len(args)]]
    i = 0
    for v in args:
        if type(v) is RemoteTensor:  # the common argument, inline (as _c_one has it)
            vrt = v._gp_rt
            if rt is not vrt:
                if rt is not None:
                    raise _two_devices(rt, vrt)
                rt = vrt
            key.append(v._gp_key)
            parts.append(_TAG_U64(_TENSOR, v._gp_h))
        else:
            if type(v) is RemoteView:
                k, b, rt = _c_view(rt, sch, v)
            else:
                k, b, rt = _c_one(rt, sch.kinds[i], v, sch.has_tensor_inputs, sch.reshapes)
            key.append(k)
            parts.append(b)
        i += 1
    if kwargs:
        parts.append(compact.U8.pack(len(kwargs)))
        kk = sch.kwarg_kinds
        for name in sorted(kwargs):
            v = kwargs[name]
            if type(v) is RemoteView:
                k, b, rt = _c_view(rt, sch, v)
            else:
                k, b, rt = _c_one(rt, kk.get(name, meta.V), v, sch.has_tensor_inputs, sch.reshapes)
            key.append((name, k))
            parts.append(compact.kwarg_key(name))
            parts.append(b)
    else:
        parts.append(_NO_KWARGS)
    return rt, tuple(key), b"".join(parts)


_U8_BYTES = [bytes([n]) for n in range(256)]


def handle_arg(handle: int) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(tensor=handle)
