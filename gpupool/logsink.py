"""Output that never waits on stderr: the daemon's and the scheduler's log lines (round 39, the scheduler's round 40)
and, since round 40, everything else they write to their descriptor 2 (`StderrPump`).

A `logging.StreamHandler` writes each line from the thread that logs, holding the handler's lock: where stderr is a
pipe its reader stopped reading (a supervisor that started the daemon with stderr=PIPE and then waits on something
else), the 64 KiB the pipe holds filled, the next line's write blocked, and with it every thread that logged after it
(an Attach logs a line: no session started, and sessions ending stalled the same way; the scheduler's Register logs
one under the core's lock: the pool stopped). `BackgroundStderr` hands each line to a writer thread of its own
through a buffer (`LineSink`, `BUFFER_BYTES`): a log call never waits on the pipe; the writer waits instead, so a
reader that reads, however slowly, loses nothing the buffer holds; a buffer full (nobody reads) drops what comes,
whole lines, counted and said in one line where one fits again.

What does not go through `logging` wrote to descriptor 2 as it was until round 40, and blocked the same way: the
tracebacks Python prints itself (an uncaught exception in a thread, `sys.excepthook`), and what C code writes there
(gRPC's core under GRPC_TRACE or GRPC_VERBOSITY, torch's C++ warnings). `StderrPump` makes descriptor 2 a pipe of the
process's own (dup2) that a thread of its own drains into the same `LineSink`, whose writer writes to the real stderr
(the descriptor 2 the process was started with: a terminal, a file, a supervisor's pipe, journald's socket): nothing
written to descriptor 2 ever waits longer than that thread takes to read it. Children inherit the pipe (the daemon's
zygote and its workers' forwarded output, a compiler) and are drained the same way while the process lives.

The zygote, single-threaded (it forks), has the same for its own lines on its non-blocking stderr (server/zygote.py
`StderrSink.log`)."""

from __future__ import annotations

import array
import atexit
import collections
import errno
import faulthandler
import fcntl
import logging
import os
import select
import sys
import termios
import threading
import time

BUFFER_BYTES = 1 << 20  # lines kept for the writer: past this, nobody reads stderr, and lines are dropped
FLUSH_WAIT = 2.0  # seconds `flush` (logging.shutdown's, at exit) waits for the writer
LINE_MAX = 64 * 1024  # a line of C output longer than this (no newline yet) is passed on in pieces
PARTIAL_WAIT = 0.1  # seconds the end of a line without its newline waits for the rest before it is passed on
# What the pump's pipe holds (F_SETPIPE_SZ; 1 MiB, the default most an unprivileged process may ask, else the kernel's
# default, 64 KiB): C code that writes to descriptor 2 while it holds the GIL waits until the pump's thread, which
# needs the GIL, reads: past what the pipe holds that write never returned (round 40: 500 KB in one write hung the
# process for good with 64 KiB).
PIPE_BYTES = 1 << 20


class LineSink:
    """Whole lines kept for a writer thread that writes them to `fd`: `put` never waits (see the module's docstring).
    Past `limit` bytes kept, lines are dropped, counted, and said in one line where one fits again."""

    def __init__(self, fd: int = 2, limit: int = BUFFER_BYTES) -> None:
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
        self.dropped_total = 0  # lines dropped since the start
        self._pid = os.getpid()
        threading.Thread(target=self._writer, name="gpupool-log", daemon=True).start()

    def put(self, data: bytes) -> None:
        """Keep one line (`data`, its newline included) for the writer, or drop it (counted) when the buffer is full."""
        if self._pid != os.getpid():
            self._begin()
        with self._ready:
            if self.dropped:
                note = f"... {self.dropped} log lines dropped here (stderr full: nobody read it)\n".encode()
                if self._bytes + len(note) + len(data) > self.limit:
                    self.dropped += 1
                    self.dropped_total += 1
                    return
                self._lines.append(note)
                self._bytes += len(note)
                self.dropped = 0
            elif self._bytes + len(data) > self.limit:
                self.dropped += 1
                self.dropped_total += 1
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


class BackgroundStderr(logging.Handler):
    """A log handler whose `emit` never waits on stderr: see the module's docstring. Its lines go to `sink`, by
    default the `StderrPump`'s where one drains this process's stderr (`fd` 2), else a `LineSink` of its own."""

    def __init__(self, fd: int = 2, limit: int = BUFFER_BYTES, sink: LineSink | None = None) -> None:
        super().__init__()
        if sink is None:
            sink = PUMP.sink if PUMP is not None and fd == 2 else LineSink(fd, limit)
        self.sink = sink

    @property
    def dropped(self) -> int:
        """Lines dropped since the last one kept."""
        return self.sink.dropped

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:  # noqa: BLE001 - logging's own convention: a record that cannot be formatted is reported
            self.handleError(record)
            return
        self.sink.put(data)

    def flush(self, timeout: float = FLUSH_WAIT) -> None:
        """Wait (at most `timeout` s: a reader that stopped is not waited for) until the writer wrote every line."""
        self.sink.flush(timeout)


class StderrPump:
    """Descriptor 2 made a pipe that a thread of this process drains into a `LineSink` writing to the real stderr:
    see the module's docstring. `install` makes one (once a process)."""

    def __init__(self, limit: int = BUFFER_BYTES) -> None:
        self.real = os.dup(2)  # the stderr this process was started with (not inherited by children)
        read, write = os.pipe()  # (neither inherited)
        try:
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:  # (past /proc/sys/fs/pipe-max-size, or the user's pipe pages spent: the kernel's default)
            pass
        self.read = read
        self.sink = LineSink(self.real, limit)
        self._tail = b""  # the end of a line whose newline has not come yet
        self._lock = threading.Lock()  # the reader's read and `_take`, `settle`'s and `drain`'s
        os.dup2(write, 2)  # inherited: children write here too
        os.close(write)
        self._pid = os.getpid()
        self._reader = threading.Thread(target=self._read, name="gpupool-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self.read, select.POLLIN)
        while True:
            ready = poller.poll(PARTIAL_WAIT * 1000 if self._tail else None)
            if not ready:  # the end of a line waited long enough: passed on as it is
                with self._lock:
                    tail, self._tail = self._tail, b""
                    if tail:
                        self.sink.put(tail)
                continue
            # The read and the lines put under one hold of the lock (the pipe has one reader: a read after poll
            # never waits): what `settle` saw leave the pipe is in the sink once it holds the lock.
            with self._lock:
                try:
                    chunk = os.read(self.read, 1 << 16)
                except InterruptedError:
                    continue
                except OSError:
                    return
                if not chunk:  # every writer gone (descriptor 2 closed, and no child holds it)
                    return
                self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        """The whole lines of what was read put into the sink, the rest kept; the caller holds the lock."""
        lines = (self._tail + chunk).split(b"\n")
        self._tail = lines.pop()
        for line in lines:
            self.sink.put(line + b"\n")
        while len(self._tail) > LINE_MAX:
            self.sink.put(self._tail[:LINE_MAX])
            self._tail = self._tail[LINE_MAX:]

    def settle(self, timeout: float = FLUSH_WAIT) -> None:
        """Wait (at most `timeout` s) until what was written to descriptor 2 before this call is in the sink (but
        the end of a line without its newline: `drain`). Until round 40's review `drain` could see the pipe empty
        while the reader had read a chunk and not put its lines yet, and the sink's flush went on without them."""
        deadline = time.monotonic() + timeout
        while self.pending() and self._reader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:  # (a chunk read is put before the reader lets go of it)
            pass

    def pending(self) -> int:
        """Bytes written to descriptor 2 and not read yet (FIONREAD)."""
        n = array.array("i", [0])
        try:
            fcntl.ioctl(self.read, termios.FIONREAD, n)
        except OSError:
            return 0
        return n[0]

    def drain(self, timeout: float = FLUSH_WAIT) -> None:
        """At exit: what Python holds for stderr written, the pipe read to its end (by the reader), a line's end
        without its newline passed on, and the writer waited for (all of it at most `timeout` s)."""
        if self._pid != os.getpid():
            return
        deadline = time.monotonic() + timeout
        for handler in logging.getLogger().handlers:  # (`logging.shutdown` runs after this: lines logged before it)
            if isinstance(handler, BackgroundStderr):
                continue  # (they put into our sink directly)
            try:
                handler.flush()
            except Exception:  # noqa: BLE001 - a handler that cannot flush at exit loses its lines, not the exit
                pass
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        self.settle(max(0.0, deadline - time.monotonic()))
        with self._lock:
            tail, self._tail = self._tail, b""
            if tail:
                self.sink.put(tail)
        self.sink.flush(max(0.0, deadline - time.monotonic()))

    def _forked(self) -> None:
        """In a forked child (no exec): the reader is its parent's thread; the child's writes to descriptor 2 still
        reach the pipe its parent drains. The read end is the parent's alone (a child holding it would keep the pipe
        open after the parent's end)."""
        try:
            os.close(self.read)
        except OSError:
            pass


PUMP: StderrPump | None = None


def install(limit: int = BUFFER_BYTES) -> StderrPump | None:
    """Drain this process's descriptor 2 with a `StderrPump` (once; None where there is no descriptor 2 to take over).
    Python's fatal-error tracebacks (`faulthandler`: a crash, SIGSEGV, SIGABRT) go to the real stderr directly: the
    pump's thread does not run once the process is dying."""
    global PUMP
    if PUMP is not None:
        return PUMP
    try:
        os.fstat(2)
    except OSError:  # started with descriptor 2 closed: nothing to drain, nowhere to write
        return None
    PUMP = StderrPump(limit)
    pump = PUMP
    os.register_at_fork(after_in_child=pump._forked)
    atexit.register(pump.drain)
    try:
        faulthandler.enable(file=pump.real, all_threads=True)
    except (OSError, ValueError, RuntimeError):
        pass
    return pump
