"""The native runner's session tables at their edges (round 46: a free among a run's records works on the context's
own tables and counts its bytes through the run's counters, `Ctx::free_here`): every case runs in `Pair`
(tests/unit/test_server_runs.py), which compares the native runner's session with the normal path's after each
slice -- tensors, tables, accounting, errors, marks."""

from __future__ import annotations

import itertools

import pytest
from gpupool.server.sessions import WorkerSession
from support import in_fresh_thread, in_threads, native_runner_or_skip
from test_server_runs import (  # noqa: F401 - the fixture
    BASE,
    Pair,
    T,
    V,
    W,
    X,
    _python_frees,
    _python_uploads,
    free,
    h,
    inplace_view_step,
    runner,
    step,
    training,
    upload,
)

from gpupool._proto import device_pb2


def test_a_free_inside_a_run_that_checks_a_handle_sees_every_record_counted(
    runner: str,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A free among a run's records whose handle is neither live nor failed calls `check_handle` (Python code): the
    run's counters (`s.used`, `s.ops`, `memory.used`, kept in C++ with a worker's word mark) are written back
    before it, so it sees every record before the free counted, as on the normal path."""
    seen: dict[int, list[tuple[int, int, int]]] = {}
    check = WorkerSession.check_handle

    def watched(self: WorkerSession, handle: int) -> None:
        if handle == BASE + 999:  # (the normal path checks other handles elsewhere)
            seen.setdefault(id(self), []).append((self.used, self.ops, self.memory.used))
        check(self, handle)

    monkeypatch.setattr(WorkerSession, "check_handle", watched)
    p = Pair()
    p.word = True  # no Python code at the marks: the counters stay in C++ up to the free
    p.stream(training(p, 4), itertools.cycle([64]))
    hits = p.hits
    python = _python_frees(p)  # frees `execute` runs (not inside a native run)
    for t, at in zip(range(4, 12), itertools.cycle([1, 2, 3, 5, 6, 8, 9, 10]), strict=False):
        cmds = step(p, t)  # (a free at 4 or 7 follows a record the normal path runs: `execute` runs it)
        gone = [h(t - 1, j) for j in range(11)]
        cmds.insert(at, device_pb2.Command(free=device_pb2.Free(handles=[*gone[:4], BASE + 999, *gone[4:]])))
        p.slice(cmds)
    a, b = (seen.get(id(s)) for s in p.s)
    assert a is not None and len(a) == 8
    assert a == b
    assert p.hits - hits >= 8 * 11 * 0.7
    if runner == "native":  # every free ran inside `Ctx.run` (`Ctx::between`)
        assert p.runs().native > 8 * 11 * 0.7 and not python


def test_tables_that_grow_past_the_key_cache_and_handles_freed_then_bound_again(runner: str) -> None:  # noqa: F811
    """Handles piled up over 45 steps (the session's dicts grow and resize; the context's cache of handle ints,
    4096 slots by the handle's low bits, sees outputs take the slots of the session's own tensors and of earlier
    outputs), then freed by one `Free` of 495 handles among a run's records, then the same handle values bound again
    by later steps: every record gives the normal path's result."""
    p = Pair()
    p.stream(training(p, 3), itertools.cycle([64]))
    for t in range(3, 46):  # h(31, 0) and h(31, 1) take the slots of IDX and G; h(41 + k, j) those of h(k, j + 4)
        p.slice(step(p, t))
    hits = p.hits
    everything = [h(t, j) for t in range(1, 46) for j in range(11)]
    cmds = step(p, 46)
    cmds.insert(4, device_pb2.Command(free=device_pb2.Free(handles=everything)))
    p.slice(cmds)
    for t in range(1, 12):  # the freed handles bound again
        p.slice([*step(p, t), free(t + 45 if t == 1 else t - 1)])
    assert p.hits - hits >= 12 * 11 * 0.7
    for s in p.s:
        assert len(s.tensors) == 5 + 11 and len(s._keys) == len(s.tensors)
    if runner == "native":
        assert p.runs().native > 40 * 11


def test_two_sessions_in_one_worker_process_share_nothing_but_the_process(runner: str) -> None:  # noqa: F811
    """Two sessions run at once in one process (`--isolation thread`: a thread and an executor each; the GIL let go
    around each op), each against its own normal-path twin: the storage entries a free of one gives back are filled
    again by the other's outputs (native_runner.cpp `Entries`, shared by the process), and neither session's tables,
    accounting or results show the other's."""
    pairs = [Pair(), Pair()]

    def train(p: Pair, cuts: list[int]) -> None:
        p.stream(training(p, 14), itertools.cycle(cuts))

    in_threads(*(lambda p=p, c=c: train(p, c) for p, c in zip(pairs, ([64], [13, 30]), strict=True)), timeout=120)
    for p in pairs:
        assert p.hits > 60
        if runner == "native":
            assert p.runs().native > 40
    a, b = (p.s[0] for p in pairs)
    assert not set(map(id, a.tensors.values())) & set(map(id, b.tensors.values()))
    assert not set(map(id, a._storages.values())) & set(map(id, b._storages.values()))


def test_the_views_an_op_returning_its_argument_takes_are_made_without_the_dispatcher(
    runner: str,  # noqa: F811 - the fixture
) -> None:
    """A view argument of an op that returns it (`add_` through a view, `Plan.direct_views` false) is made as the
    dispatcher's `as_strided` makes it, without the dispatcher (native_runner.cpp `view_of`: the CPU kernel's
    TensorImpl, then `as_view`): `_base`, the shared version counter and `detach_`'s refusal as there, so the pair
    agrees and `detach_` of the bound view fails alike. Until round 46 `views_here` asked for an empty thread-local
    include set, which always holds BackendSelect and ADInplaceOrView: every such view went through the dispatcher
    (~2k instructions more a view; the encoder's attention and dropout runs pass ~1 a record).

    Run in a fresh thread, whose thread-local dispatch state is the default a daemon's worker thread has: the suite's
    first CI with this test ran it in a process whose main thread something earlier had left otherwise (no view was
    made here; `views_here` then rightly declines), and its figures are this thread's."""
    in_fresh_thread(lambda: _views_without_the_dispatcher(runner))


def _views_without_the_dispatcher(kind: str) -> None:
    import torch

    p = Pair()
    mod = p.ex[0].native
    before = mod.plain_views() if mod is not None else 0
    cmds = [c for t in range(12) for c in inplace_view_step(p, t) + ([free(t - 1)] if t else [])]
    p.stream(cmds, itertools.cycle([64, 9]))
    assert h(11, 3) in p.s[0].poisoned
    assert "detach views in-place" in p.s[0].poisoned[h(11, 3)].message
    if kind == "native":
        assert mod is native_runner_or_skip()
        assert p.runs().native > 0
        tls = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())
        assert mod.plain_views() - before >= 8, (tls, torch.is_grad_enabled())


def test_tensors_rebound_from_python_between_runs_are_what_later_runs_read(runner: str) -> None:  # noqa: F811
    """Between slices the weight every step reads (W, an external input of the learned runs) is bound anew from
    Python: `bind` over the live handle (the dict keeps its key and replaces the value), a free then a bind, a Python
    free of a step's outputs; each in both sessions alike. Every later record reads the new tensor, as on the normal
    path. (Round 50's handles50 wrote these four tests for a cache of tensor objects by handle in the runner's context,
    not merged: they pin what any such cache must keep.)"""
    import torch

    p = Pair()
    p.stream(training(p, 3), itertools.cycle([64]))
    hits = p.hits
    want = p.s[0].tensors[W].clone()
    for t in range(3, 12):
        if t % 3 != 2:
            want = torch.full((3, 5), 0.25 * t - 1.0)
        for s in p.s:
            new = want.clone()
            if t % 3 == 0:
                s.bind(W, new)
            elif t % 3 == 1:
                s.free([W])
                s.bind(W, new)
            else:
                s.free([h(t - 1, j) for j in range(11)])
        p.slice([*step(p, t), *([free(t - 1)] if t % 3 != 2 else [])])
        assert torch.equal(p.s[0].tensors[W], want)
    assert p.hits - hits >= 9 * 11 * 0.7
    if runner == "native":
        assert p.runs().native > 9 * 11 * 0.5


def _mini(p: Pair, t: int) -> list[device_pb2.Command]:
    """A step of three records the runner runs in C++: a product of the batch, its mm by the weight W (an external
    input of the run), a relu of that."""
    return [
        p.rec(1, [h(t, 0)], [T(X), V(1.0 + t)]),
        p.rec(2, [h(t, 1)], [T(h(t, 0)), T(W)]),
        p.rec(3, [h(t, 2)], [T(h(t, 1))]),
    ]


def _mini_free(t: int) -> device_pb2.Command:
    return device_pb2.Command(free=device_pb2.Free(handles=[h(t, j) for j in range(3)]))


def _mini_pair() -> Pair:
    p = Pair()
    cmds: list[device_pb2.Command] = []
    for t in range(6):
        cmds += [*_mini(p, t), *([_mini_free(t - 1)] if t else [])]
    p.stream(cmds, itertools.cycle([64]))
    return p


def test_a_weight_freed_in_cpp_inside_a_run_is_not_read_by_a_later_record(runner: str) -> None:  # noqa: F811
    """The runner's own free of a handle (`free_loop` inside `Ctx.run`): the weight W, read by the record just
    before, is freed among the run's records while the test still holds its tensor (a stale reference would find it
    alive and read it); the next step's mm of W fails as on the normal path (the pair compares errors and poisoned
    handles)."""
    p = _mini_pair()
    old = [s.tensors[W] for s in p.s]  # noqa: F841 - held: a stale read finds the freed weight alive
    frees, hits = _python_frees(p), p.hits
    cmds = _mini(p, 6)
    cmds[2:2] = [device_pb2.Command(free=device_pb2.Free(handles=[W]))]
    p.slice([*cmds, _mini_free(5), *_mini(p, 7)])
    for s in p.s:
        assert W not in s.tensors and h(7, 1) in s.poisoned and h(7, 2) in s.poisoned
        assert h(6, 2) in s.tensors and h(7, 0) in s.tensors
    assert p.hits - hits >= 4
    if runner == "native":
        assert frees == []  # both frees ran inside `Ctx.run`


def test_a_weight_uploaded_over_in_cpp_inside_a_run_is_what_a_later_record_reads(runner: str) -> None:  # noqa: F811
    """The runner's own upload over a live handle (`Ctx::upload`: `Ctx::unbind`, then `bind_new`): W, read by the
    record just before, is uploaded over among the run's records while the test holds the old tensor; the next step's
    mm reads the uploaded bytes, as on the normal path (the pair compares every tensor)."""
    import torch

    p = _mini_pair()
    old = [s.tensors[W] for s in p.s]  # noqa: F841 - held: a stale read finds the old weight alive
    uploads, hits = _python_uploads(p), p.hits
    new = torch.full((3, 5), -0.5)
    cmds = _mini(p, 6)
    cmds[2:2] = [upload(W, new)]
    p.slice([*cmds, _mini_free(5), *_mini(p, 7)])
    for s in p.s:
        assert torch.equal(s.tensors[W], new)
        assert torch.equal(s.tensors[h(7, 1)], s.tensors[h(7, 0)] @ new)
    assert p.hits - hits >= 6
    if runner == "native":
        assert uploads == []  # the upload ran inside `Ctx.run`


def test_a_pinned_weight_uploaded_over_or_freed_in_cpp_bumps_pins_as_the_normal_path(runner: str) -> None:  # noqa: F811
    """The runner's own unbindings of a handle a captured graph reads as a persistent tensor (`s.pinned`, kept by
    server/graph.py `_pin`): an upload over it and a free of it among a run's records (`Ctx::unbind`, `free_loop`)
    bump the session's `pins` as the normal path's table methods do, so a graph plan's next run looks its persistent
    tensors up again (native_runner.cpp `graph_run`). Round 49 had no test of the C++ upload's bump (its `upload
    into it` case takes the Python path): with the bump taken out of `Ctx::unbind` this fails."""
    import torch

    p = _mini_pair()
    for s in p.s:
        s.pinned.add(W)  # (in place: the runner's context holds the set, as `_pin` keeps it)
    uploads, frees = _python_uploads(p), _python_frees(p)
    before = [s.pins for s in p.s]
    cmds = _mini(p, 6)
    cmds[2:2] = [upload(W, torch.full((3, 5), 0.5))]
    p.slice([*cmds, _mini_free(5), *_mini(p, 7)])
    mid = [s.pins for s in p.s]
    assert mid[0] - before[0] == mid[1] - before[1] >= 1
    cmds = _mini(p, 8)
    cmds[2:2] = [device_pb2.Command(free=device_pb2.Free(handles=[W]))]
    p.slice([*cmds, _mini_free(7)])
    after = [s.pins for s in p.s]
    assert after[0] - mid[0] == after[1] - mid[1] >= 1
    assert all(W not in s.tensors for s in p.s)
    if runner == "native":
        assert uploads == [] and frees == []  # both ran inside `Ctx.run`
