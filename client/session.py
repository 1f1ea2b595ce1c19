"""The op stream of one session on a daemon: attach with a lease token, then upload tensors, enqueue aten ops
on client-chosen handles, sync and download, all over one ordered gRPC stream.

Commands accumulate client-side and travel as one ClientFrame per ~256 commands / ~1 MiB, or at a sync
point (sync, download, flush). Only Sync and Get are answered, and the thread that waits for an answer reads
it off the stream itself (no reader thread to hand it over: one thread wake-up less per round trip); the
stream's end fails every waiter with its reason, and gRPC's keepalive ends the stream of a lost daemon within
seconds, so a wait never hangs. Several user threads may use one session (since round 23 the shim lets other
threads work while one records a step): commands are queued under one lock in the order their threads queue
them, whoever waits reads the replies for every waiter (one thread at a time), and the bulk side socket's upload
and download directions move at once (gpupool/duplex.py; before round 24 they could deadlock). Where the daemon
has a side port and names `side_frames` (round 26), the frames and replies travel on the side socket instead (a
sender thread of the session's own writes them; the stream stays open for the session's end), except a frame the
caller waits on next (a Sync's, a Get's), which the calling thread writes itself while the sender is idle (round 38:
no hand-off, no wake-up of the sender a synced step): docs/wire.md.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import numpy
import torch
from google.protobuf.message import DecodeError

from gpupool import hostpool, metas, prefault, protocol, tls, tokens, wire
from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2
from gpupool.errors import GpupoolError, InvalidArgument, Unavailable, from_failure, from_status

from . import bulk
from .cuda import hint as cuda_hint

MAX_BATCH_COMMANDS = 256
MAX_BATCH_BYTES = 1024 * 1024
MAX_FRAME_BYTES = 64 * 1024 * 1024  # gRPC's send limit below (CHANNEL_OPTIONS): a larger frame could not be sent
REFRESH_TIMEOUT = 10.0  # seconds; a renewal runs well ahead of expiry, so a slow daemon still gets it in time
SEND_QUEUE_FRAMES = 32  # frames queued and not yet written (gRPC's stream or the side socket's sender) ...
# ... or this many of their bytes: a full queue, by either count, blocks the caller (back-pressure) until the
# sender writes what it holds. The frame count paces eager's many small frames; the byte count a captured step's
# batch (round 37: with 512 KiB frames, 32 of them kept the client 40-50 steps ahead on the side socket, and the
# `.item()` closing a block waited 75-169 ms for them). A frame over the cap goes when nothing else waits.
SEND_QUEUE_BYTES = 2 * 1024 * 1024
END_GRACE = 5.0  # seconds the side socket stays open after the stream ended (what the daemon sent before comes)
SEND_QUEUE_WAIT = 0.25  # seconds a caller blocked on a full queue waits for the sender's word before it looks again
# A frame the caller waits on (a Sync's, a Get's) written from the calling thread when the sender thread is idle and
# nothing is queued (`_put`'s `reply`), where the frames use the side socket: at most this many bytes (a step's
# frame of ops, or a captured run with its inputs by value (the stock MLP's ~512 KB) and its Sync; a larger one goes
# to the sender as before). The caller waits for the reply anyway; the write holds the session's lock meanwhile.
INLINE_MAX_BYTES = SEND_QUEUE_BYTES
CHANNEL_OPTIONS = [
    # Download chunks are 4 MiB plus framing, over gRPC's 4 MiB default receive limit.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", MAX_FRAME_BYTES),
    # Ping every 5 s, give up after 5 s without an answer: a vanished daemon fails waits within seconds.
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def _serialize_frame(frame: device_pb2.ClientFrame | bytes) -> bytes:
    return frame if isinstance(frame, bytes) else frame.SerializeToString()


_HUGE_PAGE = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _huge_pages(t: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages under a fresh download's buffer before its first touch: writing
    256 MiB into new 4 KiB pages costs more than the transfer itself on many hosts; 2 MiB pages fault 512x
    less often. Advice only: where the kernel says no (or THP is off) nothing changes; and not asked where the
    kernel would compact memory in those faults, which costs more than it saves (protocol.huge_pages_are_cheap)."""
    if _LIBC is None or t.nbytes < 2 * _HUGE_PAGE or not protocol.huge_pages_are_cheap():
        return
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + t.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)


@dataclass
class _Chunk:
    """A download chunk frame read by hand: `data` is a view of the received bytes (no protobuf copies)."""

    request_id: int
    meta: tensor_pb2.TensorMeta | None
    offset: int
    data: memoryview
    last: bool


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]  # IndexError past the end
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80 or shift > 63:
            return value, i
        shift += 7


@dataclass
class _Synced:
    """An empty SyncReply (`protocol.sync_reply`, what every Sync without scalars or errors gets), read by hand."""

    request_id: int


_EMPTY_SYNC = device_pb2.SyncReply()
_STATUS = {code.value[0]: code for code in grpc.StatusCode}  # a BULK_END record's id: its status code's number


def _read_frame(raw: bytes) -> device_pb2.ServerFrame | _Chunk | _Synced:
    """A reply frame: download chunks in the shape the daemon writes them (request id, then one TensorChunk)
    are read by hand, leaving their 4 MiB of data where gRPC put it, and so are empty sync replies (the bytes
    compared whole); anything else is parsed by protobuf."""
    try:
        rid, i = _varint(raw, 1) if raw[:1] == b"\x08" else (0, 0)
        if raw[i] != 0x1A:
            if i + 2 == len(raw) and raw == protocol.sync_reply(rid):
                return _Synced(rid)
            return device_pb2.ServerFrame.FromString(raw)
        length, i = _varint(raw, i + 1)
        if i + length != len(raw):
            return device_pb2.ServerFrame.FromString(raw)
        view = memoryview(raw)
        meta, offset, data, last, seen = None, 0, view[0:0], False, set()
        while i < len(raw):
            tag, i = _varint(raw, i)
            if tag in seen or tag not in (0x0A, 0x10, 0x1A, 0x20):
                return device_pb2.ServerFrame.FromString(raw)
            seen.add(tag)
            if tag == 0x10:
                offset, i = _varint(raw, i)
            elif tag == 0x20:
                flag, i = _varint(raw, i)
                last = bool(flag)
            else:
                n, i = _varint(raw, i)
                if i + n > len(raw):
                    return device_pb2.ServerFrame.FromString(raw)
                if tag == 0x0A:
                    meta = tensor_pb2.TensorMeta.FromString(view[i : i + n])  # type: ignore[arg-type]
                else:
                    data = view[i : i + n]
                i += n
        return _Chunk(rid, meta, offset, data, last)
    except (IndexError, DecodeError):  # protobuf decides (and refuses a malformed frame)
        return device_pb2.ServerFrame.FromString(raw)


_EAGER_TAG = b"\xf2\x01"  # Command.eager_op: field 30, length-delimited
# ClientFrame.commands entry (field 1) of one short record: tag, length, then Command's tag and length
_EAGER_SHORT = [
    b"\x0a" + protocol.varint(n + 2 + len(protocol.varint(n))) + _EAGER_TAG + protocol.varint(n) for n in range(128)
]


_UPLOAD_HANDLE = b"\x08"  # Upload.handle (field 1, varint)
_UPLOAD_META = b"\x12"  # Upload.meta (field 2, length-delimited); in it TensorMeta.dtype (field 1, varint),
_META_DTYPE, _META_SHAPE, _META_STRIDE = b"\x08", b"\x12", b"\x1a"  # shape and stride (2, 3: packed int64)
_UPLOAD_DATA, _UPLOAD_LAST = b"\x22", b"\x28\x01"  # Upload.data (field 4, bytes), Upload.last (field 5) = true
_COMMAND_UPLOAD = b"\x12"  # Command.upload (field 2)
_wvarint = protocol.varint


def _packed(tag: bytes, values: Sequence[int]) -> bytes:
    if not values:
        return b""
    body = b"".join(_wvarint(v) if v >= 0 else _wvarint(v + (1 << 64)) for v in values)
    return tag + _wvarint(len(body)) + body


def upload_command(handle: int, dtype: int, shape: Sequence[int], stride: Sequence[int], data: bytes) -> bytes:
    """`Command{upload: Upload(handle, meta, data, last=True)}` of a whole tensor in one chunk, as an entry of
    `ClientFrame.commands`: byte for byte what protobuf writes (fields in number order, defaults left out). The part
    from the meta to the data's length is the same for every upload of a geometry (a training loop's batches):
    encoded once (`_UPLOAD_FIXED`), three varints an upload instead of a dozen."""
    key = (dtype, tuple(shape), tuple(stride), len(data))
    fixed = _UPLOAD_FIXED.get(key)
    if fixed is None:
        meta = b"".join(
            (
                (_META_DTYPE + _wvarint(dtype)) if dtype else b"",
                _packed(_META_SHAPE, shape),
                _packed(_META_STRIDE, stride),
            )
        )
        fixed = _UPLOAD_META + _wvarint(len(meta)) + meta + ((_UPLOAD_DATA + _wvarint(len(data))) if data else b"")
        if len(_UPLOAD_FIXED) >= _UPLOAD_FIXED_MAX:
            _UPLOAD_FIXED.clear()
        _UPLOAD_FIXED[key] = fixed
    h = _wvarint(handle)
    n = 1 + len(h) + len(fixed) + len(data) + len(_UPLOAD_LAST)  # the Upload message
    up = _wvarint(n)
    return b"".join(
        (
            protocol.FRAME_COMMANDS_TAG,
            _wvarint(1 + len(up) + n),
            _COMMAND_UPLOAD,
            up,
            _UPLOAD_HANDLE,
            h,
            fixed,
            data,
            _UPLOAD_LAST,
        )
    )


_UPLOAD_FIXED: dict[tuple[int, tuple[int, ...], tuple[int, ...], int], bytes] = {}
_UPLOAD_FIXED_MAX = 1024


def eager_command(record: bytes) -> bytes:
    """`Command{eager_op: record}` as an entry of `ClientFrame.commands`, byte for byte what protobuf writes."""
    n = len(record)
    if n < 128:
        return _EAGER_SHORT[n] + record
    inner = _EAGER_TAG + protocol.varint(n)
    return b"\x0a" + protocol.varint(len(inner) + n) + inner + record


def _scratch(n: int) -> memoryview:
    if n > protocol.CHUNK_BYTES:
        raise Unavailable(f"the daemon announced a bulk chunk of {n} bytes (at most {protocol.CHUNK_BYTES})")
    return memoryview(bytearray(n))


# what the sender's queue holds (`Session._send`); a tuple: a bulk upload's chunk (`Session._upload_side`)
_Item = device_pb2.ClientFrame | bytes | memoryview | tuple[bytes, int, int, memoryview, Any]


_COMMANDS_TAG = protocol.FRAME_COMMANDS_TAG[0]  # a ClientFrame.commands entry's first byte


def _commands_frame(commands: Any) -> bytes:
    """`send_commands`'s bytes, checked (InvalidArgument for what cannot be such a frame). A bytes object that passes
    the checks (the C++ client's every frame) is taken as it is, before the `bytes | bytearray | memoryview` union's
    isinstance, which builds the union anew each call (round 49)."""
    if type(commands) is bytes and 0 < len(commands) <= MAX_FRAME_BYTES and commands[0] == _COMMANDS_TAG:
        return commands
    if not isinstance(commands, bytes | bytearray | memoryview):
        raise InvalidArgument(f"send_commands takes bytes, not {type(commands).__name__}")
    raw = bytes(commands)
    if not raw or raw[0] != _COMMANDS_TAG:
        raise InvalidArgument("send_commands: the bytes do not start with a ClientFrame.commands entry")
    if len(raw) > MAX_FRAME_BYTES:
        raise InvalidArgument(f"send_commands: a frame of {len(raw)} bytes (at most {MAX_FRAME_BYTES})")
    return raw


class Handle(int):
    """An int that names a tensor on the daemon (so `Session.call` sends it as a tensor argument)."""


@dataclass(frozen=True)
class _Want:
    """What a download may be (the client's own knowledge, never the daemon's word): the shape and dtype it asked
    for where known (a tensor the client describes), else at most `limit` bytes (the session's quota: no tensor of
    the session is larger)."""

    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    limit: int
    into: torch.Tensor | None = None  # the caller's tensor the bytes land in (`Session.download`'s `into`)

    def check(self, shape: list[int], dtype: torch.dtype) -> str | None:
        """Why a download's metadata from the daemon cannot be this download's, or None."""
        if any(n < 0 for n in shape):
            return f"a negative size in shape {shape}"
        if self.shape is not None and (tuple(shape) != self.shape or dtype != self.dtype):
            return f"{tuple(shape)} {dtype} for a download of {self.shape} {self.dtype}"
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.limit:
            return f"{tuple(shape)} {dtype}: {nbytes} bytes, past {self.limit}"
        return None


class _Waiter:
    def __init__(self, want: _Want | None = None) -> None:
        # Set once, by whichever thread reads the reply; nobody blocks on it (waiting threads read replies
        # themselves and look at it after each one), so a flag does, not an Event (a Condition and a lock).
        self.done = False
        self.reply: device_pb2.SyncReply | None = None
        self.error: GpupoolError | None = None
        self.tensor: torch.Tensor | None = None
        self.want = want  # None: no download (a sync's, a reply nobody waits for): chunks allocate nothing
        self._bytes: memoryview | None = None
        self._next = 0  # the download's bytes so far: each chunk starts here (every byte written once, in order)
        self._prefault: prefault.Prefault | None = None  # faulting a bulk download's tensor in ahead of its bytes

    def chunk(self, c: device_pb2.TensorChunk | _Chunk) -> None:
        if self.done:
            return
        if c.meta is not None and (isinstance(c, _Chunk) or c.HasField("meta")):
            self._start(c.meta)
        data = c.data  # a view of the received frame (_Chunk), or a copy (each access of a bytes field copies)
        if self._bytes is None or c.offset != self._next or c.offset + len(data) > len(self._bytes):
            self.fail(self._misplaced(c.offset, len(data)))  # its first case: a chunk before its metadata
            return
        if data:
            self._bytes[c.offset : c.offset + len(data)] = data
            self._next += len(data)
            if self._prefault is not None:
                self._prefault.advance(c.offset + len(data))
        if c.last:
            self._finish()

    def bulk_chunk(self, request_id: int, c: device_pb2.TensorChunk, side: bulk.BulkSocket) -> None:
        """A chunk announced on the stream whose `bulk_bytes` follow on the side socket: read them into the
        tensor (a chunk past its end is read into scratch, so the socket stays in step, and fails the wait)."""
        if c.HasField("meta") and not self.done:
            self._start(c.meta)
        n, into = c.bulk_bytes, self._bytes
        fits = not self.done and into is not None and c.offset == self._next and c.offset + n <= len(into)
        try:
            side.recv_download(
                request_id, c.offset, into[c.offset : c.offset + n] if into is not None and fits else _scratch(n)
            )
        except BaseException:
            self._end_prefault()
            raise
        if not fits:
            self.fail(self._misplaced(c.offset, n))
            return
        self._next += n
        if self._prefault is not None:
            self._prefault.advance(c.offset + n)
        if c.last:
            self._finish()

    def _start(self, meta: tensor_pb2.TensorMeta) -> None:
        """The download's tensor, once its metadata is checked against what was asked for (`want`: a daemon's
        reply allocates nothing else): a big one over memory a dropped download left (gpupool/hostpool.py: its
        pages are in memory), else fresh memory whose pages a helper faults in ahead of the bytes
        (gpupool/prefault.py)."""
        if self.want is None or self._bytes is not None:
            why = "a download's metadata in a reply to no download" if self.want is None else "metadata twice"
            self.fail(InvalidArgument(f"the daemon sent {why}"))
            return
        try:
            shape, dtype = list(meta.shape), wire.dtype_from_proto(meta.dtype)
        except InvalidArgument as exc:
            self.fail(InvalidArgument(f"the daemon sent a download of {exc}"))
            return
        wrong = self.want.check(shape, dtype)
        if wrong is not None:
            self.fail(InvalidArgument(f"the daemon sent a download of {wrong}"))
            return
        if self.want.into is not None:  # (checked to be that shape and dtype: `Session.download`)
            self.tensor, kept = self.want.into, False
        else:
            self.tensor, kept = hostpool.empty(shape, dtype, _huge_pages)
        self._bytes = wire.host_bytes(self.tensor)
        if not kept:
            self._prefault = prefault.start(self.tensor)

    def _misplaced(self, offset: int, n: int) -> GpupoolError:
        if self._bytes is None:
            return InvalidArgument("download chunk before its metadata")
        return InvalidArgument(
            f"the daemon sent download bytes {offset}..{offset + n} of a {len(self._bytes)} byte tensor, "
            f"{self._next} written so far (each chunk must follow the one before it)"
        )

    def _finish(self) -> None:
        """The last chunk: the download is whole only if every byte of the tensor came (the rest would be this
        process's uninitialized memory, or an earlier download's bytes)."""
        self._end_prefault()
        assert self._bytes is not None
        if self._next != len(self._bytes):
            self.fail(
                InvalidArgument(
                    f"the daemon ended a download of {len(self._bytes)} bytes after {self._next}: bytes left unwritten"
                )
            )
        elif self.tensor is not None and self.tensor.dtype == torch.bool and not wire.bool_tensor_ok(self.tensor):
            # any other byte in a bool tensor is undefined behaviour in torch's kernels (the daemon refuses such
            # uploads the same way: `wire.check_bool_bytes`); the tensor is never handed out
            self.tensor = None
            self.fail(InvalidArgument("the daemon sent a bool download with a byte other than 0 or 1"))
        self.done = True

    def _end_prefault(self) -> None:
        if self._prefault is not None:
            self._prefault.end()
            self._prefault = None

    def fail(self, exc: GpupoolError) -> None:
        self._end_prefault()
        if not self.done:
            self.error = exc
            self.done = True


def side_chunks(h: int, meta: tensor_pb2.TensorMeta, total: int) -> Iterator[tuple[int, int, bytes]]:
    """A bulk upload's chunks of `total` bytes: (offset, end, the frame of its Upload command; the first carries
    the tensor's `meta`)."""
    for off in range(0, total, bulk.CHUNK):
        end = min(off + bulk.CHUNK, total)
        up = device_pb2.Upload(handle=h, offset=off, last=end >= total, bulk_bytes=end - off)
        if off == 0:
            up.meta.CopyFrom(meta)
        yield off, end, device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()


class Session:
    """One attached session. Use `Session.attach(address, token)`; close it (or use `with`) when done."""

    def __init__(
        self,
        channel: grpc.Channel,
        reply: device_pb2.AttachReply,
        address: str = "",
        side: bulk.BulkSocket | None = None,
    ) -> None:
        self.address = address
        self._side = side  # the bulk side socket (client/bulk.py), None: every byte goes on the stream
        # the side socket when the session's frames and replies travel on it (not on the stream), else None
        self._carrier = side if side is not None and side.frames else None
        self.session_id: str = reply.session_id
        self.handle_base: int = reply.handle_base
        self.device: device_pb2.DeviceInfo = reply.device
        self.quota_bytes: int = reply.quota_bytes
        self.share: float = reply.share
        # the most it may hold: its largest quota yet (a download's bound; what it held past a quota a refresh made
        # smaller stays its own)
        self._most_bytes = reply.quota_bytes
        # called with the new quota after a refresh changed it (`refresh`: the C++ client's `set_quota`)
        self.quota_hooks: list[Callable[[int], None]] = []
        # What the daemon supports beyond every daemon (gpupool/protocol.py FEATURES; none from a daemon before
        # round 24): the clients' choice of scaled_dot_product_attention's backend reads it (sdpa_dropout)
        self.features: frozenset[str] = frozenset(reply.features)
        self._channel = channel
        self._stub = device_pb2_grpc.DeviceStub(channel)
        self._handles = itertools.count(1)
        self._requests = itertools.count(1)
        self._dead: GpupoolError | None = None
        self._init_frames()
        self._waiters: dict[int, _Waiter] = {}
        self._wlock = threading.Lock()  # the replies' reader takes only this one, never the batching lock
        self._closed = False
        stream = channel.stream_stream(
            "/gpupool.v1.Device/Stream",
            request_serializer=_serialize_frame,
            response_deserializer=_read_frame,
        )
        requests: Iterator[Any] = self._frames()
        if self._carrier is not None:  # the stream carries no frame: its requests end at close
            self._idle: queue.SimpleQueue[None] = queue.SimpleQueue()
            requests = iter(self._idle.get, None)
            # The frames go out from a thread of their own, as gRPC's sending thread takes them on the stream:
            # written from the calling thread, a pinned client's steps stalled for milliseconds (round 26:
            # launch_bound's tiny MLP 4.4 ms a step against 1.25; with this thread 1.0-1.1)
            threading.Thread(target=self._side_sender, name="gpupool-side-send", daemon=True).start()
        # a grpc Rendezvous: an iterator of replies, a Call and a Future (its stubs type only the first two)
        self._responses: Any = cast(Any, stream(requests, metadata=((protocol.SESSION_METADATA, self.session_id),)))
        self._rlock = threading.Lock()  # held by the one thread reading replies (`_wait`)
        self._ended: GpupoolError | None = None  # how the reply stream ended, once a reader met its end
        self._stream_ended = threading.Event()  # set by `_stream_done`: `_dead` holds the stream's status
        self._responses.add_done_callback(self._stream_done)

    def _init_frames(self) -> None:
        """The batching state: commands queued into frames, and the frames handed to gRPC's sending thread."""
        self._lock = threading.RLock()
        self._frame = device_pb2.ClientFrame()
        self._frame_bytes = 0
        # Eager op records and small uploads (`upload_command`) are appended to the frame as encoded bytes
        # (`_eager`, after everything in `_frame`), which costs a tenth of a protobuf Command; a command of another
        # kind first moves them, in order, with what `_frame` holds, into `_sealed`. The frame that goes out is the
        # concatenation: protobuf reads concatenated encodings of a repeated field as one list, and these bytes are
        # exactly what protobuf would write for the same commands.
        self._eager: list[bytes] = []
        self._sealed: list[bytes] = []
        self._sealed_count = 0
        # Frames handed to gRPC's sending thread, each with its byte count: a SimpleQueue (put and get in C, no
        # Condition per frame, ~0.3 us against ~2.5-6 us for queue.Queue's pair here); `_put` keeps the
        # back-pressure of SEND_QUEUE_FRAMES and SEND_QUEUE_BYTES (on the side socket's path the session's own
        # sender thread takes them: `_side_sender`). The bytes queued and not yet written are `bytes_put` less
        # `bytes_sent`: each counter has one writer (`_put`, under the batching lock; the one sending thread).
        # (a memoryview: the rest of a record `_write_inline` began, on the side socket's path only)
        self._send: queue.SimpleQueue[tuple[_Item, int] | None] = queue.SimpleQueue()
        self.frames_put = 0  # frames handed to gRPC so far (capture.py: whether a sync sent its held steps)
        self.bytes_put = 0  # the bytes of those frames (a protobuf frame's: the bytes it batched, `_frame_bytes`)
        self.bytes_sent = 0  # ... of which the sender wrote this many (gRPC took the next frame; the socket's send)
        self.frames_inline = 0  # of the frames put, written from the calling thread (`_write_inline`)
        # Items (frames, `_side_barrier`'s Events) queued for the sender and handled by it: equal, the sender is
        # idle (`_write_inline`); each has one writer (`_put`, under the batching lock; the sending thread)
        self._items_put = 0
        self._items_done = 0
        self._room = threading.Condition(threading.Lock())  # a caller blocked on a full queue waits here (`_put`)
        self._full = False  # ... and says so (the sender notifies only then)

    @classmethod
    def attach(cls, address: str, token: str, *, timeout: float = 10.0, features: Sequence[str] = ()) -> Session:
        """`features`: what the client asks of the session (AttachRequest.features; the torch clients go through
        `attach_tensors`, which asks for "conv_layout"); a bare session asks for none, as a client before round 43."""
        # TLS as GPUPOOL_TLS_* say (gpupool/tls.py); the lease token, not an API token, authorizes the session.
        name = tokens.unverified_host(token) if tls.verify_host_id() else ""
        channel = tls.channel(address, CHANNEL_OPTIONS, token=False, server_name=name)
        request = device_pb2.AttachRequest(token=token, features=list(features))
        try:
            reply = device_pb2_grpc.DeviceStub(channel).Attach(request, timeout=timeout)
        except grpc.RpcError as exc:
            channel.close()
            raise from_failure(exc) from None
        frames = protocol.FEATURE_SIDE_FRAMES in reply.features and os.environ.get("GPUPOOL_SIDE_FRAMES", "1") != "0"
        side = bulk.connect(address, reply.bulk_port, reply.session_id, name, frames)
        cuda_hint.mark_attached()  # `gpupool run` without --cuda: a command that attached nothing gets a note
        return cls(channel, reply, address, side)

    @classmethod
    def attach_tensors(cls, address: str, token: str) -> Session:
        """A session for a torch client (the shim's device, the C++ client's): it asks for the "conv_layout" feature
        (gpupool/protocol.py) unless this process already runs without it. The first session's daemon decides for the
        process (`metas.decide_conv_layout`: both clients' meta-inference caches hold the layouts); a later daemon
        that does not name it, where the process lays convolutions out as cuDNN does, is refused here, one
        RuntimeError: its convolutions' views would read their bytes out of order."""
        wanted = metas.conv_layout_wanted()
        session = cls.attach(address, token, features=() if wanted is False else (protocol.FEATURE_CONV_LAYOUT,))
        offered = protocol.FEATURE_CONV_LAYOUT in session.features
        if metas.decide_conv_layout(offered) and not offered:
            session.close()
            raise RuntimeError(
                f"the gpupool daemon at {address} lays convolution outputs out contiguous (it does not name the "
                f"{protocol.FEATURE_CONV_LAYOUT!r} feature: a daemon from before round 43), where this process's "
                "other devices lay them out as cuDNN does; run a job's daemons at one version"
            )
        return session

    # ---- commands ----

    def new_handle(self) -> int:
        return Handle(self.handle_base + next(self._handles))

    def upload(self, tensor: torch.Tensor | numpy.ndarray, handle: int | None = None) -> int:
        """Send a CPU tensor (copied now; fire-and-forget); returns its handle."""
        t = torch.from_numpy(numpy.ascontiguousarray(tensor)) if isinstance(tensor, numpy.ndarray) else tensor
        if t.device.type != "cpu" or not t.is_contiguous() or t.is_conj() or t.is_neg():  # (the usual batch: none)
            # (a conjugate or negative bit resolved: the bytes sent are the tensor's memory, its values without the
            # bit; until round 48 such a view went up unconjugated / unnegated)
            t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
        h = Handle(handle) if handle is not None else self.new_handle()
        data = wire.host_bytes(t)  # `t` stays referenced below while frames copy out of it
        total = data.nbytes
        # One command, written as bytes like the eager ops (no protobuf, no seal); with a side socket only under
        # bulk.MIN_UPLOAD (round 52: one of 1-4 MiB in the frame cost three copies of its bytes here, fresh pages each,
        # against none on the side socket, and the daemon one copy more)
        if total <= wire.CHUNK_BYTES and (self._side is None or total < bulk.MIN_UPLOAD):
            cmd = upload_command(h, wire.dtype_to_proto(t.dtype), t.shape, t.stride(), data.tobytes())
            with self._lock:
                if not self._eager and len(self._frame.commands):
                    self._seal()  # `_frame` stays empty while `_eager` holds anything (`eager_op` counts on it)
                self._eager.append(cmd)
                self._frame_bytes += total
                self._maybe_flush()
            return h
        meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(t.dtype), shape=list(t.shape), stride=list(t.stride()))
        if self._side is not None and total >= bulk.MIN_UPLOAD:
            self._upload_side(self._side, h, meta, data, t)
            return h
        with self._lock:
            self.flush()
            for off in range(0, total, wire.CHUNK_BYTES):
                end = min(off + wire.CHUNK_BYTES, total)
                up = device_pb2.Upload(handle=h, offset=off, last=end >= total)
                if off == 0:
                    up.meta.CopyFrom(meta)
                self._put(protocol.upload_frame(up, data[off:end]))
        return h

    def _upload_side(
        self, side: bulk.BulkSocket, h: int, meta: tensor_pb2.TensorMeta, data: memoryview, keep: Any
    ) -> None:
        """An upload whose bytes go on the side socket: each chunk's command (in its frame, in order), then its bytes
        from the tensor's memory (`keep`, the tensor `data` views: the view owns nothing). Each chunk's frame and
        bytes are one item for the session's sending thread, which writes them whole, and this thread waits once, for
        the last one: where the frames use the side socket, its sender writes the frame's record, then the bytes
        (`_side_sender`); where they use the gRPC stream, gRPC's sending thread takes the frame and, once gRPC wrote
        it, the same thread writes the bytes on the side socket (`_frames`). An interrupt of this thread (Ctrl-C
        during a big upload: in the wait, or in `_put` blocked on a full queue) leaves the chunks it queued whole and
        the later ones unsent (on the stream's path up to SEND_QUEUE_FRAMES chunks, 128 MiB, are queued ahead: an
        upload of more is cut there): the session goes on, the handle half uploaded (the daemon refuses it:
        FailedPrecondition, "still being uploaded", until an upload of it completes). Until round 38 this thread
        wrote the bytes itself (round 39 on the stream's path): an interrupt inside the write left half a TLS record
        (or half a chunk) on the socket, and the session was lost. (Round 35 tried one barrier an upload with this
        thread writing each chunk's frame itself: no faster on the 2-core box, bench/side_upload_ab.py,
        BENCHMARKS.md.)"""
        with self._lock:
            self.flush()
            for off, end, frame in side_chunks(h, meta, data.nbytes):
                # (on the stream's path the chunk's bytes are not counted against SEND_QUEUE_BYTES: they are the
                # tensor's, not a copy, and gRPC's thread writes them only once gRPC wrote the frame, so with one
                # chunk queued at a time each chunk waited for this thread to wake and queue the next: 256 MiB in
                # TLS took 1.0 s against 0.72, bench/side_upload_ab.py --stream; SEND_QUEUE_FRAMES still bounds it)
                nbytes = len(frame) + (end - off if self._carrier is not None else 0)
                self._put(cast(Any, (frame, h, off, data[off:end], keep)), nbytes)
            self._side_barrier()  # the tensor's bytes went out: the caller may change it

    def op(
        self,
        name: str,
        args: Sequence[tensor_pb2.Arg],
        kwargs: Mapping[str, tensor_pb2.Arg] | None,
        outputs: Sequence[int],
    ) -> None:
        """Enqueue an aten op (no round trip): results go to `outputs`, one handle per returned tensor."""
        with self._lock:
            if self._eager:
                self._seal()
            cmd = self._frame.commands.add()
            o = cmd.op
            o.name = name
            o.args.extend(args)
            if kwargs:
                for k, v in kwargs.items():
                    o.kwargs[k].CopyFrom(v)
            o.outputs.extend(outputs)
            self._maybe_flush()

    def eager_op(self, record: bytes) -> None:
        """Enqueue a compact eager op record (gpupool/compact.py; the shim builds them): no protobuf per argument.
        (client/torch/native_ops.cpp `session_append` has the case of a batch that holds some records and does not
        fill inline: keep the two in step.)"""
        n = len(record)
        cmd = _EAGER_SHORT[n] + record if n < 128 else eager_command(record)  # eager_command, inline
        with self._lock:
            eager = self._eager
            if not eager and len(self._frame.commands):
                self._seal()  # what `_frame` holds goes first; now `_frame` stays empty while `_eager` fills
            eager.append(cmd)
            # `_frame` is empty here: every command of another kind seals `_eager` first, and the line above
            # seals `_frame` before the first eager op after it (len() of a protobuf field costs ~0.2 us an op)
            if len(eager) + self._sealed_count >= MAX_BATCH_COMMANDS:
                self.flush()

    def send_commands(self, commands: bytes) -> None:
        """Send finished `ClientFrame.commands` entries, encoded by the caller (a client that writes its own
        records, such as the C++ client in spike/: `eager_command`, `upload_command`, or any `Command` as protobuf
        writes it, each as field 1 of a ClientFrame), as one frame after everything queued before it: what the
        session had queued goes out first, in order. The hand-off for a client that batches its frames itself.

        Flow control and errors are the shim's frames': a full send queue (SEND_QUEUE_FRAMES frames, or
        SEND_QUEUE_BYTES bytes, not yet written) blocks here until it drains; a session whose stream ended raises
        its reason (Unavailable, or what the daemon said) here; a daemon error on one of these commands (an op that
        fails on the device) is raised by the next `sync` or `download`, as for commands queued any other way, and
        the session goes on. The bytes are not parsed here: the daemon reads them as it reads any frame (one it
        cannot parse ends the stream with INVALID_ARGUMENT). Raises InvalidArgument for what cannot be such a frame
        (not bytes, empty, not starting with a commands entry, over the channel's message limit)."""
        raw = _commands_frame(commands)
        with self._lock:  # (round 49: an empty batch is not flushed, `_flush`'s own test inline: ~5k a frame)
            if self._eager or self._sealed or len(self._frame.commands):
                self._flush(False)
            self._put(raw)

    def call(self, name: str, *args: Any, outputs: int | Sequence[int] = 1, **kwargs: Any) -> list[int]:
        """`op` with Python values: Handles become tensor args, small CPU tensors travel inline."""
        outs: list[int] = (
            [self.new_handle() for _ in range(outputs)] if isinstance(outputs, int) else [Handle(h) for h in outputs]
        )
        self.op(name, [self._encode(a) for a in args], {k: self._encode(v) for k, v in kwargs.items()}, outs)
        return outs

    def free(self, handles: Iterable[int]) -> None:
        hs = list(handles)
        if hs:
            self._add(device_pb2.Command(free=device_pb2.Free(handles=hs)), 8 * len(hs))

    def command(self, cmd: device_pb2.Command) -> None:
        """Enqueue any other command (the collectives of client/distributed.py)."""
        self._add(cmd)

    def seed(self, seed: int) -> None:
        self._add(device_pb2.Command(seed=device_pb2.Seed(seed=seed)))

    def rng_state(self, handle: int | None = None) -> torch.Tensor:
        """The session generator's state after everything sent so far (a CPU uint8 tensor; a round trip), where the
        daemon names the "rng_state" feature (`_need`). `handle`: a fresh one of the client's (the C++ client hands
        out its own), else `new_handle`'s."""
        self._need(protocol.FEATURE_RNG_STATE, "torch.cuda.get_rng_state")
        h = Handle(handle) if handle is not None else self.new_handle()
        self._add(device_pb2.Command(rng_state=device_pb2.RngState(get=h)))
        try:
            return self.download(h)
        finally:
            self.free([h])

    def set_rng_state(self, state: torch.Tensor, handle: int | None = None) -> None:
        """Load the session generator from `state` (a uint8 tensor as `rng_state` returned), in stream order; the
        daemon checks it (a bad one fails at the next sync, INVALID_ARGUMENT). `handle`: as `rng_state`'s."""
        self._need(protocol.FEATURE_RNG_STATE, "torch.cuda.set_rng_state")
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            raise TypeError(f"a generator state is a torch.ByteTensor, not {type(state).__name__}")
        h = self.upload(state.detach().cpu().reshape(-1), handle)
        self._add(device_pb2.Command(rng_state=device_pb2.RngState(set=h)))
        self.free([h])

    def _need(self, feature: str, call: str) -> None:
        if feature not in self.features:
            raise RuntimeError(
                f"{call} is not available on the pooled GPU at {self.address}: its daemon does not name the {feature!r}"
                " feature (a daemon from before round 43); the generator lives on the daemon"
            )

    def define_graph(self, graph: device_pb2.DefineGraph) -> None:
        """Define (or replace) a captured step's graph (fire-and-forget; a refusal surfaces at the next sync)."""
        self._add(device_pb2.Command(define_graph=graph), graph.ByteSize())

    def run_graph(
        self,
        graph_id: int,
        inputs: Sequence[int],
        outputs: Sequence[int],
        drop_writes: Sequence[int] = (),
        data: Sequence[bytes] = (),
    ) -> None:
        """One step of a defined graph: the batch's uploads queued before it travel in the same frame; `data`
        holds the bytes of the inputs sent by value (handle 0 in `inputs`)."""
        with self._lock:
            if self._eager:
                self._seal()
            run = self._frame.commands.add().run_graph
            run.graph_id = graph_id
            run.inputs.extend(inputs)
            run.outputs.extend(outputs)
            if drop_writes:
                run.drop_writes.extend(drop_writes)
            if data:
                run.input_data.extend(data)
                self._frame_bytes += sum(map(len, data))
            self._maybe_flush()

    def drop_graph(self, graph_id: int) -> None:
        self._add(device_pb2.Command(drop_graph=device_pb2.DropGraph(graph_id=graph_id)))

    @property
    def closed(self) -> bool:
        """This process closed the session (`close`: Detach sent)."""
        return self._closed

    def refresh(self, token: str) -> None:
        """Hand the daemon a renewed token of this session's lease. Out of band (a unary call), not on the stream:
        there it would wait behind queued work, which can outlast the old token. A session this process closed has
        no use for a token: nothing is sent; one closed while the call was in flight (a renewal racing the end of
        `gpupool run`'s child: atexit's Detach) is not an error either."""
        if self._closed:
            return
        try:
            reply = self._stub.RefreshToken(
                device_pb2.RefreshTokenRequest(session_id=self.session_id, token=token), timeout=REFRESH_TIMEOUT
            )
        except (grpc.RpcError, ValueError) as exc:  # ValueError: the channel closed under the call (`close`)
            if self._closed:
                return
            if isinstance(exc, ValueError):
                raise
            raise from_failure(exc) from None
        # The terms the session holds from now on (its lease's renewal may change them: round 52); a daemon from
        # before round 52 sends none (0), and kept the first token's
        if reply.quota_bytes and reply.quota_bytes != self.quota_bytes:
            self.quota_bytes = reply.quota_bytes
            self._most_bytes = max(self._most_bytes, reply.quota_bytes)
            for hook in self.quota_hooks:
                hook(reply.quota_bytes)
        if reply.share:
            self.share = reply.share

    def flush(self) -> None:
        self._flush(False)

    def _flush(self, reply: bool) -> None:
        """Hand what is batched to the sender as one frame (`reply`: the caller waits for an answer to it next, so
        it may be written from this thread: `_put`)."""
        with self._lock:
            if self._eager or self._sealed:
                self._seal()
                raw = b"".join(self._sealed)
                self._sealed, self._sealed_count, self._frame_bytes = [], 0, 0
                self._put(raw, 0, reply)
            elif len(self._frame.commands):
                frame, nbytes = self._frame, self._frame_bytes
                self._frame, self._frame_bytes = device_pb2.ClientFrame(), 0
                self._put(frame, nbytes, reply)

    def _seal(self) -> None:
        """Move what the frame holds so far (protobuf commands, then encoded eager ops) into `_sealed`, in order."""
        if len(self._frame.commands):
            self._sealed.append(self._frame.SerializeToString())
            self._sealed_count += len(self._frame.commands)
            self._frame = device_pb2.ClientFrame()
        if self._eager:
            self._sealed.append(b"".join(self._eager))
            self._sealed_count += len(self._eager)
            self._eager = []

    def sync(self, scalar_handles: Sequence[int] = (), commands: bytes = b"") -> list[bool | int | float | complex]:
        """Wait for everything sent so far; raise the first error since the last sync; return scalar values.
        `commands`: finished `ClientFrame.commands` entries to send first, as `send_commands` takes them (a client
        that batches its own frames: the C++ client's `.item()`), in the same frame as the Sync where they are small
        (one frame a synced step, not two)."""
        if commands:
            raw = _commands_frame(commands)
            if len(raw) > MAX_BATCH_BYTES:
                self.send_commands(raw)
                raw = b""
            sync = device_pb2.Sync(scalar_handles=list(scalar_handles))
            rid, w = self._request(device_pb2.Command(sync=sync), None, raw)
        elif scalar_handles:
            rid, w = self._request(device_pb2.Command(sync=device_pb2.Sync(scalar_handles=list(scalar_handles))))
        else:
            rid, w = self._request_sync()
        self._wait(rid, w)
        if w.reply is _EMPTY_SYNC:
            return []
        assert w.reply is not None
        if w.reply.HasField("error"):
            raise self._in_band(w.reply.error)
        return [wire.scalar_from_proto(v) for v in w.reply.values]

    def download(
        self,
        handle: int,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The tensor's value as a CPU tensor (waits for the ops before it); like `sync`, raises the first error
        since the last sync instead. `shape` and `dtype`: what the caller knows the tensor to be (the daemon's
        reply must be that, else InvalidArgument, before any memory is allocated for it); without them a reply
        of at most the session's quota is taken. Every byte of the returned tensor is one the daemon sent.
        `into`: a contiguous CPU tensor of that shape and dtype (not bool, whose bytes are checked only once all
        came; no conjugate or negative bit; its storage holding its elements; not one that requires grad, except under
        `torch.no_grad()`, as torch's in-place ops) that the bytes are received into and that is returned, instead of
        new memory (the C++ client's `.cpu()`, round 47: one copy of the download less); where the download fails, its
        contents are undefined. Its version counter moves as an in-place op's does (round 48), so a graph that saved
        it for backward refuses its new values."""
        if (shape is None) != (dtype is None):
            raise InvalidArgument("download: give both shape and dtype, or neither")
        if into is not None and (
            shape is None
            or (into.requires_grad and torch.is_grad_enabled())
            or into.device.type != "cpu"
            or not into.is_contiguous()
            or tuple(into.shape) != tuple(shape)
            or into.dtype != dtype
            or dtype == torch.bool
            or into.is_conj()
            or into.is_neg()
            or into.untyped_storage().nbytes() < (into.storage_offset() + into.numel()) * into.element_size()
        ):
            # (a conjugate or negative bit would read the bytes conjugated or negated; a storage smaller than the
            # elements, `untyped_storage().resize_(0)`, would have the bytes written past its memory)
            # (torch's in-place ops refuse a tensor that requires grad, and move the version counter of the others:
            # until round 48 the bytes were written past both, so a leaf's values changed under autograd and a
            # tensor saved for backward gave wrong gradients without an error)
            raise InvalidArgument(
                "download: `into` must be a contiguous CPU tensor of the shape and dtype, not bool, without a "
                "conjugate or negative bit, its storage holding its elements, not requiring grad (but under "
                "torch.no_grad())"
            )
        want = _Want(None if shape is None else tuple(shape), dtype, self._most_bytes or sys.maxsize, into)
        cmd = device_pb2.Command(get=device_pb2.Get(handle=handle, bulk=self._side is not None))
        rid, w = self._request(cmd, want)
        try:
            self._wait(rid, w)
        finally:
            if into is not None:  # (its bytes are written, or undefined: either way, new)
                torch.autograd.graph.increment_version(into)
        assert w.tensor is not None
        return w.tensor

    def close(self) -> None:
        """Detach: the daemon frees everything this session holds."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._dead is None:  # queued commands are moot: Detach frees everything
                self._stub.Detach(device_pb2.DetachRequest(session_id=self.session_id), timeout=5)
        except (grpc.RpcError, GpupoolError):
            pass  # the daemon is gone or already closed the session: nothing left to free
        finally:
            self._dead = self._dead or Unavailable("session closed")
            self._send.put(None)
            if self._carrier is not None:
                self._idle.put(None)
            self._channel.close()
            if self._side is not None:
                self._side.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ----

    def _encode(self, value: Any) -> tensor_pb2.Arg:
        if isinstance(value, Handle):
            return tensor_pb2.Arg(tensor=int(value))
        if isinstance(value, list | tuple) and any(isinstance(v, Handle) for v in value):
            if not all(v is None or isinstance(v, Handle) for v in value):
                raise InvalidArgument("a list argument mixes tensor handles and other values")
            return tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=[0 if v is None else int(v) for v in value]))
        return wire.encode_arg(value, self._inline)

    @staticmethod
    def _inline(t: torch.Tensor) -> tensor_pb2.Arg:
        if t.device.type != "cpu" or t.numel() * t.element_size() > wire.INLINE_MAX_BYTES:
            raise InvalidArgument("only small CPU tensors travel inline; upload larger ones and pass their Handle")
        return tensor_pb2.Arg(inline=wire.inline_to_proto(t))

    def _add(self, cmd: device_pb2.Command, nbytes: int = 0) -> None:
        with self._lock:
            if self._eager:
                self._seal()
            self._frame.commands.append(cmd)
            self._frame_bytes += nbytes
            self._maybe_flush()

    def _maybe_flush(self) -> None:
        n = len(self._frame.commands) + len(self._eager) + self._sealed_count
        if n >= MAX_BATCH_COMMANDS or self._frame_bytes >= MAX_BATCH_BYTES:
            self.flush()

    def _request(self, cmd: device_pb2.Command, want: _Want | None = None, raw: bytes = b"") -> tuple[int, _Waiter]:
        """Queue a Sync or Get (after `raw`, commands a client encoded itself) and hand the frame over: the caller
        waits for its answer next (`_flush`'s `reply`)."""
        w = _Waiter(want)
        with self._lock:
            rid = next(self._requests)
            if cmd.HasField("sync"):
                cmd.sync.request_id = rid
            else:
                cmd.get.request_id = rid
            with self._wlock:
                self._waiters[rid] = w
            if raw:
                self._seal()
                self._sealed.append(raw)
                self._sealed_count += 1
                self._frame_bytes += len(raw)
            elif self._eager:
                self._seal()
            self._frame.commands.append(cmd)
            self._flush(True)
        return rid, w

    def _request_sync(self) -> tuple[int, _Waiter]:
        """A Sync without scalars: with nothing batched before it, its frame is `protocol.sync_frame`'s bytes
        (what protobuf would write; the daemon answers it on its fast path), built without protobuf."""
        with self._lock:
            if self._eager or self._sealed or len(self._frame.commands):
                return self._request(device_pb2.Command(sync=device_pb2.Sync()))
            w = _Waiter()
            rid = next(self._requests)
            with self._wlock:
                self._waiters[rid] = w
            self._put(protocol.sync_frame(rid), 0, True)
        return rid, w

    def _wait(self, rid: int, w: _Waiter) -> None:
        """Read the reply stream in this thread until `w` is answered: no reader thread hands the reply over (a
        thread wake-up per round trip). Whoever waits reads, one thread at a time, and files every reply it
        meets with its own waiter; another waiting thread takes over when this one is done."""
        try:
            while not w.done:
                if not self._rlock.acquire(timeout=0.25):
                    continue
                try:
                    while not w.done:
                        self._read_one()
                finally:
                    self._rlock.release()
        finally:
            with self._wlock:
                self._waiters.pop(rid, None)
        if w.error is not None:
            raise w.error

    def _put(self, frame: device_pb2.ClientFrame | bytes, nbytes: int = 0, reply: bool = False) -> None:
        """Queue a frame for the sender (`nbytes`: its size where it is a protobuf message); blocks while
        SEND_QUEUE_FRAMES frames or SEND_QUEUE_BYTES bytes wait (back-pressure, woken by the sender: `_room`),
        raises the session's end instead. `reply`: the caller waits for an answer to this frame next (a Sync's, a
        Get's): where the frames use the side socket, the sender thread is idle and nothing is queued, the frame is
        written here, from the calling thread (`_write_inline`), with no hand-off to the sender (its wake-up and the
        GIL passed twice). Called under the batching lock (taken here too): no other frame is queued meanwhile."""
        n = len(frame) if type(frame) is bytes else nbytes
        with self._lock:
            if reply and self._carrier is not None and self._write_inline(frame, n):
                return
            send = self._send
            while True:
                if self._dead is not None:
                    raise self._dead
                if send.qsize() < SEND_QUEUE_FRAMES:
                    queued = self.bytes_put - self.bytes_sent
                    if queued + n <= SEND_QUEUE_BYTES or queued <= 0:
                        self._items_put += 1
                        send.put((frame, n))
                        self.frames_put += 1
                        self.bytes_put += n
                        return
                with self._room:  # back-pressure: until the sender wrote a frame (`_sent`)
                    self._full = True
                    queued = self.bytes_put - self.bytes_sent
                    if send.qsize() >= SEND_QUEUE_FRAMES or (queued + n > SEND_QUEUE_BYTES and queued > 0):
                        self._room.wait(SEND_QUEUE_WAIT)

    def _write_inline(self, frame: device_pb2.ClientFrame | bytes, n: int) -> bool:
        """Write a frame the caller waits on to the side socket from this thread, where the sender thread is idle
        (it handled every item queued: `_items_done`, and so waits on an empty queue) and the frame is small; a
        frame written here never passes a queued one, and the sender writes nothing meanwhile (only `_put` queues,
        under the batching lock this thread holds). A send that fails ends the session as the sender's would
        (`_dead`: the reply's reader, the caller, meets the socket's end and raises the reason). False: queue it."""
        if self._items_done != self._items_put or self._dead is not None:
            return False
        raw = frame if type(frame) is bytes else _serialize_frame(frame)
        if len(raw) > INLINE_MAX_BYTES:
            return False  # (a protobuf frame is then serialized twice: rare, over 2 MiB)
        carrier = self._carrier
        assert carrier is not None
        self.frames_put += 1
        self.bytes_put += n
        self.frames_inline += 1
        rest = None
        try:
            rest = carrier.send_frame_now(raw)
        except Unavailable as exc:
            self._dead = self._dead or self._end_reason(exc)
        except BaseException:  # (an interrupt within a non-blocking send: how much went is unknown)
            self._dead = self._dead or Unavailable("session ended: a frame's write was interrupted part way")
            carrier.close()
            raise
        if rest:
            # The socket took part of it (full: the daemon reads slower): the sender writes the rest, in order
            # before anything queued later. Waiting here would hold the session's lock and read no reply meanwhile,
            # and an interrupt in the wait (Ctrl-C during a slow step's `.item()`) left half a record on the socket
            # (OpenSSL then refused the next write, "bad length": the session was lost).
            self._items_put += 1
            self._send.put((rest, n))
            return True
        self.bytes_sent += n  # (the sender is idle: no other writer of the count now)
        return True

    def _sent(self) -> None:
        """The sender handled one queued item: wake a caller blocked on a full queue (`_put`), if one is."""
        self._items_done += 1
        if self._full:
            with self._room:
                self._full = False
                self._room.notify_all()

    def _side_sender(self) -> None:
        """The thread that writes the queued frames of a session whose frames use its side socket, in order; an
        Event in the queue is set when everything before it went out (`_side_barrier`)."""
        carrier = self._carrier
        assert carrier is not None
        while True:
            got = self._send.get()
            if got is None:
                return
            item, n = got
            if type(item) is threading.Event:
                item.set()
            elif self._dead is None:
                try:
                    if type(item) is memoryview:  # the rest of a record `_write_inline` began
                        carrier.send_rest(item)
                    elif isinstance(item, tuple):  # a bulk upload's chunk: its frame, then its bytes
                        carrier.send_chunk(item[0], item[1], item[2], item[3])
                    else:
                        carrier.send_frame(item if type(item) is bytes else _serialize_frame(item))
                except Unavailable as exc:
                    self._dead = self._dead or self._end_reason(exc)
            self.bytes_sent += n
            self._sent()

    def _side_barrier(self) -> None:
        """Until every item queued so far went out (raises the session's end instead)."""
        done = threading.Event()
        self._put(cast(Any, done))
        self.frames_put -= 1
        while not done.wait(0.25):
            if self._dead is not None:
                raise self._dead
        if self._dead is not None:
            raise self._dead

    def _frames(self) -> Iterator[device_pb2.ClientFrame | bytes]:
        """The frames queued, for gRPC's sending thread (where the frames use the stream); an Event is set when
        everything before it went out (`_side_barrier`), a bulk upload's chunk (`_upload_side`) is its frame, then,
        once gRPC wrote it, its bytes on the side socket, written by this thread."""
        side = self._side
        while True:
            got = self._send.get()
            if got is None:
                return
            item, n = got
            if type(item) is threading.Event:
                item.set()
            elif type(item) is tuple:
                if self._dead is None and side is not None:
                    yield item[0]  # the chunk's command: the daemon reads its bytes from the side socket after it
                    try:
                        side.send_upload(item[1], item[2], item[3])
                    except Unavailable as exc:
                        self._dead = self._dead or exc
            else:
                yield cast("device_pb2.ClientFrame | bytes", item)
            self.bytes_sent += n  # gRPC asks for the next frame once it wrote this one
            self._sent()

    def _read_one(self) -> None:
        """Read one reply and give it to its waiter; at the stream's end, fail every waiter with its reason
        (replies the daemon sent before it ended are read first, in order). Called holding `_rlock`."""
        err = self._ended
        if err is None and self._carrier is not None:
            try:
                kind, code, body = self._carrier.recv_record()
                if kind == protocol.BULK_FRAME:
                    self._file(_read_frame(body))
                    return
                err = from_status(_STATUS.get(code, grpc.StatusCode.UNKNOWN), body.decode(errors="replace"))
            except Unavailable as exc:  # closed or broken: the stream's status says why, where it comes in time
                err = self._end_reason(exc)
            except GpupoolError as exc:
                err = exc
            self._ended = self._dead = err
        elif err is None:
            try:
                frame = next(self._responses)
                self._file(frame)
                return
            except StopIteration:
                err = Unavailable(f"daemon {self.address} ended the session's stream")
            except grpc.RpcError as exc:
                err = from_failure(exc)
            except Unavailable as exc:  # the side socket closed or broke: the stream's status says why (a Detach,
                err = self._end_reason(exc)  # the lease's end), where it comes in time, as on the frames carrier
            except GpupoolError as exc:  # the side socket fell out of step: the session cannot go on
                err = exc
            self._ended = self._dead = err
        with self._wlock:
            waiters = list(self._waiters.values())
        for w in waiters:
            w.fail(err)

    def _file(self, frame: Any) -> None:
        with self._wlock:
            w = self._waiters.get(frame.request_id)
        if type(frame) is _Synced:
            if w is not None:
                w.reply = _EMPTY_SYNC
                w.done = True
            return
        if self._side is not None and not isinstance(frame, _Chunk) and frame.chunk.bulk_bytes:
            (w or _Waiter()).bulk_chunk(frame.request_id, frame.chunk, self._side)  # keeps the socket in step
            return
        if w is None:
            return
        if isinstance(frame, _Chunk):
            w.chunk(frame)
            return
        kind = frame.WhichOneof("reply")
        if kind == "sync":
            w.reply = frame.sync
            w.done = True
        elif kind == "chunk":
            if frame.chunk.bulk_bytes:  # never asked for: this session has no side socket
                w.fail(Unavailable("the daemon sent a download's bytes to a bulk socket this session lacks"))
                return
            w.chunk(frame.chunk)
        elif kind == "error":
            w.fail(self._in_band(frame.error))

    def _in_band(self, error: tensor_pb2.Error) -> GpupoolError:
        """The exception of an op stream's `Error` (a Sync's, a Get's), naming this session where it names handles
        without a value (`GpupoolError.poisoned`: client/torch/errors.py `clear_grads` sets such `.grad`s to None)."""
        exc = from_failure(error)
        if exc.poisoned:
            exc.session = self
        return exc

    def _end_reason(self, exc: GpupoolError, wait: float = 5.0) -> GpupoolError:
        """Why a session whose side socket closed or broke ended: the stream's status (the daemon's reason),
        waited for up to `wait` s, else `exc`."""
        self._stream_ended.wait(wait)
        return self._dead or exc

    def _stream_done(self, call: Any) -> None:
        """gRPC's callback when the stream ends, read or not: later commands fail at once with its reason (a
        waiter still reads the replies sent before the end, then gets the same reason)."""
        try:
            self._stream_done_reason(call)
        finally:
            self._stream_ended.set()
            if self._carrier is not None and not self._closed:
                # a waiter on the side socket reads what the daemon sent before the end (its BULK_END, or the
                # socket's close); a daemon that is gone sends neither: the socket closes a little later
                timer = threading.Timer(END_GRACE, self._carrier.close)
                timer.daemon = True
                timer.start()

    def _stream_done_reason(self, call: Any) -> None:
        if self._dead is not None:
            return
        try:
            failed = call.code() != grpc.StatusCode.OK
        except Exception:  # noqa: BLE001 - a call that cannot say how it ended ended badly
            failed = True
        if failed and isinstance(call, grpc.RpcError):
            self._dead = from_failure(call)
        else:
            self._dead = Unavailable(f"daemon {self.address} ended the session's stream")
