"""The steady path of an eager op in C (client/torch/native_ops.cpp) against the Python dispatcher it stands in for,
on a real daemon: the same records (bytes), the same meta-cache keys (a warm op runs in C: it found the entry the
Python path made), the same results and wrappers, the same training run bit for bit; and every case it leaves to
the Python dispatcher does go there (`stats`), with the Python path's results and errors."""

from __future__ import annotations

import gc
import os
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from gpupool.client.torch import meta, native_ops, runtime
from gpupool.client.torch.tensor import RemoteTensor, RemoteView
from support import communicate
from torch import nn

import gpupool.torch as gt

aten = torch.ops.aten


@pytest.fixture
def on() -> Iterator[None]:
    """The C path in place (as `import gpupool.torch` leaves it), also after a test that switched it off."""
    assert native_ops.use(True), "the native op path did not build (a C++ compiler and Python.h are needed)"
    yield
    native_ops.use(True)


def stats() -> tuple[int, int]:
    module = native_ops.load()
    assert module is not None
    ran, passed = module.stats()
    return int(ran), int(passed)


class Records:
    """The compact records a runtime's session is sent (its `eager_op`, wrapped on the instance: each still goes out),
    as (op id bytes, the rest)."""

    def __init__(self, rt: Any) -> None:
        self.session = rt.session
        self.sent: list[tuple[bytes, bytes]] = []
        real = rt.session.eager_op

        def eager_op(record: bytes) -> None:
            self.sent.append((record[:5], record[5:]))  # compact.HEAD of a defined op id: 5 bytes, no name
            real(record)

        self.session.eager_op = eager_op

    def close(self) -> None:
        del self.session.eager_op


def split(body: bytes) -> tuple[list[int], bytes]:
    """A record body's output handles and the rest (its arguments)."""
    n = body[0]
    return list(struct.unpack(f"<{n}Q", body[1 : 1 + 8 * n])), body[1 + 8 * n :]


def out_handles(result: Any, args: tuple[Any, ...]) -> list[int]:
    """A record's output handles for this result: 0 for an output that is an argument (in-place) or None."""
    flat = list(result) if isinstance(result, list | tuple) else [result]
    return [x._gp_h if isinstance(x, RemoteTensor) and all(x is not a for a in args) else 0 for x in flat]


def described(x: Any) -> Any:
    if isinstance(x, list | tuple):
        return type(x).__name__, [described(v) for v in x]
    if isinstance(x, torch.Tensor):
        assert type(x) in (RemoteTensor, RemoteView)
        d = x.__dict__
        shape = (tuple(x.shape), x.stride(), x.storage_offset(), x.dtype, x.requires_grad, x.device)
        return type(x).__name__, shape, d["_gp_key"], d["_gp_rt"], d.get("_gp_v")
    return x


def local(x: Any) -> Any:
    if isinstance(x, list | tuple):
        return [local(v) for v in x]
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def tensors(dev: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)

    def new(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dev)

    t = {"a": new(4, 8), "b": new(8, 3), "c": new(3), "ts": [new(4, 4) for _ in range(3)]}
    t["stats"] = [x.to(dev) for x in aten.native_layer_norm.default(t["a"].cpu(), [8], None, None, 1e-5)[1:]]
    return t


# (name, op, arguments from `tensors`): each form of argument and result the C path takes
OPS: dict[str, tuple[Any, Callable[[dict[str, Any]], tuple[Any, ...]]]] = {
    "one output": (aten.relu.default, lambda t: (t["a"],)),
    "three tensors": (aten.addmm.default, lambda t: (t["c"], t["a"], t["b"])),
    "int list and bool": (aten.sum.dim_IntList, lambda t: (t["a"], [0], True)),
    "Scalar keyed by type": (aten.mul.Scalar, lambda t: (t["a"], 2.5)),
    "a float for a Tensor": (aten.add.Tensor, lambda t: (t["a"], 1.5)),
    "None Scalars": (aten.clamp.default, lambda t: (t["a"], None, 0.5)),
    "an int dim": (aten._softmax.default, lambda t: (t["a"], 1, False)),
    "a flat tuple": (aten.max.dim, lambda t: (t["a"], 1)),
    "a flat list from a tensor list": (aten._foreach_sqrt.default, lambda t: (t["ts"],)),
    "in place, nothing returned": (aten._foreach_add_.Scalar, lambda t: (t["ts"], 1.0)),
    "in place, the argument returned": (aten.add_.Tensor, lambda t: (t["ts"][0], t["a"][:, :4].contiguous())),
    "a Scalar list": (aten._foreach_mul.ScalarList, lambda t: (t["ts"], [2.0, 3, 0.5])),
    "an int Scalar list": (aten._foreach_mul.ScalarList, lambda t: (t["ts"], [2, 3, -1])),
    "a lazy view": (aten.mm.default, lambda t: (t["a"], t["a"].t())),
    "a tensor list with a lazy view": (aten._foreach_abs.default, lambda t: ([t["ts"][0], t["ts"][1].t()],)),
    # transfer.SPECIAL's detach and view ops: no record, a tensor sharing the daemon tensor or a lazy view of it
    "detach": (aten.detach.default, lambda t: (t["a"],)),
    "detach of a lazy view": (aten.detach.default, lambda t: (t["a"][1:3],)),
    "t": (aten.t.default, lambda t: (t["a"],)),
    "view": (aten.view.default, lambda t: (t["a"], [8, 4])),
    "view of a lazy view": (aten.view.default, lambda t: (t["a"][1:3], [4, 4])),
    "a float value and three outputs": (aten.native_layer_norm.default, lambda t: (t["a"], [8], None, None, 1e-5)),
    "a bool list, None outputs": (
        aten.native_layer_norm_backward.default,
        lambda t: (t["a"], t["a"], [8], *t["stats"], None, None, [True, False, False]),
    ),
    "a dtype": (aten._log_softmax_backward_data.default, lambda t: (t["a"], t["a"], 1, torch.float32)),
    "keyword arguments": (aten.add.Tensor, lambda t: (t["a"], t["c"][:1])),
    "a memory format keyword": (aten.clone.default, lambda t: (t["a"].t(),)),
    # float values' bits as struct packs them (the sign of zero, a subnormal): the record carries them as they are.
    # (Not a NaN: torch hands __torch_dispatch__ a new float object each call and NaN equals no other, so its key
    # (float, nan) misses every time, on either path: the Python dispatcher runs it.)
    "an infinite float value": (aten.native_layer_norm.default, lambda t: (t["a"], [8], None, None, float("inf"))),
    "a negative zero float value": (aten.native_layer_norm.default, lambda t: (t["a"], [8], None, None, -0.0)),
    "a subnormal float value": (aten.native_layer_norm.default, lambda t: (t["a"], [8], None, None, 5e-324)),
    "a float keyword": (aten.add.Tensor, lambda t: (t["a"], t["c"][:1])),
    "a dtype keyword": (aten.sum.default, lambda t: (t["a"],)),
    # ops with a `device` argument, left out (meta.Schema.device_plain): every backward's ones_like, zeros_like, new_*
    "a device argument left out": (aten.ones_like.default, lambda t: (t["a"],)),
    "a device argument left out, a Scalar and a keyword": (aten.full_like.default, lambda t: (t["a"].t(), 2.5)),
    "a device argument left out, sizes": (aten.new_zeros.default, lambda t: (t["a"], [2, 3])),
    "a device argument left out, preserve format": (aten.zeros_like.default, lambda t: (t["a"].t(),)),  # Adam's state
}
# keyword arguments of the cases above, by case (torch passes keyword-only arguments so)
KWARGS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "keyword arguments": lambda t: {"alpha": 2},
    "a memory format keyword": lambda t: {"memory_format": torch.contiguous_format},
    "a float keyword": lambda t: {"alpha": -0.0},
    "a dtype keyword": lambda t: {"dtype": torch.float64},
    "a device argument left out, a Scalar and a keyword": lambda t: {"memory_format": torch.contiguous_format},
    "a device argument left out, preserve format": lambda t: {"memory_format": torch.preserve_format},
}
NO_RECORD = {"detach", "detach of a lazy view", "t", "view", "view of a lazy view"}


@pytest.mark.parametrize("case", list(OPS))
def test_a_warm_op_runs_in_c_with_the_python_paths_key_record_and_result(
    dev: torch.device, on: None, case: str
) -> None:
    fn, make = OPS[case]
    t = tensors(dev)
    args = make(t)
    kwargs = KWARGS.get(case, lambda t: {})(t)
    rt = t["a"]._gp_rt

    def op(*args: Any) -> Any:
        return fn(*args, **kwargs)

    op(*args)  # warm: the Python path makes the meta-cache entry
    rec = Records(rt)
    try:
        native_ops.use(False)
        before = stats()
        counted = rt.ops_sent, rt._unflushed
        want = op(*args)
        assert stats() == before  # the Python dispatcher alone
        sent_py = rt.ops_sent - counted[0], (rt._unflushed - counted[1]) % runtime.FLUSH_OPS
        native_ops.use(True)
        hits = meta.CACHE.hits
        counted = rt.ops_sent, rt._unflushed
        got = op(*args)
        # the runtime's counts: ops sent, records in the frame (native_ops.cpp `send_record`, eager_op's inline case)
        assert (rt.ops_sent - counted[0], (rt._unflushed - counted[1]) % runtime.FLUSH_OPS) == sent_py
        ran, passed = stats()
        assert (ran, passed) == (before[0] + 1, before[1]), "the warm op did not run in C"
        assert meta.CACHE.hits == hits + (0 if case.startswith("detach") else 1)  # detach: no lookup
    finally:
        rec.close()
    if case in NO_RECORD:
        assert rec.sent == []
        rt_shared = rt.shared.get(args[0]._gp_h)
        assert rt_shared is not None and rt_shared >= 2  # the argument's daemon tensor: held by both results too
    else:
        (head_py, body_py), (head_c, body_c) = rec.sent
        assert head_c == head_py == rt._heads[meta.schema_of(fn).name]
        handles_py, tail_py = split(body_py)
        handles_c, tail_c = split(body_c)
        assert tail_c == tail_py  # the argument bytes
        assert handles_py == out_handles(want, args) and handles_c == out_handles(got, args)
    assert described(got) == described(want)
    if case.startswith("in place"):  # run twice: compare the written values against one local run of each
        return
    torch.testing.assert_close(local(got), local(want), rtol=0, atol=0, equal_nan=True)  # bit for bit (sqrt: NaNs)


def test_the_c_paths_written_values_equal_the_python_paths(dev: torch.device, on: None) -> None:
    results = []
    for use in (False, True):
        t = tensors(dev)
        aten._foreach_add_.Scalar(t["ts"], 1.0)  # warm (the first call of each: Python)
        aten.add_.Tensor(t["ts"][1], t["ts"][2])
        native_ops.use(use)
        before = stats()
        aten._foreach_add_.Scalar(t["ts"], 0.25)
        aten.add_.Tensor(t["ts"][1], t["ts"][2])
        assert stats()[0] == before[0] + (2 if use else 0)
        results.append([x.cpu() for x in t["ts"]])
    for p, c in zip(*results, strict=True):
        assert torch.equal(p, c)


def mlp_steps(dev: torch.device, steps: int) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 32, generator=data).to(dev), torch.randn(16, 1, generator=data).to(dev)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.detach().cpu() for p in model.parameters()]


def test_training_is_bit_equal_with_and_without_the_c_path(dev: torch.device, on: None) -> None:
    native_ops.use(False)
    before = stats()
    py_losses, py_params = mlp_steps(dev, 6)
    assert stats() == before
    native_ops.use(True)
    c_losses, c_params = mlp_steps(dev, 6)
    ran, passed = stats()
    assert ran - before[0] > 5 * (passed - before[1]), "most of the steady steps' ops should run in C"
    assert c_losses == py_losses
    for p, c in zip(py_params, c_params, strict=True):
        assert torch.equal(p, c)


def test_a_cache_miss_goes_to_python_and_the_next_call_runs_in_c(dev: torch.device, on: None) -> None:
    x = torch.randn(3, 7, 5).to(dev)  # a shape no other test uses
    before = stats()
    first = aten.relu.default(x)
    assert stats() == (before[0], before[1] + 1)
    second = aten.relu.default(x)
    assert stats() == (before[0] + 1, before[1] + 1)
    assert described(first)[:-1] == described(second)[:-1]
    assert torch.equal(first.cpu(), second.cpu())


def passes(fn: Callable[[], Any]) -> Any:
    """`fn()`'s result, checked to have gone to the Python dispatcher (each op it runs)."""
    ran, passed = stats()
    out = fn()
    now = stats()
    assert now[0] == ran and now[1] > passed, "expected the Python dispatcher"
    return out


def test_what_the_c_path_leaves_to_python(dev: torch.device, on: None) -> None:
    t = tensors(dev)
    a, b = t["a"], t["b"]
    for _ in range(2):  # warm each key
        aten.mul.Tensor(a, torch.tensor(2.0))
        aten.relu.default(a)
    # a keyword argument the compact record has no encoding for (a string: an `Op` carries it)
    aten.gelu.default(a, approximate="tanh")
    got = passes(lambda: aten.gelu.default(a, approximate="tanh"))
    assert torch.equal(got.cpu(), aten.gelu.default(a.cpu(), approximate="tanh"))
    # a 0-dim CPU tensor (an `Op` carries it inline)
    got = passes(lambda: aten.mul.Tensor(a, torch.tensor(2.0)))
    assert torch.equal(got.cpu(), a.cpu() * 2)
    # a tensor list holding a None
    idx = torch.tensor([0, 2]).to(dev)
    aten.index.Tensor(a, [None, idx])
    got = passes(lambda: aten.index.Tensor(a, [None, idx]))
    assert torch.equal(got.cpu(), a.cpu()[:, [0, 2]])
    # a held-back empty on the device: sent first (run_remote's materialize_pending)
    e = torch.empty(4, 8, device=dev)
    assert e._gp_h in a._gp_rt.pending
    passes(lambda: aten.relu.default(a))
    assert not a._gp_rt.pending
    e.copy_(a)
    assert torch.equal(e.cpu(), a.cpu())
    # an op that may change its argument's metadata (meta.Schema.fast is None)
    r = aten.relu.default(b)
    assert meta.schema_of(aten.resize_.default).fast is None
    passes(lambda: r.resize_(24))
    assert r.shape == (24,)
    # an error is the Python path's: a shape mismatch
    with pytest.raises(RuntimeError, match="must have same reduction dim"):
        passes(lambda: aten.mm.default(a, a))


def test_an_op_with_its_device_named_is_the_python_paths(dev: torch.device, on: None) -> None:
    """ones_like(x) runs in C (the cases above); with `device` named it is dispatch._other's: on the device (the same
    result), or on the CPU (cpu_fallback), each warm."""
    a = tensors(dev)["a"]
    for _ in range(2):
        aten.ones_like.default(a, device=dev)
        aten.ones_like.default(a, device="cpu")
    got = passes(lambda: aten.ones_like.default(a, device=dev))
    assert type(got) is RemoteTensor and got.device == dev and torch.equal(got.cpu(), torch.ones(4, 8))
    got = passes(lambda: aten.ones_like.default(a, device="cpu"))
    assert type(got) is torch.Tensor and got.device.type == "cpu" and torch.equal(got, torch.ones(4, 8))


def test_two_devices_are_the_python_paths_error(attach: Any, on: None) -> None:
    d0, d1 = attach(), attach()
    a, b = torch.randn(4, 8).to(d0), torch.randn(8, 3).to(d1)
    b0 = b.to("cpu").to(d0)
    aten.mm.default(a, b0)
    aten.mm.default(a, b0)  # the key (metadata only) is warm
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        passes(lambda: aten.mm.default(a, b))


def test_a_recording_step_sends_its_ops_through_python(dev: torch.device, on: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    deltas: list[tuple[int, int]] = []

    def step(x: torch.Tensor) -> torch.Tensor:
        ran, passed = stats()
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        now = stats()
        deltas.append((now[0] - ran, now[1] - passed))
        return loss

    x = torch.randn(4, 8).to(dev)
    step(x)
    step(x)  # warm: the steady eager step runs in C
    assert deltas[-1][0] > 0
    fn = gt.capture(step)
    for _ in range(6):
        fn(x).item()
    recorded = deltas[2:]
    assert len(recorded) >= 2  # the captured step's own eager run, then the recordings
    for ran, passed in recorded[1:]:
        assert ran == 0 and passed > 0, recorded


def test_gpupool_native_ops_0_or_a_failed_build_keeps_the_python_dispatcher(tmp_path: Any) -> None:
    code = (
        "import gpupool.torch\n"
        "from gpupool.client.torch import native_ops\n"
        "from gpupool.client.torch.tensor import RemoteTensor\n"
        "print(native_ops.active(), RemoteTensor.__dict__['__torch_dispatch__'].__func__.__module__,\n"
        "      type(RemoteTensor.__dict__['__del__']).__name__)\n"
    )
    python = "False gpupool.client.torch.dispatch function"
    no_compiler = {"CXX": "false", "GPUPOOL_NATIVE_CACHE": str(tmp_path)}  # an empty cache: it must build, and fails
    cases = [
        ({"GPUPOOL_NATIVE_OPS": "0"}, python),
        (no_compiler, python),
        ({}, "True gpupool_native_ops method_descriptor"),
    ]
    # the three children side by side (one after the other until round 25: each imports torch, ~2 s)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "GPUPOOL_NATIVE_OPS": "1", **extra},
        )
        for extra, _ in cases
    ]
    try:
        for (extra, want), child in zip(cases, children, strict=True):
            stdout, stderr = communicate(child, 120)
            assert child.returncode == 0, stderr
            assert stdout.strip() == want, stderr
            if extra is no_compiler:
                assert "native op path unavailable, every op takes the Python dispatcher" in stderr
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()


@pytest.mark.parametrize("use", [False, True], ids=["python", "native"])
def test_a_dying_tensor_gives_its_handle_and_bytes_to_the_batch_of_frees(
    dev: torch.device, on: None, use: bool
) -> None:
    native_ops.use(use)
    assert (RemoteTensor.__del__ is native_ops.load().remote_del) == use  # type: ignore[union-attr]
    a = torch.randn(6, 5).to(dev)
    rt = a._gp_rt
    rt.flush_frees(force=True)
    x = aten.relu.default(a)
    h = x._gp_h
    dead, nbytes = list(rt._dead), rt._dead_bytes
    del x  # the lock-free case: its handle and its 6 * 5 * 4 bytes join the batch
    assert rt._dead == [*dead, h] and rt._dead_bytes == nbytes + 120
    d = aten.detach.default(a)  # shares a's daemon tensor: its death only drops the extra holder (rt.release)
    assert rt.shared[a._gp_h] == 1
    del d
    assert a._gp_h not in rt.shared and rt._dead == [*dead, h]
    v = a[1:3]  # a lazy view: holds a's daemon tensor too
    held = a._gp_h
    assert rt.shared[held] == 1
    del v
    assert rt._dead == [*dead, h] and held not in rt.shared
    del a
    assert rt._dead == [*dead, h, held]
    rt.flush_frees(force=True)
    rt.sync()


def python_calls(fn: Callable[[], Any], *codes: Any) -> tuple[Any, int]:
    """`fn()`'s result and how many times the Python functions of `codes` ran meanwhile (called from C too)."""
    calls = [0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in codes:
            calls[0] += 1

    sys.setprofile(profile)
    try:
        out = fn()
    finally:
        sys.setprofile(None)
    return out, calls[0]


def _batch_of(dev: torch.device) -> tuple[Any, Any, Any, Any]:
    """The `session_append` tests' start (skipped where a frame holds fewer than 4 records): tensor "a", its runtime,
    the runtime's session and Session.eager_op's code (a record through the Python method runs it)."""
    from gpupool.client.session import Session

    if runtime.FLUSH_OPS < 4:
        pytest.skip("a frame of fewer than 4 records")
    a = tensors(dev)["a"]
    return a, a._gp_rt, a._gp_rt.session, Session.eager_op.__code__


def test_a_record_joins_the_sessions_batch_in_c_as_session_eager_op_queues_it(dev: torch.device, on: None) -> None:
    """native_ops.cpp `session_append`: a record that joins a batch already holding some is queued in C, as the
    same bytes Session.eager_op queues (the frame's bytes: the daemon reads them)."""
    a, rt, session, eager_op = _batch_of(dev)
    aten.relu.default(a)  # warm
    rt.flush()  # an empty batch: the next record goes through the method, which seals the frame's other commands
    native_ops.use(False)
    want, calls = python_calls(lambda: aten.relu.default(a), eager_op)
    assert calls == 1 and len(session._eager) == 1
    py_command = session._eager[-1]
    native_ops.use(True)
    got, calls = python_calls(lambda: aten.relu.default(a), eager_op)
    assert calls == 0, "the record did not join the batch in C"
    assert len(session._eager) == 2
    c_command = session._eager[-1]
    # the same command but for the output handle
    assert c_command == py_command.replace(struct.pack("<Q", want._gp_h), struct.pack("<Q", got._gp_h))
    assert torch.equal(got.cpu(), want.cpu())
    # a spy on the instance (as `Records` sets): every record goes through it again
    rec = Records(rt)
    try:
        _, calls = python_calls(lambda: aten.relu.default(a), eager_op)
    finally:
        rec.close()
    assert calls == 1 and len(rec.sent) == 1


def test_a_long_record_joins_the_sessions_batch_in_c_too(dev: torch.device, on: None) -> None:
    """native_ops.cpp `session_append` with a record of >= 128 bytes (Adam's foreach ops' records: they went through
    Session.eager_op in Python until round 47): queued in C as the same bytes (`eager_command`'s longer prefix)."""
    a, rt, session, eager_op = _batch_of(dev)
    for k in (16, 2100):  # 8 bytes a tensor: a record whose lengths take 2 bytes (>= 128), one whose take 3 (>= 16384)
        op = lambda k=k: aten.cat.default([a] * k)  # noqa: E731
        op()  # warm
        rt.flush()
        native_ops.use(False)
        want, calls = python_calls(op, eager_op)
        assert calls == 1 and len(session._eager) == 1
        py_command = session._eager[-1]
        assert len(py_command) > 8 * k
        native_ops.use(True)
        got, calls = python_calls(op, eager_op)
        assert calls == 0, "the long record did not join the batch in C"
        assert len(session._eager) == 2
        c_command = session._eager[-1]
        assert c_command == py_command.replace(struct.pack("<Q", want._gp_h), struct.pack("<Q", got._gp_h))
        assert torch.equal(got.cpu(), want.cpu())


def test_torchs_lookups_by_c_string_take_interned_names_with_the_same_answers(dev: torch.device, on: None) -> None:
    """native_ops.cpp `setup_getattr`: RemoteTensor, RemoteView and torch's tensor metaclass have a `tp_getattr` (torch
    looks `__torch_function__`/`__torch_dispatch__` up by C string through it, without a fresh str each time), and a
    lookup through it answers as getattr does: for gpupool's tensors, for any name, and for other tensor subclasses."""
    import ctypes

    module = native_ops.load()
    assert module is not None
    assert module.setup_getattr(RemoteTensor, RemoteView, type(torch.Tensor)) == (True, True, True)
    by_c_string = ctypes.pythonapi.PyObject_GetAttrString  # calls tp_getattr where the type has one
    by_c_string.restype = ctypes.py_object
    by_c_string.argtypes = [ctypes.py_object, ctypes.c_char_p]
    a = tensors(dev)["a"]
    assert by_c_string(a, b"_gp_h") == a._gp_h
    assert by_c_string(a, b"__torch_dispatch__") == a.__torch_dispatch__
    assert by_c_string(a, b"__torch_function__") is torch._C._disabled_torch_function_impl
    assert by_c_string(RemoteTensor, b"__torch_dispatch__") == RemoteTensor.__torch_dispatch__
    with pytest.raises(AttributeError):
        by_c_string(a, b"no_such_attribute")
    assert not torch._C._has_torch_function((a,))

    class Logged(torch.Tensor):  # another subclass's __torch_function__ still runs
        seen: list[Any] = []

        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            cls.seen.append(func)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    x = torch.ones(2).as_subclass(Logged)
    assert torch._C._has_torch_function((x,))
    torch.add(x, 1)
    assert torch.add in Logged.seen

    class Wrapped(torch.Tensor):  # and another wrapper subclass's __torch_dispatch__ (found on its class)
        calls: list[Any] = []

        @staticmethod
        def __new__(cls, elem: torch.Tensor) -> Any:
            return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype)

        def __init__(self, elem: torch.Tensor) -> None:
            self.elem = elem

        @classmethod
        def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            cls.calls.append(func)
            return func(*[t.elem if isinstance(t, Wrapped) else t for t in args], **(kwargs or {}))

    out = Wrapped(torch.ones(2)) + 1
    assert Wrapped.calls and torch.equal(out, torch.full((2,), 2.0))


def test_a_shared_handles_death_takes_one_holder_off_in_c(dev: torch.device, on: None) -> None:
    """native_ops.cpp `unshare`: the death of a tensor whose handle others hold (a detach) takes one holder off
    without DeviceRuntime.release; the last holder's death frees the handle."""
    a = tensors(dev)["a"]
    rt = a._gp_rt
    x = aten.relu.default(a)
    h = x._gp_h
    d1, d2 = x.detach(), x.detach()
    assert rt.shared[h] == 2
    release = runtime.DeviceRuntime.release.__code__

    def drop_one() -> None:
        nonlocal d1
        del d1

    _, calls = python_calls(drop_one, release)
    assert calls == 0 and rt.shared[h] == 1
    del d2
    assert h not in rt.shared and h not in rt._dead
    del x
    assert h in rt._dead


def test_torchs_dispatch_rule_lookup_is_the_c_one_with_the_same_answers() -> None:
    """native_ops.cpp `find_rule` stands in for torch._library.simple_registry.find_torch_dispatch_rule (torch calls
    it before every `__torch_dispatch__`): it is in place after `import gpupool.torch`, gives the original's answers
    (a registered rule, None), and a registered rule still runs (a fresh process: torch reads the function once)."""
    import torch._library.simple_registry as sr

    module = native_ops.load()
    assert module is not None and sr.find_torch_dispatch_rule is module.find_rule
    code = r"""
import torch
import gpupool.torch  # noqa: F401 - installs the C lookup before the first subclass dispatch
import torch._library.simple_registry as sr
from gpupool.client.torch import native_ops

lib = torch.library.Library("gpupool_rule_test", "FRAGMENT")
lib.define("twice(Tensor x) -> Tensor")
lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")


class Box(torch.Tensor):
    @staticmethod
    def __new__(cls, x):
        return torch.Tensor._make_wrapper_subclass(cls, x.shape, dtype=x.dtype)

    def __init__(self, x):
        self.x = x

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"the registered rule should have run, not __torch_dispatch__ ({func})")


def rule(mode_or_cls, func, types, args, kwargs):
    return args[0].x * 3


op = torch.ops.gpupool_rule_test.twice.default
assert sr.find_torch_dispatch_rule is native_ops.load().find_rule
assert sr.find_torch_dispatch_rule(op, Box) is None  # no rule yet (the op has no registry entry)
torch.library.register_torch_dispatch("gpupool_rule_test::twice", Box, rule, lib=lib)
assert sr.find_torch_dispatch_rule(op, Box) is rule
assert sr.find_torch_dispatch_rule(op, torch.Tensor) is None
assert sr.find_torch_dispatch_rule(torch.ops.aten.relu.default, Box) is None
try:
    sr.find_torch_dispatch_rule(object(), Box)  # the original's error (no __qualname__)
except AttributeError:
    pass
else:
    raise AssertionError("expected AttributeError")
out = op(Box(torch.ones(2)))
assert torch.equal(out, torch.full((2,), 3.0)), out
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_the_rule_lookup_takes_keyword_arguments_as_torchs_does() -> None:
    """`find_rule` binds keyword arguments as the function it stands in for does (through the original)."""
    import torch._library.simple_registry as sr

    module = native_ops.load()
    assert module is not None and sr.find_torch_dispatch_rule is module.find_rule
    lib = torch.library.Library("gpupool_rule_kw", "FRAGMENT")
    lib.define("once(Tensor x) -> Tensor")
    op = torch.ops.gpupool_rule_kw.once.default

    def rule(mode_or_cls: Any, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        return None

    torch.library.register_torch_dispatch("gpupool_rule_kw::once", RemoteTensor, rule, lib=lib)
    try:
        assert sr.find_torch_dispatch_rule(op, RemoteTensor) is rule
        assert sr.find_torch_dispatch_rule(op, torch_dispatch_class=RemoteTensor) is rule
        assert sr.find_torch_dispatch_rule(op=op, torch_dispatch_class=RemoteView) is None
        with pytest.raises(TypeError):
            sr.find_torch_dispatch_rule(op, RemoteTensor, 1)
    finally:
        lib._destroy()


def test_a_rule_lookup_other_than_the_one_find_rule_copies_is_left_in_place() -> None:
    """`_install_rule_finder` replaces torch's lookup only where it is the one `find_rule` copies: a lookup somebody
    wrapped before gpupool's import, or a torch whose holder finds rules otherwise (here: by the class's bases),
    keeps its own answers (a fresh process each: torch reads the function once)."""
    wrapped = r"""
import torch._library.simple_registry as sr
original = sr.find_torch_dispatch_rule
seen = []
def lookup(op, torch_dispatch_class):
    seen.append(op)
    return original(op, torch_dispatch_class)
sr.find_torch_dispatch_rule = lookup
import gpupool.torch  # noqa: F401
assert sr.find_torch_dispatch_rule is lookup, sr.find_torch_dispatch_rule
print("ok")
"""
    by_bases = r"""
import torch
import torch._library.simple_registry as sr

def find(self, torch_dispatch_class):
    for base in torch_dispatch_class.__mro__:
        if base in self._data:
            return self._data[base]
    return None

sr.GenericTorchDispatchRuleHolder.find = find
import gpupool.torch  # noqa: F401
from gpupool.client.torch.tensor import RemoteTensor, RemoteView

lib = torch.library.Library("gpupool_rule_bases", "FRAGMENT")
lib.define("once(Tensor x) -> Tensor")
rule = lambda *a: None
torch.library.register_torch_dispatch("gpupool_rule_bases::once", RemoteTensor, rule, lib=lib)
assert sr.find_torch_dispatch_rule(torch.ops.gpupool_rule_bases.once.default, RemoteView) is rule
print("ok")
"""
    for code in (wrapped, by_bases):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_many_steps_leave_no_references_behind(dev: torch.device, on: None) -> None:
    """What the C path makes per op (key parts, keyword pairs, records, wrappers, shared counts) is all given back:
    after a warm-up, 60 more steps of a small model (layer norm, dropout, AdamW, keyword arguments, float values,
    bool lists, dtypes, memory formats, detaches and views) leave the reference counts of what those hold as they
    were, and no objects behind."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 4)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 8).to(dev), torch.randn(32, 4).to(dev)
    rt = x._gp_rt

    def step() -> None:
        opt.zero_grad()
        out = model(x)
        loss = ((out - y) ** 2).mean()
        loss.backward()
        opt.step()
        z = out.detach().clone(memory_format=torch.contiguous_format)
        aten.add.Tensor(z, z.t().t(), alpha=0.5)
        aten.sum.default(z, dtype=torch.float64)
        _, mean, rstd = aten.native_layer_norm.default(z, [4], None, None, -0.0)
        aten.native_layer_norm_backward.default(z, z, [4], mean, rstd, None, None, [True, False, False])

    ops = (aten.add.Tensor, aten.sum.default, aten.clone.default, aten.native_layer_norm.default,
           aten.native_layer_norm_backward.default, aten.mm.default)  # fmt: skip
    schemas = [meta.schema_of(op) for op in ops]
    watched: list[Any] = [float, bool, int, tuple, "alpha", "dtype", "memory_format", torch.float64, torch.float32,
                          torch.contiguous_format, rt, rt.session, *schemas, *(s.fast for s in schemas)]  # fmt: skip

    def counts() -> list[int]:
        x.cpu()  # a sync: every frame sent and answered
        gc.collect()
        return [sys.getrefcount(o) for o in watched]

    for _ in range(20):  # warm: the cache entries, the optimizer's state, torch's own lazy objects
        step()
    before, ran, objects = counts(), stats()[0], len(gc.get_objects())
    steps = 60
    for _ in range(steps):
        step()
    after = counts()
    assert stats()[0] - ran > steps * 20, "the steps' ops did not run in C"
    # a reference kept per op would add >= `steps`; the other tests' cache entries may still go meanwhile (fewer)
    assert {str(o): (b, a) for o, b, a in zip(watched, before, after, strict=True) if a - b >= steps // 4} == {}
    assert len(gc.get_objects()) - objects < steps


def test_two_threads_use_one_sessions_tensors(dev: torch.device, on: None) -> None:
    """Two threads on one session's tensors while this one does the same: detaches, views and ops of one tensor
    made on one thread, used and dropped on another (shared handles given back on another thread than the one that
    shared them, `share` and `unshare` racing). The holders' count of the tensor's handle ends where it began, the
    results are the local ones, and the tensor's own death then frees the handle."""
    a = torch.randn(4, 8).to(dev)
    rt, h = a._gp_rt, a._gp_h
    aten.add.Tensor(aten.relu.default(a), a.detach(), alpha=0.5)  # warm
    aten.add.Tensor(aten.relu.default(a), a.detach(), alpha=0.5)
    assert h not in rt.shared
    q: queue.Queue[Any] = queue.Queue(maxsize=8)
    errors: list[BaseException] = []
    sums: list[Any] = []
    ran = stats()[0]

    def produce(x: torch.Tensor) -> None:
        try:
            for _ in range(400):
                q.put((x.detach(), x[1:3], aten.relu.default(x)))
        except BaseException as exc:
            errors.append(exc)
        finally:
            q.put(None)

    def consume() -> None:
        try:
            while (item := q.get()) is not None:
                d, _, r = item
                s = aten.add.Tensor(r, d, alpha=0.5)
                if len(sums) < 3:
                    sums.append(s)
                del item, d, r, s
        except BaseException as exc:
            errors.append(exc)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads interleave as finely as the interpreter lets them
    try:
        threads = [threading.Thread(target=produce, args=(a,)), threading.Thread(target=consume)]
        for t in threads:
            t.start()
        for _ in range(400):
            d, v = a.detach(), a.t()
            del d, v
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert errors == []
    assert stats()[0] - ran > 3 * 400, "the ops did not run in C"
    gc.collect()
    assert h not in rt.shared
    want = torch.relu(a.cpu()) + 0.5 * a.cpu()
    assert len(sums) == 3 and all(torch.equal(s.cpu(), want) for s in sums)
    assert h not in rt._dead
    del a
    assert h in rt._dead


class _Cycle:
    """Garbage only the cycle collector frees: its tensor dies inside whatever allocation runs the collection."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.me = self


def test_finalizers_run_in_the_middle_of_the_c_path(dev: torch.device, on: None) -> None:
    """A collection at every allocation (threshold 1) while detaches, views and results of the arguments wait in
    reference cycles: their finalizers (`remote_del`, `unshare` of the arguments' own handle) run inside the C path's
    allocations (key parts, keyword pairs, wrappers) between its borrowed lookups. The ops still run in C with the
    local results, and every holder of the argument's handle is given back."""
    a, c = torch.randn(4, 8).to(dev), torch.randn(8).to(dev)
    rt, h = a._gp_rt, a._gp_h

    def ops() -> Any:
        aten.clone.default(a.t(), memory_format=torch.contiguous_format)
        aten.sum.default(a, dtype=torch.float64)
        _, mean, rstd = aten.native_layer_norm.default(a, [8], None, None, -0.0)
        aten.native_layer_norm_backward.default(a, a, [8], mean, rstd, None, None, [True, False, False])
        return aten.add.Tensor(a, c, alpha=0.5)

    ops(), ops()  # warm
    ran = stats()[0]
    threshold = gc.get_threshold()
    gc.collect()
    gc.set_threshold(1, 1, 1)
    try:
        for _ in range(200):
            _Cycle(a.detach()), _Cycle(a[1:3]), _Cycle(aten.relu.default(a))
            out = ops()
    finally:
        gc.set_threshold(*threshold)
    gc.collect()
    assert stats()[0] - ran > 200 * 5, "the ops did not run in C"
    assert h not in rt.shared
    assert torch.equal(out.cpu(), a.cpu() + 0.5 * c.cpu())


def _ops_of_many_lengths(a: torch.Tensor) -> Iterator[Callable[[], Any]]:
    """Ops whose records the C path sends, of lengths that step by 8, 9, 13 and 17 bytes (sizes, tensors, keywords)."""
    extra = [{}, {"dtype": torch.float32}, {"layout": torch.strided}, {"pin_memory": False},
             {"dtype": torch.float32, "pin_memory": False}, {"layout": torch.strided, "pin_memory": False},
             {"dtype": torch.float32, "layout": torch.strided}, {"dtype": None}, {"pin_memory": None},
             {"dtype": None, "pin_memory": None}, {"dtype": None, "layout": None, "pin_memory": None},
             {"dtype": torch.float32, "pin_memory": None}, {"layout": torch.strided, "pin_memory": None}]  # fmt: skip
    for m in range(3, 15):
        for kw in extra:
            yield lambda m=m, kw=kw: aten.new_zeros.default(a, [1] * m, **kw)
            yield lambda m=m, kw=kw: aten.new_full.default(a, [1] * m, 1.5, **kw)
            yield lambda m=m, kw=kw: aten.new_full.default(a, [1] * m, True, **kw)
            yield lambda m=m, kw=kw: aten.new_empty_strided.default(a, [1] * m, [1] * m, **kw)
    for k in range(6, 16):
        yield lambda k=k: aten.cat.default([a] * k)
        yield lambda k=k: aten.cat.default([a] * k, 1)
        yield lambda k=k: aten._foreach_add.Scalar([a] * k, 1.5)
        yield lambda k=k: aten._foreach_add.Scalar([a] * k, True)
        yield lambda k=k: aten.cat.default([a] * k, True)
        yield lambda k=k: aten._foreach_add.List([a] * k, [a] * k)
        yield lambda k=k: aten._foreach_add.List([a] * k, [a] * k, alpha=2.0)


def test_records_either_side_of_128_bytes_queue_in_c_as_python_writes_them(dev: torch.device, on: None) -> None:
    """native_ops.cpp `session_append` (specrev47): records of 126 to 129 bytes, either side of the last short prefix
    of `_EAGER_SHORT` (127) and the longer prefix (129: as 128, a two-byte length inside and out; no op here makes a
    128-byte record), are queued in C with the bytes Session.eager_op writes, each prefix's length as protobuf's."""
    a, rt, session, eager_op = _batch_of(dev)
    covered: set[int] = set()
    for op in _ops_of_many_lengths(a):
        op()  # its op id defined (the first record of a name goes through the method)
        rt.flush()
        native_ops.use(False)
        want, _ = python_calls(op, eager_op)
        if len(session._eager) != 1:  # (a frame went out with it: Frees due first)
            native_ops.use(True)
            continue
        py_command = session._eager[-1]
        assert py_command[0] == 0x0A
        if py_command[1] < 0x80:  # b"\x0a" + varint(len) + b"\xf2\x01" + varint(n): the record's length n
            n = py_command[4]
        else:
            n = (py_command[5] & 0x7F) | (py_command[6] << 7) if py_command[5] >= 0x80 else py_command[5]
        native_ops.use(True)
        ran = stats()[0]
        got, calls = python_calls(op, eager_op)
        if not 126 <= n <= 129 or stats()[0] == ran:  # (an op the C path passes to Python: not this test's)
            continue
        covered.add(n)
        assert calls == 0, (
            f"a {n}-byte record did not join the batch in C",
            len(session._eager),
            len(rt._dead),
            rt._unflushed,
        )
        assert len(session._eager) == 2
        c_command = session._eager[-1]
        outs = want if isinstance(want, list) else [want]
        gots = got if isinstance(got, list) else [got]
        expect = py_command
        for w, g in zip(outs, gots, strict=True):
            expect = expect.replace(struct.pack("<Q", w._gp_h), struct.pack("<Q", g._gp_h))
        assert c_command == expect
        inner = 2 + (1 if n < 128 else 2)  # b"\xf2\x01" + varint(n)
        assert len(c_command) == 1 + (1 if inner + n < 128 else 2) + inner + n
        for w, g in zip(outs, gots, strict=True):
            assert torch.equal(w.cpu(), g.cpu())
    assert 127 in covered and covered & {128, 129}, covered
