"""The side socket's records as both ends read them (docs/wire.md: `protocol.BULK_HEAD`, then `length` bytes): the
daemon's frame reader (server/bulkside.py `BulkLink.recv_frame`) and the client's reply reader (client/bulk.py
`BulkSocket.recv_record`). Each end keeps its own rules (which kinds, how long) and its own words for a failure;
what they share is how a record comes off the socket (gpupool/duplex.py, the session's lock held one call at a
time).

Failures, for the caller to name: `EOFError` when the peer closed in the middle of a record, `TimeoutError` (an
OSError) when `timeout` passed without a byte moving, another OSError or ValueError when the socket broke or was
closed at this end.
"""

from __future__ import annotations

import threading
from typing import Any

from gpupool import duplex, protocol

STEP = 64 * 1024  # a record's first buffer; it doubles as the record's bytes arrive (`body`)


def head(
    sock: Any, lock: threading.Lock, buf: bytearray, timeout: float | None, have: int = 0, wait: bool = False
) -> tuple[int, int, int, int] | None:
    """The next record's header (kind, id, offset, length) read into `buf` (`protocol.BULK_HEAD.size` bytes); None
    when the peer closed the socket between records. Waits for the header's first byte without a limit (the next
    record may be far off: an idle session, a long step), then `timeout` at most without progress. `have`: bytes of
    the header already in `buf` (read ahead: server/bulkside.py `BulkLink.ready`); `wait`: nothing was there to read
    a moment ago (`duplex.recv_into`'s).

    Without a `timeout` the first byte and the rest wait alike, so the header is read in one call (round 40: a
    frame's header in one SSL_read, not two): nothing of it, the peer closed between records; a part, a short header."""
    view = memoryview(buf)
    if timeout is None:
        got = duplex.recv_into(sock, lock, view[have:], None, wait and not have)
        if not got and not have:
            return None
        if have + got < len(view):
            raise EOFError("a record's header")
        return protocol.BULK_HEAD.unpack(buf)
    if not have:
        if duplex.recv_into(sock, lock, view[:1], None, wait) == 0:
            return None
        have = 1
    if duplex.recv_into(sock, lock, view[have:], timeout) < len(view) - have:
        raise EOFError("a record's header")
    return protocol.BULK_HEAD.unpack(buf)


def body(sock: Any, lock: threading.Lock, n: int, timeout: float | None) -> bytes:
    """A record's `n` bytes (its header already checked by the caller). Held as they arrive, not as announced: a
    buffer of the announced length up front would let a peer commit `n` bytes of this end's memory with a header
    and one byte. It grows by doubling from STEP, so what is held stays under twice what was sent (a small record:
    one read)."""
    buf = bytearray(min(n, STEP))
    got = 0
    while got < n:
        if duplex.recv_into(sock, lock, memoryview(buf)[got:], timeout) < len(buf) - got:
            raise EOFError("a record")
        got = len(buf)
        if got < n:
            buf.extend(bytes(min(n - got, got)))
    return bytes(buf)


def body_into(sock: Any, lock: threading.Lock, n: int, timeout: float | None, buf: bytearray) -> memoryview:
    """`body`, read into `buf` (the caller's, reused from record to record: no fresh memory, no page faults and no
    final copy per record) instead of fresh memory: a view of its first `n` bytes, every one of them read from the
    socket for this record. `buf` must have no view alive (it may be resized); where it is shorter than `n` it grows
    as `body`'s buffer does, by doubling from its length (at least STEP) as the bytes arrive, so a header commits no
    memory beyond what `buf` already held. What lies past `n` in `buf` is never handed out, and the view is
    read-only."""
    got = 0
    if len(buf) < min(n, STEP):
        buf.extend(bytes(min(n, STEP) - len(buf)))
    while got < n:
        end = min(n, len(buf))
        if duplex.recv_into(sock, lock, memoryview(buf)[got:end], timeout) < end - got:
            raise EOFError("a record")
        got = end
        if got < n and len(buf) <= got:
            buf.extend(bytes(min(n - got, got)))
    return memoryview(buf)[:n].toreadonly()  # read-only, as a bytes object's views are


def transfer(
    sock: Any, lock: threading.Lock, want: tuple[int, int, int, int], into: memoryview, timeout: float | None
) -> tuple[int, int, int, int] | None:
    """A bulk transfer's record (an upload's on the daemon, a download's on the client), whose header must be `want`
    (kind, id, offset, length: what the frame announced), its bytes read straight into `into`; the header that came
    instead, with nothing more read, else None."""
    buf = bytearray(protocol.BULK_HEAD.size)
    if duplex.recv_into(sock, lock, memoryview(buf), timeout) < len(buf):
        raise EOFError("a transfer's header")
    got: tuple[int, int, int, int] = protocol.BULK_HEAD.unpack(buf)
    if got != want:
        return got
    if duplex.recv_into(sock, lock, into, timeout) < len(into):
        raise EOFError("a transfer")
    return None
