"""Review of hostile43 (round 43, hostrev43): what refills a restarted daemon's list of revoked leases.

A daemon's verifier keeps the leases the scheduler revoked in memory only; the scheduler told each once (its pending
revocations are popped by the heartbeat that carries them). On 860bf57 a restarted daemon (same host id, an empty
verifier) was told nothing again: every ended lease whose token had not expired attached there once, each until the
heartbeat after its Attach reported the session (a tenant holding its 20,000 released leases' tokens could hold a
device that long each, one after another, with no lease). Now the scheduler keeps what it told a host until those
tokens expire and a Register queues them again: the restarted daemon's first heartbeat refuses them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from gpupool.client.pool import SchedulerClient
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from gpupool.scheduler.hosts import REVOCATION_SLACK
from scheduler_fixtures import SimHost, wait_until
from support import get_pki

from gpupool import tokens
from gpupool._proto import scheduler_pb2
from gpupool.errors import Unauthenticated

SIGNER = tokens.Signer.from_seed(b"hostrev43")


@pytest.fixture
def sched() -> Iterator[SchedulerServer]:
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=":memory:", metrics_listen="0", heartbeat_interval=0.3,
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"),
    )  # fmt: skip
    server = SchedulerServer(config, SIGNER).start()
    yield server
    server.stop(grace=0)


def _host(sched: SchedulerServer) -> tuple[SimHost, tokens.Verifier]:
    host = SimHost(sched.address, "h", gpus=1)
    verifier = tokens.Verifier([SIGNER.public])
    host.registrar.verifier = verifier
    return host.start(), verifier


def test_a_restarted_daemon_is_told_again_which_ended_leases_tokens_to_refuse(sched: SchedulerServer) -> None:
    """Alice releases a lease of an hour; the daemon hears it and refuses its token. The daemon restarts (a new
    registrar and verifier under the same host id): after its first heartbeats the new verifier refuses the token too,
    until the lease's expiry and the slack. On 860bf57 it verified (the restarted daemon was never told again)."""
    host, verifier = _host(sched)
    alice = SchedulerClient(sched.address, get_pki().client_config("tenant", "alice"))
    try:
        lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=3600))
        token = lease.devices[0].token
        alice.release(lease.lease_id)
        wait_until(lambda: lease.lease_id in host.revoked, what="the revocation at the host")
        with pytest.raises(Unauthenticated, match="released or revoked"):
            verifier.verify(token)
        host.stop()

        again, fresh = _host(sched)  # the daemon restarted: its verifier's list is empty
        host = again
        assert fresh.verify(token).lease_id == lease.lease_id  # (what the restart lost)
        wait_until(lambda: lease.lease_id in again.revoked, what="the revocation told again")
        with pytest.raises(Unauthenticated, match="released or revoked"):
            fresh.verify(token)
        assert fresh.revoked(lease.lease_id, lease.expires_at + REVOCATION_SLACK - 1)
        assert not fresh.revoked(lease.lease_id, lease.expires_at + REVOCATION_SLACK + 1)
    finally:
        alice.close()
        host.stop()
