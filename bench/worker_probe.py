"""Where a session worker's time goes during training steps: its system calls (`strace -f -c`) and its Python
profile (cProfile, server/workerprofile.py), each around the timed steps only, in one run. Written for the
real-GPU host (bench/real_gpu.sh's `probe` stage: one device call says where the daemon's 72-159 us an op go there);
here it runs on a fake GPU.

One daemon (`gpupool serve`, TLS, the side port on as `gpupool up` has it: `--bulk-listen 127.0.0.1:0`;
`BENCH_DAEMON_FLAGS` replaces it; `--gpu`: the host's CUDA device 0) started with GPUPOOL_WORKER_PROFILE set, so each
session worker keeps a profiler that SIGUSR1 turns on and off (writing what it has as it goes off: a worker is killed at
its session's end). For each model and mode a client (bench/daemon_syscalls.py's, launch_bound's workloads) runs its
warm-up steps, each synced (learned runs, graphs), then waits; the probe attaches `strace -f -c` to the session's worker
(where strace exists; the pass says so where it does not), turns its profiler on, lets the client run `--steps` steps
(one sync at their end), then turns the profiler off and stops strace. Printed: the wall time a step (under strace and
the profiler: both slow the worker, so compare shares, not times), the worker's system calls a step by kind, and its
functions by own time (us a step, calls a step, and cumulative time a step).

    nice python bench/worker_probe.py --models tiny-mlp --modes native --steps 50
    python3 bench/worker_probe.py --gpu --models tiny-mlp,encoder --modes native,native-captured --steps 50
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
SIDE_PORT = "--bulk-listen 127.0.0.1:0"


def probe(remote: dict[str, Any], model: str, mode: str, args: argparse.Namespace, folder: Path) -> None:
    from daemon_syscalls import end_client, session_worker

    cmd = [sys.executable, str(HERE / "daemon_syscalls.py"), "--client", "--model", model, "--mode", mode]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--sync-every", "0"]
    cmd += ["--address", remote["address"], "--token", remote["token"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=HERE)
    assert proc.stdin is not None and proc.stdout is not None
    tracer = None
    trace = folder / f"{model}-{mode}.strace"
    print(f"\n=== {model} {mode}: {args.warmup} warm-up steps, then {args.steps} steps probed", flush=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"client {model}/{mode} failed: {line!r} (exit {proc.wait()})")
        worker = session_worker(int(remote["daemon_pid"]))
        if shutil.which("strace") and not args.no_strace:
            tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(trace), "-p", str(worker)],
                                      stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1.5)  # attached (strace -p has no handshake)
        else:
            print("no strace here (or --no-strace): no system calls counted", flush=True)
        os.kill(worker, signal.SIGUSR1)  # the profiler on
        t0 = time.perf_counter()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        wall = time.perf_counter() - t0
        if tracer is not None:  # first: the profile's write is no system call of the steps
            tracer.send_signal(signal.SIGINT)  # detaches, then writes its table
            tracer.wait(timeout=60)
            tracer = None
        os.kill(worker, signal.SIGUSR1)  # off: the worker writes its profile
        stats = folder / f"worker-{worker}.prof"
        _written(stats)  # before the session ends: its worker is killed then
        print(f"wall {wall / args.steps * 1e3:.2f} ms a step under the probes (loss {result['loss']:.6f})")
        if trace.exists():
            print_strace(trace.read_text(), args.steps)
    finally:
        end_client(proc, tracer)
    if stats.stat().st_size == 0:
        print(f"no profile from worker {worker} ({stats})")
        return
    print_profile(stats, args.steps, args.top)


def _written(path: Path) -> None:
    """Wait (30 s at most) until `path` holds something and stops growing."""
    deadline = time.monotonic() + 30
    size = -1
    while time.monotonic() < deadline:
        now = path.stat().st_size if path.exists() else 0
        if now and now == size:
            return
        size = now
        time.sleep(0.2)


def print_strace(table: str, steps: int) -> None:
    """strace -c's table as calls a step by kind, the most frequent first."""
    rows = []
    for line in table.splitlines():
        m = re.match(r"^\s*(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+)\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$", line)
        if m and m.group(6) != "total":
            rows.append((int(m.group(4)), m.group(6), float(m.group(2))))
    rows.sort(reverse=True)
    if not rows:
        print("strace counted nothing (its attach refused?):\n" + table[-500:])
        return
    total = sum(r[0] for r in rows)
    print(f"worker system calls: {total / steps:.1f} a step: " +
          ", ".join(f"{name} {calls / steps:.1f}" for calls, name, _ in rows[:14]))  # fmt: skip


def print_profile(path: Path, steps: int, top: int) -> None:
    """The worker's functions by own time, a step."""
    stats = pstats.Stats(str(path), stream=io.StringIO())
    rows = []
    total = 0.0
    for (file, line, name), (_cc, calls, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        total += tt
        where = f"{Path(file).name}:{line}({name})" if line else name
        rows.append((tt, calls, ct, where))
    rows.sort(reverse=True)
    print(f"worker Python profile: {total / steps * 1e6:.0f} us a step profiled (cProfile's own cost included)")
    print(f"{'own us/step':>12} {'calls/step':>11} {'cum us/step':>12}  function")
    for tt, calls, ct, where in rows[:top]:
        print(f"{tt / steps * 1e6:12.1f} {calls / steps:11.1f} {ct / steps * 1e6:12.1f}  {where[:100]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-mlp")
    p.add_argument("--modes", default="native", help="native, native-captured, eager, captured")
    p.add_argument("--steps", type=int, default=50, help="steps probed (one sync at their end)")
    p.add_argument("--warmup", type=int, default=12, help="steps first, each synced (learned runs, the graph)")
    p.add_argument("--gpu", action="store_true", help="the daemon serves the host's CUDA device 0")
    p.add_argument("--no-strace", action="store_true", help="the profile alone")
    p.add_argument("--top", type=int, default=30, help="functions shown")
    p.add_argument("--keep", default="", metavar="DIR", help="keep the profiles and strace tables in DIR")
    p.add_argument("--daemon-core", type=int, default=1)
    args = p.parse_args(argv)
    from gpupool.server import workerprofile
    from train_overhead import bench_daemons

    os.environ.setdefault("BENCH_DAEMON_FLAGS", SIDE_PORT)
    with tempfile.TemporaryDirectory(prefix="worker-probe-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[workerprofile.ENV] = str(folder.resolve())
        load0 = os.getloadavg()[0]
        with bench_daemons(args.daemon_core, real_gpu=args.gpu) as daemons:
            for model in args.models.split(","):
                for mode in args.modes.split(","):
                    probe(daemons.remote("process"), model, mode, args, folder)
        del os.environ[workerprofile.ENV]
        print(f"\nload {load0:.1f} -> {os.getloadavg()[0]:.1f}; daemon flags {os.environ['BENCH_DAEMON_FLAGS']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
