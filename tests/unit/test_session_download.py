"""The client does not take a daemon's word for a download (round 29): the reply's shape and dtype must be what the
client asked for (or, where it cannot know them, at most the session's quota) before any memory is allocated, and
every byte of the returned tensor must be one the daemon sent, each chunk following the one before it: a daemon
that skips or repeats a range would otherwise leave this process's uninitialized memory (or an earlier download's
bytes, gpupool/hostpool.py) in the tensor."""

from __future__ import annotations

import socket
import sys

import pytest
import torch
from gpupool.client import bulk
from gpupool.client.session import Session, _read_frame, _Waiter, _Want

from gpupool import protocol, wire
from gpupool._proto import device_pb2, tensor_pb2
from gpupool.errors import InvalidArgument

F32 = wire.dtype_to_proto(torch.float32)


def meta(shape: list[int], dtype: int = F32) -> tensor_pb2.TensorMeta:
    return tensor_pb2.TensorMeta(dtype=dtype, shape=shape)


def chunk(offset: int, data: bytes, last: bool, m: tensor_pb2.TensorMeta | None = None) -> device_pb2.TensorChunk:
    c = device_pb2.TensorChunk(offset=offset, data=data, last=last)
    if m is not None:
        c.meta.CopyFrom(m)
    return c


def want(shape: tuple[int, ...] | None = (4,), limit: int = sys.maxsize) -> _Want:
    return _Want(shape, None if shape is None else torch.float32, limit)


VALUES = torch.arange(4, dtype=torch.float32)
RAW = bytes(wire.host_bytes(VALUES))


def test_an_honest_download_in_chunks_and_by_hand_parsed_frames() -> None:
    w = _Waiter(want())
    w.chunk(chunk(0, RAW[:8], False, meta([4])))
    w.chunk(chunk(8, RAW[8:], True))
    assert w.done and w.error is None and w.tensor is not None and torch.equal(w.tensor, VALUES)
    w = _Waiter(want(None))  # a shape the client cannot know (nonzero's): the daemon's, within the limit
    frame = device_pb2.ServerFrame(request_id=3, chunk=chunk(0, RAW, True, meta([4])))
    parsed = _read_frame(frame.SerializeToString())
    assert type(parsed).__name__ == "_Chunk"  # the hand-read path
    w.chunk(parsed)
    assert w.error is None and w.tensor is not None and torch.equal(w.tensor, VALUES)
    w = _Waiter(want((0, 3)))
    w.chunk(chunk(0, b"", True, meta([0, 3])))
    assert w.error is None and w.tensor is not None and w.tensor.shape == (0, 3)


@pytest.mark.parametrize(
    "m,asked,why",
    [(meta([1 << 40]), want(), r"\(1099511627776,\) torch.float32 for a download of \(4,\)"),
     (meta([4], wire.dtype_to_proto(torch.float64)), want(), "float64 for a download of"),
     (meta([2, 2]), want(), r"\(2, 2\) torch.float32 for a download of \(4,\)"),
     (meta([1 << 40]), want(None, 1 << 20), "past 1048576"),
     (meta([-4]), want(None), "negative size"),
     (meta([4], 999), want(), "unknown dtype 999")],
)  # fmt: skip
def test_a_reply_that_is_not_what_was_asked_allocates_nothing(m: tensor_pb2.TensorMeta, asked: _Want, why: str) -> None:
    w = _Waiter(asked)
    w.chunk(chunk(0, b"", True, m))  # (torch.empty of 2**40 floats would have been asked of the allocator)
    assert w.done and w.tensor is None
    assert isinstance(w.error, InvalidArgument) and w.error.args and __import__("re").search(why, str(w.error))


def test_a_download_reply_to_a_sync_allocates_nothing() -> None:
    w = _Waiter()  # a Sync's waiter, or a reply nobody waits for
    w.chunk(chunk(0, RAW, True, meta([4])))
    assert w.tensor is None and isinstance(w.error, InvalidArgument) and "no download" in str(w.error)


@pytest.mark.parametrize(
    "chunks,why",
    [([(0, RAW[:8], True)], "after 8: bytes left unwritten"),  # ends early: bytes 8..16 never written
     ([(0, RAW[:8], False), (12, RAW[12:], True)], "bytes 12..16 .* 8 written so far"),  # a gap
     ([(0, RAW[:8], False), (4, RAW[4:], True)], "bytes 4..16 .* 8 written so far"),  # an overlap
     ([(0, RAW[:8], False), (8, RAW[8:] + b"xxxx", True)], "bytes 8..20 of a 16 byte tensor"),  # past the end
     ([(0, RAW[8:], False), (0, RAW, True)], "bytes 0..16 .* 8 written so far")],  # rewritten
)  # fmt: skip
def test_every_byte_of_a_download_is_written_once_in_order(chunks: list[tuple[int, bytes, bool]], why: str) -> None:
    w = _Waiter(want())
    for k, (offset, data, last) in enumerate(chunks):
        w.chunk(chunk(offset, data, last, meta([4]) if k == 0 else None))
    assert w.done and isinstance(w.error, InvalidArgument), w.error
    assert __import__("re").search(why, str(w.error)), str(w.error)


def test_metadata_twice_is_refused() -> None:
    w = _Waiter(want())
    w.chunk(chunk(0, RAW[:8], False, meta([4])))
    w.chunk(chunk(8, RAW[8:], True, meta([4])))
    assert isinstance(w.error, InvalidArgument) and "metadata twice" in str(w.error)


def test_bulk_chunks_are_held_to_the_same_rules_and_keep_the_socket_in_step() -> None:
    """On the side socket a refused chunk's bytes are still read (into scratch), so the next record is read whole."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    side = bulk.BulkSocket(ours)
    try:

        def send(rid: int, offset: int, data: bytes) -> None:
            theirs.sendall(protocol.BULK_HEAD.pack(protocol.BULK_DOWNLOAD, rid, offset, len(data)) + data)

        def announce(offset: int, n: int, last: bool, m: tensor_pb2.TensorMeta | None = None) -> device_pb2.TensorChunk:
            c = device_pb2.TensorChunk(offset=offset, bulk_bytes=n, last=last)
            if m is not None:
                c.meta.CopyFrom(m)
            return c

        w = _Waiter(want())  # a gap: bytes 8..12 would be left unwritten
        send(1, 0, RAW[:8])
        w.bulk_chunk(1, announce(0, 8, False, meta([4])), side)
        send(1, 12, RAW[12:])
        w.bulk_chunk(1, announce(12, 4, True), side)
        assert isinstance(w.error, InvalidArgument) and "8 written so far" in str(w.error)
        w = _Waiter(want())  # too short
        send(2, 0, RAW[:8])
        w.bulk_chunk(2, announce(0, 8, True, meta([4])), side)
        assert isinstance(w.error, InvalidArgument) and "left unwritten" in str(w.error)
        w = _Waiter(want())  # a forged size: nothing allocated, the bytes read into scratch
        send(3, 0, RAW)
        w.bulk_chunk(3, announce(0, 16, True, meta([1 << 40])), side)
        assert w.tensor is None and isinstance(w.error, InvalidArgument)
        w = _Waiter()  # nobody waits for it: read past, nothing allocated
        send(4, 0, RAW)
        w.bulk_chunk(4, announce(0, 16, True, meta([4])), side)
        assert w.tensor is None
        w = _Waiter(want())  # and the socket is still in step: an honest download after all that
        send(5, 0, RAW[:8])
        send(5, 8, RAW[8:])
        w.bulk_chunk(5, announce(0, 8, False, meta([4])), side)
        w.bulk_chunk(5, announce(8, 8, True), side)
        assert w.error is None and w.tensor is not None and torch.equal(w.tensor, VALUES)
    finally:
        side.close()
        theirs.close()


def test_session_download_checks_the_reply_against_the_shape_asked(daemon: object) -> None:
    s = Session.attach(daemon.address, daemon.token())  # type: ignore[attr-defined]
    try:
        h = s.upload(torch.arange(3, dtype=torch.float32))
        with pytest.raises(InvalidArgument, match=r"\(3,\) torch.float32 for a download of \(5,\)"):
            s.download(h, (5,), torch.float32)
        with pytest.raises(InvalidArgument, match="float64"):
            s.download(h, (3,), torch.float64)
        with pytest.raises(InvalidArgument, match="both shape and dtype"):
            s.download(h, (3,))
        assert s.download(h, (3,), torch.float32).tolist() == [0.0, 1.0, 2.0]  # the session goes on
        assert s.download(h).tolist() == [0.0, 1.0, 2.0]
    finally:
        s.close()


BOOL = wire.dtype_to_proto(torch.bool)


@pytest.mark.parametrize("bad", [2, 0xFF])
def test_a_bool_download_with_a_byte_other_than_0_or_1_is_refused(bad: int) -> None:
    """A bool tensor holding any other byte is undefined behaviour in torch's kernels: the daemon refuses such uploads
    (`wire.check_bool_bytes`), and the client refuses such downloads (a hostile or broken daemon's), on the stream
    and on the side socket, and hands no tensor out."""
    w = _Waiter(_Want((4,), torch.bool, sys.maxsize))
    w.chunk(chunk(0, bytes([1, 0, 1, 0]), False, meta([8], BOOL)))  # the wrong shape: refused as before
    assert isinstance(w.error, InvalidArgument) and w.tensor is None
    w = _Waiter(_Want((8,), torch.bool, sys.maxsize))
    w.chunk(chunk(0, bytes([1, 0, 1, 0]), False, meta([8], BOOL)))
    w.chunk(chunk(4, bytes([0, 1, bad, 0]), True))
    assert w.done and w.tensor is None
    assert isinstance(w.error, InvalidArgument) and "bool download with a byte other than 0 or 1" in str(w.error)
    w = _Waiter(_Want(None, None, 1 << 20))  # a download whose shape the client cannot know: held to it too
    w.chunk(chunk(0, bytes([bad]), True, meta([1], BOOL)))
    assert w.tensor is None and isinstance(w.error, InvalidArgument)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    side = bulk.BulkSocket(ours)
    try:
        w = _Waiter(_Want((3,), torch.bool, sys.maxsize))
        theirs.sendall(protocol.BULK_HEAD.pack(protocol.BULK_DOWNLOAD, 7, 0, 3) + bytes([0, bad, 1]))
        c = device_pb2.TensorChunk(offset=0, bulk_bytes=3, last=True)
        c.meta.CopyFrom(meta([3], BOOL))
        w.bulk_chunk(7, c, side)
        assert w.tensor is None and isinstance(w.error, InvalidArgument) and "0 or 1" in str(w.error)
    finally:
        side.close()
        theirs.close()
    w = _Waiter(_Want((4,), torch.bool, sys.maxsize))  # an honest one goes through
    w.chunk(chunk(0, bytes([1, 0, 0, 1]), True, meta([4], BOOL)))
    assert w.error is None and w.tensor is not None and w.tensor.tolist() == [True, False, False, True]
    w = _Waiter(_Want((0,), torch.bool, sys.maxsize))
    w.chunk(chunk(0, b"", True, meta([0], BOOL)))
    assert w.error is None and w.tensor is not None and w.tensor.shape == (0,)
