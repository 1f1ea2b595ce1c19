"""Ops run on a real daemon (fake GPU, loopback) give results bit-identical to local torch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session

aten = torch.ops.aten


@pytest.fixture
def session(daemon: Any) -> Iterator[Session]:
    with Session.attach(daemon.address, daemon.token()) as s:
        yield s


def _remote(s: Session, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return Handle(s.upload(value))
    if isinstance(value, list | tuple) and any(isinstance(v, torch.Tensor) for v in value):
        return [None if v is None else Handle(s.upload(v)) for v in value]
    return value


def run_both(s: Session, name: str, *args: Any, **kwargs: Any) -> tuple[list[Any], list[torch.Tensor]]:
    """(local outputs, remote outputs) of one aten overload."""
    base, _, overload = name.removeprefix("aten::").partition(".")
    op = getattr(getattr(aten, base), overload or "default")
    local = op(*args, **kwargs)
    local_list = list(local) if isinstance(local, tuple | list) else [local]
    outs = s.call(
        name, *[_remote(s, a) for a in args], outputs=len(local_list), **{k: _remote(s, v) for k, v in kwargs.items()}
    )
    return local_list, [s.download(h) for h in outs]


def assert_same(local: list[Any], remote: list[torch.Tensor]) -> None:
    assert len(local) == len(remote)
    for a, b in zip(local, remote, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), (a, b)


g = torch.Generator().manual_seed(0)


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


CASES: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("aten::add.Tensor", (rnd(4, 1), rnd(1, 5)), {"alpha": 2.5}),
    ("aten::mul.Tensor", (rnd(3, 4), rnd(4)), {}),
    ("aten::div.Tensor_mode", (rnd(3, 4), rnd(3, 4)), {"rounding_mode": "floor"}),
    ("aten::sigmoid.default", (rnd(7, 3),), {}),
    ("aten::where.self", (rnd(5, 5) > 0, rnd(5, 5), rnd(5, 1)), {}),
    ("aten::pow.Tensor_Scalar", (rnd(6),), {"exponent": 3}),
    ("aten::mm.default", (rnd(16, 32), rnd(32, 8)), {}),
    ("aten::addmm.default", (rnd(8), rnd(16, 32), rnd(32, 8)), {"beta": 0.5, "alpha": 2.0}),
    ("aten::bmm.default", (rnd(3, 4, 5), rnd(3, 5, 6)), {}),
    ("aten::convolution.default", (rnd(2, 3, 20), rnd(4, 3, 5), rnd(4), [2], [1], [1], False, [0], 1), {}),
    (
        "aten::convolution.default",
        (rnd(2, 3, 9, 9), rnd(4, 3, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
        {},
    ),
    (
        "aten::convolution_backward.default",
        (
            rnd(2, 4, 9, 9),
            rnd(2, 3, 9, 9),
            rnd(4, 3, 3, 3),
            [4],
            [1, 1],
            [1, 1],
            [1, 1],
            False,
            [0, 0],
            1,
            [True, True, True],
        ),
        {},
    ),
    (
        "aten::convolution_backward.default",
        (rnd(2, 4, 9), rnd(2, 3, 20), rnd(4, 3, 5), [4], [2], [1], [1], False, [0], 1, [True, True, True]),
        {},
    ),
    ("aten::sum.dim_IntList", (rnd(4, 5, 6), [1, 2]), {"keepdim": True}),
    ("aten::mean.dim", (rnd(4, 5), [0]), {}),
    ("aten::amax.default", (rnd(4, 5), [1]), {}),
    ("aten::var.correction", (rnd(10, 3),), {"dim": [0], "correction": 1}),
    ("aten::argmax.default", (rnd(4, 9),), {"dim": 1}),
    ("aten::_softmax.default", (rnd(4, 10), 1, False), {}),
    ("aten::_log_softmax.default", (rnd(4, 10), 1, False), {}),
    ("aten::_softmax_backward_data.default", (rnd(4, 10), torch.softmax(rnd(4, 10), 1), 1, torch.float32), {}),
    ("aten::_log_softmax_backward_data.default", (rnd(4, 10), torch.log_softmax(rnd(4, 10), 1), 1, torch.float32), {}),
    ("aten::embedding.default", (rnd(10, 4), torch.tensor([[1, 2, 9], [0, 2, 2]])), {}),
    ("aten::embedding_dense_backward.default", (rnd(2, 3, 4), torch.tensor([[1, 2, 9], [0, 2, 2]]), 10, -1, False), {}),
    ("aten::view.default", (rnd(4, 6), [3, 8]), {}),
    ("aten::transpose.int", (rnd(4, 6), 0, 1), {}),
    ("aten::slice.Tensor", (rnd(10, 3), 0, 2, 9, 3), {}),
    ("aten::as_strided.default", (rnd(20), [3, 3], [4, 1], 2), {}),
    ("aten::index.Tensor", (rnd(5, 6), [torch.tensor([0, 4, 4]), None]), {}),
    ("aten::index_put.default", (rnd(5, 6), [torch.tensor([0, 3])], rnd(6)), {"accumulate": True}),
    ("aten::gather.default", (rnd(4, 5), 1, torch.tensor([[0, 1], [4, 4], [2, 0], [1, 1]])), {}),
    ("aten::scatter.src", (rnd(3, 5), 1, torch.tensor([[0, 1], [4, 3], [2, 0]]), rnd(3, 2)), {}),
    ("aten::scatter_add.default", (rnd(3, 5), 1, torch.tensor([[0, 0], [4, 4], [2, 2]]), rnd(3, 2)), {}),
    ("aten::arange.start_step", (0, 10, 3), {"dtype": torch.int64}),
    ("aten::native_layer_norm.default", (rnd(4, 8), [8], rnd(8), rnd(8), 1e-5), {}),
]


@pytest.mark.parametrize(("name", "args", "kwargs"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_op_matches_local_torch(session: Session, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    assert_same(*run_both(session, name, *args, **kwargs))


def test_in_place_op_on_a_view_changes_the_base(session: Session) -> None:
    base = rnd(6, 4)
    other = rnd(2, 4)
    h = Handle(session.upload(base))
    [view] = session.call("aten::slice.Tensor", h, 0, 1, 5, 2)  # rows 1 and 3
    session.call("aten::mul_.Tensor", view, Handle(session.upload(other)), outputs=[0])
    session.call("aten::t_.default", Handle(session.upload(rnd(2, 3))), outputs=[0])  # unrelated in-place op
    expected = base.clone()
    expected[1:5:2].mul_(other)
    assert torch.equal(session.download(h), expected)
    assert torch.equal(session.download(view), expected[1:5:2])


def test_out_variant_and_scalar_sync(session: Session) -> None:
    a, b = rnd(3, 3), rnd(3, 3)
    out = Handle(session.upload(torch.empty(3, 3)))
    session.call("aten::add.out", Handle(session.upload(a)), Handle(session.upload(b)), out=out, outputs=[0])
    [total] = session.call("aten::sum.default", out)
    [count] = session.call("aten::argmax.default", out)
    values = session.sync([total, count])
    assert values == [(a + b).sum().item(), (a + b).argmax().item()]
    assert torch.equal(session.download(out), a + b)


def test_dropout_with_seed_repeats_its_mask_and_matches_local(session: Session) -> None:
    x = torch.ones(64, 64)
    h = Handle(session.upload(x))
    masks = []
    for _ in range(2):
        session.seed(1234)
        out, mask = session.call("aten::native_dropout.default", h, 0.5, True, outputs=2)
        masks.append((session.download(out), session.download(mask)))
    assert torch.equal(masks[0][1], masks[1][1]) and torch.equal(masks[0][0], masks[1][0])
    torch.manual_seed(1234)
    local_out, local_mask = aten.native_dropout.default(x, 0.5, True)
    assert torch.equal(masks[0][1], local_mask) and torch.equal(masks[0][0], local_out)
    [again, _] = session.call("aten::native_dropout.default", h, 0.5, True, outputs=2)
    assert not torch.equal(session.download(again), masks[0][0])  # the generator moved on


def test_sessions_have_independent_generators(daemon: Any) -> None:
    with Session.attach(daemon.address, daemon.token()) as a, Session.attach(daemon.address, daemon.token()) as b:
        a.seed(7)
        b.seed(7)
        ha = a.call("aten::rand.default", [1000], dtype=torch.float32)[0]
        hb1 = b.call("aten::rand.default", [1000], dtype=torch.float32)[0]
        ha2 = a.call("aten::rand.default", [1000], dtype=torch.float32)[0]  # a's stream advances, not b's
        hb2 = b.call("aten::rand.default", [1000], dtype=torch.float32)[0]
        assert torch.equal(a.download(ha), b.download(hb1))
        assert torch.equal(a.download(ha2), b.download(hb2))
