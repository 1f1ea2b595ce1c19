"""DDP scaling through the pool: samples/s of examples/ddp/train.py at 1, 2 and 4 ranks against the ideal, on
fake GPUs with the speed model of server/speedmodel.py (each op takes at least its modelled time at a
declared peak; each collective its ring time on a declared link), so that N modelled GPUs run concurrently
on a box with fewer cores.

    python bench/ddp_scaling.py [--ranks 1 2 4] [--repeat 3] [--steps 6] [--per-rank-batch 32]
                                [--tflops 0.0002] [--gbps 0.5] [--link-gbps 0.05]
                                [--client native shim] [--collectives secure|gloo] [--against /work/wt/base]

Weak scaling, as in the reference data-parallel benchmark: each rank keeps its batch, the global batch grows
with the ranks. One `gpupool up --fake-gpus MAX` serves every run; the rank counts are interleaved per repeat
and each figure is the median. The table prints speedup = samples/s(N) / samples/s(1) next to the ideal N.

As a user runs it: `gpupool up` (TLS on every link: its printed `export GPUPOOL_TLS_*` lines go to each run),
`gpupool run`'s default client (`--client native`, the C++ client; `shim`, the Python one, by $GPUPOOL_CLIENT)
and the daemon's default collectives transport (`--collectives secure`; `gloo` by $GPUPOOL_COLLECTIVES).
`--against DIR` runs another checkout (its .venv, its own `gpupool up`) interleaved with this one, same options.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
Tree = tuple[str, Path]  # a checkout: its python, its root


def start_pool(
    ranks: int, state: Path, env: dict[str, str], python: str = sys.executable, log: Path | None = None
) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """`gpupool up`, and the client environment it prints (GPUPOOL_SCHEDULER and the TLS files); its output
    after that goes to `log` (default: nowhere)."""
    cmd = [python, "-m", "gpupool.cli", "up", "--fake-gpus", str(ranks), "--fake-gpu-memory", "1GiB",
           "--scheduler-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--state", str(state / "s.db"),
           "--metrics-listen", "127.0.0.1:0", "--scheduler-metrics-listen", "127.0.0.1:0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    exports: dict[str, str] = {}
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"export (GPUPOOL_\w+)=(\S+)", line)
        if m:
            exports[m.group(1)] = m.group(2)
        elif exports:  # the lines after the last export
            threading.Thread(target=_drain, args=(proc.stdout, log), daemon=True).start()  # keep the pipe drained
            return proc, exports
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("gpupool up did not start")


def _drain(stream: Any, log: Path | None) -> None:
    with open(log or os.devnull, "a") as out:
        for line in stream:
            out.write(line)
            out.flush()


def run(ranks: int, pool: dict[str, str], args: argparse.Namespace, env: dict[str, str], tree: Tree) -> float:
    python, root = tree
    cmd = [python, "-m", "gpupool.cli", "run", "-n", str(ranks), "--",
           python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           str(root / "examples" / "ddp" / "train.py"),
           "--steps", str(args.steps), "--warmup", "1", "--global-batch", str(args.per_rank_batch * ranks)]  # fmt: skip
    env = {**env, **pool, "PYTHONPATH": str(root)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
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
    p.add_argument("--client", nargs="+", default=["native"], choices=["native", "shim"],
                   help="gpupool run's client(s) ($GPUPOOL_CLIENT): native (the default one) and/or shim")  # fmt: skip
    p.add_argument("--collectives", default="secure", choices=["secure", "gloo"], help="the daemons' transport")
    p.add_argument("--against", type=Path, help="another checkout (with its .venv), run interleaved with this one")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPUPOOL_FAKE_GPU_TFLOPS": str(args.tflops),
           "GPUPOOL_FAKE_GPU_GBPS": str(args.gbps), "GPUPOOL_FAKE_LINK_GBPS": str(args.link_gbps),
           "GPUPOOL_COLLECTIVES": args.collectives, "GPUPOOL_GLOO_CONNECT_ANYWHERE": "on"}  # fmt: skip
    trees = {"this": (sys.executable, ROOT)}
    if args.against:
        trees["other"] = (str(args.against.resolve() / ".venv" / "bin" / "python"), args.against.resolve())
    results: dict[tuple[str, str, int], list[float]] = {}
    print(f"load average at the start: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        pools = {}
        try:
            for name, (python, root) in trees.items():
                (Path(tmp) / name).mkdir()
                pools[name] = start_pool(max(args.ranks), Path(tmp) / name, {**env, "PYTHONPATH": str(root)}, python)
            for i in range(args.repeat):
                for n in args.ranks:
                    for client in args.client:
                        for name, tree in trees.items():
                            got = run(n, pools[name][1], args, {**env, "GPUPOOL_CLIENT": client}, tree)
                            results.setdefault((name, client, n), []).append(got)
                            print(f"repeat {i + 1}: {name} {client} {n} rank(s) {got:.1f} samples/s "
                                  f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)  # fmt: skip
        finally:
            for proc, _ in pools.values():
                proc.terminate()
                proc.wait(timeout=30)
    print(f"model: {args.tflops:g} TFLOP/s, {args.gbps:g} GB/s memory, {args.link_gbps:g} GB/s link; "
          f"{args.per_rank_batch} samples per rank per step; median of {args.repeat}; "
          f"--collectives {args.collectives}; load average at the end {os.getloadavg()[0]:.1f}")  # fmt: skip
    heads = ("tree", "client", "ranks", "samples/s", "speedup", "ideal", "efficiency")
    print(" ".join(f"{h:>{w}}" for h, w in zip(heads, (5, 6, 5, 10, 8, 6, 10), strict=True)) + "  runs")
    for name in trees:
        for client in args.client:
            base = statistics.median(results[(name, client, args.ranks[0])]) / args.ranks[0]
            for n in args.ranks:
                runs = results[(name, client, n)]
                med = statistics.median(runs)
                print(f"{name:>5} {client:>6} {n:>5} {med:>10.1f} {med / base:>8.2f} {n:>6} {med / base / n:>10.0%}  "
                      + ", ".join(f"{r:.1f}" for r in runs))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
