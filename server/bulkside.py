"""The bulk side channel (docs/wire.md): per session one TLS socket next to its gRPC stream, for the bytes of
large uploads and downloads, which Python gRPC moves at a fraction of what a raw socket moves.

`BulkPort` listens on a second port (`--bulk-listen`, named in `AttachReply.bulk_port`), with the gRPC port's
certificate and client-certificate rule (`tls.SocketServerTls`; plaintext only when the daemon runs
`--insecure`). A client opens one socket per session and sends `protocol.bulk_hello`: the session id that
`Attach` returned (what authorizes its stream), compared in constant time with every open session's. One socket
per session; a closed session closes it. Before that, a connection is bounded: its TLS handshake and hello are
due within `HELLO_TIMEOUT` of its arrival, all steps together; at most `MAX_PENDING` unauthenticated connections
are open in all and `MAX_PENDING_PER_SOURCE` per source address, and a newcomer past a cap is never refused: it
pushes out its own source's oldest (past the per-source cap) or the busiest source's oldest (past the total), the
policy of the collective hub (seclink.py), so that idle strangers cannot keep a real client on the slower stream.

The stream keeps every command and its order: an `Upload` with `bulk_bytes` (no `data`) makes the session's
stream reader read that many bytes from the socket, after a header (`protocol.BULK_HEAD`: kind, handle,
offset, length) that must match the command, straight into the canonical upload span the worker gets
(`BulkLink.recv_upload`); a `Get` with `bulk` makes the stream's writer send each chunk of its answer of
`SIDE_MIN` bytes or more as a `TensorChunk` with `bulk_bytes` (no data) on the stream, then header and bytes on
the socket, from the frame's memory (`BulkLink.send_download`). Anything else on the socket, or a short read,
ends that session (INVALID_ARGUMENT or UNAVAILABLE, with the reason) and only it.

A bound socket's transfers wait as long as the peer is alive, with no limit of their own (round 27; until then 30 s
without progress ended the session, so a client stopped by Ctrl-Z lost it): a client that does not read its replies
parks only its own session (its reply budget, `outbox_bytes`, stops its commands; its queue's back-pressure stops
its sender), and goes on where it was when it reads again. A dead peer is found by the kernel (`PEER_*`,
`duplex.keep_alive`); a killed client's kernel closes the socket at once; a session closed for any reason (Detach,
its lease's end, its stream's end) shuts a bulk-only socket down, which fails a transfer blocked on it at once, and
a frames socket after the replies queued before its end and its BULK_END (`BulkLink.end`, END_GRACE at most).
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from gpupool import certrevoke, duplex, protocol, records, tls
from gpupool._proto import device_pb2, tensor_pb2
from gpupool.errors import InvalidArgument, Unavailable
from gpupool.peers import push_out, source_key

from . import bulk

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 5.0  # seconds from a connection's arrival to its hello (TLS handshake included)
# A bound socket's transfers wait as long as its peer is alive, however long it does not read or write (a client
# stopped by Ctrl-Z, a debugger, a sleeping laptop): the kernel tells a dead peer from a paused one
# (`duplex.keep_alive`). A peer silent for PEER_IDLE s is probed every PEER_INTERVAL s, and PEER_PROBES unanswered
# probes end the connection, and so its session; a paused process's kernel answers for it.
# A suspended host (a closed laptop lid) answers nothing, like a dead one: 3 minutes of grace for it, which is also
# how long a vanished host's session holds its worker and memory (or until its lease ends, if sooner: a client
# away cannot renew it).
PEER_IDLE = 60.0
PEER_INTERVAL = 20.0
PEER_PROBES = 6
# A session closed while its frames socket is open (a Detach, its lease's end) keeps the socket this long at most for
# the replies queued before its end and its BULK_END (its stream's writer sends them, then closes it): a client that
# does not read them meanwhile (paused, gone) loses them, and the socket closes.
END_GRACE = 5.0
# Seconds a frames socket is kept after its BULK_END while the client still sends (`BulkLink.linger`): its bytes
# are read and dropped meanwhile, so that the close does not reset the connection under the replies before the end.
LINGER = 2.0
MAX_PENDING = 64  # connections not yet bound to a session, in all; a newcomer past it pushes out the busiest
MAX_PENDING_PER_SOURCE = 8  # source's oldest; ... and per source address, a newcomer pushing out its own oldest
SIDE_MIN = bulk.SIDE_MIN  # download chunks at least this large go on the socket; smaller ones stay on the stream
FRAME_STEP = records.STEP  # a frame's first buffer on a frames socket; it doubles as the frame's bytes arrive
# A frames socket reads frames of REUSE_MIN to REUSE_MAX bytes (a captured step's batch in its Upload or RunGraph, up
# to the client's ~1 MiB frame cut and a few replays held with it) into buffers of its own, kept and reused from
# frame to frame (`BulkLink.recv_frame`), at most FRAME_BUFFERS of them: a 512 KiB frame in fresh memory cost the
# reader its allocation, a page fault per 4 KiB (each several microseconds under the GPU host's gVisor), the
# buffer's growth copies and a last copy into a bytes object, every step. Smaller frames are read in one call into
# a small bytes object as before; larger ones, or any while every buffer is held, take fresh memory as before.
REUSE_MIN = 64 * 1024
REUSE_MAX = 2 * 1024 * 1024
FRAME_BUFFERS = 3
_SID_MAX = 128


class _BadHello(ValueError):
    """A gpupool hello (its magic right) whose header is malformed (a session id longer than any): answered with an
    error, as an unknown session is, before the socket closes (until round 33 it was closed without a word)."""


class BulkLink:
    """A session's bound side socket. The stream's reader reads uploads from it, the stream's writer sends
    downloads on it, both through gpupool/duplex.py: a non-blocking socket and a lock held for non-blocking calls
    only, never while waiting, so neither direction waits for the other (round 24: a lock held across `sendall`
    deadlocked a client uploading and downloading from two threads until a stall limit ended the session)."""

    def __init__(self, sock: socket.socket, session_number: int, frames: bool = False) -> None:
        self.sock = sock
        self.number = session_number
        self.lock = threading.Lock()
        self.closed = False
        self.frames = frames  # the session's frames travel here too (hello BULK_HELLO_FRAMES), not on its stream
        self.gets: set[int] = set()  # request ids of bulk Gets whose last chunk has not gone out yet
        # the client's records, read through a buffer of the link's own (a small frame in one read: `records.Reader`)
        self.reader = records.Reader(sock, self.lock)
        # the frame buffers `recv_frame` reuses: one is free when no view of it is alive (its reference count: the
        # frame `recv_frame` returned and every span of it, queued or running, hold it through their shared buffer)
        self._frame_bufs = [bytearray() for _ in range(FRAME_BUFFERS)]

    def recv_frame(self, limit: int) -> bytes | memoryview | None:
        """The next ClientFrame's bytes on a frames socket; None when the client closed the socket between frames
        (or the daemon did). The header must be a BULK_FRAME record of 1 to `limit` bytes (the gRPC stream's
        message limit): the length is checked before a byte of the frame is read or held, and the frame's buffer
        grows with what arrives (gpupool/records.py). Waits as long as the peer is alive (`keep_alive`).

        A frame of REUSE_MIN to REUSE_MAX bytes comes as a view of one of the link's frame buffers that no view
        holds any more (`_frame_buf`), every byte of it read for this frame (the buffer is this session's, and
        what lies past the frame is never handed out); where all are held, in fresh memory as bytes."""
        try:
            got = self.reader.record()
        except EOFError:
            raise Unavailable(
                f"side socket of session {self.number} closed in the middle of a frame's header"
            ) from None
        except (OSError, ValueError) as exc:
            if self.closed:
                return None
            raise Unavailable(f"side socket of session {self.number}: {_why(exc)}") from None
        if got is None:
            return None
        kind, ident, offset, n, body = got
        if kind != protocol.BULK_FRAME or ident or offset or not 0 < n <= limit:
            raise InvalidArgument(
                f"side socket of session {self.number}: expected a frame record (kind {protocol.BULK_FRAME}, id 0, "
                f"offset 0, 1 to {limit} bytes), got kind {kind}, id {ident}, offset {offset}, length {n}"
            )
        if body is not None:  # (a small frame: it came whole with its header, in one read)
            return body
        buf = self._frame_buf(n)
        try:
            if buf is not None:
                return self.reader.body_into(n, None, buf)
            return self.reader.body(n, None)
        except EOFError:
            raise Unavailable(f"side socket of session {self.number} closed in the middle of a frame") from None
        except (OSError, ValueError) as exc:
            raise Unavailable(f"side socket of session {self.number}: {_why(exc)}") from None

    def _frame_buf(self, n: int) -> bytearray | None:
        """A frame buffer for a frame of `n` bytes that nothing refers to but the link (no frame, span or view of
        it alive: it may be overwritten and resized), or None: `n` outside REUSE_MIN..REUSE_MAX, or all are held."""
        if not REUSE_MIN <= n <= REUSE_MAX:
            return None
        for buf in self._frame_bufs:
            # held by the list, `buf` and getrefcount's argument only: no view of it anywhere
            if sys.getrefcount(buf) <= 3:
                return buf
        return None

    def ready(self) -> bool:
        """Whether bytes of a next record are already here (read, decrypted in TLS's buffer, or in the kernel's), so
        that the frame reader may read on without waiting for its client first (`DeviceServicer.read_side` then runs
        the frames it read as one slice). True too for a socket closed or broken: the next read says which.

        Asked by reading what is there without waiting, into the reader's buffer (`records.Reader.peek`), not by a
        poll: where it is there (a client running ahead) that read is the one the next frame needed anyway, so a
        frame read on costs no system call more; where it is not, the next `recv_frame` waits for the socket without
        first reading again (round 33: a poll a frame less, and a read a round trip less). A buffered TLS socket
        (`tls.SideSocket.held`) that holds no byte of the client's is not read at all (round 40: that read went to
        the kernel and met EAGAIN each synced frame): the answer is False. Bytes that reach the kernel after the
        frame's own read are then found by that wait (which returns at once) instead of here: the frames before them
        run as one slice a frame sooner, nothing is left unread."""
        return self.reader.peek()

    def send_frame(self, frame: bytes) -> None:
        """A reply frame (ServerFrame bytes) as a record on a frames socket; waits while the client is alive and
        not reading (`keep_alive`); Unavailable when it cannot go."""
        try:
            duplex.send_all(self.sock, self.lock, [protocol.frame_record(frame)], None)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"side socket of session {self.number}: sending a reply failed: {_why(exc)}") from None

    def send_now(self, record: bytes) -> int:
        """Send what of a record the socket takes without waiting (in duplex.send_all's slices, so that the writer
        goes on from where this stopped with the same slice: OpenSSL's retry rule); returns the bytes sent. A
        broken socket returns what was sent before: the writer, sending the rest, meets the error."""
        pos = 0
        with self.lock:
            try:
                if len(record) <= duplex.SLICE:  # (a reply: all of it in one call, no view)
                    pos = self.sock.send(record)
                if pos < len(record):
                    view = memoryview(record)
                    while pos < len(view):
                        pos += self.sock.send(view[pos : pos + duplex.SLICE])
            except (OSError, ValueError):  # (the SSL wants, BlockingIOError: OSErrors) the writer goes on
                pass
        return pos

    def send_raw(self, data: bytes, timeout: float | None = None, quiet: bool = False) -> None:
        """Bytes of the record stream as they are (`front.Unsent`: the rest of a reply written in part). `timeout`,
        `quiet`: as `send_end` (before a session's end: where the socket still takes them, no error)."""
        try:
            duplex.send_all(self.sock, self.lock, [data], timeout)
        except (OSError, ValueError) as exc:
            if quiet:
                return
            raise Unavailable(f"side socket of session {self.number}: sending a reply failed: {_why(exc)}") from None

    def send_end(self, code: int, reason: str) -> None:
        """The session's end on a frames socket (its status code's number and reason), where the socket still
        takes it; the same status ends the gRPC stream."""
        text = reason.encode()[: protocol.BULK_END_BYTES]
        try:
            head = protocol.BULK_HEAD.pack(protocol.BULK_END, code, 0, len(text))
            duplex.send_all(self.sock, self.lock, [head, text], 1.0)
        except (OSError, ValueError):
            pass  # the client is gone or not reading: the stream's status still says it

    def recv_upload(self, up: device_pb2.Upload, place: Callable[[int], memoryview | None] | None = None) -> memoryview:
        """The canonical span (`protocol.upload_head` + data) of an Upload whose `bulk_bytes` follow on the
        socket: the bytes are read straight into it. `place(size)`: where the span goes (the session worker's
        upload slot, `ProcessRunner.upload_span`), or None: new memory. A short or wrong read raises, and the
        span, never handed on, is nobody's."""
        n = up.bulk_bytes
        small = device_pb2.Upload(handle=up.handle, offset=up.offset, last=up.last)
        if up.HasField("meta"):
            small.meta.CopyFrom(up.meta)
        head = protocol.upload_head(small, n)
        span = place(len(head) + n) if place is not None else None
        if span is None:
            span = memoryview(bytearray(len(head) + n))
        span[: len(head)] = head
        want = (protocol.BULK_UPLOAD, up.handle, up.offset, n)
        try:
            got = self.reader.transfer(want, span[len(head) :], None)
        except EOFError:
            raise Unavailable(f"bulk socket of session {self.number} closed in the middle of an upload") from None
        except (OSError, ValueError) as exc:
            raise Unavailable(f"bulk socket of session {self.number}: {_why(exc)}") from None
        if got is not None:
            raise InvalidArgument(
                f"bulk socket of session {self.number}: expected an upload of {n} bytes for handle {up.handle} "
                f"at offset {up.offset} (kind, id, offset, length = {want}), got {got}"
            )
        return span

    def send_download(self, request_id: int, offset: int, data: memoryview) -> None:
        head = protocol.BULK_HEAD.pack(protocol.BULK_DOWNLOAD, request_id, offset, len(data))
        try:  # (the stream's one writer sends downloads: header and bytes stay together)
            duplex.send_all(self.sock, self.lock, [head, data], None)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"bulk socket of session {self.number}: sending a download failed: {_why(exc)}") from None

    def end(self) -> None:
        """The session closed: a frames socket stays open for its stream's writer, which sends what was queued before
        the end, then the BULK_END, then closes it (`DeviceServicer._reply_side`), and is closed after END_GRACE
        in any case (a client that does not read, a stream already gone); any other socket is closed now (its
        transfers are moot: GPBULK1 has no end record, its session's stream says it)."""
        if not self.frames:
            self.close()
            return
        if self.closed:  # its writer sent the end already (an error ended the session)
            return
        timer = threading.Timer(END_GRACE, self.close)
        timer.daemon = True
        timer.start()

    def linger(self) -> None:
        """Close a frames socket after its BULK_END without losing what was sent before it (`duplex.linger_close`:
        the write side shut, what the client still sends read and dropped for LINGER s at most, then the close,
        in a thread of its own). Until round 34 the writer closed it at once: where the client had sent bytes the
        daemon never read (behind a frame that ended the session), the close reset the connection, and the reset
        dropped the replies and the BULK_END the kernel had not yet delivered."""
        self.closed = True
        duplex.linger_close(self.sock, self.lock, LINGER)

    def close(self) -> None:
        """Stop the socket now (a transfer blocked on it fails at once) and close it once no call is using it
        (`duplex.close`)."""
        self.closed = True
        duplex.close(self.sock, self.lock)


def _why(exc: BaseException) -> str:
    """What broke a bound socket, in words: the kernel's verdict on a peer that stopped answering its probes says
    so (`keep_alive`)."""
    if isinstance(exc, TimeoutError) or getattr(exc, "errno", None) == errno.ETIMEDOUT:
        return (
            f"its peer stopped answering (TCP keepalive: {PEER_PROBES} probes {PEER_INTERVAL:.0f} s apart after "
            f"{PEER_IDLE:.0f} s of silence): {exc}"
        )
    return str(exc)


class ChunkParts:
    """A download chunk frame as the worker writes it: request id, chunk fields, and a view of its data."""

    __slots__ = ("data", "last", "meta", "offset", "request_id")

    def __init__(self, request_id: int, meta: bytes | None, offset: int, data: memoryview, last: bool) -> None:
        self.request_id, self.meta, self.offset, self.data, self.last = request_id, meta, offset, data, last

    def announce(self) -> bytes:
        """The stream's part: the same chunk with `bulk_bytes` instead of its data."""
        chunk = device_pb2.TensorChunk(offset=self.offset, last=self.last, bulk_bytes=len(self.data))
        if self.meta is not None:
            chunk.meta.CopyFrom(tensor_pb2.TensorMeta.FromString(self.meta))
        return device_pb2.ServerFrame(request_id=self.request_id, chunk=chunk).SerializeToString()


def request_id(frame: bytes) -> int:
    """The request id of a reply frame (its first field, as protobuf writes it), 0 when it has none."""
    try:
        return protocol.read_varint(memoryview(frame), 1, len(frame))[0] if frame[:1] == b"\x08" else 0
    except ValueError:
        return 0


def chunk_parts(frame: bytes) -> ChunkParts | None:
    """The parts of a chunk frame in the shape `protocol.chunk_frame` writes (request id, then one TensorChunk
    of meta, offset, data, last, each at most once); None for any other frame (it goes out unchanged)."""
    view = memoryview(frame)
    try:
        rid, i = protocol.read_varint(view, 1, len(view)) if frame[:1] == b"\x08" else (0, 0)
        if i >= len(view) or view[i] != 0x1A:
            return None
        length, i = protocol.read_varint(view, i + 1, len(view))
        if i + length != len(view):
            return None
        meta, offset, data, last, seen = None, 0, view[0:0], False, set()
        while i < len(view):
            tag, i = protocol.read_varint(view, i, len(view))
            if tag in seen or tag not in (0x0A, 0x10, 0x1A, 0x20):
                return None
            seen.add(tag)
            if tag in (0x10, 0x20):
                value, i = protocol.read_varint(view, i, len(view))
                if tag == 0x10:
                    offset = value
                else:
                    last = bool(value)
                continue
            n, i = protocol.read_varint(view, i, len(view))
            if i + n > len(view):
                return None
            if tag == 0x0A:
                meta = bytes(view[i : i + n])
            else:
                data = view[i : i + n]
            i += n
        return ChunkParts(rid, meta, offset, data, last)
    except ValueError:
        return None


def outgoing(link: BulkLink | None, frame: bytes) -> tuple[bytes, ChunkParts | None]:
    """What the stream sends for a reply frame, and the chunk whose data then follows on the side socket."""
    if link is None or not link.gets or not isinstance(frame, bytes):
        return frame, None
    parts = chunk_parts(frame)
    if parts is None:
        link.gets.discard(request_id(frame))  # an error answered the Get: nothing more comes for it
        return frame, None
    if parts.request_id not in link.gets:
        return frame, None
    if parts.last:
        link.gets.discard(parts.request_id)
    if len(parts.data) < SIDE_MIN:
        return frame, None
    return parts.announce(), parts


class _Pending:
    """A connection not yet bound to a session: its socket's descriptor (shut down to push it out), its source,
    when its hello is due (monotonic)."""

    __slots__ = ("due", "fd", "source")

    def __init__(self, fd: int, source: str, due: float) -> None:
        self.fd, self.source, self.due = fd, source, due

    def kick(self) -> None:
        """End the connection's handshake now: its hello thread's read fails, and that thread closes it (the
        descriptor is open while the connection is pending: the thread takes it off the pending list before
        closing it, and nothing closes it earlier: `_hello` does the TLS handshake by hand for that)."""
        try:
            with socket.socket(fileno=os.dup(self.fd)) as dup:
                dup.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


SessionLookup = Callable[[], Iterable[Any]]  # the open sessions (FrontSession: session_id, bind_bulk, number)


class BulkPort:
    """The side port's listener: authenticates connections and binds each to its session."""

    def __init__(self, address: tuple[str, int], tls_config: tls.TlsConfig, sessions: SessionLookup) -> None:
        self._sessions = sessions
        self._tls = None if tls_config.insecure else tls.SocketServerTls(tls_config)
        self.revoked: certrevoke.RevokedCerts | None = None  # the daemon's revoked client certificates (app.py)
        if tls_config.insecure:
            log.warning("the bulk side port serves PLAINTEXT (--insecure): tensor bytes cross the network readable")
        # an IPv6 address listens on IPv6 ("::": IPv4 too, as the gRPC port's "[::]" does); until round 42 every
        # address was bound as IPv4, so `--bulk-listen [::]:PORT` (and `gpupool up --listen [::]:PORT`) stopped the
        # daemon at its start
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        dual = address[0] == "::" and socket.has_dualstack_ipv6()
        self._sock = socket.create_server(address, family=family, backlog=64, dualstack_ipv6=dual)
        self.port: int = self._sock.getsockname()[1]
        # The accept loop also pushes out connections past their hello's due time: it waits in `accept` until the
        # first pending one is due, and without a pending one, blocked until a connection comes or `stop` shuts the
        # socket (until round 45 it woke every 0.25 s, a TimeoutError each: ~9.6k instructions a wake, an idle
        # daemon's ~40k a second)
        self._sock.settimeout(None)
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []  # in arrival order
        self._stopped = False
        self._warned_at = 0.0
        # The reader of a frames socket (service.DeviceServicer.read_side), run by its hello thread once bound;
        # None: the daemon takes no frames on its side sockets (a hello asking for it is refused)
        self.frames: Callable[[Any, BulkLink], None] | None = None
        self._thread = threading.Thread(target=self._accept, name="gpupool-bulk-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _accept(self) -> None:
        wait: float | None = None  # the listening socket's timeout now (None: blocking)
        while not self._stopped:
            due = self._first_due()
            if due != wait:
                wait = due
                self._sock.settimeout(due)
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                self._expire()
                continue
            except OSError:
                if self._stopped:
                    return
                continue
            conn.settimeout(HELLO_TIMEOUT)
            # counted by source as the gRPC port's slow calls are (`peers.source_key`): an IPv6 peer by its /64,
            # which one host holds whole (by its own address it could take every pending place), an IPv4-mapped one
            # as its IPv4 address
            pending = _Pending(conn.fileno(), source_key(str(addr[0])), time.monotonic() + HELLO_TIMEOUT)
            self._admit(pending)
            threading.Thread(target=self._hello, args=(conn, pending), name="gpupool-bulk-hello", daemon=True).start()

    def _admit(self, new: _Pending) -> None:
        """Count a new connection; past a cap, push out its source's oldest or the busiest source's oldest."""
        self._expire()
        with self._lock:
            out = push_out([p.source for p in self._pending], new.source, MAX_PENDING_PER_SOURCE, MAX_PENDING)
            if out is not None:
                victim = self._pending.pop(out[0])
                victim.kick()
                now = time.monotonic()
                if now - self._warned_at > 10.0:  # a flood of connections must not flood the log
                    self._warned_at = now
                    log.warning(
                        "bulk port: %d connections not yet authenticated; one from %s pushed out by one from %s",
                        len(self._pending) + 1,
                        victim.source,
                        new.source,
                    )
            self._pending.append(new)

    def _first_due(self) -> float | None:
        """Seconds until the first pending connection's hello is due (at least 10 ms), None while none is pending
        (`_accept` then waits for a connection alone: only its own thread adds pending connections)."""
        with self._lock:
            if not self._pending:
                return None
            due = min(p.due for p in self._pending)
        return max(0.01, due - time.monotonic())

    def _expire(self) -> None:
        """Push out the connections whose hello is overdue."""
        now = time.monotonic()
        with self._lock:
            late = [p for p in self._pending if p.due <= now]
            for p in late:
                self._pending.remove(p)
                p.kick()

    def _hello(self, conn: socket.socket, pending: _Pending) -> None:
        sock: socket.socket = conn
        source = pending.source
        bound = False
        owner: BulkLink | None = None  # the link a session holds (bound): it closes the socket, not this thread
        der: bytes | None = None  # the client's certificate, where the daemon sees them (`revoked` set)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                # The handshake by hand: wrap_socket's own closes the descriptor when it fails, while the
                # connection is still pending, and a kick (`_Pending.kick`, the descriptor's number) could then
                # shut down whatever socket of the daemon's took that number (a client's gRPC connection). The
                # descriptor stays open until `finally` has taken the connection off the pending list.
                sock = self._tls.context().wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                sock.do_handshake()
                der = sock.getpeercert(binary_form=True) if self.revoked is not None else None
                gone = self.revoked.refused_der(der) if self.revoked is not None and der else ""
                if gone:  # (round 45: the scheduler's list, as on the gRPC port)
                    raise ValueError(f"client certificate {gone} is revoked")
            head = protocol.recv_exact(sock, len(protocol.BULK_HELLO) + 2, "connection closed during the hello")
            magic = head[: len(protocol.BULK_HELLO)]
            frames = magic == protocol.BULK_HELLO_FRAMES
            if magic != protocol.BULK_HELLO and not (frames and self.frames is not None):
                raise ValueError("not a gpupool bulk hello")  # not a gpupool client: closed without a word
            (n,) = struct.unpack("<H", head[len(protocol.BULK_HELLO) :])
            if n > _SID_MAX:
                raise _BadHello(f"session id of {n} bytes: at most {_SID_MAX}")
            given = protocol.recv_exact(sock, n, "connection closed during the hello")
            with self._lock:  # no longer pending: never pushed out once bound
                if pending not in self._pending:
                    raise ValueError("pushed out before its hello was read")
                self._pending.remove(pending)
            s = self._find(given)
            if s is None:
                sock.sendall(protocol.bulk_error("unknown or closed session"))
                raise ValueError("unknown or closed session")
            if self.revoked is not None and s.cert_pem is not None and der != s.cert_der:
                # (round 46: the session's id is no bearer credential for another certificate, as on the gRPC port)
                sock.sendall(protocol.bulk_error(f"session {s.number} was attached with another client certificate"))
                raise ValueError(f"session {s.number} was attached with another client certificate")
            link = BulkLink(sock, s.number, frames)
            # Bound, the link is the session's: another thread may write on it at once (a Detach's or the lease's
            # end: the stream's writer sends the BULK_END and closes it; a bulk Get's download). Its lock is held
            # until the BULK_OK is out and the socket is non-blocking, so that nothing goes before the BULK_OK and
            # no two threads are in OpenSSL on one connection (until round 34 the BULK_OK went without the lock: a
            # writer's SSL_write could run beside it, and a close in between could close the descriptor under it).
            with link.lock:
                if not s.bind_bulk(link):
                    why = "already has a bulk socket (one per session)"
                    if frames and s.carrier == "stream":
                        why = "sends its frames on its stream (one carrier per session)"
                    sock.sendall(protocol.bulk_error(f"session {s.number} {why}"))
                    raise ValueError(f"session {s.number} {why}")
                owner = link
                sock.settimeout(HELLO_TIMEOUT)
                sock.sendall(protocol.BULK_OK)
                duplex.keep_alive(sock, PEER_IDLE, PEER_INTERVAL, PEER_PROBES)
                sock.setblocking(False)  # from now on gpupool/duplex.py waits, with the lock released
                if isinstance(sock, tls.SideSocket):
                    sock.buffer()  # its records in few system calls each way (`tls.SideSocket`)
            bound = True
            log.info("session %d: %s socket from %s bound", s.number, "frames" if frames else "bulk", source)
            if frames and self.frames is not None:
                threading.current_thread().name = f"gpupool-side-{s.number}"
                self.frames(s, link)  # this thread reads the session's frames until the socket or session ends
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.info("bulk port: connection from %s refused: %s", source, exc)
            if isinstance(exc, _BadHello):  # answered as the protocol says (gpupool/protocol.py BULK_OK)
                try:
                    sock.sendall(protocol.bulk_error(str(exc)))
                except OSError:
                    pass
        finally:
            with self._lock:
                if pending in self._pending:
                    self._pending.remove(pending)
            if owner is not None and not bound:  # bound, but its BULK_OK failed: closed as the session's link
                owner.close()
            elif not bound:
                sock.close()

    def _find(self, given: bytes) -> Any:
        """The open session whose id is `given`, compared in constant time with every session's."""
        found = None
        for s in self._sessions():
            if hmac.compare_digest(s.session_id.encode(), given) and not s.closed:
                found = s
        return found
