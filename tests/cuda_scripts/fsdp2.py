"""FSDP2 the way torch's tutorial writes it: torchrun, `init_process_group("nccl")`, `init_device_mesh("cuda", (N,))`,
`fully_shard` on each layer then on the model (built on the CPU: fully_shard moves it), Adam, `clip_grad_norm_` over
the sharded gradients (DTensor's functional all-reduce), the loss averaged over the ranks, and the trained weights
gathered whole (`full_tensor()`); then what the FSDP2 example's checkpoints do: a full state dict from the shards and
back from rank 0 (torch.distributed.checkpoint's `set_model_state_dict(broadcast_from_rank0=True)`), a tensor of
rank 0 sharded onto the mesh (`distribute_tensor`: a scatter) and resharded by columns (`redistribute`: an
all-to-all). Last, what FSDP2 saves: a model of eight 512x512 layers (8 MiB) sharded the same way, trained two steps
with SGD, and the device memory it holds between steps (`torch.cuda.memory_allocated()`), about its bytes / ranks on a
GPU: every unsharded parameter is freed after its forward and its backward (`untyped_storage().resize_(0)`). gloo on
a CPU mesh without a GPU.

    torchrun --standalone --nproc-per-node 2 fsdp2.py
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor


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
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3 + rank)
    for step in range(6):
        x = torch.randn(16, 16, generator=g).to(device)
        y = x.sum(1, keepdim=True).sin()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        opt.step()
        opt.zero_grad()
        reported = loss.detach().clone()
        dist.all_reduce(reported)
        if rank == 0:
            norm = norm.full_tensor().item()
            print(f"step {step} grad norm {norm:.7f} loss {reported.item() / world:.7f}", flush=True)
    total = sum(p.full_tensor().double().sum().item() for p in model.parameters())
    shard = next(model.parameters())
    line = f"rank {rank} mesh {mesh.device_type} shard {shard.to_local().device} weight sum {total:.7f}\n"
    print(line, end="", flush=True)  # one write: the ranks' lines do not interleave

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().zero_()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full if rank == 0 else {}, options=options)
    total = sum(p.full_tensor().double().sum().item() for p in model.parameters())
    scattered = distribute_tensor(torch.arange(8.0, device=device) * (rank + 1), mesh, [Shard(0)])  # rank 0's
    rows = distribute_tensor(torch.arange(16.0, device=device).view(4, 4), mesh, [Shard(0)])
    columns = rows.redistribute(mesh, [Shard(1)]).to_local()  # Shard(0) -> Shard(1): DTensor's all-to-all
    line = f"rank {rank} reloaded {total:.7f} scattered {scattered.to_local().tolist()} columns {columns.tolist()}\n"
    print(line, end="", flush=True)

    before = torch.cuda.memory_allocated() if use_cuda else 0
    big = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(8)])
    model_bytes = sum(p.numel() * p.element_size() for p in big.parameters())
    for layer in big:
        fully_shard(layer, mesh=mesh)
    fully_shard(big, mesh=mesh)
    sgd = torch.optim.SGD(big.parameters(), lr=1e-3)
    for step in range(2):
        big(torch.randn(8, 512, generator=g).to(device)).square().mean().backward()
        sgd.step()
        sgd.zero_grad()
        held = torch.cuda.memory_allocated() - before if use_cuda else 0
        print(f"rank {rank} step {step} of a {model_bytes}-byte model holds {held}\n", end="", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
