"""Ops whose kernels loop per element as many times as an argument's *value* says (ATen/native/Math.h): the
Laguerre and Legendre polynomials (n steps), the Hurwitz zeta function and polygamma of order >= 2 (|q| steps
for a negative q). Shapes told nothing of their work, so `--max-op-flops` never saw it: one element of
float64 with n = 1e15 (or q = -1e15 + 0.5) held the device's thread for months, every other session on the device
waiting. They are bounded from their values now, on every path (an op, a graph's run); honest ones still run.

The daemons here run with a low bound (1e7) so that the refused cases are cheap to run before the fix (1e8
steps: a second or two each), not months."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from support import Healthy
from test_daemon_compact import rec

from gpupool import compact, errors, wire
from gpupool._proto import device_pb2, tensor_pb2

MiB = 1024**2
BOUND = 10**7
F64 = torch.float64


@pytest.fixture
def served(daemon_factory: Any) -> Any:
    return daemon_factory(max_op_flops=BOUND)


@pytest.fixture
def session(served: Any) -> Iterator[Session]:
    healthy = Healthy(served.address, served.token(tenant="healthy"), pause=0.01)
    with Session.attach(served.address, served.token(tenant="looper", quota_bytes=64 * MiB)) as s:
        yield s
    healthy.check()


def _up(s: Session, *values: float) -> Handle:
    return Handle(s.upload(torch.tensor(values, dtype=F64)))


def _refused(s: Session, outs: list[int]) -> str:
    with pytest.raises(errors.ResourceExhausted, match="would loop about") as info:
        s.sync()
    with pytest.raises(errors.ResourceExhausted):
        s.download(outs[0])  # its output is poisoned with the same error
    return str(info.value)


def test_value_driven_loops_past_the_bound_are_refused(session: Session) -> None:
    s = session
    x = _up(s, 0.5)
    message = _refused(s, s.call("aten::special_laguerre_polynomial_l.default", x, _up(s, 1e8)))
    assert "special_laguerre_polynomial_l" in message and "1e+08" in message
    _refused(s, s.call("aten::special_legendre_polynomial_p.n_scalar", x, 10**8))
    _refused(s, s.call("aten::special_legendre_polynomial_p.x_scalar", 0.5, _up(s, 1.0, 1e8)))
    # the elements count: 20 elements of degree 1e6 are 2e7 steps
    [wide] = s.call("aten::expand.default", x, [20])
    _refused(s, s.call("aten::special_laguerre_polynomial_l.n_scalar", wide, 10**6))
    _refused(s, s.call("aten::special_laguerre_polynomial_l.default", x, _up(s, float("nan"))))
    _refused(s, s.call("aten::special_zeta.default", _up(s, 2.0), _up(s, -3e7 + 0.5)))
    _refused(s, s.call("aten::special_zeta.self_scalar", 2.0, _up(s, -3e7 + 0.5)))
    _refused(s, s.call("aten::polygamma.default", 3, _up(s, -3e7 + 0.5)))
    y = _up(s, -3e7 + 0.5)
    s.call("aten::polygamma_.default", y, 3, outputs=[0])
    with pytest.raises(errors.ResourceExhausted, match="would loop about"):
        s.sync()

    # Honest degrees and orders run, bit for bit as torch does locally.
    xs = torch.tensor([0.25, 0.5, -0.75, 1.5], dtype=F64)
    ns = torch.tensor([0.0, 3.0, 7.0, 12.0], dtype=F64)
    cases = [
        ("aten::special_laguerre_polynomial_l.default", (xs, ns)),
        ("aten::special_legendre_polynomial_p.default", (xs, ns)),
        ("aten::special_chebyshev_polynomial_t.n_scalar", (xs, 40)),
        ("aten::special_zeta.default", (torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=F64), xs - 20.0)),
        ("aten::polygamma.default", (3, xs - 20.0)),
    ]
    for name, args in cases:
        op = getattr(getattr(torch.ops.aten, name.split("::")[1].split(".")[0]), name.split(".")[1])
        sent = [Handle(s.upload(a)) if isinstance(a, torch.Tensor) else a for a in args]
        [out] = s.call(name, *sent)
        assert torch.equal(s.download(out), op(*args)), name


def test_a_graph_run_bounds_the_loops_from_its_inputs(session: Session) -> None:
    """A graph is defined on meta tensors (no values): the bound is checked at every run, from the run's inputs."""
    s = session
    meta = [wire.meta_to_proto(torch.ones(4, dtype=F64))] * 2
    body = [
        device_pb2.Op(
            name="aten::special_laguerre_polynomial_l.default",
            args=[tensor_pb2.Arg(tensor=1), tensor_pb2.Arg(tensor=2)],
            outputs=[3],
        )
    ]
    s.define_graph(device_pb2.DefineGraph(graph_id=1, inputs=2, input_meta=meta, ops=body, outputs=[3]))
    x = torch.tensor([0.25, 0.5, -0.75, 1.5], dtype=F64)

    def run(n: torch.Tensor) -> Handle:
        out = s.new_handle()
        s.run_graph(1, [Handle(s.upload(x)), Handle(s.upload(n))], [out])
        return Handle(out)

    for k in range(3):  # the Python replay, then the run that may trace it, then the graph as it stays
        n = torch.tensor([1.0, 2.0, 5.0, 9.0 + k], dtype=F64)
        want = torch.special.laguerre_polynomial_l(x, n)
        assert torch.equal(s.download(run(n)), want)
    run(torch.tensor([1.0, 2.0, 5.0, 1e8], dtype=F64))
    with pytest.raises(errors.ResourceExhausted, match="would loop about"):
        s.sync()
    n = torch.tensor([1.0, 2.0, 5.0, 9.0], dtype=F64)
    assert torch.equal(s.download(run(n)), torch.special.laguerre_polynomial_l(x, n))


def test_a_graph_shares_the_bound_among_its_loops(session: Session) -> None:
    """A graph's run is one command: its loops together get the bound (less its other ops' work), not each: four
    ops of 4e6 steps each, each under the bound of 1e7, are refused together; two of them pass."""
    s = session
    x = torch.tensor([0.25, 0.5, -0.75, 0.125], dtype=F64)

    def chain(n_ops: int, graph_id: int) -> Any:
        body = [
            device_pb2.Op(
                name="aten::special_legendre_polynomial_p.n_scalar",
                args=[tensor_pb2.Arg(tensor=1), tensor_pb2.Arg(i=10**6)],
                outputs=[i + 2],
            )
            for i in range(n_ops)
        ]
        meta = [wire.meta_to_proto(x)]
        return device_pb2.DefineGraph(graph_id=graph_id, inputs=1, input_meta=meta, ops=body, outputs=[n_ops + 1])

    def run(graph_id: int) -> Handle:
        out = s.new_handle()
        s.run_graph(graph_id, [Handle(s.upload(x))], [out])
        return Handle(out)

    s.define_graph(chain(4, 1))
    run(1)
    with pytest.raises(errors.ResourceExhausted, match="would loop about 4e\\+06"):
        s.sync()
    s.define_graph(chain(2, 2))
    assert torch.equal(s.download(run(2)), torch.special.legendre_polynomial_p(x, 10**6))


def test_compact_records_bound_the_loops_every_time(session: Session) -> None:
    """The clients' eager records, and the learned runs of repeated ones (server/runs.py), check the values of
    every record, not once per signature: an honest step of two records repeated, then the same step with a
    huge degree in a tensor of the same shape."""
    s = session
    xs = torch.tensor([0.25, 0.5, -0.75, 1.5], dtype=F64)
    n = torch.tensor([1.0, 2.0, 5.0, 9.0], dtype=F64)
    x, honest, huge = (s.upload(t) for t in (xs, n, torch.tensor([1.0, 2.0, 5.0, 1e8], dtype=F64)))

    named: set[int] = set()  # an op id is named once: naming it again drops what was learned of it

    def name(op_id: int, op: str) -> str | None:
        first = op_id not in named
        named.add(op_id)
        return op if first else None

    def step(degrees: int) -> Handle:
        p, out = s.new_handle(), s.new_handle()
        s.eager_op(
            rec(
                0,
                name(0, "aten::special_legendre_polynomial_p.default"),
                [p],
                [compact.tensor(x), compact.tensor(degrees)],
                {},
            )
        )
        s.eager_op(rec(1, name(1, "aten::add.Tensor"), [out], [compact.tensor(p), compact.encode_value(1)], {}))
        s.free([p])
        return Handle(out)

    want = torch.special.legendre_polynomial_p(xs, n) + 1
    for _ in range(4):
        outs = [step(honest) for _ in range(8)]
        assert all(torch.equal(s.download(o), want) for o in outs)
    step(honest)
    step(huge)
    with pytest.raises(errors.ResourceExhausted, match="would loop about"):
        s.sync()
    assert torch.equal(s.download(step(honest)), want)
