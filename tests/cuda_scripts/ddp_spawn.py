"""pytorch/examples' distributed/ddp-tutorial-series/multigpu.py, trimmed (BSD-3: LICENSE.pytorch-examples): one
process per GPU started with `torch.multiprocessing.spawn` (no torchrun, so no LOCAL_RANK), MASTER_ADDR/MASTER_PORT
set by the script, `torch.cuda.set_device(rank)` then `init_process_group("nccl", rank=, world_size=)`,
`model.to(rank)`, `DDP(model, device_ids=[rank])`, a DistributedSampler, `DataLoader(pin_memory=True)`, and the
snapshot of multigpu_torchrun.py: saved by rank 0 after each epoch (`model.module.state_dict()`, the epoch), loaded
back with `map_location=f"cuda:{rank}"` by every rank when it exists, training going on from there. Seeded, with a
loss that trains (the tutorial's `cross_entropy` of a one-column output is 0 whatever the weights: they never move).
Falls back to gloo on the CPU when there is no GPU.

    python ddp_spawn.py EPOCHS PORT SNAPSHOT

Until round 33 rank 1 failed in init_process_group on a pool: its group was bound to gpupool:0 (lease device 0)
while it claimed lease device 1 ("rank 1's token is not this session's device").
"""

import os
import sys

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed import all_reduce, barrier, destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def main(rank, world_size, epochs, port, snapshot_path):
    os.environ["MASTER_ADDR"] = "localhost"
    os.environ["MASTER_PORT"] = port
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(rank)
    init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    device = rank if use_cuda else "cpu"

    g = torch.Generator().manual_seed(7)
    inputs = torch.rand(256, 20, generator=g)
    targets = inputs @ torch.rand(20, 1, generator=g)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=32, pin_memory=True, shuffle=False,
                        sampler=DistributedSampler(TensorDataset(inputs, targets)))  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    epochs_run = 0
    if os.path.exists(snapshot_path):
        snapshot = torch.load(snapshot_path, map_location=f"cuda:{rank}" if use_cuda else "cpu")
        model.load_state_dict(snapshot["MODEL_STATE"])
        epochs_run = snapshot["EPOCHS_RUN"] + 1
        # one write with its newline (as the weights' line below): two ranks' lines cannot run together
        print(f"rank {rank} resuming at epoch {epochs_run}\n", end="", flush=True)
    model = DDP(model, device_ids=[rank] if use_cuda else None)
    for epoch in range(epochs_run, epochs):
        loader.sampler.set_epoch(epoch)
        for step, (source, target) in enumerate(loader):
            source, target = source.to(device), target.to(device)
            optimizer.zero_grad()
            loss = F.mse_loss(model(source), target)
            loss.backward()
            optimizer.step()
            reported = loss.detach().clone()
            all_reduce(reported)
            if rank == 0:
                print(f"epoch {epoch} step {step} loss {reported.item() / world_size:.7f}", flush=True)
        if rank == 0:
            torch.save({"MODEL_STATE": model.module.state_dict(), "EPOCHS_RUN": epoch}, snapshot_path)
    weights = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()]).cpu().tolist()
    for turn in range(world_size):  # one rank's line at a time: never two interleaved
        barrier()
        if turn == rank:
            print(f"rank {rank} weights " + " ".join(f"{w:.7f}" for w in weights) + "\n", end="", flush=True)
    barrier()
    destroy_process_group()


if __name__ == "__main__":
    world_size = torch.cuda.device_count() if torch.cuda.is_available() else 2
    mp.spawn(main, args=(world_size, int(sys.argv[1]), sys.argv[2], sys.argv[3]), nprocs=world_size)
