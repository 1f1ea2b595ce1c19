"""What the C++ client costs per eager op without a daemon: client/native/native_client.cpp (the round-12 spike, since
round 14 gpupool.client.native) against local CPU eager.

The spike is a PrivateUse1 device (named `gpupool` since round 14) whose tensors are plain at::Tensors holding a handle
instead of memory; one C++ boxed fallback infers every op's outputs with its Meta kernel (cached), allocates handles and
appends a compact record to a byte buffer that a null sink counts and drops (as client_overhead.py's null session). No
Python runs per op. The workload is launch_bound.py's tiny MLP (32-64-64-2, batch 16; Adam, foreach), one step = upload
x, y + zero_grad + forward + loss + backward + step, as client_overhead.py runs it.

Two ways, interleaved in one process, one torch thread:
- `local`: plain CPU tensors (autograd, dispatcher and the kernels);
- `spike`: the spike device (autograd, dispatcher, meta inference or its cache, records; no kernels).
Columns: ops per step (local: aten ops reaching the CPU kernels, counted with a dispatch mode once; spike: op records),
CPU and wall microseconds per step and per spike op (best and median of the rounds).

    nice -n 10 python bench/native_client_spike.py --rounds 7 --steps 50

Instructions of record come from callgrind, one way per run, instrumentation switched on around the timed steps only:

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.out \\
        python bench/native_client_spike.py --callgrind spike --steps 5
    grep ^totals: /tmp/cg.out      # divide by the ops (or steps) the script prints

The spike's backward runs on autograd's device thread (torch's default); `--calling-thread` runs it on the calling
thread, as gpupool's shim does. `--no-claim` leaves torch's own routing (structured ops as empty_strided + their out=
form, foreach ops as per-tensor loops: what a fallback-only backend gets), `--no-cache` runs every op's Meta kernel
(no meta cache).
This process must own PrivateUse1: the script sets TORCH_DEVICE_BACKEND_AUTOLOAD=0 before importing torch and never
imports gpupool.torch.
"""

from __future__ import annotations

import os

os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"  # before torch: gpupool's package would take PrivateUse1

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from cgtools import instrumented  # noqa: E402
from gpupool.client.native import backend as native_client  # noqa: E402
from launch_bound import workload  # noqa: E402


class OpLog(TorchDispatchMode):
    """The aten ops of a region at the Python dispatch key, with their outputs' (shape, stride, dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[Any]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, list | tuple) else [out]
        metas = [(tuple(t.shape), t.stride(), t.dtype) if isinstance(t, torch.Tensor) else None for t in flat]
        self.ops.append((str(func), metas))
        return out


def setup(how: str, model_name: str = "tiny-mlp", calling_thread: bool = False) -> tuple[Callable[[int], Any], Any]:
    """(step function, optimizer) for one way of running: local or spike. torch's autograd engine runs the spike's
    backward on its device thread, unless `calling_thread`: then on the calling thread, as gpupool's shim runs it
    (client/torch/backend.py `_CallingThreadEngine`)."""
    model, data, loss_fn = workload(model_name)
    dev = native_client.device() if how == "spike" else None
    if dev is not None:
        model = model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)

    def step(i: int) -> Any:
        x, y = data[i % 4]
        if dev is not None:
            x, y = x.to(dev), y.to(dev)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        if dev is not None and calling_thread:
            prev = torch._C._is_multithreading_enabled()
            torch._C._set_multithreading_enabled(False)
            try:
                loss.backward()
            finally:
                torch._C._set_multithreading_enabled(prev)
        else:
            loss.backward()
        opt.step()
        return loss

    return step, opt


def start(claim: bool, cache: bool) -> int:
    native_client.load()
    native_client.configure(keep=False, track=False, cache=cache)
    return native_client.claim(True, True) if claim else 0


def local_ops_per_step(step: Callable[[int], Any]) -> int:
    """Aten ops of one local step that reach a kernel (views and other metadata-only ops included: a dispatch mode
    cannot tell them apart; see the spike's own count for what records)."""
    with OpLog() as log:
        step(0)
    return len(log.ops)


def spike_ops_per_step(step: Callable[[int], Any]) -> dict[str, int]:
    before = native_client.stats()
    step(0)
    after = native_client.stats()
    return {k: after[k] - before[k] for k in ("op_records", "uploads", "alloc_records", "free_records", "meta_runs")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-mlp", help="a launch_bound.py workload: tiny-mlp (the issue's) or encoder")
    p.add_argument("--steps", type=int, default=50, help="steps per measurement")
    p.add_argument("--rounds", type=int, default=7, help="interleaved measurements of each way")
    p.add_argument("--callgrind", choices=("local", "spike"), help="under callgrind: count one way's steps")
    p.add_argument("--no-claim", action="store_true", help="leave structured and foreach ops to torch's routing")
    p.add_argument("--no-cache", action="store_true", help="run every op's Meta kernel (no meta inference cache)")
    p.add_argument("--calling-thread", action="store_true", help="the spike's backward on the calling thread")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    claimed = start(not args.no_claim, not args.no_cache)
    if args.callgrind:
        return callgrind(args.model, args.callgrind, args.steps, args.calling_thread)
    steps = {how: setup(how, args.model, calling_thread=args.calling_thread)[0] for how in ("local", "spike")}
    for step in steps.values():  # warm up: optimizer state, caches
        for i in range(3):
            step(i)
    counts = spike_ops_per_step(steps["spike"])
    ops = counts["op_records"]
    local_ops = local_ops_per_step(steps["local"])
    print(f"{args.model}: claimed ops: {claimed}; meta cache: {'off' if args.no_cache else 'on'}")
    print(f"spike, per step: {counts}")
    print(f"local, aten ops per step at the Python dispatch key: {local_ops}")
    cpu: dict[str, list[float]] = {how: [] for how in steps}
    wall: dict[str, list[float]] = {how: [] for how in steps}
    for _ in range(args.rounds):
        for how, step in steps.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for i in range(args.steps):
                step(i)
            cpu[how].append((time.process_time() - c0) / args.steps * 1e6)
            wall[how].append((time.perf_counter() - w0) / args.steps * 1e6)
    print(f"\n{'way':>6} {'CPU us/step best':>17} {'median':>8} {'wall median':>12} {'CPU us/spike op':>16} "
          f"{'ratio to local':>15}")  # fmt: skip
    local = statistics.median(cpu["local"])
    for how in steps:
        med = statistics.median(cpu[how])
        print(f"{how:>6} {min(cpu[how]):17.1f} {med:8.1f} {statistics.median(wall[how]):12.1f} {med / ops:16.2f} "
              f"{med / local:15.2f}")  # fmt: skip
    return 0


def callgrind(model: str, how: str, steps: int, calling_thread: bool) -> int:
    """Run `steps` steps of one way with callgrind's instrumentation on (`callgrind_control`), then print what to
    divide callgrind's totals by."""
    spike = setup("spike", model, calling_thread=calling_thread)[0]
    for i in range(3):
        spike(i)
    ops = spike_ops_per_step(spike)["op_records"]
    step = spike if how == "spike" else setup("local", model)[0]
    for i in range(3):
        step(i)
    with instrumented():
        for i in range(steps):
            step(i)
    print(f"{model} {how}: steps {steps}, spike op records {ops * steps} (divide callgrind's totals by these)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
