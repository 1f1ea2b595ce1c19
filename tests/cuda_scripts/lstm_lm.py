"""A word-language-model in the style of pytorch/examples: nn.LSTM on whatever accelerator there is (gru_lm.py runs
it with nn.GRU)."""

import torch
from torch import nn

acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
device = acc if acc is not None else torch.device("cpu")
torch.manual_seed(0)
CELL = globals().get("CELL", "LSTM")  # gru_lm.py sets "GRU"


class RNNModel(nn.Module):
    def __init__(self, ntoken=30, ninp=12, nhid=24, nlayers=2):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = getattr(nn, CELL)(ninp, nhid, nlayers)
        self.decoder = nn.Linear(nhid, ntoken)

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.encoder(x), hidden)
        return self.decoder(out), hidden


model = RNNModel().to(device)
data = torch.randint(0, 30, (11, 4), generator=torch.Generator().manual_seed(6)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=1.0)
hidden = tuple(torch.zeros(2, 4, 24, device=device) for _ in range(2 if CELL == "LSTM" else 1))
for step in range(4):
    hidden = tuple(h.detach() for h in hidden)
    out, hidden = model(data[:-1], hidden if CELL == "LSTM" else hidden[0])
    hidden = hidden if CELL == "LSTM" else (hidden,)
    loss = nn.functional.cross_entropy(out.reshape(-1, 30), data[1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 0.25)
    opt.step()
    print(f"step {step} loss {loss.item():.6f}")
