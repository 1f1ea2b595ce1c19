"""The out-of-memory retry idiom: a step whose batch the GPU cannot hold raises torch.cuda.OutOfMemoryError, the script
catches it and goes on with a smaller batch, without `zero_grad` in between (the gradients are accumulated over the
batches that fit). On a GPU the allocation raises at the call, before the backward runs: `.grad` stays as it was.

`python oom_retry.py` (the CPU run raises the GPU's error itself): a batch of 2^34 rows first, over any
device's memory. `python oom_retry.py fits` (pooled runs only): a batch that fits the device's memory by itself but
not with the step's activations, so the refusal comes in the backward; prints the errors the script catches."""

import sys

import torch
from torch import nn

cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
torch.manual_seed(0)
data = torch.Generator().manual_seed(1)
model = nn.Linear(64, 8).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.1)


def step(x: torch.Tensor) -> float:
    loss = model(x).square().mean()
    loss.backward()
    return loss.item()


if sys.argv[1:] == ["fits"]:  # rows of 64 floats: 3/4 of the device's memory (the lease's share of it)
    rows = torch.cuda.get_device_properties(0).total_memory * 3 // 4 // 256
    for attempt in ("large", "small"):
        try:
            x = torch.randn(rows, 64, device=device) if attempt == "large" else torch.randn(64, 64, device=device)
            print(f"{attempt} loss {step(x)}")
        except torch.cuda.OutOfMemoryError as exc:
            print(f"{attempt} caught {exc}")
        del x
    sys.exit(0)

for epoch in range(2):
    for rows in (1 << 34, 4096, 1024):
        try:
            if not cuda and rows == 1 << 34:
                raise torch.cuda.OutOfMemoryError("(the CPU run: what a GPU raises here)")
            big = rows == 1 << 34
            x = torch.randn(rows, 64, device=device) if big else torch.randn(rows, 64, generator=data).to(device)
            print(f"epoch {epoch} rows {rows} loss {step(x)}")
        except torch.cuda.OutOfMemoryError:
            print(f"epoch {epoch} rows {rows} out of memory, grad kept {model.weight.grad is not None}")
    opt.step()
    opt.zero_grad()
print("weight", [round(v, 6) for v in model.weight.sum(1).tolist()])
