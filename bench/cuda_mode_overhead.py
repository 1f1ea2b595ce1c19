"""What `--cuda`'s TorchFunctionMode costs per torch call: the same calls with and without the mode,
alternating rounds in one process, medians (no daemon: the mode runs on the client before any op leaves).

    python bench/cuda_mode_overhead.py [--calls 20000] [--rounds 7]

Prints µs per call for a few kinds of call and the added cost; compare with the ~200 µs end-to-end cost of
an eager gpupool op (BENCHMARKS.md) to see its share.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from gpupool.client.cuda.devices import CudaToGpupool


def per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = torch.ones(4), torch.ones(4)
    lin = torch.nn.Linear(4, 4)
    cases: dict[str, Callable[[], object]] = {
        "x + y": lambda: x + y,
        "torch.zeros(4, device='cpu')": lambda: torch.zeros(4, device="cpu"),
        "x.to('cpu')": lambda: x.to("cpu"),
        "x.is_cuda": lambda: x.is_cuda,
        "Linear(4, 4)(x)": lambda: lin(x),
    }
    mode = CudaToGpupool()
    print(f"{'call':32} {'plain µs':>9} {'--cuda µs':>9} {'added µs':>9} {'ratio':>6}")
    for name, fn in cases.items():
        plain, mapped = [], []
        for _ in range(args.rounds):
            plain.append(per_call(fn, args.calls))
            with mode:
                mapped.append(per_call(fn, args.calls))
        p, m = statistics.median(plain), statistics.median(mapped)
        print(f"{name:32} {p:9.2f} {m:9.2f} {m - p:9.2f} {m / p:6.2f}")


if __name__ == "__main__":
    main()
