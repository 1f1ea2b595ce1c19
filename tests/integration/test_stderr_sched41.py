"""Descriptor 2 of the daemon and the scheduler (gpupool/logsink.py `StderrPump`) drained by a process of its own
(round 41, sched41): until then a thread of the program read the pipe, and C code that wrote to descriptor 2 holding the
GIL waited for that thread, which needed the GIL: past the pipe's 1 MiB the write never returned (test_stderr_rev40.py
`test_c_code_that_holds_the_gil_writes_to_descriptor_2_without_deadlock`, 4.8 MB)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ORDER = """
import logging, os
from gpupool.config import setup_logging
setup_logging("order", background=True)  # (the daemon's and the scheduler's: the pump, their lines through it)
log = logging.getLogger("order")
for i in range(300):
    os.write(2, b"c %d\\n" % i)  # what C code writes, then a log line
    log.info("py %d", i)
"""


def test_log_lines_and_what_c_code_writes_keep_their_order(tmp_path: Path) -> None:
    """A program alternates a write to descriptor 2 (as C code does) and a log line, 300 times: they reach the real
    stderr in the order written. On 50464ae a log line went into the sink at once, a C write when the pump's thread
    read the pipe: log lines overtook what was written before them."""
    with open(tmp_path / "stderr", "wb") as err:
        subprocess.run([sys.executable, "-c", ORDER], stderr=err, timeout=60, check=True)
    lines = (tmp_path / "stderr").read_text().splitlines()
    said = [x.split(": ", 1)[1] if " order INFO " in x else x for x in lines]
    want = [x for i in range(300) for x in (f"c {i}", f"py {i}")]
    assert said == want, next(
        (i, said[i - 2 : i + 3]) for i, (a, b) in enumerate(zip(said, want, strict=False)) if a != b
    )


KILLED = """
import os, signal, sys, time
from gpupool import logsink
signal.signal(signal.SIGINT, signal.default_int_handler)  # as under a terminal (a harness that ran the tests as a
# background job of a non-interactive shell left SIGINT ignored, which Python then keeps: the Ctrl-C did nothing)
pump = logsink.install()
os.write(2, b"before the kill\\n")
print(pump.process.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT to its process group"])
def test_the_pump_process_ends_with_its_program_and_writes_what_it_was_given(tmp_path: Path, how: str) -> None:
    """The program is killed (SIGKILL: no atexit, no drain), or its process group gets a terminal's Ctrl-C (SIGINT):
    its pump process ends too, within seconds, after writing what reached descriptor 2 before (and, for Ctrl-C, the
    program's KeyboardInterrupt traceback: the pump, in a session of its own, did not get the SIGINT). The pump
    process is new in round 41 (no test of it on 50464ae)."""
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED], stdout=subprocess.PIPE, stderr=err, start_new_session=True, text=True
        )
        assert proc.stdout is not None
        pump = int(proc.stdout.readline())
        try:
            assert _alive(pump)
            if how == "SIGKILL":
                proc.kill()
            else:
                os.killpg(proc.pid, signal.SIGINT)
            proc.wait(30)
            deadline = time.monotonic() + 20
            while _alive(pump) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(pump), "the pump process outlived its program"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if _alive(pump):
                os.kill(pump, signal.SIGKILL)
    text = (tmp_path / "stderr").read_text()
    assert text.startswith("before the kill\n"), text[:200]
    if how != "SIGKILL":
        assert text.rstrip().endswith("KeyboardInterrupt"), text[-200:]
