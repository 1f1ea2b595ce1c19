"""LazyAdam and the sparse embedding lookup of the sentiment example (examples/sentiment/lazy.py): the lookup gives
the dense model's logits, and LazyAdam is torch's Adam on the rows a batch reads and leaves the others alone."""

from __future__ import annotations

import copy

import pytest
import torch

from examples.sentiment.lazy import LazyAdam, TouchedRows
from examples.sentiment.model import SentimentCNN


def _model(vocab: int = 50, buckets: int = 40, dropout: float = 0.5) -> SentimentCNN:
    torch.manual_seed(0)
    return SentimentCNN(vocab, embed_dim=8, filters=6, bigram_buckets=buckets, embed_std=0.1, dropout=dropout)


def _lazy_optimizers(model: SentimentCNN, lr: float) -> tuple[torch.optim.Adam, LazyAdam]:
    tables = {id(p) for p in model.embedding_tables()}
    dense = torch.optim.Adam([p for p in model.parameters() if id(p) not in tables], lr)
    return dense, LazyAdam(model.embedding_tables())


def _step_lazy(model: SentimentCNN, dense: torch.optim.Adam, lazy: LazyAdam, x: torch.Tensor, y: torch.Tensor) -> None:
    sparse = model.sparse_batch(x)
    dense.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x, sparse), y).backward()
    dense.step()
    lazy.step(sparse, dense.param_groups[0]["lr"])


def test_touched_rows_drop_padding_and_index_a_zero_row_for_it() -> None:
    ids = torch.tensor([[5, 3, 0], [3, 9, 0]])
    t = TouchedRows.of(ids)
    assert t.rows.tolist() == [3, 5, 9]
    assert t.index.tolist() == [[1, 0, 3], [0, 2, 3]]  # padding reads row 3: the zero row after the 3 kept ones
    assert TouchedRows.of(torch.tensor([4, 2, 4])).index.tolist() == [1, 0, 1]  # no padding: plain inverse
    other_pad = TouchedRows.of(torch.tensor([7, 2, 9, 2]), pad=7)  # a padding id that is not the smallest
    assert other_pad.rows.tolist() == [2, 9] and other_pad.index.tolist() == [2, 0, 1, 0]


def test_the_sparse_lookup_gives_the_dense_logits_and_gradients_only_for_the_rows_read() -> None:
    torch.manual_seed(0)
    model = SentimentCNN(50, embed_dim=8, filters=6, bigram_buckets=40, trigram_buckets=30, embed_std=0.1).eval()
    x = torch.randint(1, 50, (3, 12))
    x[:, 9:] = 0
    sparse = model.sparse_batch(x)
    torch.testing.assert_close(model(x, sparse), model(x), rtol=0, atol=0)
    sparse = model.sparse_batch(x)  # a fresh one: each forward pass adds its leaves
    model(x, sparse).sum().backward()
    words, bigrams, trigrams = (leaf for _, _, leaf in sparse.leaves)
    assert words.shape == (len(torch.unique(x[x != 0])), 8) and words.grad is not None
    assert bigrams.grad is not None and trigrams.grad is not None
    assert model.embedding.weight.grad is None  # the table itself gets no dense gradient
    assert len(model.embedding_tables()) == 3


def test_lazy_adam_equals_adam_when_every_row_is_read_every_step() -> None:
    # Every word of the vocabulary and every bigram bucket in every batch: LazyAdam must then be exactly Adam.
    vocab = 6
    x = torch.tensor([[1, 2, 3, 4, 5, 1, 3, 5, 2, 4, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 1, 4, 2, 5, 3, 1, 5, 4, 3, 2]])
    x = torch.cat([x, x.flip(1)])
    reference = _model(vocab, buckets=4, dropout=0.0)  # no dropout: the two models would draw different masks
    buckets = reference.bigram_ids(x)
    assert set(buckets.flatten().tolist()) >= {1, 2, 3}  # all buckets but the padding one are read
    lazy_model = copy.deepcopy(reference)
    adam = torch.optim.Adam(reference.parameters(), 0.01)
    dense, lazy = _lazy_optimizers(lazy_model, 0.01)
    y = torch.tensor([0, 1])
    for _ in range(5):
        adam.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        adam.step()
        _step_lazy(lazy_model, dense, lazy, x, y)
    for (name, a), b in zip(reference.named_parameters(), lazy_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_rows_a_batch_does_not_read_keep_their_weights_and_moments() -> None:
    model = _model()
    before = model.embedding.weight.detach().clone()
    dense, lazy = _lazy_optimizers(model, 0.05)
    x, y = torch.tensor([[2, 3, 4, 0]]), torch.tensor([1])
    _step_lazy(model, dense, lazy, x, y)
    moved = (model.embedding.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == [2, 3, 4]
    m, v = lazy.moments[id(model.embedding.weight)]
    assert (m.abs().sum(dim=1) > 0).nonzero().flatten().tolist() == [2, 3, 4] and v[0].abs().sum() == 0


def test_learns_a_separable_task() -> None:
    model = _model()
    dense, lazy = _lazy_optimizers(model, 0.02)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        y = torch.randint(0, 2, (16,), generator=gen)
        x = torch.randint(10, 50, (16, 10), generator=gen)
        x[:, 0] = 2 + y  # word 2 or 3 gives the label away
        _step_lazy(model, dense, lazy, x, y)
    model.eval()
    y = torch.randint(0, 2, (64,), generator=gen)
    x = torch.randint(10, 50, (64, 10), generator=gen)
    x[:, 0] = 2 + y
    assert (model(x).argmax(1) == y).float().mean().item() == pytest.approx(1.0)


def test_touched_rows_with_a_capacity_pad_to_it_with_the_padding_id() -> None:
    ids = torch.tensor([[5, 3, 0], [3, 9, 0]])
    t = TouchedRows.of(ids, capacity=6)
    assert t.rows.tolist() == [3, 5, 9, 0, 0, 0]
    assert t.index.tolist() == [[1, 0, 6], [0, 2, 6]]  # padding reads the zero row after all 6
    assert TouchedRows.of(torch.tensor([4, 2, 4]), capacity=3).index.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="3 distinct rows do not fit a capacity of 2"):
        TouchedRows.of(ids, capacity=2)
    model = _model(vocab=50, buckets=40)
    x = torch.tensor([[2, 3, 4, 0], [7, 7, 7, 7]])
    shapes = {n: (t.rows.shape, t.index.shape) for n, t in model.sparse_batch(x, fixed=True).tables.items()}
    assert shapes == {"words": ((8,), (2, 4)), "bigrams": ((8,), (2, 4))}  # one row a token: the batch's shape only


def test_capturable_lazy_adam_on_padded_rows_is_lazy_adam() -> None:
    """What train.py --capture runs (rows padded to a fixed count, corrections and lr as tensors) gives the weights
    and moments of the default eager update, and the tables' padding rows stay zero."""
    reference = _model(dropout=0.0)
    model = copy.deepcopy(reference)
    dense_a, lazy_a = _lazy_optimizers(reference, 0.05)
    tables = {id(p) for p in model.embedding_tables()}
    dense_b = torch.optim.Adam([p for p in model.parameters() if id(p) not in tables], torch.tensor(0.05))
    lazy_b = LazyAdam(model.embedding_tables(), capturable=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randint(0, 50, (4, 7), generator=gen), torch.randint(0, 2, (4,), generator=gen)
        _step_lazy(reference, dense_a, lazy_a, x, y)
        sparse = model.sparse_batch(x, fixed=True)
        dense_b.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x, sparse), y).backward()
        dense_b.step()
        lazy_b.step(sparse, dense_b.param_groups[0]["lr"])
    for (name, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for t, ref in zip(model.embedding_tables(), reference.embedding_tables(), strict=True):
        m, v = lazy_b.moments[id(t)]
        torch.testing.assert_close(m, lazy_a.moments[id(ref)][0], rtol=1e-5, atol=1e-6)
        assert t[0].abs().sum() == 0 and m[0].abs().sum() == 0 and v[0].abs().sum() == 0
    assert lazy_b.step_count.item() == 6.0
    with pytest.raises(TypeError, match="capturable=False"):
        lazy_a.step(model.sparse_batch(x), torch.tensor(0.05))
