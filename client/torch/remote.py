"""The generic remote op: infer outputs locally, queue the op, return new remote tensors.

`run_remote` costs one meta-cache lookup, one handle per output and one queued command; nothing waits
for the daemon. Ops whose output shapes cannot be inferred (data-dependent shapes, no meta kernel)
round-trip (`round_trip`), and ops returning plain Python values run on the CPU (`cpu_fallback`).
The special cases above this (transfers, sync points, aliases) live in `transfer`; the routing of
each op in `dispatch`.
"""

from __future__ import annotations

import logging
from _thread import get_ident
from typing import Any

import torch
from torch.utils._pytree import tree_map, tree_unflatten

from gpupool import compact

from . import encode, meta
from .runtime import ONE_OUTPUT, DeviceRuntime
from .tensor import _STRIDED, RemoteTensor, _make_wrapper, own, rewrap, to_cpu, upload_new, wrap

log = logging.getLogger("gpupool.torch")
aten = torch.ops.aten


def find_runtime(args: Any, kwargs: dict[str, Any]) -> DeviceRuntime | None:
    """The device of the op's remote tensors; mixing two gpupool devices is an error, as on CUDA."""
    found: DeviceRuntime | None = None
    for v in (*args, *kwargs.values()):
        items = v if isinstance(v, list | tuple) else (v,)
        for x in items:
            if isinstance(x, RemoteTensor):
                rt = x._gp_rt
                if found is None:
                    found = rt
                elif rt is not found:
                    raise RuntimeError(
                        f"Expected all tensors to be on the same device, but found at least two devices, "
                        f"{found.device} and {rt.device}!"
                    )
    return found


def run_remote(rt: DeviceRuntime | None, sch: meta.Schema, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if sch.reshapes:  # rare: resize_, set_, out= ops
        _unshare_written(sch, args, kwargs)
    # The common case: a compact record (gpupool/compact.py), one bytes string for the whole op.
    tail: bytes | None = None
    # rt.compact_ok(), inline: not while this thread records a step (its recorder sees `Op`s; other threads' ops
    # are not recorded and travel as usual)
    if rt is None or ((not rt.recorders or get_ident() not in rt.recorders) and len(rt.op_ids) < _MAX_OP_IDS):
        try:
            found, key, tail = encode.build_compact(rt, sch, args, kwargs)
        except (encode.NeedsUpload, compact.Unencodable):
            tail = None
        else:
            if found is not None and (
                (found.recorders and get_ident() in found.recorders) or len(found.op_ids) >= _MAX_OP_IDS
            ):
                tail = None  # not found.compact_ok(), inline: a capture records `Op`s
    if tail is None:
        try:
            found, key, wire_args, wire_kwargs = encode.build(rt, sch, args, kwargs)
        except encode.NeedsUpload:
            rt = rt or find_runtime(args, kwargs)
            if rt is None:
                raise RuntimeError(f"{sch.name}: no gpupool tensor among the arguments") from None
            args, kwargs = encode.localize(rt, args, kwargs)
            found, key, wire_args, wire_kwargs = encode.build(rt, sch, args, kwargs)
    if found is None:
        raise RuntimeError(f"{sch.name}: no gpupool tensor among the arguments")
    rt = found
    if rt.pending:
        rt.materialize_pending()
    cache = meta.CACHE
    outs = cache.entries.get(key)
    if outs is not None:
        cache.hits += 1
    else:
        try:
            outs = cache.outputs(sch, args, kwargs, key)
        except meta.NoMeta as exc:
            log.debug("%s has no meta inference (%s): round trip", sch.name, exc)
            return round_trip(rt, sch, args, kwargs)
    if rt.cpu_backed and sch.name in meta.CPU_FIXUPS:
        outs = meta.cpu_fixup(sch, args, kwargs, outs)

    one = outs.one
    if one is not None:  # one new tensor: most ops
        m, shape, strides, offset, dtype = one  # strides and offset None where torch's default is the same
        h = rt._handle_base + next(rt._handle_count)  # rt.new_handle() and wrap(), inline: two Python calls less
        result = _make_wrapper(RemoteTensor, shape, strides, offset, None, dtype, _STRIDED, rt.device)
        d = result.__dict__
        d["_gp_rt"] = rt
        d["_gp_h"] = h
        d["_gp_key"] = m
        if tail is not None:
            rt.eager_op(sch.name, ONE_OUTPUT(1, h) + tail)
        else:
            rt.op(sch.name, wire_args, wire_kwargs, [h])
        if outs.nbytes or rt._near:  # past the quota by the client's count, a sync now (reserve52)
            rt.spend(outs.nbytes)
        return result

    # Outputs that are written arguments (in-place ops, out=) keep their tensor: no new handle.
    write_alias = sch.write_alias
    handles: list[int] = []
    results: list[Any] = []
    for i, m in enumerate(outs.metas):
        alias = write_alias[i] if i < len(write_alias) else None
        if alias is not None:
            handles.append(0)
            results.append(_arg(sch, args, kwargs, alias))
        elif m is None:
            handles.append(0)
            results.append(None)
        else:
            h = rt.new_handle()
            handles.append(h)
            results.append(wrap(rt, h, m.shape, m.stride, m.offset, m.dtype, m))
    if tail is not None and len(handles) > compact.MAX_OUTPUTS:  # `unbind` of a long dim: the `Op` form has no limit
        _, _, wire_args, wire_kwargs = encode.build(rt, sch, args, kwargs)
        tail = None
    if tail is not None:
        rt.eager_op(sch.name, compact.outputs_part(handles) + tail)
    else:
        rt.op(sch.name, wire_args, wire_kwargs, handles)
    rt.spend(outs.nbytes)

    for i, value in outs.values:  # sizes the meta kernel gave (meta.SHAPE_INTS)
        results[i] = value
    if sch.mutates:
        _fix_metadata(outs, results)
    if outs.spec is None:
        return results[0]
    if outs.flat_tuple:
        return tuple(results)
    if outs.flat_list:
        return results
    return tree_unflatten(results, outs.spec)


_MAX_OP_IDS = compact.MAX_OP_IDS


def unshare(t: RemoteTensor) -> None:
    """Before an op changes `t`'s own metadata or storage on the daemon (t_, resize_, set_, an out= op's resize):
    give it a daemon tensor of its own, so that the tensors sharing its daemon tensor (detached aliases, lazy views:
    `tensor.RemoteView`) keep theirs, as they keep their metadata and storage on any device."""
    own(t)
    rt = t._gp_rt
    if t._gp_h in rt.shared:
        h = rt.new_handle()
        rt.op("aten::alias", [encode.handle_arg(t._gp_h)], {}, [h])
        rt.release(t._gp_h)
        t._gp_h = h


def _unshare_written(sch: meta.Schema, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for i, name in sch.written:
        v = kwargs.get(name) if name in kwargs else (args[i] if i < len(args) else None)
        for x in v if isinstance(v, list | tuple) else (v,):
            if isinstance(x, RemoteTensor):
                unshare(x)


def _arg(sch: meta.Schema, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[sch.arg_names.index(name)]


def _fix_metadata(outs: meta.Outputs, results: list[Any]) -> None:
    """Ops that change their written argument's metadata (out= resizing, t_, squeeze_, resize_)."""
    for m, r in zip(outs.metas, results, strict=True):
        if m is None or not isinstance(r, RemoteTensor):
            continue
        if r.shape != m.shape or r.stride() != m.stride or r.storage_offset() != m.offset:
            rewrap(r, m.shape, m.stride, m.offset)


def round_trip(rt: DeviceRuntime, sch: meta.Schema, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run an op whose output shapes are data-dependent: execute it, then learn the shapes.

    The wire has no "describe handle" command, so each output is made contiguous on the daemon (so
    that its strides are known) and read back once; outputs of such ops (nonzero, unique,
    masked_select) are small index or value tensors.
    """
    if sch.mutates or sch.list_return or not sch.returns_tensors:
        return cpu_fallback(rt, sch.func, args, kwargs)
    _, _, wire_args, wire_kwargs = encode.build(rt, sch, args, kwargs)
    tmp = [rt.new_handle() for _ in range(sch.tensor_returns)]
    rt.op(sch.name, wire_args, wire_kwargs, tmp)
    results = []
    for h in tmp:
        final = rt.new_handle()
        rt.op("aten::contiguous", [encode.handle_arg(h)], {}, [final])
        rt.release(h)
        local = rt.download(final)
        results.append(wrap(rt, final, tuple(local.shape), local.stride(), 0, local.dtype))
        rt.spend(local.nelement() * local.element_size())
    return results[0] if len(results) == 1 else tuple(results)


def cpu_fallback(rt: DeviceRuntime, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run an op on the CPU with its remote inputs read back: for ops returning Python values (`equal`)
    or outputs gpupool cannot describe. Tensors written in place are written back."""
    log.debug("%s runs on the CPU", func)
    remote: list[tuple[RemoteTensor, torch.Tensor]] = []

    def fetch(x: Any) -> Any:
        if isinstance(x, RemoteTensor):
            local = to_cpu(x)
            remote.append((x, local))
            return local
        if isinstance(x, torch.device) and x.type == "gpupool":
            return torch.device("cpu")
        return x

    cargs = tree_map(fetch, args)
    ckwargs = tree_map(fetch, kwargs)
    out = func(*cargs, **ckwargs)
    sch = meta.schema_of(func)
    if sch.mutates:
        for r, local in remote:
            copy_into(r, local)
    device = kwargs.get("device")
    if sch.has_device_arg and device is not None and torch.device(device).type == "cpu":
        return out
    by_id = {id(local): r for r, local in remote}

    def back(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not isinstance(x, RemoteTensor):
            kept = by_id.get(id(x))  # (not `or`: a remote tensor's truth value is its value's)
            return kept if kept is not None else upload_new(rt, x)
        return x

    return tree_map(back, out)


def _fits_quota(rt: DeviceRuntime, nbytes: int) -> None:
    """A factory's tensor (`torch.empty`, `randn`, `zeros`, ... on the device) larger than the session's whole memory
    quota: a torch.OutOfMemoryError now, as CUDA's allocator raises one at the call (round 50). The daemon would
    refuse it too, but at the next sync, after the ops that followed had run on a tensor with no value: a backward
    over it left a `.grad` with none, which every later step read (a script that caught the error and went on with
    a smaller batch failed again until `zero_grad`). A tensor that fits the quota but not what is free is refused
    by the daemon, at the next sync (docs/cuda.md)."""
    if nbytes > rt.quota:
        from .errors import over_quota

        raise over_quota(nbytes, rt.quota, str(rt.device), op="aten::empty")


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
        # The held-back empty becomes the upload itself: one command, no extra memory. Taken under the lock
        # (`materialize_pending` sends an empty before it leaves `pending`): it is sent once, as one or the other.
        with rt._lock:
            held = rt.pending.pop(dst._gp_h, None) is not None
        if held:
            rt.upload(src.detach().cpu().contiguous(), dst._gp_h)
            rt.spend(0)  # (its bytes were counted with the empty)
            return
    tmp = upload_new(rt, src)
    run_remote(rt, meta.schema_of(aten.copy_.default), (dst, tmp), {})


def lazy_empty(rt: DeviceRuntime, sch: meta.Schema, args: tuple[Any, ...], kwargs: dict[str, Any]) -> RemoteTensor:
    _, key, wire_args, wire_kwargs = encode.build(rt, sch, args, kwargs)
    outs = meta.CACHE.outputs(sch, args, kwargs, key)
    (m,) = outs.metas
    assert m is not None
    if rt.quota and 0 not in m.shape:
        _fits_quota(
            rt, (m.offset + sum((n - 1) * s for n, s in zip(m.shape, m.stride, strict=True)) + 1) * m.dtype.itemsize
        )
    h = rt.new_handle()
    # made by a thread recording a step: an op of its recording (runtime.materialize_pending)
    rt.pending[h] = (sch.name, wire_args, wire_kwargs, rt.recording())
    rt._room -= outs.nbytes  # counted now; past the quota the next op syncs (runtime.spend), as it sends the empty
    if rt._room < 0:
        rt._near = True
    return wrap(rt, h, m.shape, m.stride, m.offset, m.dtype, m)
