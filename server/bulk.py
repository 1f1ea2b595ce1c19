"""Bulk transfers across the daemon/worker boundary with as few copies as the wire allows.

Uploads: a 4 MiB upload chunk used to be parsed by protobuf three times (the daemon's check, the worker's parse,
the `data` field's copy) before its one useful copy into the tensor. `parse_upload` reads a command span's
Upload by hand instead: everything but `data` is parsed by protobuf from a few bytes (so the checks are
protobuf's own), and `data` stays a view into the span: the stream reader checks the frame without copying it,
and the worker copies the bytes straight from its shared buffer into the tensor. Only the canonical shape
(a Command holding one Upload with one `data` field, which is what every client sends) takes this path;
anything else returns None and goes through protobuf as before, so the wire's meaning never changes.

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
PIECE_BYTES = 16 * MiB  # the most download bytes one slice answers (four 4 MiB chunks; framing fits the rest)
UPLOADS = protocol.UPLOAD  # Command.upload
_DATA = 4  # Upload.data
_SPAN = operator.itemgetter(1)


def parse_upload(span: memoryview) -> tuple[device_pb2.Command, memoryview] | None:
    """A command span (`ClientFrame.commands` tag, length, Command) holding one Upload: the command without its
    data, and the data as a view of `span`. None when the span is not in the canonical shape (or malformed):
    the caller then parses it with protobuf, which decides."""
    try:
        end = len(span)
        if end < 2 or span[0] != 0x0A:
            return None
        length, i = protocol.read_varint(span, 1, end)
        if i + length != end or i >= end or span[i] != (UPLOADS << 3 | 2):
            return None
        length, i = protocol.read_varint(span, i + 1, end)
        if i + length != end:  # the Command holds exactly one field: its upload
            return None
        small = bytearray()
        data: memoryview | None = None
        while i < end:
            start = i
            tag, i = protocol.read_varint(span, i, end)
            if i - start > 5:  # protobuf reads a tag in at most five bytes: a longer one is corrupt
                return None
            field, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, i = protocol.read_varint(span, i, end)
            elif wire_type == 1:
                i += 8
            elif wire_type == 5:
                i += 4
            elif wire_type == 2:
                n, i = protocol.read_varint(span, i, end)
                if field == _DATA:
                    if data is not None:
                        return None  # two data fields: protobuf's merge rules decide
                    data = span[i : i + n]
                    i += n
                    if i > end:
                        return None
                    continue
                i += n
            else:
                return None  # groups and invalid wire types
            if i > end:
                return None
            small += span[start:i]
        up = device_pb2.Upload.FromString(bytes(small))
    except (ValueError, DecodeError):  # truncated varints, a malformed meta
        return None
    return device_pb2.Command(upload=up), data if data is not None else memoryview(b"")


def uploads_only(spans: Sequence[memoryview]) -> bool:
    """Whether every span is a canonical Upload (then a stream reader need not parse the frame with protobuf)."""
    return bool(spans) and all(parse_upload(s) is not None for s in spans)


def strip_uploads(commands: Sequence[tuple[int, memoryview]]) -> tuple[bytes, list[tuple[int, memoryview]]] | None:
    """A frame's commands (`slices.split_frame`'s (kind, span) pairs) with the bytes of each canonical Upload of at
    least `STRIP_MIN` bytes taken out: (the frame without those bytes -- each such span re-encoded as its command
    without `data`, every other span as it came, in order -- and (position, data) of each, its data a view of its
    span), or None where no span is one.

    Protobuf reads a bytes field by copying it (upb into its arena, then once more into a Python bytes object at
    each access), so a 512 KiB batch in a frame of ops cost two copies in the stream reader's check and two in the
    worker before its one useful copy into the tensor. A frame is a sequence of independent `commands` fields, so
    parsing the frame without the taken bytes checks every other command as parsing all of it did, and
    `parse_upload` checks the taken ones (everything but `data` parsed by protobuf itself; anything not canonical
    stays in the frame and is parsed there). No Python runs per small command (a frame of many ops)."""
    spans = list(map(_SPAN, commands))
    big = [i for i, n in enumerate(map(len, spans)) if n >= STRIP_MIN]
    out: list[bytes | memoryview] = []
    taken: list[tuple[int, memoryview]] = []
    at = 0
    for i in big:
        got = parse_upload(spans[i]) if commands[i][0] == UPLOADS else None
        if got is None or not len(got[1]):
            continue
        out += spans[at:i]
        out.append(_without_data(got[0]))
        taken.append((i, got[1]))
        at = i + 1
    if not taken:
        return None
    out += spans[at:]
    return b"".join(out), taken


def strip_payload(payload: Any) -> tuple[bytes, list[tuple[int, memoryview]]] | None:
    """`strip_uploads` of a slice's payload in a worker (its commands' spans joined, as the front checked them),
    with each taken Upload's position among the commands as protobuf counts them (an empty command too); None where
    none is taken, or where the payload does not read as commands (then protobuf reads it as it came). Walks the
    commands' lengths only: no span or tuple per command."""
    view = memoryview(payload)
    n = len(view)
    out: list[bytes | memoryview] = []
    taken: list[tuple[int, memoryview]] = []
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
            got = parse_upload(view[start:i])
            if got is not None and len(got[1]):
                out.append(view[at:start])
                out.append(_without_data(got[0]))
                taken.append((k, got[1]))
                at = i
        k += 1
    if not taken or i != n:
        return None
    out.append(view[at:])
    return b"".join(out), taken


def _without_data(cmd: device_pb2.Command) -> bytes:
    """`cmd` (an Upload `parse_upload` read, without its data) as a frame's `commands` entry."""
    raw = cmd.SerializeToString()
    return protocol.FRAME_COMMANDS_TAG + protocol.varint(len(raw)) + raw


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
