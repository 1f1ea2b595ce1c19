"""aclImdb for the sentiment workload: find the tarball, tokenize, build the vocabulary, encode, cache, batch.

The dataset is read straight from ``aclImdb_v1.tar.gz`` (``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``),
found by ``locate`` (see ``fetch.py``: --data, the cache, ../shared/data, else a download), or from the small
real subset in ``sample/`` (``--data sample``). The vocabulary comes from the training reviews only. The
encoded splits are cached as an ``.npz`` (no pickle) keyed by the tarball's size/mtime and the tokenizer
settings, so later runs start in a second. Training batches come in a seeded random order; the test split
keeps a fixed order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from examples.sentiment.model import PAD_ID, UNK_ID

log = logging.getLogger(__name__)

TARBALL = "aclImdb_v1.tar.gz"
# Where CI and this project's shared machines keep the full tarball: ../shared/data next to the repository.
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / TARBALL
# 1,250 real reviews per label and split (5,000 in all), in the repository: see sample/README.md.
SAMPLE = Path(__file__).resolve().parent / "sample" / "aclImdb_sample.tar.xz"
TOKENIZER_VERSION = 1
_MEMBER = re.compile(r"^aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")
_BREAK = re.compile(r"<br\s*/?>")


def cache_root() -> Path:
    """gpupool's cache: $XDG_CACHE_HOME/gpupool, else ~/.cache/gpupool (a downloaded tarball lands here)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gpupool"


def default_cache_dir() -> Path:
    """Where encoded splits are cached: $GPUPOOL_CACHE_DIR, else <cache_root>/sentiment."""
    env = os.environ.get("GPUPOOL_CACHE_DIR")
    return Path(env) if env else cache_root() / "sentiment"


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with in-word apostrophes) plus "!" and "?"; HTML line breaks are dropped."""
    return _TOKEN.findall(_BREAK.sub(" ", text.lower()))


@dataclass(frozen=True)
class Review:
    split: str  # "train" | "test"
    label: int  # 1 = pos, 0 = neg
    review_id: int
    text: str
    rating: int = 0  # the star rating in the file name (1-4 neg, 7-10 pos)


class BadTarball(ValueError):
    """The file given as aclImdb cannot be read as its tarball (truncated, damaged, not a tar, no reviews); the message
    is the one line to show the user."""


def read_reviews(tar_path: Path) -> list[Review]:
    """All labelled reviews of the tarball, sorted by (split, label, id) so the order never depends on the tar.

    A file that is not a readable tarball (a truncated download, a damaged copy, another file) raises BadTarball."""
    if not tar_path.is_file():
        raise FileNotFoundError(f"aclImdb tarball not found: {tar_path} (set --data or $GPUPOOL_IMDB)")
    reviews: list[Review] = []
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:
                m = _MEMBER.match(member.name)
                if not (m and member.isfile()):
                    continue
                f = tar.extractfile(member)
                if f is None:
                    continue
                text = f.read().decode("utf-8", errors="replace")
                label = 1 if m.group(2) == "pos" else 0
                reviews.append(Review(m.group(1), label, int(m.group(3)), text, int(m.group(4))))
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:  # gzip's BadGzipFile: OSError
        # tarfile's "could not be opened" lists every compression it tried, one a line: that is not a tar at all
        why = "not a tar archive" if "\n" in str(exc) else (str(exc) or type(exc).__name__)
        raise BadTarball(
            f"{tar_path} is not a readable aclImdb tarball ({why}): truncated or damaged? Fetch it again "
            "(examples/sentiment/README.md#data) or pass another --data"
        ) from exc
    reviews.sort(key=lambda r: (r.split, r.label, r.review_id))
    return reviews


def build_vocab(token_lists: list[list[str]], max_size: int, min_freq: int = 2) -> list[str]:
    """Words by falling frequency (ties alphabetical); index 0 is "<pad>", 1 is "<unk>"."""
    counts = Counter(tok for toks in token_lists for tok in toks)
    words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
    return ["<pad>", "<unk>", *words[: max(0, max_size - 2)]]


def encode(tokens: list[str], index: dict[str, int]) -> np.ndarray:
    """Token ids (int32) for a token list; unknown words map to UNK_ID."""
    return np.fromiter((index.get(t, UNK_ID) for t in tokens), dtype=np.int32, count=len(tokens))


@dataclass
class Split:
    """One split: ragged token ids (flat + offsets) and labels."""

    ids: np.ndarray  # int32, all reviews concatenated
    offsets: np.ndarray  # int64, len = n + 1
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, rows: np.ndarray) -> Split:
        pieces = [self.ids[self.offsets[i] : self.offsets[i + 1]] for i in rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in pieces], out=offsets[1:])
        ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        return Split(ids, offsets, self.labels[rows].copy())


@dataclass
class Dataset:
    vocab: list[str]
    train: Split
    test: Split


def _pack(token_ids: list[np.ndarray], labels: list[int]) -> Split:
    offsets = np.zeros(len(token_ids) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in token_ids], out=offsets[1:])
    ids = np.concatenate(token_ids) if token_ids else np.zeros(0, dtype=np.int32)
    return Split(ids, offsets, np.asarray(labels, dtype=np.int64))


def build_dataset(tar_path: Path, vocab_size: int = 30000, min_freq: int = 2) -> Dataset:
    """Tokenize both splits, build the vocabulary from train, encode both splits."""
    reviews = read_reviews(tar_path)
    tokens = [tokenize(r.text) for r in reviews]
    train_rows = [i for i, r in enumerate(reviews) if r.split == "train"]
    test_rows = [i for i, r in enumerate(reviews) if r.split == "test"]
    if not train_rows or not test_rows:
        raise BadTarball(f"{tar_path}: expected aclImdb/train and aclImdb/test reviews, found none in one of them")
    vocab = build_vocab([tokens[i] for i in train_rows], vocab_size, min_freq)
    index = {w: i for i, w in enumerate(vocab)}

    def split(rows: list[int]) -> Split:
        return _pack([encode(tokens[i], index) for i in rows], [reviews[i].label for i in rows])

    return Dataset(vocab, split(train_rows), split(test_rows))


def load_dataset(tar_path: Path, cache_dir: Path | None = None, vocab_size: int = 30000, min_freq: int = 2) -> Dataset:
    """build_dataset, cached as .npz in cache_dir (None: no cache)."""
    if cache_dir is None:
        return build_dataset(tar_path, vocab_size, min_freq)
    st = tar_path.stat()
    key = json.dumps([str(tar_path.resolve()), st.st_size, st.st_mtime_ns, TOKENIZER_VERSION, vocab_size, min_freq])
    path = cache_dir / f"imdb-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            log.info("loaded encoded aclImdb from %s", path)
            return Dataset(
                [str(w) for w in z["vocab"]],
                Split(z["train_ids"], z["train_offsets"], z["train_labels"]),
                Split(z["test_ids"], z["test_offsets"], z["test_labels"]),
            )
    log.info("tokenizing %s (first run; cached afterwards in %s)", tar_path, cache_dir)
    ds = build_dataset(tar_path, vocab_size, min_freq)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        vocab=np.asarray(ds.vocab, dtype=str),
        train_ids=ds.train.ids, train_offsets=ds.train.offsets, train_labels=ds.train.labels,
        test_ids=ds.test.ids, test_offsets=ds.test.offsets, test_labels=ds.test.labels,
    )  # fmt: skip
    os.replace(tmp, path)
    return ds


def balanced_subset(split: Split, n: int, rng: np.random.Generator | None) -> Split:
    """n reviews, half of each label: random ones when rng is given, else the first ones (fixed order)."""
    if n >= len(split):
        return split
    chosen = []
    for label, count in ((0, n // 2), (1, n - n // 2)):
        rows = np.flatnonzero(split.labels == label)
        chosen.append(rng.choice(rows, size=count, replace=False) if rng is not None else rows[:count])
    return split.subset(np.sort(np.concatenate(chosen)))


def _pad(split: Split, rows: np.ndarray, max_len: int, multiple: int) -> np.ndarray:
    lengths = np.minimum(split.lengths()[rows], max_len)
    width = int(min(max_len, -(-max(1, int(lengths.max())) // multiple) * multiple))
    out = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    for j, (i, n) in enumerate(zip(rows, lengths, strict=True)):
        out[j, :n] = split.ids[split.offsets[i] : split.offsets[i] + n]
    return out


def batches(
    split: Split,
    batch_size: int,
    max_len: int,
    rng: np.random.Generator | None = None,
    bucket: int = 50,
    multiple: int = 64,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens (B, L) int64, labels (B,) int64) CPU batches, padded to a multiple of `multiple` (few shapes).

    With rng (training): a random permutation; within windows of `bucket` batches, rows are grouped by
    length (less padding) and the batches of a window come in random order. Without rng (evaluation): a
    fixed order, sorted by length.
    """
    lengths = split.lengths()
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        perm = rng.permutation(len(split))
        groups = []
        window = batch_size * bucket
        for start in range(0, len(perm), window):
            chunk = perm[start : start + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            part = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            groups.extend(part[k] for k in rng.permutation(len(part)))
    for rows in groups:
        yield torch.from_numpy(_pad(split, rows, max_len, multiple)), torch.from_numpy(split.labels[rows])
