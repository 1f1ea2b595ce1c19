"""Hostile records against learned runs (server/runs.py) and the ops around them, in-process: what a session's
worker holds must stay what its session accounts, and no session reads bytes another one freed (both sessions
here share one process, as with `--isolation thread`). Found by tests/integration/test_daemon_learned_fuzz.py's
review of the learned-run code. Each test runs with the native runner (server/native_runner.py) on and off."""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import pytest
import torch
from gpupool.server import slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession
from test_server_runs import _clock, use_runner

from gpupool import compact
from gpupool._proto import device_pb2

T, V = compact.tensor, compact.encode_value


_WORKERS: list[Worker] = []


@pytest.fixture(params=["native", "python"], autouse=True)
def runner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """With the native runner on, then with it off."""
    use_runner(request.param, monkeypatch)
    _WORKERS.clear()
    yield request.param
    states = [st for w in _WORKERS for st in w.ex._eager.values()]
    _WORKERS.clear()
    native = sum(st[3].native for st in states)
    print(f"native runner: {native} of {sum(st[3].hits for st in states)} learned records")
    if request.param == "python":
        assert native == 0


class Worker:
    """One executor and its sessions in one process; records by op name (ids defined on first use)."""

    def __init__(self) -> None:
        _WORKERS.append(self)
        self.ex = CommandExecutor(slices.SliceLedger())
        self.dev = FakeDevice(0, "h", 1 << 34)
        self.memory = DeviceMemory(self.dev)
        self.ids: dict[tuple[int, str], int] = {}

    def session(self, number: int, quota: int) -> WorkerSession:
        return WorkerSession(f"s{number}", number, self.dev, self.memory, quota)

    def rec(self, s: WorkerSession, name: str, outs: list[int], args: list[bytes], kw: dict[str, bytes] | None = None):
        key = (s.number, name)
        new = key not in self.ids
        op_id = self.ids.setdefault(key, len(self.ids) + 1)
        parts = [compact.head(op_id, name if new else None, outs), compact.U8.pack(len(args)), *args]
        parts.append(compact.U8.pack(len(kw or {})))
        for k, v in (kw or {}).items():
            parts += [compact.kwarg_key(k), v]
        return device_pb2.Command(eager_op=b"".join(parts))

    def slice(self, s: WorkerSession, cmds: list[device_pb2.Command], progress: Any = None) -> slices.SliceResult:
        payload = device_pb2.ClientFrame(commands=cmds).SerializeToString()
        req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, payload)
        return slices.run_commands(s, self.ex.execute, self.ex.ledger, req, _clock, progress)


def test_a_learned_run_keeps_no_tensor_whose_handle_a_later_record_rebound() -> None:
    """A run kept (strongly) every output a later step takes until the run ended: records that rebind such a
    handle after its last use (legal: the learned run did the same) unbind it from the session's accounting while
    the run kept it alive. 50 steps of 4 MiB each under a 12 MiB quota held 184 MiB at once; a run of
    thousands of steps could hold thousands of quotas of device memory the daemon never saw, the neighbours'."""
    w = Worker()
    n = 1 << 20  # float32: 4 MiB a tensor
    s = w.session(3, 3 * 4 * n)
    big, small = s.handle_base + 1, s.handle_base + 2

    def pairs() -> list[device_pb2.Command]:  # (the first slice's first records define the op ids)
        return [
            c
            for _ in range(50)
            for c in (w.rec(s, "aten::ones", [big], [V([n])]), w.rec(s, "aten::sum", [small], [T(big)]))
        ]

    seen: dict[int, weakref.ref[torch.Tensor]] = {}
    peak = [0]

    def live(i: int) -> None:  # before each command: the bytes of every tensor the session ever held still alive
        for t in s.tensors.values():
            seen.setdefault(id(t), weakref.ref(t))
        storages = {}
        for ref in list(seen.values()):
            t = ref()
            if t is not None:
                storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        peak[0] = max(peak[0], sum(storages.values()))

    for k in range(3):  # learned in the first slice, run inside the learned run in the next ones
        peak[0] = 0
        res = w.slice(s, pairs(), live)
        assert res.executed == 100 and not res.errors
        assert peak[0] <= s.quota, f"slice {k}: {peak[0] >> 20} MiB alive for a {s.quota >> 20} MiB quota"
    assert w.ex._eager[s.session_id][3].hits >= 2 * 100 - 2  # the runs really ran


def test_resize_never_hands_out_bytes_another_session_freed() -> None:
    """The functional `resize`/`resize_as` and `resize.out` (a clone of `self`, resized) returned the allocator's
    old bytes past `self`'s: a neighbour's freed values (`empty` and `resize_` were zeroed, these were not)."""
    w = Worker()
    victim, bad = w.session(2, 1 << 30), w.session(3, 1 << 30)
    n = 65536
    a, out, tmpl, got = (bad.handle_base + i for i in range(1, 5))
    cases = [
        ("aten::resize.default", [got], [T(a), V([n])], {}),
        ("aten::resize_as.default", [got], [T(a), T(tmpl)], {}),
        ("aten::resize.out", [out], [T(a), V([n])], {"out": T(out)}),
    ]
    for name, outs, args, kw in cases:
        for _ in range(4):  # the victim's secret, freed: the allocator hands its bytes out again
            secret = torch.full((4 * n,), 7.25)
            victim.bind(victim.handle_base + 1, secret)
            victim.free([victim.handle_base + 1])
            del secret
        bad.bind(a, torch.arange(4.0))
        bad.bind(out, torch.ones(4))
        bad.bind(tmpl, torch.ones(n))
        res = w.slice(bad, [w.rec(bad, name, outs, args, kw)])
        assert not res.errors and bad.error is None, (name, bad.error)
        t = bad.tensors[outs[0]]
        assert t.shape == (n,), name
        assert torch.equal(t[:4], torch.arange(4.0)), name  # what resize keeps of `self`
        assert not (t == 7.25).any(), f"{name}: {int((t == 7.25).sum())} of another session's values read"
        assert torch.equal(t[4:], torch.zeros(n - 4)), name
        bad.free([a, out, tmpl, got])


def test_the_learned_and_the_plain_path_agree_on_a_rebinding_run() -> None:
    """The same rebinding records, learned or not: the same values, errors and accounting (the fix frees the
    rebound outputs; it must not change what a run computes)."""
    from test_server_runs import BASE, Pair

    p = Pair(quota=1 << 16)
    a, b = BASE + 70, BASE + 71
    cmds = [
        c
        for k in range(40)
        for c in (
            p.rec(10, [a], [T(BASE + 1), V(float(k % 3))]),  # add.Scalar: a fresh `a`, rebinding the last one
            p.rec(6, [b], [T(a)]),
            p.rec(5, [a], [T(a), T(b)]),  # rebinds `a` with a function of itself
        )
    ]
    p.stream(cmds, itertools.cycle([64, 7, 30]))
    p.stream(cmds, itertools.cycle([64]))
    assert p.hits > len(cmds) // 2


def test_a_meta_kernel_that_asserts_is_an_invalid_argument() -> None:
    """torch's Python meta kernels refuse some bad arguments with AssertionError (`nll_loss_forward` with a 2-D
    target): it reached the client as INTERNAL, with a traceback in the daemon's log per record."""
    w = Worker()
    s = w.session(3, 1 << 30)
    x, target, out = s.handle_base + 1, s.handle_base + 2, s.handle_base + 3
    s.bind(x, torch.randn(4, 2))
    s.bind(target, torch.zeros(2, 2, dtype=torch.long))
    rec = w.rec(s, "aten::nll_loss_forward", [out, out + 1], [T(x), T(target), V(None), V(1), V(-100)])
    res = w.slice(s, [rec])
    assert s.error is not None and s.error.code.name == "INVALID_ARGUMENT", s.error
    assert "multi-target" in s.error.message and res.errors


def _secrets(victim: Any, n: int) -> None:
    """The victim's secret (7.25s), freed four times over so the allocator hands its bytes out again, and a live one
    under its handle 2."""
    for _ in range(4):
        secret = torch.full((4 * n,), 7.25)
        victim.bind(victim.handle_base + 1, secret)
        victim.free([victim.handle_base + 1])
        del secret
    victim.bind(victim.handle_base + 2, torch.full((n,), 7.25))


def test_view_arguments_never_reach_past_their_storage_into_a_neighbours_bytes() -> None:
    """View arguments (compact.VIEW) whose geometry reaches past the storage of the session's tensor, learned in a
    run on a big tensor and replayed on a small one with the same meta's storage, a freed handle, another
    session's handle: each is refused, and no value the victim freed is ever read or written."""
    w = Worker()
    victim, bad = w.session(2, 1 << 30), w.session(3, 1 << 30)
    n = 4096
    src, dst = bad.handle_base + 1, bad.handle_base + 2
    _secrets(victim, n)

    def steps(k: int) -> list[device_pb2.Command]:
        return [
            c
            for i in range(k)
            for c in (
                w.rec(bad, "aten::clone", [dst + i], [compact.view(src, [n], [1], n)]),  # the storage's second half
                w.rec(bad, "aten::mul_.Scalar", [0], [compact.view(src, [n], [1], n), V(1.0)]),
                w.rec(bad, "aten::neg", [dst + 100 + i], [T(dst + i)]),
            )
        ]

    # meta (n,), storage of 2n whose second half the session wrote (zero=False: as a view of its own upload; `bind`
    # zeroes a new storage outside the tensor since round 35)
    bad.bind(src, torch.ones(2 * n)[:n], zero=False)
    for _ in range(2):  # learned in the first slice, run inside the learned run in the next
        res = w.slice(bad, steps(4))
        assert not res.errors and torch.equal(bad.tensors[dst], torch.ones(n))
        bad.free([dst + i for i in range(4)] + [dst + 100 + i for i in range(4)])
    assert w.ex._eager[bad.session_id][3].hits > 0
    bad.bind(src, torch.ones(n))  # the same meta on a storage of n: the learned geometry reaches past it
    res = w.slice(bad, steps(2))
    assert sum(res.errors.values()) == 6 and dst in bad.poisoned
    assert "view argument reaches storage byte" in bad.poisoned[dst].message
    for h in (victim.handle_base + 2, victim.handle_base + 1, bad.handle_base + 99):  # foreign, freed foreign, unknown
        res = w.slice(bad, [w.rec(bad, "aten::clone", [dst], [compact.view(h, [1], [1], 0)])])
        assert sum(res.errors.values()) == 1
    for t in bad.tensors.values():
        assert not (t == 7.25).any()
    assert torch.equal(victim.tensors[victim.handle_base + 2], torch.full((n,), 7.25))


def test_an_empty_view_far_past_its_storage_grows_nothing_unaccounted() -> None:
    """An empty view may sit at any offset (it reaches no byte, as torch's own check has it); `resize_` through it
    grows the viewed tensor's storage up to that offset, which the quota and the accounting must see."""
    w = Worker()
    s = w.session(3, 1 << 20)
    src = s.handle_base + 1
    s.bind(src, torch.ones(4))
    for offset, n, ok in ((2**40, 10, False), (2**62, 1, False), (100, 10, True)):
        res = w.slice(s, [w.rec(s, "aten::resize_", [], [compact.view(src, [0], [1], offset), V([n])])])
        assert (not res.errors) == ok, (offset, s.error)
        s.error = None
    assert s.tensors[src].untyped_storage().nbytes() == 440 and s.used == 440
    assert torch.equal(s.tensors[src], torch.ones(4))


def test_views_inside_tensor_lists_never_reach_past_their_storage_into_a_neighbours_bytes() -> None:
    """Tensor lists with views (compact.VIEWS), learned in a run on a big storage and replayed on a small one with
    the same meta, with a freed, another session's or an unknown handle as an element, or an element kind
    changed: each is refused (where the full decode would refuse it), and no value the victim freed is ever read
    or written. The in-place `_foreach_` op writes through its view elements into their tensor's storage."""
    w = Worker()
    victim, bad = w.session(2, 1 << 30), w.session(3, 1 << 30)
    n = 4096
    src, other, dst = bad.handle_base + 1, bad.handle_base + 40, bad.handle_base + 2
    _secrets(victim, n)

    def views(h: int = src, first: bytes | None = None) -> bytes:
        second = compact.view(h, [n // 2], [1], n + n // 2)
        return compact.tensors_with_views([first or compact.view(h, [n // 2], [1], n), T(other), second])

    def steps(k: int, lst: bytes | None = None) -> list[device_pb2.Command]:
        return [
            c
            for i in range(k)
            for c in (
                w.rec(bad, "aten::cat", [dst + i], [lst or views()]),  # the storage's second half, in two
                w.rec(bad, "aten::_foreach_mul_.Scalar", [], [lst or views(), V(1.0)]),
                w.rec(bad, "aten::neg", [dst + 100 + i], [T(dst + i)]),
            )
        ]

    # meta (n,), storage of 2n whose second half the session wrote (zero=False: as a view of its own upload; `bind`
    # zeroes a new storage outside the tensor since round 35)
    bad.bind(src, torch.ones(2 * n)[:n], zero=False)
    bad.bind(other, torch.ones(3))
    for _ in range(2):  # learned in the first slice, run inside the learned run in the next
        res = w.slice(bad, steps(4))
        assert not res.errors, bad.error
        assert torch.equal(bad.tensors[dst], torch.ones(n + 3))
        bad.free([dst + i for i in range(4)] + [dst + 100 + i for i in range(4)])
    assert w.ex._eager[bad.session_id][3].hits > 0
    res = w.slice(bad, [w.rec(bad, "aten::_foreach_mul_.Scalar", [], [views(), V(3.0)])])
    assert not res.errors  # written in place through the list's views: the storage's second half only
    storage = torch.tensor([], dtype=torch.float32).set_(bad.tensors[src].untyped_storage())
    assert torch.equal(storage, torch.cat([torch.ones(n), torch.full((n,), 3.0)]))
    bad.bind(src, torch.ones(n))  # the same meta on a storage of n: the learned geometry reaches past it
    res = w.slice(bad, steps(2))
    assert sum(res.errors.values()) == 6 and dst in bad.poisoned
    assert "view argument reaches storage byte" in bad.poisoned[dst].message
    bad.free([dst, dst + 1, dst + 100, dst + 101])
    freed = bad.handle_base + 50
    bad.bind(freed, torch.ones(n))
    bad.free([freed])
    # foreign, freed foreign, unknown, freed: as an element of a learned layout (a template's field) and as the view
    for h, code in ((victim.handle_base + 2, "PERMISSION_DENIED"), (victim.handle_base + 1, "PERMISSION_DENIED"),
                    (bad.handle_base + 99, "NOT_FOUND"), (freed, "NOT_FOUND")):  # fmt: skip
        for lst in (views(h), views(src, first=T(h))):
            bad.bind(src, torch.ones(2 * n)[:n])
            res = w.slice(bad, steps(1, lst))
            assert sum(res.errors.values()) == 3, (h, lst)
            assert bad.poisoned[dst].code.name == code, bad.poisoned[dst]
            bad.free([dst, dst + 100])
    for t in bad.tensors.values():
        assert not (t == 7.25).any()
    assert torch.equal(victim.tensors[victim.handle_base + 2], torch.full((n,), 7.25))


def test_a_learned_run_never_writes_through_an_overlapping_tensor(runner: str) -> None:
    """A written argument that overlaps itself is refused as part of an op's verdict (server/guards.py
    `check_written`), and learned runs (in C++ or Python) run only steps whose verdict was cached, checking their
    external inputs' strides per record: a record of a learned step whose written tensor is an overlapping view goes
    to the normal path and is refused there. Two ops: one round 32 took off the allowlist (its CPU kernel writes the
    whole result from grad_input's data pointer; on a scratch list of this executor: on d93cf13 it wrote 16 floats
    over the storage of the one element it was given), whose out= step the Python path runs (the native runner
    leaves steps that may change metas to it), and `add_`, whose step the native runner runs, on a view whose
    strides alias without a stride 0 (torch's own check lets that through)."""
    from gpupool.server.ops import OpTable, load_allowlist

    w = Worker()
    w.ex.ops = OpTable(load_allowlist() | {"aten::replication_pad2d_backward.grad_input"})
    s = w.session(3, 1 << 30)
    g, x, out, base, view, aliasing = (s.handle_base + i for i in range(1, 7))
    fresh = itertools.count(s.handle_base + 100)  # a new handle per output: a rebound one ends a run
    s.bind(g, torch.ones(1, 1, 6, 6))
    s.bind(x, torch.ones(1, 1, 4, 4))
    s.bind(out, torch.zeros(1, 1, 4, 4))
    s.bind(base, torch.zeros(4096))
    s.bind(view, s.tensors[base].as_strided([1, 1, 4, 4], [0, 0, 0, 0]))
    s.bind(aliasing, s.tensors[base].as_strided([1, 1, 4, 4], [0, 0, 1, 1]))

    def step(into: int, acc: int) -> list[device_pb2.Command]:
        tmp = next(fresh)
        return [
            w.rec(s, "aten::clone", [tmp], [T(g)]),
            w.rec(s, "aten::replication_pad2d_backward.grad_input", [], [T(tmp), T(x), V([1, 1, 1, 1])],
                  {"grad_input": T(into)}),
            w.rec(s, "aten::add_.Tensor", [next(fresh)], [T(acc), T(x)]),
        ]  # fmt: skip

    for _ in range(3):
        res = w.slice(s, [c for _ in range(20) for c in step(out, x)])
        assert not res.errors and s.error is None, s.error
    want = torch.ops.aten.replication_pad2d_backward(torch.ones(1, 1, 6, 6), torch.ones(1, 1, 4, 4), [1, 1, 1, 1])
    assert torch.equal(s.tensors[out], want)
    known = w.ex._eager[s.session_id][3]
    assert known.hits >= 100 and (known.native >= 40 or runner == "python")  # the runs really ran
    for bad in (step(view, x), step(out, aliasing)):
        s.error = None
        res = w.slice(s, step(out, x) + bad + step(out, x))
        assert res.errors and s.error is not None and s.error.code.name == "INVALID_ARGUMENT"
        assert "refer to a single memory location" in s.error.message, s.error.message
        assert torch.equal(s.tensors[base], torch.zeros(4096))
