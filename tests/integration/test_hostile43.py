"""Red team, round 43 (hostile43): what round 42 left (docs/security.md "Red team, round 43").

Revocation by time, not by count (each fails on 7b5ed4d): a daemon remembered the 200,000 most recent revoked leases,
each for a day whatever its tokens' life; a tenant that allocated and released past that (~70 min at --tenant-rate
100) attached with the forgotten lease's token until the next heartbeat reported its session. Now the scheduler says,
for each revoked lease, until when one of its tokens may be presented (`HeartbeatReply.revoked_until`: the lease's
expiry and the slack), the daemon keeps each until then and forgets none by count, and the scheduler bounds how many a
tenant keeps alive (`--tenant-max-revoked`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest
from gpupool.client.pool import SchedulerClient
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from gpupool.scheduler.hosts import REVOCATION_SLACK
from scheduler_fixtures import SimHost, wait_until
from support import get_pki

from gpupool import tokens
from gpupool._proto import scheduler_pb2
from gpupool.errors import ResourceExhausted, Unauthenticated

SIGNER = tokens.Signer.from_seed(b"hostile43")


@pytest.fixture
def sched() -> Iterator[SchedulerServer]:
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=":memory:", metrics_listen="0", heartbeat_interval=0.3, tenant_max_revoked=3,
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"),
    )  # fmt: skip
    server = SchedulerServer(config, SIGNER).start()
    yield server
    server.stop(grace=0)


def test_a_released_leases_token_is_refused_until_it_expires_and_a_tenant_keeps_few_alive(
    sched: SchedulerServer,
) -> None:
    """A real registrar and verifier (a daemon's) under a real scheduler: alice releases a lease of an hour; its
    revocation reaches the host with the lease's expiry + the slack, and the verifier refuses its token until then
    (not a day from the heartbeat, and whatever number of leases is revoked after it). Three such leases ended, her
    fourth Allocate is RESOURCE_EXHAUSTED naming --tenant-max-revoked; bob's is granted. On 7b5ed4d: no
    `tenant_max_revoked` (a TypeError); the reply carried no times and the verifier kept 200,000 leases."""
    host = SimHost(sched.address, "h", gpus=1)
    verifier = tokens.Verifier([SIGNER.public])
    host.registrar.verifier = verifier
    host.start()
    alice = SchedulerClient(sched.address, get_pki().client_config("tenant", "alice"))
    bob = SchedulerClient(sched.address, get_pki().client_config("tenant", "bob"))
    try:
        grants = []
        for _ in range(3):
            lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=3600))
            assert verifier.verify(lease.devices[0].token).lease_id == lease.lease_id
            alice.release(lease.lease_id)
            grants.append(lease)
        wait_until(lambda: all(x.lease_id in host.revoked for x in grants), what="the revocations at the host")
        for lease in grants:
            with pytest.raises(Unauthenticated, match="released or revoked"):
                verifier.verify(lease.devices[0].token)
        # (a look at a later time forgets what expired by then: the earlier times first)
        assert all(verifier.revoked(x.lease_id, x.expires_at + REVOCATION_SLACK - 1) for x in grants)
        assert not any(verifier.revoked(x.lease_id, x.expires_at + REVOCATION_SLACK + 1) for x in grants)
        with pytest.raises(ResourceExhausted, match=r"ended 3 lease\(s\) whose tokens .*--tenant-max-revoked"):
            alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=3600))
        assert bob.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25))
    finally:
        alice.close()
        bob.close()
        host.stop()


def test_the_verifier_forgets_no_revoked_lease_by_count() -> None:
    """The oldest of 200,001 revoked leases is still refused (7b5ed4d forgot it: it kept 200,000; DID NOT RAISE)."""
    verifier = tokens.Verifier([SIGNER.public])
    now = time.time()
    token = tokens.mint(SIGNER, tokens.TokenClaims("first", "h", 0, 1 << 20, 0.5, now + 3600, "mallory"))
    verifier.revoke(["first"], now=now)
    verifier.revoke([f"cycled-{i}" for i in range(200_000)], now=now)
    with pytest.raises(Unauthenticated, match="released or revoked"):
        verifier.verify(token, now=now + 1)


def test_the_verifier_forgets_a_revoked_lease_when_its_tokens_expire() -> None:
    """Each revoked lease is kept until the time the scheduler gave (a NaN or missing one, or one past a token's
    longest life: `MAX_TTL`), then forgotten; revoked again later, the later time holds."""
    verifier = tokens.Verifier([SIGNER.public])
    now = time.time()
    verifier.revoke(["a", "b", "c", "d"], now=now, until=[now + 100, now + 10 * tokens.MAX_TTL, float("nan")])
    verifier.revoke(["a"], now=now, until=[now + 50])  # an earlier time does not shorten it
    assert all(verifier.revoked(x, now + 99) for x in "abcd")
    assert not verifier.revoked("a", now + 101) and verifier.revoked("b", now + 101)
    verifier.revoke(["b"], now=now + 200, until=[now + 300])
    assert all(verifier.revoked(x, now + tokens.MAX_TTL - 1) for x in "bcd")
    assert not any(verifier.revoked(x, now + tokens.MAX_TTL + 1) for x in "bcd")
