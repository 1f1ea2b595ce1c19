"""A detached pool's log (round 52): `gpupool up --detach` writes up.log through a keeper process under `up`
(gpupool/uplog.py) that moves it to up.log.1 past `--log-size` and begins a fresh one, at a line's start; a new start
keeps the previous start's log in up.log.1; `gpupool down` returns once the log's last line is written. Until round 52
up.log grew for as long as the pool ran, and each start truncated the last one's."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from test_up_down51 import LOOPBACK, down_stops_the_pool_and_every_process_it_started, gpupool

from gpupool import uplog
from gpupool.down import descendants, started

pytestmark = pytest.mark.slow

LINES = [f"line {i:04d} {'x' * (i % 37)}\n".encode() for i in range(400)]


def test_the_keeper_caps_the_log_at_a_lines_start_and_outlives_a_stop_signal(tmp_path: Path) -> None:
    """The keeper as `up` runs it: lines in pieces through its stdin (a pipe), SIGTERM and SIGINT meanwhile (a stop's
    last lines are still written); at the pipe's end every file is at most the cap, ends a line, and up.log.1 then
    up.log are the last lines in order."""
    log = tmp_path / "up.log"
    read, write = os.pipe()
    keeper = uplog.start(read, str(log), 1000)
    os.close(read)
    keeper.send_signal(signal.SIGTERM)  # (at once: a stop while `up` starts)
    data = b"".join(LINES)
    for i in range(0, len(data), 333):  # (pieces that end mid-line)
        os.write(write, data[i : i + 333])
        if i == 3330:
            keeper.send_signal(signal.SIGTERM)
            keeper.send_signal(signal.SIGINT)
    os.close(write)
    assert keeper.wait(60) == 0
    old, new = (tmp_path / "up.log.1").read_bytes(), log.read_bytes()
    assert 0 < len(old) <= 1000 and 0 < len(new) <= 1000, (len(old), len(new))
    assert old.endswith(b"\n") and new.endswith(LINES[-1])
    assert data.endswith(old + new)
    assert (os.stat(log).st_mode & 0o777) == 0o600


def test_a_detached_pools_log_is_capped_and_the_last_starts_kept(tmp_path: Path) -> None:
    """(Its `--state` a folder, as `down`'s: until round 52 `up --state DIR` kept its keys and CA in DIR's parent and
    stopped, "unable to open database file", and `down --state DIR` checked DIR's parent; test_journey52's own pool
    checked it until round 53.)"""
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    state = folder / "scheduler.db"
    log = folder / "up.log"
    try:
        done = gpupool("up", "--detach", *LOOPBACK, "--state", str(folder), "--log-size", "2KiB")
        # (its start's lines, several KiB, rotated while `--detach` followed them: the banner still came)
        assert done.returncode == 0 and done.stdout.startswith("gpupool is up:"), done.stdout + done.stderr
        assert f"`gpupool down --state {state}` stops it" in done.stdout
        assert state.is_file() and (folder / "token.key").is_file()
        assert "listening on" in done.stderr  # the start's lines passed on, across the rotation
        record = json.loads((state.parent / "up.json").read_text())
        processes = descendants(record["pid"])
        keepers = [p for p in processes if b"uplog.py" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(keepers) == 1, processes
        sizes = [os.stat(f).st_size for f in (log, Path(f"{log}.1"))]
        assert all(0 < size <= 2048 for size in sizes), sizes
        # A second `up --detach` on the folder: refused in a line, the running pool's log untouched (until round 52
        # it was truncated, its start's lines lost)
        logs = log.read_bytes(), Path(f"{log}.1").read_bytes()
        second = gpupool("up", "--detach", *LOOPBACK, "--state", str(state))
        assert second.returncode == 1 and second.stdout == "", second.stdout
        assert (
            second.stderr == f"gpupool up: a pool already runs on {state.parent} (gpupool up, pid {record['pid']}): "
            "`gpupool down` with its --state stops it; a second pool needs its own --state and ports\n"
        )
        assert (log.read_bytes(), Path(f"{log}.1").read_bytes()) == logs
        stopped = gpupool("down", "--state", str(folder))
        assert stopped.returncode == 0 and stopped.stdout.startswith("gpupool down: stopped gpupool up"), stopped.stderr
        assert started(keepers[0]) is None  # `down` waited for it: the log's last line is written
        assert log.read_text().endswith("gpupool up: stopped\n"), log.read_text()[-2000:]
        assert os.stat(log).st_size <= 2048

        again = gpupool("up", "--detach", *LOOPBACK, "--state", str(state))  # the default cap, 10 MiB
        assert again.returncode == 0 and again.stdout.startswith("gpupool is up:"), again.stdout + again.stderr
        assert f"its log: {log}): `gpupool down --state {state}` stops it." in again.stdout
        assert Path(f"{log}.1").read_text().endswith("gpupool up: stopped\n")  # the previous start's log, kept
        assert "gpupool is up:" in log.read_text() and "gpupool up: stopped" not in log.read_text()
        # test_up_down51's detached pool (its own start until round 53)
        down_stops_the_pool_and_every_process_it_started(again.stdout, state, detached=True)
    finally:
        gpupool("down", "--state", str(state))
