"""Ops whose work grows faster than their inputs and outputs, which `--max-op-flops` (server/cost.py) counted
only for contractions: sliding-window pools (output positions x window: a window as large as an expanded input
at stride 1), the depthwise convolutions, pairwise distances, the multilabel margin loss (N x C x C), the
trilinear contraction, `_foreach_mm`, dense linear algebra (cubic in the matrix side), and (round 18) `isin`
with few test elements (n x m comparisons), the embedding bags (indices x row width) and the in-place
contractions (`addmm_`, `baddbmm_`, `addbmm_`: schemas of their own names, never estimated). Round 17: a max pool
of a 64 MiB quota's expanded input held a fake GPU for days (8e9 window reads took 5.5 s here), shapes refused
nothing. Each is estimated and refused past the bound now; honest sizes run as torch runs them locally.

The daemon runs with a low bound (1e7) so that the refused cases are cheap to run before the fix."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from support import Healthy

from gpupool import errors

MiB = 1024**2
BOUND = 10**7


@pytest.fixture
def session(daemon_factory: Any) -> Iterator[Session]:
    served = daemon_factory(max_op_flops=BOUND)
    healthy = Healthy(served.address, served.token(tenant="healthy"), pause=0.01)
    with Session.attach(served.address, served.token(tenant="heavy", quota_bytes=64 * MiB)) as s:
        yield s
    healthy.check()


def _wide(s: Session, *shape: int, dtype: torch.dtype = torch.float32) -> Handle:
    """An expanded view of one element (a few bytes of memory, any logical size)."""
    [h] = s.call("aten::expand.default", Handle(s.upload(torch.ones([1] * len(shape), dtype=dtype))), list(shape))
    return Handle(h)


def test_superlinear_ops_past_the_bound_are_refused(session: Session) -> None:
    s = session
    image = _wide(s, 1, 1, 200, 200)
    eye = Handle(s.upload(torch.eye(300)))
    cases = [
        ("aten::max_pool2d_with_indices.default", (image, [100, 100], [1, 1])),  # 1e4 positions x 1e4 window
        ("aten::avg_pool2d.default", (image, [100, 100], [1, 1])),
        ("aten::avg_pool3d.default", (_wide(s, 1, 1, 40, 40, 40), [20, 20, 20], [1, 1, 1])),
        ("aten::fractional_max_pool2d.default", (image, [100, 100], [101, 101], torch.full((1, 1, 2), 0.5))),
        (
            "aten::avg_pool2d_backward.default",
            (_wide(s, 1, 1, 101, 101), image, [100, 100], [1, 1], [0, 0], False, True, None),
        ),
        (
            "aten::_conv_depthwise2d.default",
            (_wide(s, 1, 4, 100, 100), _wide(s, 4, 1, 50, 50), [50, 50], None, [1, 1], [0, 0], [1, 1]),
        ),  # fmt: skip
        ("aten::_pdist_forward.default", (Handle(s.upload(torch.ones(200, 2000))),)),  # 2e4 pairs x 2000
        (
            "aten::multilabel_margin_loss_forward.default",
            (_wide(s, 1, 5000), _wide(s, 1, 5000, dtype=torch.long), 1),  # 5000 x 5000
        ),
        (
            "aten::_trilinear.default",
            (_wide(s, 50, 100), _wide(s, 100, 100, 100), _wide(s, 50, 100), [1, 3], [0], [1, 2], [2, 3]),
        ),  # fmt: skip
        ("aten::_foreach_mm.default", ([_wide(s, 200, 200)] * 2, [_wide(s, 200, 200)] * 2)),
        ("aten::cholesky.default", (eye,)),  # 300^3
        ("aten::_linalg_svd.default", (eye,)),
        ("aten::_linalg_solve_ex.default", (eye, eye)),
        ("aten::linalg_solve_triangular.default", (eye, _wide(s, 300, 300)), {"upper": True}),
        ("aten::linalg_inv_ex.default", (eye,)),
        ("aten::linalg_lstsq.default", (Handle(s.upload(torch.eye(10))), _wide(s, 10, 200_000))),  # columns
        # the in-place contractions (schemas of their own names): 200 x 200 outputs, each 1000 long
        ("aten::addmm_.default", (Handle(s.upload(torch.zeros(200, 200))), _wide(s, 200, 1000), _wide(s, 1000, 200))),
        (
            "aten::baddbmm_.default",
            (Handle(s.upload(torch.zeros(1, 200, 200))), _wide(s, 1, 200, 1000), _wide(s, 1, 1000, 200)),
        ),
        (
            "aten::addbmm_.default",
            (Handle(s.upload(torch.zeros(200, 200))), _wide(s, 1, 200, 1000), _wide(s, 1, 1000, 200)),
        ),
        # few test elements: every element against each (1e6 x 50; past 10 * n ** 0.145 = 74 torch sorts instead)
        ("aten::isin.Tensor_Tensor", (_wide(s, 10**6), Handle(s.upload(torch.arange(50.0))))),
        (
            "aten::_embedding_bag.default",
            (_wide(s, 2, 10_000), _wide(s, 10_000, dtype=torch.long), Handle(s.upload(torch.tensor([0])))),
        ),  # 1e4 indices into one bag, each a row of 1e4
    ]
    for name, args, *kw in cases:
        outs = s.call(name, *args, **(kw[0] if kw else {}), outputs=1)
        with pytest.raises(errors.ResourceExhausted, match="multiply-adds") as info:
            s.sync()
        assert name.split(".")[0] in str(info.value), (name, str(info.value))
        with pytest.raises(errors.ResourceExhausted):
            s.download(outs[0])


def test_honest_sizes_of_the_same_ops_run(session: Session) -> None:
    s = session
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    a = torch.randn(24, 24, generator=gen, dtype=torch.float64)
    spd = a @ a.T + 24 * torch.eye(24, dtype=torch.float64)
    rows = torch.randn(30, 8, generator=gen)
    cases: list[tuple[str, tuple[Any, ...]]] = [
        ("aten::max_pool2d_with_indices.default", (x, [2, 2])),
        ("aten::avg_pool2d.default", (x, [3, 3], [1, 1], [1, 1])),
        ("aten::cholesky.default", (spd,)),
        ("aten::_linalg_solve_ex.default", (spd, a)),
        ("aten::_pdist_forward.default", (rows,)),
        ("aten::isin.Tensor_Tensor", (torch.randint(0, 20, (1000,), generator=gen), torch.tensor([3, 5, 7]))),
        ("aten::isin.Tensor_Tensor", (torch.randint(0, 20, (100,), generator=gen), torch.arange(0, 40, 2))),
        (
            "aten::_embedding_bag.default",
            (torch.randn(10, 8, generator=gen), torch.randint(0, 10, (20,), generator=gen), torch.tensor([0, 5, 12])),
        ),
    ]
    for name, args in cases:
        base, overload = name.removeprefix("aten::").split(".")
        want = getattr(getattr(torch.ops.aten, base), overload)(*args)
        want = want[0] if isinstance(want, tuple) else want
        sent = [Handle(s.upload(v)) if isinstance(v, torch.Tensor) else v for v in args]
        [out] = s.call(name, *sent)
        assert torch.equal(s.download(out), want), name
