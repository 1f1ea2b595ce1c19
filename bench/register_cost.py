"""A scheduler Register's CPU time, in-process: a `Core` on a `MemoryStore`, HOSTS hosts of 8 fake GPUs registered one
after another, median of 5 (round 48, warts48: the GPU-UUID binding's check). Run it with each tree's Python for A/B:

    /work/wt/base/.venv/bin/python bench/register_cost.py base; .venv/bin/python bench/register_cost.py branch
"""

from __future__ import annotations

import argparse
import statistics
import time

from gpupool.scheduler.hosts import DeviceSpec
from gpupool.scheduler.leases import Core, CoreConfig
from gpupool.scheduler.store import MemoryStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("label", nargs="?", default="this tree")
    parser.add_argument("--hosts", type=int, default=2000)
    args = parser.parse_args()
    runs = []
    for _ in range(5):
        core = Core(MemoryStore(), b"k" * 32, CoreConfig(host_timeout=60))
        start = time.process_time()
        for h in range(args.hosts):
            devices = [DeviceSpec(i, f"GPU-{h}-{i}", "fake", 1 << 33, True) for i in range(8)]
            core.hosts.register(f"h{h}", f"127.0.0.1:{1000 + h % 60000}", devices)
        runs.append((time.process_time() - start) / args.hosts * 1e6)
    print(f"{args.label}: us CPU a Register ({args.hosts} hosts x 8 GPUs), median of 5: "
          f"{statistics.median(runs):.1f} {[round(r, 1) for r in runs]}")  # fmt: skip


if __name__ == "__main__":
    main()
