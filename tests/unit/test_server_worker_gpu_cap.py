"""A session worker's CUDA memory cap (server/worker.py `cap_gpu_memory`): on a real GPU the worker's caching
allocator may hold the session's quota plus a margin, so that composite ops' temporaries, which the daemon's
accounting never sees, fail as that tenant's out-of-memory instead of taking the device's other sessions' memory.
Fake GPUs and the CPU are left untouched. (No GPU was lent where these were written: the CUDA case below runs
where one exists.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.server import worker
from gpupool.server.devices import Device, FakeDevice

GiB = 1024**3
MiB = 1024**2


def test_the_fraction_is_the_quota_and_its_margin_over_the_device() -> None:
    assert worker.gpu_memory_fraction(20 * GiB, 80 * GiB, 0) == 0.25
    assert worker.gpu_memory_fraction(20 * GiB, 80 * GiB, 4 * GiB) == pytest.approx(0.3)
    assert worker.gpu_memory_fraction(1, 4, -5) == 0.25  # a negative margin counts as none
    # no cap: a quota and margin that reach the whole device, or nothing known
    assert worker.gpu_memory_fraction(80 * GiB, 80 * GiB, 0) is None
    assert worker.gpu_memory_fraction(70 * GiB, 80 * GiB, 10 * GiB) is None
    assert worker.gpu_memory_fraction(0, 80 * GiB, GiB) is None
    assert worker.gpu_memory_fraction(GiB, 0, GiB) is None
    assert worker.gpu_memory_fraction(-GiB, 80 * GiB, GiB) is None


def test_the_default_margin_is_an_eighth_of_the_quota_and_256_mib() -> None:
    assert worker.gpu_margin(0) == 256 * MiB
    assert worker.gpu_margin(8 * GiB) == GiB + 256 * MiB
    assert worker.gpu_margin(-GiB) == 256 * MiB
    # a quarter of an 80 GiB device: 20 GiB, capped at 22.75 GiB
    quota = 20 * GiB
    assert worker.gpu_memory_fraction(quota, 80 * GiB, worker.gpu_margin(quota)) == pytest.approx(22.75 / 80)


class _Cuda(Device):
    """A CUDA device as the worker sees it (index, capacity, torch device), without touching CUDA."""

    def __init__(self, capacity: int) -> None:
        super().__init__(0, "GPU-test", "test GPU", capacity, fake=False)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda", 1)

    def timed(self) -> Any:
        raise NotImplementedError


def test_the_cap_is_set_on_cuda_devices_and_fake_gpus_are_untouched() -> None:
    calls: list[tuple[float, torch.device]] = []

    def apply(fraction: float, device: torch.device) -> None:
        calls.append((fraction, device))

    assert worker.cap_gpu_memory(_Cuda(80 * GiB), 20 * GiB, 4 * GiB, apply) == pytest.approx(0.3)
    assert calls == [(pytest.approx(0.3), torch.device("cuda", 1))]
    calls.clear()
    assert worker.cap_gpu_memory(_Cuda(80 * GiB), 80 * GiB, 0, apply) is None  # a whole device: no cap
    assert worker.cap_gpu_memory(FakeDevice(0, "host", 64 * MiB), MiB, 0, apply) is None
    assert calls == []
    # without a setter of its own a fake GPU still never reaches torch.cuda (a CPU-only torch would raise)
    assert worker.cap_gpu_memory(FakeDevice(0, "host", 64 * MiB), MiB, 0) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cap_makes_an_allocation_past_it_an_out_of_memory() -> None:  # pragma: no cover - needs a GPU
    """In a fresh process (the cap is per process, as each session's worker is its own): capped at 1 GiB over a
    256 MiB quota, 512 MiB fits and 2 GiB is torch's OutOfMemoryError."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from gpupool.server import worker\n"
        "from gpupool.server.devices import CudaDevice\n"
        "d = CudaDevice(0)\n"
        "f = worker.cap_gpu_memory(d, 256 * 2**20, 768 * 2**20)\n"
        "assert f is not None and abs(f * d.capacity - 2**30) < 2, f\n"
        "a = torch.empty(512 * 2**20, dtype=torch.uint8, device='cuda')\n"
        "try:\n"
        "    torch.empty(2 * 2**30, dtype=torch.uint8, device='cuda')\n"
        "except torch.OutOfMemoryError:\n"
        "    print('capped')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "capped" in done.stdout, done.stderr[-2000:]
