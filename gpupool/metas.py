"""Meta kernels torch lacks for ops the client and the daemon both run on meta tensors.

`torch.optim.Adam(..., fused=True)` with a tensor learning rate (what step capture needs: a float would be baked into
the graph) calls `aten::_fused_adam_.tensor_lr` (AdamW: `_fused_adamw_.tensor_lr`), which has no Meta kernel in torch,
where the float-lr overload has one. The client infers every op's outputs on meta tensors before it sends it (without
a Meta kernel the op would run on the CPU, its tensors read back) and the daemon runs a graph's ops on meta tensors
when it defines the graph (without one it refuses the op in a graph). These ops return nothing: their Meta kernel is
nothing, as the float-lr overload's is (it checks only that the lists are lists). What the kernels would read and
write is the daemon's guard's business (server/guards.py `_fused_optimizer`: every list's length, shapes, dtypes and
layout, checked on the real tensors of an eager op and on a graph's meta tensors at its definition).

`register()` is idempotent; both programs call it at import of the module that runs ops on meta tensors.
"""

from __future__ import annotations

from typing import Any

import torch

_registered: list[Any] = []  # the torch.library handle: kernels stay registered while it lives


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def register() -> None:
    if _registered:
        return
    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901 - Meta kernels for existing aten ops
    for name in ("_fused_adam_", "_fused_adamw_"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}.tensor_lr", "Meta"):
            lib.impl(f"{name}.tensor_lr", _nothing, "Meta")
    _registered.append(lib)
