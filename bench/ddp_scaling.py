"""DDP scaling through the pool: samples/s of examples/ddp/train.py at 1, 2 and 4 ranks against the ideal, on
fake GPUs with the speed model of server/speedmodel.py (each op takes at least its modelled time at a
declared peak; each collective its ring time on a declared link), so that N modelled GPUs run concurrently
on a box with fewer cores.

    python bench/ddp_scaling.py [--ranks 1 2 4] [--repeat 3] [--steps 6] [--per-rank-batch 32]
                                [--tflops 0.0002] [--gbps 0.5] [--link-gbps 0.05]

Weak scaling, as in the reference data-parallel benchmark: each rank keeps its batch, the global batch grows
with the ranks. One `gpupool up --fake-gpus MAX` serves every run; the rank counts are interleaved per repeat
and each figure is the median. The table prints speedup = samples/s(N) / samples/s(1) next to the ideal N.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "ddp" / "train.py"


def start_pool(ranks: int, state: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "gpupool.cli", "up", "--fake-gpus", str(ranks), "--fake-gpu-memory", "1GiB",
           "--scheduler-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--state", str(state / "s.db"),
           "--metrics-listen", "127.0.0.1:0", "--scheduler-metrics-listen", "127.0.0.1:0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"export GPUPOOL_SCHEDULER=(\S+)", line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("gpupool up did not start")


def run(ranks: int, scheduler: str, args: argparse.Namespace, env: dict[str, str]) -> float:
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "-n", str(ranks), "--",
           sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), str(TRAIN),
           "--steps", str(args.steps), "--warmup", "1", "--global-batch", str(args.per_rank_batch * ranks)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**env, "GPUPOOL_SCHEDULER": scheduler})
    m = re.search(r"steps, ([\d.]+) samples/s", done.stderr + done.stdout)
    if done.returncode != 0 or m is None:
        raise SystemExit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return float(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--per-rank-batch", type=int, default=32)
    p.add_argument("--tflops", type=float, default=0.0002, help="modelled peak of each fake GPU, TFLOP/s")
    p.add_argument("--gbps", type=float, default=0.5, help="modelled memory bandwidth of each fake GPU, GB/s")
    p.add_argument("--link-gbps", type=float, default=0.05, help="modelled link between daemons, GB/s")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GPUPOOL_FAKE_GPU_TFLOPS": str(args.tflops),
           "GPUPOOL_FAKE_GPU_GBPS": str(args.gbps), "GPUPOOL_FAKE_LINK_GBPS": str(args.link_gbps)}  # fmt: skip
    results: dict[int, list[float]] = {n: [] for n in args.ranks}
    with tempfile.TemporaryDirectory() as tmp:
        proc, scheduler = start_pool(max(args.ranks), Path(tmp), env)
        try:
            for i in range(args.repeat):
                for n in args.ranks:
                    results[n].append(run(n, scheduler, args, env))
                    print(f"repeat {i + 1}: {n} rank(s) {results[n][-1]:.1f} samples/s", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    base = statistics.median(results[args.ranks[0]]) / args.ranks[0]
    print(f"model: {args.tflops:g} TFLOP/s, {args.gbps:g} GB/s memory, {args.link_gbps:g} GB/s link; "
          f"{args.per_rank_batch} samples per rank per step; median of {args.repeat}")  # fmt: skip
    print(f"{'ranks':>5} {'samples/s':>10} {'speedup':>8} {'ideal':>6} {'efficiency':>10}")
    for n in args.ranks:
        med = statistics.median(results[n])
        print(f"{n:>5} {med:>10.1f} {med / base:>8.2f} {n:>6} {med / base / n:>10.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
