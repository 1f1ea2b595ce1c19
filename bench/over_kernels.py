"""The daemon's cost per eager op over the kernels it runs: issue 8's "<= 10 us of Python an op on top of the kernel".

One op stream, the C++ client's (`gpupool run --native-client`, launch_bound's `native` mode: the tiny MLP, the
encoder, ...; Adam, one torch thread, the batch uploaded every step), runs eagerly against a daemon (`gpupool serve
--fake-gpus 1`, one torch thread) while the daemon records every command batch its readers queue (`Daemon.submit`:
the spans each slice's worker is handed, kept in memory and written out when the session closes, so no file write
lands in the timed blocks). Then:

- `daemon`: the daemon's CPU time per op over the timed blocks, every process and thread that works for the ops (the
  front: gRPC, the stream or side-socket reader, the device's thread; the zygote; the session's worker), as
  launch_bound's daemon column, kernels included, but read from each thread's schedstat (nanoseconds; launch_bound's
  clock ticks are ~12 us an op over a run's ~800 ops);
- `kernels`: the same ops' kernels run bare, in-process, with the arguments the worker gave them (eager_replay.py's
  `bare`: the recorded batches of the timed blocks replayed through `slices.run_commands` once to catch each kernel
  call, then those calls made again, one after the other, from Python). A bare call pays torch's Python binding of
  the aten op (argument parsing: ~0.5-1.5 us a call on this box, against the same call made boxed from C++ in a hot
  loop), which the worker's C++ runner does not pay: on the tiny MLP that is about what the worker's whole slice loop
  adds (`worker over` comes out near 0 or below), so in CPU time `over` is a lower bound; `--measure instr` counts the
  kernels as the runner calls them too (`called`, below), the exact figure;
- `over` = daemon - kernels: what the daemon adds per op on top of the kernels, the issue's figure;
- `worker over`: the worker's slice loop alone over the kernels (eager_replay.py's replay of the same batches, in
  process: no front, no hand-off), so that `over - worker over` is roughly the front's and the hand-off's share.

CPU mode (default): `--rounds` runs per side, alternating base and this, each with its own recording; the median of
the rounds' per-op figures counts (the box is shared: quote the load printed with them). `--measure instr` counts
instructions instead (exact, the same under any load): the daemon under callgrind as bench/daemon_ab.py runs it (its
`--mode native`, with its front/worker split: `BENCH_CG_THREADS=1` splits the front into gRPC's threads and the
daemon's own, `own`: the frames' reader, the device's thread, the timers), the
recorded batches' bare kernels under callgrind as eager_replay.py counts them; `over` = front + worker - kernels.
Since a bare call pays torch's Python binding, instr also counts the kernels as the worker's C++ runner calls them
(`called`: daemon_ab.py's call_op + call_py + call_cpp, the dispatcher and the kernels inclusive) and `over called` =
front + worker - called: the exact instructions the daemon spends per op on top of its kernels (`own+worker over
called`: without gRPC's threads, whose counts grow with valgrind's wall time, not the ops). The worker's own split
follows (daemon_ab.py's: outside the runner, the runner's own, call_op, call_py, call_cpp).

Each side's daemon runs its own checkout (`--against DIR`, its python `--against-python`); the client and the replay
code are this checkout's. `BENCH_DAEMON_FLAGS` adds daemon flags to both sides (`"--bulk-listen 127.0.0.1:0"`: frames
on the side socket, as `gpupool up` runs a daemon).

    cd bench && nice python over_kernels.py --against /work/wt/base --against-python /work/wt/base/.venv/bin/python \
        --models tiny-mlp,encoder --rounds 3                                     # ~1 min per run
    BENCH_CG_THREADS=1 BENCH_DAEMON_FLAGS="--bulk-listen 127.0.0.1:0" nice python over_kernels.py --measure instr \
        --against /work/wt/base --against-python /work/wt/base/.venv/bin/python --models tiny-mlp,encoder  # 47m load 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

_RECORD = struct.Struct("<II")  # a recorded batch: its length, its session's number; then its bytes
RECORD_ENV = "BENCH_RECORD_FRAMES"  # the daemon's recording goes to this file (daemon_ab.py's --serve reads it too)


def record_frames(path: str) -> None:
    """Make this process's daemon keep every command batch its readers queue (`Daemon.submit`: the spans a worker's
    slice is handed, joined: a ClientFrame's bytes) in memory, and append a session's batches to `path` when it
    closes (outside the client's timed blocks)."""
    from gpupool.server import daemon

    kept: dict[int, list[bytes]] = {}
    lock = threading.Lock()
    submit, close = daemon.Daemon.submit, daemon.Daemon.close_session

    def recording_submit(self: Any, s: Any, commands: list[Any], nbytes: int) -> bool:
        spans = [c[1] for c in commands if c.__class__ is tuple]
        if spans:
            kept.setdefault(s.number, []).append(b"".join(spans))
        return bool(submit(self, s, commands, nbytes))

    def recording_close(self: Any, s: Any, *a: Any, **k: Any) -> Any:
        with lock:
            batches = kept.pop(s.number, None)
            if batches:
                with open(path, "ab") as f:
                    for b in batches:
                        f.write(_RECORD.pack(len(b), s.number) + b)
        return close(self, s, *a, **k)

    daemon.Daemon.submit = recording_submit  # type: ignore[method-assign]
    daemon.Daemon.close_session = recording_close  # type: ignore[method-assign]


def _serve(argv: list[str]) -> int:
    """`gpupool serve ARGV[1:]` recording into ARGV[0] (whichever checkout `import gpupool` finds)."""
    record_frames(argv[0])
    from gpupool import cli

    return int(cli.main(["serve", *argv[1:]]))


def native_ops() -> int:
    """The ops the C++ client has sent so far (launch_bound's count: its op records and the Python fallback's)."""
    from gpupool.client.native import backend

    return int(backend.stats()["op_records"]) + sum(backend.PYTHON_STATS.values())


def _client(argv: list[str]) -> int:
    """launch_bound's worker (ARGV: its flags), printing its result with the C++ client's op count at the first
    timed block's start and at the last one's end (`marks`: where the timed ops lie in the daemon's recording)."""
    import launch_bound as lb

    args = lb.worker_args(argv)
    marks: list[int] = []

    def marked(pid: int) -> float:  # called at each block's start and end
        marks.append(native_ops())
        return tree_cpu(pid)

    lb._tree_cpu = marked
    out = lb.worker(args)
    print(json.dumps({**out, "marks": [marks[0], marks[-1]], "steps": args.blocks * args.steps}))
    return 0


def tree_cpu(pid: int) -> float:
    """CPU seconds of the process `pid` and its descendants, every thread alive now, in nanoseconds' resolution
    (each task's schedstat: launch_bound's `_tree_cpu` reads clock ticks, 10 ms, ~12 us an op over a run of ~800
    ops)."""
    from daemon_ab import _tree

    total = 0
    for proc in _tree(pid):
        try:
            for task in os.listdir(f"/proc/{proc}/task"):
                total += int(Path(f"/proc/{proc}/task/{task}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def read_recording(path: Path) -> list[tuple[int, bytes]]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        n, number = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        out.append((number, data[pos : pos + n]))
        pos += n
    return out


def replay_file(recording: Path, marks: list[int], steps: int, out: Path) -> dict[str, Any]:
    """eager_replay.py's recording (its `--replay FILE`) of the recorded batches: those before the first timed op
    warm up, those from it to the last timed op's batch (and the op-less batches after it: the last block's sync)
    are replayed and their kernels called bare."""
    from gpupool._proto import device_pb2

    batches = read_recording(recording)
    numbers = {n for n, _ in batches}
    if len(numbers) != 1:
        raise RuntimeError(f"the recording holds {len(numbers)} sessions, not one")
    counts = [
        sum(1 for c in device_pb2.ClientFrame.FromString(b).commands if c.HasField("eager_op")) for _, b in batches
    ]
    seen, start, end = 0, -1, -1
    for i, n in enumerate(counts):
        if seen == marks[0] and start < 0 and n:
            start = i
        seen += n
        if seen == marks[1] and n:
            end = i + 1
    if start < 0 or end < 0:
        raise RuntimeError(f"the recording's {sum(counts)} eager ops do not cut at the client's marks {marks}")
    while end < len(counts) and not counts[end]:
        end += 1
    d = {"number": numbers.pop(), "start": start, "end": end, "steps": steps, "ops": marks[1] - marks[0],
         "frames": [b.hex() for _, b in batches]}  # fmt: skip
    out.write_text(json.dumps(d))
    return d


def _daemon_cmd(python: str, core: int, key_file: str, recording: Path) -> list[str]:
    exe = subprocess.check_output([python, "-c", "import sys; print(sys.executable)"], text=True).strip()
    cmd = ["taskset", "-c", str(core), exe, str(HERE / "over_kernels.py"), "--serve", str(recording),
           "--listen", "127.0.0.1:0", "--metrics-listen", "0", "--fake-gpus", "1", "--fake-gpu-memory", "16GiB",
           "--token-public-keys", key_file, "--host-id", "bench"]  # fmt: skip
    return cmd + os.environ.get("BENCH_DAEMON_FLAGS", "").split()


def _wait_recording(recording: Path) -> None:
    for _ in range(300):  # the session closes after its client went: its batches are written then
        if recording.exists() and recording.stat().st_size:
            return
        time.sleep(0.1)
    raise RuntimeError(f"no recording at {recording}")


def _cpu_side(python: str, cwd: str, model: str, a: argparse.Namespace, daemons: Any, tmp: Path) -> dict[str, float]:
    """One run of one side: the daemon's CPU per op live, then the bare kernels and the worker's replay per op."""
    from train_overhead import start_listening

    recording = tmp / f"rec.{os.getpid()}.{time.monotonic_ns()}"
    proc, address = start_listening(_daemon_cmd(python, a.daemon_core, str(daemons.key_file), recording), cwd,
                                    "gpupool serve (recording)")  # fmt: skip
    try:
        cmd = ["taskset", "-c", str(a.client_core), sys.executable, str(HERE / "over_kernels.py"), "--client",
               "--model", model, "--mode", "native", "--steps", str(a.steps), "--blocks", str(a.blocks),
               "--warmup", str(a.warmup), "--address", address, "--token", daemons.token(),
               "--daemon-pid", str(proc.pid)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             check=False, cwd=str(HERE))  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{model} client failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        _wait_recording(recording)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ops = r["marks"][1] - r["marks"][0]
    replay_json = tmp / f"{recording.name}.json"
    replay_file(recording, r["marks"], r["steps"], replay_json)
    argv = ["taskset", "-c", str(a.daemon_core), python, str(HERE / "eager_replay.py"), "--replay", str(replay_json),
            "--repeats", str(a.repeats)]  # fmt: skip
    rep = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=str(Path(cwd) / "bench"),
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    k = json.loads(rep.stdout.strip().splitlines()[-1])
    per_step = ops / r["steps"]
    res = {
        "ops": per_step,
        "daemon": r["daemon_cpu_per_step_s"] * r["steps"] / ops * 1e6,
        "kernels": k["bare_median"] / per_step * 1e6,
        "replay": k["replay_median"] / per_step * 1e6,
        "fallback": r.get("python_fallback_per_step", 0.0),
    }
    res["over"] = res["daemon"] - res["kernels"]
    res["worker over"] = res["replay"] - res["kernels"]
    recording.unlink()
    replay_json.unlink()
    return res


def _instr_side(
    name: str, python: str, cwd: str, model: str, a: argparse.Namespace, daemons: Any, tmp: Path
) -> dict[str, float]:
    """One side under callgrind: daemon_ab.py's native counts per op (front, its own threads, worker), then the recorded
    batches' bare kernels per op (eager_replay.py's count)."""
    import daemon_ab
    import eager_replay

    ab = argparse.Namespace(profile=a.profile, daemon_core=a.daemon_core, client_core=a.client_core, mode="native",
                            steps=a.steps, blocks=a.blocks, warmup=a.warmup, adam="capturable",
                            with_client=False)  # fmt: skip
    recording = tmp / f"rec.{name}.{model}"
    r = daemon_ab._side(name, python, cwd, model, ab, str(daemons.key_file), daemons.token, str(tmp), recording)
    _wait_recording(recording)
    replay_json = tmp / f"{recording.name}.json"
    replay_file(recording, r["marks"], r["steps"], replay_json)
    k = eager_replay._instructions(python, Path(cwd) / "bench", str(replay_json), str(tmp), 128, [])
    r["kernels"] = k["bare"] / k["ops"]
    r["ops"] = k["ops"]  # per step (daemon_ab.py's counts are per op already)
    r["worker over"] = r["worker"] - r["kernels"]
    r["over"] = r["front"] + r["worker"] - r["kernels"]
    # the kernels as the worker's C++ runner calls them (daemon_ab.py's `call_op`, `call_py`, `call_cpp`: the
    # dispatcher and the kernels, no Python binding): the exact count of what the daemon adds on top of them
    r["called"] = r["call_op"] + r["call_py"] + r["attn"] + r["dropout"]
    r["over called"] = r["front"] + r["worker"] - r["called"]
    # BENCH_CG_THREADS: the front's own threads apart from gRPC's (round 46 named the busiest thread `reader`, which
    # daemon_ab.py no longer gives: these rows were left out without a word)
    if "own" in r:
        r["own+worker over"] = r["own"] + r["worker"] - r["kernels"]
        r["own+worker over called"] = r["own"] + r["worker"] - r["called"]
    if r.get("runner"):  # the worker's split (daemon_ab.py `_line`)
        r["outside runner"] = r["worker"] - r["runner"]
        r["call_cpp"] = r["attn"] + r["dropout"]
        r["runner own"] = r["runner"] - r["call_op"] - r["call_py"] - r["call_cpp"]
    return r


# --measure instr's defaults: 5 counted steps (the encoder's ~550 ops, the tiny MLP's ~140) after 8 uncounted ones.
# Counts are exact, so a few steps do; what they need is a warm-up past every run's learning and compiling (round
# 47: after 3 steps the encoder's worker still built native plans, `make_plan`, ~5k instructions an op, inside the
# counted steps). Under valgrind a side and model then takes ~3-6 min (the fixed part: the daemon's, zygote's and
# worker's starts, the replay process's), where round 46's 10 x 2 steps took > 40 min a side on the encoder at load 30.
INSTR_STEPS, INSTR_BLOCKS, INSTR_WARMUP = 5, 1, 8

CPU_PARTS = ("daemon", "kernels", "over", "replay", "worker over")
INSTR_PARTS = (
    "front",
    "own",
    "worker",
    "kernels",
    "over",
    "own+worker over",
    "worker over",
    "called",
    "over called",
    "own+worker over called",
    "outside runner",
    "runner own",
    "call_op",
    "call_py",
    "call_cpp",
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return _serve(argv[1:])
    if argv[:1] == ["--client"]:
        return _client(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", metavar="DIR", required=True, help="the other checkout (the baseline)")
    p.add_argument("--against-python", default="", help="its python (default: DIR/.venv/bin/python)")
    p.add_argument("--models", default="tiny-mlp,encoder", help="comma-separated launch_bound workloads")
    p.add_argument("--measure", choices=("cpu", "instr"), default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="cpu: runs per side, alternating (the median counts)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed block (instr: 5)")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks (instr: 1)")
    p.add_argument("--warmup", type=int, default=6, help="steps before the timed blocks (instr: 8)")
    p.add_argument("--repeats", type=int, default=5, help="cpu: bare kernel and replay runs per recording")
    p.add_argument("--daemon-core", type=int, default=1)
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument("--profile", default="", help="instr: keep callgrind's files here (daemon_ab.py's --profile)")
    a = p.parse_args(argv)
    if a.measure == "instr":  # counts are exact: a few steps past a warm-up long enough that every run is learned
        a.steps = a.steps if "--steps" in argv else INSTR_STEPS
        a.blocks = a.blocks if "--blocks" in argv else INSTR_BLOCKS
        a.warmup = a.warmup if "--warmup" in argv else INSTR_WARMUP
    from train_overhead import bench_daemons

    base_python = a.against_python or str(Path(a.against) / ".venv" / "bin" / "python")
    sides = [("base", base_python, a.against), ("this", sys.executable, str(HERE.parent))]
    parts = CPU_PARTS if a.measure == "cpu" else INSTR_PARTS
    unit = "us CPU/op (median of rounds)" if a.measure == "cpu" else "k instructions/op"
    scale = 1.0 if a.measure == "cpu" else 1e-3
    load0 = os.getloadavg()[0]
    with bench_daemons(a.daemon_core, ()) as daemons, tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as t:
        tmp = Path(t)
        for model in a.models.split(","):
            got: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in sides}
            for i in range(a.rounds if a.measure == "cpu" else 1):
                for name, python, cwd in sides if i % 2 == 0 else sides[::-1]:
                    t0 = time.monotonic()
                    if a.measure == "cpu":
                        got[name].append(_cpu_side(python, cwd, model, a, daemons, tmp))
                    else:
                        got[name].append(_instr_side(name, python, cwd, model, a, daemons, tmp))
                    print(f"  ({model} {name}: {time.monotonic() - t0:.0f} s, load {os.getloadavg()[0]:.1f})",
                          file=sys.stderr, flush=True)  # fmt: skip
            med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in got.items()}
            print(f"{model}: {med['this']['ops']:.0f} ops/step; {unit}; over = daemon - kernels")
            for name, r in med.items():
                cells = [f"{k} {r[k] * scale:7.2f}" for k in parts if k in r]
                for j in range(0, len(cells), 6):  # six a line
                    print(f"  {name if j == 0 else '':>4}: " + "  ".join(cells[j : j + 6]))
            base, this = med["base"], med["this"]
            print("  this - base: " + "  ".join(f"{k} {(this[k] - base[k]) * scale:+.2f}" for k in parts
                                                 if k in base and k in this))  # fmt: skip
            if a.measure == "cpu":
                spread = {n: [round(r["over"], 2) for r in rs] for n, rs in got.items()}
                print(f"  over, each round: {spread}")
    print(f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
