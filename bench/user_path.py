"""Issue 8's first table the way a new user gets it: `gpupool up` (one fake GPU here) and then `gpupool run -n 1 -p 0.5
-- python script.py` with `gpupool run`'s default client (the C++ one), against the same script run locally with one
torch thread on the same box. No daemon driven by hand, no token minted here, no pinning: `gpupool up` makes its CA,
token keys and lease as for anyone, and the script is an ordinary training loop on `torch.device("gpupool")`.

The workloads are bench/launch_bound.py's (`workload`, `adam`, `training_step`: the same models, batches and Adam):
the tiny MLP (32-64-64-2, batch 16), the tiny transformer encoder (d 32, 2 layers, batch 4 x 16 tokens), issue 8's
transformer classifier (d_model 64, 2 layers, batch 32 x 48 tokens) and the stock MLP (500-1024-512-256-128-1,
batch 256). Modes: `local` (the script on the CPU, `torch.set_num_threads(1)`), `eager` (the script under `gpupool
run`, the default client), `shim` (`gpupool run --client shim`: the Python client) and `captured` (the default client,
the step wrapped in `gpupool.torch.capture`, Adam(capturable=True) with a device lr as capture needs).

The script (this file with `--child`) times blocks of --steps steps with one `.item()` at each block's end and prints
the median block's ms/step (the process start, the build check, the lease and the model's upload are outside it),
and the CPU per step over its blocks of the script's process and of the pool's whole process tree (`gpupool up`:
scheduler, daemon, its zygote and the session's worker; local: the script alone): the figure that moves least with
the load of a shared box, and what the wall-clock ratio becomes where one core is the bottleneck. Runs alternate over
--rounds rounds; the table has each mode's median ms/step and CPU ms/step over the rounds and their ratios to the
medians of the local runs in the same invocation. `--against DIR` starts a second pool from DIR's checkout
(`DIR/.venv/bin/gpupool up`, its scheduler and daemon) and runs every remote mode through DIR's `gpupool run` as well
(rows `mode@base`), alternating which goes first: this tree's pool and client against DIR's in one run. Both pools are
up for the whole run (each idle while the other is measured). The load average at the start and the end is printed:
on a shared box, compare ratios from one run only.

    cd bench && nice -n 5 ../.venv/bin/python user_path.py                                 # ~4 min
    nice -n 5 ../.venv/bin/python user_path.py --models tiny-mlp,encoder,classifier --rounds 3 --against /work/wt/base
    nice -n 5 ../.venv/bin/python user_path.py --models mlp --modes local,eager,captured --rounds 5
    python user_path.py --gpu --models tiny-mlp,encoder,classifier,mlp --modes local,eager,captured   # a real GPU
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
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
EXPORT_RE = re.compile(r"export (GPUPOOL_\w+)=(\S+)")
MODELS = ("tiny-mlp", "encoder", "classifier", "mlp")
MODES = {"local": None, "eager": (), "shim": ("--client", "shim"), "captured": ()}
POOL_PID_ENV = "USER_PATH_POOL_PID"  # the child's way to the pool's CPU (its process tree)
ISSUE = {"tiny-mlp": "46x", "encoder": "37x", "classifier": "4.7x"}  # issue 8's first table, eager x local


# ---- the user's script (`--child`): nothing of gpupool's but `gpupool.torch.capture` for `captured` ----


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from launch_bound import _tree_cpu, adam, training_step, workload

    torch.set_num_threads(1)
    model, data, loss_fn = workload(args.model)
    if args.device == "gpupool" and os.environ.get("GPUPOOL_CLIENT") == "shim":
        import gpupool.torch  # noqa: F401  (the Python client's device needs the import; the C++ one does not)
    device = torch.device(args.device)
    model = model.to(device)
    torch.manual_seed(1234)
    opt = adam(model, device, args.capture)
    step = training_step(model, opt, loss_fn)
    if args.capture:
        import gpupool.torch as gt

        run: Any = gt.capture(step)  # CPU batches: the captured step uploads them
    else:

        def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return step(x.to(device), y.to(device))

    for i in range(args.warmup):
        run(*data[i % 4]).item()
    pool = int(os.environ.get(POOL_PID_ENV) or 0)  # the driver's `gpupool up`: its scheduler and daemon
    blocks, cpu, pool_cpu = [], 0.0, 0.0
    for _ in range(args.blocks):
        p0 = _tree_cpu(pool) if pool else 0.0
        c0 = time.process_time()
        t = time.perf_counter()
        for i in range(args.steps):
            loss = run(*data[i % 4])
        loss.item()
        blocks.append((time.perf_counter() - t) / args.steps)
        cpu += time.process_time() - c0
        pool_cpu += (_tree_cpu(pool) - p0) if pool else 0.0
    n = args.blocks * args.steps
    client = ""
    if args.device == "gpupool":
        client = os.environ.get("GPUPOOL_CLIENT", "")
    return {"step_s": statistics.median(blocks), "cpu_s": (cpu + pool_cpu) / n, "pool_cpu_s": pool_cpu / n,
            "client": client, "loss": float(loss.item())}  # fmt: skip


# ---- the driver ----


def up(
    gpupool: list[str], tmp: Path, env: dict[str, str] | None = None, gpu: bool = False, cwd: Path | None = None
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """`gpupool up` (`gpupool`: the command that runs gpupool's CLI) with one fake GPU (`gpu`: the host's GPUs, its
    default where torch sees one) on free loopback ports, its state and log in `tmp`; returns it and the variables
    its "Use it:" lines export. bench/sentiment_clients.py's pool too."""
    log = tmp / "up.log"
    cmd = [*gpupool, "up", *([] if gpu else ["--fake-gpus", "1"]), "--scheduler-listen", "127.0.0.1:0", "--listen",
           "127.0.0.1:0", "--metrics-listen", "0", "--scheduler-metrics-listen", "0", "--state",
           str(tmp / "scheduler.db")]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd or tmp, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        got = dict(EXPORT_RE.findall(log.read_text()))
        if "GPUPOOL_SCHEDULER" in got:
            return proc, got
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{' '.join(gpupool)}: gpupool up did not come up:\n{log.read_text()[-4000:]}")


def client_env(pool: dict[str, str], root: Path) -> dict[str, str]:
    """The environment of a `gpupool run` against `up`'s pool (its exported variables): this process's, with `root`
    importable and no lease, client or CUDA choice of its own (bench/sentiment_clients.py, sentiment_capture.py)."""
    env = {**os.environ, **pool, "PYTHONPATH": str(root)}
    for k in ("GPUPOOL_LEASE", "GPUPOOL_CLIENT", "GPUPOOL_CUDA"):
        env.pop(k, None)
    return env


def measure(
    mode: str,
    model: str,
    checkout: Path,
    pool: tuple[subprocess.Popen[bytes], dict[str, str]],
    env: dict[str, str],
    args: Any,
) -> dict[str, Any]:
    """One run of the script: locally, or under `gpupool run` of `checkout` against `pool`; its JSON line."""
    python = str(checkout / ".venv" / "bin" / "python")
    script = [python, str(HERE), "--child", "--model", model, "--steps", str(args.steps), "--blocks",
              str(args.blocks), "--warmup", str(args.warmup)]  # fmt: skip
    if mode == "local":
        cmd = [*script, "--device", "cuda" if args.gpu else "cpu"]
    else:
        run = MODES[mode]
        assert run is not None
        cmd = [str(checkout / ".venv" / "bin" / "gpupool"), "run", "-n", "1", "-p", "0.5", *run, "--", *script,
               "--device", "gpupool", *(["--capture"] if mode == "captured" else [])]  # fmt: skip
    # cwd: a folder of neither checkout, so that each python imports its own checkout's gpupool
    run_env = {**env, **pool[1], POOL_PID_ENV: str(pool[0].pid)} if mode != "local" else env
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), env=run_env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{model}/{mode} ({checkout}): exit {done.returncode}\n{done.stderr[-4000:]}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    want = {"eager": "native", "captured": "native", "shim": "shim"}.get(mode, "")
    if want and out["client"] != want:  # the default client must be the C++ one: a fallback would be another table
        raise SystemExit(f"{model}/{mode}: `gpupool run` gave the {out['client'] or '?'} client, not {want}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS[:3]), help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--modes", default="local,eager", help="comma-separated, local first: " + ",".join(MODES))
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks (the median counts)")
    p.add_argument("--warmup", type=int, default=6, help="untimed steps first (capture records in these)")
    p.add_argument("--rounds", type=int, default=3, help="alternating runs; the median of each mode counts")
    p.add_argument("--against", metavar="DIR", default="", help="another checkout (with its .venv): its own pool "
                   "and `gpupool run` for every remote mode too (rows mode@base)")  # fmt: skip
    p.add_argument("--gpu", action="store_true", help="on a host with a CUDA GPU: `gpupool up` serves it (no fake "
                   "GPU) and `local` runs the script on cuda:0")  # fmt: skip
    p.add_argument("--daemon-threads", type=int, default=0, help="the daemon's torch threads (GPUPOOL_CPU_THREADS "
                   "for `gpupool up`; default 0: not set, the daemon's default as a user gets it)")  # fmt: skip
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="tiny-mlp", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    modes = args.modes.split(",")
    if modes[0] != "local" or any(m not in MODES for m in modes):
        p.error(f"--modes: local first, then any of {','.join(MODES)}")
    checkouts = {"": ROOT}
    if args.against:
        checkouts["@base"] = Path(args.against).resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_") and k != "PYTHONPATH"}
    if args.daemon_threads:
        env["GPUPOOL_CPU_THREADS"] = str(args.daemon_threads)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the pools on the way out
    load0 = os.getloadavg()[0]
    pools: dict[str, tuple[subprocess.Popen[bytes], dict[str, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="user-path-") as d:
        try:
            for tag, checkout in checkouts.items():
                (Path(d) / (tag or "this")).mkdir()
                pools[tag] = up([str(checkout / ".venv" / "bin" / "gpupool")], Path(d) / (tag or "this"), env, args.gpu)
            rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
            for model in args.models.split(","):
                runs = [(m, t) for m in modes for t in (("",) if m == "local" else checkouts)]
                got: dict[str, list[dict[str, Any]]] = {m + t: [] for m, t in runs}
                for r in range(args.rounds):
                    for m, t in runs if r % 2 == 0 else runs[::-1]:
                        pool = pools[t] if m != "local" else pools[""]
                        got[m + t].append(measure(m, model, checkouts[t], pool, env, args))
                        s, c = got[m + t][-1]["step_s"], got[m + t][-1]["cpu_s"]
                        print(f"  {model} round {r + 1} {m + t}: {s * 1e3:.2f} ms/step, CPU {c * 1e3:.2f} ms/step "
                              f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)  # fmt: skip
                rows[model] = got
        finally:
            for proc, _ in pools.values():
                proc.terminate()  # SIGTERM: SIGINT is ignored where this runs in a shell's background
                proc.wait(timeout=60)
    print(f"`gpupool up` + `gpupool run -n 1 -p 0.5` (default client unless shim), {args.rounds} rounds of "
          f"{args.blocks} blocks x {args.steps} steps; load {load0:.2f} -> {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'model':11} {'mode':14} {'ms/step (runs)':>26} {'median':>8} {'x local':>8} {'issue 8':>8} "
          f"{'CPU ms/step':>12} {'x local':>8}")  # fmt: skip
    keys = ("step_s", "cpu_s")
    med = {model: {k: {m: statistics.median(r[k] for r in rs) for m, rs in got.items()} for k in keys}
           for model, got in rows.items()}  # fmt: skip
    for model, got in rows.items():
        wall, cpu = med[model]["step_s"], med[model]["cpu_s"]
        for name, rs in got.items():
            issue = ISSUE.get(model, "") if name == "eager" else ""
            each = ", ".join(f"{r['step_s'] * 1e3:.2f}" for r in rs)
            print(f"{model:11} {name:14} {each:>26} {wall[name] * 1e3:8.2f} {wall[name] / wall['local']:8.2f} "
                  f"{issue:>8} {cpu[name] * 1e3:12.2f} {cpu[name] / cpu['local']:8.2f}")  # fmt: skip
        for m in modes[1:]:
            if m + "@base" in got:
                print(f"{model:11} {m + ' this/base':14} {'':>26} {wall[m] / wall[m + '@base']:8.3f} {'':>8} {'':>8} "
                      f"{'':>12} {cpu[m] / cpu[m + '@base']:8.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
