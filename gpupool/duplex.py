"""Both directions of one (TLS) socket from two threads: the bulk side socket's sends and receives (client/bulk.py,
server/bulkside.py).

A TLS connection is one OpenSSL object, which two threads must not use at once, so each end keeps a lock. Held
across a blocking `sendall`, that lock deadlocked a session whose two user threads uploaded and downloaded at once
(round 24): the client's upload waited for the daemon to read, the daemon's reader waited for its lock, held by its
writer, which waited for the client to read a download, whose reader waited for the client's lock, held by the
upload; nothing moved until `IO_TIMEOUT` ended the session. Here the socket is non-blocking and the lock is held
for one non-blocking call at a time (as a single-threaded event loop interleaves SSL_read and SSL_write on one
connection); a thread waits for its socket to be ready with the lock released, so the other direction keeps moving.

`timeout`: seconds a transfer may go without moving a byte; then TimeoutError (an OSError). The socket must be
non-blocking (`sock.setblocking(False)`) once the callers use these functions.
"""

from __future__ import annotations

import select
import ssl
import threading
from typing import Any

SLICE = 1 << 20  # bytes per non-blocking send: the longest the lock is held for encrypting (about a millisecond)


def _wait(sock: Any, read: bool, timeout: float | None) -> None:
    """Until `sock` is readable (`read`) or writable, or TimeoutError after `timeout` s (None: no limit). `poll`,
    not `select`: a daemon serving many sessions has descriptors past select's 1024 (ValueError there)."""
    fd = sock.fileno()
    if fd < 0:
        raise OSError("socket closed")
    poller = select.poll()
    poller.register(fd, (select.POLLIN if read else select.POLLOUT) | select.POLLERR | select.POLLHUP)
    if not poller.poll(None if timeout is None else timeout * 1000):
        raise TimeoutError(f"no bytes moved for {timeout:.0f} s")


def send_all(sock: Any, lock: threading.Lock, views: list[memoryview | bytes], timeout: float) -> None:
    """Send every byte of `views`, in order (an error or TimeoutError leaves the connection unusable)."""
    for whole in views:
        view = memoryview(whole).cast("B")
        pos = 0
        while pos < len(view):
            part = view[pos : pos + SLICE]  # after a "want", the same slice again (OpenSSL's retry rule)
            want_read = False
            with lock:
                try:
                    pos += sock.send(part)
                    continue
                except ssl.SSLWantReadError:
                    want_read = True
                except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                    pass
            _wait(sock, want_read, timeout)


def recv_into(sock: Any, lock: threading.Lock, view: memoryview, timeout: float | None) -> int:
    """Fill `view`; returns how many bytes came before the peer closed (len(view) when all did). `timeout`: None
    waits without a limit (a session's frame reader between frames: an idle session is no fault)."""
    view = view.cast("B") if view.format != "B" else view
    got = 0
    while got < len(view):
        want_write = False
        with lock:
            try:
                k = sock.recv_into(view[got:], len(view) - got)
                if k == 0:
                    return got
                got += k
                continue
            except ssl.SSLWantWriteError:
                want_write = True
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                pass
        _wait(sock, not want_write, timeout)
    return got
