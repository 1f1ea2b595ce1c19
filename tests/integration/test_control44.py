"""Round 44 (control44): what round 43 left in the control plane, against real schedulers and daemons on loopback.

2. A restarted scheduler re-told only the revocations of leases ended within `retention` (600 s; older rows were
   deleted): a lease of an hour released, forgotten, then a scheduler and a daemon restart, and its token attached.
   Now an ended lease's row is kept until its tokens have expired (and REVOCATION_SLACK).
4. A second daemon given a live host's --host-id took the host over; a --host-id other than the certificate's host
   was refused by the scheduler at every retry. Now the scheduler refuses the second (ALREADY_EXISTS, the first kept)
   and `gpupool serve` refuses the mismatch at start.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gpupool.client.pool import SchedulerClient
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from scheduler_fixtures import Proc, SimHost, wait_until
from support import get_pki, register_host
from test_security import Pool, start_pool

from gpupool import errors, tokens
from gpupool._proto import scheduler_pb2

pytestmark = pytest.mark.slow
HOST = "ctl44-host"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = start_pool(tmp_path)
    yield p
    p.scheduler.stop(grace=0.5)


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


# ---- 4. host ids ----


def test_a_second_daemon_with_a_live_hosts_id_is_refused_and_the_first_kept(pool: Pool) -> None:
    """Two daemons registering as one host id (its certificate's), the second from another address while the first
    heartbeats: ALREADY_EXISTS naming the live one, and the pool keeps the first's address. On b647913 the second took
    the host over."""
    first = SimHost(pool.address, HOST, tls_config=get_pki().client_config("host", HOST)).start()
    try:
        time.sleep(0.7)  # a couple of heartbeats
        second = register_host(pool.address, HOST, get_pki().client_config("host", HOST))  # at 127.0.0.1:1
        assert second == grpc.StatusCode.ALREADY_EXISTS
        ops = pool.client("admin", "ops")
        try:
            (listed,) = [h for h in ops.list_pool().hosts if h.host_id == HOST]
        finally:
            ops.close()
        assert listed.address == first.registrar.advertise_address
    finally:
        first.stop()


def test_a_duplicate_host_ids_message_names_the_live_daemon_and_the_way_out(pool: Pool) -> None:
    """The refusal's words: who holds the id, where, and what to do; a daemon that restarted elsewhere is taken once
    the first has been silent for half the host timeout (pins the take-over; the refusal fails on b647913)."""
    first = SimHost(pool.address, HOST, tls_config=get_pki().client_config("host", HOST)).start()
    moved = SimHost(pool.address, HOST, tls_config=get_pki().client_config("host", HOST))
    moved.registrar.advertise_address = "127.0.0.1:2"
    try:
        with pytest.raises(grpc.RpcError) as err:
            moved.registrar._register()
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
        words = err.value.details()  # type: ignore[attr-defined]
        assert f"host {HOST} is live at {first.registrar.advertise_address}" in words
        assert "127.0.0.1:2" in words and "--host-id" in words, words
        first.stop()  # the first is gone: the moved daemon takes the id once it has been silent long enough
        wait_until(lambda: _registers(moved), timeout=20, every=0.5, what="the moved daemon registered")
    finally:
        first.stop()
        moved.stop()


def _registers(host: SimHost) -> bool:
    try:
        host.registrar._register()
        return True
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.details()  # type: ignore[attr-defined]
        return False


def test_serve_refuses_a_host_id_other_than_its_certificates(tmp_path: Path) -> None:
    """`gpupool serve --host-id gpu-08 --tls-cert <gpu-07's> --scheduler ...`: exit 2 at start, saying which host the
    certificate names. On b647913 it started and was refused PERMISSION_DENIED at every Register."""
    files = get_pki().issue("host", "gpu-07")
    proc = Proc(
        ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "0", "--fake-gpus", "1", "--isolation", "thread",
         "--scheduler", "127.0.0.1:1", "--host-id", "gpu-08", "--tls-cert", str(files.cert), "--tls-key",
         str(files.key), "--tls-ca", get_pki().ca_file, "--token-public-keys", str(_public(tmp_path))]
    )  # fmt: skip
    try:
        said = proc.wait_for(
            r"(--host-id 'gpu-08' is not the host the --tls-cert names \('gpu-07'\))|listening on", timeout=150
        )
        assert said.group(1), proc.log()  # (b647913: it listened, then was refused at every Register)
        assert proc.popen.wait(60) == 2
    finally:
        proc.stop()


def _public(tmp: Path) -> Path:
    public = tmp / "token.pub"
    tokens.generate_key_file(tmp / "token.key", public)
    return public
