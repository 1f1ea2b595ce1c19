"""The device-agnostic idiom of most tutorials: `device = "cuda" if torch.cuda.is_available() else "cpu"`,
a DataLoader with pin_memory, `.to(device, non_blocking=True)`, factories with `device=`, an integer
device id (`local_rank`) and `torch.device("cuda")` objects."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
g = torch.Generator().manual_seed(3)
dataset = TensorDataset(torch.randn(96, 20, generator=g), torch.randn(96, 1, generator=g))
loader = DataLoader(dataset, batch_size=32, shuffle=False, pin_memory=True, num_workers=0)

model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.LayerNorm(64), nn.Linear(64, 1))
if torch.cuda.is_available():
    local_rank = 0
    torch.cuda.set_device(local_rank)
    model = model.to(local_rank)  # an integer device id, as DDP scripts do
    assert next(model.parameters()).is_cuda
    assert torch.cuda.current_device() == 0
else:
    model = model.to(device)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
bias = torch.zeros(1, device=torch.device(device))  # a factory with a torch.device
for epoch in range(2):
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device=device, non_blocking=True)
        noise = torch.full_like(y, 0.01) + torch.ones(y.shape, device=device) * 0.0
        loss = nn.functional.mse_loss(model(x) + bias + noise, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"epoch {epoch} loss {loss.item():.6f}")
print("done on", device)
