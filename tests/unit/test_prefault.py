"""gpupool/prefault.py: the helper that faults a fresh transfer tensor in beside the thread filling it."""

from __future__ import annotations

import threading
import time

import torch

from gpupool import prefault


def _resident_pages(t: torch.Tensor) -> int:
    """How many of the tensor's 4 KiB pages are in memory (the kernel's count for its address range)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    start = t.data_ptr() // prefault.PAGE * prefault.PAGE
    n = -(-(t.data_ptr() + t.nbytes - start) // prefault.PAGE)
    vec = (ctypes.c_ubyte * n)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * prefault.PAGE), vec) == 0
    return sum(b & 1 for b in vec)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """`t` with its whole pages dropped (MADV_DONTNEED: none resident, read back as zeros), as a fresh mapping's are.
    torch.empty may hand back memory of a tensor freed before (glibc raises its mmap threshold after a large free,
    so a second 16 MiB block comes from the heap, already resident: the fresh-clone CI run's first test read 4097 of
    4097 pages resident before the helper ran)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    lo = -(-t.data_ptr() // prefault.PAGE) * prefault.PAGE
    hi = (t.data_ptr() + t.nbytes) // prefault.PAGE * prefault.PAGE
    assert libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4) == 0  # MADV_DONTNEED
    assert _resident_pages(t) <= 2  # at most the two pages the tensor shares with its neighbours
    return t


def _wait_done(p: prefault.Prefault) -> None:
    deadline = time.monotonic() + 30
    while p.tensor is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.tensor is None, "the helper did not finish"


def test_faults_a_fresh_tensor_in_and_leaves_written_bytes_alone() -> None:
    t = _fresh(torch.empty(prefault.MIN_BYTES * 2, dtype=torch.uint8))
    before = _resident_pages(t)
    t[: 1 << 20] = 7  # the filler got there first: those bytes must stay as written
    p = prefault.start(t)
    if p is None:  # a kernel older than 5.14 refuses MADV_POPULATE_WRITE: then nothing may have changed
        assert not prefault._ok[0]
        return
    p.advance(1 << 20)
    _wait_done(p)
    assert _resident_pages(t) > before
    assert _resident_pages(t) >= t.nbytes // prefault.PAGE - 1
    assert bool((t[: 1 << 20] == 7).all())


def test_skips_what_the_filler_reached_and_stops_when_told() -> None:
    t = _fresh(torch.empty(prefault.MIN_BYTES * 4, dtype=torch.uint8))
    p = prefault.Prefault.__new__(prefault.Prefault)  # the helper's loop, run here on a known state
    p.tensor, p.base = t, t.data_ptr()
    p.lo = p.base // prefault.PAGE * prefault.PAGE
    p.hi = -(-(p.base + t.nbytes) // prefault.PAGE) * prefault.PAGE
    p._moved = threading.Event()
    p.reached, p.stop = t.nbytes, False  # the filler already wrote everything: nothing is left to fault in
    before = _resident_pages(t)
    p._fault()
    after = _resident_pages(t)
    assert after <= before + 1  # at most the page the tensor's last byte shares with what follows it
    p.reached, p.stop = 0, True
    p._fault()
    assert _resident_pages(t) == after


def test_small_and_off_host_tensors_get_no_helper() -> None:
    assert prefault.start(torch.empty(prefault.MIN_BYTES - 1, dtype=torch.uint8)) is None
    assert prefault.start(torch.empty(prefault.MIN_BYTES, dtype=torch.uint8, device="meta")) is None
    big = torch.empty(2, prefault.MIN_BYTES, dtype=torch.uint8)
    assert prefault.start(big.t()) is None  # not one contiguous range


def test_runs_at_most_ahead_bytes_past_the_filler() -> None:
    """A transfer that stalls (a client that announced a tensor and sent nothing more) has at most AHEAD bytes of
    its tensor faulted in past what arrived; each advance lets the helper go on, and it ends at the tensor's end."""
    t = _fresh(torch.empty(prefault.AHEAD * 3, dtype=torch.uint8))
    before = _resident_pages(t)
    p = prefault.start(t)
    if p is None:
        assert not prefault._ok[0]
        return
    window = prefault.AHEAD // prefault.PAGE + 2  # the pages of AHEAD bytes, and the two it may straddle

    def settled(expected_max: int) -> int:
        last, deadline = -1, time.monotonic() + 10
        while time.monotonic() < deadline:  # until the helper stops faulting pages in (it waits for the filler)
            now = _resident_pages(t)
            if now == last:
                break
            last = now
            time.sleep(0.05)
        assert last - before <= expected_max
        return last

    settled(window)
    assert p.tensor is not None  # waiting for the filler, not gone
    p.advance(prefault.AHEAD)
    settled(2 * window)
    p.advance(2 * prefault.AHEAD)  # the last AHEAD bytes are within reach now: faulted in, and the helper ends
    _wait_done(p)
    assert _resident_pages(t) >= t.nbytes // prefault.PAGE - 1


def test_end_stops_a_waiting_helper() -> None:
    t = torch.empty(prefault.AHEAD * 2, dtype=torch.uint8)
    p = prefault.start(t)
    if p is None:
        assert not prefault._ok[0]
        return
    time.sleep(0.1)  # it faulted AHEAD bytes in and waits for the filler
    p.end()
    _wait_done(p)
