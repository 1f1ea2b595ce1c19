"""Streams and events of the `torch.gpupool` device module, for torch's code that asks a device module for them.

torch's FSDP2 (`fully_shard`) takes its device module from the mesh's device type (`_get_device_handle`:
`torch.gpupool` on a gpupool mesh) and asks it for side streams (`Stream(priority=...)`, `stream(s)`,
`current_stream()`) and events (`Event().record()`, `wait_event`, `wait_stream`, `record_event`) to overlap its
all-gathers and reduce-scatters with compute. A gpupool device has one ordered op stream (each op is a command of its
session's stream, run in order by the daemon), so every stream here is that one: waiting on a stream or an event is
already true, and an event is recorded without waiting (torch.cuda's facade under `--cuda`, client/cuda/facade.py,
waits at `record` for `elapsed_time`; FSDP2 records several events an iteration and times none). Both clients' device
modules take these (client/torch/backend.py, client/native/backend.py), each with its own `synchronize`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


class Stream:
    """The device's one ordered op stream: every op of a device already runs in order."""

    synchronize_device: Callable[[Any], None] = staticmethod(lambda device: None)  # type: ignore[assignment]

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        self.device = device
        self.priority = priority

    def wait_stream(self, stream: Stream) -> None:
        pass  # one stream: already ordered

    def wait_event(self, event: Event) -> None:
        pass

    def new_event(self) -> Event:
        return Event()

    def record_event(self, event: Event | None = None) -> Event:
        event = event or self.new_event()
        event.record(self)
        return event

    def synchronize(self) -> None:
        type(self).synchronize_device(self.device)

    def query(self) -> bool:
        self.synchronize()
        return True

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class Event:
    """An event on the one stream: recording it waits for nothing, unless it is timed (then `record` waits for the
    queued ops, so `elapsed_time` is wall-clock ms between two records); `synchronize` waits for the queued ops."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        if interprocess:
            raise RuntimeError("an interprocess Event is not available on gpupool: no IPC handles across the network")
        self.enable_timing = enable_timing
        self.recorded = False
        self.at: float | None = None
        self.device: Any = None

    def record(self, stream: Stream | None = None) -> Event:
        self.device = None if stream is None else stream.device
        self.recorded = True
        if self.enable_timing:
            Stream.synchronize_device(self.device)
            self.at = time.perf_counter()
        return self

    def synchronize(self) -> None:
        if self.recorded:
            Stream.synchronize_device(self.device)

    def query(self) -> bool:
        return self.recorded

    def wait(self, stream: Stream | None = None) -> None:
        pass

    def elapsed_time(self, end: Event) -> float:
        if self.at is None or end.at is None:
            raise RuntimeError("Event.elapsed_time: both events must be recorded with enable_timing=True first")
        return (end.at - self.at) * 1000.0


_current: dict[int, Stream] = {}


def current_stream(device: Any = None) -> Stream:
    index = device if isinstance(device, int) else (0 if device is None else torch.device(device).index or 0)
    return _current.setdefault(index, Stream(device))


@contextlib.contextmanager
def stream(s: Stream | None) -> Iterator[Stream | None]:
    yield s


_torch_record_stream = torch.Tensor.record_stream  # torch._C.TensorBase's: it takes only torch's own Stream objects


def record_stream(tensor: torch.Tensor, stream: Any) -> None:
    """`Tensor.record_stream(s)` (apex's data_prefetcher, FSDP-style overlap: "keep this tensor's memory until the work
    queued on s is done"): with a gpupool stream there is nothing to record, as a device's ops run in order on its one
    stream and the daemon frees a tensor after every op queued before the free. torch's binding refused such a stream
    ("unknown parameter type", until round 38); torch's own streams go to torch."""
    if isinstance(stream, Stream):
        return
    _torch_record_stream(tensor, stream)


def module_functions(synchronize: Callable[[Any], None]) -> dict[str, Any]:
    """What a gpupool device module adds for streams and events; `synchronize(device)` waits for a device's ops."""
    Stream.synchronize_device = staticmethod(synchronize)  # type: ignore[assignment]
    torch.Tensor.record_stream = record_stream  # type: ignore[method-assign,assignment]
    return {
        "Stream": Stream,
        "Event": Event,
        "current_stream": current_stream,
        "default_stream": current_stream,
        "stream": stream,
    }
