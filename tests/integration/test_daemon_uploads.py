"""Uploads made and filled in one call of the native runner (native_runner.cpp `filled`, `CommandExecutor._upload`'s
one-chunk path): exact bytes for every dtype and shape, the old tensor of a replaced handle left alone, the quota
and handle checks before anything is made, and chunks whose length does not match their meta refused with the
handle poisoned. Each against a real daemon (session workers in processes, the native runner loaded)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from test_daemon_quota import used_bytes

from gpupool import errors, wire
from gpupool._proto import device_pb2, tensor_pb2

KiB, MiB = 1024, 1024**2


def raw_upload(s: Session, h: int, dtype: torch.dtype, shape: list[int], data: bytes, last: bool = True) -> None:
    """One hand-made Upload chunk at offset 0 with its meta (what a hostile client may send)."""
    meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(dtype), shape=shape)
    s._add(device_pb2.Command(upload=device_pb2.Upload(handle=h, meta=meta, data=data, last=last)))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and wire.tensor_to_bytes(a) == wire.tensor_to_bytes(b)


def test_one_chunk_uploads_are_exact_for_every_dtype_and_shape(daemon: Any) -> None:
    gen = torch.Generator().manual_seed(20)
    with Session.attach(daemon.address, daemon.token()) as s:
        sent = []
        for dtype in wire.TORCH_DTYPES.values():
            for shape in [(), (0,), (3, 0, 2), (7,), (2, 3, 5), (1, 1, 1, 1, 9)]:
                n = torch.Size(shape).numel()
                raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
                if dtype is torch.bool:  # bytes of 2..255 are refused (test_a_bool_upload_of_bytes_other_than...)
                    raw &= 1
                t = raw.view(dtype).reshape(shape)  # any bit pattern: NaNs, denormals
                sent.append((t, s.upload(t)))
        s.sync()
        assert used_bytes(daemon.address, s) == sum(t.numel() * t.element_size() for t, _ in sent)
        for t, h in sent:
            assert same_bytes(s.download(h), t), (t.dtype, t.shape)


def test_an_upload_over_a_live_handle_leaves_the_old_tensor_to_its_views(daemon: Any) -> None:
    """A new tensor for each upload: one written into the handle's old storage would change its views."""
    with Session.attach(daemon.address, daemon.token()) as s:
        old, new = torch.arange(64.0), torch.arange(64.0) + 1000
        h = Handle(s.upload(old))
        [v] = s.call("aten::view.default", h, [8, 8])
        s.upload(new, handle=h)
        s.sync()
        assert torch.equal(s.download(v), old.view(8, 8)) and torch.equal(s.download(h), new)
        assert used_bytes(daemon.address, s) == 2 * 64 * 4  # the view still holds the old storage
        s.free([v])
        s.sync()
        assert used_bytes(daemon.address, s) == 64 * 4


def test_a_one_chunk_upload_past_the_quota_or_into_another_session_is_refused(daemon: Any) -> None:
    with Session.attach(daemon.address, daemon.token(quota_bytes=MiB)) as s:
        a = s.upload(torch.ones(MiB // 8))  # half the quota
        s.sync()
        b = s.upload(torch.ones(MiB // 8 + 1))  # one float past it
        with pytest.raises(errors.ResourceExhausted, match=f"{MiB} byte limit"):
            s.sync()
        assert used_bytes(daemon.address, s) == MiB // 2
        with pytest.raises(errors.ResourceExhausted):
            s.download(b)  # poisoned with the error
        raw_upload(s, s.handle_base + (1 << 32) + 5, torch.uint8, [4], b"abcd")  # the next session's range
        with pytest.raises(errors.PermissionDenied):
            s.sync()
        raw_upload(s, s.handle_base, torch.uint8, [4], b"abcd")  # handle 0 is reserved
        with pytest.raises(errors.InvalidArgument, match="reserved"):
            s.sync()
        for shape in ([2, -2, -1], [-4], [1] * 64 + [4]):  # 65 dims; each product matches the 4 bytes
            raw_upload(s, s.new_handle(), torch.uint8, shape, b"abcd")
            with pytest.raises(errors.InvalidArgument, match="bad upload shape"):
                s.sync()
        assert torch.equal(s.download(a), torch.ones(MiB // 8)) and used_bytes(daemon.address, s) == MiB // 2


@pytest.mark.parametrize("length", [0, 1, 4 * KiB - 1, 4 * KiB + 1, 8 * KiB])
def test_a_last_chunk_of_the_wrong_length_is_refused_and_its_handle_unreadable(daemon: Any, length: int) -> None:
    """A one-chunk upload shorter or longer than its meta: refused before anything of it can be read. The session
    first frees a tensor of the same size full of a pattern, so that memory the upload left unwritten would show."""
    with Session.attach(daemon.address, daemon.token()) as s:
        secret = s.upload(torch.full((1 * KiB,), 7.0))  # 4 KiB
        s.free([secret])
        h = s.new_handle()
        raw_upload(s, h, torch.float32, [1 * KiB], b"\1" * length)
        with pytest.raises(errors.InvalidArgument, match="upload ended at|does not follow"):
            s.sync()
        with pytest.raises(errors.InvalidArgument):
            s.download(h)  # poisoned, not half written
        assert used_bytes(daemon.address, s) == 0


def test_a_chunked_upload_is_unreadable_until_its_last_chunk(daemon: Any) -> None:
    """The chunked path (the one-chunk path's fallback) over memory the session just freed: no op and no download
    sees the tensor before its last byte is written, then it holds exactly what was sent."""
    with Session.attach(daemon.address, daemon.token()) as s:
        secret = s.upload(torch.full((4 * KiB,), 7.0))  # 16 KiB
        s.free([secret])
        h = s.new_handle()
        first, rest = b"\1" * (8 * KiB), b"\2" * (8 * KiB)
        raw_upload(s, h, torch.uint8, [16 * KiB], first, last=False)
        with pytest.raises(errors.FailedPrecondition, match="still being uploaded"):
            s.download(h)
        [total] = s.call("aten::sum.default", Handle(h))
        with pytest.raises(errors.FailedPrecondition):
            s.sync()
        up = device_pb2.Upload(handle=h, offset=8 * KiB, data=rest, last=True)
        s._add(device_pb2.Command(upload=up))
        s.sync()
        assert s.download(h).tolist() == [1] * (8 * KiB) + [2] * (8 * KiB)


def test_a_one_chunk_upload_over_a_chunked_one_in_progress_replaces_it(daemon: Any) -> None:
    """A handle half-way through a chunked upload, then uploaded whole in one chunk (the native `filled` path):
    the new tensor is bound complete and readable, the chunked upload is over (its next chunk refused, never
    written into the new tensor), and the session counts the new tensor's bytes only. A zero-element shape whose
    contiguous strides overflow is refused with a clear error, the session still usable."""
    with Session.attach(daemon.address, daemon.token()) as s:
        h = s.new_handle()
        raw_upload(s, h, torch.uint8, [16], b"\1" * 8, last=False)
        raw_upload(s, h, torch.uint8, [16], bytes(range(16)))
        s.sync()
        assert s.download(h).tolist() == list(range(16))
        assert used_bytes(daemon.address, s) == 16
        s._add(device_pb2.Command(upload=device_pb2.Upload(handle=h, offset=8, data=b"\2" * 8, last=True)))
        with pytest.raises(errors.InvalidArgument, match="without a first chunk"):
            s.sync()
        bad = s.new_handle()
        raw_upload(s, bad, torch.uint8, [0, 1 << 62, 1 << 62], b"")
        with pytest.raises(errors.InvalidArgument, match="overflow"):
            s.sync()
        g = s.upload(torch.arange(8.0))
        assert torch.equal(s.download(g), torch.arange(8.0))


def test_a_bool_upload_of_bytes_other_than_0_and_1_is_refused(daemon: Any) -> None:
    """torch assumes a bool tensor's bytes are 0 or 1 (any other byte in a C++ bool is undefined behaviour); a
    client could upload 2..255. Refused with INVALID_ARGUMENT on every upload path: one
    chunk (the native `filled` path), a chunked upload's first and later chunks, a graph's input by value; nothing
    is bound, and 0/1 bytes still upload."""
    with Session.attach(daemon.address, daemon.token()) as s:
        one = s.new_handle()
        raw_upload(s, one, torch.bool, [4], b"\0\1\2\1")
        with pytest.raises(errors.InvalidArgument, match="bool"):
            s.sync()
        first = s.new_handle()
        raw_upload(s, first, torch.bool, [16], b"\1" * 7 + b"\xff", last=False)
        with pytest.raises(errors.InvalidArgument, match="bool"):
            s.sync()
        later = s.new_handle()
        raw_upload(s, later, torch.bool, [16], b"\1" * 8, last=False)
        s._add(
            device_pb2.Command(upload=device_pb2.Upload(handle=later, offset=8, data=b"\0" * 7 + b"\x80", last=True))
        )
        with pytest.raises(errors.InvalidArgument, match="bool"):
            s.sync()
        for h in (one, first, later):
            with pytest.raises(errors.GpupoolError):
                s.download(h)
        gid = 7
        bitwise_not = device_pb2.Op(name="aten::bitwise_not.default", args=[tensor_pb2.Arg(tensor=1)], outputs=[2])
        meta = [wire.meta_to_proto(torch.ones(4, dtype=torch.bool))]
        s.define_graph(device_pb2.DefineGraph(graph_id=gid, inputs=1, input_meta=meta, ops=[bitwise_not], outputs=[2]))
        y = s.new_handle()
        s.run_graph(gid, [0], [y], data=[b"\0\1\3\1"])
        with pytest.raises(errors.InvalidArgument, match="bool"):
            s.sync()
        s.run_graph(gid, [0], [y], data=[b"\0\1\0\1"])
        assert s.download(y).tolist() == [True, False, True, False]
        ok = s.new_handle()
        raw_upload(s, ok, torch.bool, [3], b"\0\1\1")
        assert s.download(ok).tolist() == [False, True, True]


def test_no_op_makes_a_bool_tensor_of_bytes_other_than_0_and_1(daemon: Any) -> None:
    """Round 21 refused such bytes on the upload paths, but three others put a client's bytes into a bool tensor:
    a small tensor sent inline in an op's arguments (eager, and the constants of a graph's definition), `view(dtype)`
    (and `view_copy`) of a uint8 tensor as bool, and `set_` of a bool tensor onto a uint8 tensor's storage: the
    daemon held bools of bytes 2 and 255 (read back as such). Each is refused now (INVALID_ARGUMENT, nothing bound),
    and the same calls with 0/1 bytes or between other dtypes still work."""
    bad = torch.tensor([2, 255], dtype=torch.uint8).view(torch.bool)  # a local bool tensor of such bytes
    with Session.attach(daemon.address, daemon.token()) as s:
        u8 = Handle(s.upload(torch.tensor([2, 255], dtype=torch.uint8)))
        calls: list[Any] = [
            lambda: s.call("aten::view.dtype", bad, torch.uint8)[0],  # eager: the inline bool argument itself
            lambda: s.call("aten::view.dtype", u8, torch.bool)[0],
            lambda: s.call("aten::view_copy.dtype", u8, torch.bool)[0],
            lambda: s.call("aten::set_.source_Tensor", Handle(empty), u8)[0],
        ]
        [empty] = s.call("aten::empty.memory_format", [0], dtype=torch.bool)
        for call in calls:
            h = call()
            with pytest.raises(errors.InvalidArgument, match="bool"):
                s.sync()
            with pytest.raises(errors.GpupoolError):
                assert s.download(h).view(torch.uint8).tolist() == [2, 255]  # what round 21 gave
        assert s.download(empty).tolist() == []  # set_ was refused before it ran: its self is as it was
        add = device_pb2.Op(
            name="aten::bitwise_and.Tensor",
            args=[tensor_pb2.Arg(tensor=1), tensor_pb2.Arg(inline=wire.inline_to_proto(bad))],
            outputs=[2],
        )
        meta = [wire.meta_to_proto(torch.ones(2, dtype=torch.bool))]
        s.define_graph(device_pb2.DefineGraph(graph_id=3, inputs=1, input_meta=meta, ops=[add], outputs=[2]))
        with pytest.raises(errors.InvalidArgument, match="bool"):
            s.sync()
        good = torch.tensor([True, False])
        [a] = s.call("aten::view.dtype", good, torch.uint8)
        [b] = s.call("aten::view.dtype", Handle(s.upload(good)), torch.uint8)
        [c] = s.call("aten::view.dtype", u8, torch.int8)
        [d] = s.call("aten::empty.memory_format", [0], dtype=torch.bool)
        s.call("aten::set_.source_Tensor", Handle(d), Handle(s.upload(good)), outputs=0)
        assert s.download(a).tolist() == s.download(b).tolist() == [1, 0]
        assert s.download(c).tolist() == [2, -1] and s.download(d).tolist() == [True, False]


def test_batches_among_other_commands_arrive_exact_and_never_in_another_session(daemon: Any) -> None:
    """A step's batch (64 KiB - 4 MiB) in one frame with other commands -- what a training loop sends -- is checked
    by the reader and run by the worker from its span (server/bulk.py `strip_uploads`): its bytes exact, the
    commands around it run, and two sessions sending at once each read back only their own."""
    sizes = [64 * KiB, 512 * KiB, 4 * MiB - 64]
    errors_seen: list[BaseException] = []

    def client(seed: int) -> None:
        try:
            gen = torch.Generator().manual_seed(seed)
            with Session.attach(daemon.address, daemon.token()) as s:
                for n in sizes * 3:
                    batch = torch.randint(-(2**31), 2**31 - 1, (n // 4,), dtype=torch.int32, generator=gen)
                    small = torch.full((3,), float(seed))
                    hb, hs = s.upload(batch), s.upload(small)  # one frame (a sync sends it)
                    outs = [s.call("aten::add.Tensor", Handle(hs), Handle(hs))[0] for _ in range(40)]
                    s.sync()  # (40 small commands beside the batch: copied to the worker in runs, server/worker.py)
                    assert same_bytes(s.download(hb), batch), (seed, n)
                    assert torch.equal(s.download(outs[-1]), small * 2)
                    s.free([hb, hs, *outs])
        except BaseException as exc:  # reported by the main thread
            errors_seen.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors_seen, errors_seen


@pytest.mark.parametrize("delta", [-1, 1])
def test_a_batch_of_the_wrong_length_among_other_commands_is_refused(daemon: Any, delta: int) -> None:
    """The same refusal as a small chunk's (test_a_last_chunk_of_the_wrong_length_...) for a 512 KiB one sent
    with other commands, the memory it would land in full of a pattern first."""
    with Session.attach(daemon.address, daemon.token()) as s:
        secret = s.upload(torch.full((128 * KiB,), 7.0))
        s.free([secret])
        h = s.new_handle()
        raw_upload(s, h, torch.float32, [128 * KiB], b"\1" * (512 * KiB + delta))
        other = s.upload(torch.ones(3))
        with pytest.raises(errors.InvalidArgument, match="upload ended at|does not follow"):
            s.sync()
        with pytest.raises(errors.InvalidArgument):
            s.download(h)
        assert torch.equal(s.download(other), torch.ones(3))
