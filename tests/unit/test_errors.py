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
from gpupool._proto import tensor_pb2


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
