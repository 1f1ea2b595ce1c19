"""The client's end of the bulk side channel (docs/wire.md; the daemon's is server/bulkside.py).

`connect` opens a session's one socket to the port `AttachReply.bulk_port` names, at the host the session's
address dialled: TLS with the GPUPOOL_TLS_* settings of the gRPC channel (the same CA, client certificate and
server name), plaintext only when the client is configured insecure; then `protocol.bulk_hello` with the
session id, and the daemon's answer. Where the port is absent (an old daemon, or the daemon runs without
`--bulk-listen`) or cannot be reached, it returns None and the session sends everything on its stream, as
before; an unreachable port is said once per daemon address in a log line.

`BulkSocket.send_upload` writes a chunk's header and bytes from the tensor's memory (no copy);
`BulkSocket.recv_download` reads a chunk straight into the download's tensor. Uploads (a user's thread) and
downloads (the thread reading the session's replies) share the TLS connection through gpupool/duplex.py: the
socket is non-blocking and a lock is held for one call at a time, never while waiting, so an upload and a download
of one session from two threads move at once (round 24: a lock held across `sendall` deadlocked them into the
daemon's `IO_TIMEOUT`).

A transfer waits as long as the daemon is alive, with no limit of its own (round 28; the daemon's end since round
27): a daemon that does not read for a while (its session's queue full behind a long kernel, a daemon stopped at a
debugger) is waited for, and one that is gone is found by the kernel's TCP keepalive (`PEER_*`, as the daemon's
`bulkside.PEER_*`: `duplex.keep_alive`), a killed one's kernel closes the socket at once, and a session that ends
(its stream's end, `Session.close`) closes the socket, which fails a transfer blocked on it. Until round 28 60 s
without a byte moving (`IO_TIMEOUT`) failed the transfer, and so the session, of a daemon that was only busy.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading

from gpupool import duplex, protocol, records, tls
from gpupool.config import split_address
from gpupool.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds to connect, shake hands and be bound
# A bound socket's transfers wait as long as the daemon is alive: after PEER_IDLE s of silence the kernel probes it
# every PEER_INTERVAL s, and PEER_PROBES unanswered probes end the connection (about 3 minutes: a suspended daemon
# host answers nothing, like a dead one), as the daemon's end does (server/bulkside.py).
PEER_IDLE = 60.0
PEER_INTERVAL = 20.0
PEER_PROBES = 6
_CLOSED = "the daemon closed the bulk socket"
MIN_UPLOAD = 1024 * 1024  # uploads of at least this many bytes take the side socket
MAX_REPLY_BYTES = 64 * 1024 * 1024  # the largest reply record read (the stream's receive limit, session.py)
CHUNK = protocol.CHUNK_BYTES  # bytes per Upload command (each a canonical upload the daemon's worker copies once)
_warned: set[str] = set()
_NOTHING = memoryview(b"")  # what `send_frame_now` has left to send when all of it went
_RECORD_LIMIT = {protocol.BULK_FRAME: MAX_REPLY_BYTES, protocol.BULK_END: protocol.BULK_END_BYTES}  # recv_record's


class BulkSocket:
    def __init__(self, sock: socket.socket, frames: bool = False) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.frames = frames  # the session's frames travel here (hello BULK_HELLO_FRAMES), not on its stream
        self.reader = records.Reader(sock, self.lock)  # the daemon's records (a small reply in one read)

    def send_frame(self, frame: bytes) -> None:
        """A ClientFrame's bytes as a record (`protocol.frame_record`); a full socket (the daemon's queue is full)
        blocks here: the stream's back-pressure."""
        # (a big frame, a batch's upload, goes as its header and its own bytes, not joined into a new record: a copy
        # and the fresh pages of one less, the records copied into the TLS socket's write buffer either way)
        record: list[memoryview | bytes] = (
            [protocol.frame_head(len(frame)), frame]
            if len(frame) >= tls.BUFFERED_MIN
            else [protocol.frame_record(frame)]
        )
        try:
            duplex.send_all(self.sock, self.lock, record, None)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"side socket: sending a frame failed: {exc}") from None

    def send_frame_now(self, frame: bytes) -> memoryview:
        """`send_frame` without waiting: what the socket takes now of the frame's record goes; returns the rest
        (empty: all of it went), which `send_rest` writes next, before any other record."""
        record = protocol.frame_record(frame)
        try:
            sent = duplex.send_some(self.sock, self.lock, record)
            return _NOTHING if sent == len(record) else memoryview(record)[sent:]
        except (OSError, ValueError) as exc:
            raise Unavailable(f"side socket: sending a frame failed: {exc}") from None

    def send_rest(self, rest: memoryview) -> None:
        """The rest of a record `send_frame_now` began (blocks while the socket is full)."""
        try:
            duplex.send_all(self.sock, self.lock, [rest], None)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"side socket: sending a frame failed: {exc}") from None

    def recv_record(self) -> tuple[int, int, bytes]:
        """The next record the daemon sent: (kind, id, body) of a BULK_FRAME (a ServerFrame's bytes) or a
        BULK_END (id: the status code's number, body: the reason); Unavailable when the socket closed or broke
        first. Waits without a limit while the daemon is alive (a reply can take as long as the work before it; a
        lost daemon ends the gRPC stream, whose callback closes this socket, and the kernel's keepalive finds a
        gone one: `PEER_*`)."""
        try:
            got = self.reader.record()
            if got is None:
                raise Unavailable(_CLOSED)
            kind, ident, _, n, body = got
            # a reply frame up to the stream's limit; the session's end, a reason of a few words (nothing of a
            # longer one is read or held beyond what came with its header); no other kind
            if n > _RECORD_LIMIT.get(kind, -1):
                raise InvalidArgument(f"side socket: expected a frame record, got kind {kind} of {n} bytes")
            return kind, ident, body if body is not None else self.reader.body(n, None)
        except EOFError:
            raise Unavailable("side socket closed by the daemon in the middle of a record") from None
        except ValueError as exc:  # the socket was closed here
            raise Unavailable(f"side socket: {exc}") from None
        except OSError as exc:
            raise Unavailable(f"side socket: receiving a frame failed: {exc}") from None

    def send_upload(self, handle: int, offset: int, data: memoryview) -> None:
        head = protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, handle, offset, len(data))
        try:  # (the header and its bytes go together: one upload at a time, the session's lock)
            duplex.send_all(self.sock, self.lock, [head, data], None)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"bulk socket: sending an upload failed: {exc}") from None

    def send_chunk(self, frame: bytes, handle: int, offset: int, data: memoryview) -> None:
        """A bulk upload's chunk where the frames use this socket: its Upload command's frame as a record, then its
        bytes as `send_upload`'s (one write of both, by the session's sender: `Session._upload_side`)."""
        head = protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, handle, offset, len(data))
        try:
            duplex.send_all(self.sock, self.lock, [protocol.frame_record(frame), head, data], None)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"bulk socket: sending an upload failed: {exc}") from None

    def recv_download(self, request_id: int, offset: int, into: memoryview) -> None:
        """Read a download chunk's header (it must be the one the stream announced) and its bytes into `into`."""
        want = (protocol.BULK_DOWNLOAD, request_id, offset, len(into))
        try:
            got = self.reader.transfer(want, into, None)
        except EOFError:
            raise Unavailable("bulk socket closed by the daemon") from None
        except (OSError, ValueError) as exc:
            raise Unavailable(f"bulk socket: receiving a download failed: {exc}") from None
        if got is not None:
            raise InvalidArgument(f"bulk socket: expected download chunk {want}, got {got}")

    def close(self) -> None:
        """Stop the socket now (a transfer blocked on it fails at once) and close it once no call is using it."""
        duplex.close(self.sock, self.lock)


def connect(address: str, port: int, session_id: str, server_name: str = "", frames: bool = False) -> BulkSocket | None:
    """The session's side socket, or None (its transfers then use the stream): see the module's docstring.
    `frames`: ask for the session's frames to travel on it too (only where the daemon names
    `protocol.FEATURE_SIDE_FRAMES`)."""
    if not port:
        if address not in _warned:
            _warned.add(address)
            log.info("daemon %s has no bulk side port; transfers use the stream", address)
        return None
    host, _ = split_address(address)
    sock: socket.socket | None = None
    try:
        ctx = tls.socket_client_context()
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname=server_name or host)
        sock.sendall(protocol.bulk_hello(session_id, frames))
        answer = protocol.recv_exact(sock, 1, _CLOSED)
        if answer != protocol.BULK_OK:
            (n,) = struct.unpack("<H", protocol.recv_exact(sock, 2, _CLOSED))
            raise ValueError(protocol.recv_exact(sock, n, _CLOSED).decode(errors="replace"))
        duplex.keep_alive(sock, PEER_IDLE, PEER_INTERVAL, PEER_PROBES)  # a gone daemon fails a transfer's wait
        sock.setblocking(False)  # gpupool/duplex.py waits with the lock released
        if isinstance(sock, tls.SideSocket):
            sock.buffer()  # its records in few system calls each way (`tls.SideSocket`)
        return BulkSocket(sock, frames)
    except (OSError, ssl.SSLError, ValueError, InvalidArgument) as exc:
        if sock is not None:
            sock.close()
        if address not in _warned:
            _warned.add(address)
            log.warning("daemon %s: bulk side port %d not usable (%s); transfers use the stream", address, port, exc)
        return None
