"""The daemon's side of a round trip: the fast Sync's liveness probe (server/worker.py) and the reply path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from gpupool.server import worker


def _wait_quiet(fd: int) -> None:
    deadline = time.monotonic() + 10
    while not worker._quiet_stat(fd):
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSEGV"])
def test_a_held_stat_file_follows_its_process_to_the_end(sig: str) -> None:
    """ProcessRunner.idle reads the worker's /proc stat file through one fd held open: each read is fresh (a
    stopped, then woken, then killed process reads as such), and once the process is reaped the fd fails with
    OSError (idle() then says no) instead of reading whichever process reuses the pid."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fd = os.open(f"/proc/{p.pid}/stat", os.O_RDONLY)
    try:
        _wait_quiet(fd)
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(0.05)
        assert not worker._quiet_stat(fd)
        os.kill(p.pid, signal.SIGCONT)
        _wait_quiet(fd)
        os.kill(p.pid, getattr(signal, sig))
        for _ in range(20):
            assert not worker._quiet_stat(fd)
            time.sleep(0.002)
        p.wait()
        with pytest.raises(OSError):
            worker._quiet_stat(fd)
    finally:
        os.close(fd)
        if p.poll() is None:
            p.kill()
            p.wait()
