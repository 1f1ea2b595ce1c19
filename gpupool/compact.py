"""The compact eager op record (`Command.eager_op`, docs/wire.md "Compact eager ops"): one aten op as packed bytes.

An eager `Op` message costs the client ~10 nested protobuf messages to build and the daemon as many to read.
The compact record carries the same op as one little-endian byte string, with op names sent once per session:

    record := u32 op_id, u8 name_len, name[name_len]    (name_len > 0: op_id names this op from now on)
              u8 n_out, u64 outputs[n_out]              (0 skips a returned tensor, as in Op.outputs)
              u8 n_args, arg[n_args]
              u8 n_kwargs, (u8 key_len, key[key_len], arg)[n_kwargs]
    arg    := u8 tag, payload (below)

Only values a training loop sends travel this way (handles, views of handles, numbers, int/float/bool lists,
dtypes, devices, layouts, memory formats); anything else (strings, complex numbers, inline tensors) goes as an
`Op`. Decoding is strict: every length, count, tag and enum is checked, trailing bytes are refused, and any
malformed byte is an InvalidArgument, never a crash. Decoding yields plain Python values; nothing is evaluated
or unpickled.

A view argument (tag VIEW) is a handle plus a geometry: `u64 handle, u8 rank, i64 sizes[rank], i64
strides[rank], i64 offset`. It stands for `t.as_strided(sizes, strides, offset)` of the handle's tensor `t`
(same dtype; the offset counts elements from the start of `t`'s storage, as `as_strided`'s does), so a client's
view ops cost no record of their own. The geometry is checked when the record is read (rank at most MAX_DIMS,
no negative size, stride or offset, element count within int64) and against the tensor each time it is applied
(`view_of`: a plain dense tensor, and every element of the view inside its storage as it is now), so no view
reaches a byte outside the storage of a tensor the session owns.

A tensor list with views (tag VIEWS) is `u16 count, element[count]`, each element a TENSOR or a VIEW argument as
above, tag included (`u8 TENSOR, u64 handle` or `u8 VIEW, u64 handle, geometry`), so a list of gradients that are
views of other tensors costs no record per view. Every element is read within the record (a count whose elements
cannot fit is refused before any is read), each view is checked as a VIEW argument is (`view_of`), and no other
element kind is valid (a None goes in the plain TENSORS form, as handle 0).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import torch

from gpupool import wire
from gpupool.errors import InvalidArgument

MAX_OP_IDS = 4096  # op names a session may define (a table of at most this many short strings)
MAX_NAME = 128  # as the daemon's op-name check
MAX_LIST = 65535  # entries of one list argument (u16 count)
MAX_OUTPUTS = 255  # output handles of one record (u8 count)

# Tags (one byte each).
NONE, TENSOR, INT, FLOAT, BOOL = 0, 1, 2, 3, 4
TENSORS, INTS, FLOATS, BOOLS = 5, 6, 7, 8
DTYPE, DEVICE, CPU, LAYOUT, MEMORY_FORMAT = 9, 10, 11, 12, 13
VIEW = 14
VIEWS = 15  # a tensor list whose elements are TENSOR or VIEW arguments (tag included)
MAX_DIMS = 64  # dimensions of a view argument (as the daemon's bound on any tensor's)
_I64_MAX = 2**63 - 1

U8 = struct.Struct("<B")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
I64 = struct.Struct("<q")
F64 = struct.Struct("<d")
HEAD = struct.Struct("<IB")
TAG_U64 = struct.Struct("<BQ")
TAG_I64 = struct.Struct("<Bq")
TAG_F64 = struct.Struct("<Bd")
TAG_U8 = struct.Struct("<BB")
TAG_U16 = struct.Struct("<BH")

# Wire numbers of enums (tensor.proto's DType, Layout, MemoryFormat), both ways.
DTYPE_CODES: dict[torch.dtype, int] = {k: int(v) for k, v in wire.DTYPES.items()}
LAYOUT_CODES: dict[torch.layout, int] = {k: int(v) for k, v in wire.LAYOUTS.items()}
MEMORY_FORMAT_CODES: dict[torch.memory_format, int] = {k: int(v) for k, v in wire.MEMORY_FORMATS.items()}
_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_LAYOUTS = {v: k for k, v in LAYOUT_CODES.items()}
_MEMORY_FORMATS = {v: k for k, v in MEMORY_FORMAT_CODES.items()}

_NONE_BYTES = bytes([NONE])
_DEVICE_BYTES = bytes([DEVICE])
_CPU_BYTES = bytes([CPU])


class Unencodable(Exception):
    """The value has no compact form: send the op as an `Op` message."""


# ---- encoding (the client) ----


def head(op_id: int, name: str | None, outputs: list[int]) -> bytes:
    """The record's start: op id (with its name the first time), then the output handles."""
    return (named_head(op_id, name) if name is not None else HEAD.pack(op_id, 0)) + outputs_part(outputs)


def named_head(op_id: int, name: str) -> bytes:
    """A record's op id with the name it defines (`head` without the outputs, which follow it)."""
    raw = name.encode("ascii")
    return HEAD.pack(op_id, len(raw)) + raw


def outputs_part(handles: list[int]) -> bytes:
    """The output part of a record (its count, then the handles) for any number of outputs (0: a returned tensor
    that is not new). The client's usual single output has its own Struct (client/torch/runtime.ONE_OUTPUT)."""
    n = len(handles)
    if n < len(_OUTPUTS):
        return _OUTPUTS[n](n, *handles)
    return struct.pack(f"<B{n}Q", n, *handles)


_OUTPUTS = [struct.Struct(f"<B{n}Q").pack for n in range(16)]  # the output parts of up to 15 outputs


def encode_value(v: Any) -> bytes:
    """Any non-tensor argument value (tensors are encoded by the caller, which knows their handles)."""
    tv = type(v)
    if v is None:
        return _NONE_BYTES
    if tv is bool:
        return TAG_U8.pack(BOOL, v)
    if tv is int:
        if not -(2**63) <= v < 2**63:
            raise Unencodable
        return TAG_I64.pack(INT, v)
    if tv is float:
        return TAG_F64.pack(FLOAT, v)
    if tv is torch.dtype:
        code = DTYPE_CODES.get(v)
        if code is None:
            raise Unencodable
        return TAG_U8.pack(DTYPE, code)
    if tv is torch.device:
        if v.type == "gpupool":
            return _DEVICE_BYTES
        if v.type == "cpu":
            return _CPU_BYTES
        raise Unencodable
    if tv is torch.layout:
        if v not in LAYOUT_CODES:
            raise Unencodable
        return TAG_U8.pack(LAYOUT, LAYOUT_CODES[v])
    if tv is torch.memory_format:
        return TAG_U8.pack(MEMORY_FORMAT, MEMORY_FORMAT_CODES[v])
    if tv is list or tv is tuple or tv is torch.Size:
        return _encode_list(v)
    raise Unencodable


def _encode_list(values: Any) -> bytes:
    n = len(values)
    if n > MAX_LIST:
        raise Unencodable
    types = {type(x) for x in values}
    if types <= {int}:
        if any(not -(2**63) <= x < 2**63 for x in values):
            raise Unencodable
        return TAG_U16.pack(INTS, n) + struct.pack(f"<{n}q", *values)
    if types == {bool}:
        return TAG_U16.pack(BOOLS, n) + bytes(values)
    if types <= {int, float}:
        return TAG_U16.pack(FLOATS, n) + struct.pack(f"<{n}d", *values)
    raise Unencodable


def tensor(handle: int) -> bytes:
    return TAG_U64.pack(TENSOR, handle)


def view(handle: int, sizes: Any, strides: Any, offset: int) -> bytes:
    """A view argument: `as_strided(sizes, strides, offset)` of the handle's tensor (offset in elements from the
    start of its storage). Raises Unencodable for a geometry the daemon would refuse (send a record instead)."""
    return TAG_U64.pack(VIEW, handle) + geometry(sizes, strides, offset)


def geometry(sizes: Any, strides: Any, offset: int) -> bytes:
    """A view argument's bytes after its handle (`view`); Unencodable for a geometry the daemon would refuse."""
    n = len(sizes)
    if n > MAX_DIMS or len(strides) != n or offset < 0 or any(x < 0 for x in sizes) or any(x < 0 for x in strides):
        raise Unencodable
    try:
        return U8.pack(n) + struct.pack(f"<{2 * n + 1}q", *sizes, *strides, offset)
    except struct.error:  # a value past int64
        raise Unencodable from None


def tensors(handles: list[int]) -> bytes:
    if len(handles) > MAX_LIST:
        raise Unencodable
    return TAG_U16.pack(TENSORS, len(handles)) + struct.pack(f"<{len(handles)}Q", *handles)


def tensors_with_views(elements: list[bytes]) -> bytes:
    """A tensor list (VIEWS) of encoded elements, each `tensor(h)` or a view argument (`view`), in order."""
    if len(elements) > MAX_LIST:
        raise Unencodable
    return TAG_U16.pack(VIEWS, len(elements)) + b"".join(elements)


def kwarg_key(name: str) -> bytes:
    raw = name.encode("ascii")
    if not raw or len(raw) > 255:
        raise Unencodable
    return U8.pack(len(raw)) + raw


# ---- decoding (the daemon) ----

Resolve = Callable[[int], torch.Tensor]


class Geometry:
    """A view argument's sizes, strides and storage offset, checked on their own (`read_geometry`); `last` is the
    number of storage elements the view spans from the storage's start (0 if it has no element)."""

    __slots__ = ("sizes", "strides", "offset", "last")

    def __init__(self, sizes: tuple[int, ...], strides: tuple[int, ...], offset: int) -> None:
        self.sizes = sizes
        self.strides = strides
        self.offset = offset
        numel = 1
        for n in sizes:
            numel *= n
        if numel > _I64_MAX:
            raise InvalidArgument(f"view argument of {numel} elements (more than int64 counts)")
        # an empty view reaches no byte: like torch's own check, any offset (a pad's empty slices have such views)
        self.last = 0 if numel == 0 else offset + 1 + sum((n - 1) * st for n, st in zip(sizes, strides, strict=True))

    def __repr__(self) -> str:
        return f"Geometry({self.sizes}, {self.strides}, {self.offset})"


def read_geometry(data: bytes, pos: int) -> tuple[Geometry, int]:
    """The geometry at `pos` (after a view argument's handle) and the position after it."""
    if pos >= len(data):
        _short(pos)
    rank = data[pos]
    if rank > MAX_DIMS:
        raise InvalidArgument(f"view argument of {rank} dimensions; at most {MAX_DIMS}")
    fmt = _GEOMETRY[rank]
    if pos + 1 + fmt.size > len(data):
        raise InvalidArgument(f"malformed eager op: a view argument of {rank} dimensions runs past the end")
    raw = fmt.unpack_from(data, pos + 1)
    if any(v < 0 for v in raw):
        raise InvalidArgument("view argument with a negative size, stride or offset")
    return Geometry(raw[:rank], raw[rank : 2 * rank], raw[2 * rank]), pos + 1 + fmt.size


_GEOMETRY = [struct.Struct(f"<{2 * n + 1}q") for n in range(MAX_DIMS + 1)]
_STRIDED = torch.strided


def view_of(t: torch.Tensor, g: Geometry) -> torch.Tensor:
    """`t.as_strided` with geometry `g`, after checking that `t` is a plain dense tensor and that the whole view
    lies inside `t`'s storage as it is now (it may have been resized since `g` was read)."""
    if t.layout != _STRIDED or t.is_quantized or t.is_nested or t.is_conj() or t.is_neg():
        raise InvalidArgument("view argument of a tensor that is not a plain dense tensor")
    size = t.element_size()
    have = t.untyped_storage().nbytes()
    if g.last * size > have:
        raise InvalidArgument(
            f"view argument reaches storage byte {g.last * size} of a {have}-byte storage "
            f"(sizes {list(g.sizes)}, strides {list(g.strides)}, offset {g.offset})"
        )
    return t.as_strided(g.sizes, g.strides, g.offset)


class Record:
    """A decoded record: the op's id (and name, if it defines one), outputs, Python arguments, tensor handles."""

    __slots__ = ("op_id", "name", "outputs", "args", "kwargs", "handles")

    def __init__(self) -> None:
        self.op_id = 0
        self.name = ""
        self.outputs: list[int] = []
        self.args: list[Any] = []
        self.kwargs: dict[str, Any] = {}
        self.handles: list[int] = []  # every tensor handle the arguments name (written ones are recounted)


def _text(data: bytes, pos: int, n: int) -> str:
    if pos + n > len(data):
        raise InvalidArgument("malformed eager op: a name runs past the end")
    try:
        return data[pos : pos + n].decode("ascii")
    except UnicodeDecodeError:
        raise InvalidArgument("malformed eager op: a name that is not ASCII") from None


def read_head(data: bytes) -> tuple[int, int, str, list[int]]:
    """(position after the outputs, op id, defined name or "", outputs)."""
    try:
        op_id, n = HEAD.unpack_from(data, 0)
        if op_id >= MAX_OP_IDS:
            raise InvalidArgument(f"eager op id {op_id} out of range (at most {MAX_OP_IDS} per session)")
        if n > MAX_NAME:
            raise InvalidArgument("op name too long")
        name = _text(data, 5, n) if n else ""
        pos = 5 + n
        count = data[pos] if pos < len(data) else _short(pos)
        outputs = list(_OUTS[count].unpack_from(data, pos + 1))
    except struct.error:
        raise InvalidArgument("malformed eager op: truncated head") from None
    return pos + 1 + 8 * count, op_id, name, outputs


_OUTS = [struct.Struct(f"<{n}Q") for n in range(256)]  # a u8 count of output handles


def _short(pos: int) -> int:
    raise InvalidArgument(f"malformed eager op: truncated at byte {pos}")


def outputs_of(data: bytes) -> list[int]:
    """The output handles of a record (to poison after a failure), or [] if the record does not get that far."""
    try:
        return read_head(data)[3]
    except InvalidArgument:
        return []


def decode(data: bytes, resolve: Resolve, device: torch.device) -> Record:
    """Parse a whole record; tensor handles go through `resolve` (ownership checks), devices become `device`."""
    rec = Record()
    rec.op_id, rec.name, rec.outputs, rec.args, rec.kwargs, rec.handles = decode_parts(data, resolve, device)
    return rec


def decode_parts(
    data: bytes, resolve: Resolve, device: torch.device, get: Callable[[int], Any] | None = None
) -> tuple[int, str, list[int], list[Any], dict[str, Any], list[int]]:
    """`decode` without the Record: (op id, defined name or "", outputs, args, kwargs, handles). `get`, when
    given, looks a handle up first (the session's dict of live tensors); `resolve` runs for what it misses
    (its errors: foreign, unknown, failed or half-uploaded handles). The daemon's hot path."""
    pos, op_id, name, outputs = read_head(data)
    end = len(data)
    handles: list[int] = []
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    try:
        n = data[pos] if pos < end else _short(pos)
        pos += 1
        for _ in range(n):
            tag = data[pos] if pos < end else _short(pos)
            if tag == TENSOR:  # the common tags inline; the rest (and every error) in _value
                (h,) = _unpack_u64(data, pos + 1)
                handles.append(h)
                t = get(h) if get is not None else None
                args.append(t if t is not None else resolve(h))
                pos += 9
            elif tag == FLOAT:
                args.append(_unpack_f64(data, pos + 1)[0])
                pos += 9
            elif tag == INT:
                args.append(_unpack_i64(data, pos + 1)[0])
                pos += 9
            elif tag == NONE:
                args.append(None)
                pos += 1
            elif tag == VIEW:
                (h,) = _unpack_u64(data, pos + 1)
                g, pos = read_geometry(data, pos + 9)
                handles.append(h)
                t = get(h) if get is not None else None
                args.append(view_of(t if t is not None else resolve(h), g))
            else:
                v, pos = _value(data, pos, resolve, device, handles)
                args.append(v)
        n = data[pos] if pos < end else _short(pos)
        pos += 1
        for _ in range(n):
            k = data[pos] if pos < end else _short(pos)
            if k == 0:
                raise InvalidArgument("malformed eager op: an empty keyword")
            key = _text(data, pos + 1, k)
            if key in kwargs:
                raise InvalidArgument(f"malformed eager op: keyword {key!r} twice")
            kwargs[key], pos = _value(data, pos + 1 + k, resolve, device, handles)
    except struct.error:
        raise InvalidArgument(f"malformed eager op: truncated after byte {pos}") from None
    if pos != end:
        raise InvalidArgument(f"malformed eager op: {end - pos} bytes after its end")
    return op_id, name, outputs, args, kwargs, handles


_unpack_u64 = U64.unpack_from
_unpack_i64 = I64.unpack_from
_unpack_f64 = F64.unpack_from
_unpack_u16 = U16.unpack_from


def _value(data: bytes, pos: int, resolve: Resolve, device: torch.device, handles: list[int]) -> tuple[Any, int]:
    """(value, position after it); a short buffer raises struct.error (the caller's InvalidArgument)."""
    if pos >= len(data):
        _short(pos)
    tag = data[pos]
    pos += 1
    if tag == TENSOR:
        (h,) = _unpack_u64(data, pos)
        handles.append(h)
        return resolve(h), pos + 8
    if tag == VIEW:
        (h,) = _unpack_u64(data, pos)
        g, pos = read_geometry(data, pos + 8)
        handles.append(h)
        return view_of(resolve(h), g), pos
    if tag == INT:
        return _unpack_i64(data, pos)[0], pos + 8
    if tag == FLOAT:
        return _unpack_f64(data, pos)[0], pos + 8
    if tag == VIEWS:
        return _views(data, pos, resolve, handles)
    if tag == NONE:
        return None, pos
    if tag == BOOL:
        b = data[pos] if pos < len(data) else _short(pos)
        if b > 1:
            raise InvalidArgument(f"malformed eager op: bool byte {b}")
        return b == 1, pos + 1
    if tag in _LISTS:
        (n,) = _unpack_u16(data, pos)
        code, size = _LISTS[tag]
        pos += 2
        if pos + size * n > len(data):
            raise InvalidArgument(f"malformed eager op: a list of {n} runs past the end")
        fmt = _LIST_STRUCTS.get((code, n))
        if fmt is None:
            fmt = struct.Struct(f"<{n}{code}")
            if n <= 64:  # the short lists ops take (sizes, dims); longer ones are parsed without a cache
                _LIST_STRUCTS[(code, n)] = fmt
        raw = fmt.unpack_from(data, pos)
        pos += size * n
        if tag == TENSORS:
            handles.extend(h for h in raw if h)
            return [None if h == 0 else resolve(h) for h in raw], pos
        if tag == BOOLS:
            if any(b > 1 for b in raw):
                raise InvalidArgument("malformed eager op: a bool list byte above 1")
            return [b == 1 for b in raw], pos
        return list(raw), pos
    if tag == DEVICE:
        return device, pos
    if tag == CPU:
        return torch.device("cpu"), pos
    table = _ENUMS.get(tag)
    if table is None:
        raise InvalidArgument(f"malformed eager op: unknown argument tag {tag}")
    number = data[pos] if pos < len(data) else _short(pos)
    found = table[1].get(number)
    if found is None:
        raise InvalidArgument(f"malformed eager op: unknown {table[0]} {number}")
    return found, pos + 1


def _views(data: bytes, pos: int, resolve: Resolve, handles: list[int]) -> tuple[list[torch.Tensor], int]:
    """A VIEWS list at `pos` (after its tag): its tensors (views applied) and the position after it."""
    end = len(data)
    (n,) = _unpack_u16(data, pos)
    pos += 2
    if pos + 9 * n > end:  # each element takes at least a kind byte and a handle
        raise InvalidArgument(f"malformed eager op: a list of {n} tensors runs past the end")
    out: list[torch.Tensor] = []
    for _ in range(n):
        if pos + 9 > end:
            raise InvalidArgument(f"malformed eager op: a tensor list element runs past the end at byte {pos}")
        kind = data[pos]
        (h,) = _unpack_u64(data, pos + 1)
        if kind == TENSOR:
            handles.append(h)
            out.append(resolve(h))
            pos += 9
        elif kind == VIEW:
            g, pos = read_geometry(data, pos + 9)
            handles.append(h)
            out.append(view_of(resolve(h), g))
        else:
            raise InvalidArgument(f"malformed eager op: tensor list element of kind {kind}")
    return out, pos


_LISTS = {TENSORS: ("Q", 8), INTS: ("q", 8), FLOATS: ("d", 8), BOOLS: ("B", 1)}
_LIST_STRUCTS: dict[tuple[str, int], struct.Struct] = {}  # (code, count <= 64) -> its Struct
_ENUMS: dict[int, tuple[str, dict[int, Any]]] = {
    DTYPE: ("dtype", _DTYPES),
    LAYOUT: ("layout", _LAYOUTS),
    MEMORY_FORMAT: ("memory format", _MEMORY_FORMATS),
}
