"""A one-machine pool for the example tests: `gpupool up` (one fake GPU, loopback, port 0) and the environment a
client needs to use it, taken from the `export GPUPOOL_...=...` lines it prints (so a change in how clients
connect - TLS material, say - reaches these tests without touching them)."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPORT_RE = re.compile(r"^\s*export (GPUPOOL_[A-Z_]+)=(\S+)\s*$", re.MULTILINE)


def up_env(log: str) -> dict[str, str]:
    """The variables `gpupool up` tells a client to export."""
    return dict(EXPORT_RE.findall(log))


@contextlib.contextmanager
def gpupool_up(tmp: Path, *flags: str) -> Iterator[dict[str, str]]:
    """A running `gpupool up FLAGS` (fake GPUs, loopback, port 0, state and log in `tmp`); yields the client
    environment and stops the pool after."""
    log_path = tmp / "up.log"
    cmd = [sys.executable, "-m", "gpupool.cli", "up", "--scheduler-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0",
           "--metrics-listen", "0", "--scheduler-metrics-listen", "0", "--state", str(tmp / "scheduler.db"),
           *flags]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        env: dict[str, str] = {}
        while "GPUPOOL_SCHEDULER" not in env and time.monotonic() < deadline and proc.poll() is None:
            env = up_env(log_path.read_text())
            time.sleep(0.2)
        assert "GPUPOOL_SCHEDULER" in env, f"gpupool up did not come up:\n{log_path.read_text()}"
        yield env
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def pool_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running `gpupool up` with one fake GPU; yields the client environment and stops the pool in teardown."""
    with gpupool_up(tmp_path_factory.mktemp("pool"), "--fake-gpus", "1") as env:
        yield env
