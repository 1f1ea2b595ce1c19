"""`torch.cuda` answered from the lease: count, current device, names, memory, sync, seeds, streams, events.

Functions are replaced on the real `torch.cuda` module (so `from torch.cuda import x` after the autoload
and torch's own callers get them too). Memory figures come from the daemon (the session's used bytes and
quota, `Device.Status`); the peak is the highest value this process has read. There is one ordered op
stream per device, so streams are that stream and events time wall clock between sync points.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

import gpupool.torch as gt

from .. import rng, streams
from .devices import cuda_index, pool_index, to_gpupool

_peak: dict[int, int] = {}


def leased_count() -> int:
    """Devices of the lease of `gpupool run` ($GPUPOOL_LEASE); 1 elsewhere (the shim leases one on first use)."""
    if os.environ.get("GPUPOOL_LEASE"):
        from ..pool import Lease

        lease = Lease.from_env()
        return len(lease.devices) if lease is not None else 1
    return max(1, gt.device_count())


def _index(device: Any = None) -> int:
    """The gpupool index of a torch.cuda device argument (CUDA numbers, gpupool devices, None: the current one)."""
    if device is None:
        return gt.current_index()
    if isinstance(device, int) and not isinstance(device, bool):
        return pool_index(device)
    d = to_gpupool(torch.device(device) if isinstance(device, str) else device)
    return gt.current_index() if d.index is None else int(d.index)


def _session(device: Any = None) -> Any:
    """The session of a device (attached on first use): the shim's, or the C++ client's (gpupool.client.native)."""
    from .. import native

    i = _index(device)
    gt.device(i)  # attached on first use; an index the lease lacks is a ValueError naming it
    if native.active():
        return native.ensure_session(i)
    from ..torch import runtime  # the session's DeviceInfo and quota are not exported otherwise

    rt = runtime.get(i)
    assert rt is not None
    return rt.session


def _synced_session(device: Any = None) -> Any:
    """The session, after every op queued so far ran (the C++ client's buffered records go out first, its Frees with
    them). The shim's Frees of tensors that died wait for a batch (client/torch/runtime.py FREE_BATCH): they go out
    first here, as CUDA frees a dead tensor's memory at once (`memory_allocated` counted them until round 37)."""
    from .. import native

    s = _session(device)
    if native.active():
        torch.gpupool.synchronize()  # type: ignore[attr-defined]
    else:
        from ..torch import runtime

        rt = runtime.get(_index(device))
        if rt is not None:
            rt.flush_frees(force=True)
        s.sync()
    return s


def get_rng_state(device: Any = "cuda") -> torch.Tensor:
    """The device's generator state (it lives on the daemon: one round trip; since round 43, feature "rng_state"):
    a uint8 tensor that `set_rng_state` loads back, as `torch.random.fork_rng` and checkpoints of RNG states do. Its
    size is the daemon generator's (5,056 bytes on a fake GPU, 16 on a CUDA one), not a local GPU's."""
    return rng.get_rng_state(_index(device), "torch.cuda.get_rng_state")


def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    """Load the device's generator from a state `get_rng_state` returned, in stream order (the daemon checks it: a
    state of another generator fails at the next sync, INVALID_ARGUMENT)."""
    rng.set_rng_state(new_state, _index(device), "torch.cuda.set_rng_state")


def get_rng_state_all() -> list[torch.Tensor]:
    return [get_rng_state(i) for i in range(leased_count())]


def set_rng_state_all(new_states: Any) -> None:
    for i, state in enumerate(new_states):
        set_rng_state(state, i)


@dataclass(frozen=True)
class DeviceProperties:
    """What `torch.cuda.get_device_properties` answers for a leased (fraction of a) GPU."""

    name: str
    total_memory: int  # the lease's memory quota, not the whole GPU
    major: int = 0
    minor: int = 0
    multi_processor_count: int = 0
    is_integrated: bool = False
    uuid: str = ""
    fake: bool = False


def get_device_properties(device: Any = None) -> DeviceProperties:
    s = _session(device)
    return DeviceProperties(
        name=s.device.model, total_memory=int(s.quota_bytes), uuid=s.device.uuid, fake=bool(s.device.fake)
    )


def get_device_name(device: Any = None) -> str:
    return str(_session(device).device.model)


def get_device_capability(device: Any = None) -> tuple[int, int]:
    return (0, 0)  # unknown over the wire: libraries keyed on capability take their generic paths


def memory_allocated(device: Any = None) -> int:
    """Bytes the session holds on the daemon (after the queued ops ran)."""
    from gpupool import protocol
    from gpupool._proto import device_pb2, device_pb2_grpc
    from gpupool.tokens import public_session_id

    s = _synced_session(device)
    # naming its session: a daemon shows a caller only the sessions it holds (docs/security.md, "Credentials and
    # what they grant")
    reply = device_pb2_grpc.DeviceStub(s._channel).Status(
        device_pb2.StatusRequest(), timeout=10, metadata=((protocol.SESSION_METADATA, s.session_id),)
    )
    tag = public_session_id(s.session_id)
    used = next((int(u.used_bytes) for u in reply.sessions if u.session_id == tag), 0)
    i = _index(device)
    _peak[i] = max(_peak.get(i, 0), used)
    return used


def max_memory_allocated(device: Any = None) -> int:
    memory_allocated(device)
    return _peak[_index(device)]


def reset_peak_memory_stats(device: Any = None) -> None:
    _peak.pop(_index(device), None)


def mem_get_info(device: Any = None) -> tuple[int, int]:
    """(free, total) of the lease: the quota is the total."""
    total = int(_session(device).quota_bytes)
    return max(0, total - memory_allocated(device)), total


def memory_summary(device: Any = None, abbreviated: bool = False) -> str:
    free, total = mem_get_info(device)
    i = _index(device)
    return f"gpupool device {i}: {total - free} of {total} bytes used (the lease's quota), peak {_peak.get(i, 0)}"


def memory_stats(device: Any = None) -> dict[str, int]:
    """torch's `torch.cuda.memory_stats()` keys that the daemon's figures answer: the session's bytes now and the peak
    this process read (as `memory_allocated()` and `max_memory_allocated()`; reserved is allocated, the daemon frees
    dead tensors itself), no retries or OOMs counted here. torch's own returned {} (its allocator never ran), so a
    script's `torch.cuda.memory_stats()["allocated_bytes.all.peak"]` was a KeyError (until round 47). The cumulative
    counts (`...allocated`, `...freed`, `num_alloc_retries` of the daemon's allocator) are not known here and absent."""
    current = memory_allocated(device)
    peak = _peak[_index(device)]
    stats = {"num_ooms": 0, "num_alloc_retries": 0}
    for kind in ("allocated_bytes", "reserved_bytes", "active_bytes", "requested_bytes"):
        stats[f"{kind}.all.current"] = current
        stats[f"{kind}.all.peak"] = peak
    return dict(sorted(stats.items()))


def set_device(device: Any) -> None:
    _set_pool(_index(device))


def current_device() -> int:
    """The current device in CUDA numbers (a torchrun rank's own device is `cuda:LOCAL_RANK`)."""
    return cuda_index(gt.current_index())


def _set_pool(index: int) -> None:
    torch.gpupool.set_device(index)  # type: ignore[attr-defined]


def synchronize(device: Any = None) -> None:
    gt.synchronize(None if device is None else _index(device))


_seeded: list[int] = []  # the last seed manual_seed gave the devices


def manual_seed(seed: int) -> None:
    torch.gpupool.manual_seed_all(int(seed))  # type: ignore[attr-defined]
    _seeded[:] = [int(seed)]


def initial_seed() -> int:
    """The devices' seed: the last `torch.cuda.manual_seed(_all)` (torch.manual_seed calls it), else torch's own
    initial seed, which the devices' generators start from (client/native/__init__.py, client/torch/runtime.py).
    Until round 49 torch's own function asked the absent CUDA library (AttributeError: `_cuda_getDevice`)."""
    return _seeded[-1] if _seeded else torch.initial_seed()


class device:  # noqa: N801 - the name of torch.cuda.device
    """`with torch.cuda.device(i):` makes gpupool:i current inside."""

    def __init__(self, device: Any) -> None:
        self.idx = -1 if device is None else _index(device)
        self.prev = -1

    def __enter__(self) -> None:
        self.prev = gt.current_index()
        if self.idx >= 0:
            _set_pool(self.idx)

    def __exit__(self, *exc: object) -> None:
        if self.idx >= 0:
            _set_pool(self.prev)


class Stream(streams.Stream):
    """The device's one ordered op stream (client/streams.py), named by its CUDA device."""

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        super().__init__(torch.device("cuda", cuda_index(_index(device))), priority)

    def new_event(self) -> Event:
        return Event()

    def synchronize(self) -> None:
        synchronize(self.device)


class Event(streams.Event):
    """record() waits for the device's queued ops and takes the time, so elapsed_time() is wall clock (ms)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        if interprocess:
            raise RuntimeError("torch.cuda.Event(interprocess=True) is not available on a pooled GPU (gpupool)")
        super().__init__(enable_timing, blocking)

    def record(self, stream: streams.Stream | None = None) -> Event:
        synchronize(None if stream is None else stream.device)
        self.recorded, self.at = True, time.perf_counter()
        return self

    def synchronize(self) -> None:
        pass  # record() already waited


_streams: dict[int, Stream] = {}


def current_stream(device: Any = None) -> Stream:
    i = _index(device)
    return _streams.setdefault(i, Stream(torch.device("cuda", cuda_index(i))))


@contextlib.contextmanager
def stream(s: Stream | None) -> Iterator[Stream | None]:
    yield s


class StreamContext:
    """`with torch.cuda.StreamContext(s):`, the class `torch.cuda.stream(s)` returns on a GPU: the device has one
    ordered stream, so nothing to switch (torch's own read `s.stream_id`, which the facade's streams have not: until
    round 49 an AttributeError)."""

    def __init__(self, stream: Stream | None) -> None:
        self.stream = stream

    def __enter__(self) -> Stream | None:
        return self.stream

    def __exit__(self, *exc: object) -> None:
        return None


def set_stream(stream: Stream | None) -> None:
    """`torch.cuda.set_stream(s)`: the device's one stream stays current (as `StreamContext`)."""


def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
    """Checked as torch checks it, then nothing more: the lease's memory (the daemon's quota of the session) is what
    bounds the process; a fraction of it is not enforced (docs/cuda.md)."""
    _index(device)  # a device the lease lacks is refused, as in every torch.cuda call
    if not isinstance(fraction, float):
        raise TypeError("Invalid type for fraction argument, must be `float`")
    if fraction < 0 or fraction > 1:
        raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")


class _Nvtx:
    """`torch.cuda.nvtx`'s binding where torch has none (a CPU-only build raised "NVTX functions not installed" at
    `range_push`, `range_pop`, `mark` and `with torch.cuda.nvtx.range(...)`: profiling markers in training loops).
    The markers annotate a local GPU's timeline for Nsight; there is none here, so they mark nothing, and answer as
    NVTX does: push and pop the zero-based depth, start a unique range id."""

    def __init__(self) -> None:
        self.depth = 0
        self.ids = 0

    def rangePushA(self, msg: str) -> int:  # noqa: N802 - NVTX's names
        self.depth += 1
        return self.depth - 1

    def rangePop(self) -> int:  # noqa: N802
        if self.depth == 0:
            return -1  # NVTX's answer for a pop with no range open
        self.depth -= 1
        return self.depth

    def rangeStartA(self, msg: str) -> int:  # noqa: N802
        self.ids += 1
        return self.ids

    def rangeEnd(self, range_id: int) -> None:  # noqa: N802
        pass

    def markA(self, msg: str) -> None:  # noqa: N802
        pass

    def deviceRangeStart(self, msg: str, stream: int = 0) -> object:  # noqa: N802
        return object()

    def deviceRangeEnd(self, handle: object, stream: int = 0) -> None:  # noqa: N802
        pass


def _install_nvtx() -> None:
    import torch.cuda.nvtx as nvtx

    if type(nvtx._nvtx).__name__ == "_NVTXStub":  # torch built without NVTX: its stub raises at every call
        nvtx._nvtx = _Nvtx()  # type: ignore[assignment]


_NO_GRAPHS = "CUDA graphs run on the local GPU only; a step replayed on the pool is gpupool.torch.capture"
_NO_ALLOCATOR = "the allocator is the daemon's; torch.cuda.memory_stats() and memory_allocated() give its bytes"


def _refuse(name: str, why: str = "") -> Any:
    def refused(*_: Any, **__: Any) -> Any:
        raise RuntimeError(f"{name} is not available on a pooled GPU (gpupool run --cuda){': ' + why if why else ''}")

    refused.__name__ = name.rsplit(".", 1)[-1]
    return refused


def install() -> None:
    """Replace the functions of `torch.cuda` (docs/cuda.md lists them)."""
    cuda = torch.cuda
    answers: dict[str, Any] = {
        "is_available": lambda: True,
        "is_initialized": lambda: True,
        "init": lambda: None,
        "_lazy_init": lambda: None,
        "device_count": leased_count,
        "current_device": current_device,
        "set_device": set_device,
        "device": device,
        "get_device_name": get_device_name,
        "get_device_properties": get_device_properties,
        "get_device_capability": get_device_capability,
        "is_bf16_supported": lambda including_emulation=True: True,
        "memory_allocated": memory_allocated,
        "max_memory_allocated": max_memory_allocated,
        "memory_reserved": memory_allocated,
        "max_memory_reserved": max_memory_allocated,
        "reset_peak_memory_stats": reset_peak_memory_stats,
        "reset_max_memory_allocated": reset_peak_memory_stats,
        "mem_get_info": mem_get_info,
        "memory_summary": memory_summary,
        "empty_cache": lambda: None,  # the daemon frees a session's dead tensors itself
        "ipc_collect": lambda: None,
        "synchronize": synchronize,
        "manual_seed": manual_seed,
        "manual_seed_all": manual_seed,
        "seed": lambda: manual_seed(torch.initial_seed()),
        "seed_all": lambda: manual_seed(torch.initial_seed()),
        "Stream": Stream,
        "Event": Event,
        "current_stream": current_stream,
        "default_stream": current_stream,
        "stream": stream,
        "StreamContext": StreamContext,
        "set_stream": set_stream,
        "initial_seed": initial_seed,
        "get_rng_state": get_rng_state,
        "set_rng_state": set_rng_state,
        "get_rng_state_all": get_rng_state_all,
        "set_rng_state_all": set_rng_state_all,
        "CUDAGraph": _refuse("torch.cuda.CUDAGraph", _NO_GRAPHS),
        "graph": _refuse("torch.cuda.graph", _NO_GRAPHS),
        "make_graphed_callables": _refuse("torch.cuda.make_graphed_callables", _NO_GRAPHS),
        "set_per_process_memory_fraction": set_per_process_memory_fraction,
        "memory_stats": memory_stats,
        # (a pooled GPU runs no CUDA graphs: nothing is ever being captured; libraries ask before they synchronize)
        "is_current_stream_capturing": lambda: False,
        "graph_pool_handle": _refuse("torch.cuda.graph_pool_handle", _NO_GRAPHS),
        "memory_snapshot": _refuse("torch.cuda.memory_snapshot", _NO_ALLOCATOR),
    }
    # NVML's figures: torch asks the local NVML (pynvml), which knows the local GPUs, not the leased one (on a host
    # without one torch's error was "nvidia-ml-py does not seem to be installed")
    for name in ("utilization", "temperature", "power_draw", "clock_rate", "list_gpu_processes", "device_memory_used"):
        answers[name] = _refuse(f"torch.cuda.{name}", "NVML reports this machine's GPUs, not the leased one")
    for name, value in answers.items():
        setattr(cuda, name, value)
    import torch.cuda.random as cuda_random

    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all", "manual_seed",
                 "manual_seed_all", "seed", "seed_all", "initial_seed"):  # fmt: skip
        setattr(cuda_random, name, answers[name])  # (HF Trainer saves torch.cuda.random.get_rng_state_all())
    cuda.memory.set_per_process_memory_fraction = set_per_process_memory_fraction
    for name in ("memory_stats", "memory_snapshot"):
        setattr(cuda.memory, name, answers[name])
    # the memory profiler's recording (torch's memory-visualization recipe): the allocator recorded is the daemon's
    for name in ("_record_memory_history", "_snapshot", "_dump_snapshot"):
        setattr(cuda.memory, name, _refuse(f"torch.cuda.memory.{name}", _NO_ALLOCATOR))
    _install_nvtx()
    graphs = getattr(cuda, "graphs", None)
    if graphs is not None:
        for name in ("CUDAGraph", "graph", "make_graphed_callables", "is_current_stream_capturing",
                     "graph_pool_handle"):  # fmt: skip
            setattr(graphs, name, answers[name])
    from torch.cuda import nccl

    # "nccl" here is the gpupool backend (nccl.py): no NCCL in this process to ask. torch's c10d error logger asks for
    # the version of a failing collective's "nccl" group, and a CPU-only torch's AttributeError ('_nccl_version') hid
    # every such error (until round 36)
    nccl.version = lambda: (0, 0, 0)
