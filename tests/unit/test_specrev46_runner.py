"""Round 46's review of the native runner's frees inside a run (`Ctx::free_here`: the context's own copies of the
session's tables, the freed bytes through the run's counters) at a hostile client's edges: a `Free` naming a handle
twice, handles freed and bound again within one run, a foreign handle after some frees, and the quota with a free
inside the run being what makes the next outputs fit. Each case runs in `Pair` (tests/unit/test_server_runs.py),
which compares the native runner's session with the normal path's after every slice."""

from __future__ import annotations

import itertools

from support import in_fresh_thread
from test_server_runs import (  # noqa: F401 - the fixture
    FOREIGN,
    VW,
    G,
    Pair,
    T,
    V,
    X,
    _x_on,
    free,
    h,
    runner,
    step,
    training,
)

from gpupool._proto import device_pb2


def _free(*handles: int) -> device_pb2.Command:
    return device_pb2.Command(free=device_pb2.Free(handles=list(handles)))


def test_a_free_naming_handles_twice_and_handles_bound_again_in_one_run(runner: str) -> None:  # noqa: F811
    """One slice: a step, a `Free` naming each of its outputs twice, the same step again (its handles bound anew
    within the run), a `Free` with a foreign handle between two runs of the same handles, the step once more."""
    p = Pair()
    p.stream(training(p, 4), itertools.cycle([64]))
    hits = p.hits
    for t in range(4, 10):
        gone = [h(t, j) for j in range(11)]
        cmds = [*step(p, t), _free(*gone, *gone), *step(p, t)]
        cmds += [_free(*gone[:5], FOREIGN, *gone[5:]), _free(*gone), *step(p, t), free(t - 1 if t > 4 else 3)]
        p.slice(cmds)
    assert p.hits > hits
    for s in p.s:
        assert all(h(9, j) in s.tensors for j in range(11))


def test_the_quota_counts_a_free_inside_the_run(runner: str) -> None:  # noqa: F811
    """Quotas from nothing spare to a few steps' bytes: each step's outputs fit only once the free of the step
    before, among the same run's records, is counted (and a quota that fits nothing fails at the same op)."""
    for quota in range(600, 1800, 40):
        p = Pair(quota=quota)
        cmds = [c for t in range(8) for c in [*step(p, t), *([free(t - 1)] if t else [])]]
        p.stream(cmds, itertools.cycle([200]))


def _view_step(p: Pair, t: int, offset: int) -> list[device_pb2.Command]:
    """`add_` into a view of X at `offset` (an op returning its argument: the view made by `view_of` without the
    dispatcher since round 46's `views_here` fix), then a record reading what it returned."""
    return [
        p.rec(1, [h(t, 0)], [T(G), V(1.0 + t)]),
        p.rec(7, [h(t, 1)], [VW(X, [5], [1], offset), VW(h(t, 0), [5], [1], 0)], {"alpha": V(-0.01)}),
        p.rec(3, [h(t, 2)], [T(h(t, 1))]),
    ]


def test_a_learned_view_past_a_smaller_storage_is_refused_by_the_dispatcher_free_views(runner: str) -> None:  # noqa: F811
    """A run learned on X at offset 20 of a 40-float storage, its view argument reaching element 29; then X bound
    again with the same meta on a 12-float storage of its own: the view made without the dispatcher
    (`as_strided_tensorimpl`, `views_here`) is refused before it is made, the same error in both
    sessions, nothing read past the storage; X wide again, the run goes on. In a fresh thread: the default dispatch
    state a worker's thread has (support.in_fresh_thread)."""
    in_fresh_thread(lambda: _learned_view_past_a_smaller_storage(runner))


def _learned_view_past_a_smaller_storage(kind: str) -> None:
    p = Pair()
    _x_on(p, 40)
    mod = p.ex[0].native
    before = mod.plain_views() if mod is not None else 0
    p.stream([c for t in range(6) for c in _view_step(p, t, 25)], itertools.cycle([64]))
    hits = p.hits
    _x_on(p, 24)
    p.slice([c for t in range(6, 9) for c in _view_step(p, t, 25)])
    for s in p.s:
        assert h(6, 1) in s.poisoned and "view argument reaches storage byte 120" in s.poisoned[h(6, 1)].message
    _x_on(p, 40)
    p.slice([c for t in range(9, 12) for c in _view_step(p, t, 25)])
    assert p.hits > hits
    if kind == "native":
        assert mod.plain_views() - before >= 6
