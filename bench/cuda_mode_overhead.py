"""What `--cuda` costs: per torch call (the default), and per training step against a daemon (`--training`).

Per call: the same calls with and without the mapping (client/cuda/devices.py's wrappers, installed and taken out
again), alternating rounds in one process, medians (no daemon: the mapping runs on the client before any op leaves).

    python bench/cuda_mode_overhead.py [--calls 20000] [--rounds 7]

Prints µs per call for a few kinds of call and the added cost; compare with the ~200 µs end-to-end cost of
an eager gpupool op (BENCHMARKS.md) to see its share.

Per step (`--training`): launch_bound.py's tiny MLP (32-64-64-2, batch 16, Adam, cross-entropy) written as a CUDA
script (`model.cuda()`, `x.cuda()`, `.item()` once a block), trained five ways, each in a fresh worker on core 0 with
the daemon (`gpupool serve`, one fake GPU, one torch thread) on core 1: `local` (CPU, the script's `cpu` branch),
`shim` (the Python client, `device="gpupool"`), `shim-cuda` (the Python client under `--cuda`'s mapping: the script's
`cuda` branch), `native` and `native-cuda` (the same on the C++ client, `gpupool run --native-client [--cuda]`). Rounds
alternate the ways; ms/step is the best median block, "paired" the median over rounds of each run over the local runs
around it (launch_bound.py's). `--callgrind` counts instructions instead (the figure of record): each way's worker
under callgrind, instrumentation on around 2 blocks of --steps steps after 4 warm-up steps, instructions a step;
with `--against DIR --against-python PY` each way runs in that checkout too (its own bench script and gpupool, the
same daemon), side by side with this tree's.

    nice -n 10 python bench/cuda_mode_overhead.py --training --rounds 3
    python bench/cuda_mode_overhead.py --training --callgrind --steps 10
    python bench/cuda_mode_overhead.py --training --callgrind --steps 10 --against /work/wt/base \
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

WAYS = ("local", "shim", "shim-cuda", "native", "native-cuda")


def per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def per_call_table(args: argparse.Namespace) -> None:
    from gpupool.client.cuda import devices

    torch.set_num_threads(1)
    x, y = torch.ones(4), torch.ones(4)
    lin = torch.nn.Linear(4, 4)
    cases: dict[str, Callable[[], object]] = {
        "x + y": lambda: x + y,
        "torch.zeros(4, device='cpu')": lambda: torch.zeros(4, device="cpu"),
        "x.to('cpu')": lambda: x.to("cpu"),
        "x.is_cuda": lambda: x.is_cuda,
        "Linear(4, 4)(x)": lambda: lin(x),
    }
    print(f"{'call':32} {'plain µs':>9} {'--cuda µs':>9} {'added µs':>9} {'ratio':>6}")
    for name, fn in cases.items():
        plain, mapped = [], []
        for _ in range(args.rounds):
            plain.append(per_call(fn, args.calls))
            devices.install()
            try:
                mapped.append(per_call(fn, args.calls))
            finally:
                devices.uninstall()
        p, m = statistics.median(plain), statistics.median(mapped)
        print(f"{name:32} {p:9.2f} {m:9.2f} {m - p:9.2f} {m / p:6.2f}")


# ---- --training: a CUDA-written tiny MLP, step by step against a daemon ----


def train_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One way's run (in its own process: the shim and the C++ client cannot share PrivateUse1)."""
    from torch import nn

    torch.set_num_threads(1)
    way = args.way
    if way.startswith("native"):  # gpupool run --native-client: the C++ client owns the device ($GPUPOOL_CLIENT)
        from gpupool.client import native

        native.enable()
        native.attach(args.address, args.token)
    elif way.startswith("shim"):
        import gpupool.torch as gt

        gt.attach(args.address, args.token)
    if way.endswith("cuda"):  # gpupool run --cuda: the mapping, as torch's entry point installs it
        from gpupool.client import cuda

        cuda.enable()
    cuda_script = torch.cuda.is_available()  # what a CUDA script asks: True under the mapping only
    assert cuda_script == way.endswith("cuda"), (way, cuda_script)
    device = "cuda" if cuda_script else ("cpu" if way == "local" else "gpupool")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    model = model.cuda() if cuda_script else model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = [(torch.randn(16, 32, generator=gen), torch.randint(0, 2, (16,), generator=gen)) for _ in range(4)]

    def step(i: int) -> torch.Tensor:
        x, y = data[i % 4]
        x, y = (x.cuda(), y.cuda()) if cuda_script else (x.to(device), y.to(device))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for i in range(args.warmup):
        step(i).item()
    blocks, cpu = [], 0.0
    if args.callgrind:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from cgtools import instrumented

        with instrumented():
            for _ in range(2):
                for i in range(args.steps):
                    loss = step(i)
                loss.item()
        return {"way": way, "steps": 2 * args.steps, "device": str(loss.device)}
    for _ in range(args.blocks):
        c0, t = time.process_time(), time.perf_counter()
        for i in range(args.steps):
            loss = step(i)
        loss.item()  # one sync per block
        blocks.append((time.perf_counter() - t) / args.steps)
        cpu += time.process_time() - c0
    return {"way": way, "step_s": statistics.median(blocks), "client_cpu_s": cpu / (args.blocks * args.steps),
            "device": str(loss.device)}  # fmt: skip


def _run_way(
    way: str, args: argparse.Namespace, remote: dict[str, Any], out_file: Path | None, other: bool = False
) -> dict[str, Any]:
    """One way's worker: this tree's, or (`other`) the --against checkout's bench script under its own python."""
    python, script = (args.against_python, str(Path(args.against) / "bench" / Path(__file__).name)) if other else (
        sys.executable, __file__)  # fmt: skip
    cmd = [python, script, "--worker", "--way", way, "--steps", str(args.steps), "--blocks",
           str(args.blocks), "--warmup", str(args.warmup)]  # fmt: skip
    if way != "local":
        cmd += ["--address", remote["address"], "--token", remote["token"]]
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "OMP_NUM_THREADS": "1"}
    for k in ("GPUPOOL_CUDA", "GPUPOOL_LEASE", "GPUPOOL_CLIENT"):
        env.pop(k, None)
    if way.startswith("native"):
        env["GPUPOOL_CLIENT"] = "native"  # `import gpupool.torch` (the mapping's) is then the C++ client's API
    if out_file is not None:
        import cgtools

        cmd = [*cgtools.valgrind(out_file), *cmd, "--callgrind"]
    else:
        cmd = ["taskset", "-c", str(args.client_core), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=Path(script).parent)
    if done.returncode != 0:
        raise RuntimeError(f"{way} failed:\n{done.stderr[-3000:]}")
    result = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    if out_file is not None:
        totals = [ln for ln in out_file.read_text().splitlines() if ln.startswith(("totals:", "summary:"))]
        result["instr_per_step"] = int(totals[-1].split()[1]) / result["steps"]
    return result


def training_table(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from launch_bound import paired_ratios
    from train_overhead import bench_daemons

    ways = args.ways.split(",")
    load0 = os.getloadavg()[0]
    with bench_daemons(args.daemon_core) as daemons, tempfile.TemporaryDirectory() as tmp:
        if args.callgrind:
            if args.against:
                print(f"{'way':12} {'this tree':>13} {'--against':>13} {'ratio':>6}  (instructions a step)")
            for way in ways:
                r = _run_way(way, args, daemons.remote(), Path(tmp) / f"{way}.cg")
                if not args.against:
                    print(f"{way:12} {r['instr_per_step'] / 1e3:12,.1f}k instructions a step  ({r['device']})")
                    continue
                o = _run_way(way, args, daemons.remote(), Path(tmp) / f"{way}.other.cg", other=True)
                mine, theirs = r["instr_per_step"], o["instr_per_step"]
                print(f"{way:12} {mine / 1e3:12,.1f}k {theirs / 1e3:12,.1f}k {mine / theirs:6.3f}  ({r['device']})")
            print(f"load average (1 min): {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
            return
        results: dict[str, list[dict[str, Any]]] = {w: [] for w in ways}
        order: list[tuple[str, dict[str, Any]]] = []
        for _ in range(args.rounds):
            for way in ways:
                r = _run_way(way, args, daemons.remote(), None)
                results[way].append(r)
                order.append((way, r))
        if "local" in ways:
            order.append(("local", _run_way("local", args, daemons.remote(), None)))
        paired = {w: statistics.median(v) for w, v in paired_ratios(order).items()}
    local = min(r["step_s"] for r in results["local"]) if "local" in ways else 0.0
    print(f"{'way':12} {'ms/step':>8} {'x local':>8} {'paired':>7} {'client CPU ms':>14}  device")
    for way in ways:
        best = min(results[way], key=lambda r: r["step_s"])
        ratio = f"{best['step_s'] / local:8.2f}" if local else f"{'':8}"
        pair = f"{paired[way]:7.2f}" if way in paired else f"{'':7}"
        cpu = best["client_cpu_s"] * 1e3
        print(f"{way:12} {best['step_s'] * 1e3:8.3f} {ratio} {pair} {cpu:14.3f}  {best['device']}")
    print(f"load average (1 min): {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (--training: 3 is plenty)")
    parser.add_argument("--training", action="store_true", help="step time of a CUDA-written tiny MLP, five ways")
    parser.add_argument("--ways", default=",".join(WAYS), help="--training: comma-separated, local first")
    parser.add_argument("--callgrind", action="store_true", help="--training: instructions a step, under callgrind")
    parser.add_argument("--steps", type=int, default=20, help="--training: steps a block")
    parser.add_argument("--blocks", type=int, default=5, help="--training: timed blocks (the median counts)")
    parser.add_argument("--warmup", type=int, default=6, help="--training: untimed steps first")
    parser.add_argument("--daemon-core", type=int, default=1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cgtools

    cgtools.add_against_flags(parser, "--training --callgrind: another checkout, each way run there too", measure=False)
    parser.add_argument("--client-core", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--way", default="local", help=argparse.SUPPRESS)
    parser.add_argument("--address", default="", help=argparse.SUPPRESS)
    parser.add_argument("--token", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(train_worker(args)))
    elif args.training:
        if args.against and not args.callgrind:
            parser.error("--against needs --callgrind (instructions are the figure of record)")
        training_table(args)
    else:
        per_call_table(args)


if __name__ == "__main__":
    main()
