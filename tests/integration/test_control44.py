"""Round 44 (control44): what round 43 left in the control plane, against real schedulers and daemons on loopback.

2. A restarted scheduler re-told only the revocations of leases ended within `retention` (600 s; older rows were
   deleted): a lease of an hour released, forgotten, then a scheduler and a daemon restart, and its token attached.
   Now an ended lease's row is kept until its tokens have expired (and REVOCATION_SLACK).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from gpupool.client.pool import SchedulerClient
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from scheduler_fixtures import SimHost, wait_until
from support import get_pki

from gpupool import errors, tokens
from gpupool._proto import scheduler_pb2

pytestmark = pytest.mark.slow


# ---- 2. a restarted scheduler forgets no revocation whose token may still live ----


def test_a_restarted_scheduler_re_tells_revocations_older_than_its_retention(tmp_path: Path) -> None:
    """Alice releases a lease of an hour; the scheduler's sweep passes its retention (0.2 s here, 600 s by default);
    the scheduler restarts on its SQLite state, then the daemon (an empty verifier): its first heartbeats refuse the
    token. On b647913 the sweep had deleted the lease's row and the restarted daemon verified the token."""
    signer = tokens.Signer.from_seed(b"control44-store")
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=str(tmp_path / "state.db"), metrics_listen="0", heartbeat_interval=0.3,
        sweep_interval=0.1, tls=dataclasses.replace(get_pki().server_config(), client_auth="require"),
    )  # fmt: skip
    sched = SchedulerServer(config, signer).start()
    sched.core.config = dataclasses.replace(sched.core.config, retention=0.2)  # type: ignore[union-attr]
    host = _sim_host(sched.address, signer)
    alice = SchedulerClient(sched.address, get_pki().client_config("tenant", "alice"))
    try:
        lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=3600))
        token = lease.devices[0].token
        alice.release(lease.lease_id)
        wait_until(lambda: lease.lease_id in host[0].revoked, what="the revocation at the host")
        time.sleep(1.0)  # ten sweeps past the retention
        alice.close()
        sched.stop(grace=0)
        host[0].stop()

        config = dataclasses.replace(config, listen=f"127.0.0.1:{sched.port}")
        sched = SchedulerServer(config, signer).start()  # restarted on the same state file
        host = _sim_host(sched.address, signer)  # and the daemon: its verifier's list is empty
        wait_until(lambda: lease.lease_id in host[0].revoked, what="the revocation told again")
        with pytest.raises(errors.Unauthenticated, match="released or revoked"):
            host[1].verify(token)
    finally:
        host[0].stop()
        sched.stop(grace=0)


def test_an_ended_lease_is_forgotten_once_its_tokens_have_expired(tmp_path: Path) -> None:
    """What item 2 keeps is bounded by time: a lease of 1 s released (retention 0) stays in the store while its
    token may be presented and is deleted by the sweep once its expiry and REVOCATION_SLACK have passed. On b647913
    the first sweep deleted it (the first assertion fails); the second pins the forgetting."""
    from gpupool.scheduler.hosts import REVOCATION_SLACK, DeviceSpec
    from gpupool.scheduler.leases import Core, CoreConfig
    from gpupool.scheduler.placement import Request
    from gpupool.scheduler.store import SqliteStore

    store = SqliteStore(tmp_path / "s.db")
    core = Core(store, tokens.Signer.from_seed(b"x"), CoreConfig(retention=0.0))
    core.hosts.register("h", "127.0.0.1:7", [DeviceSpec(0, "GPU-h", "fake", 1 << 30, True)])
    lease = core.allocate(Request(gpus=1, fraction=0.5), tenant="t", ttl=1.0)
    core.release(lease.lease_id)
    core.sweep(time.time() + 1)
    assert lease.lease_id in {x.lease_id for x in store.load()[1]}  # its token may still be presented
    core.sweep(lease.expires_at + REVOCATION_SLACK + 1)
    assert lease.lease_id not in {x.lease_id for x in store.load()[1]} and lease.lease_id not in core.leases
    store.close()


def _sim_host(address: str, signer: tokens.Signer) -> tuple[SimHost, tokens.Verifier]:
    host = SimHost(address, "h", gpus=1, tls_config=get_pki().client_config("host", "h"))
    verifier = tokens.Verifier([signer.public])
    host.registrar.verifier = verifier
    return host.start(), verifier
