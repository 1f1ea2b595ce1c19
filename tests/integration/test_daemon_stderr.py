"""The daemon's and the zygote's own log lines never wait on their stderr (round 39): a daemon whose stderr is a pipe
its reader stopped reading (a supervisor that started `gpupool serve` with stderr=PIPE and waits on something else)
still serves every session, and what it logged meanwhile arrives whole, none lost, once the pipe is read again."""

from __future__ import annotations

import fcntl
import os
import re
import select
import subprocess
import sys
import threading
from pathlib import Path

from gpupool.client.session import Session
from support import MiB, read_until, start_serve_unread, stop_process

PIPE_BYTES = 4096  # the smallest a pipe holds (a page): a few sessions' lines fill it


def test_a_daemon_whose_stderr_pipe_is_not_read_still_serves_and_loses_no_line(
    tmp_path: Path, token_key_file: Path, token_key: bytes
) -> None:
    """Sessions attach and close (each logs two lines) while nobody reads the daemon's stderr, a pipe of 4 KiB: all
    of them are served, and once the pipe is read every session's lines are there, whole. On 1344c19 a log call
    waited in its write on the full pipe: the Attach that logged next never answered (nor did any after it)."""
    fifo = tmp_path / "stderr"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    writer = os.open(fifo, os.O_WRONLY)
    proc, d, said = start_serve_unread(token_key_file, token_key, reader, writer)
    try:
        served: list[int] = []

        def sessions() -> None:
            for _ in range(30):
                with Session.attach(d.address, d.token(quota_bytes=16 * MiB)) as s:
                    s.sync()
                served.append(1)

        t = threading.Thread(target=sessions, daemon=True)
        t.start()  # (the pipe is not read meanwhile)
        t.join(300)
        assert len(served) == 30, f"{len(served)} sessions served, then the daemon stopped answering"
        with Session.attach(d.address, d.token(quota_bytes=16 * MiB)) as s:  # its lines come after the others'
            s.sync()
        said += read_until(reader, rb"closed session 31 ", 60)
        lines = said.decode(errors="replace").splitlines()
        closed = [int(m.group(1)) for line in lines if (m := re.search(r"closed session (\d+) ", line))]
        assert closed == list(range(1, 32)), closed
        assert "log lines dropped" not in said.decode(errors="replace")  # (the logsink's note; not other words)
        assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ gpupool-", line) for line in lines if line), lines
    finally:
        stop_process(proc)  # type: ignore[arg-type]
        os.close(reader)


def test_the_daemons_log_lines_past_its_buffer_are_dropped_counted_and_said(tmp_path: Path) -> None:
    """The daemon's handler (gpupool/logsink.py) on a pipe nobody reads: each log call returns at once; past the
    buffer lines are dropped whole and counted, and the count is said in one line, in place, once the pipe is read
    and a line fits again (a real pipe and writer thread, the buffer made small)."""
    import logging

    from gpupool.logsink import BackgroundStderr

    r, w = os.pipe()
    os.set_blocking(r, False)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    handler = BackgroundStderr(fd=w, limit=8192)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("tail39-test")
    log.propagate = False
    log.addHandler(handler)
    try:
        for i in range(2000):  # 100 KB: far past the pipe and the buffer
            log.warning("line %04d %s", i, "x" * 40)
        assert handler.dropped > 0
        got = b""
        while more := read_until(r, rb"(?!)", 1.0):  # what the pipe and the buffer held: until a second of nothing
            got += more
        log.warning("line after")
        got += read_until(r, rb"line after\n", 10)
        lines = got.decode().splitlines()
        assert all(re.fullmatch(r"line \d{4} x{40}|\.\.\. \d+ log lines dropped here .*|line after", x) for x in lines)
        kept = [int(x.split()[1]) for x in lines if x.startswith("line ") and x != "line after"]
        assert kept == list(range(len(kept))) and 0 < len(kept) < 2000  # the first ones, in order
        note = re.search(r"\.\.\. (\d+) log lines dropped here", lines[-2])
        assert note and len(kept) + int(note.group(1)) == 2000, lines[-3:]
    finally:
        log.removeHandler(handler)
        os.close(w)
        os.close(r)


def test_the_zygotes_own_log_lines_never_wait_and_arrive_once_read(tmp_path: Path) -> None:
    """The zygote's log handler (its `StderrSink`) with its stderr a pipe nobody reads: 200 lines logged return at
    once (kept, not written), and once the pipe is read they all arrive, whole and in order, as the zygote's loop
    tries again. On 1344c19 the zygote's logging wrote to its stderr as it is and the first full write blocked."""
    fifo = tmp_path / "stderr"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    writer = os.open(fifo, os.O_WRONLY)
    script = (
        "import logging, sys, time\n"
        "from gpupool.server.zygote import SinkHandler, StderrSink\n"
        "sink = StderrSink()\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s', handlers=[SinkHandler(sink)])\n"
        "for i in range(200):\n"
        "    logging.getLogger('z').info('zygote line %03d %s', i, 'y' * 60)\n"
        "print('logged', flush=True)\n"
        "while sink.flush_own():\n"
        "    time.sleep(0.01)\n"
        "print('flushed', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=writer, text=True)
    os.close(writer)
    try:
        assert proc.stdout is not None
        ready = select.select([proc.stdout], [], [], 120)[0]
        assert ready and proc.stdout.readline() == "logged\n", "the zygote's log calls waited on the full pipe"
        got = read_until(reader, rb"zygote line 199 y+\n", 60)
        assert proc.stdout.readline() == "flushed\n"
        lines = got.decode().splitlines()
        assert lines == [f"zygote line {i:03d} {'y' * 60}" for i in range(200)], lines[:3]
    finally:
        proc.kill()
        proc.wait()
        os.close(reader)
