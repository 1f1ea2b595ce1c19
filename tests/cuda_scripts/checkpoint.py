"""Save a checkpoint of a model and optimizer that live on the GPU, load it back with map_location
(as resumable-training examples do) and go on training."""

import os
import tempfile

import torch
from torch import nn

device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
g = torch.Generator().manual_seed(4)
x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def make():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, opt, steps, start):
    for step in range(start, start + steps):
        loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.6f}")


model, opt = make()
train(model, opt, 3, 0)
path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": 3}, path)
location = "cuda:0" if torch.cuda.is_available() else "cpu"
ckpt = torch.load(path, map_location=location)
model2, opt2 = make()
model2.load_state_dict(ckpt["model"])
opt2.load_state_dict(ckpt["opt"])
train(model2, opt2, 3, ckpt["step"])
