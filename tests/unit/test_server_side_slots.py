"""Download slots (server/worker.py, slices.SideChunk): a bulk Get's chunks are written by the worker into a
download slot of the memory it shares with the daemon, and the daemon sends them on the side socket from there.
What crosses the boundary is a record (request id, offset, last, place in the slot, meta) that the daemon checks:
a chunk outside its slot, overlapping an earlier one, without a slot, or with a malformed meta is refused."""

from __future__ import annotations

import struct

import pytest
import torch
from gpupool.server import bulk, slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2

MiB = 1024 * 1024


def _session() -> tuple[CommandExecutor, WorkerSession]:
    ex = CommandExecutor(slices.SliceLedger())
    ex.piece_bytes = bulk.PIECE_BYTES
    dev = FakeDevice(0, "h", 1 << 30)
    return ex, WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)


def _get(ex: CommandExecutor, s: WorkerSession, h: int, rid: int, side: bool) -> list[object]:
    out: list[object] = []
    ex.execute(s, device_pb2.Command(get=device_pb2.Get(handle=h, request_id=rid, bulk=side)), out.append)
    assert len(out) == 1 and isinstance(out[0], list), out
    return out[0]


def test_a_bulk_get_writes_its_chunks_into_the_slot() -> None:
    ex, s = _session()
    x = torch.arange(5 * MiB + 3, dtype=torch.uint8)  # a piece of four 4 MiB chunks, then 1 MiB + 3 bytes
    h = s.handle_base + 1
    s.bind(h, x.clone())
    slot = memoryview(bytearray(bulk.PIECE_BYTES))
    ex.side_slot, ex.side_used = slot, 0
    frames = _get(ex, s, h, 9, side=True)
    assert [type(f) for f in frames] == [slices.SideChunk, slices.SideChunk]
    a, b = frames
    assert isinstance(a, slices.SideChunk) and isinstance(b, slices.SideChunk)
    assert (a.request_id, a.offset, a.last, a.at, a.size) == (9, 0, False, 0, 4 * MiB)
    assert (b.offset, b.last, b.at, b.size) == (4 * MiB, True, 4 * MiB, MiB + 3) and b.meta is None
    assert a.meta is not None and list(tensor_pb2.TensorMeta.FromString(a.meta).shape) == [5 * MiB + 3]
    assert bytes(slot[: 5 * MiB + 3]) == x.numpy().tobytes()
    # not a bulk Get, or no slot this slice: the frames carry the bytes as before
    ex.side_used = 0
    assert not any(isinstance(f, slices.SideChunk) for f in _get(ex, s, h, 10, side=False))
    ex.side_slot = None
    assert not any(isinstance(f, slices.SideChunk) for f in _get(ex, s, h, 11, side=True))


def test_a_full_slot_leaves_the_rest_in_frames() -> None:
    ex, s = _session()
    h = s.handle_base + 1
    s.bind(h, torch.ones(3 * MiB, dtype=torch.uint8))
    ex.side_slot, ex.side_used = memoryview(bytearray(bulk.PIECE_BYTES)), bulk.PIECE_BYTES - MiB
    frames = _get(ex, s, h, 9, side=True)
    assert len(frames) == 1 and not isinstance(frames[0], slices.SideChunk)


def _result(*chunks: slices.SideChunk) -> bytes:
    r = slices.SliceResult(1, 0.0, 0, 0, 0, 0, 0, {}, {}, [list(chunks)])
    return b"".join(p if isinstance(p, bytes) else bytes(p) for p in slices.encode_result(r))[4:]


def test_side_chunks_cross_the_boundary_as_checked_records() -> None:
    meta = wire.meta_to_proto(torch.ones(8)).SerializeToString()
    slot = memoryview(bytearray(range(256)) * 1024)
    body = _result(slices.SideChunk(5, meta, 0, False, 0, 1000), slices.SideChunk(5, None, 1000, True, 1000, 24))
    got = slices.decode_result(body, 1, slot).replies
    assert all(isinstance(c, slices.SideChunk) for c in got)
    first, second = got
    assert isinstance(first, slices.SideChunk) and isinstance(second, slices.SideChunk)
    assert (first.request_id, first.offset, first.last, first.meta) == (5, 0, False, meta)
    assert bytes(first.data) == bytes(slot[:1000]) and bytes(second.data) == bytes(slot[1000:1024])
    assert second.last and second.meta is None and len(second) == 64 + 24


@pytest.mark.parametrize(
    "chunks, why",
    [
        ([slices.SideChunk(5, None, 0, True, 256 * 1024 - 10, 11)], "past the slot's end"),
        ([slices.SideChunk(5, None, 0, False, 100, 50), slices.SideChunk(5, None, 50, True, 120, 8)], "overlap"),
        ([slices.SideChunk(5, None, 0, True, 0, 0)], "empty"),
        ([slices.SideChunk(0, None, 0, True, 0, 8)], "no request id"),
        ([slices.SideChunk(5, b"\xff\xff\xff", 0, True, 0, 8)], "malformed meta"),
        ([slices.SideChunk(5, b"\x00" * 5000, 0, True, 0, 8)], "an oversized record"),
    ],
)
def test_lies_about_side_chunks_are_refused(chunks: list[slices.SideChunk], why: str) -> None:
    slot = memoryview(bytearray(256 * 1024))
    with pytest.raises((ValueError, struct.error)):
        slices.decode_result(_result(*chunks), 1, slot)
        pytest.fail(why)


def test_a_side_chunk_without_a_slot_is_refused() -> None:
    body = _result(slices.SideChunk(5, None, 0, True, 0, 8))
    with pytest.raises(ValueError):
        slices.decode_result(body, 1, None)  # the slice was given no slot (both busy): the worker lies


def test_slice_requests_carry_the_slot() -> None:
    req = slices.SliceRequest(1, 2, 0.5, b"", slot=1)
    body = b"".join(bytes(p) for p in slices.encode_request(req, shared=0))[4:]
    got = slices.decode_request(body, memoryview(b""))
    assert got is not None and got.slot == 1
    req.slot = -1
    body = b"".join(bytes(p) for p in slices.encode_request(req, [b"x"]))[4:]
    got = slices.decode_request(body, memoryview(b""))
    assert got is not None and got.slot == -1 and bytes(got.payload) == b"x"
