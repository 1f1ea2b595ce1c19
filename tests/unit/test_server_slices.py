"""The daemon <-> worker boundary: frames cut into command spans without parsing, and a worker's result parsed
defensively (a compromised worker must not make the daemon allocate, crash or mislabel metrics)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from gpupool.server import slices
from grpc import StatusCode

from gpupool import protocol
from gpupool._proto import device_pb2
from gpupool.errors import InvalidArgument, ResourceExhausted


def frame(*cmds: device_pb2.Command) -> bytes:
    return device_pb2.ClientFrame(commands=list(cmds)).SerializeToString()


@pytest.fixture(params=["python", "native"])
def reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """`slices.split_frame` with the Python reading alone, and with native_runner.cpp's `split_frame` first (the
    stream reader's where the runner is built; skipped where it cannot be)."""
    if request.param == "native":
        mod = request.getfixturevalue("native_runner_module")
        monkeypatch.setattr(slices, "_native", [mod.split_frame])
    else:
        monkeypatch.setattr(slices, "_native", [None])
    return str(request.param)


def test_split_frame_keeps_each_command_and_its_kind(reading: str) -> None:
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


def test_split_frame_refuses_floods_and_garbage(reading: str) -> None:
    many = frame(*[device_pb2.Command(free=device_pb2.Free(handles=[1]))] * 10)
    with pytest.raises(ResourceExhausted, match="more than 9 commands"):
        slices.split_frame(many, 9)
    for bad in (b"\x12\x00", b"\x0a\xff", b"\x0a\x05ab"):
        with pytest.raises(InvalidArgument):
            slices.split_frame(bad, 9)


def test_split_graphs_tells_a_frame_holding_a_run_graph_from_any_position(reading: str) -> None:
    """Round 45: the front's reader skips its protobuf check of a small frame that holds no RunGraph (the worker's
    parse checks it), so `split_graphs` must flag every frame a worker could run from its bytes without a parse
    (native_runner.cpp `graph_frame` takes commands whose first tag is run_graph's): a RunGraph first, last, among
    eager records, malformed, or written with a non-canonical key; and the cut itself is `split_frame`'s. A RunGraph
    field behind another first tag is not flagged: `graph_frame` refuses such a command, and upb parses it in the
    worker (its own test: tests/integration/test_side_frames.py)."""
    eager = device_pb2.Command(eager_op=b"\x01\x02")
    sync = device_pb2.Command(sync=device_pb2.Sync(request_id=2))
    upload = device_pb2.Command(upload=device_pb2.Upload(handle=7, data=b"x" * 300))
    run = device_pb2.Command(run_graph=device_pb2.RunGraph(graph_id=3, inputs=[1, 2]))
    bad_run = b"\x0a\x05\xaa\x01\x02\x08\xff"  # a RunGraph whose graph_id's varint never ends
    long_key = b"\x0a\x05\xaa\x81\x00\x00\x00"  # run_graph's key as a three-byte varint, an empty message
    hidden = b"\x0a\x09\xf2\x01\x01\x00\xaa\x01\x02\x08\x07"  # an eager record, then a RunGraph field
    cases = [
        (frame(eager, sync), False),
        (frame(eager, upload, eager, sync), False),
        (frame(run), True),
        (frame(run, sync), True),
        (frame(eager, eager, run), True),
        (frame(eager, sync) + bad_run + frame(sync), True),
        (frame(eager) + long_key, True),
        (frame(eager) + hidden, False),
        (frame(eager, device_pb2.Command(), sync), False),
    ]
    for raw, graphs in cases:
        marks: list[int] = []
        got, flag = slices.split_graphs(raw, 16, marks)
        assert flag is graphs, raw
        again: list[int] = []
        assert [(k, bytes(v)) for k, v in got] == [(k, bytes(v)) for k, v in slices.split_frame(raw, 16, again)]
        assert marks == again
    with pytest.raises(InvalidArgument):
        slices.split_graphs(b"\x0a\x05\xaa\x01", 16, [])


def test_results_round_trip_and_lies_are_refused() -> None:
    r = slices.SliceResult(
        3, 0.25, 100, 5, 7, 1, 2, {StatusCode.INVALID_ARGUMENT: 1}, {"replayed": 2}, [b"frame", [b"a", b"bb"]]
    )
    r.graph_bytes = 5_080  # its graphs' host memory (Status, metrics)
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


def test_results_with_impossible_codes_or_reply_shapes_are_malformed() -> None:
    """Round 17: a worker's result naming a status code past the known ones, or a single reply of no frames (or
    two), raised IndexError (or passed, a frame dropped), not the ValueError worker.Runner turns into WorkerDied:
    it escaped the runner's checks, caught only by the device thread's last line of defence, instead of ending
    the session with a clear error."""
    ok = slices.SliceResult(1, 0.1, 0, 0, 0, 0, 0, {StatusCode.INVALID_ARGUMENT: 1}, {}, [b"frame"])
    body = bytearray(b"".join(slices.encode_result(ok))[4:])
    at = slices._RES.size
    assert slices.decode_result(bytes(body), 1) == ok
    bad_code = bytearray(body)
    bad_code[at] = 200
    with pytest.raises(ValueError, match="status code"):
        slices.decode_result(bytes(bad_code), 1)
    for count in (0, 2):
        head = slices.SliceResult(1, 0.1, 0, 0, 0, 0, 0, {}, {}, [])
        lie = b"".join(slices.encode_result(head))[4:]
        lie = bytearray(lie)
        struct.pack_into("<I", lie, slices._RES.size - 5, 1)  # n_rep: one reply
        lie += struct.pack("<BI", 0, count) + b"".join(struct.pack("<I", 1) + b"x" for _ in range(count))
        with pytest.raises(ValueError, match="not a list"):
            slices.decode_result(bytes(lie), 1)


def test_one_frame_replies_are_checked_like_any_other() -> None:
    """Round 17 (front17): a reply of one plain frame (the usual: a sync's answer) is read in one step; a length
    past the result's end, a side chunk's flag, or a cut anywhere are refused all the same."""
    r = slices.SliceResult(2, 0.1, 0, 0, 0, 0, 0, {}, {}, [b"frame", b"x" * 20])
    body = b"".join(slices.encode_result(r))[4:]
    assert slices.decode_result(body, 2) == r
    at = slices._RES.size + 5  # the first reply's length word
    past = bytearray(body)
    struct.pack_into("<I", past, at, len(body))
    with pytest.raises(ValueError, match="past the result's end"):
        slices.decode_result(bytes(past), 2)
    side = bytearray(body)
    struct.pack_into("<I", side, at, 5 | slices.SIDE)
    with pytest.raises(ValueError, match="side chunk"):
        slices.decode_result(bytes(side), 2)  # no download slot was given: no side chunk may come back
    for cut in range(len(body)):
        with pytest.raises((ValueError, struct.error)):
            slices.decode_result(body[:cut], 2)


def test_partial_results_and_pending_errors_round_trip_and_lies_are_refused() -> None:
    r = slices.SliceResult(2, 0.1, 0, 0, 0, 0, 12, {}, {}, [[b"piece"]], error_pending=True, partial=True)
    body = b"".join(slices.encode_result(r))[4:]
    r.replies = [b"piece"]
    assert slices.decode_result(body, 3) == r
    with pytest.raises(ValueError):
        slices.decode_result(body, 2)  # the partial command must be one it was sent
    # A piece of a graph's definition answers nothing (the daemon charges such a piece its wall time: a worker
    # that claims pieces forever pays for each in its share of the device).
    empty = slices.SliceResult(0, 0.1, 0, 0, 0, 0, 0, {}, {}, [], partial=True)
    assert slices.decode_result(b"".join(slices.encode_result(empty))[4:], 3) == empty
    with pytest.raises(ValueError):
        slices.decode_result(b"".join(slices.encode_result(empty))[4:], 0)


def _reference_split(raw: bytes, max_commands: int) -> list[tuple[int, bytes]]:
    """The plain reading of split_frame's contract (round 8's code, one varint loop per field): the fast paths
    of the real one must give exactly this, and the same errors."""
    out: list[tuple[int, bytes]] = []
    i, n = 0, len(raw)
    while i < n:
        start = i
        if raw[i] != 0x0A:
            raise InvalidArgument("tag")
        i += 1
        length = shift = 0
        while True:
            if i >= n or shift > 35:
                raise InvalidArgument("truncated")
            b = raw[i]
            i += 1
            length |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        if i + length > n:
            raise InvalidArgument("past the end")
        kind = tag = shift = 0
        j = i
        while j < i + length and shift < 35:
            b = raw[j]
            tag |= (b & 0x7F) << shift
            if b < 0x80:
                kind = tag >> 3
                break
            j += 1
            shift += 7
        i += length
        if kind == 0 and length:  # an empty command asks for nothing; any other starts with a field's tag
            raise InvalidArgument("no field tag")
        if kind == 0:
            continue
        if len(out) >= max_commands:
            raise ResourceExhausted("more")
        out.append((kind, raw[start:i]))
    return out


def test_split_frame_fast_paths_match_the_plain_reading(reading: str) -> None:
    """Random frames of real commands (one- and two-byte tags, one- and two-byte lengths, empty commands), and
    every truncation and one-byte change of them: the same spans and kinds, or the same kind of error; and the
    positions of the Uploads and Gets among them (`bulk`: what the stream's reader hands the side channel)."""
    import random

    rng = random.Random(7)
    record = device_pb2.Command(eager_op=b"r" * 40)
    cmds = [
        record,
        device_pb2.Command(eager_op=b"x" * 200),  # a two-byte length
        device_pb2.Command(),
        device_pb2.Command(sync=device_pb2.Sync(request_id=3)),
        device_pb2.Command(get=device_pb2.Get(request_id=1, handle=9)),
        device_pb2.Command(free=device_pb2.Free(handles=[1, 2])),
        device_pb2.Command(upload=device_pb2.Upload(handle=7, data=b"y" * 130)),
        device_pb2.Command(run_graph=device_pb2.RunGraph(graph_id=2)),
    ]
    frames = [frame(*rng.choices(cmds, k=rng.randint(0, 12))) for _ in range(40)]
    frames += [b"\x0a\x00", b"\x0a", b"\x0a\x80", b"\x0a\x01\x00", b"\x0a\x02\xf2\x81", b"\x0a\x03\xf2\x81\x01"]
    tried = 0
    for raw in frames:
        variants = [raw, *(raw[:k] for k in range(len(raw)))]
        for _ in range(20):
            if raw:
                k = rng.randrange(len(raw))
                variants.append(raw[:k] + bytes([rng.randrange(256)]) + raw[k + 1 :])
        for v in variants:
            for limit in (3, 4096):
                tried += 1
                try:
                    want: Any = [(k, bytes(s)) for k, s in _reference_split(v, limit)]
                    bulk = [n for n, (k, _) in enumerate(want) if k in (protocol.UPLOAD, protocol.GET)]
                    want = (want, bulk)
                except (InvalidArgument, ResourceExhausted) as exc:
                    want = type(exc)
                try:
                    marked: list[int] = []
                    got: Any = ([(k, bytes(s)) for k, s in slices.split_frame(v, limit, marked)], marked)
                except (InvalidArgument, ResourceExhausted) as exc:
                    got = type(exc)
                assert got == want, (v, limit)
    assert tried > 5000


def test_split_frame_reads_lengths_of_any_size_and_marks_bulk_commands(reading: str) -> None:
    """Lengths of one, two and three bytes, lengths written with needless more bytes (protobuf reads them), each
    command whole; the bulk marks are the Uploads' and Gets' positions among the commands."""
    cmds = [
        device_pb2.Command(eager_op=b"a" * 20),
        device_pb2.Command(upload=device_pb2.Upload(handle=7, data=b"u" * 200)),
        device_pb2.Command(eager_op=b"b" * 20000),  # a three-byte length
        device_pb2.Command(get=device_pb2.Get(request_id=1, handle=7)),
    ]
    raw = frame(*cmds)
    marked: list[int] = []
    spans = slices.split_frame(raw, 16, marked)
    assert [device_pb2.ClientFrame.FromString(bytes(s)).commands[0] for _, s in spans] == cmds
    assert marked == [1, 3]
    for cmd, kind, bulk in ((cmds[0], spans[0][0], []), (cmds[1], protocol.UPLOAD, [0])):
        body = cmd.SerializeToString()
        for extra in (1, 2):
            padded = b"\x0a" + _padded_varint(len(body), extra) + body
            assert device_pb2.ClientFrame.FromString(padded).commands[0] == cmd
            marked = []
            assert [(k, bytes(s)) for k, s in slices.split_frame(padded, 16, marked)] == [(kind, padded)]
            assert marked == bulk


def _padded_varint(value: int, extra: int) -> bytes:
    """`value` as a varint of `extra` more bytes than it needs (continuation bits over zero groups)."""
    out = []
    while True:
        out.append(value & 0x7F)
        value >>= 7
        if not value:
            break
    out += [0] * extra
    return bytes([b | 0x80 for b in out[:-1]] + [out[-1]])


def test_write_result_writes_exactly_encode_results_bytes() -> None:
    buf = memoryview(bytearray(4096))
    cases = [
        slices.SliceResult(32, 0.002, 100, 5, 7, 0, 0),
        slices.SliceResult(
            3,
            0.25,
            100,
            5,
            7,
            1,
            2,
            {StatusCode.INVALID_ARGUMENT: 1, StatusCode.INTERNAL: 2},
            {"replayed": 2},
            [b"frame", b"", b"z" * 300],
            error_pending=True,
        ),  # fmt: skip
        slices.SliceResult(1, 0.0, 0, 0, 0, 0, 0, {}, {"x" * 40: 1, "defined": 3}),
        slices.SliceResult(2, 0.1, 0, 0, 0, 0, 12, {}, {}, [b"piece"], partial=True),
        # quiet results (round 44: no replies, no errors, each event a known name): a captured step's, flags set
        slices.SliceResult(1, 0.001, 10, 70, 9, 0, 0, {}, {"replayed": 1}, graph_bytes=4096),
        slices.SliceResult(0, 0.5, 1, 2, 3, 4, 5, {}, {}, [], error_pending=True, partial=True, busy=True),
        slices.SliceResult(9, 0.0, 0, 0, 0, 0, 0, {}, {e: k + 1 for k, e in enumerate(slices.GRAPH_EVENTS)}),
        slices.SliceResult(7, 0.2, 0, 0, 0, 0, 0, {}, {slices.LEARNED_OPS: 7, slices.NATIVE_OPS: 5, "traced": 1}),
        slices.SliceResult(1, 0.0, 0, 0, 0, 0, 0, {}, {"replayed": 1, "y" * 3: 2}),  # a name no ledger makes
    ]
    for r in cases:
        size = slices.write_result(r, buf)
        assert bytes(buf[:size]) == b"".join(bytes(p) for p in slices.encode_result(r))[4:]
    # what it leaves to encode_result: a download's frame list, side chunks, tensor views, too little room
    for replies in ([[b"a", b"b"]], [slices.SideChunk(1, None, 0, True, 0, 8)], [bytearray(b"x")]):
        assert slices.write_result(slices.SliceResult(1, replies=replies), buf) == -1
    assert slices.write_result(slices.SliceResult(1, replies=[b"x" * 5000]), buf) == -1
    assert slices.write_result(slices.SliceResult(1, events={"replayed": 1}), memoryview(bytearray(70))) == -1


def test_a_shared_request_is_encode_requests_bytes_in_one_piece() -> None:
    for req in (slices.SliceRequest(1, 2, 0.005, b""), slices.SliceRequest(-5, 0, 1.5, b"", uploads=True, slot=1)):
        assert slices.shared_request(req, 777) == b"".join(bytes(p) for p in slices.encode_request(req, shared=777))


def test_split_frame_against_protobuf_on_hostile_bytes(reading: str) -> None:
    """protobuf is the reference: real frames with bytes changed, cut, inserted or flipped. Whenever split_frame
    accepts a frame protobuf also accepts, its spans are protobuf's non-empty commands one for one, each a whole
    command (never one command read as two); whenever it accepts a frame protobuf refuses, some span is not a
    canonical Upload, so the stream reader's own protobuf parse still runs and refuses it (`bulk.uploads_only`:
    only frames of canonical uploads skip it). A command whose first tag names field 0 was dropped unread, and a
    big frame of canonical uploads around it was then accepted without protobuf's parse."""
    import random

    from google.protobuf.message import DecodeError
    from gpupool.server import bulk

    rng = random.Random(19)
    sample = [
        device_pb2.Command(upload=device_pb2.Upload(handle=(1 << 40) + 3, data=b"u" * 150)),
        device_pb2.Command(get=device_pb2.Get(request_id=9, handle=5)),
        device_pb2.Command(op=device_pb2.Op(name="aten::add.Tensor" * 10)),
        device_pb2.Command(sync=device_pb2.Sync(request_id=3)),
        device_pb2.Command(eager_op=b"e" * 20),
    ]
    both = 0
    for _ in range(20000):
        raw = bytearray(frame(*rng.choices(sample, k=rng.randint(0, 3))))
        for _ in range(rng.choice([1, 1, 2, 3])):
            if not raw:
                break
            j, how = rng.randrange(len(raw)), rng.random()
            if how < 0.4:
                raw[j] = rng.randrange(256)
            elif how < 0.6:
                del raw[j:]
            elif how < 0.8:
                raw[j:j] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
            else:
                raw[j] ^= 0x80
        try:
            spans = [bytes(s) for _, s in slices.split_frame(bytes(raw), 1000)]
        except (InvalidArgument, ResourceExhausted):
            continue
        try:
            ref = [c for c in device_pb2.ClientFrame.FromString(bytes(raw)).commands if c.ByteSize()]
        except DecodeError:
            assert not (spans and all(bulk.parse_upload(memoryview(s)) for s in spans)), bytes(raw).hex()
            continue
        both += 1
        one_each = [device_pb2.ClientFrame.FromString(s).commands for s in spans]
        assert all(len(c) == 1 for c in one_each) and [c[0] for c in one_each] == ref, bytes(raw).hex()
    assert both > 2000
    garbage = b"\x0a\x05\x04\x32\x02\x08\x03"  # a command whose first tag is field 0 (wire type 4)
    with pytest.raises(InvalidArgument, match="no valid field tag"):
        slices.split_frame(garbage + frame(sample[0]), 16)


COPY_FRAME = 64 * 1024  # native_runner.cpp's: a frame up to this long has its spans copied (bytes), a longer one viewed


def protocol_run_graph() -> int:
    return device_pb2.Command.DESCRIPTOR.fields_by_name["run_graph"].number


def _agree(split: Any, raw: bytes | memoryview, limit: int) -> bool:
    """The C++ `split` and `py_split_frame` on `raw`: the same spans, kinds, bulk positions and RunGraph flag (round
    45) where the Python
    reading accepts it (True), None where it raises (False). The C++ spans of a frame of up to COPY_FRAME bytes are
    bytes objects (copies, round 43), a longer frame's views of `raw`. `raw` may be a read-only view of the start of a
    longer buffer (a side socket's reused frame buffer: gpupool/records.py `body_into`): its spans never reach past
    the view."""
    got = split(raw, limit, protocol.UPLOAD, protocol.GET)
    marked: list[int] = []
    try:
        want = [(k, bytes(s)) for k, s in slices.py_split_frame(raw, limit, marked)]
    except (InvalidArgument, ResourceExhausted):
        assert got is None, (raw.hex(), limit)
        return False
    assert got is not None, (raw.hex(), limit)
    spans, marks, graphs = got
    assert graphs is (protocol_run_graph() in [k for k, _ in want]), (raw.hex(), limit)  # `slices.split_graphs`
    if len(raw) <= COPY_FRAME:
        assert all(type(s) is bytes for _, s in spans)
    else:
        assert all(type(s) is memoryview and s.obj is (raw.obj if type(raw) is memoryview else raw) for _, s in spans)
    assert ([(k, bytes(s)) for k, s in spans], marks) == (want, marked), (raw.hex(), limit)
    return True


def test_native_split_frame_is_the_python_reading_or_leaves_it_the_frame(native_runner_module: Any) -> None:
    """native_runner.cpp's `split_frame` (the stream reader's for every frame, in the daemon's own process) against
    `py_split_frame` on real frames and on every truncation and one-byte change of them, flipped continuation bits
    and inserted bytes, at limits that cut and that do not: wherever the Python reading accepts a frame the C++ one
    gives the very same kinds, spans and bulk positions (so it never just hands every frame back); wherever the
    Python reading refuses one the C++ one gives None, before anything (the caller then raises Python's error). So
    for a contiguous view of bytes (a side socket's frame buffer); any other buffer is left to Python."""
    import random

    split = native_runner_module.split_frame
    rng = random.Random(24)
    cmds = [
        device_pb2.Command(eager_op=b"r" * 40),
        device_pb2.Command(eager_op=b"x" * 200),  # a two-byte length
        device_pb2.Command(),
        device_pb2.Command(sync=device_pb2.Sync(request_id=3, scalar_handles=[(1 << 32) + 7])),
        device_pb2.Command(get=device_pb2.Get(request_id=1, handle=9)),
        device_pb2.Command(free=device_pb2.Free(handles=[1, 2])),
        device_pb2.Command(upload=device_pb2.Upload(handle=7, data=b"u" * 130)),
        device_pb2.Command(run_graph=device_pb2.RunGraph(graph_id=2)),
    ]
    frames = [frame(*rng.choices(cmds, k=rng.randint(0, 12))) for _ in range(40)]
    big = frame(cmds[0], device_pb2.Command(eager_op=b"y" * 20000), cmds[6])  # a three-byte length
    frames += [b"", b"\x0a\x00", b"\x0a", b"\x0a\x80", b"\x0a\x01\x00", b"\x0a\x02\xf2\x81", b"\x0a\x03\xf2\x81\x01"]
    frames += [b"\x0a\x05\x04\x32\x02\x08\x03"]  # a first tag of field 0
    frames += [b"\x0a\x86\x80\x80\x80\x80\x00" + b"\x08" * 6]  # a six-byte length (the most read)
    frames += [b"\x0a\x87\x80\x80\x80\x80\x80\x00" + b"\x08" * 7]  # a seven-byte length: refused
    frames += [b"\x0a\x06\xf8\xff\xff\xff\x7f\x00"]  # a five-byte first tag
    frames += [b"\x0a\x06\x80\x80\x80\x80\x80\x08"]  # a first tag of more than five bytes: no kind
    accepted = refused = viewed = 0
    for raw in frames:
        variants = [raw, *(raw[:k] for k in range(len(raw)))]
        for _ in range(30):
            if not raw:
                break
            k, how = rng.randrange(len(raw)), rng.random()
            if how < 0.5:
                variants.append(raw[:k] + bytes([rng.randrange(256)]) + raw[k + 1 :])
            elif how < 0.75:
                variants.append(raw[:k] + bytes([raw[k] ^ 0x80]) + raw[k + 1 :])
            else:
                variants.append(raw[:k] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 3))) + raw[k:])
        for v in variants:
            for limit in (1, 3, 4096):
                if _agree(split, v, limit):
                    accepted += 1
                else:
                    refused += 1
            # the same frame at the start of a longer buffer, as a side socket's reader hands it on (the bytes past
            # it a frame that would be accepted: read past the view, they would change the answer)
            viewed += _agree(split, memoryview(bytearray(v) + frame(cmds[0], cmds[4]))[: len(v)].toreadonly(), 4096)
    assert accepted > 1500 and refused > 20000, (accepted, refused)
    assert viewed > 500, viewed
    for v in (big, big[:-1], big[:46], big[:47], big[:20040]):
        if _agree(split, v, 16):
            assert len(slices.py_split_frame(v, 16)) == 3
    # past COPY_FRAME the spans are views (of the frame, or of the buffer a view of its start is of)
    huge = frame(cmds[0], device_pb2.Command(eager_op=b"z" * COPY_FRAME), cmds[6])
    for v in (huge, huge[:-1], memoryview(bytearray(huge) + frame(cmds[0]))[: len(huge)].toreadonly()):
        assert len(v) > COPY_FRAME
        if _agree(split, v, 16):
            assert len(slices.py_split_frame(v, 16)) == 3
    ok = frame(cmds[0], cmds[7])
    released = memoryview(ok)
    released.release()
    strided = memoryview(bytearray(ok) * 2)[::2]
    for other in (bytearray(ok), memoryview(ok * 4).cast("I"), strided, released):  # not bytes, nor a view of bytes
        assert split(other, 16, protocol.UPLOAD, protocol.GET) is None


def test_native_split_frame_copies_a_small_frames_spans(native_runner_module: Any) -> None:
    """A frame of up to COPY_FRAME bytes (an eager step's, a synced call's) is cut into spans of their own (bytes
    copies, round 43: a memoryview slice a command cost the front's reader ~1,000 instructions): they keep their bytes
    when the buffer the frame was read into is reused (a side socket's frame buffer, gpupool/records.py `body_into`),
    and hold no reference to it; a longer frame's spans stay views of it, whose memory it already holds."""
    split = native_runner_module.split_frame
    cmds = [device_pb2.Command(eager_op=b"r" * 40), device_pb2.Command(upload=device_pb2.Upload(handle=7, data=b"u"))]
    raw = frame(*cmds)
    buf = bytearray(raw) + bytes(16)
    got = split(memoryview(buf)[: len(raw)].toreadonly(), 16, protocol.UPLOAD, protocol.GET)
    assert got is not None
    spans, marks, graphs = got
    assert marks == [1] and graphs is False
    buf[:] = bytes(len(buf))  # the buffer reused for the next frame
    assert [(k, bytes(s)) for k, s in spans] == [(k, bytes(s)) for k, s in slices.py_split_frame(raw, 16)]
    assert [type(s) for _, s in spans] == [bytes, bytes]
    buf += b"x"  # no view of the buffer is left (a bytearray with exports refuses to grow)
    huge = frame(device_pb2.Command(eager_op=b"z" * COPY_FRAME))
    cut = split(huge, 16, protocol.UPLOAD, protocol.GET)
    assert cut is not None and type(cut[0][0][1]) is memoryview and cut[0][0][1].obj is huge


def _varint(n: int, pad: int = 0) -> bytes:
    """`n` as a varint, made `pad` bytes longer than it needs (overlong: continuation bits over zero groups)."""
    if not pad:
        return protocol.varint(n)
    out = bytearray(protocol.varint(n)) + b"\x00" * pad
    out[-pad - 1] |= 0x80
    for i in range(len(out) - pad, len(out) - 1):
        out[i] |= 0x80
    return bytes(out)


def test_native_split_frame_agrees_on_structured_hostile_frames(native_runner_module: Any) -> None:
    """native_runner.cpp's `split_frame` against `py_split_frame` on frames built at its reading's edges rather than
    mutated from real ones: each command's length a varint of one to ten bytes (overlong ones too) whose value is
    its body's, or near 2^31, 2^32, 2^35, 2^42, 2^63, 2^64 - 1; its first tag any wire type 0-7 of field numbers at
    protobuf's limits and past them (0, 2^29 - 1, 2^29, 2^31, 2^32 - 1), up to six bytes long; bodies cut short,
    nested commands, limits of 1 to 2^62. The C++ reading gives the Python one's spans, kinds and positions, or None
    exactly where the Python one raises (run under ASan/UBSan by scripts/runner_asan.sh)."""
    import random

    split = native_runner_module.split_frame
    rng = random.Random(25)
    fields = [1, 2, 3, 4, 5, 6, 15, 16, 20, 30, 70, 71, 2047, 2048, (1 << 29) - 1, 1 << 29, 1 << 31, (1 << 32) - 1]
    huge = [1 << 31, (1 << 31) - 1, (1 << 32) - 1, 1 << 32, (1 << 32) + 1, 1 << 35, (1 << 42) - 1, 1 << 42, 1 << 63]
    huge += [(1 << 64) - 1]

    def command() -> bytes:
        field = rng.choice([*fields, 0, rng.randrange(1 << 32)])
        tag = _varint(field << 3 | rng.randrange(8), rng.choice([0, 0, 0, 1, 2, 5]))
        body = tag + bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 9, 130])))
        if rng.random() < 0.1:
            body = b"\x0a" + _varint(len(body)) + body  # a command inside a command
        n = len(body)
        how = rng.random()
        if how < 0.1:
            n = rng.choice(huge)
        elif how < 0.15:
            body = body[: rng.randrange(len(body) + 1)]  # cut short of its length
        elif how < 0.2:
            body = b""
            n = 0
        length = _varint(n, rng.choice([0, 0, 0, 1, 3, 5, 8]))[:10]
        return b"\x0a" + length + body

    accepted = refused = 0
    for _ in range(6000):
        raw = b"".join(command() for _ in range(rng.choice([1, 1, 2, 3, 7])))
        if rng.random() < 0.05:
            raw = raw[: rng.randrange(len(raw) + 1)]
        for limit in (1, 2, 4096, 1 << 62):
            if _agree(split, raw, limit):
                accepted += 1
            else:
                refused += 1
    assert accepted > 3000 and refused > 8000, (accepted, refused)


def test_the_front_waits_for_the_runners_build_and_then_keeps_its_answer(
    monkeypatch: pytest.MonkeyPatch, native_runner_module: Any
) -> None:
    """`slices.native_split` in a front whose zygote has not built the runner yet: the Python reading for now, asked
    again after NATIVE_RETRY seconds (not per frame), then the build's `split_frame` for good; a runner that is
    disabled or unavailable (`decided`) is settled at once, on the Python reading."""
    import time

    from gpupool.server import native_runner

    monkeypatch.setattr(slices, "_native", [])
    monkeypatch.setattr(slices, "_native_asked", [0.0])
    monkeypatch.setattr(native_runner, "built", lambda: None)
    monkeypatch.setattr(native_runner, "decided", lambda: False)
    assert slices.native_split() is None and slices._native == []
    monkeypatch.setattr(native_runner, "built", lambda: native_runner_module)
    assert slices.native_split() is None  # asked within NATIVE_RETRY seconds: not yet
    slices._native_asked[0] = time.monotonic() - slices.NATIVE_RETRY - 1
    assert slices.native_split() is native_runner_module.split_frame
    assert slices._native == [native_runner_module.split_frame]
    raw = frame(device_pb2.Command(eager_op=b"e" * 9))
    assert [(k, bytes(s)) for k, s in slices.split_frame(raw, 4)] == [(30, raw)]
    monkeypatch.setattr(slices, "_native", [])
    monkeypatch.setattr(slices, "_native_asked", [0.0])
    monkeypatch.setattr(native_runner, "built", lambda: None)
    monkeypatch.setattr(native_runner, "decided", lambda: True)
    assert slices.native_split() is None and slices._native == [None]


BAD_EAGER = b"\x0a\x03\xf2\x01\x7f"  # a command cut as kind 30 (an eager op) whose body protobuf refuses


def _upload(handle: int, value: float) -> bytes:
    up = device_pb2.Command(upload=device_pb2.Upload(handle=handle, last=True, data=struct.pack("<f", value)))
    up.upload.meta.dtype, up.upload.meta.shape[:] = 1, [1]
    return device_pb2.ClientFrame(commands=[up]).SerializeToString()


@pytest.mark.parametrize("runner", ["native", "python"])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_a_worker_runs_the_commands_before_a_malformed_one_and_says_so(
    runner: str, where: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 44: the front leaves a small frame's commands to the worker's parse (`service.DeviceServicer._frame`).
    A slice whose command `where` protobuf refuses runs the commands before it (and nothing at or after it) and
    says `malformed`, which the daemon turns into INVALID_ARGUMENT; until round 44 the worker's parse raised
    DecodeError out of `run_commands` (its process died: INTERNAL), the front's check being the only one."""
    from test_server_runs import _clock, use_runner

    use_runner(runner, monkeypatch)
    from gpupool.server.devices import FakeDevice
    from gpupool.server.executor import CommandExecutor
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    ex = CommandExecutor(slices.SliceLedger())
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s1", 1, dev, DeviceMemory(dev), 1 << 24)
    handles = [s.handle_base + k for k in (1, 2)]
    spans = [_upload(handles[0], 1.0), _upload(handles[1], 2.0)]
    spans.insert(where, BAD_EAGER)
    marks: list[int] = []
    req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, memoryview(b"".join(spans)))
    res = slices.run_commands(s, ex.execute, ex.ledger, req, _clock, marks.append)
    assert res.malformed and res.executed == where and not res.partial and s.error is None
    assert marks == list(range(where))  # nothing at or after it was begun
    assert [h in s.tensors for h in handles] == [k < where for k in range(2)]
    # the flag crosses to the daemon (both encodings) and is refused where it cannot be
    for body in (b"".join(slices.encode_result(res))[4:], _written(res)):
        back = slices.decode_result(body, 3)
        assert back.malformed and back.executed == where
        with pytest.raises(ValueError):
            slices.decode_result(body, where)  # the malformed command must be one it was sent
    res.malformed = False
    assert not slices.decode_result(b"".join(slices.encode_result(res))[4:], 3).malformed


def _odd_upload(handle: int, value: float, extra: int) -> bytes:
    """`_upload`'s frame with its Upload's `handle` key written in 1 + `extra` bytes (an overlong varint: upb takes one
    of up to five bytes, and refuses a longer one)."""
    up = device_pb2.Upload(last=True, data=struct.pack("<f", value))
    up.meta.dtype, up.meta.shape[:] = 1, [1]
    key = bytes([0x88] + [0x80] * (extra - 1) + [0x00]) if extra else b"\x08"
    body = key + _varint(handle) + up.SerializeToString()
    cmd = b"\x12" + _varint(len(body)) + body
    return b"\x0a" + _varint(len(cmd)) + cmd


@pytest.mark.parametrize("runner", ["native", "python"])
@pytest.mark.parametrize("extra", [0, 1, 4, 5, 9])
def test_a_small_upload_upb_refuses_is_malformed_however_the_worker_reads_it(
    runner: str, extra: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 49: with the native runner a slice's small uploads and frees are read from its bytes (native_runner.cpp
    `eager_frame` with `lazy`, `parse_upload`) and upb never parses them (`slices.frame_commands`). An Upload whose
    key is overlong runs where upb takes it (a key of up to five bytes: the Python path runs it, as before) and where
    upb refuses it (six bytes or more) the slice is malformed at it, nothing at or after it begun, as when upb parsed
    every command first: `parse_upload` reads only one-byte keys (`read_key`; `read_varint` took any)."""
    from test_server_runs import _clock, use_runner

    use_runner(runner, monkeypatch)
    from gpupool.server.devices import FakeDevice
    from gpupool.server.executor import CommandExecutor
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    ex = CommandExecutor(slices.SliceLedger())
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s1", 1, dev, DeviceMemory(dev), 1 << 24)
    handles = [s.handle_base + k for k in (1, 2, 3)]
    spans = [_upload(handles[0], 1.0), _odd_upload(handles[1], 2.0, extra), _upload(handles[2], 3.0)]
    marks: list[int] = []
    req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, memoryview(b"".join(spans)))
    res = slices.run_commands(s, ex.execute, ex.ledger, req, _clock, marks.append)
    refused = extra >= 5
    assert res.malformed is refused and s.error is None
    assert res.executed == (1 if refused else 3) and marks == list(range(res.executed))
    assert [h in s.tensors for h in handles] == [True, not refused, not refused]
    if not refused:
        assert s.tensors[handles[1]].tolist() == [2.0]


def _written(res: slices.SliceResult) -> bytes:
    buf = memoryview(bytearray(1 << 16))
    n = slices.write_result(res, buf)
    assert n > 0
    return bytes(buf[:n])


def _one(cmd: device_pb2.Command) -> bytes:
    return device_pb2.ClientFrame(commands=[cmd]).SerializeToString()


def _up(h: int, data: bytes, dtype: int = 1, shape: tuple[int, ...] = (1,), last: bool = True, offset: int = 0
        ) -> bytes:  # fmt: skip
    up = device_pb2.Upload(handle=h, last=last, offset=offset, data=data)
    if offset == 0:
        up.meta.dtype, up.meta.shape[:] = dtype, list(shape)
    return _one(device_pb2.Command(upload=up))


def _free(*hs: int) -> bytes:
    return _one(device_pb2.Command(free=device_pb2.Free(handles=list(hs))))


def _between_slices(base: int, foreign: int) -> list[list[bytes]]:
    """Slices of uploads and frees only (a step's start: no learned run under way), good and hostile: each slice's
    commands as their frames. `base`: the session's handle base; `foreign`: another session's."""
    f4 = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    return [
        [_up(base + 1, f4, shape=(2, 2)), _up(base + 2, b"\x01\x00", dtype=10, shape=(2,)), _up(base + 3, f4[:4])],
        [_up(base + 1, f4[:8], shape=(2,)), _free(base + 3), _up(base + 4, b"\x00" * 16, dtype=8, shape=(2,))],
        [_up(base + 5, b"\x02\x00", dtype=10, shape=(2,)), _up(base + 6, f4, shape=(3,))],  # a bool of 2; short bytes
        [_up(foreign + 1, f4[:4]), _up(base, f4[:4]), _free(base + 1, foreign + 2, base + 2)],  # foreign, reserved
        [_up(base + 7, f4[:8], shape=(2,), last=False), _free(base + 9), _up(base + 7, f4[8:], offset=8)],  # chunks
        [_up(base + 8, f4[:4], shape=(-1,)), _up(base + 8, b"", shape=(0, 3)), _free(base + 4, base + 4)],
        [_up(base + 9, b"\x00" * 4, shape=(1 << 40,)), _free(base + 8, base + 5, base + 6)],  # past the quota
    ]


@pytest.mark.parametrize("bus", ["slice", "span", "real"])
def test_uploads_and_frees_outside_a_run_run_from_their_bytes_as_upb_s_path_runs_them(
    bus: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 50: a slice's uploads and frees that the native runner read (`FrameCommands.between`) run from their
    bytes outside a learned run too (`CommandExecutor.run_between`, native_runner.cpp `Ctx::between_one`: a step's
    first uploads, a free after a run ended), through `slices._loop` ("slice") and `eager_span`'s path among records
    ("span": each slice starts with an eager record); Python asks for the message only of those the runner leaves
    to it (a check that fails, whose error is Python's; a chunk). Until round 50 upb parsed each one into a message
    there (`FrameCommands.__getitem__`) and `execute` ran it, a free's message serialized again for `native.free`.
    A twin session whose executor runs every one of them through its message (`run_between` off) must end each
    slice identical: the tensors' bytes and storages, the accounting, the poisons, the first error's status and
    text, the ledger's transfers, the progress marks."""
    from test_server_runs import _clock, native_runner_or_skip

    native_runner_or_skip()
    from gpupool.server.devices import FakeDevice
    from gpupool.server.executor import CommandExecutor
    from gpupool.server.sessions import DeviceMemory, WorkerSession

    from gpupool import compact

    asked: list[bytes] = []
    get = slices.FrameCommands.__getitem__

    def spy(self: slices.FrameCommands, i: Any) -> Any:
        if self.between is not None and self.between[i] is not None and i not in self._made:
            asked.append(self.between[i])
        return get(self, i)

    monkeypatch.setattr(slices.FrameCommands, "__getitem__", spy)
    twins = []
    for ref in (False, True):
        ex = CommandExecutor(slices.SliceLedger())
        assert ex.native is not None
        if ref:  # the path before round 50: every such command through its message
            ex.run_between = lambda *a: False  # type: ignore[method-assign]
        transfers: list[Any] = []
        ex.ledger.transfer = lambda *a, _t=transfers, _f=ex.ledger.transfer: (_t.append(a), _f(*a))[1]  # type: ignore[method-assign]
        dev = FakeDevice(0, "h", 1 << 30)
        dev.fake = bus != "real"  # "real": a real GPU's session (its uploads Python's, its frees the runner's)
        twins.append((ex, WorkerSession("s1", 1, dev, DeviceMemory(dev), 1 << 20), transfers))
    s = twins[0][1]
    left = []  # the commands the runner leaves to Python
    for n, frames in enumerate(_between_slices(s.handle_base, 2 << 32)):
        if bus == "span":  # aten::zeros([2]) into a handle of its own, defining an op id of its own
            rec = compact.head(3 + n, "aten::zeros", [s.handle_base + 20]) + b"\x01" + compact.encode_value([2])
            frames = [_one(device_pb2.Command(eager_op=rec + b"\x00")), *frames]
        got = []
        for e, t, transfers in twins:
            marks: list[int] = []
            transfers.clear()
            asked.clear()
            req = slices.SliceRequest(1 << 40, 1 << 40, 1e9, memoryview(b"".join(frames)))
            res = slices.run_commands(t, e.execute, e.ledger, req, _clock, marks.append)
            err, t.error = t.error, None
            got.append((
                res.executed, res.partial, res.malformed, marks, list(transfers),
                None if err is None else (err.code, err.message),
                {h: (str(v.dtype), v.shape, bytes(v.numpy().view("u1")), v.untyped_storage().nbytes())
                 for h, v in t.tensors.items()},
                {h: (p.code, p.message) for h, p in t.poisoned.items()}, dict(t.uploads), t.used, t.memory.used,
                sorted(tuple(v) for v in t._storages.values()),
            ))  # fmt: skip
            if e is twins[0][0]:
                left += asked
        assert got[0] == got[1], n
        assert got[0][0] == len(frames) and not got[0][1]
        assert (s.handle_base + 20 in s.tensors) is (bus == "span")  # the record ran
    # Python asked only for those the runner left to it: a bool of 2, bytes not the shape's, another session's
    # handle, the reserved one, a chunk and the one after it, one past the quota (a negative shape's upload is
    # upb's from the start: `parse_meta` refuses it); every free ran from its bytes (one of another session's
    # handle failed there: PERMISSION_DENIED, recorded as `execute` records it)
    kinds = [device_pb2.Command.FromString(b).WhichOneof("cmd") for b in left]
    if bus == "real":
        assert kinds == ["upload"] * 13, kinds  # every upload that was not upb's from the start
        return
    ups = [device_pb2.Command.FromString(b).upload for b in left]
    assert [u.handle - s.handle_base for u in ups] == [5, 6, (2 << 32) + 1 - s.handle_base, 0, 7, 7, 9], left
