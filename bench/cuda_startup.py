"""What a `gpupool run --cuda` process costs before its script's first op: the CPU seconds (user + system, the process
tree's: `gpupool run` and its child) and wall seconds of `gpupool run --cuda -p 0.5 -- python -c "import torch; one op
on cuda"` on one pool, this tree's against another checkout's (`--against DIR --against-python PY`: its own gpupool
and Python), alternating, medians. Each run also says whether torch.utils.cpp_extension was imported (until round 55
`--cuda` imported it in every process to refuse its CUDA extensions: setuptools, ~0.3 s of CPU). The tests start such
a process for every pooled CUDA script (each torchrun rank and the launcher too).

    python bench/cuda_startup.py --runs 7 --against /work/wt/base --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = "import sys, torch; print(torch.ones(2, device='cuda').sum().item(), 'torch.utils.cpp_extension' in sys.modules)"
UP_WAIT_S = 180.0


def up(state: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """`gpupool up` (this tree's) with one fake GPU; its client environment once it printed it."""
    log = state / "up.log"
    cmd = [sys.executable, "-m", "gpupool.cli", "up", "--scheduler-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0",
           "--metrics-listen", "0", "--scheduler-metrics-listen", "0", "--state", str(state / "scheduler.db"),
           "--fake-gpus", "1"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + UP_WAIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        exports = dict(re.findall(r"^\s*export (GPUPOOL_\w+)=(\S+)$", log.read_text(), re.M))
        if "GPUPOOL_SCHEDULER" in exports:
            return proc, exports
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"gpupool up did not come up:\n{log.read_text()}")


def one_run(python: str, tree: Path, exports: dict[str, str]) -> tuple[float, float, bool]:
    """CPU seconds (the process tree's), wall seconds, and whether cpp_extension was imported."""
    env = {**os.environ, **exports, "PYTHONPATH": str(tree)}
    env.pop("GPUPOOL_CUDA", None)
    cmd = [python, "-m", "gpupool.cli", "run", "--cuda", "-p", "0.5", "--", python, "-c", CODE]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=300)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or "2.0" not in done.stdout:
        raise SystemExit(f"{cmd} failed:\n{done.stdout}\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, done.stdout.split()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="runs of each tree, alternating")
    parser.add_argument("--against", type=Path, help="another checkout (its gpupool runs its own processes)")
    parser.add_argument("--against-python", default=sys.executable, help="the Python of --against (its .venv)")
    args = parser.parse_args()
    trees = [("this", sys.executable, ROOT)]
    if args.against:
        trees.append(("against", args.against_python, args.against.resolve()))
    with tempfile.TemporaryDirectory(prefix="cuda-startup-") as tmp:
        proc, exports = up(Path(tmp))
        try:
            for _, python, tree in trees:
                one_run(python, tree, exports)  # warm-up: the page cache, the pool's zygote
            got: dict[str, list[tuple[float, float, bool]]] = {name: [] for name, _, _ in trees}
            for i in range(args.runs):
                for name, python, tree in trees if i % 2 == 0 else trees[::-1]:
                    got[name].append(one_run(python, tree, exports))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    for name, _, tree in trees:
        cpu, wall = statistics.median(r[0] for r in got[name]), statistics.median(r[1] for r in got[name])
        imported = {r[2] for r in got[name]}
        print(f"{name:>8} {tree}: CPU {cpu:.2f} s, wall {wall:.2f} s (medians of {args.runs}); "
              f"cpp_extension imported: {'/'.join(map(str, sorted(imported)))}")  # fmt: skip
    if args.against:
        saved = statistics.median(b[0] for b in got["against"]) - statistics.median(t[0] for t in got["this"])
        print(f"CPU saved a process: {saved:.2f} s (load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
