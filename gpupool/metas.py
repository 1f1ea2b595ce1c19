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

A convolution's output layout (round 43, the "conv_layout" feature: gpupool/protocol.py): torch's meta kernel of
`convolution` leaves the output contiguous (a meta tensor names no backend), where cuDNN (and the CPU kernel a fake GPU
runs) gives channels_last for a channels_last input or weight. Where a session runs with the feature both sides lay the
output out as cuDNN does (`conv_output_format`): the clients' meta kernel (below) and the daemon's copy
(server/guards.py `_convolution`). Both must agree (a view of the output travels as the geometry the client computed),
so the choice is per session: a client process decides at its first attach (`decide_conv_layout`), a daemon's session
worker per slice it runs (`conv_layout_for`, a thread's own setting: `--isolation thread` runs several sessions in one
process), or once for all where a session's own worker process runs it (`own_conv_layout`, round 46).

`register()` is idempotent; the client (both clients) and the daemon call it at import of the module that runs ops on
meta tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import _meta_registrations
from torch._prims_common import suggest_memory_format

_registered: list[Any] = []  # the torch.library handle: kernels stay registered while it lives


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _attention_backward(grad_out: Any, query: Any, key: Any, value: Any, attn_bias: Any, *args: Any, **kw: Any) -> Any:
    bias = torch.empty_like(attn_bias) if attn_bias is not None else None
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), bias


class _ConvLayout(threading.local):
    on: bool | None = None  # a daemon's thread: the session it runs now (None: the process's choice)


_thread = _ConvLayout()
_process: list[bool] = []  # a client's choice, made at its first attach (empty: undecided, contiguous meanwhile)
_decide = threading.Lock()


def conv_layout_on() -> bool:
    """Whether convolutions here lay their outputs out as cuDNN does (else contiguous, as before round 43)."""
    on = _thread.on
    return on if on is not None else bool(_process and _process[0])


@contextmanager
def conv_layout_for(on: bool) -> Iterator[None]:
    """The daemon's side: this thread runs a session that asked for the feature (`on`) or did not, meanwhile."""
    before, _thread.on = _thread.on, on
    try:
        yield
    finally:
        _thread.on = before


def own_conv_layout(on: bool) -> None:
    """The daemon's side, in a session's own worker process: this thread runs that one session's slices from now on
    (`conv_layout_for` without a context manager a slice: server/worker.py `_SessionState.run_owned`)."""
    _thread.on = on


def decide_conv_layout(offered: bool) -> bool:
    """The client's side, at each attach: its first session's daemon decides for the process (`offered`: it names the
    feature); returns the process's choice. The clients' meta-inference caches hold layouts, so it never changes."""
    with _decide:
        if not _process:
            _process.append(offered and _META_CONV is not None)
        return _process[0]


def conv_layout_wanted() -> bool | None:
    """The process's choice (None: no session yet): a client asks a daemon for the feature unless it is False."""
    return (_process[0] if _process else None) if _META_CONV is not None else False


def conv_output_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout cuDNN gives a convolution's output (`cudnn_conv_suggest_memory_format` in aten/src/ATen/native/
    ConvUtils.h): channels_last (channels_last_3d) where the input or the weight is, contiguous for float64. The CPU
    kernel of a fake GPU gives the same but for float64 (channels_last there: the daemon copies it)."""
    if input.dtype == torch.float64 or weight.dtype == torch.float64:
        return torch.contiguous_format
    if input.dim() == 4:
        if torch.channels_last in (suggest_memory_format(input), suggest_memory_format(weight)):
            return torch.channels_last
    elif input.dim() == 5:
        if torch.channels_last_3d in (suggest_memory_format(input), suggest_memory_format(weight)):
            return torch.channels_last_3d
    return torch.contiguous_format


# torch's Meta kernel of `convolution` (Python; torch 2.x): without it the clients never ask for the feature
_META_CONV = getattr(_meta_registrations, "meta_conv", None)


def _convolution(input: Any, weight: Any, *args: Any, **kwargs: Any) -> Any:
    """The Meta kernel of `convolution`: torch's, laid out as cuDNN does where this session runs "conv_layout"."""
    assert _META_CONV is not None
    out = _META_CONV(input, weight, *args, **kwargs)
    if conv_layout_on():
        fmt = conv_output_format(input, weight)
        if fmt is not torch.contiguous_format:
            return out.contiguous(memory_format=fmt)
    return out


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
    if _META_CONV is not None:  # over torch's own (a Python kernel too), which it calls
        lib.impl("convolution", _convolution, "Meta")
    _registered.append(lib)
