"""The fused attention's dropout composition (server/attention.py) keeping the forward's softmax and mask for the
backward (an eager call on a fake GPU, round 28): the saving forward gives the plain forward's output and generator
state, and the backward from its `philox_seed` gives, bit for bit and stride for stride, the gradients of the backward
that recomputes them from the state alone (a graph's forward, and the daemon before), without drawing again."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.server import attention

CASES = [
    (torch.float32, None, False, None),
    (torch.float32, "bool", False, 0.5),
    (torch.float32, None, True, -0.4),
    (torch.bfloat16, "bool", False, None),
    (torch.float16, "float", True, None),
    (torch.float64, "float", False, 0.3),
]


def _inputs(dtype: torch.dtype, bias: str | None) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g).to(dtype) for n in (6, 5, 5))
    mask: torch.Tensor | None = None
    if bias == "bool":
        mask = torch.rand(6, 5, generator=g) > 0.3
    elif bias == "float":
        mask = torch.randn(2, 1, 6, 5, generator=g).to(dtype)
    grad = torch.randn(2, 3, 6, 8, generator=g).to(dtype)
    return q, k, v, mask, grad


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)


@pytest.mark.parametrize("dtype, bias, causal, scale", CASES)
def test_the_saving_forward_and_its_backward_are_the_recomputing_ones_bit_for_bit(
    dtype: torch.dtype, bias: str | None, causal: bool, scale: float | None
) -> None:
    q, k, v, mask, grad = _inputs(dtype, bias)
    torch.manual_seed(5)
    plain = attention._dropout_forward(q, k, v, mask, 0.3, causal, scale)
    after_plain = torch.rand(4)
    torch.manual_seed(5)
    saving = attention._dropout_forward_saving(q, k, v, mask, 0.3, causal, scale)
    after_saving = torch.rand(4)
    assert torch.equal(after_plain, after_saving)  # the same draws from the stream
    for a, b in zip(plain, saving, strict=True):
        assert _same(a, b)  # the seed's 0-d view reads the state's first 8 bytes either way
    state, saved = plain[2].untyped_storage(), saving[2].untyped_storage()
    _, work, extra = attention._saved_sizes(q, k)
    assert state.nbytes() == attention._CPU_STATE_BYTES and saved.nbytes() == state.nbytes() + extra
    n = 2 * 3 * 6 * 5
    assert extra == -(-(n * work.itemsize + n) // 8) * 8
    head = torch.empty(0, dtype=torch.uint8).set_(saved, 0, (state.nbytes(),), (1,))
    assert torch.equal(head, torch.empty(0, dtype=torch.uint8).set_(state, 0, (state.nbytes(),), (1,)))
    assert attention._saved_scores(plain[2], q, k) is None
    kept = attention._saved_scores(saving[2], q, k)
    assert kept is not None and kept[0].dtype == work and kept[1].dtype == torch.bool

    recomputed = attention._dropout_backward(grad, q, k, v, mask, 0.3, causal, scale, plain[2], False)
    from_saved = attention._dropout_backward(grad, q, k, v, mask, 0.3, causal, scale, saving[2], False)
    for a, b in zip(recomputed[:3], from_saved[:3], strict=True):
        assert a is not None and b is not None and _same(a, b)
    rb, sb = recomputed[3], from_saved[3]  # a bias's gradient: zeros as the meta kernel's, None without one
    assert (rb is None and sb is None and mask is None) or (rb is not None and sb is not None and _same(rb, sb))


def test_the_backward_from_saved_scores_draws_nothing_and_reads_a_forged_mask_as_bytes() -> None:
    """The saved path is the one taken: with the state's bytes overwritten by ones no generator reaches (the
    recomputing backward refuses them) the gradients are unchanged; a mask byte of 255 (not a bool) is read as the
    uint8 `_drop` multiplies by, never as a bool value."""
    q, k, v, mask, grad = _inputs(torch.float32, None)
    torch.manual_seed(5)
    _, _, seed, _ = attention._dropout_forward_saving(q, k, v, mask, 0.3, False, None)
    want = attention._dropout_backward(grad, q, k, v, mask, 0.3, False, None, seed, False)
    storage = seed.untyped_storage()
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
    raw[: attention._CPU_STATE_BYTES].fill_(0xFF)
    with pytest.raises(Exception, match="generator state"):
        attention._saved_generator(seed, q.device)
    got = attention._dropout_backward(grad, q, k, v, mask, 0.3, False, None, seed, False)
    for a, b in zip(want[:3], got[:3], strict=True):
        assert a is not None and b is not None and _same(a, b)
    n = 2 * 3 * 6 * 5
    start = attention._CPU_STATE_BYTES + 4 * n
    raw[start : start + n].fill_(255)  # every mask byte: 255 x attn x scale, the session's own numbers
    forged = attention._dropout_backward(grad, q, k, v, mask, 0.3, False, None, seed, False)
    assert all(t is not None and t.shape == w.shape for t, w in zip(forged[:3], want[:3], strict=True))


@pytest.mark.parametrize("dtype, bias, causal, scale", CASES[:3])
def test_the_kept_forward_of_a_cuda_graph_is_the_saving_one_without_the_generator_state(
    dtype: torch.dtype, bias: str | None, causal: bool, scale: float | None
) -> None:
    """`KEPT` (a graph's forward with dropout on a CUDA device, which a CUDA graph can hold): the same draws and output
    as the eager forward, the state's bytes zeros (no generator state read on the host), and its backward the
    recomputing one's bit for bit, from the kept softmax and mask alone. Run here on the CPU's tensors, whose
    state is 5056 bytes where a CUDA generator's is 16."""
    q, k, v, mask, grad = _inputs(dtype, bias)
    torch.manual_seed(5)
    plain = attention._dropout_forward(q, k, v, mask, 0.3, causal, scale)
    torch.manual_seed(5)
    kept = attention.forward(attention.EAGER, attention.KEPT, q, k, v, mask, 0.3, causal, scale=scale)
    assert _same(plain[0], kept[0]) and _same(plain[1], kept[1])
    seed = kept[6]
    storage = seed.untyped_storage()
    _, _, extra = attention._saved_sizes(q, k)
    assert seed.dim() == 0 and seed.dtype == torch.int64 and storage.nbytes() == attention._CPU_STATE_BYTES + extra
    head = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (attention._CPU_STATE_BYTES,), (1,))
    assert not head.any()  # no state: nothing to rebuild a generator from
    recomputed = attention._dropout_backward(grad, q, k, v, mask, 0.3, causal, scale, plain[2], False)
    from_kept = attention._dropout_backward(grad, q, k, v, mask, 0.3, causal, scale, seed, False)
    for a, b in zip(recomputed[:3], from_kept[:3], strict=True):
        assert a is not None and b is not None and _same(a, b)


def test_a_cuda_graphs_forward_with_dropout_keeps_its_scores_and_its_memory_plan_counts_them() -> None:
    q = torch.empty(2, 3, 6, 8, device="meta")
    k = torch.empty(2, 3, 5, 8, device="meta")
    args = [q, k, k, None, 0.1]
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert attention.graph_kernel(attention.FORWARD, args, {}, cuda) == attention.KEPT
    assert attention.graph_kernel(attention.FORWARD, args, {}, cpu) == attention.DROPOUT  # fake GPUs: traced
    seed = attention.kept_seed_meta(args, {})
    _, _, extra = attention._saved_sizes(q, k)
    assert seed.dim() == 0 and seed.dtype == torch.int64 and seed.untyped_storage().nbytes() == 16 + extra


@pytest.mark.parametrize("length", [6, 16])  # 2x3x6x5 scores leave 4 bytes of padding, 2x3x16x5 none
def test_an_eager_forward_on_a_fake_gpu_keeps_the_state_then_the_scores_and_no_byte_unwritten(length: int) -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, length, 8, generator=g)
    k = v = torch.randn(2, 3, 5, 8, generator=g)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    out = attention.fused_attention(q, k, v, None, 0.3)
    storage = out[6].untyped_storage()
    _, work, extra = attention._saved_sizes(q, k)
    n = 2 * 3 * length * 5
    head = attention._CPU_STATE_BYTES
    assert storage.nbytes() == head + extra
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
    assert torch.equal(raw[:head], state)  # a fake GPU's eager forward: the state it drew from, then the scores
    assert not raw[head + n * work.itemsize + n :].any()  # the padding, where there is one


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_eager_call_with_dropout_on_a_gpu_keeps_its_scores_and_never_waits_for_the_device(
    dtype: torch.dtype,
) -> None:
    """An eager fused call with dropout on CUDA (round 31) keeps its softmax and mask after 16 zero bytes, as a CUDA
    graph's forward (`KEPT`): no generator state read on the host and copied to the device (a synchronous copy of
    pageable memory) in the forward, no `.cpu()` of it in the backward (a wait for the stream) nor the recomputed
    scores -- torch's sync debug mode refuses any wait, which the round-30 forward and backward made. The output and
    the gradients are torch's math path's from the same seed (never run: no GPU at hand)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g).to(dtype).cuda() for n in (6, 5, 5))
    grad = torch.randn(2, 3, 6, 8, generator=g).to(dtype).cuda()
    torch.manual_seed(5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attention.fused_attention(q, k, v, None, 0.3)
        got = attention.fused_attention_backward(grad, q, k, v, None, [True, True, True, False], out[0], out[1], None,
                                                 None, 6, 5, 0.3, False, out[6], out[7])  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode(0)
    storage = out[6].untyped_storage()
    _, _, extra = attention._saved_sizes(q, k)
    assert out[6].dim() == 0 and storage.nbytes() == 16 + extra
    raw = torch.empty(0, dtype=torch.uint8, device="cuda").set_(storage, 0, (storage.nbytes(),), (1,))
    assert not raw[:16].any()
    torch.manual_seed(5)
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    want = torch.ops.aten._scaled_dot_product_attention_math(qq, kk, vv, None, 0.3, False)[0]
    want.backward(grad)
    torch.testing.assert_close(out[0], want)
    for a, b in zip(got[:3], (qq.grad, kk.grad, vv.grad), strict=True):
        torch.testing.assert_close(a, b)
        assert a.stride() == b.stride()


def test_a_scaled_gradient_written_into_its_layout_is_the_multiply_then_the_copy_bit_for_bit() -> None:
    """`_scaled_like` (round 31): the product written by `mul.out` into the meta kernel's layout, where the multiply
    and `_like`'s copy were two kernels: the same values, strides and dtype, for a query laid out as a client's view
    of a packed projection (the encoders'), a transposed key's product, and layouts `_like` keeps as they are."""
    g = torch.Generator().manual_seed(4)
    packed = torch.randn(5, 2 * 3, 8, generator=g)  # (L, B*H, E) -> (B, H, L, E): MultiheadAttention's views
    ref = packed.transpose(0, 1).view(2, 3, 5, 8)
    t = torch.randn(2, 3, 5, 8, generator=g)
    for r, x, transposed in ((ref, t, False), (ref, t.transpose(-2, -1).contiguous(), True), (t, t, False),
                             (ref.contiguous(), t, False), (ref.double(), t.double(), False)):  # fmt: skip
        got = attention._scaled_like(r, x, -0.37, transposed)
        product = torch.ops.aten.mul.Scalar(x, -0.37)
        want = attention._like(r, product.transpose(-2, -1) if transposed else product)
        assert _same(got, want)
        assert got.stride() == torch.empty_like(r).stride()


def _aten_calls(fn: Any, *args: Any) -> tuple[Any, list[str]]:
    """`fn(*args)` and the aten calls it made (below autograd: what the dispatcher ran)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Calls() as calls:
        out = fn(*args)
    return out, calls.names


def test_the_eager_backward_reads_its_saved_scores_with_two_views_and_no_meta_tensor() -> None:
    """Round 44 (the encoder's compositions were ~16k instructions an op of Python): the eager backward from saved
    scores views the softmax and the mask with one `set_` each (no byte view, slices and dtype views), and a dense
    input's gradient layout is its strides (no meta tensor made for them); the gradients are those of a backward
    that recomputes the scores (the test above: bit for bit). 50 aten calls before, 42 here."""
    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    grad = torch.randn(2, 2, 8, 4)
    torch.manual_seed(5)
    plain = attention._dropout_forward(q, k, v, None, 0.1, False, None)  # the state alone: the backward recomputes
    torch.manual_seed(5)
    fwd = attention.fused_attention(q, k, v, None, 0.1)
    args = (grad, q, k, v, None, [True, True, True, False], fwd[0], fwd[1], None, None, 8, 8, 0.1, False, fwd[6],
            fwd[7])  # fmt: skip
    got, names = _aten_calls(attention.fused_attention_backward, *args)
    assert "aten.slice.Tensor" not in names and names.count("aten.set_.source_Storage_storage_offset") == 2
    assert names.count("aten.empty_like.default") == 1 and len(names) <= 42, names
    recomputed = attention._dropout_backward(grad, q, k, v, None, 0.1, False, None, plain[2], False)
    for a, b in zip(got[:3], recomputed[:3], strict=True):
        assert b is not None and _same(a, b)


def _bad_backward(case: str) -> list[Any]:
    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    fwd = attention.fused_attention(q, k, v, None, 0.1)
    args: list[Any] = [torch.randn_like(fwd[0]), q, k, v, None, [True, True, True, False], fwd[0], fwd[1], None,
                       None, 8, 8, 0.1, False, fwd[6], fwd[7]]  # fmt: skip
    if case == "grad_out":
        args[0] = torch.randn(2, 2, 8, 5)
    elif case == "out":
        args[6] = fwd[0].double()
    elif case == "logsumexp":
        args[7] = torch.zeros(2, 2, 7)
    elif case == "mask":
        args[5] = [True, True, True]
    elif case == "seed":
        args[14] = torch.zeros(1, dtype=torch.long)
    elif case == "key":
        args[2] = torch.randn(2, 2, 8)
    elif case == "dropout":
        args[12] = 1.5
    return args


@pytest.mark.parametrize("case", ["grad_out", "out", "logsumexp", "mask", "seed", "key", "dropout"])
def test_the_backward_refuses_what_its_validator_refuses_with_the_same_words(case: str) -> None:
    """The backward checks its arguments by name (`check_backward`, round 44) as the validator does by position:
    the same INVALID_ARGUMENT, word for word (pins what held before, when the backward called the validator)."""
    from gpupool.errors import InvalidArgument

    args = _bad_backward(case)
    with pytest.raises(InvalidArgument) as by_validator:
        attention.VALIDATORS[attention.BACKWARD](args, {})
    with pytest.raises(InvalidArgument) as by_backward:
        attention.fused_attention_backward(*args)
    assert str(by_validator.value) == str(by_backward.value)
