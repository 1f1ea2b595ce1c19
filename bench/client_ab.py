"""Client cost per eager op, this checkout against another one (A/B), with the same daemon, interleaved.

`launch_bound.py`'s "client us/op" is CPU time, which on a shared 2-core box moves 30-50% between runs of the same
code (a busy neighbour on the sibling hyperthread slows every instruction). This runs `launch_bound.py`'s eager
worker (Adam, one torch thread, the batch uploaded every step; `--mode native`: the C++ client's worker, per op
record) from two checkouts against one daemon of this checkout (`gpupool serve --fake-gpus 1` on core 1),
alternating, and reports per aten op either

- `--measure cpu`: the client process's CPU time over the timed blocks (medians of `--rounds` runs), or
- `--measure instr`: the client's instructions over the timed blocks, all threads (the autograd device thread and
  gRPC's included), counted by callgrind with its instrumentation switched on only around them: exact and
  independent of the load, so one run of each side is enough (the daemon is not counted).

The baseline runs under `--base-python` (a Python whose `import gpupool` is the baseline checkout, e.g. the system
`python3` of a box whose editable install is /work/main) with `--base-bench` (that checkout's bench/), from /tmp so
that this checkout's folders do not shadow it. `GPUPOOL_FLUSH_OPS` etc. can be set per side with `--env`.

    nice python bench/client_ab.py --measure instr --models tiny-mlp,encoder
    nice python bench/client_ab.py --measure cpu --models tiny-mlp --rounds 5
    nice python bench/client_ab.py --measure instr --mode native --base-python B/.venv/bin/python --base-bench B/bench

Run under the baseline's Python instead (`BASE/.venv/bin/python bench/client_ab.py --base-python
THIS/.venv/bin/python --base-bench THIS/bench ...`, from /tmp) and the daemon is the baseline's (the sides' names then
swap): both clients against either daemon, which tells a client's cost from its daemon's effect on it (round 30).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cgtools  # noqa: E402
import launch_bound as lb  # noqa: E402
from train_overhead import bench_daemons  # noqa: E402


def _instrumented_worker(argv: list[str]) -> int:
    """Inside valgrind: the eager worker, callgrind's instrumentation on from the first timed block to the end."""
    args = lb.worker_args(argv)
    on: list[int] = []

    def first_block(pid: int) -> float:  # called at every block's start and end: the first call starts counting
        # The daemon's CPU (launch_bound's /proc walk of its process tree, ~10k instructions an op of the count
        # until round 47: the bench's own work, not the client's) is not reported here: not read at all
        if not on:
            cgtools.control("--instr=on")
            on.append(1)
        return 0.0

    lb.steady_for_callgrind(args.mode)
    lb._tree_cpu = first_block
    out = lb.worker(args)
    cgtools.control("--instr=off")
    print(json.dumps({"ops": out["commands_per_step"] * args.blocks * args.steps, **out}))
    return 0


CAPTURED = ("captured", "native-captured")  # modes measured per step


def _run(side: dict[str, Any], model: str, a: argparse.Namespace, remote: dict[str, Any], tmp: str) -> float:
    """One worker run of one side: client CPU microseconds or instructions per aten op."""
    flags = ["--model", model, "--mode", a.mode, "--steps", str(a.steps), "--blocks", str(a.blocks),
             "--warmup", str(a.warmup), "--address", remote["address"], "--token", remote["token"],
             "--daemon-pid", str(remote["daemon_pid"])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **side["env"]}
    if a.measure == "cpu":
        cmd = ["taskset", "-c", str(a.client_core), side["python"], str(side["bench"] / "launch_bound.py"), "--worker"]
        out = subprocess.run([*cmd, *flags], cwd=side["cwd"], capture_output=True, text=True, env=env, check=False)
    else:
        cg = Path(a.profile or tmp) / (f"cg.{side['name']}.{model}.out" if a.profile else "cg.out")
        # this checkout's worker code (launch_bound.worker, the same on both sides) over the side's own gpupool
        cmd = [*cgtools.valgrind(cg), side["python"], str(HERE / "client_ab.py"), "--instrumented"]
        out = subprocess.run([*cmd, *flags], cwd=side["cwd"], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side['name']} {model} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ops = (1 if a.mode in CAPTURED else r["commands_per_step"]) * a.blocks * a.steps  # captured: per step
    if a.measure == "cpu":
        return float(r["client_cpu_per_step_s"] * a.blocks * a.steps / ops * 1e6)
    totals = [line for line in cg.read_text().splitlines() if line.startswith(("totals:", "summary:"))]
    return int(totals[-1].split()[1]) / ops


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--instrumented"]:  # the worker inside valgrind
        return _instrumented_worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", choices=("cpu", "instr"), default="instr")
    p.add_argument("--models", default="tiny-mlp", help="comma-separated: " + ",".join(lb.MODELS))
    p.add_argument("--mode", choices=("eager", "captured", "native", *CAPTURED[1:]), default="eager", help="captured: "
                   "the step as one RunGraph (gpupool.torch.capture), figures per step instead of per op; native: the "
                   "C++ client (`gpupool run --native-client`'s), per op record; native-captured: the C++ client's "
                   "captured step, per step")  # fmt: skip
    p.add_argument("--rounds", type=int, default=0, help="runs of each side (default: 5 for cpu, 1 for instr)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--base-python", default=shutil.which("python3") or "python3")
    p.add_argument("--base-bench", default="/work/main/bench")
    p.add_argument("--env", action="append", default=[], help="SIDE:NAME=VALUE, e.g. new:GPUPOOL_FLUSH_OPS=64")
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument("--profile", default="", help="with --measure instr: keep callgrind's files in this folder "
                   "(cg.SIDE.MODEL.out, the last round's) for `callgrind_annotate --inclusive=yes`")  # fmt: skip
    p.add_argument("--daemon-core", type=int, default=1)
    a = p.parse_args(argv)
    if a.measure == "instr" and shutil.which("valgrind") is None:
        p.error("--measure instr needs valgrind (apt-get install valgrind)")
    if a.measure == "instr" and a.steps * a.blocks > 20:
        a.steps, a.blocks, a.warmup = 10, 2, 4  # exact counts: a few steps are enough, and valgrind is slow
    if a.mode in CAPTURED:
        a.warmup = max(a.warmup, 7)  # one eager, two recorded, then replays: count replays only
    # the interpreter itself (valgrind would count a launcher script such as pyenv's shim instead)
    base_python = subprocess.check_output([a.base_python, "-c", "import sys; print(sys.executable)"], text=True).strip()
    sides = [
        {"name": "base", "python": base_python, "bench": Path(a.base_bench), "cwd": "/tmp", "env": {}},
        {"name": "new", "python": sys.executable, "bench": HERE, "cwd": str(HERE.parent), "env": {}},
    ]
    for e in a.env:
        name, kv = e.split(":", 1)
        k, v = kv.split("=", 1)
        next(s for s in sides if s["name"] == name)["env"][k] = v
    rounds = a.rounds or (5 if a.measure == "cpu" else 1)
    per = "step" if a.mode in CAPTURED else "op"
    unit = f"us/{per}" if a.measure == "cpu" else f"instr/{per}"
    res: dict[tuple[str, str], list[float]] = {}
    print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
    with bench_daemons(a.daemon_core) as daemons, tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for model in a.models.split(","):
                for side in sides if r % 2 == 0 else sides[::-1]:
                    v = _run(side, model, a, daemons.remote(), tmp)
                    res.setdefault((model, side["name"]), []).append(v)
                    print(f"{model:>10} {side['name']:>4} {v:10.1f} {unit}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")
    for model in a.models.split(","):
        base, new = (statistics.median(res[(model, s)]) for s in ("base", "new"))
        print(f"{model:>10}: base {base:.1f}, new {new:.1f} {unit} (median of {rounds}): new/base {new / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
