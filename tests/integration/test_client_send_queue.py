"""The client's send queue (client/session.py `_put`) against a real daemon that stops reading (its process stopped,
SIGSTOP, for a second or two: the frames pile up in the client), on both carriers of a session's frames (its side
socket, its gRPC stream): with large frames the bytes queued and not yet written never pass SEND_QUEUE_BYTES (round
37; until then 32 frames of 512 KiB, 16 MiB, queued: a captured step's client ran 40-50 steps ahead and its `.item()`
waited for them), while small frames still queue up to SEND_QUEUE_FRAMES; the caller blocks meanwhile
(back-pressure), and when the daemon reads again every frame arrives, none dropped."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch
from gpupool.client.session import SEND_QUEUE_BYTES, SEND_QUEUE_FRAMES, Handle, Session, upload_command

from gpupool import wire

KiB = 1024
BIG = 512 * KiB  # a captured step's batch (the stock MLP's): SEND_QUEUE_BYTES holds a few of them
SMALL = 16 * KiB  # eager's frames: SEND_QUEUE_FRAMES of them stay far below SEND_QUEUE_BYTES
SETTLED = 0.5  # seconds without a frame queued: the caller is blocked (the daemon reads nothing meanwhile)


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


def test_queued_bytes_stay_under_the_cap_and_small_frames_fill_the_frame_cap(
    serve_process: Any, monkeypatch: Any
) -> None:
    d = serve_process("--fake-gpus", "1", "--fake-gpu-memory", "256MiB", "--bulk-listen", "127.0.0.1:0")
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
