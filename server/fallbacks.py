"""CPU equivalents of accelerator-only aten ops, so a fake GPU runs what a real one runs.

On a device that is not the CPU, torch's composite code picks kernels that exist only for accelerators:
`nn.LSTM`/`nn.GRU`/`nn.RNNCell`s call `_thnn_fused_lstm_cell`/`_thnn_fused_gru_cell` (and their backwards),
dropout on some paths `_fused_dropout`/`_masked_scale`, depthwise convolutions `_conv_depthwise2d`. A client
of a fake GPU (CPU tensors on the daemon) sends these ops like any other, and the CPU has no kernel for them.
This module computes each from ordinary CPU ops, with the accelerator kernels' semantics and output layout
(the LSTM workspace holds the activated gates i, f, g, o; the GRU's holds r, z, n, hx, hn, as in
aten/src/ATen/native/cuda/RNN.cu), so a forward and its backward always pair up.

A second table holds ops that DO have a CPU kernel, but one that a fake GPU pays for where local CPU does not:
torch's `at::dropout` takes the fused `native_dropout` on an accelerator (PrivateUse1 included) and local CPU's
`empty_like().bernoulli_().div_()` on the CPU, so only a fake GPU's client sends `native_dropout` and
`native_dropout_backward`. Their CPU kernels (aten/src/ATen/native/Dropout.cpp) multiply by a bool mask, and a
float-by-bool multiply is TensorIterator's casting loop: ~4x the instructions of a float-by-float one (~3 M
instructions for a 295k-element mask, as many as a bool-to-float copy). Here each does torch's own steps in torch's
order, with the mask read as uint8 (`mask.view(torch.uint8)`, the same bytes; a bool of torch's is 0 or 1):
promoting a floating tensor with uint8 gives the same dtype as with bool, 0 and 1 convert to the same 0.0 and 1.0,
so the products are the same bits, and the uint8 loop is the fast one. The same generator draws the same mask
(`bernoulli_` on the bool tensor torch makes). Anything else (train False, an empty or non-floating input, a mask
that is not bool) runs torch's kernel itself. Inside a learned run the native runner runs both compositions in C++
(server/native_runner.cpp `dropout::run`, round 45: the same ops in the same order; what they hand to torch's kernel
goes to the Python function): a change to either must be made there too.

`lookup(op, device)` is the executor's hook: a replacement for ops without a kernel on `device` (or with a slow one
there), else None. On a real GPU every op here has its CUDA kernel, so nothing is replaced there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Tensor = torch.Tensor


def _lstm_cell(
    input_gates: Tensor, hidden_gates: Tensor, cx: Tensor, input_bias: Tensor | None = None,
    hidden_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    gates = input_gates + hidden_gates
    if input_bias is not None:
        gates = gates + input_bias
    if hidden_bias is not None:
        gates = gates + hidden_bias
    i, f, g, o = gates.chunk(4, dim=1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    hy = o * cy.tanh()
    return hy, cy, torch.cat([i, f, g, o], dim=1)


def _lstm_cell_backward_impl(
    grad_hy: Tensor | None, grad_cy: Tensor | None, cx: Tensor, cy: Tensor, workspace: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    i, f, g, o = workspace.chunk(4, dim=1)
    tanh_cy = cy.tanh()
    ghy = torch.zeros_like(cy) if grad_hy is None else grad_hy
    gcy = ghy * o * (1 - tanh_cy * tanh_cy)
    if grad_cy is not None:
        gcy = gcy + grad_cy
    go = ghy * tanh_cy * (1 - o) * o
    gi = gcy * g * (1 - i) * i
    gf = gcy * cx * (1 - f) * f
    gg = gcy * i * (1 - g * g)
    grad_gates = torch.cat([gi, gf, gg, go], dim=1)
    grad_cx = gcy * f
    grad_bias = grad_gates.sum(0) if has_bias else None
    return grad_gates, grad_cx, grad_bias


def _gru_cell(
    input_gates: Tensor, hidden_gates: Tensor, hx: Tensor, input_bias: Tensor | None = None,
    hidden_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    if input_bias is not None:
        input_gates = input_gates + input_bias
    if hidden_bias is not None:
        hidden_gates = hidden_gates + hidden_bias
    ir, ii, in_ = input_gates.chunk(3, dim=1)
    hr, hi, hn = hidden_gates.chunk(3, dim=1)
    r = (ir + hr).sigmoid()
    z = (ii + hi).sigmoid()
    n = (in_ + r * hn).tanh()
    hy = n + z * (hx - n)
    return hy, torch.cat([r, z, n, hx, hn], dim=1)


def _gru_cell_backward(
    grad_hy: Tensor, workspace: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    r, z, n, hx, hn = workspace.chunk(5, dim=1)
    grad_hx = grad_hy * z
    gn = grad_hy * (1 - z) * (1 - n * n)
    gz = grad_hy * (hx - n) * (1 - z) * z
    gr = gn * hn * (1 - r) * r
    grad_input_gates = torch.cat([gr, gz, gn], dim=1)
    grad_hidden_gates = torch.cat([gr, gz, gn * r], dim=1)
    if has_bias:
        return grad_input_gates, grad_hidden_gates, grad_hx, grad_input_gates.sum(0), grad_hidden_gates.sum(0)
    return grad_input_gates, grad_hidden_gates, grad_hx, None, None


def _fused_dropout(self: Tensor, p: float, generator: Any = None) -> tuple[Tensor, Tensor]:
    """`p` is the probability to KEEP (CUDA's convention); the mask is uint8 like the CUDA kernel's."""
    mask = torch.rand(self.shape, dtype=torch.float32, device=self.device, generator=generator) < p
    scale = 1.0 / p if p > 0 else 0.0
    return self * mask * scale, mask.to(torch.uint8)


def _masked_scale(self: Tensor, mask: Tensor, scale: float) -> Tensor:
    return self * mask * scale


_NATIVE_DROPOUT = torch.ops.aten.native_dropout.default._op
_NATIVE_DROPOUT_BACKWARD = torch.ops.aten.native_dropout_backward.default._op
# `Tensor::mul_(Scalar)`, as the forward's C++ calls it: for half and bfloat16 its scale is rounded to the tensor's
# dtype first, where Python's `t.mul_(float)` (and the backward's C++ `grad * mask * scale`) multiply by a wrapped
# number in float: different bits. Each side here calls what torch's kernel calls (the tests compare every dtype).
_MUL_SCALAR_ = torch.ops.aten.mul_.Scalar._op


def _native_dropout(input: Tensor, p: float, train: bool | None) -> tuple[Tensor, Tensor]:
    """`native_dropout_cpu`: a bool mask drawn by `bernoulli_(1 - p)`, the output `input * mask * (1 / (1 - p))`."""
    if train is False or not input.is_floating_point() or input.numel() == 0:
        return _NATIVE_DROPOUT(input, p, train)  # type: ignore[no-any-return]
    p1m = 1.0 - p
    scale = 0.0 if p1m == 0 else 1.0 / p1m  # as torch's: p == 1 drops everything, no division by zero
    mask = torch.empty_like(input, dtype=torch.bool)
    mask.bernoulli_(p1m)
    return _MUL_SCALAR_(input.mul(mask.view(torch.uint8)), scale), mask


def _native_dropout_backward(grad_output: Tensor, mask: Tensor, scale: float) -> Tensor:
    """torch's `grad * mask * scale` (the second product in place, on the first's new tensor: the same bits).
    (The parameters are named as the schema's: a client may pass any of them by keyword.)"""
    if mask.dtype != torch.bool or not grad_output.is_floating_point():
        return _NATIVE_DROPOUT_BACKWARD(grad_output, mask, scale)  # type: ignore[no-any-return]
    return grad_output.mul(mask.view(torch.uint8)).mul_(scale)


def _depthwise(conv: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(
        self: Tensor, weight: Tensor, kernel_size: Any, bias: Tensor | None, stride: Any, padding: Any, dilation: Any
    ) -> Tensor:
        return conv(self, weight, bias, stride, padding, dilation, groups=self.size(1))

    return run


# Schema names (default overloads only) -> their CPU equivalent.
_CPU: dict[str, Callable[..., Any]] = {
    "aten::_thnn_fused_lstm_cell": _lstm_cell,
    "aten::_thnn_fused_lstm_cell_backward_impl": _lstm_cell_backward_impl,
    "aten::_thnn_fused_gru_cell": _gru_cell,
    "aten::_thnn_fused_gru_cell_backward": _gru_cell_backward,
    "aten::_fused_dropout": _fused_dropout,
    "aten::_masked_scale": _masked_scale,
    "aten::_conv_depthwise2d": _depthwise(torch.nn.functional.conv2d),
    "aten::conv_depthwise3d": _depthwise(torch.nn.functional.conv3d),
}

# Ops with a CPU kernel that only a fake GPU's client reaches, and a faster composition of the same bits.
_FASTER: dict[str, Callable[..., Any]] = {
    "aten::native_dropout": _native_dropout,
    "aten::native_dropout_backward": _native_dropout_backward,
}

NAMES = frozenset(_CPU)  # ops without a CPU kernel
FASTER = frozenset(_FASTER)


def lookup(op: torch._ops.OpOverload, device: torch.device) -> Callable[..., Any] | None:
    """The CPU equivalent of an accelerator-only op (or the faster one of a slow CPU kernel) on a CPU-backed
    (fake) device, else None."""
    if device.type != "cpu" or op._overloadname != "default":
        return None
    name = op._schema.name
    return _CPU.get(name) or _FASTER.get(name)
