"""`gpupool up`'s own stop (round 41, sched41): SIGINT/SIGTERM through `StopSignals` (gpupool/config.py), as the
daemon's and the scheduler's since round 40. Until then its handler set a `threading.Event`, taking the Event's lock
in the main thread between two bytecodes: a signal that landed while that thread held the lock (inside `Event.wait`
between its waits, or inside the handler of a signal just before: a double Ctrl-C, a Ctrl-C and a SIGTERM) waited for
it forever."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from scheduler_fixtures import ROOT

# The window made wide: wherever the main thread waits on an Event with a timeout, it holds the Event's lock for the
# whole timeout (not a few bytecodes), so the test's SIGINT lands inside it. `up` is run unchanged otherwise.
HELD = """
import sys, threading, time
plain = threading.Event.wait
def wait(self, timeout=None):
    if threading.current_thread() is threading.main_thread() and timeout is not None:
        with self._cond:
            time.sleep(timeout)
        return plain(self, 0)
    return plain(self, timeout)
threading.Event.wait = wait
from gpupool import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_up_stops_on_a_signal_that_lands_while_its_main_thread_holds_a_lock(tmp_path: Path) -> None:
    """`gpupool up` (2 fake GPUs, loopback) gets SIGINT while its main thread is inside an Event's lock: it stops
    both children, says "stopped" and exits 0. On 50464ae its handler set an Event from the main thread that held that
    Event's lock (its `stop.wait(0.5)` loop): the handler waited for it forever, `up` never exited."""
    args = ["up", "--fake-gpus", "2", "--fake-gpu-memory", "256MiB", "--scheduler-listen", "127.0.0.1:0",
            "--listen", "127.0.0.1:0", "--state", str(tmp_path / "state" / "scheduler.db"),
            "--metrics-listen", "0", "--scheduler-metrics-listen", "0"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    lines: list[str] = []
    up = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "stops both" in line:  # the banner's last line (`up._stop_line`)
                up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert up.wait(180), "gpupool up did not come up:\n" + "".join(lines)
        time.sleep(1.0)  # (its supervising loop)
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("gpupool up never stopped (its signal handler waited on a lock)") from None
        reader.join(10)
        assert code == 0, "".join(lines[-20:])
        assert "gpupool up: stopped\n" in lines, "".join(lines[-20:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
