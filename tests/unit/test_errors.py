"""gpupool.errors: the one table of statuses and the translation at each RPC edge (errors.ErrorInterceptor on
real gRPC servers on loopback, errors.from_failure on the client)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from support import plaintext_channel

from gpupool import errors
from gpupool._proto import device_pb2, tensor_pb2


def test_status_names_on_the_wire_map_to_status_codes() -> None:
    assert errors.status_code("PERMISSION_DENIED") is grpc.StatusCode.PERMISSION_DENIED
    assert errors.status_code("NO_SUCH_CODE") is grpc.StatusCode.UNKNOWN
    assert errors.error_class(grpc.StatusCode.NOT_FOUND) is errors.NotFound
    odd = errors.from_status(grpc.StatusCode.DATA_LOSS, "lost")
    assert type(odd) is errors.GpupoolError and odd.code is grpc.StatusCode.DATA_LOSS


def test_error_messages_round_trip_with_memory_numbers() -> None:
    oom = errors.ResourceExhausted("quota", op="aten::empty.memory_format", used_bytes=0, limit_bytes=4096)
    pb = errors.to_proto(oom)
    assert pb.code == "RESOURCE_EXHAUSTED" and pb.HasField("used_bytes") and pb.limit_bytes == 4096
    back = errors.from_failure(tensor_pb2.Error.FromString(pb.SerializeToString()))
    assert isinstance(back, errors.ResourceExhausted)
    assert (back.op, back.message, back.used_bytes, back.limit_bytes) == (oom.op, "quota", 0, 4096)
    plain = errors.from_failure(errors.to_proto(errors.InvalidArgument("bad", op="aten::add.Tensor")))
    assert isinstance(plain, errors.InvalidArgument) and str(plain) == "aten::add.Tensor: bad"
    unsized = errors.from_failure(tensor_pb2.Error(code="RESOURCE_EXHAUSTED", message="full"))
    assert isinstance(unsized, errors.ResourceExhausted) and unsized.used_bytes is None


class _Raiser:
    """Handlers that fail every way a servicer can."""

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"denied":
            raise errors.PermissionDenied("not yours")
        if request == b"bug":
            raise KeyError("oops")
        if request == b"huge":
            raise errors.InvalidArgument("\U0001f600" * 100_000)
        if request == b"abort":
            context.abort(grpc.StatusCode.ABORTED, "aborted by hand")
        return b"ok:" + request

    def stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            if r == b"gone":
                raise errors.Unavailable("draining")
            if r == b"bug":
                raise ValueError("oops")
            yield b"ok:" + r


@pytest.fixture
def stub() -> Iterator[Any]:
    raiser = _Raiser()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[errors.ErrorInterceptor()])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(raiser.unary),
        "Stream": grpc.stream_stream_rpc_method_handler(raiser.stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Raiser", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = plaintext_channel(f"127.0.0.1:{port}")  # TLS is tls.py's business, not this edge's
    try:
        yield channel
    finally:
        channel.close()
        server.stop(None)


def _fails(call: Any) -> errors.GpupoolError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return errors.from_failure(info.value)


def test_interceptor_answers_each_failure_with_its_status(stub: Any) -> None:
    unary = stub.unary_unary("/test.Raiser/Unary")
    assert unary(b"x", timeout=10) == b"ok:x"
    denied = _fails(lambda: unary(b"denied", timeout=10))
    assert isinstance(denied, errors.PermissionDenied) and denied.message == "not yours"
    bug = _fails(lambda: unary(b"bug", timeout=10))
    assert isinstance(bug, errors.Internal) and "Unary: KeyError" in bug.message
    by_hand = _fails(lambda: unary(b"abort", timeout=10))  # context.abort passes through untouched
    assert by_hand.code is grpc.StatusCode.ABORTED and by_hand.message == "aborted by hand"


def test_interceptor_covers_streams(stub: Any) -> None:
    stream = stub.stream_stream("/test.Raiser/Stream")
    assert list(stream(iter([b"a", b"b"]), timeout=10)) == [b"ok:a", b"ok:b"]
    replies: list[bytes] = []
    gone = _fails(lambda: replies.extend(stream(iter([b"a", b"gone"]), timeout=10)))
    assert replies == [b"ok:a"] and isinstance(gone, errors.Unavailable) and gone.message == "draining"
    bug = _fails(lambda: list(stream(iter([b"bug"]), timeout=10)))
    assert isinstance(bug, errors.Internal) and "Stream: ValueError" in bug.message


def test_a_malformed_message_in_a_request_stream_ends_the_call() -> None:
    """ErrorInterceptor's request streams: the first message that does not parse ends the call INVALID_ARGUMENT
    (the daemon's one stream parses its own bytes; this guards a request-streaming method added later)."""
    seen: list[Any] = []

    def count(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        for request in requests:
            seen.append(request)
        return device_pb2.StatusReply()

    handler = grpc.method_handlers_generic_handler(
        "t.T",
        {
            "Count": grpc.stream_unary_rpc_method_handler(
                count, device_pb2.StatusRequest.FromString, device_pb2.StatusReply.SerializeToString
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[errors.ErrorInterceptor()])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with plaintext_channel(f"127.0.0.1:{port}") as ch:
            call = ch.stream_unary("/t.T/Count", request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as info:
                call(iter([b"", b"\xff", b""]), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "not a well-formed message" in info.value.details()
            assert len(seen) == 1  # the message before the bad one reached the handler, none after it
    finally:
        server.stop(0)


def test_bounded() -> None:
    assert errors.bounded("short") == "short"
    for char in ("x", "\u00e9", "\U0001f600"):
        cut = errors.bounded(char * 100_000)
        assert len(cut.encode()) <= errors.MAX_DETAILS + len("... (cut)") and cut.endswith("... (cut)")
        assert cut.startswith(char * 10)


def test_a_huge_message_reaches_the_client_cut(stub: Any) -> None:
    """A handler's error quoting 100,000 four-byte characters: its status, cut (`errors.bounded`), not the
    transport's RESOURCE_EXHAUSTED "Stream removed" of a trailer over gRPC's limit (until round 33 on the daemon)."""
    huge = _fails(lambda: stub.unary_unary("/test.Raiser/Unary")(b"huge", timeout=10))
    assert isinstance(huge, errors.InvalidArgument), (huge.code, huge.message[:200])
    assert huge.message.startswith("\U0001f600" * 10) and huge.message.endswith("... (cut)")
