"""The host's GPUs behind one interface: real CUDA devices found through torch, or CPU-backed fake GPUs.

A fake GPU behaves like a real one towards everything above it: it has a capacity the daemon enforces,
a UUID for metrics, and a timer that reports busy time (wall time of execution; CUDA events on real GPUs).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from gpupool._proto import device_pb2
from gpupool.wire import device_info

from . import landlock, nvml
from .slices import WALL_TIMER, DeviceClock, Timed, WallTimer

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

    def slice_timer(self) -> Callable[[], AbstractContextManager[list[float]]]:
        """What one session's slices are timed with (`slices.run_commands`'s `timed`): `timed` itself, or on a
        CUDA device a `SliceTimer` of the session's own (it keeps the session's slices still on the GPU)."""
        return self.timed

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

    def measured_free(self, used: int, own_context: bool) -> int | None:
        """(terms54) The device's free memory as measured (the heartbeat's `DeviceUsage.free_bytes`), `used` being
        what its sessions hold by the daemon's count; None where not measured. A fake GPU's bound is its capacity."""
        return max(0, self.capacity - used)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.index}, {self.model!r}, {self.capacity} bytes)"


# A CUDA session's slices not yet completed on the GPU when one of its slices returns, at most (the returning one
# included): the next slice first waits for the oldest (`SliceTimer.__enter__`). 2 lets the worker launch slice
# n while the GPU still runs slice n-1 -- CPU and GPU overlap across slices, a step costs the larger of the two
# instead of their sum -- and a session has at most one slice's kernels queued beyond the one it launches, so
# its fair share is charged at most a slice late (1 would wait for the previous slice before launching anything:
# overlap with the round trip between slices only). Slices bound it, not seconds: a slice is cut by its CPU time
# (the daemon's budget) and its kernels may run longer; while another session of the device waits to run (the
# daemon's contended byte) a slice waits for its own end instead, as every slice did before (`SliceTimer`).
# Nothing else needed the GPU idle after a slice: the caching allocator's blocks are allocated and freed as ops
# launch and reused only by work queued after them on the same stream; an Upload's copy from host memory (the
# slice's buffer) and a Get's or a Sync's copy to it are torch's pageable copies, which wait for the stream and
# for the copy itself (cudaMemcpyAsync + stream synchronize); a graph capture synchronizes the device first; and
# the upload pool reuses host memory on fake GPUs only (server/uploadpool.py).
RUN_AHEAD = 2
RUN_AHEAD_ENV = "GPUPOOL_RUN_AHEAD"  # the daemon's environment (its workers inherit it): 0 waits for every slice


def run_ahead_from_env() -> int:
    """`GPUPOOL_RUN_AHEAD` (unset: RUN_AHEAD): 0 makes every slice wait for the GPU at its end, as before round 31
    (a switch back, and the A/B baseline of bench/launch_bound.py `--against . --against-env GPUPOOL_RUN_AHEAD=0`);
    ValueError names a malformed value (read when the daemon starts: it stops there)."""
    text = os.environ.get(RUN_AHEAD_ENV, "").strip()
    if not text:
        return RUN_AHEAD
    if not text.isdigit() or not 0 <= int(text) <= 16:
        raise ValueError(f"{RUN_AHEAD_ENV}={text!r}: expected slices 0 to 16 (0: every slice waits for the GPU)")
    return int(text)


RUN_AHEAD_SET = run_ahead_from_env()


def _never() -> bool:
    return False


def _always() -> bool:
    return True


class SliceTimer(DeviceClock):
    """A CUDA device's timer of one session's slices, without waiting for the GPU (issue 8): a slice's work is
    bracketed by two events recorded on the stream its kernels go to (the worker's current stream of the device),
    and the seconds between them are booked once its end event has completed -- reported with the result of a
    later slice, the first whose end finds it completed. `with timer() as out:` (as `Device.timed`): `out` gets
    one number at the exit, the seconds of this session's slices that completed since the last report (this one's
    own when it completed by then).

    Two events a slice, not one a boundary: events on one stream complete in order, so a slice's start event
    completes when the GPU is done with everything before it -- the previous slice's work, or at once on an idle
    stream -- and its end when its own work is done: consecutive slices' intervals do not overlap, and together
    they cover exactly the GPU's time on the session's work. One event a boundary (slice n from the end of n-1 to
    the end of n) would also count the idle gap between the slices: the client's round trip, other sessions'
    slices.

    The oldest slices are waited for (`RUN_AHEAD`) before a slice starts; a slice settles -- waits until its own
    end completed, and books everything -- when asked to (`settle`: it answers a Sync or a Get, whose answer
    means the device finished what came before it, or it is the daemon's flush: `slices.run_commands`), or when
    `contended()` says another session of the device waits to run (its slices would otherwise run against this
    session's queued kernels, and their time-slices land in its events). Every slice is booked exactly once: a
    pair leaves `_pending` only when its seconds are added to a report. Events are reused (`_free`): no event is
    created or destroyed a slice.

    `new_event`, `stream`, `guard` are torch's on a CUDA device (`CudaDevice.slice_timer`); a test drives this
    with stand-in events (no CUDA on the test host). `limit` 0: every slice settles (`GPUPOOL_RUN_AHEAD=0`)."""

    def __init__(
        self,
        new_event: Callable[[], Any],
        stream: Callable[[], Any],
        guard: AbstractContextManager[Any] | None = None,
        limit: int = RUN_AHEAD,
    ) -> None:
        self._new_event = new_event
        self._stream = stream
        self._guard = guard  # the session's device made current for the slice (torch.cuda.device)
        self.limit = max(1, limit)
        self.wait_always = limit <= 0
        self.contended: Callable[[], bool] = _never  # set by the worker: another session waits for the device
        self._pending: deque[tuple[Any, Any, Any]] = deque()  # (start, end, stream) of slices not yet booked
        self._free: list[Any] = []
        self._settle = False
        self._carry = 0.0  # seconds booked at the start of the running slice (the oldest, waited for)
        self._open: tuple[Any, Any] | None = None  # the running slice's start event and stream
        self._out: list[float] = []  # the running slice's report
        self.reported = 0.0  # every second reported so far (the session's total: tests)

    def __call__(self) -> SliceTimer:
        return self

    @property
    def busy(self) -> bool:
        """Whether a slice of the session may still run on the GPU (its result says so: the daemon answers no
        lone Sync of it by itself then)."""
        return bool(self._pending)

    def settle(self) -> None:
        """Make the running slice wait for the GPU at its end (it answers a Sync or a Get)."""
        self._settle = True

    def __enter__(self) -> list[float]:
        if self._guard is not None:
            self._guard.__enter__()
        try:
            carry = 0.0
            while len(self._pending) >= self.limit:
                oldest = self._pending[0]
                oldest[1].synchronize()
                carry += self._book(self._pending.popleft())
            self._carry = carry
            stream = self._stream()
            start = self._event()
            start.record(stream)
            self._open = (start, stream)
            self._out = []
        except BaseException:
            if self._guard is not None:
                self._guard.__exit__(None, None, None)
            raise
        return self._out

    def __exit__(self, *exc: Any) -> None:
        try:
            assert self._open is not None
            start, stream = self._open
            self._open = None
            end = self._event()
            end.record(stream)
            self._pending.append((start, end, stream))
            seconds = self._carry + self._collect(self._settle or self.wait_always or self.contended())
            self._carry = 0.0
            self.reported += seconds
            self._out.append(seconds)
        finally:
            self._settle = False
            if self._guard is not None:
                self._guard.__exit__(*exc)

    def _collect(self, wait: bool) -> float:
        """Book the pending slices that completed, oldest first (stopping at the first that did not); `wait`: all
        of them, after waiting for the newest (and for any older one recorded on another stream)."""
        got = 0.0
        pending = self._pending
        if wait and pending:
            newest = pending[-1]
            newest[1].synchronize()
            while pending:
                if pending[0][2] != newest[2]:
                    pending[0][1].synchronize()  # another stream: not ordered by the newest one's end
                got += self._book(pending.popleft())
            return got
        while pending and pending[0][1].query():
            got += self._book(pending.popleft())
        return got

    def _book(self, pair: tuple[Any, Any, Any]) -> float:
        start, end, _ = pair
        seconds = max(0.0, start.elapsed_time(end) / 1000.0)
        self._free += (start, end)
        return seconds

    def _event(self) -> Any:
        return self._free.pop() if self._free else self._new_event()


class FakeDevice(Device):
    """A CPU-backed GPU: capacity is enforced by the daemon's accounting, busy time is wall time."""

    def __init__(self, index: int, host_id: str, capacity: int, uuid_: str = "") -> None:
        # Stable across restarts of the same host, so dashboards keep their series.
        fake_uuid = uuid_ or "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, f"gpupool-fake.{host_id}.{index}"))
        super().__init__(index, fake_uuid, FAKE_MODEL, capacity, fake=True)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu")

    def timed(self) -> Timed:
        return Timed()

    def slice_timer(self) -> WallTimer:
        """`timed`'s twin of a fake device's sessions (`slices.WallTimer`: `slices._run_graphs` reads the clock
        itself for it, no context manager a slice)."""
        return WALL_TIMER


class CudaDevice(Device):
    """A real GPU; busy time comes from CUDA events around the work, synchronized at the end."""

    def __init__(self, index: int, ordinal: int = -1) -> None:
        """`index`: the host's number of the GPU (the daemon's, the sessions' claims'); `ordinal`: CUDA's number of
        it in this process where that differs (a session worker sees its own GPU alone, as cuda:0:
        CUDA_VISIBLE_DEVICES, server/worker.py `visible_device`)."""
        ordinal = index if ordinal < 0 else ordinal
        props = torch.cuda.get_device_properties(ordinal)
        pci = pci_address(props)
        raw_uuid = str(getattr(props, "uuid", "") or "")
        dev_uuid = cuda_uuid(raw_uuid, pci) if raw_uuid else f"GPU-cuda{index}"
        super().__init__(index, dev_uuid, props.name, int(props.total_memory), fake=False)
        self.pci = pci
        self._device = torch.device("cuda", ordinal)
        self._rng_lock = threading.Lock()

    @property
    def rng_lock(self) -> threading.Lock:
        return self._rng_lock

    @property
    def torch_device(self) -> torch.device:
        return self._device

    def timed(self) -> SliceTimer:
        """The work inside timed as before: its seconds once the GPU finished it (a timer that always settles).
        A session's slices are timed by its own `slice_timer` instead, which does not wait."""
        timer = self.slice_timer()
        timer.contended = _always
        return timer

    def slice_timer(self) -> SliceTimer:
        dev = self._device
        return SliceTimer(
            lambda: torch.cuda.Event(enable_timing=True),
            lambda: torch.cuda.current_stream(dev),
            torch.cuda.device(dev),
            RUN_AHEAD_SET,
        )

    def measured_free(self, used: int, own_context: bool) -> int | None:
        """The driver's free memory of the GPU (what every process on it leaves: contexts, caching allocators, other
        programs). Where this process holds a CUDA context of its own (`own_context`: sessions run in it, `--isolation
        thread`), CUDA's count plus the blocks its caching allocator holds free; else NVML's (quota55: server/nvml.py,
        no CUDA context: making one here would itself take hundreds of MiB of every GPU), None where NVML cannot say.
        """
        if not own_context:
            return nvml.NVML.free_memory(self.uuid, self.pci)
        try:
            free = torch.cuda.mem_get_info(self._device)[0]
            # (the blocks this process's caching allocator holds free are the sessions' to take as well)
            return int(free + torch.cuda.memory_reserved(self._device) - torch.cuda.memory_allocated(self._device))
        except Exception:  # noqa: BLE001 - a driver that cannot say: not measured (the scheduler keeps its books)
            log.debug("free memory of %s not measured", self, exc_info=True)
            return None

    def get_rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self._device)

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state, self._device)

    def new_rng_state(self, seed: int) -> torch.Tensor:
        return torch.Generator(device=self._device).manual_seed(seed).get_state()


def pci_address(props: Any) -> str:
    """A CUDA device's PCI address as the driver names its folder of /proc/driver/nvidia/gpus ("0000:18:00.0"), from
    its properties; "" where torch does not say."""
    try:
        return f"{int(props.pci_domain_id):04x}:{int(props.pci_bus_id):02x}:{int(props.pci_device_id):02x}.0"
    except (AttributeError, TypeError, ValueError):
        return ""


def cuda_uuid(raw: str, pci: str, layout: landlock.GpuLayout = landlock.DRIVER) -> str:
    """A CUDA device's UUID as CUDA_VISIBLE_DEVICES names it (server/worker.py `visible_device` narrows a session
    worker's CUDA to it), from torch's properties' `raw` (bare hex; a prefix is dropped) and its PCI address `pci`:
    "GPU-<raw>", or "MIG-<raw>" for a MIG instance. CUDA's properties name a MIG instance by its own UUID
    (cuDeviceGetUuid_v2), which is no GPU's: "GPU-<that>" in CUDA_VISIBLE_DEVICES matches no device, and the worker
    saw none (round 40 until fin40; before round 40 it inherited the daemon's list). A MIG instance is told by the
    driver's information file of the GPU at `pci` (server/landlock.py `GpuLayout`), whose "GPU UUID" is the parent
    GPU's, another UUID; where that file cannot be read, "GPU-<raw>" as before."""
    bare = raw.strip()
    if bare[:4].upper() == "MIG-":  # (named so already)
        return f"MIG-{bare[4:]}"
    if bare[:4].upper() == "GPU-":
        bare = bare[4:]
    gpu = f"GPU-{bare}"
    try:
        with open(os.path.join(layout.driver, "gpus", pci.lower(), "information")) as f:
            fields = dict(line.partition(":")[::2] for line in f if ":" in line)
    except (OSError, ValueError):
        return gpu
    parent = {k.strip().lower(): v.strip() for k, v in fields.items()}.get("gpu uuid", "")
    return gpu if not pci or not parent or parent.lower() == gpu.lower() else f"MIG-{bare}"


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


def rebuild(info: device_pb2.DeviceInfo, ordinal: int = -1) -> Device:
    """The same device inside a session worker (a new process: a CUDA device gets its own context there; `ordinal`:
    CUDA's number of it there, where the worker sees only its own GPU)."""
    if info.fake:
        return FakeDevice(info.index, "", info.memory_bytes, info.uuid)
    return CudaDevice(info.index, ordinal)
