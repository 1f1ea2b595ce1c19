"""The daemon <-> worker boundary: frames cut into command spans without parsing, and a worker's result parsed
defensively (a compromised worker must not make the daemon allocate, crash or mislabel metrics)."""

from __future__ import annotations

import struct

import pytest
from gpupool.server import slices
from grpc import StatusCode

from gpupool import protocol
from gpupool._proto import device_pb2
from gpupool.errors import InvalidArgument, ResourceExhausted


def frame(*cmds: device_pb2.Command) -> bytes:
    return device_pb2.ClientFrame(commands=list(cmds)).SerializeToString()


def test_split_frame_keeps_each_command_and_its_kind() -> None:
    cmds = [
        device_pb2.Command(op=device_pb2.Op(name="aten::add.Tensor", outputs=[5])),
        device_pb2.Command(),  # empty: asks for nothing
        device_pb2.Command(get=device_pb2.Get(request_id=1, handle=5)),
        device_pb2.Command(sync=device_pb2.Sync(request_id=2)),
        device_pb2.Command(upload=device_pb2.Upload(handle=7, data=b"x" * 300)),
    ]
    spans = slices.split_frame(frame(*cmds), 16)
    assert [k for k, _ in spans] == [protocol.OP, protocol.GET, protocol.SYNC, protocol.UPLOAD]
    again = device_pb2.ClientFrame.FromString(b"".join(s for _, s in spans))
    assert list(again.commands) == [cmds[0], *cmds[2:]]


def test_split_frame_refuses_floods_and_garbage() -> None:
    many = frame(*[device_pb2.Command(free=device_pb2.Free(handles=[1]))] * 10)
    with pytest.raises(ResourceExhausted, match="more than 9 commands"):
        slices.split_frame(many, 9)
    for bad in (b"\x12\x00", b"\x0a\xff", b"\x0a\x05ab"):
        with pytest.raises(InvalidArgument):
            slices.split_frame(bad, 9)


def test_results_round_trip_and_lies_are_refused() -> None:
    r = slices.SliceResult(
        3, 0.25, 100, 5, 7, 1, 2, {StatusCode.INVALID_ARGUMENT: 1}, {"replayed": 2}, [b"frame", [b"a", b"bb"]]
    )
    body = b"".join(slices.encode_result(r))[4:]
    r.replies = [b"frame", b"a", b"bb"]  # a download's frames come back one by one (each its own outbox item)
    assert slices.decode_result(body, 3) == r
    with pytest.raises(ValueError):
        slices.decode_result(body, 2)  # claims more commands than it was sent
    with pytest.raises((ValueError, struct.error)):
        slices.decode_result(body[:-3], 3)  # truncated
    odd = slices.SliceResult(1, 0.0, 0, 0, 0, 0, 0, {}, {"Bad Label{}": 1, "made_up": 1, "traced": 1}, [])
    # a worker names only the known events: anything else would grow the front's metric labels without bound
    assert slices.decode_result(b"".join(slices.encode_result(odd))[4:], 1).events == {"traced": 1}


def test_partial_results_and_pending_errors_round_trip_and_lies_are_refused() -> None:
    r = slices.SliceResult(2, 0.1, 0, 0, 0, 0, 12, {}, {}, [[b"piece"]], error_pending=True, partial=True)
    body = b"".join(slices.encode_result(r))[4:]
    r.replies = [b"piece"]
    assert slices.decode_result(body, 3) == r
    with pytest.raises(ValueError):
        slices.decode_result(body, 2)  # the partial command must be one it was sent
    empty = slices.SliceResult(0, 0.1, 0, 0, 0, 0, 0, {}, {}, [], partial=True)
    with pytest.raises(ValueError):
        slices.decode_result(b"".join(slices.encode_result(empty))[4:], 3)  # a piece with no bytes is no progress
