"""A CUDA session's run-ahead seen from the daemon (devices.SliceTimer, issue 8): while its GPU may still run its
slices (a result's `busy`), a lone Sync is not answered by the stream's reader but goes to the worker, which waits
for the GPU first; the session's end books the GPU time its last slices had not yet reported.

No CUDA here: the session's timer is a SliceTimer over STAND-IN events (test_server_slice_timer.py's `_Event`,
a simulated GPU clock), on a fake GPU with --isolation thread (the timer lives in this process, where the test
reads it) -- the one part that cannot run on this host; the daemon, its queue and the session's worker state are
the real ones."""

from __future__ import annotations

import time
from typing import Any

import pytest
from gpupool.client.session import Session
from gpupool.server import devices
from test_server_slice_timer import _Event, _Stream


def _wait(cond: Any) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.002)


def test_a_busy_sessions_sync_waits_in_its_worker_and_its_last_slices_are_booked_at_its_end(
    daemon_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    timers: list[tuple[devices.SliceTimer, _Stream]] = []

    def slice_timer(self: devices.Device) -> devices.SliceTimer:
        stream = _Stream(work_per_slice=1e-6)  # each slice's kernels: 1 us of simulated GPU time
        timer = devices.SliceTimer(_Event, lambda: stream, None)
        timers.append((timer, stream))
        return timer

    monkeypatch.setattr(devices.FakeDevice, "slice_timer", slice_timer)
    d = daemon_factory(isolation="thread")
    daemon = d.running.daemon
    with Session.attach(d.address, d.token()) as s:
        (fs,) = daemon.session_list()
        ((timer, stream),) = timers
        queue = daemon.queues[fs.device.index]

        def ops_only() -> None:
            ran = stream.records
            s.call("aten::ones.default", [4])
            s.flush()
            _wait(lambda: stream.records >= ran + 2 and queue.idle(fs.entry))

        ops_only()
        assert fs.device_busy and timer.busy  # its kernels may still run: the result said so
        before = stream.records
        s.sync()  # a lone Sync: to the worker, whose slice waits for the GPU before the answer
        assert stream.records == before + 2 and stream.syncs >= 1
        assert not fs.device_busy and not timer.busy
        s.sync()  # the GPU is idle: the stream's reader answers it (no slice)
        assert stream.records == before + 2
        ops_only()
        ops_only()
        assert fs.device_busy and timer.busy
    # the session's end: a flush (a slice of no commands) books what its last slices had not reported
    assert fs.closed and not timer.busy
    assert timer.reported == pytest.approx(1e-6 * (stream.records // 2))  # every slice's (the stand-in's flush too)
    assert fs.busy_seconds == pytest.approx(timer.reported, rel=1e-9)


def test_a_flush_is_an_empty_slice_a_session_worker_answers(daemon_factory: Any) -> None:
    """The daemon's flush through a real worker process (the wire of a slice of no commands, under a socket timeout
    it then lifts): it reports no commands run and leaves the session as it was. (A fake GPU's worker has no GPU
    time to report: only the path is checked here; the booking is the test above's.)"""
    import torch

    d = daemon_factory()  # process isolation: the session's worker is a process forked from the zygote
    daemon = d.running.daemon
    with Session.attach(d.address, d.token()) as s:
        h = s.upload(torch.arange(6.0))
        s.sync()
        (fs,) = daemon.session_list()
        assert fs.runner is not None and fs.runner.pid
        with fs.lock:
            fs.device_busy = True  # as a CUDA session's last result would say
            seconds = daemon._flush(fs)
        assert 0.0 <= seconds < 1.0 and not fs.device_busy and not fs.closed  # (a fake GPU: its wall time)
        assert s.download(h).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the same worker, its socket blocking again


class _GatedEvent(_Event):
    """The STAND-IN event, whose `synchronize` on a gated stream waits for the test's gate: a GPU still running
    seconds of a session's queued kernels (what a worker's flush waits for, up to daemon.FLUSH_SECONDS)."""

    def synchronize(self) -> None:
        gate = getattr(self.stream, "gate", None)
        if gate is not None and self.stream.records >= getattr(self.stream, "gate_from", 0):
            gate.wait(30)
        super().synchronize()


def _gated_streams(monkeypatch: pytest.MonkeyPatch) -> list[_Stream]:
    """Each session's timer on the fake GPU a SliceTimer over gated stand-in events; their streams, in order."""
    streams: list[_Stream] = []

    def slice_timer(self: devices.Device) -> devices.SliceTimer:
        stream = _Stream(work_per_slice=1e-6)
        streams.append(stream)
        return devices.SliceTimer(_GatedEvent, lambda: stream, None)

    monkeypatch.setattr(devices.FakeDevice, "slice_timer", slice_timer)
    return streams


def test_a_closing_sessions_flush_does_not_hold_up_another_sessions_expiry(
    daemon_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper closes expired sessions one after another; a CUDA session's close first waits (up to
    FLUSH_SECONDS) for its worker to report its last slices' GPU time, which a session makes long by queuing
    kernels. It waited in the reaper, so every other expired session -- another tenant's -- ran on past its lease
    behind it (10 s a session, one after another). Stand-in events: the GPU's wait is the test's gate."""
    import threading

    streams = _gated_streams(monkeypatch)
    d = daemon_factory(isolation="thread")
    daemon = d.running.daemon
    gate = threading.Event()
    a = Session.attach(d.address, d.token(tenant="a"))
    b = Session.attach(d.address, d.token(tenant="b"))
    try:
        fa, fb = daemon.session_list()
        a.call("aten::ones.default", [4])
        a.flush()
        _wait(lambda: streams[0].records >= 2 and daemon.queues[fa.device.index].idle(fa.entry))
        assert fa.device_busy
        streams[0].gate = gate  # type: ignore[attr-defined]  # from now on a's GPU is busy until the gate opens
        b.sync()
        fa.expires_at = fb.expires_at = 0.0  # both leases end: a's first (the reaper's order)
        daemon._reap_wake.set()  # (ends moved by hand: the reaper sleeps until the first end it knew, up to 10 s)
        _wait(lambda: fb.closed)  # b's end does not wait for a's GPU
        assert not gate.is_set()
    finally:
        gate.set()
        for s in (a, b):
            try:
                s.close()
            except Exception:  # noqa: BLE001 -- closed by its expiry
                pass
    _wait(lambda: fa.closed and fa.runner is not None and not fa.device_busy)


def test_a_lying_workers_close_in_its_own_slice_does_not_stall_the_devices_other_sessions(
    daemon_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session closed by its own slice's outcome (its replies past --max-unread-bytes: `_exhausted`, called in
    the device's thread under the session's lock, an RLock) had its GPU time flushed there: a worker that says its
    GPU is busy (a lie: a slice with an answer settles) and then does not answer the flush held the device's
    thread -- every other session of the device -- for FLUSH_SECONDS. Stand-in events; the lie is `busy`, always
    True, and the GPU's wait is the test's gate."""
    import threading

    import torch

    streams = _gated_streams(monkeypatch)
    d = daemon_factory(isolation="thread", max_unread_bytes=512)
    daemon = d.running.daemon
    gate = threading.Event()
    a = Session.attach(d.address, d.token(tenant="a"))
    b = Session.attach(d.address, d.token(tenant="b"))
    got: list[Any] = []
    try:
        fa, fb = daemon.session_list()
        h = a.upload(torch.zeros(1024))  # 4 KiB: its download is past the host's unread limit (512 bytes)
        a.sync()
        streams[0].gate = gate  # type: ignore[attr-defined]
        streams[0].gate_from = streams[0].records + 3  # type: ignore[attr-defined]  # past the Get's slice
        monkeypatch.setattr(devices.SliceTimer, "busy", property(lambda self: self is not None))  # the lie
        threading.Thread(target=lambda: _swallow(lambda: a.download(h)), daemon=True).start()
        _wait(lambda: fa.closed)
        threading.Thread(target=lambda: got.append(b.download(b.upload(torch.arange(3.0)))), daemon=True).start()
        _wait(lambda: bool(got))  # b's slices run while a's worker does not answer its flush
        assert got[0].tolist() == [0.0, 1.0, 2.0] and not gate.is_set()
    finally:
        gate.set()
        for s in (a, b):
            _swallow(s.close)


def _swallow(call: Any) -> None:
    try:
        call()
    except Exception:  # noqa: BLE001 -- a session its daemon closed
        pass
