"""pytorch/examples' distributed/tensor_parallelism in one seeded two-rank script, written as those examples are (no
gpupool import, no `init_process_group` of its own): `init_device_mesh(torch.accelerator.current_accelerator().type,
...)` makes the default group with torch's backend per device type (`init_process_group()` without a backend, which
`get_backend()` calls "undefined"), here a 2-D mesh of one data-parallel by two tensor-parallel ranks as
fsdp_tp_example.py's (its second dimension is a subgroup of that group), then tensor_parallel_example.py's ToyModel
under `ColwiseParallel`/`RowwiseParallel` on the "tp" dimension and AdamW(foreach=True), and an allreduce over the
"tp" subgroup. Prints `step N rank R loss X` per step and each rank's full weights' sums; on the CPU (no
accelerator) the same with gloo.

Run: torchrun --nproc-per-node 2 tensor_parallel.py"""

import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

acc = torch.accelerator.current_accelerator()
device_type = acc.type if acc is not None else "cpu"
mesh = init_device_mesh(device_type, (1, 2), mesh_dim_names=("dp", "tp"))
rank = dist.get_rank()


def say(line: str) -> None:
    """One write of the whole line: both ranks share torchrun's stdout, and under PYTHONUNBUFFERED print's text and
    newline are two writes, between which the other rank's line can land (two lines merged, both lost to the test)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(10, 32)
        self.relu = nn.ReLU()
        self.out_proj = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.relu(self.in_proj(x)))


torch.manual_seed(0)
model = parallelize_module(
    ToyModel().to(device_type), mesh["tp"], {"in_proj": ColwiseParallel(), "out_proj": RowwiseParallel()}
)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.25, foreach=True)
for i in range(4):
    torch.manual_seed(i)
    inp = torch.rand(20, 10, device=device_type)
    output = model(inp)
    output.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    say(f"step {i} rank {rank} loss {output.sum().item():.8g}")
total = torch.tensor([float(rank + 1)], device=device_type)
dist.all_reduce(total, group=mesh["tp"].get_group())
sums = [f"{p.full_tensor().sum().item():.8g}" for p in model.parameters()]
say(f"rank {rank} tp allreduce {total.item():.1f} weights {sums}")
dist.destroy_process_group()
