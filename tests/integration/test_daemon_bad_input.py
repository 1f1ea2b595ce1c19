"""Every kind of bad input gets its own status code, and a healthy session on the same device keeps working
throughout (checked by a background thread that verifies results the whole time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from gpupool.client.session import Handle, Session
from gpupool.server import bulk
from support import Healthy, daemon_status, tls_channel

from gpupool import errors, protocol
from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2
from gpupool.tokens import public_session_id

MiB = 1024**2


@pytest.fixture
def session(daemon: Any, healthy: Healthy) -> Iterator[Session]:
    with Session.attach(daemon.address, daemon.token(tenant="bad")) as s:
        yield s


def assert_still_usable(s: Session) -> None:
    [h] = s.call("aten::add.Tensor", Handle(s.upload(torch.ones(3))), 1)
    assert torch.equal(s.download(h), torch.full((3,), 2.0))


def test_unknown_op(session: Session) -> None:
    session.call("aten::definitely_not_an_op.default", 1)
    with pytest.raises(errors.InvalidArgument, match="unknown op") as info:
        session.sync()
    assert info.value.op == "aten::definitely_not_an_op.default"
    assert_still_usable(session)


@pytest.mark.parametrize(
    "name",
    [
        "aten::from_file.default",
        "aten::save.default",
        "prim::device",
        "os::system",
        "aten::__class__",
        "aten::_share_memory_.default",
    ],
)
def test_denied_op(session: Session, name: str) -> None:
    session.call(name, "/etc/passwd")
    with pytest.raises((errors.PermissionDenied, errors.InvalidArgument)) as info:
        session.sync()
    assert info.value.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
    if name == "aten::from_file.default":
        assert isinstance(info.value, errors.PermissionDenied)
    assert_still_usable(session)


def test_wrong_argument_types(session: Session) -> None:
    h = Handle(session.upload(torch.ones(3)))
    [bad] = session.call("aten::add.Tensor", h, "not a tensor")
    [worse] = session.call("aten::mm.default", h, h)  # shape error
    [poisoned] = session.call("aten::mul.Tensor", bad, 2)  # uses the failed op's output
    with pytest.raises(errors.InvalidArgument) as info:
        session.sync()
    assert info.value.op == "aten::add.Tensor"  # the first error since the last sync
    with pytest.raises(errors.InvalidArgument) as info:
        session.download(poisoned)
    assert info.value.op == "aten::add.Tensor"  # a poisoned handle names the op that poisoned it
    with pytest.raises(errors.InvalidArgument, match="mm"):
        session.download(worse)
    assert_still_usable(session)


def test_failed_in_place_op_is_the_answer_of_the_next_get(session: Session) -> None:
    # An in-place op has no output handle to poison: its tensor keeps its old value, so a Get must report the
    # pending error (a read-back is a sync point), never that value as if the op had run.
    x = Handle(session.upload(torch.zeros(4)))
    session.call("aten::scatter_.value", x, 0, torch.tensor([7]), 1.0, outputs=[0])  # index 7 of 4: refused
    with pytest.raises(errors.InvalidArgument, match="out of bounds") as info:
        session.download(x)
    assert info.value.op == "aten::scatter_.value"
    session.sync()  # reported once, by the Get
    assert torch.equal(session.download(x), torch.zeros(4))
    assert_still_usable(session)


def test_handle_of_another_session(daemon: Any, session: Session) -> None:
    with Session.attach(daemon.address, daemon.token()) as other:
        theirs = Handle(other.upload(torch.arange(4.0)))
        other.sync()
        session.call("aten::neg.default", theirs)
        with pytest.raises(errors.PermissionDenied, match="another session"):
            session.sync()
        with pytest.raises(errors.PermissionDenied):
            session.download(theirs)
        session.free([theirs])
        with pytest.raises(errors.PermissionDenied):
            session.sync()
        assert torch.equal(other.download(theirs), torch.arange(4.0))  # untouched
    assert_still_usable(session)


def test_handle_never_created(session: Session) -> None:
    never = Handle(session.handle_base + 999_999)
    session.call("aten::neg.default", never)
    with pytest.raises(errors.NotFound, match="never created"):
        session.sync()
    with pytest.raises(errors.NotFound):
        session.download(never)
    assert_still_usable(session)


def test_forged_token(daemon: Any, healthy: Healthy) -> None:
    token = daemon.token()
    kid, body, sig = token.split(".")
    forged = f"{kid}.{body}." + ("A" if sig[0] != "A" else "B") + sig[1:]
    for bad in (forged, "", "garbage", "a.b.c", daemon.token() + "x" * 5000):
        with pytest.raises(errors.Unauthenticated):
            Session.attach(daemon.address, bad)
    other_key = b"0" * 64
    from support import mint_token

    with pytest.raises(errors.Unauthenticated, match="unknown key"):  # signed by a key the daemon does not hold
        Session.attach(daemon.address, mint_token(other_key, host=daemon.host_id))


def test_expired_token(daemon: Any, healthy: Healthy) -> None:
    with pytest.raises(errors.Unauthenticated, match="expired"):
        Session.attach(daemon.address, daemon.token(ttl=-1))


def test_token_for_another_host_or_device(daemon: Any, healthy: Healthy) -> None:
    with pytest.raises(errors.PermissionDenied, match="host"):
        Session.attach(daemon.address, daemon.token(host="someone-else"))
    with pytest.raises(errors.NotFound, match="device 3"):
        Session.attach(daemon.address, daemon.token(device=3))


def _raw_stream(daemon: Any, frames: list[bytes]) -> grpc.RpcError:
    """Attach, then send raw bytes on the session's stream; returns the error that ends it."""
    channel = tls_channel(daemon.address, options=[("grpc.max_send_message_length", 64 * MiB)])
    try:
        stub = device_pb2_grpc.DeviceStub(channel)
        reply = stub.Attach(device_pb2.AttachRequest(token=daemon.token()))
        stream = channel.stream_stream(
            "/gpupool.v1.Device/Stream",
            request_serializer=None,
            response_deserializer=device_pb2.ServerFrame.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            for _ in stream(iter(frames), metadata=(("gpupool-session", reply.session_id),), timeout=20):
                pass
        # The session is gone with its stream: its memory is free again.
        assert public_session_id(reply.session_id) not in {  # (Status naming it: it would show it)
            s.session_id for s in daemon_status(stub, reply.session_id).sessions
        }
        return info.value
    finally:
        channel.close()


def test_malformed_frame(daemon: Any, healthy: Healthy) -> None:
    err = _raw_stream(daemon, [b"\xff\xff\xff\xff\x0f garbage"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in (err.details() or "")


def test_a_command_without_a_field_tag_in_a_frame_of_big_uploads(daemon: Any, healthy: Healthy) -> None:
    """A frame of big canonical uploads is not parsed by protobuf at the reader (server/bulk.py): split_frame's
    reading decides. A command whose first tag is field 0 (invalid protobuf) was dropped unread and the rest of
    the frame ran; the frame is malformed, as protobuf would say."""
    meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[MiB // 4])
    up = device_pb2.Upload(handle=1, meta=meta, data=b"\0" * MiB, last=True)
    uploads = device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()
    garbage = b"\x0a\x05\x04\x32\x02\x08\x03"  # a command of 5 bytes whose first tag is field 0, wire type 4
    err = _raw_stream(daemon, [uploads + garbage + uploads])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no valid field tag" in (err.details() or "")


@pytest.mark.parametrize("kib", [64, 512])
def test_a_bad_command_beside_a_batch_is_refused(daemon: Any, healthy: Healthy, kib: int) -> None:
    """A batch's upload among other commands is checked by its own reading and the rest by protobuf
    (bulk.strip_uploads): a command protobuf refuses beside it is refused as in a frame of small commands."""
    meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[kib * 256])
    up = device_pb2.Upload(handle=1, meta=meta, data=b"\0" * (kib * 1024), last=True)
    batch = device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()
    garbage = b"\x0a\x05\x04\x32\x02\x08\x03"  # a command of 5 bytes whose first tag is field 0, wire type 4
    err = _raw_stream(daemon, [batch + garbage])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in (err.details() or "")


def test_truncated_frame(daemon: Any, healthy: Healthy) -> None:
    op = device_pb2.Op(name="aten::add.Tensor", args=[tensor_pb2.Arg(i=1)] * 20, outputs=[5])
    whole = device_pb2.ClientFrame(commands=[device_pb2.Command(op=op)]).SerializeToString()
    err = _raw_stream(daemon, [whole[: len(whole) // 2 + 1]])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_message_over_the_size_limit(daemon: Any, healthy: Healthy) -> None:
    up = device_pb2.Upload(handle=1, offset=0, data=b"\0" * (20 * MiB), last=True)
    err = _raw_stream(daemon, [device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_missing_or_unknown_session_metadata(daemon: Any, healthy: Healthy) -> None:
    channel = tls_channel(daemon.address)
    stream = channel.stream_stream(
        "/gpupool.v1.Device/Stream", request_serializer=None, response_deserializer=device_pb2.ServerFrame.FromString
    )
    for metadata, code in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ((("gpupool-session", "nope"),), grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([b""]), metadata=metadata, timeout=10))
        assert info.value.code() == code
    channel.close()


def test_bad_upload_chunks(session: Session) -> None:
    base = session.handle_base
    bad = [
        device_pb2.Upload(handle=base + 1, offset=4, data=b"abcd", last=True),  # no first chunk
        device_pb2.Upload(
            handle=base + 2,
            meta=tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2]),
            data=b"12345678123",
            last=True,
        ),  # too many bytes
        device_pb2.Upload(handle=base + 3, meta=tensor_pb2.TensorMeta(dtype=99, shape=[2]), data=b"", last=True),
        device_pb2.Upload(
            handle=base + 4, meta=tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-2]), last=True
        ),
    ]
    for up in bad:
        session._add(device_pb2.Command(upload=up))
        with pytest.raises(errors.InvalidArgument):
            session.sync()
    assert_still_usable(session)


def _long_tag_upload(span_bytes: int) -> bytes:
    """A frame of one Upload command of exactly `span_bytes` bytes whose `data` field's tag is written in six bytes
    (0xa2 0x80 0x80 0x80 0x80 0x00: field 4, wire type 2, padded): protobuf reads tags of at most five bytes, so
    it refuses the frame as corrupt."""
    tag = b"\xa2\x80\x80\x80\x80\x00"
    n = span_bytes
    while True:
        meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_UINT8, shape=[n])
        up = device_pb2.Upload(handle=1, meta=meta, last=True).SerializeToString() + tag
        up += protocol.varint(n) + b"\x07" * n
        cmd = bytes([protocol.UPLOAD << 3 | 2]) + protocol.varint(len(up)) + up
        raw = b"\x0a" + protocol.varint(len(cmd)) + cmd
        if len(raw) == span_bytes:
            return raw
        n -= len(raw) - span_bytes


@pytest.mark.parametrize("over", [0, 3, 4, 64 * 1024, 1024 * 1024])  # the last: a frame of big uploads only
def test_an_upload_protobuf_refuses_beside_a_batch_is_refused_by_the_reader(
    daemon: Any, healthy: Healthy, over: int
) -> None:
    """The stream reader checks a frame holding a batch-sized Upload without protobuf reading the Upload's bytes
    (bulk.strip_uploads): its own reading must refuse what protobuf refuses. A `data` tag of six bytes was read as
    `data`: the frame ran although protobuf calls it corrupt, and where the span was under 4 bytes past
    STRIP_MIN (the worker's reading, `strip_payload`, counts the command's length without its tag and length, so
    it left that span to protobuf) the worker's protobuf refused it and the session's worker died instead."""
    raw = _long_tag_upload(bulk.STRIP_MIN + over)
    with pytest.raises(DecodeError):
        device_pb2.ClientFrame.FromString(raw)
    err = _raw_stream(daemon, [raw])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in (err.details() or "")
