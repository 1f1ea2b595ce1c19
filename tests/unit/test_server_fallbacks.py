"""The daemon's CPU equivalents of accelerator-only ops (server/fallbacks.py) against torch's own CPU math:
forwards against `torch.lstm_cell`/`torch.gru_cell`/`conv2d(groups=C)`, backwards against autograd; the faster
`native_dropout`/`native_dropout_backward` bit for bit against torch's own CPU kernels."""

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


_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}  # fmt: skip


def same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same dtype, shape, strides and bits (NaN payloads and the sign of zero included)."""
    assert (got.dtype, got.shape, got.stride()) == (want.dtype, want.shape, want.stride())
    bits = _BITS.get(want.dtype)
    assert torch.equal(got.view(bits), want.view(bits)) if bits is not None else torch.equal(got, want)


def special(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values with infinities, NaNs, negative zeros and zeros strewn in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 100
    flat = x.view(-1)
    for i, v in enumerate((float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1e-30, -65504.0)):
        flat[i * 7 % flat.numel()] = v
    return x.to(dtype)


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as contiguous, transposed (dense, permuted strides), sliced (gaps), expanded and 0-dim."""
    wide = torch.cat([x, x], dim=-1)
    return {
        "contiguous": x,
        "transposed": x.transpose(0, 1),
        "sliced": wide[..., ::2],
        "expanded": x[:1].expand_as(x),
        "scalar": x.reshape(-1)[3],
    }


FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("train", [True, None, False])
def test_native_dropout_is_torchs_bit_for_bit(dtype: torch.dtype, p: float, train: bool | None) -> None:
    """Output and mask (dtype, strides, bits) and the generator's state after, from the same state, for every layout."""
    for name, x in layouts(special((6, 5, 8), dtype, 7)).items():
        for seed in (0, 1):
            torch.manual_seed(seed)
            want_out, want_mask = aten.native_dropout.default(x, p, train)
            want_state = torch.get_rng_state()
            torch.manual_seed(seed)
            got_out, got_mask = run(aten.native_dropout.default, x, p, train)  # type: ignore[misc]
            assert torch.equal(torch.get_rng_state(), want_state), name
            same_bits(got_out, want_out)
            same_bits(got_mask, want_mask)


@pytest.mark.parametrize("x", [torch.empty(0, 3), torch.arange(12).reshape(3, 4), torch.ones(4, dtype=torch.cfloat)])
def test_native_dropout_of_other_inputs_is_torchs_own(x: torch.Tensor) -> None:
    for p in (0.0, 0.5):
        torch.manual_seed(3)
        try:
            want = aten.native_dropout.default(x, p, True)
        except RuntimeError as exc:  # an integer input: torch's own error, word for word
            with pytest.raises(RuntimeError) as got_exc:
                run(aten.native_dropout.default, x, p, True)
            assert str(got_exc.value) == str(exc)
            continue
        torch.manual_seed(3)
        got = run(aten.native_dropout.default, x, p, True)
        for g, w in zip(got, want, strict=True):  # type: ignore[call-overload]
            same_bits(g, w)
    with pytest.raises(RuntimeError, match="bernoulli"):  # a probability out of range: torch's own error
        run(aten.native_dropout.default, torch.ones(3), 1.5, True)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("scale", [0.0, 1.0, 1 / 0.9, 2.0, 1 / 0.7])
def test_native_dropout_backward_is_torchs_bit_for_bit(dtype: torch.dtype, scale: float) -> None:
    torch.manual_seed(5)
    grads = layouts(special((6, 5, 8), dtype, 11))
    masks = layouts(torch.rand(6, 5, 8) < 0.7)
    for grad in grads.values():
        for mask in masks.values():
            if grad.shape != mask.shape:
                continue
            want = aten.native_dropout_backward.default(grad, mask, scale)
            same_bits(run(aten.native_dropout_backward.default, grad, mask, scale), want)  # type: ignore[arg-type]
    # a mask that is not bool (a client may send any tensor) or a grad that is not floating: torch's own kernel
    grad = special((4, 3), dtype, 2)
    for mask in (torch.rand(4, 3) < 0.5).to(torch.float64), (torch.rand(4, 3) < 0.5).to(torch.uint8):
        same_bits(run(aten.native_dropout_backward.default, grad, mask, scale),  # type: ignore[arg-type]
                  aten.native_dropout_backward.default(grad, mask, scale))  # fmt: skip
    # by keyword, as a client may send them: the schema's own names
    mask = torch.rand(4, 3) < 0.5
    ops = {aten.native_dropout.default: {"input": grad, "p": 0.3, "train": True},
           aten.native_dropout_backward.default: {"grad_output": grad, "mask": mask, "scale": scale}}  # fmt: skip
    for op, kwargs in ops.items():
        fn = fallbacks.lookup(op, CPU)
        assert fn is not None
        torch.manual_seed(4)
        got = fn(**kwargs)
        torch.manual_seed(4)
        want = op(**kwargs)
        for g, w in zip(*((got, want) if isinstance(want, tuple) else ((got,), (want,))), strict=True):
            same_bits(g, w)
    ints = torch.arange(12).reshape(4, 3)
    same_bits(run(aten.native_dropout_backward.default, ints, ints > 3, scale),  # type: ignore[arg-type]
              aten.native_dropout_backward.default(ints, ints > 3, scale))  # fmt: skip


def test_nothing_is_replaced_on_a_real_device_or_for_ordinary_ops() -> None:
    assert fallbacks.lookup(aten._thnn_fused_lstm_cell.default, torch.device("cuda", 0)) is None
    assert fallbacks.lookup(aten.add.Tensor, CPU) is None
    assert fallbacks.lookup(aten._thnn_fused_lstm_cell.out, CPU) is None
    for name in fallbacks.NAMES:  # each really lacks a CPU kernel, so the fallback is the only way
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
    assert fallbacks.FASTER == {"aten::native_dropout", "aten::native_dropout_backward"}
    for name in fallbacks.FASTER:  # a faster composition of a CPU kernel: for fake GPUs only, default overloads only
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        packet = getattr(aten, name.removeprefix("aten::"))
        assert fallbacks.lookup(packet.default, CPU) is not None
        assert fallbacks.lookup(packet.default, torch.device("cuda", 0)) is None
        assert fallbacks.lookup(packet.out, CPU) is None
