"""Automatic mixed precision as in the PyTorch AMP recipe: autocast + GradScaler, enabled on CUDA."""

import torch
from torch import nn

use_amp = torch.cuda.is_available()
device = "cuda" if use_amp else "cpu"
torch.manual_seed(0)
g = torch.Generator().manual_seed(5)
x, y = torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g)
model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
legacy = torch.cuda.amp.GradScaler(enabled=False)  # the older spelling is accepted too
for step in range(5):
    with torch.autocast(device_type=device, dtype=torch.float16, enabled=use_amp):
        output = model(x.to(device))
        if use_amp:  # as in the AMP recipe: linear layers autocast to float16, mse_loss to float32
            assert output.dtype is torch.float16, output.dtype
        loss = nn.functional.mse_loss(output, y.to(device))
        assert loss.dtype is torch.float32
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    print(f"step {step} loss {loss.item():.6f}")
