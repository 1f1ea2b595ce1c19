"""Random ops (`OpPlan.seeded`: dropout, rand_like, ...) inside learned runs in the native runner
(server/native_runner.cpp): in a session's own worker process (`exclusive_rng`) the runner makes
`CommandExecutor._seeded`'s check (the device's generator holds this session's stream, under its lock) and runs the op
(or a fake GPU's faster composition of it, server/fallbacks.py FASTER) in C++; where it does not hold it (a new seed,
another session drew last) and where sessions share the process, the record takes the Python path. The same seed must
give the same draws in the same order with the runner on and off: every tensor bit-exact, and the generator's stream
afterwards the same.

Each stream runs on an executor with the runner and on one with `native = None` (the Python path), one after the
other, each with its own session seeded alike: the second's first random op finds the generator another session's
and loads its own state, as a worker that served the first would."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.server import slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession
from support import native_runner_or_skip

from gpupool import compact
from gpupool._proto import device_pb2

NUMBER = 5
BASE = NUMBER << 32
X = BASE + 1
OPS = {
    1: "aten::mul.Scalar",
    2: "aten::native_dropout",  # seeded; a fake GPU runs its FASTER composition (a Python function)
    3: "aten::rand_like",  # seeded; the op itself
    4: "aten::add.Tensor",
    5: "aten::native_dropout_backward",
    6: "aten::native_dropout",  # of a view argument (as attention's dropout)
    7: "aten::bernoulli.p",  # seeded; the op itself
    8: "aten::_scaled_dot_product_fused_attention_overrideable",  # seeded; a composition (server/attention.py)
    9: "aten::_scaled_dot_product_fused_attention_overrideable_backward",
}
T, V = compact.tensor, compact.encode_value


@pytest.fixture(autouse=True)
def runner() -> Iterator[None]:
    native_runner_or_skip()
    yield


def h(step: int, j: int) -> int:
    return BASE + 1000 + 100 * step + j


class Run:
    """One executor and session; `native`: with the runner, else its Python path only."""

    def __init__(self, native: bool, exclusive: bool = True) -> None:
        self.ex = CommandExecutor(slices.SliceLedger())
        if not native:
            self.ex.native = None
        self.ex.exclusive_rng = exclusive
        dev = FakeDevice(0, "seeded", 1 << 30)
        self.s = WorkerSession("t", NUMBER, dev, DeviceMemory(dev), 1 << 26)
        self.s.bind(X, torch.arange(96, dtype=torch.float32).view(4, 24) / 7)
        self.defined: set[int] = set()
        self.python_draws = 0  # seeded records the Python path ran (`_seeded`)
        self.native = 0
        seeded = self.ex._seeded

        def counted(*a: Any) -> Any:
            self.python_draws += 1
            return seeded(*a)

        self.ex._seeded = counted  # type: ignore[method-assign]

    def rec(self, op_id: int, outputs: list[int], args: list[bytes]) -> device_pb2.Command:
        name = None
        if op_id not in self.defined:
            self.defined.add(op_id)
            name = OPS[op_id]
        parts = [compact.head(op_id, name, outputs), compact.U8.pack(len(args)), *args, compact.U8.pack(0)]
        return device_pb2.Command(eager_op=b"".join(parts))

    def step(self, t: int) -> list[device_pb2.Command]:
        """A step with four random ops: dropout (its mask kept for the backward), rand_like, bernoulli, dropout
        of a view."""
        return [
            self.rec(1, [h(t, 0)], [T(X), V(1.0 + t)]),
            self.rec(2, [h(t, 1), h(t, 2)], [T(h(t, 0)), V(0.5), V(True)]),
            self.rec(3, [h(t, 3)], [T(h(t, 1))]),
            self.rec(4, [h(t, 4)], [T(h(t, 1)), T(h(t, 3))]),
            self.rec(7, [h(t, 5)], [T(h(t, 3)), V(0.25)]),
            self.rec(5, [h(t, 6)], [T(h(t, 4)), T(h(t, 2)), V(2.0)]),
            self.rec(6, [h(t, 7), h(t, 8)], [compact.view(h(t, 4), [24, 4], [1, 24], 0), V(0.25), V(True)]),
        ]

    def free(self, t: int) -> device_pb2.Command:
        return device_pb2.Command(free=device_pb2.Free(handles=[h(t, j) for j in range(9)]))

    def seed(self, seed: int) -> device_pb2.Command:
        return device_pb2.Command(seed=device_pb2.Seed(seed=seed))

    def stream(self, cmds: list[device_pb2.Command], cuts: Iterator[int], between: Any = None) -> list[Any]:
        """Run `cmds` in slices of the sizes `cuts` gives; after each, what a client can observe."""
        seen = []
        i = 0
        while i < len(cmds):
            n = next(cuts)
            payload = device_pb2.ClientFrame(commands=cmds[i : i + n]).SerializeToString()
            req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, payload)
            res = slices.run_commands(self.s, self.ex.execute, self.ex.ledger, req, _Clock)
            err, self.s.error = self.s.error, None
            seen.append((res.executed, res.errors, None if err is None else (err.code, err.message)))
            if between is not None:
                between()
            i += n
        return seen

    def state(self) -> Any:
        s = self.s
        tensors = {k: (t.dtype, t.shape, t.stride(), t.storage_offset(), t.clone()) for k, t in s.tensors.items()}
        return tensors, (s.used, s.ops, s.memory.used), sorted(s.poisoned)

    def close(self) -> None:
        self.native = self.ex._eager["t"][3].native  # records the runner ran
        self.s.release_all()
        self.ex.forget(self.s)


class _Clock:
    def __enter__(self) -> list[float]:
        return [0.0]

    def __exit__(self, *a: Any) -> None:
        pass


def training(r: Run, steps: int, seed_at: int | None = None) -> list[device_pb2.Command]:
    cmds = [r.seed(7)]
    for t in range(steps):
        if t == seed_at:
            cmds.append(r.seed(7))  # the stream starts again (the runner's generator check must see it)
        cmds += r.step(t)
        if t:
            cmds.insert(len(cmds) - 3, r.free(t - 1))
    return cmds


def same(a: Any, b: Any) -> None:
    (ta, ca, pa), (tb, cb, pb) = a, b
    assert ta.keys() == tb.keys()
    for k, u in ta.items():
        v = tb[k]
        assert u[:4] == v[:4], hex(k)
        assert torch.equal(u[4], v[4]), hex(k)  # bit-exact: the same draws in the same order
    assert (ca, pa) == (cb, pb)


def both(steps: int, cuts: list[int], exclusive: bool = True, **kw: Any) -> tuple[Run, Run]:
    """The stream with the runner, then on the Python path; each followed by draws from the generator."""
    runs = []
    seen = []
    for native in (True, False):
        r = Run(native, exclusive)
        between = (lambda: torch.rand(3)) if not exclusive else None  # the process's own draws move no stream
        seen.append((r.stream(training(r, steps, **kw), itertools.cycle(cuts), between), r.state()))
        # the session's stream afterwards: one more random op of its own, then the generator itself
        r.stream([r.rec(3, [h(99, 0)], [T(X)])], itertools.cycle([1]))
        seen[-1] += (r.s.tensors[h(99, 0)].clone(), torch.rand(5) if exclusive else None)
        runs.append(r)
        r.close()
    (slices_n, state_n, after_n, gen_n), (slices_p, state_p, after_p, gen_p) = seen
    assert slices_n == slices_p
    same(state_n, state_p)
    assert torch.equal(after_n, after_p)
    if exclusive:
        assert torch.equal(gen_n, gen_p)
    return runs[0], runs[1]


def test_random_ops_run_natively_with_the_same_draws_as_the_python_path() -> None:
    n, p = both(12, [9, 64, 23])
    # the Python path draws once per random record (4 a step, and the one after); with the runner, Python draws in
    # the 3 steps that learn the runs, and where a drifting cut starts a run again, but not in the 9 steps after
    assert p.python_draws == 12 * 4 + 1
    assert n.python_draws <= 3 * 4 + 4, n.python_draws
    assert n.native > 12 * 7 // 2


def test_a_new_seed_inside_the_stream_restarts_it_with_the_runner_on() -> None:
    n, p = both(10, [64], seed_at=6)
    assert n.python_draws < p.python_draws // 2


def test_sessions_sharing_the_process_draw_on_the_python_path() -> None:
    """`--isolation thread`: each random op swaps the session's state in (Python's); the runner runs the rest."""
    n, p = both(8, [64, 5], exclusive=False)
    assert n.python_draws == p.python_draws == 8 * 4 + 1
    assert n.native > 0


def test_a_generator_lock_held_elsewhere_leaves_the_record_to_the_python_path() -> None:
    """The runner takes the device's generator lock without waiting: held by another thread, the record goes to
    the Python path, which waits for it as before."""
    import threading

    r = Run(True)
    cmds = training(r, 6)
    r.stream(cmds, itertools.cycle([64]))
    before = r.python_draws
    lock = r.s.device.rng_lock
    release = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(5)

    th = threading.Thread(target=hold)
    th.start()
    held.wait(5)
    timer = threading.Timer(0.2, release.set)
    timer.start()
    try:
        r.stream(r.step(6), itertools.cycle([64]))
    finally:
        release.set()
        th.join()
        timer.join()
    assert r.python_draws > before  # the first random record waited on the Python path
    assert r.s.error is None and h(6, 8) in r.s.tensors
    r.close()


def test_two_worker_sessions_taking_turns_each_reload_their_stream_as_the_python_path() -> None:
    """Two sessions whose slices take turns on one generator (as the runner fuzzer's executors do): the first random
    record of each slice finds the other session's stream there, and must take the Python path (which loads the
    session's own state) rather than draw on from the other's."""
    got = []
    for native in (True, False):
        pair = [Run(native), Run(native)]
        cmds = [training(r, 16) for r in pair]
        for r in pair:
            cmds[pair.index(r)][0] = r.seed(7 + pair.index(r))
        at = [0, 0]
        cuts = itertools.cycle([9, 17, 40])  # many turns after the runs were learned
        while at[0] < len(cmds[0]) or at[1] < len(cmds[1]):
            for k, r in enumerate(pair):
                n = next(cuts)
                r.stream(cmds[k][at[k] : at[k] + n], itertools.cycle([n]))
                at[k] += n
        got.append([r.state() for r in pair])
        for r in pair:
            r.close()
        if native:
            assert all(r.native > 0 for r in pair)
    for a, b in zip(got[0], got[1], strict=True):
        same(a, b)


AQ, AK, AV, META_SEED = BASE + 11, BASE + 12, BASE + 13, BASE + 14


def attention_step(r: Run, t: int, seed: int = 0) -> list[device_pb2.Command]:
    """The fused attention with dropout, as the clients send it: its forward (a seeded op whose composition is Python,
    server/attention.py) and its backward, whose guard compares its philox_seed's device with the query's (`seed`:
    another tensor than the forward's there)."""
    qkv = [T(AQ), T(AK), T(AV), V(None)]
    mask = V([True, True, True, False])
    grads = [T(h(t, 4)), *qkv, mask, T(h(t, 0)), T(h(t, 1)), V(None), V(None), V(4), V(4), V(0.25), V(False)]
    return [
        r.rec(8, [h(t, 0), h(t, 1), 0, 0, 0, 0, h(t, 2), h(t, 3)], [*qkv, V(0.25), V(False)]),
        r.rec(4, [h(t, 4)], [T(h(t, 0)), T(h(t, 0))]),
        r.rec(9, [h(t, 5), h(t, 6), h(t, 7)], [*grads, T(seed or h(t, 2)), T(h(t, 3))]),
        r.rec(4, [h(t, 8)], [T(h(t, 5)), T(h(t, 6))]),
    ]


def test_the_fused_attention_with_dropout_runs_natively_with_the_same_draws_and_errors() -> None:
    """The attention forward (seeded, its composition called from C++ as `_run_step` calls it, its tuple of tensors,
    None and ints bound as `_bind_outputs` binds it) and its backward (its guard's device comparison made in C++) run
    in learned runs with the Python path's bits; a philox_seed on another device (a meta tensor of the seed's meta)
    leaves the run and fails with the Python path's error."""
    seen = []
    runs = []
    for native in (True, False):
        r = Run(native)
        torch.manual_seed(3)
        for handle in (AQ, AK, AV):
            r.s.bind(handle, torch.randn(2, 2, 4, 8))
        r.s.bind(META_SEED, torch.zeros((), dtype=torch.long, device="meta"))
        cmds = [r.seed(7)]
        for t in range(10):
            cmds += attention_step(r, t) + ([r.free(t - 1)] if t else [])
        cmds += attention_step(r, 10, seed=META_SEED) + [r.free(9)] + attention_step(r, 11) + [r.free(10)]
        got = r.stream(cmds, itertools.cycle([64, 9]))
        r.s.free([META_SEED])  # (no values to compare)
        seen.append((got, r.state()))
        runs.append(r)
        r.close()
    (slices_n, state_n), (slices_p, state_p) = seen
    assert slices_n == slices_p
    same(state_n, state_p)
    errors = [e for _, _, e in slices_p if e is not None]
    assert errors and all("philox_seed must be the forward's" in e[1] for e in errors), errors
    n, p = runs
    assert p.python_draws == 12 and n.python_draws < 6, (n.python_draws, p.python_draws)
    assert n.native > 12 * 2, n.native  # more than the steps' adds: attention records ran in C++
