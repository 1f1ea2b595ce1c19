"""Upload slots (server/worker.py, round 29): a big bulk upload's span is read from the side socket straight into
a free slot of the memory a session shares with its own worker (`ProcessRunner.upload_span`), and the slice that
runs it names the slot instead of copying the span into the data buffer (`slices.shared_request`'s `up_slot`).
A slot is handed out again only once nothing in the daemon refers to its span; a request naming a slot that does
not exist, or more bytes than a slot holds, is refused by the worker."""

from __future__ import annotations

import gc
import mmap
import socket
import threading
import time

import pytest
from gpupool.server import slices, worker

from gpupool import protocol


@pytest.fixture
def runner() -> object:
    ours, theirs = socket.socketpair()
    r = worker.ProcessRunner(0, ours, mmap.mmap(-1, worker.SHARED_BYTES), 1 << 20)
    yield r
    r.close()
    theirs.close()


def test_upload_slot_requests_round_trip() -> None:
    slots = [memoryview(bytearray(b"%d" % k * 8)) for k in range(worker.UP_SLOTS)]
    for k in range(worker.UP_SLOTS):
        for uploads in (False, True):
            req = slices.SliceRequest(7, 9, 0.25, b"", uploads=uploads, slot=1)
            body = slices.shared_request(req, 5, k)[4:]
            got = slices.decode_request(body, memoryview(b"shared"), slots)
            assert got is not None
            assert bytes(got.payload) == bytes(slots[k][:5]) and got.uploads == uploads and got.slot == 1
            assert (got.device_free, got.reply_room, got.budget) == (7, 9, 0.25)
    # without a slot: the data buffer, as before
    got = slices.decode_request(slices.shared_request(slices.SliceRequest(0, 0, 1.0, b""), 3)[4:], memoryview(b"abcd"))
    assert got is not None and bytes(got.payload) == b"abc"


def test_requests_naming_a_missing_slot_or_too_many_bytes_are_refused() -> None:
    slots = [memoryview(bytearray(8)), memoryview(bytearray(8))]
    req = slices.SliceRequest(0, 0, 1.0, b"")
    assert slices.decode_request(slices.shared_request(req, 4, 3)[4:], memoryview(bytearray(64)), slots) is None
    assert slices.decode_request(slices.shared_request(req, 9, 1)[4:], memoryview(bytearray(64)), slots) is None
    assert slices.decode_request(slices.shared_request(req, 4, 0)[4:], memoryview(bytearray(64)), ()) is None


def test_the_slots_fit_a_chunk_and_its_head() -> None:
    assert worker.UP_SLOT_BYTES >= protocol.CHUNK_BYTES + 64
    assert worker.UPS_AT >= worker.SLOTS_AT + worker.SLOTS * worker.SLOT_BYTES
    assert worker.SHARED_BYTES == worker.UPS_AT + worker.UP_SLOTS * worker.UP_SLOT_BYTES
    assert worker.UP_SLOTS <= 4  # a slot's number travels in the request kind's top 2 bits (slices.REQ_UP_SLOT)


def test_a_slot_is_handed_out_again_only_when_nothing_refers_to_its_span(
    runner: worker.ProcessRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "UP_WAIT", 0.05)
    queued = [("upload", runner.upload_span(1000 + k)) for k in range(worker.UP_SLOTS)]  # as a queue holds them
    spans = [span for _, span in queued]
    assert all(span is not None and runner.holds(span) for span in spans)
    for k, span in enumerate(spans):  # each in its slot of the shared mapping
        assert span is not None
        span[:2] = b"u%d" % k
    at = {runner._progress[worker.UPS_AT + k * worker.UP_SLOT_BYTES :][:2] for k in range(worker.UP_SLOTS)}
    assert at == {b"u%d" % k for k in range(worker.UP_SLOTS)}
    assert runner.upload_span(10) is None  # every slot held: the caller reads into its own memory
    del spans
    assert runner.upload_span(10) is None  # still held by the queue
    _, first = queued.pop(0)
    assert first is not None and len(first) == 1000
    first[:4] = b"abcd"
    del first  # the command ran and was dropped
    gc.collect()
    again = runner.upload_span(2000)
    assert again is not None and len(again) == 2000 and runner.holds(again)
    assert not runner.holds(memoryview(bytearray(2000)))  # memory of its own: not a slot
    assert runner.upload_span(worker.UP_SLOT_BYTES + 1) is None  # more than a slot holds


def test_a_waiting_reader_gets_the_slot_dropped_meanwhile(runner: worker.ProcessRunner) -> None:
    held = [runner.upload_span(100) for _ in range(worker.UP_SLOTS)]
    assert all(span is not None for span in held)
    got: list[memoryview | None] = []
    t = threading.Thread(target=lambda: got.append(runner.upload_span(100)))
    t.start()
    time.sleep(0.05)
    assert t.is_alive()  # waiting for a slot
    held.pop()
    t.join(worker.UP_WAIT + 5)
    assert got and got[0] is not None and runner.holds(got[0])


def test_a_dropped_span_wakes_the_waiting_reader(runner: worker.ProcessRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader waiting for a slot is woken by the drop of a span (its weakref's callback), not by its poll: with the
    poll and the wait both far longer than the test, it still gets the slot once one span is dropped (until round 35
    it looked every 5 ms and nothing woke it; on 12e843d this fails: there is no UP_POLL)."""
    monkeypatch.setattr(worker, "UP_POLL", 3600.0)
    monkeypatch.setattr(worker, "UP_WAIT", 3600.0)
    held = [runner.upload_span(100) for _ in range(worker.UP_SLOTS)]
    assert all(span is not None for span in held)
    got: list[memoryview | None] = []
    t = threading.Thread(target=lambda: got.append(runner.upload_span(100)), daemon=True)
    t.start()
    for _ in range(6000):  # until the reader sleeps in the condition (it looked at every slot: all held)
        with runner._up_free:
            if runner._up_free._waiters:  # type: ignore[attr-defined]
                break
        time.sleep(0.01)
    assert t.is_alive() and not got
    held.pop()  # the command ran: its span is dropped, and the drop wakes the reader
    t.join(60)  # a hang guard, not a timing: the poll would take an hour
    assert not t.is_alive() and got and got[0] is not None and runner.holds(got[0])
    assert len(held) == worker.UP_SLOTS - 1


def test_a_closed_runner_hands_out_no_slot(runner: worker.ProcessRunner) -> None:
    held = [runner.upload_span(100) for _ in range(worker.UP_SLOTS)]
    got: list[memoryview | None] = []
    t = threading.Thread(target=lambda: got.append(runner.upload_span(100)))
    t.start()
    runner.close()
    t.join(worker.UP_WAIT + 5)
    assert got == [None]
    assert runner.upload_span(100) is None
    del held


def test_a_view_made_of_a_span_holds_its_slot(runner: worker.ProcessRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slice, a cast or memoryview() of a slot's span still reads the slot: the slot is not handed out again while
    any of them lives, though the span itself was dropped (round 29 counted the span's own references: a view kept of
    a queued upload's bytes, say its data after `bulk.parse_upload`, would have read the next upload's bytes)."""
    monkeypatch.setattr(worker, "UP_WAIT", 0.02)
    views = []
    for make in (lambda v: v[64:], lambda v: v.cast("c"), memoryview, lambda v: v[:]):
        span = runner.upload_span(1000)
        assert span is not None
        views.append(make(span))
        del span
    gc.collect()
    assert runner.upload_span(10) is None  # all four slots still viewed
    assert not any(runner.holds(v) for v in views)  # a view made of a span is not the span: never run from its slot
    views.pop(0)
    again = runner.upload_span(10)
    assert again is not None and runner.holds(again)
    assert runner.upload_span(10) is None
