"""server/metalists.py: a graph's dry run of a long list op from its distinct entries gives what the op's meta kernel
gives over the whole list (shapes, strides, dtypes, offsets, storage sizes; or a refusal where torch refuses), on
seeded mixes of layouts (contiguous, channels-last, transposed, 0-d, 1-d, legacy empty, expanded, offset views)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from gpupool.server import metalists

from gpupool import errors

A = torch.ops.aten
M = torch.device("meta")


def _layout(r: random.Random) -> torch.Tensor:
    dtype = r.choice([torch.float32, torch.float64, torch.int64, torch.float16, torch.bool])
    kind = r.choice(["contiguous", "channels_last", "transposed", "0-d", "1-d", "empty", "expanded", "offset"])
    if kind == "contiguous":
        return torch.empty(r.choice([(2, 3, 4, 5), (1, 3, 4, 5), (2, 3, 1, 1)]), dtype=dtype, device=M)
    if kind == "channels_last":
        t = torch.empty(r.choice([(2, 3, 4, 5), (1, 3, 4, 5), (2, 1, 4, 5)]), dtype=dtype, device=M)
        return t.to(memory_format=torch.channels_last)
    if kind == "transposed":
        return torch.empty(r.choice([(3, 4), (1, 4), (4, 1)]), dtype=dtype, device=M).t()
    if kind == "0-d":
        return torch.empty((), dtype=dtype, device=M)
    if kind == "1-d":
        return torch.empty(r.choice([3, 1, 0]), dtype=dtype, device=M)
    if kind == "empty":
        return torch.empty(0, dtype=dtype, device=M)
    if kind == "expanded":
        return torch.empty(r.choice([(1, 4), (3, 1)]), dtype=dtype, device=M).expand(3, 4)
    return torch.empty(40, dtype=dtype, device=M)[r.randrange(5) :][:12].view(3, 4)


def _seen(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (
            tuple(value.shape),
            value.stride(),
            value.dtype,
            value.storage_offset(),
            value.untyped_storage().nbytes(),
        )
    if isinstance(value, list | tuple):
        return [_seen(v) for v in value]
    return value


def _outcome(call: Any) -> Any:
    try:
        return ("ok", _seen(call()))
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError, errors.GpupoolError):
        return ("refused",)


@pytest.mark.parametrize("seed", range(6))
def test_long_lists_are_dry_run_as_the_whole_list(seed: int) -> None:
    r = random.Random(4300 + seed)
    for _ in range(3):
        pool = [_layout(r) for _ in range(r.randint(1, 4))]
        if r.random() < 0.5:  # one shape in one or two layouts: cat and stack go through
            base = _layout(r)
            pool = [base, base.contiguous()]
        entries = [r.choice(pool) for _ in range(r.choice([257, 300]))]
        calls = [
            (A.cat.default, (entries,), {"dim": r.choice([0, 1, -1])}),
            (A.stack.default, (entries, r.choice([0, 1, -1])), {}),
            (A.block_diag.default, (entries,), {}),
            (A._foreach_neg.default, (entries,), {}),
            (A._foreach_add.List, (entries, entries[::-1]), {}),
            (A._foreach_mul.Scalar, (entries, 2.0), {}),
            (A._foreach_add_.Scalar, (entries, 1), {}),
        ]
        for op, args, kwargs in calls:
            whole = _outcome(lambda op=op, args=args, kwargs=kwargs: op(*args, **kwargs))
            distinct = _outcome(lambda op=op, args=args, kwargs=kwargs: metalists.run(op, op, args, kwargs))
            assert whole == distinct, (op, kwargs, [_seen(t) for t in pool])


def test_out_lists_and_undecided_layouts_past_their_bounds_are_refused() -> None:
    """An out= list over 256 entries (each entry may resize its tensor) is refused in a graph; so is a list whose
    output layout the distinct entries do not tell (stack of channels-last tensors: a 5-d view) past `WHOLE_MAX`,
    which up to it runs whole."""
    x = torch.empty(3, device=M)
    with pytest.raises(errors.InvalidArgument, match="out= list of 300 entries"):
        metalists.run(A._foreach_neg.out, A._foreach_neg.out, [[x] * 300], {"out": [torch.empty(3, device=M)] * 300})
    cl = torch.empty(1, 3, 4, 5, device=M).to(memory_format=torch.channels_last)
    n = metalists.WHOLE_MAX
    assert _seen(metalists.run(A.stack.default, A.stack.default, [[cl] * n], {})) == _seen(A.stack.default([cl] * n))
    with pytest.raises(errors.InvalidArgument, match=f"over {n + 1} tensors"):
        metalists.run(A.stack.default, A.stack.default, [[cl] * (n + 1)], {})


def test_a_list_op_of_no_known_layout_rule_runs_whole_only_up_to_its_bound() -> None:
    """Round 44 (hostile44): `_chunk_cat` over a long list ran its meta kernel over every entry (16,384: ~1.5 s, 65,536:
    ~14 s at load 20; b647913 has no bound but the list's 65,536). Now up to `WHOLE_MAX` entries run whole (the same
    metadata as the kernel's), more are refused (INVALID_ARGUMENT); an op that returns nothing (a fused optimizer,
    in place) still runs whole."""
    t = torch.empty(4, device=M)
    for n in (300, metalists.WHOLE_MAX):
        got = metalists.run(A._chunk_cat.default, A._chunk_cat.default, [[t] * n, 0, 2], {})
        want = A._chunk_cat.default([t] * n, 0, 2)
        assert (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(), want.dtype)
    with pytest.raises(errors.InvalidArgument, match="at most 1024"):
        metalists.run(A._chunk_cat.default, A._chunk_cat.default, [[t] * (metalists.WHOLE_MAX + 1), 0, 2], {})
    e, step = torch.empty(0, device=M), torch.zeros((), device=M)
    fused = A._fused_adam_.default
    n = 4 * metalists.WHOLE_MAX
    args = [[e] * n, [e] * n, [e] * n, [e] * n, [], [step] * n]
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    assert metalists.run(fused, fused, args, kwargs) is None


def test_foreach_outputs_laid_out_again_match_the_kernels_whatever_their_offset() -> None:
    """`_maker` (round 44): the outputs of a long `_foreach_` list laid out again with one `empty_strided` where that
    gives the first output's layout and storage size (fresh, offset 0), else as before (`_like`): the same metadata
    as the kernel's over the whole list, for 0-d, empty, transposed and offset entries."""
    for t in (torch.empty((), device=M), torch.empty(0, device=M), torch.empty(3, 4, device=M).t(),
              torch.empty(40, device=M)[3:15].view(3, 4)):  # fmt: skip
        for name in ("_foreach_neg", "_foreach_norm", "_foreach_sqrt"):
            op = getattr(A, name).Scalar if name == "_foreach_norm" else getattr(A, name).default
            got = metalists.run(op, op, [[t] * 300], {})
            want = op([t] * 300)
            assert [(o.shape, o.stride(), o.storage_offset(), o.untyped_storage().nbytes()) for o in got] == [
                (o.shape, o.stride(), o.storage_offset(), o.untyped_storage().nbytes()) for o in want
            ]
            assert len({o.untyped_storage()._cdata for o in got}) == 300  # each its own storage
