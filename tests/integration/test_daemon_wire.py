"""Request bytes that do not parse, sent to every method the daemon serves (its Device service, grpc.health.v1 on
its port and on --health-listen): each is answered INVALID_ARGUMENT with a short message, no traceback in the
daemon's log, no session left behind, while a neighbour session keeps working. Until round 33 gRPC answered them
INTERNAL ("Exception deserializing request!") and logged a traceback for each (the scheduler had the same defect:
scheduler/auth.py, tests/integration/test_scheduler_fuzz.py). The Device service's messages carry their own
credential (a lease token, a session id), so there is nothing to check before the bytes parse.

Also: a status or an in-band error that quotes a huge client-supplied string (a token, a session id, an op name)
reaches the client whole and bounded (`errors.bounded`), not as the transport's "Stream removed"."""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.session import Session
from support import Healthy, plaintext_channel, tls_channel
from test_daemon_bulk import _raw_side

from gpupool import errors, protocol
from gpupool._proto import device_pb2

# Bytes no message of these methods parses: invalid wire types (7, and 7 in a tag of field 31), a length-delimited
# field cut short, a varint that never ends, a group end without its start.
GARBAGE = [b"\x0f", b"\xff", b"\x0a\x05ab", b"\x08" + b"\x80" * 11, b"\x0c"]
DEVICE = ["Attach", "Detach", "Status", "RefreshToken"]
HEALTH_UNARY = ["/grpc.health.v1.Health/Check"]
HEALTH_STREAM = ["/grpc.health.v1.Health/Watch"]


@pytest.fixture
def wire_daemon(daemon_factory: Any) -> Iterator[Any]:
    d = daemon_factory(health_listen="127.0.0.1:0")
    healthy = Healthy(d.address, d.token(tenant="neighbour"))
    yield d
    assert [s.tenant for s in d.running.daemon.session_list()] == ["neighbour"]  # no call left a session behind
    healthy.check()


def _raw_unary(channel: grpc.Channel, method: str, data: bytes) -> grpc.RpcError:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        call(data, timeout=30)
    return info.value


def _raw_stream(channel: grpc.Channel, method: str, data: bytes) -> grpc.RpcError:
    call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        for _ in call(data, timeout=30):
            pass
    return info.value


def _assert_refused(err: grpc.RpcError, what: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.code(), err.details())
    assert "not a well-formed message" in err.details() and len(err.details()) < 200, (what, err.details())


def test_unparsable_requests_to_every_method(wire_daemon: Any, caplog: pytest.LogCaptureFixture) -> None:
    health_port = wire_daemon.running.health_server[1]
    caplog.set_level(logging.ERROR)
    with tls_channel(wire_daemon.address) as ch, plaintext_channel(f"127.0.0.1:{health_port}") as probe:
        for data in GARBAGE * 4:  # 120 on one connection: gRPC kept a stream open for each (scheduler, round 32)
            for name in DEVICE:
                _assert_refused(_raw_unary(ch, f"/gpupool.v1.Device/{name}", data), f"{name} {data!r}")
            for channel in (ch, probe):
                for method in HEALTH_UNARY:
                    _assert_refused(_raw_unary(channel, method, data), f"{method} {data!r}")
                for method in HEALTH_STREAM:
                    _assert_refused(_raw_stream(channel, method, data), f"{method} {data!r}")
        # the same channels still serve well-formed calls
        status = ch.unary_unary(
            "/gpupool.v1.Device/Status",
            request_serializer=device_pb2.StatusRequest.SerializeToString,
            response_deserializer=device_pb2.StatusReply.FromString,
        )(device_pb2.StatusRequest(), timeout=30)
        assert status.host_id == wire_daemon.host_id
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks[:3]


HUGE = 100_000


@pytest.mark.parametrize("char", ["x", "\u00e9", "\U0001f600"])
def test_huge_client_strings_get_their_status(daemon: Any, char: str) -> None:
    """A token, a session id or an op name of 100,000 characters (ASCII, 2- and 4-byte UTF-8) gets its own status
    with a bounded message, on every path that could quote it."""
    huge = char * HUGE
    with tls_channel(daemon.address) as ch:
        for name, request, want in [
            ("Attach", device_pb2.AttachRequest(token=huge), grpc.StatusCode.UNAUTHENTICATED),
            ("Detach", device_pb2.DetachRequest(session_id=huge), grpc.StatusCode.NOT_FOUND),
            ("RefreshToken", device_pb2.RefreshTokenRequest(session_id=huge, token=huge), grpc.StatusCode.NOT_FOUND),
        ]:
            err = _raw_unary(ch, f"/gpupool.v1.Device/{name}", request.SerializeToString())
            assert err.code() == want, (name, err.code(), err.details()[:200])
            assert len(err.details().encode()) <= errors.MAX_DETAILS + 20, name
    with Session.attach(daemon.address, daemon.token(tenant="huge")) as s:
        s.call(f"aten::{huge}.default", 1)
        with pytest.raises(errors.InvalidArgument) as info:
            s.sync()
        assert len(info.value.message.encode()) <= errors.MAX_DETAILS + 20
        assert len(info.value.op.encode()) <= errors.MAX_DETAILS + 20


@pytest.mark.parametrize("magic", [protocol.BULK_HELLO, protocol.BULK_HELLO_FRAMES])
def test_a_malformed_side_port_hello_is_answered(daemon_factory: Any, magic: bytes) -> None:
    """The side port's hello (gpupool/protocol.py BULK_HELLO) announcing a session id longer than any gets the
    protocol's error answer, as an unknown session does (until round 33 the socket closed without a word), and a
    real client still binds. (Bytes that are no gpupool hello at all are closed without a word:
    test_daemon_bulk.py; records after the hello: records_fuzz.py mutates their headers.)"""
    d = daemon_factory(bulk_listen="127.0.0.1:0")
    with _raw_side(d.address, int(d.running.bulk.port), insecure=False) as sock:
        sock.sendall(magic + struct.pack("<H", 65535))
        assert sock.recv(1) == b"\x01"
        (n,) = struct.unpack("<H", protocol.recv_exact(sock, 2, "closed"))
        assert protocol.recv_exact(sock, n, "closed") == b"session id of 65535 bytes: at most 128"
        assert sock.recv(10) == b""
    with Session.attach(d.address, d.token()) as s:
        assert s._side is not None
        big = torch.randn(1 << 20)
        assert torch.equal(s.download(s.upload(big)), big)


def test_watch_calls_on_the_plaintext_health_port_cannot_starve_the_probes(wire_daemon: Any) -> None:
    """The --health-listen server (plaintext, unauthenticated: whoever reaches the port) has two threads, and a
    grpc.health.v1 Watch holds one for as long as its caller keeps it open: until round 33 two Watch calls made
    every probe's Check wait past its deadline (the kubelet would restart a healthy daemon). There Watch is
    answered UNIMPLEMENTED; Check answers at once."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = f"127.0.0.1:{wire_daemon.running.health_server[1]}"
    held = []
    with plaintext_channel(address) as one, plaintext_channel(address) as two, plaintext_channel(address) as probe:
        try:
            for channel in (one, two):
                call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
                held.append(call)
                try:
                    next(call)  # the old server: the first status, then the call keeps its thread
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err
            reply = health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            for call in held:
                call.cancel()
