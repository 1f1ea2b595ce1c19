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
    _python_frees,
    free,
    h,
    inplace_view_step,
    runner,
    step,
    training,
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
