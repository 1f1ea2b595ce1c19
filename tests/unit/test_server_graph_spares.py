"""secrev50: a captured step's plan keeps its run's inputs sent by value for its next run (round 49, native_runner.cpp
`GraphPlan.spare_inputs`), memory its graph's reservation covers (`Graph.reserve`: peak + inputs sent by value); the
session's count holds its largest graph's reservation only (`GraphTable._reserve`). On 086d7cb1 every plan kept its
own: a session of several graphs, each run quietly in turn, held every graph's inputs while its count said one (8
graphs of 32 MiB inputs: the process +291 MiB, the count +0). Now one plan of a session at a time keeps them
(server/graph.py `_spares`), and none while the Python path runs a graph or after a drop."""

from __future__ import annotations

import gc
from typing import Any

import torch
from gpupool.server import slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2

SHAPE = (7, 11, 13)  # an input's shape no other tensor of the process has: its live tensors are counted by it
GRAPHS = 4


def _no_reply(item: object) -> None:
    raise AssertionError("graph commands are not answered")


def _inputs_alive() -> int:
    """Tensors of the inputs' shape alive in the process (the plans' kept inputs among them: gc sees a tensor
    object whatever holds it). Collected first: garbage in reference cycles (the 4 graphs' definitions left 4 such
    tensors in a0a21273's CI, counted at the base and freed by the collector at graph 2: -3) counts until freed."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and tuple(o.shape) == SHAPE)


class _Session:
    def __init__(self) -> None:
        dev = FakeDevice(0, "h", 1 << 34)
        self.s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 32)
        self.ex = CommandExecutor(slices.SliceLedger())
        self.ex.exclusive_rng = True  # as in a session's worker process (graph_trace.refusal)
        self.next = 1000
        meta = wire.meta_to_proto(torch.ones(SHAPE))
        for gid in range(1, GRAPHS + 1):  # each: the sum of its one input, sent by value
            body = [device_pb2.Op(name="aten::sum.default", args=[tensor_pb2.Arg(tensor=1)], outputs=[2])]
            msg = device_pb2.DefineGraph(graph_id=gid, inputs=1, input_meta=[meta], ops=body, outputs=[2])
            self.command(device_pb2.Command(define_graph=msg))

    def command(self, cmd: device_pb2.Command) -> None:
        self.s.error = None
        self.ex.execute(self.s, cmd, _no_reply)
        assert self.s.error is None, self.s.error

    def run(self, gid: int, value: float) -> float:
        """RunGraph `gid` of an input of `value`s, its output read and freed (a training loop's loss)."""
        self.next += 1
        out = self.s.handle_base + self.next
        msg = device_pb2.RunGraph(graph_id=gid, inputs=[0], outputs=[out])
        msg.input_data.append(torch.full(SHAPE, value).numpy().tobytes())
        self.command(device_pb2.Command(run_graph=msg))
        got = float(self.s.tensors[out])
        self.command(device_pb2.Command(free=device_pb2.Free(handles=[out])))
        return got

    def plan(self, gid: int) -> Any:
        return self.ex.graphs._of(self.s)[gid].fast


def test_a_sessions_plans_keep_one_graphs_inputs_at_most(native_runner_module: Any) -> None:
    """Each graph run five times in a row (its last runs quiet: its plan), one graph after another: one input of
    them is alive after each graph's turn (on 086d7cb1 one more a graph: 1, 2, 3, 4), and the sums are right."""
    t = _Session()
    base = _inputs_alive()
    n = SHAPE[0] * SHAPE[1] * SHAPE[2]
    for gid in range(1, GRAPHS + 1):
        for k in range(5):
            assert t.run(gid, float(k)) == float(k * n)
        assert t.plan(gid) not in (None, False)  # the plan ran (and kept its input for its next run)
        assert _inputs_alive() - base == 1, (gid, _inputs_alive() - base)
    assert t.s.spare_plan is t.plan(GRAPHS)
    t.run(1, 2.0)  # another graph's run (not quiet: the Python path) lets the kept input go, keeps none itself
    assert _inputs_alive() - base == 0
    for k in range(4):  # and its quiet runs keep their own again, reused run after run
        assert t.run(1, float(k)) == float(k * n)
    assert _inputs_alive() - base == 1 and t.s.spare_plan is t.plan(1)
    t.command(device_pb2.Command(drop_graph=device_pb2.DropGraph(graph_id=1)))  # its reservation goes: so do they
    assert _inputs_alive() - base == 0 and t.s.spare_plan is None


def test_a_definition_leaves_no_tensor_in_a_reference_cycle(native_runner_module: Any) -> None:
    """Round 54: defining a graph left its meta tensors (one of the input's shape) in a reference cycle, freed by the
    collector only (server/graph_build.py `_prebuild`'s recursive `meta` closure, its cell holding `meta_slots`): on
    1ddcc310 the 4 definitions left 4 such tensors alive until a collection. Counted with the collector off."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        base = sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and tuple(o.shape) == SHAPE)
        t = _Session()
        left = sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and tuple(o.shape) == SHAPE) - base
    finally:
        if enabled:
            gc.enable()
    assert left == 0, left
    assert t.run(1, 1.0) == float(SHAPE[0] * SHAPE[1] * SHAPE[2])
