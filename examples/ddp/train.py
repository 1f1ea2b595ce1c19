"""Data-parallel training over pooled GPUs with an unmodified-style DDP script.

    gpupool up --fake-gpus 2                                    # elsewhere: the pool
    gpupool run -n 2 -- torchrun --nproc-per-node 2 examples/ddp/train.py --steps 5
    python examples/ddp/train.py --device cpu --steps 5         # the single-device reference

Every rank takes device LOCAL_RANK of the lease (which it sees as `gpupool:0`, like CUDA_VISIBLE_DEVICES),
joins the `gpupool` process group and wraps the sentiment CNN (examples/sentiment/model.py) in
DistributedDataParallel; gradients are averaged between the daemons. The data is synthetic token ids drawn
from a fixed seed, and each rank trains on its slice of the same global batch, so with plain SGD the
parameters after K steps equal a single-device run on the whole global batch (within float tolerance).
`--out FILE` saves rank 0's final parameters.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere in the checkout
from examples.sentiment.model import SentimentCNN  # noqa: E402

log = logging.getLogger("ddp-train")
VOCAB = 2000
LENGTH = 64


def build_model(seed: int) -> SentimentCNN:
    torch.manual_seed(seed)  # every rank starts from the same weights (DDP also broadcasts rank 0's)
    return SentimentCNN(VOCAB, embed_dim=32, filters=64, dropout=0.0, embed_dropout=0.0)


def batch(step: int, global_batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch of synthetic reviews (token ids with padding) and labels, identical on every rank."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    labels = torch.randint(0, 2, (global_batch,), generator=g)
    tokens = torch.randint(2, VOCAB, (global_batch, LENGTH), generator=g)
    tokens[:, : LENGTH // 2] += (labels[:, None] * 7) % (VOCAB - 2)  # a learnable signal
    tokens = tokens.clamp_max(VOCAB - 1)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (global_batch,), generator=g)
    tokens[torch.arange(LENGTH)[None, :] >= lengths[:, None]] = 0  # padding
    return tokens, labels


def train(
    device: torch.device, steps: int, global_batch: int, lr: float, seed: int, rank: int, world: int, warmup: int = 0
) -> torch.nn.Module:
    if global_batch % world:
        raise SystemExit(f"--global-batch {global_batch} must be a multiple of the world size {world}")
    model: torch.nn.Module = build_model(seed).to(device)
    if world > 1:
        model = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    local = global_batch // world
    start = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()  # the first steps pay one-time costs (meta caches, the group's setup)
        tokens, labels = batch(step, global_batch, seed)
        x = tokens[rank * local : (rank + 1) * local].to(device)
        y = labels[rank * local : (rank + 1) * local].to(device)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if rank == 0:
            log.info("step %d loss %.4f", step, loss.item())
    elapsed = time.perf_counter() - start
    if rank == 0:
        timed = steps - min(warmup, steps)
        log.info("%d steps, %.1f samples/s", steps, timed * global_batch / max(elapsed, 1e-9))
    return model.module if isinstance(model, DistributedDataParallel) else model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="gpupool", help="gpupool (rank i trains on lease device i, as gpupool:0) or cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0, help="steps left out of the samples/s figure")
    p.add_argument("--out", type=Path, help="save rank 0's final parameters (torch.save of a CPU state_dict)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "gpupool":
        import gpupool.torch  # noqa: F401 - registers the device and the `gpupool` process-group backend

        device = torch.device("gpupool", 0)  # a torchrun rank sees lease device LOCAL_RANK as gpupool:0
        backend = "gpupool"
    else:
        device, backend = torch.device(args.device), "gloo"
    if world > 1:
        dist.init_process_group(backend)
    model = train(device, args.steps, args.global_batch, args.lr, args.seed, rank, world, args.warmup)
    if rank == 0 and args.out:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, args.out)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
