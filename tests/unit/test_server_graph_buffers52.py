"""Round 52 (grads52): a traced captured step's kept tensors that its handles in `writes` take every run (a step's new
gradients), made by an op with an out= form of the same kernel (`graph_trace._OUT_FORMS`) or views of its result,
are written into the buffers the last run left bound to those handles (graph_trace `_into_buffers`; native_runner.cpp
`buffer_arg`), so a quiet run makes and frees no tensor for them -- where nothing else sees the old buffer: another
handle on the same tensor or a view of its memory, a handle no longer written, a tensor of another layout each make
the run write into a fresh buffer (today's path), said once at debug level, the old tensor left as it was. The
values, the bindings and the bytes counted are the Python path's (`Traced.run`: fresh buffers) run for run."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from gpupool.server import slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2

GID = 1


def _t(k: int) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(tensor=k)


def _ints(*v: int) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(ints=tensor_pb2.IntList(values=list(v)))


class Step:
    """A session with a graph like a step's gradients: `x` (4, 3) sent by value, `w` (3, 5) persistent; it keeps
    `gw = mm(x, w).t()` (a weight's gradient: a view of an mm) and `gb = sum(x, [0]).view(1, 3)` (a bias's: a view
    of a sum), bound to handles `gw` and `gb` after every run, and outputs `mm(x, w).sum()`."""

    def __init__(self, quick: bool = True) -> None:
        dev = FakeDevice(0, "h", 1 << 30)
        self.s = s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
        self.ex = CommandExecutor(slices.SliceLedger())
        self.ex.exclusive_rng = True  # as in a session's worker process (graph_trace.refusal)
        assert self.ex.native is not None
        base = self.base = s.handle_base
        self.w, self.gw, self.gb = base + 1, base + 2, base + 3
        s.bind(self.w, torch.arange(15.0).reshape(3, 5) / 7)
        body = [
            device_pb2.Op(name="aten::mm", args=[_t(1), _t(2)], outputs=[3]),
            device_pb2.Op(name="aten::t", args=[_t(3)], outputs=[4]),
            device_pb2.Op(name="aten::sum.dim_IntList", args=[_t(1), _ints(0)], outputs=[5]),
            device_pb2.Op(name="aten::view", args=[_t(5), _ints(1, 3)], outputs=[6]),
            device_pb2.Op(name="aten::sum", args=[_t(3)], outputs=[7]),
        ]
        msg = device_pb2.DefineGraph(
            graph_id=GID, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(4, 3))], persistent=[self.w],
            ops=body, outputs=[7],
            writes=[device_pb2.GraphWrite(handle=self.gw, slot=4), device_pb2.GraphWrite(handle=self.gb, slot=6)],
        )  # fmt: skip
        self.command(device_pb2.Command(define_graph=msg))
        self.g = self.ex.graphs._of(s)[GID]
        if not quick:
            self.g.fast = False
        self.next = 100

    def command(self, cmd: device_pb2.Command) -> None:
        self.s.error = None
        self.ex.execute(self.s, cmd, _no_reply)
        assert self.s.error is None, self.s.error

    def run(self) -> torch.Tensor:
        """A RunGraph of a new batch; returns the batch."""
        self.next += 1
        x = torch.arange(12.0).reshape(4, 3) * self.next / 100
        msg = device_pb2.RunGraph(graph_id=GID, inputs=[0], outputs=[self.base + self.next])
        msg.input_data.append(x.numpy().tobytes())
        self.command(device_pb2.Command(run_graph=msg))
        return x

    def check(self, x: torch.Tensor) -> None:
        """The kept tensors and the output are the step's values of `x`, laid out as its ops lay them out."""
        s, y = self.s, x @ self.s.tensors[self.w]
        gw, gb = s.tensors[self.gw], s.tensors[self.gb]
        assert torch.equal(gw, y.t()) and gw.stride() == (1, 5) and gw.storage_offset() == 0
        assert torch.equal(gb, x.sum(0).view(1, 3)) and gb.stride() == (3, 1)
        assert torch.equal(s.tensors[self.base + self.next], y.sum())

    def counted(self) -> tuple[Any, ...]:
        return sorted(n for _, n in self.s._storages.values()), self.s.used, self.s.memory.used


def _no_reply(item: object) -> None:
    raise AssertionError("graph commands are not answered")


def _ptrs(t: Step) -> list[int]:
    return [t.s.tensors[h].data_ptr() for h in (t.gw, t.gb)]  # (`untyped_storage()` would hold the storage)


def test_a_quiet_run_writes_the_steps_gradients_into_the_last_runs_buffers(native_runner_module: Any) -> None:
    """From the first quiet run on, each run's kept tensors are the last run's objects, on the same memory, holding
    this run's values; the bytes counted stay those of the Python path's twin run for run."""
    t, slow = Step(), Step(quick=False)
    for _ in range(3):
        for u in (t, slow):
            u.check(u.run())
    assert t.g.traced is not None and [b.slot for b in t.g.traced.buffers] == [4, 6]
    objs = [id(t.s.tensors[h]) for h in (t.gw, t.gb)]  # (ids: a reference held here would be an alias)
    ptrs = _ptrs(t)
    reused = t.g.fast.reused
    for _ in range(4):
        for u in (t, slow):
            x = u.run()
            u.check(x)
        assert [id(t.s.tensors[h]) for h in (t.gw, t.gb)] == objs and _ptrs(t) == ptrs
        assert t.counted() == slow.counted()
        assert all(torch.equal(t.s.tensors[h], slow.s.tensors[h]) for h in (t.gw, t.gb))
    assert t.g.fast.reused - reused == 8 and slow.g.fast is False


@pytest.mark.parametrize("alias", ["eager view", "view", "same tensor", "no longer written", "rebound elsewhere"])
def test_a_buffer_something_else_sees_is_left_as_it_was(
    native_runner_module: Any, alias: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another handle on the kept tensor's memory (a view an eager op made, a view or the very tensor bound to
    another handle, a view of a tensor bound in its place) or a handle the client stopped having written
    (`drop_writes`): the run writes the kept tensor into a fresh buffer, the old memory keeps its values, said once
    at debug level where a quiet run meets it (a run after an eager op is the Python path's, whose buffers are always
    fresh); once nothing else holds the new one, the next runs write into theirs again. (No reference to the old
    tensor is held here: one would be a holder too.)"""
    t = Step()
    for _ in range(4):
        t.check(t.run())
    s, other = t.s, t.base + 50
    if alias == "eager view":  # an eager op of the client's: a view of the gradient on another handle
        op = device_pb2.Op(name="aten::t", args=[_t(t.gw)], outputs=[other])
        t.command(device_pb2.Command(op=op))
    elif alias == "view":
        s.bind(other, s.tensors[t.gw][1])
    elif alias == "same tensor":
        s.bind(other, s.tensors[t.gw])
    elif alias == "rebound elsewhere":
        s.bind(t.gw, torch.full((4, 5), 3.0).t())  # laid out as the buffer, a storage of its own: it may be written
        s.bind(other, s.tensors[t.gw][2])  # ... but a view of it is held
    watched = t.gw if alias == "no longer written" else other
    then, was = s.tensors[watched].clone(), id(s.tensors[watched])
    caplog.set_level(logging.DEBUG, logger="gpupool.server.graph")
    for _ in range(3):
        if alias == "no longer written":
            t.next += 1
            msg = device_pb2.RunGraph(graph_id=GID, inputs=[0], outputs=[t.base + t.next], drop_writes=[t.gw])
            msg.input_data.append(torch.ones(4, 3).numpy().tobytes())
            t.command(device_pb2.Command(run_graph=msg))
        else:
            t.check(t.run())
        assert torch.equal(s.tensors[watched], then) and id(s.tensors[watched]) == was
    said = [r.getMessage() for r in caplog.records if "written into a new buffer" in r.getMessage()]
    if alias != "eager view":
        assert len(said) == 1 and f"{t.gw:#x}" in said[0], said
    held = sum(n for _, n in s._storages.values()) + t.ex.graphs.reserved(s)
    assert s.used == held and s.memory.used == held  # every storage held counted once
    if alias != "no longer written":  # the alias gone: the buffers are the run's own again
        s.free([other])
        for _ in range(2):
            t.check(t.run())
        ptrs = _ptrs(t)
        fresh = t.g.fast.fresh
        for _ in range(2):
            t.check(t.run())
        assert _ptrs(t) == ptrs and t.g.fast.fresh == fresh


def test_a_failed_run_poisons_the_kept_tensors_it_wrote_into(native_runner_module: Any) -> None:
    """A traced function that fails after writing into the buffers: the kept handles poisoned (their values are the
    failed run's), as the Python path poisons them."""
    t = Step()
    for _ in range(4):
        t.check(t.run())
    real = t.g.traced.fn
    t.g.traced.fn = lambda *a: real(*a)[:1]  # one value where the graph keeps two
    t.next += 1
    msg = device_pb2.RunGraph(graph_id=GID, inputs=[0], outputs=[t.base + t.next])
    msg.input_data.append(torch.ones(4, 3).numpy().tobytes())
    t.s.error = None
    t.ex.execute(t.s, device_pb2.Command(run_graph=msg), _no_reply)
    t.g.traced.fn = real
    assert t.s.error is not None
    assert t.gw in t.s.poisoned and t.gb in t.s.poisoned and t.gw not in t.s.tensors
