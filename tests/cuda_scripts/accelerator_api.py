"""A device-agnostic training loop written against torch.accelerator (torch 2.9's memory API included), as PyTorch's
current recipes write it: `torch.accelerator.synchronize()` after each step, `memory_allocated()`,
`max_memory_allocated()`, `memory_reserved()`, `memory_stats()`, `reset_peak_memory_stats()`, `empty_cache()`,
`get_memory_info()`. Without an accelerator it runs on the CPU and skips the checks.

Prints `step N loss X` lines (the same values on the CPU) and `FAIL <what>` for each check that does not hold (none
where it runs as on a GPU)."""

import torch
import torch.nn as nn

acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
device = acc if acc is not None else torch.device("cpu")
torch.manual_seed(0)


def check(what, ok):
    if not ok:
        print(f"FAIL {what}", flush=True)


model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
for step in range(4):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
    loss.backward()
    opt.step()
    if acc is not None:
        torch.accelerator.synchronize()
    print(f"step {step} loss {loss.item():.8g}", flush=True)

if acc is not None:
    torch.accelerator.synchronize(0)
    used = torch.accelerator.memory_allocated()
    check("memory_allocated", used >= 4 * (32 * 64 + 64 + 64 * 4 + 4))  # at least the parameters
    check("max_memory_allocated", torch.accelerator.max_memory_allocated() >= used)
    check("memory_reserved", torch.accelerator.memory_reserved() >= used)
    stats = torch.accelerator.memory_stats()
    check("memory_stats", stats["allocated_bytes.all.current"] == used and "allocated_bytes.all.peak" in stats)
    big = torch.zeros(1 << 20, device=device)
    check("the peak", torch.accelerator.max_memory_allocated() >= used + big.numel() * 4)
    del big
    torch.accelerator.empty_cache()
    torch.accelerator.reset_peak_memory_stats()
    torch.accelerator.reset_accumulated_memory_stats()
    check("reset_peak_memory_stats", torch.accelerator.max_memory_allocated() < used + (1 << 22))
    free, total = torch.accelerator.get_memory_info()
    check("get_memory_info", 0 < free <= total and total - free >= used)
print("done", flush=True)
