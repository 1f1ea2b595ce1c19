"""Run under `gpupool run --native-client --cuda` (one GPU): the torch.cuda facade on the C++ client, and one message
for each thing it refuses (asserts)."""

import io
import sys

import torch

assert torch.cuda.is_available() and torch.cuda.device_count() == 1, torch.cuda.device_count()
assert torch.cuda.is_initialized() and torch.cuda.current_device() == 0
props = torch.cuda.get_device_properties(0)  # before any tensor: attaches the lease's session
assert props.name == torch.cuda.get_device_name() == "gpupool fake GPU (CPU)", props
assert props.total_memory == int(sys.argv[1]), props.total_memory  # the quota of the lease
free, total = torch.cuda.mem_get_info()
assert total == props.total_memory and free <= total

a = torch.ones(1024, 256, device="cuda")  # 1 MiB
assert a.is_cuda and a.device == torch.device("gpupool", 0), a.device
used = torch.cuda.memory_allocated()  # after the buffered records went out
assert used >= 1024 * 256 * 4, used
assert torch.cuda.max_memory_allocated() >= used and torch.cuda.memory_reserved() >= used
assert torch.cuda.mem_get_info()[0] <= total - used
b = torch.arange(4.0).cuda(0)
assert b.device == torch.device("gpupool", 0) and torch.randn(2, device=0).device.index == 0
torch.cuda.set_device(0)
with torch.cuda.device(0):
    assert torch.empty(1, device=torch.device("cuda")).device == torch.device("gpupool", 0)
assert (b * 2).sum().item() == 12.0 and not torch.zeros(1).is_cuda
assert torch.nn.Linear(2, 2).to(torch.device("cuda", 0)).weight.device == torch.device("gpupool", 0)
torch.set_default_device("cuda")
assert torch.ones(1).device.type == "gpupool"
torch.set_default_device("cpu")

# Seeds reach the daemon's generator: the same seed, the same numbers.
torch.cuda.manual_seed_all(7)
r1 = torch.rand(8, device="cuda").cpu()
torch.cuda.manual_seed(7)
r2 = torch.rand(8, device="cuda").cpu()
torch.manual_seed(8)
r3 = torch.rand(8, device="cuda").cpu()
assert torch.equal(r1, r2) and not torch.equal(r1, r3), (r1, r2, r3)

# One ordered stream: events time wall clock between syncs; a side stream is the same stream.
events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
events[0].record()
total = (a @ a.T).sum().item()
events[1].record()
assert events[1].query() and events[0].elapsed_time(events[1]) > 0 and total == 1024 * 1024 * 256
side = torch.cuda.Stream()
with torch.cuda.stream(side):
    shifted = a - 1
torch.cuda.current_stream().wait_stream(side)
torch.cuda.synchronize()
assert shifted.abs().sum().item() == 0.0

# Autocast (amp.py's kernels on the C++ client's dispatch key).
with torch.autocast("cuda", dtype=torch.float16):
    half = torch.nn.functional.linear(a[:2], a[:3])
    assert half.dtype == torch.float16 and half.float().log_softmax(-1).dtype == torch.float32
assert torch.nn.functional.linear(a[:2], a[:3]).dtype == torch.float32

# torch.save of device tensors, and a checkpoint saved on a real GPU loaded without map_location.
buf = io.BytesIO()
torch.save({"w": torch.arange(3.0, device="cuda"), "i": torch.arange(5, device="cuda")[1:]}, buf)
buf.seek(0)
loaded = torch.load(buf)
assert loaded["w"].device == torch.device("gpupool", 0) and loaded["w"].tolist() == [0.0, 1.0, 2.0]
assert loaded["i"].tolist() == [1, 2, 3, 4]
buf.seek(0)
assert torch.load(buf, map_location="cpu")["w"].device.type == "cpu"

import torch.distributed as dist  # noqa: E402

# nccl is the gpupool backend on the C++ client too (a group of one: its allreduce is the identity)
dist.init_process_group("nccl", store=dist.TCPStore("127.0.0.1", 0, 1, True), rank=0, world_size=1)
reduced = torch.arange(3.0, device="cuda") * 2
dist.all_reduce(reduced)
assert dist.get_backend() == "nccl" and reduced.tolist() == [0.0, 2.0, 4.0]
dist.destroy_process_group()


def refused(fn, *names):
    try:
        fn()
    except RuntimeError as exc:
        assert all(n in str(exc) for n in names), exc
        print("refused:", exc, file=sys.stderr)
    else:
        raise AssertionError(f"{names} was not refused")


pooled = "not available on a pooled GPU"
past = "gpupool:1 is not a device of this process (1 leased: gpupool:0..0)"  # a lease of one GPU
refused(lambda: torch.ones(2, device="cuda:1"), past)
refused(lambda: torch.cuda.get_device_name(1), past)
refused(lambda: torch.cuda.synchronize("cuda:1"), past)
refused(lambda: torch.nn.DataParallel(torch.nn.Linear(2, 2).cuda()), "torch.nn.DataParallel", pooled)
refused(lambda: torch.cuda.CUDAGraph(), "torch.cuda.CUDAGraph", pooled)
lin = torch.nn.Linear(2, 2).cuda()
assert torch.compile(lin) is lin  # runs eagerly (round 42; refused before)
assert torch.cuda.nvtx.range_push("a") == 0 and torch.cuda.nvtx.range_pop() == 0
torch.cuda.set_per_process_memory_fraction(0.5)
state = torch.cuda.get_rng_state()  # the daemon's generator, read and loaded back (round 43; refused before)
drawn = torch.rand(3, device="cuda")
torch.cuda.set_rng_state(state)
assert torch.equal(torch.rand(3, device="cuda"), drawn)
print("facade ok")
