"""The "skip the batch" idiom where the script's own tensors leave too little memory: a batch that fits the device by
itself but not beside what the script holds (5/8 of the memory, kept all along) raises torch.cuda.OutOfMemoryError
at the call that makes it, as on a GPU, before the forward, the backward and the optimizer's step of that batch run.
The script syncs only after the step (`loss.item()` in the print), as most loops do; its SGD with momentum makes its
buffers at the first step, which is the batch that does not fit (each epoch's first). It prints where each error came
(the last line started before it) and every loss; the other batches must train as in a run that never saw that batch.

`python oom_held.py` on the CPU raises the GPU's error itself at that batch."""

import torch
from torch import nn

cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
total = torch.cuda.get_device_properties(0).total_memory if cuda else 0
torch.manual_seed(0)
data = torch.Generator().manual_seed(1)
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
held = torch.zeros(total * 5 // 8 // 4, device=device) if cuda else None  # 5/8 of the memory, float32
rows = total // 2 // 256  # rows of 64 floats: half the memory, which fits by itself

for epoch in range(2):
    for batch in range(4):
        stage = "batch"
        try:
            if batch > 0:
                x = torch.randn(64 * batch, 64, generator=data).to(device)
            elif cuda:
                x = torch.randn(rows, 64, device=device)
            else:
                raise torch.cuda.OutOfMemoryError("(the CPU run: what a GPU raises here)")
            stage = "forward"
            loss = model(x).square().mean()
            stage = "backward"
            loss.backward()
            stage = "step"
            opt.step()
            opt.zero_grad()
            print(f"epoch {epoch} batch {batch} loss {loss.item()}")
        except torch.cuda.OutOfMemoryError:
            print(f"epoch {epoch} batch {batch} out of memory at {stage}")
        x = None
print("weights", [round(p.sum().item(), 6) for p in model.parameters()])
