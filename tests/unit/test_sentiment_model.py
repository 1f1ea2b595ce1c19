"""The sentiment CNN: shapes, padding masking, determinism of the synthetic batch, a few training steps."""

from __future__ import annotations

import pytest
import torch

from examples.sentiment.model import PAD_ID, SentimentCNN, benchmark_model, build_model, make_batch


def test_forward_shapes_for_several_region_sizes() -> None:
    model = SentimentCNN(500, embed_dim=16, filters=8, kernel_sizes=(1, 3, 5))
    tokens, labels = make_batch(batch_size=4, seq_len=40, vocab_size=500, seed=3)
    logits = model(tokens)
    assert logits.shape == (4, 2) and logits.dtype == torch.float32
    assert model.fc.in_features == 2 * 8 * 3
    assert labels.shape == (4,) and labels.dtype == torch.int64


@pytest.mark.parametrize("bigram_buckets", [0, 97])
def test_trailing_padding_does_not_change_the_output(bigram_buckets: int) -> None:
    torch.manual_seed(0)
    model = build_model(300, embed_dim=12, filters=10, kernel_sizes=(3, 5), bigram_buckets=bigram_buckets).eval()
    tokens, _ = make_batch(batch_size=3, seq_len=20, vocab_size=300, seed=1)
    padded = torch.cat([tokens, torch.full((3, 17), PAD_ID, dtype=torch.int64)], dim=1)
    torch.testing.assert_close(model(padded), model(tokens))


def test_make_batch_is_deterministic_and_has_padding() -> None:
    torch.manual_seed(123)
    a = make_batch(8, 32, 100, seed=5)
    torch.manual_seed(456)
    b = make_batch(8, 32, 100, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], make_batch(8, 32, 100, seed=6)[0])
    assert (a[0] == PAD_ID).any() and (a[0][:, 0] != PAD_ID).all()
    assert int(a[0].max()) < 100


def test_bad_hyper_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="odd"):
        SentimentCNN(100, kernel_sizes=(2,))
    with pytest.raises(ValueError, match="vocab_size"):
        SentimentCNN(1)


def test_ten_adam_steps_reduce_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = build_model(200, embed_dim=16, filters=16, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens, labels = make_batch(16, 24, 200, seed=0)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.embedding.weight.grad is not None and model.embedding.weight.grad[PAD_ID].abs().sum() == 0


def test_bigram_ids_hash_word_pairs_and_skip_padding() -> None:
    model = SentimentCNN(50, embed_dim=4, filters=4, bigram_buckets=11)
    tokens = torch.tensor([[5, 6, 5, 6, PAD_ID], [7, PAD_ID, PAD_ID, PAD_ID, PAD_ID]])
    ids = model.bigram_ids(tokens)
    assert ids.shape == tokens.shape and ids.dtype == torch.int64
    assert ids[0, 0] == ids[0, 2] != 0  # the same pair, the same bucket
    assert ((ids >= 0) & (ids < 11)).all()
    assert ids[0, 3:].tolist() == [0, 0] and ids[1].tolist() == [0] * 5  # pairs with padding -> bucket 0
    assert model.bigrams is not None and model.bigrams.weight.shape == (11, 4)
    assert build_model(50).bigrams is None


def test_benchmark_model_is_what_train_py_defaults_to() -> None:
    from examples.sentiment import train

    args = train.parse_args([])
    model = benchmark_model(3000)
    assert model.bigrams is not None and model.bigrams.num_embeddings == args.bigram_buckets
    assert model.embed_dropout.p == args.embed_dropout and model.dropout.p == args.dropout
    assert abs(float(model.embedding.weight.detach()[2:].std()) - args.embed_std) < 0.01
    assert model.embedding.weight.shape == (3000, args.embed_dim) and model.fc.in_features == 2 * args.filters
