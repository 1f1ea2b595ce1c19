"""Like with like: the kernels a fake GPU's worker runs for a training step against local CPU's, per op kind.

A fake GPU is the CPU, so the daemon's step should cost its kernels plus the worker's overhead (eager_replay.py).
But a client of a fake GPU gets the kernels torch picks for an accelerator (PrivateUse1): `at::dropout` takes the
fused `native_dropout`, Adam takes the `_foreach_` ops, ... - a different op list from local CPU's. This script
puts the two side by side in ONE process, on one core, interleaved within the same minute:

- local: the workload's step on CPU tensors (launch_bound's local mode: Adam, one torch thread), timed whole
  (with autograd), and its aten kernels as a TorchDispatchMode saw them, called bare;
- daemon: the same workload trained through a real daemon (eager_replay.py's recording), its steps replayed as a
  session's worker runs them (server/slices.py, the executor, learned runs and the C++ runner as configured), the
  aten kernels the worker called recorded by a TorchDispatchMode, then called bare.

It prints each side's step (CPU time of the thread; the min over --rounds, the median beside it) and, per aten op,
the calls per step and the microseconds per step of each side's bare kernels, with their ratio: which ops cost more
on the daemon and by how much. `--detail OP` lists each call of OP with its arguments' dtypes, shapes and strides
(casts and non-contiguous views show there). `--against DIR` does the same with another checkout's daemon code
(--against-python imports it) on the same recording, in a second process: before/after of a kernel change.
Each call is timed from Python, so a view op's figure is mostly the call itself (a few us); the kernels' share
shows in the big ops. `--measure instr` counts instructions instead (callgrind; each op kind's calls in one dump):
minutes for tiny-mlp, but the classifier did not finish in 19 min on the shared box. `--dropout` counts the
classifier's eight dropouts per step (forward and backward) under callgrind three ways: torch's CPU kernels (what
a fake GPU ran before), server/fallbacks.py's, and local CPU's composition (~4 min).

    python bench/kernel_compare.py                      # the classifier, ~1 min
    python bench/kernel_compare.py --detail aten.native_dropout.default --rounds 5
    python bench/kernel_compare.py --against /work/wt/base --against-python /work/wt/base/.venv/bin/python
    python bench/kernel_compare.py --dropout
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import cgtools
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
Call = tuple[Any, tuple[Any, ...], dict[str, Any]]


class Recorder(TorchDispatchMode):
    """Every aten op that reaches the dispatcher with a CPU tensor among its arguments, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _on_cpu(args) or _on_cpu(kwargs.values()):
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _on_cpu(values: Any) -> bool:
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.device.type == "cpu":
                return True
        elif isinstance(v, list | tuple) and _on_cpu(v):
            return True
    return False


def local_side(model_name: str, steps: int) -> tuple[Any, list[Call]]:
    """launch_bound's local step and the aten kernels of `steps` steps of it (after the same warm-up)."""
    from launch_bound import workload

    model, data, loss_fn = workload(model_name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(i: int) -> None:
        x, y = data[i % 4]
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        loss.item()

    for i in range(6):
        step(i)
    rec = Recorder()
    with rec:
        for i in range(steps):
            step(i)
    return step, rec.calls


def daemon_side(path: str) -> list[Call]:
    """The recorded steps replayed as a worker runs them; the aten kernels the worker called for the timed steps
    (of a second session: the first one's learned runs are then known, as in a long-lived worker)."""
    from gpupool.server import slices
    from gpupool.server.devices import FakeDevice
    from gpupool.server.executor import CommandExecutor
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    d = json.loads(Path(path).read_text())
    frames = [bytes.fromhex(f) for f in d["frames"]]

    def cut(part: list[bytes]) -> list[bytes]:  # the daemon's fair queue: 64 commands a slice
        spans = [bytes(span) for f in part for _, span in slices.split_frame(f, 1 << 20)]
        return [b"".join(spans[i : i + 64]) for i in range(0, len(spans), 64)]

    warm, timed = cut(frames[: d["start"]]), cut(frames[d["start"] : d["end"]])
    ledger = slices.SliceLedger()
    ex = CommandExecutor(ledger)
    ex.exclusive_rng = True  # as in a session's worker process
    ex.warm_up()
    dev = FakeDevice(0, "bench", 1 << 34)

    @contextlib.contextmanager
    def clock() -> Any:
        yield [0.0]

    def run_all(s: Any, payloads: list[bytes]) -> None:
        for payload in payloads:
            req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, payload)
            slices.run_commands(s, ex.execute, ledger, req, clock, lambda *a: None)
        if s.error is not None:
            raise SystemExit(f"replay failed: {s.error.message}")

    rec = Recorder()
    with torch.no_grad():
        for r in range(2):
            s = WorkerSession("bench", d["number"], dev, DeviceMemory(dev), 1 << 33)
            run_all(s, warm)
            if r == 0:
                run_all(s, timed)
                s.release_all()
                continue
            with rec:
                run_all(s, timed)
    return rec.calls


def _time_calls(calls: list[Call], per: dict[str, list[float]], steps: int) -> float:
    sums: dict[str, float] = defaultdict(float)
    clock = time.perf_counter
    start = time.thread_time()
    for fn, a, k in calls:
        t = clock()
        fn(*a, **k)
        sums[str(fn)] += clock() - t
    took = time.thread_time() - start
    for name, v in sums.items():
        per[name].append(v / steps)
    return took / steps


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        c = "" if v.is_contiguous() else " non-contiguous"
        return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)} stride {list(v.stride())}{c}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_describe(x) for x in v[:3]) + (", ..." if len(v) > 3 else "") + "]"
    return repr(v)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    steps = args.steps
    _, local_calls = local_side(args.model, steps)
    local_step = local_side(args.model, 0)[0]
    daemon_calls = daemon_side(args.replay)
    torch.set_grad_enabled(False)
    out: dict[str, Any] = {"steps": [], "local": [], "daemon": []}
    per: dict[str, dict[str, list[float]]] = {"local": defaultdict(list), "daemon": defaultdict(list)}
    for _ in range(args.rounds):
        with torch.enable_grad():
            t = time.thread_time()
            for i in range(steps):
                local_step(i)
            out["steps"].append((time.thread_time() - t) / steps)
        out["local"].append(_time_calls(local_calls, per["local"], steps))
        out["daemon"].append(_time_calls(daemon_calls, per["daemon"], steps))
    counts = {
        side: {name: sum(1 for c in calls if str(c[0]) == name) / steps for name in per[side]}
        for side, calls in (("local", local_calls), ("daemon", daemon_calls))
    }
    out["per_op"] = {side: {k: min(v) for k, v in per[side].items()} for side in per}
    out["counts"] = counts
    out["detail"] = {
        side: [" | ".join(_describe(x) for x in (*a, *k.values())) for fn, a, k in calls if str(fn) == args.detail]
        for side, calls in (("local", local_calls), ("daemon", daemon_calls))
    }
    return out


def measure_instr(args: argparse.Namespace) -> dict[str, Any]:
    """As `measure`, in instructions (this process runs under callgrind, its instrumentation off): one dump per
    measured block, each op kind's calls together; the cost of a dump itself (an empty block) is taken off."""

    torch.set_num_threads(1)
    steps = args.steps
    _, local_calls = local_side(args.model, steps)
    local_step = local_side(args.model, 0)[0]
    daemon_calls = daemon_side(args.replay)
    dumps: list[str] = []

    def counted(name: str, fn: Any) -> None:
        cgtools.control("--instr=on")
        fn()
        cgtools.control(f"--dump=d{len(dumps)}", "--instr=off")
        dumps.append(name)

    def run(calls: list[Call]) -> None:
        for fn, a, k in calls:
            fn(*a, **k)

    counted("empty", lambda: None)
    counted("step", lambda: [local_step(i) for i in range(steps)])
    torch.set_grad_enabled(False)
    counts: dict[str, dict[str, float]] = {}
    for side, calls in (("local", local_calls), ("daemon", daemon_calls)):
        counted(side, functools.partial(run, calls))
        groups: dict[str, list[Call]] = defaultdict(list)
        for c in calls:
            groups[str(c[0])].append(c)
        counts[side] = {name: len(g) / steps for name, g in groups.items()}
        for name, g in groups.items():
            counted(f"{side} {name}", functools.partial(run, g))
    return {"dumps": dumps, "counts": counts, "steps": steps}


def _dump_counts(tmp: str, names: list[str]) -> dict[str, int]:
    """Instructions of each callgrind dump `d<i>` in `tmp`, by `names[i]`."""
    raw: dict[str, int] = {}
    for f in Path(tmp).glob("cg.out.*"):
        text = f.read_text()
        trigger = next(line for line in text.splitlines() if line.startswith("desc: Trigger:"))
        totals = [line for line in text.splitlines() if line.startswith(("totals:", "summary:"))]
        found = re.search(r"d(\d+)\s*$", trigger)
        if found is not None:
            raw[names[int(found.group(1))]] = int(totals[-1].split()[1])
    return raw


def _read_dumps(tmp: str, r: dict[str, Any]) -> dict[str, Any]:
    """The callgrind dumps of `measure_instr` as `measure`'s result (instructions where it has seconds)."""
    raw = _dump_counts(tmp, r["dumps"])
    empty, steps = raw.pop("empty"), r["steps"]
    per = {k: max(0, v - empty) / steps for k, v in raw.items()}
    return {
        "steps": [per.pop("step")],
        "local": [per.pop("local")],
        "daemon": [per.pop("daemon")],
        "per_op": {
            side: {k.split(" ", 1)[1]: v for k, v in per.items() if k.startswith(side + " ")}
            for side in ("local", "daemon")
        },  # fmt: skip
        "counts": r["counts"],
        "detail": {},
    }


# The classifier's dropouts per step (d 64, 4 heads, feed-forward 128, batch 32 x 48, 2 layers): the attention
# weights', the two residual branches' and the feed-forward's of each layer.
CLASSIFIER_DROPOUTS = (((32, 4, 48, 48), 2), ((32, 48, 64), 4), ((32, 48, 128), 2))


def dropout_instr() -> dict[str, Any]:
    """Instructions per classifier step of its dropouts, forward and backward, three ways: torch's CPU
    `native_dropout`/`native_dropout_backward` (the daemon before), server/fallbacks.py's (the daemon now), and
    what local CPU runs (`at::dropout`'s `empty_like().bernoulli_(1 - p).div_(1 - p)`, `input * noise`; its
    backward `grad * noise`). Runs under callgrind (`--dropout`)."""
    from gpupool.server import fallbacks

    torch.set_num_threads(1)
    aten = torch.ops.aten
    p, scale = 0.1, 1 / 0.9
    ways: dict[str, Any] = {
        "empty": lambda x, g, m, noise: None,
        "torch forward": lambda x, g, m, noise: aten.native_dropout.default(x, p, True),
        "fallbacks forward": lambda x, g, m, noise: fallbacks._native_dropout(x, p, True),
        "local forward": lambda x, g, m, noise: x * torch.empty_like(x).bernoulli_(1 - p).div_(1 - p),
        "torch backward": lambda x, g, m, noise: aten.native_dropout_backward.default(g, m, scale),
        "fallbacks backward": lambda x, g, m, noise: fallbacks._native_dropout_backward(g, m, scale),
        "local backward": lambda x, g, m, noise: g * noise,
    }
    inputs = []
    for shape, n in CLASSIFIER_DROPOUTS:
        x, g = torch.randn(shape), torch.randn(shape)
        m = torch.rand(shape) < 0.9
        inputs += [(x, g, m, m / 0.9)] * n
    names = list(ways)
    for i, fn in enumerate(ways.values()):
        for args in inputs:  # warm: every allocation size seen once
            fn(*args)
        cgtools.control("--instr=on")
        for args in inputs:
            fn(*args)
        cgtools.control(f"--dump=d{i}", "--instr=off")
    return {"dumps": names}


def report(name: str, r: dict[str, Any], top: int, instr: bool = False) -> None:
    st, lo, da = r["steps"], r["local"], r["daemon"]
    big, small, scale, fine = ("M instr", "k instr", 1e-6, 1e-3) if instr else ("ms", "us", 1e3, 1e6)
    print(f"{name}: local step {min(st) * scale:.2f} {big} (median {statistics.median(st) * scale:.2f}); bare "
          f"kernels: local {min(lo) * scale:.2f} {big} (median {statistics.median(lo) * scale:.2f}), daemon "
          f"{min(da) * scale:.2f} {big} (median {statistics.median(da) * scale:.2f}); daemon kernels / local step "
          f"{min(da) / min(st):.2f}x, / local kernels {min(da) / min(lo):.2f}x")  # fmt: skip
    lp, dp, lc, dc = r["per_op"]["local"], r["per_op"]["daemon"], r["counts"]["local"], r["counts"]["daemon"]
    names = sorted(set(lp) | set(dp), key=lambda n: -abs(dp.get(n, 0.0) - lp.get(n, 0.0)))
    print(f"  {'aten op':<44} {'local':>19} {'daemon':>19}  {'ratio':>6}  (calls/step  {small}/step)")
    for n in names[:top]:
        lu, du = lp.get(n, 0.0) * fine, dp.get(n, 0.0) * fine
        ratio = f"{du / lu:6.2f}" if lu and du else "     -"
        print(f"  {n:<44} {lc.get(n, 0):5.0f} {lu:9.0f} {small:<3} {dc.get(n, 0):5.0f} {du:9.0f} {small:<3}  {ratio}")
    rest_l = sum(lp[n] for n in names[top:] if n in lp) * fine
    rest_d = sum(dp[n] for n in names[top:] if n in dp) * fine
    print(f"  {'(the other ' + str(max(0, len(names) - top)) + ' ops)':<44} {rest_l:15.0f} {small:<3} "
          f"{rest_d:15.0f} {small:<3}")  # fmt: skip
    for side, lines in r["detail"].items():
        for line in lines:
            print(f"  {side}: {line}")


def _dropout_main(child: bool) -> int:
    if child:
        print(json.dumps(dropout_instr()))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*cgtools.valgrind(Path(tmp) / "cg.out"), sys.executable, __file__, "--dropout", "--json"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE.parent)
        names = json.loads(out.stdout.splitlines()[-1])["dumps"]
        raw = _dump_counts(tmp, names)
    empty = raw.pop("empty")
    print("the classifier's 8 dropouts per step, M instructions (forward, backward):")
    for way in ("torch", "fallbacks", "local"):
        fwd, bwd = raw[f"{way} forward"] - empty, raw[f"{way} backward"] - empty
        print(f"  {way:<10} forward {fwd / 1e6:8.2f}  backward {bwd / 1e6:7.2f}  both {(fwd + bwd) / 1e6:8.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="classifier", help="a launch_bound workload")
    p.add_argument("--top", type=int, default=16, help="ops listed, largest difference first")
    p.add_argument("--detail", default="", help="list every call of this op (e.g. aten.mul.Tensor)")
    p.add_argument("--steps", type=int, default=4, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the min counts)")
    cgtools.add_against_flags(p, "another checkout's daemon code on the same recording")
    p.add_argument("--dropout", action="store_true", help="instructions of the classifier's dropouts, three ways")
    p.add_argument("--replay", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    instr = args.measure == "instr"
    if instr and shutil.which("valgrind") is None:
        p.error("--measure instr needs valgrind (apt-get install valgrind)")
    if args.dropout:
        return _dropout_main(args.json)
    if args.replay:
        r = measure_instr(args) if instr else measure(args)
        if args.json:
            print(json.dumps(r))
        else:
            report(args.model, r, args.top, instr)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "rec.json")
        cmd = [sys.executable, str(HERE / "eager_replay.py"), "--dump", args.model, path, "--steps", str(args.steps)]
        subprocess.run(cmd, check=True, capture_output=True, cwd=HERE)
        trees = {"this": (sys.executable, HERE)}
        if args.against:
            trees["other"] = (args.against_python, HERE)  # this script, the other tree's gpupool
        for name, (py, _where) in trees.items():
            cwd = Path(args.against) if name == "other" and args.against else HERE.parent
            argv2 = [py, str(HERE / "kernel_compare.py"), "--replay", path, "--model", args.model, "--steps",
                     str(args.steps), "--rounds", str(args.rounds), "--detail", args.detail, "--json",
                     "--measure", args.measure]  # fmt: skip
            if instr:  # the interpreter itself under callgrind (not a launcher script)
                exe = subprocess.check_output([py, "-c", "import sys; print(sys.executable)"], text=True).strip()
                for old in Path(tmp).glob("cg.out*"):
                    old.unlink()
                argv2 = [*cgtools.valgrind(Path(tmp) / "cg.out"), exe, *argv2[1:]]
            out = subprocess.run(argv2, check=True, capture_output=True, text=True, cwd=cwd)
            r = json.loads(out.stdout.splitlines()[-1])
            if instr:
                r = _read_dumps(tmp, r)
            report(f"{args.model} ({name})" if args.against else args.model, r, args.top, instr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
