"""Round 41's review of sched41 (schedrev41): the heartbeat bounds must not take a working host out of the pool.

Found and fixed here (fails on 8b0bdbe): a heartbeat naming a session whose lease id is longer than `MAX_ID_LENGTH`
was refused whole (INVALID_ARGUMENT). A daemon reports every session it holds, and takes any token its scheduler's key
signed, up to 4,096 characters: a hand-minted one (`gpupool token --lease-id`) with a lease id of 300 characters made
every heartbeat of that daemon fail, and the host went down with every lease on it. Such an id is no lease of the
scheduler's (32 hex digits): it is answered revoked, as any lease id the scheduler does not hold (before round 41 too),
without a look-up under the core's lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gpupool.scheduler.cli import SchedulerServer
from gpupool.scheduler.hosts import MAX_ID_LENGTH
from support import get_pki
from test_scheduler_sched41 import _host, _scheduler

from gpupool import tls
from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc


@pytest.fixture
def sched(tmp_path: Path) -> Iterator[SchedulerServer]:
    server = _scheduler(tmp_path, 0.0)
    yield server
    server.stop(grace=0)


def test_a_session_with_a_lease_id_longer_than_any_lease_is_revoked_and_its_host_stays_up(
    sched: SchedulerServer,
) -> None:
    """h1 holds a tenant's lease and a session of a hand-minted token whose lease id is 300 characters: its heartbeat
    is served, the long id (and an unknown 32-character one) revoked, the tenant's lease not; the host stays up and
    the lease renews. On 8b0bdbe: INVALID_ARGUMENT for every such heartbeat."""
    channel, stub = _host(sched, "h1")
    alice = tls.channel(f"127.0.0.1:{sched.port}", cfg=get_pki().client_config("tenant", "alice"))
    tenant = scheduler_pb2_grpc.SchedulerStub(alice)
    try:
        lease = tenant.Allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5, ttl_seconds=60), timeout=10)
        long_id, unknown = "m" * 300, "0" * 32
        assert len(long_id) > MAX_ID_LENGTH
        sessions = [device_pb2.SessionUsage(lease_id=x) for x in (lease.lease_id, long_id, unknown, long_id)]
        try:
            reply = stub.Heartbeat(scheduler_pb2.HeartbeatRequest(host_id="h1", sessions=sessions), timeout=10)
        except grpc.RpcError as err:  # 8b0bdbe: INVALID_ARGUMENT "a lease id of 300 characters: at most 256"
            pytest.fail(f"a heartbeat naming a long lease id refused: {err.code()} {err.details()}")
        assert sorted(reply.revoked_leases) == sorted([long_id, unknown]), reply
        assert not reply.reregister
        pool = tenant.ListPool(scheduler_pb2.ListPoolRequest(), timeout=10)
        assert [(h.host_id, h.state) for h in pool.hosts] == [("h1", "up")]
        tenant.Renew(scheduler_pb2.RenewRequest(lease_id=lease.lease_id), timeout=10)
    finally:
        channel.close()
        alice.close()
