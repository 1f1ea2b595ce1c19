"""Serve the trained sentiment CNN for inference: classify reviews on cpu, cuda or gpupool.

    python examples/sentiment/infer.py --model runs/sentiment "A wonderful, moving film." "Dull and far too long."
    cat reviews.txt | gpupool run -n 1 -p 0.25 -- python examples/sentiment/infer.py --device gpupool --json

Texts come from the arguments, else one per line on stdin; they are classified in batches. The output is one
line per text: the label (pos/neg), the probability of "pos", and the text (or a JSON object with --json).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `examples.sentiment` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.sentiment import checkpoint, data
from examples.sentiment.model import PAD_ID, UNK_ID, SentimentCNN
from examples.sentiment.runtime import DEVICES, resolve_device, setup_logging

log = logging.getLogger("sentiment.infer")


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str  # "pos" | "neg"
    p_pos: float


class Classifier:
    """A loaded checkpoint that turns texts into predictions on one device."""

    def __init__(self, model: SentimentCNN, vocab: list[str], max_len: int, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.index = {w: i for i, w in enumerate(vocab)}
        self.max_len = max_len
        self.device = device

    @classmethod
    def load(cls, out_dir: Path, device: torch.device) -> Classifier:
        model, config, vocab = checkpoint.load(out_dir)
        return cls(model, vocab, config.max_len, device)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(B, L) int64 token ids, padded; an empty text becomes a single unknown word."""
        rows = [data.encode(data.tokenize(t), self.index)[: self.max_len] for t in texts]
        width = max(1, *(len(r) for r in rows))
        out = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
        for i, r in enumerate(rows):
            if len(r):
                out[i, : len(r)] = torch.from_numpy(r.astype("int64"))
            else:
                out[i, 0] = UNK_ID
        return out

    @torch.no_grad()
    def predict(self, texts: list[str]) -> list[Prediction]:
        if not texts:
            return []
        probs = torch.softmax(self.model(self.encode(texts).to(self.device)), dim=1)[:, 1].cpu().tolist()
        return [Prediction(t, "pos" if p >= 0.5 else "neg", p) for t, p in zip(texts, probs, strict=True)]


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for line in lines:
        if line.strip():
            batch.append(line.rstrip("\r\n"))  # a file saved on Windows ends its lines in \r\n
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("texts", nargs="*", help="texts to classify (default: one per line on stdin)")
    p.add_argument("--model", type=Path, default=Path("runs/sentiment"), help="checkpoint directory from train.py")
    p.add_argument("--device", default="cpu", help=f"one of {', '.join(DEVICES)} (default cpu)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    if not (args.model / "model.pt").is_file():
        log.error("no trained model in %s (run examples/sentiment/train.py --out %s first)", args.model, args.model)
        return 2
    try:
        clf = Classifier.load(args.model, resolve_device(args.device))
    except checkpoint.BadCheckpoint as exc:
        log.error("%s", exc)
        return 2
    for batch in _chunks(args.texts if args.texts else sys.stdin, args.batch_size):
        for pred in clf.predict(batch):
            if args.json:
                print(json.dumps({"label": pred.label, "p_pos": round(pred.p_pos, 6), "text": pred.text}))
            else:
                print(f"{pred.label}\t{pred.p_pos:.4f}\t{pred.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
