"""server/bulk.py: the hand parser of upload spans agrees with protobuf on what clients send and refuses (None,
so protobuf decides) everything else; slices of big uploads stay within the worker's shared buffer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from google.protobuf.message import DecodeError
from gpupool.server import bulk, slices

from gpupool import protocol, wire
from gpupool._proto import device_pb2, tensor_pb2

MiB = 1024 * 1024


def span_of(raw: bytes) -> memoryview:
    [(kind, span)] = slices.split_frame(raw, 8)
    assert kind == protocol.UPLOAD
    return span


def test_canonical_upload_parses_like_protobuf_with_data_as_a_view() -> None:
    meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(torch.float32), shape=[3, 7], stride=[7, 1])
    data = bytes(range(256)) * 5
    for up in (
        device_pb2.Upload(handle=(5 << 32) + 9, meta=meta, offset=0, last=False),
        device_pb2.Upload(handle=1, offset=4 * MiB, last=True),
        device_pb2.Upload(handle=2),
    ):
        raw = protocol.upload_frame(up, memoryview(data))
        cmd, view = bulk.parse_upload(span_of(raw))  # type: ignore[misc]
        expected = device_pb2.ClientFrame.FromString(raw).commands[0]
        assert bytes(view) == expected.upload.data == data
        expected.upload.ClearField("data")
        assert cmd == expected
        assert bulk.uploads_only([span_of(raw)])
    # protobuf's own serialization (data in field order, not last) parses the same way
    full = device_pb2.Command(upload=device_pb2.Upload(handle=3, data=b"abc", last=True))
    raw = device_pb2.ClientFrame(commands=[full]).SerializeToString()
    cmd, view = bulk.parse_upload(span_of(raw))  # type: ignore[misc]
    assert bytes(view) == b"abc" and cmd.upload.handle == 3 and cmd.upload.last


def test_anything_else_is_left_to_protobuf() -> None:
    up = device_pb2.Upload(handle=4, last=True).SerializeToString()
    data = b"\x22\x03abc"  # Upload.data = "abc"

    def frame_of(command: bytes) -> memoryview:
        return memoryview(b"\x0a" + wire.varint(len(command)) + command)

    def command_of(upload: bytes) -> bytes:
        return b"\x12" + wire.varint(len(upload)) + upload

    assert bulk.parse_upload(frame_of(command_of(up + data))) is not None
    refused = [
        frame_of(command_of(up + data + b"\x22\x01z")),  # two data fields (protobuf: the last wins)
        frame_of(command_of(up + data) + b"\x1a\x00"),  # a second field in the Command (oneof: the last wins)
        frame_of(command_of(up + b"\x22\x09abc")),  # data runs past the end
        frame_of(command_of(up + b"\x08\xff\xff")),  # truncated varint
        frame_of(command_of(up + b"\x0b\x0c")),  # a group
        frame_of(command_of(up + b"\xa2\x80\x80\x80\x80\x00\x03abc")),  # data's tag in six bytes: corrupt
        frame_of(command_of(b"\x12\x05\x08")),  # a malformed meta
        frame_of(b"\x0a\x00"),  # an Op, not an Upload
        memoryview(b"\x0a\x05" + command_of(up)),  # frame length disagrees
        memoryview(b""),
    ]
    for span in refused:
        assert bulk.parse_upload(span) is None, bytes(span)
    assert not bulk.uploads_only([frame_of(command_of(up + data)), refused[0]])
    assert not bulk.uploads_only([])


def test_slices_of_big_uploads_fit_the_shared_buffer() -> None:
    big, small = 4 * MiB + 40, 200
    up, op = protocol.UPLOAD, protocol.OP
    assert bulk.slice_length([up] * 10, [big] * 10) == (4, True)  # four chunks and their framing
    assert bulk.slice_length([up, up, op], [big, big, small]) == (2, True)
    assert bulk.slice_length([op, up, up], [small, small, big]) == (2, False)  # small uploads ride along
    assert bulk.slice_length([op, op, up], [small, small, big]) == (2, False)  # a big one waits for its own
    assert bulk.slice_length([op] * 5, [7 * MiB] * 5) == (2, False)  # bounded by bytes too
    assert bulk.slice_length([up] * 5, [6 * MiB] * 5) == (2, True)
    assert bulk.slice_length([op], [40 * MiB]) == (1, False)  # one command always runs


@pytest.mark.parametrize("n", [1, 3])
def test_upload_slice_request_round_trips(n: int) -> None:
    req = slices.SliceRequest(10, 20, 0.5, b"", uploads=True)
    shared = memoryview(bytearray(64))
    body = b"".join(slices.encode_request(req, shared=n))[4:]
    back = slices.decode_request(body, shared)
    assert back is not None and back.uploads and bytes(back.payload) == bytes(n)
    body = b"".join(slices.encode_request(slices.SliceRequest(1, 2, 0.1, b"xy")))[4:]
    back = slices.decode_request(body, shared)
    assert back is not None and not back.uploads and bytes(back.payload) == b"xy"


def test_client_reads_download_frames_by_hand_like_protobuf() -> None:
    from gpupool.client.session import _Chunk, _read_frame, _Synced
    from gpupool.server.devices import discover
    from gpupool.server.executor import CommandExecutor
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    dev = discover("h", 1, 256 * MiB)[0]
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 256 * MiB)
    x = torch.arange(3 * MiB, dtype=torch.float32).view(3, -1)
    s.bind((1 << 32) + 5, x)
    frames = CommandExecutor(slices.SliceLedger())._get(s, device_pb2.Get(request_id=77, handle=(1 << 32) + 5))
    assert len(frames) == 3  # 12 MiB: one piece
    for raw in frames:
        mine, ref = _read_frame(raw), device_pb2.ServerFrame.FromString(raw)
        assert isinstance(mine, _Chunk) and mine.request_id == ref.request_id == 77
        assert (mine.offset, bytes(mine.data), mine.last) == (ref.chunk.offset, ref.chunk.data, ref.chunk.last)
        assert (mine.meta or tensor_pb2.TensorMeta()) == ref.chunk.meta
    others = [
        device_pb2.ServerFrame(request_id=3, sync=device_pb2.SyncReply()).SerializeToString(),
        device_pb2.ServerFrame(request_id=3, error=tensor_pb2.Error(code="NOT_FOUND")).SerializeToString(),
        frames[1] + b"\x08\x05",  # a field after the chunk: protobuf decides (the last request id wins)
        frames[1][:-5],  # truncated: protobuf refuses it
    ]
    assert _read_frame(others[0]) == _Synced(3)  # an empty sync reply is read by hand too (client/session.py)
    assert _read_frame(device_pb2.ServerFrame(sync=device_pb2.SyncReply()).SerializeToString()) == _Synced(0)
    for raw in others[1:3]:
        assert _read_frame(raw) == device_pb2.ServerFrame.FromString(raw)
    with pytest.raises(DecodeError):
        _read_frame(others[3])


def test_huge_pages_only_where_faults_do_not_compact(tmp_path: Any) -> None:
    policies = {
        "always defer defer+madvise [madvise] never": False,  # the common default: madvised faults compact
        "[always] defer defer+madvise madvise never": False,
        "always defer [defer+madvise] madvise never": False,
        "always [defer] defer+madvise madvise never": True,
        "always defer defer+madvise madvise [never]": True,
        "": False,
    }
    for i, (text, cheap) in enumerate(policies.items()):
        f = tmp_path / f"defrag{i}"
        f.write_text(text + "\n")
        assert protocol.huge_pages_are_cheap(str(f)) is cheap, text
    assert protocol.huge_pages_are_cheap(str(tmp_path / "missing")) is False  # no THP at all


def test_download_frames_reach_the_outbox_one_by_one() -> None:
    """A result's download frames come out of decode_result as separate replies, in order, so gRPC taking the
    first frame of a piece makes room for the next piece (pipelining) while the bytes stay the worker's."""
    frames = [b"a" * 10, b"b" * 20, b"c" * 5]
    res = slices.SliceResult(executed=2, replies=[b"sync", frames], partial=False)
    body = b"".join(slices.encode_result(res))[4:]
    back = slices.decode_result(body, 2)
    assert back.replies == [b"sync", *frames]
    with pytest.raises(ValueError):  # more replies than commands is still a lie, however they are split
        slices.decode_result(
            b"".join(slices.encode_result(slices.SliceResult(executed=1, replies=[b"x", b"y"])))[4:], 1
        )


def _sleeper() -> Any:
    import subprocess
    import sys
    import time

    from gpupool.server import worker

    p = subprocess.Popen([sys.executable, "-c", "print(1, flush=True); import time; time.sleep(60)"], stdout=-1)
    assert p.stdout is not None and p.stdout.readline()
    deadline = time.monotonic() + 10
    while not worker._quiet(p.pid):  # asleep in time.sleep, like a worker in its socket read
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return p


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSEGV", "SIGABRT", "SIGTERM"])
def test_the_kernels_view_of_a_dying_worker(sig: str) -> None:
    """worker._quiet (the fast Sync's liveness check, no wake-up) says no from the moment kill() returns with a
    fatal signal (core-dumping ones included), while the process dies, and as a zombie; a stopped process is
    not quiet either. A reaped one is an OSError (idle() then says no)."""
    import os
    import signal
    import time

    from gpupool.server import worker

    p = _sleeper()
    try:
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(0.05)
        assert not worker._quiet(p.pid)  # stopped
        os.kill(p.pid, signal.SIGCONT)
        _sleeper_again(p)  # asleep again
        os.kill(p.pid, getattr(signal, sig))
        for _ in range(50):  # never quiet again: pending, dying, then a zombie until reaped
            assert not worker._quiet(p.pid)
            time.sleep(0.002)
    finally:
        p.kill()
        p.wait()
    with pytest.raises(OSError):
        worker._quiet(p.pid)


def _sleeper_again(p: Any) -> None:
    import time

    from gpupool.server import worker

    deadline = time.monotonic() + 10
    while not worker._quiet(p.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ---- a batch's upload among other commands (bulk.strip_uploads) ----


def _upload_cmd(h: int, t: torch.Tensor, data: bytes | None = None) -> device_pb2.Command:
    meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(t.dtype), shape=list(t.shape))
    raw = wire.tensor_to_bytes(t) if data is None else data
    return device_pb2.Command(upload=device_pb2.Upload(handle=h, meta=meta, data=raw, last=True))


def _frame(*cmds: device_pb2.Command) -> bytes:
    return device_pb2.ClientFrame(commands=list(cmds)).SerializeToString()


def test_strip_uploads_takes_only_big_canonical_uploads_bytes_and_keeps_the_rest_as_protobuf_reads_it() -> None:
    big = torch.arange(bulk.STRIP_MIN // 4, dtype=torch.float32)
    small = torch.arange(10, dtype=torch.float32)
    twice = _upload_cmd(9, big).SerializeToString() + b"\x12\x06\x22\x04abcd"  # a second Upload: the last wins
    raw = (
        _frame(_upload_cmd(5, big), device_pb2.Command(free=device_pb2.Free(handles=[3])), _upload_cmd(6, small))
        + b"\x0a" + wire.varint(len(twice)) + twice
        + _frame(device_pb2.Command(sync=device_pb2.Sync(request_id=7)))
    )  # fmt: skip
    commands = slices.split_frame(raw, 100)
    spans = [span for _, span in commands]
    got = bulk.strip_uploads(commands)
    assert got is not None
    stripped, taken = got
    assert [i for i, _ in taken] == [0] and bytes(taken[0][1]) == wire.tensor_to_bytes(big)
    assert taken[0][1].obj is raw or taken[0][1].obj is spans[0].obj  # a view of the frame, not a copy
    whole = device_pb2.ClientFrame.FromString(raw).commands
    parts = device_pb2.ClientFrame.FromString(stripped).commands
    assert len(parts) == len(whole) == 5
    assert parts[0].upload.data == b"" and len(stripped) < len(raw) - big.numel() * 4 + 64
    parts[0].upload.data = bytes(taken[0][1])
    assert list(parts) == list(whole)  # every command as protobuf reads the whole frame (the twice-sent one too)
    assert bulk.strip_uploads(slices.split_frame(_frame(_upload_cmd(6, small)), 8)) is None
    assert bulk.strip_uploads([]) is None
    # the worker's reading of the same bytes (no split): the same frame, positions as protobuf counts commands
    # (an empty command, which split_frame skips, is one); anything that does not read as commands: None
    empty = b"\x0a\x00"
    got = bulk.strip_payload(memoryview(empty + raw))
    assert got is not None and got[0] == empty + stripped and [i for i, _ in got[1]] == [1]
    assert bytes(got[1][0][1]) == wire.tensor_to_bytes(big)
    assert bulk.strip_payload(raw[:-1]) is None and bulk.strip_payload(b"\x12" + raw) is None
    assert bulk.strip_payload(_frame(_upload_cmd(6, small))) is None


def _session() -> tuple[Any, Any]:
    from gpupool.server.devices import FakeDevice
    from gpupool.server.executor import CommandExecutor
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    dev = FakeDevice(0, "h", 1 << 30)
    return CommandExecutor(slices.SliceLedger()), WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)


def _slice(ex: Any, s: Any, raw: bytes) -> list[Any]:
    """Run `raw` as one slice of a worker, from a buffer like its shared one; returns the data each command got."""
    got: list[Any] = []

    def execute(session: Any, cmd: Any, reply: Any, data: Any = None) -> None:
        got.append(data)
        ex.execute(session, cmd, reply, data)

    shared = memoryview(bytearray(raw) + bytearray(16))[: len(raw)]
    req = slices.SliceRequest(device_free=1 << 30, reply_room=1 << 20, budget=10.0, payload=shared)
    slices.run_commands(s, execute, ex.ledger, req, s.device.timed)
    return got


def test_a_batch_among_other_commands_runs_from_its_span_with_its_exact_bytes() -> None:
    ex, s = _session()
    x = torch.randn(128 * 1024, generator=torch.Generator().manual_seed(3))  # 512 KiB
    h, other = s.handle_base + 1, s.handle_base + 2
    raw = _frame(_upload_cmd(h, x), _upload_cmd(other, torch.ones(3)), device_pb2.Command(sync=device_pb2.Sync()))
    got = _slice(ex, s, raw)
    assert s.error is None, s.error
    assert isinstance(got[0], memoryview) and got[1] is None  # the batch from its span; the small one as before
    assert torch.equal(s.tensors[h], x) and torch.equal(s.tensors[other], torch.ones(3))


@pytest.mark.parametrize("delta", [-1, 1, -4096])
def test_a_batch_of_the_wrong_length_among_other_commands_is_refused_as_before(delta: int) -> None:
    ex, s = _session()
    x = torch.randn(128 * 1024)
    h, other = s.handle_base + 1, s.handle_base + 2
    data = wire.tensor_to_bytes(x)
    data = data[:delta] if delta < 0 else data + b"\0" * delta
    _slice(ex, s, _frame(_upload_cmd(h, x, data), _upload_cmd(other, torch.ones(3))))
    assert s.error is not None and "upload" in s.error.message
    assert h not in s.tensors or h in s.poisoned


def test_a_slices_spans_reach_the_shared_buffer_in_order_big_ones_copied_once() -> None:
    from gpupool.server import worker

    gen = torch.Generator().manual_seed(4)
    sizes = [3, 70, worker.BIG_PART, 5, 5, 3 * worker.BIG_PART + 1, 1, worker.BIG_PART - 1, worker.BIG_PART]
    parts = [memoryview(bytes(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).tolist())) for n in sizes]
    buf = bytearray(sum(sizes) + 8)
    worker._copy_parts(memoryview(buf), parts)
    assert bytes(buf) == b"".join(parts) + bytes(8)


def test_a_span_exactly_strip_min_long_is_taken_by_the_reader_and_the_worker_alike() -> None:
    """The reader's `strip_uploads` measures a span with its tag and length; the worker's `strip_payload` measured
    the command without them, so a span of STRIP_MIN..STRIP_MIN+3 bytes was checked stripped and run unstripped."""
    for over in (0, 3, 4):
        n = bulk.STRIP_MIN + over - 16
        while True:
            raw = _frame(_upload_cmd(7, torch.zeros(n, dtype=torch.uint8)))
            if len(raw) == bulk.STRIP_MIN + over:
                break
            n -= len(raw) - bulk.STRIP_MIN - over
        reader = bulk.strip_uploads(slices.split_frame(raw, 8))
        worker = bulk.strip_payload(memoryview(raw))
        assert reader is not None and worker is not None and reader[0] == worker[0], over
        assert bytes(reader[1][0][1]) == bytes(worker[1][0][1]) == bytes(n)


# ---- a captured step's batch sent by value (RunGraph.input_data) among other commands ----


def _run_cmd(data: list[bytes], graph_id: int = 1, outputs: tuple[int, ...] = (9,)) -> device_pb2.Command:
    return device_pb2.Command(
        run_graph=device_pb2.RunGraph(graph_id=graph_id, inputs=[0] * len(data), outputs=list(outputs), input_data=data)
    )


def _reinserted(stripped: bytes, taken: list[tuple[int, Any]]) -> list[Any]:
    """The commands protobuf reads from a stripped frame, each taken command's bytes put back as protobuf holds them."""
    cmds = list(device_pb2.ClientFrame.FromString(stripped).commands)
    for i, data in taken:
        if isinstance(data, list):
            assert cmds[i].WhichOneof("cmd") == "run_graph" and not cmds[i].run_graph.input_data
            cmds[i].run_graph.input_data.extend(bytes(v) for v in data)
        else:
            assert cmds[i].WhichOneof("cmd") == "upload" and not cmds[i].upload.data
            cmds[i].upload.data = bytes(data)
    return cmds


def test_a_run_graphs_inputs_are_taken_as_views_in_order_and_the_rest_read_as_protobuf_reads_it() -> None:
    gen = torch.Generator().manual_seed(6)
    big = bytes(torch.randint(0, 256, (bulk.STRIP_MIN,), dtype=torch.uint8, generator=gen).tolist())
    inputs = [b"\x01\x02\x03", big, b"", big[::-1][:1000]]
    run = _run_cmd(inputs, graph_id=3, outputs=(7, 0, 8))
    run.run_graph.drop_writes.extend([11, 12])
    # the same RunGraph with its fields out of the usual order: input_data between graph_id and the handles
    body = device_pb2.RunGraph(graph_id=3).SerializeToString()
    for data in inputs[:2]:
        body += b"\x52" + wire.varint(len(data)) + data
    body += device_pb2.RunGraph(outputs=[7, 0, 8], inputs=[0, 0, 0, 0], drop_writes=[11, 12]).SerializeToString()
    for data in inputs[2:]:
        body += b"\x52" + wire.varint(len(data)) + data
    inner = b"\xaa\x01" + wire.varint(len(body)) + body
    shuffled = b"\x0a" + wire.varint(len(inner)) + inner
    assert device_pb2.ClientFrame.FromString(shuffled).commands[0] == run
    for run_raw in (run.SerializeToString(), None):
        raw = (
            _frame(device_pb2.Command(free=device_pb2.Free(handles=[3])))
            + (_frame(run) if run_raw is not None else shuffled)
            + _frame(_upload_cmd(6, torch.arange(10, dtype=torch.float32)))
        )
        commands = slices.split_frame(raw, 100)
        got = bulk.strip_uploads(commands)
        assert got is not None
        stripped, taken = got
        assert [i for i, _ in taken] == [1] and [bytes(v) for v in taken[0][1]] == inputs
        assert all(v.obj is raw or v.obj is commands[1][1].obj for v in taken[0][1])  # views of the frame
        assert len(stripped) < len(raw) - len(big) - 1000
        whole = list(device_pb2.ClientFrame.FromString(raw).commands)
        assert _reinserted(stripped, taken) == whole
        worker = bulk.strip_payload(memoryview(raw))  # the worker's reading of the same bytes
        assert worker is not None and worker[0] == stripped and [i for i, _ in worker[1]] == [1]
        assert [bytes(v) for v in worker[1][0][1]] == inputs
    # a small RunGraph, or a big one without input_data: left to protobuf
    assert bulk.strip_uploads(slices.split_frame(_frame(_run_cmd([b"abc"])), 8)) is None
    many = device_pb2.Command(
        run_graph=device_pb2.RunGraph(graph_id=1, outputs=list(range(1 << 40, (1 << 40) + 12000)))
    )
    assert len(_frame(many)) >= bulk.STRIP_MIN
    assert bulk.strip_uploads(slices.split_frame(_frame(many), 8)) is None and bulk.strip_payload(_frame(many)) is None


def test_a_run_graph_span_at_strip_min_is_taken_by_the_reader_and_the_worker_alike() -> None:
    for over in (-1, 0, 1):
        n = bulk.STRIP_MIN + over - 16
        while True:
            raw = _frame(_run_cmd([bytes(n)]))
            if len(raw) == bulk.STRIP_MIN + over:
                break
            n -= len(raw) - bulk.STRIP_MIN - over
        reader = bulk.strip_uploads(slices.split_frame(raw, 8))
        worker = bulk.strip_payload(memoryview(raw))
        if over < 0:
            assert reader is None and worker is None
            continue
        assert reader is not None and worker is not None and reader[0] == worker[0], over
        assert [bytes(v) for v in reader[1][0][1]] == [bytes(v) for v in worker[1][0][1]] == [bytes(n)]


def test_garbled_frames_read_stripped_exactly_as_protobuf_reads_them_whole() -> None:
    """Every frame, however garbled: where the reader or the worker takes bytes out, protobuf refuses the stripped
    frame exactly where it refuses the whole one, and otherwise reads the same commands (the bytes put back)."""
    gen = torch.Generator().manual_seed(11)
    x = bytes(torch.randint(0, 256, (bulk.STRIP_MIN + 5,), dtype=torch.uint8, generator=gen).tolist())
    run = _run_cmd([b"\x05" * 7, x, b"\x09" * 3], outputs=(4, 5))
    run.run_graph.drop_writes.append(6)
    good = _frame(device_pb2.Command(sync=device_pb2.Sync(request_id=1)), run, _upload_cmd(8, torch.ones(3)))
    good += _frame(_upload_cmd(9, torch.zeros(bulk.STRIP_MIN // 4 + 1)))
    taken = refused = 0
    for k in range(3000):
        raw = bytearray(good)
        for _ in range(1 + k % 3):  # a byte or three changed in the frame's head, the RunGraph's fields, anywhere
            at = int(torch.randint(0, 64 if k % 2 else len(raw), (1,), generator=gen))
            raw[at] = int(torch.randint(0, 256, (1,), generator=gen))
        if k % 5 == 0:
            raw = raw[: int(torch.randint(1, len(raw), (1,), generator=gen))]  # cut short
        raw_b = bytes(raw)
        try:
            whole: Any = list(device_pb2.ClientFrame.FromString(raw_b).commands)
        except DecodeError:
            whole = None
        got = bulk.strip_payload(memoryview(raw_b))
        if got is not None:
            taken += 1
            try:
                again: Any = _reinserted(*got)
            except DecodeError:
                again = None
            assert again == whole, k
            refused += whole is None
        try:
            commands = slices.split_frame(raw_b, 100)
        except Exception:
            continue
        got = bulk.strip_uploads(commands)
        if got is not None:
            try:
                device_pb2.ClientFrame.FromString(got[0])
                ok = True
            except DecodeError:
                ok = False
            assert ok == (whole is not None), k
    assert taken > 300 and refused > 10  # the mutations reached both outcomes


def _graph_session(n: int, dtype: torch.dtype = torch.uint8, view: bool = False) -> tuple[Any, Any]:
    """A fake GPU session with graph 1: one input of `n` elements, output its clone (`view`: a view of it)."""
    ex, s = _session()
    body = [device_pb2.Op(name="aten::alias" if view else "aten::clone", args=[tensor_pb2.Arg(tensor=1)], outputs=[2])]
    meta = wire.meta_to_proto(torch.zeros(n, dtype=dtype))
    define = device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=[meta], ops=body, outputs=[2])
    ex.execute(s, device_pb2.Command(define_graph=define), lambda _: None)
    assert s.error is None, s.error
    return ex, s


def test_a_batch_sent_by_value_reaches_the_graphs_input_with_its_exact_bytes_at_every_size() -> None:
    gen = torch.Generator().manual_seed(12)
    base = bulk.STRIP_MIN - 40  # the span is ~30 bytes longer than its input: spans around STRIP_MIN
    for n in (1, base - 1, base, base + 9, base + 10, base + 11, bulk.STRIP_MIN, 4 * bulk.STRIP_MIN + 3):
        ex, s = _graph_session(n)
        for k in range(3):
            x = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
            out = s.handle_base + 10 + k
            raw = _frame(
                device_pb2.Command(sync=device_pb2.Sync()), _run_cmd([wire.tensor_to_bytes(x)], outputs=(out,))
            )
            got = _slice(ex, s, raw)
            assert s.error is None, (n, s.error)
            assert isinstance(got[1], list) == (len(raw) - 4 >= bulk.STRIP_MIN)  # taken out of the span
            assert torch.equal(s.tensors[out], x), n


@pytest.mark.parametrize("delta", [-1, 1, -4096])
def test_a_batch_sent_by_value_of_the_wrong_length_is_refused_as_before(delta: int) -> None:
    n = 128 * 1024
    for strip in (True, False):
        ex, s = _graph_session(n)
        data = bytes(n + delta) if delta > 0 else bytes(n)[:delta]
        raw = _frame(_run_cmd([data], outputs=(s.handle_base + 5,)))
        if strip:
            got = _slice(ex, s, raw)
            assert isinstance(got[0], list)
        else:
            ex.execute(s, device_pb2.ClientFrame.FromString(raw).commands[0], lambda _: None)
        assert s.error is not None and f"{len(data)} bytes given by value" in s.error.message
        assert s.handle_base + 5 not in s.tensors or s.handle_base + 5 in s.poisoned


def test_a_runs_output_never_shows_the_next_slices_bytes() -> None:
    """A graph whose output is a view of its input sent by value: the input's memory is the tensor's own, not the
    slice's payload (the shared buffer, which the next slice overwrites)."""
    n = 2 * bulk.STRIP_MIN
    ex, s = _graph_session(n, view=True)
    shared = memoryview(bytearray(n + 4096))
    first = torch.full((n,), 7, dtype=torch.uint8)
    outs = [s.handle_base + 10, s.handle_base + 11]
    for out, x in zip(outs, (first, torch.full((n,), 200, dtype=torch.uint8)), strict=True):
        raw = _frame(_run_cmd([wire.tensor_to_bytes(x)], outputs=(out,)))
        shared[: len(raw)] = raw  # the same buffer, slice after slice, as a worker's shared one
        req = slices.SliceRequest(device_free=1 << 30, reply_room=1 << 20, budget=10.0, payload=shared[: len(raw)])
        slices.run_commands(s, ex.execute, ex.ledger, req, s.device.timed)
        assert s.error is None, s.error
    assert torch.equal(s.tensors[outs[0]], first) and int(s.tensors[outs[1]][0]) == 200
