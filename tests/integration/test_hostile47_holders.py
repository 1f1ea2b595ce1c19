"""Round 47 red team (hostile47): sec46's `Daemon.check_holder` where the lease token is NOT bound to a certificate
(a hand-minted token, an API token's lease, a token from before round 46: no `cert` claim). The session's id must
still serve only the certificate that attached it, on every path that takes one (RefreshToken, Detach, Stream, the
side port's hello), under `--tls-client-auth require`: the binding of the id is the session's, not the token's."""

from __future__ import annotations

from typing import Any

import grpc
from support import DaemonFactory, get_pki
from test_control45 import _code, side_hello

from gpupool import protocol, tls
from gpupool._proto import device_pb2, device_pb2_grpc


def _stub(address: str, name: str) -> tuple[grpc.Channel, Any]:
    ch = tls.channel(address, cfg=get_pki().client_config("tenant", name), token=False)
    return ch, device_pb2_grpc.DeviceStub(ch)


def test_an_unbound_tokens_session_serves_only_the_certificate_that_attached_it(daemon_factory: DaemonFactory) -> None:
    """Mallory attaches with a token that has no `cert` claim; Alice's certificate naming the session's id is refused
    at RefreshToken, Detach, Stream and the side port's hello (PERMISSION_DENIED / no BULK_OK), the session untouched:
    Mallory refreshes it, binds her side socket and detaches it. Pins behaviour that holds on 41939607."""
    pki = get_pki()
    server = pki.server_config()
    daemon = daemon_factory(
        isolation="thread",
        bulk_listen="127.0.0.1:0",
        tls=tls.TlsConfig(cert=server.cert, key=server.key, ca=pki.ca_file, client_auth="require"),
    )
    token = daemon.token(tenant="mallory47")
    ch, mallory = _stub(daemon.address, "mallory47")
    other, alice = _stub(daemon.address, "alice47")
    with ch, other:
        sid = mallory.Attach(device_pb2.AttachRequest(token=token), timeout=30).session_id
        calls = {
            "RefreshToken": lambda: alice.RefreshToken(
                device_pb2.RefreshTokenRequest(session_id=sid, token=token), timeout=10
            ),
            "Detach": lambda: alice.Detach(device_pb2.DetachRequest(session_id=sid), timeout=10),
            "Stream": lambda: next(
                iter(alice.Stream(iter(()), timeout=10, metadata=((protocol.SESSION_METADATA, sid),)))
            ),
        }
        for what, call in calls.items():
            code, words = _code(call)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "another client certificate" in words, (what, code)
        port = daemon.running.bulk.port
        assert side_hello(pki.client_config("tenant", "alice47"), port, sid) != protocol.BULK_OK[:1]
        assert daemon.running.daemon.session(sid).session_id == sid  # still open
        mallory.RefreshToken(device_pb2.RefreshTokenRequest(session_id=sid, token=token), timeout=10)
        assert side_hello(pki.client_config("tenant", "mallory47"), port, sid) == protocol.BULK_OK[:1]
        mallory.Detach(device_pb2.DetachRequest(session_id=sid), timeout=10)
