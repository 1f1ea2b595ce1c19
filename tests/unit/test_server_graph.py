"""Captured-step graphs in-process (server/graph_build.py, server/graph.py): the precompiled steps of the replay
loop give what the same aten ops give eagerly, for every way a step gathers its arguments, and the session's
memory accounting stays exact across runs. (Hostile graphs and the wire: tests/integration/test_daemon_graph.py.)"""

from __future__ import annotations

from typing import Any

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


def _gather_graph(w: int, grad: int) -> device_pb2.DefineGraph:
    """Graph 1: input x (4x3, slot 1), persistent w (slot 2); outputs: sum(values), indices; writes values to
    `grad`. Every way a step gathers its arguments."""
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
    return msg


def _gather_expected(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.cat([torch.relu(x + w) * 0.5, x])
    return (y + 2 * y).max(1)  # type: ignore[no-any-return]


def test_every_gather_mode_replays_what_eager_computes() -> None:
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    ex = CommandExecutor(slices.SliceLedger())
    w, grad = s.handle_base + 1, s.handle_base + 2
    s.bind(w, torch.randn(4, 3))
    msg = _gather_graph(w, grad)

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
        values, indices = _gather_expected(x, s.tensors[w])
        assert torch.equal(s.tensors[out_sum], values.sum())
        assert torch.equal(s.tensors[out_idx], indices)
        assert torch.equal(s.tensors[grad], values)  # rebound by every run
    # What is counted is exactly the live storages plus the graph's reservation (rebinding released the old ones).
    live = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in s.tensors.values()}
    assert s.used == sum(live.values()) + reserved
    s.free([out for out in s.tensors if out != w])
    assert s.used == 4 * 3 * 4 + reserved


def test_a_traced_graph_binds_every_output_and_write_and_drop_writes_stops_binding_one() -> None:
    """From its third run the graph is one TorchScript call (server/graph_trace.py) that hands back its outputs and
    writes as a list (a tuple costs TorchScript a TupleType per call); each is bound to its handle after every run,
    until a run names the write in drop_writes: then that handle keeps what the last run before it left."""
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    ex = CommandExecutor(slices.SliceLedger())
    ex.exclusive_rng = True  # as in a session's worker process: graphs may run as TorchScript
    w, grad = s.handle_base + 1, s.handle_base + 2
    s.bind(w, torch.randn(4, 3))
    ex.execute(s, device_pb2.Command(define_graph=_gather_graph(w, grad)), _no_reply)
    assert s.error is None
    g = ex.graphs._of(s)[1]
    assert g.device_type == "cpu"  # read once, at definition
    for k in range(5):
        x = torch.randn(4, 3)
        out_sum, out_idx = s.handle_base + 100 + 2 * k, s.handle_base + 101 + 2 * k
        run = device_pb2.RunGraph(graph_id=1, inputs=[0], outputs=[out_sum, out_idx])
        run.input_data.append(x.numpy().tobytes())
        if k == 4:
            run.drop_writes.append(grad)
            kept = s.tensors[grad]
        ex.execute(s, device_pb2.Command(run_graph=run), _no_reply)
        assert s.error is None, s.error
        values, indices = _gather_expected(x, s.tensors[w])
        assert torch.equal(s.tensors[out_sum], values.sum())
        assert torch.equal(s.tensors[out_idx], indices)
        assert s.tensors[grad] is kept if k == 4 else torch.equal(s.tensors[grad], values)
    assert g.traced is not None and g.writes == {}
    out = g.traced.fn(*g.traced.args([None, torch.randn(4, 3), s.tensors[w]] + [None] * (g.n_slots - 3)))
    assert type(out) is list and len(out) == 3  # slots 8 (the write: dropped from binding, not from the graph), 9, 10


def _graph_with_persistent(ex: CommandExecutor, s: WorkerSession, w: int, body: list[device_pb2.Op]) -> None:
    msg = device_pb2.DefineGraph(
        graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(4, 3))], persistent=[w], ops=body,
        outputs=[len(body) + 2],
    )  # fmt: skip
    ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
    assert s.error is None


def _run(ex: CommandExecutor, s: WorkerSession, out: int) -> torch.Tensor:
    run = device_pb2.RunGraph(graph_id=1, inputs=[0], outputs=[out])
    run.input_data.append(torch.ones(4, 3).numpy().tobytes())
    ex.execute(s, device_pb2.Command(run_graph=run), _no_reply)
    return s.tensors.get(out)


def _no_reply(item: object) -> None:
    raise AssertionError("graph commands are not answered")


def test_a_persistent_tensor_whose_metadata_changed_in_place_between_runs_is_refused() -> None:
    """A run skips reading a persistent tensor's metadata when it is the object the last run ended with and its
    version counter has not moved since (graph._externals); every in-place change of sizes, strides or storage
    moves it, so such a change is still refused -- here strides that the kernel would happily read wrong."""
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    ex = CommandExecutor(slices.SliceLedger())
    w = s.handle_base + 1
    s.bind(w, torch.arange(12.0).reshape(4, 3))
    _graph_with_persistent(ex, s, w, [op("aten::add.Tensor", slot(1), slot(2), out=(3,))])
    g = ex.graphs._of(s)[1]
    assert g.stable == [0]
    for k in range(3):  # the first run checks and remembers; the next ones take the remembered verdict
        assert torch.equal(_run(ex, s, s.handle_base + 10 + k), torch.arange(12.0).reshape(4, 3) + 1)
    assert g.seen[0][0]() is s.tensors[w] and g.seen[0][1] == s.tensors[w]._version
    # each change below stands for a command's (an op's): CommandExecutor.execute counts it in `s.mutations`,
    # without which a run reads no version at all (round 39: test_a_quiet_run_reads_no_version_...)
    s.tensors[w].mul_(2)  # values only: the version moves, the metadata is read again and passes
    s.mutations += 1
    assert torch.equal(_run(ex, s, s.handle_base + 20), torch.arange(12.0).reshape(4, 3) * 2 + 1)
    s.tensors[w].as_strided_((4, 3), (1, 4))  # same sizes, other strides: the add would read it transposed
    s.mutations += 1
    assert _run(ex, s, s.handle_base + 21) is None
    assert s.error is not None and "changed shape or dtype" in s.error.message
    s.error = None
    s.tensors[w].as_strided_((4, 3), (3, 1))  # back as defined: runs again
    s.mutations += 1
    assert _run(ex, s, s.handle_base + 22) is not None and s.error is None
    other = torch.zeros(3, 4).t()  # another tensor under the handle, same sizes, other strides, same version
    while other._version < s.tensors[w]._version:
        other.add_(0)
    assert other._version == g.seen[0][1]
    s.bind(w, other)
    assert _run(ex, s, s.handle_base + 23) is None
    assert s.error is not None and "changed shape or dtype" in s.error.message


def test_a_quiet_run_reads_no_version_and_every_command_between_runs_is_seen() -> None:
    """Round 39: a captured step's persistent tensors cost a dict lookup, a weak reference and a version read each
    (~1.2 us a tensor, 25 of them in the tiny MLP's step, ~50 in the stock MLP's) before its run and a version read
    each after it. Where no command that may change a tensor's metadata ran since the graph's last run
    (`WorkerSession.mutations`: every command kind but upload, get, free, sync and seed, and eager spans) a run
    reads no version: each handle still bound to the object last checked is enough. Through real commands here: a
    Sync, a Get and a Free between runs keep the runs quiet (no version taken after them); an op that transposes the
    persistent tensor in place, and the handle freed and uploaded anew with other strides, are each refused as
    before. On 1344c19 every run took the versions (`g.seen`'s counts follow the tensor)."""
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    ex = CommandExecutor(slices.SliceLedger())
    w = s.handle_base + 1
    s.bind(w, torch.arange(12.0).reshape(4, 3))
    body = [op("aten::add_.Tensor", slot(2), slot(1), out=(3,)), op("aten::mul.Tensor", slot(3), tensor_pb2.Arg(f=1.0),
                                                                     out=(4,))]  # fmt: skip
    _graph_with_persistent(ex, s, w, body)  # its add_ moves w's version every run
    g = ex.graphs._of(s)[1]
    assert g.stable == [0]
    want = torch.arange(12.0).reshape(4, 3)
    taken = []
    for k in range(4):
        want = want + 1
        assert torch.equal(_run(ex, s, s.handle_base + 10 + k), want), k
        taken.append(g.seen[0][1])
        replies: list[object] = []
        ex.execute(
            s,
            device_pb2.Command(sync=device_pb2.Sync(request_id=k + 1, scalar_handles=[s.handle_base + 10 + k])),
            replies.append,
        )
        ex.execute(s, device_pb2.Command(free=device_pb2.Free(handles=[s.handle_base + 10 + k])), _no_reply)
        assert s.error is None, s.error
    assert taken[0] == 1 and taken[1:] == [1, 1, 1]  # the first run took w's version; the quiet ones none
    assert s.tensors[w]._version == 4
    t_ = device_pb2.Op(name="aten::t_.default", args=[tensor_pb2.Arg(tensor=w)])
    ex.execute(s, device_pb2.Command(op=t_), _no_reply)  # (4, 3) -> (3, 4), in place: the same object
    assert s.error is None and s.tensors[w].shape == (3, 4)
    assert _run(ex, s, s.handle_base + 20) is None
    assert s.error is not None and "changed shape or dtype" in s.error.message
    s.error = None
    ex.execute(s, device_pb2.Command(op=t_), _no_reply)  # back as defined: read again (the version moved), runs
    assert _run(ex, s, s.handle_base + 21) is not None and s.error is None
    assert _run(ex, s, s.handle_base + 30) is not None and s.error is None  # quiet again
    ex.execute(s, device_pb2.Command(free=device_pb2.Free(handles=[w])), _no_reply)
    data = torch.arange(12.0).numpy().tobytes()
    up = device_pb2.Upload(handle=w, meta=wire.meta_to_proto(torch.zeros(3, 4)), data=data, last=True)
    ex.execute(s, device_pb2.Command(upload=up), _no_reply)  # the handle anew: a (3, 4) tensor
    assert s.error is None and s.tensors[w].shape == (3, 4)
    assert _run(ex, s, s.handle_base + 31) is None
    assert s.error is not None and "changed shape or dtype" in s.error.message


def test_a_graph_that_reshapes_a_persistent_tensor_in_place_checks_it_on_every_run() -> None:
    """A persistent tensor that one of the graph's own ops may re-shape in place (here squeeze_) is not one whose
    check a run may skip: its version after the run says nothing about its metadata (Graph.stable)."""
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    ex = CommandExecutor(slices.SliceLedger())
    w = s.handle_base + 1
    s.bind(w, torch.ones(4, 3, 1))
    body = [op("aten::squeeze_.default", slot(2), out=(3,)), op("aten::add.Tensor", slot(1), slot(3), out=(4,))]
    msg = device_pb2.DefineGraph(
        graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(4, 3))], persistent=[w], ops=body,
        outputs=[4],
    )  # fmt: skip
    ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
    assert s.error is None
    assert ex.graphs._of(s)[1].stable == []
    assert torch.equal(_run(ex, s, s.handle_base + 10), torch.full((4, 3), 2.0))
    assert s.tensors[w].shape == (4, 3)  # the run squeezed it
    assert _run(ex, s, s.handle_base + 11) is None  # not what the graph was built for: refused, as before
    assert s.error is not None and "changed shape or dtype" in s.error.message


def test_rebind_all_does_what_rebind_does_one_by_one() -> None:
    """A run binds its outputs and kept tensors with one `rebind_all`: the same tensors, storages counted and
    bytes (session and device) as `rebind` per handle, through a handle that held a tensor, one that held a
    failure, a new one, two handles on one storage and a tensor rebound to its own storage -- and, when the
    handle limit stops it midway, the same partial state."""
    import random

    from gpupool.server.sessions import Poison

    from gpupool.errors import ResourceExhausted

    def state(s: WorkerSession) -> tuple[object, ...]:
        keys = {h: s._keys[h] for h in s.tensors}
        return (s.used, s.memory.used, {h: id(t) for h, t in s.tensors.items()}, sorted(s.poisoned), keys,
                {k: list(v) for k, v in s._storages.items()})  # fmt: skip

    rng = random.Random(7)
    for trial in range(30):
        sessions = []
        pool = [torch.zeros(rng.randint(1, 50)) for _ in range(6)]
        pool.append(pool[0][1:])  # a view: the storage of pool[0]
        limit = rng.choice([100, 4])
        for _ in range(2):
            dev = FakeDevice(0, "h", 1 << 30)
            s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28, max_handles=limit)
            for k in range(3):
                s.bind(s.handle_base + 1 + k, pool[k])
            s.poison(s.handle_base + 9, Poison.of(ResourceExhausted("x"), ""))
            sessions.append(s)
        handles = [sessions[0].handle_base + h for h in (1, 2, 3, 9, 10, 11)]
        pairs = [(rng.choice(handles), rng.choice(pool)) for _ in range(rng.randint(1, 8))]
        one, many = sessions
        failed = []
        try:
            for h, t in pairs:
                one.rebind(h, t)
        except ResourceExhausted:
            failed.append(one)
        try:
            many.rebind_all(pairs)
        except ResourceExhausted:
            failed.append(many)
        assert failed in ([], [one, many]), trial
        assert state(one) == state(many), trial
        live = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in many.tensors.values()}
        assert many.used == sum(live.values()) == many.memory.used


def test_inputs_by_value_of_every_rank_arrive_as_sent() -> None:
    """Inputs sent by value become tensors of the defined shape whatever their rank (0-d, 1-d: no view; more:
    view(*sizes)), and of their own memory: a later run's bytes never show through an earlier run's output."""
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    ex = CommandExecutor(slices.SliceLedger())
    shapes = [(), (5,), (2, 3, 4), (1, 1), (0, 3)]
    xs = [torch.randn(shape) for shape in shapes]
    body = [op("aten::clone", slot(1 + i), out=(1 + len(shapes) + i,)) for i in range(len(shapes))]
    msg = device_pb2.DefineGraph(
        graph_id=1, inputs=len(shapes), input_meta=[wire.meta_to_proto(x) for x in xs], ops=body,
        outputs=[1 + len(shapes) + i for i in range(len(shapes))],
    )  # fmt: skip
    ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
    assert s.error is None
    outs = []
    for k in range(4):  # the plain replay, then the TorchScript graph
        sent = [x + k for x in xs]
        handles = [s.handle_base + 100 + 10 * k + i for i in range(len(shapes))]
        run = device_pb2.RunGraph(graph_id=1, inputs=[0] * len(shapes), outputs=handles)
        run.input_data.extend(x.numpy().tobytes() for x in sent)
        ex.execute(s, device_pb2.Command(run_graph=run), _no_reply)
        assert s.error is None
        for h, x in zip(handles, sent, strict=True):
            got = s.tensors[h]
            assert got.shape == x.shape and got.stride() == x.stride() and torch.equal(got, x)
        outs.append((handles, sent))
    for handles, sent in outs:
        assert all(torch.equal(s.tensors[h], x) for h, x in zip(handles, sent, strict=True))


def _fused_adam_graph(grad_slot: int) -> device_pb2.DefineGraph:
    """A captured Adam(fused=True) update: the steps' increment and `_fused_adam_.tensor_lr` over persistent tensors
    (slot 2 param, 3 grad, 4 exp_avg, 5 exp_avg_sq, 6 step, 7 lr, 8 a grad of other strides), the grad scaled by
    input 1."""
    lists = {k: tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=v)) for k, v in
             {"p": [2], "g": [grad_slot], "m": [4], "v": [5], "none": [], "steps": [6]}.items()}  # fmt: skip
    body = [
        op("aten::mul_.Tensor", slot(grad_slot), slot(1)),
        op("aten::_foreach_add_.Scalar", lists["steps"], tensor_pb2.Arg(f=1.0)),
        op("aten::_fused_adam_.tensor_lr", lists["p"], lists["g"], lists["m"], lists["v"], lists["none"],
           lists["steps"], lr=slot(7), beta1=tensor_pb2.Arg(f=0.9), beta2=tensor_pb2.Arg(f=0.999),
           weight_decay=tensor_pb2.Arg(f=0.0), eps=tensor_pb2.Arg(f=1e-8), amsgrad=tensor_pb2.Arg(b=False),
           maximize=tensor_pb2.Arg(b=False)),
        op("aten::sum", slot(2), out=(9,)),
    ]  # fmt: skip
    return device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(()))],
                                  persistent=[100 + k for k in range(7)], ops=body, outputs=[9])  # fmt: skip


def test_a_captured_fused_adam_runs_as_torchscript_and_steps_as_eager_does() -> None:
    """Adam(fused=True) captured: one `_fused_adam_.tensor_lr` (its Meta kernel: gpupool/metas.py), its empty
    max_exp_avg_sqs list written into the TorchScript graph (server/graph_trace.py), its tensors stable across runs
    (it writes values only); every run steps as torch's own kernel does eagerly."""
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    ex = CommandExecutor(slices.SliceLedger())
    ex.exclusive_rng = True  # as in a session's worker process: graphs may run as TorchScript
    start = [torch.randn(5, 3), torch.randn(5, 3), torch.zeros(5, 3), torch.zeros(5, 3), torch.zeros(()),
             torch.tensor(0.01), torch.randn(3, 5).t()]  # fmt: skip
    handles = [s.handle_base + 100 + k for k in range(7)]
    for h, t in zip(handles, start, strict=True):
        s.bind(h, t.clone())
    msg = _fused_adam_graph(3)
    msg.persistent[:] = handles
    ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
    assert s.error is None, s.error
    g = ex.graphs._of(s)[1]
    assert g.stable == list(range(7))
    want = [t.clone() for t in start]
    for k in range(4):  # the first run is the Python replay, the next ones the TorchScript graph
        run = device_pb2.RunGraph(graph_id=1, inputs=[0], outputs=[s.handle_base + 10 + k])
        run.input_data.append(torch.tensor(1.0 + k).numpy().tobytes())
        ex.execute(s, device_pb2.Command(run_graph=run), _no_reply)
        assert s.error is None, s.error
        p, grad, m, v, step, lr, _ = want
        grad.mul_(1.0 + k)
        torch._foreach_add_([step], 1.0)
        torch._fused_adam_([p], [grad], [m], [v], [], [step], lr=lr, beta1=0.9, beta2=0.999, weight_decay=0.0,
                           eps=1e-8, amsgrad=False, maximize=False)  # fmt: skip
        for h, t in zip(handles, want, strict=True):
            assert torch.equal(s.tensors[h], t)
        assert torch.equal(s.tensors[s.handle_base + 10 + k], p.sum())
    assert g.traced is not None  # runs 2-4 were the TorchScript graph's


def test_a_fused_adam_over_a_grad_of_other_strides_is_refused_at_definition() -> None:
    """torch's CPU kernel walks every list's tensors as its parameter's contiguous elements: a grad with other
    strides (here transposed) would be read in the wrong order, an expanded or shorter one past its storage."""
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    ex = CommandExecutor(slices.SliceLedger())
    handles = [s.handle_base + 100 + k for k in range(7)]
    for h, t in zip(handles, [torch.randn(5, 3), torch.randn(5, 3), torch.zeros(5, 3), torch.zeros(5, 3),
                              torch.zeros(()), torch.tensor(0.01), torch.randn(3, 5).t()], strict=True):  # fmt: skip
        s.bind(h, t)
    msg = _fused_adam_graph(8)
    msg.persistent[:] = handles
    ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
    assert s.error is not None and "must match its parameter" in s.error.message


def test_outputs_over_one_new_storage_keep_each_others_values() -> None:
    """Several outputs bound at once over one new storage larger than each (a captured step returning `y[0]` and
    `y[1]`; an op's several results): the bytes outside ALL of their extents are zeroed, never another output's
    (round 35: zeroed output by output, binding `y[0]` first wiped `y[1]`); a `written_whole` result's storage
    (fused attention's `philox_seed`: its generator state and kept softmax under a 0-d view) is left whole; a lone
    view still gets the rest of its new storage zeroed."""
    from gpupool.server.opargs import written_whole

    for way in ("rebind_all", "bind_outputs"):
        dev = FakeDevice(0, "h", 1 << 30)
        s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
        y = torch.arange(1.0, 13.0).reshape(3, 4)  # rows 0 and 2 bound, row 1 nobody's
        state = torch.arange(1, 9, dtype=torch.int64)
        seed = written_whole(state.as_strided([], [], 0))
        lone = torch.arange(1.0, 9.0)[2:4]
        pairs = [(s.handle_base + 1, y[0]), (s.handle_base + 2, y[2]), (s.handle_base + 3, seed),
                 (s.handle_base + 4, lone)]  # fmt: skip
        getattr(s, way)(pairs)
        assert s.tensors[s.handle_base + 1].tolist() == [1.0, 2.0, 3.0, 4.0], way
        assert s.tensors[s.handle_base + 2].tolist() == [9.0, 10.0, 11.0, 12.0], way
        assert y[1].tolist() == [0.0] * 4, way  # between them, no output's: zeroed
        assert state.tolist() == list(range(1, 9)), way
        assert lone.untyped_storage().nbytes() == 32 and lone.tolist() == [3.0, 4.0], way
        whole = torch.empty(0).set_(lone.untyped_storage(), 0, (8,), (1,))
        assert whole.tolist() == [0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0], way


def test_a_graphs_trace_goes_in_pieces_the_device_serves_others_between() -> None:
    """Round 38 (gmem38): a graph's trace to TorchScript (its second run, graph_trace.trace) was one command: its
    dry run's meta kernels cost about what its definition's, which go in pieces, and a graph of 20,000 ops held the
    device's thread 37 s at load 11 (a neighbour's op waited as long). Now the RunGraph that traces goes in pieces
    as a definition does (`s.defining` holds the rest; slices.run_commands runs the same command again in the
    session's next slice): counted, not timed, here with a budget that ends each slice after one piece. No slice
    writes more than graph_trace.DRY_PIECE of the graph's ops; the run binds its output only after the last one, with
    the Python replay's values, and the graph runs traced from then on. On 285a6ed all 3 x PIECE + 5 ops were
    written in one command."""
    from gpupool.server import graph_trace

    n = 3 * graph_trace.PIECE + 5
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    ex = CommandExecutor(slices.SliceLedger())
    ex.exclusive_rng = True  # as in a session's worker process: graphs may run as TorchScript
    ex.graphs.piece_seconds = 1e-9  # as a worker's (graph.DEFINE_PIECE_SECONDS), past after each piece
    body = [
        op("aten::mul.Tensor", slot(i + 1), tensor_pb2.Arg(f=2.0 if i % 2 else 0.5), out=(i + 2,)) for i in range(n)
    ]
    msg = device_pb2.DefineGraph(
        graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(4))], ops=body, outputs=[n + 1]
    )
    written = [0]
    node = graph_trace._Builder.node

    def counted(self: Any, kind: str, inputs: list[Any], outputs: int) -> Any:
        written[0] += kind.startswith("aten::")
        return node(self, kind, inputs, outputs)

    x = s.handle_base + 1
    s.bind(x, torch.tensor([1.0, -2.0, 0.5, 3.0]))
    while True:  # the definition, in pieces too
        ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
        if s.defining is None:
            break
    assert s.error is None, s.error
    want = s.tensors[x]
    for i in range(n):
        want = want * (2.0 if i % 2 else 0.5)
    g = ex.graphs._of(s)[1]
    per_slice: list[int] = []
    graph_trace._Builder.node = counted  # type: ignore[method-assign]
    try:
        for k in range(3):
            out = s.handle_base + 10 + k
            run = device_pb2.Command(run_graph=device_pb2.RunGraph(graph_id=1, inputs=[x], outputs=[out]))
            while True:
                written[0] = 0
                ex.execute(s, run, _no_reply)
                assert s.error is None, s.error
                if k == 1:
                    per_slice.append(written[0])
                if s.defining is None:
                    break
                assert out not in s.tensors  # nothing of the run yet
            assert torch.equal(s.tensors[out], want), k
            assert (g.traced is not None) == (k >= 1)
    finally:
        graph_trace._Builder.node = node  # type: ignore[method-assign]
    assert sum(per_slice) == n and max(per_slice) <= graph_trace.DRY_PIECE, per_slice
    assert len(per_slice) >= n // graph_trace.DRY_PIECE, per_slice


def test_a_graph_past_the_trace_node_limit_keeps_the_python_replay(monkeypatch: Any) -> None:
    """Round 38 (gmem38): TorchScript compiles a graph at its first call, one command that pieces cannot split
    (~120 us a node at load 20: 0.93 s for 8,000 nodes); a graph of more than graph_trace.TRACE_MAX_NODES calls is
    not traced, and one whose calls are fewer but whose nodes (constants included) are more is refused after its
    dry run: both keep the Python replay, with its values (here with the limit at 40 nodes)."""
    from gpupool.server import graph_trace

    monkeypatch.setattr(graph_trace, "TRACE_MAX_NODES", 40)
    for n, traced in ((41, False), (30, False), (12, True)):  # 30 `mul`s: 30 calls, 30 constants (the factors)
        dev = FakeDevice(0, "h", 1 << 30)
        s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
        ex = CommandExecutor(slices.SliceLedger())
        ex.exclusive_rng = True
        body = [
            op("aten::mul.Tensor", slot(i + 1), tensor_pb2.Arg(f=2.0 if i % 2 else 0.5), out=(i + 2,)) for i in range(n)
        ]
        msg = device_pb2.DefineGraph(
            graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(4))], ops=body, outputs=[n + 1]
        )
        ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
        x = s.handle_base + 1
        s.bind(x, torch.tensor([1.0, -2.0, 0.5, 3.0]))
        want = s.tensors[x] * (0.5 if n % 2 else 1.0)
        for k in range(3):
            out = s.handle_base + 10 + k
            ex.execute(s, device_pb2.Command(run_graph=device_pb2.RunGraph(graph_id=1, inputs=[x], outputs=[out])),
                       _no_reply)  # fmt: skip
            assert s.error is None, s.error
            assert torch.equal(s.tensors[out], want), (n, k)
        g = ex.graphs._of(s)[1]
        assert (g.traced is not None) == traced and g.trace_refused != traced, n


def test_a_python_replay_past_the_trace_limit_goes_in_pieces_with_the_same_results(monkeypatch: Any) -> None:
    """Round 39: a graph the trace refuses (more than graph_trace.TRACE_MAX_NODES calls) kept the Python replay as
    one command a run: 20,000 `neg`s held the device's thread 0.26-0.60 s, every other session of the device waiting.
    Now a session worker's replay of more than graph.REPLAY_PIECE_CALLS calls goes in pieces (`s.defining` holds the
    rest; slices.run_commands runs the same RunGraph again first in the session's next slice): counted here with a
    budget that ends each slice after one piece. No slice calls more than REPLAY_PIECE_CALLS kernels; the outputs
    are bound only after the last piece, with the values and the errors (the op named in the whole graph, the
    outputs poisoned, the session going on) of a replay in one command. On 1344c19 all of a run's calls were one
    command."""
    from gpupool.server import graph, graph_trace

    monkeypatch.setattr(graph_trace, "TRACE_MAX_NODES", 40)
    n = 3 * graph.REPLAY_PIECE_CALLS + 5
    bad = 2 * graph.REPLAY_PIECE_CALLS + 3  # an index_select in the third piece, its index the run's second input
    body = [
        op("aten::mul.Tensor", slot(i + 2 if i else 1), tensor_pb2.Arg(f=2.0 if i % 2 else 0.5), out=(i + 3,))
        if i != bad
        else op("aten::index_select.default", slot(i + 2), tensor_pb2.Arg(i=0), slot(2), out=(i + 3,))
        for i in range(n)  # a chain: each op reads the one before
    ]
    meta = [wire.meta_to_proto(torch.ones(4)), wire.meta_to_proto(torch.zeros(4, dtype=torch.long))]
    msg = device_pb2.DefineGraph(graph_id=1, inputs=2, input_meta=meta, ops=body, outputs=[n + 2])
    calls: list[int] = []
    execute = graph.execute

    def counted(g: Any, slots: list[Any], plan: list[Any] | None = None, start: int = 0) -> None:
        calls.append(len(plan or g.plan))
        execute(g, slots, plan, start)

    monkeypatch.setattr(graph, "execute", counted)

    def runs(piece_seconds: float) -> tuple[list[Any], list[int]]:
        dev = FakeDevice(0, "h", 1 << 30)
        s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
        ex = CommandExecutor(slices.SliceLedger())
        ex.exclusive_rng = True  # as in a session's worker process: graphs may run as TorchScript
        ex.graphs.piece_seconds = piece_seconds
        x, idx, bad_idx = s.handle_base + 1, s.handle_base + 2, s.handle_base + 3
        s.bind(x, torch.tensor([1.0, -2.0, 0.5, 3.0]))
        s.bind(idx, torch.tensor([3, 2, 1, 0]))
        s.bind(bad_idx, torch.tensor([0, 1, 2, 9]))
        while True:
            ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
            if s.defining is None:
                break
        assert s.error is None, s.error
        seen: list[Any] = []
        slices_calls: list[list[int]] = []
        for k, i in enumerate((idx, idx, bad_idx, idx)):
            out = s.handle_base + 10 + k
            run = device_pb2.Command(run_graph=device_pb2.RunGraph(graph_id=1, inputs=[x, i], outputs=[out]))
            while True:
                calls.clear()
                ex.execute(s, run, _no_reply)
                slices_calls.append(sum(calls))
                if s.defining is None:
                    break
                assert s.error is None and out not in s.tensors and out not in s.poisoned  # nothing of the run yet
            if s.error is not None:
                seen.append((s.error.code, s.error.message, out in s.poisoned))
                s.error = None
            else:
                seen.append(s.tensors[out].clone())
        assert ex.graphs._of(s)[1].trace_refused
        return seen, slices_calls

    whole, one = runs(0.0)
    pieces, sliced = runs(1e-9)
    assert one == [n] * 4  # a command a run
    piece = graph.REPLAY_PIECE_CALLS
    assert max(sliced) <= piece and 0 not in sliced and sum(sliced) == 3 * n + (bad // piece + 1) * piece, sliced
    assert len(whole) == len(pieces) == 4
    for a, b in zip(whole, pieces, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b and a[2] and f"op {bad} (aten::index_select" in a[1], (a, b)
