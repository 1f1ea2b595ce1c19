"""Build the small aclImdb subset that ships in the repository (examples/sentiment/sample/).

    python examples/sentiment/make_sample.py --data aclImdb_v1.tar.gz [--per-label 1250]

A seeded random, balanced choice of real reviews from each split (the same member names as the full tarball,
so data.py reads both alike), written as a reproducible .tar.xz (fixed order, mtimes and owners). It lets
`scripts/demo.sh` train on real reviews on a fresh clone without network; the benchmark needs the full set.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tarfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.sentiment` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.sentiment import data

HERE = Path(__file__).resolve().parent
NOTE = """The reviews in this archive are a random balanced subset ({n} per label and split) of the Large Movie
Review Dataset v1.0 (aclImdb), https://ai.stanford.edu/~amaas/data/sentiment/ (see ../README.md).
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the full aclImdb_v1.tar.gz")
    p.add_argument("--per-label", type=int, default=1250, help="reviews per label and split (default 1250)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=data.SAMPLE)
    args = p.parse_args(argv)
    reviews = data.read_reviews(args.data)
    rng = random.Random(args.seed)
    chosen: list[data.Review] = []
    for split in ("train", "test"):
        for label in (0, 1):
            group = [r for r in reviews if r.split == split and r.label == label]
            chosen.extend(sorted(rng.sample(group, args.per_label), key=lambda r: r.review_id))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(args.out, "w:xz", preset=9) as tar:
        files = [("aclImdb/SAMPLE.txt", NOTE.format(n=args.per_label))]
        files += [
            (f"aclImdb/{r.split}/{'pos' if r.label else 'neg'}/{r.review_id}_{r.rating}.txt", r.text) for r in chosen
        ]
        for name, text in files:
            raw = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(raw), 0, 0o644
            tar.addfile(info, io.BytesIO(raw))
    print(f"wrote {len(chosen)} reviews to {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
