"""pytorch/examples' fsdp_tp_example.py in small, written as it is (no gpupool import, no `init_process_group` of
its own): a Llama-style block whose attention (llama2_model.py's `Attention`: wq/wk/wv/wo, rotary embeddings through
`view_as_complex`/`view_as_real`, `F.scaled_dot_product_attention(is_causal=True)`) with its heads sharded over a
two-rank "tp" mesh (`ColwiseParallel(use_local_output=False)` on wq/wk/wv, `RowwiseParallel` on wo), AdamW
foreach, the same seeded input on both ranks. Prints `step N rank R loss X` per step and each rank's full weights'
sums. On the CPU (no accelerator: gloo) each rank trains the whole block unsharded, the reference the sharded one
must equal: DTensor has no strategy for the CPU's fused attention (`_scaled_dot_product_flash_attention_for_cpu`),
and its math path mixes a plain causal mask with the DTensors.

Run: torchrun --nproc-per-node 2 tp_attention.py"""

import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, parallelize_module

acc = torch.accelerator.current_accelerator()
device_type = acc.type if acc is not None else "cpu"
mesh = init_device_mesh(device_type, (2,), mesh_dim_names=("tp",))
rank = dist.get_rank()
DIM, HEADS, SEQ, BATCH = 32, 4, 8, 2


def say(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write: both ranks share torchrun's stdout
    sys.stdout.flush()


def rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.view(1, x.shape[1], 1, -1)).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.wo = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        bs, seq, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        # -1 heads: the local heads of a sharded projection, all of them on one device
        q, k, v = (t.view(bs, seq, -1, DIM // HEADS) for t in (q, k, v))
        q, k = rotary(q, freqs), rotary(k, freqs)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(bs, seq, -1))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        return x + self.attention(x, freqs)


half = DIM // HEADS // 2
angles = torch.outer(torch.arange(SEQ).float(), 1.0 / (10000 ** (torch.arange(half).float() / half)))
freqs = torch.polar(torch.ones_like(angles), angles).to(device_type)
torch.manual_seed(0)
plan = {
    # as fsdp_tp_example.py's: the rotary frequencies become a replicated DTensor beside the sharded heads
    "attention": PrepareModuleInput(input_layouts=(Replicate(), Replicate()),
                                    desired_input_layouts=(Replicate(), Replicate())),
    "attention.wq": ColwiseParallel(use_local_output=False), "attention.wk": ColwiseParallel(use_local_output=False),
    "attention.wv": ColwiseParallel(use_local_output=False), "attention.wo": RowwiseParallel(),
}  # fmt: skip
model = Block().to(device_type)
if device_type != "cpu":
    model = parallelize_module(model, mesh, plan)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.02, foreach=True)
for i in range(3):
    torch.manual_seed(i)
    inp = torch.randn(BATCH, SEQ, DIM, device=device_type)
    output = model(inp, freqs)
    loss = (output * output).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    say(f"step {i} rank {rank} loss {loss.item():.6f}")
sums = [f"{getattr(p, 'full_tensor', p.detach)().sum().item():.6f}" for p in model.parameters()]
say(f"rank {rank} weights {sums}")
dist.destroy_process_group()
