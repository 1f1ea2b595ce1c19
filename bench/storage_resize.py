"""A storage resize's cost on the worker (Command.resize_storage, server/storage_resize.py: FSDP2's free_storage and
alloc_storage, four a parameter a step), through `CommandExecutor.execute` on a fake GPU's session holding many
handles: one 0/n cycle of a small storage, the handles on it found from its last resize (`_Away.counted`) side by side
with a scan of every handle of the session (its list dropped before each resize). Prints microseconds a resize,
medians of the rounds, and their ratio.

    nice -n 5 python bench/storage_resize.py [--handles 100,1000,10000] [--rounds 5] [--cycles 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gpupool.server import slices, storage_resize
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession

from gpupool._proto import device_pb2

BASE = 1 << 32


def per_resize(handles: int, cycles: int, scan: bool) -> float:
    dev = FakeDevice(0, "h", 1 << 34)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 33)
    ex = CommandExecutor(slices.SliceLedger())
    for i in range(handles):
        s.bind(BASE + 1 + i, torch.zeros(16))
    x = BASE + handles + 1
    s.bind(x, torch.zeros(256))  # 1 KiB: the zeroing of its regrowth is small
    cmds = [device_pb2.Command(resize_storage=device_pb2.ResizeStorage(handle=x, nbytes=n)) for n in (0, 1024)]
    replies: list[object] = []
    ex.execute(s, cmds[0], replies.append)
    ex.execute(s, cmds[1], replies.append)
    away = storage_resize._sessions[s]
    start = time.perf_counter()
    for _ in range(cycles):
        for cmd in cmds:
            if scan:
                away.members.clear()
            ex.execute(s, cmd, replies.append)
    took = (time.perf_counter() - start) / (2 * cycles)
    assert s.error is None and not replies
    return took * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--handles", default="100,1000,10000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    per_resize(100, 20, False)  # warm: the first executor's and allocator's set-up
    print(f"{'handles':>8} {'found (us)':>11} {'scan (us)':>10} {'scan/found':>11}")
    for n in (int(v) for v in args.handles.split(",")):
        found = statistics.median(per_resize(n, args.cycles, False) for _ in range(args.rounds))
        scan = statistics.median(per_resize(n, args.cycles, True) for _ in range(args.rounds))
        print(f"{n:>8} {found:>11.1f} {scan:>10.1f} {scan / found:>11.2f}")


if __name__ == "__main__":
    main()
