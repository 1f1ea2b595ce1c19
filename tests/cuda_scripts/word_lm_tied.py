"""pytorch/examples' word_language_model/main.py, trimmed (BSD-3: LICENSE.pytorch-examples): an LSTM language model
with tied weights (`--tied`: decoder.weight = encoder.weight), trained with clip_grad_norm_ and a hand-written SGD
step, saved whole with `torch.save(model, f)` at its best validation loss and loaded back with `torch.load(f)` to
evaluate, as the example does. A synthetic corpus stands in for wikitext-2. Until round 32 it crashed on the pool
(`torch.load` of a whole module left its parameters on the CPU) and trained two weights where the CPU trains one
(`.to(device)` untied them)."""

import math
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(1111)


class RNNModel(nn.Module):
    def __init__(self, ntoken, ninp, nhid, nlayers, dropout=0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.decoder.weight = self.encoder.weight  # --tied
        self.nlayers, self.nhid = nlayers, nhid
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.decoder.out_features)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous().to(device)


def repackage_hidden(h):
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)


def get_batch(source, i, bptt=8):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].view(-1)


ntokens = 40
corpus = torch.randint(0, ntokens, (900,), generator=torch.Generator().manual_seed(7))
train_data, val_data, test_data = batchify(corpus[:600], 6), batchify(corpus[600:750], 3), batchify(corpus[750:], 3)
model = RNNModel(ntokens, 16, 16, 2).to(device)
criterion = nn.NLLLoss()


def evaluate(data_source):
    model.eval()
    total_loss = 0.0
    hidden = model.init_hidden(3)
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, 8):
            data, targets = get_batch(data_source, i)
            output, hidden = model(data, hidden)
            hidden = repackage_hidden(hidden)
            total_loss += len(data) * criterion(output, targets).item()
    return total_loss / (len(data_source) - 1)


lr, best_val_loss = 5.0, None
path = os.path.join(tempfile.mkdtemp(), "model.pt")
for epoch in range(1, 3):
    model.train()
    hidden = model.init_hidden(6)
    for batch, i in enumerate(range(0, train_data.size(0) - 1, 8)):
        data, targets = get_batch(train_data, i)
        hidden = repackage_hidden(hidden)
        model.zero_grad()
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        if batch % 4 == 0:
            print(f"step {epoch}.{batch} loss {loss.item():.6f}")
    val_loss = evaluate(val_data)
    print(f"epoch {epoch} valid loss {val_loss:.6f}")
    if not best_val_loss or val_loss < best_val_loss:
        with open(path, "wb") as f:
            torch.save(model, f)
        best_val_loss = val_loss

with open(path, "rb") as f:
    with torch.serialization.safe_globals([RNNModel, nn.Dropout, nn.Embedding, nn.LSTM, nn.Linear]):
        model = torch.load(f)
    model.rnn.flatten_parameters()
print(f"tied after load: {model.decoder.weight is model.encoder.weight}, {len(list(model.parameters()))} parameters")
test_loss = evaluate(test_data)
print(f"epoch end test loss {test_loss:.6f}")
print(f"perplexity {math.exp(test_loss):.3f}")
