"""Fault a fresh transfer tensor's pages in from a helper thread while another thread fills it with bytes.

A fresh 256 MiB host tensor is 65,536 page faults of 4 KiB (each zeroing its page; huge pages are asked for only
where they are cheap, protocol.huge_pages_are_cheap). Taken one by one inside a socket's receive or a copy, they
cost as much again as the transfer's own work on the thread that limits it (BENCHMARKS.md, "Round 27, xfer27": a
raw TLS socket received 256 MiB at half the speed into a fresh tensor as into one reused 4 MiB buffer).
`MADV_POPULATE_WRITE` (Linux 5.14) faults a range in for writing in one call, and ctypes releases the GIL for it,
so the faults run on another core beside the reads: the client's download tensor (client/session.py).

Advice only: the pages' contents never change (a page written first by the filling thread stays as written), a
kernel without it (EINVAL) turns it off for the process, and the helper skips past what the filling thread has
already written (`reached`, set through `advance`). It runs at most `AHEAD` bytes ahead of the bytes, so a
transfer that stalls or ends early never has more of its tensor in memory than that beyond what arrived; it
ends at the tensor's end, at `stop`, or after `IDLE` seconds without progress. It holds the tensor until it is
done, so the pages it touches are always the tensor's.
"""

from __future__ import annotations

import ctypes
import errno
import sys
import threading
from typing import Any

PAGE = 4096
MADV_POPULATE_WRITE = 23
MIN_BYTES = 8 * 1024 * 1024  # tensors at least this large are faulted in ahead of their bytes
STEP = 2 * 1024 * 1024  # bytes per madvise call (the helper looks at `reached` and `stop` between them)
AHEAD = 32 * 1024 * 1024  # the most bytes faulted in past what the filler has written
IDLE = 60.0  # seconds the helper waits for the filler to move before it gives up
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_ok = [_LIBC is not None]  # False once the kernel refused MADV_POPULATE_WRITE


class Prefault:
    """The helper thread of one tensor (see the module's docstring); `reached`: bytes the filler has written
    from the start, `stop`: set to end the helper early (a failed transfer)."""

    def __init__(self, tensor: Any) -> None:
        self.tensor: Any = tensor  # held until the helper is done
        self.base = tensor.data_ptr()
        self.lo = self.base // PAGE * PAGE
        self.hi = -(-(self.base + tensor.nbytes) // PAGE) * PAGE
        self.reached = 0
        self.stop = False
        self._moved = threading.Event()
        threading.Thread(target=self._run, name="gpupool-prefault", daemon=True).start()

    def advance(self, reached: int) -> None:
        """The filler has written the tensor's first `reached` bytes."""
        self.reached = reached
        self._moved.set()

    def end(self) -> None:
        """The transfer is over (done or failed): the helper stops at its next step."""
        self.stop = True
        self._moved.set()

    def _run(self) -> None:
        try:
            self._fault()
        finally:
            self.tensor = None

    def _fault(self) -> None:
        assert _LIBC is not None
        pos = self.lo
        while pos < self.hi and not self.stop:
            self._moved.clear()
            done = self.base + self.reached
            pos = max(pos, done // PAGE * PAGE)
            n = min(STEP, self.hi - pos, -(-(done + AHEAD) // PAGE) * PAGE - pos)  # whole pages from a page
            if n <= 0:
                if pos >= self.hi or not self._moved.wait(IDLE):
                    return
                continue
            if _LIBC.madvise(ctypes.c_void_p(pos), ctypes.c_size_t(n), MADV_POPULATE_WRITE) != 0:
                if ctypes.get_errno() == errno.EINVAL:
                    _ok[0] = False  # this kernel has no MADV_POPULATE_WRITE: never ask again
                return
            pos += n


def start(tensor: Any) -> Prefault | None:
    """A helper faulting `tensor`'s pages in, or None: a small tensor, one off the host, or no kernel support."""
    if not _ok[0] or tensor.nbytes < MIN_BYTES or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    return Prefault(tensor)


def populate(address: int, n: int) -> bool:
    """Fault the whole pages over bytes [address, address + n) in for writing, in one call, just before a thread
    writes them (the worker's copy of an upload chunk into a fresh host tensor, server/executor.py): the same
    pages, each zeroed once as before, without a trip through the page fault handler for each 4 KiB of them
    (~25 % less CPU than faulting them in one by one inside the copy, measured in BENCHMARKS.md, "Round 30,
    xfer30"). Pages already in memory would only be walked (a reused tensor): where the range's last page is
    (`mincore`; its first may be the one the previous chunk ended in), nothing is asked. Advice only, as the
    helper's: whether it was asked (False: in memory already, an empty range, no kernel support)."""
    if not _ok[0] or n <= 0 or _LIBC is None:
        return False
    lo, last = address // PAGE * PAGE, (address + n - 1) // PAGE * PAGE
    resident = ctypes.c_ubyte(0)  # of the last page (the first may be the one an earlier chunk ended in)
    if _LIBC.mincore(ctypes.c_void_p(last), ctypes.c_size_t(PAGE), ctypes.byref(resident)) == 0 and resident.value & 1:
        return False
    hi = last + PAGE
    if _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_POPULATE_WRITE) != 0:
        if ctypes.get_errno() == errno.EINVAL:
            _ok[0] = False
        return False
    return True
