"""Training overhead of the gpupool device: step time through a daemon / local step time, eager mode.

Two workloads of issue 4: the stock-prediction MLP (500 -> 1024 -> 512 -> 256 -> 128 -> 1, ReLU, Adam,
batch 256) and the sentiment CNN of examples/sentiment at its benchmark size (vocabulary 30,000,
embedding 128, 256 filters of width 3, batch 50 of 400 tokens, Adam). Each step moves its batch to the
device, runs forward, backward and the optimizer, and reads the loss back (`.item()`, a sync point, as
a training loop that logs its loss does).

Placement, so that the comparison is fair on a small machine: the daemon (`gpupool serve`, one fake
GPU) runs on one core, the client on another (`taskset`), each with one torch thread; the local
baseline runs on the daemon's core, i.e. on the same compute the daemon gets. Every measurement is a
fresh worker process. Columns: steps/s local and remote, the ratio (goal <= 1.3), ops per step, client
CPU per op (all client threads: dispatch, meta cache, protobuf, gRPC) and per step, and the daemon's
CPU per step (its decode/dispatch overhead on top of the kernels). Local and remote runs alternate for
a few rounds and the best median of each side counts, to keep other load on a shared machine out of
the ratio.

    nice python bench/train_overhead.py                    # ~1-2 min
    python bench/train_overhead.py --steps 20 --models mlp
    nice python bench/train_overhead.py --isolation-cost   # --isolation thread vs process, same run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from gpupool import pki, tokens

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("mlp", "cnn")


# ---- workloads ----


def stock_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(500, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(),
        nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 1),
    )  # fmt: skip


def workload(name: str) -> tuple[nn.Module, Any, Any]:
    """(model, make_batch(step) -> CPU tensors, loss_fn)."""
    torch.manual_seed(0)
    if name == "mlp":
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(256, 500, generator=gen), torch.randn(256, 1, generator=gen)) for _ in range(4)]
        return stock_mlp(), lambda i: batches[i % 4], nn.functional.mse_loss
    sys.path.insert(0, str(ROOT))
    from examples.sentiment.model import build_model, make_batch

    cnn_batches = [make_batch(batch_size=50, seq_len=400, vocab_size=30000, seed=i) for i in range(4)]
    return build_model(30000), lambda i: cnn_batches[i % 4], nn.functional.cross_entropy


# ---- worker: one measurement in its own (pinned) process ----


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    model, batch, loss_fn = workload(args.model)
    rt = None
    if args.address:
        from gpupool.client.torch import runtime

        import gpupool.torch as gt

        device = gt.attach(args.address, args.token)
        rt = runtime.get(device.index)
    else:
        device = torch.device("cpu")
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(i: int) -> float:
        x, y = batch(i)
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.item())

    for i in range(args.warmup):
        step(i)
    ops0 = rt.ops_sent if rt else 0
    daemon0 = _proc_cpu(args.daemon_pid) if args.daemon_pid else 0.0
    cpu0 = time.process_time()
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0
    ops = (rt.ops_sent - ops0) / args.steps if rt else 0
    daemon_cpu = (_proc_cpu(args.daemon_pid) - daemon0) / args.steps if args.daemon_pid else 0.0
    return {
        "step_s": statistics.median(times),
        "min_step_s": min(times),
        "ops_per_step": ops,
        "client_cpu_per_step_s": cpu / args.steps,
        "daemon_cpu_per_step_s": daemon_cpu,
    }


# ---- driver ----


def start_daemon(
    core: int,
    key_file: Path,
    isolation: str = "process",
    python: str = sys.executable,
    cwd: str | None = None,
    real_gpu: bool = False,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """`gpupool serve` pinned to `core`: one fake GPU, or with `real_gpu` the host's CUDA devices (device 0 used);
    `env`: variables set for it alone."""
    fake = [] if real_gpu else ["--fake-gpus", "1", "--fake-gpu-memory", "16GiB"]
    cmd = ["taskset", "-c", str(core), python, "-m", "gpupool.cli", "serve", "--listen", "127.0.0.1:0",
           "--metrics-listen", "0", *fake,
           "--token-public-keys", str(key_file), "--host-id", "bench", "--isolation", isolation]  # fmt: skip
    cmd += os.environ.get("BENCH_DAEMON_FLAGS", "").split()  # e.g. "--bulk-listen 127.0.0.1:0": frames on the socket
    return start_listening(cmd, cwd, "gpupool serve", env)


def start_listening(
    cmd: list[str], cwd: str | None, what: str, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start a daemon (one torch thread) and wait for its "listening on HOST:PORT" line; its later output is
    drained by a thread. Returns the process and the address."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    assert proc.stdout is not None
    seen: list[str] = []  # its output before the line, for the error where it never comes
    for line in proc.stdout:
        m = re.search(r"listening on (\S+:\d+)", line)
        if m:
            threading.Thread(target=_drain, args=(proc,), daemon=True).start()
            return proc, m.group(1)
        seen = [*seen[-29:], line]
    raise RuntimeError(f"{what} did not start (exit {proc.wait()}):\n{''.join(seen)}")


def _drain(proc: subprocess.Popen[str]) -> None:
    """A daemon's output after its start: dropped, or appended to the file `$BENCH_DAEMON_LOG` names."""
    path = os.environ.get("BENCH_DAEMON_LOG", "")
    with open(path or os.devnull, "a") as log:
        for line in proc.stdout or ():
            log.write(line)
            log.flush()


@contextlib.contextmanager
def bench_daemons(
    core: int,
    isolations: Sequence[str] = ("process",),
    against: tuple[str, str] | None = None,
    real_gpu: bool = False,
    against_env: dict[str, str] | None = None,
    against_isolation: str = "process",
) -> Iterator[Daemons]:
    """A daemon per isolation mode on a fake GPU pinned to `core`, speaking TLS (a loopback PKI in a temporary
    directory); yields them with a function that mints a fresh one-hour token for device 0. Stops them after.
    `against` (a checkout's directory, its python): one more daemon of that checkout, under the name "base".
    `real_gpu`: the daemons serve the host's CUDA devices instead of a fake GPU. `against_env`: variables set for
    the "base" daemon alone (the same checkout as its own baseline: `GPUPOOL_RUN_AHEAD=0`); `against_isolation`:
    its isolation mode."""
    with tempfile.TemporaryDirectory() as tmp:
        key = secrets.token_hex(32).encode()  # a token seed; the daemons get its public key only
        key_file = Path(tmp) / "key.pub"
        key_file.write_bytes(tokens.public_pem(tokens.Signer.from_seed(key).public))
        os.environ.update(pki.loopback_env(Path(tmp) / "pki"))  # the daemons and the clients speak TLS
        daemons: dict[str, tuple[subprocess.Popen[str], str]] = {}

        def token() -> str:
            claims = tokens.TokenClaims(lease_id=uuid.uuid4().hex, host="bench", device=0, quota_bytes=0,
                                        share=1.0, expires_at=time.time() + 3600)  # fmt: skip
            return tokens.mint(key, claims)

        try:
            for mode in isolations:
                daemons[mode] = start_daemon(core, key_file, mode, real_gpu=real_gpu)
            if against is not None:
                daemons["base"] = start_daemon(
                    core,
                    key_file,
                    against_isolation,
                    python=against[1],
                    cwd=against[0],
                    real_gpu=real_gpu,
                    env=against_env,
                )
            yield Daemons(daemons, token, key_file)
        finally:
            for proc, _ in daemons.values():
                proc.terminate()
                proc.wait(timeout=30)


@dataclass
class Daemons:
    running: dict[str, tuple[subprocess.Popen[str], str]]  # isolation mode -> (process, address)
    token: Callable[[], str]
    key_file: Path  # the token key's public half (what a daemon started by hand is given)

    def remote(self, mode: str = "process") -> dict[str, Any]:
        """The worker flags that point it at the daemon of `mode` with a fresh token."""
        proc, address = self.running[mode]
        return {"address": address, "token": self.token(), "daemon_pid": proc.pid}


def run_worker(script: str, core: int, what: str, argv: list[str], python: str = "", **remote: Any) -> dict[str, Any]:
    """Run `script --worker ARGV` pinned to `core` (one torch thread) and return the JSON it prints last;
    `remote` becomes --flags (the daemon's address, a token, its pid). `python`: another checkout's interpreter
    (its .venv imports that checkout's client), for A/B runs of a client change; this one's by default."""
    cmd = ["taskset", "-c", str(core), python or sys.executable, script, "--worker", *argv]
    for k, v in remote.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {what} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """The cores of daemon and client, and the hidden flags `run_worker` passes to a worker."""
    p.add_argument("--daemon-core", type=int, default=1)
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--address", default="", help=argparse.SUPPRESS)
    p.add_argument("--token", default="", help=argparse.SUPPRESS)
    p.add_argument("--daemon-pid", type=int, default=0, help=argparse.SUPPRESS)


def _worker(core: int, model: str, args: argparse.Namespace, **remote: Any) -> dict[str, Any]:
    argv = ["--model", model, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return run_worker(__file__, core, model, argv, **remote)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: mlp,cnn")
    p.add_argument("--steps", type=int, default=30, help="timed steps (median step time)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (fills the meta cache)")
    p.add_argument("--rounds", type=int, default=3, help="alternating local/remote runs; the best of each counts")
    p.add_argument("--isolation-cost", action="store_true", help="step time with --isolation thread vs process")
    add_worker_flags(p)
    p.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.isolation_cost:
        return isolation_cost(args)

    rows = []
    with bench_daemons(args.daemon_core) as daemons:
        for model in args.models.split(","):
            # Rounds alternate local and remote runs; the best round of each side counts, so that
            # other load on a shared machine disturbs the ratio as little as possible.
            locals_, remotes = [], []
            for _ in range(args.rounds):
                locals_.append(_worker(args.daemon_core, model, args))
                remotes.append(_worker(args.client_core, model, args, **daemons.remote()))
            best = min(locals_, key=lambda r: r["step_s"]), min(remotes, key=lambda r: r["step_s"])
            rows.append((model, *best))
    print_table(rows, args)
    return 0


def isolation_cost(args: argparse.Namespace) -> int:
    """Local, in-thread daemon and process-isolated daemon, alternating; best round of each."""
    modes = ("thread", "process")
    table = Table(title=f"isolation cost: median of {args.steps} steps, best of {args.rounds} alternating rounds")
    for col in ("model", "local ms/step", "thread ms/step", "process ms/step", "process/thread", "process/local"):
        table.add_column(col, justify="right")
    with bench_daemons(args.daemon_core, modes) as daemons:
        for model in args.models.split(","):
            runs: dict[str, list[float]] = {"local": [], "thread": [], "process": []}
            for _ in range(args.rounds):
                runs["local"].append(_worker(args.daemon_core, model, args)["step_s"])
                for m in modes:
                    runs[m].append(_worker(args.client_core, model, args, **daemons.remote(m))["step_s"])
            local, thread, process = (min(runs[k]) for k in ("local", "thread", "process"))
            table.add_row(model, f"{local * 1e3:.2f}", f"{thread * 1e3:.2f}", f"{process * 1e3:.2f}",
                          f"{process / thread:.3f}", f"{process / local:.2f}")  # fmt: skip
    Console().print(table)
    return 0


def print_table(rows: list[tuple[str, dict[str, Any], dict[str, Any]]], args: argparse.Namespace) -> None:
    table = Table(title=f"gpupool training overhead (median of {args.steps} steps, best of {args.rounds} rounds, "
                        "1 torch thread each; "
                        f"daemon on core {args.daemon_core}, client on core {args.client_core})")  # fmt: skip
    for col in ("model", "local ms/step", "gpupool ms/step", "ratio", "ops/step", "client CPU us/op",
                "client CPU ms/step", "daemon CPU ms/step"):  # fmt: skip
        table.add_column(col, justify="right")
    for model, local, remote in rows:
        ops = remote["ops_per_step"] or 1
        table.add_row(
            model,
            f"{local['step_s'] * 1e3:.2f}",
            f"{remote['step_s'] * 1e3:.2f}",
            f"{remote['step_s'] / local['step_s']:.2f}",
            f"{remote['ops_per_step']:.0f}",
            f"{remote['client_cpu_per_step_s'] / ops * 1e6:.0f}",
            f"{remote['client_cpu_per_step_s'] * 1e3:.2f}",
            f"{remote['daemon_cpu_per_step_s'] * 1e3:.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
