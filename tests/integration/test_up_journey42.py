"""A second `gpupool up` on one host (journey42): its ports are the first one's, and what it says names the fix.

Until journey42 the scheduler's gRPC port took SO_REUSEPORT (gRPC's default): a second scheduler on 127.0.0.1:50050
bound it beside the first, and the kernel split the connections between two pools; and a metrics port in use ended
`up` with "cannot start: [Errno 98] Address already in use", naming neither the port nor a flag.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpupool.tokens import generate_key_file

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


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpupool.cli", *args], capture_output=True, text=True, timeout=90, cwd=ROOT, check=False
    )


def test_a_scheduler_port_held_with_so_reuseport_is_refused_with_the_fix(tmp_path: Path) -> None:
    """A gRPC server with gRPC's default options (SO_REUSEPORT, as the base's scheduler) holds the port: a new
    scheduler refuses to share it, and `up` says which port and what to pass (since round 54 before it starts one)."""
    held = grpc.server(futures.ThreadPoolExecutor(1))
    port = held.add_insecure_port("127.0.0.1:0")
    held.start()
    try:
        done = up(tmp_path, "--scheduler-listen", f"127.0.0.1:{port}")
        generate_key_file(tmp_path / "k.pem")
        key, state = str(tmp_path / "k.pem"), str(tmp_path / "alone.db")
        alone = run_cli("scheduler", "--listen", f"127.0.0.1:{port}", "--insecure", "--token-key-file", key,
                        "--state", state, "--metrics-listen", "0")  # fmt: skip
    finally:
        held.stop(None)
    assert alone.returncode == 1, alone.stderr
    assert f"cannot listen on 127.0.0.1:{port} (--listen): the port is in use" in alone.stderr, alone.stderr
    # our line only: until round 53 gRPC's core printed "E1207 ... add_port.cc:83] Failed to add port to server: No
    # address added out of total 1 resolved ... Address already in use" first
    for stderr in (done.stderr, alone.stderr):
        assert "Failed to add port" not in stderr and "add_port.cc" not in stderr, stderr
    assert done.returncode == 1, done.stderr
    line = f"gpupool up: cannot listen on 127.0.0.1:{port} (--scheduler-listen): the port is in use"
    assert done.stderr.startswith(line), done.stderr
    assert SECOND_POOL in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr


def test_a_metrics_port_in_use_names_the_port_and_the_flag(tmp_path: Path) -> None:
    """`up`, and a scheduler alone (its --metrics-listen, --health-listen), say one line, the daemon's wording, before
    the scheduler opens its state: a metrics port's says that 0 turns metrics off. Until round 55 the scheduler found
    a busy --metrics-listen after it had opened its state and bound --listen, and said it in gpupool/metrics_http.py's
    words ("metrics port ... is in use ...: give the scheduler another --metrics-listen"), a busy --health-listen
    "cannot listen on ADDRESS" alone, and `up` its own words."""
    generate_key_file(tmp_path / "k.pem")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = up(tmp_path, "--scheduler-metrics-listen", f"127.0.0.1:{port}")
        alone = {}
        for flag in ("--metrics-listen", "--health-listen"):
            alone[flag] = run_cli("scheduler", "--listen", "127.0.0.1:0", "--insecure", "--token-key-file",
                                  str(tmp_path / "k.pem"), "--state", str(tmp_path / f"{flag}.db"),
                                  "--metrics-listen", "0", flag, f"127.0.0.1:{port}")  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Errno 98" not in done.stderr, done.stderr
    line = f"gpupool up: cannot listen on 127.0.0.1:{port} (--scheduler-metrics-listen): the port is in use"
    assert done.stderr.startswith(line) and SECOND_POOL in done.stderr and len(done.stderr.splitlines()) == 1
    assert "pass another --scheduler-metrics-listen HOST:PORT (port 0: a free one; 0: no metrics)" in done.stderr
    for flag, off in (("--metrics-listen", "0: no metrics"), ("--health-listen", "0: no health port")):
        assert alone[flag].returncode == 1, alone[flag].stderr
        (said,) = alone[flag].stderr.splitlines()
        assert said.endswith(
            f"cannot start: cannot listen on 127.0.0.1:{port} ({flag}): the port is in use (another scheduler, a "
            f"second pool on this host?) or the host is not this machine's; pass another {flag} HOST:PORT (port 0: "
            f"a free one; {off})"
        ), said
        assert not (tmp_path / f"{flag}.db").exists()  # told before the state was opened


def test_a_port_in_use_is_told_before_any_program_starts(tmp_path: Path) -> None:
    """A busy --listen (or --bulk-listen, --metrics-listen): `gpupool serve` says so before its zygote starts, and
    `gpupool up` before its scheduler does (round 54: both found out after the zygote had imported torch and started
    its workers' uids, 6-13 s; `up` also after its scheduler had started, 11.7 s on an idle box)."""
    generate_key_file(tmp_path / "k.pem", tmp_path / "k.pub")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = f"127.0.0.1:{s.getsockname()[1]}"
        daemons = {}
        for flag in ("--listen", "--bulk-listen", "--metrics-listen"):
            ports = {"--listen": "127.0.0.1:0", "--metrics-listen": "0", flag: busy}
            daemons[flag] = run_cli("serve", "--insecure", "--token-public-keys", str(tmp_path / "k.pub"),
                                    "--fake-gpus", "1", *[x for pair in ports.items() for x in pair])  # fmt: skip
        pool = up(tmp_path, "--listen", busy)
    for flag, done in daemons.items():
        assert done.returncode == 1, done.stderr
        assert f"cannot listen on {busy} ({flag}): the port is in use" in done.stderr, done.stderr
        off = "; 0: no metrics" if flag == "--metrics-listen" else ""
        assert f"another {flag} HOST:PORT (port 0: a free one{off})" in done.stderr, done.stderr
        # the zygote never started: its line, and the workers' uids it is started for, are not in the log
        assert "zygote" not in done.stderr and "session workers" not in done.stderr, done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr
    assert pool.returncode == 1, pool.stderr
    assert pool.stderr.startswith(f"gpupool up: cannot listen on {busy} (--listen): the port is in use"), pool.stderr
    assert len(pool.stderr.splitlines()) == 1, pool.stderr  # (the base's scheduler had started and logged)


def test_a_bulk_port_taken_after_the_check_is_the_same_one_line(daemon_factory: Any) -> None:
    """A --bulk-listen port taken between `gpupool serve`'s check at its start and its bind, seconds later (after its
    zygote's torch import; here the daemon is built as serve builds it after that check): the checked ports' one line,
    an OSError `serve` logs as "cannot start: ..." (exit 1), and the daemon's threads stopped. Until round 56 it said
    "[Errno 98] Address already in use (while attempting to bind on address (...))", naming neither flag nor fix; a
    --health-listen taken so named "another program" where the check names "another daemon"."""
    before = set(threading.enumerate())
    raised = {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = f"127.0.0.1:{s.getsockname()[1]}"
        for flag in ("--bulk-listen", "--health-listen"):
            with pytest.raises(OSError) as error:
                daemon_factory(**{flag[2:].replace("-", "_"): busy}, isolation="thread")
            raised[flag] = error.value
    for flag, off in (("--bulk-listen", ""), ("--health-listen", "; 0: no health port")):
        assert str(raised[flag]) == (
            f"cannot listen on {busy} ({flag}): the port is in use (another daemon, a second pool on this host?) or "
            f"the host is not this machine's; pass another {flag} HOST:PORT (port 0: a free one{off})"
        )
        assert raised[flag].__cause__ is None
    started = [t for t in threading.enumerate() if t not in before and t.name.startswith("gpupool")]
    for thread in started:  # (told to stop, not joined, by the daemon's stop: they end on their own)
        thread.join(60)
    assert not [t.name for t in started if t.is_alive()], started
