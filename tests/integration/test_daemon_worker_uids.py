"""`--worker-uids FIRST-LAST` through a real root daemon: each session's worker runs as a uid (and gid) of its own,
taken in turn through the range, never one a live worker holds; a range with an account of the host is refused."""

from __future__ import annotations

import os
import pwd
import time
from typing import Any

import pytest
import torch
from gpupool.client.session import Session
from support import MiB, tls_channel

from gpupool import errors
from gpupool._proto import device_pb2, device_pb2_grpc
from gpupool.tokens import public_session_id

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="workers change user only under a root daemon")
FIRST = 3_141_591_000  # no account of a host is there


def worker_ids(address: str, s: Session) -> tuple[int, list[str], list[str]]:
    with tls_channel(address) as ch:
        reply = device_pb2_grpc.DeviceStub(ch).Status(device_pb2.StatusRequest(), timeout=10)
    pid = next(u.worker_pid for u in reply.sessions if u.session_id == public_session_id(s.session_id))
    with open(f"/proc/{pid}/status") as f:
        fields = {line.split(":")[0]: line.split()[1:] for line in f}
    return pid, fields["Uid"], fields["Gid"]


def gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


def test_each_worker_runs_as_a_uid_of_its_own(daemon_factory: Any) -> None:
    d = daemon_factory(worker_uids=f"{FIRST}-{FIRST + 1}")
    a = Session.attach(d.address, d.token(quota_bytes=16 * MiB))
    b = Session.attach(d.address, d.token(quota_bytes=16 * MiB))
    assert a.download(a.upload(torch.arange(4.0))).tolist() == [0.0, 1.0, 2.0, 3.0]
    b.sync()  # (a worker changes user once set up: before its first slice)
    pid_a, uid_a, gid_a = worker_ids(d.address, a)
    pid_b, uid_b, gid_b = worker_ids(d.address, b)
    assert uid_a == gid_a == [str(FIRST)] * 4 and uid_b == gid_b == [str(FIRST + 1)] * 4
    # the range is held: a third session waits for one to end
    with pytest.raises(errors.ResourceExhausted, match="every uid of --worker-uids"):
        Session.attach(d.address, d.token(quota_bytes=16 * MiB))
    a.close()
    gone(pid_a)
    c = Session.attach(d.address, d.token(quota_bytes=16 * MiB))  # a's uid, once its worker is gone
    c.sync()
    assert worker_ids(d.address, c)[1] == [str(FIRST)] * 4
    assert b.download(b.upload(torch.ones(3))).tolist() == [1.0, 1.0, 1.0]
    b.close()
    c.close()


def test_a_range_holding_an_account_is_refused_at_start(daemon_factory: Any) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    with pytest.raises(errors.InvalidArgument, match="holds users of this host"):
        daemon_factory(worker_uids=f"{nobody - 1}-{nobody + 1}")
    with pytest.raises(errors.InvalidArgument, match="want FIRST-LAST"):
        daemon_factory(worker_uids="1000")
