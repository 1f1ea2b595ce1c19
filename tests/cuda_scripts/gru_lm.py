"""lstm_lm.py with nn.GRU (word_language_model --model GRU): until round 32 the C++ client failed at its first step
(torch has no Meta kernel for `_thnn_fused_gru_cell`, client/native/backend.py `_gru_cell_metas`)."""

import torch
from torch import nn

acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
device = acc if acc is not None else torch.device("cpu")
torch.manual_seed(0)


class RNNModel(nn.Module):
    def __init__(self, ntoken=30, ninp=12, nhid=24, nlayers=2):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.GRU(ninp, nhid, nlayers)
        self.decoder = nn.Linear(nhid, ntoken)

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.encoder(x), hidden)
        return self.decoder(out), hidden


model = RNNModel().to(device)
data = torch.randint(0, 30, (11, 4), generator=torch.Generator().manual_seed(6)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=1.0)
hidden = torch.zeros(2, 4, 24, device=device)
for step in range(4):
    hidden = hidden.detach()
    out, hidden = model(data[:-1], hidden)
    loss = nn.functional.cross_entropy(out.reshape(-1, 30), data[1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 0.25)
    opt.step()
    print(f"step {step} loss {loss.item():.6f}")
