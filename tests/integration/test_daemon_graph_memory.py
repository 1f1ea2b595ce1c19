"""A session's captured graphs in host memory (round 35, quota35): bounded per session by --max-graph-memory, in both
isolations, through real daemons. Until round 35 a graph's prebuilt calls were host memory outside every bound: 32
graphs of 100,000 ops a session, 6-15 GiB (2-5 KB an op measured) within a 64 MiB quota, bounded only by a worker's
RLIMIT_DATA under process isolation and by nothing under `--isolation thread`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import cli, graph_build
from support import session_usage

from gpupool import errors, wire
from gpupool._proto import device_pb2, tensor_pb2

MiB = 1024**2
BOUND = 8 * MiB  # ~1,020 ops of a `neg` chain (graph_build.host_bytes: ~8.2 KB an op since round 38)
OPS = 1_000  # one graph of them fits the bound, two do not
TRIES = 10  # graphs the hostile session asks for: ~45 MB of host memory on a daemon without the bound


def _chain(graph_id: int, ops: int = OPS) -> device_pb2.DefineGraph:
    """`ops` negations in a row of one 4-element input (an even number: the output is the input)."""
    body = [
        device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=i + 1)], outputs=[i + 2])
        for i in range(ops)
    ]
    return device_pb2.DefineGraph(
        graph_id=graph_id, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(4))], ops=body, outputs=[ops + 1]
    )


def _run(s: Session, graph_id: int, x: Handle) -> torch.Tensor:
    y = s.new_handle()
    s.run_graph(graph_id, [x], [y])
    got = s.download(Handle(y))
    s.free([y])
    return got


def usage(address: str, s: Session) -> device_pb2.SessionUsage:
    """The session's row of the daemon's Status."""
    return session_usage(address, s)


def _tree_rss() -> int:
    """RSS of this process (an in-process daemon: `--isolation thread`'s sessions) and its descendants (the zygote
    and its session workers), in bytes."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total


def _neighbour_computes(s: Session, k: int) -> None:
    [h] = s.call("aten::mul.Tensor", Handle(s.upload(torch.arange(64.0))), float(k))
    assert torch.equal(s.download(Handle(h)), torch.arange(64.0) * k)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_sessions_graphs_are_bounded_in_host_memory(daemon_factory: Any, isolation: str) -> None:
    """A session asking for graph after graph gets RESOURCE_EXHAUSTED naming --max-graph-memory once its graphs
    would pass it (on the old daemon every one was defined: ~45 MB of host memory for a 64 MiB quota); the daemon's
    memory grows by about the bound, not by what was asked; its neighbour computes and defines its own graph
    meanwhile; a dropped graph's share comes back (a define-drop loop stays within it), and so does a closed
    session's."""
    d = daemon_factory(isolation=isolation, max_graph_memory=BOUND)
    x4 = torch.tensor([1.0, -2.0, 3.5, 0.25])
    with (
        Session.attach(d.address, d.token(tenant="hostile", quota_bytes=64 * MiB)) as s,
        Session.attach(d.address, d.token(tenant="neighbour", quota_bytes=64 * MiB)) as n,
    ):
        x = Handle(s.upload(x4))
        assert torch.equal(_run_defined(s, 1, x), x4)  # the first graph: its runs traced, as an honest step's
        _neighbour_computes(n, 1)  # (its worker's first op grows that worker, before the measure)
        before = _tree_rss()
        refused: list[errors.GpupoolError] = []
        for g in range(2, TRIES + 2):
            try:
                assert torch.equal(_run_defined(s, g, x), x4)
            except errors.ResourceExhausted as exc:
                refused.append(exc)
            _neighbour_computes(n, g)
        grown = _tree_rss() - before
        assert len(refused) == TRIES, f"{TRIES - len(refused)} more graphs of {OPS} ops defined past the bound"
        assert "--max-graph-memory" in refused[0].message and str(BOUND) in refused[0].message, refused[0].message
        assert grown < BOUND, f"the daemon grew by {grown / MiB:.1f} MiB for graphs past an {BOUND // MiB} MiB bound"
        assert torch.equal(_run(s, 1, x), x4)  # the graph it holds still runs
        # the bound is the session's own: the neighbour defines and runs a graph of its own
        assert torch.equal(_run_defined(n, 1, Handle(n.upload(x4 * 2))), x4 * 2)
        # dropped graphs give their share back: define, drop, define again, in a loop
        s.drop_graph(1)
        for g in range(5):
            assert torch.equal(_run_defined(s, 100 + g, x), x4)
            s.drop_graph(100 + g)
        s.sync()
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=64 * MiB)) as again:  # a closed session's
        for g in (1, 2):
            if g == 2:
                with pytest.raises(errors.ResourceExhausted, match="max-graph-memory"):
                    _run_defined(again, g, Handle(again.upload(x4)))
            else:
                assert torch.equal(_run_defined(again, g, Handle(again.upload(x4))), x4)


def _run_defined(s: Session, graph_id: int, x: Handle) -> torch.Tensor:
    """Define graph `graph_id` (a chain of OPS negations) and run it three times (the third traces it on a fake GPU):
    its last output."""
    s.define_graph(_chain(graph_id))
    s.sync()
    for _ in range(2):
        _run(s, graph_id, x)
    return _run(s, graph_id, x)


def _wide(graph_id: int, inputs: int = 0, persistent: list[int] | None = None) -> device_pb2.DefineGraph:
    """One `neg` of slot 1 in a graph of `inputs` inputs (4 dimensions each) and `persistent` tensors: a graph of
    one op whose slots hold the memory."""
    meta = wire.meta_to_proto(torch.ones(1, 1, 1, 4))
    after = inputs + len(persistent or []) + 1
    return device_pb2.DefineGraph(
        graph_id=graph_id,
        inputs=inputs,
        input_meta=[meta] * inputs,
        persistent=persistent or [],
        ops=[device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=1)], outputs=[after])],
        outputs=[after],
    )


def _estimate(ops: int, op_refs: int, inputs: int, dims: int, outputs: int = 1) -> int:
    """graph_build's estimate of a graph of `ops` ops holding `op_refs` references, `inputs` inputs and persistent
    tensors of `dims` dimensions in all (0: refused from the counts, before any metadata was read) and `outputs`."""
    held = graph_build.INPUT_BYTES * inputs + graph_build.REF_BYTES * outputs + graph_build.DIM_BYTES * dims
    return graph_build.host_bytes(ops, op_refs, held)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_graphs_inputs_and_persistent_tensors_count_in_its_host_memory(daemon_factory: Any, isolation: str) -> None:
    """Round 36: the estimate counted a graph's ops and their references only; a graph of one op and 1,000,000
    inputs (10 MB on the wire) was 5,080 bytes and held ~140-190 MiB of an `--isolation thread` daemon (32 of them a
    session, with their meta tensors built as one piece of seconds on the device's thread). Now its inputs,
    persistent tensors, outputs and writes are references, an input's dimensions count, and the definition is
    refused from its counts before any input's metadata is read (on the old daemon every graph below was defined)."""
    d = daemon_factory(isolation=isolation, max_graph_memory=BOUND)
    with (
        Session.attach(d.address, d.token(tenant="hostile", quota_bytes=64 * MiB)) as s,
        Session.attach(d.address, d.token(tenant="neighbour", quota_bytes=64 * MiB)) as n,
    ):
        x = s.upload(torch.ones(1, 1, 1, 4))
        for g, msg in enumerate((_wide(1, inputs=12_000), _wide(2, inputs=1, persistent=[x] * 12_000)), 1):
            assert msg.ByteSize() < 400_000  # small on the wire
            s.define_graph(msg)
            with pytest.raises(errors.ResourceExhausted, match="--max-graph-memory") as refused:
                s.sync()
            # refused from its counts alone: the op, its graph's 12,000 inputs (or persistent tensors) and 1 output
            assert f"about {_estimate(1, 0, 12_000 + g - 1, 0)} bytes" in refused.value.message
            _neighbour_computes(n, g)
        # one of a size the bound holds is defined, runs, and its estimate is what the session holds
        fits = _wide(3, inputs=2_000)
        s.define_graph(fits)
        s.sync()
        y = s.new_handle()
        s.run_graph(3, [x] * 2_000, [y])
        assert torch.equal(s.download(Handle(y)), -torch.ones(1, 1, 1, 4))
        assert usage(d.address, s).graph_bytes == _estimate(1, 2, 2_000, 8_000)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_status_shows_each_sessions_graph_memory_and_its_bound(daemon_factory: Any, isolation: str) -> None:
    """Round 36: a session's graph memory was in the definition's log line only. Status shows each session's
    estimate (the sum over its graphs, as --max-graph-memory counts it) and the bound; a dropped graph's share
    goes; the neighbour's is its own. (Twice BOUND: a graph of OPS and one of half as many.)"""
    bound = 2 * BOUND
    d = daemon_factory(isolation=isolation, max_graph_memory=bound)
    one = _estimate(OPS, 2 * OPS, 1, 1)  # each op 1 argument, 1 output; 1 input of 1 dimension, 1 output
    with (
        Session.attach(d.address, d.token(tenant="a", quota_bytes=64 * MiB)) as s,
        Session.attach(d.address, d.token(tenant="b", quota_bytes=64 * MiB)) as n,
    ):
        x = Handle(s.upload(torch.ones(4)))
        got = usage(d.address, s)
        assert (got.graph_bytes, got.graph_limit_bytes) == (0, bound)
        s.define_graph(_chain(1))
        s.define_graph(_chain(2, OPS // 2))
        s.sync()
        assert torch.equal(_run(s, 1, x), torch.ones(4))
        half = _estimate(OPS // 2, OPS, 1, 1)
        got = usage(d.address, s)
        assert (got.graph_bytes, got.graph_limit_bytes) == (one + half, bound)
        _neighbour_computes(n, 1)
        assert usage(d.address, n).graph_bytes == 0
        s.drop_graph(1)
        s.sync()
        assert usage(d.address, s).graph_bytes == half
        s.define_graph(_chain(2))  # replaced: the old one's share goes
        s.sync()
        assert usage(d.address, s).graph_bytes == one


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_max_graph_memory_0_turns_capture_off(daemon_factory: Any, isolation: str) -> None:
    """`--max-graph-memory 0` means graph capture off (documented in --help, docs/operations.md): every definition is
    FAILED_PRECONDITION saying so (round 35 refused it as RESOURCE_EXHAUSTED "would hold about N bytes ... of its 0
    byte graph memory limit", as if dropping a graph could help); eager ops run as usual; Status shows the 0."""
    parser = cli.build_parser()
    assert parser.parse_args(["--max-graph-memory", "0"]).max_graph_memory == 0
    assert "0 turns graph capture off" in " ".join(parser.format_help().split())
    d = daemon_factory(isolation=isolation, max_graph_memory=0)
    with Session.attach(d.address, d.token(tenant="a", quota_bytes=64 * MiB)) as s:
        x = Handle(s.upload(torch.ones(4)))
        for graph in (_chain(1, 2), _wide(2)):
            s.define_graph(graph)
            with pytest.raises(errors.FailedPrecondition, match="capture is off.*--max-graph-memory 0"):
                s.sync()
        y = s.new_handle()
        s.run_graph(1, [x], [y])
        with pytest.raises(errors.NotFound):
            s.sync()
        [h] = s.call("aten::neg.default", x)
        assert torch.equal(s.download(Handle(h)), -torch.ones(4))
        got = usage(d.address, s)
        assert (got.graph_bytes, got.graph_limit_bytes) == (0, 0)
