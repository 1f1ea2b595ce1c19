"""Round 49: a captured step's quiet run skips its persistent tensors' table look-ups while the session's `pins` is
what the plan's last run ended with (native_runner.cpp `graph_run`, `GraphPlan.seen_pins`): every table method that
unbinds or binds anew a handle of `WorkerSession.pinned` (the handles a graph reads as persistent tensors) bumps
`pins`, and nothing else does (a training loop's frees of its losses keep the skip).

The twins of test_server_graph_quick (one takes the C++ plan, one `graph._run` always) meet every path that can bind
a persistent handle to another tensor or none between two runs, with the old tensor objects still alive (held here):
where a path did not bump `pins`, the quick twin's next run would take the old object of its weak reference (a stale
binding: a freed handle's tensor, the values before an upload) and the twins would part."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.server.devices import FakeDevice
from gpupool.server.sessions import DeviceMemory, Poison, WorkerSession
from test_server_graph_quick import GID, Twin, _both
from test_server_graph_quick import twins as twins  # noqa: F401  (the fixture)

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2
from gpupool.errors import InvalidArgument


def _upload(t: Twin, h: int, value: torch.Tensor) -> Any:
    up = device_pb2.Upload(handle=h, meta=wire.meta_to_proto(value), data=value.numpy().tobytes(), last=True)
    return t.command(device_pb2.Command(upload=up))


def _other_graph(t: Twin, out: int) -> Any:
    """A second graph of the session whose run binds its output (`w`'s metadata) to handle `out`."""
    meta = wire.meta_to_proto(torch.ones(4, 3))
    body = [device_pb2.Op(name="aten::mul.Tensor", args=[tensor_pb2.Arg(tensor=1), tensor_pb2.Arg(f=3.0)], outputs=[2])]
    msg = device_pb2.DefineGraph(graph_id=GID + 1, inputs=1, input_meta=[meta], ops=body, outputs=[2])
    err, _ = t.command(device_pb2.Command(define_graph=msg))
    assert err is None, err
    run = device_pb2.RunGraph(graph_id=GID + 1, inputs=[t.b], outputs=[out])
    return t.command(device_pb2.Command(run_graph=run))


PATHS = [
    # not counted in `s.mutations` (executor.KEEPS_METAS, or no command): `pins` alone stops the skip
    "Free (C++)", "free (Python)", "upload into it", "bind (Python)", "rebind_all (Python)", "the run's own output",
    "a failed upload poisons it",
    # counted commands (the run is not quiet then), here all the same
    "set_", "resize_storage away", "another graph's output", "an eager op's output", "dropped and defined again",
]  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
def test_every_way_a_persistent_handle_is_bound_anew_between_runs_ends_the_skip(twins: Any, path: str) -> None:
    """Each path after quiet runs (the quick twin's plan skipping the look-ups), the old tensor objects still alive:
    both twins end the same (the same error or the same outputs from the new binding), and so do the next runs.
    With `unpin` (native_runner.cpp) and the bumps in sessions.py taken out, the first seven parted."""
    quick, slow, _ = twins
    for _ in range(5):
        assert _both(quick, slow, lambda t: t.run()) is None
    plan = quick.g.fast
    assert plan.seen_pins == quick.s.pins >= 0  # the next quiet run skips the look-ups
    held = {t: [t.s.tensors[h] for h in (t.w, t.v)] for t in (quick, slow)}  # the old objects stay alive

    def step(t: Twin) -> Any:
        s = t.s
        if path == "Free (C++)":
            t.command(device_pb2.Command(free=device_pb2.Free(handles=[t.v])))
        elif path == "free (Python)":
            s.free([t.v])
        elif path == "upload into it":
            _upload(t, t.w, torch.full((4, 3), 7.0))
        elif path == "bind (Python)":
            s.bind(t.w, torch.full((4, 3), -1.0))
        elif path == "rebind_all (Python)":
            s.rebind_all([(t.v, torch.full((3,), 5.0))])
        elif path == "the run's own output":
            return t.run(outputs=[t.w])  # `w` bound to the output: the next run reads that
        elif path == "a failed upload poisons it":
            bad = device_pb2.Upload(handle=t.v, meta=wire.meta_to_proto(torch.ones(3)), data=bytes(5), last=True)
            t.command(device_pb2.Command(upload=bad))  # 5 bytes for 12
        elif path == "set_":
            op = device_pb2.Op(name="aten::set_.source_Tensor", args=[tensor_pb2.Arg(tensor=t.v),
                               tensor_pb2.Arg(tensor=t.b)], outputs=[t.v])  # fmt: skip
            t.command(device_pb2.Command(op=op))
        elif path == "resize_storage away":
            t.command(device_pb2.Command(resize_storage=device_pb2.ResizeStorage(handle=t.w, nbytes=0)))
        elif path == "another graph's output":
            _other_graph(t, t.w)
        elif path == "an eager op's output":
            op = device_pb2.Op(name="aten::add.Tensor", args=[tensor_pb2.Arg(tensor=t.b), tensor_pb2.Arg(tensor=t.b)],
                               outputs=[t.w])  # fmt: skip
            t.command(device_pb2.Command(op=op))
        elif path == "dropped and defined again":
            t.command(device_pb2.Command(drop_graph=device_pb2.DropGraph(graph_id=GID)))
        return t.run()

    _both(quick, slow, step)
    for _ in range(3):
        _both(quick, slow, lambda t: t.run())
    del held  # (alive until here)


def test_a_training_loops_frees_keep_the_skip(twins: Any) -> None:
    """The frees of each step's outputs (a loss freed before the next step: no pinned handle) bump nothing: every
    quiet run's plan ends with `pins` unchanged and the next one skips the look-ups; a free of a persistent handle
    bumps it. On the base no session had `pins` and every run looked each persistent handle up."""
    quick, slow, _ = twins
    for _ in range(5):
        assert _both(quick, slow, lambda t: t.run()) is None
    plan, s = quick.g.fast, quick.s
    pins = s.pins
    for _ in range(4):
        for t in (quick, slow):
            last = t.base + t.next
            t.command(device_pb2.Command(free=device_pb2.Free(handles=[last])))
        assert _both(quick, slow, lambda t: t.run()) is None
        assert s.pins == pins and plan.seen_pins == pins
    quick.command(device_pb2.Command(free=device_pb2.Free(handles=[quick.v])))
    assert s.pins == pins + 1


def test_the_table_methods_that_bump_pins(native_runner_module: Any) -> None:
    """Which methods bump `pins` (the list the lead reconciles with the tables' other changes): `unbind` (so `bind`,
    `rebind`, `poison`, `release_all`), `free`, `rebind_all`, `_uncount` (`recount`'s set_, a storage resized away),
    and the C++ runner's `free` and `rebind_run`; each only for a pinned handle. `bind_new` (a handle not live) and
    the other handles' changes do not."""
    mod = native_runner_module
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    base = s.handle_base
    p, q = base + 1, base + 2  # pinned, not
    s.pinned.add(p)

    def bumps(fn: Any) -> int:
        before = s.pins
        fn()
        return s.pins - before

    assert bumps(lambda: s.bind(q, torch.ones(3))) == 0
    assert bumps(lambda: s.bind_new(p, torch.ones(3))) == 0
    assert bumps(lambda: s.bind(p, torch.ones(3))) == 1
    assert bumps(lambda: s.rebind(p, torch.ones(3))) == 1
    assert bumps(lambda: s.rebind(q, torch.ones(3))) == 0
    assert bumps(lambda: s.rebind_all([(q, torch.ones(3)), (p, torch.ones(3))])) == 1
    assert bumps(lambda: s.free([q])) == 0
    assert bumps(lambda: s.free([p, q])) == 1
    s.bind(p, torch.ones(3))
    s.bind(q, torch.ones(3))
    s.tensors[p].set_(torch.ones(5).untyped_storage())
    assert bumps(lambda: s.recount([q, p])) == 1
    assert bumps(lambda: s.free([q])) == 0
    assert bumps(lambda: mod.free(s, device_pb2.Free(handles=[q]).SerializeToString())) == 0
    assert bumps(lambda: mod.free(s, device_pb2.Free(handles=[p]).SerializeToString())) == 1
    s.bind(p, torch.ones(3))
    slots = [None, torch.ones(2), torch.ones(2)]
    assert bumps(lambda: mod.rebind_run(s, [q], [1], {}, slots)) == 0
    assert bumps(lambda: mod.rebind_run(s, [q], [1], {}, slots)) == 0  # the same binding: nothing changes
    assert bumps(lambda: mod.rebind_run(s, [p], [2], {}, slots)) == 1
    assert bumps(lambda: mod.rebind_run(s, [p], [2], {}, slots)) == 0
    assert bumps(lambda: s.poison(p, Poison.of(InvalidArgument("x"), ""))) == 1
    s.bind(p, torch.ones(3))
    assert bumps(s.release_all) == 1


# ---- round 49: a quiet run's slot list and its inputs sent by value are kept for the next run (`GraphPlan.spare`,
# `spare_inputs`), an input's tensor only where nothing else refers to it


def _views_of_x(quick: bool, keep: bool) -> Twin:
    """A twin whose second graph outputs `b + w` and views of its input sent by value `x` (`x.t()`, `x[1]`), and
    (`keep`) keeps `x` itself under a handle: tensors the next run's `x` must never be written into."""
    t = Twin(quick)

    def op(name: str, *args: tensor_pb2.Arg, out: int) -> device_pb2.Op:
        return device_pb2.Op(name=name, args=list(args), outputs=[out])

    k = tensor_pb2.Arg
    msg = device_pb2.DefineGraph(
        graph_id=GID + 2, inputs=2, input_meta=[wire.meta_to_proto(torch.ones(4, 3))] * 2, persistent=[t.w],
        ops=[op("aten::add.Tensor", k(tensor=2), k(tensor=3), out=4), op("aten::t.default", k(tensor=1), out=5),
             op("aten::select.int", k(tensor=1), k(i=0), k(i=1), out=6)],
        outputs=[4, 5, 6], writes=[device_pb2.GraphWrite(handle=t.base + 60, slot=1)] if keep else [],
    )  # fmt: skip
    err, _ = t.command(device_pb2.Command(define_graph=msg))
    assert err is None, err
    return t


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("outs", ["all", "sum only", "views only"])
def test_an_input_sent_by_value_is_filled_again_only_where_nothing_else_holds_it(
    native_runner_module: Any, outs: str, keep: bool
) -> None:
    """Quiet runs of a graph whose outputs (and kept tensor) may be views of its input sent by value, or not: each
    output handle holds its own run's values after every later run, on both twins (a reused input written into a
    tensor a handle still held would show a later run's bytes), and the twins' states are the same."""
    quick, slow = _views_of_x(True, keep), _views_of_x(False, keep)
    held: list[tuple[int, float]] = []
    for step in range(8):
        n = quick.base + 100 + 3 * step
        handles = {"all": [n, n + 1, n + 2], "sum only": [n], "views only": [0, n + 1, n + 2]}[outs]
        for t in (quick, slow):
            run = device_pb2.RunGraph(graph_id=GID + 2, inputs=[0, t.b], outputs=handles)
            run.input_data.append(torch.full((4, 3), float(step)).numpy().tobytes())
            err, _ = t.command(device_pb2.Command(run_graph=run))
            assert err is None, err
        held += [(h, float(step)) for h in handles[1:] if h]
        for h, value in held:
            for t in (quick, slow):
                assert bool((t.s.tensors[h] == value).all()), (outs, step, h - t.base)
        assert quick.state()[:4] == slow.state()[:4]
        if keep:
            assert bool((quick.s.tensors[quick.base + 60] == float(step)).all())  # the kept `x`: this run's
    assert quick.ex.graphs._of(quick.s)[GID + 2].fast not in (None, False)  # the plan ran
