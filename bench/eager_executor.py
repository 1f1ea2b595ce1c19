"""The daemon's Python cost per eager op on top of the kernel: `CommandExecutor.execute` in-process on a fake GPU.

For a few ops of a small training step, the same op N times three ways, in one process: the bare aten call (the
kernel and torch's own dispatch), a compact `eager_op` record (gpupool/compact.py) through the executor, and an
`Op` message through the executor. The difference is what the worker process adds per op: decoding, the
allowlist, guards, size and quota checks, handle bookkeeping. CPU time of this thread (`time.thread_time`), so a
loaded box inflates it less than wall time; median of --repeats runs.

    python bench/eager_executor.py                 # ~20 s
    python bench/eager_executor.py -n 5000 --repeats 7
    cd ../main && python ../eager/bench/eager_executor.py   # a checkout without compact records: the Op column only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from gpupool.server import slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession

from gpupool._proto import device_pb2, tensor_pb2

try:
    from gpupool import compact
except ImportError:  # an older checkout (before compact records): measure its Op path only
    compact = None  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=2000, help="ops per measurement")
    p.add_argument("--repeats", type=int, default=5, help="measurements per way (the median counts)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    dev = FakeDevice(0, "bench", 1 << 32)
    s = WorkerSession("bench", 1, dev, DeviceMemory(dev), 1 << 31)
    ex = CommandExecutor(slices.SliceLedger())
    ex.warm_up()
    handles = iter(range((1 << 32) + 1, (1 << 32) + 10**8))

    def put(t: torch.Tensor) -> int:
        h = next(handles)
        s.bind(h, t)
        return h

    x, w, b, g = put(torch.randn(16, 32)), put(torch.randn(32, 64)), put(torch.randn(64)), put(torch.randn(16, 64))
    T = compact.tensor if compact else lambda h: b""
    V = compact.encode_value if compact else lambda v: b""
    # (label, op name, compact args, Op args, bare call)
    cases: list[tuple[str, str, list[bytes], list[tensor_pb2.Arg], Callable[[], Any]]] = [
        ("addmm 16x32x64", "aten::addmm.default", [T(b), T(x), T(w)], _args(b, x, w),
         lambda: torch.ops.aten.addmm.default(s.tensors[b], s.tensors[x], s.tensors[w])),
        ("relu 16x64", "aten::relu.default", [T(g)], _args(g), lambda: torch.ops.aten.relu.default(s.tensors[g])),
        ("mul.Tensor by 0.5", "aten::mul.Tensor", [T(g), V(0.5)], [*_args(g), tensor_pb2.Arg(f=0.5)],
         lambda: torch.ops.aten.mul.Tensor(s.tensors[g], 0.5)),
        ("sum.dim_IntList", "aten::sum.dim_IntList", [T(g), V([1]), V(False)],
         [*_args(g), tensor_pb2.Arg(ints=tensor_pb2.IntList(values=[1])), tensor_pb2.Arg(b=False)],
         lambda: torch.ops.aten.sum.dim_IntList(s.tensors[g], [1], False)),
    ]  # fmt: skip
    print(f"{'op':20s} {'kernel us':>10s} {'compact us':>11s} {'(+ over)':>9s} {'Op us':>8s} {'(+ over)':>9s}")
    for i, (label, name, cargs, pargs, bare) in enumerate(cases):
        runs: dict[str, list[float]] = {"bare": [], "compact": [], "op": []}
        for r in range(args.repeats):
            recs, ops = [], []
            for k in range(args.n):
                if compact is None:
                    break
                head = compact.head(i, name if r == 0 and k == 0 else None, [next(handles)])
                recs.append(device_pb2.Command(eager_op=head + compact.U8.pack(len(cargs)) + b"".join(cargs) + b"\0"))
            for _ in range(args.n):
                ops.append(device_pb2.Command(op=device_pb2.Op(name=name, args=pargs, outputs=[next(handles)])))
            runs["bare"].append(_time_calls(bare, args.n))
            runs["compact"].append(_time_commands(ex, s, recs) if recs else float("nan"))
            runs["op"].append(_time_commands(ex, s, ops))
            if s.error is not None:
                raise SystemExit(f"{label}: {s.error}")
            for c in recs:
                s.unbind(compact.outputs_of(c.eager_op)[0])  # type: ignore[union-attr]
            for c in ops:
                s.unbind(c.op.outputs[0])
        kern, comp, old = (statistics.median(runs[m]) * 1e6 for m in ("bare", "compact", "op"))
        print(f"{label:20s} {kern:10.1f} {comp:11.1f} {comp - kern:+9.1f} {old:8.1f} {old - kern:+9.1f}")
    return 0


def _args(*handles: int) -> list[tensor_pb2.Arg]:
    return [tensor_pb2.Arg(tensor=h) for h in handles]


def _no_reply(item: Any) -> None:
    raise AssertionError("ops are not answered")


def _time_calls(fn: Callable[[], Any], n: int) -> float:
    start = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - start) / n


def _time_commands(ex: CommandExecutor, s: WorkerSession, commands: list[device_pb2.Command]) -> float:
    start = time.thread_time()
    for c in commands:
        ex.execute(s, c, _no_reply)
    return (time.thread_time() - start) / len(commands)


if __name__ == "__main__":
    sys.exit(main())
