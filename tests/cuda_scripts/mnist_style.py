"""A single-GPU training script in the style of pytorch/examples (mnist): `.cuda()` when CUDA is there."""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.fc1 = nn.Linear(16 * 5 * 5, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-cuda", action="store_true")
    args = parser.parse_args()
    use_cuda = not args.no_cuda and torch.cuda.is_available()
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(2)
    data = torch.randn(64, 1, 14, 14, generator=g)
    target = torch.randint(0, 10, (64,), generator=g)
    model = Net()
    if use_cuda:
        model.cuda()
        torch.backends.cudnn.benchmark = True
        print("using", torch.cuda.get_device_name(0), "of", torch.cuda.device_count())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(args.steps):
        x, y = data, target
        if use_cuda:
            x, y = x.cuda(), y.cuda(non_blocking=True)
            assert x.is_cuda
        optimizer.zero_grad()
        loss = F.nll_loss(model(x), y)
        loss.backward()
        optimizer.step()
        print(f"step {step} loss {loss.item():.6f}")
    if use_cuda:
        torch.cuda.synchronize()
        used = torch.cuda.memory_allocated()
        print("memory", used > 0, torch.cuda.max_memory_allocated() >= used)


if __name__ == "__main__":
    main()
