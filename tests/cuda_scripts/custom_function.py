"""A CUDA script with its own autograd.Function whose backward makes a `device="cuda"` tensor (a gradient-scaling
straight-through estimator, as quantization-aware training code writes them): `.cuda()` when CUDA is there."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class ScaledSign(torch.autograd.Function):
    """Forward: the sign; backward: the gradient, clipped to |x| <= 1, times a scale made on the device."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        device = "cuda" if torch.cuda.is_available() else "cpu"
        scale = torch.full((1,), 0.5, device=device)  # a literal device, as scripts write it
        return grad * (x.abs() <= 1).to(grad.dtype) * scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(ScaledSign.apply(self.fc1(x)))


def main():
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    data = torch.randn(32, 12, generator=g)
    target = torch.randint(0, 3, (32,), generator=g)
    model = Net().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        x, y = data.to(device), target.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        print(f"step {step} loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
