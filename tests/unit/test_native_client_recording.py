"""The C++ client's recording flag (client/native/backend.py `RECORDING`): a thread that never recorded a captured
step reads `on` as False, a class default, so a sync point (`.item()`, a download) does not pay a failed attribute
look-up (an AttributeError raised and swallowed inside `getattr(..., default)`: perf54b)."""

from __future__ import annotations

import threading

from gpupool.client.native import backend


def test_a_thread_that_never_recorded_reads_recording_off_without_a_failed_lookup() -> None:
    seen: list[object] = []

    def read() -> None:
        seen.append(backend.RECORDING.on)  # base: AttributeError (the flag existed only once a thread had set it)

    t = threading.Thread(target=read)
    t.start()
    t.join(timeout=60)
    assert seen == [False]
    assert "on" not in backend.RECORDING.__dict__  # the class's default, not a per-thread value set by a first read


def test_recording_is_per_thread() -> None:
    backend.RECORDING.on = True
    try:
        seen: list[object] = []
        t = threading.Thread(target=lambda: seen.append(backend.RECORDING.on))
        t.start()
        t.join(timeout=60)
        assert seen == [False] and backend.RECORDING.on is True
    finally:
        backend.RECORDING.on = False
