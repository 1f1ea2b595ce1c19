"""No op the daemon runs writes through a tensor whose elements overlap in memory (server/guards.py `check_written`).

Round 32 found four allowlisted overloads whose CPU kernels write a whole result from an expanded (stride 0) `out` /
`grad_input`'s data pointer, past its storage (SIGSEGV, a corrupted heap: the worker aborted, under `--isolation
thread` the daemon), and took them off the list. The general guard: every argument an op writes (schema alias
annotation `Tensor(a!)` / `Tensor(a!)[]`) must not overlap itself, checked before any kernel, meta kernel or other
guard reads the arguments.

- Every allowlisted overload with a written argument, each such argument in turn an expanded view and a
  self-overlapping `as_strided` one (which torch's own check, stride 0 only, lets through), through a daemon of
  worker processes: INVALID_ARGUMENT naming the op and the argument; a neighbour session's results stay exact.
- The four ops round 32 removed, put back on a scratch allowlist of an `--isolation thread` daemon (this test's own
  process): refused, and the bytes next to the written element in its storage untouched (on d93cf13 each of them
  ran, writing over them).
- What torch runs on an expanded tensor with kernels that write through the strides (`zero_`, `fill_`, the in-place
  views) still runs, with torch's result; a learned run (native runner on and off) and a captured graph refuse the
  same layouts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import guards, ops
from support import DaemonHandle, Healthy, MiB

from gpupool import errors, wire
from gpupool._proto import device_pb2, tensor_pb2

QUOTA = 64 * MiB
OVERLAP = "refer to a single memory location"


def _written(op: torch._ops.OpOverload) -> list[tuple[int, Any]]:
    """The schema's written arguments (position, argument), read from the schema here, not from the guard's table."""
    return [(i, a) for i, a in enumerate(op._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]


def _exempt(name: str, op: torch._ops.OpOverload) -> bool:
    return torch.Tag.inplace_view in op.tags or name in guards.OVERLAP_ALLOWED


def _cases() -> Iterator[tuple[str, int, Any]]:
    for name in sorted(ops.load_allowlist()):
        op = ops._resolve(name)
        for i, a in _written(op):
            yield name, i, a


CASES = list(_cases())


def test_the_sweep_covers_every_kind_of_written_argument() -> None:
    """The generated cases reach out=, in-place self, tensor lists and the functional ops' mutated arguments (batch
    norm's running statistics), and the exemptions are few."""
    names = {a.name for _, _, a in CASES}
    assert {"out", "self", "grad_input", "running_mean", "exp_avgs", "values", "indices"} <= names
    assert len({n for n, _, _ in CASES}) > 900
    exempt = {n for n, _, _ in CASES if _exempt(n, ops._resolve(n))}
    assert len(exempt) < 20, sorted(exempt)
    assert "aten::copy_.default" not in exempt and "aten::masked_fill_.Scalar" not in exempt


def _call_with(s: Session, name: str, at: int, a: Any, bad: Handle, dense: Handle) -> list[int]:
    """`name` with `bad` as its written argument at schema position `at` (inside a list where the argument is one,
    after a dense tensor), every earlier positional argument None: the guard reads nothing else first."""
    value: Any = [dense, bad] if isinstance(a.type, torch.ListType) else bad
    if a.kwarg_only:
        return s.call(name, outputs=0, **{a.name: value})
    return s.call(name, *([None] * at), value, outputs=0)


@pytest.fixture
def daemon_and_neighbour(daemon_factory: Any) -> Iterator[tuple[DaemonHandle, Healthy]]:
    d = daemon_factory(fake_gpu_memory=512 * MiB)
    n = Healthy(d.address, d.token(tenant="neighbour", quota_bytes=QUOTA), pause=0.01)
    yield d, n
    n.check(min_iterations=2)


def test_every_allowlisted_written_argument_refuses_an_overlapping_tensor(
    daemon_and_neighbour: tuple[DaemonHandle, Healthy],
) -> None:
    d, neighbour = daemon_and_neighbour
    with Session.attach(d.address, d.token(tenant="writer", quota_bytes=QUOTA)) as s:
        base = Handle(s.upload(torch.zeros(16)))
        dense = Handle(s.upload(torch.zeros(4)))
        [expanded] = s.call("aten::as_strided.default", base, [4, 4], [0, 1])  # stride 0: torch's own check sees it
        [aliasing] = s.call("aten::as_strided.default", base, [3, 3], [1, 1])  # torch's own check calls it "too hard"
        refused = 0
        for name, at, a in CASES:
            op = ops._resolve(name)
            for bad in (Handle(expanded), Handle(aliasing)):
                _call_with(s, name, at, a, bad, dense)
                if _exempt(name, op):  # whatever torch says of the None arguments, never the guard's refusal
                    try:
                        s.sync()
                    except errors.GpupoolError as exc:
                        assert OVERLAP not in str(exc), (name, str(exc))
                    continue
                with pytest.raises(errors.InvalidArgument) as info:
                    s.sync()
                text = str(info.value)
                want = f"'{a.name}[1]'" if isinstance(a.type, torch.ListType) else f"'{a.name}'"
                assert OVERLAP in text and want in text and op._schema.name in text, (name, a.name, text)
                refused += 1
        assert refused > 2000
        assert torch.equal(s.download(base), torch.zeros(16))
        [y] = s.call("aten::mul.Tensor", dense, 2)
        assert torch.equal(s.download(y), torch.zeros(4))
    neighbour.check()


def _round32_cases(s: Session) -> Iterator[tuple[str, list[Any], str, list[int]]]:
    """The overloads round 32 took off the list, with arguments its review crashed the worker with; the written
    argument (named by the last two fields: its keyword and shape) is made an expanded view of one element."""

    def up(t: torch.Tensor) -> Handle:
        return Handle(s.upload(t))

    yield "aten::avg_pool3d.out", [up(torch.ones(1, 1, 8, 8, 8)), [2, 2, 2], [2, 2, 2], [0, 0, 0], False, True,
                                   None], "out", [1, 1, 4, 4, 4]  # fmt: skip
    yield "aten::avg_pool3d_backward.grad_input", [up(torch.ones(1, 1, 4, 4, 4)), up(torch.ones(1, 1, 8, 8, 8)),
                                                   [2, 2, 2], [2, 2, 2], [0, 0, 0], False, True, None], \
        "grad_input", [1, 1, 8, 8, 8]  # fmt: skip
    yield "aten::replication_pad2d_backward.grad_input", [up(torch.ones(1, 1, 6, 6)), up(torch.ones(1, 1, 4, 4)),
                                                          [1, 1, 1, 1]], "grad_input", [1, 1, 4, 4]  # fmt: skip
    yield "aten::upsample_bicubic2d_backward.grad_input", [up(torch.ones(1, 1, 16, 16)), [16, 16], [1, 1, 8, 8],
                                                           False, None, None], "grad_input", [1, 1, 8, 8]  # fmt: skip


SCRATCH = frozenset(
    {
        "aten::avg_pool3d.out",
        "aten::avg_pool3d_backward.grad_input",
        "aten::replication_pad2d_backward.grad_input",
        "aten::upsample_bicubic2d_backward.grad_input",
    }
)


def test_round_32s_crashers_are_refused_back_on_a_scratch_list(daemon_factory: Any, monkeypatch: Any) -> None:
    """The four ops on a scratch allowlist (never the real one: tests/unit/test_server_ops.py-style checks of the
    list stay as they are) of a daemon running sessions in this process. The written tensor is one element of a
    bigger storage, expanded: the kernels that wrote a whole result through it wrote over the rest of that storage
    (within it, so this test fails instead of crashing on the old code); now each is refused before it runs."""
    allowed = ops.load_allowlist()
    assert not SCRATCH & allowed, "one of round 32's crashers is back on the real list"
    monkeypatch.setattr(ops, "load_allowlist", lambda path=ops.ALLOWLIST_FILE: allowed | SCRATCH)
    d = daemon_factory(fake_gpu_memory=512 * MiB, isolation="thread")
    neighbour = Healthy(d.address, d.token(tenant="neighbour", quota_bytes=QUOTA), pause=0.01)
    with Session.attach(d.address, d.token(tenant="writer", quota_bytes=QUOTA)) as s:
        for name, args, kw, shape in list(_round32_cases(s)):
            base = Handle(s.upload(torch.zeros(4096)))
            [view] = s.call("aten::as_strided.default", base, shape, [0] * len(shape))
            s.call(name, *args, outputs=0, **{kw: Handle(view)})
            with pytest.raises(errors.InvalidArgument, match=f"'{kw}'.*{OVERLAP}"):
                s.sync()
            assert torch.equal(s.download(base), torch.zeros(4096)), name
            # the same call into a dense tensor runs, with torch's result
            [dense] = s.call("aten::zeros.default", shape)
            s.call(name, *args, outputs=0, **{kw: Handle(dense)})
            s.sync()
            assert s.download(dense).abs().sum() > 0, name
    neighbour.check()


def test_what_torch_runs_on_an_expanded_tensor_through_its_strides_still_runs(daemon: DaemonHandle) -> None:
    """`zero_`, `fill_` with a number and the in-place views write no element or write through the strides; torch
    runs them on an expanded tensor (a module's `x.expand(...).zero_()`), so does the daemon, with torch's result.
    `copy_` and the deprecated ones (`masked_fill_`: torch warns) are refused."""
    with Session.attach(daemon.address, daemon.token(quota_bytes=QUOTA)) as s:
        local = torch.arange(8.0)
        base = Handle(s.upload(local))
        [view] = s.call("aten::as_strided.default", base, [3, 4], [0, 1], 2)
        kept = (("aten::fill_.Scalar", [7.0]), ("aten::zero_.default", []), ("aten::unsqueeze_.default", [0]))
        for name, args in kept:
            s.call(name, Handle(view), *args, outputs=0)
            getattr(local.as_strided([3, 4], [0, 1], 2), name.split("::")[1].split(".")[0])(*args)
            s.sync()
            assert torch.equal(s.download(base), local), name
        [view] = s.call("aten::as_strided.default", base, [3, 4], [0, 1], 2)
        s.call("aten::masked_fill_.Scalar", Handle(view), Handle(s.upload(torch.ones(3, 4, dtype=torch.bool))), 1.0)
        with pytest.raises(errors.InvalidArgument, match=f"'self'.*{OVERLAP}"):
            s.sync()
        assert torch.equal(s.download(base), local)


def _slot(n: int) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(tensor=n)


def test_a_graph_writing_an_overlapping_slot_is_refused_at_its_definition(daemon: DaemonHandle) -> None:
    """A captured step's in-place op on an input declared with aliasing strides (torch's own check lets `add_` run
    there) or on a persistent expanded tensor: refused when the graph is defined."""
    with Session.attach(daemon.address, daemon.token(quota_bytes=QUOTA)) as s:
        aliasing = torch.zeros(5).as_strided([3, 3], [1, 1])
        meta = [wire.meta_to_proto(aliasing)]
        body = [device_pb2.Op(name="aten::add_.Tensor", args=[_slot(1), _slot(1)], outputs=[])]
        s.define_graph(device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=meta, ops=body))
        with pytest.raises(errors.InvalidArgument, match=f"graph op 0 .*'self'.*{OVERLAP}"):
            s.sync()
        base = Handle(s.upload(torch.zeros(4)))
        [expanded] = s.call("aten::expand.default", base, [2, 4])
        body = [device_pb2.Op(name="aten::mul.out", args=[_slot(1), _slot(1)], kwargs={"out": _slot(2)}, outputs=[])]
        graph = device_pb2.DefineGraph(graph_id=2, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(2, 4))],
                                       persistent=[expanded], ops=body)  # fmt: skip
        s.define_graph(graph)
        with pytest.raises(errors.InvalidArgument, match=f"graph op 0 .*'out'.*{OVERLAP}"):
            s.sync()
        good = Handle(s.upload(torch.zeros(2, 4)))
        graph = device_pb2.DefineGraph(graph_id=3, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(2, 4))],
                                       persistent=[good], ops=body)  # fmt: skip
        s.define_graph(graph)
        s.run_graph(3, [Handle(s.upload(torch.full((2, 4), 3.0)))], [])
        assert torch.equal(s.download(good), torch.full((2, 4), 9.0))
