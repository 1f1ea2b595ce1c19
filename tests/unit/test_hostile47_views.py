"""Round 47 red team (hostile47): forged view geometries against runner46's dispatcher-free views
(native_runner.cpp `view_of`'s `views_here` branch: an op returning its argument, here `add_` through a view, whose
view the runner makes with `as_strided_tensorimpl` and `as_view` instead of the dispatcher), in learned runs and in
the records around them. Each case runs in `Pair` (tests/unit/test_server_runs.py), which compares the native
runner's session with the normal path's after every slice (tensors, tables, accounting, errors), and in a fresh
thread (the default dispatch state a worker's thread has: `support.in_fresh_thread`), so the native runner's
views really are made here (`plain_views`)."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from support import in_fresh_thread
from test_server_runs import (  # noqa: F401 - the fixture
    FOREIGN,
    VW,
    G,
    Pair,
    T,
    V,
    W,
    X,
    _x_on,
    h,
    runner,
)

from gpupool._proto import device_pb2

I64 = (1 << 63) - 1


def _free(*handles: int) -> device_pb2.Command:
    return device_pb2.Command(free=device_pb2.Free(handles=list(handles)))


def _through(p: Pair, t: int, target: bytes) -> list[device_pb2.Command]:
    """A fresh (4, 3) tensor A, B = A.t() (a view of it), A freed, then `add_` through `target` (a view argument,
    usually of B, whose base A is gone) returning it, and a record reading what it returned."""
    return [
        p.rec(1, [h(t, 0)], [T(G), V(1.0 + t)]),
        p.rec(26, [h(t, 1)], [T(h(t, 0))]),
        _free(h(t, 0)),
        p.rec(7, [h(t, 2)], [target, VW(W, [3], [1], 3)], {"alpha": V(-0.5)}),
        p.rec(3, [h(t, 3)], [T(h(t, 2))]),
    ]


def _done(t: int) -> device_pb2.Command:
    return _free(*(h(t, j) for j in range(4)))


def _hostile_geometries(kind: str) -> None:
    p = Pair()
    _x_on(p, 40)  # X: (4, 3) at offset 20 of a 40-float storage
    mod = p.ex[0].native
    before = mod.plain_views() if mod is not None else 0
    good = [c for t in range(8) for c in [*_through(p, t, VW(h(t, 1), [3], [1], 9)), *([_done(t)] if t < 7 else [])]]
    p.stream(good, itertools.cycle([64, 7]))  # learned: a view of a view whose base was freed, its last row
    hits = p.hits
    for s in p.s:  # what the session wrote, and only that: A's last row less half of W's elements 3-5, as on the CPU
        want = torch.relu(s.tensors[G][3] * 8.0 - 0.5 * s.tensors[W].reshape(-1)[3:6])
        assert torch.equal(s.tensors[h(7, 3)], want)
    p.slice([_done(7)])
    bad: list[tuple[Any, str]] = [
        # one element past B's 12-float storage (its base A freed: the storage is B's alone now)
        (lambda t: VW(h(t, 1), [4], [1], 9), "view argument reaches storage byte 52 of a 48-byte storage"),
        # far past it, in strides
        (lambda t: VW(h(t, 1), [3, 2], [1, 1 << 40], 0), "view argument reaches storage byte"),
        # sizes and strides whose reach overflows int64 (Python's ints do not: the C++ plan must not wrap)
        (lambda t: VW(h(t, 1), [3, 3], [I64 // 2, I64 // 2], 0), "view argument reaches storage byte"),
        (lambda t: VW(h(t, 1), [2], [1], I64 - 1), "view argument reaches storage byte"),
        # an expanded target (stride 0) of an in-place op: torch's own refusal, alike
        (lambda t: VW(h(t, 1), [3], [0], 0), "some of its elements refer to a single memory location"),
        # the freed base itself, freed two records before within the same run (B still holds its storage)
        (lambda t: VW(h(t, 0), [3], [1], 9), "was never created (or was freed)"),
        # another session's handle as the viewed tensor
        (lambda t: VW(FOREIGN, [3], [1], 0), "belongs to another session"),
    ]
    t = 8
    for target, words in bad:  # each 4 steps in a row: runs learned with it too, where the learner takes them
        for _ in range(4):
            p.slice(_through(p, t, target(t)))
            for s in p.s:
                err = s.poisoned.get(h(t, 2))
                assert err is not None and words in err.message, (t, err)
                assert h(t, 2) not in s.tensors
            p.slice([_done(t)])
            t += 1
    # empty views at offsets past any storage: no element read or written, both sessions alike
    for _ in range(4):
        for target, other in (
            (VW(h(t, 1), [0], [1], 1 << 62), VW(W, [0], [1], 0)),
            (VW(h(t, 1), [0, 3], [1 << 40, 1], I64 // 4), VW(W, [0, 3], [3, 1], 0)),
        ):
            p.slice([p.rec(1, [h(t, 0)], [T(G), V(1.0)]), p.rec(26, [h(t, 1)], [T(h(t, 0))]), _free(h(t, 0)),
                     p.rec(7, [h(t, 2)], [target, other]), _done(t)])  # fmt: skip
            t += 1
    # the learned run goes on after every refusal
    p.stream([c for t in range(t, t + 6) for c in [*_through(p, t, VW(h(t, 1), [3], [1], 9)), _done(t)]],
             itertools.cycle([64]))  # fmt: skip
    assert p.hits > hits
    if kind == "native":
        assert mod.plain_views() - before >= 8


def test_forged_view_geometries_through_the_dispatcher_free_views_read_nothing_past_the_session(
    runner: str,  # noqa: F811 - the fixture
) -> None:
    """A view argument of a view whose base handle was freed (B = A.t(), A freed, `add_` through a view of B: the
    storage is held by B alone), learned into a run; then, among the same records: a view one element past that
    storage, one far past it in strides, sizes and strides whose reach overflows int64, an offset of 2^63 - 2, an
    expanded in-place target, the freed base itself (NOT_FOUND), another session's handle; each refused with the
    normal path's error in both sessions, nothing bound; empty views at offsets past any storage run alike; and the
    run goes on. Pins behaviour that holds on 41939607 (nothing broke)."""
    in_fresh_thread(lambda: _hostile_geometries(runner))
