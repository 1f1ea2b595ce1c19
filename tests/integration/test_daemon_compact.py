"""Compact eager op records (`Command.eager_op`, gpupool/compact.py) against a live daemon: they compute what
`Op` messages compute, names are defined once per session, and every malformed, denied or foreign record is a
clear error on its own session only (a healthy neighbour keeps computing exact results throughout)."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from support import Healthy

from gpupool import compact, errors

EXPECTED = (errors.InvalidArgument, errors.PermissionDenied, errors.NotFound, errors.ResourceExhausted)


@pytest.fixture
def session(daemon: Any, healthy: Healthy) -> Iterator[Session]:
    with Session.attach(daemon.address, daemon.token(tenant="compact")) as s:
        yield s


def rec(op_id: int, name: str | None, outputs: list[int], args: list[bytes], kwargs: dict[str, bytes]) -> bytes:
    parts = [compact.head(op_id, name, outputs), compact.U8.pack(len(args)), *args, compact.U8.pack(len(kwargs))]
    for k, v in kwargs.items():
        parts += [compact.kwarg_key(k), v]
    return b"".join(parts)


def _view(h: int, sizes: list[int], strides: list[int], offset: int) -> bytes:
    """A view argument (compact.VIEW) with any values: the client's encoder would refuse bad ones."""
    n = len(sizes)
    return bytes([compact.VIEW]) + struct.pack(f"<QB{2 * n + 1}q", h, n, *sizes, *strides, offset)


def assert_still_usable(s: Session) -> None:
    a = s.upload(torch.ones(3))
    out = s.new_handle()
    s.eager_op(rec(99, "aten::add.Tensor", [out], [compact.tensor(a), compact.encode_value(1)], {}))
    assert torch.equal(s.download(out), torch.full((3,), 2.0))


def test_records_compute_and_reuse_their_op_id(session: Session) -> None:
    a, b = session.upload(torch.arange(6.0).reshape(2, 3)), session.upload(torch.ones(2, 3))
    first, second, total, kept = (session.new_handle() for _ in range(4))
    alpha = {"alpha": compact.encode_value(2)}
    session.eager_op(rec(0, "aten::add.Tensor", [first], [compact.tensor(a), compact.tensor(b)], alpha))
    session.eager_op(rec(0, None, [second], [compact.tensor(first), compact.tensor(b)], {}))  # by id only
    dims = [compact.tensor(second), compact.encode_value([1]), compact.encode_value(False)]
    session.eager_op(rec(1, "aten::sum.dim_IntList", [total], dims, {"dtype": compact.encode_value(torch.float64)}))
    session.eager_op(rec(2, "aten::mul_.Tensor", [0], [compact.tensor(first), compact.tensor(b)], {}))  # in place
    session.eager_op(rec(3, "aten::ones.default", [kept], [compact.encode_value([2])], {}))  # a factory
    expected = torch.arange(6.0).reshape(2, 3) + 3
    assert torch.equal(session.download(second), expected)
    assert torch.equal(session.download(total), expected.sum(1, dtype=torch.float64))
    assert torch.equal(session.download(kept), torch.ones(2))
    session.sync()


def test_view_arguments_compute_and_write_their_handles_storage(session: Session) -> None:
    a, b = session.upload(torch.arange(6.0)), session.upload(torch.ones(3, 2))
    out = session.new_handle()
    session.eager_op(rec(0, "aten::add.Tensor", [out], [compact.view(a, [3, 2], [1, 3], 0), compact.tensor(b)], {}))
    session.eager_op(rec(1, "aten::mul_.Scalar", [0], [compact.view(a, [2], [2], 1), compact.encode_value(10)], {}))
    assert torch.equal(session.download(out), torch.arange(6.0).reshape(2, 3).t() + 1)
    assert torch.equal(session.download(a), torch.tensor([0.0, 10, 2, 30, 4, 5]))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda a, o: rec(7, None, [o], [compact.tensor(a)], {}), errors.InvalidArgument, "never defined"),
        (lambda a, o: rec(7, "aten::neg.default", [o], [compact.tensor(a)], {})[:-3], errors.InvalidArgument, ""),
        (lambda a, o: rec(7, "aten::neg.default", [o], [b"\xee"], {}), errors.InvalidArgument, "unknown argument"),
        (lambda a, o: rec(7, "aten::neg.default", [o], [compact.tensor(a)], {}) + b"\x00", errors.InvalidArgument, ""),
        (lambda a, o: rec(7, "aten::neg", [o], [compact.tensor(a), compact.tensor(a)], {}), errors.InvalidArgument, ""),
        (lambda a, o: rec(7, "aten::nope.default", [o], [], {}), errors.InvalidArgument, "unknown op"),
        (lambda a, o: rec(7, "aten::save.default", [o], [], {}), errors.PermissionDenied, "denied"),
        (lambda a, o: rec(7, "os::system", [o], [], {}), errors.PermissionDenied, "denied"),
        (lambda a, o: rec(7, "aten::neg.default", [o], [compact.tensor(1 << 32 | 5)], {}), errors.PermissionDenied, ""),
        (lambda a, o: rec(7, "aten::neg.default", [o], [compact.tensor(a + 1000)], {}), errors.NotFound, ""),
        (lambda a, o: rec(7, "aten::neg.default", [1 << 32 | 5], [compact.tensor(a)], {}), errors.PermissionDenied, ""),
        (lambda a, o: rec(7, "aten::neg.default", [o], [_view(a, [3], [1], 0)], {}), errors.InvalidArgument, "byte 12"),
        (lambda a, o: rec(7, "aten::neg.default", [o], [_view(a, [], [], 2)], {}), errors.InvalidArgument, "byte 12"),
        (
            lambda a, o: rec(7, "aten::neg.default", [o], [_view(a, [2**62, 4], [1, 1], 0)], {}),
            errors.InvalidArgument,
            "more than int64",
        ),
        (
            lambda a, o: rec(7, "aten::neg.default", [o], [_view(a, [-1], [1], 0)], {}),
            errors.InvalidArgument,
            "negative",
        ),
        (
            lambda a, o: rec(7, "aten::neg.default", [o], [_view(a, [1] * 65, [1] * 65, 0)], {}),
            errors.InvalidArgument,
            "65 dimensions",
        ),
        (
            lambda a, o: rec(7, "aten::neg.default", [o], [_view(1 << 32 | 5, [1], [1], 0)], {}),
            errors.PermissionDenied,
            "",
        ),
        (lambda a, o: rec(7, "aten::neg.default", [o], [_view(a + 1000, [1], [1], 0)], {}), errors.NotFound, ""),
    ],
)
def test_bad_records_fail_alone(session: Session, make: Any, error: type, match: str) -> None:
    a = session.upload(torch.ones(2))
    out = session.new_handle()
    session.eager_op(make(a, out))
    with pytest.raises(error, match=match or None):
        session.sync()
    with pytest.raises(EXPECTED):  # the output is poisoned (or was never made): it never reads as data
        session.download(out)
    assert_still_usable(session)


def test_a_denied_name_stays_denied_by_id(session: Session) -> None:
    session.eager_op(rec(5, "aten::save.default", [], [], {}))
    with pytest.raises(errors.PermissionDenied):
        session.sync()
    session.eager_op(rec(5, None, [], [], {}))
    with pytest.raises(errors.PermissionDenied):
        session.sync()
    assert_still_usable(session)


def test_fuzzed_records(session: Session) -> None:
    """Mutated valid records through a live session: only statuses a client can act on, and the daemon lives."""
    a = session.upload(torch.ones(4))
    rng = random.Random(1234)
    base = rec(0, "aten::add.Tensor", [session.new_handle()], [compact.tensor(a), compact.tensor(a)], {})
    session.eager_op(base)
    session.sync()
    for _ in range(150):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(raw)) if raw else 0
            choice = rng.random()
            if choice < 0.5 and raw:
                raw[pos] = rng.randrange(256)
            elif choice < 0.75:
                raw[pos:pos] = rng.randbytes(rng.randint(1, 9))
            else:
                del raw[pos : pos + rng.randint(1, 6)]
        session.eager_op(bytes(raw))
        try:
            session.sync()
        except EXPECTED:
            pass
    assert_still_usable(session)
    [h] = session.call("aten::mul.Tensor", Handle(a), 3)
    assert torch.equal(session.download(h), torch.full((4,), 3.0))
