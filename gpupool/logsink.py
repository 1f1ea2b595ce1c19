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
process's own (dup2) that a small process of its own (the pump: this module run by `python -I -S`; until round 41 a
thread, which C code holding the GIL kept from reading) drains into a `LineSink`, whose writer writes to the real
stderr (the descriptor 2 the process was started with: a terminal, a file, a supervisor's pipe, journald's socket):
nothing written to descriptor 2 ever waits longer than the pump takes to read it. The process's own log lines go
through the same pipe. Children inherit the pipe (the daemon's zygote and its workers' forwarded output, a compiler)
and are drained the same way while they live (after the program ended, `FLUSH_WAIT` s at most).

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
from collections.abc import Callable

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

    def __init__(
        self,
        fd: int = 2,
        limit: int = BUFFER_BYTES,
        fallback: int | None = None,
        direct: bool = False,
        on_gone: Callable[[], None] | None = None,
    ) -> None:
        self.fd, self.limit = fd, limit
        self.fallback = fallback  # written to instead once `fd` is a pipe with no reader (the stderr pump gone)
        self.on_gone = on_gone  # called then (the pump's: descriptor 2 made the real stderr again)
        # `put` writes a line itself while nothing waits for the writer (`fd` must be non-blocking): in order with
        # what others write to the same pipe meanwhile (the `StderrPump`'s, where C code writes too)
        self.direct = direct
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
            if self.direct and not self._lines and not self._writing:
                n = self._try_write(data)
                if n == len(data):
                    return
                data = data[n:]  # (the rest, in order, by the writer)
            self._lines.append(data)
            self._bytes += len(data)
            self._ready.notify()

    def _try_write(self, data: bytes) -> int:
        """Bytes of `data` written to the non-blocking `fd` now (0 where it is full)."""
        try:
            return os.write(self.fd, data)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                self._reader_gone()
            return 0

    def _reader_gone(self) -> None:
        """`fd` is a pipe nobody reads any more (the stderr pump died): the fallback written to from now on, by the
        writer (blocking)."""
        if self.fallback is not None:
            self.fd, self.fallback, self.direct = self.fallback, None, False
            if self.on_gone is not None:
                self.on_gone()

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
                if exc.errno == errno.EPIPE and self.fallback is not None:
                    self._reader_gone()
                elif exc.errno != errno.EINTR:
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


class _Reader:
    """The pump's reading side (in the pump's process): a thread that reads the pipe `fd` and puts its whole lines into
    `sink` (a line's end without its newline after `PARTIAL_WAIT`, a line longer than `LINE_MAX` in pieces)."""

    def __init__(self, fd: int, sink: LineSink) -> None:
        self.fd, self.sink = fd, sink
        self._tail = b""  # the end of a line whose newline has not come yet
        self._lock = threading.Lock()  # the reader's read and `_take`, `settle`'s and `drain`'s
        self.thread = threading.Thread(target=self._read, name="gpupool-stderr", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            ready = poller.poll(PARTIAL_WAIT * 1000 if self._tail else None)
            if not ready:  # the end of a line waited long enough: passed on as it is
                self.put_tail()
                continue
            # The read and the lines put under one hold of the lock (the pipe has one reader: a read after poll
            # never waits): what `settle` saw leave the pipe is in the sink once it holds the lock.
            with self._lock:
                try:
                    chunk = os.read(self.fd, 1 << 16)
                except InterruptedError:
                    continue
                except OSError:
                    return
                if not chunk:  # every writer gone (descriptor 2 closed, and no child holds it)
                    tail, self._tail = self._tail, b""
                    if tail:
                        self.sink.put(tail)
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

    def put_tail(self) -> None:
        """The end of a line without its newline passed on as it is."""
        with self._lock:
            tail, self._tail = self._tail, b""
            if tail:
                self.sink.put(tail)

    def settle(self, timeout: float = FLUSH_WAIT) -> None:
        """Wait (at most `timeout` s) until what was written to the pipe before this call is in the sink (but the end
        of a line without its newline). Until round 40's review a drain could see the pipe empty while the reader had
        read a chunk and not put its lines yet, and the sink's flush went on without them."""
        deadline = time.monotonic() + timeout
        while self.pending() and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:  # (a chunk read is put before the reader lets go of it)
            pass

    def pending(self) -> int:
        """Bytes written to the pipe and not read yet (FIONREAD)."""
        n = array.array("i", [0])
        try:
            fcntl.ioctl(self.fd, termios.FIONREAD, n)
        except OSError:
            return 0
        return n[0]


# The pump process's requests (one byte on its control socket; it answers each with one byte once done).
_SETTLE, _DRAIN = b"s", b"d"


def _pump_main(limit: int, ctl_fd: int) -> None:
    """The pump process (`StderrPump`): its stdin the pipe, its stdout the real stderr, `ctl_fd` its control socket.
    It runs no code of the program it drains: only this module's, under its own GIL (`python -I -S`)."""
    import signal
    import socket

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # it ends when the program does (below)
        signal.signal(sig, signal.SIG_IGN)
    sink = LineSink(1, limit)
    reader = _Reader(0, sink)
    ctl = socket.socket(fileno=ctl_fd)
    try:
        while True:
            ask = ctl.recv(1)
            # the program ended (or died): what its children still write is drained until they end, FLUSH_WAIT s at
            # most (then they get EPIPE; a child still holding descriptor 2 does not keep the pump)
            if not ask:
                break
            reader.settle()
            if ask == _DRAIN:
                reader.put_tail()
                sink.flush()
            ctl.sendall(b"k")
    except OSError:
        pass
    reader.thread.join(FLUSH_WAIT)
    reader.put_tail()
    sink.flush()
    os._exit(0)


class StderrPump:
    """Descriptor 2 made a pipe that a process of its own drains into a `LineSink` writing to the real stderr: see the
    module's docstring. `install` makes one (once a process).

    The reader is a process, not a thread (round 41): C code that writes to descriptor 2 while it holds the GIL (a C
    extension's fprintf, gRPC's core under some paths, ctypes.PyDLL) waited until a thread of this process, which
    needs the GIL, read the pipe: past what the pipe holds (1 MiB) that write never returned and the process hung for
    good. The pump process (`_pump_main`, this module run by `sys.executable -I -S`) has a GIL of its own. This
    process's own log lines (`sink`, `BackgroundStderr`) go through the same pipe, after what was written before
    them. `settle` and `drain` ask the pump process over a socket pair and wait for its answer."""

    def __init__(self, limit: int = BUFFER_BYTES) -> None:
        import socket
        import subprocess

        self.real = os.dup(2)  # the stderr this process was started with (not inherited by children)
        read, write = os.pipe()  # (neither inherited)
        try:
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:  # (past /proc/sys/fs/pipe-max-size, or the user's pipe pages spent: the kernel's default)
            pass
        self.ctl, theirs = socket.socketpair()  # (not inherited: the pump sees its end close when this process ends)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), "--pump", str(limit), str(theirs.fileno())],
                stdin=read,
                stdout=self.real,
                stderr=self.real,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a terminal's Ctrl-C (its process group's SIGINT) is not for it
            )
        except BaseException:
            for fd in (read, write, self.real):
                os.close(fd)
            self.ctl.close()
            raise
        finally:
            theirs.close()
        os.close(read)  # (the pump process's alone: with it closed, a pump that died makes writes fail, not block)
        self._ask_lock = threading.Lock()
        try:  # the pipe opened again, a description of our own that never blocks (`LineSink.direct`)
            mine, direct = os.open(f"/proc/self/fd/{write}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC), True
        except OSError:  # (no /proc: the lines by the sink's writer thread, which waits where the pipe is full)
            mine, direct = os.dup(write), False
        os.dup2(write, 2)  # inherited: children write here too
        os.close(write)
        # (through the pipe: in order with what C code and children wrote before; their writer's thread writes where
        # the pipe is full for a moment)
        self.sink = LineSink(mine, limit, fallback=self.real, direct=direct, on_gone=self._gone)
        self._pid = os.getpid()

    def _ask(self, what: bytes, timeout: float) -> None:
        """Send the pump process `what` and wait (at most `timeout` s) for its answer."""
        if self._pid != os.getpid() or timeout <= 0:
            return
        with self._ask_lock:
            try:
                self.ctl.settimeout(timeout)
                self.ctl.sendall(what)
                answer = self.ctl.recv(1)
            except TimeoutError:  # (the pump busy past `timeout`: not waited for)
                return
            except OSError:  # (the pump gone)
                answer = b""
        if not answer:
            self._gone()

    def _gone(self) -> None:
        """The pump process is gone (killed: it ignores the signals a terminal or a supervisor's stop sends): descriptor
        2 made the real stderr again, so that what this process and the children it starts from now on write there is
        not lost, and a child that leaves SIGPIPE at its default (`subprocess` restores it before an exec: a shell, a
        compiler) does not die of its first write to stderr. Until schedrev41 descriptor 2 stayed the dead pump's pipe:
        a print to sys.stderr raised BrokenPipeError, C code's writes were lost, `sh -c 'echo x >&2'` died of SIGPIPE.
        Found by the sink's next write (EPIPE) or a `settle`/`drain` unanswered."""
        if self._pid != os.getpid():
            return
        try:
            os.dup2(self.real, 2)
        except OSError:
            pass
        self.process.poll()  # (reaped: no zombie left)

    def settle(self, timeout: float = FLUSH_WAIT) -> None:
        """Wait (at most `timeout` s) until what was written to descriptor 2 before this call is in the pump's sink
        (but the end of a line without its newline: `drain`), so kept for the real stderr or dropped (counted)."""
        self.sink.flush(timeout)
        self._ask(_SETTLE, timeout)

    def drain(self, timeout: float = FLUSH_WAIT) -> None:
        """At exit: what Python holds for stderr written, the pipe read to its end (by the pump), a line's end
        without its newline passed on, and the pump's writer waited for (all of it at most `timeout` s)."""
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
        self.sink.flush(max(0.0, deadline - time.monotonic()))
        self._ask(_DRAIN, deadline - time.monotonic())

    def _forked(self) -> None:
        """In a forked child (no exec): its writes to descriptor 2 still reach the pipe the pump drains. The control
        socket is this process's alone (a child holding it would keep the pump waiting after this process ended)."""
        self.ctl.close()


PUMP: StderrPump | None = None


def install(limit: int = BUFFER_BYTES) -> StderrPump | None:
    """Drain this process's descriptor 2 with a `StderrPump` (once; None where there is no descriptor 2 to take over).
    Python's fatal-error tracebacks (`faulthandler`: a crash, SIGSEGV, SIGABRT) go to the real stderr directly: they
    are written from a signal handler, and this process's log lines in the pump's way could hide them."""
    global PUMP
    if PUMP is not None:
        return PUMP
    try:
        os.fstat(2)
    except OSError:  # started with descriptor 2 closed: nothing to drain, nowhere to write
        return None
    try:
        pump = StderrPump(limit)
    except (OSError, ValueError, TypeError) as exc:  # (no pump process: descriptor 2 left as it is, written to)
        logging.getLogger(__name__).warning("stderr written directly (no stderr pump: %s)", exc)
        return None
    PUMP = pump
    os.register_at_fork(after_in_child=pump._forked)
    atexit.register(pump.drain)
    try:
        faulthandler.enable(file=pump.real, all_threads=True)
    except (OSError, ValueError, RuntimeError):
        pass
    return pump


if __name__ == "__main__" and sys.argv[1:2] == ["--pump"]:
    _pump_main(int(sys.argv[2]), int(sys.argv[3]))
