"""Round 38 (gmem38): --max-graph-memory's estimate (graph_build.host_bytes) against what a graph really holds. A
graph's trace (server/graph_trace.py) writes every argument of an op that is not a tensor as a constant node,
defaults included, and its executor copies and compiles each: a chain of `_to_copy` ops (six arguments at their
defaults) held ~27 KB an op where the estimate said ~5 KB, and an op's 64 KiB inline tensor ~5x its bytes (the
frame, its parsed message and the decoded tensor at once) where the estimate counted it once; such graphs passed
the limit at a quarter of what they held (bench/host_memory.py --probe estimate; docs/security.md, "Red team,
round 38")."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import graph_build
from test_daemon_graph_memory import usage

from gpupool import errors
from gpupool._proto import device_pb2, tensor_pb2

MiB = 1024**2
BOUND = 16 * MiB
INLINE = 16_384  # float32 elements of an inline tensor: 64 KiB, wire.INLINE_MAX_BYTES


def _chain(graph_id: int, ops: int, kind: str) -> device_pb2.DefineGraph:
    """`ops` ops in a row over one 16,384-element input: `_to_copy` of the previous slot alone ("to_copy"), or
    `add` of it and a 64 KiB inline tensor of ones ("inline")."""
    ones = tensor_pb2.InlineTensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[INLINE], data=torch.ones(INLINE).numpy().tobytes()
    )
    body = []
    for i in range(ops):
        if kind == "to_copy":
            body.append(
                device_pb2.Op(name="aten::_to_copy.default", args=[tensor_pb2.Arg(tensor=i + 1)], outputs=[i + 2])
            )
        else:
            args = [tensor_pb2.Arg(tensor=i + 1), tensor_pb2.Arg(inline=ones)]
            body.append(device_pb2.Op(name="aten::add.Tensor", args=args, outputs=[i + 2]))
    meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[INLINE], stride=[1])
    return device_pb2.DefineGraph(graph_id=graph_id, inputs=1, input_meta=[meta], ops=body, outputs=[ops + 1])


def _estimate(ops: int, kind: str) -> int:
    """host_bytes of `_chain`: each op one tensor argument and one output; `_to_copy`'s six other arguments, or
    `add`'s alpha and its inline bytes; one input of one dimension and one output."""
    held = graph_build.INPUT_BYTES + graph_build.DIM_BYTES + graph_build.REF_BYTES
    if kind == "to_copy":
        return graph_build.host_bytes(ops, 2 * ops, held, 6 * ops)
    return graph_build.host_bytes(ops, 2 * ops, held + graph_build.INLINE_COPIES * 4 * INLINE * ops, ops)


@pytest.mark.parametrize("isolation", ["process", "thread"])
@pytest.mark.parametrize(("kind", "big", "small"), [("to_copy", 600, 100), ("inline", 50, 8)])
def test_a_graph_is_refused_where_what_it_would_hold_passes_the_limit(
    daemon_factory: Any, isolation: str, kind: str, big: int, small: int
) -> None:
    """600 `_to_copy` ops (~16 MB held, measured ~27 KB an op; estimated 3.0 MB on 285a6ed) or 50 `add`s of a 64
    KiB inline tensor (~16 MB held, estimated 3.5 MB) under a 16 MiB --max-graph-memory: RESOURCE_EXHAUSTED naming
    the limit, before any op is built; a sixth of it defines, runs exactly (traced from its second run where it
    can) and counts what host_bytes says; a neighbour computes meanwhile. On 285a6ed both were defined (DID NOT
    RAISE)."""
    d = daemon_factory(isolation=isolation, max_graph_memory=BOUND)
    x4 = torch.arange(float(INLINE))
    with (
        Session.attach(d.address, d.token(tenant="hostile", quota_bytes=64 * MiB)) as s,
        Session.attach(d.address, d.token(tenant="neighbour", quota_bytes=64 * MiB)) as n,
    ):
        x = Handle(s.upload(x4))
        s.define_graph(_chain(1, big, kind))
        with pytest.raises(errors.ResourceExhausted, match="--max-graph-memory") as refused:
            s.sync()
        assert f"about {_estimate(big, kind)} bytes" in refused.value.message
        assert str(BOUND) in refused.value.message
        assert _estimate(big, kind) > BOUND
        [h] = n.call("aten::mul.Tensor", Handle(n.upload(torch.arange(64.0))), 3.0)
        assert torch.equal(n.download(Handle(h)), torch.arange(64.0) * 3)
        s.define_graph(_chain(2, small, kind))
        want = x4 if kind == "to_copy" else x4 + small
        for _ in range(3):  # the second run traces it (process isolation)
            y = s.new_handle()
            s.run_graph(2, [x], [y])
            assert torch.equal(s.download(Handle(y)), want)
        assert usage(d.address, s).graph_bytes == _estimate(small, kind)
