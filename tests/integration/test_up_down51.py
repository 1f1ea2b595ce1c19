"""`gpupool down` (round 51): stops, from another process, the pool a real `gpupool up` runs on a state folder (in the
foreground, or `up --detach`: test_up_log52's last start): every process that pool started gone, its sessions ended
with the daemon's "shutting down", exit 0; a second `down` fails in one line; a stale up.json naming an unrelated live
process (a `sleep`) kills nothing. Until round 51 there was no `gpupool down` (a hint: Ctrl-C or `kill -INT PID`)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpupool.client.pool import SchedulerClient
from scheduler_fixtures import ROOT, Proc, wait_until

from gpupool import tls
from gpupool._proto import device_pb2, device_pb2_grpc, scheduler_pb2
from gpupool.down import descendants, started

pytestmark = pytest.mark.slow

LOOPBACK = ["--fake-gpus", "1", "--fake-gpu-memory", "256MiB", "--scheduler-listen", "127.0.0.1:0", "--listen",
            "127.0.0.1:0", "--metrics-listen", "0", "--scheduler-metrics-listen", "0"]  # fmt: skip


def gpupool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpupool.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def recorded(state: Path) -> dict[str, object]:
    """up.json ({} before `up` wrote it, or while it writes it)."""
    try:
        return dict(json.loads((state.parent / "up.json").read_text()))
    except (OSError, ValueError):
        return {}


def settled(state: Path, *names: str) -> dict[str, object]:
    """up.json once it parses and names each of `names` with its address: `up` truncates and writes it again as its
    children start, its last write (the daemon's address) after its banner, so a read right after the banner found
    it empty now and then (round 52, under load: JSONDecodeError of '')."""
    got: list[dict[str, object]] = []

    def ready() -> bool:
        rec = recorded(state)
        if rec and all(isinstance(rec.get(n), dict) and rec[n].get("address") for n in names):  # type: ignore[union-attr]
            got.append(rec)
        return bool(got)

    wait_until(ready, timeout=60, what=f"up.json to name {names} with their addresses")
    return got[-1]


def attach(banner: str) -> None:
    """A session on the pool's daemon, with the user's certificate the banner's exports name."""
    env = dict(re.findall(r"^\s+export (GPUPOOL_\w+)=(\S+)$", banner, re.M))
    cfg = tls.client_config(ca=env["GPUPOOL_TLS_CA"], cert=env["GPUPOOL_TLS_CERT"], key=env["GPUPOOL_TLS_KEY"])
    pool = SchedulerClient(env["GPUPOOL_SCHEDULER"], cfg)
    lease = pool.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
    pool.close()
    with tls.channel(lease.devices[0].address, cfg=cfg, token=False) as ch:
        request = device_pb2.AttachRequest(token=lease.devices[0].token)
        assert device_pb2_grpc.DeviceStub(ch).Attach(request, timeout=60).session_id


@pytest.fixture
def foreground(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    state = tmp_path / "state" / "scheduler.db"
    proc = Proc(["up", *LOOPBACK, "--state", str(state)])
    try:
        proc.wait_for("stops both", timeout=300)  # (`up._stop_line`: "Ctrl-C stops both" at a terminal)
        yield "\n".join(proc.lines), state
        assert proc.popen.wait(60) == 0, proc.log()
        assert "gpupool up: stopped" in proc.log()
    finally:
        proc.stop()


def test_down_stops_the_pool_and_every_process_it_started(foreground: tuple[str, Path]) -> None:
    down_stops_the_pool_and_every_process_it_started(*foreground, detached=False)


def down_stops_the_pool_and_every_process_it_started(banner: str, state: Path, *, detached: bool) -> None:
    """The pool `up` runs on `state` (its banner: `banner`; `detached`: `up --detach`, test_up_log52's last start)
    holds a session; `down` stops it and every process it started."""
    record = settled(state, "scheduler", "daemon")
    attach(banner)  # the daemon's worker for it, one more process
    processes = descendants(record["pid"])
    assert len(processes) >= 5, processes  # up, the scheduler, the daemon, its zygote, the log pumps
    second = gpupool("up", *LOOPBACK, "--state", str(state))  # refused: the folder's pool runs
    assert second.returncode == 1 and "a pool already runs on" in second.stderr, second.stderr
    assert settled(state)["pid"] == record["pid"]  # (and its record kept)

    done = gpupool("down", "--state", str(state))
    assert done.returncode == 0, done.stderr
    stopped = done.stdout.strip()
    assert stopped.startswith(f"gpupool down: stopped gpupool up (pid {record['pid']}), its daemon "), stopped
    assert f"its scheduler {record['scheduler']['address']} (pid {record['scheduler']['pid']})" in stopped
    left = {pid: start for pid, start in processes.items() if start is not None and started(pid) == start}
    assert not left, f"left running: {left}"
    assert not (state.parent / "up.json").exists()
    if detached:
        log = (state.parent / "up.log").read_text()
        assert re.search(r"closed session \d+ \(lease \S+\): host \S+ is shutting down", log), log[-3000:]
        assert "gpupool up: stopped" in log

    again = gpupool("down", "--state", str(state))
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr == f"gpupool down: no pool runs on {state} (`gpupool up` starts one)\n"


def test_down_stops_a_pool_while_it_starts(tmp_path: Path) -> None:
    """`gpupool down` while `up` waits for its scheduler to say where it listens (here never: its log level is
    WARNING, and that line is INFO; on a first start the daemon's build can take minutes): `up` stops at once, its
    scheduler with it, and exits 0. Until round 51 `up` read a signal only once its pool was up (here after its 120 s
    bound on the scheduler's start: `down` gave up after its 60 s)."""
    state = tmp_path / "state" / "scheduler.db"
    proc = Proc(["up", *LOOPBACK, "--state", str(state)], env={"GPUPOOL_LOG_LEVEL": "WARNING"})
    try:
        wait_until(lambda: "scheduler" in recorded(state), timeout=120, what="up.json to name the scheduler")
        record = recorded(state)
        processes = descendants(record["pid"])
        done = gpupool("down", "--state", str(state), "--timeout", "60")
        assert done.returncode == 0, done.stderr + proc.log()
        assert proc.popen.wait(30) == 0, proc.log()
        assert "gpupool up: stopped" in proc.log() and "gpupool is up" not in proc.log()
        left = {pid: start for pid, start in processes.items() if start is not None and started(pid) == start}
        assert not left, f"left running: {left}"
    finally:
        proc.stop()


@pytest.mark.parametrize("locked", [False, True])
def test_a_stale_record_naming_another_live_process_kills_nothing(tmp_path: Path, locked: bool) -> None:
    """up.json naming a live `sleep` (its pid, its start time): no `up` holds its lock (the `up` that wrote it died;
    the pid given since to the sleep) - removed, nothing signalled; or a lock held (here by the test) over a record
    whose pid is not a `gpupool up` - nothing signalled either."""
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    sleep = subprocess.Popen(["sleep", "600"])
    try:
        record = folder / "up.json"
        record.write_text(json.dumps({"pid": sleep.pid, "start": started(sleep.pid)}))
        with open(record) as held:
            if locked:
                fcntl.flock(held, fcntl.LOCK_EX)
            done = gpupool("down", "--state", str(folder / "scheduler.db"), "--timeout", "5")
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
        if locked:
            assert f"names pid {sleep.pid}, which is not that gpupool up: nothing signalled" in done.stderr
        else:
            assert f"its gpupool up, pid {sleep.pid}, ended without a stop: its up.json removed" in done.stderr
            assert not record.exists()
        assert sleep.poll() is None  # alive
    finally:
        sleep.kill()
        sleep.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="gives the folder to another user (chown)")
def test_down_refuses_a_state_folder_of_another_user(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    (folder / "up.json").write_text(json.dumps({"pid": os.getpid(), "start": started(os.getpid())}))
    os.chown(folder, 65534, 65534)
    done = gpupool("down", "--state", str(folder / "scheduler.db"))
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"gpupool down: state folder {folder} belongs to uid 65534, not to this user")


def test_up_detach_says_why_a_pool_did_not_start(tmp_path: Path) -> None:
    """A detached `up` that cannot start passes its lines on and fails in its own (here: the refusal of a host id no
    certificate can hold, which `up` itself prints)."""
    state = tmp_path / "state" / "scheduler.db"
    done = gpupool("up", "--detach", *LOOPBACK, "--host-id", "rack/7", "--state", str(state), timeout=120)
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert "no '/'" in done.stderr
    last = done.stderr.rstrip().splitlines()[-1]
    assert last == f"gpupool up: the pool did not start (its log: {state.parent}/up.log)", done.stderr
    assert not (state.parent / "up.json").exists()
