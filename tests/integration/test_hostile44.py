"""Round 44's red team (hostile44), through real daemons: a graph's out= growth read within the run; a graph op's
tensor list bounded below the eager bound; an eager out= op into a view past its input's storage.

An out= op of a captured graph into a tensor that sits past its storage's end (a zero-element view) grows the
storage up to it; the bytes in between are zeroed by the recount at the run's end (graph._finish), not before the
graph's next op. On b647913 an `as_strided` of another view of that storage (or of the out= tensor itself) and a
`clone` of it gave the client the allocator's old bytes: a neighbour's freed tensor under `--isolation thread`
(15,992 of 16,000 floats its 7.0s in a probe, both isolations). Now the definition refuses an op that reads a tensor
of such a storage other than the written out= tensors and views within them (graph_build `_past_growth`), and a
run refuses a persistent tensor moved (`set_`) onto a smaller storage than at the definition (the views the
definition checked against the old one reached into what the out= op grows the new one by)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session

from gpupool import errors, wire
from gpupool._proto import device_pb2, tensor_pb2

MiB = 1024**2
FAR = 16_000  # elements: the out= tensor's offset in a 32-byte storage


def _slot(n: int) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(tensor=n)


def _ints(v: list[int]) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(ints=tensor_pb2.IntList(values=v))


def _grow_then_read(view_of: int) -> list[device_pb2.Op]:
    """Slots: 1 the zero-element view at FAR, 2 a source of 16 elements, 3 another view of 1's storage. `neg.out`
    grows 1's storage to FAR + 16 elements; an `as_strided` of slot `view_of` over all of it, cloned (slot 5)."""
    return [
        device_pb2.Op(name="aten::neg.out", args=[_slot(2)], kwargs={"out": _slot(1)}, outputs=[]),
        device_pb2.Op(
            name="aten::as_strided.default",
            args=[_slot(view_of), _ints([FAR + 16]), _ints([1]), tensor_pb2.Arg(i=0)],
            outputs=[4],
        ),
        device_pb2.Op(name="aten::clone.default", args=[_slot(4)], outputs=[5]),
    ]


def _neighbour_frees_a_secret(d: Any) -> Session:
    """A neighbour session that leaves its freed 7.0s in the allocator (one process under thread isolation) and
    keeps a tensor checked at the end."""
    n = Session.attach(d.address, d.token(tenant="neighbour", quota_bytes=16 * MiB))
    for _ in range(4):
        sec = n.upload(torch.full((FAR + 64,), 7.0))
        n.sync()
        n.free([sec])
    n.sync()
    return n


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_graph_reads_no_byte_its_out_op_grew_a_storage_by(daemon_factory: Any, isolation: str) -> None:
    """A graph that reads, after its `neg.out` grew a storage, another view of it (slot 3) or a view of the out=
    tensor past its own bytes (slot 1) is refused at its definition (INVALID_ARGUMENT; on b647913 both were
    defined and their runs gave back 15,992 floats of freed memory). A graph that reads the out= tensor itself and a
    view within it still runs; the neighbour's tensor is intact."""
    d = daemon_factory(isolation=isolation)
    n = _neighbour_frees_a_secret(d)
    kept = Handle(n.upload(torch.arange(1000.0)))
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=16 * MiB)) as s:
        for _ in range(4):  # (its own freed bytes too, for process isolation's worker)
            s.free([s.upload(torch.full((FAR + 64,), 7.0))])
        a = Handle(s.upload(torch.zeros(8)))
        src = Handle(s.upload(torch.ones(16)))
        [view] = s.call("aten::as_strided.default", a, [0], [1], FAR)
        s.sync()
        for graph_id, view_of in ((1, 3), (2, 1)):
            persistent = [int(view), int(src), int(a)]
            s.define_graph(device_pb2.DefineGraph(graph_id=graph_id, persistent=persistent,
                                                  ops=_grow_then_read(view_of), outputs=[5]))  # fmt: skip
            out = s.new_handle()
            s.run_graph(graph_id, [], [out])
            with pytest.raises(errors.InvalidArgument, match="an earlier out= op of the graph may grow"):
                s.sync()
                got = s.download(Handle(out))
                pytest.fail(f"the run read {int((got[8:FAR] != 0).sum())} nonzero floats it never wrote")
        ok = [
            device_pb2.Op(name="aten::neg.out", args=[_slot(2)], kwargs={"out": _slot(1)}, outputs=[]),
            device_pb2.Op(name="aten::sum.default", args=[_slot(1)], outputs=[4]),
            device_pb2.Op(
                name="aten::slice.Tensor",
                args=[_slot(1), tensor_pb2.Arg(i=0), tensor_pb2.Arg(i=4), tensor_pb2.Arg(i=8)],
                outputs=[5],
            ),  # fmt: skip
            device_pb2.Op(name="aten::sub.Tensor", args=[_slot(5), _slot(4)], outputs=[6]),
        ]
        s.define_graph(device_pb2.DefineGraph(graph_id=3, persistent=[int(view), int(src), int(a)], ops=ok,
                                              outputs=[6]))  # fmt: skip
        out = s.new_handle()
        s.run_graph(3, [], [out])
        s.sync()
        assert torch.equal(s.download(Handle(out)), torch.full((4,), 15.0))
        [whole] = s.call("aten::as_strided.default", a, [FAR + 16], [1], 0)
        got = s.download(Handle(whole))  # after the run: the growth zeroed (`_finish`)
        assert int((got[8:FAR] != 0).sum()) == 0 and torch.equal(got[FAR:], -torch.ones(16))
    assert torch.equal(n.download(kept), torch.arange(1000.0))
    n.close()


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_persistent_tensor_set_onto_a_smaller_storage_is_refused_at_the_run(
    daemon_factory: Any, isolation: str
) -> None:
    """A graph defined with `a` a view of a large storage, its `as_strided` over FAR elements of it checked against
    that; `a` then `set_` onto the out= tensor's 32-byte storage (the same metadata) before the run: the out= op grew
    that storage and the view read what it grew it by (on b647913 the run gave back 15,992 floats of freed memory).
    Now the run is refused (INVALID_ARGUMENT: a persistent tensor on a smaller storage than at the definition)."""
    d = daemon_factory(isolation=isolation)
    n = _neighbour_frees_a_secret(d)
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=16 * MiB)) as s:
        big = Handle(s.upload(torch.zeros(FAR + 64)))
        small = Handle(s.upload(torch.zeros(8)))
        [a] = s.call("aten::as_strided.default", big, [8], [1], 0)
        [p] = s.call("aten::as_strided.default", small, [0], [1], FAR)
        src = Handle(s.upload(torch.ones(16)))
        ops = _grow_then_read(3)
        ops[1].args[2].CopyFrom(_ints([1]))
        ops[1].args[1].CopyFrom(_ints([FAR]))
        s.define_graph(device_pb2.DefineGraph(graph_id=1, persistent=[int(p), int(src), int(a)], ops=ops, outputs=[5]))
        s.sync()
        for _ in range(4):
            s.free([s.upload(torch.full((FAR + 64,), 7.0))])
        s.free([int(big)])
        s.call("aten::set_.source_Tensor", Handle(a), Handle(p), outputs=0)
        s.call("aten::as_strided_.default", Handle(a), [8], [1], 0, outputs=0)
        out = s.new_handle()
        s.run_graph(1, [], [out])
        with pytest.raises(errors.InvalidArgument, match="smaller storage than at the graph's definition"):
            s.sync()
            got = s.download(Handle(out))
            pytest.fail(f"the run read {int((got[8:FAR] != 0).sum())} nonzero floats it never wrote")
        small_one = torch.arange(16.0)
        assert torch.equal(s.download(s.upload(small_one)), small_one)
    n.close()


def test_a_graph_ops_tensor_list_is_bounded_below_the_eager_bound(daemon_factory: Any) -> None:
    """A graph op's tensor list of more than `GRAPH_MAX_LIST` (16,384) entries is refused at the definition
    (INVALID_ARGUMENT), not dry-run: the definition is cut between ops, never within one, and one `_foreach_norm`
    naming one slot 65,536 times (the eager bound, which b647913 took in graphs too) held its worker 3-16 s here
    (bench/graph_list_define.py). A shorter list is defined and runs."""
    limit = 16_384  # graph_build.GRAPH_MAX_LIST

    def graph(graph_id: int, n: int) -> device_pb2.DefineGraph:
        many = tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=[1] * n))
        op = device_pb2.Op(name="aten::_foreach_norm.Scalar", args=[many], outputs=[2])
        return device_pb2.DefineGraph(graph_id=graph_id, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(3))],
                                      ops=[op], outputs=[2])  # fmt: skip

    d = daemon_factory(isolation="thread")
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=16 * MiB)) as s:
        x = Handle(s.upload(torch.full((3,), 2.0)))
        s.define_graph(graph(1, limit + 1))
        with pytest.raises(errors.InvalidArgument, match=f"at most {limit}"):
            s.sync()
        s.define_graph(graph(2, 300))
        out = s.new_handle()
        s.run_graph(2, [int(x)], [out])
        assert torch.equal(s.download(Handle(out)), torch.linalg.vector_norm(torch.full((3,), 2.0)))


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_an_eager_out_op_into_a_view_past_its_inputs_storage_keeps_what_it_wrote(
    daemon_factory: Any, isolation: str
) -> None:
    """`add.out(b, b, out=w)`, `w` a zero-element view of `b`'s 32-byte storage at offset 8 or FAR: torch grows the
    storage and writes the sum into `w`; on b647913 the recount after it zeroed the growth outside `b` (the handle it
    met first), the sum included, and the client read zeros. Now `w` holds the sum and the rest of the growth (the gap
    before a far `w`) is zeros; `cat.out` into such a view the same."""
    d = daemon_factory(isolation=isolation)
    n = _neighbour_frees_a_secret(d)
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=16 * MiB)) as s:
        for at in (8, FAR):
            b = Handle(s.upload(torch.arange(8.0)))
            [w] = s.call("aten::as_strided.default", b, [0], [1], at)
            s.call("aten::add.out", b, b, out=w, outputs=0)
            [c] = s.call("aten::as_strided.default", b, [0], [1], at + 8)
            s.call("aten::cat.out", [b, b], out=c, outputs=0)
            [whole] = s.call("aten::as_strided.default", b, [at + 24], [1], 0)
            got = s.download(Handle(whole))
            assert torch.equal(got[:8], torch.arange(8.0)) and int((got[8:at] != 0).sum()) == 0
            assert torch.equal(got[at : at + 8], torch.arange(8.0) * 2), got[at : at + 8]
            assert torch.equal(got[at + 8 :], torch.cat([torch.arange(8.0), torch.arange(8.0)]))
    n.close()
