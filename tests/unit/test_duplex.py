"""gpupool/duplex.py on descriptors a busy daemon has: numbers past `select`'s 1024 (one session's bulk socket
among many) move bytes both ways, and a socket that moves nothing times out."""

from __future__ import annotations

import os
import resource
import socket
import ssl
import sys
import threading
import time
from typing import Any

import pytest

from gpupool import duplex


@pytest.fixture
def high_pair():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2100:
        pytest.skip(f"the descriptor limit ({hard}) is below the numbers this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
    a, b = socket.socketpair()
    high = [socket.socket(fileno=os.dup2(s.detach(), n)) for s, n in ((a, 2040), (b, 2050))]
    for s in high:
        s.setblocking(False)
    try:
        yield high
    finally:
        for s in high:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_send_and_receive_on_descriptors_past_1024(high_pair) -> None:
    a, b = high_pair
    assert a.fileno() > 1024 and b.fileno() > 1024
    data = os.urandom(8 << 20)  # more than the socket buffers hold: the sender waits for the reader
    got = bytearray(len(data))
    lock_a, lock_b = threading.Lock(), threading.Lock()
    reader = threading.Thread(target=lambda: duplex.recv_into(b, lock_b, memoryview(got), 10.0))
    reader.start()
    duplex.send_all(a, lock_a, [data[:1000], memoryview(data)[1000:]], 10.0)
    reader.join(10)
    assert got == data


def test_a_socket_that_moves_nothing_times_out(high_pair) -> None:
    a, _ = high_pair
    with pytest.raises(TimeoutError, match="no bytes moved"):
        duplex.recv_into(a, threading.Lock(), memoryview(bytearray(10)), 0.2)


def test_keep_alive_sets_the_kernels_probes() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_connection(srv.getsockname()) as c:
        duplex.keep_alive(c, 7.0, 3.0, 5)
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        if hasattr(socket, "TCP_KEEPIDLE"):
            got = [c.getsockopt(socket.IPPROTO_TCP, o) for o in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL)]
            assert got + [c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)] == [7, 3, 5]
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # it would end a paused reader's connection (see keep_alive)
            assert c.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0


def test_a_send_waits_for_a_paused_reader_past_every_keepalive_timer() -> None:
    """A reader that stops reading (its process paused) while its kernel answers: the sender, waiting without a
    limit, is still waiting after its first probe and a whole probe cycle, and every byte arrives once the reader
    reads again."""
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_connection(srv.getsockname()) as c:
        a, _ = srv.accept()
        with a:
            duplex.keep_alive(a, 1.0, 1.0, 1)
            a.setblocking(False)
            data = os.urandom(32 << 20)  # far more than the socket buffers hold
            errors: list[BaseException] = []

            def send() -> None:
                try:
                    duplex.send_all(a, threading.Lock(), [data], None)
                except BaseException as exc:  # noqa: BLE001 - checked below
                    errors.append(exc)

            sender = threading.Thread(target=send)
            sender.start()
            sender.join(5.0)
            assert sender.is_alive() and not errors, errors
            got = bytearray(len(data))
            assert duplex.recv_into(c, threading.Lock(), memoryview(got), 30.0) == len(data)
            sender.join(10)
            assert not sender.is_alive() and not errors and got == data


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while sock.fileno() != -1 and time.monotonic() < deadline:
        time.sleep(0.01)
    return sock.fileno() == -1


@pytest.mark.parametrize("end", ["daemon", "client"])
def test_close_while_a_call_holds_the_lock_waits_for_it_then_closes(end: str) -> None:
    """Round 29: the daemon's BulkLink.close left its socket to the garbage collector when its lock was busy past
    0.1 s, and the client's BulkSocket.close closed the socket under a call using it (whose descriptor number could
    then be another connection's). Now: shut down at once, closed the moment the call releases the lock."""
    from gpupool.client.bulk import BulkSocket
    from gpupool.server.bulkside import BulkLink

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    link = BulkLink(ours, 1) if end == "daemon" else BulkSocket(ours)
    try:
        with link.lock:  # a thread in the middle of one call on the socket
            link.close()  # returns (after its 0.1 s) without waiting for the call
            theirs.settimeout(10)
            assert theirs.recv(1) == b""  # shut down at once: the peer sees the end, a blocked transfer fails
            assert ours.fileno() != -1  # but not closed under the call
        assert _closed_within(ours, 10.0)  # closed once the call let go (not by the garbage collector)
        link.close()  # again: a no-op
    finally:
        theirs.close()
        ours.close()


def _tls_pair() -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """A TLS connection over a socket pair with the tests' certificates: (the daemon's end, the client's end)."""
    from support import get_pki, tls_socket_pair

    from gpupool import tls

    pki = get_pki()
    server_ctx = tls.SocketServerTls(pki.server_config()).context()
    client_ctx = ssl.create_default_context(cafile=pki.ca_file)
    client_ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    ours, theirs = tls_socket_pair(server_ctx, client_ctx)
    return ours, theirs


def test_a_write_meeting_a_close_half_done_never_goes_out_in_plaintext() -> None:
    """Round 34: `duplex.close` shut a TLS socket down with `SSLSocket.shutdown`, outside the lock, which drops the
    socket's TLS object before it shuts the descriptor down. A writer that took the lock between the two (the stream's
    writer, woken by its poll, while a session's end closed its side socket) found no TLS object, and
    `SSLSocket.send` wrote its bytes as they are: a reply's tensor bytes in plaintext on the network. Here the close
    is paused right there, at its system call (a profile hook: the real call is made once the writer is done), and a
    writer sends meanwhile, as `duplex.send_all` does, under the lock: its bytes must reach the peer encrypted."""
    ours, theirs = _tls_pair()
    lock = threading.Lock()
    paused, resume = threading.Event(), threading.Event()
    secret = b"tensor bytes, never in plaintext " * 4

    def at_shutdown(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") == "shutdown" and not paused.is_set():
            paused.set()
            resume.wait(10)

    def closer() -> None:
        sys.setprofile(at_shutdown)
        try:
            duplex.close(ours, lock)
        finally:
            sys.setprofile(None)

    t = threading.Thread(target=closer)
    t.start()
    try:
        assert paused.wait(10), "the close never reached its shutdown"
        try:
            duplex.send_all(ours, lock, [secret], 1.0)  # a writer in the close's middle
        except OSError:
            pass  # refused is fine; in plaintext is not
    finally:
        resume.set()
        t.join(10)
    wire = bytearray()
    theirs.settimeout(10)
    while chunk := socket.socket.recv(theirs, 65536):  # the bytes on the wire, as the network sees them
        wire += chunk
    assert secret[:16] not in wire, "the writer's bytes went out in plaintext"
    assert ours.fileno() == -1
    theirs.close()


def test_linger_close_delivers_what_was_sent_though_the_peers_bytes_went_unread() -> None:
    """`linger_close` on a socket whose peer sent bytes nobody read: the peer reads every byte sent before it, then a
    plain end (no reset), however late it reads; a plain `close` there resets the connection, and the reset drops what
    the kernel had not yet delivered (server/bulkside.py `BulkLink.linger`). A socket whose shutdown fails (never
    connected) is closed all the same."""
    server = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(server.getsockname())
    sock, _ = server.accept()
    server.close()
    peer.sendall(b"x" * 65536)  # never read by `sock`'s side
    payload = os.urandom(8 << 20)  # read slowly: when `sendall` returns, megabytes still wait in the send queue
    got = bytearray()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while chunk := peer.recv(1 << 16):
                got.extend(chunk)
                time.sleep(0.002)
        except OSError as exc:  # a reset (the plain close's)
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    sock.sendall(payload)
    sock.setblocking(False)
    duplex.linger_close(sock, threading.Lock(), 10.0)
    reader.join(60)
    assert not errors and len(got) == len(payload), (errors, len(got))
    assert bytes(got) == payload
    peer.close()
    for _ in range(100):
        if sock.fileno() == -1:
            break
        time.sleep(0.05)
    assert sock.fileno() == -1, "closed once the peer closed its end"
    lonely = socket.socket()
    duplex.linger_close(lonely, threading.Lock(), 1.0)  # shutdown fails (not connected): closed at once
    assert lonely.fileno() == -1


# ---- round 39 (rec39): the side socket's records in few system calls each way (gpupool/tls.py `SideSocket`) ----

MiB = 1 << 20


def _side_pair(buffered: bool = True) -> tuple[Any, Any]:
    """A TLS connection over loopback TCP with the side socket's own contexts (`tls.SocketServerTls`,
    `tls.socket_client_context`: their sockets are `tls.SideSocket`s), both ends non-blocking as bound, and with
    `buffered` their records moved in few system calls (`SideSocket.buffer`, as the daemon's `_hello` and the
    client's `connect` do): (the daemon's end, the client's end)."""
    from support import get_pki, tls_socket_pair

    from gpupool import tls

    pki = get_pki()
    client_ctx = tls.socket_client_context(pki.client_config())
    ours, theirs = tls_socket_pair(tls.SocketServerTls(pki.server_config()).context(), client_ctx, tcp=True)
    for end in (ours, theirs):
        assert isinstance(end, tls.SideSocket)
        end.setblocking(False)
        if buffered:
            assert end.buffer()
    return ours, theirs


def _calls() -> tuple[int, int]:
    """This thread's read-family and write-family system calls so far (/proc/thread-self/io `syscr`, `syscw`)."""
    with open("/proc/thread-self/io", "rb") as f:
        fields = dict(line.split(b": ") for line in f.read().splitlines())
    return int(fields[b"syscr"]), int(fields[b"syscw"])


def _move(sender: Any, receiver: Any, views: list[bytes], total: int) -> tuple[bytes, int, int]:
    """`duplex.send_all(views)` from a thread while this thread reads `total` bytes (`duplex.recv_into`): (the bytes
    read, the sender thread's write calls, this thread's read calls)."""
    counts: list[int] = []

    def send() -> None:
        before = _calls()[1]
        duplex.send_all(sender, threading.Lock(), views, 20.0)
        counts.append(_calls()[1] - before)

    into = bytearray(total)
    t = threading.Thread(target=send)
    before = _calls()[0]
    t.start()
    got = duplex.recv_into(receiver, threading.Lock(), memoryview(into), 20.0)
    reads = _calls()[0] - before
    t.join(20)
    assert got == total and counts
    return bytes(into), counts[0], reads


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/io"), reason="needs Linux's per-thread I/O counts")
def test_a_side_socket_moves_a_mib_of_tls_records_in_a_few_system_calls_each_way() -> None:
    """Round 39: OpenSSL wrote each 16 KiB TLS record of a side socket with a `write` of its own (64 a MiB: a download
    on the daemon's end, an upload on the client's) and read them in about one `read` each (read-ahead). A bound side
    socket (`tls.SideSocket.buffer`) hands the kernel its records in writes of up to `tls.SIDE_BUFFER` bytes and
    takes them in reads as large: 4 MiB (a download's header and bytes, as `BulkLink.send_download` sends them),
    counted by the kernel for the sending and the receiving thread, both ways, against the same pair unbuffered in
    the same test; every byte arrives, in order."""
    data = bytes((i * 31 + 7) & 0xFF for i in range(4 * MiB))
    head = b"\x02" * 32
    for buffered in (False, True):
        ours, theirs = _side_pair(buffered)
        try:
            counts = []
            for sender, receiver in ((ours, theirs), (theirs, ours)):
                got, writes, reads = _move(sender, receiver, [head, data], len(head) + len(data))
                assert got == head + data
                counts.append((writes, reads))
        finally:
            ours.close()
            theirs.close()
        for writes, reads in counts:
            if buffered:  # (4 MiB in 256 KiB buffers: 16 of each, and the writes that met a full socket)
                assert writes <= 4 * 24 and reads <= 4 * 32, counts
            else:  # as before: a write a record at least (and the pair is the same but for the buffers)
                assert writes >= 4 * 64, counts


def test_a_buffered_send_that_meets_a_full_socket_keeps_its_records_whole_and_sends_them_once() -> None:
    """The write buffer keeps OpenSSL's non-blocking contract (`tls.SideSocket.send`): a bulk send whose records the
    kernel took only in part (its reader paused) raises SSLWantWriteError with the records whole in the buffer, and
    the retry of the same slice (OpenSSL's rule, which `duplex.send_some` and `BulkLink.send_now` leave to
    `send_all`) writes the rest and counts the bytes once. Pieces of 100 KB (bulk: through the buffer) sent without
    waiting until the socket is full, then the reader wakes and the rest goes through `send_all` with a small frame
    after it: every byte arrives once, in order, nothing is left behind in a buffer (the reader needs no further
    write), and the small frame went straight to the socket's BIO once the buffer was empty."""
    from gpupool import tls

    ours, theirs = _side_pair()
    size = 100_000
    assert size >= tls.BUFFERED_MIN
    lock = threading.Lock()
    try:
        sent = bytearray()
        k = 0
        while True:
            piece = bytes([k & 0xFF]) * size
            n = duplex.send_some(ours, lock, memoryview(piece))
            sent += piece[:n]
            if n < size:
                break  # the kernel is full: the rest of this piece goes through send_all, as the writers do
            k += 1
        assert ours._buffering  # the piece's records, whole, wait in the buffer (or in OpenSSL's retry)
        tail = b"the last frame"
        total = len(sent) + size - n + len(tail)
        into = bytearray(total)
        reader = threading.Thread(target=lambda: duplex.recv_into(theirs, threading.Lock(), memoryview(into), 20.0))
        reader.start()
        duplex.send_all(ours, lock, [memoryview(piece)[n:]], 20.0)
        assert not ours._buffering  # (empty again: the next small write goes straight to the socket's BIO)
        duplex.send_all(ours, lock, [tail], 20.0)
        reader.join(20)
        assert not reader.is_alive(), "bytes stayed in a buffer"
        assert bytes(into) == bytes(sent) + piece[n:] + tail
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("big", [False, True])
def test_a_buffered_side_socket_shut_down_by_ssl_refuses_writes_and_never_sends_plaintext(big: bool) -> None:
    """`SSLSocket.shutdown` drops the TLS object before the kernel's shutdown (callers outside gpupool/duplex.py call
    it: test_daemon_bulk.py cuts a chunk that way); `SSLSocket.send` then writes its bytes as they are. A buffered
    side socket forgets its BIOs with the TLS object and refuses the write (an OSError, as a broken socket's), small
    or bulk, and nothing of it reaches the peer. Shut for reading only, so that a plaintext write would go out."""
    ours, theirs = _side_pair()
    secret = b"tensor bytes, never in plaintext " * (4000 if big else 1)
    try:
        ours.shutdown(socket.SHUT_RD)
        with pytest.raises(OSError):
            duplex.send_all(ours, threading.Lock(), [secret], 2.0)
        with pytest.raises(OSError):
            duplex.send_all(ours, threading.Lock(), [b"head", secret], 2.0)
        raw = socket.socket(fileno=os.dup(theirs.fileno()))  # the peer's kernel buffer, below its TLS
        raw.setblocking(False)
        try:
            got = raw.recv(1 << 20)
        except BlockingIOError:
            got = b""
        raw.close()
        assert b"never in plaintext" not in got
    finally:
        ours.close()
        theirs.close()


def test_a_side_socket_stays_unbuffered_where_openssls_functions_are_not_at_hand(monkeypatch: Any) -> None:
    """`SideSocket.buffer` leaves the socket as any SSLSocket (False; one write a record, and it works) where it
    cannot reach OpenSSL's functions (another Python's ssl module, an OpenSSL without its symbols)."""
    from gpupool import tls

    monkeypatch.setattr(tls, "_bio_lib", [None])
    ours, theirs = _side_pair(buffered=False)
    try:
        assert ours.buffer() is False and theirs.buffer() is False
        data = os.urandom(300_000)
        assert _move(ours, theirs, [data], len(data))[0] == data
    finally:
        ours.close()
        theirs.close()


def test_held_reads_the_read_buffers_count_in_place_and_says_what_openssl_says(monkeypatch: Any) -> None:
    """Round 42 (front42): `SideSocket.held` reads the read buffer BIO's count of the bytes it holds in place
    (`tls._buffered_count`) instead of asking BIO_pending through ctypes (~3.7k instructions a call, most of `held`'s
    cost, once a synced frame at each end). Here ctypes' BIO_ctrl is out of its reach (on ca5fb68 every `held` called
    it), and at every step of reading records of 10 bytes to 70 KB in pieces of odd sizes `held` says what OpenSSL
    says (SSL_pending of the opened record + BIO_pending of the read buffer, asked through ctypes by the test): the
    records in the buffer, the rest of an opened one, then nothing."""
    ours, theirs = _side_pair()
    try:
        assert ours._in_buffer is not None, "the read buffer's context is not laid out as OpenSSL's"
        ctrl, args = ours._ctrl, ours._pending_args

        def openssl() -> int:
            return int(ours._sslobj.pending()) + int(ctrl(*args))

        monkeypatch.setattr(ours, "_ctrl", None)  # (a call through it fails)
        assert ours.held() == 0 == openssl()
        sent = b"".join(bytes([i]) * n for i, n in enumerate((10, 2000, 1, 70_000, 300)))
        for i, n in enumerate((10, 2000, 1, 70_000, 300)):
            theirs.sendall(bytes([i]) * n)  # (each its own TLS records)
        got = bytearray()
        view = memoryview(bytearray(1 << 17))
        sizes = [3, 7, 1, 5000, 13, 65_536, 2, 100_000]
        k = in_buffer = 0
        while len(got) < len(sent):
            assert ours.held() == openssl()
            in_buffer = max(in_buffer, int(ctrl(*args)))
            try:
                n = ours.recv_into(view, sizes[k % len(sizes)])
            except ssl.SSLWantReadError:
                duplex._wait(ours, True, 10.0)
                continue
            got += view[:n]
            k += 1
        assert ours.held() == 0 == openssl()
        assert bytes(got) == sent
        assert in_buffer > 0  # (records were held in the read buffer, not only in an opened record)
    finally:
        ours.close()
        theirs.close()


def test_a_small_record_that_a_socket_takes_in_part_goes_out_once_whole() -> None:
    """`send_all` and `send_some` hand a small record (a frame's, bytes) to the socket in one call, no view made
    (round 42, front42); a socket that takes only part of it (a plaintext socket with little room) has the rest sent
    after it: every byte once, in order (a socket taking 7 bytes a send). `send_all`'s part pins what held before;
    `send_some` took only a memoryview on ca5fb68 (the client's `send_frame_now` made one of each frame's record)."""

    class Dribble:  # a real socket that takes at most 7 bytes a send
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def send(self, data: Any) -> int:
            return self.sock.send(bytes(data[:7]))

        def fileno(self) -> int:
            return self.sock.fileno()

    a, b = socket.socketpair()
    try:
        record = bytes(range(100))
        duplex.send_all(Dribble(a), threading.Lock(), [record], 5.0)
        assert duplex.send_some(Dribble(a), threading.Lock(), record) == len(record)
        b.settimeout(5.0)
        got = b""
        while len(got) < 2 * len(record):
            got += b.recv(1000)
        assert got == record + record
    finally:
        a.close()
        b.close()


def test_a_small_record_that_meets_a_full_tls_socket_goes_out_once_after_the_wait() -> None:
    """The one-call paths for a small record (round 42: `send_some` and `send_all` hand the bytes to the socket, no
    view) on a side socket whose kernel buffer is full (its reader paused): `send_some` says 0 (OpenSSL's want, the
    record made and held by OpenSSL), and the writer's `send_all` of the same bytes, the socket still full, waits
    for it and retries them (OpenSSL's rule), once the reader reads. Every record arrives once, in order, the
    retried one last, and nothing after it."""
    ours, theirs = _side_pair()
    lock = threading.Lock()
    try:
        sent = []
        while True:  # small records until the kernel's buffers are full (the peer reads nothing yet)
            record = b"%08d" % len(sent) * 100
            if duplex.send_some(ours, lock, record) < len(record):
                break
            sent.append(record)
        writer = threading.Thread(target=duplex.send_all, args=(ours, lock, [record], 20.0))
        writer.start()
        into = bytearray(len(record) * (len(sent) + 1))
        assert duplex.recv_into(theirs, threading.Lock(), memoryview(into), 20.0) == len(into)
        writer.join(20)
        assert not writer.is_alive()
        assert bytes(into) == b"".join(sent) + record
        with pytest.raises(ssl.SSLWantReadError):  # (nothing after it: the retried record went once)
            theirs.recv_into(memoryview(bytearray(10)), 10)
    finally:
        ours.close()
        theirs.close()


class _CountingLock:
    """A lock that counts its holds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holds = 0

    def __enter__(self) -> None:
        self.lock.acquire()
        self.holds += 1

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_a_read_takes_the_tls_records_already_here_under_one_hold_of_the_lock() -> None:
    """Round 56: `duplex.recv_into` read one 16 KiB TLS record a hold of its lock (a call of `SideSocket.recv_into`, a
    Python frame, each record: 64 a MiB of an upload on the daemon's end, a download on the client's); it now reads
    every record already here, up to SLICE bytes, under one hold. 128 KiB (8 records) sent whole before the read
    starts: one hold (a few where the kernel handed them over in parts), every byte in order; the lock is free
    again after (the writer's direction goes on)."""
    data = bytes((i * 131 + 5) & 0xFF for i in range(128 * 1024))
    ours, theirs = _side_pair()
    try:
        sent = threading.Thread(target=lambda: duplex.send_all(theirs, threading.Lock(), [data], 20.0))
        sent.start()
        sent.join(30)
        assert not sent.is_alive()  # (on loopback the kernel delivered the bytes within the sender's writes)
        lock = _CountingLock()
        into = bytearray(len(data))
        assert duplex.recv_into(ours, lock, memoryview(into), 20.0) == len(data)  # type: ignore[arg-type]
        assert bytes(into) == data
        assert lock.holds <= 4, lock.holds  # (before: 8, a record a hold)
        assert lock.lock.acquire(blocking=False)
    finally:
        ours.close()
        theirs.close()
