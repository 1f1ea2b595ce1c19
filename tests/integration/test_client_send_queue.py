"""The client's send queue (client/session.py `_put`) against a real daemon that stops reading (its process stopped,
SIGSTOP, for a second or two: the frames pile up in the client), on both carriers of a session's frames (its side
socket, its gRPC stream): with large frames the bytes queued and not yet written never pass SEND_QUEUE_BYTES (round
37; until then 32 frames of 512 KiB, 16 MiB, queued: a captured step's client ran 40-50 steps ahead and its `.item()`
waited for them), while small frames still queue up to SEND_QUEUE_FRAMES; the caller blocks meanwhile
(back-pressure), and when the daemon reads again every frame arrives, none dropped."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from gpupool.client.session import SEND_QUEUE_BYTES, SEND_QUEUE_FRAMES, Handle, Session, upload_command
from shim_fixtures import ServeProcess, start_daemon
from support import stop_process

from gpupool import errors, wire

KiB = 1024
BIG = 512 * KiB  # a captured step's batch (the stock MLP's): SEND_QUEUE_BYTES holds a few of them
SMALL = 16 * KiB  # eager's frames: SEND_QUEUE_FRAMES of them stay far below SEND_QUEUE_BYTES
SETTLED = 0.5  # seconds without a frame queued: the caller is blocked (the daemon reads nothing meanwhile)


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One `gpupool serve` (a 512 MiB fake GPU, a side port) for the module's tests, each of which stops and continues
    it (SIGSTOP, SIGCONT) around its own sessions, closed before it ends (until round 44 a daemon each: seven starts,
    each importing torch twice)."""
    daemon = start_daemon(tmp_path_factory.mktemp("send-queue"), "512MiB", 1, "--bulk-listen", "127.0.0.1:0")
    yield daemon
    stop_process(daemon.process)


def _frame(h: int, size: int) -> tuple[bytes, torch.Tensor]:
    """One frame of one Upload of `size` bytes to handle `h` (as `Session.send_commands` takes it), and its data."""
    data = torch.arange(size, dtype=torch.int64).to(torch.uint8) ^ (h & 0xFF)
    raw = upload_command(h, wire.dtype_to_proto(torch.uint8), [size], [1], data.numpy().tobytes())
    return raw, data


def _fill_while_stopped(
    s: Session, pid: int, size: int, count: int
) -> tuple[list[tuple[int, torch.Tensor]], int, int, int]:
    """Stop the daemon, queue `count` frames of `size` bytes from a thread until it blocks, note the most frames and
    bytes queued and not yet written meanwhile, then let the daemon go on and the thread finish. Returns the uploads
    (handle, data), each frame's length, the most frames queued and the most bytes (by the session's counters)."""
    handles = [int(s.new_handle()) for _ in range(count)]
    frames = [_frame(h, size) for h in handles]
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            for raw, _ in frames:
                s.send_commands(raw)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    most_frames = most_bytes = 0
    put0 = s.frames_put
    os.kill(pid, signal.SIGSTOP)
    try:
        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        last, since = -1, time.monotonic()
        while feeder.is_alive():
            queued = s.bytes_put - s.bytes_sent
            assert queued <= max(SEND_QUEUE_BYTES, size), f"{queued} bytes queued, over the cap"
            most_frames, most_bytes = max(most_frames, s._send.qsize()), max(most_bytes, queued)
            if s.frames_put != last:
                last, since = s.frames_put, time.monotonic()
            elif time.monotonic() - since > SETTLED:
                break  # blocked: the queue is as full as it gets
            time.sleep(0.002)
        assert feeder.is_alive(), "every frame was queued while the daemon read nothing: no back-pressure"
        assert s.frames_put - put0 < count
    finally:
        os.kill(pid, signal.SIGCONT)
    feeder.join(60)
    assert not feeder.is_alive() and not errors, errors
    s.sync()
    assert s.bytes_put == s.bytes_sent
    uploads = [(h, data) for h, (_, data) in zip(handles, frames, strict=True)]
    return uploads, len(frames[0][0]), most_frames, most_bytes


def test_queued_bytes_stay_under_the_cap_and_small_frames_fill_the_frame_cap(d: ServeProcess, monkeypatch: Any) -> None:
    for side in (True, False):
        monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1" if side else "0")
        with Session.attach(d.address, d.token()) as s:
            assert (s._carrier is not None) == side
            # large frames: the bytes cap binds, well before the frame cap (32 frames would be 16 MiB)
            big, n, frames, nbytes = _fill_while_stopped(s, d.process.pid, BIG, 96)
            assert frames * n <= SEND_QUEUE_BYTES, (side, frames)
            assert nbytes + n > SEND_QUEUE_BYTES, (side, nbytes)  # it filled up to the cap: the link stays busy
            # small frames: the frame cap binds, far below the bytes cap
            small, _, frames, nbytes = _fill_while_stopped(s, d.process.pid, SMALL, 3000)
            assert frames == SEND_QUEUE_FRAMES, (side, frames)
            assert nbytes <= SEND_QUEUE_BYTES
            # nothing dropped: the first and last upload of each kind arrived whole
            for h, data in (big[0], big[-1], small[0], small[-1]):
                assert torch.equal(s.download(Handle(h)), data), (side, h)


def _sender(s: Session) -> threading.Thread:
    """The session's side-socket sender thread (`Session._side_sender`)."""
    (t,) = [t for t in threading.enumerate() if getattr(t, "_target", None) == s._side_sender]
    return t


def _wakeups(thread: threading.Thread) -> int:
    """A thread's voluntary context switches so far (it blocked and was woken): Linux's count."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


def test_a_sync_with_its_sender_idle_leaves_the_sender_asleep(d: ServeProcess, monkeypatch: Any) -> None:
    """Where the frames use the side socket, a Sync (and the `.item()` of a step: its commands and Sync in one frame)
    the caller waits on is written from the calling thread when the sender is idle and nothing is queued: the sender
    thread does not wake for it (round 38; before, each synced step's frame woke it: a hand-off of ~6 futex calls and
    2 wake-ups). On 285a6ed: the sender woke ~400 times for the 400 syncs below."""
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1")
    with Session.attach(d.address, d.token()) as s:
        assert s._carrier is not None
        x = s.upload(torch.tensor(2.0))
        (y,) = s.call("aten::mul.Tensor", x, x)
        assert s.sync([y]) == [4.0]
        sender = _sender(s)
        woke = _wakeups(sender)
        for i in range(200):
            (y,) = s.call("aten::add.Tensor", y, x)  # a step's op, then its `.item()`
            assert s.sync([y]) == [4.0 + 2 * (i + 1)]
            s.sync()  # a lone Sync (`protocol.sync_frame`)
        assert _wakeups(sender) - woke < 20


def test_a_sync_behind_a_frame_still_being_written_waits_for_it(d: ServeProcess, monkeypatch: Any) -> None:
    """A frame the sender took but has not finished writing (the daemon stopped, its socket full: the queue is empty,
    the sender busy) is not passed by a Sync written from the calling thread: the Sync is queued behind it, everything
    goes out whole once the daemon reads again, and the uploads arrive intact. Pins what held before round 38 (every
    frame went through the sender); the check of "idle" is the sender's count of items handled, not the queue's
    length (which is 0 here)."""
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1")
    with Session.attach(d.address, d.token()) as s:
        assert s._carrier is not None
        s.sync()
        uploads: list[tuple[int, torch.Tensor]] = []
        done: list[Any] = []
        os.kill(d.process.pid, signal.SIGSTOP)
        try:
            while True:  # one frame at a time, each once the sender took the one before, until one stays unwritten
                assert len(uploads) < 400, "the sockets took 200 MiB from a stopped daemon's client"
                h = int(s.new_handle())
                raw, data = _frame(h, BIG)
                uploads.append((h, data))
                s.send_commands(raw)
                deadline = time.monotonic() + 10
                while s._send.qsize() and time.monotonic() < deadline:
                    time.sleep(0.001)
                assert s._send.qsize() == 0
                deadline = time.monotonic() + SETTLED
                while s.bytes_sent < s.bytes_put and time.monotonic() < deadline:
                    time.sleep(0.005)
                if s.bytes_sent < s.bytes_put:
                    break  # taken, not written: the sender is blocked in it, the queue empty
            syncer = threading.Thread(target=lambda: done.append(s.sync()), daemon=True)
            syncer.start()
            time.sleep(SETTLED)
            assert not done and s._send.qsize() == 1  # the Sync waits in the queue, behind the frame
        finally:
            os.kill(d.process.pid, signal.SIGCONT)
        syncer.join(60)
        assert done == [[]]
        for h, data in (uploads[0], uploads[-2], uploads[-1]):
            assert torch.equal(s.download(Handle(h)), data)


def test_a_caller_blocked_on_a_full_queue_sleeps_until_the_sender_writes(d: ServeProcess, monkeypatch: Any) -> None:
    """A caller blocked by back-pressure (the daemon stopped, the queue full) waits on the sender's word, not a
    timer: it hardly wakes while nothing moves. On 285a6ed it polled every 0.5 ms: hundreds of wake-ups a second."""
    for side in ("1", "0"):
        monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", side)
        with Session.attach(d.address, d.token()) as s:
            frames = [_frame(int(s.new_handle()), BIG) for _ in range(64)]
            s.sync()
            errors: list[BaseException] = []

            def feed(
                s: Session = s, frames: list[tuple[bytes, torch.Tensor]] = frames, errors: list[BaseException] = errors
            ) -> None:
                try:
                    for raw, _ in frames:
                        s.send_commands(raw)
                except BaseException as exc:  # noqa: BLE001 - the test reports it
                    errors.append(exc)

            os.kill(d.process.pid, signal.SIGSTOP)
            try:
                feeder = threading.Thread(target=feed, daemon=True)
                feeder.start()
                last, since = -1, time.monotonic()
                while time.monotonic() - since < SETTLED:  # until the feeder is blocked
                    if s.frames_put != last:
                        last, since = s.frames_put, time.monotonic()
                    time.sleep(0.01)
                assert feeder.is_alive()
                woke = _wakeups(feeder)
                time.sleep(1.0)
                assert s.frames_put == last  # still blocked
                assert _wakeups(feeder) - woke < 20, side
            finally:
                os.kill(d.process.pid, signal.SIGCONT)
            feeder.join(60)
            assert not feeder.is_alive() and not errors, errors
            s.sync()


class _Interrupt(Exception):
    """What the test's timer raises in the main thread (as Ctrl-C's KeyboardInterrupt would)."""


def _assert_synced(s: Session) -> None:
    """A Sync is answered (within a minute: from a thread, so that a lost session fails the test, not hangs it)."""
    done: list[Any] = []
    syncer = threading.Thread(target=lambda: done.append(s.sync()), daemon=True)
    syncer.start()
    syncer.join(60)
    assert done == [[]], "the Sync after the interrupted call got no answer"


def _interrupted_after(seconds: float, call: Any) -> None:
    """Run `call`, which must still be running after `seconds`, and interrupt it then (SIGALRM raises `_Interrupt`)."""

    def interrupt(*_: Any) -> None:
        raise _Interrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with pytest.raises(_Interrupt):
            call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_an_interrupted_sync_leaves_no_half_frame_on_the_side_socket(d: ServeProcess, monkeypatch: Any) -> None:
    """A synced step's frame written from the calling thread (`_write_inline`) into a full side socket (the daemon
    reads slower: stopped here) is not waited on there: the socket takes what it can now and the sender writes the
    rest, so an interrupt of the caller's wait (Ctrl-C during a slow step's `.item()`, a timer's exception here) leaves
    the record whole and the session usable. On the merge of step38 the caller waited inside the write, the interrupt
    left half a record on the socket (OpenSSL then refused the next write, "bad length": the session was lost)."""
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1")
    with Session.attach(d.address, d.token()) as s:
        assert s._carrier is not None
        s.sync()
        sock = s._carrier.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)  # (a link slower than loopback: less in flight)
        uploads: list[tuple[int, torch.Tensor]] = []
        os.kill(d.process.pid, signal.SIGSTOP)
        try:
            # small frames through the sender, each once the one before went out, while the socket says it has room
            while select.select([], [sock], [], SETTLED)[1]:
                assert len(uploads) < 20000, "the sockets took 80 MiB from a stopped daemon's client"
                h = int(s.new_handle())
                raw, data = _frame(h, 4 * KiB)
                uploads.append((h, data))
                s.send_commands(raw)
                deadline = time.monotonic() + SETTLED
                while s.bytes_sent < s.bytes_put and time.monotonic() < deadline:
                    time.sleep(0.001)
                if s.bytes_sent < s.bytes_put:
                    break
            h = int(s.new_handle())
            raw, data = _frame(h, 768 * KiB)  # one frame with its Sync, written from this thread
            uploads.append((h, data))

            _interrupted_after(1.0, lambda: s.sync(commands=raw))
            assert s.frames_inline == 2 and s.bytes_put > s.bytes_sent  # the frame went inline and did not fit
        finally:
            os.kill(d.process.pid, signal.SIGCONT)
        _assert_synced(s)
        for h, data in (uploads[0], uploads[-2], uploads[-1]):
            assert torch.equal(s.download(Handle(h)), data)


def test_an_interrupted_big_upload_leaves_no_half_record_on_the_socket(d: ServeProcess, monkeypatch: Any) -> None:
    """A bulk upload (1 MiB or more: its bytes go on the side socket) into a full side socket (the daemon reads
    slower: stopped here) is interrupted in the caller (Ctrl-C during a big upload, a timer's exception here): each
    chunk's frame and bytes go to the sender as one item, so the records on the socket stay whole, and the session
    goes on: a Sync is answered and the next upload arrives intact. On the base the caller wrote the chunk's bytes
    itself and the interrupt left half a record on the socket (the session was lost)."""
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1")
    big = torch.arange(16 * 1024 * 1024, dtype=torch.int32)  # 64 MiB: far more than the sockets hold
    with Session.attach(d.address, d.token()) as s:
        assert s._carrier is not None
        s.sync()
        s._carrier.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
        os.kill(d.process.pid, signal.SIGSTOP)
        try:
            _interrupted_after(1.0, lambda: s.upload(big))
        finally:
            os.kill(d.process.pid, signal.SIGCONT)
        _assert_synced(s)
        again = big.flip(0).contiguous()
        assert torch.equal(s.download(s.upload(again)), again)


def test_an_interrupted_big_upload_on_the_stream_carrier_leaves_the_session_usable(
    d: ServeProcess, monkeypatch: Any
) -> None:
    """As above where the frames use the gRPC stream (GPUPOOL_SIDE_FRAMES=0) and only an upload's bytes the side
    socket: each chunk's command and bytes go to the stream's sending thread as one item, which writes the bytes on
    the side socket once gRPC took the command, so an interrupt of the caller (Ctrl-C during a big upload) leaves the
    chunks it queued whole and the rest unsent: the session goes on, the handle is refused as still being uploaded
    (FailedPrecondition) until an upload of it completes, and that one arrives intact. On 1344c19 the caller wrote
    the bytes itself and the interrupt left half a chunk on the socket: the session was lost."""
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "0")
    # 192 MiB, 48 chunks: far more than the sockets hold, and than the send queue takes ahead (SEND_QUEUE_FRAMES)
    big = torch.arange(48 * 1024 * 1024, dtype=torch.int32)
    with Session.attach(d.address, d.token()) as s:
        assert s._carrier is None and s._side is not None
        s.sync()
        s._side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
        h = s.new_handle()
        os.kill(d.process.pid, signal.SIGSTOP)
        try:
            _interrupted_after(1.0, lambda: s.upload(big, handle=h))
        finally:
            os.kill(d.process.pid, signal.SIGCONT)
        _assert_synced(s)
        with pytest.raises(errors.FailedPrecondition, match="still being uploaded"):
            s.download(h)
        again = big.flip(0).contiguous()
        assert torch.equal(s.download(s.upload(again, handle=h)), again)  # a new upload of it completes
