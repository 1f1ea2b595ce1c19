"""Round 35 final review (fin35): a captured graph's uninitialized factories through a real daemon
(`--isolation thread`: one process, one allocator, where freed bytes cross)."""

from __future__ import annotations

import torch
from gpupool.client.session import Session
from test_daemon_red34 import CANARY, _define, _ints, _plant, _run
from test_daemon_rev35 import pair

from gpupool._proto import device_pb2, tensor_pb2

__all__ = ["pair"]


def test_a_graphs_empty_out_into_a_slot_it_does_not_name_holds_no_freed_bytes(pair: tuple[Session, Session]) -> None:
    """A captured graph zeroed an uninitialized factory's output SLOTS; `empty.out` into an earlier slot, with no
    output slot of its own, grew that slot's storage unzeroed, and the graph's output (that slot) was another
    session's freed floats (29,999 of 30,000 read under `--isolation thread`)."""
    n = 30_000
    victim, s = pair
    x = torch.ones(4)
    body = [
        device_pb2.Op(name="aten::zeros.default", args=[_ints([1])], outputs=[2]),
        device_pb2.Op(name="aten::empty.out", args=[_ints([n])], kwargs={"out": tensor_pb2.Arg(tensor=2)}),
    ]
    _define(s, x, body, 2)
    for _ in range(4):  # the allocator does not hand the planted blocks back every time
        _plant(victim, n)
        got = s.download(_run(s, x))
        assert got.shape == (n,)
        assert not (got == CANARY).any(), f"{int((got == CANARY).sum())} of another session's values read"
        assert not got.any()
