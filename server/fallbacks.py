"""CPU equivalents of accelerator-only aten ops, so a fake GPU runs what a real one runs.

On a device that is not the CPU, torch's composite code picks kernels that exist only for accelerators:
`nn.LSTM`/`nn.GRU`/`nn.RNNCell`s call `_thnn_fused_lstm_cell`/`_thnn_fused_gru_cell` (and their backwards),
dropout on some paths `_fused_dropout`/`_masked_scale`, depthwise convolutions `_conv_depthwise2d`. A client
of a fake GPU (CPU tensors on the daemon) sends these ops like any other, and the CPU has no kernel for them.
This module computes each from ordinary CPU ops, with the accelerator kernels' semantics and output layout
(the LSTM workspace holds the activated gates i, f, g, o; the GRU's holds r, z, n, hx, hn, as in
aten/src/ATen/native/cuda/RNN.cu), so a forward and its backward always pair up.

`lookup(op, device)` is the executor's hook: a replacement for ops without a kernel on `device`, else None.
On a real GPU every op here has its CUDA kernel, so nothing is replaced there.
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

NAMES = frozenset(_CPU)


def lookup(op: torch._ops.OpOverload, device: torch.device) -> Callable[..., Any] | None:
    """The CPU equivalent of an accelerator-only op on a CPU-backed (fake) device, else None."""
    if device.type != "cpu" or op._overloadname != "default":
        return None
    return _CPU.get(op._schema.name)
