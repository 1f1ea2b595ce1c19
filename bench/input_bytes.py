"""What a step's input bytes cost the daemon's CPU (issue 8: the stock MLP's 512 KB batch), kernels left out.

A client (the shim, `gpupool.torch`) sends one CPU input per step to a live TLS daemon (one fake GPU, one torch
thread, pinned to its own core) and runs a trivial step on it: `x.reshape(-1)[:16].sum()` (a few ops whose cost
does not grow with the input). Two ways:

- `eager`: `x.to(device)` (an Upload command) and the step's ops, eagerly;
- `captured`: the step under `gpupool.torch.capture`: one RunGraph per step, the input inside it by value
  (`RunGraph.input_data`) up to capture.BY_VALUE_BYTES (256 KiB), above that an Upload before the RunGraph.

Per input size (--sizes, bytes of float32; the smallest is the baseline), each run a fresh client process pinned to
the other core: blocks of steps ending in one `.item()`, the daemon's CPU over the block (its front, zygote and the
session's worker: /proc, clock ticks, so blocks are long) per step, the median block counting; then per MB over the
smallest size's figure: what each MB of input costs the daemon. Runs alternate (every size and mode once a round)
and each figure is the median over --rounds. With --against DIR the same client also runs against DIR's daemon
(its .venv/bin/python), alternating which goes first, and the table prints both and their ratio.

    nice python bench/input_bytes.py                                  # ~2 min
    nice python bench/input_bytes.py --against /work/wt/base --rounds 3
    nice python bench/input_bytes.py --sizes 64,65536,524288,4194304 --modes captured
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from train_overhead import add_worker_flags, bench_daemons, run_worker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_bound import _tree_cpu  # noqa: E402

MODES = ("eager", "captured")
SIZES = "64,65536,524288,4194304"


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    import gpupool.torch as gt

    device = gt.attach(args.address, args.token)
    n = max(1, args.size // 4)
    batches = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def step(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)[:16].sum()

    run: Any
    if args.mode == "captured":
        run = gt.capture(step)
    else:

        def run(x: torch.Tensor) -> torch.Tensor:
            return step(x.to(device))

    expect = [float(b[:16].sum()) for b in batches]
    for i in range(8):  # warm-up (capture records in these); every result checked: the bytes arrived whole
        got = float(run(batches[i % 4]).item())
        assert abs(got - expect[i % 4]) <= 1e-4 * max(1.0, abs(expect[i % 4])), (got, expect[i % 4])
    blocks, daemon, client = [], [], []
    for _ in range(args.blocks):
        d0 = _tree_cpu(args.daemon_pid)
        c0 = time.process_time()
        t = time.perf_counter()
        out = None
        for i in range(args.steps):
            out = run(batches[i % 4])
        assert out is not None
        out.item()
        blocks.append((time.perf_counter() - t) / args.steps)
        daemon.append((_tree_cpu(args.daemon_pid) - d0) / args.steps)
        client.append((time.process_time() - c0) / args.steps)
    return {
        "step_s": statistics.median(blocks),
        "daemon_s": statistics.median(daemon),
        "client_s": statistics.median(client),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=SIZES, help="comma-separated input bytes (float32); the first is the baseline")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ",".join(MODES))
    p.add_argument("--steps", type=int, default=300, help="steps per timed block (the daemon's CPU is in ticks)")
    p.add_argument("--blocks", type=int, default=3, help="timed blocks (the median counts)")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs; the median of each figure over them")
    p.add_argument("--against", metavar="DIR", default="", help="also run everything against DIR's daemon")
    p.add_argument("--against-python", default="", help="the python of --against (default: DIR/.venv/bin/python)")
    add_worker_flags(p)
    p.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    load0 = os.getloadavg()[0]
    against = None
    if args.against:
        against = (args.against, args.against_python or str(Path(args.against) / ".venv" / "bin" / "python"))
    daemons_of = ["process", "base"] if against else ["process"]
    results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    with bench_daemons(args.daemon_core, against=against) as daemons:
        for k in range(args.rounds):
            for mode in modes:
                for size in sizes:
                    for which in daemons_of if k % 2 == 0 else daemons_of[::-1]:
                        argv_w = ["--mode", mode, "--size", str(size), "--steps", str(args.steps),
                                  "--blocks", str(args.blocks)]  # fmt: skip
                        r = run_worker(__file__, args.client_core, f"{mode}/{size}/{which}", argv_w,
                                       **daemons.remote(which))  # fmt: skip
                        results.setdefault((mode, size, which), []).append(r)
    table = Table(title="a step's input bytes: the daemon's CPU per step (medians over rounds; per MB: over the "
                  f"{sizes[0]}-byte input's)")  # fmt: skip
    for col in ("mode", "input bytes", "daemon", "ms/step", "client us/step", "daemon us/step", "daemon us/MB"):
        table.add_column(col, justify="right")
    if against:
        table.add_column("this/base", justify="right")
    med: dict[tuple[str, int, str], dict[str, float]] = {
        key: {f: statistics.median(r[f] for r in rs) for f in ("step_s", "daemon_s", "client_s")}
        for key, rs in results.items()
    }
    for mode in modes:
        for size in sizes:
            for which in daemons_of:
                m, base = med[(mode, size, which)], med[(mode, sizes[0], which)]
                extra = m["daemon_s"] - base["daemon_s"]
                per_mb = f"{extra / (size - sizes[0]) * 2**20 * 1e6:.0f}" if size != sizes[0] else ""
                row = [mode, str(size), "this" if which == "process" else "base", f"{m['step_s'] * 1e3:.3f}",
                       f"{m['client_s'] * 1e6:.0f}", f"{m['daemon_s'] * 1e6:.0f}", per_mb]  # fmt: skip
                if against:
                    other = med[(mode, size, "base")]["daemon_s"]
                    row.append(f"{m['daemon_s'] / other:.2f}" if which == "process" and other else "")
                table.add_row(*row)
    Console(width=160).print(table)
    print(f"load average (1 min): {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
