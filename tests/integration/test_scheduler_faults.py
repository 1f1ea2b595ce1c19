"""Faults an operator meets, injected into real `gpupool scheduler` / `gpupool serve` processes: a full state disk,
two schedulers on one state file, a paused scheduler (SIGSTOP), a scheduler restart while a job trains, a frozen
daemon whose lease is declared lost while `gpupool run` waits on it.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gpupool.client.pool import SchedulerClient, lease
from scheduler_fixtures import (
    ROOT,
    TRAIN_UNTIL_FILE,
    Proc,
    SimHost,
    pool_state,
    start_daemon,
    start_scheduler,
    wait_until,
)

from gpupool._proto import scheduler_pb2
from gpupool.errors import GpupoolError, Unavailable

FAST = ["--host-timeout", "2", "--heartbeat-interval", "0.3"]


def shares(state: scheduler_pb2.PoolState) -> float:
    return round(sum(d.allocated_share for h in state.hosts for d in h.devices), 6)


def test_a_full_state_disk_refuses_cleanly_and_nothing_is_handed_out_twice(tmp_path: Path) -> None:
    """SQLite on a real file whose growth the kernel refuses (RLIMIT_FSIZE on the scheduler process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, hard))  # inherited by the scheduler only
    try:
        proc, address = start_scheduler(tmp_path, *FAST)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    host = SimHost(address, "hosta", gpus=4).start()
    granted = []
    refused: GpupoolError | None = None
    try:
        for _ in range(400):
            try:
                granted.append(lease(1, 0.01, scheduler=address, tenant="t"))
            except Unavailable as exc:
                refused = exc
                break
        assert refused is not None, "the state file never filled up"
        assert "cannot save its state" in str(refused) and "nothing was changed" in str(refused)
        state = pool_state(address)
        # what the scheduler holds is exactly what it told clients it granted
        assert {x.lease_id for x in state.leases} == {x.lease_id for x in granted}
        assert shares(state) == pytest.approx(0.01 * len(granted))
        with pytest.raises(Unavailable):  # a release that cannot be saved is refused, not half-done
            SchedulerClient(address).release(granted[0].lease_id)
        assert granted[0].lease_id in {x.lease_id for x in pool_state(address).leases}
        assert proc.popen.poll() is None  # still serving
        for x in granted:
            x._stop.set()  # no renewals: the restart below checks what was saved
    finally:
        host.stop()
        proc.kill()
    again, address2 = start_scheduler(tmp_path, *FAST)  # no limit now: the same file, what a restart believes
    try:
        state = pool_state(address2)
        assert {x.lease_id for x in state.leases} == {x.lease_id for x in granted}
        assert shares(state) == pytest.approx(0.01 * len(granted))
    finally:
        again.stop()


def test_a_second_scheduler_on_the_same_state_refuses_or_stands_by(tmp_path: Path) -> None:
    first, address = start_scheduler(tmp_path, *FAST)
    host = SimHost(address, "hosta").start()
    second = standby = None
    try:
        held = lease(1, 0.5, scheduler=address)
        second = Proc(first.args)  # the same flags and state file
        assert second.popen.wait(60) == 1
        second.wait_for(r"cannot start: .*owned by another running scheduler \(pid \d+")
        standby = Proc([*first.args, "--standby"])
        standby.wait_for("standing by")
        address2 = f"127.0.0.1:{standby.port()}"
        with pytest.raises(Unavailable, match="standby"):  # it listens, but serves nothing of a state it does not own
            SchedulerClient(address2).list_pool()
        first.kill()  # kill -9: the kernel drops its lock, the standby takes over with the state
        standby.wait_for("leading now")
        assert [x.lease_id for x in pool_state(address2).leases] == [held.lease_id]
        held._stop.set()
    finally:
        host.stop()
        for p in (first, second, standby):
            if p is not None:
                p.stop()


def test_a_paused_scheduler_does_not_blame_hosts_or_tenants(tmp_path: Path) -> None:
    proc, address = start_scheduler(tmp_path, *FAST)
    host = SimHost(address, "hosta").start()
    try:
        x = lease(1, 0.5, scheduler=address, ttl=2)
        os.kill(proc.popen.pid, signal.SIGSTOP)
        time.sleep(6)  # longer than both the host timeout and the lease TTL
        os.kill(proc.popen.pid, signal.SIGCONT)
        resumed = time.time()
        # The scheduler notices its pause (its first sweep or renewal after it), then the host heartbeats and the
        # client renews again: waited for, not a fixed 3 s (round 28), which a loaded box could outrun.
        proc.wait_for("was not running for")
        forgiven = [h.last_seen for h in pool_state(address).hosts]  # the forgiveness set it to its own time, or later

        def heartbeat_and_renewal_since_resumed() -> bool:
            state = pool_state(address)
            if [h.state for h in state.hosts] != ["up"] or len(state.leases) != 1 or x.lost.is_set():
                return True  # blamed: the asserts below say how
            # a renewal sets expires_at to its time + the 2 s TTL; the one before the pause is <= resumed - 4
            renewed = bool(state.leases) and all(y.expires_at > resumed + 1 for y in state.leases)
            return renewed and [h.last_seen for h in state.hosts] > forgiven  # and a heartbeat since

        wait_until(heartbeat_and_renewal_since_resumed, timeout=60, what="a heartbeat and a renewal after the pause")
        state = pool_state(address)
        assert [h.state for h in state.hosts] == ["up"]
        assert [y.lease_id for y in state.leases] == [x.lease_id]
        assert not x.lost.is_set()
        x.renew()  # (the pause's log line: waited for above, among all the lines; `log()` is the last 80 only)
        x.release()
    finally:
        os.kill(proc.popen.pid, signal.SIGCONT)
        host.stop()
        proc.stop()


def gpupool_run(address: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPUPOOL_SCHEDULER": address}
    env.pop("GPUPOOL_LEASE", None)
    return subprocess.Popen(
        [sys.executable, "-m", "gpupool.cli", "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip


RESTART_TTL = 5  # the lease TTL of the restart test (10 until round 26: 5 s more of waiting, the same path)


@pytest.mark.slow
def test_a_job_trains_through_a_scheduler_restart_longer_than_its_lease_ttl(tmp_path: Path) -> None:
    proc, address = start_scheduler(tmp_path, "--lease-ttl", str(RESTART_TTL))
    daemon, _ = start_daemon(tmp_path, address, "da")
    proc2 = None
    try:
        wait_until(lambda: [h.state for h in pool_state(address).hosts] == ["up"], what="da up")
        stop = tmp_path / "stop"
        job = gpupool_run(address, "-p", "0.5", "--", sys.executable, "-c", TRAIN_UNTIL_FILE, str(stop))
        assert job.stdout is not None
        assert job.stdout.readline().startswith("step 0")
        [held] = pool_state(address).leases
        proc.kill()  # kill -9 with the lease held; back once it has expired and more than its TTL went by
        killed = time.time()
        time.sleep(max(killed + RESTART_TTL, held.expires_at) + 1 - time.time())
        proc2 = Proc(["scheduler", "--listen", address, *proc.args[3:]])
        back = time.time()
        assert [x.lease_id for x in pool_state(address).leases] == [held.lease_id]

        # The job's renewals reach the restarted scheduler (an expiry past the restart), and it trains on after one.
        def renewed_after_restart() -> bool:
            leases = pool_state(address).leases
            assert [x.lease_id for x in leases] == [held.lease_id], "the lease was lost after the restart"
            return leases[0].expires_at > back + 1

        wait_until(renewed_after_restart, timeout=30, what="a renewal after the restart")
        renewed = time.time()
        while True:  # a step the daemon answered a second after that renewal was seen
            line = job.stdout.readline()
            assert line.startswith("step "), line or job.communicate(timeout=60)[1][-3000:]
            if float(line.split()[3]) > renewed + 1:
                break
        assert [x.lease_id for x in pool_state(address).leases] == [held.lease_id]
        stop.touch()
        out, err = job.communicate(timeout=90)
        assert job.returncode == 0, err[-3000:]
        assert out.splitlines()[-1].startswith("done"), out[-500:]
        assert "lease was lost" not in err
    finally:
        daemon.stop()
        for p in (proc, proc2):
            if p is not None:
                p.stop()


@pytest.mark.slow
def test_gpupool_run_fails_at_once_when_its_lease_is_declared_lost(tmp_path: Path) -> None:
    proc, address = start_scheduler(tmp_path, *FAST)
    daemon, _ = start_daemon(tmp_path, address, "dz")
    job = None
    try:
        wait_until(lambda: [h.state for h in pool_state(address).hosts] == ["up"], what="dz up")
        job = gpupool_run(address, "-p", "0.5", "--", sys.executable, "-c", "import time; time.sleep(120)")
        wait_until(lambda: pool_state(address).leases, what="the lease")
        os.kill(daemon.popen.pid, signal.SIGSTOP)  # the daemon freezes: the scheduler declares the lease lost
        t0 = time.monotonic()
        _, err = job.communicate(timeout=90)
        took = time.monotonic() - t0
        assert job.returncode == 1, err[-2000:]
        # the cause: its renewal was refused because the host is down (not the lease's end, not the command's)
        assert "the lease was lost" in err and "host dz is down" in err, err[-2000:]
        # "at once": at its next renewal (every 10 s at most) after the 2 s host timeout, ~12 s on an idle box; the
        # wrong ways take 60 s or more (the lease's TTL: 60 s; the command sleeps 120 s), so the bound is the TTL
        # less a margin, not the idle figure plus one (20 s: a busy CI machine delays the sweep and the renewal)
        assert took < 45, f"gpupool run took {took:.0f} s to give up"
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.communicate()
        os.kill(daemon.popen.pid, signal.SIGCONT)
        daemon.stop()
        proc.stop()
