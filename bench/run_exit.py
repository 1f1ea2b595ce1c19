"""How long a script's exit takes through `gpupool run` (the default C++ client): from the script's last atexit handler
(registered first, so it runs last: what follows is the interpreter's own teardown) to `gpupool run`'s return (the
child's exit, the lease's release, `run`'s own exit), and the CPU seconds of the process tree (`gpupool run` and its
child), for this tree against another checkout (`--against DIR --against-python PY`: its own gpupool and Python),
alternating on one pool, medians. Round 56 (seed56): the exit was ~80 % the interpreter's final collections over
torch's objects (client/cuda/__init__.py `freeze_imports`); the client's own close and the release take milliseconds.

    python bench/run_exit.py --runs 7 --against /work/wt/base --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cuda_startup import up

ROOT = Path(__file__).resolve().parent.parent
CODE = """import atexit, sys, time
atexit.register(lambda: print("last-atexit", time.time(), flush=True))
import torch
import gpupool.torch
x = torch.ones(4, 4).to(gpupool.torch.device())
print("value", (x @ x).sum().item(), flush=True)
"""


def one_run(python: str, tree: Path, exports: dict[str, str]) -> tuple[float, float, float]:
    """CPU seconds (the process tree's), wall seconds in all, and seconds from the last atexit handler to the return."""
    env = {**os.environ, **exports, "PYTHONPATH": str(tree)}
    cmd = [python, "-m", "gpupool.cli", "run", "-p", "0.5", "--", python, "-c", CODE]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=300)
    returned, wall = time.time(), time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or "value 64.0" not in done.stdout:
        raise SystemExit(f"{cmd} failed:\n{done.stdout}\n{done.stderr}")
    last = float(done.stdout.split("last-atexit")[1].split()[0])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, returned - last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--against", default="", help="another checkout (e.g. /work/wt/base)")
    ap.add_argument("--against-python", default="", help="its Python (its venv's)")
    a = ap.parse_args()
    trees = [("this tree", sys.executable, ROOT)]
    if a.against:
        trees.append(("against", a.against_python or sys.executable, Path(a.against).resolve()))
    with tempfile.TemporaryDirectory(prefix="run-exit-") as tmp:
        os.chmod(tmp, 0o700)
        proc, exports = up(Path(tmp))
        try:
            for _, python, tree in trees:  # warm-up: page cache, the C++ client's build looked up
                one_run(python, tree, exports)
            got: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in trees}
            for _ in range(a.runs):
                for name, python, tree in trees:
                    got[name].append(one_run(python, tree, exports))
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"{'':10} {'exit s (last atexit -> run returned)':>38} {'CPU s (run + child)':>20} {'wall s':>8}"
          f"  (medians of {a.runs}; load {os.getloadavg()[0]:.1f})")  # fmt: skip
    for name, rows in got.items():
        med = [statistics.median(r[i] for r in rows) for i in range(3)]
        print(f"{name:10} {med[2]:38.2f} {med[0]:20.2f} {med[1]:8.2f}")


if __name__ == "__main__":
    main()
