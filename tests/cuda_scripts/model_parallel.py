"""Model parallel the way the PyTorch tutorial writes it: the first half of the network on cuda:0, the second on
cuda:1, activations moved between them with `.to()`, labels on the last device; `torch.cuda.set_device(1)` then
`torch.cuda.current_device()` and a factory on "cuda" (the current device). Needs two GPUs; the CPU otherwise."""

import torch
from torch import nn

two = torch.cuda.is_available() and torch.cuda.device_count() >= 2
first, second = ("cuda:0", "cuda:1") if two else ("cpu", "cpu")


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq1 = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32)).to(first)
        self.seq2 = nn.Sequential(nn.ReLU(), nn.Linear(32, 1)).to(second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq2(self.seq1(x.to(first)).to(second))


torch.manual_seed(0)
g = torch.Generator().manual_seed(5)
data = [(torch.randn(32, 20, generator=g), torch.randn(32, 1, generator=g)) for _ in range(3)]
model = Split()
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for epoch in range(2):
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y.to(second))
        loss.backward()
        opt.step()
        print(f"epoch {epoch} loss {loss.item():.6f}")
if two:  # (a tensor's .device says gpupool:N under gpupool run --cuda: compare is_cuda and the index)
    assert {(p.grad.is_cuda, p.grad.device.index) for p in model.seq2.parameters()} == {(True, 1)}
    assert {(p.grad.is_cuda, p.grad.device.index) for p in model.seq1.parameters()} == {(True, 0)}
    torch.cuda.set_device(1)
    assert torch.cuda.current_device() == 1 and torch.zeros(2, device="cuda").device.index == 1
    torch.cuda.set_device(0)
print("done on", first, second)
