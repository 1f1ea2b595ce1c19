"""The side socket's records as both ends read them (docs/wire.md: `protocol.BULK_HEAD`, then `length` bytes): the
daemon's frame reader (server/bulkside.py `BulkLink.recv_frame`) and the client's reply reader (client/bulk.py
`BulkSocket.recv_record`). Each end keeps its own rules (which kinds, how long) and its own words for a failure;
what they share is how a record comes off the socket (`Reader`, through gpupool/duplex.py: the session's lock held
one call at a time).

Failures, for the caller to name: `EOFError` when the peer closed in the middle of a record, `TimeoutError` (an
OSError) when `timeout` passed without a byte moving, another OSError or ValueError when the socket broke or was
closed at this end.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any

from gpupool import duplex, protocol

STEP = 64 * 1024  # a record's first buffer; it doubles as the record's bytes arrive (`Reader.body`)
READ_BUFFER = 64 * 1024  # a socket's read buffer (`Reader`): a record's header and a small record's bytes
_HEAD = protocol.BULK_HEAD


class Reader:
    """A side socket's incoming records, read through a buffer of the reader's own (READ_BUFFER bytes, kept for the
    socket's life): each read takes what comes next, up to the buffer's room (a TLS socket's read returns at most
    one TLS record), so a small record (a synced step's frame or its reply: header and bytes in one TLS record)
    comes in one read, and its bytes are copied once, into the bytes object handed out (round 41, front41: until
    then a header's read, then the body's into a bytearray, then its copy to bytes: two reads and two copies a
    frame on each end). Bytes of a next record that came with it stay in the buffer for the next call; a record
    longer than what is buffered has its rest read straight into its destination (the frame's buffer, an upload's
    span, a download's tensor), never past its end.

    One thread reads at a time (the daemon's side reader; the client's thread that reads replies): the buffer is
    that thread's, the socket's lock is held one call at a time as gpupool/duplex.py does (a writer on another
    thread meanwhile). A wait for the socket never sleeps on bytes already here: where the buffer is empty and the
    socket is a buffered TLS one (`tls.SideSocket.held`), the bytes OpenSSL holds are asked for first (no system
    call), and where none are, the read waits for the socket instead of meeting EAGAIN first (a synced call's reply,
    or the next synced frame, is not there yet when the reader comes back for it)."""

    def __init__(self, sock: Any, lock: threading.Lock, size: int = READ_BUFFER) -> None:
        self.sock = sock
        self.lock = lock
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._pos = 0  # the buffer's unread bytes are [_pos, _end)
        self._end = 0
        self.eof = False  # the peer closed the socket (met by `peek`): the next header is None
        self.drained = False  # nothing was there a moment ago (`peek`): the next read waits for the socket first
        self._held: Any = getattr(sock, "held", None)  # what a buffered TLS socket holds (no system call)
        self._poller: Any = None  # the socket's poll object for reading (`_recv`), made at the first wait

    def buffered(self) -> int:
        """Bytes read and not yet handed out."""
        return self._end - self._pos

    def _take(self, n: int) -> memoryview:
        start = self._pos
        self._pos += n
        return self._view[start : self._pos]

    def _fill(self, want: int, timeout: float | None, patient: bool = False) -> bool:
        """Read until `want` bytes (at most the buffer's size) are buffered; False when the peer closed first.
        `patient`: the first read waits without a limit where nothing is buffered (a header's first byte)."""
        if self._pos == self._end:
            self._pos = self._end = 0
        elif len(self._buf) - self._pos < want:  # (room for the record: what is buffered moves to the front)
            n = self._end - self._pos
            self._buf[:n] = self._buf[self._pos : self._end]  # (a copy first: the two may overlap)
            self._pos, self._end = 0, n
        wait, self.drained = self.drained, False
        held = self._held
        if not wait and held is not None and self._pos == self._end:
            with self.lock:  # (nothing of the peer's here at all, where TLS can say so without a system call)
                wait = held() == 0
        limit = None if patient and self._pos == self._end else timeout
        while self._end - self._pos < want:
            end = self._end
            got = self._recv(self._view[end:] if end else self._view, limit, wait)
            if not got:
                self.eof = True
                return False
            self._end += got
            wait, limit = False, timeout
        return True

    def _recv(self, view: memoryview, timeout: float | None, wait: bool) -> int:
        """Read what comes next into `view` (a byte view), at least one byte and at most len(view): one read where
        bytes are there (a TLS socket's read returns at most one record's); 0 when the peer closed. `wait`: nothing
        was there a moment ago: wait for the socket first. `timeout` as gpupool/duplex.py's. A wait to read polls the
        reader's own poll object, made at its first wait and kept for the socket's life (round 42, front42: a fresh
        one and its registration, duplex's way, cost a microsecond a wait)."""
        sock, lock = self.sock, self.lock
        while True:
            if wait:
                poller = self._poller
                if poller is None or sock.fileno() < 0:  # (a closed socket fails the wait at once)
                    poller = self._poller = duplex.poller(sock, True)
                if not poller.poll(None if timeout is None else timeout * 1000):
                    raise TimeoutError(f"no bytes moved for {timeout:.0f} s")
            with lock:
                try:
                    return int(sock.recv_into(view, len(view)))
                except ssl.SSLWantWriteError:
                    want_write = True
                except duplex.NOTHING_NOW:
                    want_write = False
            if want_write:  # (TLS wants to write before it reads on: a wait for the socket to take bytes)
                duplex.poll(duplex.poller(sock, False), timeout)
            wait = not want_write

    def peek(self) -> bool:
        """Whether bytes of a next record are here already (buffered, decrypted in TLS's buffer, or in the kernel's),
        read without waiting (into the buffer, for the next call); True too for a socket the peer closed (the next
        header is None) or one that broke (the next read says how). False: nothing is there, and the next read
        waits for the socket first instead of reading it again."""
        try:
            with self.lock:  # one OpenSSL call at a time (gpupool/duplex.py)
                if self._pos != self._end or self.eof:
                    return True
                held = self._held
                if held is not None and held() == 0:  # (TLS holds nothing either: no read to meet EAGAIN)
                    self.drained = True
                    return False
                self._pos = self._end = 0
                try:
                    got = self.sock.recv_into(self._view, len(self._buf))
                except duplex.NOTHING_NOW:
                    self.drained = True
                    return False
                if got:
                    self._end = got
                else:
                    self.eof = True
                return True
        except (OSError, ValueError):  # (SSLWantWriteError among them) the next read meets it
            return True

    def record(self) -> tuple[int, int, int, int, bytes | None] | None:
        """The next record in one call: its header (kind, id, offset, length) and, where all its bytes are here
        already, those bytes (else None: the caller checks the header, then reads them with `body` or `body_into`);
        None when the peer closed the socket between records. Waits without a limit, as `head(None)`. For a synced
        call's frame or reply (header and bytes in one TLS record, one read): `head` and `body` in one Python call,
        with no call past the read (round 42, front42). The bytes handed out here are at most a buffer's (they were
        read already), so a header the caller refuses commits nothing more."""
        pos = self._pos
        if pos == self._end and not self.eof:  # (the common case: nothing buffered, the record comes in one read)
            if not self._fill(_HEAD.size, None, patient=True):
                if self._pos == self._end:
                    return None
                raise EOFError("a record's header")
            pos = self._pos
        end = self._end
        if end - pos < _HEAD.size:
            got = self.head(None)
            if got is None:
                return None
            return (*got, None)
        kind, ident, offset, n = _HEAD.unpack_from(self._buf, pos)
        pos += _HEAD.size
        if end - pos >= n:
            self._pos = pos + n
            return kind, ident, offset, n, self._view[pos : pos + n].tobytes()
        self._pos = pos
        return kind, ident, offset, n, None

    def head(self, timeout: float | None) -> tuple[int, int, int, int] | None:
        """The next record's header (kind, id, offset, length); None when the peer closed the socket between
        records. Waits for its first byte without a limit (the next record may be far off: an idle session, a long
        step), then `timeout` at most without progress."""
        pos = self._pos
        if self._end - pos >= _HEAD.size:  # (here already: a record that came with the one before)
            self._pos = pos + _HEAD.size
            return _HEAD.unpack_from(self._buf, pos)  # type: ignore[no-any-return]
        if self.eof and pos == self._end:
            return None
        if not self._fill(_HEAD.size, timeout, patient=True):
            if self._pos == self._end:
                return None
            raise EOFError("a record's header")
        got: tuple[int, int, int, int] = _HEAD.unpack_from(self._buf, self._pos)
        self._pos += _HEAD.size
        return got

    def body(self, n: int, timeout: float | None) -> bytes:
        """A record's `n` bytes (its header already checked by the caller). A record that fits the buffer is read
        there and copied out once; a longer one is held as its bytes arrive, not as announced (a buffer of the
        announced length up front would let a peer commit `n` bytes of this end's memory with a header and one
        byte): it grows by doubling from STEP, so what is held stays under twice what was sent."""
        pos = self._pos
        if self._end - pos >= n:  # (the common case: it came with its header)
            self._pos = pos + n
            return bytes(self._view[pos : pos + n])
        if n <= len(self._buf):
            if not self._fill(n, timeout):
                raise EOFError("a record")
            return bytes(self._take(n))
        buf = bytearray(min(n, STEP))
        self._grow_into(buf, n, timeout)
        return bytes(buf)

    def body_into(self, n: int, timeout: float | None, buf: bytearray) -> memoryview:
        """`body`, read into `buf` (the caller's, reused from record to record: no fresh memory, no page faults and no
        final copy per record) instead of fresh memory: a view of its first `n` bytes, every one of them read from the
        socket for this record. `buf` must have no view alive (it may be resized); where it is shorter than `n` it
        grows as `body`'s buffer does, by doubling from its length (at least STEP) as the bytes arrive, so a header
        commits no memory beyond what `buf` already held. What lies past `n` in `buf` is never handed out, and the
        view is read-only."""
        if len(buf) < min(n, STEP):
            buf.extend(bytes(min(n, STEP) - len(buf)))
        self._grow_into(buf, n, timeout)
        return memoryview(buf)[:n].toreadonly()  # read-only, as a bytes object's views are

    def _grow_into(self, buf: bytearray, n: int, timeout: float | None) -> None:
        """A record's `n` bytes into the front of `buf`: what is buffered of them, then the rest straight from the
        socket, `buf` doubling (up to `n`) as they arrive."""
        got = self._drain_into(memoryview(buf)[: min(n, len(buf))])
        while got < n:
            if len(buf) <= got:
                buf.extend(bytes(min(n - got, got)))
            end = min(n, len(buf))
            if duplex.recv_into(self.sock, self.lock, memoryview(buf)[got:end], timeout) < end - got:
                raise EOFError("a record")
            got = end

    def _drain_into(self, into: memoryview) -> int:
        """Move what is buffered (at most len(into) bytes) to the front of `into`; returns how many."""
        k = min(len(into), self._end - self._pos)
        if k:
            into[:k] = self._take(k)
        return k

    def transfer(
        self, want: tuple[int, int, int, int], into: memoryview, timeout: float | None
    ) -> tuple[int, int, int, int] | None:
        """A bulk transfer's record (an upload's on the daemon, a download's on the client), whose header must be
        `want` (kind, id, offset, length: what the frame announced), its bytes read straight into `into` (what was
        buffered of them copied there); the header that came instead, with nothing more read, else None."""
        if not self._fill(_HEAD.size, timeout):
            raise EOFError("a transfer's header")
        got: tuple[int, int, int, int] = _HEAD.unpack_from(self._buf, self._pos)
        self._pos += _HEAD.size
        if got != want:
            return got
        into = into.cast("B") if into.format != "B" else into
        k = self._drain_into(into)
        if k < len(into) and duplex.recv_into(self.sock, self.lock, into[k:], timeout) < len(into) - k:
            raise EOFError("a transfer")
        return None
