"""The fused attention's eager compositions in C++ (server/native_runner.cpp `attn::run`: with dropout since round 45,
without it -- the CPU flash kernels' path, CUDA's mem-efficient one -- since round 46) against the Python ones they
replace in learned runs (server/attention.py `fused_attention`, `fused_attention_backward`): the same outputs bit for
bit and stride for stride, the same draws from the session's generator (its state after each call the same), the
same kept softmax and mask in `philox_seed`'s storage (marked `WHOLE`), and every call the C++ code does not take (the
math composition, a bias's gradient, a backward from a state alone, float64 without dropout, empty or hostile inputs)
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
    if not (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset()):  # fmt: skip
        return False
    if a.is_floating_point():  # the same values, NaN where NaN (a causal mask over more queries than keys)
        return bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())
    return torch.equal(a, b)


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


# ---- no dropout (round 46): the CPU flash kernels' path ----

NODROP = [
    # dtype, layout, shape, bias, causal, scale, grad_input_mask[3]
    (torch.float32, "packed", SHAPES[0], None, False, None, False),  # the encoder-nodrop's and classifier's calls
    (torch.float32, "contiguous", SHAPES[1], "bool2", False, 0.5, True),  # a bool mask: no gradient to compute
    (torch.float32, "transposed", SHAPES[1], "float3", True, -0.4, False),  # copies (`_dense_or_copy`), a 3-D mask
    (torch.float32, "expanded", SHAPES[1], "bool4", True, None, False),  # a key expanded over the batch: copied
    (torch.bfloat16, "packed", SHAPES[0], "bool2", False, None, False),
    (torch.float16, "contiguous", SHAPES[1], "float3", True, 2.0, False),
    (torch.bfloat16, "transposed", SHAPES[0], "float4", False, 0.3, False),
]


def _nodrop_inputs(dtype: torch.dtype, layout: str, shape: Any, bias: str | None) -> tuple[list[Any], Any]:
    if layout == "expanded":
        q, k, v = _qkv(dtype, "contiguous", shape)
        k = k[:1].expand(k.shape)
    else:
        q, k, v = _qkv(dtype, layout, shape)
    if bias == "float4":
        b, h, length, source = shape[:4]
        mask = torch.randn(b, h, length, source, generator=torch.Generator().manual_seed(3)).to(dtype)
    else:
        mask = _bias(bias, dtype, shape)
    return [q, k, v], mask


@pytest.mark.parametrize("dtype, layout, shape, bias, causal, scale, want_bias", NODROP)
def test_without_dropout_the_native_kernels_path_is_the_python_one_bit_for_bit(
    mod: Any, dtype: torch.dtype, layout: str, shape: Any, bias: str | None, causal: bool, scale: float | None,
    want_bias: bool,
) -> None:  # fmt: skip
    """The forward's nine values (output, logsumexp, zero seed and offset, lengths) and the backward's four (a bias's
    gradient zeros) as the Python run's, with the same strides; no generator drawn from. On the base (67a03c05) the
    C++ code declined every call without dropout (None)."""
    (q, k, v), mask = _nodrop_inputs(dtype, layout, shape, bias)
    before = torch.get_rng_state()
    calls = mod.attention_calls()
    pf = attention.fused_attention(q, k, v, mask, 0.0, causal, False, scale=scale)
    nf = mod.attention_forward(q, k, v, mask, 0.0, causal, False, scale)
    assert nf is not None
    assert len(pf) == len(nf) == 9
    for a, b in zip(pf, nf, strict=True):
        assert _same(a, b)
    grad = torch.randn(pf[0].shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    if layout == "transposed":  # a grad_out whose last dimension is not contiguous: copied as the Python run does
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
    flags = [True, True, True, want_bias]
    pb = attention.fused_attention_backward(grad, q, k, v, mask, flags, pf[0], pf[1], None, None, pf[4], pf[5], 0.0,
                                            causal, pf[6], pf[7], scale=scale)  # fmt: skip
    nb = mod.attention_backward(grad, q, k, v, mask, flags, nf[0], nf[1], 0.0, causal, nf[6], scale)
    assert nb is not None and len(pb) == len(nb) == 4
    for a, b in zip(pb, nb, strict=True):
        assert _same(a, b)
    assert mod.attention_calls() == calls  # (the test bindings count nothing: `run`'s calls only)
    assert torch.equal(torch.get_rng_state(), before)


def test_without_dropout_calls_the_kernels_path_does_not_take_are_declined(mod: Any) -> None:
    """The math composition's calls (unequal head sizes, empty tensors, a float bias's gradient), float64 and every
    input `check_forward` / `check_backward` refuse: None, so that the Python run takes them (and raises)."""
    q, k, v = _qkv(torch.float32, "contiguous", SHAPES[1])
    uq, uk, uv = _qkv(torch.float32, "contiguous", SHAPES[2])  # value's head size 6, query's 4
    declined = [
        (uq, uk, uv, None, 0.0, False, False, None),  # the math composition
        (q.double(), k.double(), v.double(), None, 0.0, False, False, None),  # float64 without dropout: refused
        (q[:, :, :0], k, v, None, 0.0, False, False, None),  # empty: the math composition
        (q, k, v, None, 0.0, False, True, None),  # return_debug_mask
        (q, k, v, None, float("nan"), False, False, None),  # dropout_p
        (q, k, v, torch.zeros(2, 3, 6, 4), 0.0, False, False, None),  # a bias that does not broadcast
        (q, k, v, None, 0.0, False, False, float("nan")),
        (q.to("meta"), k.to("meta"), v.to("meta"), None, 0.0, False, False, None),
    ]
    for args in declined:
        assert mod.attention_forward(*args) is None, args
    fwd = attention.fused_attention(q, k, v, None, 0.0)
    grad = torch.randn_like(fwd[0])
    flags = [True, True, True, False]
    bias = torch.zeros(6, 5)
    ufwd = attention.fused_attention(uq, uk, uv, None, 0.0)
    bad = [
        (grad, q, k, v, bias, [True, True, True, True], fwd[0], fwd[1], 0.0, False, fwd[6], None),  # a bias's grad
        (torch.randn_like(ufwd[0]), uq, uk, uv, None, flags, ufwd[0], ufwd[1], 0.0, False, ufwd[6], None),  # math
        (grad, q, k, v, None, flags, fwd[0], fwd[1].to("meta"), 0.0, False, fwd[6], None),  # logsumexp's device
        (grad, q, k, v, None, flags, fwd[0], fwd[1][..., :5], 0.0, False, fwd[6], None),  # logsumexp's shape
        (grad, q, k, v, None, flags, fwd[0], fwd[1].double(), 0.0, False, fwd[6], None),  # logsumexp's dtype
        (grad[..., :4], q, k, v, None, flags, fwd[0], fwd[1], 0.0, False, fwd[6], None),  # grad_out's shape
        (grad, q, k, v, None, flags[:3], fwd[0], fwd[1], 0.0, False, fwd[6], None),  # grad_input_mask
    ]
    for args in bad:
        assert mod.attention_backward(*args) is None


@pytest.mark.parametrize("case", ["grad_out", "out", "logsumexp", "key"])
def test_a_hostile_call_without_dropout_is_declined_to_the_python_runs_words(mod: Any, case: str) -> None:
    from test_server_attention_saved import _bad_backward

    args = _bad_backward(case)
    args[12] = 0.0
    with pytest.raises(InvalidArgument):
        attention.fused_attention_backward(*args)
    grad, q, k, v, bias, flags, out, lse, _, _, _, _, p, causal, seed, _ = args
    assert mod.attention_backward(grad, q, k, v, bias, flags, out, lse, p, causal, seed, None) is None


def test_a_learned_run_runs_the_attention_without_dropout_in_cpp(mod: Any) -> None:
    """test_server_native_seeded's attention stream without dropout, runner on against the Python path: the same
    bits and the same error (a backward whose logsumexp has the wrong shape, in its learned run: refused by the
    Python run's `check_backward`), with the learned steps' forwards and backwards run by `attn::run` (on the base,
    67a03c05, none: `attention_calls` did not move)."""
    import itertools

    import test_server_native_seeded as seeded
    from test_server_native_seeded import AK, AQ, AV, T, V, h

    def step(r: Any, t: int, bad: bool = False) -> list[Any]:
        qkv = [T(AQ), T(AK), T(AV), V(None)]
        lse = T(AQ) if bad else T(h(t, 1))
        grads = [T(h(t, 4)), *qkv, V([True, True, True, False]), T(h(t, 0)), lse, V(None), V(None), V(4), V(4),
                 V(0.0), V(t % 2 == 1)]  # fmt: skip
        return [
            r.rec(8, [h(t, 0), h(t, 1), 0, 0, 0, 0, h(t, 2), h(t, 3)], [*qkv, V(0.0), V(t % 2 == 1)]),
            r.rec(4, [h(t, 4)], [T(h(t, 0)), T(h(t, 0))]),
            r.rec(9, [h(t, 5), h(t, 6), h(t, 7)], [*grads, T(h(t, 2)), T(h(t, 3))]),
            r.rec(4, [h(t, 8)], [T(h(t, 5)), T(h(t, 6))]),
        ]

    seen = []
    ran = []
    for native in (True, False):
        r = seeded.Run(native)
        torch.manual_seed(3)
        for handle in (AQ, AK, AV):
            r.s.bind(handle, torch.randn(2, 2, 4, 8))
        cmds = [r.seed(7)]
        for t in range(10):
            cmds += step(r, t) + ([r.free(t - 1)] if t else [])
        cmds += step(r, 10, bad=True) + [r.free(9)] + step(r, 11) + [r.free(10)]
        before = mod.attention_calls()
        got = r.stream(cmds, itertools.cycle([64, 9]))
        ran.append(mod.attention_calls() - before)
        seen.append((got, r.state()))
        r.close()
    (slices_n, state_n), (slices_p, state_p) = seen
    assert slices_n == slices_p
    seeded.same(state_n, state_p)
    errors = [e for _, _, e in slices_p if e is not None]
    assert errors and all("logsumexp must be float32 of shape" in e[1] for e in errors), errors
    assert ran[1] == 0 and ran[0] >= 2 * 6, ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype, bias", [(torch.float32, None), (torch.float16, "bool2"), (torch.bfloat16, "float3")])
def test_on_a_gpu_without_dropout_the_native_kernels_path_is_the_python_one_bit_for_bit(
    mod: Any, dtype: torch.dtype, bias: str | None
) -> None:
    """CUDA: the mem-efficient kernel and its backward (logsumexp cut to the query's length, padded again to 32), a
    mask as torch's SDPA hands it to that kernel (expanded, its rows padded to 16 elements): the Python run's bits.
    Also a head size the kernel's alignment refuses (6): declined, the Python run's math composition takes it."""
    q, k, v = (t.cuda() for t in _qkv(dtype, "packed", SHAPES[0]))
    m = _bias(bias, dtype, SHAPES[0])
    mask = None if m is None else m.cuda()
    pf = attention.fused_attention(q, k, v, mask, 0.0, True, False, scale=None)
    nf = mod.attention_forward(q, k, v, mask, 0.0, True, False, None)
    assert nf is not None
    grad = torch.randn(pf[0].shape, generator=torch.Generator().manual_seed(2)).to(dtype).cuda()
    flags = [True, True, True, False]
    pb = attention.fused_attention_backward(grad, q, k, v, mask, flags, pf[0], pf[1], None, None, pf[4], pf[5], 0.0,
                                            True, pf[6], pf[7], scale=None)  # fmt: skip
    nb = mod.attention_backward(grad, q, k, v, mask, flags, nf[0], nf[1], 0.0, True, nf[6], None)
    assert nb is not None
    for a, b in zip([*pf, *pb], [*nf, *nb], strict=True):
        assert _same(a, b)
    odd = [t[..., :6].contiguous() for t in (q, k, v)]
    assert mod.attention_forward(*odd, None, 0.0, False, False, None) is None
