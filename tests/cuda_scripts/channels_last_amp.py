"""A channels_last image-classification training script as the GPU performance guides and the timm/NVIDIA reference
scripts write one: the cudnn/TF32 switches and `torch.set_float32_matmul_precision("high")`,
`torch.cuda.set_per_process_memory_fraction`, a DataLoader with 2 persistent workers, `pin_memory=True` and a collate
function that returns channels_last batches (NVIDIA's fast_collate), `.cuda(non_blocking=True)` copies that keep that
layout, a ResNet moved with `.to(device, memory_format=torch.channels_last)` and then `torch.compile`d (on a GPU only,
as timm's `--torchcompile` and nanoGPT's `compile = True` are meant), AdamW (`fused=True` on CUDA, as nanoGPT picks it),
a linear warmup into cosine decay (SequentialLR), label smoothing, `scaler.unscale_` + clip_grad_norm_, an EMA of the
weights (`AveragedModel` with `get_ema_multi_avg_fn`), `torch.cuda.nvtx` ranges, per-epoch `torch.cuda.Event` timing,
the peak-memory counters, and an eval pass under `torch.inference_mode()` and autocast. `--amp`: the training steps
under `torch.autocast("cuda", dtype=torch.float16)` with `torch.amp.GradScaler("cuda")` (off on the CPU). Prints one
`step N <what> loss X` line per value, 8 digits. Without CUDA it takes the CPU branch of each."""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

use_cuda = torch.cuda.is_available()
device = torch.device("cuda" if use_cuda else "cpu")
use_amp = "--amp" in sys.argv and use_cuda
cl = torch.channels_last
torch.backends.cudnn.benchmark = True
torch.backends.cudnn.deterministic = False
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.set_float32_matmul_precision("high")
torch.manual_seed(0)
if use_cuda:
    torch.cuda.set_per_process_memory_fraction(0.9)
    major, minor = torch.cuda.get_device_capability()
    print(f"capability {major}.{minor} bf16 {torch.cuda.is_bf16_supported()}")
step = 0


def report(what: str, value: torch.Tensor | float) -> None:
    global step
    value = value.detach() if isinstance(value, torch.Tensor) else value
    print(f"step {step} {what} loss {float(value):.8g}", flush=True)
    step += 1


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)))


class Net(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layers = nn.Sequential(Block(8, 8), Block(8, 16, stride=2))
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.stem(x), 2)
        x = F.adaptive_avg_pool2d(self.layers(x), 1)
        return self.head(torch.flatten(x, 1))


def fast_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """NVIDIA's DeepLearningExamples collate: the batch in channels_last, built on the CPU."""
    images = torch.stack([image for image, _ in batch]).contiguous(memory_format=cl)
    return images, torch.stack([label for _, label in batch])


gen = torch.Generator().manual_seed(1)
data = TensorDataset(torch.randn(64, 3, 16, 16, generator=gen), torch.randint(0, 10, (64,), generator=gen))
loader = DataLoader(
    data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(2), num_workers=2,
    pin_memory=use_cuda, persistent_workers=True, collate_fn=fast_collate, drop_last=True,
)  # fmt: skip

model = Net().to(device, memory_format=cl)
ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
if use_cuda:
    model = torch.compile(model)  # a GPU script's default: on the pool it runs eagerly (docs/cuda.md)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05, fused=use_cuda)
epochs, per_epoch = 3, len(loader)
sched = torch.optim.lr_scheduler.SequentialLR(
    opt,
    [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=per_epoch),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=(epochs - 1) * per_epoch),
    ],
    milestones=[per_epoch],
)
criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
if use_cuda:
    torch.cuda.reset_peak_memory_stats()
for _epoch in range(epochs):
    model.train()
    if use_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for images, labels in loader:
        images = images.to(device, non_blocking=True)  # the collated layout, kept by the copy
        labels = labels.to(device, non_blocking=True)
        assert images.is_contiguous(memory_format=cl), images.stride()
        if use_cuda:
            torch.cuda.nvtx.range_push("forward")
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
            loss = criterion(model(images), labels)
        if use_cuda:
            torch.cuda.nvtx.range_pop()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.nvtx.range("backward") if use_cuda else torch.autograd.profiler.record_function("backward"):
            scaler.scale(loss).backward()
        scaler.unscale_(opt)
        norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        ema.update_parameters(model)
        report("grad norm", norm)
        report("train", loss)
    if use_cuda:
        end.record()
        torch.cuda.synchronize()
        assert start.elapsed_time(end) > 0
    stem = model.stem[0].weight
    assert stem.is_contiguous(memory_format=cl), stem.stride()  # AdamW's updates keep the parameters' layout
    model.eval()
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
        images = data.tensors[0][:32].to(device).to(memory_format=cl)
        labels = data.tensors[1][:32].to(device)
        logits = model(images)
        report("eval", F.cross_entropy(logits.float(), labels))
        report("eval top1", (logits.argmax(1) == labels).float().mean())
        report("ema eval", F.cross_entropy(ema.module(images).float(), labels))
    back = images.cpu()  # a channels_last activation read back keeps its layout, as from a GPU
    assert back.is_contiguous(memory_format=cl), back.stride()
if use_cuda:
    print(f"peak {torch.cuda.max_memory_allocated() > 0} compiled {type(model).__name__}")
print("channels_last amp done on", device.type)
