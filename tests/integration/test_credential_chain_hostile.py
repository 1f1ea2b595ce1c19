"""A hostile look at the credential chain (scheduler -> lease -> token -> daemon), round 15: attacks against a real
scheduler and real daemons on loopback (port 0, the test PKI, mutual TLS at the scheduler).

Findings fixed here (each test fails without its fix):
- a lease token whose `expires_at` is NaN (json reads NaN) passed every comparison with the clock: a token, and a
  session, that never expires; `"device": true` was a second spelling of device 1 (tokens.py `_claims`);
- a streaming method of the Scheduler service would have been served without authentication (the interceptor
  wrapped unary handlers only and passed the others through): now refused (scheduler/auth.py).
Round 16: a tenant flooding the scheduler with calls is limited alone (`--tenant-rate`).
Round 17: a source address flooding it with bad API tokens is limited alone (`--auth-fail-rate`).
The rest are regression guards of what was checked and held: who may call what, replays after renewal and release.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from gpupool.client.pool import SchedulerClient
from gpupool.client.session import Session
from gpupool.scheduler.auth import Authenticator, AuthInterceptor, credential_line
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from scheduler_fixtures import wait_until
from support import DaemonFactory, TcpRelay, get_pki, plaintext_channel, register_host, registered_host

from gpupool import errors, tls, tokens
from gpupool._proto import scheduler_pb2
from gpupool.config import write_secret

HOST = "chain-host"


@dataclass
class Pool:
    scheduler: SchedulerServer
    address: str
    signer: tokens.Signer
    public: Path

    def client(self, role: str, name: str) -> SchedulerClient:
        return SchedulerClient(self.address, get_pki().client_config(role, name))


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    signer = tokens.generate_key_file(tmp_path / "token.key", tmp_path / "token.pub")
    config = SchedulerConfig(
        listen="127.0.0.1:0",
        metrics_listen="0",
        heartbeat_interval=0.3,
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"),
    )
    server = SchedulerServer(config, signer).start()
    yield Pool(server, server.address, signer, tmp_path / "token.pub")
    server.stop(grace=0.5)


@pytest.fixture
def host(pool: Pool, daemon_factory: DaemonFactory) -> Any:
    """A daemon registered as HOST (its host certificate), with two devices and the public key file only."""
    return registered_host(daemon_factory, pool.address, pool.public, HOST, fake_gpus=2)


# ---- tokens with claims the scheduler never signs ----


def test_a_token_that_never_expires_is_refused(daemon: Any) -> None:
    """NaN compares false with everything: `expires_at <= now` and `> now + MAX_TTL` both let it through, so the
    session would outlive every renewal and its reaper. Signed with the daemon's own key (a signer bug, a
    hand-minted token): the daemon must still refuse it."""
    signer = tokens.Signer.from_seed(daemon.key)
    claims = tokens.TokenClaims("nan-lease", daemon.host_id, 0, 0, 0.5, math.nan, "t")
    token = tokens.mint(signer, claims)
    assert ":NaN" in __import__("base64").urlsafe_b64decode(token.split(".")[1] + "==").decode()
    with pytest.raises(errors.Unauthenticated, match="out of range"):
        Session.attach(daemon.address, token).close()
    for bad in (math.inf, -math.inf):  # refused before too (too long-lived / expired): kept so
        with pytest.raises(errors.Unauthenticated):
            Session.attach(daemon.address, tokens.mint(signer, dataclasses.replace(claims, expires_at=bad))).close()
    # the same claims with a real expiry attach: only the NaN was the problem
    with Session.attach(daemon.address, tokens.mint(signer, dataclasses.replace(claims, expires_at=time.time() + 60))):
        pass


def test_a_boolean_is_not_a_number_in_a_token(daemon: Any) -> None:
    """`"device": true` decoded as device 1 (bool is an int in Python): two spellings of one claim, and a quota or
    an expiry of `true`. Refused as malformed, whatever the daemon has."""
    signer = tokens.Signer.from_seed(daemon.key)
    good = tokens.TokenClaims("bool-lease", daemon.host_id, 0, 0, 0.5, time.time() + 60, "t")
    for field in ("device", "quota_bytes", "share"):
        token = tokens.mint(signer, dataclasses.replace(good, **{field: True}))
        with pytest.raises(errors.Unauthenticated, match="malformed"):
            Session.attach(daemon.address, token).close()


def test_huge_and_negative_claims(daemon: Any) -> None:
    """Checked, held: a quota beyond any int64 is clamped to the device, negative quota/device are refused."""
    signer = tokens.Signer.from_seed(daemon.key)
    base = tokens.TokenClaims("big-lease", daemon.host_id, 0, 10**40, 1.0, time.time() + 60, "t")
    with Session.attach(daemon.address, tokens.mint(signer, base)) as s:
        assert s.quota_bytes == 256 * 1024 * 1024  # the device's capacity, not 10**40
    for bad in ({"quota_bytes": -1}, {"device": -1}, {"share": 0.0}, {"device": 2**70}):
        with pytest.raises((errors.Unauthenticated, errors.NotFound)):
            Session.attach(daemon.address, tokens.mint(signer, dataclasses.replace(base, lease_id="x", **bad)))


# ---- who may call what at the scheduler ----


def _register(pool: Pool, host_id: str, cfg: tls.TlsConfig) -> grpc.StatusCode | None:
    return register_host(pool.address, host_id, cfg)


def test_role_matrix(pool: Pool, host: Any) -> None:
    """Checked, held: a tenant cannot drain, remove, register or heartbeat; a host cannot drain, remove, renew,
    release or allocate, nor act as another host; nobody learns another tenant's lease id or any token."""
    alice, bob = pool.client("tenant", "alice"), pool.client("tenant", "bob")
    other_host = pool.client("host", "some-other-host")
    lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
    for who in (bob, other_host):
        with pytest.raises(errors.PermissionDenied):
            who.drain_host(HOST)
        with pytest.raises(errors.PermissionDenied):
            who.remove_host(HOST, force=True)
    for call in (other_host.renew, other_host.release, bob.renew, bob.release):
        with pytest.raises(errors.PermissionDenied):
            call(lease.lease_id)
    p = get_pki()
    assert _register(pool, HOST, p.client_config("tenant", HOST)) == grpc.StatusCode.PERMISSION_DENIED
    assert _register(pool, HOST, p.client_config("host", "some-other-host")) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(errors.PermissionDenied):
        other_host._call("Heartbeat", scheduler_pb2.HeartbeatRequest(host_id=HOST))
    with pytest.raises(errors.PermissionDenied):
        bob._call("Heartbeat", scheduler_pb2.HeartbeatRequest(host_id="bob"))
    # a host reporting someone else's lease as its session learns nothing: it is only told to drop it
    reply = other_host._call(
        "Heartbeat", scheduler_pb2.HeartbeatRequest(host_id="some-other-host"), timeout=5
    )  # unknown host: asked to register, no leases named
    assert reply.reregister and not reply.revoked_leases
    for who in (bob, other_host):
        state = who.list_pool()
        assert [x.lease_id for x in state.leases] == [""]
        assert all(d.token == "" for x in state.leases for d in x.devices)
    alice.release(lease.lease_id)
    for c in (alice, bob, other_host):
        c.close()


def test_replays_after_renewal_and_release(pool: Pool, host: Any) -> None:
    """Checked, held: a renewal racing a release never leaves a usable token behind. After Release (and the
    heartbeat that carries it), the first token, every renewed token and a token of the lease's other device are
    all refused by the daemon, and a session open with one of them is closed."""
    alice = pool.client("tenant", "alice")
    lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=2, fraction=0.25, policy="spread"))
    first = [d.token for d in lease.devices]
    session = Session.attach(host.address, first[0])
    renewed: list[str] = []
    stop = threading.Event()

    def renew_loop() -> None:
        while not stop.is_set():
            try:
                renewed.extend(d.token for d in alice.renew(lease.lease_id).devices)
            except errors.FailedPrecondition:
                return  # released: the race is over

    t = threading.Thread(target=renew_loop)
    t.start()
    time.sleep(0.2)
    alice.release(lease.lease_id)
    stop.set()
    t.join(10)
    assert renewed, "the renewals never ran"
    verifier = host.running.daemon.config.token_key
    wait_until(lambda: verifier.revoked(lease.lease_id, time.time()))
    wait_until(lambda: not _alive(session))
    for token in {*first, *renewed[-4:]}:
        with pytest.raises(errors.Unauthenticated, match="released"):
            Session.attach(host.address, token).close()
    with pytest.raises(errors.FailedPrecondition):
        alice.renew(lease.lease_id)
    alice.close()


def _alive(session: Session) -> bool:
    try:
        session.sync()
        return True
    except errors.GpupoolError:
        return False


# ---- the scheduler's interceptor fails closed ----


def test_a_streaming_scheduler_method_is_not_served_unauthenticated(tmp_path: Path) -> None:
    """The AuthInterceptor wrapped unary handlers and passed any other through untouched: a streaming method added
    to the Scheduler service would answer everyone. A real server with the real interceptor and such a method."""
    from concurrent import futures

    creds = tmp_path / "credentials"
    creds.write_text(credential_line("tenant", "tina", "t0k"))
    authn = Authenticator(str(creds), verified_certs=False, open_access=False)
    served = threading.Event()

    def watch(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        served.set()
        yield b"every lease and token"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[AuthInterceptor(authn)])
    handler = grpc.unary_stream_rpc_method_handler(watch)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("gpupool.v1.Scheduler", {"Watch": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with plaintext_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_stream("/gpupool.v1.Scheduler/Watch")
            for metadata in ((), (("authorization", "Bearer t0k"),)):  # nobody, and a tenant
                with pytest.raises(grpc.RpcError) as err:
                    list(call(b"", metadata=metadata, timeout=5))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert not served.is_set()
    finally:
        server.stop(0)


# ---- a compromised GPU host learns nothing beyond its own sessions' tokens ----


def test_sessions_never_send_the_api_token_to_a_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked, held: a daemon is a tenant's code runner, not its scheduler; a compromised one that got the tenant's
    API token could allocate, renew and release as that tenant and get tokens for other hosts. A TLS server of the
    pool's CA that records what each call carries: Attach comes with the lease token only, while a scheduler call
    on the same channel settings carries the API token (so the check can see one)."""
    from concurrent import futures

    monkeypatch.setenv("GPUPOOL_API_TOKEN", "tenant-api-secret")
    seen: dict[str, list[tuple[str, str]]] = {}

    def record(name: str) -> Any:
        def behavior(request: bytes, context: grpc.ServicerContext) -> bytes:
            seen[name] = [(k, str(v)) for k, v in context.invocation_metadata()]
            context.abort(grpc.StatusCode.UNAVAILABLE, "recorded")
            raise AssertionError

        return grpc.unary_unary_rpc_method_handler(behavior)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("gpupool.v1.Device", {"Attach": record("attach")}),
        grpc.method_handlers_generic_handler("gpupool.v1.Scheduler", {"ListPool": record("scheduler")}),
    ))  # fmt: skip
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(get_pki().server_config()))
    server.start()
    try:
        with pytest.raises(errors.Unavailable):
            Session.attach(f"127.0.0.1:{port}", "the-lease-token")
        client = SchedulerClient(f"127.0.0.1:{port}")
        with pytest.raises(errors.Unavailable):
            client.list_pool()
        client.close()
    finally:
        server.stop(0)
    assert ("authorization", "Bearer tenant-api-secret") in seen["scheduler"]
    assert not any("tenant-api-secret" in v or k == "authorization" for k, v in seen["attach"])


def test_a_tenant_flooding_the_scheduler_is_slowed_alone(tmp_path: Path) -> None:
    """--tenant-rate: a tenant's calls beyond its bucket get RESOURCE_EXHAUSTED; another tenant, a host's
    heartbeats and an admin are not touched, and the flooder's bucket refills (round 15's known limit: a ListPool
    flood slowed every caller, heartbeats included)."""
    signer = tokens.generate_key_file(tmp_path / "token.key", tmp_path / "token.pub")
    config = SchedulerConfig(
        listen="127.0.0.1:0",
        metrics_listen="0",
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"),
        tenant_rate=5.0,  # bursts of 50 calls
    )
    server = SchedulerServer(config, signer).start()
    pool = Pool(server, server.address, signer, tmp_path / "token.pub")
    alice, bob = pool.client("tenant", "alice"), pool.client("tenant", "bob")
    host, admin = pool.client("host", "h1"), pool.client("admin", "ops")
    try:
        with pytest.raises(errors.ResourceExhausted, match="--tenant-rate"):
            for _ in range(200):
                alice.list_pool()
        bob.list_pool()
        admin.list_pool()
        for _ in range(40):  # (within --host-heartbeat-rate's burst of 50, round 40: that limit is a host's own)
            host._call("Heartbeat", scheduler_pb2.HeartbeatRequest(host_id="h1"))
        time.sleep(0.5)  # 5 calls a second: two are back
        alice.list_pool()
    finally:
        for c in (alice, bob, host, admin):
            c.close()
        server.stop(grace=0.5)


def _failure_limited(tmp_path: Path, lines: list[tuple[str, str, str]]) -> tuple[SchedulerServer, TcpRelay]:
    """A scheduler of API tokens (`lines`: role, name, token) with --auth-fail-rate 0.2 (bursts of 2 failures, then
    one every 5 s: none comes back within a test), and a relay to it whose connections come from 127.0.0.2."""
    signer = tokens.generate_key_file(tmp_path / "token.key", tmp_path / "token.pub")
    creds = tmp_path / "credentials"
    creds.write_text("".join(credential_line(*line) for line in lines))
    config = SchedulerConfig(
        listen="127.0.0.1:0",
        metrics_listen="0",
        tls=dataclasses.replace(get_pki().server_config(), client_auth="none"),
        credentials=str(creds),
        auth_fail_rate=0.2,
    )
    server = SchedulerServer(config, signer).start()
    return server, TcpRelay(("127.0.0.1", int(server.address.rsplit(":", 1)[1])), "127.0.0.2")


def test_an_address_flooding_bad_api_tokens_is_refused_alone(tmp_path: Path) -> None:
    """--auth-fail-rate: each unknown API token costs the scheduler a hash and a look at the credentials file;
    past its bucket of failures, an address's bad tokens get RESOURCE_EXHAUSTED and its tokens are checked against
    the credentials as last read (the file looked at at most once a second for it), until the bucket refills. Its
    good tokens still pass (tenants sharing a NAT address or a login node with the flooder), a removed one stops
    within a second; a tenant on another address calls on throughout, and a bad token from there is still just
    UNAUTHENTICATED (round 16's known limit: failed authentications were not limited at all)."""
    creds = tmp_path / "credentials"
    server, relay = _failure_limited(tmp_path, [("tenant", "alice", "alice-token"), ("tenant", "mallory", "m-tok")])

    def client(address: str, token: str) -> SchedulerClient:
        write_secret(tmp_path / token, token.encode())
        return SchedulerClient(address, tls.TlsConfig(ca=get_pki().ca_file, api_token_file=str(tmp_path / token)))

    attacker, insider = client(relay.address, "guess"), client(relay.address, "m-tok")
    alice, stranger = client(server.address, "alice-token"), client(server.address, "wrong")
    codes: list[str] = []
    try:
        for _ in range(10):
            try:
                attacker.list_pool()
            except (errors.Unauthenticated, errors.ResourceExhausted) as exc:
                codes.append(type(exc).__name__)
                if isinstance(exc, errors.ResourceExhausted):
                    assert "--auth-fail-rate" in str(exc) and "127.0.0.2" in str(exc)
            alice.list_pool()  # another address: never refused
        assert codes[:2] == ["Unauthenticated"] * 2 and codes[-1] == "ResourceExhausted"
        insider.list_pool()  # a good token from that address still passes, the flood going on
        with pytest.raises(errors.ResourceExhausted):
            attacker.list_pool()
        with pytest.raises(errors.Unauthenticated):  # a bad token from another address: just unknown
            stranger.list_pool()
        creds.write_text(credential_line("tenant", "alice", "alice-token"))  # mallory's token removed
        time.sleep(1.2)  # the limited address's view of the file is at most a second old
        with pytest.raises(errors.ResourceExhausted):
            insider.list_pool()
        alice.list_pool()
    finally:
        for c in (attacker, insider, alice, stranger):
            c.close()
        relay.close()
        server.stop(grace=0.5)


def test_a_host_credential_acting_as_another_host_is_limited_as_bad_tokens(tmp_path: Path) -> None:
    """--auth-fail-rate bounds every failed credential, not only unknown API tokens (round 32): a host's join token
    registering or heartbeating as another host id was refused (PERMISSION_DENIED) without bound, each refusal a
    full call, however fast it came. Past its address's bucket it gets RESOURCE_EXHAUSTED as a bad token does; the
    same credential acting as its own host still passes from there, and a tenant's call the host may not make
    counts too."""
    server, relay = _failure_limited(tmp_path, [("host", "h1", "h1-join"), ("tenant", "alice", "alice-token")])
    write_secret(tmp_path / "h1.token", b"h1-join")
    write_secret(tmp_path / "alice.token", b"alice-token")
    h1 = tls.TlsConfig(ca=get_pki().ca_file, api_token_file=str(tmp_path / "h1.token"))
    alice = tls.TlsConfig(ca=get_pki().ca_file, api_token_file=str(tmp_path / "alice.token"))
    try:
        codes = [register_host(relay.address, "h2", h1) for _ in range(4)]
        assert codes == [grpc.StatusCode.PERMISSION_DENIED] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2, codes
        assert register_host(relay.address, "h1", h1) is None  # its own host id: a good call is never counted
        assert register_host(server.address, "h2", h1) == grpc.StatusCode.PERMISSION_DENIED  # another address
        assert register_host(relay.address, "h9", alice) == grpc.StatusCode.RESOURCE_EXHAUSTED  # a tenant's, too
        client = SchedulerClient(relay.address, alice)
        try:
            client.list_pool()  # alice's good call from the limited address passes
        finally:
            client.close()
    finally:
        relay.close()
        server.stop(grace=0.5)
