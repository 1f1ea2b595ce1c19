"""Round 45 (secrev45): a red team's review of control45's certificate revocation and revocations file, against real
schedulers and daemons on loopback.

1. A certificate is revoked by the SHA-256 of its DER; an ECDSA signature (r, s) verifies as (r, n - s) too, so the
   holder of a revoked certificate and its key made a twin (same name, key, dates and CA signature, other bytes)
   that the scheduler and the daemons served as if nothing had been revoked.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gpupool.client.pool import SchedulerClient
from gpupool.server.revocations import Heard, RevocationFile
from scheduler_fixtures import wait_until
from support import REGISTER_WAIT_S, DaemonFactory, get_pki
from test_control45 import HOST, _alice_leases, _attach, _code, _daemon, _revoke, _status, side_hello
from test_security import Pool, start_pool

from gpupool import certrevoke, tls
from gpupool._proto import device_pb2, device_pb2_grpc, scheduler_pb2

pytestmark = pytest.mark.slow


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = start_pool(tmp_path, state=str(tmp_path / "state.db"))
    yield p
    p.scheduler.stop(grace=0.5)


def _twin_config(tmp: Path, role: str, name: str) -> tls.TlsConfig:
    """`role`/`name`'s certificate re-signed by nobody: its CA signature's twin (r, n - s), with the same key."""
    files = get_pki().issue(role, name)
    der = certrevoke.der_of_pem(files.cert.read_bytes())
    twins = certrevoke.twins_der(der)
    assert twins and twins[0] != der
    path = tmp / f"{name}-twin.crt"
    path.write_text(ssl.DER_cert_to_PEM_cert(twins[0]))  # (P-256: the test CA's curve is the first order)
    return tls.TlsConfig(cert=str(path), key=str(files.key), ca=get_pki().ca_file)


def test_the_twin_of_a_revoked_ecdsa_certificate_is_refused_too(
    pool: Pool, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """Mallory's certificate revoked (by its file), Mallory presents its ECDSA twin: the TLS layers accept it (the
    CA's signature verifies), and the scheduler (Allocate), the daemon (Status) and its side port's hello refuse it as
    the revoked certificate. On control45's merge (5c6c360a) the twin allocated and the daemon served it."""
    host = _daemon(daemon_factory, pool, bulk_listen="127.0.0.1:0")
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S)
    twin = _twin_config(tmp_path, "tenant", "mallory45")
    before = SchedulerClient(pool.address, twin)
    try:  # the twin is a certificate of the CA: served while nothing is revoked
        lease = before.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=600))
    finally:
        before.close()
    with tls.channel(host.address, cfg=twin, token=False) as ch:
        attached = device_pb2_grpc.DeviceStub(ch).Attach(
            device_pb2.AttachRequest(token=lease.devices[0].token), timeout=30
        )
    _revoke(pool, str(get_pki().issue("tenant", "mallory45").cert))

    after = SchedulerClient(pool.address, twin)
    try:
        code, words = _code(lambda: after.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25)))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "is revoked" in words, (code, words)
    finally:
        after.close()

    def refused() -> bool:
        with tls.channel(host.address, cfg=twin, token=False) as ch:
            code, words = _code(lambda: device_pb2_grpc.DeviceStub(ch).Status(device_pb2.StatusRequest(), timeout=10))
        return code == grpc.StatusCode.UNAUTHENTICATED and "is revoked" in words

    original = lambda: _code(lambda: _status(host.address, "tenant", "mallory45"))[0]  # noqa: E731
    wait_until(lambda: original() != grpc.StatusCode.OK, timeout=15, what="the daemon hearing the revocation")
    assert refused(), "the daemon serves the revoked certificate's twin"
    assert side_hello(twin, host.running.bulk.port, attached.session_id) == b""
    assert _status(host.address, "tenant", "alice45").host_id == HOST


# ---- 2. the revocations file's age ----


def _file_and_token(pool: Pool, factory: DaemonFactory, state: Path, heard_at: float) -> str:
    """A lease token of HOST (its daemon and the scheduler then stopped), and a valid revocations file in `state` (the
    daemon's key) saying the scheduler last answered at `heard_at`."""
    first = _daemon(factory, pool, state_dir=str(state))
    assert first.running.registrar.registered.wait(REGISTER_WAIT_S)
    (lease,) = _alice_leases(pool, 1)
    first.running.stop(grace=0.5, drain=False)
    pool.scheduler.stop(grace=0)
    RevocationFile(state, HOST).save(Heard(HOST, heard_at, certs_version=""), ())
    return lease.devices[0].token


def test_revocations_max_age_zero_never_serves_on_the_file(
    pool: Pool, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """`--revocations-max-age 0` is "never" (serve's --help): a file written 30 s "ahead" of the clock (the clock
    stepped back since) is not served on, the scheduler down: Attach is UNAVAILABLE. On 5c6c360a `-60 <= age <= 0`
    held and the daemon attached on it."""
    state = tmp_path / "daemon-state"
    token = _file_and_token(pool, daemon_factory, state, time.time() + 30)
    host = _daemon(daemon_factory, pool, state_dir=str(state), revocations_max_age=0.0)
    code, words = _attach(host.address, token)
    assert code == grpc.StatusCode.UNAVAILABLE and "has not heard from its scheduler" in words, (code, words)


def test_the_files_age_is_checked_when_the_scheduler_is_found_unreachable(
    pool: Pool, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """The file 1 s old at the daemon's start (`--revocations-max-age 3`), its scheduler an address that accepts TCP
    and never answers (Register's deadline, 5 s, says unreachable): by then the file is older than 3 s and Attach is
    not served on it. On 5c6c360a the age was checked at the start only and the daemon attached."""
    state = tmp_path / "daemon-state"
    token = _file_and_token(pool, daemon_factory, state, time.time() - 1)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # (TCP accepted by the kernel, TLS never answered)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        host = _daemon(daemon_factory, pool, state_dir=str(state), revocations_max_age=3.0, scheduler=address)
        time.sleep(6)  # the registrar's first Register timed out: scheduler_unreachable
        code, words = _attach(host.address, token)
    assert code == grpc.StatusCode.UNAVAILABLE and "has not heard from its scheduler" in words, (code, words)


# ---- 3. sessions attached before the revocation ----


def test_a_revocation_ends_the_sessions_the_certificate_attached(pool: Pool, daemon_factory: DaemonFactory) -> None:
    """Mallory and Alice each attach a session (their own certificates); Mallory's certificate is revoked: her session
    ends (UNAUTHENTICATED, naming the revocation, its stream and side socket with it) within a few heartbeats,
    Alice's runs on. On 5c6c360a the session, attached before, ran on until its lease ended (a day at most)."""
    host = _daemon(daemon_factory, pool)
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S)
    daemon = host.running.daemon
    attached = {}
    for name in ("mallory46", "alice46"):
        client = pool.client("tenant", name)
        try:
            lease = client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=600))
        finally:
            client.close()
        with tls.channel(host.address, cfg=get_pki().client_config("tenant", name), token=False) as ch:
            reply = device_pb2_grpc.DeviceStub(ch).Attach(device_pb2.AttachRequest(token=lease.devices[0].token))
        attached[name] = reply.session_id
    assert {s.session_id for s in daemon.session_list()} == set(attached.values())
    _revoke(pool, str(get_pki().issue("tenant", "mallory46").cert))

    wait_until(
        lambda: attached["mallory46"] not in {s.session_id for s in daemon.session_list()},
        timeout=15,
        what="the revoked certificate's session ended",
    )
    assert {s.session_id for s in daemon.session_list()} == {attached["alice46"]}


# ---- 4. --max-revoked shared between tenants ----


def test_one_tenant_cannot_fill_max_revoked_for_everyone(tmp_path: Path) -> None:
    """`--max-revoked 20`: Mallory allocates and releases hour-long leases until refused: at 18 (nine tenths of the
    bound, all hers: her share) RESOURCE_EXHAUSTED naming the bound and her share; Alice, who holds none, still
    allocates (the last tenth is kept for tenants below their share). On 5c6c360a Mallory filled all 20 and every
    other tenant's Allocate was refused until her leases' tokens expired."""
    pool = start_pool(tmp_path, max_revoked=20)
    from gpupool.scheduler.hosts import DeviceSpec

    try:
        pool.scheduler.core.hosts.register("h", "127.0.0.1:7", [DeviceSpec(0, "GPU-h", "fake", 1 << 30, True)])  # type: ignore[union-attr]
        request = scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=3600)
        mallory = pool.client("tenant", "mallory47")
        try:
            held, code, words = 0, grpc.StatusCode.OK, ""
            while held < 25:
                code, words = _code(lambda: mallory.release(mallory.allocate(request).lease_id))
                if code != grpc.StatusCode.OK:
                    break
                held += 1
        finally:
            mallory.close()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-revoked" in words, (code, words)
        assert held == 18 and "share (18)" in words, (held, words)
        alice = pool.client("tenant", "alice47")
        try:
            alice.release(alice.allocate(request).lease_id)
        finally:
            alice.close()
    finally:
        pool.scheduler.stop(grace=0)


def test_the_file_never_says_heard_at_a_time_without_what_was_heard_then(
    pool: Pool, daemon_factory: DaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heartbeat reply lands while the daemon's writer reads its revocations (forced: the read made to let one
    land right after it, revoking a lease and noting the answer's time): the file written holds the lease or an
    earlier `heard_at`, never the new time without the lease (a restart within --revocations-max-age would attach
    that lease's token). On 5c6c360a `heard_at` was read after the revocations."""
    host = _daemon(daemon_factory, pool, state_dir=str(pool.tmp / "daemon-state"))
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S)
    daemon = host.running.daemon
    verifier = daemon._verifier
    read = verifier.revocations
    landed = time.time() + 100

    def read_then_heartbeat(now: float | None = None) -> tuple[dict[str, float], float]:
        held = read(now)
        verifier.revoke(["lease-revoked-meanwhile"])
        daemon._heard_at = landed
        return held

    monkeypatch.setattr(verifier, "revocations", read_then_heartbeat)
    revfile = daemon._revfile
    daemon._write_revocations(revfile)
    heard = revfile.load()
    assert heard is not None
    assert "lease-revoked-meanwhile" in heard.leases or heard.heard_at < landed, heard.heard_at
