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
from scheduler_fixtures import ROOT, Postgres, Proc, SimHost, key_file, start_daemon, wait_until

from gpupool.errors import Unavailable

pytestmark = pytest.mark.slow

JOB = """
import time, torch, gpupool.torch as gt
d = gt.device()
w = torch.ones(4, device=d)
t0, i = time.time(), 0
while time.time() - t0 < 35:
    w = w + 1
    print("step", i, w.sum().item(), flush=True)
    i += 1
    time.sleep(0.2)
print("done", i, flush=True)
"""


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
         "--token-key-file", str(key_file(tmp)), "--host-timeout", "4", "--lease-ttl", "12"]
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
    try:
        wait_until(lambda: [h.state for h in SchedulerClient(both).list_pool().hosts] == ["up"], what="the daemon")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "GPUPOOL_SCHEDULER": both}
        env.pop("GPUPOOL_LEASE", None)
        job = subprocess.Popen(  # the whole real (fake-GPU) daemon
            [sys.executable, "-m", "gpupool.cli", "run", "-p", "1.0", "--", sys.executable, "-c", JOB],
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
        b.wait_for("leading now", timeout=10)
        wait_until(lambda: answers(addr_b), timeout=10, what="the standby serving")
        took = time.monotonic() - t0
        assert took < 10, f"takeover took {took:.1f} s"
        assert {x.lease_id for x in SchedulerClient(addr_b).list_pool().leases} == before

        time.sleep(14)  # over a lease TTL: renewals and heartbeats must reach the new leader
        state = SchedulerClient(addr_b).list_pool()
        assert {x.lease_id for x in state.leases} == before, "a lease was lost in the failover"
        assert [h.state for h in state.hosts] == ["up"] * 3
        assert not any(x.lost.is_set() for x in held)
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
