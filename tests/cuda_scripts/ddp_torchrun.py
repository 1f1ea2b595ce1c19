"""A torchrun DDP script the way the PyTorch DDP tutorials write it: LOCAL_RANK, `init_process_group("nccl")`,
`torch.cuda.set_device(local_rank)`, DistributedSampler, `DataLoader(pin_memory=True)`, `.cuda(local_rank)`,
`DistributedDataParallel(device_ids=[local_rank])`, and the loss averaged over the ranks with `all_reduce`.
Falls back to gloo on the CPU when there is no GPU.

    torchrun --standalone --nproc-per-node 2 ddp_torchrun.py
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def main():
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert dist.get_backend() == backend, dist.get_backend()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        assert torch.cuda.current_device() == local_rank
        device = torch.device(f"cuda:{local_rank}")
    else:
        device = torch.device("cpu")

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn(256, 20, generator=g)
    targets = inputs @ torch.randn(20, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    dataset = TensorDataset(inputs, targets)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, pin_memory=True, num_workers=0)

    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 1))
    if use_cuda:
        model = DDP(model.cuda(local_rank), device_ids=[local_rank], output_device=local_rank)
    else:
        model = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for step, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            reported = loss.detach().clone()
            dist.all_reduce(reported, op=dist.ReduceOp.SUM)
            if rank == 0:
                print(f"epoch {epoch} step {step} loss {reported.item() / world:.6f}", flush=True)
    weight = model.module[0].weight.detach()
    dist.barrier()  # rank 0's last loss line is out before any rank's summary: no interleaved lines
    print(
        f"rank {rank} on {device} (current device {torch.cuda.current_device() if use_cuda else 'cpu'}) "
        f"weight sum {weight.sum().item():.6f}\n",
        end="",
        flush=True,
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
