"""The shim's own Python per op, by kind of op: `RemoteTensor.__torch_dispatch__` called directly, without torch's
dispatcher in front (the floor `client_overhead.py` measures), over a session that drops what it is sent.

Each call makes its outputs and lets them die at once, so a count covers the whole life of an op's wrappers:
routing, cache key, record, handle, wrapper, `__del__`. Under callgrind each case is counted on its own (the
instrumentation switched on around its calls only, then dumped), so the figures are exact instructions per call:

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/ops.out \\
        python bench/shim_ops.py --callgrind
    for f in /tmp/ops.out.*; do echo "$(grep -m1 Trigger $f) $(grep ^totals: $f)"; done   # divide by --calls

Without valgrind it prints the Python bytecodes each case runs per call, by function (sys.settrace): where
the shim's Python goes, line by line with --lines.
"""

from __future__ import annotations

import argparse
import collections
import linecache
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_overhead import NullSession  # noqa: E402
from gpupool.client.torch import runtime  # noqa: E402
from gpupool.client.torch.tensor import RemoteTensor, wrap  # noqa: E402

import gpupool.torch  # noqa: E402,F401 - registers the gpupool device

aten = torch.ops.aten


def cases() -> dict[str, Callable[[], Any]]:
    rt = runtime.DeviceRuntime(runtime.next_free_index(), NullSession())

    def new(*shape: int) -> RemoteTensor:
        return wrap(rt, rt.new_handle(), shape, torch.empty(shape).stride(), 0, torch.float32)

    a, b, c = new(16, 32), new(32, 8), new(8)
    ts = [new(4, 4) for _ in range(6)]
    td = RemoteTensor.__torch_dispatch__
    return {
        "mm": lambda: td(aten.mm.default, (), (a, b), None),
        "addmm": lambda: td(aten.addmm.default, (), (c, a, b), None),
        "t": lambda: td(aten.t.default, (), (b,), None),
        "relu": lambda: td(aten.relu.default, (), (a,), None),
        "detach": lambda: td(aten.detach.default, (), (a,), None),
        "view": lambda: td(aten.view.default, (), (a, [32, 16]), None),
        "sum_dim": lambda: td(aten.sum.dim_IntList, (), (a, [0], True), None),
        "foreach_add_": lambda: td(aten._foreach_add_.Scalar, (), (ts, 1.0), None),
        "foreach_sqrt": lambda: td(aten._foreach_sqrt.default, (), (ts,), None),
    }


def bytecodes(fn: Callable[[], Any], by_line: bool) -> collections.Counter[Any]:
    """The bytecodes one call of `fn` runs, by function (or by source line)."""
    counts: collections.Counter[Any] = collections.Counter()

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_filename, frame.f_lineno or 0) if by_line else code.co_qualname] += 1
        return trace

    sys.settrace(trace)
    fn()
    sys.settrace(None)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="*", help="which (default: all)")
    p.add_argument("--calls", type=int, default=2000, help="calls per case under callgrind")
    p.add_argument("--lines", action="store_true", help="bytecodes per source line, not per function")
    p.add_argument("--callgrind", action="store_true", help="under callgrind: count each case's instructions")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    all_cases = cases()
    chosen = args.cases or list(all_cases)
    under_valgrind = args.callgrind
    pid = str(os.getpid())
    for name in chosen:
        fn = all_cases[name]
        for _ in range(50):  # warm: routes, meta cache, op ids, the interpreter's specializations
            fn()
        if under_valgrind:
            ctl = ["callgrind_control"]
            subprocess.run([*ctl, "--zero", pid], capture_output=True, check=False)
            subprocess.run([*ctl, "--instr=on", pid], capture_output=True, check=False)
            for _ in range(args.calls):
                fn()
            subprocess.run([*ctl, "--instr=off", pid], capture_output=True, check=False)
            subprocess.run([*ctl, f"--dump={name}", pid], capture_output=True, check=False)
            continue
        counts = bytecodes(fn, args.lines)
        print(f"{name}: {sum(counts.values())} bytecodes")
        for what, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            if args.lines:
                print(f"  {n:4d}  {what[1]:4d} {linecache.getline(what[0], what[1]).strip()[:100]}")
            else:
                print(f"  {n:4d}  {what}")
    if under_valgrind:
        print(f"{args.calls} calls per case: divide each dump's totals by this")
    return 0


if __name__ == "__main__":
    sys.exit(main())
