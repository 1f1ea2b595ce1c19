"""A generator of the device's own: `torch.Generator(device="cuda")` seeded with `manual_seed`, handed to random ops on
the device (`randn`, `rand`, `randint`, `randperm`, `bernoulli` and an inverted-dropout mask drawn with
`bernoulli_`, `multinomial`, `nn.init`'s `generator=`), its state saved and loaded back; the default generator
(`torch.manual_seed`) is another, and a DataLoader's generator stays on the CPU. Prints what it drew.

`python device_generator.py [DEVICE]`: DEVICE `cuda` where CUDA is available (the default), else `cpu`; `gpupool`
(no --cuda: the device's own name)."""

import copy
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader

device = sys.argv[1] if len(sys.argv) > 1 else "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator(device=device)
assert isinstance(g, torch.Generator) and isinstance(torch.default_generator, torch.Generator)
assert g.manual_seed(123) is g and g.initial_seed() == 123
torch.manual_seed(7)
a = torch.randn(4, device=device, generator=g)
b = torch.randn(4, device=device)  # the default generator's
g.manual_seed(123)
torch.manual_seed(99)  # does not touch g
again = torch.randn(4, device=device, generator=g)
print("randn", a.tolist(), "same again", torch.equal(a.cpu(), again.cpu()), "default differs", not torch.equal(a, b))
g.manual_seed(5)
print("rand", torch.rand(3, device=device, generator=g).tolist())
print("randint", torch.randint(0, 10, (6,), device=device, generator=g).tolist())
print("randperm", torch.randperm(10, device=device, generator=g).tolist())
print("bernoulli", torch.bernoulli(torch.full((8,), 0.5, device=device), generator=g).tolist())
x = torch.ones(16, device=device)
mask = torch.empty_like(x).bernoulli_(0.75, generator=g)  # dropout with its own generator
print("dropout", (x * mask / 0.75).tolist())
print("multinomial", torch.multinomial(torch.ones(10, device=device), 4, generator=g).tolist())
layer = nn.Linear(4, 3).to(device)
nn.init.xavier_uniform_(layer.weight, generator=g)
nn.init.normal_(layer.bias, std=0.1, generator=g)
print("init", layer.weight.sum().item(), layer.bias.tolist())
state = g.get_state()
first = torch.rand(3, device=device, generator=g)
g.set_state(state)
print("state", state.dtype, torch.equal(first.cpu(), torch.rand(3, device=device, generator=g).cpu()))
twin = copy.deepcopy(g)  # (pickle alike): the same device and state
same = torch.equal(torch.rand(3, device=device, generator=twin).cpu(), torch.rand(3, device=device, generator=g).cpu())
print("deepcopy", twin.device == g.device, same)
loader = DataLoader(list(range(10)), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0))
print("loader", [batch.tolist() for batch in loader], torch.Generator().device)
print("generator on", g.device)
