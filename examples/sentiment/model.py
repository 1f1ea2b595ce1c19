"""The sentiment CNN: embedding -> conv1d -> pooling -> dropout -> linear.

A word-order-aware text classifier in the spirit of Johnson & Zhang, "Effective use of word order for
text categorization with convolutional neural networks" (NAACL 2015), the model of the MLPerf
sentiment-analysis benchmark. Each convolution filter is a learned detector of a short word region
(a "region embedding"); a review is the pooled response of those detectors over its whole length:
the max (did the review ever say X?) and the masked mean (how much of the review says X?, a
bag-of-n-grams view that is strong on long reviews). Dropout and one linear layer give two logits.

Only ordinary aten ops are used (embedding, conv1d, relu, mul, amax, sum, div, dropout, addmm), so the
model runs unchanged on cpu, cuda and the remote `gpupool` device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from examples.sentiment.lazy import SparseBatch, TouchedRows

PAD_ID = 0
UNK_ID = 1
# What train.py uses unless told otherwise (the rest of its defaults are SentimentCNN's).
BENCHMARK: dict[str, Any] = {"bigram_buckets": 2**20, "embed_dropout": 0.5, "embed_std": 0.1}
# At most this many words: in aclImdb that keeps every training word seen at least twice (49,994; data.py's min_freq).
BENCHMARK_VOCAB = 100_000


def _hashed_table(buckets: int, dim: int, std: float) -> nn.Embedding | None:
    """An embedding of hashed n-gram buckets drawn from N(0, std), bucket 0 (padding) all zeros; None when off."""
    if buckets <= 1:
        return None
    table = nn.Embedding(buckets, dim, padding_idx=0)
    with torch.no_grad():
        table.weight.normal_(0.0, std)
        table.weight[0].zero_()
    return table


class SentimentCNN(nn.Module):
    """CNN over token ids (B, L) -> logits (B, num_classes). Token id ``pad_id`` marks padding."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        filters: int = 256,
        kernel_sizes: Sequence[int] = (3,),
        dropout: float = 0.5,
        num_classes: int = 2,
        pad_id: int = PAD_ID,
        embed_std: float = 1.0,
        bigram_buckets: int = 0,
        embed_dropout: float = 0.0,
        trigram_buckets: int = 0,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            # Odd sizes keep "same" padding symmetric, so conv outputs line up with the padding mask.
            raise ValueError(f"kernel sizes must be odd and >= 1, got {list(kernel_sizes)}")
        self.pad_id = pad_id
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        if embed_std != 1.0:  # nn.Embedding draws from N(0, 1); smaller vectors move faster under Adam's step size
            with torch.no_grad():
                self.embedding.weight.normal_(0.0, embed_std)
                self.embedding.weight[pad_id].zero_()
        # Optional: each position also gets a (hashed) embedding of the bigram that starts there, so the convolution
        # sees exact word pairs, not just sums of word vectors (the "bigram features" of bag-of-n-gram models).
        self.bigram_buckets = bigram_buckets
        self.bigrams = _hashed_table(bigram_buckets, embed_dim, embed_std)
        # Optional, the same for the trigram that starts at each position (exact word triples).
        self.trigram_buckets = trigram_buckets
        self.trigrams = _hashed_table(trigram_buckets, embed_dim, embed_std)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, filters, k, padding=k // 2) for k in kernel_sizes)
        # Dropout on the word vectors too: without it the (bigram) embeddings memorise the training set in 2 epochs.
        self.embed_dropout = nn.Dropout(embed_dropout)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * filters * len(kernel_sizes), num_classes)

    def forward(self, tokens: torch.Tensor, sparse: SparseBatch | None = None) -> torch.Tensor:
        """Logits of a batch. With `sparse` (training with LazyAdam: `sparse_batch` of the same tokens, on the
        model's device), the embeddings are looked up from leaves of the rows the batch touches."""
        mask = (tokens != self.pad_id).to(self.fc.weight.dtype).unsqueeze(1)  # (B, 1, L)
        length = mask.sum(dim=2).clamp_min(1.0)  # (B, 1)
        x = self.embedding(tokens) if sparse is None else sparse.lookup("words", self.embedding)  # (B, L, E)
        if self.bigrams is not None:
            x = x + (
                self.bigrams(self.bigram_ids(tokens)) if sparse is None else sparse.lookup("bigrams", self.bigrams)
            )
        if self.trigrams is not None:
            x = x + (
                self.trigrams(self.trigram_ids(tokens)) if sparse is None else sparse.lookup("trigrams", self.trigrams)
            )
        x = self.embed_dropout(x).transpose(1, 2)  # (B, E, L)
        pooled = []
        for conv in self.convs:
            h = torch.relu(conv(x)) * mask  # (B, F, L); padding positions -> 0 (ReLU output is >= 0 anyway)
            pooled.append(h.amax(dim=2))
            pooled.append(h.sum(dim=2) / length)
        return self.fc(self.dropout(torch.cat(pooled, dim=1)))

    def embedding_tables(self) -> list[torch.Tensor]:
        """The weights of the embedding tables (what LazyAdam updates; a dense optimizer takes the others)."""
        return [self.embedding.weight] + [t.weight for t in (self.bigrams, self.trigrams) if t is not None]

    def sparse_batch(self, tokens: torch.Tensor, fixed: bool = False) -> SparseBatch:
        """The rows a (CPU) batch of tokens reads from each table: computed on the host, then sent with the batch.
        `fixed` (a captured step): each table's rows padded to min(its rows - 1, tokens.numel()), a size that
        depends on the batch's shape only (lazy.py)."""

        def touched(ids: torch.Tensor, table: nn.Embedding, pad: int) -> TouchedRows:
            capacity = min(table.num_embeddings - 1, ids.numel()) if fixed else None
            return TouchedRows.of(ids, pad, capacity)

        tables = {"words": touched(tokens, self.embedding, self.pad_id)}
        if self.bigrams is not None:
            tables["bigrams"] = touched(self.bigram_ids(tokens), self.bigrams, 0)
        if self.trigrams is not None:
            tables["trigrams"] = touched(self.trigram_ids(tokens), self.trigrams, 0)
        return SparseBatch(tables)

    def bigram_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) bucket of the bigram (tokens[t], tokens[t+1]) in [1, buckets); 0 where either word is padding."""
        first, second = tokens[:, :-1], tokens[:, 1:]
        ids = (first * 1_000_003 + second) % (self.bigram_buckets - 1) + 1
        ids = ids * ((first != self.pad_id) & (second != self.pad_id)).to(ids.dtype)
        return torch.cat([ids, torch.zeros_like(tokens[:, :1])], dim=1)

    def trigram_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) bucket of the trigram (tokens[t], tokens[t+1], tokens[t+2]) in [1, buckets); 0 where any word is
        padding (word ids stay below 2^31, so the hash fits in int64)."""
        first, second, third = tokens[:, :-2], tokens[:, 1:-1], tokens[:, 2:]
        ids = ((first * 1_000_003 + second) * 999_983 + third) % (self.trigram_buckets - 1) + 1
        real = (first != self.pad_id) & (second != self.pad_id) & (third != self.pad_id)
        ids = ids * real.to(ids.dtype)
        return torch.cat([ids, torch.zeros_like(tokens[:, :2])], dim=1)


def build_model(
    vocab_size: int,
    embed_dim: int = 128,
    filters: int = 256,
    kernel_sizes: Sequence[int] = (3,),
    dropout: float = 0.5,
    bigram_buckets: int = 0,
    embed_dropout: float = 0.0,
    embed_std: float = 1.0,
    trigram_buckets: int = 0,
) -> SentimentCNN:
    """The CNN with the given sizes; bigram embeddings and embedding dropout are off unless asked for (the
    benchmark configuration is benchmark_model)."""
    return SentimentCNN(
        vocab_size,
        embed_dim=embed_dim,
        filters=filters,
        kernel_sizes=kernel_sizes,
        dropout=dropout,
        bigram_buckets=bigram_buckets,
        embed_dropout=embed_dropout,
        embed_std=embed_std,
        trigram_buckets=trigram_buckets,
    )


def benchmark_model(vocab_size: int = 49994) -> SentimentCNN:
    """The configuration train.py trains by default (91.0 % on aclImdb after 2 epochs): every word seen twice
    (49,994 in aclImdb), 2^20 bigram buckets, 128-dim embeddings with dropout 0.5, 256 region-3 filters, max + mean
    pooling, dropout 0.5."""
    return build_model(vocab_size, **BENCHMARK)


def make_batch(
    batch_size: int = 16,
    seq_len: int = 64,
    vocab_size: int = 1000,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic synthetic batch on the CPU: (tokens int64 (B, L), labels int64 (B,)).

    Each row is a random number of token ids in [2, vocab_size) followed by padding, so the masking path is
    exercised; the same seed always gives the same batch, whatever the global RNG state.
    """
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab_size, (batch_size, seq_len), generator=gen, dtype=torch.int64)
    lengths = torch.randint(max(1, seq_len // 4), seq_len + 1, (batch_size,), generator=gen)
    positions = torch.arange(seq_len).unsqueeze(0)
    tokens = tokens.masked_fill(positions >= lengths.unsqueeze(1), PAD_ID)
    labels = torch.randint(0, 2, (batch_size,), generator=gen, dtype=torch.int64)
    return tokens, labels
