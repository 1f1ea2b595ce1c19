"""The sentiment CNN's training step through the pool, eager against captured, side by side in one process:
examples/sentiment/train.py's own step (make_train_step: the model, Adam, LazyAdam, the EMA of the weights) on
real aclImdb batches, one model per mode, the modes taking turns on every batch.

    nice python bench/sentiment_capture.py                                  # ~15 min at load 15
    nice python bench/sentiment_capture.py --steps 40 --client shim --modes eager-lazy,captured-lazy

Modes: eager-lazy (train.py's default until round 49: LazyAdam, a dense EMA of the weights), eager-dense
(--embedding-update dense), captured-dense (torch's Adam over the whole tables under --capture: what train.py
--capture ran until round 49), captured-lazy (LazyAdam on the rows a batch reads, padded to a fixed count, under
capture), and the two -ema modes: the same with the EMA of the tables moved only on the rows a batch reads
(WeightAverage(lazy_tables=...): train.py's default and its --capture since round 49). Each step is timed to its
loss's `.item()` (one sync a step). The table: the median step of each mode over the steps where every captured mode
replayed (no recording), its ratio to eager-lazy, the mean over all steps (recordings included: a short run pays
them), the daemon ops a step (the Python client only: eager ops sent, or the graph's op count; the C++ client does
not count), the bytes its arguments carry, and for the captured modes the graphs defined, the calls that recorded
and the median time of a recorded call.

With --separate each mode runs in a process of its own (one model's ~0.6-2.3 GB in memory at a time, not all of
them: this box has ~23 GB for 8 engineers), --rounds times, alternating; a step's time is the median over its runs.

A pool (`gpupool up`, one fake GPU, loopback, TLS) is started here and each child runs under `gpupool run -n 1 -p 1`
(--client native: `gpupool run`'s default C++ client; shim: the Python client). --data: the aclImdb tarball (default:
../shared/data/aclImdb_v1.tar.gz, else the repository's 5,000-review sample); --limit reviews of it, balanced.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("eager-lazy", "eager-dense", "captured-dense", "captured-lazy", "eager-lazy-ema", "captured-lazy-ema")


def _default_data() -> Path:
    shared = ROOT.parent / "shared" / "data" / "aclImdb_v1.tar.gz"
    for p in (shared, Path("/work/shared/data/aclImdb_v1.tar.gz")):
        if p.exists():
            return p
    return ROOT / "examples" / "sentiment" / "sample" / "aclImdb_sample.tar.xz"


def child(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from examples.sentiment import data, train
    from examples.sentiment.checkpoint import ModelConfig
    from examples.sentiment.lazy import LazyAdam
    from examples.sentiment.runtime import resolve_device

    torch.set_num_threads(1)
    device = resolve_device("gpupool")
    client = "native" if os.environ.get("GPUPOOL_CLIENT") == "native" else "shim"
    ds = data.load_dataset(Path(args.data), Path(args.cache_dir), 100_000)
    rng = np.random.default_rng(args.seed)
    split = data.balanced_subset(ds.train, args.limit, rng)
    config = ModelConfig(vocab_size=len(ds.vocab), embed_dim=128, filters=256, kernel_sizes=(3,), dropout=0.5,
                         max_len=800, embed_std=0.1, bigram_buckets=args.bigram_buckets, trigram_buckets=0,
                         embed_dropout=0.5)  # fmt: skip
    modes = args.modes.split(",")
    runs: dict[str, dict[str, Any]] = {}
    for m in modes:
        torch.manual_seed(args.seed)
        model = config.build().to(device)
        capture, lazy_update, lazy_ema = m.startswith("captured"), "-lazy" in m, m.endswith("-ema")
        lr: float | torch.Tensor = torch.tensor(1e-3, device=device) if capture else 1e-3
        lazy = LazyAdam(model.embedding_tables(), capturable=capture) if lazy_update else None
        tables = {id(p) for p in model.embedding_tables()} if lazy is not None else set()
        opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in tables], lr=lr, capturable=capture)
        still = model.embedding_tables() if lazy_ema else None
        average = train.WeightAverage(model, 0.998, lazy_tables=still, capturable=capture)
        step = train.make_train_step(model, opt, average, capture, lazy)
        model.train()
        runs[m] = {"model": model, "step": step, "lazy": lazy_update, "capture": capture, "times": [], "replay": [],
                   "ops": [], "arg_bytes": [], "recorded": []}  # fmt: skip
    rt = None
    if client == "shim":
        from gpupool.client.torch import runtime

        rt = runtime.get(device.index or 0)
    batches = list(data.batches(split, 50, 800, rng=rng))[: args.steps]
    for i, (tokens, labels) in enumerate(batches):
        order = modes if i % 2 == 0 else modes[::-1]
        for m in order:
            r = runs[m]
            captured = getattr(r["step"], "captured", r["step"]) if r["capture"] else None
            before = dict(captured.stats) if captured is not None else {}
            sent = rt.ops_sent if rt is not None else 0
            t0 = time.perf_counter()
            sparse = r["model"].sparse_batch(tokens, fixed=r["capture"]) if r["lazy"] else None
            arg_bytes = tokens.nbytes + labels.nbytes + sum(x.nbytes for x in (sparse.tensors() if sparse else []))
            sparse_d = sparse.to(device) if sparse is not None else None
            x, y = tokens.to(device), labels.to(device)
            loss, _ = r["step"](x, y) if sparse_d is None else r["step"](x, y, sparse_d)
            value = loss.item()
            r["times"].append(time.perf_counter() - t0)
            r["arg_bytes"].append(arg_bytes)
            replayed = captured is not None and captured.stats["replayed"] > before["replayed"]
            r["replay"].append(replayed)
            if captured is not None and captured.stats["recorded"] > before["recorded"]:
                r["recorded"].append(r["times"][-1])
            if rt is not None:
                if replayed and captured is not None:
                    r["ops"].append(list(captured.graphs.values())[-1].ops)  # the most recently used graph
                else:
                    r["ops"].append(rt.ops_sent - sent)
            if not np.isfinite(value):
                raise SystemExit(f"{m}: loss {value} at step {i}")
    replayed_steps = [i for i in range(len(batches)) if all(runs[m]["replay"][i] for m in modes if runs[m]["capture"])]
    out: dict[str, Any] = {"client": client, "steps": len(batches), "replayed_steps": len(replayed_steps),
                           "shapes": len({tuple(t.shape) for t, _ in batches}), "modes": {}}  # fmt: skip
    for m in modes:
        r = runs[m]
        steady = [r["times"][i] for i in replayed_steps] or r["times"]
        ops = [r["ops"][i] for i in replayed_steps] if r["ops"] else []
        entry = {"median_s": statistics.median(steady), "mean_all_s": statistics.mean(r["times"]),
                 "ops": statistics.median(ops) if ops else None, "arg_bytes": statistics.median(r["arg_bytes"]),
                 "times": r["times"], "replay": r["replay"]}  # fmt: skip
        if r["capture"]:
            captured = getattr(r["step"], "captured", r["step"])
            entry["stats"] = dict(captured.stats)
            entry["recorded_s"] = statistics.median(r["recorded"]) if r["recorded"] else None
            if rt is not None and captured.graphs:
                g = max(captured.graphs.values(), key=lambda g: g.graph_id)
                names: dict[str, int] = {}
                for op in g.built.ops:
                    names[op.name] = names.get(op.name, 0) + 1
                entry["last_graph_ops"] = dict(sorted(names.items(), key=lambda kv: -kv[1]))
        out["modes"][m] = entry
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, eager-lazy first: " + ",".join(MODES))
    p.add_argument("--steps", type=int, default=30, help="batches of 50 reviews, each trained by every mode")
    p.add_argument("--limit", type=int, default=2000, help="training reviews drawn (balanced)")
    p.add_argument("--bigram-buckets", type=int, default=262144, help="the bigram table's rows (train.py: 2^20)")
    p.add_argument("--client", choices=("native", "shim"), default="native")
    p.add_argument("--data", default=str(_default_data()))
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "gpupool" / "sentiment"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ops-detail", action="store_true", help="print the last graph's op histogram (shim client)")
    p.add_argument(
        "--separate", action="store_true",
        help="each mode in its own process (one model in memory at a time), the modes alternating over --rounds",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, default=1, help="runs of each mode (--separate: alternating order)")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from user_path import client_env, up

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sentiment-capture-") as d:
        tmp = Path(d)
        proc, pool = up([sys.executable, "-m", "gpupool.cli"], tmp, cwd=ROOT)
        env = client_env(pool, ROOT)
        client = ("--native-client",) if args.client == "native" else ("--client", "shim")
        modes = args.modes.split(",")
        groups = [[m] for m in modes] if args.separate else [modes]
        outs: list[dict[str, Any]] = []
        try:
            for r in range(args.rounds):
                for group in groups if r % 2 == 0 else groups[::-1]:
                    cmd = [sys.executable, "-m", "gpupool.cli", "run", "-n", "1", "-p", "1", *client, "--",
                           sys.executable, __file__, "--child", "--modes", ",".join(group), "--steps",
                           str(args.steps), "--limit", str(args.limit), "--bigram-buckets", str(args.bigram_buckets),
                           "--data", args.data, "--cache-dir", args.cache_dir, "--seed", str(args.seed)]  # fmt: skip
                    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
                    if done.returncode != 0:
                        raise SystemExit(f"child {group}: exit {done.returncode}\n{done.stderr[-4000:]}")
                    outs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(f"  round {r + 1} {','.join(group)} done", file=sys.stderr, flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    load1 = os.getloadavg()
    # Each mode's time at each step: the median over its runs (rounds); the steady steps: those where every
    # captured mode replayed in its first run (the same batches and shapes in every run: the same pattern).
    got: dict[str, dict[str, Any]] = {}
    for o in outs:
        for m, e in o["modes"].items():
            got.setdefault(m, {**e, "runs": []})["runs"].append(e["times"])
    first = outs[0]
    steps = first["steps"]
    steady = [i for i in range(steps) if all(got[m]["replay"][i] for m in modes if "stats" in got[m])]
    for e in got.values():
        per_step = [statistics.median(run[i] for run in e["runs"]) for i in range(steps)]
        e["median_s"] = statistics.median([per_step[i] for i in steady] or per_step)
        e["mean_all_s"] = statistics.mean(per_step)
    base = got[modes[0]]["median_s"]
    print(f"sentiment CNN step, {first['client']} client, {steps} batches of 50 ({first['shapes']} shapes), "
          f"2^{args.bigram_buckets.bit_length() - 1} bigram buckets, {args.rounds} round(s)"
          f"{', each mode its own process' if args.separate else ''}, medians over the {len(steady)} steps every "
          f"captured mode replayed; load {load0[0]:.1f} -> {load1[0]:.1f}")  # fmt: skip
    print(f"{'mode':18} {'median s':>9} {'x ' + modes[0]:>14} {'mean s (all)':>13} {'ops/step':>9} "
          f"{'arg KB':>8}  graphs / recorded (median s a recorded call)")  # fmt: skip
    for m in modes:
        e = got[m]
        st = e.get("stats")
        rec = e.get("recorded_s")
        extra = f"{st['defined']} / {st['recorded']}" + (f" ({rec:.3f})" if rec else "") if st else ""
        ops = f"{e['ops']:.0f}" if e["ops"] is not None else "-"
        print(f"{m:18} {e['median_s']:9.3f} {e['median_s'] / base:14.2f} {e['mean_all_s']:13.3f} {ops:>9} "
              f"{e['arg_bytes'] / 1024:8.0f}  {extra}")  # fmt: skip
    if args.ops_detail:
        for m in modes:
            if "last_graph_ops" in got[m]:
                print(f"{m}: {got[m]['last_graph_ops']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
