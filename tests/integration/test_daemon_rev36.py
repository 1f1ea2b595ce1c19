"""Round 36 review (rev36) of round 35's code through real daemons: the graph memory bound (--max-graph-memory,
`graph_build.host_bytes`) and a definition's pieces (two defects, fixed), and bulk upload chunks in upload slots run
by the device's thread (round 35, xfer35/slot35: found sound, kept as a guard). docs/security.md, "Review (rev36)"."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session, side_chunks

from gpupool import errors, protocol, wire
from gpupool._proto import device_pb2, tensor_pb2

MiB = 1024**2


def _wide(graph_id: int, inputs: int) -> device_pb2.DefineGraph:
    """One `neg` of the first of `inputs` 64-dimensional one-element inputs: one op, ~1.6 KB of host memory an input."""
    meta = wire.meta_to_proto(torch.ones([1] * 64))
    body = [device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=1)], outputs=[inputs + 1])]
    return device_pb2.DefineGraph(
        graph_id=graph_id, inputs=inputs, input_meta=[meta] * inputs, ops=body, outputs=[inputs + 1]
    )


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_graphs_inputs_count_in_its_graph_memory(daemon_factory: Any, isolation: str) -> None:
    """`host_bytes` counted a graph's ops and their references only: a graph of one op and 40,000 inputs of 64
    dimensions (a 5.5 MB definition) held ~45 MB and was estimated at 5 KB, and 8 of them grew a daemon with an
    8 MiB --max-graph-memory by ~500 MiB (both isolations). Its inputs' (and persistent tensors') metadata count now,
    before any is built: such a graph is refused, and a small one of the same session still runs."""
    d = daemon_factory(isolation=isolation, max_graph_memory=4 * MiB)
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=64 * MiB)) as s:
        x = Handle(s.upload(torch.ones([1] * 64)))
        s.sync()
        for g in (1, 2, 3):
            with pytest.raises(errors.ResourceExhausted, match="max-graph-memory"):
                s.define_graph(_wide(g, 3_000))  # ~4.8 MB estimated, ~2.6 MB wire
                s.sync()
        s.define_graph(_wide(4, 2))
        y = s.new_handle()
        s.run_graph(4, [x, x], [y])
        assert torch.equal(s.download(Handle(y)), -torch.ones([1] * 64))


def test_a_graphs_inputs_are_built_in_pieces(daemon_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A definition goes in pieces (graph.py `DEFINE_PIECE_SECONDS`) so that the device serves its other sessions
    between them; the inputs' metadata was built in one: a graph of one op and 250,000 inputs (a 2.5 MB definition,
    within the default graph memory) held the device's thread for 12-17 s, a neighbour's op waited as long, in
    both isolations. Counted, not timed: no piece (`next` of `building`) builds more than `_EVERY` inputs' tensors.
    (`--isolation thread`: the daemon runs in this process, where the count is taken.)"""
    from gpupool.server import graph, graph_build

    built = [0]
    per_piece: list[int] = []
    meta_tensor = graph_build._meta_tensor

    def counted(*args: Any, **kwargs: Any) -> Any:
        built[0] += 1
        return meta_tensor(*args, **kwargs)

    def advance(self: graph.Defining, deadline: float) -> Any:
        try:
            while True:
                built[0] = 0
                next(self.steps)
                per_piece.append(built[0])
        except StopIteration as done:
            per_piece.append(built[0])
            return done.value

    monkeypatch.setattr(graph_build, "_meta_tensor", counted)
    monkeypatch.setattr(graph.Defining, "advance", advance)
    d = daemon_factory(isolation="thread")
    with Session.attach(d.address, d.token(tenant="wide", quota_bytes=64 * MiB)) as s:
        x = Handle(s.upload(torch.ones(1)))
        meta = wire.meta_to_proto(torch.ones(1))
        n = 3 * graph_build._EVERY + 5
        body = [device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=1)], outputs=[n + 1])]
        s.define_graph(device_pb2.DefineGraph(graph_id=1, inputs=n, input_meta=[meta] * n, ops=body, outputs=[n + 1]))
        y = s.new_handle()
        s.run_graph(1, [x] * n, [y])
        assert torch.equal(s.download(Handle(y)), -torch.ones(1))
    assert sum(per_piece) >= n and max(per_piece) <= graph_build._EVERY, per_piece


def _bits(n_bytes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n_bytes // 4,), dtype=torch.int32, generator=g)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_free_between_a_bulk_uploads_chunks_stops_the_upload_and_harms_no_neighbour(
    daemon_factory: Any, isolation: str
) -> None:
    """Round 35 queues a bulk upload's chunk in an upload slot to the device's thread while the reader reads on: a
    Free of the handle between its chunks still runs in order (the chunks after it are refused, "without a first
    chunk", and the handle reads as that error), a Free after the last one frees it, and a neighbour's bulk round
    trips meanwhile stay byte-exact; the session uploads exactly afterwards (rev36: sound in both isolations)."""
    d = daemon_factory(isolation=isolation, fake_gpu_memory=640 * MiB, bulk_listen="127.0.0.1:0")
    stop = threading.Event()
    wrong: list[int] = []
    rounds = [0]

    def neighbour() -> None:
        with Session.attach(d.address, d.token(tenant="neighbour", quota_bytes=128 * MiB)) as n:
            while not stop.is_set():
                rounds[0] += 1
                big = _bits(2 * protocol.CHUNK_BYTES + 8, seed=rounds[0])
                h = n.upload(big)
                if not torch.equal(n.download(h), big):
                    wrong.append(rounds[0])
                n.free([h])

    t = threading.Thread(target=neighbour)
    t.start()
    try:
        with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=128 * MiB)) as s:
            assert s._side is not None
            for after in range(3):  # the Free after chunk 0, 1, 2 (the last)
                data = _bits(3 * protocol.CHUNK_BYTES, seed=100 + after)
                raw = memoryview(data.numpy()).cast("B")
                meta = wire.meta_to_proto(data)
                h = s.new_handle()
                free = device_pb2.ClientFrame(commands=[device_pb2.Command(free=device_pb2.Free(handles=[h]))])
                with s._lock:
                    s.flush()
                    for j, (off, end, frame) in enumerate(side_chunks(h, meta, raw.nbytes)):
                        s._put(frame)
                        if s._carrier is not None:
                            s._side_barrier()
                        s._side.send_upload(h, off, raw[off:end])
                        if j == after:
                            s._put(free.SerializeToString())
                if after < 2:
                    with pytest.raises(errors.InvalidArgument, match="without a first chunk"):
                        s.sync()
                    with pytest.raises(errors.InvalidArgument, match="without a first chunk"):
                        s.download(Handle(h))
                else:
                    s.sync()
                    with pytest.raises(errors.NotFound):
                        s.download(Handle(h))
                s.free([h])
            again = _bits(2 * protocol.CHUNK_BYTES + 4, seed=9)
            assert torch.equal(s.download(s.upload(again)), again)
    finally:
        stop.set()
        t.join(60)
    assert rounds[0] and not wrong, (rounds, wrong)
