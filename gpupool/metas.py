"""Meta kernels torch lacks for ops the client and the daemon both run on meta tensors.

`torch.optim.Adam(..., fused=True)` with a tensor learning rate (what step capture needs: a float would be baked into
the graph) calls `aten::_fused_adam_.tensor_lr` (AdamW: `_fused_adamw_.tensor_lr`), which has no Meta kernel in torch,
where the float-lr overload has one. The client infers every op's outputs on meta tensors before it sends it (without
a Meta kernel the op would run on the CPU, its tensors read back) and the daemon runs a graph's ops on meta tensors
when it defines the graph (without one it refuses the op in a graph). These ops return nothing: their Meta kernel is
nothing, as the float-lr overload's is (it checks only that the lists are lists). What the kernels would read and
write is the daemon's guard's business (server/guards.py `_fused_optimizer`: every list's length, shapes, dtypes and
layout, checked on the real tensors of an eager op and on a graph's meta tensors at its definition).

The fused attention's backward (`aten::_scaled_dot_product_fused_attention_overrideable_backward`, what the clients
send for scaled_dot_product_attention on a gpupool device) has a Meta kernel from torch 2.13 on; before, its meta call
fell through to the kernel that raises "an operator for privateuse1 backends" (seen with torch 2.11 on an H200 host:
the encoder's backward failed on the C++ client). Its gradients are the inputs' shapes and strides (`empty_like`), as
2.13's kernel makes them.

`register()` is idempotent; the client (both clients) and the daemon call it at import of the module that runs ops on
meta tensors.
"""

from __future__ import annotations

from typing import Any

import torch

_registered: list[Any] = []  # the torch.library handle: kernels stay registered while it lives


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _attention_backward(grad_out: Any, query: Any, key: Any, value: Any, attn_bias: Any, *args: Any, **kw: Any) -> Any:
    bias = torch.empty_like(attn_bias) if attn_bias is not None else None
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), bias


def register() -> None:
    if _registered:
        return
    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - Meta kernels for existing aten ops
    for name in ("_fused_adam_", "_fused_adamw_"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}.tensor_lr", "Meta"):
            lib.impl(f"{name}.tensor_lr", _nothing, "Meta")
    backward = "_scaled_dot_product_fused_attention_overrideable_backward"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{backward}", "Meta"):
        lib.impl(backward, _attention_backward, "Meta")
    _registered.append(lib)
