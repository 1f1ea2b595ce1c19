"""No kernel the daemon runs reads past the storage of a view a client built (server/guards.py `check_reads`).

A kernel that reads an argument as numel() contiguous elements from its data pointer, whatever its strides, reads
past an expanded or overlapping view's storage: another session's bytes under `--isolation thread` or on a GPU that
sessions share, freed memory of the same worker otherwise. tests/integration/oob_sweep.py places every tensor
argument of a valid call of every allowlisted overload against PROT_NONE guard pages, in six layouts, the storage
ending at the upper guard page and starting at the lower one, and runs the calls in forked children.

- The sweep, with the daemon's checks and kernels (CI size: one traced call per overload; GPUPOOL_OOB_SWEEP=full
  for three calls per overload from four OpInfo samples each): no case faults, and it covers >1500 overloads.
- The detector catches each kernel `guards.READ_DENSE` names: with torch's own kernels (no daemon check), each
  named argument overlapping faults a child (so the sweep above can fail: on 55cef88 the daemon's checks let these
  calls run).
- Through a real daemon, both isolation modes, each of those ops with the named argument an expanded view of one
  element of a bigger storage: INVALID_ARGUMENT naming the op and the argument (on 55cef88 each ran: the view's
  storage is big enough that the old code read its own zeros, not past them); the same call with a dense argument
  runs with torch's result; a neighbour session's work stays exact. `native_batch_norm`'s running statistics
  (written although its schema does not mark them) overlapping: refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import oob_sweep
import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import guards, ops
from support import DaemonHandle, Healthy, MiB

from gpupool import errors, wire
from gpupool._proto import device_pb2, tensor_pb2

QUOTA = 64 * MiB
FULL = os.environ.get("GPUPOOL_OOB_SWEEP") == "full"
READS = "as contiguous memory"


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """oob_sweep.py's report, from a process of its own (OpInfo's samples inspect the caller's stack: minutes under
    pytest; and the sweep forks, which a process holding pytest's and the daemons' threads should not)."""
    command = [sys.executable, str(Path(oob_sweep.__file__)), "--json", *(["--full"] if FULL else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_sweep_finds_no_read_past_a_storage(report: dict[str, Any]) -> None:
    assert report["overloads"] > 1500 and report["sources"]["traced"] > 600, report["sources"]
    assert not report["faults"], report["faults"]
    assert report["ran"] > 10000 and report["refused"] < report["ran"] / 10, report  # the calls are valid ones


def test_the_detector_catches_each_guarded_kernel(report: dict[str, Any]) -> None:
    """Each `READ_DENSE` argument, alone in guarded memory in the overlapping layouts with torch's own kernel: a
    child dies of a signal for some call and layout of each (the ones the sweep found); the daemon's checks refuse
    every such case."""
    found = report["detector"]
    assert found["ops"] == sorted(guards.READ_DENSE)
    want = {(name, arg) for name, args in guards.READ_DENSE.items() for arg in args}
    missing = want - {tuple(pair) for pair in found["raw_faults"]}
    assert not missing, sorted(missing)
    assert found["checked_faults"] == 0 and found["checked_refused"] >= found["raw_fault_cases"], found


def _up(s: Session, t: torch.Tensor) -> Handle:
    return Handle(s.upload(t))


def _layer_norm(s: Session) -> Iterator[tuple[str, list[Any], dict[str, Any], str]]:
    x, w, b = torch.randn(4, 6), torch.randn(6), torch.randn(6)
    _, mean, rstd = torch.ops.aten.native_layer_norm.default(x, [6], w, b, 1e-5)
    args = [torch.randn(4, 6), x, [6], mean, rstd, w, b, [True, True, True]]
    yield "aten::native_layer_norm_backward.default", args, {}, "mean"
    yield "aten::native_layer_norm_backward.default", args, {}, "rstd"


def _group_norm(s: Session) -> Iterator[tuple[str, list[Any], dict[str, Any], str]]:
    x, w, b = torch.randn(2, 4, 3, 3), torch.randn(4), torch.randn(4)
    _, mean, rstd = torch.ops.aten.native_group_norm.default(x, w, b, 2, 4, 9, 2, 1e-5)
    args = [torch.randn(2, 4, 3, 3), x, mean, rstd, w, 2, 4, 9, 2, [True, True, True]]
    for name in ("grad_out", "input", "mean", "rstd", "weight"):
        yield "aten::native_group_norm_backward.default", args, {}, name


def _pools(s: Session) -> Iterator[tuple[str, list[Any], dict[str, Any], str]]:
    aten = torch.ops.aten
    x3 = torch.randn(1, 2, 4, 4, 4)
    out, idx = aten.adaptive_max_pool3d.default(x3, [2, 2, 2])
    yield "aten::adaptive_max_pool3d_backward.default", [torch.randn(out.shape), x3, idx], {}, "indices"
    x2 = torch.randn(1, 2, 6, 6)
    out, idx = aten.fractional_max_pool2d.default(x2, [2, 2], [3, 3], torch.rand(1, 2, 2))
    yield "aten::fractional_max_pool2d_backward.default", [torch.randn(out.shape), x2, [2, 2], [3, 3], idx], {}, \
        "indices"  # fmt: skip
    x3 = torch.randn(1, 2, 6, 6, 6)
    out, idx = aten.fractional_max_pool3d.default(x3, [2, 2, 2], [3, 3, 3], torch.rand(1, 2, 3))
    yield "aten::fractional_max_pool3d_backward.default", [torch.randn(out.shape), x3, [2, 2, 2], [3, 3, 3], idx], \
        {}, "indices"  # fmt: skip


def _others(s: Session) -> Iterator[tuple[str, list[Any], dict[str, Any], str]]:
    x = torch.randn(3, 4)
    yield "aten::median.dim", [x, 1], {}, "self"
    yield "aten::nanmedian.dim", [x, 1], {}, "self"
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    for name in ("query", "key", "value"):
        yield "aten::_scaled_dot_product_flash_attention_for_cpu.default", [q, k, v], {}, name


CALLS: list[Callable[[Session], Iterator[tuple[str, list[Any], dict[str, Any], str]]]] = [
    _layer_norm,
    _group_norm,
    _pools,
    _others,
]


def _position(name: str, arg: str) -> int:
    return [a.name for a in ops._resolve(name)._schema.arguments].index(arg)


def _expanded(s: Session, t: torch.Tensor) -> Handle:
    """A view of `t`'s shape whose elements are all one element, the first of a 4096-element storage of t's first
    value then zeros: a kernel reading it as numel() contiguous elements stays in that storage (the old code ran the
    call, reading valid indices), where the same view at a storage's end would read past it."""
    base = torch.zeros(4096, dtype=t.dtype)
    base[0] = t.reshape(-1)[0]
    [view] = s.call("aten::as_strided.default", _up(s, base), list(t.shape), [0] * t.dim(), 0)
    return Handle(view)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_each_guarded_op_refuses_an_overlapping_argument_through_a_daemon(daemon_factory: Any, isolation: str) -> None:
    d = daemon_factory(fake_gpu_memory=512 * MiB, isolation=isolation)
    neighbour = Healthy(d.address, d.token(tenant="neighbour", quota_bytes=QUOTA), pause=0.01)
    with Session.attach(d.address, d.token(tenant="reader", quota_bytes=QUOTA)) as s:
        seen = set()
        for make in CALLS:
            for name, args, kwargs, arg in make(s):
                at = _position(name, arg)
                local = ops._resolve(name)(*args, **kwargs)
                up = [_up(s, a) if isinstance(a, torch.Tensor) else a for a in args]
                bad = list(up)
                bad[at] = _expanded(s, args[at])
                s.call(name, *bad, outputs=0)
                with pytest.raises(errors.InvalidArgument) as info:
                    s.sync()
                text = str(info.value)
                assert READS in text and f"'{arg}'" in text and name.split(".")[0] in text, (name, arg, text)
                outs = s.call(name, *up, outputs=len(local) if isinstance(local, tuple) else 1)
                for got, want in zip(outs, local if isinstance(local, tuple) else (local,), strict=True):
                    if isinstance(want, torch.Tensor) and want.numel():  # the dense call: torch's result
                        torch.testing.assert_close(s.download(got), want, msg=f"{name} {arg}")
                seen.add(ops._resolve(name)._schema.name)
        assert seen == set(guards.READ_DENSE)
    neighbour.check()


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_batch_norm_running_statistics_must_not_overlap(daemon_factory: Any, isolation: str) -> None:
    """`native_batch_norm` in training updates running_mean/running_var (its schema does not mark them written): an
    expanded one is refused as `_native_batch_norm_legit`'s is; dense ones are updated as torch updates them."""
    d = daemon_factory(fake_gpu_memory=512 * MiB, isolation=isolation)
    with Session.attach(d.address, d.token(quota_bytes=QUOTA)) as s:
        x = torch.randn(8, 3)
        mean, var = torch.zeros(3), torch.ones(3)
        for at, arg in ((3, "running_mean"), (4, "running_var")):
            stats = [_up(s, mean), _up(s, var)]
            stats[at - 3] = _expanded(s, (mean, var)[at - 3])
            s.call("aten::native_batch_norm.default", _up(s, x), None, None, *stats, True, 0.1, 1e-5, outputs=3)
            with pytest.raises(errors.InvalidArgument, match=f"'{arg}'.*single memory location"):
                s.sync()
        hm, hv = _up(s, mean), _up(s, var)
        s.call("aten::native_batch_norm.default", _up(s, x), None, None, hm, hv, True, 0.1, 1e-5, outputs=3)
        torch.ops.aten.native_batch_norm.default(x, None, None, mean, var, True, 0.1, 1e-5)
        assert torch.equal(s.download(hm), mean) and torch.equal(s.download(hv), var)


def test_a_graph_reading_an_overlapping_slot_is_refused_at_its_definition(daemon: DaemonHandle) -> None:
    """A captured step's median over an input declared expanded, or layer norm's backward over a persistent expanded
    mean: refused when the graph is defined (its slots' layouts are fixed there); dense ones run."""
    with Session.attach(daemon.address, daemon.token(quota_bytes=QUOTA)) as s:
        meta = [wire.meta_to_proto(torch.zeros(1).expand(3, 4))]
        body = [device_pb2.Op(name="aten::median.dim", args=[_slot(1), _int(1)], outputs=[2, 3])]
        s.define_graph(device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=meta, ops=body))
        with pytest.raises(errors.InvalidArgument, match=f"graph op 0 .*'self'.*{READS}"):
            s.sync()
        x, w, b = torch.randn(4, 6), torch.randn(6), torch.randn(6)
        _, mean, rstd = torch.ops.aten.native_layer_norm.default(x, [6], w, b, 1e-5)
        mask = [True, True, True]
        for bad in (True, False):
            held = _expanded(s, mean) if bad else _up(s, mean)
            args = [_slot(1), _slot(1), _ints([6]), _slot(2), _slot(3), _slot(4), _slot(5), _bools(mask)]
            body = [device_pb2.Op(name="aten::native_layer_norm_backward.default", args=args, outputs=[6, 7, 8])]
            graph = device_pb2.DefineGraph(graph_id=2 + bad, inputs=1, input_meta=[wire.meta_to_proto(x)],
                                           persistent=[held, _up(s, rstd), _up(s, w), _up(s, b)], ops=body,
                                           outputs=[6])  # fmt: skip
            s.define_graph(graph)
            if bad:
                with pytest.raises(errors.InvalidArgument, match=f"graph op 0 .*'mean'.*{READS}"):
                    s.sync()
                continue
            out = s.new_handle()
            s.run_graph(2, [_up(s, x)], [out])
            want = torch.ops.aten.native_layer_norm_backward.default(x, x, [6], mean, rstd, w, b, mask)[0]
            torch.testing.assert_close(s.download(Handle(out)), want)


def _slot(n: int) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(tensor=n)


def _int(n: int) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(i=n)


def _ints(v: list[int]) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(ints=tensor_pb2.IntList(values=v))


def _bools(v: list[bool]) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(bools=tensor_pb2.BoolList(values=v))
