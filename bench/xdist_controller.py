"""What pytest-xdist's controller (scripts/test.sh: `-n 2 --dist loadfile`) spends before it starts its workers: it
loads tests/conftest.py and calls its configure hooks, but runs no test. A probe plugin reports, at the start of the
controller's session (before xdist starts the workers), its CPU seconds (user + sys), its wall seconds since the
process started, and which of torch, grpc and the tests' helpers it imported; then it ends the run. A base checkout
against this one in one run, rounds alternating; medians.

    nice -n 5 .venv/bin/python bench/xdist_controller.py --rounds 5 --against /work/wt/base \\
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import os, sys, time

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(open("/proc/uptime").read().split()[0])
    heavy = [m for m in ("torch", "grpc", "support", "thread_state") if m in sys.modules]
    print(f"probe {time.process_time():.3f} {uptime - start:.3f} {','.join(heavy) or '-'}", flush=True)
    pytest.exit("probed", returncode=0)
"""


def probe(python: str, root: Path, plugins: Path) -> tuple[float, float, str]:
    env = {**os.environ, "PYTHONPATH": str(plugins)}
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench_controller_probe", "-n", "2", "--dist",
            "loadfile", "--no-loadscope-reorder", "tests"]  # fmt: skip
    done = subprocess.run([python, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    lines = [x for x in done.stdout.splitlines() if x.startswith("probe ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{root}: failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    _, cpu, wall, heavy = lines[0].split()
    return float(cpu), float(wall), heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", type=Path, required=True, help="the base checkout")
    parser.add_argument("--against-python", default=sys.executable, help="the base checkout's python")
    a = parser.parse_args()
    trees = {"base": (a.against_python, a.against), "branch": (sys.executable, ROOT)}
    got: dict[str, list[tuple[float, float, str]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as plugins:
        (Path(plugins) / "bench_controller_probe.py").write_text(PROBE)
        for r in range(a.rounds):
            for name in ("base", "branch") if r % 2 == 0 else ("branch", "base"):
                cpu, wall, heavy = probe(*trees[name], Path(plugins))
                got[name].append((cpu, wall, heavy))
                print(f"round {r + 1} {name:6s} controller CPU {cpu:6.2f} s, wall {wall:6.2f} s, imported {heavy}",
                      flush=True)  # fmt: skip
    print(f"{'':8s} {'CPU s (median)':>15s} {'wall s (median)':>16s}")
    for name, rows in got.items():
        cpu = statistics.median(x[0] for x in rows)
        wall = statistics.median(x[1] for x in rows)
        print(f"{name:8s} {cpu:15.2f} {wall:16.2f}")


if __name__ == "__main__":
    main()
