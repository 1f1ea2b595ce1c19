"""The daemon's system calls and thread wake-ups per step, this checkout's daemon against another checkout's.

On the real-GPU host (gVisor) every system call, futex wake-up and hand-off between threads or processes costs
microseconds: counts, not times, say what a change to the daemon's hand-offs saves there. Each side's daemon
(`gpupool serve --fake-gpus 1`, one torch thread, with the side port on as `gpupool up` has it: `--bulk-listen
127.0.0.1:0`; `BENCH_DAEMON_FLAGS` replaces it) serves launch_bound's workloads from a client of this checkout;
after the client's warm-up steps, for its timed steps only (and one sync at their end):
- `perf stat -e raw_syscalls:sys_enter --per-thread`, enabled and disabled through its control fifo around the steps
  (exact, low overhead): system calls per step, in the front (the daemon's process: the side socket's reader, gRPC,
  the reply writer), in the session's worker process and in the client's process (`client`: the C++ client's
  thread and the session's sender thread, or the shim's);
- each thread's voluntary and involuntary context switches (/proc/PID/task/TID/status) before and after: `wakeups`
  are the voluntary ones (a thread that blocked and was woken: a futex, a socket read, a poll);
- each thread's CPU time (/proc/PID/task/TID/schedstat) and the steps' wall time, to compare side by side only
  (perf counts every system call: each costs more than without it);
- `--kinds`: a second pass under `strace -f -ttt` for the system calls by kind (front / worker / client), the lines
  inside the steps' window counted (strace slows every call ~10x: the client then runs further ahead of the daemon,
  so its frames may coalesce more than without it; the totals of record are perf's).

    nice python bench/daemon_syscalls.py --against /work/wt/base
    nice python bench/daemon_syscalls.py --models tiny-mlp --modes native --kinds --keep-trace /tmp/trace
    nice python bench/daemon_syscalls.py --modes captured,native-captured --sync-every 1 --against DIR --against-client
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SIDE_PORT = "--bulk-listen 127.0.0.1:0"
PARTS = ("front", "worker", "client")  # the daemon's process, the session's worker, the client (C++ or shim)
_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(?:<\.\.\. )?(\w+)")


# ---- the client: warm up, then the timed steps on the driver's word ----


def client(args: argparse.Namespace) -> int:
    import torch
    from launch_bound import adam, training_step, workload

    torch.set_num_threads(1)
    model, data, loss_fn = workload(args.model)
    if args.mode in ("native", "native-captured"):
        from gpupool.client import native as nc

        nc.enable()
        nc.attach(args.address, args.token)
        device = torch.device("gpupool", 0)
    else:
        import gpupool.torch as gt

        device = gt.attach(args.address, args.token)
    model = model.to(device)
    torch.manual_seed(1234)
    captured = args.mode in ("captured", "native-captured")
    step = training_step(model, adam(model, device, captured), loss_fn)

    def eager(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return step(x.to(device), y.to(device))

    run: Any = eager
    if args.mode == "captured":
        import gpupool.torch as gt

        run = gt.capture(step)
    elif args.mode == "native-captured":
        from gpupool.client.native.capture import capture

        run = capture(step)
    for i in range(args.warmup):
        run(*data[i % 4]).item()
    print("ready", flush=True)
    sys.stdin.readline()
    loss = None
    for i in range(args.steps):
        loss = run(*data[i % 4])
        if args.sync_every and (i + 1) % args.sync_every == 0:
            loss.item()
    assert loss is not None
    print(json.dumps({"loss": float(loss.item())}), flush=True)
    sys.stdin.readline()  # the driver's tracers stop before this session ends
    return 0


# ---- the driver ----


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _started(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def session_worker(daemon: int) -> int:
    """The daemon's newest session worker: the zygote's youngest child (the daemon -> zygote -> workers)."""
    workers = [w for z in _children(daemon) for w in _children(z)]
    if not workers:
        raise RuntimeError("no session worker under the daemon")
    return max(workers, key=_started)


def switches(pids: list[int]) -> dict[int, tuple[int, int, int]]:
    """(voluntary, involuntary) context switches and CPU nanoseconds (schedstat) of every thread of `pids`, by id."""
    out: dict[int, tuple[int, int, int]] = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
                ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            except FileNotFoundError:
                continue
            v = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
            n = int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
            out[int(tid)] = (v, n, ns)
    return out


def _threads(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def measure(remote: dict[str, Any], model: str, mode: str, args: argparse.Namespace, kinds: bool) -> dict[str, Any]:
    """One client's timed steps against one daemon: counts per step, front and worker apart."""
    python, script, where = sys.executable, __file__, HERE
    if remote["side"] == "base" and args.against_client:  # the other checkout's client (its python, its gpupool)
        python, where = remote["python"], Path(args.against) / "bench"
        script = str(where / "daemon_syscalls.py")
    cmd = ["taskset", "-c", str(args.client_core), python, script, "--client", "--model", model]
    cmd += ["--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--sync-every", str(args.sync_every), "--address", remote["address"], "--token", remote["token"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=where)
    assert proc.stdin is not None and proc.stdout is not None
    tmp_dir = tempfile.TemporaryDirectory(prefix="syscalls-")
    tmp = tmp_dir.name
    tracer: subprocess.Popen[bytes] | None = None
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"client {model}/{mode} failed: {line!r} (exit {proc.wait()})")
        front = remote["daemon_pid"]
        worker = session_worker(front)
        where = {**dict.fromkeys(_threads(front), "front"), **dict.fromkeys(_threads(worker), "worker")}
        where.update(dict.fromkeys(_threads(proc.pid), "client"))
        out_file = Path(tmp) / "trace"
        if kinds:
            tracer = subprocess.Popen(["strace", "-f", "-qq", "-ttt", "-o", str(out_file), "-p", str(front),
                                       "-p", str(worker), "-p", str(proc.pid)], stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1.5)  # attached (strace -p has no handshake); the window below is cut by the timestamps
        else:
            ctl = Path(tmp) / "ctl"
            ack = Path(tmp) / "ack"
            os.mkfifo(ctl)
            os.mkfifo(ack)
            tracer = subprocess.Popen(["perf", "stat", "-e", "raw_syscalls:sys_enter", "--per-thread", "-x,", "-D",
                                       "-1", "--control", f"fifo:{ctl},{ack}", "-o", str(out_file), "-p",
                                       f"{front},{worker},{proc.pid}"])  # fmt: skip
            ctl_w = open(ctl, "w")  # noqa: SIM115 (held open for the run)
            ack_r = open(ack)  # noqa: SIM115
        before = switches([front, worker, proc.pid])
        t0 = time.time()
        if not kinds:
            ctl_w.write("enable\n")
            ctl_w.flush()
            ack_r.readline()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result = json.loads(proc.stdout.readline())
        if not kinds:
            ctl_w.write("disable\n")
            ctl_w.flush()
            ack_r.readline()
        t1 = time.time()
        after = switches([front, worker, proc.pid])
        tracer.send_signal(2)
        tracer.wait(timeout=60)
        tracer = None
        if not kinds:
            ctl_w.close()
            ack_r.close()
        n = args.steps
        out: dict[str, Any] = {"loss": result["loss"]}
        for side in PARTS:
            tids = [t for t, s in where.items() if s == side]
            vol = sum(after[t][0] - before[t][0] for t in tids if t in before and t in after)
            inv = sum(after[t][1] - before[t][1] for t in tids if t in before and t in after)
            out[f"{side}_wakeups"] = vol / n
            # threads that woke at least every second step
            woke = [after[t][0] - before[t][0] for t in tids if t in before and t in after]
            out[f"{side}_threads"] = sum(2 * w >= n for w in woke)
            out[f"{side}_preempted"] = inv / n
            ns = sum(after[t][2] - before[t][2] for t in tids if t in before and t in after)
            out[f"{side}_cpu_us"] = ns / n / 1e3
        out["wall_ms"] = (t1 - t0) / n * 1e3
        if kinds:
            counts: dict[str, collections.Counter[str]] = {side: collections.Counter() for side in PARTS}
            per_thread: collections.Counter[int] = collections.Counter()
            for text in out_file.read_text().splitlines():
                m = _LINE.match(text)
                if m is None or "resumed>" in text:
                    continue
                tid, at, name = int(m.group(1)), float(m.group(2)), m.group(3)
                if t0 <= at <= t1:
                    side = where.get(tid, "worker" if tid not in where and tid != front else "front")
                    counts[side][name] += 1
                    per_thread[tid] += 1
            for side, c in counts.items():
                out[f"{side}_kinds"] = {k: v / n for k, v in c.most_common()}
                out[f"{side}_syscalls_strace"] = sum(c.values()) / n
            out["threads"] = {f"{where.get(t, '?')}:{t}": v / n for t, v in per_thread.most_common()}
            if args.keep_trace:
                dest = Path(args.keep_trace)
                dest.mkdir(parents=True, exist_ok=True)
                (dest / f"{model}-{mode}-{remote['side']}.strace").write_text(out_file.read_text())
        else:
            for side in PARTS:
                out[f"{side}_syscalls"] = 0.0
            for text in out_file.read_text().splitlines():
                parts = text.split(",")
                if len(parts) < 4 or "sys_enter" not in text or not parts[1].strip().isdigit():
                    continue
                tid = int(parts[0].rsplit("-", 1)[1])
                side = where.get(tid, "front")
                out[f"{side}_syscalls"] += int(parts[1]) / n
        return out
    finally:
        end_client(proc, tracer)
        tmp_dir.cleanup()


def end_client(proc: subprocess.Popen[str], tracer: subprocess.Popen[bytes] | None) -> None:
    """Kill `tracer` where it still runs, tell the client its session may end (its last line), and wait for it."""
    if tracer is not None:
        tracer.kill()
        tracer.wait()
    if proc.stdin is not None and not proc.stdin.closed:
        try:
            proc.stdin.write("end\n")
            proc.stdin.close()
        except BrokenPipeError:
            pass
    proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-mlp,encoder")
    p.add_argument("--modes", default="native,native-captured", help="native, native-captured, eager, captured")
    p.add_argument("--steps", type=int, default=100, help="timed steps (one sync at their end)")
    p.add_argument("--warmup", type=int, default=12, help="steps first, each synced (learned runs, the graph)")
    p.add_argument(
        "--sync-every",
        type=int,
        default=0,
        metavar="N",
        help="a sync (`loss.item()`) every N steps too (1: a loop that logs every loss; 0: at the end only)",
    )
    p.add_argument("--rounds", type=int, default=2, help="measurements per model, mode and side (medians)")
    p.add_argument("--kinds", action="store_true", help="also a pass under strace: system calls by kind")
    p.add_argument("--keep-trace", default="", metavar="DIR", help="with --kinds: keep each strace output in DIR")
    p.add_argument("--against", metavar="DIR", default="", help="also measure DIR's daemon (its .venv/bin/python)")
    p.add_argument("--against-python", default="")
    p.add_argument("--against-client", action="store_true", help="the base rows' client is DIR's too (its python)")
    p.add_argument("--daemon-core", type=int, default=1)
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    for a in ("--model", "--mode", "--address", "--token"):
        p.add_argument(a, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        return client(args)
    from train_overhead import bench_daemons

    os.environ.setdefault("BENCH_DAEMON_FLAGS", SIDE_PORT)
    against = None
    if args.against:
        against = (args.against, args.against_python or str(Path(args.against) / ".venv/bin/python"))
    sides = ["process", "base"] if against else ["process"]
    load0 = os.getloadavg()[0]
    rows: dict[tuple[str, str, str, bool], list[dict[str, Any]]] = collections.defaultdict(list)
    with bench_daemons(args.daemon_core, against=against) as daemons:
        for r in range(args.rounds):
            for model in args.models.split(","):
                for mode in args.modes.split(","):
                    for side in sides if r % 2 == 0 else sides[::-1]:
                        for kinds in (False, True) if args.kinds else (False,):
                            remote = {**daemons.remote(side), "side": "this" if side == "process" else "base"}
                            remote["python"] = against[1] if against else sys.executable
                            got = measure(remote, model, mode, args, kinds)
                            rows[(model, mode, remote["side"], kinds)].append(got)
                            print(model, mode, remote["side"], "strace" if kinds else "perf", json.dumps(got),
                                  flush=True)  # fmt: skip
    load1 = os.getloadavg()[0]
    every = f"a sync every {args.sync_every} steps" if args.sync_every else "one sync at their end"
    print(f"\nper step, medians of {args.rounds} ({args.steps} steps each, {every}); load {load0:.1f} -> "
          f"{load1:.1f}; daemons with {os.environ['BENCH_DAEMON_FLAGS']!r}")  # fmt: skip
    cols = ("front_syscalls", "worker_syscalls", "client_syscalls", "front_wakeups", "worker_wakeups")
    cols += ("client_wakeups", "client_threads", "front_threads", "front_preempted", "worker_preempted")
    cols += ("front_cpu_us", "worker_cpu_us", "client_cpu_us")
    cols += ("wall_ms",)
    print("(cpu_us: the threads' CPU time a step, schedstat; under perf and on a shared box: compare within one run)")
    print(f"{'model':10} {'mode':16} {'side':5} " + " ".join(f"{c:>15}" for c in cols))
    for (model, mode, side, kinds), got in rows.items():
        if kinds:
            continue
        med = {c: statistics.median(g[c] for g in got) for c in cols}
        print(f"{model:10} {mode:16} {side:5} " + " ".join(f"{med[c]:15.1f}" for c in cols))
    for (model, mode, side, kinds), got in rows.items():
        if not kinds:
            continue
        print(f"\n{model} {mode} {side} (strace, the first round):")
        for part in PARTS:
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(got[0][f"{part}_kinds"].items())[:12])
            print(f"  {part} {got[0][f'{part}_syscalls_strace']:.1f}/step: {top}")
        print("  threads: " + ", ".join(f"{k} {v:.1f}" for k, v in got[0]["threads"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
