"""Captured-step graphs in-process (server/graph_build.py, server/graph.py): the precompiled steps of the replay
loop give what the same aten ops give eagerly, for every way a step gathers its arguments, and the session's
memory accounting stays exact across runs. (Hostile graphs and the wire: tests/integration/test_daemon_graph.py.)"""

from __future__ import annotations

import torch
from gpupool.server import slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.graph_build import FILL, GATHER, ONE
from gpupool.server.sessions import DeviceMemory, WorkerSession

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2


def slot(n: int) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(tensor=n)


def op(name: str, *args: tensor_pb2.Arg, out: tuple[int, ...] = (), **kwargs: tensor_pb2.Arg) -> device_pb2.Op:
    msg = device_pb2.Op(name=name, args=list(args), outputs=list(out))
    for k, v in kwargs.items():
        msg.kwargs[k].CopyFrom(v)
    return msg


def test_every_gather_mode_replays_what_eager_computes() -> None:
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    ex = CommandExecutor(slices.SliceLedger())
    w, grad = s.handle_base + 1, s.handle_base + 2
    s.bind(w, torch.randn(4, 3))
    # slot 1: input x (4x3); slot 2: persistent w
    body = [
        op("aten::add.Tensor", slot(1), slot(2), out=(3,)),  # two slots: one itemgetter
        op("aten::relu", slot(3), out=(4,)),  # one slot alone
        op("aten::mul.Scalar", slot(4), tensor_pb2.Arg(f=0.5), out=(5,)),  # a constant among slots
        op("aten::cat", tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=[5, 1])), out=(6,)),  # a slot list
        op("aten::add.Tensor", slot(6), slot(6), out=(7,), alpha=tensor_pb2.Arg(i=2)),  # a constant keyword
        op("aten::max.dim", slot(7), tensor_pb2.Arg(i=1), out=(8, 9)),  # two outputs
        op("aten::sum", slot(8), out=(10,)),
    ]
    msg = device_pb2.DefineGraph(
        graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(4, 3))], persistent=[w], ops=body,
        outputs=[10, 9],
    )  # fmt: skip
    msg.writes.add(slot=8, handle=grad)

    def no_reply(item: object) -> None:
        raise AssertionError("graph commands are not answered")

    ex.execute(s, device_pb2.Command(define_graph=msg), no_reply)
    assert s.error is None
    g = ex.graphs._of(s)[1]
    assert [step[0] for step in g.plan] == [GATHER, ONE, FILL, FILL, GATHER, FILL, ONE]
    reserved = ex.graphs.reserved(s)
    for k in range(3):
        x = torch.randn(4, 3)
        out_sum, out_idx = s.handle_base + 100 + 2 * k, s.handle_base + 101 + 2 * k
        run = device_pb2.RunGraph(graph_id=1, inputs=[0], outputs=[out_sum, out_idx])
        run.input_data.append(x.numpy().tobytes())
        ex.execute(s, device_pb2.Command(run_graph=run), no_reply)
        assert s.error is None
        y = torch.cat([torch.relu(x + s.tensors[w]) * 0.5, x])
        values, indices = (y + 2 * y).max(1)
        assert torch.equal(s.tensors[out_sum], values.sum())
        assert torch.equal(s.tensors[out_idx], indices)
        assert torch.equal(s.tensors[grad], values)  # rebound by every run
    # What is counted is exactly the live storages plus the graph's reservation (rebinding released the old ones).
    live = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in s.tensors.values()}
    assert s.used == sum(live.values()) + reserved
    s.free([out for out in s.tensors if out != w])
    assert s.used == 4 * 3 * 4 + reserved
