"""Both directions of one (TLS) socket from two threads: the bulk side socket's sends and receives (client/bulk.py,
server/bulkside.py).

A TLS connection is one OpenSSL object, which two threads must not use at once, so each end keeps a lock. Held
across a blocking `sendall`, that lock deadlocked a session whose two user threads uploaded and downloaded at once
(round 24): the client's upload waited for the daemon to read, the daemon's reader waited for its lock, held by its
writer, which waited for the client to read a download, whose reader waited for the client's lock, held by the
upload; nothing moved until the daemon's stall limit (then `IO_TIMEOUT`, 30 s) ended the session. Here the socket
is non-blocking and the lock is held for non-blocking calls only, at most SLICE bytes' worth at a time (one send;
the reads of the records already there, round 56), as a single-threaded event loop interleaves SSL_read and
SSL_write on one connection; a thread waits for its socket to be ready with the lock released, so the other
direction keeps moving.

`timeout`: seconds a transfer may go without moving a byte; then TimeoutError (an OSError); None: no limit, for a
socket whose dead peer the kernel finds (`keep_alive`: the daemon's end since round 27). The socket must be
non-blocking (`sock.setblocking(False)`) once the callers use these functions.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from typing import Any

# a non-blocking read's "nothing there now" (a read that would block; TLS wants the socket readable first)
NOTHING_NOW = (ssl.SSLWantReadError, BlockingIOError, InterruptedError)
SLICE = 1 << 20  # bytes per non-blocking send: the longest the lock is held for encrypting (about a millisecond)


def _wait(sock: Any, read: bool, timeout: float | None) -> None:
    """Until `sock` is readable (`read`) or writable, or TimeoutError after `timeout` s (None: no limit). `poll`,
    not `select`: a daemon serving many sessions has descriptors past select's 1024 (ValueError there)."""
    poll(poller(sock, read), timeout)


def poller(sock: Any, read: bool) -> Any:
    """A poll object for `sock`'s descriptor, readable (`read`) or writable; OSError for a closed socket. One kept
    for a socket's life (`records.Reader`) must be asked only while the socket is open (`fileno` >= 0): a closed
    socket's descriptor number may be another connection's."""
    fd = sock.fileno()
    if fd < 0:
        raise OSError("socket closed")
    got = select.poll()
    got.register(fd, (select.POLLIN if read else select.POLLOUT) | select.POLLERR | select.POLLHUP)
    return got


def poll(poller: Any, timeout: float | None) -> None:
    """Until `poller`'s socket is ready, or TimeoutError after `timeout` s (None: no limit)."""
    if not poller.poll(None if timeout is None else timeout * 1000):
        raise TimeoutError(f"no bytes moved for {timeout:.0f} s")


def close(sock: Any, lock: threading.Lock, wait: float = 0.1) -> None:
    """Stop `sock` now and close it: `shutdown` first (a transfer blocked on it, or waiting for it to be ready, fails
    at once), then `close` under `lock`, never under a call that uses the socket (its descriptor number could be
    reused by another connection in the middle of that call). Where the lock stays busy past `wait` s (a thread in
    the middle of one call: a TLS slice's encryption), a helper thread closes the socket the moment that call
    releases the lock, not the garbage collector at some later time (as before round 29).

    The shutdown is the kernel's alone (`socket.socket.shutdown`), never `ssl.SSLSocket.shutdown`, which first drops
    the socket's TLS object (`_sslobj = None`) and then shuts the descriptor down: a thread that took the lock
    between the two (a writer woken by its poll) found no TLS object, and `SSLSocket.send` then wrote its plaintext
    on the connection as it is (a reply's tensor bytes, readable on the network), `recv_into` read the peer's
    ciphertext as record bytes (until round 34). Here the TLS object stays until `close`, under the lock: a
    transfer meets the shut-down socket through OpenSSL and fails."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # (an SSLSocket's TLS object stays: see above)
    except OSError:
        pass
    if lock.acquire(timeout=wait):
        try:
            sock.close()
        finally:
            lock.release()
        return

    def close_when_released() -> None:
        with lock:
            sock.close()

    threading.Thread(target=close_when_released, name="gpupool-socket-close", daemon=True).start()


def linger_close(sock: Any, lock: threading.Lock, seconds: float) -> None:
    """Close `sock` after the last bytes this end sent, in a helper thread (the caller never waits): the kernel's
    shutdown of the write side first (a FIN behind what is queued), then what the peer still sends is read and
    dropped until it closes its end or `seconds` pass, then `close`. A plain close with unread bytes from the peer
    in the kernel's buffer resets the connection (RST), and the reset drops what this end had queued but the
    kernel had not yet delivered (the last replies, an end record): the peer never saw them."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)  # (an SSLSocket's TLS object stays: see `close`)
    except OSError:
        close(sock, lock)
        return

    def drain() -> None:
        deadline = time.monotonic() + seconds
        buf = memoryview(bytearray(1 << 16))
        try:
            while (left := deadline - time.monotonic()) > 0:
                want_write = False
                with lock:
                    try:
                        if not sock.recv_into(buf):
                            return  # the peer closed its end: all it sent was read, a close resets nothing
                        continue
                    except ssl.SSLWantWriteError:
                        want_write = True
                    except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                        pass
                if want_write:
                    return  # (TLS wants to write on a socket shut for writing: nothing more can come)
                _wait(sock, True, left)
        except (OSError, ValueError):
            pass  # the peer reset it, or `seconds` passed (TimeoutError): close it as it is
        finally:
            close(sock, lock)

    threading.Thread(target=drain, name="gpupool-socket-linger", daemon=True).start()


def send_all(sock: Any, lock: threading.Lock, views: list[memoryview | bytes], timeout: float | None) -> None:
    """Send every byte of `views`, in order (an error or TimeoutError leaves the connection unusable). `timeout`:
    None waits without a limit (the daemon's writer to a paused client: `keep_alive` finds a dead one). A buffered
    TLS socket (`tls.SideSocket`) writes the views' records into its buffer and the kernel gets them in few system
    calls (`send_more`), the last of them once all are in (`flush`): a chunk's frame, header and bytes together (one
    view, a frame's record: its `send`, which flushes, without the second call)."""
    more = getattr(sock, "send_more", None) if len(views) > 1 else None
    send = sock.send if more is None else more
    if len(views) == 1 and type(views[0]) is bytes and len(views[0]) <= SLICE:  # (a frame's record: one call)
        first, sent = views[0], 0
        wanted: bool | None = None  # (a "want": whether to read first)
        with lock:
            try:
                sent = sock.send(first)
            except ssl.SSLWantReadError:
                wanted = True
            except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                wanted = False
        if sent == len(first):
            return
        if wanted is not None:  # (then the loop below sends it again, the same slice: OpenSSL's retry rule)
            _wait(sock, wanted, timeout)
        views = [memoryview(first)[sent:]]
    for whole in views:
        view = memoryview(whole).cast("B")
        pos = 0
        while pos < len(view):
            part = view[pos : pos + SLICE]  # after a "want", the same slice again (OpenSSL's retry rule)
            want_read = False
            with lock:
                try:
                    pos += send(part)
                    continue
                except ssl.SSLWantReadError:
                    want_read = True
                except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                    pass
            _wait(sock, want_read, timeout)
    while more is not None:
        with lock:
            if sock.flush():
                return
        _wait(sock, False, timeout)


def send_some(sock: Any, lock: threading.Lock, view: memoryview | bytes) -> int:
    """Send what the socket takes of `view` now, without waiting; returns how many bytes went. The rest must go
    through `send_all` next (from `view[returned:]`: after a "want", OpenSSL's retry takes the same slice again,
    which is `send_all`'s first). A bytes object of up to a SLICE (a frame's record) goes in one call, no view."""
    pos = 0
    if type(view) is bytes and len(view) <= SLICE:
        with lock:
            try:
                pos = sock.send(view)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                return 0
        if pos == len(view):
            return pos
    view = memoryview(view)
    view = view.cast("B") if view.format != "B" else view
    while pos < len(view):
        with lock:
            try:
                pos += sock.send(view[pos : pos + SLICE])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                return pos
    return pos


def recv_into(sock: Any, lock: threading.Lock, view: memoryview, timeout: float | None, wait: bool = False) -> int:
    """Fill `view`; returns how many bytes came before the peer closed (len(view) when all did). `timeout`: None
    waits without a limit (a session's frame reader between frames: an idle session is no fault). `wait`: the caller
    found nothing to read just before (nothing in TLS's buffer, none in the kernel's, nothing read since): wait for
    the socket first instead of a read that would find nothing again."""
    view = view.cast("B") if view.format != "B" else view
    got, n = 0, len(view)
    if wait:
        _wait(sock, True, timeout)
    while got < n:
        want_write = False
        with lock:
            try:
                # What is there, up to SLICE bytes, under one hold of the lock (round 56): a TLS read returns one
                # 16 KiB record, and a hold of the lock and `SideSocket.recv_into`'s Python frame each record cost the
                # reader 30-50 us a MiB of its ~0.7 ms (BENCHMARKS.md, round 56, xfer56). A TLS socket's records are
                # read with its TLS object's read, OpenSSL's, as `tls.SideSocket.recv_into` reads them (the object
                # taken under the lock: a socket closed meanwhile has none, and its descriptor may be another's)
                stop = min(n, got + SLICE)
                sslobj = getattr(sock, "_sslobj", None) if isinstance(sock, ssl.SSLSocket) else None
                if sslobj is not None:
                    read = sslobj.read
                    while got < stop:
                        k = read(stop - got, view[got:stop])
                        if k == 0:
                            return got
                        got += k
                else:
                    while got < stop:
                        k = sock.recv_into(view[got:stop], stop - got)
                        if k == 0:
                            return got
                        got += k
                continue
            except ssl.SSLWantWriteError:
                want_write = True
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                pass
            except ssl.SSLError as exc:  # a ragged EOF read as the end, as `SSLSocket.read` reads it
                if exc.args[0] == ssl.SSL_ERROR_EOF and sock.suppress_ragged_eofs:
                    return got
                raise
        _wait(sock, not want_write, timeout)
    return got


def keep_alive(sock: Any, idle: float, interval: float, probes: int) -> None:
    """Let the kernel tell a dead peer from one that merely does not read or write (a process stopped by Ctrl-Z, a
    debugger, a sleeping laptop), so that a transfer may wait for the second without a limit (`timeout` None) and
    still fail for the first: after `idle` s of silence the kernel probes the peer every `interval` s and ends the
    connection (ETIMEDOUT, which fails a wait here) after `probes` unanswered ones. A stopped process's kernel
    answers them, and acknowledges what fits in its buffer, then announces a zero window whose probes it answers
    as well (RFC 1122 4.2.2.17: the sender keeps such a connection open for as long). Bytes sent to a host that is
    gone fail after the kernel's retransmissions (`tcp_retries2`, about 15 minutes). No TCP_USER_TIMEOUT: Linux
    ends a connection whose peer has kept a zero window for that long, answered probes or not (measured on 6.18:
    a paused reader's connection ended 3.5 s after a 3 s TCP_USER_TIMEOUT, and lived on without it). Linux's
    options; elsewhere only SO_KEEPALIVE, with the system's timings."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", probes)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), max(1, round(value)))
