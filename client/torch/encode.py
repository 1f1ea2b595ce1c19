"""Arguments of an aten op as wire `Arg`s, with CPU tensors moved where the op can see them.

Remote tensors travel as their handle; 0-dim CPU tensors (which torch lets mix with any device)
travel inline; larger CPU tensors, and CPU tensors inside tensor lists, are uploaded first
(`localize`) and their temporary handles freed once the op is queued (the temporaries' finalizers
queue the Free after the op, on the same ordered stream).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from gpupool.client.torch.runtime import DeviceRuntime
from gpupool.client.torch.tensor import RemoteTensor

from gpupool import wire
from gpupool._proto import tensor_pb2


def _is_local(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, RemoteTensor)


def localize(
    rt: DeviceRuntime, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Upload the CPU tensors (other than 0-dim ones passed directly) an op mixes with remote ones."""
    from gpupool.client.torch.transfer import materialize_pending

    if rt.pending:
        materialize_pending(rt)
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
    from gpupool.client.torch.transfer import upload_new

    if _is_local(v):
        return upload_new(rt, v) if v.dim() > 0 else v
    if isinstance(v, list | tuple):
        return type(v)(upload_new(rt, x) if _is_local(x) else x for x in v)
    return v


def handle_arg(handle: int) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(tensor=handle)


def _tensor_encoder(rt: DeviceRuntime) -> Callable[[torch.Tensor], tensor_pb2.Arg]:
    def enc(t: torch.Tensor) -> tensor_pb2.Arg:
        if isinstance(t, RemoteTensor):
            if t._gp_rt is not rt:
                raise RuntimeError(f"a tensor on {t.device} was passed to an op on {rt.device}")
            return tensor_pb2.Arg(tensor=t._gp_h)
        return tensor_pb2.Arg(inline=wire.inline_to_proto(t))

    return enc


def encode_args(
    rt: DeviceRuntime, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[tensor_pb2.Arg], dict[str, tensor_pb2.Arg]]:
    enc = _tensor_encoder(rt)
    out_args = [_encode(v, enc) for v in args]
    out_kwargs = {k: _encode(v, enc) for k, v in kwargs.items()}
    return out_args, out_kwargs


_TENSOR_ARG = tensor_pb2.Arg


def _encode(v: Any, enc: Callable[[torch.Tensor], tensor_pb2.Arg]) -> tensor_pb2.Arg:
    # Fast paths for the commonest arguments; wire.encode_arg handles everything else.
    if isinstance(v, RemoteTensor):
        return enc(v)
    tv = type(v)
    if tv is int:
        return _TENSOR_ARG(i=v)
    if tv is float:
        return _TENSOR_ARG(f=v)
    if tv is bool:
        return _TENSOR_ARG(b=v)
    if isinstance(v, torch.device) and v.type == "gpupool":
        return _TENSOR_ARG(device=tensor_pb2.DeviceRef(type="gpupool", index=-1 if v.index is None else v.index))
    return wire.encode_arg(v, enc)

