"""What FSDP2 saves: each rank holds its shard of the model between steps, not the model. Eight 512x512 layers (8 MiB
of float32 weights) sharded over the ranks with `fully_shard` (torch's default `reshard_after_forward=True`: every
unsharded parameter is freed after its forward and after its backward, `untyped_storage().resize_(0)`), plain SGD (no
optimizer states), and the device memory the rank holds after each step as `torch.cuda.memory_allocated()` reports
it. On a GPU (or gpupool's daemon) that is about the model's bytes / ranks; a device that cannot free a storage keeps
every unsharded parameter as well (the model's bytes on top).

    torchrun --standalone --nproc-per-node 2 fsdp2_memory.py
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

WIDTH, LAYERS = 512, 8


def main():
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available()
    device_type = "cuda" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device_type, (world,))
    device = torch.device(device_type, local_rank) if use_cuda else torch.device("cpu")

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)])
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(3 + rank)
    for step in range(3):
        x = torch.randn(8, WIDTH, generator=g).to(device)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.item()
        del x, loss
        held = torch.cuda.memory_allocated() if use_cuda else 0
        print(f"rank {rank} step {step} loss {value:.7f} held {held} model {model_bytes}\n", end="", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
