"""CUDA idioms of round 47, in one seeded script written as user code is (no gpupool import): a bfloat16
`torch.amp.autocast` training loop over a `WeightedRandomSampler` with a disabled `GradScaler`, the autocast state
questions libraries ask (`torch.is_autocast_enabled("cuda")`, `torch.get_autocast_dtype("cuda")`, ...), custom autograd
functions under `torch.amp.custom_fwd(device_type=..., cast_inputs=torch.float32)` / `custom_bwd` and the older
`torch.cuda.amp.custom_fwd`, a gradient of a gradient through `scaled_dot_product_attention` under
`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`, a checkpoint saved from the device and loaded with
`map_location={"cuda:0": "cpu"}`, `torch.cuda.memory_stats()`, and what a script asks about CUDA graphs.

Prints `step N <what> loss X` lines (the same values on the CPU, where it runs without CUDA) and `FAIL <what>` for each
check that does not hold (none where it runs as on a GPU)."""

import functools
import io

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
step = 0


def report(what: str, value: torch.Tensor | float) -> None:
    global step
    value = value.detach() if isinstance(value, torch.Tensor) else value
    print(f"step {step} {what} loss {float(value):.8g}", flush=True)
    step += 1


def check(what: str, ok: bool) -> None:
    if not ok:
        print(f"FAIL {what}", flush=True)


def attempt(what: str, fn):  # noqa: ANN001, ANN201 - a script's helper
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - each failure is one line, the script goes on
        print(f"FAIL {what}: {type(exc).__name__}: {exc}"[:400], flush=True)
        return None


# 1. bfloat16 autocast over a weighted sampler; the autocast state inside the region, as libraries ask it
model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
scaler = torch.amp.GradScaler(device.type, enabled=False)
xs, ys = torch.randn(64, 16), torch.randint(0, 4, (64,))
sampler = WeightedRandomSampler(torch.linspace(0.1, 1.0, 64), 32, generator=torch.Generator().manual_seed(1))
for x, y in DataLoader(TensorDataset(xs, ys), batch_size=8, sampler=sampler, pin_memory=True):
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16):
        out = model(x)
        loss = F.cross_entropy(out, y)
        check("out is bfloat16", out.dtype == torch.bfloat16)
        check("is_autocast_enabled(device_type)", torch.is_autocast_enabled(device.type))
        check("get_autocast_dtype(device_type)", torch.get_autocast_dtype(device.type) == torch.bfloat16)
        if device.type == "cuda":  # the older spellings, CUDA's
            check("is_autocast_enabled()", torch.is_autocast_enabled())
            check("get_autocast_gpu_dtype()", torch.get_autocast_gpu_dtype() == torch.bfloat16)
    check("autocast off after the region", not torch.is_autocast_enabled(device.type))
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    report("bf16 autocast", loss.float())


# 2. custom autograd functions under custom_fwd/custom_bwd
class Fp32Matmul(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type=device.type, cast_inputs=torch.float32)
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        check("cast_inputs float32", a.dtype == torch.float32 and b.dtype == torch.float32)
        check("autocast off in a cast_inputs forward", not torch.is_autocast_enabled(device.type))
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    @torch.amp.custom_bwd(device_type=device.type)
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = ctx.saved_tensors
        return g @ b.mT, a.mT @ g


if device.type == "cuda":  # the older decorators, CUDA's
    older_fwd, older_bwd = torch.cuda.amp.custom_fwd, torch.cuda.amp.custom_bwd
else:
    older_fwd = functools.partial(torch.amp.custom_fwd, device_type="cpu")
    older_bwd = functools.partial(torch.amp.custom_bwd, device_type="cpu")


class Scale(torch.autograd.Function):
    @staticmethod
    @older_fwd
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        check("custom_fwd sees autocast on", torch.is_autocast_enabled(device.type))
        return a * 2

    @staticmethod
    @older_bwd
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        check("custom_bwd runs under the forward's autocast", torch.is_autocast_enabled(device.type))
        return g * 2


a = torch.randn(4, 4).to(device).requires_grad_()
with torch.autocast(device.type, dtype=torch.bfloat16):
    product = attempt("custom_fwd(cast_inputs=float32)", lambda: Fp32Matmul.apply(a.bfloat16(), a))
    scaled = Scale.apply(a)
if product is not None:
    check("a cast_inputs function's output is float32", product.dtype == torch.float32)
    attempt("custom_bwd", lambda: (product.sum() + scaled.sum()).backward())
    attempt("custom_fwd grad", lambda: report("custom_fwd grad", a.grad.sum()))

# 3. a gradient of a gradient through attention on the math backend (no fused kernel has one)
q, k, v = (torch.randn(2, 4, 8, 16).to(device).requires_grad_() for _ in range(3))
with sdpa_kernel(SDPBackend.MATH):
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    report("sdpa math", o.sum())

    def gradient_penalty() -> None:
        (g,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).pow(2).sum(), q, create_graph=True)
        g.pow(2).sum().backward()

    if attempt("double backward under sdpa_kernel(MATH)", gradient_penalty) is None and q.grad is not None:
        report("sdpa double backward", q.grad.sum())

# 4. a checkpoint saved from the device, loaded onto the CPU with a dict map_location
buffer = io.BytesIO()
torch.save(model.state_dict(), buffer)
buffer.seek(0)
loaded = torch.load(buffer, map_location={"cuda:0": "cpu"})
check("map_location={'cuda:0': 'cpu'} loads onto the CPU", all(t.device.type == "cpu" for t in loaded.values()))
report("loaded on the CPU", sum(t.sum() for t in loaded.values()))

# 5. the memory figures and CUDA graph questions a training script's logging asks
if device.type == "cuda":
    stats = attempt("memory_stats", torch.cuda.memory_stats) or {}
    for key in ("allocated_bytes.all.current", "allocated_bytes.all.peak", "reserved_bytes.all.peak"):
        check(f"memory_stats()[{key!r}] > 0", stats.get(key, 0) > 0)
    current = stats.get("allocated_bytes.all.current")
    check("memory_stats agrees with memory_allocated", current == torch.cuda.memory_allocated())
    capturing = attempt("is_current_stream_capturing", torch.cuda.is_current_stream_capturing)
    check("is_current_stream_capturing() is False", capturing is False)
    for name, call in (("CUDAGraph", torch.cuda.CUDAGraph), ("graph_pool_handle", torch.cuda.graph_pool_handle),
                       ("memory_snapshot", torch.cuda.memory_snapshot),
                       ("utilization", torch.cuda.utilization)):  # fmt: skip
        try:
            call()
            print(f"FAIL {name} ran")
        except Exception as exc:  # noqa: BLE001 - one RuntimeError naming the call is due
            named = f"torch.cuda.{name} is not available on a pooled GPU" in str(exc)
            check(f"{name} refused naming itself: {type(exc).__name__}: {exc}", isinstance(exc, RuntimeError) and named)
print("done")
