"""Which captured steps may become CUDA graphs (server/graph_cuda.py) and the value guards that then run before each
replay, on graphs defined through a real executor and session on a fake GPU: the decisions are device-independent,
and so is the pre-replay guard path, which runs here on the CPU graphs' real tensors. The capture and replay
themselves need a GPU: the tests at the end run only where CUDA is (bench/real_gpu.sh runs this file there)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from gpupool.server import graph, graph_cuda, guards, slices
from gpupool.server.devices import Device, FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession
from test_server_graph import _no_reply, op, slot

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2
from gpupool.errors import InvalidArgument

VOCAB, DIM = 10, 3


def _session(device: Device | None = None, exclusive: bool = True) -> tuple[CommandExecutor, WorkerSession]:
    dev = device or FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    ex = CommandExecutor(slices.SliceLedger())
    ex.exclusive_rng = exclusive
    return ex, s


def _define(ex: CommandExecutor, s: WorkerSession, body: list[device_pb2.Op], inputs: list[torch.Tensor],
            persistent: list[int], outputs: list[int]) -> graph.Graph:  # fmt: skip
    msg = device_pb2.DefineGraph(
        graph_id=1, inputs=len(inputs), input_meta=[wire.meta_to_proto(t) for t in inputs], persistent=persistent,
        ops=body, outputs=outputs,
    )  # fmt: skip
    ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
    assert s.error is None, s.error
    return ex.graphs._of(s)[1]


def _backward(indices: int) -> device_pb2.Op:
    """The embedding's backward of slot 3 (the gradient) at the indices in slot `indices`: a value guard."""
    return op("aten::embedding_dense_backward", slot(3), slot(indices), tensor_pb2.Arg(i=VOCAB), tensor_pb2.Arg(i=-1),
              tensor_pb2.Arg(b=False), out=(4,))  # fmt: skip


def _embedding_graph(ex: CommandExecutor, s: WorkerSession, w: int) -> graph.Graph:
    """Input 1: indices (4 x 5); persistent 2: the table; the lookup (3) and its backward (4) at input 1."""
    body = [op("aten::embedding", slot(2), slot(1), out=(3,)), _backward(1)]
    return _define(ex, s, body, [torch.zeros(4, 5, dtype=torch.long)], [w], [4])


def _slots(g: graph.Graph, s: WorkerSession, inputs: list[torch.Tensor]) -> list[Any]:
    slots: list[Any] = [None] * g.n_slots
    for i, t in enumerate(inputs):
        slots[i + 1] = t
    for at, h, _ in g.externals:
        slots[at] = s.tensors[h]
    return slots


def test_a_guard_on_the_steps_own_input_runs_before_the_replay_on_that_input() -> None:
    ex, s = _session()
    w = s.handle_base + 1
    s.bind(w, torch.randn(VOCAB, DIM))
    g = _embedding_graph(ex, s, w)
    assert graph_cuda.refusal(ex, g) is None
    checks, why = graph_cuda.pre_guards(ex, g)
    assert why is None and checks is not None and len(checks) == 1
    assert g.cuda_verdict[1] is None and g.cuda_verdict[0].items[0][5] == checks.items[0][5]
    assert graph_cuda.describe(g.cuda_verdict) == "a CUDA graph may hold it (1 value guards before each replay)"
    (index, name, _, _, _, picks) = checks.items[0]
    assert (index, name, picks) == (1, "aten::embedding_dense_backward", [(True, 1, 1)])  # position 1 <- input slot 1
    good = torch.randint(0, VOCAB, (4, 5))
    checks.run(_slots(g, s, [good]))  # passes
    # meta tensors stand in for what the guard reads the shape of (the step's gradient, slot 3); the pick puts the
    # run's indices in place of the meta ones at position 1
    assert checks.items[0][3][0].is_meta and tuple(checks.items[0][3][0].shape) == (4, 5, DIM)
    for bad in (VOCAB, -1):
        indices = good.clone()
        indices[2, 3] = bad
        with pytest.raises(InvalidArgument) as before_replay:
            checks.run(_slots(g, s, [indices]))
        # what the eager replay's guard says at that op (graph.execute names it so), on the real gradient
        with pytest.raises(InvalidArgument) as eager:
            g.calls[1].check([torch.zeros(4, 5, DIM), indices, VOCAB, -1, False], {})
        assert before_replay.value.message == f"graph 1 op 1 (aten::embedding_dense_backward): {eager.value.message}"
        assert "indices must lie in [0, 10)" in eager.value.message
        # an input sent by value is checked as it came (on the CPU), not as the device holds it
        with pytest.raises(InvalidArgument, match="indices must lie"):
            checks.run(_slots(g, s, [good]), {1: indices})
        checks.run(_slots(g, s, [indices]), {1: good})


def test_the_replay_without_guards_computes_what_the_guarded_replay_does() -> None:
    """What a capture records: the plan with its value guards taken out (they ran before), nothing else changed."""
    ex, s = _session()
    w = s.handle_base + 1
    s.bind(w, torch.randn(VOCAB, DIM))
    g = _embedding_graph(ex, s, w)
    plan = graph_cuda.unguarded_plan(g)
    assert [step[7] is None for step in plan] == [True, True] and g.plan[1][7] is not None
    assert [step[:7] + step[8:] for step in plan] == [step[:7] + step[8:] for step in g.plan]
    indices = torch.randint(0, VOCAB, (4, 5))
    eager, guarded = _slots(g, s, [indices]), _slots(g, s, [indices])
    graph.execute(g, eager)
    checks, _ = graph_cuda.pre_guards(ex, g)
    assert checks is not None
    checks.run(guarded)
    graph.execute(g, guarded, plan)
    assert torch.equal(eager[4], guarded[4])
    indices[0, 0] = VOCAB  # unguarded, a bad index reaches the kernel: only the guards before the replay stop it
    with pytest.raises(InvalidArgument, match="indices must lie"):
        checks.run(_slots(g, s, [indices]))


def test_a_guard_on_a_persistent_tensor_runs_before_the_replay_unless_the_step_writes_it() -> None:
    ex, s = _session()
    w, idx = s.handle_base + 1, s.handle_base + 2
    s.bind(w, torch.randn(VOCAB, DIM))
    s.bind(idx, torch.randint(0, VOCAB, (4, 5)))
    x = torch.zeros(4, 5, dtype=torch.long)
    body = [op("aten::embedding", slot(3), slot(2), out=(4,)), _backward(2)]
    body[1].args[0].tensor = 4  # the gradient: the lookup
    body[1].outputs[0] = 5
    g = _define(ex, s, body, [x], [idx, w], [5])
    checks, why = graph_cuda.pre_guards(ex, g)
    assert why is None and checks is not None and checks.items[0][5] == [(True, 1, 2)]  # the persistent indices
    checks.run(_slots(g, s, [x]))
    s.tensors[idx][1, 1] = VOCAB
    with pytest.raises(InvalidArgument, match="indices must lie"):
        checks.run(_slots(g, s, [x]))
    # the same step, then the indices moved in place (the step writes them: their value at the backward is not theirs
    # at the start of the run)
    s.tensors[idx][1, 1] = 0
    body.append(op("aten::add_.Scalar", slot(2), tensor_pb2.Arg(i=1), out=(6,)))
    g = _define(ex, s, body, [x], [idx, w], [5])
    assert g.written == frozenset({2})
    checks, why = graph_cuda.pre_guards(ex, g)
    assert checks is None and why == (
        "the value guard of aten::embedding_dense_backward (op 1) reads slot 2, which an op of the step writes"
    )


def test_a_view_written_in_place_counts_as_writing_what_it_views() -> None:
    ex, s = _session()
    w = s.handle_base + 1
    s.bind(w, torch.randn(VOCAB, DIM))
    body = [
        op("aten::embedding", slot(2), slot(1), out=(3,)),
        _backward(1),
        op("aten::view", slot(1), tensor_pb2.Arg(ints=tensor_pb2.IntList(values=[20])), out=(5,)),
        op("aten::zero_", slot(5), out=(6,)),  # the input's storage, through its view
    ]
    g = _define(ex, s, body, [torch.zeros(4, 5, dtype=torch.long)], [w], [4])
    assert g.written == frozenset({1})
    checks, why = graph_cuda.pre_guards(ex, g)
    assert checks is None and why is not None and "reads slot 1, which an op of the step writes" in why


def _mm_graphs(ex: CommandExecutor, s: WorkerSession, device: str = "cpu") -> dict[int, graph.Graph]:
    """Graphs 1 and 2: x @ w for an x of 32 and of 128 rows (persistent w, 64 x 64): two peaks."""
    w = s.handle_base + 1
    s.bind(w, torch.randn(64, 64, device=device))
    for graph_id, rows in ((1, 32), (2, 128)):
        x = torch.ones(rows, 64)
        msg = device_pb2.DefineGraph(
            graph_id=graph_id, inputs=1, input_meta=[wire.meta_to_proto(x)], persistent=[w],
            ops=[op("aten::mm", slot(1), slot(2), out=(3,))], outputs=[3],
        )  # fmt: skip
        ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
        assert s.error is None, s.error
    return ex.graphs._of(s)


def test_each_graph_captured_as_a_cuda_graph_counts_its_whole_peak_in_the_sessions_memory() -> None:
    """Eager graphs run one at a time (the largest peak counts); a capture's private pool holds its graph's peak for
    as long as it lives: every captured graph counts, on top of the largest eager one."""
    ex, s = _session()
    graphs = _mm_graphs(ex, s)
    r1, r2 = graphs[1].reserve, graphs[2].reserve
    assert 0 < r1 < r2
    tensors = s.used - ex.graphs.reserved(s)
    assert ex.graphs.reserved(s) == r2
    ex.graphs._reserve(s, graphs, capture=graphs[1])  # what graph_cuda.run asks before capturing graph 1
    assert ex.graphs.reserved(s) == r1 + r2 and s.used == tensors + r1 + r2
    graphs[1].cuda = object()  # captured
    ex.graphs._reserve(s, graphs)
    assert ex.graphs.reserved(s) == r1 + r2
    graphs[2].cuda = object()
    ex.graphs._reserve(s, graphs)
    assert ex.graphs.reserved(s) == r1 + r2
    graphs[1].cuda = None  # its replay found a persistent tensor moved: eager again, its capture gone
    ex.graphs._reserve(s, graphs)
    assert ex.graphs.reserved(s) == r2 + r1
    ex.execute(s, device_pb2.Command(drop_graph=device_pb2.DropGraph(graph_id=2)), _no_reply)
    assert ex.graphs.reserved(s) == r1 and s.used == tensors + r1


def test_a_capture_its_sessions_quota_has_no_room_for_is_not_made(caplog: pytest.LogCaptureFixture) -> None:
    ex, s = _session()
    graphs = _mm_graphs(ex, s)
    r1, r2 = graphs[1].reserve, graphs[2].reserve
    s.bind(s.handle_base + 2, torch.empty(s.quota - s.used - r1 + 1, dtype=torch.uint8))  # room for less than r1
    slots = _slots(graphs[1], s, [torch.ones(32, 64)])

    def hold(capture: graph.Graph | None) -> None:
        ex.graphs._reserve(s, graphs, capture=capture)

    with caplog.at_level("INFO", logger="gpupool.server.graph_cuda"):
        graph_cuda.run(ex, s, graphs[1], slots, graph.execute, None, hold)
    assert "graph 1 stays eager on CUDA: memory quota exceeded" in caplog.text
    assert graphs[1].cuda is None and graphs[1].cuda_failed and ex.graphs.reserved(s) == r2
    assert torch.equal(slots[3], torch.ones(32, 64) @ s.tensors[s.handle_base + 1])  # the eager replay ran


def _aliasing_graph(ex: CommandExecutor, s: WorkerSession, add: int = 10, device: str = "cpu") -> tuple[
    graph.Graph, int, int
]:  # fmt: skip
    """Persistent 2: indices the lookup and the backward's guard read; persistent 4: a tensor the step adds `add` to
    in place between them, distinct from the indices at the definition."""
    w, idx, b = s.handle_base + 1, s.handle_base + 2, s.handle_base + 3
    s.bind(w, torch.randn(VOCAB, DIM, device=device))
    s.bind(idx, torch.randint(0, VOCAB, (4, 5), device=device))
    s.bind(b, torch.zeros(4, 5, dtype=torch.long, device=device))
    body = [
        op("aten::embedding", slot(3), slot(2), out=(5,)),
        op("aten::add_.Scalar", slot(4), tensor_pb2.Arg(i=add), out=(6,)),
        _backward(2),
    ]
    body[2].args[0].tensor = 5  # the gradient: the lookup
    body[2].outputs[0] = 7
    g = _define(ex, s, body, [torch.zeros(4, 5, dtype=torch.long)], [idx, w, b], [7])
    return g, idx, b


def test_a_guard_on_a_persistent_tensor_another_persistent_handle_now_views_and_the_step_writes_refuses_a_capture() -> (
    None
):
    """The definition saw two storages; the handle the step writes may name a view of the guarded indices by the
    capture (an eager `alias` bound to it): the guard before the replay would then pass on indices the step makes bad
    before the backward reads them, which only the eager replay's guard (at the op) sees."""
    ex, s = _session()
    g, idx, b = _aliasing_graph(ex, s)
    assert g.written == frozenset({4})
    checks, why = graph_cuda.pre_guards(ex, g)
    assert why is None and checks is not None and checks.items[0][5] == [(True, 1, 2)]
    assert checks.aliased(g, _slots(g, s, [torch.zeros(4, 5, dtype=torch.long)])) is None  # distinct: hoisting holds
    s.bind(b, s.tensors[idx].view(4, 5))  # what an eager aten::alias / view with output handle b does
    slots = _slots(g, s, [torch.zeros(4, 5, dtype=torch.long)])
    checks.run(slots)  # the indices are good at the start of the run...
    with pytest.raises(InvalidArgument, match="indices must lie"):
        graph.execute(g, list(slots))  # ...and bad at the backward: the eager replay refuses them there
    assert checks.aliased(g, slots) == (
        "the value guard of aten::embedding_dense_backward (op 2) reads slot 2, a persistent tensor whose storage the "
        "step writes through another persistent tensor"
    )


def test_a_replay_needs_each_persistent_tensor_in_the_storage_it_had_at_the_capture() -> None:
    """A capture's kernels may touch any byte of a persistent tensor's storage (a view reaching past the tensor):
    the same first address in a smaller storage (what a fresh allocation where the old storage began has) is not
    the same place."""
    ex, s = _session()
    w = s.handle_base + 1
    whole = torch.randn(64)
    s.bind(w, whole[:9].view(3, 3))
    g = _define(ex, s, [op("aten::mm", slot(1), slot(2), out=(3,))], [torch.ones(2, 3)], [w], [3])
    at_capture = graph_cuda.places(g, _slots(g, s, [torch.ones(2, 3)]))
    assert at_capture == [(whole.data_ptr(), whole.data_ptr(), 64 * 4)]
    s.bind(w, whole[:9].clone().view(3, 3))
    assert graph_cuda.places(g, _slots(g, s, [torch.ones(2, 3)])) != at_capture  # moved: the address differs too
    # the same first byte, in a storage of its own 36 bytes long (not the 256 the capture's kernels may reach)
    s.bind(w, torch.frombuffer(wire.host_bytes(whole[:9]), dtype=torch.float32).view(3, 3))
    same_start = graph_cuda.places(g, _slots(g, s, [torch.ones(2, 3)]))
    assert s.tensors[w].data_ptr() == whole.data_ptr() and same_start != at_capture
    s.bind(w, whole[:9].view(3, 3))
    assert graph_cuda.places(g, _slots(g, s, [torch.ones(2, 3)])) == at_capture


def test_a_guard_on_a_value_the_step_computes_keeps_the_graph_eager() -> None:
    ex, s = _session()
    w = s.handle_base + 1
    s.bind(w, torch.randn(VOCAB, DIM))
    body = [
        op("aten::add.Scalar", slot(1), tensor_pb2.Arg(i=0), out=(3,)),  # indices computed in the step
        op("aten::embedding", slot(2), slot(3), out=(4,)),
        op("aten::embedding_dense_backward", slot(4), slot(3), tensor_pb2.Arg(i=VOCAB), tensor_pb2.Arg(i=-1),
           tensor_pb2.Arg(b=False), out=(5,)),
    ]  # fmt: skip
    g = _define(ex, s, body, [torch.zeros(4, 5, dtype=torch.long)], [w], [5])
    checks, why = graph_cuda.pre_guards(ex, g)
    assert checks is None
    assert why == "the value guard of aten::embedding_dense_backward (op 2) reads slot 3, which the step computes"
    # decided at the definition already (every device), and said in its log line
    assert g.cuda_verdict == (None, why)
    assert graph_cuda.describe(g.cuda_verdict) == f"no CUDA graph: {why}"


def test_a_step_without_value_guards_has_none_to_run() -> None:
    ex, s = _session()
    w = s.handle_base + 1
    s.bind(w, torch.randn(3, 3))
    g = _define(ex, s, [op("aten::mm", slot(1), slot(2), out=(3,))], [torch.ones(2, 3)], [w], [3])
    checks, why = graph_cuda.pre_guards(ex, g)
    assert why is None and checks is not None and len(checks) == 0
    assert g.written == frozenset()


def _dropout_graph(ex: CommandExecutor, s: WorkerSession) -> graph.Graph:
    body = [op("aten::native_dropout", slot(1), tensor_pb2.Arg(f=0.5), tensor_pb2.Arg(b=True), out=(2, 3))]
    return _define(ex, s, body, [torch.ones(8, 8)], [], [2])


def test_random_ops_may_be_captured_only_in_a_sessions_own_process() -> None:
    ex, s = _session(exclusive=True)
    g = _dropout_graph(ex, s)
    assert g.calls[0].seeded and graph_cuda.refusal(ex, g) is None
    ex, s = _session(exclusive=False)  # --isolation thread: each random op swaps the session's state in and out
    g = _dropout_graph(ex, s)
    assert graph_cuda.refusal(ex, g) == (
        "it draws random numbers and sessions share this process (each random op swaps generator states)"
    )


def _attention_graph(ex: CommandExecutor, s: WorkerSession, p: float) -> graph.Graph:
    q = torch.ones(2, 2, 4, 8)
    body = [
        op("aten::_scaled_dot_product_fused_attention_overrideable", slot(1), slot(2), slot(3),
           dropout_p=tensor_pb2.Arg(f=p), out=(4,)),
    ]  # fmt: skip
    return _define(ex, s, body, [q, q, q], [], [4])


def test_a_fused_attention_with_dropout_is_refused_before_any_capture() -> None:
    ex, s = _session()
    g = _attention_graph(ex, s, 0.1)
    why = graph_cuda.refusal(ex, g)
    assert why is not None and "with dropout reads and sets generator states on the host" in why
    assert graph_cuda.refusal(ex, _attention_graph(ex, s, 0.0)) is None  # without dropout: a plain kernel


def test_every_value_guard_says_which_arguments_it_reads_the_values_of() -> None:
    """A guard left out of VALUE_READS would only keep its graphs eager on CUDA; none is."""
    assert set(guards.VALUE_READS) == set(guards.VALUE_GUARDS)
    for name, reads in guards.VALUE_READS.items():
        schema = torch._C._get_schema(name, "")
        for pos, arg_name in reads:
            assert schema.arguments[pos].name == arg_name or name == "aten::_embedding_bag_backward", (name, pos)


def test_a_guard_reading_meta_tensors_for_shapes_and_real_ones_for_values_refuses_what_the_eager_guard_does() -> None:
    """The max-pool backward's guard: the gradient and input (shapes only) as meta tensors, the indices real."""
    grad, x = torch.empty(1, 2, 3, 3, device="meta"), torch.empty(1, 2, 6, 6, device="meta")
    op_ = torch.ops.aten.max_pool2d_with_indices_backward.default
    indices = torch.randint(0, 36, (1, 2, 3, 3))
    args = [grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices]
    guards.validate(op_, args, {}, 1 << 40)
    indices[0, 1, 2, 2] = 36
    with pytest.raises(InvalidArgument, match="indices must lie"):
        guards.validate(op_, args, {}, 1 << 40)
    args[7] = indices.to("meta")  # the dry run at definition: no values, nothing to refuse
    guards.validate(op_, args, {}, 1 << 40)


# ---- on a real GPU ----

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_session() -> tuple[CommandExecutor, WorkerSession]:
    from gpupool.server.devices import CudaDevice

    return _session(CudaDevice(0))


def _run(ex: CommandExecutor, s: WorkerSession, inputs: list[torch.Tensor], outputs: list[int]) -> list[torch.Tensor]:
    run = device_pb2.RunGraph(graph_id=1, inputs=[0] * len(inputs), outputs=outputs)
    for t in inputs:
        run.input_data.append(t.numpy().tobytes())
    ex.execute(s, device_pb2.Command(run_graph=run), _no_reply)
    assert s.error is None, s.error
    return [s.tensors[h].cpu() for h in outputs]


@cuda
def test_a_dropout_step_becomes_a_cuda_graph_that_draws_what_eager_draws_from_the_same_seed() -> None:
    ex, s = _cuda_session()
    g = _dropout_graph(ex, s)
    out = s.handle_base + 100
    x = torch.ones(8, 8)
    ex._seed(s, 1234)
    captured = [_run(ex, s, [x], [out + k])[0] for k in range(5)]
    assert g.cuda is not None and not g.cuda_failed
    assert len({tuple(t.flatten().tolist()) for t in captured}) == 5  # fresh numbers every replay
    ex2, s2 = _cuda_session()
    g2 = _dropout_graph(ex2, s2)
    g2.cuda_failed = True  # the eager replay throughout
    ex2._seed(s2, 1234)
    eager = [_run(ex2, s2, [x], [s2.handle_base + 100 + k])[0] for k in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(captured, eager, strict=True))
    ex._seed(s, 1234)  # torch.manual_seed between replays: the stream starts again
    assert torch.equal(_run(ex, s, [x], [out + 10])[0], captured[0])


@cuda
def test_an_embedding_step_becomes_a_cuda_graph_and_refuses_bad_indices_before_its_replay() -> None:
    ex, s = _cuda_session()
    w = s.handle_base + 1
    s.bind(w, torch.randn(VOCAB, DIM, device="cuda"))
    g = _embedding_graph(ex, s, w)
    good = torch.randint(0, VOCAB, (4, 5))
    for k in range(4):
        (grad,) = _run(ex, s, [good], [s.handle_base + 100 + k])
    assert g.cuda is not None
    want = torch.ops.aten.embedding_dense_backward(s.tensors[w].cpu()[good], good, VOCAB, -1, False)
    assert torch.allclose(grad, want)
    bad = good.clone()
    bad[0, 0] = VOCAB
    run = device_pb2.RunGraph(graph_id=1, inputs=[0], outputs=[s.handle_base + 200])
    run.input_data.append(bad.numpy().tobytes())
    ex.execute(s, device_pb2.Command(run_graph=run), _no_reply)
    assert s.error is not None and "indices must lie" in str(s.error)
    s.error = None
    _run(ex, s, [good], [s.handle_base + 201])  # the session and the graph go on
    assert g.cuda is not None


@cuda
def test_a_step_whose_guarded_indices_another_persistent_handle_views_is_not_captured() -> None:
    for aliased in (False, True):
        ex, s = _cuda_session()
        g, idx, b = _aliasing_graph(ex, s, add=0, device="cuda")
        if aliased:
            s.bind(b, s.tensors[idx].view(4, 5))
        for k in range(4):
            _run(ex, s, [torch.zeros(4, 5, dtype=torch.long)], [s.handle_base + 100 + k])
        assert (g.cuda is None and g.cuda_failed) == aliased


@cuda
def test_another_thread_allocates_and_syncs_while_a_capture_is_under_way() -> None:
    """What the process's other threads do meanwhile (an NCCL watchdog, --isolation thread's other devices and
    collectives) neither fails nor spoils the capture: the other thread's calls run inside the capture's body, by
    causality (events), not by timing."""
    ex, s = _cuda_session()
    t = torch.ones(4, device="cuda")
    go, done = threading.Event(), threading.Event()
    seen: list[Any] = []

    def other() -> None:
        go.wait(60)
        try:
            fresh = torch.empty(3 << 20, dtype=torch.uint8, device="cuda")  # a size of its own: a new allocation
            seen.append(float(torch.ones(2, device="cuda").sum()) + fresh.numel() * 0)  # a copy to the host: a sync
        except Exception as exc:
            seen.append(exc)
        finally:
            done.set()

    def body() -> None:
        t.mul_(2)
        go.set()
        assert done.wait(60)

    thread = threading.Thread(target=other)
    thread.start()
    g = graph_cuda.capture(ex, s, torch.device("cuda", 0), body, False)
    thread.join()
    assert seen == [2.0]
    g.replay()
    assert float(t.sum()) == 8.0  # the capture recorded the kernel without running it; the replay ran it once


@cuda
def test_every_capture_counts_in_the_sessions_memory() -> None:
    ex, s = _cuda_session()
    graphs = _mm_graphs(ex, s, "cuda")
    for graph_id, rows in ((1, 32), (2, 128)):
        for k in range(3):
            run = device_pb2.RunGraph(graph_id=graph_id, inputs=[0], outputs=[s.handle_base + 100 + k])
            run.input_data.append(torch.ones(rows, 64).numpy().tobytes())
            ex.execute(s, device_pb2.Command(run_graph=run), _no_reply)
            assert s.error is None, s.error
    assert graphs[1].cuda is not None and graphs[2].cuda is not None
    assert ex.graphs.reserved(s) == graphs[1].reserve + graphs[2].reserve


@cuda
def test_a_failed_capture_leaves_no_capture_the_stream_and_the_generator_as_they_were() -> None:
    ex, s = _cuda_session()
    t = torch.ones(4, device="cuda")
    before = torch.cuda.current_stream()
    state = torch.cuda.get_rng_state()

    def body() -> None:
        torch.nn.functional.dropout(t, 0.5)
        t.sum().item()  # a sync: not allowed under a capture

    with pytest.raises(RuntimeError):
        graph_cuda.capture(ex, s, torch.device("cuda", 0), body, False)
    assert not torch.cuda.is_current_stream_capturing()
    assert torch.cuda.current_stream() == before
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert float((t * 2).sum()) == 8.0  # the device still works
    # and so do its random ops: torch 2.11 left the default generator "capturing" after an invalidated capture, and
    # every later draw on the device failed ("Offset increment outside graph capture encountered unexpectedly")
    drawn = torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5), drawn)
    # a capture with random ops after it draws what eager draws from the same state
    g = torch.cuda.CUDAGraph()
    out = torch.empty(64, device="cuda")
    torch.cuda.set_rng_state(state)
    with torch.cuda.graph(g):
        out.copy_(torch.nn.functional.dropout(torch.ones(64, device="cuda"), 0.5))
    torch.cuda.set_rng_state(state)
    g.replay()
    assert torch.equal(out, drawn)


class _Cuda(Device):
    """A CUDA device as a graph's definition sees it (its torch device), without touching CUDA: a definition runs on
    meta tensors, and the decisions read only the calls it builds."""

    def __init__(self) -> None:
        super().__init__(0, "GPU-test", "test GPU", 1 << 30, fake=False)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", 0)

    def timed(self) -> Any:
        raise NotImplementedError


def _none() -> tensor_pb2.Arg:
    return tensor_pb2.Arg(none=tensor_pb2.NoneArg())


def _attention_step(ex: CommandExecutor, s: WorkerSession, outside: int = 0) -> graph.Graph:
    """Inputs q, k, v (1-3), the output's gradient (4), with `outside` a persistent tensor (5); the fused forward with
    dropout (its output, logsumexp, philox_seed, philox_offset) and its backward, whose philox_seed is the forward's
    (or the persistent tensor)."""
    q = torch.ones(2, 2, 4, 8)
    o = 6 if outside else 5  # the forward's first output slot
    forward = op("aten::_scaled_dot_product_fused_attention_overrideable", slot(1), slot(2), slot(3),
                 dropout_p=tensor_pb2.Arg(f=0.1), out=(o, o + 1, 0, 0, 0, 0, o + 2, o + 3))  # fmt: skip
    backward = op(
        "aten::_scaled_dot_product_fused_attention_overrideable_backward", slot(4), slot(1), slot(2), slot(3),
        _none(), tensor_pb2.Arg(bools=tensor_pb2.BoolList(values=[True, True, True, False])), slot(o), slot(o + 1),
        _none(), _none(), tensor_pb2.Arg(i=4), tensor_pb2.Arg(i=4), tensor_pb2.Arg(f=0.1), tensor_pb2.Arg(b=False),
        slot(5 if outside else o + 2), slot(o + 3), out=(o + 4, o + 5, o + 6),
    )  # fmt: skip
    return _define(ex, s, [forward, backward], [q, q, q, q], [outside] if outside else [], [o + 4])


def test_a_cuda_graphs_fused_attention_with_dropout_keeps_its_scores_and_may_be_captured() -> None:
    ex, s = _session(_Cuda())
    g = _attention_step(ex, s)
    assert [c.kernel for c in g.calls] == ["dropout_kept", "dropout"] and g.calls[0].seeded
    assert graph_cuda.refusal(ex, g) is None
    # the kept softmax (float32) and mask of 2 x 2 x 4 x 4 scores live from the forward to the backward, after the
    # 16 bytes of a CUDA generator's state: counted in the plan, where a fake GPU's step keeps an 8-byte seed
    ex2, s2 = _session()
    fake = _attention_step(ex2, s2)
    assert [c.kernel for c in fake.calls] == ["dropout", "dropout"]
    assert g.peak - fake.peak == 16 + 2 * 2 * 4 * 4 * 5 - 8
    # a backward whose philox_seed no forward of the step kept (one from outside): refused before any capture
    ex, s = _session(_Cuda())
    outside = s.handle_base + 1
    s.bind(outside, torch.zeros((), dtype=torch.long))
    why = graph_cuda.refusal(ex, _attention_step(ex, s, outside))
    assert why is not None and why.startswith("aten::_scaled_dot_product_fused_attention_overrideable_backward with ")
    assert "where no forward of the step kept its scores" in why


@cuda
def test_a_fused_attention_step_with_dropout_becomes_a_cuda_graph_that_computes_what_eager_does() -> None:
    from gpupool.server.devices import CudaDevice

    results = []
    for eager in (False, True):
        ex, s = _session(CudaDevice(0))
        g = _attention_step(ex, s)
        g.cuda_failed = eager
        ex._seed(s, 99)
        g_in = torch.Generator().manual_seed(4)
        inputs = [torch.randn(2, 2, 4, 8, generator=g_in) for _ in range(4)]
        results.append([_run(ex, s, inputs, [s.handle_base + 100 + k])[0] for k in range(4)])
        assert (g.cuda is None) == eager
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][2], results[0][3])  # fresh masks every replay
