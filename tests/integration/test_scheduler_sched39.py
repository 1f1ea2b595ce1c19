"""Round 39 (sched39): the scheduler as the pool's credential authority, what round 35 (cred35) did not try. Real
`gpupool scheduler` processes on loopback, hosts speaking the real Register/Heartbeat protocol (`SimHost`).

Found and fixed here (fails on 1428b53):
- a host silent past `--host-timeout` (its leases lost, their capacity given to others) that an operator then
  removed without `--force` (it held no active lease any more: they were lost) had its pending revocations dropped;
  its daemon, still running, registered again and never heard of them, so the tenant of a lost lease attached there
  again with its unexpired token (scheduler/hosts.py `remove_host`; pending revocations now last until their
  tokens have expired, `forget_revocations`);
- a restarted scheduler forgot the revocations its hosts had not heard yet (a lease released or expired within a
  heartbeat interval of the restart, or while its host was away): the ended lease's unexpired tokens attached at its
  hosts again (scheduler/leases.py `Core._load` tells the hosts of every ended lease whose tokens may be alive);
- one tenant's waiting Allocate that no device up could hold (more GPUs than the pool has, labels no host has) held
  the FIFO line: every other tenant's Allocate failed at once (or waited behind it) on an idle pool, for as long
  as it asked to wait (scheduler/leases.py `Core._holds_line`);
- `gpupool up --ca-dir DIR` took any folder (round 35 refused a state folder not the user's own, not the CA's): a CA
  another user planted in a folder of theirs, or in one others may write or rename, issued the pool's certificates,
  and its owner an admin certificate of the pool (gpupool/up.py `make_credentials`).
docs/security.md "Red team, round 39 (sched39)".
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
from gpupool.client.pool import SchedulerClient
from scheduler_fixtures import Proc, SimHost, start_scheduler, wait_until

from gpupool import pki
from gpupool._proto import scheduler_pb2
from gpupool.errors import GpupoolError


def test_a_host_removed_after_it_went_down_is_told_of_the_leases_it_lost(tmp_path: Path) -> None:
    proc, address = start_scheduler(tmp_path, "--host-timeout", "3", "--heartbeat-interval", "0.3")
    host = SimHost(address, "h").start()
    client = SchedulerClient(address)
    try:
        lost = client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5, ttl_seconds=3600))
        host.stop()  # silent: partitioned, paused
        wait_until(lambda: any(h.state == "down" for h in client.list_pool().hosts), what="the host marked down")
        # The operator forgets the host "gone for good": no active lease left on it (its lease was lost), no --force.
        assert client.remove_host("h") == 0
        assert not client.list_pool().hosts
        host = SimHost(address, "h").start()  # its daemon was running after all: it registers again
        # 1428b53: never told (the revocation was dropped with the host), and the lost lease's token attached there
        wait_until(lambda: lost.lease_id in host.revoked, timeout=10, what="the lost lease revoked")
    finally:
        host.stop()
        client.close()
        proc.stop()


def test_a_restarted_scheduler_tells_the_hosts_of_the_leases_that_ended_before_it_stopped(tmp_path: Path) -> None:
    proc, address = start_scheduler(tmp_path, "--heartbeat-interval", "0.3")
    host = SimHost(address, "h").start()
    client = SchedulerClient(address)
    try:
        ended = client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5, ttl_seconds=3600))
        host.stop()  # no heartbeat until the scheduler is back (a partition, or the lease ended just before a stop)
        client.release(ended.lease_id)
        client.close()
        proc.stop()  # an upgrade, a crash
        proc, address = start_scheduler(tmp_path, "--heartbeat-interval", "0.3")  # the same state and key
        client = SchedulerClient(address)
        host = SimHost(address, "h").start()
        # 1428b53: never told (the pending revocation was in the stopped process's memory)
        wait_until(lambda: ended.lease_id in host.revoked, timeout=10, what="the ended lease revoked")
    finally:
        host.stop()
        client.close()
        proc.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_up_takes_its_ca_only_from_a_folder_of_its_own(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"  # mallory's folder, holding mallory's CA (key 0600: the mode checks pass it)
    planted = pki.LocalCA(theirs)
    for path in (theirs, planted.key_path, planted.cert_path):
        os.chown(path, 65534, 65534)  # nobody
    open_folder = tmp_path / "open"  # writable by everyone, no sticky bit: anyone can rename the CA in it
    open_folder.mkdir()
    os.chmod(open_folder, 0o777)
    pki.LocalCA(open_folder / "ca")
    for ca_dir, why in ((theirs, "belongs to uid 65534"), (open_folder / "ca", "writable by other users")):
        state = tmp_path / f"state-{ca_dir.name}"
        up = Proc(["up", "--fake-gpus", "1", "--scheduler-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0",
                   "--state", str(state / "scheduler.db"), "--metrics-listen", "0", "--scheduler-metrics-listen", "0",
                   "--ca-dir", str(ca_dir)])  # fmt: skip
        try:
            assert up.popen.wait(60) == 1, up.log()  # 1428b53: ran, its pool trusting mallory's CA
        except subprocess.TimeoutExpired:
            raise AssertionError("gpupool up ran with a CA folder not its own:\n" + up.log()) from None
        finally:
            up.kill()
        assert f"CA folder {ca_dir}" in up.log() and why in up.log() and "Traceback" not in up.log(), up.log()
        assert not (state / "pki").exists() and not (state / "scheduler.db").exists()  # nothing issued or started


def test_a_request_no_device_up_could_hold_does_not_hold_the_line(tmp_path: Path) -> None:
    proc, address = start_scheduler(tmp_path, "--heartbeat-interval", "0.3")
    host = SimHost(address, "h", gpus=2).start()
    client = SchedulerClient(address)
    outcome: list[object] = []

    def hog() -> None:  # mallory: 3 GPUs of a pool of 2, waiting
        try:
            outcome.append(client.allocate(scheduler_pb2.AllocateRequest(gpus=3, fraction=1.0, wait_seconds=20)))
        except GpupoolError as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=hog)
    try:
        waiting.start()
        wait_until(lambda: client.list_pool().waiting == 1, what="the request waiting")
        # 1428b53: RESOURCE_EXHAUSTED "... 1 request(s) waiting ahead" on an idle pool (and 20 s behind it, waiting)
        now = client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
        later = client.allocate(scheduler_pb2.AllocateRequest(gpus=2, fraction=0.5, wait_seconds=20))
        assert len(now.devices) == 1 and len(later.devices) == 2 and client.list_pool().waiting == 1
        host.stop()  # the big request still waits for hosts that could hold it; it is no lease of anyone's yet
        assert not outcome
    finally:
        host.stop()
        proc.stop()  # the waiting call ends with it
        waiting.join(30)
        client.close()
    assert len(outcome) == 1 and isinstance(outcome[0], GpupoolError)
