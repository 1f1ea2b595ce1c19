"""The worker's cost per eager op, over the bare kernels: a recorded eager training stream replayed in-process.

A launch_bound workload (tiny MLP, tiny encoder, the transformer classifier, ...) trains eagerly through a real
daemon (Adam, as launch_bound's eager mode) while every frame the client sends is saved, bytes as they went out.
A second process replays those frames' commands as a session's worker runs them: in slices of
--slice-commands (the daemon's fair queue hands a worker at most 128 of a session's queued commands, across the
client's frames, so slices drift within the step) through `slices.run_commands` with a progress mark, on a fresh
session of the same number; then it calls the kernels of the timed steps bare with the arguments the replay gave
them, interleaved. The difference per op is the worker's Python per eager op: decoding the compact record, the
checks, running through the op plan, binding outputs, memory accounting, frees, the slice loop. "in runs": the
share of the timed eager records that ran inside a learned run (server/runs.py). What the front adds (gRPC,
cutting slices, the hand-off to the worker) is not in it. The same replay code runs each checkout's gpupool
(--against-python imports the other's). CPU time of the thread
(`time.thread_time`); the min of --repeats runs counts (a loaded box inflates single runs; the min moves least),
the median ratio is printed beside it. `--against DIR` replays the same recording with another checkout's code
too (run by --against-python), alternating, so that two versions of the worker compare on one box in one run.
`--measure instr` counts instructions instead (callgrind, its instrumentation on only around the last timed
replay and then the bare kernels, one dump each): exact, the same on a loaded box, so small changes show. It also
counts apart, among the bare kernels, the ops a Python function runs (`checks.OpPlan.run`: a fake GPU's dropout
composition, the fused attention's compositions on every device), called whole: their Python counts as kernels
in "over the kernels" (round 44: the encoder's ~60k instructions an op of them, ~16k of it their Python, which the
live daemon's runner shows outside `call_op`: bench/daemon_ab.py's `call_py`).

    python bench/eager_replay.py                                     # tiny-mlp, encoder, classifier: ~2 min
    python bench/eager_replay.py --models tiny-mlp --against /work/base --against-python /work/base/.venv/bin/python
    python bench/eager_replay.py --measure instr --models tiny-mlp,encoder --against /work/base ...   # ~4 min
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cgtools
import torch

HERE = Path(__file__).resolve().parent


def dump(model_name: str, out: str, steps: int) -> None:
    """Train the workload eagerly through a daemon and save every frame the client sent, in order."""
    from gpupool.client.torch import runtime
    from launch_bound import workload
    from train_overhead import bench_daemons

    import gpupool.torch as gt
    from gpupool._proto import device_pb2

    torch.set_num_threads(1)
    frames: list[bytes] = []
    with bench_daemons(1) as daemons:
        remote = daemons.remote()
        device = gt.attach(remote["address"], remote["token"])
        session = runtime.get(device.index).session
        put = session._put

        def record(frame: Any, *rest: Any) -> None:  # (rest: the queued size, `Session._put`)
            frames.append(frame if isinstance(frame, bytes) else frame.SerializeToString())
            put(frame, *rest)

        session._put = record
        model, data, loss_fn = workload(model_name)
        model = model.to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(model(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            return loss

        for i in range(6):  # warm-up: first use of every op, the optimizer's state
            step(*data[i % 4]).item()
        start = len(frames)
        for i in range(steps):
            loss = step(*data[i % 4])
        loss.item()
        end = len(frames)
        gt.detach_all()
    number = session.handle_base >> 32
    ops = sum(
        1 for f in frames[start:end] for c in device_pb2.ClientFrame.FromString(f).commands if c.HasField("eager_op")
    )
    Path(out).write_text(json.dumps({"number": number, "start": start, "end": end, "steps": steps, "ops": ops,
                                     "frames": [f.hex() for f in frames]}))  # fmt: skip


def replay(
    path: str, repeats: int, instr: bool = False, slice_commands: int = 128, no_runs: bool = False
) -> dict[str, Any]:
    from gpupool.server import slices
    from gpupool.server.devices import FakeDevice
    from gpupool.server.executor import CommandExecutor
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    d = json.loads(Path(path).read_text())
    frames = [bytes.fromhex(f) for f in d["frames"]]

    def cut(part: list[bytes]) -> list[bytes]:
        """The frames' commands in slices of `slice_commands` (the daemon's fair queue hands a worker at most that
        many of a session's queued commands, across the client's frames)."""
        spans = [bytes(span) for f in part for _, span in slices.split_frame(f, 1 << 20)]
        return [b"".join(spans[i : i + slice_commands]) for i in range(0, len(spans), slice_commands)]

    warm, timed_slices = cut(frames[: d["start"]]), cut(frames[d["start"] : d["end"]])
    # as a worker marks its progress (`slices.word_mark`; a tree from before round 15 has none: the same partial)
    word_mark = getattr(slices, "word_mark", None)
    mark = word_mark(bytearray(4)) if word_mark else functools.partial(struct.Struct("<i").pack_into, bytearray(4), 0)

    @contextlib.contextmanager
    def clock() -> Any:
        yield [0.0]

    def run_slice(s: Any, payload: bytes) -> None:
        """One recorded frame as one slice of a session's worker (`slices.run_commands`: its frame cuts kept), timed
        as a worker times a fake GPU's slices (`slice_timer`, round 46; a tree without it: a plain clock)."""
        req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, payload)
        slices.run_commands(s, ex.execute, ledger, req, timer, mark)

    ledger = slices.SliceLedger()
    ex = CommandExecutor(ledger)
    if no_runs:  # run_commands then runs every command on its own (`execute`), as before round 9
        ex.eager_span = None  # type: ignore[assignment,method-assign]
    ex.exclusive_rng = True  # as in a session's worker process
    ex.warm_up()
    settle_gc = getattr(importlib.import_module("gpupool.server.worker"), "settle_gc", None)
    if settle_gc is not None:  # as a worker does after its setup (gc.freeze): else a collection every few steps
        settle_gc()  # scans torch's ~200k objects, which no worker pays
    dev = FakeDevice(0, "bench", 1 << 34)
    timer = dev.slice_timer() if hasattr(dev, "slice_timer") else clock
    replies: list[Any] = []
    res: dict[str, list[float]] = {"bare": [], "replay": []}
    for r in range(repeats + 1):
        s = WorkerSession("bench", d["number"], dev, DeviceMemory(dev), 1 << 33)
        for payload in warm:
            run_slice(s, payload)
        calls: list[tuple[Any, Any, Any, bool]] = []
        plans = list(ex._plans.values())
        if r == 0:  # the first replay records the kernels of the timed steps (and warms every cache)
            saved = [p.run for p in plans]
            for p in plans:
                p.run = _recording(p.run, calls, p.run is not p.op._op)
        timed = timed_slices
        counting = instr and r == repeats
        if counting:
            cgtools.control("--instr=on")
        runs = getattr(ex, "_eager", {}).get("bench")
        hits = runs[3].hits if runs is not None and len(runs) > 3 else 0
        start = time.thread_time()
        for payload in timed:
            run_slice(s, payload)
        took = time.thread_time() - start
        if runs is not None and len(runs) > 3:
            res["hits"] = [runs[3].hits - hits]
        if s.error is not None:
            raise SystemExit(f"replay failed: {s.error.message}")
        if r == 0:
            for p, run in zip(plans, saved, strict=True):
                p.run = run
            kernels = calls
            continue
        res["replay"].append(took / d["steps"])
        if counting:
            cgtools.control("--dump=replay")  # written to its own file; the counts start again from zero
        start = time.thread_time()
        for fn, a, k, composed in kernels:
            if not (counting and composed):
                fn(*a, **k)
        if counting:  # the ops a Python function runs apart (their Python and their kernels: `checks.OpPlan.run`)
            cgtools.control("--dump=bare")
            for fn, a, k, composed in kernels:
                if composed:
                    fn(*a, **k)
            cgtools.control("--dump=composed")
        res["bare"].append((time.thread_time() - start) / d["steps"])
        if counting:
            cgtools.control("--instr=off")
        s.release_all()
        replies.clear()
    return {
        "ops": d["ops"] / d["steps"],
        "kernels": len(kernels) / d["steps"],
        "bare": min(res["bare"]),
        "replay": min(res["replay"]),
        "median_ratio": statistics.median(res["replay"]) / statistics.median(res["bare"]),
        "bare_median": statistics.median(res["bare"]),  # (bench/over_kernels.py)
        "replay_median": statistics.median(res["replay"]),
        "in_runs": res["hits"][0] / d["ops"] if "hits" in res else 0.0,  # eager records run inside a learned run
    }


def _recording(fn: Any, calls: list[tuple[Any, Any, Any, bool]], composed: bool) -> Any:
    """`fn` recording its calls; `composed`: an op run by a Python function (a fake GPU's dropout composition, the
    fused attention's compositions), counted apart under --measure instr."""

    def rec(*a: Any, **k: Any) -> Any:
        calls.append((fn, a, k, composed))
        return fn(*a, **k)

    return rec


def _instructions(
    python: str, where: Path, path: str, tmp: str, slice_commands: int, extra: list[str]
) -> dict[str, Any]:
    """One replay under callgrind: instructions per step of the replay and of the bare kernels (this checkout's
    replay code, over the gpupool that `python` imports)."""
    out_file = Path(tmp) / "cg.out"
    for old in Path(tmp).glob("cg.out*"):
        old.unlink()
    # the interpreter itself (valgrind would count a launcher script such as pyenv's shim instead)
    exe = subprocess.check_output([python, "-c", "import sys; print(sys.executable)"], text=True).strip()
    cmd = [*cgtools.valgrind(out_file), exe, str(HERE / "eager_replay.py"), "--replay", path, "--repeats", "1",
           "--instr", "--slice-commands", str(slice_commands), *extra]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=where)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    counts = {}
    for dump in Path(tmp).glob("cg.out.*"):
        text = dump.read_text()
        trigger = next(line for line in text.splitlines() if line.startswith("desc: Trigger:"))
        totals = [line for line in text.splitlines() if line.startswith(("totals:", "summary:"))]
        counts[next(w for w in ("replay", "bare", "composed") if w in trigger)] = int(totals[-1].split()[1])
    steps = json.loads(Path(path).read_text())["steps"]
    bare, composed = counts["bare"] + counts.get("composed", 0), counts.get("composed", 0)
    return {**r, "replay": counts["replay"] / steps, "bare": bare / steps, "composed": composed / steps}


def _line(name: str, r: dict[str, Any], instr: bool = False) -> str:
    if instr:
        over = (r["replay"] - r["bare"]) / r["ops"]
        return (f"{name:<18} {r['ops']:6.0f} ops/step  bare {r['bare'] / 1e6:8.3f} M instr  replay "
                f"{r['replay'] / 1e6:8.3f} M instr  {over / 1e3:7.1f} k instr/op over the kernels"
                f"  in runs {r.get('in_runs', 0.0):.0%}; of the kernels, ops run by Python functions "
                f"{r.get('composed', 0.0) / r['ops'] / 1e3:.1f} k instr/op (their Python and kernels)")  # fmt: skip
    over = (r["replay"] - r["bare"]) / r["ops"] * 1e6
    return (f"{name:<18} {r['ops']:6.0f} ops/step  bare {r['bare'] * 1e3:7.3f} ms  replay {r['replay'] * 1e3:7.3f} ms"
            f"  {over:6.2f} us/op over the kernels  ratio {r['replay'] / r['bare']:.3f} "
            f"(median {r['median_ratio']:.3f})  in runs {r.get('in_runs', 0.0):.0%}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-mlp,encoder,classifier", help="comma-separated launch_bound workloads")
    p.add_argument("--steps", type=int, default=20, help="recorded steps per replay")
    p.add_argument("--repeats", type=int, default=5, help="replays per process (the min counts)")
    p.add_argument("--rounds", type=int, default=3, help="replay processes per checkout, alternating")
    cgtools.add_against_flags(p, "another checkout replaying the same recording")
    p.add_argument("--dump", nargs=2, metavar=("MODEL", "FILE"), help=argparse.SUPPRESS)
    p.add_argument("--replay", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--slice-commands", type=int, default=128, help="commands per slice (the daemon's fair queue: 128)")
    p.add_argument("--no-runs", action="store_true", help="this tree without learned runs (server/runs.py)")
    p.add_argument("--instr", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure == "instr" and shutil.which("valgrind") is None:
        p.error("--measure instr needs valgrind (apt-get install valgrind)")
    if args.dump:
        dump(*args.dump, args.steps)
        return 0
    if args.replay:
        print(json.dumps(replay(args.replay, args.repeats, args.instr, args.slice_commands, args.no_runs)))
        return 0
    trees = {"this": (sys.executable, HERE)}
    if args.against:
        trees["other"] = (args.against_python, Path(args.against) / "bench")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            path = str(Path(tmp) / f"{model}.json")
            cmd = [sys.executable, __file__, "--dump", model, path, "--steps", str(args.steps)]
            subprocess.run(cmd, check=True, capture_output=True, cwd=HERE)
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
            instr = args.measure == "instr"
            for i in range(1 if instr else args.rounds):  # instruction counts do not move between runs
                for name in trees if i % 2 == 0 else reversed(list(trees)):
                    py, where = trees[name]
                    if instr:
                        extra = ["--no-runs"] if args.no_runs and name == "this" else []
                        runs[name].append(_instructions(py, where, path, tmp, args.slice_commands, extra))
                        continue
                    argv2 = [py, str(HERE / "eager_replay.py"), "--replay", path, "--repeats", str(args.repeats),
                             "--slice-commands", str(args.slice_commands)]  # fmt: skip
                    if args.no_runs and name == "this":
                        argv2.append("--no-runs")
                    out = subprocess.run(argv2, check=True, capture_output=True, text=True, cwd=where)
                    runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            best = {k: min(v, key=lambda r: r["replay"] - r["bare"]) for k, v in runs.items()}
            for name, r in best.items():
                print(_line(f"{model} ({name})" if args.against else model, r, instr))
            if args.against:
                this, other = best["this"], best["other"]
                ratio = (this["replay"] - this["bare"]) / (other["replay"] - other["bare"])
                print(f"{model}: this tree's worker Python per op / the other's: {ratio:.2f}; "
                      f"replay per step: {this['replay'] / other['replay']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
