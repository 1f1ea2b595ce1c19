"""A second `gpupool up` on one host (journey42): its ports are the first one's, and what it says names the fix.

Until journey42 the scheduler's gRPC port took SO_REUSEPORT (gRPC's default): a second scheduler on 127.0.0.1:50050
bound it beside the first, and the kernel split the connections between two pools; and a metrics port in use ended
`up` with "cannot start: [Errno 98] Address already in use", naming neither the port nor a flag.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

SECOND_POOL = "a second pool needs its own --state and ports"


def up(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    args = ["up", "--fake-gpus", "1", "--fake-gpu-memory", "256MiB", "--state", str(tmp_path / "s" / "scheduler.db")]
    defaults = {"--scheduler-listen": "127.0.0.1:0", "--listen": "127.0.0.1:0", "--metrics-listen": "0",
                "--scheduler-metrics-listen": "0"}  # fmt: skip
    defaults.update(dict(zip(flags[::2], flags[1::2], strict=True)))
    for flag, value in defaults.items():
        args += [flag, value]
    # On the base the scheduler of the first test starts (the port shared), and `up` goes on to its daemon: the
    # timeout ends it, and the test fails
    return subprocess.run(
        [sys.executable, "-m", "gpupool.cli", *args], capture_output=True, text=True, timeout=90, cwd=ROOT, check=False
    )


def test_a_scheduler_port_held_with_so_reuseport_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A gRPC server with gRPC's default options (SO_REUSEPORT, as the base's scheduler) holds the port: the new
    scheduler refuses to share it, and `up` says which port and what to pass."""
    held = grpc.server(futures.ThreadPoolExecutor(1))
    port = held.add_insecure_port("127.0.0.1:0")
    held.start()
    try:
        done = up(tmp_path, "--scheduler-listen", f"127.0.0.1:{port}")
    finally:
        held.stop(None)
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in done.stderr, done.stderr
    # our line only: until round 53 gRPC's core printed "E1207 ... add_port.cc:83] Failed to add port to server: No
    # address added out of total 1 resolved ... Address already in use" first
    assert "Failed to add port" not in done.stderr and "add_port.cc" not in done.stderr, done.stderr
    last = done.stderr.rstrip().splitlines()[-1]
    assert last.startswith("gpupool up: the scheduler did not start") and SECOND_POOL in last, done.stderr


def test_a_metrics_port_in_use_names_the_port_and_the_flag(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = up(tmp_path, "--scheduler-metrics-listen", f"127.0.0.1:{port}")
    assert done.returncode == 1, done.stderr
    assert "Errno 98" not in done.stderr, done.stderr
    assert f"metrics port 127.0.0.1:{port} is in use" in done.stderr and "--metrics-listen" in done.stderr
    last = done.stderr.rstrip().splitlines()[-1]
    assert SECOND_POOL in last and "--scheduler-metrics-listen" in last, done.stderr
