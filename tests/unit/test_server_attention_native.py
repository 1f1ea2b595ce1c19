"""The fused attention's eager dropout compositions in C++ (server/native_runner.cpp `attn::run`, round 45) against
the Python ones they replace in learned runs (server/attention.py `fused_attention`, `fused_attention_backward`):
the same outputs bit for bit and stride for stride, the same draws from the session's generator (its state after
each call the same), the same kept softmax and mask in `philox_seed`'s storage (marked `WHOLE`), and every call the
C++ code does not take (no dropout, a bias's gradient, a backward from a state alone, empty or hostile inputs)
declined -- None, nothing drawn -- so that the Python run, its rules and its error messages, takes it. A fake GPU's
dropout (server/fallbacks.py's compositions, `dropout::run`) likewise, through a learned run."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.server import attention, opargs
from support import native_runner_or_skip

from gpupool.errors import InvalidArgument


@pytest.fixture(scope="module")
def mod() -> Any:
    native_runner_or_skip()
    from gpupool.server import native_runner

    return native_runner.load()


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if not isinstance(a, torch.Tensor):
        return a == b and type(a) is type(b)
    return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset() and torch.equal(a, b))  # fmt: skip


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(st, 0, (st.nbytes(),), (1,)).clone().cpu()


def _qkv(dtype: torch.dtype, layout: str, shape: tuple[int, int, int, int, int, int]) -> list[torch.Tensor]:
    """query, key, value: contiguous, views of one packed projection (the encoders'), or transposed copies."""
    b, h, length, source, e, ev = shape
    g = torch.Generator().manual_seed(11)
    if layout == "packed" and length == source and e == ev:
        packed = torch.randn(b, length, 3, h, e, generator=g).to(dtype)
        return [t.transpose(1, 2) for t in packed.unbind(2)]
    q, k = (torch.randn(b, h, n, e, generator=g).to(dtype) for n in (length, source))
    v = torch.randn(b, h, source, ev, generator=g).to(dtype)
    if layout == "transposed":
        return [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v)]
    return [q, k, v]


def _bias(kind: str | None, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
    b, h, length, source = shape[:4]
    g = torch.Generator().manual_seed(5)
    if kind == "bool2":
        return torch.rand(length, source, generator=g) > 0.3
    if kind == "bool4":
        return torch.rand(b, 1, length, source, generator=g) > 0.3
    if kind == "float3":
        return torch.randn(h, length, source, generator=g).to(dtype)
    return None


SHAPES = [(4, 4, 16, 16, 8, 8), (2, 3, 6, 5, 8, 8), (1, 2, 5, 7, 4, 6)]  # the encoder's; L != S; head sizes differ
CASES = [
    # dtype, layout, shape, bias, causal, scale, p
    (torch.float32, "packed", SHAPES[0], None, False, None, 0.1),
    (torch.float32, "contiguous", SHAPES[1], "bool2", False, 0.5, 0.3),
    (torch.float32, "transposed", SHAPES[1], "float3", True, -0.4, 0.25),
    (torch.float32, "contiguous", SHAPES[2], "bool4", True, None, 0.5),
    (torch.bfloat16, "packed", SHAPES[0], "bool2", False, None, 0.1),
    (torch.float16, "contiguous", SHAPES[2], "float3", True, 2.0, 0.2),
    (torch.float64, "transposed", SHAPES[1], None, False, 0.3, 0.1),
]


@pytest.mark.parametrize("dtype, layout, shape, bias, causal, scale, p", CASES)
def test_the_native_compositions_are_the_python_ones_bit_for_bit(
    mod: Any, dtype: torch.dtype, layout: str, shape: Any, bias: str | None, causal: bool, scale: float | None,
    p: float,
) -> None:  # fmt: skip
    q, k, v = _qkv(dtype, layout, shape)
    mask = _bias(bias, dtype, shape)
    got = {}
    for path in ("python", "native"):
        torch.manual_seed(7)
        if path == "python":
            fwd = attention.fused_attention(q, k, v, mask, p, causal, False, scale=scale)
        else:
            fwd = mod.attention_forward(q, k, v, mask, p, causal, False, scale)
            assert fwd is not None
        after = torch.get_rng_state()
        assert getattr(fwd[6], opargs.WHOLE, False)  # its storage all written: bound without zeroing
        grad = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        flags = [True, True, True, False]
        if path == "python":
            bwd = attention.fused_attention_backward(grad, q, k, v, mask, flags, fwd[0], fwd[1], None, None, fwd[4],
                                                     fwd[5], p, causal, fwd[6], fwd[7], scale=scale)  # fmt: skip
        else:
            bwd = mod.attention_backward(grad, q, k, v, mask, flags, fwd[0], fwd[1], p, causal, fwd[6], scale)
            assert bwd is not None
        assert torch.equal(torch.get_rng_state(), after)  # the backward draws nothing
        got[path] = (fwd, _storage_bytes(fwd[6]), after, bwd)
    (pf, ps, pa, pb), (nf, ns, na, nb) = got["python"], got["native"]
    assert len(pf) == len(nf) == 9 and len(pb) == len(nb) == 4
    for a, b in zip(pf, nf, strict=True):
        assert _same(a, b)
    assert torch.equal(ps, ns)  # the state, the softmax, the mask and the padding, byte for byte
    assert torch.equal(pa, na)  # the same draws: the generator where the Python forward left it
    for a, b in zip(pb, nb, strict=True):
        assert _same(a, b)


def test_calls_the_native_code_does_not_take_are_declined_without_a_draw(mod: Any) -> None:
    q, k, v = _qkv(torch.float32, "contiguous", SHAPES[1])
    before = torch.get_rng_state()
    declined = [
        (q, k, v, None, 0.0, False, False, None),  # no dropout: the kernels' path
        (q, k, v, None, 0.1, False, True, None),  # return_debug_mask
        (q.double(), k, v, None, 0.1, False, False, None),  # dtypes differ
        (q[0], k[0], v[0], None, 0.1, False, False, None),  # 3-D
        (q, k[:, :, :4], v, None, 0.1, False, False, None),  # key and value lengths differ
        (q, k, v, torch.zeros(2, 3, 6, 4), 0.1, False, False, None),  # a bias that does not broadcast
        (q, k, v, torch.zeros(6, 5, dtype=torch.int64), 0.1, False, False, None),  # an integer bias
        (q, k, v, torch.zeros(5), 0.1, False, False, None),  # a 1-D bias
        (q, k, v, None, 1.0, False, False, None),  # dropout 1
        (q, k, v, None, float("nan"), False, False, None),
        (q, k, v, None, 0.1, False, False, float("inf")),  # scale
        (q[:, :, :0], k, v, None, 0.1, False, False, None),  # empty
        (q.to("meta"), k.to("meta"), v.to("meta"), None, 0.1, False, False, None),  # another device type
    ]
    for args in declined:
        assert mod.attention_forward(*args) is None
    assert torch.equal(torch.get_rng_state(), before)

    fwd = attention.fused_attention(q, k, v, None, 0.1)
    grad = torch.randn_like(fwd[0])
    flags = [True, True, True, False]
    state_only = attention._dropout_forward(q, k, v, None, 0.1, False, None)[2]  # a graph's forward: the state only
    bias = torch.zeros(6, 5)
    bias_fwd = attention.fused_attention(q, k, v, bias, 0.1)
    bad = [
        (grad, q, k, v, None, flags, fwd[0], fwd[1], 0.1, False, state_only, None),
        (grad, q, k, v, bias, [True, True, True, True], bias_fwd[0], bias_fwd[1], 0.1, False, bias_fwd[6], None),
        (grad[..., :4], q, k, v, None, flags, fwd[0], fwd[1], 0.1, False, fwd[6], None),  # grad_out's shape
        (grad, q, k, v, None, flags, fwd[0].double(), fwd[1], 0.1, False, fwd[6], None),  # out's dtype
        (grad, q, k, v, None, flags, fwd[0], fwd[1][..., :5], 0.1, False, fwd[6], None),  # logsumexp
        (grad, q, k, v, None, flags[:3], fwd[0], fwd[1], 0.1, False, fwd[6], None),  # grad_input_mask
        (grad, q, k, v, None, flags, fwd[0], fwd[1], 0.1, False, torch.zeros(1, dtype=torch.long), None),  # seed
        (grad, q, k, v, None, flags, fwd[0], fwd[1], 0.0, False, fwd[6], None),  # no dropout
        (grad, q, k, v, None, flags, fwd[0], fwd[1], 0.1, False, fwd[6].view(torch.float64), None),
    ]
    for args in bad:
        assert mod.attention_backward(*args) is None


@pytest.mark.parametrize("case", ["grad_out", "out", "logsumexp", "seed", "key", "dropout"])
def test_a_hostile_call_in_a_learned_run_is_refused_with_the_python_runs_words(mod: Any, case: str) -> None:
    """What `check_backward` refuses the C++ code declines, so the Python run raises its own INVALID_ARGUMENT."""
    from test_server_attention_saved import _bad_backward

    args = _bad_backward(case)
    with pytest.raises(InvalidArgument):
        attention.fused_attention_backward(*args)
    grad, q, k, v, bias, flags, out, lse, _, _, _, _, p, causal, seed, _ = args
    assert mod.attention_backward(grad, q, k, v, bias, flags, out, lse, p, causal, seed, None) is None


def test_a_learned_run_runs_the_attention_in_cpp(mod: Any) -> None:
    """test_server_native_seeded's attention stream (runner on against the Python path: the same bits, the same
    draws, the same errors) with the attention's records run by `attn::run`: every forward and backward of the
    learned steps but the one whose philox_seed is a meta tensor (declined: the Python run raises)."""
    import test_server_native_seeded as seeded

    before = mod.attention_calls()
    seeded.test_the_fused_attention_with_dropout_runs_natively_with_the_same_draws_and_errors()
    ran = mod.attention_calls() - before
    assert ran >= 2 * 6, ran


def test_a_fake_gpus_dropout_runs_in_cpp_with_the_python_paths_draws(mod: Any) -> None:
    """A fake GPU's `native_dropout` and its backward (server/fallbacks.py's compositions, fake GPUs only) in learned
    runs: test_server_native_seeded's stream of random ops (runner on against the Python path: the same bits, the
    same generator stream after) with both dropouts run by `dropout::run` (ops 2, 6 and 5 of its steps)."""
    import test_server_native_seeded as seeded

    before = mod.dropout_calls()
    seeded.test_random_ops_run_natively_with_the_same_draws_as_the_python_path()
    ran = mod.dropout_calls() - before
    assert ran >= 9 * 3, ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_on_a_gpu_the_native_compositions_are_the_python_ones_bit_for_bit(mod: Any, dtype: torch.dtype) -> None:
    """CUDA: the forward keeps no generator state (16 zero bytes, `_dropout_forward_saving` with_state False) and
    draws with `native_dropout`; the backward runs `native_dropout_backward`: the same bits, the same CUDA stream."""
    q, k, v = (t.cuda() for t in _qkv(dtype, "packed", SHAPES[0]))
    mask = _bias("bool2", dtype, SHAPES[0])
    mask = None if mask is None else mask.cuda()
    got = {}
    for path in ("python", "native"):
        torch.cuda.manual_seed(7)
        if path == "python":
            fwd = attention.fused_attention(q, k, v, mask, 0.1, False, False, scale=None)
        else:
            fwd = mod.attention_forward(q, k, v, mask, 0.1, False, False, None)
            assert fwd is not None
        after = torch.cuda.get_rng_state()
        grad = torch.randn(fwd[0].shape, generator=torch.Generator().manual_seed(2)).to(dtype).cuda()
        flags = [True, True, True, False]
        if path == "python":
            bwd = attention.fused_attention_backward(grad, q, k, v, mask, flags, fwd[0], fwd[1], None, None, fwd[4],
                                                     fwd[5], 0.1, False, fwd[6], fwd[7], scale=None)  # fmt: skip
        else:
            bwd = mod.attention_backward(grad, q, k, v, mask, flags, fwd[0], fwd[1], 0.1, False, fwd[6], None)
        got[path] = (fwd, _storage_bytes(fwd[6]), after, bwd)
    (pf, ps, pa, pb), (nf, ns, na, nb) = got["python"], got["native"]
    for a, b in zip([*pf, *pb], [*nf, *nb], strict=True):
        assert _same(a, b)
    assert torch.equal(ps, ns) and torch.equal(pa, na)
