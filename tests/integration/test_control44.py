"""Round 44 (control44): what round 43 left in the control plane, against real schedulers and daemons on loopback.

1. A restarted daemon served Attach before its first heartbeat: the scheduler's reply to it names the ended leases
   whose tokens to refuse, and until it came (an interval, 2 s by default) a revoked lease's token attached. Now the
   registrar heartbeats at once after registering and the daemon serves no Attach (nor a status token) before a reply
   (`Daemon.revocations_heard`; UNAVAILABLE after `REVOCATIONS_WAIT` while the scheduler cannot be reached).
2. A restarted scheduler re-told only the revocations of leases ended within `retention` (600 s; older rows were
   deleted): a lease of an hour released, forgotten, then a scheduler and a daemon restart, and its token attached.
   Now an ended lease's row is kept until its tokens have expired (and REVOCATION_SLACK).
3. Status tokens (120 s) could not be revoked: an admin removed from the credentials file kept seeing every session
   of a host for their life. Now a heartbeat reply says when status tokens were last revoked (`status_tokens_not_
   before`: the scheduler's start, or its sight of an admin token removed) and the daemon refuses older ones.
4. A second daemon given a live host's --host-id took the host over; a --host-id other than the certificate's host
   was refused by the scheduler at every retry. Now the scheduler refuses the second (ALREADY_EXISTS, the first kept)
   and `gpupool serve` refuses the mismatch at start.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from gpupool.client.pool import SchedulerClient
from gpupool.client.session import Session
from gpupool.scheduler.auth import credential_line
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from scheduler_fixtures import Proc, SimHost, wait_until
from support import REGISTER_WAIT_S, DaemonFactory, get_pki, register_host, tls_channel
from test_security import Pool, start_pool

from gpupool import errors, protocol, tls, tokens
from gpupool._proto import device_pb2, device_pb2_grpc, scheduler_pb2

pytestmark = pytest.mark.slow
HOST = "ctl44-host"


def _daemon(factory: DaemonFactory, pool: Pool, *, interval: float = 0.3, listen: str = "127.0.0.1:0") -> Any:
    """An in-process daemon registering as HOST with its host certificate (thread isolation: the control plane is
    what is tried), verifying tokens with the pool's public key file only."""
    files = get_pki().issue("host", HOST)
    return factory(
        listen=listen,
        host_id=HOST,
        scheduler=pool.address,
        heartbeat_interval=interval,
        isolation="thread",
        token_key=tokens.load_verifier(pool.public),
        tls=tls.TlsConfig(cert=str(files.cert), key=str(files.key), ca=get_pki().ca_file),
    )


def _heard_revocation(handle: Any, lease_id: str) -> bool:
    return bool(handle.running.daemon.config.token_key.revoked(lease_id, time.time()))


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = start_pool(tmp_path)
    yield p
    p.scheduler.stop(grace=0.5)


# ---- 1. a restarted daemon and the revocations it has not heard yet ----


def test_a_restarted_daemon_attaches_no_revoked_token_before_its_first_heartbeat(
    pool: Pool, daemon_factory: DaemonFactory
) -> None:
    """Alice releases a lease of an hour; the daemon hears it. The daemon restarts on the same address with a
    heartbeat interval of 30 s and Alice attaches with the released lease's token at once: refused (UNAUTHENTICATED,
    released or revoked). On b647913 it attached (the restarted daemon's list was empty until a heartbeat 30 s on)."""
    first = _daemon(daemon_factory, pool)
    assert first.running.registrar.registered.wait(REGISTER_WAIT_S)
    alice = pool.client("tenant", "alice")
    try:
        lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=3600))
        token = lease.devices[0].token
        Session.attach(first.address, token).close()
        alice.release(lease.lease_id)
        wait_until(lambda: _heard_revocation(first, lease.lease_id), what="the revocation at the daemon")
    finally:
        alice.close()
    first.running.stop(grace=0.5, drain=False)

    again = _daemon(daemon_factory, pool, interval=30.0, listen=first.address)  # restarted: its list is empty
    with pytest.raises(errors.Unauthenticated, match="released or revoked"):
        Session.attach(again.address, token).close()


def test_a_daemon_whose_scheduler_never_answered_refuses_attach_unavailable(
    daemon_factory: DaemonFactory, closed_port: int
) -> None:
    """A daemon registering with a scheduler that cannot be reached (a closed port) refuses Attach with a valid token
    of its host: UNAVAILABLE, saying it has not heard which leases were revoked (retryable). On b647913 it attached."""
    key = tokens.Signer.from_seed(b"control44")
    handle = daemon_factory(
        host_id=HOST, scheduler=f"127.0.0.1:{closed_port}", isolation="thread", token_key=b"control44"
    )
    claims = tokens.TokenClaims("a" * 32, HOST, 0, 0, 0.25, time.time() + 600, "alice")
    t0 = time.monotonic()
    with pytest.raises(errors.Unavailable, match="has not heard from its scheduler") as err:
        Session.attach(handle.address, tokens.mint(key, claims), timeout=30).close()
    assert "retry" in str(err.value) and time.monotonic() - t0 >= 4.0  # (it waited for the scheduler first)


def test_a_daemon_before_its_first_heartbeat_holds_few_attach_calls(
    daemon_factory: DaemonFactory, closed_port: int
) -> None:
    """Before its scheduler's first heartbeat reply a daemon holds at most REVOCATIONS_WAITERS calls in their 5 s wait
    (a gRPC thread each): 24 Attaches at once, each with a valid token of this host, and those past the 16 are refused
    UNAVAILABLE at once (saying that many wait). A token of another host is refused PERMISSION_DENIED before any
    wait. On aa4f78c every such call waited 5 s, another host's token too: any tenant of the pool held the starting
    daemon's threads (256) as long as its scheduler did not answer."""
    from gpupool.server.daemon import REVOCATIONS_WAITERS

    key = tokens.Signer.from_seed(b"control44")
    handle = daemon_factory(
        host_id=HOST, scheduler=f"127.0.0.1:{closed_port}", isolation="thread", token_key=b"control44"
    )

    def token(host: str, n: int) -> str:
        claims = tokens.TokenClaims(f"{n:032x}", host, 0, 0, 0.25, time.time() + 600, "mallory")
        return tokens.mint(key, claims)

    with tls_channel(handle.address) as ch:
        stub = device_pb2_grpc.DeviceStub(ch)
        with pytest.raises(grpc.RpcError) as other:
            stub.Attach(device_pb2.AttachRequest(token=token("another-host", 0)), timeout=30)
        assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED, other.value.details()

        calls = 24
        barrier = threading.Barrier(calls)
        answers: list[tuple[grpc.StatusCode, str]] = []

        def attach(n: int) -> None:
            barrier.wait()
            try:
                stub.Attach(device_pb2.AttachRequest(token=token(HOST, n + 1)), timeout=30)
                answers.append((grpc.StatusCode.OK, ""))
            except grpc.RpcError as err:
                answers.append((err.code(), err.details() or ""))

        threads = [threading.Thread(target=attach, args=(n,)) for n in range(calls)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    assert {code for code, _ in answers} == {grpc.StatusCode.UNAVAILABLE}, answers
    crowded = [d for _, d in answers if f"{REVOCATIONS_WAITERS} calls wait for it already" in d]
    assert len(answers) == calls and len(crowded) >= calls - REVOCATIONS_WAITERS, answers
    assert all("retry" in d for _, d in answers)


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


# ---- 3. status tokens of a removed admin ----


def test_a_removed_admins_status_token_is_refused_at_the_next_heartbeat(
    pool: Pool, daemon_factory: DaemonFactory
) -> None:
    """An admin API token's ListPool gives a status token of HOST, which shows the daemon's sessions; the operator
    removes that admin's line from the credentials file: within a few heartbeats the daemon refuses the token
    (UNAUTHENTICATED, revoked), while a status token minted since (another admin's) is served. On b647913 the
    removed admin's token showed every session for its 120 s."""
    host = _daemon(daemon_factory, pool)
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S)
    kept = pool.credentials.read_text()
    with pool.credentials.open("a") as f:
        f.write(credential_line("admin", "ops-token", "a0k"))
    time.sleep(1.1)  # (the file is checked at most once a second)
    ops = pool.token_client("a0k")
    try:
        (mine,) = [h for h in ops.list_pool().hosts if h.host_id == HOST]
    finally:
        ops.close()

    assert _status(host, mine.status_token).host_id == HOST
    pool.credentials.write_text(kept)  # the admin removed

    wait_until(lambda: _refused(host, mine.status_token), timeout=15, what="the removed admin's token refused")
    admin = pool.client("admin", "ops")  # an admin certificate, still an admin: a fresh token is served
    try:
        (fresh,) = [h for h in admin.list_pool().hosts if h.host_id == HOST]
    finally:
        admin.close()
    assert _status(host, fresh.status_token).host_id == HOST


def test_a_restarted_scheduler_revokes_the_status_tokens_it_minted_before(
    pool: Pool, daemon_factory: DaemonFactory
) -> None:
    """A status token minted by a scheduler process is refused once its successor (restarted on the same address and
    key) has answered the daemon's heartbeat: the successor may run with another credentials file, and cannot know
    whose the old tokens were. On b647913 it was served for its 120 s."""
    host = _daemon(daemon_factory, pool)
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S)
    admin = pool.client("admin", "ops")
    try:
        (mine,) = [h for h in admin.list_pool().hosts if h.host_id == HOST]
    finally:
        admin.close()
    assert _status(host, mine.status_token).host_id == HOST
    pool.scheduler.stop(grace=0)
    pool.scheduler = SchedulerServer(
        dataclasses.replace(pool.scheduler.config, listen=pool.address), tokens.load_signer(pool.key)
    ).start()
    wait_until(lambda: _refused(host, mine.status_token), timeout=20, what="the old status token refused")
    admin = pool.client("admin", "ops")
    try:
        (fresh,) = [h for h in admin.list_pool().hosts if h.host_id == HOST]
    finally:
        admin.close()
    assert _status(host, fresh.status_token).host_id == HOST  # one of the new process is served


def _status(host: Any, token: str) -> device_pb2.StatusReply:
    with tls.channel(host.address, cfg=get_pki().client_config("tenant", "carol"), token=False) as ch:
        stub = device_pb2_grpc.DeviceStub(ch)
        return stub.Status(device_pb2.StatusRequest(), timeout=10, metadata=((protocol.STATUS_TOKEN_METADATA, token),))


def _refused(host: Any, token: str) -> bool:
    """Whether the daemon refuses the status token as revoked (False while it serves it)."""
    try:
        _status(host, token)
        return False
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()  # type: ignore[attr-defined]
        assert "revoked" in (err.details() or ""), err.details()  # type: ignore[attr-defined]
        return True


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


def test_a_resumed_daemon_whose_id_was_taken_over_takes_none_of_its_revocations(pool: Pool) -> None:
    """A daemon paused past half the host timeout (its id's live window) loses its id to another daemon of the same
    credential at another address; Alice's lease placed on the host is released; the paused one resumes and
    heartbeats first: it is asked to register again (it is not the host's daemon now) and takes no revocation, and
    the daemon that took over hears the release at its next heartbeat. On aa4f78c the resumed daemon's heartbeat took
    the revocation (each is told once) and the host's daemon never heard it: the released lease's token attached
    there."""
    paused = SimHost(pool.address, HOST, tls_config=get_pki().client_config("host", HOST))
    paused.registrar._register()  # by hand (no registrar thread): it heartbeats once, then is silent (SIGSTOP)
    paused.registrar._heartbeat()
    moved = SimHost(pool.address, HOST, tls_config=get_pki().client_config("host", HOST))
    moved.registrar.advertise_address = "127.0.0.1:2"
    try:
        wait_until(lambda: _registers(moved), timeout=20, every=0.5, what="the take-over of the paused daemon's id")
        moved.registrar._heartbeat()  # (by hand from here on: the order of the two daemons' heartbeats is the test's)
        alice = pool.client("tenant", "alice")
        try:
            lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=3600))
            assert lease.devices[0].address == "127.0.0.1:2"
            alice.release(lease.lease_id)
        finally:
            alice.close()
        assert paused.registrar.registered.is_set()
        paused.registrar._heartbeat()  # resumed: its registrar heartbeats as if nothing happened
        assert lease.lease_id not in paused.revoked and not paused.registrar.registered.is_set()
        moved.registrar._heartbeat()
        assert lease.lease_id in moved.revoked
    finally:
        paused.stop()
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
