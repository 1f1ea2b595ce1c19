"""Round 48 red team (hostile48): round 47's new surfaces attacked as a tenant would, against real daemons on loopback.

1. slice47's captured-replay path (`slices.run_slice_into` / `_one_graph_into`: a session worker's slice of one
   RunGraph, default isolation) against the old one (`run_commands` / `_run_graphs`, which `--isolation thread`
   still runs): hostile RunGraphs after a graph's quiet, traced replays (wrong input and output counts, by-value
   bytes of another length or dtype, a handle input of another shape or dtype, another session's handles, a dropped
   graph, another session's graph id) get the same status and words on both, each session goes on, a neighbour's
   verified work is unharmed.
2. `Session.download(into=)` (transfer47, specrev47): an `into` that autograd tracks (a leaf that requires grad took
   the bytes; a tensor saved for backward took them without its version moving: wrong gradients, no error).
3. `Session.upload` of a tensor with a conjugate or negative bit: its bytes went up as stored, without the bit.
4. The C++ client's copy_ between the host and the device (`wire_copy_`, whose download_into specrev47 held to a
   destination without a conjugate or negative bit): a source with one lost it, both ways (the tensor's bytes went
   up, or came down, without the bit applied).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from gpupool.client.native.backend import compiler_missing
from gpupool.client.session import Handle, Session
from shim_fixtures import ServeProcess
from support import DaemonFactory, Healthy

from gpupool import errors, wire
from gpupool._proto import device_pb2, tensor_pb2

MiB = 1024**2
GID = 5


def _slot(n: int) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(tensor=n)


def _define(s: Session, w: int, gid: int = GID) -> None:
    """Slot 1: x (4 floats, by value), slot 2: w (persistent); slot 3 = x + w, slot 4 = 3 * 2 (the output)."""
    body = [
        device_pb2.Op(name="aten::add.Tensor", args=[_slot(1), _slot(2)], outputs=[3]),
        device_pb2.Op(name="aten::mul.Tensor", args=[_slot(3), tensor_pb2.Arg(f=2.0)], outputs=[4]),
    ]
    meta = [wire.meta_to_proto(torch.ones(4))]
    s.define_graph(
        device_pb2.DefineGraph(graph_id=gid, inputs=1, persistent=[w], input_meta=meta, ops=body, outputs=[4])
    )


def _x(k: int) -> torch.Tensor:
    return torch.arange(4, dtype=torch.float32) + k


def _replay(s: Session, k: int, gid: int = GID) -> torch.Tensor:
    """One quiet replay (the batch by value, as a captured step sends it): its output downloaded."""
    y = s.new_handle()
    s.run_graph(gid, [0], [y], data=[_x(k).numpy().tobytes()])
    got = s.download(y, (4,), torch.float32)
    s.free([y])
    return got


def _outcome(s: Session, run: Any) -> tuple[str, str]:
    """The error (its class and words) a hostile run gets at the next sync."""
    run()
    try:
        s.sync()
    except errors.GpupoolError as exc:
        return type(exc).__name__, str(exc)  # (the sessions' numbers, in their handles, are the same on both)
    return "ok", ""


def _hostile_runs(s: Session, other: Session, theirs: int) -> dict[str, tuple[str, str]]:
    """Each hostile RunGraph after a few quiet replays; after each, a right replay still computes right."""
    w = Handle(s.upload(torch.full((4,), 0.5)))
    _define(s, w)
    for k in range(4):  # (traced, then quiet: the replays `run_raw` takes)
        assert torch.equal(_replay(s, k), (_x(k) + 0.5) * 2)
    f64 = torch.arange(4, dtype=torch.float64).numpy().tobytes()
    wrong_shape = Handle(s.upload(torch.ones(5)))
    wrong_dtype = Handle(s.upload(torch.ones(4, dtype=torch.int64)))
    x = _x(0).numpy().tobytes()
    cases = {
        "two inputs": lambda: s.run_graph(GID, [0, 0], [s.new_handle()], data=[x, x]),
        "no inputs": lambda: s.run_graph(GID, [], [s.new_handle()]),
        "short bytes": lambda: s.run_graph(GID, [0], [s.new_handle()], data=[x[:12]]),
        "long bytes": lambda: s.run_graph(GID, [0], [s.new_handle()], data=[x + b"\0\0\0\0"]),
        "float64 bytes": lambda: s.run_graph(GID, [0], [s.new_handle()], data=[f64]),
        "no bytes": lambda: s.run_graph(GID, [0], [s.new_handle()]),
        "handle of 5": lambda: s.run_graph(GID, [wrong_shape], [s.new_handle()]),
        "handle of int64": lambda: s.run_graph(GID, [wrong_dtype], [s.new_handle()]),
        "two outputs": lambda: s.run_graph(GID, [0], [s.new_handle(), s.new_handle()], data=[x]),
        "output theirs": lambda: s.run_graph(GID, [0], [theirs], data=[x]),
        "output huge": lambda: s.run_graph(GID, [0], [(1 << 64) - 1], data=[x]),
        "output is w": lambda: s.run_graph(GID, [0], [w], data=[x]),
        "input theirs": lambda: s.run_graph(GID, [theirs], [s.new_handle()]),
        "unknown graph": lambda: s.run_graph(GID + 1, [0], [s.new_handle()], data=[x]),
        "their graph": lambda: s.run_graph(GID + 100, [0], [s.new_handle()], data=[x]),
    }
    seen: dict[str, tuple[str, str]] = {}
    for k, (what, run) in enumerate(cases.items()):
        seen[what] = _outcome(s, run)
        if what == "output is w":  # (the session's own w now holds that run's output: its own choice)
            assert torch.equal(s.download(w), (_x(0) + 0.5) * 2)
            s.free([w])
            w = Handle(s.upload(torch.full((4,), 0.5)))
            _define(s, w)
        assert torch.equal(_replay(s, k), (_x(k) + 0.5) * 2), what  # the session goes on, its graph computes right
    s.drop_graph(GID)
    seen["dropped graph"] = _outcome(s, lambda: s.run_graph(GID, [0], [s.new_handle()], data=[x]))
    return seen


@pytest.fixture
def two_daemons(daemon_factory: DaemonFactory) -> Iterator[dict[str, Any]]:
    yield {iso: daemon_factory(isolation=iso, fake_gpu_memory=64 * MiB) for iso in ("process", "thread")}


@pytest.mark.slow
def test_hostile_replays_get_the_same_words_on_the_new_slice_path_and_harm_no_neighbour(
    two_daemons: dict[str, Any],
) -> None:
    """The default isolation's worker runs a lone RunGraph through `run_slice_into` (slice47); `--isolation thread`
    through `run_commands`. Every hostile replay gets the same status and words on both; the neighbour's matmuls and
    a graph of its own (the id the hostile session names) stay right. Pins behaviour that holds on dabf16a0."""
    outcomes = {}
    for iso, daemon in two_daemons.items():
        healthy = Healthy(daemon.address, daemon.token(tenant="neighbour48", lease_id=f"n-{iso}"))
        with (
            Session.attach(daemon.address, daemon.token(tenant="mallory48", lease_id=f"m-{iso}")) as s,
            Session.attach(daemon.address, daemon.token(tenant="alice48", lease_id=f"a-{iso}")) as other,
        ):
            theirs = Handle(other.upload(torch.full((4,), 7.0)))
            _define(other, theirs, gid=GID + 100)
            assert torch.equal(_replay(other, 1, GID + 100), (_x(1) + 7.0) * 2)
            outcomes[iso] = _hostile_runs(s, other, theirs)
            assert torch.equal(_replay(other, 2, GID + 100), (_x(2) + 7.0) * 2)
            assert torch.equal(other.download(theirs), torch.full((4,), 7.0))
        healthy.check()
    thread, process = outcomes["thread"], outcomes["process"]
    for what in thread:
        assert process[what] == thread[what], (what, process[what], thread[what])
        assert process[what][0] != "ok" or what == "output is w", (what, process[what])


def test_download_into_refuses_a_tensor_autograd_differentiates_and_moves_the_version_of_others(
    daemon_factory: DaemonFactory,
) -> None:
    """`Session.download(into=)` wrote its bytes under autograd: into a leaf that requires grad (which torch's own
    in-place ops refuse, but under `torch.no_grad()`), and into a tensor a graph had saved for backward without moving
    its version counter, so that backward ran on the downloaded values and gave wrong gradients without an error. Now
    the first is INVALID_ARGUMENT with nothing written (taken under no_grad) and the second's backward refuses, as
    after `copy_`. On dabf16a0 the leaf took the bytes (and the saved tensor's backward ran on the bytes downloaded)."""
    daemon = daemon_factory(isolation="thread", fake_gpu_memory=64 * MiB)
    with Session.attach(daemon.address, daemon.token(tenant="into48")) as s:
        h = s.upload(torch.full((4,), 3.0))
        leaf = torch.ones(4, requires_grad=True)
        with pytest.raises(errors.InvalidArgument, match="requiring grad"):
            s.download(h, (4,), torch.float32, into=leaf)
        assert torch.equal(leaf.detach(), torch.ones(4))
        with torch.no_grad():  # (where torch's own in-place ops take it: `load_state_dict`'s copy_ into parameters)
            assert torch.equal(s.download(h, (4,), torch.float32, into=leaf), torch.full((4,), 3.0))
        w = torch.ones(4, requires_grad=True)
        saved = torch.ones(4)
        loss = (w * saved).sum()  # (mul saves `saved` for w's gradient)
        got = s.download(h, (4,), torch.float32, into=saved)
        assert got is saved and torch.equal(saved, torch.full((4,), 3.0))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        assert w.grad is None
        right = s.download(h, (4,), torch.float32, into=torch.zeros(4))  # (the usual case is untouched)
        assert torch.equal(right, torch.full((4,), 3.0))


def test_session_upload_keeps_a_conjugate_or_negative_bit(daemon_factory: DaemonFactory) -> None:
    """`Session.upload` of a conjugate view and of a negative view, in one command and in 4 MiB chunks: the daemon holds
    the view's values. On dabf16a0 it held the tensor's bytes as stored (unconjugated, unnegated)."""
    daemon = daemon_factory(isolation="thread", fake_gpu_memory=64 * MiB)
    with Session.attach(daemon.address, daemon.token(tenant="conj48")) as s:
        for n in (4, 600_000):  # (4.8 MB of complex64: over one chunk)
            z = torch.complex(torch.arange(n, dtype=torch.float32), torch.ones(n))
            x = torch.arange(n, dtype=torch.float32)
            assert torch.equal(s.download(s.upload(z.conj())), z.conj().resolve_conj()), n
            assert torch.equal(s.download(s.upload(torch._neg_view(x))), -x), n
            assert torch.equal(s.download(s.upload(torch._neg_view(z.conj()))), -z.conj().resolve_conj()), n


COPIES = """
import json, sys
import torch
from gpupool.client.native import backend as nc
from gpupool.client.session import Session

nc.load()
nc.claim()
nc.connect(Session.attach(sys.argv[1], sys.argv[2], timeout=120.0))
dev = nc.device()
out = {}
for n in (4, 4_000_000):  # in the frame; over 12 MiB (Session.upload)
    z = torch.complex(torch.arange(n, dtype=torch.float32), torch.ones(n))
    x = torch.arange(n, dtype=torch.float32)
    up = torch.zeros(n, dtype=torch.complex64, device=dev)
    up.copy_(z.conj())
    out[f"upload conj {n}"] = torch.equal(up.cpu(), z.conj().resolve_conj())
    upn = torch.zeros(n, device=dev)
    upn.copy_(torch._neg_view(x))
    out[f"upload neg {n}"] = torch.equal(upn.cpu(), -x)
    down = torch.empty(n, dtype=torch.complex64)
    down.copy_(z.to(dev).conj())
    out[f"download conj {n}"] = torch.equal(down, z.conj().resolve_conj())
    downn = torch.empty(n)
    downn.copy_(torch._neg_view(x.to(dev)))
    out[f"download neg {n}"] = torch.equal(downn, -x)
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(compiler_missing() is not None, reason="native client: no compiler")
def test_the_cpp_clients_copies_keep_a_conjugate_or_negative_bit(serve: ServeProcess) -> None:
    """`dev.copy_(cpu.conj())`, `cpu.copy_(dev.conj())` and the same of a negative view (torch's copy_ reaches the
    backend's kernel with the bit set), in the frame and over 12 MiB: the values are the view's. On dabf16a0 each came
    out unconjugated / unnegated (the tensor's bytes, as stored). (Still wrong, left: `.cpu()` of such a view and any
    op taking one, whose tensor arguments go on the wire without the bit: the report.)"""
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", COPIES, serve.address, serve.token()], env=env, capture_output=True,
                          text=True, timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(got.values()), got
