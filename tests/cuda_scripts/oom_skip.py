"""The "skip the batch" idiom: a step whose batch the GPU cannot hold raises torch.cuda.OutOfMemoryError, the script
catches it and goes on with the next batch. On a GPU the allocation raises at the call, before the backward runs: each
`.grad` stays as it was (None before the first step). Twice: the first time the script does nothing else (the
gradients of the batches that fit accumulate until the optimizer's step), the second time it zeroes the gradients in
place (`optimizer.zero_grad(set_to_none=False)`), both times with no gradient made yet.

`python oom_skip.py ROWS`: the batch that does not fit has ROWS rows of 64 floats (made on the device: no upload),
the others 64 to 256 rows of the script's own generator. The CPU run raises the GPU's error itself at that batch."""

import sys

import torch
from torch import nn

cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
big = int(sys.argv[1]) if sys.argv[1:] else 1 << 20
torch.manual_seed(0)
data = torch.Generator().manual_seed(1)
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

for epoch in range(2):
    for batch, rows in enumerate((big, 256, 128, 64)):
        try:
            if rows != big:
                x = torch.randn(rows, 64, generator=data).to(device)
            elif cuda:
                x = torch.randn(rows, 64, device=device)
            else:
                raise torch.cuda.OutOfMemoryError("(the CPU run: what a GPU raises here)")
            loss = model(x).square().mean()
            loss.backward()
            print(f"epoch {epoch} batch {batch} loss {loss.item()}")
        except torch.cuda.OutOfMemoryError:
            grads = [p.grad is None for p in model.parameters()]
            print(f"epoch {epoch} batch {batch} out of memory, grads None {grads}")
            if epoch == 1:
                opt.zero_grad(set_to_none=False)
            continue
        if batch >= 2:  # a step after the third and fourth batches: the second one's gradients accumulate into one
            opt.step()
            opt.zero_grad()
print("weights", [round(p.sum().item(), 6) for p in model.parameters()])
