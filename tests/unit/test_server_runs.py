"""Eager run caching (server/runs.py): the records of a training loop, learned as runs and replayed as prebuilt steps,
must behave exactly as the normal path (the reference). Each test cuts the same command stream into the same
slices for two executors on identical sessions: one runs them through `slices.run_commands` with its learned runs,
the other command by command on the normal path (no `eager_span`). After every slice it compares everything a
client can observe: the slice's result (commands executed, error counts), the session's pending error (code, op,
message), the poisoned handles, every live tensor's meta and value, the memory and op counters. A counter checks
that the learned runs really ran.

Every test runs twice: with the native runner (server/native_runner.py) running the learned runs' fast steps in
C++ (a counter checks that it ran), and with `GPUPOOL_NATIVE_RUNNER=0` (the Python path only)."""

from __future__ import annotations

import collections
import functools
import gc
import itertools
import random
import re
import struct
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.server import attention, guards, native_runner, runs, slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession
from gpupool.server.speedmodel import SpeedModel
from grpc import StatusCode
from support import assert_same_sessions, native_runner_or_skip

from gpupool import compact, wire
from gpupool._proto import device_pb2, tensor_pb2

NUMBER = 3
BASE = NUMBER << 32
X, W, P, IDX, G = BASE + 1, BASE + 2, BASE + 3, BASE + 4, BASE + 5  # batch, weight, scalar param, indices, grads
FOREIGN = (NUMBER + 1 << 32) + 1
OPS = {
    1: "aten::mul.Scalar",
    2: "aten::mm",
    3: "aten::relu",
    4: "aten::rand_like",
    5: "aten::add.Tensor",
    6: "aten::sum",
    7: "aten::add_.Tensor",
    8: "aten::_foreach_add.Scalar",
    9: "aten::empty_like",
    10: "aten::add.Scalar",
    11: "aten::embedding_dense_backward",
    12: "aten::resize_",
    13: "aten::t_",
    14: "aten::_foreach_add_.List",
    15: "aten::cat",
    16: "aten::max.dim",
    17: "aten::_foreach_div.ScalarList",
    18: "aten::_foreach_addcdiv_.ScalarList",
    19: "aten::detach_",
    20: "aten::mm",  # the same ops under other ids: other templates (`part_b`)
    21: "aten::relu",
    22: "aten::_scaled_dot_product_fused_attention_overrideable",
    23: "aten::_scaled_dot_product_fused_attention_overrideable_backward",
    24: "aten::contiguous",
    25: "aten::detach",
    26: "aten::t",
    27: "aten::alias",
    28: "aten::expand",
    29: "aten::_foreach_add_.Scalar",
    30: "aten::mul.Tensor",
    31: "aten::add.out",
    32: "aten::mul_.Tensor",
    33: "aten::transpose_",
    34: "aten::unbind.int",
    35: "aten::clone",
}


_PAIRS: list[Pair] = []  # the test's pairs (`runner`)


def use_runner(param: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Executors made from now on: with the native runner ("native"; skipped where it cannot be built), or with
    `GPUPOOL_NATIVE_RUNNER=0` ("python")."""
    if param == "python":
        monkeypatch.setenv("GPUPOOL_NATIVE_RUNNER", "0")
    else:
        native_runner_or_skip()


@pytest.fixture(params=["native", "python"], autouse=True)
def runner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test with the native runner on (its fast steps must really run in C++), then with it off."""
    use_runner(request.param, monkeypatch)
    _PAIRS.clear()
    yield request.param
    pairs, _ = list(_PAIRS), _PAIRS.clear()
    native = sum(p.runs().native for p in pairs if "t" in p.ex[0]._eager)
    if request.param == "native":
        ran = [p for p in pairs if p.hits and not p.python_only]
        assert native > 0 or not ran, "the native runner never ran"
        assert not any(p.runs().native for p in pairs if p.python_only and "t" in p.ex[0]._eager)
    else:
        assert native == 0


class Pair:
    """Two executors and sessions fed the same slices: `ex[0]` runs learned runs, `ex[1]` the normal path only."""

    def __init__(self, quota: int = 1 << 24, max_handles: int = 4096, session: type = WorkerSession) -> None:
        _PAIRS.append(self)
        self.python_only = False  # set where the native runner must not run (the speed model holds every op)
        self.word = False  # `ex[0]` marks progress as a worker does (`slices.word_mark`): its last mark is compared
        # each mark (a callable) also takes the session's counters as Python code sees them then (`watch`)
        self.watch = False
        self.tables = False  # each mark (a callable) also takes the session's tables (`_tables`)
        self.ex = [CommandExecutor(slices.SliceLedger()) for _ in range(2)]
        self.s: list[WorkerSession] = []
        for _ in range(2):
            dev = FakeDevice(0, "h", 1 << 30)
            s = session("t", NUMBER, dev, DeviceMemory(dev), quota, max_handles=max_handles)
            torch.manual_seed(0)
            s.bind(X, torch.randn(4, 3))
            s.bind(W, torch.randn(3, 5))
            s.bind(P, torch.zeros(()))
            s.bind(IDX, torch.tensor([0, 1, 2, 1]))
            s.bind(G, torch.randn(4, 3))
            s.rng_state = dev.new_rng_state(1234)  # both sessions draw the same random numbers
            self.s.append(s)
        self.defined: set[int] = set()

    @property
    def hits(self) -> int:
        state = self.ex[0]._eager.get("t")
        return state[3].hits if state is not None else 0

    def runs(self) -> runs.Runs:
        return self.ex[0]._eager["t"][3]

    def slice(self, cmds: list[device_pb2.Command], budget: float = 1e9, payload: bytes | None = None) -> int:
        """Run one slice in both; returns how many commands it executed (`payload`: the frame's bytes as given)."""
        if payload is None:
            payload = device_pb2.ClientFrame(commands=cmds).SerializeToString()
        seen = []
        for k, (ex, s) in enumerate(zip(self.ex, self.s, strict=True)):
            ex.ledger.reset()
            execute = ex.execute if k == 0 else (lambda *a, ex=ex: ex.execute(*a))  # no `eager_span` behind it
            marks: list[int] = []
            req = slices.SliceRequest(1 << 40, 1 << 40, budget, payload)
            word = bytearray(struct.pack("<i", -1))
            mark = slices.word_mark(word) if self.word and k == 0 else marks.append
            if self.watch:
                mark = lambda i, s=s, marks=marks: marks.append((i, s.used, s.ops, s.memory.used))  # noqa: E731
            if self.tables:  # the tables as Python code sees them at each mark (`_tables`)
                mark = lambda i, s=s, marks=marks: marks.append((i, _tables(s)))  # noqa: E731
            res = slices.run_commands(s, execute, ex.ledger, req, _clock, mark)
            if self.word:  # the last mark each made (the word holds only that)
                last = struct.unpack("<i", word)[0] if k == 0 else (marks[-1] if marks else -1)
                marks = [last]
            err, s.error = s.error, None
            seen.append((res.executed, res.errors, res.used, res.ops, res.handles, marks,
                         None if err is None else (err.code, err.op, err.message)))  # fmt: skip
        assert seen[0] == seen[1]
        self.same()
        return seen[0][0]

    def stream(self, cmds: list[device_pb2.Command], cuts: Iterator[int]) -> None:
        """Run `cmds` in slices of the sizes `cuts` gives."""
        i = 0
        while i < len(cmds):
            n = next(cuts)
            self.slice(cmds[i : i + n])
            i += n

    def same(self) -> None:
        a, b = self.s
        assert_same_sessions(a, b)
        assert a.memory.used == b.memory.used
        storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in a.tensors.values()}
        assert a.used == sum(storages.values())  # the accounting follows what in-place ops did to storages

    def rec(self, op_id: int, outputs: list[int], args: list[bytes], kwargs: dict[str, bytes] | None = None) -> Any:
        name = None
        if op_id not in self.defined:
            self.defined.add(op_id)
            name = OPS[op_id]
        parts = [compact.head(op_id, name, outputs), compact.U8.pack(len(args)), *args]
        parts.append(compact.U8.pack(len(kwargs or {})))
        for k, v in (kwargs or {}).items():
            parts += [compact.kwarg_key(k), v]
        return device_pb2.Command(eager_op=b"".join(parts))


def _tables(s: WorkerSession) -> tuple[Any, ...]:
    """A session's tables as another session's compare with them: its live handles, each handle's storage entry
    ([handles on it, its bytes]) through `_keys` (storage ids differ between sessions), the sizes of `_keys` and
    `_storages`, and its byte counts; checked on the way: each handle's key is its tensor's storage, each entry
    counts the handles `_keys` puts on it and the bytes of its storage, and `used` is the sum of the entries."""
    on = collections.Counter(s._keys.values())
    for hd, t in s.tensors.items():
        key = s._keys[hd]
        assert key == t.untyped_storage()._cdata, hd
        assert list(s._storages[key]) == [on[key], t.untyped_storage().nbytes()], hd
    assert s.used == sum(e[1] for e in s._storages.values())
    entries = {hd: list(s._storages[s._keys[hd]]) for hd in s.tensors}
    return sorted(entries.items()), len(s._keys), len(s._storages), s.used, s.memory.used


def _clock() -> Any:
    class Clock:
        def __enter__(self) -> list[float]:
            return [0.0]

        def __exit__(self, *a: Any) -> None:
            pass

    return Clock()


T, V = compact.tensor, compact.encode_value


def h(step: int, j: int) -> int:
    return BASE + 1000 + 100 * step + j


def step(p: Pair, t: int, x: int = X, scale: int = 0) -> list[device_pb2.Command]:
    """One "training step": a chain whose inputs come from earlier records of the step and from the session's
    tensors; a random op, an in-place op on a parameter, a list op, an uninitialized factory, a value-guarded op
    whose indices are an output of the step (`scale` moves them: past 2 they are out of range)."""
    return [
        p.rec(1, [h(t, 0)], [T(x), V(1.0 + t)]),
        p.rec(2, [h(t, 1)], [T(h(t, 0)), T(W)]),
        p.rec(3, [h(t, 2)], [T(h(t, 1))]),
        p.rec(4, [h(t, 3)], [T(h(t, 2))]),
        p.rec(5, [h(t, 4)], [T(h(t, 2)), T(h(t, 3))], {"alpha": V(0.5 * t)}),
        p.rec(6, [h(t, 5)], [T(h(t, 4))]),
        p.rec(7, [P], [T(P), T(h(t, 5))], {"alpha": V(-0.01)}),
        p.rec(8, [h(t, 6), h(t, 7)], [compact.tensors([h(t, 1), h(t, 4)]), V(1.0)]),
        p.rec(9, [h(t, 8)], [T(h(t, 2))]),
        p.rec(10, [h(t, 9)], [T(IDX), V(scale)]),
        p.rec(11, [h(t, 10)], [T(G), T(h(t, 9)), V(5), V(-1), V(False)]),
    ]


def free(t: int) -> device_pb2.Command:
    return device_pb2.Command(free=device_pb2.Free(handles=[h(t, j) for j in range(11)]))


def training(p: Pair, steps: int, **kw: Any) -> list[device_pb2.Command]:
    cmds: list[device_pb2.Command] = []
    for t in range(steps):
        cmds += step(p, t, **kw)
        if t:
            cmds.insert(len(cmds) - 4, free(t - 1))  # frees land inside a step, as the client's batches do
    return cmds


def test_a_training_loop_runs_in_learned_runs_across_drifting_slice_cuts(runner: str) -> None:
    p = Pair()
    cmds = training(p, 12)
    p.stream(cmds, itertools.cycle([7, 13, 5, 30, 64, 11]))
    assert p.hits > len(cmds) // 2  # most records ran inside a run once learned
    assert p.runs().learned > 0
    hits, native = p.hits, p.runs().native
    cmds = [c for t in range(12, 20) for c in step(p, t) + [free(t - 1)]]
    p.stream(cmds, itertools.cycle([64]))
    assert p.hits - hits >= 8 * 11 * 0.7
    if runner == "native":  # all but the random op, the uninitialized factory and the value-guarded op: also the
        # first record of each run (after each free), which C++ tries against the runs' first steps (54 of 86
        # records when written; 30 before round 14, when every run's first step was matched in Python)
        assert p.runs().native - native >= (p.hits - hits) / 2, (p.runs().native - native, p.hits - hits)


def _step_with_free(p: Pair, t: int) -> list[device_pb2.Command]:
    """`training`'s step `t`: the free of step t - 1 before its last 4 records."""
    cmds = step(p, t)
    cmds.insert(len(cmds) - 4, free(t - 1))
    return cmds


def test_a_slice_that_starts_inside_a_run_goes_on_in_it(runner: str) -> None:
    """The daemon cuts a session's commands into slices anywhere (at most 128 commands, or its time budget): a
    slice whose first record follows the last record of the previous slice, inside a learned run, goes on in that
    run (`Runs.carry`). Before round 38 such a record took the normal path, as did the records after it until the
    span's end, and a run was learned from every new cut (the encoder: ~1.8 records a step). Runs learned from whole
    steps, then a step cut at each offset: every record runs inside a run, no run is learned, and each record's
    result is the normal path's (the pair compares them)."""
    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    hits, learned = p.hits, p.runs().learned
    for t, cut in zip(range(6, 17), range(1, 12), strict=True):
        p.stream(_step_with_free(p, t), itertools.cycle([cut, 64]))
    assert p.hits - hits == 11 * 11
    assert p.runs().learned == learned


def test_a_run_under_way_at_a_slice_end_refuses_what_changed_before_the_next() -> None:
    """What a slice's first record finds of the run its previous slice stopped in is checked as any step's
    inputs are: a kept output freed and bound again from Python between the slices (another tensor under the same
    handle) is not the run's (the identity check; the carried outputs are weak references, so a freed one is not
    kept alive either), and the records run as on the normal path (the pair compares them). Pins what the checks
    already did within a span."""
    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    cmds = _step_with_free(p, 6)
    p.slice(cmds[:3])  # stops after relu: mul and mm's outputs are kept outputs of the run under way
    for s in p.s:
        s.free([h(6, 2)])
        s.bind(h(6, 2), torch.full((4, 5), 3.0))
    hits = p.hits
    p.stream(cmds[3:], itertools.cycle([64]))
    assert p.hits - hits < 8  # rand_like read the rebound relu output: the run under way ended there


def test_storage_entries_read_their_handles_and_bytes_and_one_held_elsewhere_is_never_filled_again(runner: str) -> None:
    """Every storage entry (`WorkerSession._storages`: [handles on the storage, its bytes]) reads what the session
    holds, step after step of outputs bound and freed; an entry deleted while something else still refers to it is
    never filled again. The native runner keeps the entries its `Free` deleted with nothing else referring to them and
    fills them again for its next outputs (native_runner.cpp `Entries`): here the entries of every other step's
    outputs are referred to from the test when they are freed, the others are kept and filled again. Pins what the
    Python path and round 38's runner (a new list per output) did."""
    p = Pair()
    # (its session, the storage id it was under, the entry, a tensor on that storage: the id stays that storage's)
    held: list[tuple[WorkerSession, int, list[int], torch.Tensor]] = []
    for t in range(12):
        if t % 2 == 0:  # referred to from here while step t - 1's outputs are freed (both sessions': one process)
            held += [(s, s._keys[h], s._storages[s._keys[h]], x) for s in p.s for h, x in s.tensors.items()]
        p.stream(step(p, t) + ([free(t - 1)] if t else []), itertools.cycle([64]))
        for s in p.s:
            handles = collections.Counter(s._keys.values())
            nbytes = {s._keys[h]: x.untyped_storage().nbytes() for h, x in s.tensors.items()}
            assert {k: list(e) for k, e in s._storages.items()} == {k: [n, nbytes[k]] for k, n in handles.items()}
        tables = [e for s in p.s for e in s._storages.values()]
        for s, key, entry, _ in held:
            if s._storages.get(key) is not entry:  # deleted with its storage's last handle: as it was left
                assert entry[0] == 0 and all(e is not entry for e in tables)
    assert any(s._storages.get(key) is not entry for s, key, entry, _ in held)


def upload(handle: int, x: torch.Tensor, part: slice | None = None, offset: int = 0) -> device_pb2.Command:
    """An Upload of `x` into `handle`: the whole tensor in one chunk, or the bytes `part` of it at `offset`."""
    data = x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    up = device_pb2.Upload(handle=handle, offset=offset)
    if offset == 0:
        up.meta.dtype, up.meta.shape[:] = wire.dtype_to_proto(x.dtype), list(x.shape)
    up.data = data if part is None else data[part]
    up.last = part is None or part.stop is None or part.stop >= len(data)
    return device_pb2.Command(upload=up)


def test_frees_and_uploads_inside_a_run_let_the_run_go_on(runner: str) -> None:
    """The uploads and frees among a slice's records (a training step uploads its batch; the client's batched frees
    land anywhere in a step) run inside `eager_span`, and the run under way goes on after them. Before round 39 each
    one ended the span, and the record after it, inside a run, took the normal path where it was no run's first
    record (the encoder ~0.4 records a step, and a run learned from each new place). Runs learned from whole
    steps (the free 4 records before each step's end), then steps with the free and an upload of the next batch at
    every other place: every record runs inside a run, no run is learned, and the results are the normal path's (the
    pair compares them: the uploaded bytes, the batch the next step reads). A Sync among them ends the span (it
    answers): the next span goes on in the run under way (`Runs.carry`, since round 39 not only at a slice's end)."""
    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    hits, learned = p.hits, p.runs().learned
    batch = BASE + 900
    for t, at in zip(range(6, 16), range(1, 11), strict=True):
        cmds = step(p, t, x=X if t == 6 else batch + t - 1)
        cmds.insert(at, free(t - 1))
        cmds.insert(11 - at, upload(batch + t, torch.randn(4, 3)))
        cmds.insert(1 + (at + 4) % 12, device_pb2.Command(sync=device_pb2.Sync(request_id=t)))  # ends the span
        p.slice(cmds)
    assert p.hits - hits == 10 * 11
    assert p.runs().learned == learned
    if runner == "native":
        assert p.runs().native > 0


class _Watched(WorkerSession):
    """A session whose frees (the Python path: `WorkerSession.free` overridden) note weak references of the tensors
    they unbind, and whose handle checks note which of those are still alive then."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.freed: list[Any] = []
        self.alive: list[list[bool]] = []

    def free(self, handles: list[int]) -> None:
        self.freed += [weakref.ref(self.tensors[h]) for h in handles if h in self.tensors]
        super().free(handles)

    def check_handle(self, handle: int) -> None:
        self.alive.append([r() is not None for r in self.freed])
        super().check_handle(handle)


def test_a_kept_output_freed_or_uploaded_over_inside_a_run_is_not_kept_alive_and_fails_the_run() -> None:
    """A free or an upload inside a run (`eager_span` runs them, the run goes on) that unbinds one of the run's
    kept outputs: the run holds it only weakly across the command (a run holds its kept outputs only while its session
    does: else a client freeing each step's outputs inside one long run would keep them all alive outside the
    accounting), so it is gone by the next command (the upload's handle check sees it dead); the step that reads
    the freed handle fails as on the normal path, the one that reads the uploaded tensor reads it (the identity check
    fails, the normal path runs it), and the records between them still run inside the run (before round 39 the
    free ended the span: the record after it took the normal path)."""
    p = Pair(session=_Watched)
    p.stream(training(p, 6), itertools.cycle([64]))
    hits = p.hits
    cmds = step(p, 6)
    # after relu (record 2) mm's output (read by the list op, record 7) freed; after add (record 4) relu's output (read
    # by empty_like, record 8) bound again by an upload of the same shape
    cmds[5:5] = [upload(h(6, 2), torch.ones(4, 5))]
    cmds[3:3] = [free(5), device_pb2.Command(free=device_pb2.Free(handles=[h(6, 1)]))]
    p.slice(cmds)
    for s in p.s:
        assert s.alive and not any(s.alive[-1]), s.alive  # type: ignore[attr-defined]
        assert h(6, 6) in s.poisoned and h(6, 7) in s.poisoned  # the list op read the freed handle
        assert h(6, 8) in s.tensors
    assert p.hits - hits >= 7  # records 0-6 (3 before round 39: the free ended the span, the rest took the normal path)


def test_a_half_uploaded_handle_inside_a_run_is_refused_as_on_the_normal_path() -> None:
    """The first chunk of an upload inside a run (`eager_span` runs it): while its handle is half uploaded every
    record takes the normal path's checks (`s.uploads`), and a record that reads it fails with FailedPrecondition
    (`Session.resolve`) in both; once its last chunk came the records run inside runs again. One slice (the pair
    compares every tensor after it: a half-uploaded one holds bytes nobody wrote). Pins what held when the upload
    ended the span."""
    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    y = BASE + 950
    x = torch.randn(4, 3)
    cmds = step(p, 6)
    cmds[4:4] = [upload(y, x, slice(0, 16))]
    cmds += step(p, 7, x=y)
    cmds += [upload(y, x, slice(16, None), offset=16)]
    hits = p.hits
    cmds += step(p, 8, x=y)
    p.slice(cmds)
    for s in p.s:
        assert s.poisoned[h(7, 0)].code == StatusCode.FAILED_PRECONDITION
        assert "still being uploaded" in s.poisoned[h(7, 0)].message
        assert torch.equal(s.tensors[y], x)
    assert p.hits - hits >= 8 + 4  # step 6's records before the chunk, and step 8's in runs once it is done


def test_a_big_upload_among_records_hands_its_taken_bytes_over() -> None:
    """A slice of at least `bulk.STRIP_MIN` bytes has its big uploads' bytes taken out before upb parses it
    (`slices._bytes_taken`): the upload that `eager_span` runs among the records gets them through the slice's own
    `execute` (`between`), as `run_commands` did; the record that reads it reads those bytes (the pair compares)."""
    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    hits = p.hits
    big = torch.randn(4, 3 * 8192)[:, :3].contiguous()  # the batch's values
    pad = BASE + 960
    cmds = step(p, 6)
    cmds[2:2] = [upload(pad, torch.randn(128, 1024)), upload(BASE + 961, big)]
    cmds += step(p, 7, x=BASE + 961)
    p.slice(cmds)
    assert torch.equal(p.s[0].tensors[pad], p.s[1].tensors[pad])
    assert p.hits - hits >= 18


def _python_uploads(p: Pair) -> list[int]:
    """The handles of the uploads `ex[0]` runs on the Python path (`CommandExecutor._upload`) from now on."""
    ex, seen = p.ex[0], []
    run = ex._upload

    def spy(s: WorkerSession, up: device_pb2.Upload, data: Any = None) -> None:
        seen.append(up.handle)
        run(s, up, data)

    ex._upload = spy  # type: ignore[method-assign]
    return seen


def test_one_chunk_uploads_inside_a_run_run_in_cpp_as_on_the_normal_path(runner: str) -> None:
    """With the native runner, a one-chunk upload among a run's records (a training step's batch) runs inside
    `Ctx.run` (native_runner.cpp `Ctx::upload`: `_upload`'s `filled` path and `rebind`) and the run goes on after it
    in C++: no return to Python, no `_upload`. Before round 40 each one left `Ctx.run` for the Python path (~46k
    instructions an upload) and the records after it came back into a new call. New handles, a handle uploaded
    over (a live tensor: its storage's bytes freed), a failed handle uploaded over (its error forgotten), a bool
    tensor, a tensor of no elements, a 0-d one: the pair compares every tensor, the errors and the accounting with
    the normal path's after each slice."""
    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    seen = _python_uploads(p)
    hits = p.hits
    batch = BASE + 900
    python: list[int] = []  # the uploads after a record the Python path runs (rand_like, add_ on a live handle)
    for t, at in zip(range(6, 16), range(1, 11), strict=True):
        cmds = step(p, t, x=X if t == 6 else batch + t - 1)
        cmds.insert(at, upload(batch + t, torch.randn(4, 3)))
        cmds.insert(at + 1, upload(batch, torch.randn(2, 2) if t % 2 else torch.randn(3)))  # over a live one
        cmds.insert(at, upload(BASE + 990 + t, torch.rand(5) > 0.5))
        cmds.insert(at + 2, upload(BASE + 980 + t % 2, torch.zeros(0, 3) if t % 2 else torch.tensor(7.0)))
        cmds.append(free(t - 1))
        if at in (4, 7):
            python += [c.upload.handle for c in cmds if c.WhichOneof("cmd") == "upload"]
        p.slice(cmds)
    # a failed handle uploaded over: its error forgotten, the handle live again
    for s in p.s:
        s.poison(batch, s.poisoned.get(batch) or _poison())
    cmds = step(p, 16, x=batch + 15)
    cmds.insert(3, upload(batch, torch.ones(2, 2)))
    p.slice(cmds)
    assert all(batch in s.tensors and batch not in s.poisoned for s in p.s)
    assert p.hits - hits == 11 * 11
    if runner == "native":  # (before round 40: all 41; before round 50, `run_between`: those after a record the
        # Python path runs, `python`, through `execute`)
        assert not seen and len(python) == 8, [x - BASE for x in seen]
    else:
        assert len(seen) == 10 * 4 + 1


def _poison() -> Any:
    from gpupool.server.sessions import Poison

    return Poison(StatusCode.INVALID_ARGUMENT, "op", "failed")


def test_uploads_the_runner_does_not_take_inside_a_run_run_or_fail_on_the_python_path(runner: str) -> None:
    """Inside a run, the uploads `Ctx::upload` leaves to Python untouched (checked before anything is done): another
    session's handle, the session's reserved handle 0, bytes that are not the tensor's, a bool byte that is not 0
    or 1, an unknown dtype, over the quota, past the handle limit, a first chunk of several, a chunk with
    `bulk_bytes`; each fails (or, the chunks, runs) as on the normal path (the pair compares the errors, the poisoned
    handles and the accounting), and the records after it run as there. Pins what the Python path did inside the
    span (round 39) and that the runner leaves these to it."""
    p = Pair(quota=1 << 16, max_handles=200)
    p.stream(training(p, 6), itertools.cycle([64]))
    seen = _python_uploads(p)

    def raw(up: device_pb2.Upload) -> device_pb2.Command:
        return device_pb2.Command(upload=up)

    bad_bool = upload(BASE + 902, torch.ones(3, dtype=torch.bool))
    bad_bool.upload.data = b"\x01\x02\x00"
    short = upload(BASE + 903, torch.ones(3))
    short.upload.data = short.upload.data[:-1]
    unknown = upload(BASE + 904, torch.ones(3))
    unknown.upload.meta.dtype = 99  # type: ignore[assignment]
    bulk = upload(BASE + 905, torch.ones(3))
    bulk.upload.bulk_bytes = 0
    bulk.upload.bulk_bytes = 12
    bulk.upload.data = b""
    cases = [
        upload(FOREIGN, torch.ones(3)),
        upload(BASE, torch.ones(3)),
        bad_bool,
        short,
        unknown,
        upload(BASE + 906, torch.ones(64, 1024)),  # 256 KiB: over the quota
        bulk,
        upload(BASE + 907, torch.arange(6.0), slice(0, 8)),  # a first chunk; the second after the next record
    ]
    for t, case in zip(range(6, 6 + len(cases)), cases, strict=True):
        cmds = step(p, t)
        cmds.insert(3, case)
        if case is cases[-1]:
            cmds.insert(5, upload(BASE + 907, torch.arange(6.0), slice(8, None), offset=8))
        cmds.append(free(t - 1))
        p.slice(cmds)
    assert BASE + 907 in p.s[0].tensors and torch.equal(p.s[0].tensors[BASE + 907], torch.arange(6.0))
    # past the handle limit: the pair's sessions hold 200 handles less one, then two new handles are uploaded
    for s in p.s:
        for j in range(200 - 1 - s.handle_count()):
            s.bind(BASE + 3000 + j, torch.zeros(()))
    cmds = step(p, 20)
    cmds.insert(3, free(6 + len(cases) - 1))
    cmds.insert(4, upload(BASE + 908, torch.ones(2)))
    cmds.insert(5, upload(BASE + 909, torch.ones(2)))
    p.slice(cmds)
    if runner == "native":
        assert {BASE + 902, BASE + 903, BASE + 904, BASE + 905, BASE + 906, FOREIGN, BASE} <= set(seen)


def test_a_kept_output_freed_or_uploaded_over_in_cpp_is_not_kept_alive_and_fails_the_run() -> None:
    """A free or an upload that `Ctx.run` runs among a run's records, of a handle holding one of the run's kept
    outputs, lets that tensor go at once (as the Python path holds kept outputs weakly across such a command: a run
    holds them only while its session does): by the record after it nothing holds it; the record that reads the
    freed handle fails, the one that reads the uploaded handle reads the uploaded tensor (the identity check fails,
    the normal path runs it), as on the normal path (the pair compares the results)."""
    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    uploads, frees = _python_uploads(p), _python_frees(p)
    cmds = step(p, 6)
    # after add (record 4) relu's output (read by empty_like, record 8) uploaded over; then mm's output (read by the
    # list op, record 7) freed
    cmds[5:5] = [upload(h(6, 2), torch.ones(4, 5)), device_pb2.Command(free=device_pb2.Free(handles=[h(6, 1)]))]
    refs: dict[int, Any] = {}
    alive: dict[int, list[bool]] = {}
    s = p.s[0]

    def mark(i: int) -> None:
        if i == 3:
            refs.update({j: weakref.ref(s.tensors[h(6, j)]) for j in (1, 2)})
        elif refs:
            alive[i] = [refs[j]() is not None for j in (1, 2)]

    ex = p.ex[0]
    req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, device_pb2.ClientFrame(commands=cmds).SerializeToString())
    slices.run_commands(s, ex.execute, ex.ledger, req, _clock, mark)
    slices.run_commands(p.s[1], lambda *a: p.ex[1].execute(*a), p.ex[1].ledger, req, _clock)
    p.same()
    assert h(6, 6) in s.poisoned and h(6, 7) in s.poisoned  # the list op read the freed handle
    # both alive until the upload (command 5), relu's output gone by the free (6), mm's by the record after it (7)
    assert alive[4] == alive[5] == [True, True] and alive[6] == [True, False] and alive[7] == [False, False], alive
    if ex.native is not None:
        assert uploads == [] and frees == []


def _python_frees(p: Pair) -> list[int]:
    """The sizes of the `Free` messages `ex[0]` runs through `CommandExecutor.execute` (`native.free`, or the Python
    path's `WorkerSession.free`) from now on."""
    seen: list[int] = []
    mod = p.ex[0].native
    if mod is None:
        return seen

    def free(s: WorkerSession, msg: bytes, ctx: Any = None) -> Any:
        seen.append(len(msg))
        return mod.free(s, msg, ctx)

    p.ex[0].native = type("Native", (), {"free": staticmethod(free), "__getattr__": lambda _, n: getattr(mod, n)})()
    return seen


def test_frees_inside_a_run_run_in_cpp_as_on_the_normal_path(runner: str) -> None:
    """With the native runner, a free among a run's records runs inside `Ctx.run` (`Ctx::between`: `free_handles`
    with the context's handle ints) and the run goes on after it in C++. Before round 40 each one left `Ctx.run`
    for `execute` (its message serialized again, `native.free`) and the records after it came back into a new call.
    A free that fails midway (another session's handle among its handles) frees the handles before it and records
    the error as on the normal path. The pair compares every tensor, the errors and the accounting after each
    slice."""
    p = Pair()
    calls = Calls(p)
    p.stream(training(p, 6), itertools.cycle([64]))
    seen = _python_frees(p)
    hits, before = p.hits, len(calls.calls)
    python = 0  # frees after a record the Python path runs (rand_like, add_ on a live handle)
    for t, at in zip(range(6, 16), range(1, 11), strict=True):
        cmds = step(p, t)
        cmds.insert(at, free(t - 1))
        python += at in (4, 7)
        p.slice(cmds)
    assert p.hits - hits == 10 * 11
    cmds = step(p, 16)
    handles = [h(15, j) for j in range(5)] + [FOREIGN] + [h(15, j) for j in range(5, 11)]
    cmds.insert(2, device_pb2.Command(free=device_pb2.Free(handles=handles)))
    p.slice(cmds)
    for s in p.s:
        assert h(15, 4) not in s.tensors and h(15, 5) in s.tensors  # freed up to the foreign handle
    if runner == "native":  # (before round 40: all 11, and 42 `Ctx.run` calls in this test; 32 now; before
        # round 50, `run_between`: those after a record the Python path runs, `python`, through `execute`)
        assert not seen and python == 2, seen
        assert len(calls.calls) - before <= 32, len(calls.calls) - before


def test_a_spent_time_budget_ends_the_slice_after_the_same_command() -> None:
    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    hits = p.hits
    cmds = step(p, 6) + [free(5)] + step(p, 7)
    while cmds:  # as the daemon does: the commands not executed come again in the next slice
        n = p.slice(cmds, budget=0.0)
        assert n == 1
        cmds = cmds[n:]
    assert p.hits > hits


def test_the_fake_gpu_speed_model_holds_every_op(monkeypatch: pytest.MonkeyPatch) -> None:
    held: dict[float, list[str]] = {1e9: [], 2e9: []}
    monkeypatch.setattr(SpeedModel, "hold_op", lambda self, op, *a: held[self.tflops].append(op.name()))
    p = Pair()
    p.ex[0].speed, p.ex[1].speed = SpeedModel(tflops=1e9), SpeedModel(tflops=2e9)
    p.python_only = True
    p.stream(training(p, 8), itertools.cycle([64]))
    assert p.hits > 0
    assert held[1e9] == held[2e9]
    assert len(held[1e9]) == p.s[0].ops


def test_an_op_that_fails_inside_a_run_fails_as_on_the_normal_path() -> None:
    p = Pair()
    p.stream(training(p, 4), itertools.cycle([16]))
    hits = p.hits
    # value guard: the indices of step 6 are out of range (the op after it still runs, on the poisoned output)
    cmds = step(p, 4) + [free(3)] + step(p, 5) + [free(4)] + step(p, 6, scale=3) + step(p, 7)
    p.stream(cmds, itertools.cycle([64]))
    assert p.hits - hits > 30
    assert p.s[0].poisoned  # the guard's failure poisoned its output in both
    # a freed input in a later step, a foreign output handle, a foreign input
    cmds = step(p, 8)
    cmds[3] = p.rec(4, [h(8, 3)], [T(h(6, 2))])  # freed? no: live from step 6; the next one is freed
    cmds[5] = p.rec(6, [h(8, 5)], [T(h(3, 4))])  # freed with step 3
    cmds[7] = p.rec(8, [h(8, 6), FOREIGN], [compact.tensors([h(8, 1), h(8, 4)]), V(1.0)])
    cmds += step(p, 9)
    cmds[11 + 2] = p.rec(3, [h(9, 2)], [T(FOREIGN)])
    p.stream(cmds, itertools.cycle([9, 64]))


def test_a_workers_word_mark_holds_the_record_running_as_the_normal_paths_marks() -> None:
    """A worker's progress mark is a word of shared memory (`slices.word_mark`), which the native runner stores
    itself rather than calling the mark: after every slice (cut anywhere, or ended by the time budget after each
    command) it holds the index the normal path marked last."""
    p = Pair()
    p.word = True
    p.stream(training(p, 8), itertools.cycle([5, 64, 17, 3]))
    hits = p.hits
    p.stream([c for t in range(8, 12) for c in step(p, t) + [free(t - 1)]], itertools.cycle([64, 30, 9]))
    assert p.hits - hits >= 4 * 10
    cmds = step(p, 12) + [free(11)] + step(p, 13)
    while cmds:
        n = p.slice(cmds, budget=0.0)
        cmds = cmds[n:]
    # an op that raises inside a run: the mark stays at its record (the scale puts indices out of range)
    p.stream([c for t in range(14, 17) for c in step(p, t, scale=3 if t == 15 else 0)], itertools.cycle([64]))
    assert p.s[0].poisoned


def test_python_code_called_inside_a_native_run_sees_every_record_counted(runner: str) -> None:
    """The native runner keeps a run's counters (`s.used`, `s.ops`, `memory.used`) in C++ and writes them back before
    any Python code it calls: a progress mark that is a callable (not a worker's word) reads them at each record as
    on the normal path."""
    p = Pair()
    p.watch = True
    p.stream(training(p, 10), itertools.cycle([64, 13, 30]))
    assert p.hits > 40
    if runner == "native":
        assert p.runs().native > 20


def test_a_changed_quota_or_handle_limit_holds_for_the_next_slice() -> None:
    """The native runner's context (the session's tables, quota and handle limit) is kept from slice to slice
    (`CommandExecutor._native_ctx`): a quota or handle limit changed between slices must hold at once, in C++ as
    on the normal path."""
    for lower in ("quota", "max_handles"):
        p = Pair()
        p.stream(training(p, 6), itertools.cycle([64]))
        hits = p.hits
        for s in p.s:  # room for a few steps that free nothing (runs are learned per quota: again, at this one)
            if lower == "quota":
                s.quota = s.used + 6000
            else:
                s.max_handles = len(s.tensors) + len(s.poisoned) + 50
        p.stream([c for t in range(6, 20) for c in step(p, t)], itertools.cycle([64]))
        assert p.hits - hits > 11
        assert p.s[0].poisoned


def test_a_native_context_looks_up_tensors_bound_before_it_under_the_tables_own_keys() -> None:
    """A native context starts with the session's own key objects in its cache of handle ints (`Keys`): a tensor
    bound from Python before it (a parameter, an optimizer's state) is then found by identity, not by `==` of two
    ints (~140 instructions an input, every step); a handle it has not seen has no cached int."""
    p = Pair()
    s = p.s[0]
    ex = p.ex[0]
    if ex.native is None:  # the runner off (`runner`'s "python"), or not built here
        pytest.skip("no native runner")
    state = ex._eager_state(s)
    ctx = ex._native_ctx(ex.native, s, state[3], s.memory, s.memory.device.capacity, None, s.device.torch_device)
    for h in (X, W, P, IDX, G):
        own = next(k for k in s.tensors if k == h)
        assert ctx.cached_key(h) is own
    assert ctx.cached_key(BASE + 999) is None


class _WatchedSession(WorkerSession):
    """A session whose `used` is a property that counts its writes (its value kept in the instance dict, where a
    plain attribute would be): the native runner reads and writes a session's counters in its instance dict only
    where Python's own attribute access would (`Fields` in native_runner.cpp), so every write goes through it."""

    @property  # type: ignore[override]
    def used(self) -> int:
        return self.__dict__["used"]  # type: ignore[no-any-return]

    @used.setter
    def used(self, value: int) -> None:
        self.__dict__["used"] = value
        self.__dict__["writes"] = self.__dict__.get("writes", 0) + 1
        self.__dict__["written"] = value


def test_a_session_counter_behind_a_property_is_written_through_it() -> None:
    """The native runner writes what a run added as one `+=` per run (`Counter` in native_runner.cpp), so it makes
    fewer writes than the normal path; each goes through the property: the last value written is the value read."""
    p = Pair(session=_WatchedSession)
    cmds, i = training(p, 10), 0
    for n in itertools.cycle([64, 13]):
        if i >= len(cmds):
            break
        p.slice(cmds[i : i + n])
        i += n
        for s in p.s:
            assert s.__dict__["written"] == s.used
    assert p.hits > 0
    a, b = p.s
    assert b.__dict__["writes"] >= a.__dict__["writes"] > 5


def test_the_quota_and_the_handle_limit_fail_at_the_same_op() -> None:
    for quota, handles in ((1 << 24, 80), (8000, 4096), (10000, 4096)):
        p = Pair(quota=quota, max_handles=handles)
        cmds = [c for t in range(14) for c in step(p, t)]  # nothing freed: memory and handles grow
        p.stream(cmds, itertools.cycle([64]))
        assert p.hits > 0
        assert p.s[0].poisoned


def test_changed_shapes_and_provenance_fall_back_to_the_normal_path() -> None:
    p = Pair()
    p.stream(training(p, 5), itertools.cycle([64]))
    new = {BASE + 50: torch.randn(4, 3), BASE + 51: torch.randn(4, 5), BASE + 52: torch.randn(8, 3)}
    for s in p.s:  # another shape and stride; the shape of step t's mm output; another shape
        for k, v in new.items():
            s.bind(k, v.clone() if k != BASE + 50 else v.clone()[:, :2])
    cmds = step(p, 5, x=BASE + 50) + step(p, 6, x=BASE + 52) + [free(4), free(5)]
    p.stream(cmds, itertools.cycle([64]))
    # an input that came from an earlier record of the step now comes from the session (same meta, other value)
    cmds = step(p, 7)
    cmds[2] = p.rec(3, [h(7, 2)], [T(BASE + 51)])
    cmds += step(p, 8) + step(p, 9)
    cmds[11 + 2] = p.rec(3, [h(8, 2)], [T(h(7, 1))])  # the output of another step's record
    p.stream(cmds, itertools.cycle([64]))
    # a bigger tensor where an earlier record's output was: its verdict must not be the learned one
    for s in p.s:
        s.bind(BASE + 53, torch.ones(600, 5))
        s.quota = s.used + 8000
    cmds = step(p, 10) + step(p, 11)
    cmds[11 + 2] = p.rec(3, [h(11, 2)], [T(BASE + 53)])
    p.stream(cmds, itertools.cycle([64]))


def test_an_op_that_changes_a_meta_in_place_makes_runs_check_it_again() -> None:
    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    hits = p.hits
    p.stream(step(p, 6) + step(p, 7), itertools.cycle([64]))
    assert p.hits - hits > 15  # the same objects, metas not checked again
    # X grows in place (the same tensor object): its learned verdict would admit far too few bytes
    p.stream([p.rec(12, [], [T(X), V([400, 3])])] + step(p, 8)[:3], itertools.cycle([64]))
    for s in p.s:  # leave 3000 bytes of the quota (a changed quota would not take the learned runs)
        s.bind(BASE + 60, torch.zeros((s.quota - s.used - 3000) // 4))
    assert not p.s[0].poisoned
    p.stream(step(p, 9) + [p.rec(13, [], [T(W)])] + step(p, 10), itertools.cycle([64]))
    assert h(9, 0) in p.s[0].poisoned


def test_redefining_an_op_id_drops_its_runs() -> None:
    p = Pair()
    p.stream(training(p, 4), itertools.cycle([64]))
    assert p.runs().count > 0
    OPS[3] = "aten::neg"
    try:
        p.defined.discard(3)
        p.stream(step(p, 4) + step(p, 5), itertools.cycle([64]))
    finally:
        OPS[3] = "aten::relu"
    p.defined.discard(3)
    p.stream(step(p, 6) + step(p, 7) + step(p, 8), itertools.cycle([64]))


def test_bounds_and_forget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs, "PER_HEAD", 2)
    monkeypatch.setattr(runs, "MAX_ENTRIES", 40)
    monkeypatch.setattr(runs, "MAX_LEN", 6)
    p = Pair()
    p.stream(training(p, 10), itertools.cycle([3, 17, 9, 40, 5]))
    known = p.runs()
    assert 0 < known.count <= 40
    assert all(len(seen) <= 2 for seen in known.heads.values())
    assert all(len(t.steps) <= 6 for seen in known.heads.values() for t in seen)
    assert p.hits > 0
    p.ex[0].forget(p.s[0])
    assert "t" not in p.ex[0]._eager


def test_the_inline_step_checks_its_output_handle_as_the_normal_path() -> None:
    """A one-output step without per-op extras runs inline in `eager_span` (runs.Step.fast): a foreign output
    handle, the session's reserved handle 0 and a handle that still holds a tensor must fail or rebind there as
    on the normal path."""
    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    assert p.runs().heads and any(st.fast for seen in p.runs().heads.values() for t in seen for st in t.steps)
    hits = p.hits
    cmds = step(p, 6) + [free(5)] + step(p, 7)
    cmds[2] = p.rec(3, [FOREIGN], [T(h(6, 1))])  # relu: a fast step
    cmds[12 + 1] = p.rec(2, [BASE], [T(h(7, 0)), T(W)])  # mm: handle 0 of the session
    cmds += [free(6)] + step(p, 8)
    cmds[-11 + 2] = p.rec(3, [X], [T(h(8, 1))])  # a live handle: rebound
    p.stream(cmds, itertools.cycle([64]))
    assert p.hits - hits > 5
    assert p.s[0].poisoned


def test_the_inline_step_unbinds_an_output_past_the_quota_as_the_normal_path() -> None:
    """An op whose output is bigger than its learned verdict admitted (the check after binding) fails on the inline
    path as on the normal path: the output is unbound, the quota holds."""
    p = Pair(quota=1 << 16)
    p.stream(training(p, 6), itertools.cycle([64]))
    hits = p.hits
    big = [False]
    for ex in p.ex:
        plan = ex._plans["aten::relu"]
        plan.run = lambda x, real=plan.run: torch.zeros(1 << 15) if big[0] else real(x)
    big[0] = True
    p.stream(step(p, 6) + [free(5)] + step(p, 7), itertools.cycle([64]))
    assert p.hits - hits > 3
    assert h(6, 2) in p.s[0].poisoned and h(7, 2) in p.s[0].poisoned
    # the message names the use the op would have made (over the limit), not the use after the rollback
    would = re.search(r"(\d+) bytes would be used of a (\d+) byte limit", p.s[0].poisoned[h(6, 2)].message)
    assert would is not None and int(would[1]) > int(would[2]) == 1 << 16


def test_an_output_past_the_quota_inside_a_run_names_the_use_it_would_make(runner: str) -> None:
    """An op inside a run whose output takes the session past its quota (its learned verdict admitted it: zeroed
    here) is unbound and refused after it ran, natively as in Python (`_over_quota`), and the message names the use
    the op would have made: the native runner writes the bytes its run added back before it calls `_over_quota`."""
    p = Pair(quota=1 << 20)
    p.stream(training(p, 6), itertools.cycle([64]))
    ex, s = p.ex[0], p.s[0]
    for found in p.runs().heads.values():
        for trace in found:
            for st in trace.steps:
                st.need = 0
            trace.native = None  # compiled again with the zeroed verdicts
    raised: list[Any] = []  # what the native runner's calls reported
    real = ex._native_ctx

    def spy(*a: Any) -> Any:
        ctx = real(*a)

        class Watched:
            def run(self, *b: Any) -> Any:
                got = ctx.run(*b)
                raised.append(got[4])
                return got

        return Watched()

    ex._native_ctx = spy  # type: ignore[method-assign]
    for k, cmds in enumerate(([free(5)], step(p, 6))):
        if k:
            s.bind(BASE + 60, torch.zeros((s.quota - s.used) // 4 - 8))  # room for 32 bytes: not for step 6's first
        payload = device_pb2.ClientFrame(commands=cmds).SerializeToString()
        req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, payload)
        slices.run_commands(s, ex.execute, ex.ledger, req, _clock, lambda i: None)
    assert h(6, 0) in s.poisoned and h(6, 0) not in s.tensors
    would = re.search(r"(\d+) bytes would be used of a (\d+) byte limit", s.poisoned[h(6, 0)].message)
    assert would is not None and int(would[1]) == int(would[2]) - 32 + 48  # 4x3 float32 in 32 bytes of room
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in s.tensors.values()}
    assert s.used == sum(storages.values())  # the output's bytes counted off again
    assert any(e is not None and "would be used" in str(e) for e in raised) == (runner == "native")


def test_a_list_of_session_tensors_is_checked_again_when_a_handle_holds_another() -> None:
    """A Tensor[] argument of tensors made before the run (an optimizer's parameters and states) is accepted in one
    go while it holds the same objects as last time (`match`'s list cell); a handle rebound to a bigger tensor in
    between must fail at the same op with the same error as on the normal path (here: the quota)."""
    p = Pair(quota=90_000)  # a changed quota would not take the learned runs
    state, out = BASE + 82, [BASE + 80, BASE + 81]
    for s in p.s:
        s.bind(state, torch.ones(4, 3))

    def opt(t: int) -> list[device_pb2.Command]:
        return step(p, t) + [p.rec(8, out, [compact.tensors([X, state]), V(1.0)])]

    p.stream([c for t in range(6) for c in opt(t) + ([free(t - 1)] if t else [])], itertools.cycle([64]))
    hits = p.hits
    p.stream(opt(6) + [free(5)] + opt(7) + [free(6)], itertools.cycle([64]))
    assert p.hits - hits >= 20
    for s in p.s:  # another, bigger tensor under the same handle; no room for a copy of it
        s.free([state, *out])
        s.bind(state, torch.ones(4000, 3))
    p.stream(opt(8) + [free(7)], itertools.cycle([64]))
    assert out[1] in p.s[0].poisoned


def test_commands_of_other_kinds_and_empty_records_inside_a_run_end_it_as_on_the_normal_path() -> None:
    """`eager_span` reads each command's eager record once per slice (`slices.eager_records`: b"" for another
    kind) instead of through `WhichOneof` per command: a seed, an empty command and an eager command with an empty
    record in the middle of learned runs must end the span there and run (or fail) as on the normal path, and
    the records after them must be the ones of their own commands."""
    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    hits = p.hits
    odd = [
        device_pb2.Command(seed=device_pb2.Seed(seed=7)),
        device_pb2.Command(),  # no kind: "empty command"
        device_pb2.Command(eager_op=b""),  # an eager command whose record is empty: malformed
    ]
    cmds = step(p, 6) + [free(5)] + step(p, 7) + [free(6)] + step(p, 8)
    for k, c in zip((3, 14, 27), odd, strict=True):
        cmds.insert(k, c)
    p.stream(cmds, itertools.cycle([64]))
    assert p.hits - hits > 20


def test_an_input_that_is_another_tensor_every_step_is_checked_every_step(runner: str) -> None:
    """An external input that holds another tensor object every step (an output of another run) turns its check
    cell off (`runs._checked`): its meta is then checked on every record, so a tensor of another shape or
    stride under the same handle after many steps still leaves the learned run, as on the normal path. (The native
    runner checks an external input's meta on every record, cell or not: with every step of these runs in C++, no
    record of X goes through `_checked`, and the cell stays as learned.)"""
    p = Pair()
    p.stream(training(p, 4), itertools.cycle([64]))
    hits = p.hits
    for t in range(4, 12):
        for s in p.s:
            s.bind(X, torch.full((4, 3), float(t)))  # the same meta, another object
        p.stream(step(p, t) + [free(t - 1)], itertools.cycle([64]))
    assert p.hits - hits >= 8 * 11 * 0.7
    cells = [e[5] for seen in p.runs().heads.values() for tr in seen for st in tr.steps for e in st.tensors if e[3] < 0]
    if runner == "python":
        assert any(c[2] == 0 and c[0] is None for c in cells)  # turned off
    for shape, stride in (((4, 3), (1, 4)), ((8, 3), (3, 1))):
        for s in p.s:
            s.bind(X, torch.empty_strided(shape, stride).fill_(2.0))
        hits = p.hits
        p.stream(step(p, 12) + [free(11)], itertools.cycle([64]))
        assert p.hits - hits < 11  # the record that takes X left the learned run (the rest compared above)
        for s in p.s:
            s.free([h(12, j) for j in range(11)])


def test_handles_bound_again_and_from_python_are_looked_up_as_the_table_holds_them(runner: str) -> None:
    """The native runner keeps the Python ints it looked handles up with and bound outputs under (native_runner.cpp
    `Keys`): an entry that outlived its handle must still find what the session's table holds now. The same
    output handles every other step (freed, then bound again by the next such step), a parameter rebound from
    Python under another int object each step, and a handle freed and bound from Python between slices: every
    record gives the normal path's result (`Pair.slice` compares both sessions after each slice)."""
    p = Pair()
    p.stream(training(p, 4), itertools.cycle([64]))
    hits, native = p.hits, p.runs().native
    for t in range(4, 24):
        cmds = step(p, t % 2) + [free(t % 2)]
        p.stream(cmds, itertools.cycle([64]))
        for s in p.s:
            s.rebind(int(str(W)), torch.full((3, 5), float(t)))  # another int object, another tensor
            if t % 5 == 0:  # an output handle of the other step's, bound from Python in between
                s.bind(h((t + 1) % 2, 4), torch.ones(4, 5))
        if t % 5 == 0:
            p.stream([free((t + 1) % 2)], itertools.cycle([64]))
    assert p.hits - hits >= 20 * 11 * 0.7
    if runner == "native":  # in C++: a key of another value would find another tensor, which its checks refuse
        assert p.runs().native - native >= 20 * 11 * 0.5


VW = compact.view


def view_step(p: Pair, t: int, x: int = X) -> list[device_pb2.Command]:
    """A step whose inputs are views (`compact.VIEW`): of the session's tensors (external: the meta check applies to
    the viewed tensor) and of earlier records' outputs (internal: the identity check applies to it), one reaching
    past its tensor's own elements into its storage, an expand, a 0-dim view, an in-place op through a view."""
    return [
        p.rec(1, [h(t, 0)], [VW(x, [3, 4], [1, 3], 20), V(1.0 + t)]),  # x.t(), at storage element 20
        p.rec(2, [h(t, 1)], [VW(h(t, 0), [4, 3], [1, 4], 0), T(W)]),
        p.rec(3, [h(t, 2)], [VW(h(t, 1), [2, 5], [10, 1], 5)]),  # rows 1 and 3
        p.rec(6, [h(t, 3)], [VW(h(t, 2), [3, 2, 5], [0, 5, 1], 0)]),  # an expand, summed
        p.rec(7, [P], [T(P), VW(h(t, 2), [], [], 3)], {"alpha": V(-0.01)}),
        p.rec(7, [0], [VW(W, [5], [1], 5), VW(h(t, 1), [5], [1], 0)], {"alpha": V(-0.01)}),  # W's row 1 in place
        p.rec(5, [h(t, 4)], [VW(h(t, 1), [4, 5], [5, 1], 0), T(h(t, 1))], {"alpha": V(0.5 * t)}),
    ]


def inplace_view_step(p: Pair, t: int) -> list[device_pb2.Command]:
    """An in-place op through a view argument whose output handle binds what it returns: the view itself
    (`Tensor(a!)`), which a later record reads. `detach_` of it must fail as on the normal path ("Can't detach views
    in-place"): the runner makes such an op's view arguments through the dispatcher (`Plan.direct_views`), since a
    view it made directly carries no autograd view metadata and `detach_` would take it."""
    return [
        p.rec(1, [h(t, 0)], [T(G), V(1.0 + t)]),
        p.rec(7, [h(t, 1)], [VW(W, [5], [1], 5), VW(h(t, 0), [5], [1], 0)], {"alpha": V(-0.01)}),
        p.rec(3, [h(t, 2)], [T(h(t, 1))]),
        p.rec(19, [h(t, 3)], [T(h(t, 1))]),
    ]


def test_an_in_place_op_through_a_view_binds_the_dispatchers_view() -> None:
    p = Pair()
    cmds = [c for t in range(12) for c in inplace_view_step(p, t) + ([free(t - 1)] if t else [])]
    p.stream(cmds, itertools.cycle([64, 9]))
    assert p.hits > 0  # the run [mul, add_, relu] (detach_ fails, and ends it): add_ in C++ with the runner on
    assert h(11, 3) in p.s[0].poisoned
    assert "detach views in-place" in p.s[0].poisoned[h(11, 3)].message


def _wide_x(p: Pair, storage: int) -> None:
    """X as a (4, 3) tensor at offset 20 of a storage of `storage` floats (the same values in both sessions)."""
    torch.manual_seed(5)
    base = torch.randn(storage)
    for s in p.s:
        s.bind(X, base.clone()[20:32].view(4, 3))


def _x_on(p: Pair, storage: int) -> None:
    """X with the same meta: `_wide_x`'s, or for 24 a tensor of its own 12-float storage at offset 0 (which a learned
    geometry at offset 20 reaches past)."""
    if storage == 24:
        small = torch.randn(12).view(4, 3)
        for s in p.s:
            s.bind(X, small.clone())
    else:
        _wide_x(p, storage)


def test_handles_past_the_hash_modulus_find_their_entries(runner: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session numbered 2^30 + 3 has handles past 2^61 - 1, where CPython hashes an int as its value modulo
    2^61 - 1: the runner's table calls that pass the hash themselves (native_runner.cpp `int_hash`) must find the
    entries Python's own lookups made and make entries those lookups find (else duplicates, or refused records)."""
    number = (1 << 30) + 3
    base = number << 32
    assert base > (1 << 61) - 1
    module = sys.modules[__name__]
    for name, value in (("NUMBER", number), ("BASE", base), ("X", base + 1), ("W", base + 2), ("P", base + 3),
                        ("IDX", base + 4), ("G", base + 5)):  # fmt: skip
        monkeypatch.setattr(module, name, value)
    p = Pair()
    # x=X: `step`'s default is the X of number 3, a foreign handle here (round 40 passed it: every step's first record
    # was refused and its chain poisoned, 18 of 132 records in runs against 99 for a session numbered 3)
    cmds = training(p, 12, x=X)
    p.stream(cmds, itertools.cycle([64, 9]))
    assert not p.s[0].poisoned
    assert p.hits > len(cmds) // 2, p.hits  # as for a session numbered 3 (99 of 132 records)
    if runner == "native":
        assert p.runs().native > p.hits // 2, p.runs().native
    for s in p.s:
        assert len({int(str(k)) for k in s.tensors} & set(s._keys)) == len(s.tensors) == len(s._keys)
        assert all(s.tensors.get(int(str(k))) is t for k, t in s.tensors.items())


def test_view_arguments_kept_by_the_runner_hold_no_storage_between_runs(runner: str) -> None:
    """The runner keeps a direct view argument's TensorImpl from record to record and from run to run
    (native_runner.cpp `Shells`), given the viewed tensor's storage while a run uses it: between runs it holds an
    empty storage, so no storage is referenced more often than on the normal path, and a freed tensor's storage goes
    with its last handle as before."""
    p = Pair()
    _wide_x(p, 40)
    cmds = [c for t in range(10) for c in view_step(p, t) + ([free(t - 1)] if t else [])]
    p.stream(cmds, itertools.cycle([64]))
    assert p.hits > len(cmds) // 2
    kept = [v for ts in p.runs().heads.values() for tr in ts if tr.native for v in tr.native.kept_views()]
    if runner == "native":
        assert kept and all(nbytes == 0 for _, nbytes, _ in kept)
        assert sum(reused for _, _, reused in kept) >= 20  # the same TensorImpls served later records
    use = torch._C._storage_Use_Count
    for handle in (X, W, h(9, 0), h(9, 1), h(9, 2)):
        a, b = (s.tensors[handle].untyped_storage() for s in p.s)
        assert use(a._cdata) == use(b._cdata), hex(handle)
    held = [s.tensors[h(9, 1)].untyped_storage() for s in p.s]  # viewed by step 9's records, internal
    p.stream([free(9)], itertools.cycle([64]))
    assert [use(st._cdata) for st in held] == [1, 1]  # only this test's reference is left


def test_an_op_returning_its_view_argument_keeps_that_view() -> None:
    """`contiguous` of a contiguous view returns the view itself: bound to the output handle, the TensorImpl the
    runner kept for that argument (`Shells`) is the handle's from then on (an in-place op on the viewed tensor shows
    through it, as on the normal path), and the next record's view is another one."""
    p = Pair()

    def step(t: int) -> list[device_pb2.Command]:
        return [
            p.rec(24, [h(t, 0)], [VW(W, [5], [1], 5)]),  # W's row 1, the view itself
            p.rec(24, [h(t, 1)], [VW(W, [5], [1], 0)]),  # row 0
            p.rec(1, [h(t, 2)], [T(h(t, 0)), V(2.0)]),
            p.rec(7, [0], [VW(W, [5], [1], 0), T(h(t, 2))], {"alpha": V(-0.01)}),  # row 0 in place
        ]

    cmds = [c for t in range(12) for c in step(t) + ([free(t - 2)] if t > 1 else [])]
    p.stream(cmds, itertools.cycle([64, 5]))
    assert p.hits > len(cmds) // 2
    for s in p.s:
        w = s.tensors[W]
        assert torch.equal(s.tensors[h(11, 1)], w[0]) and torch.equal(s.tensors[h(10, 0)], w[1])
        assert s.tensors[h(11, 1)].untyped_storage()._cdata == w.untyped_storage()._cdata
        assert s.tensors[h(10, 1)] is not s.tensors[h(11, 1)]


def _alias_menu(p: Pair, t: int) -> list[device_pb2.Command]:
    """Records with view arguments whose op returns one of them (`contiguous`), a view of one holding it as its base
    (`t`, `alias`, `expand`), a detached one sharing its version counter (`detach`), writes through them (`add_`,
    `_foreach_add_`), a returned view bound to no handle (0), and an `mm` whose view's shape fails where t % 7 is 5."""
    return [
        p.rec(24, [h(t, 2)], [VW(h(t, 0), [6], [1], 6)]),
        p.rec(24, [0], [VW(W, [5], [1], 5)]),
        p.rec(25, [h(t, 3)], [VW(h(t, 0), [6], [1], 0)]),
        p.rec(26, [h(t, 4)], [VW(W, [3, 5], [5, 1], 0)]),
        p.rec(27, [h(t, 5)], [VW(h(t, 0), [12], [1], 0)]),
        p.rec(29, [0], [VL([VW(W, [5], [1], 5), VW(h(t, 0), [3], [1], 3)]), V(0.5)]),
        p.rec(30, [h(t, 6)], [VW(h(t, 0), [12], [1], 0), VW(G, [12], [1], 0)]),
        p.rec(2, [h(t, 7)], [VW(h(t, 0), [4, 3] if t % 7 != 5 else [3, 4], [3, 1], 0), VW(W, [3, 5], [5, 1], 0)]),
        p.rec(7, [0], [VW(W, [5], [1], 0), VW(h(t, 0), [5], [1], 1)], {"alpha": V(-0.01)}),
        p.rec(28, [h(t, 8)], [VW(W, [1, 5], [5, 1], 0), V([4, 5])]),
    ]


@pytest.mark.parametrize("seed", range(3))
def test_view_arguments_that_ops_return_alias_or_fail_on_leave_no_storage_held(runner: str, seed: int) -> None:
    """Steps drawn from `_alias_menu` in slices of drawn sizes, some records swapped for others: both paths agree
    (`Pair`); every view the runner kept (native_runner.cpp `Shells`) holds an empty storage between runs, and once
    every step's handles are freed no storage is referenced more often than on the normal path (a view an op returned
    or kept went with its holder). Pins what keys40 holds (review crev40: no case found where it does not)."""
    rng = random.Random(seed)
    p = Pair()
    pattern = [rng.randrange(10) for _ in range(rng.randrange(3, 8))]

    def step(t: int) -> list[device_pb2.Command]:
        menu = _alias_menu(p, t)
        return [p.rec(1, [h(t, 0)], [T(G), V(1.0 + t)])] + [
            menu[j if rng.random() >= 0.1 else rng.randrange(10)] for j in pattern
        ]

    cmds = [c for t in range(20) for c in step(t) + ([free(t - 2)] if t > 1 else [])]
    p.stream(cmds, itertools.cycle([rng.randrange(1, 40) for _ in range(7)]))
    assert p.hits > len(cmds) // 3, p.hits
    kept = [v for ts in p.runs().heads.values() for tr in ts if tr.native for v in tr.native.kept_views()]
    assert all(nbytes == 0 for _, nbytes, _ in kept), kept
    p.stream([free(18), free(19)], itertools.cycle([64]))
    gc.collect()
    use = torch._C._storage_Use_Count
    for handle in (X, W, P, IDX, G):
        a, b = (s.tensors[handle].untyped_storage() for s in p.s)
        assert use(a._cdata) == use(b._cdata), hex(handle)


def test_view_arguments_run_in_learned_runs_as_on_the_normal_path() -> None:
    p = Pair()
    _wide_x(p, 40)
    cmds = [c for t in range(10) for c in view_step(p, t) + ([free(t - 1)] if t else [])]
    p.stream(cmds, itertools.cycle([7, 13, 64]))
    assert p.hits > len(cmds) // 2
    hits = p.hits
    p.stream([c for t in range(10, 14) for c in view_step(p, t) + [free(t - 1)]], itertools.cycle([64]))
    assert p.hits - hits >= 4 * 7 - 2
    w = p.s[0].tensors[W]
    assert not torch.equal(w[1], p.s[0].tensors[W][0])  # (the in-place op wrote W's row 1 through a view)
    # X again with the same meta, on a storage the learned geometry (offset 20) now reaches past: refused by
    # the run's step as by the normal path, and by a storage just long enough, accepted
    for storage, bad in ((32, False), (24, True), (40, False)):
        _x_on(p, storage)
        hits = p.hits
        t = 14 + storage
        p.stream(view_step(p, t) + view_step(p, t + 1), itertools.cycle([64]))
        poisoned = h(t, 0) in p.s[0].poisoned
        assert poisoned == bad
        if bad:
            assert "view argument reaches storage byte" in p.s[0].poisoned[h(t, 0)].message
        else:
            assert p.hits - hits >= 7
    # an internal view's source replaced by another tensor of the same meta: not the run's, the normal path
    cmds = view_step(p, 60) + view_step(p, 61)
    cmds[7 + 1] = p.rec(2, [h(61, 1)], [VW(h(60, 0), [4, 3], [1, 4], 0), T(W)])
    cmds[7 + 2] = p.rec(3, [h(61, 2)], [VW(FOREIGN, [2, 5], [10, 1], 5)])
    p.stream(cmds, itertools.cycle([64]))
    assert h(61, 2) in p.s[0].poisoned


def test_an_external_input_of_another_meta_inside_a_run_is_refused_before_the_op() -> None:
    """A session tensor that a step takes by handle (mm's weight) is rebound to a bigger one: the step's learned
    verdict no longer holds, so the record takes the normal path, whose quota check refuses the op before it runs
    ("requested"). A step that ran with the learned verdict would run the op and fail after it ("would be used"),
    with another message: the native runner's meta check, as `runs.match`'s."""
    p = Pair(quota=40000)  # the run's learned outputs fit beside the bigger weight (24 kB), mm's real one does not
    p.stream(training(p, 5), itertools.cycle([64]))
    hits = p.hits
    big = torch.randn(3, 2000)
    for s in p.s:
        s.bind(W, big.clone())
    p.stream(step(p, 5) + [free(4)] + step(p, 6), itertools.cycle([64]))
    assert p.hits > hits  # the run started (its first record); its mm step did not match
    refused = p.s[0].poisoned[h(5, 1)]
    assert "requested" in refused.message and refused.op == "aten::mm"


def test_a_record_of_another_op_with_the_same_layout_inside_a_run_runs_that_op() -> None:
    """Where a run's step is `relu(x)`, a record `sum(x)` has the same length and layout, another op id: its fixed
    bytes differ from the step's template, so it runs as `sum` (on the normal path), never as the step's op."""
    p = Pair()
    p.stream(training(p, 5), itertools.cycle([64]))
    hits = p.hits
    cmds = step(p, 5) + [free(4)] + step(p, 6)
    cmds[2] = p.rec(6, [h(5, 2)], [T(h(5, 1))])  # sum: the run's relu step
    cmds[12 + 2] = p.rec(3, [h(6, 2)], [T(h(6, 1))], {"x": V(1)})  # relu with a keyword: another length
    p.stream(cmds, itertools.cycle([64]))
    assert p.hits > hits
    assert p.s[0].tensors[h(5, 2)].shape == ()


def damage(rng: Any, how: int, record: bytes, pick: list[int]) -> bytes:
    """`record` with a flipped bit (0), a handle field set to one of `pick` (1), cut short (2) or lengthened (3)."""
    data = bytearray(record)
    if how == 0:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == 1:
        at = rng.randrange(6, len(data) - 7)
        data[at : at + 8] = rng.choice(pick).to_bytes(8, "little")
    elif how == 2:
        del data[rng.randrange(6, len(data)) :]
    else:
        data += bytes(rng.randrange(1, 9))
    return bytes(data)


def test_hostile_bytes_in_a_runs_records_run_or_fail_as_on_the_normal_path() -> None:
    """Random damage to one record of each step of a learned loop (a flipped byte, a handle field pointing at a
    foreign, reserved, unknown, freed or other live handle, a truncated or lengthened record): every slice must
    leave both sessions as the normal path leaves them (`Pair.slice` compares all a client can see)."""
    import random

    rng = random.Random(13)
    p = Pair()
    p.stream(training(p, 5), itertools.cycle([64]))
    hits = p.hits
    for t in range(5, 45):
        cmds = step(p, t) + [free(t - 1)]
        k = rng.randrange(11)
        pick = [FOREIGN, BASE, X, W, P, G, BASE + 999, h(t - 1, 1), h(t, 3), 0]
        cmds[k] = device_pb2.Command(eager_op=damage(rng, rng.randrange(4), cmds[k].eager_op, pick))
        p.stream(cmds, itertools.cycle([rng.choice([5, 12, 64])]))
    assert p.hits - hits > 100


VL = compact.tensors_with_views


def view_list_step(p: Pair, t: int, x: int = X) -> list[device_pb2.Command]:
    """A step whose tensor lists hold views (`compact.VIEWS`): of the session's tensors (external) and of earlier
    records' outputs (internal), mixed with plain tensors; a `cat` of them (one output: the native runner's), an
    in-place `_foreach_` op writing W and G through view elements, an out-of-place one with two outputs."""
    return [
        p.rec(1, [h(t, 0)], [VW(x, [3, 4], [1, 3], 20), V(1.0 + t)]),  # x.t(), at storage element 20
        p.rec(15, [h(t, 1)], [VL([T(h(t, 0)), VW(h(t, 0), [2, 4], [4, 1], 4), VW(W, [3, 4], [5, 1], 1)])]),
        p.rec(
            14,
            [0],
            [
                VL([VW(W, [3, 4], [5, 1], 1), T(G)]),
                VL([VW(h(t, 1), [3, 4], [4, 1], 0), VW(h(t, 1), [4, 3], [1, 4], 12)]),
            ],
            {"alpha": V(-0.01)},
        ),
        p.rec(8, [h(t, 2), h(t, 3)], [VL([T(h(t, 1)), VW(h(t, 1), [4], [1], 4)]), V(1.0)]),
    ]


def test_tensor_lists_with_views_run_in_learned_runs_as_on_the_normal_path() -> None:
    p = Pair()
    _wide_x(p, 40)
    free_step = lambda t: device_pb2.Command(free=device_pb2.Free(handles=[h(t, j) for j in range(4)]))  # noqa: E731
    cmds = [c for t in range(10) for c in view_list_step(p, t) + ([free_step(t - 1)] if t else [])]
    p.stream(cmds, itertools.cycle([5, 13, 64]))
    assert p.hits > len(cmds) // 2
    hits = p.hits
    p.stream([c for t in range(10, 14) for c in view_list_step(p, t) + [free_step(t - 1)]], itertools.cycle([64]))
    assert p.hits - hits >= 4 * 4 - 1
    # X again with the same meta, on a storage the learned geometry now reaches past: refused by the run's step as
    # by the normal path; the run's internal view elements with another source, a foreign or freed element
    for storage, bad in ((32, False), (24, True), (40, False)):
        _x_on(p, storage)
        t = 14 + storage
        p.stream(view_list_step(p, t) + view_list_step(p, t + 1), itertools.cycle([64]))
        assert (h(t, 0) in p.s[0].poisoned) == bad
    cmds = view_list_step(p, 60) + view_list_step(p, 61) + view_list_step(p, 62) + view_list_step(p, 63)
    cmds[4 + 1] = p.rec(15, [h(61, 1)], [VL([T(h(61, 0)), VW(h(60, 0), [2, 4], [4, 1], 4), VW(W, [3, 4], [5, 1], 1)])])
    cmds[8 + 1] = p.rec(15, [h(62, 1)], [VL([T(h(62, 0)), VW(FOREIGN, [2, 4], [4, 1], 4), VW(W, [3, 4], [5, 1], 1)])])
    cmds[12 + 2] = p.rec(14, [0], [VL([VW(W, [3, 4], [5, 1], 1), T(G)]), VL([VW(h(62, 1), [3, 4], [4, 1], 0),
                         VW(h(63, 1), [4, 3], [1, 4], 12)])], {"alpha": V(-0.01)})  # fmt: skip
    p.stream(cmds, itertools.cycle([64]))
    assert h(62, 1) in p.s[0].poisoned and "PERMISSION" in p.s[0].poisoned[h(62, 1)].code.name


L = compact.tensors


def several_step(p: Pair, t: int) -> list[device_pb2.Command]:
    """Ops returning several tensors (a tuple: `max.dim`; a Tensor[]: `_foreach_div`) and lists of step sizes
    (`Scalar[]`) that change every record, as Adam's bias corrections do."""
    return [
        p.rec(2, [h(t, 0)], [T(X), T(W)]),
        p.rec(16, [h(t, 1), h(t, 2)], [T(h(t, 0)), V(1), V(False)]),
        p.rec(17, [h(t, 3), h(t, 4)], [compact.tensors([h(t, 0), h(t, 1)]), V([1.0 + t, 2.0 - 0.25 * t])]),
        p.rec(18, [0], [L([h(t, 3)]), L([h(t, 0)]), L([h(t, 0)]), V([0.5 * t + 0.125])]),  # in place
        p.rec(5, [h(t, 5)], [T(h(t, 4)), T(h(t, 1))], {"alpha": V(0.5)}),
    ]


def free5(t: int) -> device_pb2.Command:
    return device_pb2.Command(free=device_pb2.Free(handles=[h(t, j) for j in range(6)]))


def test_several_outputs_and_step_size_lists_run_in_learned_runs_as_on_the_normal_path(runner: str) -> None:
    """Steps whose op returns several tensors or takes a `Scalar[]` of by-type numbers run as on the normal path;
    with the native runner most records run in C++ (before it took them, at most 2 of each step's 5 could)."""
    p = Pair()
    cmds = [c for t in range(12) for c in several_step(p, t) + ([free5(t - 1)] if t else [])]
    p.stream(cmds, itertools.cycle([7, 13, 64]))
    assert p.hits > len(cmds) // 2
    hits, native = p.hits, p.runs().native
    p.stream([c for t in range(12, 20) for c in several_step(p, t) + [free5(t - 1)]], itertools.cycle([64]))
    assert p.hits - hits >= 8 * 5 - 5
    if runner == "native":
        assert p.runs().native - native >= (p.hits - hits) * 0.75, (p.runs().native - native, p.hits - hits)
    # a live second output handle (rebound: the normal path), a foreign one, the session's reserved handle, one
    # output handle twice
    cmds = several_step(p, 20) + [free5(19)] + several_step(p, 21) + [free5(20)] + several_step(p, 22)
    cmds[1] = p.rec(16, [h(20, 1), X], [T(h(20, 0)), V(1), V(False)])
    cmds[6 + 2] = p.rec(17, [h(21, 3), FOREIGN], [compact.tensors([h(21, 0), h(21, 1)]), V([1.0, 2.0])])
    cmds[12 + 1] = p.rec(16, [BASE, h(22, 2)], [T(h(22, 0)), V(1), V(False)])
    cmds += [free5(21)] + several_step(p, 23)
    cmds[-5 + 2] = p.rec(17, [h(23, 3), h(23, 3)], [compact.tensors([h(23, 0), h(23, 1)]), V([1.0, 2.0])])
    p.stream(cmds, itertools.cycle([64]))
    assert p.s[0].poisoned
    # a failed handle as a second output: bound again, no longer failed (X again a float matrix: above, a record
    # bound max.dim's indices to it)
    bad = sorted(p.s[0].poisoned)[0]
    x = torch.randn(4, 3)
    for s in p.s:
        s.bind(X, x.clone())
    cmds = several_step(p, 24) + [free5(23)] + several_step(p, 25) + [free5(24)] + several_step(p, 26)
    cmds[6 + 1] = p.rec(16, [h(25, 1), bad], [T(h(25, 0)), V(1), V(False)])
    p.stream(cmds, itertools.cycle([64]))
    assert bad in p.s[0].tensors and bad not in p.s[0].poisoned


def optimizer_step(p: Pair, t: int) -> list[device_pb2.Command]:
    """An optimizer's step as the C++ client sends it: in-place `_foreach_` ops whose records name no output handle
    (the op returns nothing), and a factory of uninitialized memory (`empty_like`) right after a tensor of its size
    full of non-zero values was freed (the allocator hands its memory out again as it was written)."""
    return [
        p.rec(2, [h(t, 0)], [T(X), T(W)]),
        p.rec(1, [h(t, 1)], [T(h(t, 0)), V(7.0 + t)]),
        device_pb2.Command(free=device_pb2.Free(handles=[h(t, 1)])),
        p.rec(9, [h(t, 2)], [T(h(t, 0))]),
        p.rec(18, [], [L([h(t, 2)]), L([h(t, 0)]), L([h(t, 0)]), V([0.5 * t + 0.125])]),
        p.rec(14, [], [L([h(t, 0)]), L([h(t, 2)])]),
        p.rec(14, [], [L([h(t, 0)]), L([h(t, 2)])], {"alpha": V(-0.5)}),
    ]


def test_in_place_list_ops_without_outputs_and_uninitialized_factories_run_natively(runner: str) -> None:
    """Records naming no output handle (an in-place `_foreach_` op returning nothing) and `empty_like` run in C++
    (the runner zeroes the factory's storage as `_run_step` does) with the normal path's results: every memory the
    session gets is zeros, whatever the allocator handed out (the normal path's tensors are compared)."""
    p = Pair()
    cmds = [c for t in range(6) for c in optimizer_step(p, t) + ([free(t - 1)] if t else [])]
    p.stream(cmds, itertools.cycle([64]))
    hits, native = p.hits, p.runs().native
    for t in range(6, 14):
        p.stream(optimizer_step(p, t) + [free(t - 1)], itertools.cycle([64]))
        for s in p.s:
            assert torch.allclose(s.tensors[h(t, 2)], torch.full((4, 5), 0.5 * t + 0.125))  # zeros, then += 0.5 t ...
    assert p.hits - hits == 8 * 6
    if runner == "native":  # each step's six records in C++ (before round 27: two of them, mm and mul)
        assert p.runs().native - native == 8 * 6, p.runs().native - native


def test_the_handle_limit_counts_every_output_of_a_step() -> None:
    """At the handle limit, a step with two new output handles fails where the normal path fails (one free slot
    is not enough for two)."""
    # each step leaves max.dim's two outputs bound: the limit falls on the division (two outputs, one slot free)
    # or on max.dim (two outputs, one slot free) depending on the limit's parity
    leak = [device_pb2.Command(free=device_pb2.Free(handles=[h(t, j) for j in (0, 3, 4, 5)])) for t in range(40)]
    for handles in range(20, 28):
        p = Pair(max_handles=handles)
        cmds = [c for t in range(24) for c in several_step(p, t) + ([leak[t - 1]] if t else [])]
        p.stream(cmds, itertools.cycle([64]))
        assert p.hits > 0
        assert p.s[0].ops < len(cmds) - 23  # some ops were refused


def test_hostile_bytes_in_several_output_and_step_size_records() -> None:
    """Random damage to the records of steps with several outputs and with `Scalar[]` step sizes: NaN and
    infinite step sizes, flipped bytes, handles swapped, truncated and lengthened records."""
    import random
    import struct

    rng = random.Random(29)
    p = Pair()
    p.stream([c for t in range(5) for c in several_step(p, t) + ([free5(t - 1)] if t else [])], itertools.cycle([64]))
    hits = p.hits
    for t in range(5, 40):
        cmds = several_step(p, t) + [free5(t - 1)]
        k, how = rng.randrange(5), rng.randrange(5)
        if how < 4:
            pick = [FOREIGN, BASE, X, W, h(t - 1, 1), h(t, 3), 0]
            cmds[k] = device_pb2.Command(eager_op=damage(rng, how, cmds[k].eager_op, pick))
        else:  # a step size (the last 8 bytes of the division's list) made NaN, infinite or huge
            data = bytearray(p.rec(17, [h(t, 3), h(t, 4)], [L([h(t, 0), h(t, 1)]), V([1.0, 2.0])]).eager_op)
            at = data.rfind(struct.pack("<d", 2.0))
            data[at : at + 8] = struct.pack("<d", rng.choice([float("nan"), float("inf"), -1e308, 0.0]))
            cmds[2] = device_pb2.Command(eager_op=bytes(data))
        p.stream(cmds, itertools.cycle([rng.choice([4, 9, 64])]))
    assert p.hits - hits > 60


Y = BASE + 60  # a session tensor: the first part's external input
Z = BASE + 61  # the second part's external input besides the first part's last output
Q = BASE + 62  # a tensor of the first part's last output's meta


def c(t: int, j: int) -> int:
    return BASE + 20000 + 100 * t + j


def part_a(p: Pair, t: int) -> list[device_pb2.Command]:
    """The first part of a "step", learned as a run of its own: 64 x 3, 64 x 3 (both kept), then 64 x 5."""
    return [
        p.rec(1, [c(t, 0)], [T(Y), V(1.0 + t)]),
        p.rec(3, [c(t, 1)], [T(c(t, 0))]),
        p.rec(2, [c(t, 2)], [T(c(t, 1)), T(W)]),
    ]


def part_b(p: Pair, t: int, first: int = 0, second: int = 0, python: bool = False) -> list[device_pb2.Command]:
    """The second part, learned as another run: its first record takes Z and the first part's last output
    (external inputs for this run) into a 2 x 5 output, the second record that output (internal: kept by this run),
    the third the second's. `first` and `second` replace the inputs named; `python`: the second record is a random
    op (a step the native runner leaves to the Python path)."""
    return [
        p.rec(20, [c(t, 3)], [T(Z), T(first or c(t, 2))]),
        p.rec(4 if python else 21, [c(t, 4)], [T(second or c(t, 3))]),
        p.rec(6, [c(t, 5)], [T(c(t, 4))]),
    ]


def free_c(t: int) -> device_pb2.Command:
    return device_pb2.Command(free=device_pb2.Free(handles=[c(t, j) for j in range(6)]))


class Calls:
    """`ex[0]`'s native runner with its `Ctx.run` calls noted: (records taken, whether they ran on into another
    run)."""

    def __init__(self, p: Pair) -> None:
        self.calls: list[tuple[int, bool]] = []
        mod = p.ex[0].native
        if mod is None:
            return
        calls = self.calls

        class Ctx:
            def __init__(self, *a: Any) -> None:
                self.ctx = mod.Ctx(*a)

            def run(self, *a: Any) -> Any:
                got = self.ctx.run(*a)
                calls.append((got[2], got[5] is not None))
                return got

            def __getattr__(self, name: str) -> Any:  # (`between`: the module's Ctx's own)
                return getattr(self.ctx, name)

        p.ex[0].native = type("Native", (), {"Ctx": Ctx, "__getattr__": lambda _, name: getattr(mod, name)})()


def chained(quota: int = 1 << 24, python: bool = False) -> tuple[Pair, Calls]:
    """A pair whose runs are the two parts, learned apart (each part in slices of its own), then run together
    (a slice of both parts: the first run's `next` is then the second)."""
    p = Pair(quota=quota)
    made = {Y: torch.randn(64, 3), Z: torch.randn(2, 64), Q: torch.randn(64, 5)}
    for s in p.s:
        for k, v in made.items():
            s.bind(k, v.clone())
    calls = Calls(p)
    for t in range(3):
        p.slice(part_a(p, t))
        p.slice(part_b(p, t, python=python))
        p.slice([free_c(t)])
    assert sum(map(len, p.runs().heads.values())) == 2  # a run of each part
    p.slice(part_a(p, 3) + part_b(p, 3, python=python))
    p.slice([free_c(3)])
    return p, calls


@pytest.mark.parametrize("python", [False, True])
def test_a_run_goes_on_into_the_run_that_followed_it_last_time_in_one_native_call(runner: str, python: bool) -> None:
    """Runs learned apart (a training step's parts, cut where recordings met runs learned before) and run one after
    the other: once the first's `next` is the second, the native runner goes on into it itself (`Ctx::follow`),
    one call a slice, every record as the normal path runs it. Where the second run has a step the native runner
    leaves to Python, the Python path goes on in that run from that step (and the native runner after it)."""
    p, calls = chained(python=python)
    hits, native = p.hits, p.runs().native
    calls.calls.clear()
    for t in range(4, 9):
        p.slice(part_a(p, t) + part_b(p, t, python=python))
        p.slice([free_c(t)])
    assert p.hits - hits == 5 * 6  # every record in a learned run
    if runner == "native":
        assert p.runs().native - native == 5 * (5 if python else 6)
        # one call a slice, which ran on into the second run (and one for its step after the Python one)
        assert calls.calls == ([(4, True), (1, False)] if python else [(6, True)]) * 5


def test_a_run_goes_on_into_the_run_that_followed_it_whatever_the_form_of_its_trace(
    runner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Ctx::follow` reads a `runs.Trace`'s `next`, `quota`, `flops` and `native` from its slots (`SlotOf`) while
    the class is as it was when it found them, and again after any change to the class (its attribute cache tag
    changes); a `next` that is a callable but no weak reference is called: with the class changed before every
    slice and such a `next`, the runs still go on into each other in one native call a slice, as the normal path."""
    p, calls = chained()
    first = next(tr for found in p.runs().heads.values() for tr in found if tr.next() is not None)
    hits = p.hits
    calls.calls.clear()
    for t in range(4, 9):
        monkeypatch.setattr(runs.Trace, "probe", t, raising=False)
        if t == 6:
            first.next = functools.partial(lambda cand: cand, first.next())
        p.slice(part_a(p, t) + part_b(p, t))
        p.slice([free_c(t)])
    assert p.hits - hits == 5 * 6
    if runner == "native":
        assert calls.calls == [(6, True)] * 5


def part_c(p: Pair, t: int) -> list[device_pb2.Command]:
    """Another run that follows the first part elsewhere in a step: `part_b`'s records, its first under another
    template (op id 2, the first part's `mm`), so that `part_b`'s run does not take it."""
    return [
        p.rec(2, [c(t, 3)], [T(Z), T(c(t, 2))]),
        p.rec(21, [c(t, 4)], [T(c(t, 3))]),
        p.rec(6, [c(t, 5)], [T(c(t, 4))]),
    ]


def test_a_run_followed_by_other_runs_at_two_places_of_a_step_goes_on_into_each_in_one_native_call(
    runner: str,
) -> None:
    """A run met at two places of a step (a transformer's layers run the same records) is followed by one run at
    the first place and by another at the second: its `next` is the one that followed it last and `alt` the one
    before (`runs.follows`), and the native runner tries `alt` where `next`'s first step does not take the record,
    so a step of both places runs in one call (before, each place found the other's run in `next`, and the record
    went back to the Python path: the encoder's ~9 failed tries a step). Every record as the normal path runs it."""
    p = Pair()
    made = {Y: torch.randn(64, 3), Z: torch.randn(2, 64)}
    for s in p.s:
        for k, v in made.items():
            s.bind(k, v.clone())
    calls = Calls(p)
    for t in range(0, 6, 2):  # the three runs learned apart
        p.slice(part_a(p, t))
        p.slice(part_b(p, t))
        p.slice(part_a(p, t + 1))
        p.slice(part_c(p, t + 1))
        p.slice([free_c(t), free_c(t + 1)])
    for t in range(10, 14, 2):  # learns which runs follow which
        p.slice(part_a(p, t) + part_b(p, t) + part_a(p, t + 1) + part_c(p, t + 1))
        p.slice([free_c(t), free_c(t + 1)])
    first = next(tr for ts in p.runs().heads.values() for tr in ts if tr.steps[0].plan.name == "aten::mul")
    follow = {first.next(), first.alt()}
    assert None not in follow and len(follow) == 2 and first not in follow
    hits, native = p.hits, p.runs().native
    calls.calls.clear()
    for t in range(20, 28, 2):
        p.slice(part_a(p, t) + part_b(p, t) + part_a(p, t + 1) + part_c(p, t + 1))
        p.slice([free_c(t), free_c(t + 1)])
    assert p.hits - hits == 4 * 12  # every record in a learned run
    if runner == "native":
        assert p.runs().native - native == 4 * 12
        assert calls.calls == [(12, True)] * 4, calls.calls


def test_follows_keeps_the_run_before_next_as_alt() -> None:
    """`runs.follows`: a new follower becomes `next` and the old one `alt`; the same one again changes nothing."""
    a, b, c2 = (runs.Trace([], 0, 0) for _ in range(3))
    runs.follows(a, b)
    assert (a.next(), a.alt()) == (b, None)
    runs.follows(a, c2)
    assert (a.next(), a.alt()) == (c2, b)
    runs.follows(a, c2)
    assert (a.next(), a.alt()) == (c2, b)
    runs.follows(a, b)
    assert (a.next(), a.alt()) == (b, c2)


def test_a_chained_runs_first_step_checks_inputs_freed_rebound_or_reshaped_since(runner: str) -> None:
    """The run the native runner goes on into checks its first record as any run's first record: an external
    input freed, rebound to a tensor of another shape, or made another meta in place since it was learned leaves
    the chain there (the Python path then runs or refuses the record as the normal path does), and the first run's
    end is reported as without chaining; another live tensor of the learned meta runs."""
    for how in ("freed", "rebound", "reshaped", "another"):
        p, calls = chained()
        if how == "freed":
            p.slice([device_pb2.Command(free=device_pb2.Free(handles=[Z]))])
        elif how == "rebound":
            for s in p.s:
                s.free([Z])
                s.bind(Z, torch.ones(2, 65))
        elif how == "reshaped":
            p.slice([p.rec(13, [0], [T(Z)])])  # t_ in place: Z is now 64 x 2
        calls.calls.clear()
        hits = p.hits
        p.slice(part_a(p, 4) + part_b(p, 4, first=Q if how == "another" else 0))
        if runner == "native":
            assert calls.calls[0] == ((6, True) if how == "another" else (3, False)), (how, calls.calls)
        assert p.hits - hits >= 3
        if how != "another":
            assert p.s[0].poisoned  # the normal path refused the record, in both


def test_a_record_that_ends_a_run_under_way_starts_the_run_it_heads_in_cpp(runner: str) -> None:
    """A record that does not match the next step of the run under way (the native runner leaves it, the Python
    path's match fails too) but is the first step of another run: that run's first step is the native runner's to
    take, as at a span's start, not the Python path's (before, every such record ran in Python: the encoder's
    `native_dropout_backward` after the run it interrupted, ~2 records a step); every record as on the normal path."""
    p, calls = chained()
    hits, native = p.hits, p.runs().native
    calls.calls.clear()
    for t in range(4, 8):
        p.slice(part_a(p, t)[:2] + part_b(p, t, first=Q))  # the first run ends after two of its three steps
        p.slice([free_c(t)])
    assert p.hits - hits == 4 * 5
    if runner == "native":
        assert p.runs().native - native == 4 * 5
        assert calls.calls == [(2, False), (3, False)] * 4  # the first run's two records, then the second run


def test_a_run_that_starts_while_records_are_recorded_runs_in_cpp_and_ends_the_recording(runner: str) -> None:
    """Records of the normal path that hit templates are recorded (`Runs.rec`) until one matches a learned run's
    first step: the native runner takes that step (before, the Python path did, to end the recording first), and the
    recording ends as on the Python path: the same runs are learned with the runner on and off."""
    p, calls = chained()
    learned, native, hits = p.runs().learned, p.runs().native, p.hits
    calls.calls.clear()
    # relu of Y: a template of the first run's second step, no run's first step, so the normal path runs it and
    # the recording starts; the second run's records follow
    p.slice([p.rec(3, [c(4, 1)], [T(Y)])] + part_b(p, 4, first=Q))
    assert p.runs().learned - learned == 1  # the relu record, learned as a run of its own when the second began
    assert p.hits - hits == 3
    assert sum(map(len, p.runs().heads.values())) == 3
    if runner == "native":
        assert p.runs().native - native == 3
        assert calls.calls == [(3, False)]
    p.slice([free_c(4)])
    hits = p.hits
    p.slice([p.rec(3, [c(5, 1)], [T(Y)])] + part_b(p, 5, first=Q))  # now the relu's run, then the second run
    assert p.hits - hits == 4


def test_a_chained_run_checks_its_own_outputs_against_its_own_kept_list() -> None:
    """A run the native runner goes on into starts with a list of kept outputs of its own: a record that names an
    output the first run kept where the second run's own output belongs (64 x 3 for 2 x 5: past the quota, which
    the normal path refuses before the op) leaves the run and fails as on the normal path, with no op run."""
    probe, _ = chained()
    base = probe.s[0].used  # what the session holds when the hostile slice starts (the same whatever the quota)
    step = 2 * 64 * 3 * 4 + 64 * 5 * 4 + 2 * 5 * 4  # what the slice binds before the hostile record
    p, calls = chained(quota=base + step + 400)  # room for a 2 x 5 output (40 bytes), not for a 64 x 3 (768)
    assert p.s[0].used == base
    hits = p.hits
    p.slice(part_a(p, 4) + part_b(p, 4, second=c(4, 0)))
    assert p.hits - hits == 4
    assert c(4, 4) in p.s[0].poisoned and c(4, 5) in p.s[0].poisoned  # refused, as on the normal path


def _second_run(p: Pair) -> runs.Trace:
    """The run `part_b` was learned as: the one `part_a`'s run follows into."""
    (first,) = [t for ts in p.runs().heads.values() for t in ts if len(t.steps) == 3 and t.next() is not None]
    second = first.next()
    assert second is not None
    return second


@pytest.mark.parametrize("how", ["quota", "flops", "evicted", "uncompiled"])
def test_a_run_goes_on_only_into_a_next_run_that_still_holds(runner: str, how: str) -> None:
    """`Ctx::follow` goes on only into a next run that is alive, learned under the session's quota and compute
    bound (its verdicts hold only under those), and compiled: a next run learned under another quota or
    `max_op_flops` (its `quota`/`flops`), dropped from the session's runs (evicted: its weak reference is dead), or
    not compiled (`native` None) is not run on into; the first run's end is the result, and the records run as on
    the normal path (the pair compares them)."""
    p, calls = chained()
    second = _second_run(p)
    if how == "quota":
        second.quota += 1
    elif how == "flops":
        second.flops += 1
    elif how == "evicted":
        for ts in p.runs().heads.values():
            if second in ts:
                ts.remove(second)
        del second
        gc.collect()
    else:
        second.native = None
        second.steps = second.steps[:0] + second.steps  # the same steps (the Python path compiles it again)
    calls.calls.clear()
    hits = p.hits
    p.slice(part_a(p, 4) + part_b(p, 4))
    if runner == "native":
        assert calls.calls[0] == (3, False), calls.calls
    if how in ("quota", "flops", "evicted"):
        assert p.hits - hits == 3  # the second part ran on the normal path (and is learned again)


IE, IE32 = BASE + 70, BASE + 71  # session tensors of indices (int64, int32) whose values change between steps


def e(t: int, j: int) -> int:
    return BASE + 30000 + 100 * t + j


def embed_step(p: Pair, t: int, shift: int = 0) -> list[device_pb2.Command]:
    """Value-guarded records (`embedding_dense_backward`: indices in [0, 5)) whose indices are an earlier record's
    output (`IDX` + `shift`, a number each record gives) or session tensors (`IE`, `IE32`)."""
    return [
        p.rec(10, [e(t, 0)], [T(IDX), V(shift)]),
        p.rec(11, [e(t, 1)], [T(G), T(e(t, 0)), V(5), V(-1), V(False)]),
        p.rec(11, [e(t, 2)], [T(G), T(IE), V(5), V(-1), V(False)]),
        p.rec(11, [e(t, 3)], [T(G), T(IE32), V(5), V(-1), V(False)]),
        p.rec(5, [e(t, 4)], [T(e(t, 1)), T(e(t, 2))], {"alpha": V(0.5)}),
    ]


def free_e(t: int) -> device_pb2.Command:
    return device_pb2.Command(free=device_pb2.Free(handles=[e(t, j) for j in range(5)]))


def _indices(p: Pair, ie: list[int], ie32: list[int]) -> None:
    for s in p.s:  # the values change in place, as an upload into the tensor would change them
        s.tensors[IE].copy_(torch.tensor(ie))
        s.tensors[IE32].copy_(torch.tensor(ie32, dtype=torch.int32))


def test_a_value_guarded_step_checks_its_indices_every_record_as_on_the_normal_path(runner: str) -> None:
    """`embedding_dense_backward`'s guard (indices in [0, num_weights)) holds for every record of a learned run; with
    the native runner it is checked in C++ (`guards.index_ranges`), and a record whose indices are out of range on
    either side (computed by the step, or a session tensor's new values; int64 and int32) goes to the Python path,
    which raises the normal path's error: the same codes, messages, poisoned handles and values. The records in range
    run in C++ (before round 28 the guarded ones stayed in Python)."""
    p = Pair()
    for s in p.s:
        s.bind(IE, torch.tensor([4, 0, 3, 1]))
        s.bind(IE32, torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    p.stream([c for t in range(6) for c in embed_step(p, t) + ([free_e(t - 1)] if t else [])], itertools.cycle([64]))
    hits, native = p.hits, p.runs().native
    p.stream([c for t in range(6, 10) for c in embed_step(p, t, shift=t % 2) + [free_e(t - 1)]], itertools.cycle([64]))
    assert p.hits - hits == 4 * 5
    if runner == "native":
        assert p.runs().native - native == 4 * 5, p.runs().native - native
    hostile: list[tuple[int, list[int], list[int]]] = [
        (3, [4, 0, 3, 1], [1, 2, 3, 4]),  # the step's own indices reach 5
        (-1, [4, 0, 3, 1], [1, 2, 3, 4]),  # and -1
        (0, [4, 5, 3, 1], [1, 2, 3, 4]),
        (0, [4, 0, -1, 1], [1, 2, 3, 4]),
        (0, [1 << 40, 0, 3, -(1 << 62)], [1, 2, 3, 4]),
        (0, [4, 0, 3, 1], [1, 2, -(1 << 31), 4]),
        (0, [4, 0, 3, 1], [5, 2, 3, 4]),
        (2, [0, 0, 0, 0], [4, 4, 4, 4]),  # in range again, on the edges
    ]
    for k, (shift, ie, ie32) in enumerate(hostile):
        t = 10 + k
        _indices(p, ie, ie32)
        p.stream(embed_step(p, t, shift=shift) + [free_e(t - 1)], itertools.cycle([64]))
        failed = [m.message for m in p.s[0].poisoned.values()]  # this step's (the free let the last step's go)
        if k < len(hostile) - 1:
            assert any(m.startswith("indices must lie in [0, 5)") for m in failed), failed
        else:
            assert not failed
    _indices(p, [4, 0, 3, 1], [1, 2, 3, 4])
    hits, native = p.hits, p.runs().native
    p.stream([c for t in range(20, 24) for c in embed_step(p, t) + [free_e(t - 1)]], itertools.cycle([64]))
    assert p.hits - hits == 4 * 5
    if runner == "native":
        assert p.runs().native - native >= 3 * 5, p.runs().native - native


AQ, AK, AV, AQ3, AQ64 = (BASE + 80 + j for j in range(5))  # attention operands; a 3-D query; a float64 one


def a(t: int, j: int) -> int:
    return BASE + 40000 + 100 * t + j


def attention_step(p: Pair, t: int, q: int = AQ) -> list[device_pb2.Command]:
    """The fused attention's forward and backward (value-guarded ops whose guards read only shapes, dtypes and the
    template's constants: `guards.fixed_by_template`) between two plain records, as the clients send them."""
    mask = V([True, True, True, False])
    qkv = [T(q), T(AK), T(AV), V(None)]
    grads = [T(a(t, 4)), *qkv, mask, T(a(t, 0)), T(a(t, 1)), V(None), V(None), V(4), V(4), V(0.0), V(False)]
    return [
        p.rec(22, [a(t, 0), a(t, 1), 0, 0, 0, 0, a(t, 2), a(t, 3)], [*qkv, V(0.0), V(False)]),
        p.rec(5, [a(t, 4)], [T(a(t, 0)), T(a(t, 0))], {"alpha": V(0.5)}),
        p.rec(23, [a(t, 5), a(t, 6), a(t, 7)], [*grads, T(a(t, 2)), T(a(t, 3))]),
        p.rec(5, [a(t, 8)], [T(a(t, 5)), T(a(t, 6))], {"alpha": V(0.5)}),
    ]


def free_a(t: int) -> device_pb2.Command:
    return device_pb2.Command(free=device_pb2.Free(handles=[a(t, j) for j in range(9)]))


def test_attention_steps_skip_their_meta_only_guards_and_refuse_other_metas_as_on_the_normal_path() -> None:
    """The fused attention's guards read only what a learned step fixes, so its steps do not run them per record
    (`Step.check` off; a backward with dropout reads its seed's device and keeps it): in learned runs the results are
    the normal path's, and a query of another shape or dtype leaves the run and fails with the normal path's error."""
    assert not guards.fixed_by_template(attention.BACKWARD, [None] * 12 + [0.25], {})
    assert guards.fixed_by_template(attention.BACKWARD, [None] * 12 + [0.0], {})
    assert guards.fixed_by_template(attention.FORWARD, [None] * 4 + [0.5], {})
    assert not guards.fixed_by_template("aten::embedding_dense_backward", [None, None, 5, -1, False], {})
    p = Pair()
    torch.manual_seed(1)
    operands = {AQ: torch.randn(2, 2, 4, 8), AK: torch.randn(2, 2, 4, 8), AV: torch.randn(2, 2, 4, 8),
                AQ3: torch.randn(2, 4, 8), AQ64: torch.randn(2, 2, 4, 8, dtype=torch.float64)}  # fmt: skip
    for s in p.s:
        for handle, value in operands.items():
            s.bind(handle, value.clone())
    warm = [c for t in range(6) for c in attention_step(p, t) + ([free_a(t - 1)] if t else [])]
    p.stream(warm, itertools.cycle([64]))
    steps = [st for traces in p.runs().heads.values() for tr in traces for st in tr.steps]
    guarded = [st for st in steps if st.plan.name in attention.NAMES]
    assert guarded and not any(st.check for st in guarded)
    hits = p.hits
    p.stream([c for t in range(6, 10) for c in attention_step(p, t) + [free_a(t - 1)]], itertools.cycle([64]))
    assert p.hits - hits == 4 * 4
    for t, q in ((10, AQ3), (11, AQ64), (12, AQ)):
        p.stream(attention_step(p, t, q=q) + [free_a(t - 1)], itertools.cycle([64]))
        failed = [m.message for m in p.s[0].poisoned.values()]
        assert bool(failed) == (q != AQ), failed
        assert all(m.startswith("fused attention") for m in failed), failed


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_native_steps_call_their_ops_below_autograd_with_the_same_results_and_version_counts(runner: str) -> None:
    """The native runner calls an op below the autograd keys (`Plan::below_autograd`: the worker never records
    autograd history, so its Autograd kernel is only a check and a redispatch): a kernel registered at AutogradCPU
    for `aten::mm` sees the Python path's calls only (before round 32 also every native one), while results, metas
    and accounting stay the normal path's (`Pair.same`) and ADInplaceOrView still counts in-place writes (the
    parameter's version counter, which server/graph.py's persistent-tensor check reads)."""
    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    seen = [0]

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen[0] += 1
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.aten.mm.default(a, b)

    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl("mm", mm, "AutogradCPU")  # in place of VariableType's (torch warns of the override)
        hits, native = p.hits, p.runs().native
        p.stream([c for t in range(6, 14) for c in step(p, t) + [free(t - 1)]], itertools.cycle([64]))
    finally:
        lib._destroy()
    assert p.hits - hits >= 8 * 11 * 0.7
    assert p.s[0].tensors[P]._version == p.s[1].tensors[P]._version > 0
    if runner == "native":
        assert p.runs().native > native
        assert 8 <= seen[0] < 16  # the normal path's 8, and the native ones none
    else:
        assert seen[0] == 16


def test_below_autograd_needs_a_backend_kernel_on_the_sessions_device_and_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert native_runner.below_autograd("aten::mm", cpu)
    assert native_runner.below_autograd("aten::_foreach_add_.Scalar", cpu)  # a composite kernel
    assert not native_runner.below_autograd("aten::_cudnn_rnn", cpu)  # no CPU kernel: through autograd, as before
    assert not native_runner.below_autograd("aten::mm", torch.device("meta"))  # not a session's device


@cuda
def test_below_autograd_on_a_cuda_session() -> None:
    """On a CUDA device the runner calls ops with CUDA and CPU kernels below autograd (no CUDA call of its own:
    the guard is thread-local dispatcher state)."""
    dev = torch.device("cuda", 0)
    assert native_runner.below_autograd("aten::mm", dev)
    assert native_runner.below_autograd("aten::_foreach_lerp_.Scalar", dev)
    assert not native_runner.below_autograd("aten::_cudnn_rnn", dev)  # CUDA only: not the CPU's


def test_the_runner_reads_the_whole_mark_under_the_name_python_sets(runner: str) -> None:
    """The runner skips `WorkerSession.zero_new` for results marked `WHOLE` (server/native_runner.cpp `zero_new`
    reads the mark itself, the attention's seeds in every step): under the name `opargs.written_whole` sets (with
    another name it would find no mark and call Python's zeroing, which reads it: slower, never less zeroed)."""
    from gpupool.server import opargs

    if runner == "python":
        pytest.skip("the runner's own constant")
    assert native_runner.load().WHOLE == opargs.WHOLE


def test_a_run_replaced_on_the_plans_class_is_what_every_record_runs(
    runner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner reads a step's `owner.run` from the `OpPlan`'s slot only while the class is as it was when the
    step was compiled (native_runner.cpp `runs_its_own`: its attribute cache tag): a `run` replaced on the class (a
    property here, wrapping each plan's own) is what every later record runs, the runner's as the normal path's."""
    from gpupool.server import checks

    p = Pair()
    p.stream(training(p, 6), itertools.cycle([64]))
    owner = {id(plan): k for k, ex in enumerate(p.ex) for plan in ex._plans.values()}
    slot = checks.OpPlan.run
    calls = [0, 0]

    def wrapped(plan: Any) -> Any:
        real = slot.__get__(plan, checks.OpPlan)

        def run(*a: Any, **k: Any) -> Any:
            calls[owner[id(plan)]] += 1
            return real(*a, **k)

        return run

    monkeypatch.setattr(checks.OpPlan, "run", property(wrapped, slot.__set__))
    native, hits = p.runs().native, p.hits
    p.stream([c for t in range(6, 10) for c in step(p, t) + [free(t - 1)]], itertools.cycle([64]))
    assert p.hits - hits > 20  # still in learned runs, on the Python path
    assert p.runs().native == native
    assert calls[0] == calls[1] == 4 * 11


def test_an_op_returning_a_list_of_one_under_one_output_handle_runs_in_learned_runs(runner: str) -> None:
    """A `Tensor[]` op whose record names one output handle (a `_foreach_` op of a one-element list): a SEVERAL
    step of one output. Until round 37 the C++ runner made its handles' tuple only for two or more outputs and read
    the missing one: the worker died (a segfault; under `--isolation thread` the whole daemon, every session), from
    records any client may send. Now bound as the normal path binds it."""
    p = Pair()
    cmds: list[device_pb2.Command] = []
    for t in range(8):
        cmds += [
            p.rec(1, [h(t, 0)], [T(X), V(1.0 + t)]),
            p.rec(8, [h(t, 6)], [compact.tensors([h(t, 0)]), V(1.0)]),
            p.rec(3, [h(t, 2)], [T(h(t, 6))]),
        ]
        if t:
            cmds.append(device_pb2.Command(free=device_pb2.Free(handles=[h(t - 1, j) for j in (0, 2, 6)])))
    p.stream(cmds, itertools.cycle([64]))
    assert p.hits > 3 * 4
    assert torch.equal(p.s[0].tensors[h(7, 2)], torch.relu(p.s[0].tensors[X] * 8.0 + 1.0))


def _varint(x: int) -> bytes:
    x &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, x = x & 0x7F, x >> 7
        out.append(b | (0x80 if x else 0))
        if not x:
            return bytes(out)


def _field(n: int, value: int | bytes) -> bytes:
    """A protobuf field's bytes: a varint for an int, length-delimited for bytes."""
    if isinstance(value, int):
        return _varint(n << 3) + _varint(value)
    return _varint(n << 3 | 2) + _varint(len(value)) + value


def test_hostile_upload_and_free_bytes_inside_a_run_as_on_the_normal_path(runner: str) -> None:
    """Upload and Free messages that upb reads (the frame parses) but that are not what a client's serializer
    writes, among a run's records where `Ctx::between` reads their bytes by hand: a field twice (upb: the last
    handle, the two metas merged), shapes packed and not mixed, MAX_DIMS and one past, 2^63 - 1 and -1 as a
    dimension, an element count that overflows int64 times the element size, one of 0 elements beside a huge
    dimension, unknown and negative dtypes, strides and an offset of any value, an unknown field, `last` as 2, an
    over-long varint, a bool byte 2, bytes one short, the reserved, another session's and a far handle, a free of a
    handle twice, of another session's, packed and not. Each runs (or fails, with the same status and message) as
    on the normal path: the pair compares the tensors, the errors, the poisoned handles and the accounting."""
    p = Pair(quota=1 << 20, max_handles=300)
    p.stream(training(p, 6), itertools.cycle([64]))
    f32, b8 = wire.dtype_to_proto(torch.float32), wire.dtype_to_proto(torch.bool)
    one = torch.ones(2, 3).numpy().tobytes()

    def meta(*fields: bytes) -> bytes:
        return _field(2, b"".join(fields))

    def up(*fields: bytes) -> bytes:
        return b"".join(fields)

    hb = BASE + 950
    packed = lambda *dims: _field(2, b"".join(_varint(d) for d in dims))  # noqa: E731
    plain = lambda *dims: b"".join(_field(2, d) for d in dims)  # noqa: E731
    ok = (_field(1, f32), packed(2, 3))
    cases = [
        up(_field(1, hb), _field(1, hb + 1), meta(*ok), _field(4, one), _field(5, 1)),  # handle twice
        up(_field(1, hb), meta(_field(1, f32), packed(2)), meta(packed(3)), _field(4, one), _field(5, 1)),  # merged
        up(_field(1, hb), meta(_field(1, f32), packed(2), plain(3)), _field(4, one), _field(5, 1)),  # mixed shape
        up(_field(1, hb), meta(_field(1, f32), plain(*[1] * 64)), _field(4, one[:4]), _field(5, 1)),  # MAX_DIMS
        up(_field(1, hb), meta(_field(1, f32), plain(*[1] * 65)), _field(4, one[:4]), _field(5, 1)),  # one past
        up(_field(1, hb), meta(_field(1, f32), packed((1 << 63) - 1)), _field(4, one), _field(5, 1)),
        up(_field(1, hb), meta(_field(1, f32), packed(-1)), _field(4, b""), _field(5, 1)),
        up(_field(1, hb), meta(_field(1, f32), packed(1 << 31, 1 << 31, 4)), _field(4, one), _field(5, 1)),
        up(_field(1, hb), meta(_field(1, f32), packed(1 << 62, 0)), _field(5, 1)),  # 0 elements
        up(_field(1, hb), meta(_field(1, f32), packed(0, 1 << 62, 1 << 62)), _field(5, 1)),
        up(_field(1, hb), meta(_field(1, 99), packed(2, 3)), _field(4, one), _field(5, 1)),
        up(_field(1, hb), meta(_field(1, -1), packed(2, 3)), _field(4, one), _field(5, 1)),
        up(_field(1, hb), meta(_field(1, (1 << 32) + f32), packed(2, 3)), _field(4, one), _field(5, 1)),
        up(_field(1, hb), meta(*ok, _field(3, 1 << 63), _field(4, 7)), _field(4, one), _field(5, 1)),  # stride, off
        up(_field(1, hb), meta(*ok, _field(4, 1), _field(4, 2)), _field(4, one), _field(5, 1)),  # offset twice
        up(_field(1, hb), meta(*ok, _field(9, 1)), _field(4, one), _field(5, 1)),  # an unknown field
        up(_field(1, hb), meta(*ok), _field(4, one), _field(5, 2)),  # last = 2
        up(b"\x88\x80\x80\x00" + _varint(hb), meta(*ok), _field(4, one), _field(5, 1)),  # an over-long key
        up(_field(1, hb), meta(*ok), _field(4, one), _field(5, 1), _field(7, 1)),  # an unknown Upload field
        up(_field(1, hb), meta(_field(1, b8), packed(3)), _field(4, b"\x01\x02\x00"), _field(5, 1)),
        up(_field(1, hb), meta(*ok), _field(4, one[:-1]), _field(5, 1)),
        up(_field(1, hb), meta(*ok), _field(3, 1), _field(4, one), _field(5, 1)),  # offset 1
        up(_field(1, BASE), meta(*ok), _field(4, one), _field(5, 1)),
        up(_field(1, FOREIGN), meta(*ok), _field(4, one), _field(5, 1)),
        up(_field(1, BASE + (1 << 32) - 1), meta(*ok), _field(4, one), _field(5, 1)),
        up(_field(1, hb + 2), meta(_field(1, f32), packed(2, 3)), _field(4, one), _field(5, 1)),  # a plain one
    ]
    frees = [
        _field(1, b"".join(_varint(x) for x in (hb + 2, hb + 2, hb + 2))),  # a handle thrice
        _field(1, hb + 3) + _field(1, b"".join(_varint(x) for x in (hb, hb + 1))),  # not packed, then packed
        _field(1, b"".join(_varint(x) for x in (hb + 4, FOREIGN, hb + 5))),
        _field(1, b"".join(_varint(x) for x in (BASE, 0, 1 << 63))),
    ]
    t = 6
    raw = [(2, c) for c in cases] + [(4, f) for f in frees]
    for kind, msg in raw:
        cmds = step(p, t)
        cmds.append(free(t - 1))
        entries = [c.SerializeToString() for c in cmds]
        entries.insert(3, _field(kind, msg))
        entries.insert(6, device_pb2.Command(upload=device_pb2.Upload(
            handle=hb + 3 + t % 3, meta=tensor_pb2.TensorMeta(dtype=f32, shape=[2, 3]), data=one, last=True)
        ).SerializeToString())  # fmt: skip
        payload = b"".join(_field(1, e) for e in entries)
        device_pb2.ClientFrame.FromString(payload)  # upb reads it
        p.slice([], payload=payload)
        t += 1


def _pinning_pair() -> Pair:
    """A pair whose `ex[0]` runs as a session's own worker process does (`exclusive_rng`, a word mark): where its
    thread is the interpreter's only one, the runner keeps the GIL across each op and pins its inputs
    (native_runner.cpp `Pins`) rather than holding them by torch's counted references."""
    p = Pair()
    p.word = True
    for ex in p.ex:
        ex.exclusive_rng = True  # both: the random op's draws the same
    return p


def _pinned() -> int:
    mod = native_runner.load()
    return 0 if mod is None else int(mod.pinned())


def test_pinned_inputs_leave_every_tensor_counted_and_freed_as_on_the_normal_path(runner: str) -> None:
    """Pinned records (the GIL kept, each input held by a count of the runner's own, without torch's PyObject
    hooks) leave every tensor's C++ and Python references as the normal path leaves them: an in-place op that
    returns its input (op 7 on P, every step) neither leaks nor loses a reference of its Python object, the same
    tensor twice in one record is pinned once, and a step's freed outputs are gone at once."""
    p = _pinning_pair()
    alone = len(sys._current_frames()) == 1  # no other Python thread in this process (else nothing is pinned)
    before = _pinned()
    p.stream(training(p, 6), itertools.cycle([7, 13, 64]))
    refs = [sys.getrefcount(s.tensors[P]) for s in p.s]
    doubled = [p.rec(5, [h(t, 11)], [T(h(t, 2)), T(h(t, 2))], {"alpha": V(2.0)}) for t in range(6, 14)]
    for t in range(6, 14):
        p.stream(step(p, t) + [doubled[t - 6]] + ([free(t - 1)] if t == 6 else []), itertools.cycle([64]))
        outs = [weakref.ref(s.tensors[h(t, j)]) for s in p.s for j in (0, 1, 2, 11)]
        p.stream([free(t), device_pb2.Command(free=device_pb2.Free(handles=[h(t, 11)]))], itertools.cycle([64]))
        assert all(w() is None for w in outs), t
    assert [sys.getrefcount(s.tensors[P]) for s in p.s] == refs
    for hd in p.s[0].tensors:
        assert p.s[0].tensors[hd]._use_count() == p.s[1].tensors[hd]._use_count(), hd
    if runner == "native" and alone:
        assert _pinned() - before >= 8 * 8, _pinned() - before


def test_pinned_records_whose_op_fails_fail_as_on_the_normal_path(runner: str) -> None:
    """`test_an_op_that_fails_inside_a_run_fails_as_on_the_normal_path`'s stream on a pinning pair: a value guard's
    failure, a freed input, a foreign output or input mid-run leave both sessions the same."""
    p = _pinning_pair()
    p.stream(training(p, 4), itertools.cycle([16]))
    cmds = step(p, 4) + [free(3)] + step(p, 5) + [free(4)] + step(p, 6, scale=3) + step(p, 7)
    p.stream(cmds, itertools.cycle([64]))
    assert p.s[0].poisoned
    cmds = step(p, 8)
    cmds[3] = p.rec(4, [h(8, 3)], [T(h(6, 2))])
    cmds[5] = p.rec(6, [h(8, 5)], [T(h(3, 4))])
    cmds[7] = p.rec(8, [h(8, 6), FOREIGN], [compact.tensors([h(8, 1), h(8, 4)]), V(1.0)])
    cmds += step(p, 9)
    cmds[11 + 2] = p.rec(3, [h(9, 2)], [T(FOREIGN)])
    p.stream(cmds, itertools.cycle([9, 64]))


@pytest.mark.parametrize("why", ["another thread", "a callable mark", "a shared process"])
def test_records_run_with_the_gil_released_where_other_python_code_may_run(runner: str, why: str) -> None:
    """The GIL is kept across an op only in a session's own worker process (`exclusive_rng`) with a word mark while
    its thread is the interpreter's only one: with another Python thread alive (it may wait for the GIL), a mark
    that is Python code, or sessions sharing the process, every op runs with the GIL released and its inputs held
    as before (nothing pinned), with the same results."""
    p = _pinning_pair()
    if why == "a callable mark":
        p.word = False
    elif why == "a shared process":
        p.ex[0].exclusive_rng = False
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    if why == "another thread":
        other.start()
    try:
        before = _pinned()
        p.stream(training(p, 8), itertools.cycle([7, 13, 64]))
        assert p.hits > 8 * 5
        assert _pinned() == before
    finally:
        stop.set()
        if other.is_alive():
            other.join()


def _aliasing_step(p: Pair, t: int) -> list[device_pb2.Command]:
    """`step` and records whose op returns or aliases its input: an out= op whose out tensor (a step's own) is
    resized (torch warns, TORCH_WARN, while the inputs are pinned), an in-place op given one tensor twice, an in-place
    view op, several views of one input, a copy of a parameter that requires grad."""
    return step(p, t) + [
        p.rec(31, [h(t, 20)], [T(X), T(G)], {"out": T(h(t, 8))}),
        p.rec(32, [h(t, 21)], [T(h(t, 8)), T(h(t, 8))]),
        p.rec(33, [h(t, 22)], [T(h(t, 8)), V(0), V(1)]),
        p.rec(34, [h(t, 23), h(t, 24), h(t, 25)], [T(h(t, 8)), V(0)]),
        p.rec(2, [h(t, 26)], [T(h(t, 0)), T(W)]),
        p.rec(35, [h(t, 27)], [T(W)]),
    ]


@pytest.mark.parametrize("warnings_are", ["ignored", "errors"])
def test_pinned_records_whose_op_aliases_its_inputs_leave_every_count_as_unpinned_ones(
    runner: str, warnings_are: str
) -> None:
    """Pinned records (native_runner.cpp `Pins`) whose op returns, resizes or views its input, with a weight that
    requires grad (autograd saves the inputs) and with torch's warnings ignored or raised (the op's warning is turned
    into Python's while its inputs are pinned; as an error the record fails after its kernel ran), leave each
    tensor's Python and C++ references (`sys.getrefcount`, `_use_count`) as the same stream leaves them unpinned
    (another Python thread alive), and as many of a step's freed outputs stay alive. Pins behaviour that held when
    written (round 42's review of `Pins`: no finding)."""
    seen = []
    for other_thread in (False, True):
        p = _pinning_pair()
        for s in p.s:
            s.tensors[W].requires_grad_(True)
        stop = threading.Event()
        other = threading.Thread(target=stop.wait, daemon=True)
        if other_thread:
            other.start()
        try:
            alone = len(sys._current_frames()) == 1
            before = _pinned()
            cmds: list[device_pb2.Command] = []
            for t in range(10):
                cmds += _aliasing_step(p, t)
                if t:
                    cmds.append(device_pb2.Command(free=device_pb2.Free(handles=[h(t - 1, j) for j in range(28)])))
            with warnings.catch_warnings():
                warnings.simplefilter("error" if warnings_are == "errors" else "ignore")
                p.stream(cmds, itertools.cycle([9, 17, 64, 5]))
                pinned = _pinned() - before
                counts = {hd: (sys.getrefcount(t), t._use_count()) for hd, t in p.s[0].tensors.items()}
                outs = [weakref.ref(p.s[0].tensors[h(9, j)]) for j in range(28) if h(9, j) in p.s[0].tensors]
                p.stream([device_pb2.Command(free=device_pb2.Free(handles=[h(9, j) for j in range(28)]))], iter([64]))
                gc.collect()
            seen.append((counts, sum(w() is not None for w in outs)))
            if runner == "native" and not other_thread and alone:
                assert pinned >= 10 * 8, pinned
            if other_thread:
                assert pinned == 0, pinned
        finally:
            stop.set()
            if other.is_alive():
                other.join()
    assert seen[0] == seen[1]


def test_pinned_list_records_of_many_tensors_pin_each_tensor_once(runner: str) -> None:
    """A `_foreach_` record of two lists of 24 tensors, the second naming each tensor of the first again in another
    order (48 inputs: past the 16 pins `Pins` scans, where it keeps them in a set that it grows past 32), pinned in
    each step of a learned run: every tensor is pinned once however often its record names it, and the stream leaves
    each tensor's Python and C++ references (`sys.getrefcount`, `_use_count`) and values as the normal path does."""
    p = _pinning_pair()
    alone = len(sys._current_frames()) == 1
    many = [BASE + 5000 + j for j in range(24)]
    p.stream([upload(hd, torch.full((2, 3), float(j))) for j, hd in enumerate(many)], iter([64]))
    again = many[12:][::-1] + many[:12][::-1]
    refs = {hd: [sys.getrefcount(s.tensors[hd]) for s in p.s] for hd in many}
    pinned = []
    for t in range(10):
        p.stream(step(p, t) + ([free(t - 1)] if t else []), itertools.cycle([64]))
        before = _pinned()
        p.stream([p.rec(14, [], [L(many), L(again)], {"alpha": V(0.25)})], iter([64]))  # the run goes on in it
        pinned.append(_pinned() - before)
    assert {hd: [sys.getrefcount(s.tensors[hd]) for s in p.s] for hd in many} == refs
    for hd in many:
        assert p.s[0].tensors[hd]._use_count() == p.s[1].tensors[hd]._use_count(), hd
        assert torch.equal(p.s[0].tensors[hd], p.s[1].tensors[hd]), hd
    if runner == "native" and alone:
        assert pinned[-4:] == [1, 1, 1, 1], pinned


def test_the_tables_are_written_before_each_python_call_of_a_run(runner: str) -> None:
    """A progress mark that is Python code sees the session's tables (`tensors`, `_keys`, `_storages`) and byte
    counts exactly as on the normal path at each command (`_tables`), frees and uploads among a run's records
    included: whatever the C++ runner keeps of a session's handles must be in the tables before it calls Python code.
    Pins what holds (round 43: for a runner that would own the handle table, or defer writing it)."""
    p = Pair()
    p.tables = True
    cmds: list[device_pb2.Command] = []
    for t in range(10):
        cmds += step(p, t)
        if t:
            cmds.insert(len(cmds) - 4, free(t - 1))
        if t % 4 == 1:
            cmds.insert(len(cmds) - 2, upload(h(t, 2), torch.ones(4, 5)))
    p.stream(cmds, itertools.cycle([13, 64, 7]))
    assert p.hits > 30
