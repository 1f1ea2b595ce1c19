"""How long scripts/test.sh's run takes to collect the suite (pytest-xdist, two workers: each one imports every test
module), a base checkout against this one in one run, rounds alternating:

- base (--against): `pytest -n 2 -k NOTHING` (scripts/test.sh's workers collecting, no test selected: xdist runs no
  workers under --collect-only) in the base checkout with PYTHONDONTWRITEBYTECODE=1 (this box's
  environment, and so CI's): each worker compiles every module from source and pytest rewrites the asserts of every
  test module, as the base's scripts/test.sh ran it;
- branch: this checkout's __pycache__ folders removed first (a fresh clone), then scripts/test.sh's warm-up (a
  `--collect-only` allowed to write .pyc files, which the script runs beside ruff and mypy), then the same
  `-n 2 -k NOTHING` with PYTHONDONTWRITEBYTECODE=1.

Then a program the tests start, after the warm-up: a fresh interpreter importing the daemon's, the scheduler's and
the client's modules (as each `gpupool serve`, zygote and `gpupool run` script does; --child-rounds times each tree).

Wall seconds and CPU seconds (user + sys of the processes: the controller and its workers) of each, and medians.
Wall times under load vary: compare the rounds side by side, and the CPU seconds.

    nice -n 5 .venv/bin/python bench/collection.py --rounds 3 --against /work/wt/base \\
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
# scripts/test.sh's workers, each collecting the suite, and no test selected (xdist ignores -n under --collect-only)
WORKERS = [*PYTEST, "-n", "2", "--dist", "loadfile", "--no-loadscope-reorder", "-k", "no_test_is_named_this_51"]
CHILD = "import gpupool.server.app, gpupool.scheduler.cli, gpupool.client.session"
TREES = ("tests", "gpupool", "server", "client", "scheduler", "examples", "bench", "deploy", "proto", "scripts")


def timed(python: str, root: Path, args: list[str], write_bytecode: bool = False) -> tuple[float, float]:
    """(wall s, CPU s) of `python ARGS` in `root`; fails with its output where it collected no tests."""
    env = dict(os.environ)
    if write_bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([python, *args], cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    collected = args[0] == "-c" or re.search(r"\d+ (?:tests? collected|deselected)|no tests ran", done.stdout)
    if done.returncode not in (0, 5) or not collected:
        raise SystemExit(f"{root}: {args} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def caches(root: Path) -> list[Path]:
    return [p for tree in TREES if (root / tree).is_dir() for p in (root / tree).rglob("__pycache__")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child-rounds", type=int, default=5)
    parser.add_argument("--against", type=Path, required=True, help="a base checkout (its scripts/test.sh's way)")
    parser.add_argument("--against-python", default="", help="the base checkout's Python (default: this one)")
    args = parser.parse_args()
    base_python = args.against_python or sys.executable
    if caches(args.against):
        raise SystemExit(f"{args.against} holds __pycache__ folders: its run would not be a fresh clone's")
    rows: dict[str, list[tuple[float, float]]] = {
        "base: 2 workers": [],
        "branch: warm-up": [],
        "branch: 2 workers": [],
    }
    for r in range(args.rounds):
        rows["base: 2 workers"].append(timed(base_python, args.against, WORKERS))
        for folder in caches(ROOT):
            shutil.rmtree(folder, ignore_errors=True)
        rows["branch: warm-up"].append(timed(sys.executable, ROOT, [*PYTEST, "--collect-only"], write_bytecode=True))
        rows["branch: 2 workers"].append(timed(sys.executable, ROOT, WORKERS))
        print(f"round {r + 1}: " + "  ".join(f"{k} {w:.1f} s wall {c:.1f} s CPU" for k, [*_, (w, c)] in rows.items()),
              flush=True)  # fmt: skip
    children: dict[str, list[tuple[float, float]]] = {"base: a child's imports": [], "branch: a child's imports": []}
    for _ in range(args.child_rounds):  # (the branch's .pyc files: the last round's warm-up's)
        children["base: a child's imports"].append(timed(base_python, args.against, ["-c", CHILD]))
        children["branch: a child's imports"].append(timed(sys.executable, ROOT, ["-c", CHILD]))
    rows.update(children)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"{'median of ' + str(args.rounds):24} {'wall s':>8} {'CPU s':>8}")
    for name, runs in rows.items():
        print(f"{name:24} {statistics.median(w for w, _ in runs):8.1f} {statistics.median(c for _, c in runs):8.1f}")


if __name__ == "__main__":
    main()
