"""Uploads and downloads in 4 MiB chunks over the session stream: bit-exact, every dtype, any size."""

from __future__ import annotations

import time
from typing import Any

import numpy
import pytest
import torch
from gpupool.client.session import Handle, Session, _Want
from gpupool.server import bulk
from support import Healthy

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2
from gpupool.errors import GpupoolError, InvalidArgument

MiB = 1024**2


def test_256_mib_round_trip_is_bit_exact(daemon_factory: Any) -> None:
    d = daemon_factory(fake_gpu_memory=640 * MiB)
    bits = torch.randint(-(2**31), 2**31 - 1, (256 * MiB // 4,), dtype=torch.int32)
    big = bits.view(torch.float32)  # any bit patterns, NaNs included
    with Session.attach(d.address, d.token()) as s:
        h = s.upload(big)
        back = s.download(h)
        assert back.dtype == torch.float32 and back.shape == big.shape
        assert torch.equal(back.view(torch.int32), big.view(torch.int32))


@pytest.mark.parametrize("dtype", list(wire.DTYPES))
def test_every_dtype_round_trips(daemon: Any, dtype: torch.dtype) -> None:
    source = torch.randint(0, 2, (3, 5)) if dtype == torch.bool else torch.randn(3, 5, dtype=torch.float64) * 50
    t = source.to(dtype)
    with Session.attach(daemon.address, daemon.token()) as s:
        assert torch.equal(s.download(s.upload(t)), t)


def test_shapes_views_numpy_and_chunk_edges(daemon: Any) -> None:
    with Session.attach(daemon.address, daemon.token()) as s:
        cases = [
            torch.tensor(3.5),  # 0-dim
            torch.empty(0, 4),  # empty
            torch.arange(24.0).view(4, 6).t(),  # non-contiguous source
            torch.arange(wire.CHUNK_BYTES // 4, dtype=torch.float32),  # exactly one chunk
            torch.arange(wire.CHUNK_BYTES // 4 + 1, dtype=torch.float32),  # one byte-run past a chunk
        ]
        for t in cases:
            assert torch.equal(s.download(s.upload(t)), t)
        arr = numpy.arange(10, dtype=numpy.int16)
        assert s.download(s.upload(arr)).tolist() == arr.tolist()
        h = Handle(s.upload(torch.arange(12.0).view(3, 4)))
        [col] = s.call("aten::select.int", h, 1, 2)  # a strided view downloads as its values
        assert s.download(col).tolist() == [2.0, 6.0, 10.0]


def test_a_download_into_a_given_tensor(daemon: Any) -> None:
    """Session.download's `into` (round 47, the C++ client's `.cpu()`): the bytes land in the caller's tensor, which is
    returned, across chunks; a tensor of another shape or dtype, a strided one or a bool one is refused first."""
    with Session.attach(daemon.address, daemon.token()) as s:
        t = torch.randn(wire.CHUNK_BYTES // 4 + 5)  # two chunks
        h = s.upload(t)
        out = torch.full_like(t, 7.0)
        back = s.download(h, t.shape, t.dtype, into=out)
        assert back is out and torch.equal(out, t)
        for bad in (torch.empty(3), torch.empty_like(t, dtype=torch.float64), torch.empty(2 * t.numel())[::2]):
            with pytest.raises(InvalidArgument, match="into"):
                s.download(h, t.shape, t.dtype, into=bad)
        b = s.upload(torch.tensor([True, False]))
        with pytest.raises(InvalidArgument, match="not bool"):
            s.download(b, (2,), torch.bool, into=torch.empty(2, dtype=torch.bool))
        with pytest.raises(InvalidArgument, match="into"):
            s.download(h, into=out)  # no shape and dtype
        assert torch.equal(s.download(h), t)  # the session goes on


def test_upload_into_chosen_handle_replaces_it(daemon: Any) -> None:
    with Session.attach(daemon.address, daemon.token()) as s:
        h = s.new_handle()
        s.upload(torch.ones(2), handle=h)
        s.upload(torch.zeros(3), handle=h)
        assert s.download(h).tolist() == [0.0, 0.0, 0.0]


def test_transfers_leave_tensors_resizable(daemon: Any) -> None:
    with Session.attach(daemon.address, daemon.token()) as s:
        mine = torch.ones(4)
        h = s.upload(mine)
        back = s.download(h)
        mine.resize_(100)  # the caller's tensor is untouched by the upload
        back.resize_(50)  # and a downloaded tensor is an ordinary one
        s.call("aten::resize_.default", Handle(h), [64], outputs=[0])
        assert s.download(h).shape == (64,)


def _count_slices(d: Any) -> list[int]:
    """Counts the slices the daemon's device threads run (a wrapper around the real slice runner)."""
    count = [0]
    for w in d.running.daemon.workers:
        inner = w.run_slice

        def counted(*args: Any, _inner: Any = inner) -> Any:
            count[0] += 1
            return _inner(*args)

        w.run_slice = counted
    return count


def test_every_slice_is_booked_once(daemon: Any) -> None:
    """Each slice the daemon runs (by the device's thread or by a stream's reader, one that reached its worker
    or ended the stream) is booked once: the slice histogram counts them all, and the busy time it sums is the
    time charged to the tenant and to the device."""
    d = daemon.running.daemon
    ran = _count_slices(daemon)
    inner = d._run_slice

    def counted(*args: Any) -> Any:  # the slices a stream's reader runs itself (`Daemon.submit`)
        ran[0] += 1
        return inner(*args)

    d._run_slice = counted
    before = d.ledger.snapshot()["slices"].get(0, ([0], 0.0, 0.0))
    with Session.attach(daemon.address, daemon.token()) as s:
        h = Handle(s.upload(torch.arange(4.0)))
        for _ in range(5):
            s.call("aten::add.Tensor", h, h, outputs=[0])
        s.call("aten::not_an_op.default")
        with pytest.raises(InvalidArgument):
            s.sync()
        assert s.download(h).shape == (4,)
    deadline = time.monotonic() + 10
    while True:  # the stream's end is a slice of its own, booked as the session closes
        snap = d.ledger.snapshot()
        counts, total, _ = snap["slices"][0]
        if sum(counts) - sum(before[0]) >= ran[0] or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    time.sleep(0.2)  # a slice booked twice would show by now
    snap = d.ledger.snapshot()
    counts, total, _ = snap["slices"][0]
    assert ran[0] >= 2 and sum(counts) - sum(before[0]) == ran[0]
    assert total == pytest.approx(snap["device_busy"][0]) == pytest.approx(sum(snap["busy"].values()))


def test_a_big_upload_goes_to_the_worker_as_an_uploads_slice(daemon: Any) -> None:
    """The front's short test for the usual slice (no big upload among its commands) hands big uploads on as
    `slice_length` does: a slice of big uploads only, copied once (server/bulk.py); small commands in ordinary
    slices."""
    seen: list[tuple[int, bool]] = []
    with Session.attach(daemon.address, daemon.token()) as s:
        front = daemon.running.daemon.session_list()[0]
        run = front.runner.run

        def watched(req: Any, commands: int, parts: Any = ()) -> Any:
            seen.append((commands, req.uploads))
            return run(req, commands, parts)

        front.runner.run = watched
        big = torch.arange(2 * MiB // 4, dtype=torch.float32)  # one chunk, at least bulk.BIG_UPLOAD
        h = s.upload(big)
        small = s.upload(torch.ones(3))
        assert torch.equal(s.download(h), big) and torch.equal(s.download(small), torch.ones(3))
    assert (1, True) in seen and any(not uploads for _, uploads in seen)


def test_idle_sync_is_answered_by_the_front_with_the_same_errors(daemon: Any) -> None:
    slices = _count_slices(daemon)
    with Session.attach(daemon.address, daemon.token()) as s:
        h = Handle(s.upload(torch.arange(4.0)))
        s.sync()
        before = slices[0]
        for _ in range(20):
            s.sync()  # nothing queued, nothing running, no error waiting: no slice, no worker
        assert slices[0] == before
        s.call("aten::mm.default", h, h)  # 1-D mm fails in the worker: the error waits for the next sync
        with pytest.raises(InvalidArgument, match="mm"):
            s.sync()
        s.call("aten::mm.default", h, h)
        s.flush()
        [front] = daemon.running.daemon.session_list()
        deadline = time.monotonic() + 30  # the failed op has run: the session is idle but its error is pending
        while not front.error_pending:  # (waited for: round 28's fixed 0.5 s could leave it queued on a loaded box)
            assert time.monotonic() < deadline, "the op never ran"
            time.sleep(0.01)
        assert daemon.running.daemon.queues[0].wait_idle(30)
        with pytest.raises(InvalidArgument, match="mm"):
            s.sync()  # so this sync goes to the worker, which reports (and clears) the error
        before = slices[0]
        s.sync()
        assert slices[0] == before  # clean and idle again: the fast path
        [out] = s.call("aten::mul.Tensor", h, h)
        [total] = s.call("aten::sum.default", out)
        assert s.sync([total]) == [14.0]  # scalars come from the worker, after the ops before them
        assert s.download(out).tolist() == [0.0, 1.0, 4.0, 9.0]


def test_big_uploads_and_downloads_leave_a_neighbour_served(daemon_factory: Any) -> None:
    d = daemon_factory(fake_gpu_memory=512 * MiB)
    healthy = Healthy(d.address, d.token(lease_id="neighbour"))
    try:
        with Session.attach(d.address, d.token()) as s:
            for i in range(3):
                big = torch.randint(0, 255, (48 * MiB + 12345,), dtype=torch.uint8)
                h = s.upload(big)
                assert torch.equal(s.download(h), big)
                s.free([h])
                healthy.check(1 if i else 3)
    finally:
        healthy.session.close()
    assert not healthy.failures


def test_non_canonical_upload_frames_keep_protobufs_meaning(daemon: Any) -> None:
    """Uploads the hand parser does not take (two data fields, data before meta) still mean what protobuf says."""
    with Session.attach(daemon.address, daemon.token()) as s:
        h = s.new_handle()
        meta = device_pb2.Upload(
            handle=h, meta=tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(torch.uint8), shape=[3], stride=[1])
        ).SerializeToString()
        two_data = meta + b"\x22\x03abc" + b"\x22\x03xyz" + b"\x28\x01"  # the last data wins: "xyz"
        command = b"\x12" + wire.varint(len(two_data)) + two_data
        s._put(b"\x0a" + wire.varint(len(command)) + command)
        assert bytes(s.download(h).tolist()) == b"xyz"
        forged = meta + b"\x22\x05abc"  # data runs past the end: the stream ends with INVALID_ARGUMENT
        command = b"\x12" + wire.varint(len(forged)) + forged
        s._put(b"\x0a" + wire.varint(len(command)) + command)
        with pytest.raises(GpupoolError, match="malformed"):
            s.sync()


def test_a_download_in_pieces_sees_no_later_op(daemon_factory: Any) -> None:
    """A Get over bulk.PIECE_BYTES is answered over several slices; ops queued behind it wait for its last
    piece, so it returns the value at its place in the stream."""
    d = daemon_factory(fake_gpu_memory=256 * MiB)
    with Session.attach(d.address, d.token()) as s:
        x = torch.randint(0, 255, (bulk.PIECE_BYTES * 2 + 3,), dtype=torch.uint8)  # three pieces
        h = Handle(s.upload(x))
        want = _Want(tuple(x.shape), x.dtype, s.quota_bytes)  # what a download of it may be (client/session.py)
        rid, first = s._request(device_pb2.Command(get=device_pb2.Get(handle=h)), want)  # not waited for yet
        s.call("aten::mul_.Scalar", h, 0, outputs=[0])
        later = s.download(h)
        s._wait(rid, first)
        assert first.tensor is not None and torch.equal(first.tensor, x)
        assert not later.any()


@pytest.mark.parametrize("nbytes", [1000, 12 * MiB])
def test_a_get_and_a_later_op_in_one_frame_return_the_value_at_the_get(daemon: Any, nbytes: int) -> None:
    """A worker's download frames are views of the tensor until its result copies them into the shared buffer
    (protocol.Frame): the slice ends after the Get, so an in-place op behind it in the same frame never
    changes the bytes the Get answers."""
    from gpupool.client.session import _Waiter, _Want

    with Session.attach(daemon.address, daemon.token()) as s:
        x = torch.randint(1, 255, (nbytes,), dtype=torch.uint8)
        h = Handle(s.upload(x))
        s.sync()
        with s._lock:
            rid, first = next(s._requests), _Waiter(_Want(tuple(x.shape), x.dtype, s.quota_bytes))
            with s._wlock:
                s._waiters[rid] = first
            s._frame.commands.append(device_pb2.Command(get=device_pb2.Get(handle=h, request_id=rid)))
            s.call("aten::mul_.Scalar", h, 0, outputs=[0])  # the same frame, right behind the Get
            s.flush()
        s._wait(rid, first)
        assert first.tensor is not None and torch.equal(first.tensor, x)
        assert not s.download(h).any()


@pytest.mark.parametrize("carrier", ["stream", "side"])
def test_a_download_into_refuses_what_would_not_hold_the_bytes_as_sent(daemon_factory: Any, carrier: str) -> None:
    """Session.download's `into` (specrev47): a tensor with torch's conjugate or negative bit would read the bytes
    conjugated or negated (the C++ client's `.cpu()` checks these itself, the API did not), and one whose storage is
    smaller than its elements (`untyped_storage().resize_(0)`, FSDP's idiom) would be written past its memory (a crash
    of the client); both refused first, on either carrier, and a failed download leaves the session going on."""
    d = daemon_factory(bulk_listen="127.0.0.1:0") if carrier == "side" else daemon_factory()
    with Session.attach(d.address, d.token()) as s:
        assert (s._side is not None) == (carrier == "side")
        c = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
        hc = s.upload(c)
        with pytest.raises(InvalidArgument, match="into"):
            s.download(hc, c.shape, c.dtype, into=torch.zeros_like(c).conj())
        f = torch.arange(1.0, 5.0)
        hf = s.upload(f)
        with pytest.raises(InvalidArgument, match="into"):
            s.download(hf, f.shape, f.dtype, into=torch.zeros_like(f)._neg_view())
        shrunk = torch.empty(4)
        shrunk.untyped_storage().resize_(0)
        with pytest.raises(InvalidArgument, match="into"):
            s.download(hf, f.shape, f.dtype, into=shrunk)
        big = torch.zeros(10)
        assert s.download(hf, f.shape, f.dtype, into=big[3:7]) is not None  # a contiguous view: its own elements
        assert big.tolist() == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0]
        out = torch.zeros(5)
        with pytest.raises(InvalidArgument):  # the daemon's tensor is not that shape: refused before a byte lands
            s.download(hf, (5,), torch.float32, into=out)
        assert out.tolist() == [0.0] * 5
        assert torch.equal(s.download(hc, c.shape, c.dtype, into=torch.zeros_like(c)), c)  # the session goes on
