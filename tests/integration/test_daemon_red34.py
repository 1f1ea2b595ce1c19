"""Round 34 red team (red34): probes of uninitialized memory, freed handles and accounting through a real daemon."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session

from gpupool import wire
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


def _ints(values: list[int]) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(ints=tensor_pb2.IntList(values=values))


@pytest.mark.parametrize("isolation", ["thread"])
def test_a_graphs_new_empty_strided_holds_no_freed_bytes(daemon_factory: Any, isolation: str) -> None:
    d = daemon_factory(isolation=isolation)
    n = 30_000
    with (
        Session.attach(d.address, d.token(tenant="victim", quota_bytes=64 * MiB)) as victim,
        Session.attach(d.address, d.token(tenant="reader", quota_bytes=64 * MiB)) as reader,
    ):
        x = torch.ones(4)
        body = [
            device_pb2.Op(
                name="aten::new_empty_strided.default",
                args=[tensor_pb2.Arg(tensor=1), _ints([n]), _ints([1])],
                outputs=[2],
            )
        ]
        reader.define_graph(
            device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(x)], ops=body, outputs=[2])
        )
        for _ in range(4):
            _plant(victim, n)
            h = Handle(reader.upload(x))
            y = reader.new_handle()
            reader.run_graph(1, [h], [y])
            got = reader.download(y)
            assert not (got == CANARY).any(), f"{int((got == CANARY).sum())} of another session's values read"
