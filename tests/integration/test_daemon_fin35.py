"""Round 35 final review (fin35): a captured graph's uninitialized factories through a real daemon
(`--isolation thread`: one process, one allocator, where freed bytes cross)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from test_daemon_red34 import CANARY, _define, _ints, _plant, _run
from test_daemon_rev35 import pair

from gpupool import errors, wire
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


def test_a_failed_graph_runs_out_resize_of_a_persistent_tensor_holds_no_freed_bytes(
    pair: tuple[Session, Session],
) -> None:
    """A failed eager out= op has its output's growth zeroed and counted (round 34); a captured graph's did not: an
    `index_select.out` into a persistent 1-element tensor, its index out of range, resized it to 30,000 elements
    before it failed, and the run's error left it so: downloaded, 29,984 of another session's freed floats, and
    the session's `used` still counted 4 bytes for it."""
    n = 30_000
    victim, s = pair
    idx = torch.zeros(n, dtype=torch.long)
    idx[0] = n + 7
    src = Handle(s.upload(torch.ones(n)))
    body = [
        device_pb2.Op(
            name="aten::index_select.out",
            args=[tensor_pb2.Arg(tensor=3), tensor_pb2.Arg(i=0), tensor_pb2.Arg(tensor=1)],
            kwargs={"out": tensor_pb2.Arg(tensor=2)},
        )
    ]
    for k in range(4):  # the allocator does not hand the planted blocks back every time
        w = Handle(s.upload(torch.ones(1)))
        meta = [wire.meta_to_proto(idx)]
        s.define_graph(device_pb2.DefineGraph(graph_id=k + 1, inputs=1, persistent=[w, src], input_meta=meta, ops=body))
        _plant(victim, n)
        s.run_graph(k + 1, [Handle(s.upload(idx))], [])
        with pytest.raises(errors.InvalidArgument, match="index out of range"):
            s.sync()
        got = s.download(w)
        assert not (got == CANARY).any(), f"{int((got == CANARY).sum())} of another session's values read"
        assert not got[1:].any()
        s.free([w])


def test_a_graphs_out_resize_of_a_persistent_tensor_counts_against_the_quota(daemon_factory: Any) -> None:
    """A graph's definition measured its ops' storage growth AFTER their dry run, so an out= op's resize of a
    persistent tensor was never seen: no peak at the definition, no recount after a run. `index_select.out` of a
    4 KB row 20,000 times into a persistent 4-byte tensor grew it to 80 MB under a 64 MiB quota, uncounted."""
    d = daemon_factory()
    with Session.attach(d.address, d.token(tenant="grow", quota_bytes=64 * 1024**2)) as s:
        idx = torch.zeros(20_000, dtype=torch.long)
        src = Handle(s.upload(torch.ones(1, 1000)))
        w = Handle(s.upload(torch.ones(1)))
        body = [
            device_pb2.Op(
                name="aten::index_select.out",
                args=[tensor_pb2.Arg(tensor=3), tensor_pb2.Arg(i=0), tensor_pb2.Arg(tensor=1)],
                kwargs={"out": tensor_pb2.Arg(tensor=2)},
            )
        ]
        meta = [wire.meta_to_proto(idx)]
        with pytest.raises(errors.ResourceExhausted):
            s.define_graph(device_pb2.DefineGraph(graph_id=1, inputs=1, persistent=[w, src], input_meta=meta, ops=body))
            s.run_graph(1, [Handle(s.upload(idx))], [])
            s.sync()
        assert s.download(w).numel() in (1, 20_000 * 1000)
