"""Round 45 (control45): what round 44 left in the control plane, against real schedulers and daemons on loopback.

1. A client certificate could not be revoked (no CRL): a leaked tenant's or admin's certificate worked until it
   expired, an admin's fetching fresh status tokens all along. Now `gpupool cert revoke` puts its fingerprint on the
   scheduler's list (in its state), refused on every call by the scheduler and, from their next heartbeat, by the
   daemons (`--tls-client-auth require`); the status tokens minted before are refused.
2. A daemon kept the revocations it heard in memory only: restarted while its scheduler was down it served no session
   at all. Now `--state-dir` keeps them (HMAC'd, 0600): it refuses the revoked tokens and serves the others; an edited
   file is not used.
3. Ended leases kept for revocation were bounded per tenant only: now `--max-revoked` bounds them all together.
4. A ListPool in flight when an admin was removed returned status tokens minted after the removal (served 120 s).
5. A scheduler clock that ran ahead made every daemon refuse every status token until it restarted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from gpupool.client import admin as admin_cli
from gpupool.client.pool import SchedulerClient
from gpupool.scheduler import service as scheduler_service
from gpupool.scheduler.auth import credential_line
from gpupool.scheduler.cli import SchedulerServer
from scheduler_fixtures import wait_until
from support import REGISTER_WAIT_S, DaemonFactory, get_pki
from test_security import Pool, start_pool

from gpupool import errors, protocol, tls, tokens
from gpupool._proto import device_pb2, device_pb2_grpc, scheduler_pb2

pytestmark = pytest.mark.slow
HOST = "ctl45-host"


def _daemon(factory: DaemonFactory, pool: Pool, **fields: Any) -> Any:
    """An in-process daemon registering as HOST with its host certificate, requiring client certificates (it sees
    them), verifying tokens with the pool's public key file (thread isolation: the control plane is what is tried)."""
    files = get_pki().issue("host", HOST)
    config: dict[str, Any] = {
        "host_id": HOST,
        "scheduler": pool.address,
        "heartbeat_interval": 0.3,
        "isolation": "thread",
        "token_key": tokens.load_verifier(pool.public),
        "tls": tls.TlsConfig(cert=str(files.cert), key=str(files.key), ca=get_pki().ca_file, client_auth="require"),
    }
    config.update(fields)
    return factory(**config)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = start_pool(tmp_path, state=str(tmp_path / "state.db"))
    yield p
    p.scheduler.stop(grace=0.5)


def _status(address: str, role: str, name: str, metadata: Any = ()) -> device_pb2.StatusReply:
    with tls.channel(address, cfg=get_pki().client_config(role, name), token=False) as ch:
        return device_pb2_grpc.DeviceStub(ch).Status(device_pb2.StatusRequest(), timeout=10, metadata=metadata)


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""  # type: ignore[attr-defined]
    except errors.GpupoolError as exc:
        return exc.code, str(exc)
    return grpc.StatusCode.OK, ""


def _revoke(pool: Pool, *given: str, action: str = "revoke") -> None:
    """`gpupool cert revoke|unrevoke ...` with the operator's certificate (the test process's)."""
    assert admin_cli.cert_main([action, *given, "--note", "control45", "--scheduler", pool.address]) == 0


# ---- 1. revoked client certificates ----


def test_a_revoked_tenant_certificate_is_refused_by_the_scheduler_and_its_daemons(
    pool: Pool, daemon_factory: DaemonFactory
) -> None:
    """Mallory's tenant certificate allocates and shows its sessions at the daemon; the operator revokes it (by its
    file): the scheduler refuses it at once (an API token beside it too) and the daemon within a few heartbeats, both
    UNAUTHENTICATED naming the revocation; Alice's certificate goes on. On f47ac67 there was no way to revoke it
    (`gpupool cert` did not exist) and it worked until it expired."""
    host = _daemon(daemon_factory, pool, bulk_listen="127.0.0.1:0")
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S)
    mallory = pool.client("tenant", "mallory")
    try:
        lease = mallory.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=600))
        assert lease.devices[0].host_id == HOST
        assert _status(host.address, "tenant", "mallory").host_id == HOST
        with tls.channel(host.address, cfg=get_pki().client_config("tenant", "mallory"), token=False) as ch:
            attached = device_pb2_grpc.DeviceStub(ch).Attach(
                device_pb2.AttachRequest(token=lease.devices[0].token), timeout=30
            )
        _revoke(pool, str(get_pki().issue("tenant", "mallory").cert))

        code, words = _code(lambda: mallory.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25)))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "is revoked" in words, words
    finally:
        mallory.close()
    with_token = SchedulerClient(pool.address, _token_config(pool, "tenant", "mallory"))
    try:  # an API token of another tenant does not clean the revoked certificate's connection
        code, words = _code(lambda: with_token.list_pool())
        assert code == grpc.StatusCode.UNAUTHENTICATED and "is revoked" in words, words
    finally:
        with_token.close()

    def refused() -> bool:
        code, words = _code(lambda: _status(host.address, "tenant", "mallory"))
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED), words
        return code == grpc.StatusCode.UNAUTHENTICATED and "is revoked" in words

    wait_until(refused, timeout=15, what="the daemon refusing the revoked certificate")
    assert _status(host.address, "tenant", "alice").host_id == HOST
    # The side port too: the session attached before the revocation, its id held, and the hello is closed unanswered
    answer = side_hello(get_pki().client_config("tenant", "mallory"), host.running.bulk.port, attached.session_id)
    assert answer == b"", answer
    alice = pool.client("tenant", "alice")
    try:
        alice.release(alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25)).lease_id)
    finally:
        alice.close()


def side_hello(cfg: tls.TlsConfig, port: int, session_id: str) -> bytes:
    """The side port's first byte of answer to a hello for `session_id` with `cfg`'s certificate (b"": closed)."""
    ctx = tls.socket_client_context(cfg)
    assert ctx is not None
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as side:
        try:
            side.sendall(protocol.bulk_hello(session_id))
            return side.recv(1)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return b""


def _token_config(pool: Pool, role: str, name: str) -> tls.TlsConfig:
    """The certificate of `role`/`name` with an API token of tenant tina beside it."""
    from gpupool.config import write_secret

    path = pool.tmp / f"{name}.token"
    write_secret(path, b"t0k\n")
    return get_pki().client_config(role, name, api_token_file=str(path))


def test_certificate_revocations_are_kept_in_the_state_and_can_be_taken_back(tmp_path: Path) -> None:
    """Revoked by fingerprint (openssl's spelling: upper case, colons), the scheduler restarted on its SQLite state:
    still refused, and listed with its note; taken back: served again. A malformed fingerprint is INVALID_ARGUMENT, a
    tenant may not revoke (PERMISSION_DENIED). On f47ac67 the RPC did not exist (UNIMPLEMENTED)."""
    from gpupool import certrevoke  # (round 45's)

    pool = start_pool(tmp_path, state=str(tmp_path / "state.db"))
    try:
        fp = certrevoke.fingerprint_pem(get_pki().issue("tenant", "eve").cert.read_bytes())
        openssl = "SHA256 Fingerprint=" + ":".join(fp[7:][i : i + 2] for i in range(0, 64, 2)).upper()
        ops = pool.client("admin", "ops")
        try:
            reply = ops.revoke_certificates([openssl], note="left the company")
            assert [(r.fingerprint, r.note) for r in reply.revoked] == [(fp, "left the company")]
            code, words = _code(lambda: ops.revoke_certificates(["sha256:1234"]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "fingerprint" in words, words
        finally:
            ops.close()
        tina = pool.client("tenant", "tina")
        try:
            code, _ = _code(lambda: tina.revoke_certificates([fp], []))
            assert code == grpc.StatusCode.PERMISSION_DENIED
        finally:
            tina.close()

        pool.scheduler.stop(grace=0)
        config = dataclasses.replace(pool.scheduler.config, listen=pool.address)
        pool.scheduler = SchedulerServer(config, tokens.load_signer(pool.key)).start()
        eve = pool.client("tenant", "eve")
        try:
            code, words = _code(lambda: eve.list_pool())
            assert code == grpc.StatusCode.UNAUTHENTICATED and fp in words, words
            ops = pool.client("admin", "ops")
            try:
                assert [r.fingerprint for r in ops.revoke_certificates().revoked] == [fp]
            finally:
                ops.close()
            _revoke(pool, fp, action="unrevoke")
            eve.list_pool()  # served again
        finally:
            eve.close()
    finally:
        pool.scheduler.stop(grace=0)


def test_a_revoked_admin_certificate_gets_no_status_token_and_its_old_ones_are_refused(
    pool: Pool, daemon_factory: DaemonFactory
) -> None:
    """An admin certificate's ListPool gives a status token that shows every session at the daemon; the operator
    revokes that certificate: its ListPool is refused, and the status token it holds is refused at the daemon within a
    few heartbeats (`status_tokens_not_before`), while another admin's fresh token is served. On f47ac67 the
    certificate could not be revoked: it fetched fresh status tokens until it expired."""
    host = _daemon(daemon_factory, pool)
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S)
    rogue = pool.client("admin", "rogue")
    try:
        (mine,) = [h for h in rogue.list_pool().hosts if h.host_id == HOST]
        meta = ((protocol.STATUS_TOKEN_METADATA, mine.status_token),)
        assert _status(host.address, "tenant", "carol", meta).host_id == HOST
        _revoke(pool, str(get_pki().issue("admin", "rogue").cert))
        code, words = _code(lambda: rogue.list_pool())
        assert code == grpc.StatusCode.UNAUTHENTICATED and "is revoked" in words, words
    finally:
        rogue.close()

    def refused() -> bool:
        code, words = _code(lambda: _status(host.address, "tenant", "carol", meta))
        return code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in words

    wait_until(refused, timeout=15, what="the revoked admin's status token refused")
    ops = pool.client("admin", "ops")
    try:
        (fresh,) = [h for h in ops.list_pool().hosts if h.host_id == HOST]
    finally:
        ops.close()
    assert _status(host.address, "tenant", "carol", ((protocol.STATUS_TOKEN_METADATA, fresh.status_token),))


# ---- 2. a daemon's revocations on disk ----


def _alice_leases(pool: Pool, n: int) -> list[scheduler_pb2.Lease]:
    alice = pool.client("tenant", "alice")
    try:
        return [
            alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=3600)) for _ in range(n)
        ]
    finally:
        alice.close()


def _attach(address: str, token: str) -> tuple[grpc.StatusCode, str]:
    with tls.channel(address, cfg=get_pki().client_config("tenant", "alice"), token=False) as ch:
        stub = device_pb2_grpc.DeviceStub(ch)

        def attach() -> None:
            reply = stub.Attach(device_pb2.AttachRequest(token=token), timeout=30)
            stub.Detach(device_pb2.DetachRequest(session_id=reply.session_id), timeout=10)

        return _code(attach)


def _restart_after_a_release(
    pool: Pool, factory: DaemonFactory, state: Path, n: int
) -> tuple[str, list[scheduler_pb2.Lease], Path]:
    """A daemon with `--state-dir STATE` hears Alice release the first of her N leases (written to its file); then it
    stops, and so does the scheduler: (its address, the leases, the file)."""
    first = _daemon(factory, pool, state_dir=str(state))
    assert first.running.registrar.registered.wait(REGISTER_WAIT_S)
    leases = _alice_leases(pool, n)
    alice = pool.client("tenant", "alice")
    try:
        alice.release(leases[0].lease_id)
    finally:
        alice.close()
    path = state / "revocations.json"
    written = leases[0].lease_id.encode()
    wait_until(lambda: path.exists() and written in path.read_bytes(), what="the revocation written")
    first.running.stop(grace=0.5, drain=False)
    pool.scheduler.stop(grace=0)
    return first.address, leases, path


def test_a_daemon_restarted_while_its_scheduler_is_down_serves_on_its_revocations_file(
    pool: Pool, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Alice holds two leases of an hour and releases one; the daemon (--state-dir) hears it. The daemon stops, then
    the scheduler; the daemon restarts: the released lease's token is refused (UNAUTHENTICATED, revoked), the other
    attaches; the file is 0600. On f47ac67 (no --state-dir) a daemon restarted so attached nothing until its scheduler
    answered (UNAVAILABLE after 5 s)."""
    state = tmp_path / "daemon-state"
    address, (released, kept), path = _restart_after_a_release(pool, daemon_factory, state, 2)
    assert released.lease_id in json.loads(path.read_bytes().rpartition(b"\nhmac-sha256:")[0])["leases"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    again = _daemon(daemon_factory, pool, state_dir=str(state), listen=address)
    code, words = _attach(again.address, released.devices[0].token)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "released or revoked" in words, words
    assert _attach(again.address, kept.devices[0].token) == (grpc.StatusCode.OK, "")


def test_an_edited_revocations_file_is_not_used(pool: Pool, daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """The released lease taken out of the file by hand (its HMAC left as it was): the restarted daemon does not use
    the file (it cannot tell what else was changed) and, its scheduler down, serves no Attach (UNAVAILABLE), the
    released lease's token included. What the file's HMAC pins (f47ac67 had no file)."""
    state = tmp_path / "daemon-state"
    address, (released,), path = _restart_after_a_release(pool, daemon_factory, state, 1)
    body, sep, mac = path.read_bytes().rpartition(b"\nhmac-sha256:")
    raw = json.loads(body)
    del raw["leases"][released.lease_id]
    path.write_bytes(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode() + sep + mac)

    again = _daemon(daemon_factory, pool, state_dir=str(state), listen=address)
    code, words = _attach(again.address, released.devices[0].token)
    assert code == grpc.StatusCode.UNAVAILABLE and "has not heard from its scheduler" in words, words


# ---- 3. ended leases bounded across tenants ----


def test_ended_leases_whose_tokens_live_are_bounded_across_tenants(tmp_path: Path) -> None:
    """`--max-revoked 2`: Alice and Bob each allocate and release a lease of an hour; Carol's Allocate (her first) is
    RESOURCE_EXHAUSTED naming --max-revoked and when the next frees, also after the scheduler restarts on its state.
    On f47ac67 there was no bound across tenants (each under its own --tenant-max-revoked)."""
    pool = start_pool(tmp_path, state=str(tmp_path / "state.db"), max_revoked=2)
    from gpupool.scheduler.hosts import DeviceSpec

    try:
        pool.scheduler.core.hosts.register("h", "127.0.0.1:7", [DeviceSpec(0, "GPU-h", "fake", 1 << 30, True)])  # type: ignore[union-attr]
        for name in ("alice", "bob"):
            client = pool.client("tenant", name)
            try:
                client.release(
                    client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=3600)).lease_id
                )
            finally:
                client.close()
        for restarted in (False, True):
            if restarted:
                pool.scheduler.stop(grace=0)
                config = dataclasses.replace(pool.scheduler.config, listen=pool.address)
                pool.scheduler = SchedulerServer(config, tokens.load_signer(pool.key)).start()
            carol = pool.client("tenant", "carol")
            try:
                code, words = _code(lambda c=carol: c.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25)))
            finally:
                carol.close()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-revoked" in words, (restarted, words)
            assert "all tenants together" in words and "frees at" in words
    finally:
        pool.scheduler.stop(grace=0)


# ---- 4. a ListPool in flight at an admin's removal ----


def test_a_list_pool_in_flight_at_an_admins_removal_returns_no_token(
    pool: Pool, daemon_factory: DaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin API token's ListPool passes authentication; its removal is seen by the scheduler while the call mints
    the status tokens (the minting made to wait for it): the reply is refused UNAUTHENTICATED. On f47ac67 it returned a
    status token minted after the removal, which the daemon served for its 120 s."""
    host = _daemon(daemon_factory, pool)
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S)
    kept = pool.credentials.read_text()
    with pool.credentials.open("a") as f:
        f.write(credential_line("admin", "ops-token", "a0k"))
    time.sleep(1.1)  # (the file is checked at most once a second)
    mint = tokens.mint_status
    removed: list[bool] = []

    def removal_seen_first(key: Any, host_id: str, **kw: Any) -> str:
        if not removed:  # the operator's edit lands now, and the scheduler has seen it before the token is minted
            pool.credentials.write_text(kept)
            pool.scheduler.credentials.refresh()
            assert pool.scheduler.credentials.admin_removed_at > 0
            removed.append(True)
        return mint(key, host_id, **kw)

    monkeypatch.setattr(scheduler_service.tokens, "mint_status", removal_seen_first)
    ops = pool.token_client("a0k")
    try:
        code, words = _code(lambda: ops.list_pool())
    finally:
        ops.close()
    if code == grpc.StatusCode.OK:  # (f47ac67) the token it got is served
        pytest.fail("the removed admin's ListPool was answered with status tokens minted after the removal")
    assert code == grpc.StatusCode.UNAUTHENTICATED, words


# ---- 5. a scheduler clock that ran ahead ----


def test_a_scheduler_started_while_its_clock_ran_ahead_does_not_refuse_status_tokens_for_good(
    pool: Pool, daemon_factory: DaemonFactory
) -> None:
    """The scheduler process started an hour ahead (its clock jumped forward, then back): its start time, the status
    tokens' not-before, lies in the future. A fresh status token is served by the daemon within a few heartbeats. On
    f47ac67 every daemon refused every status token for that hour."""
    host = _daemon(daemon_factory, pool)
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S)
    pool.scheduler.core.started_at = time.time() + 3600  # type: ignore[union-attr]
    time.sleep(1.0)  # a few heartbeats
    ops = pool.client("admin", "ops")

    def served() -> bool:
        (mine,) = [h for h in ops.list_pool().hosts if h.host_id == HOST]
        code, words = _code(
            lambda: _status(host.address, "tenant", "carol", ((protocol.STATUS_TOKEN_METADATA, mine.status_token),))
        )
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED), words
        return code == grpc.StatusCode.OK

    try:
        wait_until(served, timeout=10, every=0.5, what="a fresh status token served")
    finally:
        ops.close()


def test_a_daemon_never_takes_a_not_before_far_past_its_own_clock() -> None:
    """A heartbeat's `status_tokens_not_before` an hour ahead (a scheduler whose clock ran ahead): the verifier takes it
    no further than its own clock and a minute, so tokens minted after that pass. On f47ac67 it kept the hour (only
    moving forward): every status token was refused until the daemon restarted."""
    key = tokens.Signer.from_seed(b"control45")
    verifier = tokens.Verifier([key.public])
    verifier.status_not_before(time.time() + 3600)
    later = time.time() + 90
    assert verifier.verify_status(tokens.mint_status(key, HOST, now=later), now=later) == HOST
    with pytest.raises(errors.Unauthenticated, match="revoked"):
        verifier.verify_status(tokens.mint_status(key, HOST, now=time.time()))
