"""A 2-GPU eager training step: the C++ client (`gpupool run --native-client -n 2`) against the Python shim
(`gpupool run --client shim -n 2`) and local CPU, in one run.

The workload is launch_bound.py's tiny MLP (32-64-64-2, batch 16, Adam) split over two devices as model parallelism
writes it: its first two layers on gpupool:0, the rest on gpupool:1, the activations (and the labels) moved with
`.to("gpupool:1")` (a download from one session and an upload to the other, on both clients), `.item()` of the loss
once per block. One `gpupool up --fake-gpus 2` serves every run; each run is a fresh `gpupool run` (its own lease of
two GPUs). Blocks of steps are timed with one sync at their end; the median block counts, and local / shim / native
runs alternate for a few rounds, the best of each counting. Columns: ms/step, the ratio to local, the C++ client's
ratio to the shim, and the client process's CPU per step (what the client costs; the daemon's work is elsewhere).
The load average at the start and end is printed: on a shared box, compare ratios from one run only.

    nice python bench/split_devices.py                  # ~2-3 min
    python bench/split_devices.py --rounds 3 --steps 30 --blocks 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The child: argv = first device, second device, steps, blocks, warmup. Prints {"ms": [...], "cpu_ms": [...]}.
CHILD = """
import json, sys, time
import torch
from torch import nn

first, second = sys.argv[1], sys.argv[2]
steps, blocks, warmup = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if first != "cpu":
    import gpupool.torch  # the Python client's device (the C++ client needs no import)
torch.set_num_threads(1)
torch.manual_seed(0)
gen = torch.Generator().manual_seed(1)
head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()).to(first)
tail = nn.Sequential(nn.Linear(64, 2)).to(second)
opt = torch.optim.Adam([*head.parameters(), *tail.parameters()], lr=1e-3, foreach=True)
data = [(torch.randn(16, 32, generator=gen), torch.randint(0, 2, (16,), generator=gen)) for _ in range(4)]

def step(i):
    x, y = data[i % 4]
    opt.zero_grad()
    loss = nn.functional.cross_entropy(tail(head(x.to(first)).to(second)), y.to(second))
    loss.backward()
    opt.step()
    return loss

for i in range(warmup):
    step(i)
step(0).item()
ms, cpu = [], []
for b in range(blocks):
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        loss = step(i)
    loss.item()  # the block's one sync (the optimizer steps of both devices ran before it on their sessions)
    ms.append((time.perf_counter() - t0) * 1000 / steps)
    cpu.append((time.process_time() - c0) * 1000 / steps)
print(json.dumps({"ms": ms, "cpu_ms": cpu}))
"""

MODES = {
    "local": [],
    "shim": ["--client", "shim", "-n", "2", "-p", "0.5"],
    "native": ["--native-client", "-n", "2", "-p", "0.5"],
}


def start_pool(
    tmp: Path, env: dict[str, str], python: str = sys.executable, gpus: int = 2
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """`gpupool up --fake-gpus GPUS` (loopback, port 0, its output in a file); the client environment it prints."""
    log = tmp / "up.log"
    cmd = [python, "-m", "gpupool.cli", "up", "--fake-gpus", str(gpus), "--fake-gpu-memory", "1GiB",
           "--scheduler-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--state", str(tmp / "s.db"),
           "--metrics-listen", "0", "--scheduler-metrics-listen", "0"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        exports = dict(re.findall(r"export (GPUPOOL_[A-Z_]+)=(\S+)", log.read_text()))
        if "GPUPOOL_SCHEDULER" in exports:
            return proc, exports
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"gpupool up did not start:\n{log.read_text()[-2000:]}")


def run(mode: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    devices = ["cpu", "cpu"] if mode == "local" else ["gpupool:0", "gpupool:1"]
    child = [sys.executable, "-c", CHILD, *devices, str(args.steps), str(args.blocks), str(args.warmup)]
    cmd = child if mode == "local" else [sys.executable, "-m", "gpupool.cli", "run", *MODES[mode], "--", *child]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ms": statistics.median(out["ms"]), "cpu_ms": statistics.median(out["cpu_ms"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks (the median counts)")
    p.add_argument("--warmup", type=int, default=6, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=3, help="alternating local/shim/native runs (the best of each counts)")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("GPUPOOL_LEASE", "GPUPOOL_CUDA", "GPUPOOL_CLIENT")}
    env["PYTHONPATH"] = str(ROOT)
    load0 = os.getloadavg()
    from gpupool.client.native import backend

    backend.build()  # before timing anything (gpupool run --native-client would build it in the first native run)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        pool, exports = start_pool(Path(tmp), env)
        try:
            for r in range(args.rounds):
                for mode in MODES:
                    results[mode].append(run(mode, args, {**env, **exports}))
                    print(f"round {r} {mode}: {results[mode][-1]['ms']:.2f} ms/step", file=sys.stderr)
        finally:
            pool.send_signal(signal.SIGINT)
            pool.wait(timeout=30)
    best = {m: min(rs, key=lambda x: x["ms"]) for m, rs in results.items()}
    print(f"2-GPU eager step (tiny MLP split over gpupool:0 and gpupool:1), {args.steps} steps x {args.blocks} "
          f"blocks, best of {args.rounds} rounds; load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'mode':<8} {'ms/step':>8} {'vs local':>9} {'vs shim':>8} {'client CPU ms/step':>19}")
    for m, b in best.items():
        print(f"{m:<8} {b['ms']:>8.2f} {b['ms'] / best['local']['ms']:>8.2f}x {b['ms'] / best['shim']['ms']:>7.2f}x "
              f"{b['cpu_ms']:>19.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
