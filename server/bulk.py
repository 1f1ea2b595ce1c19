"""Bulk transfers across the daemon/worker boundary with as few copies as the wire allows.

Uploads: a 4 MiB upload chunk used to be parsed by protobuf three times (the daemon's check, the worker's parse,
the `data` field's copy) before its one useful copy into the tensor. `parse_upload` reads a command span's
Upload by hand instead: everything but `data` is parsed by protobuf from a few bytes (so the checks are
protobuf's own), and `data` stays a view into the span: the stream reader checks the frame without copying it,
and the worker copies the bytes straight from its shared buffer into the tensor. Only the canonical shape
(a Command holding one Upload with one `data` field, which is what every client sends) takes this path;
anything else returns None and goes through protobuf as before, so the wire's meaning never changes.

A batch among other commands (`strip_uploads`, `strip_payload`): the bytes of a big Upload's `data` or a big
RunGraph's `input_data` (a captured step's batch sent by value) are taken out of the frame as views before protobuf
parses the rest, in the stream reader's check and in the worker, which copies them once, into the tensor (or a
CUDA device's pinned staging buffer).

Slices: `slice_length` says how many queued commands make the next slice. Big uploads travel together (up to
`SLICE_BYTES`, the worker's shared buffer), everything else up to the next big upload; a slice never exceeds
the shared buffer unless a single command does, so no slice goes through the socket and no budget cut
re-sends megabytes.

Downloads: a Get larger than `PIECE_BYTES` (16 MiB) is answered in pieces, one per slice (executor `_get`
keeps the rest in `Session.download`): each piece fits the shared buffer, so no result crosses the socket;
the daemon hands its frames to gRPC, and the session's next slice continues the same Get, so the reply bound
(`--outbox-bytes`) and fair sharing hold during a 256 MiB download and nothing runs between the pieces of one
Get.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import DecodeError

from gpupool import protocol
from gpupool._proto import device_pb2

MiB = 1024 * 1024
BIG_UPLOAD = MiB  # an upload command at least this large takes the copy-once path
# An Upload span at least this large in a frame of other commands (an eager step's batch and its ops, a captured
# step's batch and its RunGraph) is checked by the stream reader and run by the worker without protobuf copying
# its bytes (`strip_uploads`): the rest of the frame is parsed as before.
STRIP_MIN = 64 * 1024
# The most command bytes one slice carries: four 4 MiB upload chunks and their framing (the worker's shared
# buffer is this large).
SLICE_BYTES = 16 * MiB + 64 * 1024
SIDE_MIN = 64 * 1024  # download chunks at least this large go on the bulk side socket (server/bulkside.py)
# Frames of at least this many bytes (together, as a side reader queues them) that came on a session's side socket
# are queued for the device's thread, never run by their reader itself (`Daemon.submit`): the side reader reads and
# decrypts its frames itself, and while it ran one's slice nothing read the next (round 38).
SIDE_QUEUED = 64 * 1024
PIECE_BYTES = 16 * MiB  # the most download bytes one slice answers (four 4 MiB chunks; framing fits the rest)
UPLOADS = protocol.UPLOAD  # Command.upload
_DATA = 4  # Upload.data
RUN_GRAPH = 21  # Command.run_graph
_INPUT_DATA = 10  # RunGraph.input_data
_UPLOAD_TAG = bytes([UPLOADS << 3 | 2])
_RUN_GRAPH_TAG = protocol.varint(RUN_GRAPH << 3 | 2)  # two bytes
_SPAN = operator.itemgetter(1)
_KINDS = {_UPLOAD_TAG[0]: UPLOADS, _RUN_GRAPH_TAG[0]: RUN_GRAPH}  # a command's first byte -> its kind, if strippable


def parse_upload(span: memoryview) -> tuple[device_pb2.Command, memoryview] | None:
    """A command span (`ClientFrame.commands` tag, length, Command) holding one Upload: the command without its
    data, and the data as a view of `span`. None when the span is not in the canonical shape (or malformed):
    the caller then parses it with protobuf, which decides."""
    got = _taken(span, _UPLOAD_TAG, _DATA, False)
    if got is None:
        return None
    try:
        up = device_pb2.Upload.FromString(got[0])
    except (ValueError, DecodeError):  # a malformed meta
        return None
    return device_pb2.Command(upload=up), got[1][0] if got[1] else memoryview(b"")


def _taken(span: memoryview, kind: bytes, field: int, many: bool) -> tuple[bytes, list[memoryview]] | None:
    """A command span (`ClientFrame.commands` tag, length, Command) whose Command holds exactly one field, the
    message under tag `kind`: that message's bytes without its length-delimited values of `field`, and those
    values as views of `span`, in order; None where the span has any other shape, is malformed, or (`many`
    False) holds two such values (protobuf's merge rules decide). Every other field of the message is kept as it
    came, whole, for protobuf to parse (and check): the caller parses the bytes returned, or the frame they go
    back into (`strip_uploads`). Tags and lengths under 128 (nearly all) are read inline."""
    end = len(span)
    read = protocol.read_varint
    try:
        if end < 2 or span[0] != 0x0A:
            return None
        length, i = read(span, 1, end)
        if i + length != end:
            return None
        for b in kind:
            if i >= end or span[i] != b:
                return None
            i += 1
        length, i = read(span, i, end)
        if i + length != end:  # the Command holds exactly one field: this message
            return None
        keep: list[memoryview] = []  # the runs of the message's other fields
        data: list[memoryview] = []
        at = i
        while i < end:
            start = i
            tag = span[i]
            if tag < 0x80:
                i += 1
            else:
                tag, i = read(span, i, end)
                if i - start > 5:  # protobuf reads a tag in at most five bytes: a longer one is corrupt
                    return None
            wire_type = tag & 7
            if wire_type == 2:
                if i < end and span[i] < 0x80:
                    n = span[i]
                    i += 1
                else:
                    n, i = read(span, i, end)
                if tag >> 3 == field:
                    if data and not many:
                        return None
                    if i + n > end:
                        return None
                    if start > at:
                        keep.append(span[at:start])
                    data.append(span[i : i + n])
                    at = i = i + n
                    continue
                i += n
            elif wire_type == 0:
                if i < end and span[i] < 0x80:
                    i += 1
                else:
                    _, i = read(span, i, end)
            elif wire_type == 1:
                i += 8
            elif wire_type == 5:
                i += 4
            else:
                return None  # groups and invalid wire types
        if i != end:
            return None  # a field runs past the command's end
    except ValueError:  # truncated varints
        return None
    keep.append(span[at:end])
    return b"".join(keep), data


def uploads_only(spans: Sequence[memoryview]) -> bool:
    """Whether every span is a canonical Upload (then a stream reader need not parse the frame with protobuf)."""
    return bool(spans) and all(parse_upload(s) is not None for s in spans)


def strip_uploads(commands: Sequence[tuple[int, memoryview]]) -> tuple[bytes, list[tuple[int, Any]]] | None:
    """A frame's commands (`slices.split_frame`'s (kind, span) pairs) with the bytes of each canonical Upload and
    RunGraph of at least `STRIP_MIN` bytes taken out: (the frame without those bytes -- each such span re-encoded as
    its command without `data` / `input_data`, every other span as it came, in order -- and (position, data) of
    each, its data a view of its span: an Upload's one view, a RunGraph's list of its inputs' views), or None
    where no span is one.

    Protobuf reads a bytes field by copying it (upb into its arena, then once more into a Python bytes object at
    each access), so a 512 KiB batch in a frame of ops cost two copies in the stream reader's check and two in the
    worker before its one useful copy into the tensor; a batch sent by value in a RunGraph, two in the worker and
    a third into the run's input. A frame is a sequence of independent `commands` fields, and a message a
    sequence of independent fields, so parsing the frame without the taken bytes checks every other command, and
    every other field of a taken one, as parsing all of it did (`_taken` reads the taken commands' framing; a
    repeated field's values keep their order whatever comes between them; anything not canonical stays in the
    frame and is parsed there). No Python runs per small command (a frame of many ops)."""
    spans = list(map(_SPAN, commands))
    big = [i for i, n in enumerate(map(len, spans)) if n >= STRIP_MIN]
    out: list[bytes | memoryview] = []
    taken: list[tuple[int, Any]] = []
    at = 0
    for i in big:
        got = _strippable(spans[i], commands[i][0])
        if got is None:
            continue
        out += spans[at:i]
        out.append(got[0])
        taken.append((i, got[1]))
        at = i + 1
    if not taken:
        return None
    out += spans[at:]
    return b"".join(out), taken


def strip_payload(payload: Any) -> tuple[bytes, list[tuple[int, Any]]] | None:
    """`strip_uploads` of a slice's payload in a worker (its commands' spans joined, as the front checked them),
    with each taken command's position among the commands as protobuf counts them (an empty command too); None
    where none is taken, or where the payload does not read as commands (then protobuf reads it as it came). Walks
    the commands' lengths only: no span or tuple per command."""
    view = memoryview(payload)
    n = len(view)
    out: list[bytes | memoryview] = []
    taken: list[tuple[int, Any]] = []
    i = at = k = 0
    while i < n:
        start = i
        if view[i] != 0x0A:
            return None
        if i + 1 < n and view[i + 1] < 0x80:  # a command of fewer than 128 bytes: its length in one byte
            length, i = view[i + 1], i + 2
        else:
            try:
                length, i = protocol.read_varint(view, i + 1, n)
            except ValueError:
                return None
        i += length
        if i - start >= STRIP_MIN and i <= n:  # a span as `strip_uploads` measures it (its tag and length too)
            # its kind: the first byte after its length (a Command's one field: 0x12 an Upload, 0xAA a RunGraph)
            got = _strippable(view[start:i], _KINDS.get(view[i - length], -1))
            if got is not None:
                out.append(view[at:start])
                out.append(got[0])
                taken.append((k, got[1]))
                at = i
        k += 1
    if not taken or i != n:
        return None
    out.append(view[at:])
    return b"".join(out), taken


def _strippable(span: memoryview, kind: int) -> tuple[bytes, Any] | None:
    """A big span without its bytes (a frame's `commands` entry) and those bytes (an Upload's view, a RunGraph's
    list of views), where it is a canonical Upload or RunGraph (`kind`: the span's kind) with any bytes to take.
    The entry is re-encoded around the message's other fields as they came: the caller parses the frame it goes
    back into (protobuf checks them there, as parsing the whole frame did)."""
    if kind == UPLOADS:
        got = _taken(span, _UPLOAD_TAG, _DATA, False)
        if got is not None:
            return (_entry(_UPLOAD_TAG, got[0]), got[1][0]) if got[1] and len(got[1][0]) else None
    elif kind == RUN_GRAPH:
        got = _taken(span, _RUN_GRAPH_TAG, _INPUT_DATA, True)
        if got is not None and any(map(len, got[1])):
            return _entry(_RUN_GRAPH_TAG, got[0]), got[1]
    return None


def _entry(kind: bytes, message: bytes) -> bytes:
    """A frame's `commands` entry of a Command holding `message` under tag `kind`."""
    command = kind + protocol.varint(len(message)) + message
    return protocol.FRAME_COMMANDS_TAG + protocol.varint(len(command)) + command


def slice_length(kinds: Sequence[int], sizes: Sequence[int]) -> tuple[int, bool]:
    """How many of the leading queued commands form the next slice, and whether they are big uploads only."""
    if kinds[0] == UPLOADS and sizes[0] >= BIG_UPLOAD:
        n, total = 1, sizes[0]
        while n < len(kinds) and kinds[n] == UPLOADS and sizes[n] >= BIG_UPLOAD and total + sizes[n] <= SLICE_BYTES:
            total += sizes[n]
            n += 1
        return n, True
    n = total = 0
    for kind, size in zip(kinds, sizes, strict=True):
        if n and (total + size > SLICE_BYTES or (kind == UPLOADS and size >= BIG_UPLOAD)):
            break
        total += size
        n += 1
    return n, False
