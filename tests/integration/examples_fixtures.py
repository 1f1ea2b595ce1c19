"""`gpupool up` pools for the tests (fake GPUs, loopback, port 0) and the environment a client needs to use one, taken
from the `export GPUPOOL_...=...` lines it prints (so a change in how clients connect - TLS material, say - reaches
these tests without touching them). The pools shared by several modules are tests/integration/conftest.py's."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# How long a test waits for `gpupool up` to print its exports while `up` lives (up bounds each phase of its start
# itself - START_TIMEOUT, 120 s, for the scheduler, again for the daemon's registration - and exits saying which,
# which ends the wait at once). Measured: 30-37 s at load 13-14 (4 starts, round 49, pipe49), 106 s and more at load
# ~30 (seed49): the 120 s this was until round 49 left 13% over the latter, less than one of up's own phase bounds.
UP_WAIT_S = 300.0
EXPORT_RE = re.compile(r"^\s*export (GPUPOOL_[A-Z_]+)=(\S+)\s*$", re.MULTILINE)


def up_env(log: str) -> dict[str, str]:
    """The variables `gpupool up` tells a client to export."""
    return dict(EXPORT_RE.findall(log))


@contextlib.contextmanager
def gpupool_up(tmp: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """A running `gpupool up FLAGS` (fake GPUs, loopback, port 0, state and log in `tmp`; `env`: variables of its own,
    which its daemon reads too: `GPUPOOL_WORKER_MEMORY`); yields the client environment and stops the pool after."""
    log_path = tmp / "up.log"
    cmd = [sys.executable, "-m", "gpupool.cli", "up", "--scheduler-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0",
           "--metrics-listen", "0", "--scheduler-metrics-listen", "0", "--state", str(tmp / "scheduler.db"),
           *flags]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=None if env is None else {**os.environ, **env}
        )
    try:
        began = time.monotonic()
        deadline = began + UP_WAIT_S
        exports: dict[str, str] = {}
        while "GPUPOOL_SCHEDULER" not in exports and time.monotonic() < deadline and proc.poll() is None:
            exports = up_env(log_path.read_text())
            time.sleep(0.2)
        if "GPUPOOL_SCHEDULER" not in exports:
            state = f"exit {proc.returncode}" if proc.poll() is not None else f"still starting after {UP_WAIT_S:g} s"
            load = os.getloadavg()[0]
            raise AssertionError(f"gpupool up did not come up ({state}, load {load:.0f}):\n{log_path.read_text()}")
        yield exports
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def idle_pool(scheduler: str, timeout: float = 30.0) -> str:
    """Wait until the pool at `scheduler` holds no lease (what a test before left is released); returns `scheduler`."""
    from gpupool.client.pool import SchedulerClient

    deadline = time.monotonic() + timeout
    while SchedulerClient(scheduler).list_pool().leases:
        assert time.monotonic() < deadline, f"the pool at {scheduler} still holds leases after {timeout:g} s"
        time.sleep(0.1)
    return scheduler
