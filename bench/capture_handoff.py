"""Where a captured step's wall time goes beyond its instructions: the threads' wake-ups and CPU per step.

launch_bound's tiny MLP captured (`--adam`, default fused: `Adam(fused=True)`, a device lr), its client pinned to
one core and the daemon (front, zygote, session worker) to the other, as launch_bound runs them. Around each timed
block of steps (one sync at its end) it reads, for every thread of the client and of the daemon's processes,
/proc/PID/task/TID/status (voluntary and involuntary context switches) and /proc/PID/task/TID/schedstat (ns on
the CPU, ns waiting for it on a run queue, times it ran), and prints them per step by thread name: how often each
thread is woken per step, what CPU it spends, and how long it waits for its core. Also the frames the client
sent per step (capture.HOLD_STEPS, HOLD_MAX_STEPS) and each thread's user/system split (/proc/PID/stat, ticks).

    nice -n 5 python bench/capture_handoff.py                    # ~1 min
    nice -n 5 python bench/capture_handoff.py --steps 40 --blocks 20 --adam capturable
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from daemon_ab import _tree
from launch_bound import adam, training_step, workload
from train_overhead import add_worker_flags, bench_daemons, run_worker

TICK = os.sysconf("SC_CLK_TCK")


def _threads(pids: list[int], who: str) -> dict[str, list[float]]:
    """who/comm -> [voluntary, involuntary switches, run ns, wait ns, timeslices, utime ticks, stime ticks], summed
    over threads of that name."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0] * 7)
    names = {t.native_id: t.name for t in threading.enumerate()} if who == "client" else {}
    for pid in pids:
        label = who if pid == pids[0] else f"{who}-child"
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            base = f"/proc/{pid}/task/{tid}"
            try:
                comm = Path(f"{base}/comm").read_text().strip()
                status = Path(f"{base}/status").read_text()
                sched = Path(f"{base}/schedstat").read_text().split()
                stat = Path(f"{base}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            vol = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
            invol = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
            row = out[f"{label}/{comm}/{names.get(int(tid), tid)}"]
            values = (vol, invol, int(sched[0]), int(sched[1]), int(sched[2]), int(stat[11]), int(stat[12]))
            for i, v in enumerate(values):
                row[i] += v
    return out


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    from gpupool.client.torch import runtime

    import gpupool.torch as gt

    capture = sys.modules["gpupool.client.torch.capture"]  # (the package's `capture` is the function)
    if args.hold_max:  # frames of at most this many steps (4: as they were before frames grew)
        capture.HOLD_MAX_STEPS = args.hold_max
    model, data, loss_fn = workload(args.model)
    device = gt.attach(args.address, args.token)
    rt = runtime.get(device.index)
    model = model.to(device)
    opt = adam(model, device, True, args.adam)
    run = gt.capture(training_step(model, opt, loss_fn))
    for i in range(args.warmup):
        run(*data[i % 4]).item()
    frames = [0]
    put = rt.session._put

    def counting_put(item: Any) -> None:
        frames[0] += 1
        put(item)

    rt.session._put = counting_put  # type: ignore[method-assign]
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0] * 7)
    blocks = []
    n = 0
    for _ in range(args.blocks):
        pids = _tree(args.daemon_pid)
        a = {**_threads([os.getpid()], "client"), **_threads(pids, "daemon")}
        t = time.perf_counter()
        loss = None
        for i in range(args.steps):
            loss = run(*data[i % 4])
        assert loss is not None
        loss.item()
        blocks.append((time.perf_counter() - t) / args.steps)
        b = {**_threads([os.getpid()], "client"), **_threads(pids, "daemon")}
        for k, v in b.items():
            base = a.get(k, [0.0] * 7)
            totals[k] = [x + y - z for x, y, z in zip(totals[k], v, base, strict=True)]
        n += args.steps
    return {
        "step_ms": statistics.median(blocks) * 1e3,
        "frames_per_step": frames[0] / n,
        "steps": n,
        "threads": {k: [x / n for x in v] for k, v in totals.items() if any(v)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-mlp")
    p.add_argument("--adam", default="fused")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--blocks", type=int, default=30)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--hold-max", type=int, default=0, help="capture.HOLD_MAX_STEPS for the run (0: as shipped)")
    add_worker_flags(p)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    argv2 = ["--model", args.model, "--adam", args.adam, "--steps", str(args.steps), "--blocks", str(args.blocks),
             "--warmup", str(args.warmup), "--hold-max", str(args.hold_max)]  # fmt: skip
    load0 = os.getloadavg()[0]
    with bench_daemons(args.daemon_core) as daemons:
        r = run_worker(__file__, args.client_core, "captured", argv2, **daemons.remote())
    print(f"{args.model}, captured, Adam {args.adam}: {r['step_ms']:.3f} ms/step (median block), "
          f"{r['frames_per_step']:.3f} frames/step over {r['steps']} steps")  # fmt: skip
    heads = ("vol/step", "invol", "run us", "wait us", "slices", "usr us", "sys us")
    print(f"{'thread':40} " + " ".join(f"{h:>8}" for h in heads))
    rows = sorted(r["threads"].items(), key=lambda kv: (kv[0].split("/")[0], -kv[1][2]))
    for name, (vol, invol, run_ns, wait_ns, slices, ut, st) in rows:
        if run_ns < 1000 and vol < 0.01:
            continue
        print(f"{name:40} {vol:9.3f} {invol:7.3f} {run_ns / 1e3:8.1f} {wait_ns / 1e3:8.1f} {slices:7.3f} "
              f"{ut / TICK * 1e6:7.1f} {st / TICK * 1e6:7.1f}")  # fmt: skip
    for side in ("client", "daemon"):
        tot = [sum(v[i] for k, v in r["threads"].items() if k.startswith(side)) for i in range(7)]
        print(f"{side + ' (all threads)':40} {tot[0]:9.3f} {tot[1]:7.3f} {tot[2] / 1e3:8.1f} {tot[3] / 1e3:8.1f} "
              f"{tot[4]:7.3f} {tot[5] / TICK * 1e6:7.1f} {tot[6] / TICK * 1e6:7.1f}")  # fmt: skip
    print(f"load average (1 min): {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
