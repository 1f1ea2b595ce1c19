"""Sparse ("lazy") Adam updates of the embedding tables, in ordinary aten ops.

The benchmark model's embedding tables hold 140.6M of its 140.7M weights (49,994 words and 2^20 hashed bigrams of
128 floats), yet a batch of 50 reviews reads only a few thousand rows of them. A dense Adam step reads and writes
all of them, their gradient and both moments every step: on a CPU (or a fake GPU) that is over half of the step.

Here the batch's distinct rows are found on the host, before the batch is sent (`SparseBatch.of`); the model looks
its embeddings up from a small leaf tensor of just those rows (`SparseBatch.lookup`), so backward produces a
(rows, dim) gradient instead of a dense (table, dim) one; and `LazyAdam.step` applies Adam to those rows only
(index_select / index_copy_ / index_add_), as TensorFlow's LazyAdam and torch's SparseAdam do: a row's moments move
only in the steps that read it. Every op is an ordinary dense aten op, so it runs unchanged on cpu, cuda and the
remote `gpupool` device, with no sparse tensors and no data-dependent shapes on the device.

The dense parameters (convolution, output layer) stay with a usual torch optimizer; the tables must not be in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

PAD = 0  # the default padding id (the word PAD_ID, and the bigram bucket of a pair that touches padding)


@dataclass(frozen=True)
class TouchedRows:
    """The distinct ids a batch reads from one table, padding excluded, and where each position finds its row."""

    rows: torch.Tensor  # (U,) int64, sorted, without PAD
    index: torch.Tensor  # the ids' shape: position in rows, or U (an all-zero row) for PAD

    @staticmethod
    def of(ids: torch.Tensor, pad: int = PAD) -> TouchedRows:
        rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        keep = rows != pad
        if bool(keep.all()):
            return TouchedRows(rows, inverse)
        position = torch.cumsum(keep, 0) - 1  # a kept row's place among the kept rows
        position[~keep] = int(keep.sum())  # padding reads the zero row after them
        return TouchedRows(rows[keep], position[inverse])

    def to(self, device: torch.device) -> TouchedRows:
        return TouchedRows(self.rows.to(device), self.index.to(device))


@dataclass
class SparseBatch:
    """The rows one training batch reads from each embedding table (built on the host from the CPU batch), and,
    after the forward pass, the leaf tensors whose gradients LazyAdam applies."""

    tables: dict[str, TouchedRows]
    leaves: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def to(self, device: torch.device) -> SparseBatch:
        return SparseBatch({name: t.to(device) for name, t in self.tables.items()})

    def lookup(self, name: str, table: nn.Embedding) -> torch.Tensor:
        """table(ids) for the batch's ids of `name`, computed from a leaf of the touched rows (its gradient is
        what backward fills); padding positions read zeros and get no gradient."""
        touched = self.tables[name]
        leaf = table.weight.detach().index_select(0, touched.rows).requires_grad_()
        self.leaves.append((table.weight, touched.rows, leaf))
        padded = torch.cat([leaf, leaf.new_zeros(1, leaf.shape[1])])
        return nn.functional.embedding(touched.index, padded)


class LazyAdam:
    """Adam (no weight decay, no amsgrad) on the rows of the embedding tables that a batch touched."""

    def __init__(self, tables: list[torch.Tensor], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.betas = betas
        self.eps = eps
        self.steps = 0
        self.moments = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p in tables}

    @torch.no_grad()
    def step(self, batch: SparseBatch, lr: float) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        correction1 = 1.0 - beta1**self.steps
        root_correction2 = (1.0 - beta2**self.steps) ** 0.5
        for weight, rows, leaf in batch.leaves:
            grad = leaf.grad
            if grad is None:
                continue
            exp_avg, exp_avg_sq = self.moments[id(weight)]
            m = exp_avg.index_select(0, rows).mul_(beta1).add_(grad, alpha=1.0 - beta1)
            v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            exp_avg.index_copy_(0, rows, m)
            exp_avg_sq.index_copy_(0, rows, v)
            # torch.optim.Adam's update: lr / correction1 * m / (sqrt(v) / sqrt(correction2) + eps)
            update = m / v.sqrt().div_(root_correction2).add_(self.eps)
            weight.index_add_(0, rows, update, alpha=-lr / correction1)
        batch.leaves.clear()
