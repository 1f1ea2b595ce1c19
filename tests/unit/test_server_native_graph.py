"""A captured step's run through the C++ runner (round 40): `quiet_externals` (graph._quiet's look-ups of the
persistent tensors) and `rebind_run` (graph._finish's `WorkerSession.rebind_all` of the run's outputs and kept
tensors) must do exactly what the Python does: the same tensors found or the same refusal, the same handles bound,
storages counted, bytes (session and device) and zeroed bytes, the same error at the same point."""

from __future__ import annotations

import random
import weakref
from typing import Any

import pytest
import torch
from gpupool.server import slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, Poison, WorkerSession

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2
from gpupool.errors import GpupoolError, ResourceExhausted


@pytest.fixture
def mod(native_runner_module: Any) -> Any:
    return native_runner_module


def _session(limit: int = 100) -> WorkerSession:
    dev = FakeDevice(0, "h", 1 << 30)
    return WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28, max_handles=limit)


def _state(s: WorkerSession) -> tuple[object, ...]:
    return (s.used, s.memory.used, {h: id(t) for h, t in s.tensors.items()}, sorted(s.poisoned), dict(s._keys),
            {k: list(v) for k, v in s._storages.items()}, dict(s.uploads))  # fmt: skip


def test_rebind_run_does_what_rebind_all_does(mod: Any) -> None:
    """Random runs' outputs and kept tensors over two identical sessions: `rebind_run` on one, `rebind_all` of the
    same pairs on the other (as graph._finish makes them), through live handles, failed ones, new ones (past the
    handle limit too: the same partial state and error), uploads in progress, outputs of handle 0, two handles on one
    storage and a tensor rebound to its own storage."""
    rng = random.Random(11)
    for trial in range(200):
        pool = [torch.zeros(rng.randint(1, 50)) for _ in range(6)]
        pool.append(pool[0][1:])  # a view: the storage of pool[0], which it does not cover
        limit = rng.choice([100, 5])
        sessions = []
        for _ in range(2):
            s = _session(limit)
            for k in range(3):
                s.bind(s.handle_base + 1 + k, pool[k])
            s.poison(s.handle_base + 9, Poison.of(ResourceExhausted("x"), ""))
            s.uploads[s.handle_base + 2] = 4
            sessions.append(s)
        base = sessions[0].handle_base
        handles = [base + h for h in (1, 2, 3, 9, 10, 11, 12)]
        slots: list[Any] = [None, *pool]
        out_slots = [rng.randint(1, len(pool)) for _ in range(rng.randint(0, 3))]
        outputs = [rng.choice([0, *handles]) for _ in out_slots][: rng.randint(0, len(out_slots))]
        writes = {rng.choice(handles): rng.randint(1, len(pool)) for _ in range(rng.randint(0, 4))}
        pairs = [(h, slots[slot]) for h, slot in zip(outputs, out_slots, strict=False) if h]
        pairs += [(h, slots[slot]) for h, slot in writes.items()]
        one, many = sessions
        errors: list[str] = []
        try:
            one.rebind_all(pairs)
        except GpupoolError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        try:
            assert mod.rebind_run(many, outputs, out_slots, writes, slots) is True
        except GpupoolError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        assert len(errors) in (0, 2) and len(set(errors)) <= 1, (trial, errors)
        assert _state(one) == _state(many), trial
        live = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in many.tensors.values()}
        assert many.used == sum(live.values()) == many.memory.used


def test_rebind_run_zeroes_a_new_storage_as_rebind_all_does(mod: Any) -> None:
    """A run's tensor over a new storage it does not cover (a buffer behind it, an offset view) has the storage's
    other bytes zeroed, those of the run's other tensors over it kept: the same bytes as `rebind_all` leaves."""
    results = []
    for native in (False, True):
        s = _session()
        buf = torch.arange(1.0, 13.0)
        other = torch.arange(1.0, 9.0)
        slots: list[Any] = [None, buf[2:5], buf[8:10], other.view(2, 4), other[1:]]
        outputs, out_slots = [s.handle_base + 5], [1]
        writes = {s.handle_base + 6: 2, s.handle_base + 7: 4}
        if native:
            assert mod.rebind_run(s, outputs, out_slots, writes, slots) is True
        else:
            s.rebind_all([(s.handle_base + 5, slots[1]), (s.handle_base + 6, slots[2]), (s.handle_base + 7, slots[4])])
        results.append((buf.tolist(), other.tolist(), s.used))
    assert results[0] == results[1]
    assert results[1][0] == [0, 0, 3, 4, 5, 0, 0, 0, 9, 10, 0, 0]
    assert results[1][1] == [0, 2, 3, 4, 5, 6, 7, 8]


def test_rebind_run_leaves_what_it_does_not_take_to_python(mod: Any) -> None:
    """A value that is not a tensor, a slot out of range, a table that is not a dict: False, nothing changed (the
    caller runs `rebind_all`, which raises or binds as before)."""
    s = _session()
    s.bind(s.handle_base + 1, torch.ones(3))
    before = _state(s)
    assert mod.rebind_run(s, [s.handle_base + 2], [1], {}, [None, None]) is False
    assert mod.rebind_run(s, [s.handle_base + 2], [5], {}, [None, torch.ones(2)]) is False
    assert mod.rebind_run(s, [], [], {s.handle_base + 1: 1}, [None, 3]) is False
    assert _state(s) == before


def test_quiet_externals_finds_the_tensors_the_last_run_checked_and_nothing_else(mod: Any) -> None:
    """Each handle bound to the very object its weak reference names: the tuple of them, put into their slots. A
    handle freed, bound anew (even to an equal tensor) or whose tensor is gone: None, no slot written."""
    a, b, c = torch.ones(3), torch.zeros(2, 2), torch.arange(4.0)
    tensors = {101: a, 102: b, 103: c}
    handles, slots_of = (101, 102, 103), (4, 2, 6)
    refs = tuple(weakref.ref(t) for t in (a, b, c))
    slots: list[Any] = [None] * 8
    found = mod.quiet_externals(tensors, handles, refs, slots, slots_of)
    assert type(found) is tuple and [id(t) for t in found] == [id(a), id(b), id(c)]
    assert slots[4] is a and slots[2] is b and slots[6] is c
    for change in ("freed", "rebound", "gone"):
        table = dict(tensors)
        rs = refs
        if change == "freed":
            del table[102]
        elif change == "rebound":
            table[102] = b.clone()
        else:
            dead = torch.ones(1)
            rs = (refs[0], weakref.ref(dead), refs[2])
            del dead
        empty: list[Any] = [None] * 8
        assert mod.quiet_externals(table, handles, rs, empty, slots_of) is None, change
        assert empty == [None] * 8, change
    with pytest.raises(IndexError):
        mod.quiet_externals(tensors, handles, refs, [None] * 5, slots_of)


def test_a_captured_run_binds_its_outputs_and_finds_its_persistent_tensors_in_cpp(mod: Any, monkeypatch: Any) -> None:
    """Through the executor: every run after the first binds its output and kept tensor without
    `WorkerSession.rebind_all`, and a quiet run (nothing between runs) finds its persistent tensor without
    Python's look-ups; the results are the graph's, and a persistent handle bound anew to a tensor of other strides
    between two quiet runs (no command between them) is still refused. On c586b76 every run called `rebind_all`."""

    calls = {"rebind_all": 0, "pick": 0}
    real = WorkerSession.rebind_all

    def counted(self: WorkerSession, pairs: Any) -> None:
        calls["rebind_all"] += 1
        real(self, pairs)

    monkeypatch.setattr(WorkerSession, "rebind_all", counted)
    s = _session()
    ex = CommandExecutor(slices.SliceLedger())
    assert ex.native is not None
    w, kept = s.handle_base + 1, s.handle_base + 2
    s.bind(w, torch.arange(12.0).reshape(4, 3))
    body = [
        device_pb2.Op(name="aten::add.Tensor", args=[tensor_pb2.Arg(tensor=1), tensor_pb2.Arg(tensor=2)], outputs=[3]),
        device_pb2.Op(name="aten::mul.Tensor", args=[tensor_pb2.Arg(tensor=3), tensor_pb2.Arg(f=2.0)], outputs=[4]),
    ]
    msg = device_pb2.DefineGraph(
        graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(4, 3))], persistent=[w], ops=body,
        outputs=[4], writes=[device_pb2.GraphWrite(handle=kept, slot=3)],
    )  # fmt: skip
    ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
    assert s.error is None, s.error
    g = ex.graphs._of(s)[1]
    monkeypatch.setattr(g, "pick_externals", lambda d: calls.__setitem__("pick", calls["pick"] + 1) or ())
    for k in range(4):
        run = device_pb2.RunGraph(graph_id=1, inputs=[0], outputs=[s.handle_base + 10 + k])
        run.input_data.append(torch.full((4, 3), float(k)).numpy().tobytes())
        ex.execute(s, device_pb2.Command(run_graph=run), _no_reply)
        assert s.error is None, s.error
        want = torch.arange(12.0).reshape(4, 3) + k
        assert torch.equal(s.tensors[kept], want) and torch.equal(s.tensors[s.handle_base + 10 + k], want * 2)
    assert calls == {"rebind_all": 0, "pick": 0}
    assert g.quiet_refs is not None
    s.bind(w, torch.zeros(3, 4).t())  # same sizes, other strides; no command counted between the runs
    run = device_pb2.RunGraph(graph_id=1, inputs=[0], outputs=[s.handle_base + 20])
    run.input_data.append(torch.ones(4, 3).numpy().tobytes())
    ex.execute(s, device_pb2.Command(run_graph=run), _no_reply)
    assert s.error is not None and "changed shape or dtype" in s.error.message
    assert s.handle_base + 20 not in s.tensors


def _no_reply(item: object) -> None:
    raise AssertionError("graph commands are not answered")


def test_rebind_run_of_a_handle_to_its_own_tensor_counts_what_changed_as_rebind_all_does(mod: Any) -> None:
    """A kept tensor rebound to the very object its handle holds (an in-place step's parameters; round 42: that pair
    is skipped where rebinding changes nothing) after its storage changed under it: grown (its bytes counted anew),
    moved to another storage (`set_`), or shared with another handle; a tensor that does not cover its storage alone
    (its other bytes zeroed), one with an upload in progress (forgotten), one over a storage another pair of the run
    binds too. Each the same tables, bytes (session and device) and tensor values as `rebind_all` leaves.
    (Pins behaviour that held before round 42's same-object path.)"""

    def setup(s: WorkerSession) -> tuple[list[Any], list[int], list[int], dict[int, int]]:
        b = s.handle_base
        grown, moved, shared = torch.ones(4), torch.ones(4), torch.arange(6.0)
        buf = torch.arange(1.0, 9.0)
        partial, up, plain = buf[2:5], torch.ones(3), torch.full((5,), 2.0)
        s.bind(b + 1, grown)
        s.bind(b + 2, moved)
        s.bind(b + 3, shared)
        view = shared[1:3]
        s.bind(b + 4, view)
        s.bind(b + 5, partial)
        s.bind(b + 6, up)
        s.uploads[b + 6] = 4
        s.bind(b + 7, plain)
        grown.resize_(64).fill_(1.0)  # a step's resize_ grew it: 256 bytes now, 16 counted
        buf.fill_(5.0)  # bytes outside `partial`, its storage's only handle: zeroed by its rebinding
        moved.set_(torch.zeros(8))  # another storage
        slots: list[Any] = [None, grown, moved, shared, partial, up, plain, plain[1:3], view]
        outputs, out_slots = [b + 9], [7]  # a new handle over `plain`'s storage, bound first
        writes = {b + 1: 1, b + 2: 2, b + 3: 3, b + 5: 4, b + 6: 5, b + 7: 6}
        return slots, outputs, out_slots, writes

    results = []
    for native in (False, True):
        s = _session()
        slots, outputs, out_slots, writes = setup(s)
        if native:
            assert mod.rebind_run(s, outputs, out_slots, writes, slots) is True
        else:
            pairs = [(h, slots[k]) for h, k in zip(outputs, out_slots, strict=True)]
            s.rebind_all(pairs + [(h, slots[k]) for h, k in writes.items()])
        state = _state(s)
        ids = {id(t): k for k, t in enumerate(slots)}  # the same slot's tensor on each side
        results.append((state[0], state[1], {h: ids[i] for h, i in state[2].items()}, state[3],
                        sorted(state[5].values()), state[6], [t.tolist() for t in slots[1:]],
                        slots[4].untyped_storage().nbytes()))  # fmt: skip
        live = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in s.tensors.values()}
        assert s.used == sum(live.values()) == s.memory.used, native
    assert results[0] == results[1]
    assert results[1][5] == {}  # the upload in progress forgotten


def test_rebind_run_rebinds_a_live_handle_in_place_and_forgets_it_where_that_fails(mod: Any) -> None:
    """Round 51: a real step's kept tensors are new objects each run (its new gradients), and a quiet run's
    `rebind_run` (`in_place`) writes a live handle's entries in `tensors` and `keys` over where they are instead of
    popping and inserting them: the tables keep their order and their key objects (what fails on the base, e23fda42,
    which moved the handles to the ends), the old tensor is let go (no stale binding: its weak reference dies), its
    storage's bytes uncounted and the new one's counted (session and device), a pinned handle's rebinding bumps
    `pins`, an upload in progress is forgotten: the same tables as `rebind_all` leaves. Not in place (the Python's
    `_finish`), the tables' keys are the caller's int objects afterwards, as `rebind_all` leaves them (the later
    runs' look-ups then find them by identity). Where the rebinding fails after the old storage stopped counting the
    handle (here a storage entry that is not [count, bytes]), the handle is taken out of both tables, as
    `rebind_all` leaves it, not left bound to its old tensor."""

    def setup(s: WorkerSession) -> list[weakref.ref[torch.Tensor]]:
        olds = [torch.ones(4), torch.ones(8), torch.ones(2), torch.ones(3)]
        for k, t in enumerate(olds):
            s.bind(s.handle_base + 1 + k, t)
        s.pinned.add(s.handle_base + 2)
        s.uploads[s.handle_base + 3] = 4
        return [weakref.ref(t) for t in olds]

    def state(s: WorkerSession, slots: list[Any]) -> tuple[object, ...]:  # `_state` of each side's own old tensors
        ids = {id(t): k for k, t in enumerate(slots)}
        at = {h: ids.get(id(t), "old") for h, t in s.tensors.items()}
        return (s.used, s.memory.used, at, sorted(s.poisoned), sorted(map(str, s._storages.values())), s.uploads)

    b = _session().handle_base
    new = [torch.zeros(16), torch.zeros(6), torch.zeros(1), torch.zeros(5)]
    slots: list[Any] = [None, *new]
    outputs, out_slots = [b + 9], [3]
    writes = {int(str(b + k)): slot for k, slot in ((1, 1), (2, 2), (3, 4))}  # int objects of their own
    sides = []
    for way in ("python", "native", "in place"):
        s = _session()
        refs = setup(s)
        order, pins, keys = list(s.tensors), s.pins, dict(zip(s.tensors, s.tensors, strict=True))
        if way == "python":
            s.rebind_all([(b + 9, slots[3])] + [(h, slots[k]) for h, k in writes.items()])
        else:
            assert mod.rebind_run(s, outputs, out_slots, writes, slots, in_place=way == "in place") is True
        assert s.pins == pins + 1  # b + 2, pinned: once
        assert [r() is None for r in refs] == [True, True, True, False]  # b + 4's tensor is still bound
        assert s.used == s.memory.used == 4 * (16 + 6 + 5 + 3 + 1)
        assert s.uploads == {}
        sides.append(state(s, slots))
        own = {h: h for h in writes}  # the key objects the tables hold: the caller's, or those they held
        for table in (s.tensors, s._keys):
            assert [next(k for k in table if k == h) is (keys if way == "in place" else own)[h] for h in writes] == [
                True
            ] * 3, way
        if way == "in place":
            assert list(s.tensors) == list(s._keys) == [*order, b + 9]
        else:
            assert list(s.tensors) == list(s._keys) == [b + 4, b + 9, *writes]
    assert sides[0] == sides[1] == sides[2]

    failed = []
    for native in (False, True):
        s = _session()
        refs = setup(s)
        shared = s.tensors[b + 4]
        s._storages[shared.untyped_storage()._cdata][0] = "x"
        pairs = [(b + 1, slots[1]), (b + 2, shared[1:])]  # b + 2's new tensor over that storage: its count raises
        with pytest.raises(TypeError):
            if native:
                writes = {h: k for k, (h, _) in enumerate(pairs)}
                mod.rebind_run(s, [], [], writes, [v for _, v in pairs], in_place=True)
            else:
                s.rebind_all(pairs)
        assert b + 2 not in s.tensors and b + 2 not in s._keys and refs[1]() is None  # forgotten, not left stale
        assert s.tensors[b + 1] is slots[1] and s.pins == 1
        failed.append(state(s, [v for _, v in pairs]))
    assert failed[0] == failed[1]
