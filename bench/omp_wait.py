"""A float64 LSTM trained with LBFGS on a fake GPU, against local CPU: the daemon's OpenMP wait policy (issue 8).

pytorch/examples' time_sequence_prediction (its `Sequence`: two `nn.LSTMCell(51)` and a `Linear`, float64, MSELoss,
`LBFGS(lr=0.8)` with a closure; its sine-wave data at N=12, here L steps per sequence and --max-iter closures a
step) run by `gpupool run --cuda` on `gpupool up --fake-gpus 1`, and on the local CPU with OMP_NUM_THREADS=1 (as
docs/cuda.md's real-world runs) and with torch's default threads (every core). A session's worker runs with every
core's OpenMP team; MKL runs the model's small float64 GEMMs on two threads, and on a loaded box libgomp's default
spin at the team's barrier costs milliseconds an op (server/zygote.py WAIT_POLICY). `--against DIR` starts a second
pool from another checkout (its .venv) and alternates the two in one run: before/after on one box. Wall and client
CPU seconds of the training loop (the child's own clock, after the session is up), and the session worker's CPU
seconds over its whole life (the zygote's reaped children's time: spinning shows there even where the wall time
happens not to suffer), medians of --rounds.

    python bench/omp_wait.py --against /work/wt/base
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from split_devices import start_pool

ROOT = Path(__file__).resolve().parent.parent

# The child: argv = device, L, max_iter. Prints "TIME wall cpu" and the losses.
CHILD = r"""
import sys, time
import numpy as np
import torch
from torch import nn, optim
dev, L, maxit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
class Sequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm1 = nn.LSTMCell(1, 51)
        self.lstm2 = nn.LSTMCell(51, 51)
        self.linear = nn.Linear(51, 1)
    def forward(self, input):
        outputs = []
        h_t = torch.zeros(input.size(0), 51, dtype=torch.double)
        c_t = torch.zeros(input.size(0), 51, dtype=torch.double)
        h_t2 = torch.zeros(input.size(0), 51, dtype=torch.double)
        c_t2 = torch.zeros(input.size(0), 51, dtype=torch.double)
        for input_t in input.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            outputs += [self.linear(h_t2)]
        return torch.cat(outputs, dim=1)
np.random.seed(2)
x = np.empty((12, L), "int64")
x[:] = np.array(range(L)) + np.random.randint(-80, 80, 12).reshape(12, 1)
data = np.sin(x / 20.0).astype("float64")
torch.manual_seed(0)
torch.set_default_device(dev)
inp, target = torch.from_numpy(data[3:, :-1]).to(dev), torch.from_numpy(data[3:, 1:]).to(dev)
seq = Sequence().double().to(dev)
criterion = nn.MSELoss()
optimizer = optim.LBFGS(seq.parameters(), lr=0.8, max_iter=maxit)
losses = []
def closure():
    optimizer.zero_grad()
    loss = criterion(seq(inp), target)
    losses.append(loss.item())
    loss.backward()
    return loss
closure()  # the first forward and backward (the session's warm-up) untimed
t, c = time.perf_counter(), time.process_time()
optimizer.step(closure)
print("TIME", time.perf_counter() - t, time.process_time() - c)
print("LOSSES", " ".join(repr(v) for v in losses))
"""


def zygote_children_cpu(pool: int) -> float:
    """CPU seconds of the pool's session workers that ended (the zygote reaps them: its children's user + system
    time); 0.0 where the zygote is not found."""
    procs = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            fields = text[text.rindex(")") + 2 :].split()
            procs[int(stat.parent.name)] = (int(fields[1]), fields)
    tick = os.sysconf("SC_CLK_TCK")
    for pid, (_, fields) in procs.items():
        ancestor = pid
        while ancestor in procs and ancestor != pool:
            ancestor = procs[ancestor][0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if ancestor == pool else b""
        if b"gpupool.server.zygote" in cmdline:
            return (int(fields[13]) + int(fields[14])) / tick
    return 0.0


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, list[float]]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{done.stderr[-3000:]}")
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("TIME", "LOSSES")))
    wall, cpu = map(float, lines["TIME"].split())
    return wall, cpu, [float(v) for v in lines["LOSSES"].split()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=40, help="steps per sequence (the script's L is 1000; 120 in docs)")
    p.add_argument("--max-iter", type=int, default=4, help="LBFGS closures per step (the script's 20)")
    p.add_argument("--rounds", type=int, default=3, help="alternating runs (medians count)")
    p.add_argument("--against", help="another checkout (with its .venv) for a second pool, alternated with this one")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("GPUPOOL_LEASE", "GPUPOOL_CUDA", "GPUPOOL_CLIENT")}
    env.pop("OMP_WAIT_POLICY", None)
    daemon_env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}  # its workers: torch's default team
    env["OMP_NUM_THREADS"] = "1"  # the clients' (docs/cuda.md's real-world runs)
    pools = {"pool (this)": (sys.executable, ROOT)}
    if args.against:
        other = Path(args.against).resolve()
        pools["pool (against)"] = (str(other / ".venv/bin/python"), other)
    child = [str(args.length), str(args.max_iter)]
    load0 = os.getloadavg()
    results: dict[str, list[tuple[float, float, list[float]]]] = {}
    workers: dict[str, list[float]] = {}  # the pools' session workers' CPU seconds a run
    with tempfile.TemporaryDirectory() as tmp:
        started = {}
        try:
            for i, (name, (python, root)) in enumerate(pools.items()):
                (Path(tmp) / f"pool{i}").mkdir()
                pool_env = {**daemon_env, "PYTHONPATH": str(root)}
                started[name] = start_pool(Path(tmp) / f"pool{i}", pool_env, python, gpus=1)
            local = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}
            threads = {k: v for k, v in local.items() if k != "OMP_NUM_THREADS"}
            for r in range(args.rounds):
                modes = {
                    "local, 1 thread": ([sys.executable, "-c", CHILD, "cpu", *child], local),
                    "local, all cores": ([sys.executable, "-c", CHILD, "cpu", *child], threads),
                }
                for name, (python, root) in pools.items():
                    cmd = [python, "-m", "gpupool.cli", "run", "--cuda", "--", python, "-c", CHILD, "cuda", *child]
                    modes[name] = (cmd, {**env, **started[name][1], "PYTHONPATH": str(root)})
                for mode, (cmd, e) in modes.items():
                    pool = started[mode][0].pid if mode in started else 0
                    before = zygote_children_cpu(pool) if pool else 0.0
                    results.setdefault(mode, []).append(run(cmd, e))
                    if pool:  # the session's worker, once the zygote reaped it
                        time.sleep(2.0)
                        workers.setdefault(mode, []).append(zygote_children_cpu(pool) - before)
                    print(f"round {r} {mode}: {results[mode][-1][0]:.3f} s", file=sys.stderr)
        finally:
            for proc, _ in started.values():
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)
    base = statistics.median(w for w, _, _ in results["local, 1 thread"])
    ref = results["local, 1 thread"][0][2]
    load1 = os.getloadavg()[0]
    print(
        f"time_sequence_prediction twin: float64, N=12, L={args.length}, one LBFGS step of {args.max_iter} "
        f"closures (the first untimed); medians of {args.rounds}; load {load0[0]:.2f} -> {load1:.2f}"
    )
    print(f"{'mode':<18} {'wall s':>8} {'vs local 1 thread':>18} {'client CPU s':>13} {'worker CPU s':>13} "
          f"{'max rel. loss diff':>19}")  # fmt: skip
    for mode, rs in results.items():
        wall = statistics.median(w for w, _, _ in rs)
        cpu = statistics.median(c for _, c, _ in rs)
        diff = max(abs(a - b) / abs(b) for a, b in zip(rs[0][2], ref, strict=True))
        worker = f"{statistics.median(workers[mode]):>13.3f}" if mode in workers else f"{'-':>13}"
        print(f"{mode:<18} {wall:>8.3f} {wall / base:>17.2f}x {cpu:>13.3f} {worker} {diff:>19.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
