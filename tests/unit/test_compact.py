"""The compact eager op record (gpupool/compact.py): round trips, strict decoding, and a bounded fuzz that
only ever gets records back or InvalidArgument (never another exception)."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gpupool.torch  # noqa: F401  (names the "gpupool" device)
from gpupool import compact
from gpupool.errors import InvalidArgument

DEV = torch.device("cpu")
TENSORS = {7: torch.ones(2), 8: torch.zeros(3)}


def resolve(h: int) -> torch.Tensor:
    if h not in TENSORS:
        raise InvalidArgument(f"unknown handle {h}")
    return TENSORS[h]


def record(name: str | None, outputs: list[int], args: list[bytes], kwargs: dict[str, bytes]) -> bytes:
    parts = [compact.head(3, name, outputs), compact.U8.pack(len(args)), *args, compact.U8.pack(len(kwargs))]
    for k, v in kwargs.items():
        parts += [compact.kwarg_key(k), v]
    return b"".join(parts)


VALUES = [
    None,
    True,
    False,
    -(2**63),
    2**63 - 1,
    0.5,
    float("inf"),
    [1, -2, 3],
    [],
    [0.5, 2],
    [True, False],
    torch.float16,
    torch.int64,
    torch.device("gpupool", 0),
    torch.device("cpu"),
    torch.strided,
    torch.channels_last,
    torch.Size([4, 5]),
]


def test_round_trip_of_every_kind() -> None:
    args = [compact.tensor(7), compact.tensors([7, 0, 8])] + [compact.encode_value(v) for v in VALUES]
    data = record("aten::add.Tensor", [0, 5, 6], args, {"alpha": compact.encode_value(2), "out": compact.tensor(8)})
    rec = compact.decode(data, resolve, DEV)
    assert (rec.op_id, rec.name, rec.outputs) == (3, "aten::add.Tensor", [0, 5, 6])
    assert rec.args[0] is TENSORS[7]
    assert rec.args[1][0] is TENSORS[7] and rec.args[1][1] is None and rec.args[1][2] is TENSORS[8]
    expected = [DEV if isinstance(v, torch.device) and v.type == "gpupool" else v for v in VALUES]
    expected = [list(v) if isinstance(v, torch.Size) else v for v in expected]
    assert [type(v) for v in rec.args[2:]] == [type(v) for v in expected]
    assert rec.args[2:] == expected
    assert rec.kwargs["alpha"] == 2 and rec.kwargs["out"] is TENSORS[8]
    assert rec.handles == [7, 7, 8, 8]  # every tensor named (written ones are recounted after the op)
    assert compact.outputs_of(data) == [0, 5, 6]


def test_reference_by_id_and_types_kept() -> None:
    rec = compact.decode(record(None, [9], [compact.encode_value(1), compact.encode_value(1.0)], {}), resolve, DEV)
    assert rec.name == "" and rec.op_id == 3
    assert type(rec.args[0]) is int and type(rec.args[1]) is float


@pytest.mark.parametrize("value", ["mean", 1j, 2**70, [1, None], [torch.ones(1)], object(), torch.sparse_coo])
def test_unencodable_values_go_as_op_messages(value: object) -> None:
    with pytest.raises(compact.Unencodable):
        compact.encode_value(value)


def _refused_cut_or_padded(data: bytes) -> None:
    """`data` (a record) decodes; every prefix of it, and it with a byte more, is refused."""
    compact.decode(data, resolve, DEV)
    for n in range(len(data)):
        with pytest.raises(InvalidArgument):
            compact.decode(data[:n], resolve, DEV)
    with pytest.raises(InvalidArgument, match="after its end"):
        compact.decode(data + b"\x00", resolve, DEV)


def test_every_truncation_and_trailing_byte_is_refused() -> None:
    data = record("aten::mul.Tensor", [5], [compact.tensor(7), compact.encode_value([1, 2])], {"x": b"\x00"})
    _refused_cut_or_padded(data)


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        (b"\x01\xff", "unknown argument tag"),
        (b"\x01" + bytes([compact.BOOL, 2]), "bool byte"),
        (b"\x01" + bytes([compact.DTYPE, 0]), "unknown dtype"),
        (b"\x01" + bytes([compact.DTYPE, 200]), "unknown dtype"),
        (b"\x01" + bytes([compact.LAYOUT, 2]), "unknown layout"),
        (b"\x01" + bytes([compact.MEMORY_FORMAT, 9]), "unknown memory format"),
        (b"\x01" + struct.pack("<BH", compact.BOOLS, 1) + b"\x05", "bool list"),
        (b"\x01" + struct.pack("<BH", compact.INTS, 65535), "runs past the end"),
        (b"\x00\x01\x00", "empty keyword"),
        (b"\x00\x02\x01a\x00\x01a\x00", "twice"),
        (b"\x00\x01\x01\xff\x00", "not ASCII"),
    ],
)
def test_malformed_arguments(tail: bytes, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        compact.decode(compact.head(1, None, []) + tail, resolve, DEV)


def test_malformed_heads() -> None:
    with pytest.raises(InvalidArgument, match="out of range"):
        compact.decode(struct.pack("<IB", compact.MAX_OP_IDS, 0) + b"\x00\x00\x00", resolve, DEV)
    with pytest.raises(InvalidArgument, match="too long"):
        compact.decode(struct.pack("<IB", 1, 200) + b"a" * 200 + b"\x00\x00\x00", resolve, DEV)
    with pytest.raises(InvalidArgument, match="not ASCII"):
        compact.decode(struct.pack("<IB", 1, 2) + "é".encode() + b"\x00\x00\x00", resolve, DEV)
    with pytest.raises(InvalidArgument, match="truncated"):
        compact.decode(struct.pack("<IBB", 1, 0, 200) + b"\x00" * 16, resolve, DEV)
    assert compact.outputs_of(b"\x01") == []


_VALID = record(
    "aten::add.Tensor",
    [5, 6],
    [compact.tensor(7), compact.tensors([8, 0]), compact.encode_value([1.5, 2]), compact.encode_value(torch.float32),
     compact.view(8, [1, 2], [0, 1], 1)],
    {"alpha": compact.encode_value(3)},
)  # fmt: skip


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.data())
def test_fuzz_only_records_or_invalid_argument(data: st.DataObject) -> None:
    raw = bytearray(_VALID)
    for _ in range(data.draw(st.integers(1, 6))):
        what = data.draw(st.sampled_from(["flip", "insert", "delete", "junk"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if what == "flip" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
        elif what == "insert":
            raw[pos:pos] = data.draw(st.binary(max_size=12))
        elif what == "delete":
            del raw[pos : pos + data.draw(st.integers(1, 8))]
        else:
            raw = bytearray(data.draw(st.binary(max_size=64)))
    try:
        rec = compact.decode(bytes(raw), resolve, DEV)
    except InvalidArgument:
        return
    assert 0 <= rec.op_id < compact.MAX_OP_IDS and len(rec.outputs) <= 255


def test_decode_parts_finds_live_handles_first_and_resolves_the_rest() -> None:
    """The daemon's hot path: `get` (the session's dict of live tensors) answers first; a handle it misses goes
    through `resolve`, whose errors (unknown, foreign, half-uploaded handles) stand."""
    live = {7: torch.full((2,), 5.0)}
    data = record(None, [9], [compact.tensor(7), compact.tensor(8), compact.encode_value(2.5)], {})
    op_id, name, outputs, args, kwargs, handles = compact.decode_parts(data, resolve, DEV, live.get)
    assert (op_id, name, outputs, kwargs, handles) == (3, "", [9], {}, [7, 8])
    assert args[0] is live[7] and args[1] is TENSORS[8] and args[2] == 2.5
    with pytest.raises(InvalidArgument, match="unknown handle 99"):
        compact.decode_parts(record(None, [], [compact.tensor(99)], {}), resolve, DEV, live.get)
    rec = compact.decode(data, resolve, DEV)  # the Record form reads the same
    assert (rec.op_id, rec.outputs, rec.handles, rec.args[2]) == (3, [9], [7, 8], 2.5)
    for n in range(len(data)):  # truncations inside the inline tags are refused too
        with pytest.raises(InvalidArgument):
            compact.decode_parts(data[:n], resolve, DEV, live.get)


# ---- view arguments: a handle and a geometry (sizes, strides, storage offset) ----


def _view_record(handle: int, sizes: list[int], strides: list[int], offset: int, kw: bool = False) -> bytes:
    arg = compact.view(handle, sizes, strides, offset)
    return record(None, [9], [] if kw else [arg], {"self": arg} if kw else {})


def test_a_view_argument_is_as_strided_of_its_handles_tensor_sharing_its_storage() -> None:
    base = torch.arange(12.0)
    TENSORS[20] = base[2:]  # a tensor that is itself a view: the offset counts from its storage's start
    try:
        for kw in (False, True):
            rec = compact.decode(_view_record(20, [2, 3], [1, 2], 5, kw), resolve, DEV)
            v = rec.kwargs["self"] if kw else rec.args[0]
            assert v.shape == (2, 3) and v.stride() == (1, 2) and v.storage_offset() == 5
            assert torch.equal(v, base.as_strided((2, 3), (1, 2), 5))
            assert v.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
            assert rec.handles == [20]
            v.fill_(-1.0)  # writes through the view land in the handle's storage
            assert (base[5:10] == -1.0).all()
            base.copy_(torch.arange(12.0))
        # the last element of the storage is reachable; an empty view reaches no byte
        compact.decode(_view_record(20, [12], [1], 0), resolve, DEV)
        compact.decode(_view_record(20, [0, 5], [100, 100], 12), resolve, DEV)
        compact.decode(_view_record(20, [5, 0], [1, 1], 2**40), resolve, DEV)  # no element: any offset, as torch
        compact.decode(_view_record(20, [4, 3], [0, 0], 11), resolve, DEV)  # an expand: stride 0
        compact.decode(_view_record(20, [], [], 11), resolve, DEV)  # a 0-dim view
    finally:
        del TENSORS[20]


def _raw_view(handle: int, rank: int, values: list[int]) -> bytes:
    """A view argument with any rank byte and any i64 values (the client's encoder refuses bad ones)."""
    return struct.pack("<BQB", compact.VIEW, handle, rank) + struct.pack(f"<{len(values)}q", *values)


HOSTILE_VIEWS = [
    (_raw_view(7, 1, [3, 1, 0]), "storage byte 12 of a 8-byte"),  # one element past the end (2 floats)
    (_raw_view(7, 1, [1, 1, 2]), "storage byte 12"),  # an offset past the end
    (_raw_view(7, 0, [2]), "storage byte 12"),  # a 0-dim view past the end
    (_raw_view(7, 1, [2, 2**40, 0]), "storage byte"),  # a huge stride
    (_raw_view(7, 2, [2**62, 2**62, 1, 1, 0]), "more than int64"),  # an overflowing element count
    (_raw_view(7, 2, [2**40, 2**40, 0, 0, 0]), "more than int64"),  # as much, all stride 0
    (_raw_view(7, 1, [2**62, 2, 0]), "storage byte"),  # its extent overflows int64 (Python ints do not)
    (_raw_view(7, 1, [2, 1, 2**63 - 1]), "storage byte"),
    (_raw_view(7, 1, [-1, 1, 0]), "negative"),
    (_raw_view(7, 1, [2, -1, 1]), "negative"),
    (_raw_view(7, 1, [1, 1, -1]), "negative"),
    (_raw_view(7, 1, [-(2**63), 1, 0]), "negative"),
    (_raw_view(7, 65, [1] * 131), "65 dimensions"),
    (_raw_view(7, 255, []), "255 dimensions"),
    (_raw_view(7, 3, [1, 1, 1]), "runs past the end"),
    (_raw_view(99, 1, [1, 1, 0]), "unknown handle 99"),
]


def _refused_both_ways(arg: bytes, match: str) -> None:
    """`arg` as a positional and as a keyword argument: refused by both decode paths with `match`."""
    for data in (record(None, [9], [arg], {}), record(None, [9], [], {"x": arg})):
        with pytest.raises(InvalidArgument, match=match):
            compact.decode(data, resolve, DEV)
        with pytest.raises(InvalidArgument, match=match):
            compact.decode_parts(data, resolve, DEV, TENSORS.get)


@pytest.mark.parametrize(("arg", "match"), HOSTILE_VIEWS)
def test_hostile_view_arguments_are_refused(arg: bytes, match: str) -> None:
    _refused_both_ways(arg, match)


def test_a_view_is_checked_against_its_storage_as_it_is_now() -> None:
    """A storage that shrank (or a tensor that is no plain dense tensor) since the geometry was written."""
    t = torch.arange(8.0)
    TENSORS[21] = t
    try:
        data = _view_record(21, [2, 2], [2, 1], 4)
        compact.decode(data, resolve, DEV)
        t.untyped_storage().resize_(16)  # 4 floats left: the view reaches the 8th
        with pytest.raises(InvalidArgument, match="storage byte 32 of a 16-byte"):
            compact.decode(data, resolve, DEV)
        TENSORS[21] = torch.arange(8.0)._neg_view()  # as_strided would keep its neg bit
        with pytest.raises(InvalidArgument, match="not a plain dense"):
            compact.decode(data, resolve, DEV)
        TENSORS[21] = torch.arange(8.0).to_sparse()
        with pytest.raises(InvalidArgument, match="not a plain dense"):
            compact.decode(data, resolve, DEV)
    finally:
        del TENSORS[21]


def test_the_view_encoder_refuses_what_the_daemon_would() -> None:
    for sizes, strides, offset in [([1] * 65, [1] * 65, 0), ([-1], [1], 0), ([1], [-1], 0), ([1], [1], -1),
                                   ([1, 2], [1], 0), ([2**63], [1], 0)]:  # fmt: skip
        with pytest.raises(compact.Unencodable):
            compact.view(7, sizes, strides, offset)


def test_every_truncation_of_a_view_argument_is_refused() -> None:
    data = _view_record(7, [2], [1], 0)
    compact.decode(data, resolve, DEV)
    for n in range(len(data)):
        with pytest.raises(InvalidArgument):
            compact.decode(data[:n], resolve, DEV)


# ---- tensor lists with views (VIEWS): each element a TENSOR or a VIEW argument, tag included ----


def _views_list(*elements: bytes) -> bytes:
    return compact.tensors_with_views(list(elements))


def test_a_tensor_list_with_views_decodes_each_element_in_order() -> None:
    base = torch.arange(12.0)
    TENSORS[22] = base
    try:
        arg = _views_list(compact.tensor(7), compact.view(22, [2, 3], [1, 2], 5), compact.view(22, [], [], 11))
        for data in (record(None, [9], [arg], {}), record(None, [9], [], {"tensors": arg})):
            for rec in (compact.decode(data, resolve, DEV), compact.Record()):
                if isinstance(rec, compact.Record) and not rec.handles:  # decode_parts with a live lookup
                    parts = compact.decode_parts(data, resolve, DEV, TENSORS.get)
                    rec.args, rec.kwargs, rec.handles = parts[3], parts[4], parts[5]
                got = rec.args[0] if rec.args else rec.kwargs["tensors"]
                assert rec.handles == [7, 22, 22]
                assert got[0] is TENSORS[7]
                assert torch.equal(got[1], base.as_strided((2, 3), (1, 2), 5))
                assert got[1].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
                assert got[2].shape == () and float(got[2]) == 11.0
        got[1].fill_(-1.0)  # a list element written in place writes its handle's storage
        assert (base[5:10] == -1.0).all()
        assert compact.decode(record(None, [9], [_views_list()], {}), resolve, DEV).args == [[]]
    finally:
        del TENSORS[22]


HOSTILE_VIEW_LISTS = [
    (_views_list(compact.tensor(7), _raw_view(7, 1, [3, 1, 0])), "storage byte 12 of a 8-byte"),
    (_views_list(_raw_view(7, 1, [2, 2**40, 0])), "storage byte"),
    (_views_list(_raw_view(7, 2, [2**62, 2**62, 1, 1, 0])), "more than int64"),
    (_views_list(_raw_view(7, 1, [-1, 1, 0])), "negative"),
    (_views_list(compact.tensor(8), _raw_view(7, 1, [1, 1, -1])), "negative"),
    (_views_list(_raw_view(7, 65, [1] * 131)), "65 dimensions"),
    (_views_list(_raw_view(7, 3, [1, 1, 1])), "runs past the end"),
    (_views_list(_raw_view(99, 1, [1, 1, 0])), "unknown handle 99"),
    (_views_list(compact.tensor(8), compact.tensor(99)), "unknown handle 99"),
    (_views_list(compact.tensor(7), compact.encode_value(1)), "element of kind 2"),  # an int is no element
    (_views_list(compact.tensor(7), struct.pack("<BQ", compact.TENSORS, 7)), "element of kind 5"),
    (_views_list(struct.pack("<BQ", compact.NONE, 0)), "element of kind 0"),
    (struct.pack("<BH", compact.VIEWS, 3) + compact.tensor(7) * 2, "a list of 3 tensors runs past the end"),
    (struct.pack("<BH", compact.VIEWS, 65535) + compact.tensor(7), "a list of 65535 tensors runs past"),
    (struct.pack("<BH", compact.VIEWS, 2) + compact.view(7, [1], [1], 0) + b"\x01" * 4, "element runs past the end"),
]


@pytest.mark.parametrize(("arg", "match"), HOSTILE_VIEW_LISTS)
def test_hostile_tensor_lists_with_views_are_refused(arg: bytes, match: str) -> None:
    _refused_both_ways(arg, match)


def test_every_truncation_of_a_tensor_list_with_views_is_refused() -> None:
    arg = _views_list(compact.tensor(7), compact.view(8, [3], [1], 0), compact.view(7, [2, 1], [1, 1], 0))
    data = record(None, [9], [arg, compact.encode_value(1.5)], {})
    _refused_cut_or_padded(data)
