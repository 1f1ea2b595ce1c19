"""client/streams.py: the streams and events of `torch.gpupool` (what FSDP2 asks a mesh's device module for). One
ordered stream a device: an untimed event is recorded without waiting for the device (FSDP2 records several an
iteration), a timed one and `synchronize` wait. The device's sync is the client's own; here a counter stands in for
it (the real one needs a daemon session: tests/integration/test_cuda_scripts.py's FSDP2 runs use both clients')."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.client import streams

import gpupool.torch  # noqa: F401 - registers the device `gpupool` and its module torch.gpupool


@pytest.fixture
def synced() -> Iterator[list[Any]]:
    calls: list[Any] = []
    before = streams.Stream.synchronize_device
    functions = streams.module_functions(calls.append)
    assert set(functions) == {"Stream", "Event", "current_stream", "default_stream", "stream"}
    try:
        yield calls
    finally:
        streams.Stream.synchronize_device = before


def test_untimed_events_do_not_wait_and_timed_ones_do(synced: list[Any]) -> None:
    side = streams.Stream(torch.device("gpupool", 0), priority=-1)
    event = side.record_event()
    assert event.query() and synced == []  # recorded, no round trip
    streams.current_stream().wait_event(event)
    streams.current_stream().wait_stream(side)
    with streams.stream(side) as inside:
        assert inside is side
    assert synced == []
    start, end = streams.Event(enable_timing=True), streams.Event(enable_timing=True)
    start.record(side)
    end.record()
    assert synced == [torch.device("gpupool", 0), None] and start.elapsed_time(end) >= 0.0
    event.synchronize()
    side.synchronize()
    assert synced[2:] == [torch.device("gpupool", 0), torch.device("gpupool", 0)]
    with pytest.raises(RuntimeError, match="enable_timing=True"):
        event.elapsed_time(end)
    with pytest.raises(RuntimeError, match="interprocess"):
        streams.Event(interprocess=True)
    assert streams.current_stream(0) is streams.current_stream(torch.device("gpupool", 0))


def test_the_python_clients_device_module_has_them() -> None:
    module = torch.gpupool  # type: ignore[attr-defined]
    assert module.Stream is streams.Stream and module.Event is streams.Event
    assert isinstance(module.current_stream(), streams.Stream)
    with module.stream(module.Stream(priority=-1)):
        pass


def test_record_stream_of_a_gpupool_stream_is_accepted(synced: list[Any]) -> None:
    """apex's data_prefetcher calls `x.record_stream(torch.cuda.current_stream())` on each batch it copied on a side
    stream: with a gpupool stream there is nothing to record (one ordered stream; the daemon frees a tensor after the
    ops queued before), where torch's binding raised "unknown parameter type" until round 38. Anything else still goes
    to torch's binding."""
    t = torch.ones(2)
    assert t.record_stream(streams.current_stream()) is None
    assert t.record_stream(streams.Stream(priority=-1)) is None and synced == []
    with pytest.raises((TypeError, RuntimeError)):
        t.record_stream(3)  # type: ignore[arg-type]
