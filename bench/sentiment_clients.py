"""The seed workload's step on each client, side by side: examples/sentiment/train.py as it ships (the MLPerf sentiment
CNN: 1M-bucket bigram table, LazyAdam on the embedding rows, EMA of the weights, dropout) run for one epoch of
--limit reviews, locally on the CPU, through `gpupool run --client shim` (the Python client) and through `gpupool run
--native-client` (the C++ client, `gpupool run`'s default since round 26), against one `gpupool up` pool (one fake
GPU, loopback, TLS) started here.

Each run is a fresh process; the figures are train.py's own epoch times (`train_s`, `test_s` in its config.json:
from the epoch's first batch to its last `.item()`, so the model's upload and the process start are outside them)
per batch. Modes alternate for --rounds rounds and the median of each counts; the ratios are to local's median in
the same run. The load average at the start and the end is printed with the table: on a shared box, compare ratios
from one run only.

    nice python bench/sentiment_clients.py                      # ~5 min
    nice python bench/sentiment_clients.py --limit 1000 --rounds 3
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
from pathlib import Path

from user_path import client_env, up

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "sentiment" / "sample" / "aclImdb_sample.tar.xz"
MODES = {"local": None, "shim": ("--client", "shim"), "native": ("--native-client",)}


def _run(mode: str, tmp: Path, env: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    out = tmp / mode
    script = [sys.executable, "examples/sentiment/train.py", "--epochs", "1", "--limit", str(args.limit),
              "--data", str(SAMPLE), "--cache-dir", str(tmp / "cache"), "--out", str(out), "--no-progress",
              "--log-every", "0", "--threads", str(args.threads)]  # fmt: skip
    run = MODES[mode]
    cmd = script if run is None else [sys.executable, "-m", "gpupool.cli", "run", "-n", "1", "-p", "0.5", *run,
                                      "--", *script, "--device", "gpupool"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{mode}: exit {done.returncode}\n{done.stderr[-4000:]}")
    (epoch,) = json.loads((out / "config.json").read_text())["results"]["history"]
    return epoch  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=500, help="train and test reviews (batches of 50; default 500)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="train.py's torch threads (default 1)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, local first: " + ",".join(MODES))
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    batches = -(-args.limit // 50)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sentiment-clients-") as d:
        tmp = Path(d)
        proc, pool = up([sys.executable, "-m", "gpupool.cli"], tmp, cwd=ROOT)
        env = client_env(pool, ROOT)
        try:
            _run(modes[0], tmp, env, args)  # tokenizes the sample into the cache: not timed
            got: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
            for r in range(args.rounds):
                for m in modes if r % 2 == 0 else modes[::-1]:
                    got[m].append(_run(m, tmp, env, args))
                    e = got[m][-1]
                    print(f"  round {r + 1} {m}: train {e['train_s']:.2f}s test {e['test_s']:.2f}s "
                          f"(loss {e['train_loss']:.6f})", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    load1 = os.getloadavg()
    med = {m: {k: statistics.median(e[k] for e in got[m]) / batches for k in ("train_s", "test_s")} for m in modes}
    base = med[modes[0]]
    print(f"train.py, {args.limit} reviews ({batches} batches of 50) train and test, {args.rounds} rounds, "
          f"--threads {args.threads}; load {load0[0]:.2f} -> {load1[0]:.2f}")  # fmt: skip
    print(f"{'mode':8} {'train ms/step':>14} {'x local':>8} {'test ms/batch':>14} {'x local':>8}")
    for m in modes:
        t, e = med[m]["train_s"], med[m]["test_s"]
        print(f"{m:8} {t * 1e3:14.1f} {t / base['train_s']:8.2f} {e * 1e3:14.1f} {e / base['test_s']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
