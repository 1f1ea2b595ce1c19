"""The exploratory runs behind the README's "What was tried" (CPU only, one thread): variants of the fine-tuning
recipe and of the task, each on the same draws as `transfer.py` (seeds 100 + r) and the same pretrained network.

    python examples/transfer/ablations.py --variants scratch,proto,ft0,ft:200:1e-3:1e-2:0:10
    python examples/transfer/ablations.py --novel-noise 0.3          # the novel task in a noisy domain
    python examples/transfer/ablations.py --flips --pretrain-steps 1200 --variants proto,ft0

Variants: ``scratch`` (200 steps, lr 2e-3, as transfer.py), ``proto`` (imprinted cosine head, no training),
``ft0`` (transfer.py's fine-tune: from proto, every layer, 100 steps at 3e-4) and
``ft:STEPS:LR_BODY:LR_HEAD:ALPHA:SCALE`` (from proto with cosine scale SCALE, Adam with one rate for the features
and one for the head, plus ALPHA * squared distance of the features to the pretrained ones: L2-SP).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.transfer.digits import (
    CosineHead,
    DigitsCNN,
    Images,
    accuracy,
    few_shot_split,
    fit,
    load_digits,
    shift,
    task,
    with_rotations,
)

CPU = torch.device("cpu")


def fit_l2sp(model: DigitsCNN, data: Images, steps: int, lr_body: float, lr_head: float, alpha: float) -> None:
    """Shifted batches as `fit`, two learning rates, and the L2-SP pull of the features toward their start."""
    gen = torch.Generator().manual_seed(0)
    body, head = list(model.features.parameters()), list(model.head.parameters())
    anchor = [p.detach().clone() for p in body]
    opt = torch.optim.Adam([{"params": body, "lr": lr_body}, {"params": head, "lr": lr_head}])
    model.train()
    for _ in range(steps):
        rows = torch.randperm(len(data), generator=gen)[: min(64, len(data))]
        loss = nn.functional.cross_entropy(model(shift(data.x[rows], gen)), data.y[rows])
        if alpha:
            loss = loss + alpha * sum(((p - a) ** 2).sum() for p, a in zip(body, anchor, strict=True))
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="scratch,proto,ft0")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--flips", action="store_true", help="pretrain on 48 classes: 4 rotations x mirrored or not")
    p.add_argument("--novel-noise", type=float, default=0.0, help="Gaussian noise (std) added to every novel image")
    args = p.parse_args()
    torch.set_num_threads(1)
    variants = args.variants.split(",")
    images, labels = load_digits()
    base = task(images, labels, (0, 1, 2, 3, 4, 5))
    train, test = few_shot_split(base, shots=int(0.8 * min(torch.bincount(base.y)).item()), seed=0)
    train, test = with_rotations(train), with_rotations(test)
    if args.flips:
        flip = lambda d: Images(torch.cat([d.x, torch.flip(d.x, dims=(3,))]), torch.cat([d.y, d.y + 24]),  # noqa: E731
                                tuple(range(48)))  # fmt: skip
        train, test = flip(train), flip(test)
    classes = len(train.digits)
    torch.manual_seed(0)
    pre = DigitsCNN(classes, 32)
    fit(pre, train, CPU, args.pretrain_steps, lr=2e-3, seed=0, augment=True)
    print(f"pretrained {args.pretrain_steps} steps on {classes} classes: {100 * accuracy(pre, test, CPU):.1f}%")
    state = pre.state_dict()
    novel = task(images, labels, (6, 7, 8, 9))
    if args.novel_noise:
        gen = torch.Generator().manual_seed(7)
        novel.x = (novel.x + args.novel_noise * torch.randn(novel.x.shape, generator=gen)).clamp(0, 1)

    def pretrained(few: Images, scale: float = 10.0) -> DigitsCNN:
        m = DigitsCNN(classes, 32)
        m.load_state_dict(state)
        m.head = CosineHead.imprint(m.features, few, CPU)
        m.head.scale = scale
        return m

    res: dict[tuple[int, str], list[float]] = {}
    for shots in (1, 2, 3):
        for r in range(args.repeats):
            few, rest = few_shot_split(novel, shots, seed=100 + r)
            for v in variants:
                if v == "scratch":
                    torch.manual_seed(1)
                    m = DigitsCNN(4, 32)
                    fit(m, few, CPU, 200, lr=2e-3, seed=0, augment=True)
                elif v == "proto":
                    m = pretrained(few)
                elif v == "ft0":
                    m = pretrained(few)
                    fit(m, few, CPU, 100, lr=3e-4, seed=0, augment=True)
                else:
                    _, steps, lr_body, lr_head, alpha, scale = v.split(":")
                    m = pretrained(few, float(scale))
                    fit_l2sp(m, few, int(steps), float(lr_body), float(lr_head), float(alpha))
                res.setdefault((shots, v), []).append(accuracy(m, rest, CPU))
            print(shots, r, {v: round(100 * res[(shots, v)][-1], 1) for v in variants}, flush=True)
    print("variant (1, 2, 3 shots: mean +- std %)")
    for v in variants:
        accs = [res[(s, v)] for s in (1, 2, 3)]
        cells = (f"{100 * statistics.fmean(a):.1f}+-{100 * statistics.stdev(a):.1f}" for a in accs)
        print(v.ljust(28), "  ".join(cells))


if __name__ == "__main__":
    main()
