"""Round 37 (graph37): a RunGraph binds its inputs on the device's thread in one command, not pieced: a graph of
100,000 inputs held that thread 0.12-0.28 s a run (3.4 s at its trace run) and a neighbour's op waited as long.
A graph takes at most `graph_build.MAX_GRAPH_INPUTS` inputs, refused at its definition (docs/wire.md,
docs/security.md "Red team, round 37")."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import graph_build

from gpupool import errors, wire
from gpupool._proto import device_pb2, tensor_pb2

MiB = 1024**2


def _wide(graph_id: int, inputs: int, persistent: list[int] | None = None) -> device_pb2.DefineGraph:
    """One `neg` of the first of `inputs` one-element inputs, with `persistent` tensors beside them."""
    meta = wire.meta_to_proto(torch.ones(1))
    out = inputs + len(persistent or []) + 1
    body = [device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=1)], outputs=[out])]
    return device_pb2.DefineGraph(
        graph_id=graph_id, inputs=inputs, input_meta=[meta] * inputs, ops=body, outputs=[out], persistent=persistent
    )


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_graph_past_the_input_limits_is_refused_at_its_definition(daemon_factory: Any, isolation: str) -> None:
    """A graph of MAX_GRAPH_INPUTS + 1 inputs, or of MAX_GRAPH_PERSISTENT + 1 persistent tensors (one handle
    repeated), within --max-graph-memory, is INVALID_ARGUMENT at DefineGraph, before any run can hold the device's
    thread for its binding; one at both limits defines and runs, and a neighbour computes exactly meanwhile. On
    a490c2a the wider graphs were defined (DID NOT RAISE)."""
    n, p = graph_build.MAX_GRAPH_INPUTS, graph_build.MAX_GRAPH_PERSISTENT
    d = daemon_factory(isolation=isolation)
    stop = threading.Event()
    wrong: list[int] = []
    rounds = [0]

    def neighbour() -> None:
        with Session.attach(d.address, d.token(tenant="neighbour", quota_bytes=16 * MiB)) as o:
            while not stop.is_set():
                rounds[0] += 1
                v = torch.full((8,), float(rounds[0]))
                if not torch.equal(o.download(o.upload(v)), v):
                    wrong.append(rounds[0])

    t = threading.Thread(target=neighbour)
    t.start()
    try:
        with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=64 * MiB)) as s:
            x = Handle(s.upload(torch.ones(1)))
            s.sync()
            for g, (i, k) in enumerate(((n + 1, 0), (1, p + 1)), 1):
                with pytest.raises(errors.InvalidArgument, match=f"{i} inputs and {k} persistent tensors; at most"):
                    s.define_graph(_wide(g, i, [int(x)] * k))
                    s.sync()
            s.define_graph(_wide(2, n, [int(x)] * p))
            y = s.new_handle()
            s.run_graph(2, [x] * n, [y])
            assert torch.equal(s.download(Handle(y)), -torch.ones(1))
    finally:
        stop.set()
        t.join()
    assert rounds[0] > 0 and not wrong
