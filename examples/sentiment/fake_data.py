"""A small aclImdb-shaped tarball of synthetic reviews, for tests and for trying the scripts without the data set.

The layout is the real one (``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``, a README, and an
``unsup`` folder that must be ignored). Positive reviews use words from POSITIVE, negative ones from NEGATIVE,
both padded with neutral filler, so a model that learns anything separates them.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

POSITIVE = ("great", "wonderful", "superb", "loved", "brilliant", "moving")
NEGATIVE = ("awful", "boring", "terrible", "hated", "dull", "waste")
FILLER = ("the", "movie", "film", "plot", "actor", "scene", "story", "and", "a", "was", "it", "this")


def review_text(label: int, rng: random.Random, words: int = 30) -> str:
    """One synthetic review: filler with a few sentiment words of the label, an HTML break and punctuation."""
    cue = POSITIVE if label else NEGATIVE
    body = [rng.choice(FILLER) for _ in range(words)]
    for _ in range(4):
        body[rng.randrange(words)] = rng.choice(cue)
    return " ".join(body[: words // 2]) + ".<br /><br />" + " ".join(body[words // 2 :]) + ("!" if label else "?")


def write_tarball(path: Path, per_class: int = 20, seed: int = 0, extra_test_word: str | None = None) -> Path:
    """Write per_class reviews for each of train/test x pos/neg to path (a .tar.gz) and return path.

    extra_test_word, when given, is added to every test review (to check the vocabulary comes from train only).
    """
    rng = random.Random(seed)

    def add(tar: tarfile.TarFile, name: str, text: str) -> None:
        raw = text.encode()
        info = tarfile.TarInfo(name)
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))

    with tarfile.open(path, "w:gz") as tar:
        add(tar, "aclImdb/README", "Large Movie Review Dataset (synthetic test copy)\n")
        add(tar, "aclImdb/train/unsup/0_0.txt", "unlabelled reviews are ignored " * 5)
        for split in ("train", "test"):
            for label, folder in ((1, "pos"), (0, "neg")):
                for i in range(per_class):
                    rating = rng.choice((7, 8, 9, 10) if label else (1, 2, 3, 4))
                    text = review_text(label, rng)
                    if split == "test" and extra_test_word:
                        text += " " + extra_test_word
                    add(tar, f"aclImdb/{split}/{folder}/{i}_{rating}.txt", text)
    return path
