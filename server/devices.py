"""The host's GPUs behind one interface: real CUDA devices found through torch, or CPU-backed fake GPUs.

A fake GPU behaves like a real one towards everything above it: it has a capacity the daemon enforces,
a UUID for metrics, and a timer that reports busy time (wall time of execution; CUDA events on real GPUs).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from gpupool._proto import device_pb2
from gpupool.wire import device_info

log = logging.getLogger(__name__)

FAKE_MODEL = "gpupool fake GPU (CPU)"
# Fake GPUs share the CPU's default generator: sessions' generator states are swapped in one at a time.
_CPU_RNG_LOCK = threading.Lock()


class Device(ABC):
    """One device of this host: where tensors live and how long work on it takes."""

    def __init__(self, index: int, uuid_: str, model: str, capacity: int, fake: bool) -> None:
        self.index = index
        self.uuid = uuid_
        self.model = model
        self.capacity = capacity
        self.fake = fake

    @property
    @abstractmethod
    def torch_device(self) -> torch.device:
        """The torch device tensors of this device are allocated on."""

    def info(self) -> device_pb2.DeviceInfo:
        return device_info(self.index, self.uuid, self.model, self.capacity, self.fake)

    @abstractmethod
    def timed(self) -> AbstractContextManager[list[float]]:
        """Measure the execution time of the work done inside; the seconds land in the list it enters as."""

    @property
    def rng_lock(self) -> threading.Lock:
        """Held while a session's generator state is swapped into the device's default generator."""
        return _CPU_RNG_LOCK

    def get_rng_state(self) -> torch.Tensor:
        """The device's default generator state (the daemon swaps per-session states in and out)."""
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)

    def new_rng_state(self, seed: int) -> torch.Tensor:
        """The generator state right after `torch.manual_seed(seed)` on this kind of device."""
        return torch.Generator().manual_seed(seed).get_state()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.index}, {self.model!r}, {self.capacity} bytes)"


class _Timed:
    """A fake device's `timed`: the wall time of the work inside (a slice's, each slice: no generator frame)."""

    __slots__ = ("out", "start")

    def __enter__(self) -> list[float]:
        self.out: list[float] = []
        self.start = time.perf_counter()
        return self.out

    def __exit__(self, *exc: object) -> None:
        self.out.append(time.perf_counter() - self.start)


class FakeDevice(Device):
    """A CPU-backed GPU: capacity is enforced by the daemon's accounting, busy time is wall time."""

    def __init__(self, index: int, host_id: str, capacity: int, uuid_: str = "") -> None:
        # Stable across restarts of the same host, so dashboards keep their series.
        fake_uuid = uuid_ or "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, f"gpupool-fake.{host_id}.{index}"))
        super().__init__(index, fake_uuid, FAKE_MODEL, capacity, fake=True)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu")

    def timed(self) -> _Timed:
        return _Timed()


class CudaDevice(Device):
    """A real GPU; busy time comes from CUDA events around the work, synchronized at the end."""

    def __init__(self, index: int) -> None:
        props = torch.cuda.get_device_properties(index)
        raw_uuid = str(getattr(props, "uuid", "") or "")
        dev_uuid = raw_uuid if raw_uuid.startswith("GPU-") else f"GPU-{raw_uuid}" if raw_uuid else f"GPU-cuda{index}"
        super().__init__(index, dev_uuid, props.name, int(props.total_memory), fake=False)
        self._device = torch.device("cuda", index)
        self._rng_lock = threading.Lock()

    @property
    def rng_lock(self) -> threading.Lock:
        return self._rng_lock

    @property
    def torch_device(self) -> torch.device:
        return self._device

    @contextmanager
    def timed(self) -> Iterator[list[float]]:
        out: list[float] = []
        with torch.cuda.device(self._device):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield out
            finally:
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / 1000.0)

    def get_rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self._device)

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state, self._device)

    def new_rng_state(self, seed: int) -> torch.Tensor:
        return torch.Generator(device=self._device).manual_seed(seed).get_state()


def cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception:  # a broken driver must not stop a daemon that was asked for fake GPUs
        log.exception("CUDA probe failed; treating this host as GPU-less")
        return False


def discover(host_id: str, fake_gpus: int = 0, fake_memory: int = 8 * 1024**3) -> list[Device]:
    """Real CUDA devices when torch sees any and no fakes were asked for; else `fake_gpus` fakes (at least one)."""
    if fake_gpus <= 0 and cuda_available():
        devices: list[Device] = [CudaDevice(i) for i in range(torch.cuda.device_count())]
        log.info("found %d CUDA device(s): %s", len(devices), ", ".join(d.model for d in devices))
        return devices
    count = max(1, fake_gpus)
    if fake_gpus <= 0:
        log.info("no CUDA device found; serving 1 fake GPU")
    return [FakeDevice(i, host_id, fake_memory) for i in range(count)]


def rebuild(info: device_pb2.DeviceInfo) -> Device:
    """The same device inside a session worker (a new process: a CUDA device gets its own context there)."""
    if info.fake:
        return FakeDevice(info.index, "", info.memory_bytes, info.uuid)
    return CudaDevice(info.index)
