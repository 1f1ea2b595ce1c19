"""aclImdb reading, tokenizing, vocabulary, encoding, caching and batching of the sentiment example,
on a small tarball with the real layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from examples.sentiment import data, fake_data
from examples.sentiment.model import PAD_ID, UNK_ID


@pytest.fixture
def tarball(tmp_path: Path) -> Path:
    return fake_data.write_tarball(tmp_path / "aclImdb_v1.tar.gz", per_class=10, extra_test_word="zzztestonly")


def test_tokenize_lowercases_drops_html_breaks_keeps_marks() -> None:
    assert data.tokenize("Great MOVIE!<br /><br />Don't miss it... Really?") == [
        "great", "movie", "!", "don't", "miss", "it", "really", "?",
    ]  # fmt: skip


def test_read_reviews_takes_labelled_files_only_in_a_fixed_order(tarball: Path) -> None:
    reviews = data.read_reviews(tarball)
    assert len(reviews) == 40  # README and train/unsup are not reviews
    assert [(r.split, r.label) for r in reviews[:1]] == [("test", 0)]
    keys = [(r.split, r.label, r.review_id) for r in reviews]
    assert keys == sorted(keys)
    assert {(r.split, r.label) for r in reviews} == {("train", 0), ("train", 1), ("test", 0), ("test", 1)}


def test_missing_tarball_says_where_to_point(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="GPUPOOL_IMDB"):
        data.read_reviews(tmp_path / "nope.tar.gz")


def test_vocab_comes_from_train_only_and_unknowns_map_to_unk(tarball: Path) -> None:
    ds = data.build_dataset(tarball, vocab_size=1000, min_freq=1)
    assert ds.vocab[PAD_ID] == "<pad>" and ds.vocab[UNK_ID] == "<unk>"
    assert "zzztestonly" not in ds.vocab and "great" in ds.vocab
    assert len(ds.train) == len(ds.test) == 20
    # every test review ends with the test-only word, which must encode as <unk>
    last = ds.test.ids[ds.test.offsets[1:] - 1]
    assert (last == UNK_ID).all()
    assert (ds.train.ids != PAD_ID).all()


def test_vocab_size_and_frequency_order() -> None:
    vocab = data.build_vocab([["b", "a", "b", "c"], ["b", "a", "d"]], max_size=4, min_freq=1)
    assert vocab == ["<pad>", "<unk>", "b", "a"]
    assert data.build_vocab([["x", "y", "y"]], max_size=10, min_freq=2) == ["<pad>", "<unk>", "y"]


def test_cache_round_trip_without_pickle(tarball: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = data.load_dataset(tarball, cache, vocab_size=500)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    np.load(files[0], allow_pickle=False).close()  # loadable with pickle refused
    second = data.load_dataset(tarball, cache, vocab_size=500)
    assert second.vocab == first.vocab
    for a, b in ((first.train, second.train), (first.test, second.test)):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets)
        assert np.array_equal(a.labels, b.labels)
    data.load_dataset(tarball, cache, vocab_size=400)  # other settings: another cache entry
    assert len(list(cache.glob("*.npz"))) == 2


def test_balanced_subset(tarball: Path) -> None:
    ds = data.build_dataset(tarball)
    sub = data.balanced_subset(ds.train, 6, np.random.default_rng(0))
    assert len(sub) == 6 and sub.labels.sum() == 3
    again = data.balanced_subset(ds.train, 6, np.random.default_rng(0))
    assert np.array_equal(sub.ids, again.ids)
    fixed = data.balanced_subset(ds.test, 4, None)
    assert np.array_equal(fixed.labels, [0, 0, 1, 1])
    assert data.balanced_subset(ds.test, 100, None) is ds.test


def test_batches_cover_the_split_pad_and_order(tarball: Path) -> None:
    ds = data.build_dataset(tarball)
    split = ds.train
    got = list(data.batches(split, batch_size=6, max_len=20, rng=np.random.default_rng(1), multiple=8))
    assert sum(len(y) for _, y in got) == len(split)
    assert sum(int(y.sum()) for _, y in got) == 10
    for x, _ in got:  # widths: the longest row rounded up to a multiple of 8, at most max_len
        assert x.dtype == torch.int64 and x.shape[1] in (8, 16, 20)
    # seeded training order is reproducible and differs from another seed
    again = list(data.batches(split, 6, 20, rng=np.random.default_rng(1), multiple=8))
    other = list(data.batches(split, 6, 20, rng=np.random.default_rng(2), multiple=8))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(got, again, strict=True))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(got, other, strict=True))
    # evaluation order is fixed; rows are the reviews' first tokens, then padding
    ev1 = [x for x, _ in data.batches(split, 7, 1000)]
    ev2 = [x for x, _ in data.batches(split, 7, 1000)]
    assert all(np.array_equal(a, b) for a, b in zip(ev1, ev2, strict=True))
    n_tokens = sum(int((x != PAD_ID).sum()) for x in ev1)
    assert n_tokens == len(split.ids)
