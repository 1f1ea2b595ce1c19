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

Under step capture (`gpupool.torch.capture`, train.py `--capture`) a replayed step has the shapes it was recorded
with, so there the touched rows are padded to a fixed `capacity` (`TouchedRows.of(..., capacity)`: at most one row
per token of the batch, so it depends on the batch's shape only) with the padding id, whose row no position reads:
its gradient is zero, its moments stay zero and its update is 0 (the table's padding row stays all zeros). And
`LazyAdam(capturable=True)` keeps its step count and bias corrections on the device, and takes the learning rate as
a device tensor, as torch's `Adam(capturable=True)` does: a replay must not bake them in as Python numbers.

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
    def of(ids: torch.Tensor, pad: int = PAD, capacity: int | None = None) -> TouchedRows:
        """With `capacity` (>= the distinct ids), rows has exactly that many entries, the kept ones first and `pad`
        after them, and padding positions read the zero row after all of them (index `capacity`): shapes that
        depend on ids' shape and `capacity` only, as a captured step needs."""
        rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        keep = rows != pad
        if capacity is None and bool(keep.all()):
            return TouchedRows(rows, inverse)
        kept = int(keep.sum())
        position = torch.cumsum(keep, 0) - 1  # a kept row's place among the kept rows
        position[~keep] = kept if capacity is None else capacity  # padding reads the zero row after them
        rows = rows[keep]
        if capacity is not None:
            if kept > capacity:
                raise ValueError(f"{kept} distinct rows do not fit a capacity of {capacity}")
            rows = torch.cat([rows, rows.new_full((capacity - kept,), pad)])
        return TouchedRows(rows, position[inverse])

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

    def tensors(self) -> list[torch.Tensor]:
        """rows and index of each table, in order: a captured step's tensor arguments (`of_tensors` undoes it)."""
        return [x for t in self.tables.values() for x in (t.rows, t.index)]

    @staticmethod
    def of_tensors(names: list[str], tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> SparseBatch:
        if len(tensors) != 2 * len(names):
            raise ValueError(f"{len(tensors)} tensors for the {len(names)} tables {names}: want rows and index of each")
        return SparseBatch({n: TouchedRows(tensors[2 * i], tensors[2 * i + 1]) for i, n in enumerate(names)})

    def lookup(self, name: str, table: nn.Embedding) -> torch.Tensor:
        """table(ids) for the batch's ids of `name`, computed from a leaf of the touched rows (its gradient is
        what backward fills); padding positions read zeros and get no gradient."""
        touched = self.tables[name]
        leaf = table.weight.detach().index_select(0, touched.rows).requires_grad_()
        self.leaves.append((table.weight, touched.rows, leaf))
        padded = torch.cat([leaf, leaf.new_zeros(1, leaf.shape[1])])
        return nn.functional.embedding(touched.index, padded)


class LazyAdam:
    """Adam (no weight decay, no amsgrad) on the rows of the embedding tables that a batch touched.

    `capturable`: the step count and the bias corrections live on the tables' device and `step` takes the learning
    rate as a tensor there too (or a number), so that a captured step's replay computes them afresh (module doc)."""

    def __init__(
        self,
        tables: list[torch.Tensor],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        capturable: bool = False,
    ):
        self.betas = betas
        self.eps = eps
        self.steps = 0
        self.moments = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p in tables}
        self.capturable = capturable
        if capturable:
            device = tables[0].device
            self.step_count = torch.zeros((), dtype=torch.float32, device=device)
            self.beta_pair = torch.tensor(betas, dtype=torch.float32, device=device)

    @torch.no_grad()
    def step(self, batch: SparseBatch, lr: float | torch.Tensor) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        if self.capturable:
            self.step_count += 1
            corrections = 1.0 - self.beta_pair.pow(self.step_count)  # (1 - beta1^t, 1 - beta2^t), on the device
            scale: float | torch.Tensor = -lr / corrections[0]
            root_correction2: float | torch.Tensor = corrections[1].sqrt()
        else:
            if isinstance(lr, torch.Tensor):
                raise TypeError("LazyAdam(capturable=False) takes a Python number as lr")
            scale = -lr / (1.0 - beta1**self.steps)
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
            if isinstance(scale, torch.Tensor):
                weight.index_add_(0, rows, update.mul_(scale))
            else:
                weight.index_add_(0, rows, update, alpha=scale)
        batch.leaves.clear()
