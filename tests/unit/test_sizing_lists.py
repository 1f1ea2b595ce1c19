"""Long tensor lists sized from their entries' layouts (server/sizing.py `MetaSizer._per_element`, `_LONG_LISTS`,
round 42) against torch's meta kernels over the whole lists (`_meta_new_bytes`, what every such list took until
then): the same bytes for `_foreach_` ops (out-of-place, in place, out=, scalar lists, lists of different lengths
refused alike) and at least as many for `block_diag`, `stack` and `cat` (the promoted dtype bounds torch's result
type). Seeded random mixes of shapes, transposed strides and dtypes; it pins what held before (the same numbers)."""

from __future__ import annotations

import random
import warnings
from typing import Any

import pytest
import torch
from gpupool.server import sizing

aten = torch.ops.aten


def _either(f: Any) -> Any:
    try:
        return f()
    except Exception as exc:  # noqa: BLE001 - the kind of refusal is compared
        return type(exc).__name__


def _tensor(rng: random.Random) -> torch.Tensor:
    shape = [rng.choice([0, 1, 2, 3]) for _ in range(rng.randint(0, 3))]
    dtype = rng.choice([torch.float32, torch.float64, torch.int64, torch.float16, torch.complex64, torch.bool])
    t = torch.zeros(shape, dtype=dtype)
    return t.t() if t.dim() == 2 and rng.random() < 0.3 else t


@pytest.mark.parametrize("seed", range(4))
def test_long_lists_are_sized_as_their_meta_kernels_size_them(seed: int) -> None:
    rng = random.Random(seed)
    sizer = sizing.MetaSizer()
    n = 300  # past `_too_long`'s 256
    pool = [_tensor(rng) for _ in range(rng.randint(1, 6))]
    xs = [rng.choice(pool) for _ in range(n)]
    ys = [rng.choice(pool) for _ in range(n)]
    outs = [torch.zeros(rng.choice([0, 2]), dtype=x.dtype) for x in xs]
    scalars = [rng.choice([1, 2.5, 1j, True]) for _ in range(n)]
    same = [
        (aten._foreach_neg.default, [xs], {}),
        (aten._foreach_sqrt.default, [xs], {}),
        (aten._foreach_add.List, [xs, ys], {"alpha": 2}),
        (aten._foreach_add.List, [xs, ys[:-1]], {}),
        (aten._foreach_mul.ScalarList, [xs, scalars], {}),
        (aten._foreach_div.List, [xs, ys], {}),
        (aten._foreach_norm.Scalar, [xs, 2], {}),
        (aten._foreach_lerp.Scalar, [xs, ys, 0.5], {}),
        (aten._foreach_neg.out, [xs], {"out": outs}),
        (aten._foreach_add_.Scalar, [xs, 1], {}),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 promotions: torch's "experimental" warning
        for op, args, kwargs in same:
            want = _either(lambda: sizing._meta_new_bytes(op, args, kwargs))  # noqa: B023
            assert _either(lambda: sizer.new_bytes(op, args, kwargs)) == want, op  # noqa: B023
        flat = [t for t in xs if t.dim() <= 2]
        for op, args in [
            (aten.block_diag.default, [flat]),
            (aten.stack.default, [[xs[0]] * n, 0]),
            (aten.cat.default, [[t.reshape(-1) for t in xs], 0]),
        ]:
            want = sizing._meta_new_bytes(op, args, {})
            assert sizer.new_bytes(op, args, {}) >= want, op


def test_a_foreach_list_of_one_layout_is_sized_once_per_layout() -> None:
    """65,536 entries of two layouts: two meta runs of one entry each, the bytes of all of them."""
    sizer = sizing.MetaSizer()
    xs = [torch.zeros(3), torch.zeros(2, dtype=torch.float64)] * 32768
    assert sizer.new_bytes(aten._foreach_neg.default, [xs], {}) == 32768 * (12 + 16)
    assert len(sizer._cache) == 2
