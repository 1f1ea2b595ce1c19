"""pytorch/examples' mnist_hogwild, trimmed (BSD-3: LICENSE.pytorch-examples): one model, `model.share_memory()`,
trained in place by several processes started with the spawn method, each given the model as an argument (on a GPU
torch sends it through CUDA IPC). Random data stands in for MNIST.

    python hogwild.py [--cuda]

On the CPU it trains; on a pooled GPU (`gpupool run --cuda`) sending the model to another process is refused with
one error that says why (client/mp_share.py; until round 33 torch's `_share_fd_: only available on CPU`).
"""

import sys

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


def train(rank, model, device):
    torch.manual_seed(1 + rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(4):
        data, target = torch.randn(16, 10), torch.randint(0, 3, (16,))
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data.to(device)), target.to(device))
        loss.backward()
        optimizer.step()
    print(f"process {rank} trained, loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    use_cuda = "--cuda" in sys.argv and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.manual_seed(0)
    mp.set_start_method("spawn", force=True)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).to(device)
    model.share_memory()  # gradients are allocated lazily, so they are not shared here
    processes = []
    for rank in range(2):
        p = mp.Process(target=train, args=(rank, model, device))
        p.start()
        processes.append(p)
    for p in processes:
        p.join()
    print(f"hogwild done on {device.type}", flush=True)
