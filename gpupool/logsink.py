"""Log lines that never wait on stderr (round 39): the daemon's own (`gpupool serve`'s, `config.setup_logging`), and
since round 40 the scheduler's (its Register logs a line under the core's lock: a full pipe stopped the pool).

A `logging.StreamHandler` writes each line from the thread that logs, holding the handler's lock: where stderr is a
pipe its reader stopped reading (a supervisor that started the daemon with stderr=PIPE and then waits on something
else), the 64 KiB the pipe holds filled, the next line's write blocked, and with it every thread that logged after it
(an Attach logs a line: no session started, and sessions ending stalled the same way). `BackgroundStderr` hands each
line to a writer thread of its own through a buffer (`BUFFER_BYTES`): a log call never waits on the pipe; the writer
waits instead, so a reader that reads, however slowly, loses nothing the buffer holds; a buffer full (nobody reads)
drops what comes, whole lines, counted and said in one line where one fits again. The zygote, single-threaded (it
forks), has the same for its own lines on its non-blocking stderr (server/zygote.py `StderrSink.log`)."""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import threading

BUFFER_BYTES = 1 << 20  # lines kept for the writer: past this, nobody reads stderr, and lines are dropped
FLUSH_WAIT = 2.0  # seconds `flush` (logging.shutdown's, at exit) waits for the writer


class BackgroundStderr(logging.Handler):
    """A log handler whose `emit` never waits on stderr: see the module's docstring."""

    def __init__(self, fd: int = 2, limit: int = BUFFER_BYTES) -> None:
        super().__init__()
        self.fd, self.limit = fd, limit
        self._begin()

    def _begin(self) -> None:
        """The buffer and its writer thread (again in a forked child, which has no thread of its parent's)."""
        lock = threading.Lock()
        self._ready = threading.Condition(lock)  # the writer waits for lines
        self._drained = threading.Condition(lock)  # `flush` waits for the writer
        self._lines: collections.deque[bytes] = collections.deque()
        self._bytes = 0  # of the lines kept and the batch being written
        self._writing = False
        self.dropped = 0  # lines dropped since the last one kept
        self._pid = os.getpid()
        threading.Thread(target=self._writer, name="gpupool-log", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:  # noqa: BLE001 - logging's own convention: a record that cannot be formatted is reported
            self.handleError(record)
            return
        if self._pid != os.getpid():
            self._begin()
        with self._ready:
            if self.dropped:
                note = f"... {self.dropped} log lines dropped here (stderr full: nobody read it)\n".encode()
                if self._bytes + len(note) + len(data) > self.limit:
                    self.dropped += 1
                    return
                self._lines.append(note)
                self._bytes += len(note)
                self.dropped = 0
            elif self._bytes + len(data) > self.limit:
                self.dropped += 1
                return
            self._lines.append(data)
            self._bytes += len(data)
            self._ready.notify()

    def _writer(self) -> None:
        while True:
            with self._ready:
                while not self._lines:
                    self._ready.wait()
                data = b"".join(self._lines)
                self._lines.clear()
                self._writing = True
            self._write_all(memoryview(data))
            with self._ready:
                self._bytes -= len(data)
                self._writing = False
                self._drained.notify_all()

    def _write_all(self, data: memoryview) -> None:
        while data:
            try:
                data = data[os.write(self.fd, data) :]
            except BlockingIOError:  # (a non-blocking description: wait for room)
                select.select([], [self.fd], [], 1.0)
            except InterruptedError:
                pass
            except OSError as exc:  # stderr closed, or gone: nothing to write to
                if exc.errno != errno.EINTR:
                    return

    def flush(self, timeout: float = FLUSH_WAIT) -> None:
        """Wait (at most `timeout` s: a reader that stopped is not waited for) until the writer wrote every line."""
        if self._pid != os.getpid():
            return
        with self._ready:
            self._drained.wait_for(lambda: not self._lines and not self._writing, timeout)
