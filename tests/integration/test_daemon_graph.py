"""Hostile graphs (DefineGraph / RunGraph written by hand, not by `gpupool.torch.capture`): each gets the right
status code at the next sync, the session stays usable, and a healthy session on the same device keeps working."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from support import Healthy, scrape, session_usage
from test_daemon_bad_input import assert_still_usable

from gpupool import errors, wire
from gpupool._proto import device_pb2, tensor_pb2

MiB = 1024**2


@pytest.fixture
def session(daemon: Any, healthy: Healthy) -> Iterator[Session]:
    with Session.attach(daemon.address, daemon.token(tenant="bad", quota_bytes=64 * MiB)) as s:
        yield s


def slot(n: int) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(tensor=n)


def graph(graph_id: int = 1, inputs: int = 1, persistent: tuple[int, ...] = (), **fields: Any) -> Any:
    meta = [wire.meta_to_proto(torch.ones(4))] * inputs
    return device_pb2.DefineGraph(
        graph_id=graph_id, inputs=inputs, input_meta=meta, persistent=list(persistent), **fields
    )


def op(name: str, *args: tensor_pb2.Arg, out: int = 0) -> device_pb2.Op:
    return device_pb2.Op(name=name, args=list(args), outputs=[out] if out else [])


def test_a_valid_graph_runs_on_new_inputs(session: Session) -> None:
    # slot 1: the input, slot 2: a persistent tensor, slot 3 = 1 * 2, slot 4 = 3 + 1
    w = Handle(session.upload(torch.full((4,), 3.0)))
    body = [op("aten::mul.Tensor", slot(1), slot(2), out=3), op("aten::add.Tensor", slot(3), slot(1), out=4)]
    session.define_graph(graph(persistent=(w,), ops=body, outputs=[4]))
    for k in range(3):
        x = Handle(session.upload(torch.full((4,), float(k))))
        y = session.new_handle()
        session.run_graph(1, [x], [y])
        assert torch.equal(session.download(y), torch.full((4,), 4.0 * k))
    session.sync()


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        ([op("aten::from_file.default", tensor_pb2.Arg(s="/etc/passwd"), out=2)], errors.PermissionDenied, "denied"),
        ([op("prim::device", slot(1), out=2)], errors.PermissionDenied, "only aten"),
        ([op("aten::add.Tensor", slot(1), slot(9), out=2)], errors.InvalidArgument, "slot 9 is not defined"),
        ([op("aten::neg.default", slot(1), out=5)], errors.InvalidArgument, "next free slot is 2"),
        ([op("aten::nonzero.default", slot(1), out=2)], errors.InvalidArgument, "data-dependent"),
        (
            [op("aten::resize_.default", slot(1), tensor_pb2.Arg(ints=tensor_pb2.IntList(values=[9])))],
            errors.InvalidArgument,
            "storages",
        ),  # noqa: E501
        (
            [op("aten::ones.default", tensor_pb2.Arg(ints=tensor_pb2.IntList(values=[32 * MiB])), out=2)],
            errors.ResourceExhausted,
            "quota",
        ),
    ],
)
def test_hostile_graph_is_refused(session: Session, body: list[Any], error: type, match: str) -> None:
    session.define_graph(graph(ops=body, outputs=[]))
    with pytest.raises(error, match=match):
        session.sync()
    x = Handle(session.upload(torch.ones(4)))
    session.run_graph(1, [x], [])  # never defined: NOT_FOUND, nothing runs
    with pytest.raises(errors.NotFound):
        session.sync()
    assert_still_usable(session)


def test_persistent_handle_of_another_session(daemon: Any, session: Session, healthy: Healthy) -> None:
    with Session.attach(daemon.address, daemon.token(tenant="other")) as other:
        theirs = Handle(other.upload(torch.ones(4)))
        other.sync()
        session.define_graph(graph(persistent=(theirs,), ops=[op("aten::neg.default", slot(2), out=3)], outputs=[3]))
        with pytest.raises(errors.PermissionDenied):
            session.sync()
        assert torch.equal(other.download(theirs), torch.ones(4))
    assert_still_usable(session)


def test_run_with_wrong_inputs_poisons_outputs(session: Session) -> None:
    session.define_graph(graph(ops=[op("aten::neg.default", slot(1), out=2)], outputs=[2]))
    wrong = Handle(session.upload(torch.ones(5)))
    y = session.new_handle()
    session.run_graph(1, [wrong], [y])
    with pytest.raises(errors.InvalidArgument, match="defined for"):
        session.sync()
    with pytest.raises(errors.InvalidArgument):
        session.download(y)
    right = Handle(session.upload(torch.ones(4)))
    session.run_graph(1, [right], [y])
    assert torch.equal(session.download(y), -torch.ones(4))


def test_too_many_graphs(session: Session) -> None:
    for i in range(40):
        session.define_graph(graph(graph_id=i + 1, ops=[op("aten::neg.default", slot(1), out=2)], outputs=[2]))
    with pytest.raises(errors.InvalidArgument, match="at most"):
        session.sync()
    assert_still_usable(session)


def run_by_value(session: Session, graph_id: int, data: list[bytes], outputs: list[int]) -> None:
    session.run_graph(graph_id, [0] * len(data), outputs, data=data)


def test_inputs_sent_by_value(session: Session) -> None:
    # The batch inside the RunGraph command: no upload, no handle, no free; checked against the graph's input.
    session.define_graph(graph(ops=[op("aten::neg.default", slot(1), out=2)], outputs=[2]))
    for k in range(3):
        y = session.new_handle()
        run_by_value(session, 1, [torch.full((4,), float(k)).numpy().tobytes()], [y])
        assert torch.equal(session.download(y), torch.full((4,), -float(k)))
    for data, match in [([b"\0" * 12], "12 bytes given by value"), ([], "no input_data")]:
        y = session.new_handle()
        session.run_graph(1, [0], [y], data=data)
        with pytest.raises(errors.InvalidArgument, match=match):
            session.sync()
        with pytest.raises(errors.InvalidArgument):
            session.download(y)
    assert_still_usable(session)


def used_bytes(daemon: Any, s: Session) -> int:
    return session_usage(daemon.address, s).used_bytes


def test_graph_temporaries_count_in_used_memory(daemon: Any, session: Session) -> None:
    # A step whose temporaries (an 8 MiB repeat, summed away) exceed what it leaves behind: the graph's peak is
    # counted in the session's used bytes while it holds the graph (the quota and smi see it), not only checked.
    big = [op("aten::repeat.default", slot(1), tensor_pb2.Arg(ints=tensor_pb2.IntList(values=[512 * 1024]))),
           op("aten::sum.default", slot(2), out=3)]  # fmt: skip
    big[0].outputs.append(2)
    session.sync()
    before = used_bytes(daemon, session)
    session.define_graph(graph(ops=big, outputs=[3]))
    session.sync()
    held = used_bytes(daemon, session) - before
    assert 8 * MiB <= held < 9 * MiB
    y = session.new_handle()
    run_by_value(session, 1, [torch.ones(4).numpy().tobytes()], [y])
    assert session.download(y).item() == 2 * MiB
    session.sync()
    assert used_bytes(daemon, session) - before == held + 4  # + the result's 4 bytes
    # A graph whose peak (48 MiB) does not fit in what the quota leaves (64 - 20 MiB held): refused at definition.
    fill = Handle(session.upload(torch.zeros(20 * MiB // 4)))
    session.sync()
    bigger = [op("aten::repeat.default", slot(1), tensor_pb2.Arg(ints=tensor_pb2.IntList(values=[3 * MiB]))),
              op("aten::sum.default", slot(2), out=3)]  # fmt: skip
    bigger[0].outputs.append(2)
    session.define_graph(graph(graph_id=2, ops=bigger, outputs=[3]))
    with pytest.raises(errors.ResourceExhausted, match="quota"):
        session.sync()
    session.drop_graph(1)
    session.free([fill, y])
    session.sync()
    assert used_bytes(daemon, session) == before


def test_a_traced_graph_keeps_the_embedding_index_guard(daemon: Any, session: Session) -> None:
    """From its second run a graph on a fake GPU runs as a TorchScript graph (server/graph_trace.py), where no
    Python guard runs: the embedding backward's index range check travels into the trace as tensor ops, so
    indices out of range are still refused there, with INVALID_ARGUMENT, and the session goes on working."""
    grad, idx = torch.randn(4, 3), torch.tensor([0, 9, 3, 3])
    body = [
        device_pb2.Op(
            name="aten::embedding_dense_backward.default",
            args=[slot(1), slot(2), tensor_pb2.Arg(i=10), tensor_pb2.Arg(i=-1), tensor_pb2.Arg(b=False)],
            outputs=[3],
        )
    ]
    meta = [wire.meta_to_proto(grad), wire.meta_to_proto(idx)]
    session.define_graph(device_pb2.DefineGraph(graph_id=7, inputs=2, input_meta=meta, ops=body, outputs=[3]))

    def run(indices: torch.Tensor) -> Handle:
        out = session.new_handle()
        session.run_graph(7, [Handle(session.upload(grad)), Handle(session.upload(indices))], [out])
        return Handle(out)

    for k in range(4):  # the first run is the Python replay, the second is traced
        want = torch.ops.aten.embedding_dense_backward.default(grad, idx.roll(k), 10, -1, False)
        assert torch.equal(session.download(run(idx.roll(k))), want)
    for bad in (torch.tensor([0, 10, 3, 3]), torch.tensor([0, -1, 3, 3]), torch.tensor([0, 1 << 40, 3, 3])):
        run(bad)
        with pytest.raises(errors.InvalidArgument, match="out of"):
            session.sync()
    want = torch.ops.aten.embedding_dense_backward.default(grad, idx, 10, -1, False)
    assert torch.equal(session.download(run(idx)), want)
    text = scrape(daemon.metrics_port)
    lines = text.splitlines()
    traced = [line for line in lines if line.startswith("gpupool_graph_events_total{") and 'event="traced"' in line]
    assert any('tenant="bad"' in line and line.endswith(" 1.0") for line in traced), traced


def test_a_graph_whose_run_would_hold_the_device_too_long_is_refused(daemon_factory: Any) -> None:
    """Round 17: each op of a graph was checked against --max-op-flops, the graph as a whole not. A run is one
    command, never pre-empted between its ops: 300 matmuls of 512 x 512, each far under the default bound,
    held the device's thread for their sum (10 s on this box, another tenant's download waiting all of it;
    100,000 ops near the bound would hold it for days). A graph's ops together now get the bound of one command
    (multiply-adds, or the elements an op linear in its data visits); a graph under it defines and runs."""
    d = daemon_factory(max_op_flops=10**9, fake_gpu_memory=128 * MiB)
    x = torch.full((512, 512), 1e-3)

    def chain(n: int, graph_id: int) -> Any:
        body = [op("aten::mm.default", slot(i + 1), slot(1), out=i + 2) for i in range(n)]  # 1.3e8 each
        meta = [wire.meta_to_proto(x)]
        return device_pb2.DefineGraph(graph_id=graph_id, inputs=1, input_meta=meta, ops=body, outputs=[n + 1])

    with Session.attach(d.address, d.token(quota_bytes=64 * MiB)) as s:
        s.define_graph(chain(300, 1))
        with pytest.raises(errors.ResourceExhausted, match=r"graph op 7 .*the graph's ops would do about 1\.0\d*e\+09"):
            s.sync()
        s.define_graph(chain(5, 2))  # 6.7e8
        y = s.new_handle()
        s.run_graph(2, [Handle(s.upload(x))], [y])
        want = x
        for _ in range(5):
            want = want @ x
        assert torch.allclose(s.download(y), want)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_long_definition_does_not_hold_the_device_from_other_tenants(daemon_factory: Any, isolation: str) -> None:
    """Round 17: a DefineGraph (a dry run of every op on meta tensors, up to 100,000 ops) was one command on the
    device's turn: 100,000 trivial ops held it for 17-28 s, another tenant's download waiting all of it. The
    definition now goes in pieces of about 50 ms, one per slice of its session, and the device serves its other
    sessions between them: another tenant's downloads keep completing while it is built, which still defines."""
    d = daemon_factory(isolation=isolation)
    n = 20_000  # seconds of dry runs on this box
    x = torch.ones(4)
    body = [op("aten::neg.default", slot(i + 1), out=i + 2) for i in range(n)]
    big = device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(x)], ops=body, outputs=[n + 1])
    with (
        Session.attach(d.address, d.token(tenant="definer", quota_bytes=256 * MiB)) as a,
        Session.attach(d.address, d.token(tenant="other", quota_bytes=64 * MiB)) as b,
    ):
        h = b.upload(torch.arange(1024.0))
        assert torch.equal(b.download(h), torch.arange(1024.0))
        defined = threading.Event()

        def define() -> None:
            a.define_graph(big)
            a.sync()
            defined.set()

        t = threading.Thread(target=define, daemon=True)
        t.start()
        time.sleep(0.5)  # the definition reaches the device (it takes seconds there): not a timed assertion
        # Before: the first download after the definition reached the device waited for all of it (and A's sync
        # came back right behind it): one or none completed in the meantime (9 without the pause above).
        during = 0
        while not defined.is_set():
            got = b.download(h)
            if not defined.is_set():
                during += 1
            assert torch.equal(got, torch.arange(1024.0))
        t.join(60)
        assert during >= 20, f"only {during} downloads of another tenant completed while the graph was defined"
        y = a.new_handle()
        a.run_graph(1, [Handle(a.upload(x))], [y])
        assert torch.equal(a.download(y), x if n % 2 == 0 else -x)


def test_hostile_output_and_write_lists_bind_nothing_foreign_and_account_exactly(
    daemon: Any, session: Session, healthy: Healthy
) -> None:
    """A graph's run names its output handles, and the writes to stop binding (drop_writes), as lists the client
    writes: duplicates, an output that is also an input or the persistent tensor or the write's own handle,
    drop_writes naming handles that are no write (another session's among them), more outputs than the graph
    has, another session's handle as an output. Through the plain replay and the traced one (a list of outputs
    from TorchScript since round 20): each binds what it says or is refused, nothing lands in another session, and
    once everything is freed and the graph dropped the session counts no byte."""
    s = session
    session.sync()
    base = used_bytes(daemon, s)
    w = Handle(s.upload(torch.full((4,), 3.0)))
    grad = s.new_handle()
    body = [op("aten::mul.Tensor", slot(1), slot(2), out=3), op("aten::add.Tensor", slot(3), slot(1), out=4)]
    g = graph(persistent=(w,), ops=body, outputs=[4, 3])
    g.writes.add(slot=3, handle=grad)
    s.define_graph(g)
    other = healthy.session.handle_base + 7  # another session's range
    held = []
    for k in range(6):  # runs 2.. are traced
        x = Handle(s.upload(torch.full((4,), float(k + 1))))
        o, p = s.new_handle(), s.new_handle()
        wk = s.download(w)
        held += [x, o, p]
        if k % 3 == 0:
            s.run_graph(1, [x], [o, o], drop_writes=[w, other, s.handle_base + 999])  # the second binding wins
            want = {o: wk * (k + 1), grad: wk * (k + 1)}
        elif k % 3 == 1:
            s.run_graph(1, [x], [x, grad])  # the input rebound to the output; the write's handle bound twice
            want = {x: wk * (k + 1) + (k + 1), grad: wk * (k + 1)}
        else:
            s.run_graph(1, [x], [p, w])  # the persistent tensor itself replaced by an output (same shape)
            want = {p: wk * (k + 1) + (k + 1), w: wk * (k + 1)}
        for h, value in want.items():
            assert torch.equal(s.download(h), value), (k, h)
    s.run_graph(1, [x], [o, p, s.new_handle()])
    with pytest.raises(errors.InvalidArgument, match="has 2 outputs, got 3"):
        s.sync()
    s.run_graph(1, [x], [other])
    with pytest.raises(errors.PermissionDenied, match="another session"):
        s.sync()
    with pytest.raises(errors.PermissionDenied):
        s.download(grad)  # a failed run poisons its outputs and writes (none of them another session's)
    s.run_graph(1, [x], [o])
    kept = s.download(grad)
    s.run_graph(1, [x], [o], drop_writes=[grad, grad, other])
    s.sync()
    assert torch.equal(s.download(grad), kept)
    s.run_graph(1, [x], [o])
    assert torch.equal(s.download(grad), kept)  # dropped for good
    s.free([w, grad, *held])
    s.drop_graph(1)
    s.sync()
    assert used_bytes(daemon, s) == base


def test_a_graphs_seeded_call_with_a_fake_gpu_kernel_runs_it(session: Session) -> None:
    """`_fused_dropout` has a CUDA kernel only: on a fake GPU the daemon runs its CPU equivalent (server/fallbacks.py).
    A graph's seeded call ran the bare overload instead (no CPU kernel: every run failed); it now runs the
    equivalent with the session's generator, as an eager call does: the same draws after the same seed."""
    x = torch.arange(1.0, 65.0)
    body = [op("aten::_fused_dropout.default", slot(1), tensor_pb2.Arg(f=0.5))]
    body[0].outputs.extend([2, 3])
    session.define_graph(device_pb2.DefineGraph(graph_id=9, inputs=1, input_meta=[wire.meta_to_proto(x)], ops=body,
                                                outputs=[2, 3]))  # fmt: skip
    results = []
    for _ in range(2):
        session.seed(7)
        out, mask = session.new_handle(), session.new_handle()
        session.run_graph(9, [Handle(session.upload(x))], [out, mask])
        results.append((session.download(Handle(out)), session.download(Handle(mask))))
    session.seed(7)
    eager_out, eager_mask = session.call("aten::_fused_dropout.default", Handle(session.upload(x)), 0.5, outputs=2)
    want = (session.download(Handle(eager_out)), session.download(Handle(eager_mask)))
    for got in results:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert 0 < int(want[1].sum()) < 64 and torch.equal(want[0], x * want[1] * 2)


def test_batches_sent_by_value_around_the_strip_size_reach_each_sessions_graph_exactly(daemon: Any) -> None:
    """A captured step's batch sent by value at and around the size from which the daemon takes it out of the frame
    as a view (server/bulk.py, `STRIP_MIN`: the reader's check and the worker's run without protobuf's copies), two
    sessions at once, each step with its own bytes: each run's output is exactly its own session's input, and a batch
    one byte short or long is refused as before."""
    from gpupool.server import bulk

    near = bulk.STRIP_MIN - 30  # a RunGraph's span is ~30 bytes longer than its batch
    sizes = [near - 1, near, near + 1, bulk.STRIP_MIN, 3 * bulk.STRIP_MIN + 1]

    def tenant(k: int) -> None:
        with Session.attach(daemon.address, daemon.token(tenant=f"t{k}", quota_bytes=64 * MiB)) as s:
            gen = torch.Generator().manual_seed(k)
            for gid, n in enumerate(sizes, start=1):
                meta = wire.meta_to_proto(torch.zeros(n, dtype=torch.uint8))
                body = [op("aten::clone", slot(1), out=2)]
                s.define_graph(device_pb2.DefineGraph(graph_id=gid, inputs=1, input_meta=[meta], ops=body, outputs=[2]))
                for _ in range(3):
                    x = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
                    y = s.new_handle()
                    run_by_value(s, gid, [x.numpy().tobytes()], [y])
                    assert torch.equal(s.download(y), x), (k, n)
                for delta in (-1, 1):
                    y = s.new_handle()
                    run_by_value(s, gid, [bytes(n + delta)], [y])
                    with pytest.raises(errors.InvalidArgument, match=f"{n + delta} bytes given by value"):
                        s.sync()
            assert_still_usable(s)

    with ThreadPoolExecutor(2) as pool:  # two sessions at once
        for done in [pool.submit(tenant, k) for k in range(2)]:
            done.result(timeout=120)


def test_a_graph_input_past_2_63_bytes_is_refused_without_the_daemons_backtrace(session: Session) -> None:
    """(audit55) An input's metadata whose bytes pass 2^63 (4 floats' meta with a shape of 2^63 - 1) is refused with
    torch's words alone: on the base the refusal carried c10's C++ backtrace (its frames' absolute addresses in the
    worker's libc10.so, and the daemon's install path)."""
    meta = wire.meta_to_proto(torch.ones(4))
    meta.shape[:] = [2**63 - 1]
    session.define_graph(device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=[meta], ops=[], outputs=[1]))
    with pytest.raises(errors.InvalidArgument, match="failed to unpack") as refused:
        session.sync()
    assert "frame #" not in str(refused.value) and "Exception raised from" not in str(refused.value), refused.value
    assert_still_usable(session)
