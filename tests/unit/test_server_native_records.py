"""A slice's eager records read from the frame's bytes (native_runner.cpp `eager_records`, `slices.eager_records` with
the executor's runner) must be exactly what upb's parsed messages say (`[c.eager_op for c in commands]`), for every
frame it reads, hostile ones included: a oneof whose last member written is another kind (b""), several `eager_op`
fields (the last one), an empty record, unknown and misplaced fields, other wire types, truncated lengths. A frame
it does not read gives None (the caller reads the messages); it never gives other records."""

from __future__ import annotations

import random
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from gpupool.server import slices

from gpupool._proto import device_pb2


@pytest.fixture
def mod(native_runner_module: Any) -> Any:
    return native_runner_module


def _upb(payload: bytes) -> list[bytes]:
    return [c.eager_op for c in device_pb2.ClientFrame.FromString(payload).commands]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # length-delimited
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _frame(*commands: bytes) -> bytes:
    return b"".join(_field(1, c) for c in commands)


def _typical() -> bytes:
    """A frame as the clients write one: eager records among uploads, frees, a get, a seed, an empty command."""
    cmds = [
        device_pb2.Command(eager_op=b"\x01\x02\x03" * 9),
        device_pb2.Command(upload=device_pb2.Upload(handle=(5 << 32) + 1, data=b"\x00" * 16, last=True)),
        device_pb2.Command(eager_op=b"\x07" * 40),
        device_pb2.Command(free=device_pb2.Free(handles=[(5 << 32) + 2, (5 << 32) + 3])),
        device_pb2.Command(get=device_pb2.Get(handle=(5 << 32) + 4, request_id=9)),
        device_pb2.Command(seed=device_pb2.Seed(seed=3)),
        device_pb2.Command(),
        device_pb2.Command(eager_op=b""),
        device_pb2.Command(eager_op=bytes(range(256)) * 3),
    ]
    return device_pb2.ClientFrame(commands=cmds).SerializeToString()


def test_frames_as_clients_write_them_are_read_from_their_bytes(mod: Any) -> None:
    payload = _typical()
    got = mod.eager_records(payload)
    assert got == _upb(payload)
    assert got[0] == b"\x01\x02\x03" * 9 and got[1] == b"" and got[6] == b"" and got[7] == b""
    assert mod.eager_records(memoryview(payload)) == got  # any buffer, as upb parses one
    assert mod.eager_records(b"") == []
    commands = device_pb2.ClientFrame.FromString(payload).commands
    assert slices.eager_records(commands, payload, mod) == got
    assert slices.eager_records(commands) == got  # without the runner: the messages


@pytest.mark.parametrize(
    "command, record",
    [
        (_field(30, b"abc") + _field(4, b""), b""),  # the oneof's last member is `free`: no record
        (_field(4, b"") + _field(30, b"abc"), b"abc"),
        (_field(30, b"first") + _field(30, b"second"), b"second"),  # the last one, as a parser keeps it
        (_field(30, b"first") + _field(2, b"") + _field(30, b"third"), b"third"),
        (_field(30, b""), b""),
        (_field(71, b"") + _field(30, b"x") + _field(20, b""), b""),
    ],
)
def test_the_oneofs_last_member_decides(mod: Any, command: bytes, record: bytes) -> None:
    payload = _frame(_field(30, b"before"), command, _field(30, b"after"))
    assert _upb(payload) == [b"before", record, b"after"]
    assert mod.eager_records(payload) == [b"before", record, b"after"]


@pytest.mark.parametrize(
    "payload",
    [
        _frame(_field(30, b"r") + _field(99, b"unknown")),  # an unknown field in a command
        _frame(_field(30, b"r") + _field(7, b"")),  # the retired Refresh
        _frame(_field(30, b"r")) + _field(2, b"junk"),  # an unknown field in the frame
        _frame(_field(30, b"r")) + _varint(1 << 3 | 0) + _varint(5),  # `commands` as a varint
        _frame(_varint(30 << 3 | 0) + _varint(12345)),  # `eager_op` as a varint
        _frame(_varint(6 << 3 | 5) + b"\x00\x00\x00\x00"),  # a fixed32 under a member's number
        # `free`'s number as a varint after the record: upb keeps it as an unknown field, the record stays
        _frame(_field(30, b"abc") + _varint(4 << 3 | 0) + _varint(0)),
    ],
)
def test_a_frame_it_does_not_read_is_left_to_the_messages(mod: Any, payload: bytes) -> None:
    assert mod.eager_records(payload) is None
    try:
        commands = device_pb2.ClientFrame.FromString(payload).commands
    except DecodeError:
        return
    assert slices.eager_records(commands, payload, mod) == [c.eager_op for c in commands]


def test_truncated_and_overlong_lengths_are_refused(mod: Any) -> None:
    payload = _frame(_field(30, b"abcdef"), _field(30, b"gh"))
    for cut in range(1, len(payload)):
        got = mod.eager_records(payload[:cut])
        assert got is None or got == _upb(payload[:cut])
    assert mod.eager_records(_varint(1 << 3 | 2) + _varint(1 << 40) + b"x") is None
    assert mod.eager_records(_frame(_varint(30 << 3 | 2) + _varint(100) + b"short")) is None
    assert mod.eager_records(b"\x0a" + b"\xff" * 11) is None  # a varint of more than 64 bits
    assert mod.eager_records(12) is None  # not a buffer


def _mutated(rng: random.Random) -> bytes:
    """A real frame with one to three random byte flips, insertions or cuts."""
    seeds = [_typical(), _frame(_field(30, b"a" * 30), _field(4, b"\x0a\x01\x05"), _field(30, b"b" * 3))]
    b = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(3)
        at = rng.randrange(len(b))
        if op == 0:
            b[at] = rng.randrange(256)
        elif op == 1:
            b.insert(at, rng.randrange(256))
        else:
            del b[at : at + rng.randint(1, 4)]
    return bytes(b)


def test_mutated_frames_give_upbs_records_or_none(mod: Any) -> None:
    """Random byte flips, insertions and cuts of real frames: wherever upb parses the result, the reader gives
    None or upb's own records, never others."""
    rng = random.Random(22)
    read = 0
    for n in range(4000):
        payload = _mutated(rng)
        try:
            want = _upb(payload)
        except DecodeError:
            continue
        got = mod.eager_records(payload)
        if got is not None:
            read += 1
            assert got == want, (n, payload.hex())
    assert read > 100  # most mutations of a record's bytes are still frames it reads


def _overlong(n: int, extra: int) -> bytes:
    """`n` as a varint padded with `extra` continuation bytes of 0 (an overlong form upb reads as `n`)."""
    v = bytearray(_varint(n))
    if extra:
        v[-1] |= 0x80
        v += b"\x80" * (extra - 1) + b"\x00"
    return bytes(v)


def _hostile_command(rng: random.Random, depth: int = 0) -> bytes:
    """One command's bytes built from hostile pieces: every member number and wire type (3/4/6/7 included), varints
    of up to 11 bytes, 64-bit lengths that wrap a pointer, lengths past the end, nested messages whose lengths pass
    their parent's end, repeated and interleaved oneof members, empty and packed fields."""
    out = bytearray()
    for _ in range(rng.randint(0, 4)):
        kind = rng.randrange(10)
        number = rng.choice([1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 30, 30, 30, 70, 71, 0, 99, (1 << 29) - 1, 1 << 29])
        if kind == 0:  # a member with another wire type
            wire_type = rng.choice([0, 1, 3, 4, 5, 6, 7])
            out += _varint(number << 3 | wire_type)
            out += rng.choice([_varint(rng.getrandbits(64)), b"\x00" * 4, b"\x00" * 8, b""])
        elif kind == 1:  # a length that wraps a 64-bit pointer, or one just past the end
            out += _varint(number << 3 | 2) + rng.choice(
                [_varint((1 << 64) - rng.randint(1, 64)), _varint(1 << 63), b"\xff" * 9 + b"\x01", _varint(1 << 32)]
            )
        elif kind == 2:  # an overlong key or length (up to 10 bytes: read; 11: more than 64 bits)
            body = rng.randbytes(rng.randint(0, 5))
            out += _overlong(number << 3 | 2, rng.randint(0, 9)) + _overlong(len(body), rng.randint(0, 10)) + body
        elif kind == 3 and depth < 3:  # a nested message (a member's body) holding further pieces
            body = _hostile_command(rng, depth + 1)
            out += _field(number, body)
        elif kind == 4:  # a nested length past its parent's end
            out += _varint(number << 3 | 2) + _varint(rng.randint(1, 64)) + rng.randbytes(rng.randint(0, 3))
        elif kind == 5:  # a truncated varint
            out += b"\x80" * rng.randint(1, 11)
        else:  # an ordinary eager record or member
            out += _field(rng.choice([30, 30, 4, 2, 71]), rng.randbytes(rng.randint(0, 40)))
    return bytes(out)


def _hostile_frame(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(0, 6)):
        r = rng.randrange(8)
        cmd = _hostile_command(rng)
        if r == 0:  # the command's own length past the frame's end or wrapping
            parts.append(_varint(1 << 3 | 2) + _varint(rng.choice([len(cmd) + 1, (1 << 64) - 1, 1 << 40])) + cmd)
        elif r == 1:  # the frame's field in another wire type or number
            parts.append(_varint(rng.choice([1 << 3 | 0, 1 << 3 | 3, 1 << 3 | 4, 2 << 3 | 2, 1 << 3 | 7])) + cmd)
        elif r == 2:  # an overlong key / length for the command
            parts.append(_overlong(1 << 3 | 2, rng.randint(0, 10)) + _overlong(len(cmd), rng.randint(0, 10)) + cmd)
        else:
            parts.append(_field(1, cmd))
    frame = b"".join(parts)
    if frame and rng.random() < 0.2:
        frame = frame[: rng.randrange(len(frame))]
    return frame


def test_hostile_structured_frames_give_upbs_records_or_none(mod: Any) -> None:
    """Frames built from hostile pieces (`_hostile_command`): where upb parses one, the reader gives None or upb's
    records; where upb refuses it, the reader never reads past the buffer (run under ASan: scripts/runner_asan.sh,
    each frame in a bytes object of its own size, PYTHONMALLOC=malloc so its end is a redzone) and gives None or a
    list. GPUPOOL_RECORDS_FUZZ_CASES sets the count (default 3000)."""
    import os

    rng = random.Random(int(os.environ.get("GPUPOOL_RUNNER_FUZZ_SEED", "0")) + 23)
    cases = int(os.environ.get("GPUPOOL_RECORDS_FUZZ_CASES", "3000"))
    read = parsed = 0
    for n in range(cases):
        payload = _hostile_frame(rng)
        got = mod.eager_records(payload)
        try:
            want = _upb(payload)
        except DecodeError:
            assert got is None or isinstance(got, list)
            continue
        parsed += 1
        if got is not None:
            read += 1
            assert got == want, (n, payload.hex())
    print(f"{cases} frames: {parsed} parsed by upb, {read} read by the native reader")
    assert parsed > cases // 10 and read > cases // 20, (parsed, read)


# `slices.frame_commands` (native_runner.cpp `eager_frame`): upb parses only the commands that are not plain eager
# records. For every frame: None, or exactly upb's commands and records, and upb's DecodeError where upb refuses the
# whole frame (raised before any command is handed out).


def _frame_commands_agree(mod: Any, payload: bytes) -> str:
    """'none' (left to the whole frame's parse), 'read' (upb's own commands and records) or 'refused' (DecodeError,
    where upb refuses the frame too)."""
    try:
        want = list(device_pb2.ClientFrame.FromString(payload).commands)
    except DecodeError:
        want = None
    try:
        got = slices.frame_commands(payload, mod)
    except DecodeError:
        assert want is None, payload.hex()
        return "refused"
    if got is None:
        return "none"
    assert want is not None, payload.hex()  # never reads a frame upb refuses
    assert len(got) == len(want), payload.hex()
    assert [got[i] for i in range(len(got))] == want, payload.hex()
    assert got.records == [c.eager_op for c in want], payload.hex()
    assert all(got[i] is got[i] for i in range(len(got)))  # made once
    return "read"


def test_frame_commands_are_upbs_messages(mod: Any) -> None:
    payload = _typical()
    got = slices.frame_commands(payload, mod)
    assert got is not None and _frame_commands_agree(mod, payload) == "read"
    records, at, others, ask = mod.eager_frame(payload)
    # only the commands that are not plain records go to upb: the upload, free, get, seed, empty command and the
    # empty record, copied into one frame of their entries
    assert at == {1: 0, 3: 1, 4: 2, 5: 3, 6: 4, 7: 5} and ask == []
    whole = device_pb2.ClientFrame.FromString(payload).commands
    assert list(device_pb2.ClientFrame.FromString(others).commands) == [whole[i] for i in at]
    assert records[0] == b"\x01\x02\x03" * 9 and records[8] == bytes(range(256)) * 3
    assert all(records[i] == b"" for i in (1, 3, 4, 5, 6, 7))
    assert got[-1] is got[8] and got[1:3] == [got[1], got[2]]
    with pytest.raises(IndexError):
        got[9]
    assert mod.eager_frame(b"") == ([], {}, b"", [])
    assert slices.frame_commands(memoryview(payload), mod) is not None  # any buffer
    assert mod.eager_frame(12) is None  # not a buffer


def test_frame_commands_hand_the_runner_each_small_upload_and_free(mod: Any) -> None:
    """`eager_frame(payload, between=True)`'s fifth element (`FrameCommands.between`, which `Ctx.run` runs among a
    run's records): each command that is one `upload` or `free` field in the canonical form, of at most 64 KiB, as
    its bytes; None for every other command; None where the slice has none. The commands are upb's messages as
    before (these too)."""
    up = device_pb2.Upload(handle=(5 << 32) + 1, data=b"\x01" * 16, last=True)
    up.meta.dtype, up.meta.shape[:] = 1, [2, 2]
    msg = up.SerializeToString()
    big = device_pb2.Upload(handle=(5 << 32) + 2, data=b"\x00" * (64 << 10), last=True).SerializeToString()
    free = device_pb2.Free(handles=[(5 << 32) + 3, (5 << 32) + 4]).SerializeToString()
    commands = [
        _field(30, b"rec"),
        _field(2, msg),
        _field(2, msg) + _field(2, msg),  # two fields (upb merges them): not read here
        _varint(2 << 3 | 2) + _overlong(len(msg), 1) + msg,  # an overlong length
        _field(2, big),  # over 64 KiB
        _field(4, free),
        _field(3, b""),  # a get
        _field(2, b""),  # an empty Upload
    ]
    payload = _frame(*commands)
    records, at, others, ask, between = mod.eager_frame(payload, True)
    assert between == [None, commands[1], None, None, None, commands[5], None, commands[7]]
    assert (records, at, others, ask) == tuple(mod.eager_frame(payload))  # the rest as without it
    got = slices.frame_commands(payload, mod)
    assert got is not None and got.between == between and _frame_commands_agree(mod, payload) == "read"
    assert mod.eager_frame(_frame(_field(30, b"r"), _field(3, b"")), True)[4] is None  # neither
    assert slices.frame_commands(_frame(_field(30, b"r")), mod).between is None  # type: ignore[union-attr]


def test_frame_commands_leave_upb_only_what_the_runner_does_not_read(mod: Any) -> None:
    """Round 49: `eager_frame(payload, True, True)` (`lazy`, `slices.frame_commands`' reading) leaves the small
    uploads and frees whose messages it reads (`parse_upload`, `parse_free`: messages upb takes, to the same fields)
    out of `others`: upb parses only the rest before the slice runs, and such a command's message is made from its
    bytes where Python asks for it (once). An upload or free it does not read (an overlong key, even one upb takes;
    a field it refuses) goes to upb as before; one upb refuses still raises DecodeError before anything runs."""
    up = device_pb2.Upload(handle=(5 << 32) + 1, data=b"\x01" * 16, last=True)
    up.meta.dtype, up.meta.shape[:] = 1, [2, 2]
    msg = up.SerializeToString()
    free = device_pb2.Free(handles=[(5 << 32) + 3, (5 << 32) + 4]).SerializeToString()
    odd_key = _overlong(1 << 3, 1) + msg[1:]  # the handle's key in two bytes: upb takes it
    bulk = device_pb2.Upload(handle=(5 << 32) + 2, bulk_bytes=16).SerializeToString()
    commands = [
        _field(30, b"rec"),
        _field(2, msg),
        _field(4, free),
        _field(3, device_pb2.Get(request_id=7, handle=(5 << 32) + 1).SerializeToString()),
        _field(2, odd_key),
        _field(2, bulk),
        _field(4, b"\x0a\x01\x05"),
        _field(30, b"rec2"),
    ]
    payload = _frame(*commands)
    records, at, others, ask, between = mod.eager_frame(payload, True, True)
    assert at == {3: 0, 4: 1, 5: 2} and ask == []  # the get, the overlong key, the bulk upload
    assert between == [None, commands[1], commands[2], None, None, None, commands[6], None]
    whole = device_pb2.ClientFrame.FromString(payload).commands
    assert list(device_pb2.ClientFrame.FromString(others).commands) == [whole[i] for i in (3, 4, 5)]
    assert records == [b"rec", b"", b"", b"", b"", b"", b"", b"rec2"]
    got = slices.frame_commands(payload, mod)
    assert got is not None and _frame_commands_agree(mod, payload) == "read"
    assert len(got._others) == 3 and got[1] is got[1] and got[1] == whole[1] and got[6] == whole[6]
    # six bytes of key: upb refuses the upload, and the frame (nothing of it read here)
    bad = _frame(_field(30, b"rec"), _field(2, _overlong(1 << 3, 5) + msg[1:]))
    assert mod.eager_frame(bad, True, True)[1] == {1: 0}
    with pytest.raises(DecodeError):
        slices.frame_commands(bad, mod)
    # a packed length of six bytes (upb refuses it; `parse_free` read it until the fuzz of this round found it)
    for odd in (_field(4, b"\x0a\x80\x80\x80\x80\x80\x00"), _field(2, b"\x22\x81\x80\x80\x80\x80\x00x")):
        assert mod.eager_frame(_frame(_field(30, b"rec"), odd), True, True)[1] == {1: 0}
        with pytest.raises(DecodeError):
            slices.frame_commands(_frame(_field(30, b"rec"), odd), mod)
    # the same frame without `lazy`: as before (every upload and free upb's)
    assert mod.eager_frame(payload, True)[1] == {k: k - 1 for k in range(1, 7)}


@pytest.mark.parametrize(
    "command, other, asked",
    [
        (_field(30, b"first") + _field(30, b"second"), False, False),  # plain: the last one
        (_field(30, b"abc") + _field(4, b""), True, False),  # the oneof's last member is `free`
        (_field(4, b"") + _field(30, b"abc"), True, False),
        (_field(30, b""), True, False),  # an empty record
        (b"", True, False),  # an empty command
        (_field(30, b"r") + _field(99, b"unknown"), True, True),  # an unknown field: upb keeps it
        (_varint(30 << 3 | 2) + _overlong(3, 2) + b"abc", True, False),  # an overlong length: upb reads it
        (_overlong(30 << 3 | 2, 1) + _varint(3) + b"abc", True, False),  # an overlong key
        (_field(30, b"abc") + _varint(4 << 3 | 0) + _varint(0), True, True),  # another wire type
        (_field(3, b"\xff\xff"), True, False),  # a malformed `get`: upb refuses the frame
    ],
)
def test_frame_commands_of_odd_commands(mod: Any, command: bytes, other: bool, asked: bool) -> None:
    payload = _frame(_field(30, b"before"), command, _field(30, b"after"))
    assert _frame_commands_agree(mod, payload) in ("read", "refused")
    records, at, _, ask = mod.eager_frame(payload)
    assert records[0] == b"before" and records[2] == b"after"
    assert at == ({1: 0} if other else {}) and ask == ([1] if asked else [])


def test_frame_commands_of_odd_frames(mod: Any) -> None:
    assert mod.eager_frame(_frame(_field(30, b"r")) + _field(2, b"junk")) is None  # a field of the frame's own
    assert mod.eager_frame(_overlong(1 << 3 | 2, 1) + _varint(3) + _field(30, b"r")) is None  # an overlong key
    assert mod.eager_frame(_varint(1 << 3 | 2) + _overlong(3, 1) + _field(30, b"r")) is None  # an overlong length
    assert mod.eager_frame(_varint(1 << 3 | 2) + _varint(100) + b"short") is None
    for payload in (_typical(), _frame(_field(30, b"abcdef"), _field(4, b"\x0a\x01\x05"), _field(30, b"gh"))):
        for cut in range(len(payload)):
            _frame_commands_agree(mod, payload[:cut])


def test_frame_commands_of_hostile_and_mutated_frames(mod: Any) -> None:
    """`_hostile_frame`'s frames and random mutations of real ones: None, upb's commands, or upb's refusal (under
    ASan too: scripts/runner_asan.sh). GPUPOOL_RECORDS_FUZZ_CASES sets the count (default 3000)."""
    import os

    rng = random.Random(int(os.environ.get("GPUPOOL_RUNNER_FUZZ_SEED", "0")) + 36)
    seen = {"none": 0, "read": 0, "refused": 0}
    for _ in range(int(os.environ.get("GPUPOOL_RECORDS_FUZZ_CASES", "3000"))):
        seen[_frame_commands_agree(mod, _hostile_frame(rng))] += 1
        seen[_frame_commands_agree(mod, _mutated(rng))] += 1
    assert seen["read"] > 500 and seen["refused"] > 50, seen
