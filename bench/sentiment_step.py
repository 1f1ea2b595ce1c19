"""Cost of one training step of sentiment CNN configurations, side by side (local CPU, one thread).

    nice python bench/sentiment_step.py [--steps 5] [--threads 1]

One step = forward, backward and a foreach Adam step on a batch of 50 reviews of 256 tokens. Prints seconds per
step and the ratio to the benchmark model with torch's dense Adam over all its weights, measured in the same run,
interleaved. "lazy" rows use train.py's default update: LazyAdam on the embedding rows the batch reads (lazy.py),
the host-side row plan included in the step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.sentiment.lazy import LazyAdam  # noqa: E402
from examples.sentiment.model import BENCHMARK, SentimentCNN  # noqa: E402

CONFIGS = {
    "benchmark (regions 3, embed 128)": {},
    "benchmark, lazy embedding update": {"lazy": True},
    "regions 3,5, embed 128": {"kernel_sizes": (3, 5)},
    "regions 3, embed 64": {"embed_dim": 64},
    "regions 3, embed 128, no bigrams": {"bigram_buckets": 0},
}


def step_seconds(overrides: dict, steps: int) -> float:
    torch.manual_seed(0)
    overrides = dict(overrides)
    use_lazy = overrides.pop("lazy", False)
    model = SentimentCNN(30000, **{**BENCHMARK, **overrides})
    tables = {id(p) for p in model.embedding_tables()} if use_lazy else set()
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in tables], 1e-3, foreach=True)
    lazy = LazyAdam(model.embedding_tables()) if use_lazy else None
    x, y = torch.randint(2, 30000, (50, 256)), torch.randint(0, 2, (50,))
    times = []
    for _ in range(steps + 1):  # the first step allocates the optimizer state: not timed
        t0 = time.perf_counter()
        sparse = model.sparse_batch(x) if lazy is not None else None
        loss = torch.nn.functional.cross_entropy(model(x, sparse), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if lazy is not None and sparse is not None:
            lazy.step(sparse, 1e-3)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, overrides in CONFIGS.items():
            results[name].append(step_seconds(overrides, args.steps))
    base = statistics.median(results[next(iter(CONFIGS))])
    print(f"{'configuration':36} {'s/step':>8} {'x benchmark':>12}")
    for name, ts in results.items():
        print(f"{name:36} {statistics.median(ts):8.3f} {statistics.median(ts) / base:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
