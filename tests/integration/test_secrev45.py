"""Round 45 (secrev45): a red team's review of control45's certificate revocation and revocations file, against real
schedulers and daemons on loopback.

1. A certificate is revoked by the SHA-256 of its DER; an ECDSA signature (r, s) verifies as (r, n - s) too, so the
   holder of a revoked certificate and its key made a twin (same name, key, dates and CA signature, other bytes)
   that the scheduler and the daemons served as if nothing had been revoked.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gpupool.client.pool import SchedulerClient
from scheduler_fixtures import wait_until
from support import DaemonFactory, get_pki
from test_control45 import HOST, _code, _daemon, _revoke, _status
from test_security import Pool, start_pool

from gpupool import certrevoke, protocol, tls
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
    assert host.running.registrar.registered.wait(20)
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
    ctx = tls.socket_client_context(twin)
    assert ctx is not None
    raw = socket.create_connection(("127.0.0.1", host.running.bulk.port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as side:
        try:
            side.sendall(protocol.bulk_hello(attached.session_id))
            answer = side.recv(1)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            answer = b""
    assert answer == b"", answer
    assert _status(host.address, "tenant", "alice45").host_id == HOST
