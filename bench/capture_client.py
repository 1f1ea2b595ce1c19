"""The client's own cost of a captured step, per client and model: instructions (callgrind) or thread CPU per replay.

A launch_bound workload (tiny MLP, the stock MLP, ...; Adam(capturable=True), a device lr) is captured through a
real daemon (`gpupool serve --fake-gpus 1`, TLS, a side port unless `BENCH_DAEMON_FLAGS` says otherwise) by one
client: `python` (`gpupool.torch.capture`, client/torch/capture.py) or `native` (the C++ client's,
client/native/capture.py, `gpupool run`'s default). After the recordings, --steps replays with the workload's four
CPU batches in turn, then one `.item()` of the last loss. Windows, each counted alone:

- `steps`: the replays (each call of the captured step until it returns; the frames they fill go out on the way);
- `item`: the `.item()` after them (the last frame, the reply's wait and read);
- `key`: the guard alone, `--steps` times (`_structure`, then `_lookup`, or `_key` and `_valid_graph` before round 47,
  of the call's arguments: shapes, training flags,
  optimizer settings, Python values; the C++ client's `poll` of freed handles too where a replay makes that call
  first, as before round 44: since, `replay` hears of them): a part of `steps`.

`--measure instr`: the client process under callgrind, instrumentation on around each window only (all threads),
less an empty window's count (the switch itself); per step. `--top N` also prints the N functions with the most
inclusive instructions of the `steps` window (callgrind_annotate; C-level: Python frames are the interpreter's).
`--measure cpu`: the calling thread's CPU time (time.thread_time) and the process's (all threads) per step, the
median of --repeats windows; no valgrind. `--measure profile`: cProfile over the `steps` window, the top --top
Python functions by own time per step (the profiler's overhead inflates small functions: a ranking, not a figure).
`--against DIR --against-python PY` runs the same child under that checkout's gpupool (interleaved with this one).

    cd bench && nice -n 5 ../.venv/bin/python capture_client.py --models tiny-mlp,mlp --clients python,native \
        --measure instr --against /work/wt/base --against-python /work/wt/base/.venv/bin/python
    cd bench && nice -n 5 ../.venv/bin/python capture_client.py --models tiny-mlp --measure profile --top 25
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cgtools  # noqa: E402

CLIENTS = ("python", "native")


def _setup(a: argparse.Namespace) -> tuple[Any, Any, list[Any], Any]:
    """(the captured step, its CapturedStep object, the batches, a function that returns the step's guard part)."""
    import torch
    from launch_bound import adam, training_step, workload

    torch.set_num_threads(1)
    model, data, loss_fn = workload(a.model)
    if a.measure == "instr":  # under valgrind on a loaded box the TLS handshake alone can outlast Attach's 10 s
        from gpupool.client.session import Session

        Session.attach.__func__.__kwdefaults__["timeout"] = 120.0  # type: ignore[attr-defined]
    if a.client == "native":
        from gpupool.client import native as nc
        from gpupool.client.native.capture import capture

        nc.enable()
        nc.attach(a.address, a.token)
        device = torch.device("gpupool", 0)
    else:
        import gpupool.torch as gt

        device = gt.attach(a.address, a.token)
        capture = gt.capture
        from launch_bound import steady_for_callgrind

        steady_for_callgrind("captured")  # no hold timer: frames of 4, 8, 16 steps as natively
    model = model.to(device)
    torch.manual_seed(1234)
    step = capture(training_step(model, adam(model, device, True, a.adam), loss_fn))
    for i in range(a.warmup):
        step(*data[i % 4]).item()
    assert step.stats["replayed"] > 0 and len(step.graphs) == 1, step.stats

    def key() -> Any:
        x, y = data[0]
        if a.client == "native" and not hasattr(step, "_valid_graph"):  # before round 44 a replay polled first
            from gpupool.client.native.capture import _device

            _device(0).poll()
        leaves, _, structure = step._structure((x, y), {})
        if hasattr(step, "_lookup"):  # round 47: the replay's lookup of key and graph (its short way where it holds)
            return step._lookup(structure, leaves)
        key = step._key(structure, leaves)
        return key, step._valid_graph(key) if hasattr(step, "_valid_graph") else None

    return step, step, data, key


def child(a: argparse.Namespace) -> int:
    """One measurement (this file run by a checkout's python, importing its gpupool)."""
    run, step, data, key = _setup(a)
    n = a.steps
    out: dict[str, Any] = {}
    if a.measure == "instr":
        cgtools.control("--instr=on")  # an empty window: what switching costs
        cgtools.control("--instr=off", "--dump=empty")
        cgtools.control("--instr=on")
        for _ in range(n):
            key()
        cgtools.control("--instr=off", "--dump=key")
        loss = None
        cgtools.control("--instr=on")
        for i in range(n):
            loss = run(*data[i % 4])
        cgtools.control("--instr=off", "--dump=steps")
        assert loss is not None
        cgtools.control("--instr=on")
        loss.item()
        cgtools.control("--instr=off", "--dump=item")
    elif a.measure == "cpu":
        rows = []
        for _ in range(a.repeats):
            loss = None
            c0, p0 = time.thread_time(), time.process_time()
            for i in range(n):
                loss = run(*data[i % 4])
            c1, p1 = time.thread_time(), time.process_time()
            assert loss is not None
            loss.item()
            c2, p2 = time.thread_time(), time.process_time()
            k0 = time.thread_time()
            for _ in range(n):
                key()
            rows.append((c1 - c0, p1 - p0, c2 - c1, p2 - p1, time.thread_time() - k0))
        med = [statistics.median(r[j] for r in rows) * 1e6 for j in range(5)]
        out = {"thread_us": med[0] / n, "process_us": med[1] / n, "item_thread_us": med[2],
               "item_process_us": med[3], "key_thread_us": med[4] / n}  # fmt: skip
    else:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        loss = None
        prof.enable()
        for i in range(n):
            loss = run(*data[i % 4])
        prof.disable()
        assert loss is not None
        loss.item()
        st = pstats.Stats(prof)
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[: a.top]  # type: ignore[attr-defined]
        out["profile"] = [[f"{Path(f).name}:{line}({fn})", c[1] / n, c[2] / n * 1e6, c[3] / n * 1e6]
                          for (f, line, fn), c in rows]  # fmt: skip
    out["stats"] = step.stats
    print(json.dumps(out))
    return 0


def _total(path: Path) -> int:
    m = re.search(r"^totals:\s+(\d+)", path.read_text(errors="replace"), re.M)
    return int(m.group(1)) if m else 0


def top_functions(dump: Path, n: int, per: int) -> list[str]:
    """The `n` functions with the most inclusive instructions in a callgrind dump, per `per` (steps)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", "--auto=no", str(dump)],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].replace(",", "").isdigit() and parts[1].startswith("("):
            name = re.sub(r" \[[^]]*\]$", "", parts[2]).rsplit("/", 1)[-1]
            rows.append(f"{int(parts[0].replace(',', '')) / per:12.0f}  {name}")
    return rows[:n]


def run_side(python: str, cwd: str, model: str, client: str, a: argparse.Namespace, remote: dict[str, Any],
             tmp: str) -> dict[str, Any]:  # fmt: skip
    flags = ["--child", "--model", model, "--client", client, "--steps", str(a.steps), "--warmup", str(a.warmup),
             "--measure", a.measure, "--repeats", str(a.repeats), "--top", str(a.top), "--adam", a.adam,
             "--address", remote["address"], "--token", remote["token"]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = ["taskset", "-c", str(a.client_core)]
    folder = Path(tempfile.mkdtemp(dir=tmp))
    if a.measure == "instr":
        prefix += cgtools.valgrind(folder / "cg.out")
    out = subprocess.run([*prefix, python, str(HERE / "capture_client.py"), *flags], cwd=cwd, capture_output=True,
                         text=True, env=env, check=False)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{model}/{client} under {python} failed:\n{out.stderr[-3000:]}")
    r: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if a.measure == "instr":
        by_name = {}
        for dump in folder.glob("cg.out.*"):
            m = re.search(r"^desc: Trigger: .*?(empty|key|steps|item)\b", dump.read_text(errors="replace"), re.M)
            if m:
                by_name[m.group(1)] = dump
        empty = _total(by_name["empty"])
        n = a.steps
        r["instr_key"] = (_total(by_name["key"]) - empty) / n
        r["instr_steps"] = (_total(by_name["steps"]) - empty) / n
        r["instr_item"] = _total(by_name["item"]) - empty
        r["instr_empty"] = empty
        if a.top:
            r["top"] = top_functions(by_name["steps"], a.top, n)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-mlp,mlp", help="comma-separated launch_bound workloads")
    p.add_argument("--clients", default="python,native", help="comma-separated: " + ",".join(CLIENTS))
    p.add_argument("--measure", choices=("instr", "cpu", "profile"), default="instr")
    p.add_argument("--steps", type=int, default=0, help="replays a window (default: 40 for instr, 200 otherwise)")
    p.add_argument("--repeats", type=int, default=5, help="--measure cpu: windows (the median counts)")
    p.add_argument("--warmup", type=int, default=8, help="calls first (1 eager, 2 recorded, replays)")
    p.add_argument("--top", type=int, default=0, help="instr: the top N functions (inclusive); profile: N rows")
    p.add_argument("--adam", default="capturable", help="launch_bound's --adam")
    p.add_argument("--against", metavar="DIR", help="another checkout, run by --against-python (A/B)")
    p.add_argument("--against-python", default="", help="the python that imports DIR's gpupool")
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument("--daemon-core", type=int, default=1)
    for hidden in ("--model", "--client", "--address", "--token"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.steps = a.steps or (40 if a.measure == "instr" else 200)
    if a.child:
        return child(a)
    if a.measure == "instr" and shutil.which("valgrind") is None:
        p.error("--measure instr needs valgrind (apt-get install valgrind)")
    from train_overhead import bench_daemons

    os.environ.setdefault("BENCH_DAEMON_FLAGS", "--bulk-listen 127.0.0.1:0")
    sides = [("this", sys.executable, str(HERE.parent))]
    if a.against:
        sides.insert(0, ("base", a.against_python or str(Path(a.against) / ".venv" / "bin" / "python"), "/tmp"))
        sides[1] = ("this", sys.executable, "/tmp")
    print(f"load average {os.getloadavg()[0]:.1f}; daemon flags {os.environ['BENCH_DAEMON_FLAGS']!r}", flush=True)
    res: dict[tuple[str, str, str], dict[str, Any]] = {}
    with bench_daemons(a.daemon_core) as daemons, tempfile.TemporaryDirectory() as tmp:
        for model in a.models.split(","):
            for client in a.clients.split(","):
                for name, python, cwd in sides:
                    r = res[(model, client, name)] = run_side(python, cwd, model, client, a, daemons.remote(), tmp)
                    print(f"{model:>9} {client:>6} {name:>4}: " + _line(r, a), flush=True)
                    for row in r.get("top", []):
                        print("    " + row)
                    for f, calls, own, cum in r.get("profile", []):
                        print(f"    {own:8.2f} us own {cum:8.2f} us cum {calls:6.2f} calls  {f}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    if a.against and a.measure != "profile":
        for model in a.models.split(","):
            for client in a.clients.split(","):
                base, this = res[(model, client, "base")], res[(model, client, "this")]
                keys = [k for k in base if k.startswith(("instr_", "thread_", "process_", "item_", "key_"))
                        and k != "instr_empty" and base[k]]  # fmt: skip
                print(f"{model:>9} {client:>6} this/base: " + ", ".join(f"{k} {this[k] / base[k]:.3f}" for k in keys))
    return 0


def _line(r: dict[str, Any], a: argparse.Namespace) -> str:
    if a.measure == "instr":
        return (f"steps {r['instr_steps']:.0f} instr/step (guard key {r['instr_key']:.0f}), item {r['instr_item']:.0f}"
                f" instr, switch {r['instr_empty']:.0f}; {r['stats']}")  # fmt: skip
    if a.measure == "cpu":
        return (f"thread {r['thread_us']:.1f} us/step (guard key {r['key_thread_us']:.1f}), process "
                f"{r['process_us']:.1f} us/step; item thread {r['item_thread_us']:.0f} us; {r['stats']}")  # fmt: skip
    return f"{r['stats']}"


if __name__ == "__main__":
    sys.exit(main())
