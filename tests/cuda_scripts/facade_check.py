"""Run under `gpupool run --cuda -n 2`: the torch.cuda facade, device mapping, and the refusals (asserts)."""

import io
import sys

import torch

assert torch.cuda.is_available() and torch.cuda.device_count() == 2, torch.cuda.device_count()
props = torch.cuda.get_device_properties(0)
assert props.name == torch.cuda.get_device_name(0) == "gpupool fake GPU (CPU)", props
assert props.total_memory == int(sys.argv[1]), props.total_memory  # the quota of the lease
free, total = torch.cuda.mem_get_info()
assert total == props.total_memory and free <= total

# Device strings, objects, integer ids, .cuda(), set_device.
a = torch.ones(1024, 256, device="cuda")  # 1 MiB
assert a.is_cuda and a.device == torch.device("gpupool", 0), a.device
assert torch.cuda.memory_allocated() >= 1024 * 256 * 4, torch.cuda.memory_allocated()
assert torch.cuda.max_memory_allocated() >= torch.cuda.memory_allocated()
b = torch.arange(4.0).cuda(1)
assert b.device == torch.device("gpupool", 1) and torch.randn(2, device=1).device.index == 1
torch.cuda.set_device(1)
assert torch.cuda.current_device() == 1 and torch.zeros(2, device="cuda").device.index == 1
with torch.cuda.device(0):
    assert torch.empty(1, device=torch.device("cuda")).device.index == 0
assert torch.cuda.current_device() == 1
assert (b * 2).sum().item() == 12.0 and not torch.zeros(1).is_cuda
assert torch.nn.Linear(2, 2).to(torch.device("cuda", 0)).weight.device == torch.device("gpupool", 0)

# Default devices.
torch.set_default_device("cuda")
assert torch.ones(1).device.type == "gpupool"
torch.set_default_device("cpu")
with torch.device("cuda:0"):
    assert torch.nn.Linear(2, 2).weight.device == torch.device("gpupool", 0)
assert torch.zeros(1).device.type == "cpu"

# A thread of the script maps too.
import threading  # noqa: E402

made = []
worker = threading.Thread(target=lambda: made.append(torch.ones(2, device="cuda:0")))
worker.start()
worker.join()
assert made and made[0].device == torch.device("gpupool", 0), made

# Seeds, synchronize, streams, events.
torch.cuda.manual_seed_all(7)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
(a @ a.T).sum().item()
end.record()
end.synchronize()
assert start.elapsed_time(end) > 0
s = torch.cuda.Stream()
with torch.cuda.stream(s):
    c = a + 1
s.synchronize()
torch.cuda.current_stream().wait_stream(s)
assert c[0, 0].item() == 2.0

# Autocast follows CUDA's cast policy.
with torch.autocast("cuda", dtype=torch.bfloat16):
    mm = a[:4, :4] @ a[:4, :4]
    assert mm.dtype == torch.bfloat16 and mm.softmax(-1).dtype == torch.float32
    assert torch.cat([mm, a[:4, :4]]).dtype == torch.float32 and (mm + 1).dtype == torch.bfloat16
with torch.cuda.amp.autocast():
    assert torch.nn.functional.linear(a[:2], a[:3]).dtype == torch.float16
assert (a[:4, :4] @ a[:4, :4]).dtype == torch.float32

# Flags that change nothing are accepted.
torch.backends.cudnn.benchmark = True
torch.backends.cudnn.deterministic = True
torch.backends.cuda.matmul.allow_tf32 = True

# A checkpoint saved on a real GPU (storages tagged cuda:0) lands on the pooled device without map_location.
buf = io.BytesIO()
tag = torch.serialization.location_tag
torch.serialization.location_tag = lambda storage: "cuda:0"
torch.save({"w": torch.arange(3.0)}, buf)
torch.serialization.location_tag = tag
buf.seek(0)
w = torch.load(buf)["w"]
assert w.is_cuda and w.device == torch.device("gpupool", 0) and w.sum().item() == 3.0, w.device
buf.seek(0)
assert torch.load(buf, map_location="cpu")["w"].device.type == "cpu"
buf.seek(0)
assert torch.load(buf, map_location={"cuda:0": "cuda:1"})["w"].device == torch.device("gpupool", 1)

# What cannot work says so, naming the call.
import torch.distributed as dist  # noqa: E402


def refused(fn, name):
    try:
        fn()
    except RuntimeError as exc:
        assert name in str(exc) and "not available on a pooled GPU" in str(exc), exc
        print("refused:", exc, file=sys.stderr)
    else:
        raise AssertionError(f"{name} was not refused")


# nccl is the gpupool collective backend (ddp_torchrun.py); beside gloo for CPU tensors it cannot be.
assert dist.is_nccl_available()
store = dist.TCPStore("127.0.0.1", 0, 1, True)
refused(
    lambda: dist.init_process_group("cpu:gloo,cuda:nccl", store=store, rank=0, world_size=1), "'cpu:gloo,cuda:nccl'"
)
refused(lambda: torch.cuda.CUDAGraph(), "torch.cuda.CUDAGraph")
refused(lambda: torch.cuda.graph(None), "torch.cuda.graph")
# torch.compile runs eagerly (round 42; refused before): the model, function or decorator itself
lin = torch.nn.Linear(2, 2).cuda()
assert torch.compile(lin) is lin and torch.compile(mode="max-autotune")(len) is len
lin.compile()  # nn.Module.compile: torch.compile of its call, the same call
assert lin(torch.ones(1, 2, device="cuda")).shape == (1, 2)
# NVTX markers (a CPU-only torch raised "NVTX functions not installed") and the memory fraction (the lease bounds it)
assert torch.cuda.nvtx.range_push("a") == 0 and torch.cuda.nvtx.range_push("b") == 1
assert torch.cuda.nvtx.range_pop() == 1 and torch.cuda.nvtx.range_pop() == 0
with torch.cuda.nvtx.range("step"):
    torch.cuda.nvtx.mark("here")
torch.cuda.set_per_process_memory_fraction(0.5, 1)
try:
    torch.cuda.set_per_process_memory_fraction(1.5)
except ValueError as exc:
    assert "Invalid fraction value" in str(exc)
else:
    raise AssertionError("a fraction of 1.5 was taken")
state = torch.cuda.get_rng_state()  # the daemon's generator, read and loaded back (round 43; refused before)
drawn = torch.rand(3, device="cuda")
torch.cuda.set_rng_state(state)
assert torch.equal(torch.rand(3, device="cuda"), drawn)
# CUDA extensions: refused once the script imports them (--cuda imports none: setuptools' ~0.3 s a process, round 55)
assert "torch.utils.cpp_extension" not in sys.modules
import torch.utils.cpp_extension as ext  # noqa: E402
from torch.utils.cpp_extension import load_inline  # noqa: E402

refused(lambda: ext.load(name="k", sources=["k.cu"]), "torch.utils.cpp_extension.load")
refused(lambda: load_inline(name="k", cpp_sources=[""]), "torch.utils.cpp_extension.load_inline")
print("facade ok")
