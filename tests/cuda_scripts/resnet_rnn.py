"""Ordinary CUDA training and inference code that no earlier script ran, in one seeded script: a torchvision-style
ResNet (BasicBlock with a 1x1-conv downsample, BatchNorm2d, kaiming init, zero-init of each block's last BN) trained
with SGD (nesterov, weight decay), label smoothing, `clip_grad_norm_`, MultiStepLR, a block under
`torch.utils.checkpoint` (BatchNorm inside, non-reentrant), switched between `train()` and `eval()` and evaluated
under `torch.inference_mode()` (top-k accuracy, softmax); a 2-layer bidirectional GRU over `pack_padded_sequence`
(unsorted lengths) and an LSTM with `proj_size`, with Adam and `clip_grad_norm_`; a WGAN-GP gradient penalty
(`torch.autograd.grad(create_graph=True)`, double backward); a custom `autograd.Function` in the `setup_context` style
with `mark_non_differentiable`, `needs_input_grad` and `once_differentiable`; `F.affine_grid` + `F.grid_sample`.
`--amp`: the training steps under `torch.autocast("cuda", dtype=torch.float16)` with `torch.amp.GradScaler("cuda")`
(off on the CPU). Prints one `step N <what> loss X` line per value, 8 digits. Without CUDA it runs on the CPU."""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
use_amp = "--amp" in sys.argv and device.type == "cuda"
torch.manual_seed(0)
step = 0


def report(what: str, value: torch.Tensor | float) -> None:
    global step
    value = value.detach() if isinstance(value, torch.Tensor) else value
    print(f"step {step} {what} loss {float(value):.8g}", flush=True)
    step += 1


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv3x3(3, 8), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.constant_(
                    m.bn2.weight, 0.5
                )  # (torchvision's zero_init_residual, halved: the block still counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.stem(x))
        x = checkpoint(self.layer2, x, use_reentrant=False) if self.training else self.layer2(x)
        return self.fc(torch.flatten(self.pool(x), 1))


images = torch.randn(16, 3, 12, 12).to(device)
labels = torch.randint(0, 10, (16,)).to(device)
net = ResNet().to(device)
opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 3], gamma=0.1)
criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
for _epoch in range(4):
    net.train()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
        loss = criterion(net(images), labels)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    report("resnet grad norm", nn.utils.clip_grad_norm_(net.parameters(), 2.0))
    scaler.step(opt)
    scaler.update()
    sched.step()
    report("resnet train", loss)
    net.eval()
    with torch.inference_mode():
        logits = net(images)
        top3 = logits.topk(3, dim=1).indices
        report("resnet eval top3 hits", (top3 == labels.unsqueeze(1)).any(dim=1).float().sum())
        report("resnet eval confidence", F.softmax(logits, dim=1).max(dim=1).values.mean())
report("bn running mean", net.layer2.bn2.running_mean.sum())
report("bn running var", net.layer2.downsample[1].running_var.sum())
report("bn batches tracked", net.stem[1].num_batches_tracked)


# Sequence models: a bidirectional GRU over packed, unsorted sequences, an LSTM with proj_size
class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, padding_idx=0)
        self.gru = nn.GRU(8, 12, num_layers=2, batch_first=True, bidirectional=True, dropout=0.0)
        self.lstm = nn.LSTM(24, 10, batch_first=True, proj_size=6)
        self.out = nn.Linear(6, 5)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False)
        hidden, _ = self.gru(packed)
        hidden, _ = self.lstm(hidden)
        padded, _ = pad_packed_sequence(hidden, batch_first=True, total_length=tokens.size(1))
        return self.out(padded)


lengths = torch.tensor([7, 3, 5, 1, 6, 2])
tokens = torch.randint(1, 20, (6, 7))
tokens[torch.arange(7).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
tags = torch.randint(0, 5, (6, 7))
tags[tokens == 0] = -100
tokens, tags = tokens.to(device), tags.to(device)
tagger = Tagger().to(device)
adam = torch.optim.Adam(tagger.parameters(), lr=1e-2)
rnn_scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
for _it in range(4):
    adam.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
        scores = tagger(tokens, lengths.to(device))
        loss = F.cross_entropy(scores.float().flatten(0, 1), tags.flatten(), ignore_index=-100)
    rnn_scaler.scale(loss).backward()
    rnn_scaler.unscale_(adam)
    report("rnn grad norm", nn.utils.clip_grad_norm_(tagger.parameters(), 1.0))
    rnn_scaler.step(adam)
    rnn_scaler.update()
    report("rnn train", loss)
with torch.no_grad():
    tagger.eval()
    report("rnn padded positions", tagger(tokens, lengths)[tokens == 0].abs().sum())


# A WGAN-GP critic step: the gradient penalty's double backward
critic = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1)).to(device)
copt = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.9))
real, fake = torch.randn(8, 6).to(device), torch.randn(8, 6).to(device) + 1
alpha = torch.rand(8, 1).to(device)
for _it in range(3):
    copt.zero_grad()
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grads,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    penalty = ((grads.norm(2, dim=1) - 1) ** 2).mean()
    loss = critic(fake).mean() - critic(real).mean() + 10 * penalty
    loss.backward()
    copt.step()
    report("wgan-gp penalty", penalty)
    report("wgan-gp critic", loss)


# A custom Function, setup_context style: a clamp with a straight-through gradient and a non-differentiable mask
class ClampST(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
        inside = (x >= low) & (x <= high)
        return x.clamp(low, high), inside

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        _, inside = output
        ctx.mark_non_differentiable(inside)
        ctx.save_for_backward(inside)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _):  # type: ignore[no-untyped-def]
        (inside,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad * (0.5 + 0.5 * inside.to(grad.dtype)), None, None


w = torch.randn(5, 5).to(device).requires_grad_(True)
clamped, inside = ClampST.apply(w * 2, -1.0, 1.0)
(clamped.sin().sum() + (clamped * inside).pow(2).sum()).backward()
report("custom function grad", w.grad.abs().sum())
report("custom function inside", inside.sum())

# A spatial transformer's sampling (F.affine_grid + F.grid_sample) and its gradient to theta
theta = torch.tensor([[[1.0, 0.1, 0.0], [0.05, 0.9, 0.1]]] * 2).to(device).requires_grad_(True)
grid = F.affine_grid(theta, [2, 3, 8, 8], align_corners=False)
F.grid_sample(images[:2, :, :8, :8], grid, align_corners=False).pow(2).sum().backward()
report("spatial transformer theta grad", theta.grad.abs().sum())
print("resnet rnn done on", device.type)
