"""A training script written with the CUDA idioms of NVIDIA's and PyTorch's performance guides, as users bring them:
`torch.backends.cudnn.benchmark = True`, `torch.cuda.get_device_properties`, a `DataLoader(num_workers=2,
pin_memory=True)` with `non_blocking=True` copies, a side-stream prefetcher (`torch.cuda.Stream`, `with
torch.cuda.stream(s)`, `current_stream().wait_stream(s)`, `record_stream`), a channels_last conv net, gradient
accumulation, `torch.cuda.amp.autocast()` + `torch.cuda.amp.GradScaler()` (the older spelling; `--amp`), step
timing with `torch.cuda.Event(enable_timing=True)` and `elapsed_time`, `torch.cuda.synchronize()`,
`torch.cuda.empty_cache()` and the memory counters. Without CUDA it takes the CPU branch of each."""

import argparse
import io
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.cuda.amp.* is deprecated in favour of torch.amp

parser = argparse.ArgumentParser()
parser.add_argument("--amp", action="store_true")
parser.add_argument("--accum", type=int, default=2)
args = parser.parse_args()

use_cuda = torch.cuda.is_available()
device = torch.device("cuda" if use_cuda else "cpu")
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.manual_seed(0)
if use_cuda:
    props = torch.cuda.get_device_properties(0)
    print(f"gpu {props.name} memory {props.total_memory} sm {props.major}.{props.minor} {props.multi_processor_count}")
    torch.cuda.manual_seed_all(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 4)
        return self.fc(torch.flatten(x, 1))


class Prefetcher:
    """NVIDIA apex's data_prefetcher: the next batch's copy on a side stream while this one computes."""

    def __init__(self, loader):
        self.loader = iter(loader)
        self.stream = torch.cuda.Stream() if use_cuda else None
        self.preload()

    def preload(self):
        try:
            self.next_x, self.next_y = next(self.loader)
        except StopIteration:
            self.next_x = self.next_y = None
            return
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                self.next_x = self.next_x.to(device, non_blocking=True).to(memory_format=torch.channels_last)
                self.next_y = self.next_y.to(device, non_blocking=True)

    def next(self):
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
        x, y = self.next_x, self.next_y
        if x is not None and self.stream is not None:
            x.record_stream(torch.cuda.current_stream())
            y.record_stream(torch.cuda.current_stream())
        self.preload()
        return x, y


gen = torch.Generator().manual_seed(1)
data = TensorDataset(torch.randn(48, 3, 8, 8, generator=gen), torch.randint(0, 10, (48,), generator=gen))
loader = DataLoader(data, batch_size=8, num_workers=2, pin_memory=use_cuda, persistent_workers=True)

model = Net().to(device).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scaler = torch.cuda.amp.GradScaler(enabled=args.amp and use_cuda)
start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if use_cuda else (None, None)
step = 0
for epoch in range(2):
    model.train()
    fetch = Prefetcher(loader)
    x, y = fetch.next()
    i = 0
    opt.zero_grad(set_to_none=True)
    if use_cuda:
        start.record()
    while x is not None:
        with torch.cuda.amp.autocast(enabled=args.amp and use_cuda):
            out = model(x if use_cuda else x.to(memory_format=torch.channels_last))
            loss = F.cross_entropy(out, y) / args.accum
        scaler.scale(loss).backward()
        if (i + 1) % args.accum == 0:
            scaler.unscale_(opt)
            norm = nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            print(f"step {step} grad norm {norm.item():.7f} loss {loss.item() * args.accum:.7f}")
            step += 1
        x, y = fetch.next()
        i += 1
    if use_cuda:
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        torch.cuda.synchronize()
        assert ms > 0, ms
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        print(f"epoch {epoch} took {ms:.1f} ms, allocated {torch.cuda.memory_allocated() > 0}")
        torch.cuda.empty_cache()
model.eval()
with torch.no_grad():
    x = torch.randn(4, 3, 8, 8, generator=gen).to(device, non_blocking=True)
    print(f"eval sum {model(x).float().sum().item():.6f}")
    # the outputs copied to the host without blocking: into a pinned buffer, and by `.to("cpu", non_blocking=True)`
    host = torch.empty(4, 10, pin_memory=use_cuda)
    host.copy_(model(x), non_blocking=True)
    logits = model(x).to("cpu", non_blocking=True)
    if use_cuda:
        torch.cuda.synchronize()
    print(f"eval on the host sums {host.sum().item():.6f} {logits.sum().item():.6f}")
if use_cuda:
    print(f"peak {torch.cuda.max_memory_allocated() > 0} reserved {torch.cuda.memory_reserved() >= 0}")

# a state_dict saved, then loaded the way older scripts do (a callable map_location moving each storage itself)
# and the way newer ones do (a string), weights only; on the CPU both stay there
buf = io.BytesIO()
torch.save(model.state_dict(), buf)
for where in ((lambda storage, loc: storage.cuda()) if use_cuda else (lambda storage, loc: storage), device.type):
    buf.seek(0)
    state = torch.load(buf, map_location=where, weights_only=True)
    reloaded = Net().to(device).to(memory_format=torch.channels_last)
    reloaded.load_state_dict(state)
    reloaded.eval()
    with torch.no_grad():
        print(f"reloaded on {state['fc.weight'].device.type} eval sum {reloaded(x).float().sum().item():.6f}")

# activation checkpointing of a block with dropout: the recomputation in the backward must draw the forward's mask
# (torch.utils.checkpoint saves and loads the device's generator state), so the gradients are those without it
block = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.ReLU()).to(device)
h = torch.randn(8, 16, generator=gen).to(device).requires_grad_()
grads = []
for how in ("plain", "non-reentrant", "reentrant"):
    torch.manual_seed(7)
    out = block(h) if how == "plain" else checkpoint(block, h, use_reentrant=how == "reentrant")
    (out * out).sum().backward()
    grads.append(h.grad.clone())
    h.grad = None
print("checkpointed dropout grads equal", all(torch.equal(g, grads[0]) for g in grads[1:]))
print("idioms done on", device.type)
