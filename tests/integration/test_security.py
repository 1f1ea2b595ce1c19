"""The network side of security, against a real scheduler and daemon on loopback (issue 9 items 1-3):
TLS refuses plaintext and strangers, daemons prove their host id, tenants see and touch only their own leases,
and lease tokens cannot be forged, moved to another host or device, reused after release, or kept after rotation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.pool import Lease, SchedulerClient
from gpupool.client.session import Session
from gpupool.scheduler.auth import credential_line
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from gpupool.server.registration import Registrar
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scheduler_fixtures import wait_until
from support import (
    REGISTER_WAIT_S,
    DaemonFactory,
    get_pki,
    mint_token,
    plaintext_channel,
    register_host,
    registered_host,
)

from gpupool import errors, pki, protocol, tls, tokens
from gpupool._proto import device_pb2, device_pb2_grpc, scheduler_pb2
from gpupool.config import write_secret

HOST = "sec-host"


@dataclass
class Pool:
    scheduler: SchedulerServer
    address: str
    key: Path  # the scheduler's signing key file
    public: Path  # the daemon's public key file
    credentials: Path
    tmp: Path

    def client(self, role: str, name: str) -> SchedulerClient:
        return SchedulerClient(self.address, get_pki().client_config(role, name))

    def token_client(self, token: str) -> SchedulerClient:
        path = self.tmp / f"api-{abs(hash(token))}.token"
        write_secret(path, (token + "\n").encode())  # owner-only: a token others may read is refused
        # this pool requires client certificates; the API token, when present, decides who the caller is
        return SchedulerClient(self.address, get_pki().client_config("tenant", "anyone", api_token_file=str(path)))


def start_pool(tmp: Path, **config: Any) -> Pool:
    tmp.mkdir(parents=True, exist_ok=True)
    key, public, creds = tmp / "token.key", tmp / "token.pub", tmp / "credentials"
    signer = tokens.generate_key_file(key, public)
    creds.write_text(credential_line("host", "joined-host", "join-secret") + credential_line("tenant", "tina", "t0k"))
    fields: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "state": ":memory:",
        "metrics_listen": "0",
        "heartbeat_interval": 0.3,
        "tls": dataclasses.replace(get_pki().server_config(), client_auth="require"),
        "credentials": str(creds),
    }
    fields.update(config)
    server = SchedulerServer(SchedulerConfig(**fields), signer).start()
    return Pool(server, server.address, key, public, creds, tmp)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = start_pool(tmp_path)
    yield p
    p.scheduler.stop(grace=0.5)


@pytest.fixture
def host(pool: Pool, daemon_factory: DaemonFactory) -> Any:
    """A daemon registered as HOST with its host certificate, verifying tokens with the public key file only."""
    return registered_host(daemon_factory, pool.address, pool.public, HOST)


def health(channel: grpc.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


# ---- TLS ----


def test_plaintext_and_a_wrong_ca_are_refused(pool: Pool, daemon: Any, tmp_path: Path) -> None:
    stranger = pki.LocalCA(tmp_path / "other-ca")
    files = stranger.issue("admin", "test")
    wrong_ca = tls.TlsConfig(cert=str(files.cert), key=str(files.key), ca=str(stranger.cert_path))
    for address in (pool.address, daemon.address):
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as err:  # the real plaintext one
            health(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with tls.channel(address, cfg=wrong_ca) as ch, pytest.raises(grpc.RpcError) as err:
            health(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with tls.channel(address) as ch:
            assert health(ch).status == health_pb2.HealthCheckResponse.SERVING
    # the scheduler wants a client certificate from its CA: the right CA without one is not enough
    with tls.channel(pool.address, cfg=tls.TlsConfig(ca=get_pki().ca_file)) as ch, pytest.raises(grpc.RpcError):
        health(ch)


def test_certificates_reload_without_a_restart(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    cert, key = tmp_path / "d.crt", tmp_path / "d.key"
    old = get_pki().issue("host", "reload")
    shutil.copy(old.cert, cert)
    shutil.copy(old.key, key)
    d = daemon_factory(tls=tls.TlsConfig(cert=str(cert), key=str(key)), metrics_listen="0")  # (no CA: no metrics)
    with tls.channel(d.address) as ch:
        health(ch)
    new_ca = pki.LocalCA(tmp_path / "new-ca")
    new = new_ca.issue("host", "reload", dns=("localhost",), ips=("127.0.0.1",))
    shutil.copy(new.key, key)
    shutil.copy(new.cert, cert)
    trusting_new = tls.TlsConfig(ca=str(new_ca.cert_path))
    with tls.channel(d.address, cfg=trusting_new) as ch:  # a new connection gets the new certificate
        assert health(ch).status == health_pb2.HealthCheckResponse.SERVING


# ---- daemons prove their host id ----


def register(pool: Pool, host_id: str, cfg: tls.TlsConfig) -> grpc.StatusCode | None:
    return register_host(pool.address, host_id, cfg)


def test_a_rogue_daemon_cannot_register_as_another_host(pool: Pool, tmp_path: Path) -> None:
    p = get_pki()
    assert register(pool, "host-a", p.client_config("host", "host-a")) is None
    assert register(pool, "host-b", p.client_config("host", "host-a")) == grpc.StatusCode.PERMISSION_DENIED
    assert register(pool, "host-b", p.client_config("tenant", "host-b")) == grpc.StatusCode.PERMISSION_DENIED
    # join tokens (no client certificates): the token names its host
    join = tmp_path / "join"
    write_secret(join, b"join-secret\n")
    server_only = tls.TlsConfig(ca=p.ca_file, api_token_file=str(join))
    no_client_certs = dataclasses.replace(p.server_config(), client_auth="none")
    open_pool = start_pool(tmp_path / "open", tls=no_client_certs)
    try:
        assert register(open_pool, "joined-host", server_only) is None
        assert register(open_pool, "host-a", server_only) == grpc.StatusCode.PERMISSION_DENIED
        assert register(open_pool, "host-a", tls.TlsConfig(ca=p.ca_file)) == grpc.StatusCode.UNAUTHENTICATED
        write_secret(join, b"guessed\n")
        assert register(open_pool, "joined-host", server_only) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        open_pool.scheduler.stop(grace=0.5)
    # a heartbeat for another host is refused too
    stub_cfg = p.client_config("host", "host-c")
    reg = Registrar(pool.address, "host-a", "127.0.0.1:1", None, tls_config=stub_cfg)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as err:
        reg._stub.Heartbeat(scheduler_pb2.HeartbeatRequest(host_id="host-a"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    reg._channel.close()


# ---- tenants ----


def test_tenants_see_and_touch_only_their_own_leases(pool: Pool, host: Any) -> None:
    alice, bob, admin = pool.client("tenant", "alice"), pool.client("tenant", "bob"), pool.client("admin", "ops")
    lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5, tenant="mallory"))
    assert lease.tenant == "alice"  # from the credential, never from the request
    with pytest.raises(errors.PermissionDenied):
        bob.renew(lease.lease_id)
    with pytest.raises(errors.PermissionDenied):
        bob.release(lease.lease_id)
    (seen,) = bob.list_pool().leases
    assert seen.tenant == "alice" and seen.lease_id == "" and all(d.token == "" for d in seen.devices)
    assert seen.devices[0].share == 0.5  # usage stays visible
    (own,) = alice.list_pool().leases
    assert own.lease_id == lease.lease_id and all(d.token == "" for d in own.devices)
    assert admin.list_pool().leases[0].lease_id == lease.lease_id
    assert alice.renew(lease.lease_id).devices[0].token
    # an operator may act for a tenant; an API token identifies its tenant like a certificate does
    ops = admin.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, tenant="team"))
    assert ops.tenant == "team"
    tina = pool.token_client("t0k")
    assert tina.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25)).tenant == "tina"
    with pytest.raises(errors.Unauthenticated):
        pool.token_client("wrong").list_pool()
    with pytest.raises(errors.PermissionDenied):  # a host credential cannot take leases
        pool.client("host", HOST).allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.1))
    admin.release(lease.lease_id)
    for c in (alice, bob, admin, tina):
        c.close()


def test_a_tenant_sees_a_devices_memory_used_only_where_the_device_is_its_alone(pool: Pool, host: Any) -> None:
    """ListPool's memory used of a device is the daemon's total (its heartbeats): where another tenant holds a lease
    on the device, that total less the caller's own (its daemon's Status) was the other tenant's usage, shown to every
    caller (round 42: the daemon's Status hides it). Now a tenant sees it only on a device it alone holds leases on;
    an operator everywhere."""
    alice, bob, admin = pool.client("tenant", "alice"), pool.client("tenant", "bob"), pool.client("admin", "ops")
    sessions = []
    try:
        for client, n in ((alice, 1000), (bob, 300_000)):
            lease = client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25))
            s = Session.attach(host.address, lease.devices[0].token)
            s.upload(torch.ones(n))
            s.sync()
            sessions.append((client, lease, s))

        def used(client: SchedulerClient) -> int:
            (h,) = [h for h in client.list_pool().hosts if h.host_id == HOST]
            return int(h.devices[0].used_bytes)

        wait_until(lambda: used(admin) >= 1_200_000, what="the heartbeat's memory used")
        assert used(alice) == 0 and used(bob) == 0  # shared: the total would tell each the other's usage
        bob.release(sessions[1][1].lease_id)
        sessions[1][2].close()
        wait_until(lambda: 0 < used(admin) < 1_200_000, what="bob's memory freed")
        assert used(alice) == used(admin) > 0  # alice's alone: her own total
    finally:
        for _, _, s in sessions:
            s.close()
        for c in (alice, bob, admin):
            c.close()


@pytest.fixture
def co_tenants(pool: Pool, host: Any) -> Iterator[dict[str, scheduler_pb2.Lease]]:
    """alice's and bob's leases of a quarter of HOST's one device, each with a session holding memory (bob more)."""
    clients = {"alice": pool.client("tenant", "alice"), "bob": pool.client("tenant", "bob")}
    leases, sessions = {}, []
    try:
        for (name, client), n in zip(clients.items(), (1000, 300_000), strict=True):
            leases[name] = client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, tenant=name))
            sessions.append(Session.attach(host.address, leases[name].devices[0].token))
            sessions[-1].upload(torch.ones(n))
            sessions[-1].sync()
        yield leases
    finally:
        for s in sessions:
            s.close()
        for c in clients.values():
            c.close()


def smi_as_alice(pool: Pool, env: dict[str, str], role: str = "tenant", name: str = "alice") -> tuple[str, str]:
    """`gpupool smi` with alice's tenant certificate (or a `role` certificate named `name`) in environment `env`: its
    (devices, tenants) tables' text."""
    cfg = get_pki().client_config(role, name)
    flags = ["--scheduler", pool.address, "--tls-cert", cfg.cert, "--tls-key", cfg.key, "--tls-ca", cfg.ca]
    done = subprocess.run([sys.executable, "-m", "gpupool.cli", "smi", *flags], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **env}, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    devices, rest = done.stdout.split("tenants (sessions on the daemons)")
    return devices, rest.split("leases (")[0]


def test_a_tenants_smi_in_gpupool_run_shows_its_own_sessions(
    pool: Pool, host: Any, co_tenants: dict[str, scheduler_pb2.Lease]
) -> None:
    """`gpupool smi` inside `gpupool run` ($GPUPOOL_LEASE) presents its lease's tokens to the daemons: under
    `--tls-client-auth none` (this host's, serve's default) it lists its own sessions, no other tenant's (round 42:
    none at all, the daemon saw an anonymous caller)."""
    assert host.running.daemon.config.tls.client_auth == "none"
    alice = co_tenants["alice"]
    _, tenants = smi_as_alice(pool, Lease._from_pb(alice, pool.address).to_env())  # as `gpupool run` hands it
    rows = [line for line in tenants.splitlines() if HOST in line]
    assert len(rows) == 1 and "alice" in rows[0] and alice.lease_id[:12] in rows[0], tenants
    assert "bob" not in tenants
    _, plain = smi_as_alice(pool, {})  # no lease held: the daemon shows none, and the caption says how to see them
    assert HOST not in plain and "the sessions of the lease whose tokens smi presents" in " ".join(plain.split())
    # a token the daemon refuses (another signer's; an expired one alike) costs its sessions, not the table
    expired = Lease._from_pb(alice, pool.address)
    expired.devices[0] = dataclasses.replace(expired.devices[0], token=mint_token(b"0" * 64, host=HOST))
    _, refused = smi_as_alice(pool, expired.to_env())
    assert HOST not in refused and "tenant" in refused


def test_a_tenants_smi_says_why_a_shared_devices_memory_used_is_hidden(
    pool: Pool, co_tenants: dict[str, scheduler_pb2.Lease]
) -> None:
    """Where ListPool hides a device's memory used (another tenant holds a lease on it: the scheduler's 0), smi
    shows "(hidden)" and one caption line saying why, not a bare 0 B (round 42: 0 B, which reads as an idle GPU)."""
    devices, _ = smi_as_alice(pool, {})
    row = next(line for line in devices.splitlines() if HOST in line)
    assert "(hidden)" in row and " 0B " not in row, devices  # (format_size(0): 0B)
    assert "another tenant also holds a lease on the device" in " ".join(devices.split()), devices


def test_an_operators_smi_sees_every_session_under_client_auth_none(
    pool: Pool, host: Any, co_tenants: dict[str, scheduler_pb2.Lease]
) -> None:
    """Under `--tls-client-auth none` (serve's default, the deploy units') the operator's `gpupool smi` showed no
    session (round 42: the daemon sees no certificate, so no admin). The scheduler now gives an admin's ListPool a
    status token for each host, which smi presents: the operator sees every session, a tenant (its lease's tokens)
    only its own, a stranger (another tenant's certificate, no lease) none."""
    assert host.running.daemon.config.tls.client_auth == "none"
    _, operator = smi_as_alice(pool, {}, "admin", "ops")
    rows = [line for line in operator.splitlines() if HOST in line]
    assert len(rows) == 2 and "alice" in operator and "bob" in operator, operator
    _, alice = smi_as_alice(pool, Lease._from_pb(co_tenants["alice"], pool.address).to_env())
    assert [line for line in alice.splitlines() if HOST in line] != [] and "bob" not in alice, alice
    _, stranger = smi_as_alice(pool, {}, "tenant", "carol")
    assert HOST not in stranger and "alice" not in stranger and "bob" not in stranger, stranger


def test_smi_on_an_idle_pool_says_no_lease_is_active(pool: Pool, host: Any) -> None:
    """No lease in the pool: the tenants table's caption says none is active, to an operator and a tenant alike, not
    "none shown to you" (round 42: a credential problem, it read; the demo ended on it)."""
    for role, name in (("admin", "ops"), ("tenant", "alice")):
        _, tenants = smi_as_alice(pool, {}, role, name)
        text = " ".join(tenants.split())
        assert "none: no lease is active" in text and "none shown to you" not in text, tenants


def test_status_tokens_go_to_operators_only_and_show_only_their_host(
    pool: Pool, host: Any, co_tenants: dict[str, scheduler_pb2.Lease]
) -> None:
    """What a status token grants and where it fails: ListPool mints one per host for an admin credential (a
    certificate or an API token: no client certificate of the pool's CA needed), none for a tenant; it shows that
    host's every session; another host's, an expired one, one of another key, a lease token in its place are
    refused, and a status token is no lease token (Attach refuses it)."""
    by_token, carol = pool.token_client(_admin_token(pool)), pool.client("tenant", "carol")
    try:
        (mine,) = [h for h in by_token.list_pool().hosts if h.host_id == HOST]
        assert [h.status_token for h in carol.list_pool().hosts] == [""]
    finally:
        by_token.close()
        carol.close()
    assert tokens.verify_status(tokens.load_signer(pool.key), mine.status_token) == HOST

    def status(token: str, key: str = protocol.STATUS_TOKEN_METADATA) -> device_pb2.StatusReply:
        with tls.channel(host.address, cfg=get_pki().client_config("tenant", "carol"), token=False) as ch:
            stub = device_pb2_grpc.DeviceStub(ch)
            return stub.Status(device_pb2.StatusRequest(), timeout=10, metadata=((key, token),))

    assert sorted(u.tenant for u in status(mine.status_token).sessions) == ["alice", "bob"]
    signer = tokens.load_signer(pool.key)
    for token, code in (
        (tokens.mint_status(signer, "other-host"), grpc.StatusCode.PERMISSION_DENIED),
        (tokens.mint_status(signer, HOST, ttl=-1), grpc.StatusCode.UNAUTHENTICATED),
        (tokens.mint_status(signer, HOST, ttl=tokens.MAX_TTL), grpc.StatusCode.UNAUTHENTICATED),
        (tokens.mint_status(b"another key", HOST), grpc.StatusCode.UNAUTHENTICATED),
        (co_tenants["alice"].devices[0].token, grpc.StatusCode.UNAUTHENTICATED),  # a lease token is no status token
    ):
        with pytest.raises(grpc.RpcError) as err:
            status(token)
        assert err.value.code() == code, (token, err.value.details())  # type: ignore[attr-defined]
    with pytest.raises(errors.Unauthenticated, match="signature"):  # nor a status token a lease token
        Session.attach(host.address, mine.status_token).close()
    # shown as a lease token to Status, it is refused too (never a lease whose sessions it names)
    with pytest.raises(grpc.RpcError) as err:
        status(mine.status_token, protocol.LEASE_TOKEN_METADATA)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def _admin_token(pool: Pool) -> str:
    """An operator's API token, added to the scheduler's credentials file (re-read on change)."""
    with pool.credentials.open("a") as f:
        f.write(credential_line("admin", "ops-token", "a0k"))
    time.sleep(1.1)  # (the file is checked at most once a second)
    return "a0k"


# ---- tokens ----


def test_tokens_refused_off_their_host_device_key_or_after_release(pool: Pool, host: Any) -> None:
    alice = pool.client("tenant", "alice")
    lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
    token = lease.devices[0].token
    good = tokens.verify(tokens.load_signer(pool.key), token)
    signer = tokens.load_signer(pool.key)

    def refused(tok: str, what: type[errors.GpupoolError], match: str) -> None:
        with pytest.raises(what, match=match):
            Session.attach(host.address, tok).close()

    refused(mint_token(b"some other key, not the scheduler's", host=HOST), errors.Unauthenticated, "unknown key")
    refused(mint_token(signer, host=HOST, ttl=-1), errors.Unauthenticated, "expired")
    refused(mint_token(signer, host="other-host"), errors.PermissionDenied, "for host 'other-host'")
    refused(mint_token(signer, host=HOST, device=3), errors.NotFound, "device 3")
    kid, body, sig = token.split(".")
    flipped = "B" if sig[10] == "A" else "A"  # one changed character of the signature (never a no-op)
    refused(f"{kid}.{body}.{sig[:10]}{flipped}{sig[11:]}", errors.Unauthenticated, "signature|malformed")
    with Session.attach(host.address, token) as s:
        s.sync()
        assert good.lease_id == lease.lease_id
    alice.release(lease.lease_id)
    wait_until(lambda: host.running.daemon.config.token_key.revoked(lease.lease_id, time.time()))
    refused(token, errors.Unauthenticated, "released")
    alice.close()


def test_rotation_keeps_live_sessions(pool: Pool, host: Any) -> None:
    """Add the new public key, switch the scheduler's key, renew: the live session carries on with a token of the
    new key; once the old public key is removed, tokens of the old key are refused."""
    alice = pool.client("tenant", "alice")
    lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
    old_token = lease.devices[0].token
    verifier = host.running.daemon.config.token_key
    with Session.attach(host.address, old_token) as s:
        h = s.upload(__import__("torch").arange(4.0))
        new_key, new_pub = pool.tmp / "new.key", pool.tmp / "new.pub"
        new = tokens.generate_key_file(new_key, new_pub)
        old_pub = pool.public.read_bytes()
        pool.public.write_bytes(old_pub + new_pub.read_bytes())
        time.sleep(1.1)  # key files are re-checked at most once a second
        assert new.kid in verifier.key_ids
        shutil.copy(new_key, pool.key)
        time.sleep(1.1)
        renewed = alice.renew(lease.lease_id).devices[0].token
        assert renewed.split(".")[0] == new.kid != old_token.split(".")[0]
        s.refresh(renewed)
        pool.public.write_bytes(new_pub.read_bytes())  # the overlap ends
        time.sleep(1.1)
        assert verifier.key_ids == [new.kid]
        assert s.download(h).tolist() == [0.0, 1.0, 2.0, 3.0]  # the session never noticed
    with pytest.raises(errors.Unauthenticated, match="unknown key"):
        Session.attach(host.address, old_token)
    with Session.attach(host.address, renewed) as s2:
        s2.sync()
    alice.release(lease.lease_id)
    alice.close()


def test_sessions_can_check_the_daemon_by_host_id(
    pool: Pool, host: Any, daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With GPUPOOL_TLS_VERIFY_HOST_ID=1 a session accepts only a daemon whose certificate names the token's host."""
    monkeypatch.setenv("GPUPOOL_TLS_VERIFY_HOST_ID", "1")
    alice = pool.client("tenant", "alice")
    lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
    with Session.attach(host.address, lease.devices[0].token) as s:
        s.sync()
    # the same token sent to another daemon (whose certificate names no such host) never leaves the client
    with pytest.raises(errors.Unavailable):
        Session.attach(daemon.address, lease.devices[0].token)
    alice.release(lease.lease_id)
    alice.close()


def test_plaintext_needs_an_explicit_insecure(tmp_path: Path) -> None:
    """Without certificates a server refuses to start (saying how to get them); --insecure serves plaintext and
    says so in its log."""
    from support import Program

    env_free = {k: "" for k in ("GPUPOOL_TLS_CERT", "GPUPOOL_TLS_KEY", "GPUPOOL_TLS_CA")}
    key = tmp_path / "k"
    tokens.generate_key_file(key)
    old = {k: os.environ.get(k) for k in env_free}
    os.environ.update(env_free)
    try:
        refused = Program(["scheduler", "--listen", "127.0.0.1:0", "--metrics-listen", "0", "--state", ":memory:",
                           "--token-key-file", str(key)], tmp_path / "refused.log")  # fmt: skip
        assert refused.proc.wait(60) == 1
        assert "--tls-cert" in (tmp_path / "refused.log").read_text()
        plain = Program(["scheduler", "--listen", "127.0.0.1:0", "--metrics-listen", "0", "--state", ":memory:",
                         "--token-key-file", str(key), "--insecure"], tmp_path / "plain.log")  # fmt: skip
        try:
            (port,) = (int(plain.wait_for(r"listening on \S*?:(\d+)").group(1)),)
            assert "PLAINTEXT" in (tmp_path / "plain.log").read_text()
            with plaintext_channel(f"127.0.0.1:{port}") as ch:
                assert health(ch).status == health_pb2.HealthCheckResponse.SERVING
        finally:
            plain.stop()
    finally:
        for k, v in old.items():
            if v is not None:
                os.environ[k] = v


def test_only_tokens_of_leases_of_several_devices_grant_network(pool: Pool, daemon_factory: DaemonFactory) -> None:
    files = get_pki().issue("host", HOST)
    d = daemon_factory(
        host_id=HOST,
        fake_gpus=2,
        scheduler=pool.address,
        heartbeat_interval=0.3,
        token_key=tokens.load_verifier(pool.public),
        tls=tls.TlsConfig(cert=str(files.cert), key=str(files.key), ca=get_pki().ca_file),
    )
    assert d.running.registrar.registered.wait(REGISTER_WAIT_S)
    alice = pool.client("tenant", "alice")
    signer = tokens.load_signer(pool.key)
    pair = alice.allocate(scheduler_pb2.AllocateRequest(gpus=2, fraction=0.5))
    single = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
    assert [tokens.verify(signer, x.token).network for x in pair.devices] == [True, True]
    assert tokens.verify(signer, single.devices[0].token).network is False
    assert '"network"' not in tokens._unb64(single.devices[0].token.split(".")[1]).decode()  # old tokens' one spelling
    # The claim has one spelling: an explicit false, even correctly signed, is refused as malformed.
    claims = dataclasses.asdict(tokens.verify(signer, single.devices[0].token))
    body = tokens._b64(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
    head = f"{signer.kid}.{body}"
    respelled = f"{head}.{tokens._b64(signer._key.sign(head.encode()))}"
    with pytest.raises(errors.Unauthenticated, match="malformed"):
        Session.attach(d.address, respelled).close()
    alice.release(pair.lease_id)
    alice.release(single.lease_id)
    alice.close()
    # `gpupool token --network` mints the claim by hand (daemons without a scheduler, tests).
    out = subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "token", "--token-key-file", str(pool.key), "--host", HOST, "--network"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    assert tokens.verify(signer, out).network is True


@pytest.mark.parametrize("transport", ["secure", "gloo"])
def test_a_forged_value_in_a_groups_store_fails_the_join(daemon_factory: DaemonFactory, transport: str) -> None:
    """The store between the daemons of a multi-GPU job is plain TCP: a stranger who reaches it (here one that
    even knows where the group's keys are) and overwrites rank 0's published address does not steer rank 1's
    links to itself: the value's HMAC does not match and the join fails, saying so."""
    import hashlib
    import threading
    import uuid

    import torch
    from gpupool.server import seclink
    from gpupool.server.collectives import _connect_store, _front_key, group_secret

    lease = uuid.uuid4().hex
    daemons = [
        daemon_factory(
            host_id=f"host-{i}",
            fake_gpu_memory=16 * 1024**2,
            worker_network=True,
            collectives=transport,
            gloo_connect_anywhere=transport == "gloo",
        )
        for i in (0, 1)
    ]
    toks = [d.token(lease_id=lease, network=True) for d in daemons]
    s0, s1 = (Session.attach(d.address, t) for d, t in zip(daemons, toks, strict=True))
    h = s0.new_handle()
    join0 = device_pb2.GroupJoin(rank=0, size=2, tokens=toks, port_handle=h, timeout_seconds=8)
    s0.command(device_pb2.Command(group_join=join0))
    (port,) = s0.sync([h])
    # (hole53) rank 0's store forwards only connections that prove the group's secret (one without it:
    # test_a_connection_without_the_groups_secret_writes_nothing_in_rank_0s_store): this one holds it (a tenant's, or
    # one who rewrites the proved connection's traffic in flight) but not a rank's MAC over the value it forges
    key = _front_key(group_secret(toks[0]))
    stranger = _connect_store(["127.0.0.1"], int(port), 2, 20.0, threading.Event(), key=key)
    name = hashlib.sha256(b"gpupool-group-keys:" + group_secret(toks[0]).encode()).hexdigest()
    # (PrefixStore adds a /) where gloo's rendezvous, or the secure links', keep rank 0's address
    key = f"gpupool/{name}//" + ("0/0" if transport == "gloo" else seclink.HUB_KEY)
    stranger.wait([key])
    forged = b"\0" * 32 + b"an address of the stranger's choosing"
    stranger.set(key, forged)
    # (front54) a set has no reply: read it back on the same connection, so that it is in the store before rank 1
    # reads the key (rank 0's front reads each query as it passes; under load rank 1's get came first)
    assert stranger.get(key) == forged
    join1 = device_pb2.GroupJoin(rank=1, size=2, tokens=toks, store_address=f"127.0.0.1:{port}", timeout_seconds=8)
    s1.command(device_pb2.Command(group_join=join1))
    s1.sync()
    x = s1.upload(torch.ones(2))
    s1.command(device_pb2.Command(collective=device_pb2.Collective(kind="allreduce", tensors=[x], reduce_op="sum")))
    with pytest.raises(errors.Unavailable, match="not written by a rank of the group"):
        s1.sync()
    s0.close()
    s1.close()
