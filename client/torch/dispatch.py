"""Every aten op on a remote tensor (`RemoteTensor.__torch_dispatch__`) and every factory that reaches the
gpupool backend without one: route it to its special handler (`transfer.SPECIAL`), the generic remote path
(`remote.run_remote`) or the CPU (`remote.cpu_fallback`).
"""

from __future__ import annotations

from typing import Any

import torch

from . import api, meta, transfer
from .remote import cpu_fallback, find_runtime, lazy_empty, run_remote
from .tensor import RemoteTensor

aten = torch.ops.aten
LAZY_EMPTY = {aten.empty.memory_format, aten.empty_strided.default}


def dispatch(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`RemoteTensor.__torch_dispatch__`."""
    special = transfer.SPECIAL.get(func)
    if special is not None:
        return special(func, args, kwargs)
    sch = meta.schema_of(func)
    if sch.plain:
        return run_remote(None, sch, args, kwargs)
    rt = find_runtime(args, kwargs)
    if rt is None:  # only possible for ops whose remote tensors hide in unusual places
        raise RuntimeError(f"{func}: no gpupool tensor among the arguments")
    if sch.implicit:
        out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
    if not sch.aten:
        if sch.composite:  # a custom op written in aten ops: run its body, whose ops then come back here
            return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        return cpu_fallback(rt, func, args, kwargs)
    device = kwargs.get("device")
    if sch.has_device_arg and device is not None and torch.device(device).type == "cpu":
        return cpu_fallback(rt, func, args, kwargs)
    if not sch.returns_tensors:
        return cpu_fallback(rt, func, args, kwargs)
    if sch.inplace_view and args and isinstance(args[0], RemoteTensor):
        transfer.unshare(args[0])  # before its handle goes into the op's arguments
    return run_remote(rt, sch, args, kwargs)


def factory(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An op with no remote tensor that reached the gpupool backend (torch.empty(..., device="gpupool"))."""
    device = kwargs.get("device")
    index = torch.device(device).index if device is not None else None
    rt = api.runtime_for(index if index is not None else api.current_index())
    sch = meta.schema_of(func)
    if func in LAZY_EMPTY:
        return lazy_empty(rt, sch, args, kwargs)
    if not sch.returns_tensors:
        return cpu_fallback(rt, func, args, kwargs)
    return run_remote(rt, sch, args, kwargs)
