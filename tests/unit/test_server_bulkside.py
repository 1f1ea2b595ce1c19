"""server/bulkside.py's frame helpers: which reply frames become side-socket transfers, and what the stream
then carries; the span a side upload becomes is the canonical upload the worker's copy-once path reads."""

from __future__ import annotations

import os
import socket
import threading
import time
import tracemalloc
from typing import Any

import pytest
import torch
from gpupool.server import bulk, bulkside

from gpupool import protocol, wire
from gpupool._proto import device_pb2, tensor_pb2
from gpupool.errors import InvalidArgument, Unavailable

MiB = 1024 * 1024
META = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(torch.float32), shape=[MiB // 2], stride=[1])


def chunk(rid: int, data: bytes, offset: int = 0, last: bool = True, meta: bool = True) -> bytes:
    c = device_pb2.TensorChunk(offset=offset, last=last)
    if meta:
        c.meta.CopyFrom(META)
    head = device_pb2.ServerFrame(request_id=rid).SerializeToString()
    out = protocol.chunk_frame(head, c, data)
    assert isinstance(out, bytes)
    return out


class _Link(bulkside.BulkLink):
    def __init__(self) -> None:
        a, self.peer = socket.socketpair()
        super().__init__(a, 1)


def test_chunk_parts_agree_with_protobuf() -> None:
    data = bytes(range(256)) * 1024
    raw = chunk(7, data, offset=4 * MiB, last=False)
    parts = bulkside.chunk_parts(raw)
    assert parts is not None and parts.request_id == 7 and parts.offset == 4 * MiB and not parts.last
    assert bytes(parts.data) == data and parts.meta == META.SerializeToString()
    announced = device_pb2.ServerFrame.FromString(parts.announce())
    assert announced.request_id == 7 and announced.chunk.bulk_bytes == len(data) and not announced.chunk.data
    assert announced.chunk.meta == META and announced.chunk.offset == 4 * MiB
    for other in (
        protocol.sync_reply(7),
        device_pb2.ServerFrame(
            request_id=7, error=tensor_pb2.Error(code="INVALID_ARGUMENT", message="x")
        ).SerializeToString(),
        raw + b"\x00",  # trailing bytes: not the shape the worker writes
    ):
        assert bulkside.chunk_parts(other) is None


def test_outgoing_sends_only_large_chunks_of_bulk_gets() -> None:
    link = _Link()
    big, small = b"\x01" * bulkside.SIDE_MIN, b"\x02" * (bulkside.SIDE_MIN - 1)
    assert bulkside.outgoing(link, chunk(5, big)) == (chunk(5, big), None)  # not a bulk Get
    link.gets.update({5, 6, 8})
    out, parts = bulkside.outgoing(link, chunk(5, big, last=False))
    assert parts is not None and bytes(parts.data) == big and 5 in link.gets
    assert device_pb2.ServerFrame.FromString(out).chunk.bulk_bytes == len(big)
    assert bulkside.outgoing(link, chunk(5, small, offset=len(big), meta=False)) == (
        chunk(5, small, offset=len(big), meta=False),
        None,
    )  # small chunks stay on the stream
    assert 5 not in link.gets  # its last chunk went out
    error = device_pb2.ServerFrame(
        request_id=6, error=tensor_pb2.Error(code="INVALID_ARGUMENT", message="x")
    ).SerializeToString()
    assert bulkside.outgoing(link, error) == (error, None) and 6 not in link.gets
    assert bulkside.outgoing(None, chunk(8, big)) == (chunk(8, big), None)


def test_recv_upload_builds_the_canonical_span_and_checks_the_header() -> None:
    link = _Link()
    data = bytes(range(256)) * (4 * MiB // 256)
    up = device_pb2.Upload(handle=(3 << 32) + 1, meta=META, offset=0, last=True, bulk_bytes=len(data))
    sender = threading.Thread(
        target=lambda: link.peer.sendall(protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, up.handle, 0, len(data)) + data)
    )
    sender.start()
    span = link.recv_upload(up)
    sender.join()
    parsed = bulk.parse_upload(memoryview(span))
    assert parsed is not None
    cmd, got = parsed
    assert bytes(got) == data and cmd.upload.handle == up.handle and cmd.upload.meta == META
    assert cmd.upload.last and not cmd.upload.bulk_bytes  # the worker sees an ordinary upload
    plain = device_pb2.Upload(handle=up.handle, meta=META, last=True)
    assert bytes(span) == protocol.upload_frame(plain, data)


@pytest.mark.parametrize(
    "header",
    [
        protocol.BULK_HEAD.pack(protocol.BULK_DOWNLOAD, 9, 0, 16),  # wrong kind
        protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, 10, 0, 16),  # another handle
        protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, 9, 4, 16),  # another offset
        protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, 9, 0, 15),  # another length
    ],
)
def test_recv_upload_refuses_any_other_header(header: bytes) -> None:
    link = _Link()
    link.peer.sendall(header + b"\x00" * 16)
    with pytest.raises(InvalidArgument, match="expected an upload of 16 bytes for handle 9"):
        link.recv_upload(device_pb2.Upload(handle=9, bulk_bytes=16, last=True))


def test_recv_upload_of_a_closed_socket_fails_clearly() -> None:
    link = _Link()
    link.peer.sendall(protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, 9, 0, 16) + b"\x00" * 3)
    link.peer.close()
    with pytest.raises(Unavailable, match="closed in the middle of an upload"):
        link.recv_upload(device_pb2.Upload(handle=9, bulk_bytes=16, last=True))


def test_a_silent_peer_is_waited_for_until_close_unblocks_the_reader() -> None:
    """No stall limit: a paused client goes on where it stopped, a dead one is the kernel's to find
    (`duplex.keep_alive`), and the session's close (Detach, its lease's end) ends the wait."""
    link = _Link()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            link.recv_upload(device_pb2.Upload(handle=9, bulk_bytes=16, last=True))
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    t = threading.Thread(target=read)
    t.start()
    t.join(1.0)
    assert t.is_alive() and not errors
    link.close()
    t.join(5)
    assert not t.is_alive() and errors and isinstance(errors[0], Unavailable)


@pytest.mark.parametrize(
    "size", [1, bulkside.FRAME_STEP, bulkside.FRAME_STEP + 1, bulkside.REUSE_MAX, bulkside.REUSE_MAX + 1, 3 * MiB + 5]
)
def test_recv_frame_reads_a_frame_whole_across_its_buffers_growth(size: int) -> None:
    link = _Link()
    frame = bytes((i * 7) & 0xFF for i in range(size))
    sender = threading.Thread(
        target=lambda: link.peer.sendall(protocol.frame_record(frame) + protocol.frame_record(b"x"))
    )
    sender.start()
    assert link.recv_frame(16 * MiB) == frame
    assert link.recv_frame(16 * MiB) == b"x"  # the next record starts right after it
    sender.join()


@pytest.mark.parametrize("announced", [16 * MiB, bulkside.REUSE_MAX], ids=["limit", "reused_buffer"])
def test_recv_frame_holds_what_arrived_not_what_was_announced(announced: int) -> None:
    """A header announcing the stream's 16 MiB limit and one KiB of it: the reader holds about what arrived (it
    held the announced 16 MiB, zero-filled, before any byte came: a session's header and a byte committed that much
    of the daemon's memory), and a close in the middle still says so. So for a frame of the sizes read into the
    socket's reused buffers (`REUSE_MAX`): such a buffer grows as the fresh one does."""
    link = _Link()
    link.peer.sendall(protocol.BULK_HEAD.pack(protocol.BULK_FRAME, 0, 0, announced) + b"\x0a" * 1024)
    link.peer.close()
    tracemalloc.start()
    try:
        with pytest.raises(Unavailable, match="closed in the middle of a frame"):
            link.recv_frame(16 * MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * bulkside.FRAME_STEP, f"{peak} bytes held for 1 KiB received"


def _send_frames(link: _Link, *frames: bytes) -> threading.Thread:
    sender = threading.Thread(
        target=lambda: link.peer.sendall(b"".join(map(protocol.frame_record, frames))), daemon=True
    )
    sender.start()
    return sender


def test_recv_frame_reuses_a_buffer_once_nothing_holds_it_and_never_one_a_view_holds() -> None:
    """Frames of REUSE_MIN to REUSE_MAX bytes are read into the link's own buffers, reused (no fresh memory, page
    faults or copy per frame): a buffer any view of a frame still holds (a queued command's span) is never read
    into, one no view holds is; every frame reads exactly its own bytes (a shorter one after a longer one in the
    same buffer: none of the longer one's), read-only; all held: fresh memory, as before."""
    link = _Link()
    a, b, c = (bytes([k]) * size for k, size in ((0xAA, 512 * 1024), (0xBB, 300 * 1024), (0xCC, 100 * 1024)))
    sender = _send_frames(link, a, b, c, a, b, c)
    got_a = link.recv_frame(16 * MiB)
    assert isinstance(got_a, memoryview) and got_a.readonly and got_a == a
    span = got_a[1000:2000]  # a command's span, queued: it holds the buffer as the frame did
    del got_a
    got_b = link.recv_frame(16 * MiB)
    assert isinstance(got_b, memoryview) and got_b == b and got_b.obj is not span.obj
    buf_b = id(got_b.obj)  # (its id: a reference would hold it)
    del got_b
    got_c = link.recv_frame(16 * MiB)  # into B's buffer (free again): exactly C's bytes, none of B's after them
    assert id(got_c.obj) == buf_b and len(got_c) == len(c) and got_c == c
    with pytest.raises(TypeError):
        got_c[0:1] = b"x"  # type: ignore[index]
    assert span == a[1000:2000]  # A's buffer was never read into while its span lived
    held = [got_c, link.recv_frame(16 * MiB)]  # C's, then A again: its buffer, the third, or a fresh one
    assert held[1] == a and held[1].obj is not span.obj
    assert len({id(v.obj) for v in (span, *held)}) == bulkside.FRAME_BUFFERS == 3
    fresh = link.recv_frame(16 * MiB)  # every buffer held: fresh memory, as before round 36
    assert isinstance(fresh, bytes) and fresh == b
    del span, held
    again = link.recv_frame(16 * MiB)
    assert isinstance(again, memoryview) and again == c
    sender.join()


@pytest.mark.parametrize("size", [bulkside.REUSE_MIN - 1, bulkside.REUSE_MAX + 1])
def test_frames_outside_the_reused_sizes_come_in_fresh_memory(size: int) -> None:
    link = _Link()
    frame = bytes((i * 7) & 0xFF for i in range(size))
    sender = _send_frames(link, frame)
    got = link.recv_frame(16 * MiB)
    assert isinstance(got, bytes) and got == frame
    sender.join()


def _frames_session() -> tuple[Any, bulkside.BulkLink, socket.socket]:
    """A session whose frames use a side socket (a real BulkLink over a socketpair, non-blocking as bound): the
    session, its link, and the client's end."""
    from gpupool.server.daemon import Daemon, DaemonConfig
    from gpupool.server.front import FrontSession

    from gpupool.tokens import TokenClaims

    d = Daemon(DaemonConfig(fake_gpus=1, host_id="h", metrics_listen=""))  # not started: no threads
    claims = TokenClaims("lease", "h", 0, 0, 1.0, time.time() + 60, "acme")
    s = FrontSession("s", 1, claims, d.device_list[0], 1 << 20, "acme")
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    link = bulkside.BulkLink(ours, 1, frames=True)
    assert s.bind_bulk(link)
    s.daemon = d  # (for a writer: service.DeviceServicer)
    return s, link, peer


def _records(peer: socket.socket, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        head = peer.recv(protocol.BULK_HEAD.size, socket.MSG_WAITALL)
        kind, _, _, length = protocol.BULK_HEAD.unpack(head)
        assert kind == protocol.BULK_FRAME
        out.append(peer.recv(length, socket.MSG_WAITALL) if length else b"")
    return out


def test_a_small_reply_is_written_by_the_thread_that_produced_it_unless_it_would_overtake_one() -> None:
    """`FrontSession.send` writes a small reply frame of a frames-socket session to the socket itself (no hand-off to
    the stream's writer thread), and only where nothing queued for the writer is pending, the writer is not writing,
    no bulk Get's chunks may be among the replies and the frame is small: otherwise it is queued, in order, as
    before, with its bytes counted until the writer sends it."""
    from gpupool.server.front import DIRECT_MAX

    s, link, peer = _frames_session()
    s.send(b"first")
    assert _records(peer, 1) == [b"first"] and s.written_direct == 1
    assert s.outbox.empty() and s.outbox.pending == 0 and s.outbox_bytes == 0
    s.outbox.put(b"queued")  # an item the writer has not finished: the next reply must not pass it
    s.send(b"second")
    assert s.written_direct == 1 and s.outbox.pending == 2 and s.outbox_bytes == len(b"second")
    assert [s.outbox.get_nowait(), s.outbox.get_nowait()] == [b"queued", b"second"]
    s.outbox.done()
    s.outbox.done()
    s.outbox_bytes = 0
    with s.reply_lock:  # the writer is writing
        s.send(b"third")
    link.gets.add(7)  # a bulk Get's chunks may be among the replies: their bytes follow their announcement
    s.send(b"fourth")
    link.gets.clear()
    s.send(b"x" * (DIRECT_MAX + 1))
    assert s.written_direct == 1
    assert [s.outbox.get_nowait() for _ in range(3)] == [b"third", b"fourth", b"x" * (DIRECT_MAX + 1)]
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(1)  # none of them went to the socket
    link.close()
    peer.close()


def test_a_direct_write_the_socket_does_not_take_whole_queues_the_rest_for_the_writer() -> None:
    """A reply the socket takes only in part (a client not reading) is never waited for by the thread that produced
    it: the rest is queued (`Unsent`, the record's remaining bytes) ahead of any later reply, and the record comes
    out whole once the writer sends it (`BulkLink.send_raw`)."""
    from gpupool.server.front import Unsent

    s, link, peer = _frames_session()
    filler = 0
    while True:  # fill the socket's buffers: the client reads nothing
        try:
            filler += link.sock.send(b"\0" * 65536)
        except BlockingIOError:
            break
    frame = bytes(range(256)) * 64
    s.send(frame)
    s.send(b"later")
    rest = s.outbox.get_nowait()
    assert isinstance(rest, Unsent) and 0 < len(rest) <= len(protocol.frame_record(frame))
    assert s.outbox.get_nowait() == b"later"  # queued behind the rest, not written past it
    done = threading.Thread(target=link.send_raw, args=(rest,))
    done.start()
    got = b""
    while len(got) < filler:
        got += peer.recv(filler - len(got))
    done.join(10)
    assert _records(peer, 1) == [frame]
    link.close()
    peer.close()


def test_ready_reads_the_next_records_first_byte_ahead_and_recv_frame_goes_on_from_it() -> None:
    """`BulkLink.ready` asks whether a next record is there by reading its first byte without waiting (no poll a
    frame, round 33): the frame then read is whole; with nothing there it says so and the next `recv_frame` waits
    for the socket; a client that closed between frames is met there and `recv_frame` says so (None)."""
    _, link, peer = _frames_session()
    assert not link.ready()  # nothing sent yet
    got: list[bytes | None] = []
    reader = threading.Thread(target=lambda: got.append(link.recv_frame(1 << 20)))
    reader.start()  # waits for the socket (`ready` found it empty)
    time.sleep(0.05)
    peer.sendall(protocol.frame_record(b"one"))
    reader.join(10)
    assert got == [b"one"]
    peer.sendall(protocol.frame_record(b"two") + protocol.frame_record(b"three"))
    time.sleep(0.05)
    assert link.ready() and link.ready()  # the first byte read ahead once, kept
    assert link.recv_frame(1 << 20) == b"two"
    assert link.ready()
    assert link.recv_frame(1 << 20) == b"three"
    peer.close()
    time.sleep(0.05)
    assert link.ready()  # closed: the next read says so
    assert link.recv_frame(1 << 20) is None
    link.close()


def test_the_rest_of_a_direct_write_goes_before_an_item_another_thread_queued_meanwhile() -> None:
    """A direct write checks that nothing is pending, then writes; another thread may queue an item in between (the
    side reader's error for a bad frame, a drain's end) while the device's thread writes a reply the socket takes
    only in part (a client behind on its reading). The writer must send the rest of that record before that item:
    until round 33's review it took the item first, and its BULK_END went out in the middle of the reply's record
    (the client read a corrupt record instead of the reply and the session's error). The other thread's put is made
    at that moment from the link's send (the timing the race needs, here every time); the socket is real."""
    from gpupool.server.service import DeviceServicer

    s, link, peer = _frames_session()
    filler = 0
    while True:  # the client reads nothing for a while: the socket's buffers fill
        try:
            filler += link.sock.send(b"\0" * 1024)
        except BlockingIOError:
            break
    assert len(peer.recv(4096, socket.MSG_WAITALL)) == 4096  # it reads a little: room for part of the next record
    filler -= 4096
    real_send_now = link.send_now

    def send_now(record: bytes) -> int:
        s.outbox.put(InvalidArgument("malformed ClientFrame"))  # the side reader's, right after the check
        return real_send_now(record)

    link.send_now = send_now  # type: ignore[method-assign]
    frame = bytes(range(256)) * 160  # 40 KiB: more than the socket has room for
    s.send(frame)
    assert s.written_direct == 1 and s.outbox.pending == 2
    got = bytearray()

    def client() -> None:
        while chunk := peer.recv(1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=client)
    reader.start()
    writer = DeviceServicer(s.daemon)
    with pytest.raises(InvalidArgument):
        while True:  # the stream's writer, item by item (`_replies`), until the error ends it
            assert writer._reply_side(s, link, s.outbox.get(timeout=5))
    reader.join(10)
    assert not reader.is_alive() and bytes(got[:filler]) == bytes(filler)
    records = memoryview(got)[filler:]
    kind, _, _, n = protocol.BULK_HEAD.unpack(records[: protocol.BULK_HEAD.size])
    assert (kind, n) == (protocol.BULK_FRAME, len(frame)), "the reply's record was cut by the next one"
    assert records[protocol.BULK_HEAD.size : protocol.BULK_HEAD.size + n] == frame
    records = records[protocol.BULK_HEAD.size + n :]
    kind, code, _, n = protocol.BULK_HEAD.unpack(records[: protocol.BULK_HEAD.size])
    assert kind == protocol.BULK_END and bytes(records[protocol.BULK_HEAD.size :]) == b"malformed ClientFrame"
    peer.close()


# ---- round 37 (slots37): OpenSSL's read-ahead on the side port's TLS (gpupool/tls.py `read_ahead`) ----


def _tls_link(read_ahead: bool = True, buffered: bool = True) -> tuple[bulkside.BulkLink, Any]:
    """A frames link over TLS as the side port makes it (its `SocketServerTls` context, the tests' certificates) on a
    socket pair, non-blocking as bound, and the client's end (blocking). `read_ahead` False: the context as it was
    before round 37 (OpenSSL reads a record's header, then its body). `buffered`: its records in few system calls
    each way, as a bound link's (round 39: `tls.SideSocket.buffer`)."""
    import ssl

    from support import get_pki, tls_socket_pair

    from gpupool import tls

    pki = get_pki()
    server_ctx = tls.SocketServerTls(pki.server_config()).context()
    if not read_ahead:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    ours, theirs = tls_socket_pair(server_ctx, ssl.create_default_context(cafile=pki.ca_file))
    if buffered and read_ahead:
        assert ours.buffer()
    return bulkside.BulkLink(ours, 1, frames=True), theirs


def _read_calls() -> int:
    """The read system calls this thread has made (/proc/thread-self/io `syscr`: OpenSSL reads a socket with read)."""
    with open("/proc/thread-self/io", "rb") as f:
        text = f.read()
    return int(text.split(b"syscr:")[1].split()[0])


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/io"), reason="needs Linux's per-thread I/O counts")
def test_the_side_ports_tls_reads_a_frames_records_in_about_one_system_call_each() -> None:
    """Round 37: the side port's TLS context has OpenSSL's read-ahead on (`tls.read_ahead`). Without it OpenSSL reads
    each TLS record in two system calls, its 5-byte header and then its body: a frame of 7 records (112 KiB), already
    all in the kernel, took 14 reads and more; with it one read takes what OpenSSL's record buffer holds, about a
    record. Counted for this thread by the kernel; the frame read whole, and the old context's count checked too."""
    from gpupool import tls

    records = 7
    frame = bytes((i * 13) & 0xFF for i in range(records * 16384 - 64))
    counts = {}
    for ahead in (True, False):
        link, theirs = _tls_link(ahead)
        assert tls.read_ahead(link.sock.context) or not ahead  # (asking again: it is on)
        theirs.sendall(protocol.frame_record(frame))  # all in the socket pair's buffer before the read
        before = _read_calls()
        got = link.recv_frame(16 * MiB)
        counts[ahead] = _read_calls() - before - 1  # (less the read of the count itself)
        assert got == frame
        link.close()
        theirs.close()
    assert counts[False] >= 2 * records, counts  # the old way, as described
    assert counts[True] <= records + 2, counts


def _client_side(buffered: bool) -> tuple[Any, Any, Any]:
    """A client's side socket over TLS (its `socket_client_context`, the tests' certificates) on a socket pair,
    non-blocking as `client_bulk.connect` leaves it, `buffered` as a connected one (`tls.SideSocket.buffer`): the
    daemon's end (a plain TLS server socket), the client's end and its `BulkSocket`."""
    import ssl

    from gpupool.client import bulk as client_bulk
    from support import get_pki, tls_socket_pair

    from gpupool import tls

    pki = get_pki()
    client_ctx = tls.socket_client_context(pki.client_config())
    assert client_ctx is not None
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    daemon_end, client_end = tls_socket_pair(server_ctx, client_ctx)
    client_end.setblocking(False)
    if buffered:
        assert client_end.buffer()
    return daemon_end, client_end, client_bulk.BulkSocket(client_end)


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/io"), reason="needs Linux's per-thread I/O counts")
def test_the_clients_side_socket_reads_a_downloads_records_in_about_one_system_call_each() -> None:
    """Round 38: the client's side-socket TLS context (`tls.socket_client_context`) has OpenSSL's read-ahead on too,
    as the side port's has since round 37: a download chunk of 7 TLS records, already all in the kernel, is read by
    `BulkSocket.recv_download` in about one read a record, not two (a record's header, then its body: 14 and more
    before; a side-socket download is 64 records a 1 MiB). Counted for this thread by the kernel; the bytes exact."""
    from gpupool import duplex

    daemon_end, client_end, side = _client_side(buffered=False)
    records = 7
    data = bytes((i * 29) & 0xFF for i in range(records * 16384 - 64))
    head = protocol.BULK_HEAD.pack(protocol.BULK_DOWNLOAD, 5, 0, len(data))
    duplex.send_all(daemon_end, threading.Lock(), [head, data], 10.0)  # all in the socket pair's buffer first
    into = bytearray(len(data))
    before = _read_calls()
    side.recv_download(5, 0, memoryview(into))
    reads = _read_calls() - before - 1  # (less the read of the count itself)
    assert bytes(into) == data
    assert reads <= records + 2, reads
    side.close()
    daemon_end.close()


@pytest.mark.parametrize("buffered", [True, False])
def test_frames_openssl_read_ahead_holds_are_read_without_waiting_for_the_socket(buffered: bool) -> None:
    """Read-ahead's hazard: OpenSSL holds whole records the kernel no longer has, so a reader that waited for the
    socket while they sit there would wait for the client's next bytes (forever, for a client waiting for a reply).
    The side reader never does (it waits only after OpenSSL wanted more: gpupool/duplex.py): 60 frames, each its own
    TLS record, sent at once and read by one system call, all come out, `ready` says so for each, then says nothing
    is there, and a frame sent later is waited for and read; the same after a frame big enough to leave a record
    half read. Round 39: the same with the side socket's read buffer (`tls.SideSocket`), which holds what the kernel
    gave beyond OpenSSL's record buffer: OpenSSL wants to read only once both are empty."""
    link, theirs = _tls_link(buffered=buffered)
    frames = [b"frame %d " % k * (1 + k % 5) for k in range(60)]
    for f in frames:
        theirs.sendall(protocol.frame_record(f))  # one TLS record each
    got: list[Any] = []

    def read(n: int) -> None:
        for _ in range(n):
            assert link.ready() or not got  # the frames are there already (the first read waits for the socket)
            raw = link.recv_frame(16 * MiB)
            got.append(None if raw is None else bytes(raw))

    reader = threading.Thread(target=read, args=(len(frames),), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), f"the reader waited with {len(frames) - len(got)} frames in OpenSSL's buffer"
    assert got == frames
    assert not link.ready()  # nothing more: the next read waits for the socket
    big = bytes(range(256)) * 1000  # 256000 bytes: 16 records, the last read in part by a read-ahead
    late: list[Any] = []
    reader = threading.Thread(target=lambda: late.extend(bytes(link.recv_frame(16 * MiB) or b"") for _ in range(3)))
    reader.start()
    time.sleep(0.05)
    for f in (b"late", big, b"after"):
        theirs.sendall(protocol.frame_record(f))
    reader.join(10)
    assert not reader.is_alive()
    assert late == [b"late", big, b"after"]
    link.close()
    theirs.close()


def test_read_ahead_leaves_a_context_alone_where_openssls_functions_are_not_at_hand(monkeypatch: Any) -> None:
    """`tls.read_ahead` degrades to the reads as before (False, the context untouched and working) where it cannot
    reach OpenSSL (another Python's ssl module, an OpenSSL linked in without its symbols)."""
    import ssl

    from gpupool import tls

    monkeypatch.setattr(tls, "_read_ahead_lib", [None])
    ctx = ssl.create_default_context()
    options = ctx.options
    assert tls.read_ahead(ctx) is False
    assert ctx.options == options


# ---- round 40 (front40): a synced frame on a buffered side socket in one read, no EAGAIN ----


def _reads() -> int:
    """This thread's read system calls so far, less the one read that counts them (a single `os.read`)."""
    fd = os.open("/proc/thread-self/io", os.O_RDONLY)
    try:
        text = os.read(fd, 4096)
    finally:
        os.close(fd)
    return int(text.split(b"syscr:")[1].split()[0])


def _wait_readable(sock: Any) -> None:
    import select

    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    assert poller.poll(10_000)


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/io"), reason="needs Linux's per-thread I/O counts")
def test_a_synced_frame_on_a_buffered_side_socket_costs_one_read_system_call() -> None:
    """Round 40: a synced step's frame (header and bytes in one TLS record) on a bound (buffered) TLS side socket is
    read, and `ready` answers that nothing follows it, with one read system call: OpenSSL's read-ahead is off once
    the read buffer is on (it asked for more than the record, and the buffer read the socket again: EAGAIN), and
    `ready` asks the socket's buffers (`tls.SideSocket.held`) instead of reading the kernel (EAGAIN again). Until
    round 40: three reads, two of them EAGAIN. Frames that are in the buffers already are still found by `ready`
    (no read), and a frame sent later is waited for and read whole."""
    link, theirs = _tls_link()
    frame = b"\x08\x07" + b"s" * 83
    theirs.sendall(protocol.frame_record(b"first"))
    assert bytes(link.recv_frame(1 << 20) or b"") == b"first"
    assert not link.ready()
    theirs.sendall(protocol.frame_record(frame))
    _wait_readable(link.sock)
    before = _reads()
    got = link.recv_frame(1 << 20)
    more = link.ready()
    reads = _reads() - before - 1  # (less the read of `before`'s count)
    assert got is not None and bytes(got) == frame
    assert not more
    assert reads == 1, reads
    theirs.sendall(protocol.frame_record(b"one") + protocol.frame_record(b"two"))
    _wait_readable(link.sock)
    before = _reads()
    first = link.recv_frame(1 << 20)
    more = link.ready()
    second = link.recv_frame(1 << 20)
    reads = _reads() - before - 1
    assert first is not None and bytes(first) == b"one"
    assert more  # the second frame is in the read buffer: found without a read
    assert second is not None and bytes(second) == b"two"
    assert reads == 1, reads
    assert not link.ready()
    late: list[Any] = []
    reader = threading.Thread(target=lambda: late.append(link.recv_frame(1 << 20)))
    reader.start()  # waits for the socket
    time.sleep(0.05)
    theirs.sendall(protocol.frame_record(b"late"))
    reader.join(10)
    assert late and late[0] is not None and bytes(late[0]) == b"late"
    theirs.close()
    _wait_readable(link.sock)
    assert link.recv_frame(1 << 20) is None  # the client closed between frames
    link.close()


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/io"), reason="needs Linux's per-thread I/O counts")
def test_the_clients_side_socket_reads_a_reply_record_in_one_system_call() -> None:
    """Round 40: the client's end reads a small reply record (`BulkSocket.recv_record`, header in one call) on its
    buffered TLS side socket with one read system call (until round 40: the header's first byte, then its rest,
    and OpenSSL's read-ahead made the read buffer read the socket again: two reads, one of them EAGAIN)."""
    from gpupool import duplex

    daemon_end, client_end, side = _client_side(buffered=True)
    reply = b"\x08\x07\x12\x04\x08\x01\x10\x02"
    duplex.send_all(daemon_end, threading.Lock(), [protocol.frame_record(reply)], 10.0)
    _wait_readable(client_end)
    before = _reads()
    kind, _, body = side.recv_record()
    reads = _reads() - before - 1
    assert (kind, bytes(body)) == (protocol.BULK_FRAME, reply)
    assert reads == 1, reads
    side.close()
    daemon_end.close()


def _count_calls(sock: Any, name: str) -> list[int]:
    """Count the calls of `sock`'s method `name` (an instance attribute over the class's: this socket only)."""
    calls = [0]
    inner = getattr(sock, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return inner(*args, **kwargs)

    setattr(sock, name, counted)
    return calls


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/io"), reason="needs Linux's per-thread I/O counts")
def test_a_reply_waited_for_is_read_in_one_call_with_no_read_before_it_comes() -> None:
    """Round 41 (front41): a synced call's reply is not there yet when the client's reader comes for it: with
    nothing held by its end (`tls.SideSocket.held`), the reader waits for the socket first, then reads the record
    (header and bytes, one TLS record) in one read of its buffer (`records.Reader`): one read system call and one
    OpenSSL read. Until round 41: a read that met EAGAIN (raised SSLWantReadError), then the header's read, then the
    body's: two system calls and three OpenSSL reads a reply."""
    daemon_end, client_end, side = _client_side(buffered=True)
    reply = b"\x08\x07\x12\x04\x08\x01\x10\x02"
    duplex_send(daemon_end, protocol.frame_record(reply))  # (the first: TLS's session tickets read with it)
    assert side.recv_record() == (protocol.BULK_FRAME, 0, reply)
    recv_calls = _count_calls(client_end, "recv_into")
    got: list[Any] = []

    def read() -> None:
        before = _reads()
        record = side.recv_record()
        got.append((record, _reads() - before - 1))

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.2)  # (the reader waits for the reply)
    duplex_send(daemon_end, protocol.frame_record(reply))
    reader.join(10)
    (kind, _, body), reads = got[0]
    assert (kind, bytes(body)) == (protocol.BULK_FRAME, reply)
    assert reads == 1, reads
    assert recv_calls[0] == 1, recv_calls[0]
    side.close()
    daemon_end.close()


def duplex_send(sock: Any, data: bytes) -> None:
    from gpupool import duplex

    duplex.send_all(sock, threading.Lock(), [data], 10.0)


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/io"), reason="needs Linux's per-thread I/O counts")
def test_the_daemons_reader_waits_for_a_frame_without_a_read_that_finds_nothing() -> None:
    """Round 41 (front41): the side reader comes back for the next frame without asking `ready` first (a lone
    Sync answered on the fast path, `DeviceServicer._frame`): with nothing held it waits for the socket, then reads
    the frame in one read (one OpenSSL read, header and bytes). Until round 41: a read that met EAGAIN first, and the
    header's and the body's OpenSSL reads."""
    link, theirs = _tls_link()
    frame = protocol.sync_frame(7)
    recv_calls = _count_calls(link.sock, "recv_into")
    got: list[Any] = []

    def read() -> None:
        before = _reads()
        raw = link.recv_frame(1 << 20)
        got.append((raw, _reads() - before - 1))

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.2)
    theirs.sendall(protocol.frame_record(frame))
    reader.join(10)
    raw, reads = got[0]
    assert raw is not None and bytes(raw) == frame
    assert reads == 1, reads
    assert recv_calls[0] == 1, recv_calls[0]
    link.close()
    theirs.close()


def test_records_that_share_tls_records_are_each_read_whole_on_both_ends() -> None:
    """Pins what holds since round 24 and must hold through round 41's read buffer (`records.Reader`): a peer may put
    several records, or parts of them, in one TLS record (one write): the daemon reads a frame, then an upload's
    header and bytes that came with it in the same write, then a frame cut across writes; the client reads a reply,
    then a download's header and bytes (some of them in the reply's write, the rest straight into the tensor), then
    the session's end. Every byte where it belongs, nothing read twice or lost."""
    link, theirs = _tls_link()
    data = bytes(range(256)) * 1024  # 256 KiB: past the read buffer
    up = device_pb2.Upload(handle=5, offset=0, last=True, bulk_bytes=len(data))
    first = b"\x0a\x02\x08\x01"
    upload = protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, 5, 0, len(data)) + data
    late = b"\x0a\x03" + b"z" * 300
    sender = threading.Thread(
        target=lambda: (
            theirs.sendall(protocol.frame_record(first) + upload[:1000]),
            theirs.sendall(upload[1000:] + protocol.frame_record(late)[:7]),
            theirs.sendall(protocol.frame_record(late)[7:]),
        )
    )
    sender.start()
    assert bytes(link.recv_frame(1 << 20) or b"") == first
    span = link.recv_upload(up)
    assert bytes(span[len(span) - len(data) :]) == data
    assert bytes(link.recv_frame(1 << 20) or b"") == late
    sender.join(10)
    assert not link.ready()
    link.close()
    theirs.close()

    daemon_end, client_end, side = _client_side(buffered=True)
    reply = b"\x08\x07\x12\x04\x08\x01\x10\x02"
    download = protocol.BULK_HEAD.pack(protocol.BULK_DOWNLOAD, 9, 0, len(data)) + data
    end = protocol.BULK_HEAD.pack(protocol.BULK_END, 3, 0, 4) + b"gone"
    lock = threading.Lock()
    from gpupool import duplex

    sender = threading.Thread(
        target=lambda: (
            duplex.send_all(daemon_end, lock, [protocol.frame_record(reply) + download[:5000]], 10.0),
            duplex.send_all(daemon_end, lock, [download[5000:] + end], 10.0),
        )
    )
    sender.start()
    assert side.recv_record() == (protocol.BULK_FRAME, 0, reply)
    into = bytearray(len(data))
    side.recv_download(9, 0, memoryview(into))
    assert bytes(into) == data
    assert side.recv_record() == (protocol.BULK_END, 3, b"gone")
    sender.join(10)
    side.close()
    daemon_end.close()


def test_frames_sent_right_behind_the_hello_are_read_though_openssl_read_them_ahead() -> None:
    """frontrev41: a client may send its first frames right behind its hello, without waiting for the BULK_OK
    (docs/wire.md does not ask it to wait). The side port reads the hello with OpenSSL's read-ahead on
    (`tls.read_ahead`), which takes those frames' TLS records off the socket with it, whole and not yet opened;
    SSL_pending counts none of them, so until this fix `tls.SideSocket.held` said 0 once the socket was buffered,
    and the reader (`records.Reader`, round 41) waited for the socket with the frames already here: the session hung
    until its client sent more. Both frames read, `ready` finding the second, and nothing held after them."""
    import ssl

    from support import get_pki, tls_socket_pair

    from gpupool import tls

    pki = get_pki()
    server_ctx = tls.SocketServerTls(pki.server_config()).context()
    ours, theirs = tls_socket_pair(server_ctx, ssl.create_default_context(cafile=pki.ca_file), tcp=True)
    first, second = b"\x0a\x02\x08\x01", b"\x0a\x03" + b"z" * 40
    theirs.sendall(b"HELLO")  # each its own TLS record, all sent before the daemon reads the hello
    theirs.sendall(protocol.frame_record(first))
    theirs.sendall(protocol.frame_record(second))
    ours.setblocking(True)
    _wait_readable(ours)
    time.sleep(0.2)  # (all three records in the kernel's buffer)
    assert protocol.recv_exact(ours, 5, "closed") == b"HELLO"  # as `BulkPort._hello` reads it
    ours.setblocking(False)
    assert ours.buffer()
    link = bulkside.BulkLink(ours, 1, frames=True)
    got: list[Any] = []

    def read() -> None:
        got.append(bytes(link.recv_frame(1 << 20) or b""))
        got.append(link.ready())
        got.append(bytes(link.recv_frame(1 << 20) or b""))
        got.append(link.ready())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    assert got == [first, True, second, False], got
    assert ours.held() == 0
    link.close()
    theirs.close()


def _switches(tid: int) -> int:
    """A thread's context switches so far (voluntary and not: each wake-up of a sleeping thread is one)."""
    with open(f"/proc/self/task/{tid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if "ctxt_switches" in line)
    return sum(int(v) for v in fields.values())


def test_the_side_ports_accept_loop_sleeps_while_nothing_is_pending_and_wakes_to_push_out_a_late_hello(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Round 45: an idle side port's accept thread sleeps in `accept` (until round 45 it woke every 0.25 s, a
    TimeoutError each, ~9.6k instructions, whatever the load); a connection that sends no hello is still pushed out
    when its hello is due (the loop waits in `accept` until then), and `stop` ends the thread."""
    from gpupool import tls

    monkeypatch.setattr(bulkside, "HELLO_TIMEOUT", 0.5)
    port = bulkside.BulkPort(("127.0.0.1", 0), tls.TlsConfig(insecure=True), lambda: [])
    try:
        tid = port._thread.native_id
        assert tid is not None
        time.sleep(0.2)  # (its start)
        before = _switches(tid)
        time.sleep(1.5)
        assert _switches(tid) - before <= 1, "the idle accept loop woke up"
        with socket.create_connection(("127.0.0.1", port.port), timeout=10) as silent:
            t0 = time.monotonic()
            silent.settimeout(10)
            try:
                got = silent.recv(1)
            except ConnectionResetError:
                got = b""
            assert got == b"" and time.monotonic() - t0 < 5, "a silent connection past its hello's due time"
    finally:
        port.stop()
    port._thread.join(5)
    assert not port._thread.is_alive(), "stop should end the accept loop"
