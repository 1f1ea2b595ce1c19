"""Round 34 red team (red34): bytes a kernel allocated but never wrote, and their accounting, through real daemons."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session

from gpupool import errors, wire
from gpupool._proto import device_pb2, tensor_pb2

MiB = 1024**2
CANARY = 1234.5


def _plant(victim: Session, n: int) -> None:
    """Another session's bytes, freed: the allocator's next blocks of that size hold them."""
    for _ in range(3):
        secret = Handle(victim.upload(torch.full((n,), CANARY)))
        [copy] = victim.call("aten::mul.Tensor", secret, 1.0)
        victim.sync()
        victim.free([secret, copy])
    victim.sync()


@pytest.fixture
def pair(daemon_factory: Any) -> Iterator[tuple[Session, Session]]:
    """A victim and a reader on one `--isolation thread` daemon: one process, one allocator."""
    d = daemon_factory(isolation="thread")
    with (
        Session.attach(d.address, d.token(tenant="victim", quota_bytes=64 * MiB)) as victim,
        Session.attach(d.address, d.token(tenant="reader", quota_bytes=64 * MiB)) as reader,
    ):
        yield victim, reader


# mse_loss(x, x) of a graph's input (slot 1) into slot 2
MSE_OF_SLOT_1 = device_pb2.Op(
    name="aten::mse_loss.default", args=[tensor_pb2.Arg(tensor=1), tensor_pb2.Arg(tensor=1)], outputs=[2]
)


def _define(s: Session, x: torch.Tensor, body: list[device_pb2.Op], output: int) -> None:
    """Graph 1 of `s`: one input like `x` (slot 1), `body`, one output (slot `output`)."""
    s.define_graph(
        device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(x)], ops=body, outputs=[output])
    )


def _run(s: Session, x: torch.Tensor) -> Handle:
    """One run of graph 1 on a fresh upload of `x`: its output's handle."""
    h = Handle(s.upload(x))
    y = s.new_handle()
    s.run_graph(1, [h], [y])
    return Handle(y)


def _ints(values: list[int]) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(ints=tensor_pb2.IntList(values=values))


def test_a_graphs_new_empty_strided_holds_no_freed_bytes(pair: tuple[Session, Session]) -> None:
    """A captured graph zeroed the outputs of its own list of uninitialized factories, which lacked
    `new_empty_strided`: under `--isolation thread` its output was another session's freed bytes, every run."""
    n = 30_000
    victim, reader = pair
    x = torch.ones(4)
    body = [
        device_pb2.Op(
            name="aten::new_empty_strided.default",
            args=[tensor_pb2.Arg(tensor=1), _ints([n]), _ints([1])],
            outputs=[2],
        )
    ]
    _define(reader, x, body, 2)
    for _ in range(4):
        _plant(victim, n)
        got = reader.download(_run(reader, x))
        assert not (got == CANARY).any(), f"{int((got == CANARY).sum())} of another session's values read"


def test_a_failed_out_op_leaves_no_freed_bytes_in_its_output(pair: tuple[Session, Session]) -> None:
    """torch's out= kernels resize their output before they check index values: `gather`, `take` and `index`
    with an out-of-range index failed with their out= tensor grown and its last elements never written (under
    `--isolation thread` another session's freed bytes, downloadable). The growth is zeroed."""
    n = 30_000
    victim, s = pair
    x = Handle(s.upload(torch.ones(n)))
    bad = torch.arange(n)
    bad[-1] = 10**9
    idx = Handle(s.upload(bad))
    for name, args in (
        ("aten::gather.out", (x, 0, idx)),
        ("aten::take.out", (x, idx)),
        ("aten::index.Tensor_out", (x, [idx])),
    ):
        _plant(victim, n)
        o = Handle(s.upload(torch.ones(0)))
        s.call(name, *args, out=o, outputs=[0])
        with pytest.raises(errors.InvalidArgument, match="out of"):
            s.sync()
        got = s.download(o)
        assert got.shape == (n,)  # torch's own behaviour: the failed kernel grew it
        assert not (got == CANARY).any(), f"{name}: {int((got == CANARY).sum())} of another session's values"
        assert torch.equal(got[-1:], torch.zeros(1))


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_failed_out_ops_cannot_grow_memory_past_the_quota(daemon_factory: Any, isolation: str) -> None:
    """Each failed out= op's growth went uncounted: a 64 MiB quota held 8 outputs of 48 MiB at a `used` of 12
    bytes. The growth is counted, so the second such op is refused before it runs."""
    from test_daemon_abuse import used

    d = daemon_factory(isolation=isolation, fake_gpu_memory=1024 * MiB)
    with Session.attach(d.address, d.token(tenant="reader", quota_bytes=64 * MiB)) as s:
        x = Handle(s.upload(torch.ones(1)))
        one = Handle(s.upload(torch.tensor([10**9])))
        [idx] = s.call("aten::expand.default", one, [12 * MiB])  # 48 MiB of float32 output, nothing uploaded
        errors_seen = []
        for _ in range(4):
            o = Handle(s.upload(torch.ones(0)))
            s.call("aten::index.Tensor_out", x, [idx], out=o, outputs=[0])
            with pytest.raises((errors.InvalidArgument, errors.ResourceExhausted)) as caught:
                s.sync()
            errors_seen.append(caught.type)
            assert used(d, s) <= 64 * MiB
        assert errors_seen[0] is errors.InvalidArgument  # the index error, its output grown and counted
        assert used(d, s) >= 48 * MiB
        assert errors_seen[1:] == [errors.ResourceExhausted] * 3


@pytest.mark.parametrize("name", ["aten::mse_loss", "aten::smooth_l1_loss"])
@pytest.mark.parametrize("form", ["default", "out"])
def test_a_reduced_loss_storage_holds_no_freed_bytes(pair: tuple[Session, Session], name: str, form: str) -> None:
    """torch's CPU `mse_loss` and `smooth_l1_loss` (reduction mean) return a 0-d tensor over a storage of the
    elementwise loss's size (the out= form grows `out` to it), its bytes past the first never written; a view over
    the whole storage (`as_strided`: views are checked against their storage) downloaded another session's freed
    bytes under `--isolation thread`. The result is a compact copy; an out= form's growth outside `out` is zeroed."""
    n = 30_000
    victim, s = pair
    a = Handle(s.upload(torch.rand(n)))
    b = Handle(s.upload(torch.rand(n)))
    _plant(victim, n)
    if form == "default":
        [loss] = s.call(f"{name}.default", a, b)
    else:
        loss = Handle(s.upload(torch.ones(0)))
        s.call(f"{name}.out", a, b, out=loss, outputs=[0])
    [whole] = s.call("aten::as_strided.default", loss, [n], [1], 0)
    try:
        got = s.download(whole)
    except errors.InvalidArgument as e:  # it was 120,000 bytes, 119,996 unwritten
        assert form == "default" and "storage" in str(e)
    else:
        assert not (got == CANARY).any(), f"{int((got == CANARY).sum())} of another session's values read"
        assert torch.equal(got[1:], torch.zeros(n - 1))
    local = getattr(torch.ops.aten, name.removeprefix("aten::")).default
    assert torch.equal(s.download(loss), local(s.download(a), s.download(b)))


def test_a_graphs_view_over_a_reduced_loss_buffer_is_refused(pair: tuple[Session, Session]) -> None:
    """A graph's `as_strided` over the loss's buffer passed the definition (torch checks no view's bounds against a
    meta storage: the loss's is 4 bytes) and its runs downloaded another session's freed bytes: now refused there."""
    n = 30_000
    _, s = pair
    x = torch.rand(n)
    body = [
        MSE_OF_SLOT_1,
        device_pb2.Op(
            name="aten::as_strided.default",
            args=[tensor_pb2.Arg(tensor=2), _ints([n]), _ints([1]), tensor_pb2.Arg(i=0)],
            outputs=[3],
        ),
    ]
    _define(s, x, body, 3)
    with pytest.raises(errors.InvalidArgument, match="past its storage"):  # it ran: 29,983 of 30,000 read
        s.sync()


def test_a_gappy_empty_strided_keeps_its_layout(pair: tuple[Session, Session]) -> None:
    """A new storage larger than its tensor's elements keeps the layout its kernel made (the client's meta kernels
    computed the same): round 34's first fix bound a copy, and a gappy `empty_strided`'s views, which the client
    places by its strides, then reached past the copy's storage ("byte 44 of a 24-byte storage")."""
    _, s = pair
    [t] = s.call("aten::empty_strided.default", [2, 3], [6, 2], dtype=torch.float32)
    [row] = s.call("aten::as_strided.default", t, [3], [2], 6)
    s.call("aten::fill_.Scalar", row, 2.0)
    [whole] = s.call("aten::as_strided.default", t, [11], [1], 0)
    expected = torch.zeros(11)
    expected[6::2] = 2.0
    assert torch.equal(s.download(whole), expected)


def test_a_graphs_reduced_loss_output_holds_no_freed_bytes(pair: tuple[Session, Session]) -> None:
    """A graph run's outputs are bound as eager results are: a loss it returns over the elementwise buffer has the
    buffer's other bytes zeroed, so an eager view over the whole storage reads no other session's freed bytes."""
    n = 30_000
    victim, s = pair
    x = torch.rand(n)
    _define(s, x, [MSE_OF_SLOT_1], 2)
    for _ in range(3):
        _plant(victim, n)
        loss = _run(s, x)
        try:
            [whole] = s.call("aten::as_strided.default", Handle(loss), [n], [1], 0)
            got = s.download(whole)
        except errors.InvalidArgument as e:  # a storage of the result's own size (a TorchScript graph's, say)
            assert "storage" in str(e)
        else:
            assert not (got == CANARY).any(), f"{int((got == CANARY).sum())} of another session's values read"
        assert float(s.download(Handle(loss))) == 0.0
