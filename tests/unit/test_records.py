"""gpupool/records.py, the side socket's records as both ends read them, through each end's reader: the client's
reply reader (client/bulk.py `recv_record`: frames and the session's end, up to its bound) and the daemon's frame
reader (server/bulkside.py `recv_frame`, its own tests in test_server_bulkside.py) on real socket pairs."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from gpupool.client import bulk as client_bulk
from gpupool.server import bulkside

from gpupool import protocol, records
from gpupool.errors import InvalidArgument, Unavailable


def _pair() -> tuple[client_bulk.BulkSocket, socket.socket]:
    a, b = socket.socketpair()
    return client_bulk.BulkSocket(a, frames=True), b


def test_the_client_reads_frames_and_the_sessions_end() -> None:
    sock, peer = _pair()
    big = bytes(range(256)) * (records.STEP // 64)  # past the first buffer: it grows
    reason = b"session closed: detached"
    sent = protocol.frame_record(big) + protocol.BULK_HEAD.pack(protocol.BULK_END, 9, 0, len(reason)) + reason
    sender = threading.Thread(target=peer.sendall, args=(sent,))  # more than the pair's buffers hold
    sender.start()
    assert sock.recv_record() == (protocol.BULK_FRAME, 0, big)
    assert sock.recv_record() == (protocol.BULK_END, 9, reason)
    sender.join()
    peer.close()
    with pytest.raises(Unavailable, match="closed"):
        sock.recv_record()


@pytest.mark.parametrize(
    ("sent", "error", "match"),
    [
        (protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, 0, 0, 4) + b"abcd", InvalidArgument, "expected a frame record"),
        (protocol.BULK_HEAD.pack(protocol.BULK_FRAME, 0, 0, client_bulk.MAX_REPLY_BYTES + 1), InvalidArgument, "of"),
        (protocol.BULK_HEAD.pack(protocol.BULK_FRAME, 0, 0, 100) + b"x" * 10, Unavailable, "middle of a record"),
        (protocol.BULK_HEAD.pack(protocol.BULK_FRAME, 0, 0, 100)[:5], Unavailable, "middle of a record"),
        # the session's end is a reason of a few words: a longer one is refused, not read (round 29 read up to 64 MiB)
        (protocol.BULK_HEAD.pack(protocol.BULK_END, 9, 0, protocol.BULK_END_BYTES + 1) + b"x" * 4097, InvalidArgument,
         f"kind 4 of {protocol.BULK_END_BYTES + 1} bytes"),
    ],
    ids=["upload_kind", "oversized_frame", "truncated_body", "truncated_head", "long_end"],
)  # fmt: skip
def test_the_client_refuses_bad_records(sent: bytes, error: type[Exception], match: str) -> None:
    sock, peer = _pair()
    peer.sendall(sent)
    peer.close()
    with pytest.raises(error, match=match):
        sock.recv_record()


def test_both_ends_share_the_buffers_step() -> None:
    assert bulkside.FRAME_STEP == records.STEP


def test_the_daemon_cuts_a_sessions_end_to_what_the_client_reads() -> None:
    ours, theirs = socket.socketpair()
    link = bulkside.BulkLink(ours, 1, frames=True)
    sock = client_bulk.BulkSocket(theirs, frames=True)
    try:
        link.send_end(3, "why " * 2000)  # 8000 bytes of reason
        kind, code, body = sock.recv_record()
        assert (kind, code, len(body)) == (protocol.BULK_END, 3, protocol.BULK_END_BYTES)
        assert body == ("why " * 2000).encode()[: protocol.BULK_END_BYTES]
    finally:
        link.close()
        sock.close()


def test_the_read_buffer_moves_a_records_start_to_make_room_and_keeps_every_byte() -> None:
    """Round 41's read buffer (`records.Reader`) on a small buffer: a record whose bytes would run past the buffer's
    end moves what is buffered of it to the front first (the two ranges overlap: a copy), a record longer than the
    buffer comes in part from it and the rest straight from the socket, and a header cut by the buffer's end is
    completed. Bytes exact, in order; the peer's close between records reads as the end, inside one as EOFError."""
    a, b = socket.socketpair()
    reader = records.Reader(a, threading.Lock(), size=256)
    bodies = [b"x", bytes(range(250)), bytes(range(256)) * 3, b"y" * 200, b"z" * 40]
    sent = b"".join(protocol.BULK_HEAD.pack(protocol.BULK_FRAME, i, 0, len(x)) + x for i, x in enumerate(bodies))
    b.sendall(sent + protocol.BULK_HEAD.pack(protocol.BULK_FRAME, 9, 0, 10) + b"cut")
    b.close()
    for i, body in enumerate(bodies):
        assert reader.head(None) == (protocol.BULK_FRAME, i, 0, len(body))
        assert reader.body(len(body), None) == body
    assert reader.head(None) == (protocol.BULK_FRAME, 9, 0, 10)
    with pytest.raises(EOFError):
        reader.body(10, None)
    a.close()
    c, d = socket.socketpair()
    reader = records.Reader(c, threading.Lock(), size=256)
    d.sendall(protocol.frame_record(b"last"))
    d.close()
    assert reader.head(None) == (protocol.BULK_FRAME, 0, 0, 4)
    assert reader.body(4, None) == b"last"
    assert reader.head(None) is None
    c.close()


@pytest.mark.parametrize("tls_socket", [False, True], ids=["plain", "tls"])
def test_the_read_buffer_keeps_every_byte_whatever_the_writes_cut(tls_socket: bool) -> None:
    """Pins what holds in round 41's read buffer (`records.Reader`; frontrev41's byte-level fuzz, 800 cases, found
    no fault): records of lengths around the header's and the buffer's sizes (0, 1, a header's, a buffer's, one
    more or less, TLS's 16 KiB, past the buffer), read by `body`, `body_into` and `transfer` in turn, with `peek`
    between records, from a peer that writes them in cuts of 1 byte, at random places, or at once (over a buffered
    TLS side socket: each write its own TLS record, a header cut across records). Every byte where it belongs,
    nothing written past a destination's end, the close read as the end."""
    import random
    import ssl

    from support import get_pki, tls_socket_pair

    from gpupool import tls

    head = protocol.BULK_HEAD.size
    for seed in range(12):
        rng = random.Random(seed)
        size = rng.choice([head, head + 1, 2 * head, 2 * head + 1, 100, records.READ_BUFFER])
        lens = [0, 1, head - 1, head, head + 1, size - 1, size, size + 1, 2 * size, 16384, 16385]
        recs = []
        for i in range(rng.randint(4, 14)):
            n = rng.choice(lens) if rng.random() < 0.7 else rng.randint(0, 3 * size)
            recs.append((rng.choice(["body", "body_into", "transfer"]), i + 1, rng.getrandbits(40), rng.randbytes(n)))
        stream = b"".join(
            protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD if m == "transfer" else protocol.BULK_FRAME, i, o, len(d)) + d
            for m, i, o, d in recs
        )
        if tls_socket:
            server_ctx = tls.SocketServerTls(get_pki().server_config()).context()
            ours, theirs = tls_socket_pair(server_ctx, ssl.create_default_context(cafile=get_pki().ca_file))
            assert ours.buffer()
        else:
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
        reader = records.Reader(ours, threading.Lock(), size=size)
        cuts = rng.choice(["one", "bytes", "random"])
        done = threading.Event()

        def send(
            stream: bytes = stream, cuts: str = cuts, rng: random.Random = rng, theirs: Any = theirs, done: Any = done
        ) -> None:
            pos = 0
            while pos < len(stream):
                k = {"one": len(stream), "bytes": 1, "random": rng.randint(1, 3 * head)}[cuts]
                theirs.sendall(stream[pos : pos + k])
                pos += k
            socket.socket.shutdown(theirs, socket.SHUT_WR)
            done.wait(20)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            for mode, ident, offset, data in recs:
                if rng.random() < 0.5:
                    reader.peek()
                if mode == "transfer":
                    into = bytearray(len(data) + 3)
                    want = (protocol.BULK_UPLOAD, ident, offset, len(data))
                    assert reader.transfer(want, memoryview(into)[: len(data)], 10.0) is None
                    assert into == data + b"\0\0\0", seed
                    continue
                assert reader.head(10.0) == (protocol.BULK_FRAME, ident, offset, len(data)), seed
                if mode == "body":
                    assert reader.body(len(data), 10.0) == data, seed
                else:
                    view = reader.body_into(len(data), 10.0, bytearray(rng.choice([0, 10, 200_000])))
                    assert view == data, seed
                    del view
            assert reader.head(10.0) is None, seed
        finally:
            done.set()
            sender.join(10)
            ours.close()
            theirs.close()


def test_a_record_comes_with_its_header_in_one_call_where_all_of_it_is_here() -> None:
    """`Reader.record` (round 42, front42: both ends' frame and reply reads, `head` and `body` in one call): a small
    record's header and bytes together; a record longer than what is buffered, its header with None (the caller
    checks it, then reads the bytes with `body`); a session's end; None at the peer's close between records, and
    EOFError for a header cut by the close."""
    a, b = socket.socketpair()
    a.setblocking(False)
    reader = records.Reader(a, threading.Lock(), size=256)
    reason = b"bye"
    b.sendall(
        protocol.frame_record(b"small")
        + protocol.frame_record(b"x" * 1000)
        + protocol.BULK_HEAD.pack(protocol.BULK_END, 7, 0, len(reason))
        + reason
    )
    assert reader.record() == (protocol.BULK_FRAME, 0, 0, 5, b"small")
    got = reader.record()
    assert got is not None and got[:4] == (protocol.BULK_FRAME, 0, 0, 1000) and got[4] is None
    assert reader.body(1000, None) == b"x" * 1000
    assert reader.record() == (protocol.BULK_END, 7, 0, 3, b"bye")
    b.sendall(protocol.frame_record(b"last"))
    b.close()
    assert reader.record() == (protocol.BULK_FRAME, 0, 0, 4, b"last")
    assert reader.record() is None
    a.close()
    c, d = socket.socketpair()
    c.setblocking(False)
    reader = records.Reader(c, threading.Lock())
    d.sendall(protocol.frame_record(b"cut")[:10])
    d.close()
    with pytest.raises(EOFError):
        reader.record()
    c.close()


def test_a_readers_waits_for_its_socket_poll_one_poll_object(monkeypatch: Any) -> None:
    """A synced call's reply (or the next synced frame) is not there when its reader comes for it, so each record
    is a wait for the socket: `Reader` keeps one poll object for its socket's life (round 42, front42; a fresh one
    and its registration each wait, gpupool/duplex.py's way until then, cost about a microsecond). 30 replies to 30
    synced frames over a buffered TLS side socket, the client's reader waiting for each: one poll object made, every
    reply read whole (on ca5fb68: 30 made)."""
    import select

    from support import get_pki, tls_socket_pair

    from gpupool import tls

    server_ctx = tls.SocketServerTls(get_pki().server_config()).context()
    ours, theirs = tls_socket_pair(server_ctx, tls.socket_client_context(get_pki().client_config()), tcp=True)
    theirs.setblocking(False)
    assert ours.buffer() and theirs.buffer()
    link = bulkside.BulkLink(ours, 1, frames=True)
    client = client_bulk.BulkSocket(theirs, frames=True)
    made = []
    real_poll = select.poll

    def counted() -> Any:
        made.append(threading.get_ident())
        return real_poll()

    def daemon() -> None:
        for i in range(30):
            frame = link.recv_frame(1 << 20)
            assert frame == b"frame %d" % i
            link.send_frame(b"reply %d" % i)

    server = threading.Thread(target=daemon)
    server.start()
    monkeypatch.setattr(select, "poll", counted)
    try:
        for i in range(30):
            client.send_frame(b"frame %d" % i)
            assert client.recv_record() == (protocol.BULK_FRAME, 0, b"reply %d" % i)
    finally:
        monkeypatch.setattr(select, "poll", real_poll)
        server.join(10)
        link.close()
        client.close()
    mine = [t for t in made if t == threading.get_ident()]
    assert len(mine) <= 1, f"{len(mine)} poll objects made for 30 replies' waits"
