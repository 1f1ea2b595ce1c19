"""Where a live daemon's CPU per eager op goes, by process and thread: front (stream reader, gRPC's threads, the
stream's writer), zygote and the session's worker.

A launch_bound workload trains eagerly (Adam, a sync per block of 20 steps, as launch_bound's eager mode) through a
real `gpupool serve` (one fake GPU, TLS, pinned to --daemon-core) from this process (pinned to --client-core), and the
CPU time of every thread of the daemon's process tree is read from /proc/PID/task/TID/stat before and after the timed
steps. The daemon's Python threads are named through `prctl(PR_SET_NAME)` by a `sitecustomize` put on its
PYTHONPATH for the run (a Python thread has no kernel name of its own), so the rows read: `reader` (the session's
stream reader, `gpupool-read-N`: it runs the slices of an idle device itself), `grpc serve` (gRPC's completion-queue
thread, `Thread-1 (_serve)`), `grpc C` (gRPC core's `event_engine` and timer threads), `writer` (the stream's
handler thread, `gpupool-grpc_N`), `worker` (the session's worker process), `other`. Each row is user + system
CPU per eager op sent (and its system part); the figure is thread time, wake-ups and cache misses included, which
instruction counts of replays (bench/front_replay.py, bench/eager_replay.py) do not see. Clock ticks: read medians
of a few rounds on a shared box.

    python bench/daemon_threads.py [--model tiny-mlp] [--steps 2000] [--rounds 3]
    python bench/daemon_threads.py --against /work/wt/base --against-python /work/wt/base/.venv/bin/python
    python bench/daemon_threads.py --rounds 0 --idle 20 --against DIR     # idle wake-ups a second, by thread

With `BENCH_DAEMON_FLAGS="--bulk-listen 127.0.0.1:0"` the daemons (bench/train_overhead.py) have a side port: a daemon
that names `side_frames` takes the session's frames there (round 26), its socket's thread (named `...bulk-hello`,
the thread that bound it) counted as `reader`; an older one keeps them on the stream.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SITECUSTOMIZE = """
import ctypes, threading
_libc = ctypes.CDLL(None)
_run = threading.Thread._bootstrap_inner
def _named(self):
    try:
        _libc.prctl(15, ctypes.c_char_p(self.name[-15:].encode()), 0, 0, 0)  # PR_SET_NAME: the last 15 bytes
    except Exception:
        pass
    return _run(self)
threading.Thread._bootstrap_inner = _named
"""
GROUPS = ("reader", "grpc serve", "grpc C", "writer", "worker", "other")


def _group(pid: int, front: int, name: str) -> str:
    if pid != front:
        return "worker" if name == "python" else "other"  # the session's worker: the zygote's forked main thread
    if name.startswith("gpupool-read") or name.endswith("bulk-hello"):  # (the side socket's thread reads frames)
        return "reader"
    if name.endswith("(_serve)"):
        return "grpc serve"
    if name in ("event_engine", "grpc_global_tim") or name.startswith(("grpc_", "default-executo", "resolver")):
        return "grpc C"
    if name.startswith("gpupool-grpc"):
        return "writer"
    return "other"


def _switches(pid: int, task: str) -> int:
    """The thread's context switches so far, voluntary and not (each voluntary one is a sleep and a wake-up)."""
    n = 0
    for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
            n += int(line.split()[1])
    return n


def _threads(front: int) -> dict[tuple[int, int], tuple[str, float, float, int, str]]:
    """(pid, tid) -> (group, user + system seconds, system seconds, context switches, its front thread's name or
    `zygote and workers`) of every thread of the daemon's process tree."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[tuple[int, int], tuple[str, float, float, int, str]] = {}

    def walk(pid: int) -> None:
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
                name = stat[stat.index("(") + 1 : stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2 :].split()
                user, system = int(fields[11]) / tick, int(fields[12]) / tick
                label = name if pid == front else "zygote and workers"
                out[(pid, int(task))] = (_group(pid, front, name), user + system, system, _switches(pid, task), label)
                for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                    walk(int(child))
        except (FileNotFoundError, ProcessLookupError):
            pass

    walk(front)
    return out


def idle_wakes(front: int, seconds: float) -> dict[str, float]:
    """Context switches a second of each thread of the daemon's process tree over `seconds` with nothing to do (no
    session's frames): the front's threads by name (the last 15 bytes of a Python thread's), the processes below it
    together as `zygote and workers`, and `all`."""
    before = _threads(front)
    time.sleep(seconds)
    rates: dict[str, float] = {}
    for key, (_, _, _, sw, label) in _threads(front).items():
        rates[label] = rates.get(label, 0.0) + (sw - before.get(key, ("", 0.0, 0.0, 0, label))[3]) / seconds
    rates["all"] = sum(rates.values())
    return rates


def measure(remote: dict[str, Any], model_name: str, steps: int) -> dict[str, Any]:
    """Train `model_name` eagerly through the daemon of `remote`; CPU per op of each group, frames per step."""
    import torch
    from gpupool.client.torch import runtime
    from launch_bound import training_step, workload

    import gpupool.torch as gt

    device = gt.attach(remote["address"], remote["token"])
    try:
        rt = runtime.get(device.index)
        session = rt.session
        put, frames = session._put, [0]

        def counted(*a: Any) -> None:
            frames[0] += 1
            put(*a)

        session._put = counted
        model, data, loss_fn = workload(model_name)
        model = model.to(device)
        train = training_step(model, torch.optim.Adam(model.parameters(), lr=1e-3), loss_fn)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # the batch uploaded each step
            return train(x.to(device), y.to(device))  # type: ignore[no-any-return]

        for i in range(10):  # warm-up: first use of every op, learned runs
            step(*data[i % 4]).item()
        before, ops0, frames0 = _threads(remote["daemon_pid"]), rt.ops_sent, frames[0]
        start = time.perf_counter()
        for _ in range(max(1, steps // 20)):
            for i in range(20):
                loss = step(*data[i % 4])
            loss.item()
        wall = time.perf_counter() - start
        after, ops = _threads(remote["daemon_pid"]), rt.ops_sent - ops0
    finally:
        gt.detach_all()
    cpu = dict.fromkeys(GROUPS, 0.0)
    system = dict.fromkeys(GROUPS, 0.0)
    switches = dict.fromkeys(GROUPS, 0)
    for key, (group, total, sys_s, sw, _) in after.items():
        _, total0, sys0, sw0, _ = before.get(key, (group, 0.0, 0.0, 0, ""))
        cpu[group] += total - total0
        system[group] += sys_s - sys0
        switches[group] += sw - sw0
    n = max(1, steps // 20) * 20
    return {"ops_per_step": ops / n, "frames_per_step": (frames[0] - frames0) / n, "step_s": wall / n,
            "cpu": {g: v / ops for g, v in cpu.items()}, "sys": {g: v / ops for g, v in system.items()},
            "wakes": {g: v / (frames[0] - frames0) for g, v in switches.items()}, "wall": wall}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-mlp", help="a launch_bound workload")
    p.add_argument("--steps", type=int, default=2000, help="timed steps per round (a sync per 20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (alternating daemons with --against); medians")
    p.add_argument("--against", metavar="DIR", default="", help="also measure another checkout's daemon, alternating")
    p.add_argument("--against-python", default="", help="the python of --against (default: DIR/.venv/bin/python)")
    p.add_argument("--daemon-core", type=int, default=1)
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument(
        "--idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then each daemon idle this long (its sessions ended): context switches a second by thread "
        "(round 45: the side port's accept loop and the lease reaper no longer wake on a timer)",
    )
    args = p.parse_args(argv)
    import torch
    from train_overhead import bench_daemons

    torch.set_num_threads(1)
    os.sched_setaffinity(0, {args.client_core})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        os.environ["PYTHONPATH"] = os.pathsep.join([tmp, *filter(None, [os.environ.get("PYTHONPATH", "")])])
        against = None
        if args.against:
            against = (args.against, args.against_python or str(Path(args.against) / ".venv/bin/python"))
        load0 = os.getloadavg()
        with bench_daemons(args.daemon_core, against=against) as daemons:
            names = ["process", "base"] if against else ["process"]
            runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    runs[name].append(measure(daemons.remote(name), args.model, args.steps))
            idle = {}
            if args.idle > 0:
                time.sleep(1.0)  # (the last round's sessions end)
                idle = {name: idle_wakes(daemons.remote(name)["daemon_pid"], args.idle) for name in names}
        load1 = os.getloadavg()
    label = {"process": "this", "base": "other"}
    if idle:
        print(f"idle daemons, {args.idle:g} s each: context switches a second by thread (load {load1[0]:.1f})")
        rows = sorted({k for rates in idle.values() for k in rates if k != "all"}) + ["all"]
        print(f"{'':<20}" + "".join(f"{label[n]:>10}" for n in names))
        for row in rows:
            print(f"{row:<20}" + "".join(f"{idle[n].get(row, 0.0):>10.2f}" for n in names))
    if not args.rounds:
        return 0
    print(f"{args.model}: {args.rounds} rounds of {args.steps} steps, load {load0[0]:.1f} -> {load1[0]:.1f}; "
          "daemon CPU per eager op (us, median over rounds; system part in brackets)")  # fmt: skip
    header = f"{'':<12}" + "".join(f"{label[n]:>18}" for n in names) + ("   this/other" if against else "")
    print(header)
    med: dict[str, dict[str, float]] = {}
    for name in names:
        med[name] = {g: statistics.median(r["cpu"][g] for r in runs[name]) * 1e6 for g in GROUPS}
        med[name]["all"] = statistics.median(sum(r["cpu"].values()) for r in runs[name]) * 1e6
    for g in (*GROUPS, "all"):
        cells = ""
        for name in names:
            sys_part = statistics.median(sum(r["sys"].values()) if g == "all" else r["sys"][g] for r in runs[name])
            cells += f"{med[name][g]:>10.2f} ({sys_part * 1e6:4.1f})"
        ratio = f"   {med['process'][g] / med['base'][g]:.3f}" if against and med["base"][g] else ""
        print(f"{g:<12}{cells}{ratio}")
    print("context switches per frame (median over rounds; a timer's grow with the wall time, a frame's with frames)")
    for g in GROUPS:
        print(f"{g:<12}" + "".join(f"{statistics.median(r['wakes'][g] for r in runs[n]):>18.3f}" for n in names))
    for name in names:
        rs = runs[name]
        print(f"{label[name]}: {statistics.median(r['ops_per_step'] for r in rs):.1f} ops/step, "
              f"{statistics.median(r['frames_per_step'] for r in rs):.2f} frames/step, "
              f"{statistics.median(r['step_s'] for r in rs) * 1e3:.3f} ms/step, "
              f"{statistics.median(r['wall'] for r in rs):.1f} s a round")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
