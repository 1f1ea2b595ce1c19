"""The C++ client spike (spike/native_client.cpp) against a real daemon: the tiny MLP trained through a session.

The spike's wire mode writes the daemon's compact eager records (docs/wire.md, "Compact eager ops"), uploads and
frees as `ClientFrame.commands` bytes in C++, and hands the buffer to client/session.py's Session once per frame (32
commands, or a sync: `.item()` flushes and reads the value in the same round trip). Views get a handle of their own per
geometry (an `as_strided` record from their storage's handle). Only the tiny MLP's op set is sent; any other op is an
error naming it.

    .venv/bin/python bench/native_client_daemon.py --steps 20            # losses: spike vs local CPU eager
    nice -n 10 .venv/bin/python bench/native_client_daemon.py --time --rounds 5 --steps 50
    .venv/bin/python bench/native_client_daemon.py --callgrind --steps 10  # instructions of the whole client

The driver starts `gpupool serve --fake-gpus 1` on loopback with TLS (bench/train_overhead.py's bench_daemons) and
runs the worker in a child process (TORCH_DEVICE_BACKEND_AUTOLOAD=0: the spike must own PrivateUse1); `--callgrind`
runs that child under valgrind with the instrumentation on around the measured steps only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> dict[str, Any]:
    if os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD") != "0":
        raise SystemExit("the worker needs TORCH_DEVICE_BACKEND_AUTOLOAD=0 (the spike must own PrivateUse1)")
    import torch

    sys.path.insert(0, str(ROOT / "spike"))
    import native_client as nc
    from gpupool.client.session import Session

    torch.set_num_threads(1)
    nc.load()
    nc.claim()
    session = Session.attach(args.address, args.token, timeout=120.0)  # 120 s: under valgrind
    nc.connect(session, nc.TINY_MLP_OPS if args.model == "tiny-mlp" else nc.TINY_MLP_OPS + nc.ENCODER_OPS)
    dev = nc.device()
    sys.path.insert(0, str(ROOT / "bench"))
    from launch_bound import workload
    from native_client_spike import instrumented

    base, data, loss_fn = workload(args.model)
    if args.model == "encoder" and not args.dropout:
        base.eval()  # no dropout: the daemon's random numbers are not the CPU's (the weights still train)
    local = copy.deepcopy(base)
    remote = copy.deepcopy(base).to(dev)
    ways = {"local": (local, torch.device("cpu")), "spike": (remote, dev)}
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, (m, _) in ways.items()}

    def step(way: str, i: int) -> Any:
        model, d = ways[way]
        opt = opts[way]
        x, y = data[i % 4]
        opt.zero_grad()
        loss = loss_fn(model(x.to(d)), y.to(d))
        loss.backward()
        opt.step()
        return loss

    out: dict[str, Any] = {}
    if args.callgrind:
        # as client_ab.py --measure instr counts the Python shim: 4 warm-up steps, then 2 blocks of --steps steps,
        # each ended by one .item() (the frame goes out and the value comes back)
        for i in range(4):
            step(args.callgrind, i).item()
        ops0 = nc.stats()["op_records"]
        with instrumented():
            for _ in range(2):
                for i in range(args.steps):
                    loss = step(args.callgrind, i)
                loss.item()
        out["op_records"] = nc.stats()["op_records"] - ops0
        out["steps"] = 2 * args.steps
    elif args.time:
        times: dict[str, list[float]] = {"local": [], "spike": []}
        cpu: dict[str, list[float]] = {"local": [], "spike": []}
        for i in range(3):
            for way in times:
                step(way, i).item()
        for _ in range(args.rounds):
            for way in times:
                t, c = time.perf_counter(), time.process_time()
                for i in range(args.steps):
                    loss = step(way, i)
                loss.item()  # one sync per block, as launch_bound.py's eager mode
                times[way].append((time.perf_counter() - t) / args.steps)
                cpu[way].append((time.process_time() - c) / args.steps)  # this process, all its threads (gRPC's)
        out["step_us"] = {w: {"best": min(v) * 1e6, "median": statistics.median(v) * 1e6} for w, v in times.items()}
        out["client_cpu_us"] = {w: {"best": min(v) * 1e6, "median": statistics.median(v) * 1e6} for w, v in cpu.items()}
    else:
        out["local"] = [step("local", i).item() for i in range(args.steps)]
        out["spike"] = [step("spike", i).item() for i in range(args.steps)]
        diffs = {
            name: (p.detach().cpu() - q.detach()).abs().max().item()
            for (name, p), q in zip(remote.named_parameters(), local.parameters(), strict=True)
        }
        out["max_param_diff"] = max(diffs.values())
        out["worst_param"] = max(diffs, key=lambda k: diffs[k])
        out["param_diffs"] = diffs
        try:  # a failure on the daemon (a target out of range: only the kernel sees values) comes back at the sync
            model, d = ways["spike"]
            x, _ = data[0]
            loss_fn(model(x.to(d)), torch.full((x.shape[0],), 99).to(d)).item()
            out["daemon_error"] = ""
        except Exception as exc:  # noqa: BLE001 (reported, whatever its type)
            out["daemon_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        out["after_error"] = step("spike", 0).item()  # the session goes on
        try:
            torch.sin(next(remote.parameters()))
            out["outside_error"] = ""
        except RuntimeError as exc:
            out["outside_error"] = str(exc).splitlines()[0]
    torch.ops.spike_client.flush()
    out["stats"] = nc.stats()
    out["wire"] = nc.wire_stats()
    session.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", choices=("tiny-mlp", "encoder"), default="tiny-mlp",
                   help="launch_bound.py's workload (the encoder in eval mode: no dropout)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=5, help="--time: blocks of --steps steps per way")
    p.add_argument("--dropout", action="store_true", help="the encoder in train mode (its losses then differ: the "
                   "daemon's random numbers), as client_ab.py runs the shim: for --callgrind and --time")  # fmt: skip
    p.add_argument("--time", action="store_true", help="step times, local and spike interleaved in one process")
    p.add_argument("--callgrind", nargs="?", const="spike", choices=("spike", "local"), default=None,
                   help="under callgrind: instrumentation on around 2 x --steps steps of one way")  # fmt: skip
    p.add_argument("--callgrind-out", default="", help="keep callgrind's file here (for callgrind_annotate)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--token", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    sys.path.insert(0, str(ROOT / "bench"))
    from train_overhead import bench_daemons

    with bench_daemons(1) as daemons, tempfile.TemporaryDirectory() as tmp:
        remote = daemons.remote()
        cmd = [sys.executable, __file__, "--worker", "--address", remote["address"], "--token", remote["token"],
               "--steps", str(args.steps), "--rounds", str(args.rounds), "--model", args.model]  # fmt: skip
        if args.dropout:
            cmd.append("--dropout")
        if args.time:  # the client on core 0, the daemon on core 1, as launch_bound.py runs them
            cmd = ["taskset", "-c", "0", *cmd, "--time"]
        if args.callgrind:
            out_file = Path(args.callgrind_out or Path(tmp) / "cg.out")
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}",
                   *cmd, "--callgrind", args.callgrind]  # fmt: skip
        env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if args.callgrind:
            totals = [ln for ln in out_file.read_text().splitlines() if ln.startswith(("totals:", "summary:"))]
            instr = int(totals[-1].split()[1])
            result["instructions"] = instr
            result["per_step"] = instr / result["steps"]
            shim_ops = 44 if args.model == "tiny-mlp" else 340  # the Python shim's commands per step
            result["per_shim_op"] = instr / result["steps"] / shim_ops
            result["per_record"] = instr / max(1, result["op_records"])
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
