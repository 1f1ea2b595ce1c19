"""One slice of a session's commands, as it crosses the boundary between the daemon and a session's worker.

The daemon never parses a command it does not need to: `split_frame` cuts a raw ClientFrame into the byte spans
of its commands (each a valid one-command ClientFrame on its own) and reads each command's kind from its first
tag, so a slice sent to a worker is the concatenation of its spans. The worker runs the slice with
`run_commands` (the same code runs in-thread for `--isolation thread`) and answers with a `SliceResult`:
how many commands ran, the measured execution time, the session's memory and counters, and the replies.

Requests and results are plain length-prefixed structs: nothing crossing this boundary is ever unpickled, and
the daemon parses a worker's result defensively (a worker may be compromised by a kernel bug).
"""

from __future__ import annotations

import functools
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from grpc import StatusCode

from gpupool import protocol
from gpupool._proto import device_pb2, tensor_pb2
from gpupool.errors import InvalidArgument, ResourceExhausted
from gpupool.protocol import FRAME_COMMANDS_TAG, GET, SYNC, UPLOAD

from . import bulk

ANSWERED = (GET, SYNC)  # commands that produce replies (command kinds: gpupool.wire)
_BULK_KINDS = frozenset((UPLOAD, GET))  # commands that may use the side channel (`split_frame`'s `bulk`)
_COMMANDS_TAG = FRAME_COMMANDS_TAG[0]
_RUN_GRAPH = bulk.RUN_GRAPH  # `split_graphs`

# The status codes a worker may report errors under (anything else is a lie and becomes INTERNAL).
CODES = (
    StatusCode.INVALID_ARGUMENT,
    StatusCode.UNAUTHENTICATED,
    StatusCode.PERMISSION_DENIED,
    StatusCode.RESOURCE_EXHAUSTED,
    StatusCode.FAILED_PRECONDITION,
    StatusCode.UNAVAILABLE,
    StatusCode.NOT_FOUND,
    StatusCode.INTERNAL,
)


def split_frame(
    raw: bytes | memoryview, max_commands: int, bulk: list[int] | None = None
) -> list[tuple[int, memoryview]]:
    """(kind, span) of each command of a serialized ClientFrame; refuses more than `max_commands` commands
    before materializing any (a 16 MiB frame of empty commands would otherwise cost gigabytes). `bulk`: the
    positions of its Uploads and Gets (what may use the side channel, server/bulkside.py) are appended to it.

    The stream reader runs this on every frame: where the native runner's build is at hand (`native_split`), its
    C++ reading (native_runner.cpp `split_frame`) cuts a frame it accepts (the same spans, kinds and positions);
    a frame it does not accept, and every frame without it, takes the Python reading (`py_split_frame`), which
    raises the error. The C++ reading's spans of a frame of up to 64 KiB are bytes copies (its `COPY_FRAME`, round
    43: a tenth of a memoryview slice's cost), a longer frame's views of it, as the Python reading's all are: a span
    is read as bytes (len, join, indexing, protobuf), never as a view of the frame."""
    fast = _native[0] if _native else native_split()
    if fast is not None and (raw.__class__ is bytes or raw.__class__ is memoryview):  # (a side socket's frame buffer)
        got = fast(raw, max_commands, UPLOAD, GET)
        if got is not None:
            if bulk is not None and got[1]:
                bulk += got[1]
            return got[0]  # type: ignore[no-any-return]
    return py_split_frame(raw, max_commands, bulk)


def split_graphs(
    raw: bytes | memoryview, max_commands: int, bulk: list[int]
) -> tuple[list[tuple[int, memoryview]], bool]:
    """`split_frame` for the front's reader, and whether the frame holds a command of kind RUN_GRAPH: the one
    command a worker may run from its bytes without upb's parse first (`run_commands`' `_run_graphs`: native_runner.cpp
    `graph_frame` takes only commands whose first tag is run_graph's, i.e. of that kind). A small frame without one
    is left to the worker's parse, which comes before any of its commands runs (`service.DeviceServicer._frame`,
    round 45). The C++ reading tells it as it reads each command's kind (its third element: no Python a command);
    the Python reading's commands are scanned here."""
    fast = _native[0] if _native else native_split()
    if fast is not None and (raw.__class__ is bytes or raw.__class__ is memoryview):
        got = fast(raw, max_commands, UPLOAD, GET)
        if got is not None:
            if got[1]:
                bulk += got[1]
            return got[0], got[2]
    commands = py_split_frame(raw, max_commands, bulk)
    return commands, _RUN_GRAPH in [kind for kind, _ in commands]


_native: list[Any] = []  # [native_runner.cpp's `split_frame`, or None], once decided
_native_asked = [0.0]  # when `native_split` last found no build (it asks again after NATIVE_RETRY seconds)
NATIVE_RETRY = 10.0


def native_split() -> Any:
    """The native runner's `split_frame` where its build is at hand (`native_runner.built`: never a build here),
    else None. While no build is there (the zygote builds it at its start) the answer is None and asked again
    after NATIVE_RETRY seconds; any other answer is kept."""
    now = time.monotonic()
    if _native_asked[0] and now - _native_asked[0] < NATIVE_RETRY:
        return None
    from . import native_runner  # imports torch: the front has by its first frame

    mod = native_runner.built()
    if mod is None and not native_runner.decided():
        _native_asked[0] = now  # no build there yet: ask again later
        return None
    if mod is not None:
        _uploads[mod.split_frame] = mod.plain_uploads
    _native.append(None if mod is None else mod.split_frame)
    return _native[0]


_uploads: dict[Any, Any] = {}  # a build's `split_frame` -> its `plain_uploads` (native_runner.cpp), `unread_bulk`'s


def unread_bulk(commands: list[tuple[int, Any]], marked: list[int]) -> list[int]:
    """Of `marked` (a frame's Uploads and Gets, `split_frame`'s positions), those the front's reader has upb parse
    (its check of them, `service._take_bulk`): all of them, but where the native runner's build is at hand an Upload
    it reads whole (native_runner.cpp `plain_uploads`: a message upb takes, no `bulk_bytes`) is left out: upb's parse
    of it would refuse nothing and find nothing for the side channel (round 49; an eager step's inputs)."""
    fast = _uploads.get(_native[0]) if _native else None
    return marked if fast is None else fast(commands, marked)  # type: ignore[no-any-return]


def py_split_frame(
    raw: bytes | memoryview, max_commands: int, bulk: list[int] | None = None
) -> list[tuple[int, memoryview]]:
    """`split_frame`'s Python reading, the reference: the usual shapes take a short path inline (a command of
    fewer than 16 KiB: a length of one or two bytes; a kind of one or two tag bytes: eager ops are field 30,
    two)."""
    view = memoryview(raw)
    out: list[tuple[int, memoryview]] = []
    append = out.append
    marks = [] if bulk is None else bulk
    left = max_commands
    i, n = 0, len(raw)
    while i < n:
        start = i
        if raw[i] != _COMMANDS_TAG:
            raise InvalidArgument(f"malformed ClientFrame: unexpected field tag {raw[i]:#x} at byte {i}")
        length = raw[i + 1] if i + 1 < n else 0x80
        if length < 0x80:
            i += 2
        elif i + 2 < n and raw[i + 2] < 0x80:  # two bytes: a command of 128 bytes to 16 KiB (an eager op's)
            length = (length & 0x7F) | raw[i + 2] << 7
            i += 3
        else:
            i += 1
            length = shift = 0
            while True:
                if i >= n or shift > 35:
                    raise InvalidArgument("malformed ClientFrame: truncated length")
                b = raw[i]
                i += 1
                length |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
        end = i + length
        if end > n:
            raise InvalidArgument(f"malformed ClientFrame: a command of {length} bytes runs past the frame's end")
        if not length:
            i = end
            continue  # an empty command asks for nothing
        b = raw[i]
        if b < 0x80:
            kind = b >> 3
        elif i + 1 < end and raw[i + 1] < 0x80:
            kind = ((b & 0x7F) | raw[i + 1] << 7) >> 3
        else:
            kind = _field_number(raw, i, end)
        i = end
        if kind == 0:  # a first tag of field 0, or overlong: protobuf refuses it (it was dropped unread, and a big
            # frame of canonical uploads is not parsed by protobuf: the rest of it ran)
            raise InvalidArgument(f"malformed ClientFrame: the command at byte {start} starts with no valid field tag")
        if not left:
            raise ResourceExhausted(f"a frame of more than {max_commands} commands (the limit); send smaller frames")
        if kind in _BULK_KINDS:
            marks.append(max_commands - left)
        left -= 1
        append((kind, view[start:end]))
    return out


def _field_number(raw: bytes | memoryview, i: int, end: int) -> int:
    """The field number of the first tag of a command (its kind; step capture's kinds have two-byte tags)."""
    tag = shift = 0
    while i < end and shift < 35:
        b = raw[i]
        tag |= (b & 0x7F) << shift
        if b < 0x80:
            return tag >> 3
        i += 1
        shift += 7
    return 0


# ---- daemon -> worker ----

REQ_RUN, REQ_EXIT, REQ_RUN_SHARED = 1, 2, 3  # RUN_SHARED: the payload is in the shared buffer
REQ_UPLOADS = 0x10  # or-ed into the kind: the payload is big uploads only (server/bulk.py's copy-once path)
REQ_UP_SLOT = 0x20  # or-ed into RUN_SHARED, an upload slot's number (0-3) in the top 2 bits: the payload is there
SHARED = 0x80000000  # set in a result's length word: the result is in the shared buffer
# kind, free device bytes, reply room (bytes), shared payload length, budget (s), download slot (-1: none), the
# session's new quota (-1: unchanged)
_REQ = struct.Struct("<Bqqqdbq")
REQUEST_HEAD = _REQ.size  # bytes of a request without a payload in the socket (after its length word)
SIDE = 0x80000000  # set in a reply frame's length word: a side chunk record (`SideChunk`), not frame bytes
_SIDE = struct.Struct("<qqBqq")  # request id, offset, last, offset in the slot, length; then the meta's bytes


@dataclass
class SliceRequest:
    # bytes the session may still allocate: its device's free bytes or its quota's room, whichever is fewer (daemon.py
    # `_device_free`: never its co-tenants' use where the quota binds first)
    device_free: int
    reply_room: int  # bytes of replies the session may still produce before it must wait for its reader
    budget: float  # seconds: stop after the command that passes it
    payload: bytes | memoryview  # the concatenated command spans
    uploads: bool = False  # the spans are big uploads only (bulk.slice_length): copied once, no budget cut
    slot: int = -1  # a download slot of the shared memory the worker may write side chunks into (-1: none)
    size: int = -1  # the daemon's: its spans' bytes in all where it counted them (-1: not counted); never sent
    # the session's quota from this slice on, a refreshed token's (daemon.py `Daemon._take_terms`); -1: unchanged
    quota: int = -1


class SideChunk:
    """A download chunk for the bulk side socket whose bytes the worker wrote into a download slot of the
    memory it shares with the daemon (server/worker.py): the daemon sends them to the socket from there and
    then `release`s the slot; the stream gets only the chunk's announcement (server/bulkside.py). In the
    worker `data` is empty and `at` is the bytes' place in the slot; in the daemon `data` is a view of it."""

    __slots__ = ("at", "data", "last", "meta", "offset", "release", "request_id", "size")

    def __init__(self, request_id: int, meta: bytes | None, offset: int, last: bool, at: int, size: int) -> None:
        self.request_id, self.meta, self.offset, self.last = request_id, meta, offset, last
        self.at, self.size = at, size
        self.data = memoryview(b"")
        self.release: Callable[[], None] = _nothing

    def __len__(self) -> int:  # what it holds of the reply bound (`reply_room`, the daemon's outbox count)
        return 64 + self.size

    def record(self) -> bytes:
        return _SIDE.pack(self.request_id, self.offset, self.last, self.at, self.size) + (self.meta or b"")


def _nothing() -> None:
    pass


def encode_request(
    req: SliceRequest, parts: Sequence[bytes | memoryview] = (), shared: int = -1
) -> list[bytes | memoryview]:
    """The request's buffers; `parts` (the command spans) stand in for `req.payload` when given; `shared` >= 0:
    the payload (that many bytes) was written to the shared buffer instead."""
    flag = REQ_UPLOADS if req.uploads else 0
    if shared >= 0:
        head = _REQ.pack(
            REQ_RUN_SHARED | flag, req.device_free, req.reply_room, shared, req.budget, req.slot, req.quota
        )
        return [struct.pack("<I", len(head)), head]
    head = _REQ.pack(REQ_RUN | flag, req.device_free, req.reply_room, 0, req.budget, req.slot, req.quota)
    body = list(parts) if parts else [req.payload]
    return [struct.pack("<I", len(head) + sum(len(b) for b in body)), head, *body]


_SHARED_REQ = struct.Struct("<I" + _REQ.format[1:])  # the length word and the header: a request in one piece


def shared_request(req: SliceRequest, size: int, up_slot: int = -1) -> bytes:
    """`encode_request(req, shared=size)` as one buffer (the usual request: its payload in the shared buffer);
    `up_slot` >= 0: the payload is in that upload slot of the shared memory instead (server/worker.py)."""
    flag = REQ_UPLOADS if req.uploads else 0
    if up_slot >= 0:
        flag |= REQ_UP_SLOT | up_slot << 6
    return _SHARED_REQ.pack(
        _REQ.size, REQ_RUN_SHARED | flag, req.device_free, req.reply_room, size, req.budget, req.slot, req.quota
    )


def decode_request(
    body: bytes | bytearray | memoryview, shared: memoryview, up_slots: Sequence[memoryview] = ()
) -> SliceRequest | None:
    """The request in `body` (its payload in `body`, in `shared`, or in one of `up_slots`); None: the exit, or
    a request this worker does not know."""
    kind, device_free, reply_room, shared_len, budget, slot, quota = _REQ.unpack_from(body, 0)
    up = kind >> 6 if kind & REQ_UP_SLOT else -1
    uploads, kind = bool(kind & REQ_UPLOADS), kind & ~(REQ_UPLOADS | REQ_UP_SLOT | 0xC0)
    if up >= 0:
        if kind != REQ_RUN_SHARED or up >= len(up_slots) or not 0 <= shared_len <= len(up_slots[up]):
            return None
        return SliceRequest(device_free, reply_room, budget, up_slots[up][:shared_len], uploads, slot, -1, quota)
    if kind == REQ_RUN_SHARED and 0 <= shared_len <= len(shared):
        return SliceRequest(device_free, reply_room, budget, shared[:shared_len], uploads, slot, -1, quota)
    if kind != REQ_RUN:
        return None
    body = memoryview(body)[_REQ.size :]  # no copy
    return SliceRequest(device_free, reply_room, budget, body, uploads, slot, -1, quota)


EXIT_REQUEST = struct.pack("<I", _REQ.size) + _REQ.pack(REQ_EXIT, 0, 0, 0, 0.0, -1, -1)
REQ_PING = 4  # is the worker alive? it answers PONG at once (the daemon's fast Sync asks before answering)
PING_REQUEST = struct.pack("<I", _REQ.size) + _REQ.pack(REQ_PING, 0, 0, 0, 0.0, -1, -1)
PONG = 0xFFFFFFFF  # a result length word that is no result (a late pong is skipped)


def is_ping(body: bytes | bytearray | memoryview) -> bool:
    return len(body) >= 1 and body[0] == REQ_PING


# ---- worker -> daemon ----

# executed, seconds, used, ops, handles, graph bytes, uploaded, downloaded, n errors, n events, n replies, flags
_RES = struct.Struct("<IdqqqqqqHHIB")
_ERROR_PENDING = 1  # flags: the session holds an error for its next Sync
_PARTIAL = 2  # flags: the command after the executed ones (a Get, a DefineGraph) did a piece, continues next slice
_BUSY = 4  # flags: slices of the session may still run on its GPU (devices.SliceTimer: their time comes later)
_MALFORMED = 8  # flags: the command after the executed ones is malformed (SliceResult.malformed)
# Step capture's graph events (server/graph.py): the only names a worker may report (they become metric labels).
GRAPH_EVENTS = ("defined", "rerecorded", "replayed", "dropped", "traced")
# Eager records a worker ran inside learned runs (server/runs.py), reported with the graph events.
LEARNED_OPS = "learned_ops"
NATIVE_OPS = "native_ops"  # of the learned ones, those the C++ runner ran (server/native_runner.py)


@dataclass
class SliceResult:
    executed: int = 0
    seconds: float = 0.0
    used: int = 0
    ops: int = 0  # total ops of the session so far
    handles: int = 0  # handles the session holds (live, poisoned, uploading)
    uploaded: int = 0
    downloaded: int = 0
    errors: dict[StatusCode, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)  # step capture's graph events ("replayed", ...)
    replies: list[bytes | SideChunk | list[Any]] = field(default_factory=list)  # a frame, a side chunk, or frames
    error_pending: bool = False  # an error waits for the next Sync (else the daemon may answer a Sync itself)
    partial: bool = False  # command `executed` (a big Get, a DefineGraph) did a piece of its work and must run again
    busy: bool = False  # its GPU may still run the session's slices (a CUDA device's run-ahead: devices.SliceTimer)
    graph_bytes: int = 0  # host memory its captured graphs hold, estimated (--max-graph-memory; Status, metrics)
    # the command after the executed ones is one protobuf refuses (`_run_before_malformed`): the daemon ends the
    # session with INVALID_ARGUMENT
    malformed: bool = False


def _head(r: SliceResult) -> tuple[Any, ...]:
    """The fields of a result's fixed head (`_RES`), for `encode_result` and `write_result` alike."""
    return (
        r.executed,
        r.seconds,
        r.used,
        r.ops,
        r.handles,
        r.graph_bytes,
        r.uploaded,
        r.downloaded,
        len(r.errors),
        len(r.events),
        len(r.replies),
        _flags(r),
    )


def _flags(r: SliceResult) -> int:
    """A result's flags word (`_RES`'s last field), for `_head` and `write_result`'s quiet paths alike."""
    return (
        (_ERROR_PENDING if r.error_pending else 0)
        | (_PARTIAL if r.partial else 0)
        | (_BUSY if r.busy else 0)
        | (_MALFORMED if r.malformed else 0)
    )


def encode_result(r: SliceResult) -> list[bytes | memoryview]:
    parts: list[bytes | memoryview] = [_RES.pack(*_head(r))]
    for code, n in r.errors.items():
        parts.append(struct.pack("<BI", CODES.index(code) if code in CODES else CODES.index(StatusCode.INTERNAL), n))
    for event, n in r.events.items():
        name = event.encode()[:32]
        parts.append(struct.pack("<BI", len(name), n) + name)
    for item in r.replies:
        frames = item if isinstance(item, list) else [item]
        parts.append(struct.pack("<BI", isinstance(item, list), len(frames)))
        for f in frames:
            if isinstance(f, SideChunk):  # its bytes are in the download slot already
                record = f.record()
                parts += (struct.pack("<I", len(record) | SIDE), record)
                continue
            parts.append(struct.pack("<I", len(f)))
            if isinstance(f, protocol.Frame):  # written (or sent) from the tensor's memory: no join
                parts += (f.head, f.data)
            else:
                parts.append(f)
    body_len = sum(len(p) for p in parts)
    return [struct.pack("<I", body_len), *parts]


_CODE_COUNT = struct.Struct("<BI")
_REPLY_HEAD = struct.Struct("<BII")  # one reply of one frame: is_list (0), 1 frame, its length
# each event name a worker reports: (its record's struct, the name's length, the name), `write_result`'s quiet case
_EVENT_PACKS = {
    e: (struct.Struct(f"<BI{len(e)}s"), len(e), e.encode()) for e in (*GRAPH_EVENTS, LEARNED_OPS, NATIVE_OPS)
}
# the same, a whole result of that one event (its head, then its record)
_ONE_EVENT = {e: (struct.Struct(_RES.format + f"BI{n}s"), n, b) for e, (_, n, b) in _EVENT_PACKS.items()}


def write_result(r: SliceResult, buf: memoryview) -> int:
    """`encode_result(r)` without its length word, written straight into `buf`; returns its size, or -1 (nothing
    meaningful written) when it does not fit or holds replies other than plain frames (downloads' lists, side
    chunks, views of a tensor): `encode_result` then. The bytes are exactly `encode_result`'s. A result of no replies
    and no errors (a quiet slice: a captured step's) is written with one `pack_into` per event (round 44)."""
    replies, errors, events = r.replies, r.errors, r.events
    if len(events) == 1 and not replies and not errors:  # a captured step's: one pack_into of the whole result
        for event, n in events.items():
            one = _ONE_EVENT.get(event)
            if one is not None and one[0].size <= len(buf):
                one[0].pack_into(buf, 0, r.executed, r.seconds, r.used, r.ops, r.handles, r.graph_bytes, r.uploaded,
                                 r.downloaded, 0, 1, 0, _flags(r), one[1], n, one[2])  # fmt: skip
                return one[0].size  # type: ignore[no-any-return]
    if not replies and not errors and _RES.size + 64 * len(events) <= len(buf):
        pos = _RES.size
        for event, n in events.items():
            known = _EVENT_PACKS.get(event)
            if known is None:
                break  # (a name no ledger makes: the general path)
            known[0].pack_into(buf, pos, known[1], n, known[2])
            pos += known[0].size
        else:
            _RES.pack_into(buf, 0, r.executed, r.seconds, r.used, r.ops, r.handles, r.graph_bytes, r.uploaded,
                           r.downloaded, 0, len(events), 0, _flags(r))  # fmt: skip
            return pos
    size = _RES.size + 5 * len(errors)
    for event in events:
        size += 5 + len(event.encode()[:32])
    for item in replies:
        if type(item) is not bytes:
            return -1
        size += _REPLY_HEAD.size + len(item)
    if size > len(buf):
        return -1
    _RES.pack_into(buf, 0, *_head(r))
    pos = _RES.size
    for code, n in errors.items():
        _CODE_COUNT.pack_into(buf, pos, CODES.index(code) if code in CODES else CODES.index(StatusCode.INTERNAL), n)
        pos += 5
    for event, n in events.items():
        name = event.encode()[:32]
        _CODE_COUNT.pack_into(buf, pos, len(name), n)
        buf[pos + 5 : pos + 5 + len(name)] = name
        pos += 5 + len(name)
    for frame in replies:
        assert isinstance(frame, bytes)  # checked above
        _REPLY_HEAD.pack_into(buf, pos, 0, 1, len(frame))
        pos += _REPLY_HEAD.size
        buf[pos : pos + len(frame)] = frame
        pos += len(frame)
    return pos


def decode_result(body: bytes | bytearray | memoryview, commands: int, slot: memoryview | None = None) -> SliceResult:
    """Parse a worker's result; raises ValueError on anything malformed or impossible. `slot`: the download
    slot the slice was given; side chunks (`SideChunk`) must lie inside it, in order, without overlapping."""
    view = memoryview(body)
    executed, seconds, used, ops, handles, graphs, up, down, n_err, n_ev, n_rep, flags = _RES.unpack_from(view, 0)
    if executed > commands or not 0.0 <= seconds < 1e6 or min(used, ops, handles, graphs, up, down) < 0:
        raise ValueError("impossible slice result")
    pos = _RES.size
    errors: dict[StatusCode, int] = {}
    for _ in range(min(n_err, len(CODES))) if n_err else ():
        code, n = _CODE_COUNT.unpack_from(view, pos)
        pos += 5
        if code >= len(CODES):
            raise ValueError(f"an error count under status code index {code}")
        errors[CODES[code]] = errors.get(CODES[code], 0) + min(n, executed)
    events: dict[str, int] = {}
    for _ in range(min(n_ev, 16)) if n_ev else ():  # names become metric label values: the known events only
        length, n = _CODE_COUNT.unpack_from(view, pos)
        name = bytes(view[pos + 5 : pos + 5 + length]).decode("ascii", "replace")
        pos += 5 + length
        if name in GRAPH_EVENTS or name in (LEARNED_OPS, NATIVE_OPS):
            events[name] = min(n, executed)
    # A download's frames go to the outbox one by one: each frame gRPC takes makes room for the next piece,
    # so the worker builds piece n+1 while gRPC sends piece n (one list would park the session until the last
    # frame of the piece was sent): a list's frames are replies of their own here.
    replies: list[Any] = []
    slot_end = 0
    for _ in range(n_rep):
        if len(view) - pos >= _REPLY_HEAD.size:
            is_list, count, length = _REPLY_HEAD.unpack_from(view, pos)
            if not is_list and count == 1 and not length & SIDE:  # the usual: one frame (a sync's answer...)
                pos += _REPLY_HEAD.size
                if pos + length > len(view):
                    raise ValueError("reply runs past the result's end")
                replies.append(bytes(view[pos : pos + length]))
                pos += length
                continue
        is_list, count = _CODE_COUNT.unpack_from(view, pos)
        if not (is_list or count == 1):
            raise ValueError(f"a reply of {count} frames that is not a list")
        pos += 5
        for _ in range(count):
            (length,) = struct.unpack_from("<I", view, pos)
            pos += 4
            side = bool(length & SIDE)
            length &= ~SIDE
            if pos + length > len(view):
                raise ValueError("reply runs past the result's end")
            if side:
                chunk = _side_chunk(view[pos : pos + length], slot, slot_end)
                slot_end = chunk.at + chunk.size
                replies.append(chunk)
            else:
                replies.append(bytes(view[pos : pos + length]))
            pos += length
    partial = bool(flags & _PARTIAL)
    malformed = bool(flags & _MALFORMED)
    if (
        pos != len(view)
        or n_rep > executed + partial
        or (partial and executed >= commands)
        or (malformed and (partial or executed >= commands))
    ):
        raise ValueError("malformed slice result")
    res = SliceResult(
        executed,
        seconds,
        used,
        ops,
        handles,
        up,
        down,
        errors,
        events,
        replies,
        bool(flags & _ERROR_PENDING),
        partial,
        bool(flags & _BUSY),
        graphs,
    )
    if malformed:
        res.malformed = True
    return res


def _side_chunk(record: memoryview, slot: memoryview | None, start: int) -> SideChunk:
    """A side chunk record of a worker's result, its data a view of the slot (checked: inside it, after
    `start`, and the meta a TensorMeta); raises ValueError otherwise."""
    if slot is None or not _SIDE.size <= len(record) <= _SIDE.size + 4096:  # a TensorMeta is never kilobytes
        raise ValueError("a malformed side chunk, or one without a download slot")
    rid, offset, last, at, size = _SIDE.unpack_from(record, 0)
    if not (start <= at and 0 < size and at + size <= len(slot) and offset >= 0 and rid > 0):
        raise ValueError(f"a side chunk of {size} bytes at {at} outside its download slot")
    meta = bytes(record[_SIDE.size :]) or None
    if meta is not None:
        try:
            tensor_pb2.TensorMeta.FromString(meta)
        except DecodeError:
            raise ValueError("a side chunk with a malformed TensorMeta") from None
    chunk = SideChunk(rid, meta, offset, bool(last), at, size)
    chunk.data = slot[at : at + size]
    return chunk


# ---- running a slice (inside the worker, or in-thread) ----


class SliceLedger:
    """The executor's CommandLedger inside a worker: counts for one slice, reported to the daemon's real ledger."""

    def __init__(self) -> None:
        self.errors: dict[StatusCode, int] = {}
        self.events: dict[str, int] = {}
        self.uploaded = 0
        self.downloaded = 0

    counts_ops = False  # `op` does nothing: the executor's learned runs skip the call (`eager_span`)

    def op(self, session: Any) -> None:
        pass  # the session's own `ops` counter is reported instead

    def error(self, session: Any, code: StatusCode) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def transfer(self, direction: str, nbytes: int) -> None:
        if direction == "upload":
            self.uploaded += nbytes
        else:
            self.downloaded += nbytes

    def graph(self, session: Any, event: str, ops: int = 0) -> None:
        """Step capture's graph events (server/graph.py); its ops are counted by the session's `ops`."""
        self.events[event] = self.events.get(event, 0) + 1

    def learned(self, session: Any, n: int, native: int = 0) -> None:
        """`n` eager records of this slice ran inside learned runs (server/runs.py), `native` of them in C++."""
        self.events[LEARNED_OPS] = self.events.get(LEARNED_OPS, 0) + n
        if native:
            self.events[NATIVE_OPS] = self.events.get(NATIVE_OPS, 0) + native

    def reset(self) -> None:
        # new dicts, never cleared: the last slice's result holds the old ones (`_result` takes them uncopied)
        self.events = {}
        self.errors = {}
        self.uploaded = self.downloaded = 0


class DeviceClock:
    """A slice timer that may return before the device finished the slice (a CUDA device's: devices.SliceTimer):
    `run_commands` tells it when a slice must wait for the device (`settle`), and reports whether some of the
    session's work may still run there (`busy`). A fake device's timer (`Device.timed`) is none: no call, no look-up
    (an attribute a bound method lacks costs an exception a slice)."""

    @property
    def busy(self) -> bool:
        """Whether a slice of the session may still run on the device."""
        return False

    def settle(self) -> None:
        """Make the running slice wait for the device at its end."""


class Timed:
    """A fake device's timing of a slice (`FakeDevice.timed`, `WallTimer`): the wall time of the work inside, entered
    as the list the seconds are appended to (a slice's, each slice: no generator frame)."""

    __slots__ = ("out", "start")

    def __enter__(self) -> list[float]:
        self.out: list[float] = []
        self.start = time.perf_counter()
        return self.out

    def __exit__(self, *exc: object) -> None:
        self.out.append(time.perf_counter() - self.start)


class WallTimer:
    """A fake device's slice timer (`FakeDevice.slice_timer`): called, a `Timed` (the wall time of the work inside,
    as `Device.timed`). `_run_graphs` reads the clock itself for one (round 45: its context manager was ~3.7k
    instructions of a captured step's ~77k slice); every other path calls it as any timer."""

    __slots__ = ()

    def __call__(self) -> Timed:
        return Timed()


WALL_TIMER = WallTimer()

Execute = Callable[..., None]  # (session, command, reply[, an upload's data])
Progress = Callable[[int], None]
_WORD = struct.Struct("<i")


class WordMark(functools.partial[None]):
    """A worker's progress mark (`word_mark`): calling it writes the word; `buffer` is the memory it writes."""

    buffer: Any


def word_mark(buffer: Any) -> Progress:
    """A worker's progress mark: the index of the command running, written as a little-endian int32 at the start of
    `buffer` (shared memory the daemon reads; a C call per command, no Python frame). The native runner stores the
    word itself (`mark_word`) instead of calling it."""
    mark = WordMark(_WORD.pack_into, buffer, 0)
    mark.buffer = buffer
    return mark


def mark_word(progress: Progress | None) -> Any:
    """The buffer a `word_mark` writes, or None for any other progress callable (called as it is)."""
    return progress.buffer if progress.__class__ is WordMark else None  # type: ignore[union-attr]


def eager_records(commands: Sequence[device_pb2.Command], payload: Any = None, native: Any = None) -> list[bytes]:
    """Each command's eager record (its `eager_op` field; b"" for a command of another kind), for `eager_span`.

    With the frame's bytes (`payload`, which `commands` was parsed from) and the native runner (`native`, the
    executor's), read from the bytes (native_runner.cpp `eager_records`: no message object a command); a frame it
    does not read (None), or one whose count differs from the parsed one, is read through the messages."""
    if native is not None and payload is not None:
        got = native.eager_records(payload)
        if got is not None and len(got) == len(commands):
            return got  # type: ignore[no-any-return]
    return [c.eager_op for c in commands]


class FrameCommands(Sequence[Any]):
    """A slice's commands where upb parsed only those that are not plain eager records or small uploads and frees
    (`frame_commands`): command i is upb's message where upb parsed it (`others[at[i]]`), else a `Command` made at the
    first `commands[i]` and kept (the same object each time): from its bytes (`between[i]`) where it is a small upload
    or free, else holding `records[i]` as its `eager_op`; the message upb parses from such a command's bytes, and a
    parse that cannot fail (native_runner.cpp `eager_frame` read those bytes first: `parse_upload`, `parse_free`).
    `records`: each command's eager record, as `eager_records` gives them. `between`: each command's bytes where it is
    such an upload or free (None for any other command), or None where there is none: the native runner runs such
    commands among a run's records (native_runner.cpp `Ctx::between`), and Python asks for its message only where the
    runner leaves one to it (round 49: until then upb parsed every one of them before the slice ran); outside a run
    too, Python runs one from its bytes where the runner takes it (round 50, `CommandExecutor.run_between`)."""

    __slots__ = ("records", "between", "_at", "_others", "_made")

    def __init__(
        self, records: list[bytes], at: dict[int, int], others: Sequence[Any], between: list[Any] | None = None
    ) -> None:
        self.records = records
        self.between = between
        self._at = at
        self._others = others
        self._made: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self.records)))]
        record = self.records[i]  # IndexError, TypeError as a list's
        i = i % len(self.records)
        j = self._at.get(i)
        if j is not None:
            return self._others[j]
        cmd = self._made.get(i)
        if cmd is None:
            raw = self.between[i] if self.between is not None else None
            if raw is None:
                cmd = self._made[i] = device_pb2.Command(eager_op=record)
            else:
                cmd = self._made[i] = device_pb2.Command.FromString(raw)
        return cmd


def frame_commands(payload: Any, native: Any) -> FrameCommands | None:
    """A slice's commands with upb parsing only those that are not plain eager records or small uploads and frees
    the runner reads (native_runner.cpp `eager_frame` with `lazy`: it reads which, checks those uploads' and frees'
    messages, and copies the others' entries into one frame), or None for a frame the runner does not read that way
    (the caller parses it whole). The others are parsed before anything runs, so a malformed one raises upb's
    DecodeError where the whole frame's parse raised it (a repeated message's entries parse each on their own: the
    same messages, the same errors); the plain records, and the uploads and frees `eager_frame` read (messages upb
    takes), cannot fail to parse."""
    read = getattr(native, "eager_frame", None)
    got = read(payload, True, True) if read is not None else None
    if got is None:
        return None
    records, at, others, ask, between = got
    cmds: Sequence[Any] = ()
    if others:
        cmds = device_pb2.ClientFrame.FromString(others).commands
        if len(cmds) != len(at):  # (cannot be: `others` holds one `commands` entry each) the whole frame's parse
            return None
        for i in ask:  # a command the bytes' reading does not read: its record as upb parsed it
            records[i] = cmds[at[i]].eager_op
    return FrameCommands(records, at, cmds, between)


def _run_graphs(
    session: Any, owner: Any, execute: Execute, ledger: SliceLedger, req: SliceRequest, timed: Callable[[], Any],
    progress: Progress | None, runs: list[tuple[int, bytes]]
) -> SliceResult:  # fmt: skip
    """`run_commands` of a frame of RunGraphs only (native_runner.cpp `graph_frame`'s `runs`: each one's `graph_id`
    as upb reads it and its bytes; round 43 for a frame of one, round 44 for several): each run by the executor's
    `run_graph_raw` where its graph's quiet run takes it, else parsed on its own (upb parses it to the message the
    whole frame's parse gives, and none can fail: `graph_frame` read them all first) and executed as the loop does:
    the same progress marks, the same checks after each command (a piece left, the time budget), the same result.
    A fake device's timer (`WallTimer`) is read here, without its context manager (round 45)."""
    session.memory.used = session.memory.device.capacity - max(0, req.device_free)
    ledger.reset()
    replies: list[Any] = []
    measured: Any
    if timed.__class__ is WallTimer:
        start = time.perf_counter()
        executed, partial = _graph_loop(session, owner, execute, req, progress, runs, replies, start)
        measured = (time.perf_counter() - start,)
        busy = False
    else:
        with timed() as measured:
            executed, partial = _graph_loop(session, owner, execute, req, progress, runs, replies, time.perf_counter())
            if replies and isinstance(timed, DeviceClock):
                timed.settle()
        busy = isinstance(timed, DeviceClock) and timed.busy
    if replies:
        replies = [r.SerializeToString() if isinstance(r, device_pb2.ServerFrame) else r for r in replies]
    return _result(session, ledger, executed, measured, replies, partial, busy)


def _graph_loop(
    session: Any, owner: Any, execute: Execute, req: SliceRequest, progress: Progress | None,
    runs: list[tuple[int, bytes]], replies: list[Any], start: float
) -> tuple[int, bool]:  # fmt: skip
    """`_run_graphs`' loop: (commands executed, whether the last one did a piece and runs again)."""
    reply = replies.append
    quick = owner.run_graph_raw
    executed = 0
    partial = False
    for gid, raw in runs:
        if progress is not None:
            progress(executed)
        if not quick(session, raw, reply, gid):
            execute(session, device_pb2.Command(run_graph=device_pb2.RunGraph.FromString(raw)), reply)
        if session.download is not None or session.defining is not None or session.waiting is not None:
            partial = True  # a piece of a graph's trace or run: this command runs again in the next slice
            break
        executed += 1
        if time.perf_counter() - start > req.budget:
            break
    return executed, partial


def run_commands(
    session: Any,
    execute: Execute,
    ledger: SliceLedger,
    req: SliceRequest,
    timed: Callable[[], Any],
    progress: Progress | None = None,
    graphs_read: bool = False,
) -> SliceResult:
    """Run a slice's commands in order until done, past the time budget, or (before a Get/Sync) out of reply
    room; `timed` measures the device time (CUDA events on GPUs). `graphs_read`: `run_slice_into` asked the
    native runner's `graph_frame` already, and it said the frame is not one of RunGraphs only."""
    if req.uploads:
        return _run_uploads(session, execute, ledger, req, timed, progress)
    payload = req.payload  # upb parses any buffer, copying its bytes fields: a batch's are taken out first
    try:  # (a parse: see below)
        taken = _bytes_taken(payload) if len(payload) >= bulk.STRIP_MIN else None
    except DecodeError:
        return _run_before_malformed(session, execute, ledger, req, timed, progress)
    # An executor's spans of eager records run through its learned runs (server/runs.py), with the same progress
    # marks and budget as here.
    owner = getattr(execute, "__self__", None)
    span = getattr(owner, "eager_span", None)
    native = getattr(owner, "native", None)
    commands: Sequence[Any]
    records: list[bytes] | None = None
    if taken is None and native is not None and span is not None and not graphs_read:
        # a frame of RunGraphs only (a captured step's, or a batch of them) runs from its bytes (`_run_graphs`)
        runs = native.graph_frame(payload)
        if runs is not None and hasattr(owner, "run_graph_raw"):
            return _run_graphs(session, owner, execute, ledger, req, timed, progress, runs)
    try:  # every parse of the slice's commands happens here, before any of them runs
        if taken is None:
            # with the native runner, upb parses only the commands that are not plain eager records (`frame_commands`)
            lazy = frame_commands(payload, native) if span is not None and native is not None else None
            if lazy is not None:
                commands, records = lazy, lazy.records
            else:
                commands = device_pb2.ClientFrame.FromString(payload).commands  # type: ignore[arg-type]
        else:
            payload, commands, execute = taken[0], taken[1], _WithTakenBytes(execute, taken[1], taken[2])
    except DecodeError:
        return _run_before_malformed(session, execute, ledger, req, timed, progress)
    replies: list[bytes | list[Any]] = []
    produced = [0]
    views = [False]  # a reply holds frames that are views of a tensor (protocol.Frame)

    def reply(item: Any) -> None:
        if isinstance(item, device_pb2.ServerFrame):
            item = item.SerializeToString()
        if isinstance(item, list):
            produced[0] += sum(len(b) for b in item)
            views[0] = views[0] or any(isinstance(b, protocol.Frame | SideChunk) for b in item)
        else:
            produced[0] += len(item)
        replies.append(item)

    # The device's other sessions live in other processes: the daemon says how much this session may still allocate
    # (the device's free bytes, or its quota's room where that is fewer: daemon.py `_device_free`).
    session.memory.used = session.memory.device.capacity - max(0, req.device_free)
    ledger.reset()
    if records is None and span is not None:  # `eager_span`'s, read once (from the frame's bytes where it can)
        records = eager_records(commands, payload, native)
    start = time.perf_counter()
    measured: Any
    if timed.__class__ is WallTimer:  # a fake device: its clock read here, without its context manager (round 46)
        executed, partial = _loop(
            session, execute, req, progress, commands, records, span, reply, produced, views, start
        )
        measured = (time.perf_counter() - start,)
        return _result(session, ledger, executed, measured, replies, partial)
    with timed() as measured:
        executed, partial = _loop(
            session, execute, req, progress, commands, records, span, reply, produced, views, start
        )
        if (replies or not commands) and isinstance(timed, DeviceClock):
            # An answer (a Sync's, a Get's) says the device finished what came before it, and a slice of no
            # commands is the daemon's flush: a CUDA device's timer waits for the GPU at this slice's end.
            timed.settle()
    return _result(session, ledger, executed, measured, replies, partial, isinstance(timed, DeviceClock) and timed.busy)


def run_slice_into(
    session: Any,
    execute: Execute,
    ledger: SliceLedger,
    req: SliceRequest,
    timed: Callable[[], Any],
    progress: Progress | None,
    buf: memoryview,
) -> int | SliceResult:
    """`run_commands`, then `write_result` into `buf` (a session's worker's slice, server/worker.py): the size
    written, or the result where it wrote nothing (the caller writes or sends it: `write_result`,
    `encode_result`). A slice of one RunGraph runs here (`_one_graph_into`), without `run_commands`' and
    `_run_graphs`' frames, on any device's timer (round 48: a CUDA device's `SliceTimer` too), and its result of
    one event and nothing else (a captured step's quiet replay) is packed straight from the session's counts,
    without a `SliceResult` (round 47): the same checks, marks, ledger counts and bytes as `run_commands` and
    `write_result`."""
    payload = req.payload
    owner = getattr(execute, "__self__", None)
    native = getattr(owner, "native", None)
    # (an executor with the native runner whose `graph_slices` says it has `graphs.run_raw`, `eager_span` and
    # `run_graph_raw`, which `run_commands` asks for one by one)
    if req.uploads or native is None or len(payload) >= bulk.STRIP_MIN or not getattr(owner, "graph_slices", False):
        res = run_commands(session, execute, ledger, req, timed, progress)
    else:
        runs = native.graph_frame(payload)  # (`run_commands`' own look, which it then skips)
        if runs is None:
            res = run_commands(session, execute, ledger, req, timed, progress, graphs_read=True)
        elif len(runs) != 1:
            res = _run_graphs(session, owner, execute, ledger, req, timed, progress, runs)
        else:
            return _one_graph_into(session, owner, execute, ledger, req, timed, progress, runs[0], buf)
    size = write_result(res, buf)
    return size if size >= 0 else res


_REPLAYED = _ONE_EVENT["replayed"]  # a quiet replay's result: its head and its one event


def _one_graph_into(
    session: Any, owner: Any, execute: Execute, ledger: SliceLedger, req: SliceRequest, timed: Callable[[], Any],
    progress: Progress | None, run: tuple[int, bytes], buf: memoryview
) -> int | SliceResult:  # fmt: skip
    """`_run_graphs` of a frame of one RunGraph, then `write_result` (`run_slice_into`). The graph table's `run_raw`
    runs it where its graph's quiet run takes it (round 48: no `run_graph_raw` frame; a quiet run leaves its
    "replayed" event to this slice's result, packed here with one `pack_into`), else it is parsed and executed. A
    fake device's timer (`WallTimer`) is read here; any other is entered as `_run_graphs` enters it (a CUDA device's
    `SliceTimer`: settled where the run replied, its `busy` reported)."""
    session.memory.used = session.memory.device.capacity - max(0, req.device_free)
    ledger.reset()
    replies: list[Any] = []
    gid, raw = run
    if timed.__class__ is WallTimer:
        start = time.perf_counter()
        if progress is not None:
            progress(0)
        quiet = owner.graphs.run_raw(session, raw, replies.append, gid)
        if quiet < 0:
            execute(session, device_pb2.Command(run_graph=device_pb2.RunGraph.FromString(raw)), replies.append)
        seconds = time.perf_counter() - start
        busy = False
    else:
        with timed() as measured:
            if progress is not None:
                progress(0)
            quiet = owner.graphs.run_raw(session, raw, replies.append, gid)
            if quiet < 0:
                execute(session, device_pb2.Command(run_graph=device_pb2.RunGraph.FromString(raw)), replies.append)
            if replies and isinstance(timed, DeviceClock):
                timed.settle()
        seconds = measured[0] if measured else 0.0
        busy = isinstance(timed, DeviceClock) and timed.busy
    partial = session.download is not None or session.defining is not None or session.waiting is not None
    executed = 0 if partial else 1  # (one command: the budget's check after it ends nothing more)
    if quiet > 0:  # a quiet run (`GraphTable.run_raw`): no reply, no error, nothing else in the ledger
        if _REPLAYED[0].size <= len(buf):
            flags = (
                (_ERROR_PENDING if session.error is not None else 0)
                | (_PARTIAL if partial else 0)
                | (_BUSY if busy else 0)
            )
            # (`WorkerSession.handle_count`: a quiet run's session is one, `graph._fast_plan`)
            _REPLAYED[0].pack_into(buf, 0, executed, seconds, session.used, session.ops,
                                   len(session.tensors) + len(session.poisoned), session.graph_bytes, ledger.uploaded,
                                   ledger.downloaded, 0, 1, 0, flags, _REPLAYED[1], 1, _REPLAYED[2])  # fmt: skip
            return _REPLAYED[0].size  # type: ignore[no-any-return]
        ledger.graph(session, "replayed", quiet - 1)
    if replies:
        replies = [r.SerializeToString() if isinstance(r, device_pb2.ServerFrame) else r for r in replies]
    res = _result(session, ledger, executed, (seconds,), replies, partial, busy)
    size = write_result(res, buf)
    return size if size >= 0 else res


def _loop(
    session: Any, execute: Execute, req: SliceRequest, progress: Progress | None, commands: Sequence[Any],
    records: list[bytes] | None, span: Any, reply: Callable[[Any], None], produced: list[int], views: list[bool],
    start: float
) -> tuple[int, bool]:  # fmt: skip
    """`run_commands`' loop over the slice's commands: (commands executed, whether the last one did a piece and runs
    again)."""
    executed = 0
    partial = False
    n = len(commands)
    i = 0
    # the uploads and frees the native runner read (`FrameCommands.between`), run from their bytes where it takes
    # them (the executor's `run_between`, round 50: upb parsed each into a message here before)
    ups: Any = getattr(commands, "between", None)
    quick: Any = getattr(getattr(execute, "__self__", None), "run_between", None) if ups is not None else None
    while i < n:
        if span is not None and records is not None and records[i]:  # (else `eager_span` runs nothing)
            j, over = span(session, commands, i, reply, progress, start, req.budget, records, execute)
            if j > i:
                executed = i = j
                if over:
                    break
                continue
        raw = ups[i] if quick is not None else None  # (an upload or a free answers nothing: no reply room needed)
        if raw is not None:
            if progress is not None:
                progress(i)
            if not quick(session, raw, reply):
                execute(session, commands[i], reply)
        else:
            cmd = commands[i]
            if i and req.reply_room - produced[0] <= 0 and cmd.WhichOneof("cmd") in ("get", "sync"):
                break
            if progress is not None:
                progress(i)
            execute(session, cmd, reply)
        if session.download is not None or session.defining is not None or session.waiting is not None:
            partial = True  # a piece of a big Get or of a graph's definition, a waiting collective: runs again
            break
        executed = i = i + 1
        if views[0] or time.perf_counter() - start > req.budget:
            break  # a Get's frames are views of its tensor: nothing runs before they are copied
    return executed, partial


def _run_before_malformed(
    session: Any, execute: Execute, ledger: SliceLedger, req: SliceRequest, timed: Callable[[], Any], progress: Any
) -> SliceResult:
    """A slice that protobuf refuses (a command the front did not check: `service.DeviceServicer._frame` leaves a
    small frame's commands to this parse): the commands before the first one that protobuf refuses on its own (a
    repeated message's entries parse each on its own: the same error) run as a slice of their own, and where all of
    them ran the result says `malformed` (the daemon then ends the session with INVALID_ARGUMENT, as the front's own
    check did); nothing at or after that command runs."""
    try:  # the daemon joined checked spans: they split (a frame that does not: nothing of it runs)
        spans = [span for _, span in split_frame(req.payload, 1 << 30)]
    except InvalidArgument:
        spans = []
    bad = next((i for i, span in enumerate(spans) if not _parses(span)), 0)  # (0 where none: cannot be) nothing runs
    if bad == 0:
        ledger.reset()
        res = _result(session, ledger, 0, [0.0], [])
        res.malformed = True
        return res
    before = sum(len(span) for span in spans[:bad])
    sub = SliceRequest(req.device_free, req.reply_room, req.budget, memoryview(req.payload)[:before], False, req.slot)
    res = run_commands(session, execute, ledger, sub, timed, progress)
    res.malformed = res.executed == bad and not res.partial  # (else the rest runs again, and meets it again)
    return res


def _parses(span: Any) -> bool:
    """Whether protobuf takes a command's span (a one-command ClientFrame)."""
    try:
        device_pb2.ClientFrame.FromString(span)
    except DecodeError:
        return False
    return True


def _result(
    session: Any,
    ledger: SliceLedger,
    executed: int,
    measured: Any,
    replies: list[Any],
    partial: bool = False,
    busy: bool = False,
) -> SliceResult:
    # positional (the fields in order: no keyword dict a slice); the ledger's counts are taken, not copied: its
    # `reset` at the next slice's start makes new ones
    return SliceResult(
        executed,
        measured[0] if measured else 0.0,
        session.used,
        session.ops,
        session.handle_count(),
        ledger.uploaded,
        ledger.downloaded,
        ledger.errors,
        ledger.events,
        replies,
        session.error is not None,
        partial,
        busy,
        session.graph_bytes,
    )


def _run_uploads(
    session: Any, execute: Execute, ledger: SliceLedger, req: SliceRequest, timed: Callable[[], Any], progress: Any
) -> SliceResult:
    """A slice of big uploads (at most bulk.SLICE_BYTES): each chunk's bytes go from the payload (the shared
    buffer) into its tensor in one copy. Uploads answer nothing, and the slice is bounded by bytes, not time."""
    spans = [span for _, span in split_frame(req.payload, 1 << 20)]  # type: ignore[arg-type]
    parsed = [bulk.parse_upload(span) for span in spans]
    if not all(parsed):  # not all canonical (say, an Upload followed by another oneof field): the ordinary path
        req.uploads = False
        return run_commands(session, execute, ledger, req, timed, progress)
    session.memory.used = session.memory.device.capacity - max(0, req.device_free)
    ledger.reset()
    with timed() as measured:
        for i, upload in enumerate(parsed):
            if progress is not None:
                progress(i)
            cmd, data = upload  # type: ignore[misc]
            execute(session, cmd, _no_reply, data)
    return _result(session, ledger, len(spans), measured, [], False, isinstance(timed, DeviceClock) and timed.busy)


def _bytes_taken(payload: Any) -> tuple[bytes, list[Any], list[tuple[Any, Any]]] | None:
    """A slice's payload with its big Uploads' and RunGraphs' bytes taken out (`bulk.strip_payload`): (the payload
    without them, its commands parsed, in a list, and each stripped command object with its bytes, views of the
    payload: an Upload's data, a RunGraph's list of input_data), or None (none to take: then protobuf reads the
    payload as it came)."""
    got = bulk.strip_payload(payload)
    if got is None:
        return None
    stripped, where = got
    commands = list(device_pb2.ClientFrame.FromString(stripped).commands)
    if any(
        i >= len(commands) or commands[i].WhichOneof("cmd") != ("run_graph" if type(data) is list else "upload")
        for i, data in where
    ):
        return None  # (cannot be: each walked command is one of protobuf's) the payload as it came
    return stripped, commands, [(commands[i], data) for i, data in where]


class _WithTakenBytes:
    """A slice's `execute` that hands the Uploads and RunGraphs `_bytes_taken` stripped their bytes
    (`CommandExecutor.execute`'s `data`, as for a slice of big uploads): each is known by its message object (the
    commands are a list, so `commands[i]` is the same object every time). Its `__self__` is the executor's, for
    `run_commands`' lookup of `eager_span`."""

    def __init__(self, execute: Execute, commands: list[Any], taken: list[tuple[Any, memoryview]]) -> None:
        self.__self__ = getattr(execute, "__self__", None)
        self._execute = execute
        self._data = {id(cmd): (cmd, data) for cmd, data in taken}  # the commands list holds each cmd alive

    def __call__(self, session: Any, cmd: Any, reply: Any, data: Any = None) -> Any:
        got = self._data.get(id(cmd))
        if got is not None and got[0] is cmd:
            return self._execute(session, cmd, reply, got[1])
        if data is None:
            return self._execute(session, cmd, reply)
        return self._execute(session, cmd, reply, data)


def _no_reply(item: Any) -> None:
    raise AssertionError("an upload produced a reply")


def send_parts(sock: Any, parts: Sequence[bytes | memoryview]) -> None:
    """Send buffers in order without joining them first (uploads and downloads are megabytes)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views[:512])  # IOV_MAX is 1024
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def describe_command(span: memoryview) -> str:
    """'aten::add.Tensor' or 'a get', for the message of a crashed worker (the daemon parses just this one)."""
    try:
        cmds = device_pb2.ClientFrame.FromString(bytes(span)).commands
        kind = cmds[0].WhichOneof("cmd") if cmds else None
    except Exception:  # the worker may have died on a command that does not even parse
        return "a malformed command"
    if kind == "op":
        return f"op {cmds[0].op.name}"
    return f"a {kind} command"
