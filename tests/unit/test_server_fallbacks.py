"""The daemon's CPU equivalents of accelerator-only ops (server/fallbacks.py) against torch's own CPU math:
forwards against `torch.lstm_cell`/`torch.gru_cell`/`conv2d(groups=C)`, backwards against autograd."""

from __future__ import annotations

import pytest
import torch
from gpupool.server import fallbacks

aten = torch.ops.aten
CPU = torch.device("cpu")


def run(op: torch._ops.OpOverload, *args: object) -> object:
    fn = fallbacks.lookup(op, CPU)
    assert fn is not None, op
    return fn(*args)


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell_forward_and_backward_match_autograd(bias: bool) -> None:
    torch.manual_seed(0)
    b, n_in, h = 3, 5, 4
    x, hx, cx = torch.randn(b, n_in), torch.randn(b, h), torch.randn(b, h)
    w_ih = torch.randn(4 * h, n_in, requires_grad=True)
    w_hh = torch.randn(4 * h, h, requires_grad=True)
    b_ih = torch.randn(4 * h, requires_grad=True) if bias else None
    b_hh = torch.randn(4 * h, requires_grad=True) if bias else None
    cx_ref = cx.clone().requires_grad_()
    hy_ref, cy_ref = torch.lstm_cell(x, (hx, cx_ref), w_ih, w_hh, b_ih, b_hh)
    g_hy, g_cy = torch.randn(b, h), torch.randn(b, h)
    (hy_ref * g_hy + cy_ref * g_cy).sum().backward()

    igates, hgates = x @ w_ih.detach().T, hx @ w_hh.detach().T
    biases = (b_ih.detach(), b_hh.detach()) if bias else (None, None)
    hy, cy, ws = run(aten._thnn_fused_lstm_cell.default, igates, hgates, cx, *biases)  # type: ignore[misc]
    torch.testing.assert_close(hy, hy_ref.detach())
    torch.testing.assert_close(cy, cy_ref.detach())
    assert ws.shape == (b, 4 * h)
    grad_gates, grad_cx, grad_bias = run(  # type: ignore[misc]
        aten._thnn_fused_lstm_cell_backward_impl.default, g_hy, g_cy, cx, cy, ws, bias
    )
    torch.testing.assert_close(grad_cx, cx_ref.grad)
    torch.testing.assert_close(grad_gates.T @ x, w_ih.grad)
    if bias:
        torch.testing.assert_close(grad_bias, b_ih.grad)
    else:
        assert grad_bias is None
    # An output without a gradient arrives as None.
    only_h = run(aten._thnn_fused_lstm_cell_backward_impl.default, None, g_cy, cx, cy, ws, bias)
    assert only_h[0].shape == grad_gates.shape  # type: ignore[index]


def test_gru_cell_forward_and_backward_match_autograd() -> None:
    torch.manual_seed(1)
    b, n_in, h = 3, 5, 4
    x = torch.randn(b, n_in)
    hx = torch.randn(b, h, requires_grad=True)
    w_ih, w_hh = torch.randn(3 * h, n_in, requires_grad=True), torch.randn(3 * h, h, requires_grad=True)
    b_ih, b_hh = torch.randn(3 * h, requires_grad=True), torch.randn(3 * h, requires_grad=True)
    hy_ref = torch.gru_cell(x, hx, w_ih, w_hh, b_ih, b_hh)
    g = torch.randn(b, h)
    (hy_ref * g).sum().backward()

    hy, ws = run(  # type: ignore[misc]
        aten._thnn_fused_gru_cell.default, x @ w_ih.detach().T, hx.detach() @ w_hh.detach().T, hx.detach(),
        b_ih.detach(), b_hh.detach(),
    )  # fmt: skip
    torch.testing.assert_close(hy, hy_ref.detach())
    g_in, g_hid, g_hx, g_bi, g_bh = run(aten._thnn_fused_gru_cell_backward.default, g, ws, True)  # type: ignore[misc]
    torch.testing.assert_close(g_hx + g_hid @ w_hh.detach(), hx.grad)
    torch.testing.assert_close(g_in.T @ x, w_ih.grad)
    torch.testing.assert_close(g_hid.T @ hx.detach(), w_hh.grad)
    torch.testing.assert_close(g_bi, b_ih.grad)
    torch.testing.assert_close(g_bh, b_hh.grad)


def test_fused_dropout_keeps_with_probability_p_and_scales() -> None:
    x = torch.ones(10000)
    out, mask = run(aten._fused_dropout.default, x, 0.8)  # type: ignore[misc]
    assert mask.dtype == torch.uint8 and 0.75 < mask.float().mean().item() < 0.85
    torch.testing.assert_close(out, mask * 1.25)
    torch.testing.assert_close(run(aten._masked_scale.default, x, mask, 1.25), out)


def test_depthwise_conv_matches_grouped_conv() -> None:
    x, w, bias = torch.randn(2, 3, 8, 8), torch.randn(3, 1, 3, 3), torch.randn(3)
    out = run(aten._conv_depthwise2d.default, x, w, [3, 3], bias, [1, 1], [1, 1], [1, 1])
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, bias, 1, 1, 1, 3))


def test_nothing_is_replaced_on_a_real_device_or_for_ordinary_ops() -> None:
    assert fallbacks.lookup(aten._thnn_fused_lstm_cell.default, torch.device("cuda", 0)) is None
    assert fallbacks.lookup(aten.add.Tensor, CPU) is None
    assert fallbacks.lookup(aten._thnn_fused_lstm_cell.out, CPU) is None
    for name in fallbacks.NAMES:  # each really lacks a CPU kernel, so the fallback is the only way
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
