"""Recurrent models train on a fake GPU: on a non-CPU device torch picks accelerator-only kernels
(`_thnn_fused_lstm_cell`, `_thnn_fused_gru_cell` and their backwards) that the daemon runs through
server/fallbacks.py. Losses equal those of the same model trained on the local CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyLM(nn.Module):
    """A character-level language model: embedding -> 2-layer recurrent net -> linear head."""

    def __init__(self, rnn: type[nn.Module], vocab: int = 20, hidden: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.rnn = rnn(8, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(x))
        return self.head(out)


def train(rnn: type[nn.Module], device: torch.device | str, steps: int = 4) -> list[float]:
    torch.manual_seed(0)
    model = TinyLM(rnn).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seq = torch.randint(0, 20, (4, 9), generator=torch.Generator().manual_seed(1))
    x, y = seq[:, :-1].to(device), seq[:, 1:].to(device)  # one batch, learned by heart
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 20), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_recurrent_model_trains_on_a_fake_gpu_like_on_the_cpu(rnn: type[nn.Module], dev: torch.device) -> None:
    local = train(rnn, "cpu")
    remote = train(rnn, dev)
    assert remote == pytest.approx(local, rel=1e-4, abs=1e-5)
    assert local[-1] < local[0]  # it learns


def test_lstm_cell_and_gru_cell_through_the_pool(dev: torch.device) -> None:
    torch.manual_seed(3)
    for cell in (nn.LSTMCell(6, 5), nn.GRUCell(6, 5)):
        x = torch.randn(3, 6)
        want = cell(x)
        got = cell.to(dev)(x.to(dev))
        for w, g in zip(*(t if isinstance(t, tuple) else (t,) for t in (want, got)), strict=True):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)
