"""A CUDA device's slices stop waiting for the GPU (devices.SliceTimer): a slice's GPU seconds are booked once its
end event completed, reported with a later slice's result; at most RUN_AHEAD slices of a session are unfinished on
the GPU; a Sync, a Get, the daemon's flush and a contended device wait for it; nothing is lost or booked twice.

No CUDA here: the CPU tests drive the timer with STAND-IN events and a stand-in stream (`_Stream`, `_Event`: a
simulated GPU clock, events that complete in stream order), the only part that cannot run on this host. The real
CudaDevice is checked by the `@cuda` tests at the end (skipped here; bench/real_gpu.sh's `tests` stage runs them).
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from gpupool.server import devices, slices, worker
from gpupool.server.front import GpuClock

from gpupool._proto import device_pb2

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _Stream:
    """A STAND-IN for a CUDA stream: work queued on it ends at `tail` on a simulated GPU clock `now`, which moves
    only when the test lets time pass (`advance`) or someone waits (`_Event.synchronize`)."""

    def __init__(self, work_per_slice: float = 0.0) -> None:
        self.now = 0.0
        self.tail = 0.0
        self.work_per_slice = work_per_slice  # launched between a slice's two records (`_Event.record`), if set
        self.records = 0
        self.syncs = 0
        self.queries = 0

    def launch(self, seconds: float) -> None:
        self.tail = max(self.tail, self.now) + seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Event:
    """A STAND-IN for torch.cuda.Event(enable_timing=True) on a `_Stream`: it completes when the GPU clock reaches
    the work queued before its record (so events of one stream complete in order)."""

    created = 0

    def __init__(self) -> None:
        _Event.created += 1
        self.stream: _Stream | None = None
        self.at = 0.0

    def record(self, stream: _Stream) -> None:
        if stream.work_per_slice and stream.records % 2:  # an end record: the slice's kernels came before it
            stream.launch(stream.work_per_slice)
        stream.records += 1
        self.stream = stream
        self.at = max(stream.tail, stream.now)  # an idle stream reaches it at once

    def query(self) -> bool:
        assert self.stream is not None
        self.stream.queries += 1
        return self.stream.now >= self.at

    def synchronize(self) -> None:
        assert self.stream is not None
        self.stream.syncs += 1
        self.stream.now = max(self.stream.now, self.at)

    def elapsed_time(self, end: _Event) -> float:
        assert self.query() and end.query(), "both events must be completed"
        return (end.at - self.at) * 1000.0


def _timer(stream: _Stream, limit: int = devices.RUN_AHEAD) -> devices.SliceTimer:
    return devices.SliceTimer(_Event, lambda: stream, None, limit)


def _slice(timer: devices.SliceTimer, stream: _Stream, work: float, settle: bool = False) -> float:
    """One slice that launches `work` seconds of kernels; returns the seconds its result reports."""
    with timer() as out:
        stream.launch(work)
        if settle:
            timer.settle()
    assert len(out) == 1
    return out[0]


def test_a_slice_returns_before_its_kernels_finish_and_its_time_comes_with_a_later_result() -> None:
    stream = _Stream()
    timer = _timer(stream)
    assert _slice(timer, stream, 0.010) == 0.0  # its kernels still run: nothing waited, nothing reported
    assert timer.busy and stream.syncs == 0
    stream.advance(0.010)  # the GPU finished it while the client prepared the next frame
    got = _slice(timer, stream, 0.002)
    assert got == pytest.approx(0.010)  # the first slice's time, with the second's result
    assert timer.busy  # the second one still runs
    stream.advance(1.0)
    assert _slice(timer, stream, 0.0) == pytest.approx(0.002)
    assert stream.syncs == 0


def test_run_ahead_is_bounded_the_next_slice_waits_for_the_oldest() -> None:
    stream = _Stream()
    timer = _timer(stream, limit=2)
    reports = [_slice(timer, stream, 1.0) for _ in range(6)]  # the GPU never catches up on its own
    # at most 2 unfinished when a slice returns: each slice from the third on first waited for the oldest
    assert len(timer._pending) == 2 and stream.syncs == 4
    assert reports[:2] == [0.0, 0.0] and reports[2:] == pytest.approx([1.0] * 4)
    one = _timer(_Stream(), limit=1)  # limit 1: every slice waits for the previous one first
    s1 = one._stream()
    for _ in range(3):
        _slice(one, s1, 0.5)
        assert len(one._pending) == 1
    assert s1.syncs == 2


def test_an_answer_a_flush_or_a_contended_device_settles_the_slice() -> None:
    stream = _Stream()
    timer = _timer(stream)
    _slice(timer, stream, 0.5)
    assert _slice(timer, stream, 0.25, settle=True) == pytest.approx(0.75)  # both, after waiting for the newest
    assert not timer.busy and stream.syncs == 1  # one wait: the older end is ordered before the newest on its stream
    _slice(timer, stream, 0.5)
    assert timer.busy
    timer.contended = lambda: True  # another session of the device waits to run: its slices must not meet ours
    assert _slice(timer, stream, 0.125) == pytest.approx(0.625)
    assert not timer.busy
    timer.contended = lambda: False
    assert _slice(timer, stream, 0.5) == 0.0 and timer.busy and not timer._settle  # settle lasts one slice


def test_each_slice_is_booked_once_and_the_sum_is_the_gpus_time() -> None:
    """Random work, random idle gaps, random answers and contention: the seconds reported in all equal the sum of
    the slices' event intervals (each slice's time on the GPU, idle gaps between slices excluded), events are
    reused (a handful in all), and the bound holds after every slice."""
    rng = random.Random(31)
    for limit in (1, 2, 3):
        _Event.created = 0
        stream = _Stream()
        timer = _timer(stream, limit)
        contended = [False]
        timer.contended = lambda flag=contended: flag[0]
        total = work_done = 0.0
        for _ in range(400):
            work = rng.choice([0.0, 1e-4, 1e-3, 0.05])
            contended[0] = rng.random() < 0.05
            total += _slice(timer, stream, work, settle=rng.random() < 0.1)
            work_done += work
            assert len(timer._pending) <= limit
            stream.advance(rng.choice([0.0, 0.0, 1e-4, 0.01]))  # the round trip between slices: GPU idle or busy
        with timer() as out:  # the daemon's flush: a slice of no commands that settles
            timer.settle()
        total += out[0]
        assert not timer.busy
        assert total == pytest.approx(work_done, rel=1e-9, abs=1e-12)
        assert timer.reported == pytest.approx(total)
        assert _Event.created <= 2 * (limit + 1)


def test_a_stream_change_between_slices_waits_for_each_stream() -> None:
    """Events of different streams are not ordered: a settle waits for each older slice of another stream."""
    a, b = _Stream(), _Stream()
    streams = [a]
    timer = devices.SliceTimer(_Event, lambda: streams[0], None, 3)
    with timer():
        a.launch(1.0)
    streams[0] = b
    with timer() as out:
        b.launch(0.5)
        timer.settle()
    assert out[0] == pytest.approx(1.5) and a.syncs == 1 and b.syncs == 1


def test_run_ahead_zero_waits_for_every_slice_and_the_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPUPOOL_RUN_AHEAD=0 (the switch back, and the device run's A/B baseline): every slice waits for its own end,
    as before round 31; unset is RUN_AHEAD; a malformed value stops the daemon at its start."""
    stream = _Stream()
    timer = devices.SliceTimer(_Event, lambda: stream, None, 0)
    for k in range(3):
        assert _slice(timer, stream, 0.5) == pytest.approx(0.5) and not timer.busy
        assert stream.syncs == k + 1
    monkeypatch.delenv(devices.RUN_AHEAD_ENV, raising=False)
    assert devices.run_ahead_from_env() == devices.RUN_AHEAD
    monkeypatch.setenv(devices.RUN_AHEAD_ENV, "0")
    assert devices.run_ahead_from_env() == 0
    for bad in ("-1", "two", "17"):
        monkeypatch.setenv(devices.RUN_AHEAD_ENV, bad)
        with pytest.raises(ValueError, match=devices.RUN_AHEAD_ENV):
            devices.run_ahead_from_env()


def test_a_fake_device_times_slices_as_before() -> None:
    """A fake GPU's session times its slices by the wall time of each (`slices.WallTimer`, round 45: a shared object
    of no state, which a frame of RunGraphs reads the clock for itself; called, `Device.timed`'s context manager):
    no device clock, no settle, never busy."""
    dev = devices.FakeDevice(0, "h", 1 << 20)
    timer = dev.slice_timer()
    assert timer is slices.WALL_TIMER and timer is devices.FakeDevice(1, "h", 1 << 20).slice_timer()
    assert not isinstance(timer, slices.DeviceClock)
    for timed in (timer, dev.timed):
        with timed() as measured:
            time.sleep(0.002)
        assert len(measured) == 1 and 0.002 <= measured[0] < 5.0


def _state() -> worker._SessionState:
    device = {"index": 0, "uuid": "u", "model": "fake", "memory_bytes": 1 << 30, "fake": True}
    return worker._SessionState(worker.WorkerSpec("s", 1, device, 1 << 30, 1000, 0, 0, 1, "", False))


def test_run_commands_settles_for_answers_and_flushes_and_reports_busy() -> None:
    """Through a session's worker state (slices.run_commands), its timer a SliceTimer of stand-in events: a slice of
    ops only returns with its GPU time unreported and says so (`busy`, which the daemon mirrors to send the next
    lone Sync to the worker); a slice that answers a Sync, and the daemon's flush (a slice of no commands), wait for
    the GPU and report everything; the flag survives the result's encoding."""
    state = _state()
    stream = _Stream(work_per_slice=0.004)
    state.timed = _timer(stream)
    base = 1 << 32

    def run(*commands: device_pb2.Command) -> slices.SliceResult:
        frame = device_pb2.ClientFrame(commands=commands).SerializeToString()
        res = state.run(slices.SliceRequest(1 << 30, 1 << 24, 1.0, frame))
        buf = bytearray(1 << 16)
        again = slices.decode_result(memoryview(buf)[: slices.write_result(res, buf)], len(commands))
        assert again.busy == res.busy and again.seconds == res.seconds
        return res

    op = device_pb2.Command(op=device_pb2.Op(name="aten::ones.default", outputs=[base + 1]))
    op.op.args.add().ints.values.append(4)
    first = run(op)
    assert first.executed == 1 and first.busy and first.seconds == 0.0
    synced = run(device_pb2.Command(sync=device_pb2.Sync(request_id=7)))
    assert [device_pb2.ServerFrame.FromString(r).request_id for r in synced.replies] == [7]
    assert not synced.busy and synced.seconds == pytest.approx(0.008)
    run(op)
    flushed = state.run(slices.SliceRequest(1 << 30, 0, 0.0, b""))
    assert flushed.executed == 0 and not flushed.busy and flushed.seconds == pytest.approx(0.008)


def test_the_daemons_clock_books_late_seconds_up_to_the_time_that_passed() -> None:
    """front.GpuClock: a result may report more than its own slice's wall time (earlier slices' seconds), never
    more in all than passed since the session's first slice; what it books is what was reported within that."""
    clock = GpuClock()
    assert clock.take(0.0, 10.0, 10.001) == 0.0  # the first slice's time comes later
    assert clock.take(0.0025, 10.002, 10.003) == pytest.approx(0.0025)  # more than this slice's 1 ms: kept
    assert clock.take(5.0, 10.004, 10.005) == pytest.approx(0.0025)  # a lie: at most the 5 ms that passed in all
    assert clock.taken == pytest.approx(0.005)
    # an idle session's time counts too (its last slices ran on the GPU meanwhile): 10.5 s passed in all
    assert clock.take(20.0, 20.0, 20.5) == pytest.approx(10.5 - 0.005)


# ---- on a real GPU (skipped here: bench/real_gpu.sh, stage `tests`) ----


def _busy_slice(timer: devices.SliceTimer, x: torch.Tensor, n: int) -> float:
    """A slice of `n` big matmuls (milliseconds of GPU time each); returns what its result reports."""
    with timer() as out:
        for _ in range(n):
            x = x @ x
            x = x / x.norm()
    return out[0]


def _cuda_timer(n: int) -> tuple[devices.SliceTimer, torch.Tensor]:
    """A real CudaDevice's timer of a session's slices, and an n x n matrix on its device."""
    dev = devices.CudaDevice(0)
    timer = dev.slice_timer()
    assert isinstance(timer, devices.SliceTimer)
    return timer, torch.randn(n, n, device=dev.torch_device)


def _flush(timer: devices.SliceTimer) -> float:
    """The daemon's flush: a slice of no commands that settles; returns what it reports."""
    with timer() as out:
        timer.settle()
    assert not timer.busy
    return out[0]


@cuda
def test_cuda_a_slice_returns_before_its_kernels_finish_and_is_booked_later() -> None:
    timer, x = _cuda_timer(4096)
    _busy_slice(timer, x, 2)  # cuBLAS set up
    _flush(timer)
    before = timer.reported
    first = _busy_slice(timer, x, 40)  # ~40 big matmuls: tens of ms of GPU work, launched in a few ms
    assert timer.busy and first == 0.0  # it returned with its kernels still queued: nothing reported yet
    torch.cuda.synchronize()
    later = _busy_slice(timer, x, 0)
    assert later > 0.0  # the first slice's time, reported with the next result
    rest = _flush(timer)
    assert timer.reported - before == pytest.approx(first + later + rest)  # all of it, once


@cuda
def test_cuda_run_ahead_is_bounded() -> None:
    timer, x = _cuda_timer(4096)
    total = 0.0
    for _ in range(8):
        total += _busy_slice(timer, x, 20)
        assert len(timer._pending) <= devices.RUN_AHEAD
    total += _flush(timer)
    assert total > 0.0 and total == pytest.approx(timer.reported)


@cuda
def test_cuda_events_follow_the_current_stream() -> None:
    """A slice's events go on the worker's current stream of its device (a side stream made current is timed)."""
    timer, x = _cuda_timer(4096)
    side = torch.cuda.Stream(x.device)
    with torch.cuda.stream(side):
        assert _busy_slice(timer, x, 20) == 0.0 and timer.busy  # tens of ms queued on the side stream
        assert _flush(timer) > 0.0 and side.query()  # the flush waited for the side stream's work
