"""A wake-up for steps of the wall clock: a Linux timerfd with TFD_TIMER_CANCEL_ON_SET (round 49, sec49).

The daemon's lease reaper sleeps on the monotonic clock until the first session's end, and a step of the wall clock
(an NTP or operator's step, a resumed suspend) moves a lease's end, which is a unix time, on that clock without
waking it: round 48 bounded the delay by a look every `clock_look` (1 s) while sessions are open. A timerfd on
CLOCK_REALTIME armed at an absolute time far ahead with TFD_TIMER_CANCEL_ON_SET becomes readable the moment the
kernel's realtime clock is set (its read then fails ECANCELED: `clock_settime`, `settimeofday`, adjtimex's
ADJ_SETOFFSET, a resume from suspend), so `ClockSteps.watch` wakes the reaper at once and it closes a session whose
lease the step ended. Where timerfd is missing (not Linux, a libc without it, a sandbox refusing it) `open` returns
None and the reaper keeps its `clock_look` looks alone; it keeps them either way (a step of the clock the daemon
reads that is not the kernel's, as the tests simulate it, wakes no descriptor). A set that leaves the wall clock's
distance from the monotonic one unchanged (an offset of 0) is no step, and the kernel wakes no one for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

CLOCK_REALTIME = 0
TFD_TIMER_ABSTIME = 1
TFD_TIMER_CANCEL_ON_SET = 2
FAR = 10 * 365 * 86400  # seconds ahead the timer is armed: it never expires, it is only cancelled


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "timerfd_create") and hasattr(libc, "timerfd_settime") else None


class ClockSteps:
    """A timerfd that is readable once the wall clock was stepped (see the module); `open()` or None."""

    def __init__(self, libc: ctypes.CDLL, fd: int) -> None:
        self._libc = libc
        self.fd = fd
        self.steps = 0  # steps seen (each a wake of the reaper)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._fds: tuple[int, ...] = (fd, self._stop_r, self._stop_w)  # (closed once: `_close_fds`)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def open(cls, libc: ctypes.CDLL | None | bool = True) -> ClockSteps | None:
        """The armed descriptor, or None where timerfd is missing or refused (said once in the log, at debug: the
        daemon says at its start which way it watches). `libc`: True for the process's own (a test passes None or
        a library without the calls to see the fallback)."""
        lib = _libc() if libc is True else libc
        if not lib or not hasattr(lib, "timerfd_create") or not hasattr(lib, "timerfd_settime"):
            return None
        fd = int(lib.timerfd_create(CLOCK_REALTIME, os.O_CLOEXEC | os.O_NONBLOCK))
        if fd < 0:
            log.debug("timerfd_create: %s", os.strerror(ctypes.get_errno()))
            return None
        try:
            steps = cls(lib, fd)
        except OSError as exc:  # (its stop pipe: out of descriptors) the timerfd is closed, not left open (secrev49)
            os.close(fd)
            log.debug("the step watch's pipe: %s", exc)
            return None
        if not steps._arm():
            steps.close()
            return None
        return steps

    def _arm(self) -> bool:
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(int(time.time()) + FAR, 0))
        flags = TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET
        if self._libc.timerfd_settime(self.fd, flags, ctypes.byref(spec), None) != 0:
            log.debug("timerfd_settime: %s", os.strerror(ctypes.get_errno()))
            return False
        return True

    def stepped(self) -> bool:
        """Whether the clock was stepped since the last call (or the arming), re-armed for the next step if so
        (OSError where it cannot be: the descriptor would stay readable)."""
        try:
            os.read(self.fd, 8)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return False
            if exc.errno != errno.ECANCELED:
                raise
        self.steps += 1
        if not self._arm():
            raise OSError(ctypes.get_errno(), "timerfd_settime: cannot arm the step watch again")
        return True

    def watch(self, wake: Callable[[], None]) -> None:
        """Call `wake` at each step, from a daemon thread, until `close`: it sleeps in poll, waking for nothing else."""

        def run() -> None:
            poller = select.poll()
            poller.register(self.fd, select.POLLIN)
            poller.register(self._stop_r, select.POLLIN)
            try:
                while True:
                    ready = {fd for fd, _ in poller.poll()}
                    if self._stop_r in ready:
                        return
                    if self.stepped():
                        wake()
            except OSError as exc:  # (never seen: the descriptor is ours alone) the `clock_look` looks go on
                log.warning("the wall clock's step watch stopped: %s", exc)
            finally:
                self._close_fds()

        self._thread = threading.Thread(target=run, name="gpupool-clock-steps", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop watching: `watch`'s thread ends (and closes the descriptors, which it alone polls), else at once. Again,
        or after the thread ended on its own, it does nothing: the stop byte is written under `_lock` while the pipe is
        still open (secrev49: until then it went to the pipe's descriptor number whatever the process had opened there
        since the thread closed it, a socket or a file of another part of the daemon)."""
        with self._lock:
            if not self._fds:
                return
            if self._thread is not None:
                try:
                    os.write(self._stop_w, b"x")
                except OSError:  # (full: a stop byte is there already)
                    pass
                return
        self._close_fds()

    def _close_fds(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, ()
        for fd in fds:
            os.close(fd)
