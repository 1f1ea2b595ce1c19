"""HA on an existing database: two `gpupool scheduler` replicas on a real PostgreSQL (started by the test with
initdb/pg_ctl); one leads, the other stands by. kill -9 of the leader while leases are held and a job trains:
the standby takes over within 10 s, no lease is lost, and the job keeps training.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpupool.client.pool import SchedulerClient, lease
from scheduler_fixtures import ROOT, TRAIN_UNTIL_FILE, Postgres, Proc, SimHost, key_file, start_daemon, wait_until

from gpupool.errors import Unavailable

pytestmark = pytest.mark.slow

LEASE_TTL = 12.0


@pytest.fixture
def postgres() -> Iterator[str]:
    pg = Postgres()
    try:
        yield pg.dsn
    finally:
        pg.stop()


def replica(tmp: Path, dsn: str) -> tuple[Proc, str]:
    proc = Proc(
        ["scheduler", "--listen", "127.0.0.1:0", "--metrics-listen", "0", "--state", dsn, "--standby",
         "--token-key-file", str(key_file(tmp)), "--host-timeout", "4", "--lease-ttl", f"{LEASE_TTL:g}"]
    )  # fmt: skip
    return proc, f"127.0.0.1:{proc.port()}"


def answers(address: str) -> bool:
    try:
        SchedulerClient(address).list_pool()
        return True
    except Unavailable:
        return False


def test_the_standby_takes_over_when_the_leader_is_killed(tmp_path: Path, postgres: str) -> None:
    a, addr_a = replica(tmp_path, postgres)
    a.wait_for("leading now")
    b, addr_b = replica(tmp_path, postgres)
    b.wait_for("standing by")
    both = f"{addr_a},{addr_b}"
    assert not answers(addr_b)  # the standby serves nothing
    daemon, _ = start_daemon(tmp_path, both, "real")
    sims: list[SimHost] = []
    job = None
    stop = tmp_path / "stop"
    try:
        wait_until(lambda: [h.state for h in SchedulerClient(both).list_pool().hosts] == ["up"], what="the daemon")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "GPUPOOL_SCHEDULER": both}
        env.pop("GPUPOOL_LEASE", None)
        job = subprocess.Popen(  # the whole real (fake-GPU) daemon
            [sys.executable, "-m", "gpupool.cli", "run", "-p", "1.0", "--",
             sys.executable, "-c", TRAIN_UNTIL_FILE, str(stop)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert job.stdout is not None
        first = job.stdout.readline()
        assert first.startswith("step 0"), first or job.communicate(timeout=60)[1][-3000:]
        sims = [SimHost(both, f"sim{i}", gpus=2).start() for i in range(2)]
        held = [lease(1, f, scheduler=both, tenant="t") for f in (0.5, 0.5, 1.0, 0.25)]
        before = {x.lease_id for x in SchedulerClient(both).list_pool().leases}
        assert len(before) == len(held) + 1

        a.kill()  # kill -9 of the leader while leases are held and the job trains
        t0 = time.monotonic()
        # The standby leads once the leader's database session ends (its advisory lock freed): ~1 s on an idle box.
        # Waited for generously (a busy CI machine delays PostgreSQL's noticing, the standby's next try and its
        # loading of the state); a standby that waited for something slower (TCP keepalives: minutes) or never took
        # over still fails, and it served nothing before the kill (answers() above).
        b.wait_for("leading now", timeout=30)
        wait_until(lambda: answers(addr_b), timeout=30, what="the standby serving")
        took = time.monotonic() - t0
        assert took < 30, f"takeover took {took:.1f} s"
        assert {x.lease_id for x in SchedulerClient(addr_b).list_pool().leases} == before

        # Renewals and heartbeats reach the new leader: every lease renewed there (an expiry a TTL past a moment
        # after the takeover) and every host heard from since, the job training on after that.
        served = time.time()

        def renewed_and_heard() -> bool:
            state = SchedulerClient(addr_b).list_pool()
            return all(x.expires_at > served + LEASE_TTL for x in state.leases) and all(
                h.last_seen > served for h in state.hosts
            )

        wait_until(renewed_and_heard, timeout=3 * LEASE_TTL, what="renewals and heartbeats at the new leader")
        seen = time.time()
        while True:  # a step the daemon answered a second after that
            line = job.stdout.readline()
            assert line.startswith("step "), line or job.communicate(timeout=60)[1][-3000:]
            if float(line.split()[3]) > seen + 1:
                break
        state = SchedulerClient(addr_b).list_pool()
        assert {x.lease_id for x in state.leases} == before, "a lease was lost in the failover"
        assert [h.state for h in state.hosts] == ["up"] * 3
        assert not any(x.lost.is_set() for x in held)
        stop.touch()
        out, err = job.communicate(timeout=120)
        assert job.returncode == 0, err[-3000:]
        assert out.splitlines()[-1].startswith("done"), out[-500:]
        for x in held:
            x.release()
    finally:
        if job is not None and job.poll() is None:
            job.kill()
        daemon.stop()
        for s in sims:
            s.stop()
        a.stop()
        b.stop()


def test_revoked_certificates_are_kept_in_postgresql(postgres: str) -> None:
    """Round 45 (control45): the revoked client certificates are a table of the state (gpupool_revoked_certs), read
    by the next leader; taken back, gone. On f47ac67 the store had no such table (`Change` had no `certs`)."""
    from gpupool.scheduler.pgstore import PostgresStore
    from gpupool.scheduler.store import Change

    fp = "sha256:" + "ab" * 32
    leader = PostgresStore(postgres)
    try:
        leader.write(Change(certs=[(fp, 1765000000.5, "laptop stolen")]))
    finally:
        leader.close()
    successor = PostgresStore(postgres)
    try:
        assert successor.load_certs() == [(fp, 1765000000.5, "laptop stolen")]
        successor.write(Change(forget_certs=[fp]))
        assert successor.load_certs() == []
    finally:
        successor.close()
