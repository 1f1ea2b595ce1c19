"""Launch-bound training: what per-op overhead costs small models, eager and with step capture.

On a real GPU the kernels of small models take microseconds, so a pooled GPU is as fast as its per-op overhead
lets it be. Five workloads, each trained with Adam: a tiny MLP (32-64-64-2, batch 16), a tiny transformer
encoder classifier (d 32, 2 layers, 4 heads, batch 4 x 16 tokens), the stock-prediction MLP (500-1024-512-256-
128-1, batch 256), the sentiment CNN of examples/sentiment (benchmark size, batch 50 x 400 tokens) and issue 8's
transformer classifier (`classifier`: d 64, 2 layers, batch 32 x 48 tokens; not in the default set) and the encoder
without dropout (`encoder-nodrop`, not in the default set: its attention takes the fused op on gpupool, round 21;
`GPUPOOL_FUSED_SDPA=0` in the environment keeps torch's math path, the before), and the sentiment CNN at batch
400 (`cnn-big`, not in the default set: GPU-bound on a real GPU, where a worker's slices overlap its kernels,
round 31, server/devices.py `SliceTimer`). Three
ways: local CPU eager (the baseline: one torch thread, on the daemon's core), through a daemon eagerly, and
through a daemon with `gpupool.torch.capture` (Adam with capturable=True and a device lr, as capture needs; with
`--adam fused`, Adam(fused=True) in every mode, a device lr when captured: torch's one fused kernel for the update,
local CPU included, so that local runs the same optimizer); a fourth,
`native` (not in the default set), runs eagerly through the C++ client of `gpupool run --native-client`
(gpupool.client.native) against the same daemon: its ops/step are its op records (and the Python fallback's ops);
a fifth, `native-captured` (not in the default set either), is the C++ client with `gpupool.torch.capture`
(client/native/capture.py; Adam as `captured`'s): its ops/step are the graph's, its commands the RunGraphs and what
else the step sent.

Each measurement is a fresh worker process pinned to a core (`taskset`), the daemon (`gpupool serve`, one fake GPU, one
torch thread) on another. A block of steps is timed with one sync at its end (throughput: the client may run ahead of
the daemon within a block, as a training loop that logs every N steps does); the median block counts, and local / eager
/ captured runs alternate for a few rounds (a last local run closes them), best of each counting. Columns: ms/step,
ratio to local (best over best), "paired" (the median over rounds of each run's step over the mean of the local runs
just before and after it: the box drifts between minutes, and neighbours share the drift, so this is the figure to quote
on a shared box), aten ops per step (eager: the ops sent; captured: the graph's ops, which capturable Adam makes more,
fused Adam fewer; each row's per-op columns divide by its own count), commands sent per step, client CPU per op and the
daemon's CPU per op: front, zygote and the session's worker together (everything above the kernels on a fake GPU is
overhead; the kernels are included). "core-1 CPU" is the CPU time per step of what runs on the daemon's core: the local
process, or the whole daemon (front and worker); its ratio is what the wall-clock ratio becomes on a quiet box whenever
the daemon's core is the bottleneck, and it moves much less with the load of a shared box than wall-clock times do. The
load average at the start and end is printed with the table: on a shared box, compare ratios from one run only.

    nice python bench/launch_bound.py                       # ~3-5 min
    python bench/launch_bound.py --models tiny-mlp,encoder --steps 40
    python bench/launch_bound.py --models tiny-mlp --modes local,eager --rounds 5 --against /work/main
    nice python bench/launch_bound.py --models tiny-mlp,encoder --modes local,eager,native,captured,native-captured
    nice python bench/launch_bound.py --models tiny-mlp,encoder,classifier --modes local,eager,native --rounds 3
    nice python bench/launch_bound.py --models tiny-mlp --modes local,captured --rounds 3 --adam fused
    python bench/launch_bound.py --gpu --models cnn-big,mlp --modes local,eager --against . \
        --against-env GPUPOOL_RUN_AHEAD=0     # a real GPU: slices run ahead vs every slice waiting (round 31)

`--against DIR` runs a second daemon from another checkout (its `.venv/bin/python`, or `--against-python`) beside
this tree's, on the same core, and every remote run once against each, alternating which goes first (rows
`eager@base`, ...): the same client against both daemons, then the medians over rounds of both and their ratios.
With `--against-client` as well, the @base runs' client is DIR's too (its python imports its checkout's client):
the A/B of a client change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from train_overhead import _proc_cpu, add_worker_flags, bench_daemons, run_worker, stock_mlp

ROOT = Path(__file__).resolve().parent.parent
SEED = 1234  # every worker's torch.manual_seed once its model is on its device
MODELS = ("tiny-mlp", "encoder", "mlp", "cnn", "classifier", "encoder-nodrop", "cnn-big")
MODES = ("local", "eager", "captured", "native", "native-captured")


class Encoder(nn.Module):
    def __init__(self, d: int = 32, vocab: int = 100, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=2 * d, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def workload(name: str) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], Any]:
    """(model, 4 CPU batches, loss_fn)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "tiny-mlp":
        model: nn.Module = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
        data = [(torch.randn(16, 32, generator=gen), torch.randint(0, 2, (16,), generator=gen)) for _ in range(4)]
        return model, data, nn.functional.cross_entropy
    if name in ("encoder", "encoder-nodrop"):  # -nodrop: dropout 0, so attention takes the fused op on gpupool
        data = [(torch.randint(0, 100, (4, 16), generator=gen), torch.randint(0, 2, (4,), generator=gen))
                for _ in range(4)]  # fmt: skip
        return Encoder(dropout=0.1 if name == "encoder" else 0.0), data, nn.functional.cross_entropy
    if name == "classifier":  # issue 8's transformer classifier: d_model 64, 2 layers, batch 32 x 48 tokens
        data = [(torch.randint(0, 1000, (32, 48), generator=gen), torch.randint(0, 2, (32,), generator=gen))
                for _ in range(4)]  # fmt: skip
        return Encoder(64, 1000), data, nn.functional.cross_entropy
    if name == "mlp":
        data = [(torch.randn(256, 500, generator=gen), torch.randn(256, 1, generator=gen)) for _ in range(4)]
        return stock_mlp(), data, nn.functional.mse_loss
    sys.path.insert(0, str(ROOT))
    from examples.sentiment.model import build_model, make_batch

    # cnn-big: batch 400, 8x the benchmark's, GPU-bound on a real GPU (round 31: CPU and GPU overlap across slices)
    batch = 400 if name == "cnn-big" else 50
    data = [make_batch(batch_size=batch, seq_len=400, vocab_size=30000, seed=i) for i in range(4)]
    return build_model(30000), data, nn.functional.cross_entropy


ADAMS = ("capturable", "fused", "fused-captured")


def adam(model: nn.Module, device: torch.device, captured: bool, kind: str = "capturable") -> torch.optim.Adam:
    """The run's Adam (lr 1e-3). `capturable` (the default): a captured step's Adam(capturable=True) with a device
    lr, torch's default Adam (foreach) elsewhere. `fused`: Adam(fused=True) in every mode, with a device lr when
    captured (a float lr would be baked into the graph): torch's fused kernel, one op for the whole update.
    `fused-captured`: fused when captured, torch's default Adam in the other modes (the default's baseline)."""
    lr: Any = torch.tensor(1e-3, device=device) if captured else 1e-3
    if kind == "fused" or (kind == "fused-captured" and captured):
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    if captured:
        return torch.optim.Adam(model.parameters(), lr=lr, capturable=True)
    return torch.optim.Adam(model.parameters(), lr=lr)


def training_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Any) -> Any:
    """The workloads' step: forward, loss, backward, the optimizer; returns the loss (what capture replays)."""

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


# ---- worker: one measurement in its own pinned process ----


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants alive now: the daemon's front, its zygote and the
    session workers that run the kernels (a worker's time is not the daemon's until it is reaped)."""
    total = 0.0
    try:
        total = _proc_cpu(pid)
        for task in os.listdir(f"/proc/{pid}/task"):
            for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                total += _tree_cpu(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    model, data, loss_fn = workload(args.model)
    rt = None
    step_obj: Any = None
    native: Any = None
    if args.mode == "local":
        device = torch.device("cuda" if args.gpu else "cpu")
    elif args.mode in ("native", "native-captured"):  # the C++ client (gpupool run --native-client's), same daemon
        from gpupool.client import native as nc
        from gpupool.client.native import backend

        native = backend

        nc.enable()
        nc.attach(args.address, args.token)
        device = torch.device("gpupool", 0)
    else:
        from gpupool.client.torch import runtime

        import gpupool.torch as gt

        device = gt.attach(args.address, args.token)
        rt = runtime.get(device.index)
    model = model.to(device)
    # Every mode's random stream from one seed, set on the device that draws (torch.manual_seed reaches a gpupool
    # session's generator): dropout models' captured and eager runs through the same daemon then draw the same masks,
    # and their losses must agree (`print_losses`).
    torch.manual_seed(SEED)
    captured = args.mode in ("captured", "native-captured")
    opt = adam(model, device, captured, args.adam)
    step = training_step(model, opt, loss_fn)

    def eager(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # the batch is uploaded in the loop in every mode
        return step(x.to(device), y.to(device))

    run: Any = eager
    if args.mode == "captured":
        import gpupool.torch as gt

        run = step_obj = gt.capture(step)  # CPU batches are uploaded by the captured step, in the RunGraph's frame
    elif args.mode == "native-captured":
        from gpupool.client.native.capture import capture

        run = step_obj = capture(step)  # CPU batches go by value in the RunGraph

    losses = [float(run(*data[i % 4]).item()) for i in range(args.warmup)]  # the same start in every mode

    def ops_sent() -> int:
        if native is not None:  # the C++ encoder's op records and the Python fallback's ops (and the RunGraphs)
            replays = step_obj.stats["replayed"] if step_obj is not None else 0
            return int(native.stats()["op_records"]) + sum(native.PYTHON_STATS.values()) + replays
        return rt.ops_sent if rt else 0

    blocks, cpu, daemon_cpu, sent = [], 0.0, 0.0, 0
    for _ in range(args.blocks):
        ops0 = ops_sent()
        d0 = _tree_cpu(args.daemon_pid) if args.daemon_pid else 0.0
        c0 = time.process_time()
        t = time.perf_counter()
        loss = None
        for i in range(args.steps):
            loss = run(*data[i % 4])
        assert loss is not None
        loss.item()  # one sync per block: every step of it has run
        blocks.append((time.perf_counter() - t) / args.steps)
        cpu += time.process_time() - c0
        daemon_cpu += (_tree_cpu(args.daemon_pid) - d0) if args.daemon_pid else 0.0
        sent += ops_sent() - ops0
    n = args.blocks * args.steps
    out = {
        "step_s": statistics.median(blocks),
        "commands_per_step": sent / n,
        "client_cpu_per_step_s": cpu / n,
        "daemon_cpu_per_step_s": daemon_cpu / n,
        "losses": losses,
    }
    if native is not None:  # ops the C++ encoder could not send, per step: 0 means every op was a C++ record
        out["python_fallback_per_step"] = sum(native.PYTHON_STATS.values()) / max(1, args.warmup + n)
    if step_obj is not None:
        out["graph_ops"] = max((g.ops for g in step_obj.graphs.values()), default=0)
        out["stats"] = step_obj.stats
    return out


def steady_for_callgrind(mode: str) -> None:
    """For captured runs under callgrind (bench/client_ab.py, bench/daemon_ab.py), so that the client's counts are
    those of the native run and repeat:
    - replays travel several to a frame while they come faster than one per millisecond (capture.HOLD_STEPS,
      HOLD_MAX_STEPS, HOLD_SECONDS), as a tiny model's do natively; slowed ~50x by valgrind they would go one to
      a frame, sent by the hold timer, as the timing fell. No timer here: frames of 4, 8, 16, ... steps as
      they come natively, the rest of a block sent by its sync;
    - a thread waiting for a reply wakes every 0.1 s to look for signals (grpc._common.wait): over the seconds a
      valgrind-slowed daemon takes to answer a block's sync, that polling would be counted as the client's work.
    The eager mode keeps both (its figures stay comparable with earlier rounds'); `native-captured` (the C++ client's
    frames go every 4 replays, no timer) the second only."""
    if mode == "native-captured":
        import grpc._common

        grpc._common.MAXIMUM_WAIT_TIMEOUT = 3600.0  # type: ignore[attr-defined]
    if mode == "captured":
        import importlib

        import grpc._common

        # the module: `from gpupool.client.torch import capture` is the function, and an attribute set on it
        # changed nothing (before round 19 a valgrind-slowed client sent its steps one to a frame, by the timer)
        capture = importlib.import_module("gpupool.client.torch.capture")
        setattr(capture, "HOLD_SECONDS", 3600.0)  # noqa: B010 - mypy reads the module import_module names
        grpc._common.MAXIMUM_WAIT_TIMEOUT = 3600.0  # type: ignore[attr-defined]


def worker_args(argv: list[str]) -> argparse.Namespace:
    """The arguments of one measurement's worker (what `_worker` passes), for scripts that run `worker` their way
    (bench/client_ab.py, bench/daemon_ab.py)."""
    p = argparse.ArgumentParser()
    add_worker_flags(p)
    for a in ("--model", "--mode"):
        p.add_argument(a)
    p.add_argument("--adam", default="capturable")
    p.add_argument("--gpu", action="store_true")
    for a in ("--steps", "--blocks", "--warmup"):
        p.add_argument(a, type=int)
    return p.parse_args(argv)


# ---- driver ----


def _worker(
    core: int, model: str, mode: str, args: argparse.Namespace, python: str = "", **remote: Any
) -> dict[str, Any]:
    argv = ["--model", model, "--mode", mode, "--steps", str(args.steps), "--blocks", str(args.blocks),
            "--warmup", str(args.warmup), "--adam", args.adam, *(["--gpu"] if args.gpu else [])]  # fmt: skip
    return run_worker(__file__, core, f"{model}/{mode}", argv, python, **remote)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS[:4]), help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES[:3]), help="comma-separated, local first: " + ",".join(MODES))
    p.add_argument("--steps", type=int, default=20, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks (the median counts)")
    p.add_argument("--warmup", type=int, default=6, help="untimed steps first (capture records in these)")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs: best of each, paired ratios")
    p.add_argument("--adam", choices=ADAMS, default="capturable", help="capturable: Adam(capturable=True) when "
                   "captured, torch's default Adam in the other modes; fused: Adam(fused=True) in every mode (a "
                   "device lr when captured), so that local runs the same optimizer; fused-captured: fused when "
                   "captured, the default Adam elsewhere")  # fmt: skip
    p.add_argument("--against", metavar="DIR", default="", help="also run every remote mode against DIR's daemon")
    p.add_argument("--against-python", default="", help="the python of --against (default: DIR/.venv/bin/python)")
    p.add_argument("--against-client", action="store_true", help="the @base runs' client is DIR's too (run by "
                   "its python: its checkout's client), for an A/B of a client change")  # fmt: skip
    p.add_argument("--against-env", action="append", default=[], metavar="KEY=VALUE", help="set for the --against "
                   "daemon alone (repeatable): `--against . --against-env GPUPOOL_RUN_AHEAD=0` is this tree with "
                   "every CUDA slice waiting for the GPU, as before round 31")  # fmt: skip
    p.add_argument("--gpu", action="store_true", help="on a host with a CUDA GPU: the daemons serve it (not a "
                   "fake GPU) and `local` runs on cuda:0, the baseline a pooled GPU is measured against")  # fmt: skip
    add_worker_flags(p)
    p.add_argument("--model", default="tiny-mlp", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="local", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    rows = []
    load0 = os.getloadavg()[0]
    against = None
    if args.against:
        against = (args.against, args.against_python or str(Path(args.against) / ".venv" / "bin" / "python"))
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu: torch sees no CUDA device on this host")
    against_env = dict(kv.split("=", 1) for kv in args.against_env)
    if against_env and not against:
        p.error("--against-env is for the --against daemon")
    with bench_daemons(args.daemon_core, against=against, real_gpu=args.gpu, against_env=against_env) as daemons:
        for model in args.models.split(","):
            modes = args.modes.split(",")
            if against:
                modes = [x for m in modes for x in ((m,) if m == "local" else (m, f"{m}@base"))]
            results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
            order: list[tuple[str, dict[str, Any]]] = []  # every run in the order it ran
            for k in range(args.rounds):
                for i, mode in enumerate(modes):
                    if against and k % 2 and mode != "local":  # odd rounds: the base daemon's run goes first
                        mode = modes[i + 1] if not mode.endswith("@base") else modes[i - 1]
                    if mode == "local":
                        r = _worker(args.daemon_core, model, mode, args)
                    else:
                        name, _, which = mode.partition("@")
                        py = against[1] if against and args.against_client and which else ""
                        r = _worker(args.client_core, model, name, args, py, **daemons.remote(which or "process"))
                    results[mode].append(r)
                    order.append((mode, r))
            if "local" in modes and args.rounds > 1:
                order.append(("local", _worker(args.daemon_core, model, "local", args)))  # brackets the last round
            best = {m: min(rs, key=lambda r: r["step_s"]) for m, rs in results.items()}
            for mode, ratios in paired_ratios(order).items():
                best[mode]["paired"] = statistics.median(ratios)
            rows.append((model, best))
            if against:
                print_against(model, results)
    print_table(rows, args)
    for model, best in rows:
        if "native" in best:
            print(f"{model} native: {best['native']['python_fallback_per_step']:.2f} ops a step through the Python "
                  "fallback (the rest are C++ records)")  # fmt: skip
    print_losses(rows)
    print(f"load average (1 min): {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    return 0


def print_losses(rows: list[tuple[str, dict[str, dict[str, Any]]]]) -> None:
    """The warm-up steps' losses of each remote mode against local's (the same weights, batches and seed): the
    largest relative difference. Dropout draws may differ between a local device and a daemon's session generator,
    so only the dropout-free workloads (tiny-mlp, mlp, encoder-nodrop) are expected to agree with local to rounding;
    a captured mode is also compared with its eager mode (captured with eager, native-captured with native): the same
    daemon and seed, so the same draws, dropout or not (what a CUDA graph's replay of random ops must keep)."""
    for model, best in rows:
        for mode, r in best.items():
            base = {"captured": "eager", "native-captured": "native"}.get(mode)
            if base in best:
                d = _largest_difference(r["losses"], best[base]["losses"])
                print(f"{model}: {mode} vs {base} (the same daemon and seed), largest relative loss difference over "
                      f"{len(r['losses'])} warm-up steps: {d:.1e}")  # fmt: skip
        if "local" not in best:
            continue
        ref = best["local"]["losses"]
        diffs = [f"{mode} {_largest_difference(r['losses'], ref):.1e}" for mode, r in best.items() if mode != "local"]
        print(f"{model}: largest relative loss difference from local over {len(ref)} warm-up steps: {', '.join(diffs)}")


def _largest_difference(losses: list[float], ref: list[float]) -> float:
    return max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref, strict=True)), default=0.0)


def paired_ratios(order: list[tuple[str, dict[str, Any]]]) -> dict[str, list[float]]:
    """Each remote run's step time over the local runs just before and after it (their mean; one when it is at
    an end): the box's speed drifts by tens of percent between minutes, and a ratio of neighbours cancels most
    of that drift, where best-of-each can pair a fast minute's local run with a slow minute's remote one."""
    out: dict[str, list[float]] = {}
    locals_at = [i for i, (mode, _) in enumerate(order) if mode == "local"]
    for i, (mode, r) in enumerate(order):
        if mode == "local" or not locals_at:
            continue
        before = [j for j in locals_at if j < i][-1:]
        after = [j for j in locals_at if j > i][:1]
        local = statistics.mean(order[j][1]["step_s"] for j in before + after)
        out.setdefault(mode, []).append(r["step_s"] / local)
    return out


def print_against(model: str, results: dict[str, list[dict[str, Any]]]) -> None:
    """This tree's daemon against --against's: medians over rounds of the step time and the daemon's CPU per
    step (CPU is steadier than wall time on a shared box), and this/base ratios."""
    for mode in results:
        base = results.get(f"{mode}@base")
        if mode == "local" or base is None:
            continue
        this = results[mode]
        ms = [statistics.median(r["step_s"] for r in rs) * 1e3 for rs in (this, base)]
        cpu = [statistics.median(r["daemon_cpu_per_step_s"] for r in rs) * 1e3 for rs in (this, base)]
        ops = max(this[0]["commands_per_step"], 1.0)
        print(f"{model} {mode}: this {ms[0]:.3f} ms/step, base {ms[1]:.3f} ({ms[0] / ms[1]:.3f}); daemon CPU "
              f"this {cpu[0] / ops * 1e3:.1f} us/op, base {cpu[1] / ops * 1e3:.1f} ({cpu[0] / cpu[1]:.3f}); "
              f"medians of {len(this)} runs each")  # fmt: skip


def print_table(rows: list[tuple[str, dict[str, dict[str, Any]]]], args: argparse.Namespace) -> None:
    table = Table(title=f"launch-bound training (median of {args.blocks} blocks of {args.steps} steps, best of "
                        f"{args.rounds} rounds, 1 torch thread each; daemon on core {args.daemon_core}, client on "
                        f"core {args.client_core}; paired: median over rounds of each run / the local runs beside "
                        f"it)")  # fmt: skip
    cols = ("model", "mode", "ms/step", "ratio", "paired", "ops/step", "commands/step", "client us/op",
            "daemon us/op", "core-1 CPU ms/step", "CPU ratio")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    for model, best in rows:
        local = best["local"]["step_s"] if "local" in best else float("nan")
        local_cpu = best["local"]["client_cpu_per_step_s"] if "local" in best else float("nan")
        for mode in best:
            r = best[mode]
            remote = mode != "local"
            # Per op of its own mode: eager sends one command per aten op; a captured step runs its graph's ops
            # (capturable Adam's ops, more than the default Adam's), so each row divides by its own count.
            if mode.partition("@")[0] in ("captured", "native-captured"):
                ops = r.get("graph_ops") or 1
            else:
                ops = (r["commands_per_step"] if remote else 1) or 1
            core1 = r["daemon_cpu_per_step_s"] if remote else r["client_cpu_per_step_s"]
            table.add_row(
                model,
                mode,
                f"{r['step_s'] * 1e3:.3f}",
                f"{r['step_s'] / local:.2f}",
                f"{r['paired']:.2f}" if "paired" in r else "",
                f"{ops:.0f}" if remote else "",
                f"{r['commands_per_step']:.1f}" if remote else "",
                f"{r['client_cpu_per_step_s'] / ops * 1e6:.1f}" if remote else "",
                f"{r['daemon_cpu_per_step_s'] / ops * 1e6:.1f}" if remote else "",
                f"{core1 * 1e3:.3f}",
                f"{core1 / local_cpu:.2f}",
            )
    Console(width=160).print(table)


if __name__ == "__main__":
    sys.exit(main())
