"""The bulk side channel (server/bulkside.py, client/bulk.py) against real daemons on loopback, TLS and plaintext:
byte-exact round trips, credentials, garbage frames, fallback, a detach in the middle of a transfer."""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import struct
import threading
import time
from typing import Any

import pytest
import torch
from gpupool.client import bulk as client_bulk
from gpupool.client.session import CHANNEL_OPTIONS, Handle, Session
from gpupool.server import bulkside, slices
from support import TcpRelay, get_pki, shut
from test_daemon_quota import used_bytes

from gpupool import duplex, hostpool, protocol, tls, wire
from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2
from gpupool.errors import FailedPrecondition, GpupoolError, InvalidArgument

MiB = 1024**2


@pytest.fixture(params=["tls", "plaintext"])
def bulk_daemon(request: Any, daemon_factory: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A daemon with its side port on, in TLS (the tests' PKI) or plaintext (`--insecure`, client insecure too)."""
    if request.param == "plaintext":
        monkeypatch.setenv("GPUPOOL_INSECURE", "1")
        return daemon_factory(fake_gpu_memory=640 * MiB, bulk_listen="127.0.0.1:0", tls=tls.TlsConfig(insecure=True))
    return daemon_factory(fake_gpu_memory=640 * MiB, bulk_listen="127.0.0.1:0")


def _send_raw(side: client_bulk.BulkSocket, data: bytes) -> None:
    """Bytes of the test's choosing on a session's side socket (non-blocking: gpupool/duplex.py's send)."""
    duplex.send_all(side.sock, side.lock, [data], 30.0)


def _put(s: Session, frame: bytes) -> None:
    """Queue a frame of the test's choosing; where the session's frames use its side socket (round 26), until its
    sender thread has written it, so that bytes the test writes next follow it there."""
    s._put(frame)
    if s._carrier is not None:
        try:
            s._side_barrier()
        except GpupoolError:
            pass  # the daemon ended the session already: the test's next wait raises its reason


def _bits(n_bytes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n_bytes // 4,), dtype=torch.int32, generator=g)


def test_large_round_trips_are_byte_exact(bulk_daemon: Any) -> None:
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        assert s._side is not None, "the session should have bound its side socket"
        for n in (MiB, 4 * MiB + 12, 64 * MiB + 4):
            big = _bits(n, seed=n).view(torch.float32)  # NaN bit patterns included
            h = s.upload(big)
            back = s.download(h)
            assert torch.equal(back.view(torch.int32), big.view(torch.int32))
        small = torch.arange(10.0)  # below the thresholds: stream only, in the same session
        assert torch.equal(s.download(s.upload(small)), small)
        x = torch.randn(2 * MiB)
        [doubled] = s.call("aten::mul.Tensor", s.upload(x), 2.0)  # ops see what the side socket carried
        assert torch.equal(s.download(doubled), x * 2)


def test_downloads_reuse_only_memory_the_caller_dropped(bulk_daemon: Any) -> None:
    """gpupool/hostpool.py under real downloads: a second download of the same size while the first is held gets
    its own memory (the first keeps its values); once the caller dropped one (and its views), the next download
    lands in its memory, byte-exact; a download that fails never shows the caller a reused tensor."""
    pool = hostpool.pool()
    if pool.keep < 32 * MiB:
        pytest.skip(f"download reuse is off or small here ({hostpool.ENV})")
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        one, two = _bits(16 * MiB, seed=1), _bits(16 * MiB, seed=2)
        h1, h2 = s.upload(one), s.upload(two)
        first = s.download(h1)
        view = first[5:]
        second = s.download(h2)  # the first is held: its memory is not this one's
        assert first.data_ptr() != second.data_ptr()
        assert torch.equal(first, one) and torch.equal(second, two)
        where, reused = first.data_ptr(), pool.reused
        del first
        third = s.download(h2)  # a view of the first is still held
        assert third.data_ptr() != where and torch.equal(third, two) and torch.equal(view, one[5:])
        del view, third
        fourth = s.download(h1)
        assert pool.reused > reused and torch.equal(fourth, one)
        assert fourth.data_ptr() != second.data_ptr()  # (held: never reused)
        s.free([h1])
        with pytest.raises(GpupoolError):
            s.download(h1)  # freed: an error, never a tensor
        assert torch.equal(second, two) and torch.equal(fourth, one)


def test_uploads_reuse_only_memory_the_session_freed(bulk_daemon: Any) -> None:
    """server/uploadpool.py in a real session worker: an upload while a view of a freed one's tensor is held keeps
    the view's values; once nothing refers to it, the next upload of that size lands in its memory, byte-exact; a
    half-sent upload there is never read, and the session's count is what it holds (tests/unit/
    test_server_upload_pool.py shows which memory each upload took)."""
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        one, two, three = (_bits(16 * MiB, seed=k) for k in (11, 12, 13))
        h1 = s.upload(one)
        [view] = s.call("aten::slice.Tensor", Handle(h1), 0, 5)
        s.free([h1])
        h2 = s.upload(two)  # the view holds the first one's memory
        assert torch.equal(s.download(view), one[5:]) and torch.equal(s.download(h2), two)
        s.free([view, h2])
        h3 = s.upload(three)
        assert torch.equal(s.download(h3), three)
        s.free([h3])
        s.sync()
        assert used_bytes(bulk_daemon.address, s) == 0
        h4 = s.handle_base + 999  # the first 4 MiB of a 16 MiB upload, the rest never sent
        meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(torch.int32), shape=[4 * MiB])
        first = one[:MiB].numpy().tobytes()
        s._add(device_pb2.Command(upload=device_pb2.Upload(handle=h4, meta=meta, data=first, last=False)))
        with pytest.raises(FailedPrecondition, match="still being uploaded"):
            s.download(h4)
        assert used_bytes(bulk_daemon.address, s) == 16 * MiB
        s.free([h4])
        assert torch.equal(s.download(s.upload(two)), two)


def test_round_trip_in_thread_isolation(daemon_factory: Any) -> None:
    d = daemon_factory(fake_gpu_memory=128 * MiB, bulk_listen="127.0.0.1:0", isolation="thread")
    with Session.attach(d.address, d.token()) as s:
        assert s._side is not None
        big = _bits(20 * MiB + 8, seed=3)
        assert torch.equal(s.download(s.upload(big)), big)


def _raw_side(address: str, port: int, insecure: bool) -> socket.socket:
    """A bare connection to the side port (TLS as the tests' client certificate, unless plaintext)."""
    host = address.rsplit(":", 1)[0]
    sock = socket.create_connection((host, port), timeout=10)
    ctx = tls.socket_client_context(tls.client_config(insecure=insecure))
    return ctx.wrap_socket(sock, server_hostname=host) if ctx is not None else sock


def _hello_answer(sock: socket.socket, session_id: str) -> bytes:
    sock.sendall(protocol.bulk_hello(session_id))
    answer = sock.recv(1)
    if answer == protocol.BULK_OK:
        return answer
    (n,) = struct.unpack("<H", protocol.recv_exact(sock, 2, "the daemon closed the bulk socket"))
    return protocol.recv_exact(sock, n, "the daemon closed the bulk socket")


def _closed_without_answer(sock: socket.socket) -> bool:
    try:
        return sock.recv(10) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


def _side_port(d: Any) -> int:
    return int(d.running.bulk.port)


def _insecure(d: Any) -> bool:
    return bool(d.running.daemon.config.tls.insecure)


def test_wrong_forged_and_second_credentials_are_refused(bulk_daemon: Any) -> None:
    port, insecure = _side_port(bulk_daemon), _insecure(bulk_daemon)
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        assert s._side is not None
        forged = s.session_id[:-1] + ("A" if s.session_id[-1] != "A" else "B")
        for sid in (forged, "", "x" * 100):
            with _raw_side(bulk_daemon.address, port, insecure) as sock:
                assert _hello_answer(sock, sid) == b"unknown or closed session"
        with _raw_side(bulk_daemon.address, port, insecure) as sock:  # its own id again: one socket per session
            assert b"already has a bulk socket" in _hello_answer(sock, s.session_id)
        with _raw_side(bulk_daemon.address, port, insecure) as sock:  # not a hello at all
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert _closed_without_answer(sock)
        big = torch.randn(3 * MiB)  # the session's own socket still works
        assert torch.equal(s.download(s.upload(big)), big)


def test_tls_side_port_refuses_plaintext_and_clients_without_certificates(daemon_factory: Any) -> None:
    """The side port is never weaker than the gRPC port: with client certificates required there, a TLS client
    without one is refused in the handshake, and plaintext gets nothing."""
    server = dataclasses.replace(get_pki().server_config(), client_auth="require")
    d = daemon_factory(bulk_listen="127.0.0.1:0", tls=server)
    host, port = "127.0.0.1", _side_port(d)
    with Session.attach(d.address, d.token()) as s:
        assert s._side is not None  # the tests' client certificate is signed by the CA
        with socket.create_connection((host, port), timeout=10) as sock:  # plaintext to a TLS port
            sock.sendall(protocol.bulk_hello(s.session_id))
            assert _closed_without_answer(sock)
        ctx = ssl.create_default_context(cafile=get_pki().ca_file)  # TLS, but no client certificate
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with ctx.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname=host) as sock:
                sock.sendall(protocol.bulk_hello(s.session_id))  # TLS 1.3: the refusal arrives with the first read
                if sock.recv(1) == b"":
                    raise ConnectionResetError("closed")
        big = torch.randn(3 * MiB)
        assert torch.equal(s.download(s.upload(big)), big)


def test_garbage_on_the_side_socket_ends_that_session_only(bulk_daemon: Any) -> None:
    """A client that announces an upload and sends other bytes (a wrong header, then raw garbage) gets a clear
    INVALID_ARGUMENT; a second session streaming big transfers at the same time is untouched."""
    other_errors: list[BaseException] = []
    stop = threading.Event()

    def other() -> None:
        try:
            with Session.attach(bulk_daemon.address, bulk_daemon.token(lease_id="other")) as s2:
                while not stop.is_set():
                    x = torch.randn(2 * MiB)
                    assert torch.equal(s2.download(s2.upload(x)), x)
        except BaseException as exc:  # noqa: BLE001 - reported below
            other_errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    try:
        for header in (
            protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, 999, 0, 2 * MiB),  # another handle
            b"\xff" * protocol.BULK_HEAD.size,  # garbage
        ):
            with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
                assert s._side is not None
                h = s.new_handle()
                up = device_pb2.Upload(handle=h, last=True, bulk_bytes=2 * MiB)
                up.meta.dtype, up.meta.shape[:] = 1, [MiB // 2]  # float32
                _put(s, device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString())
                try:
                    _send_raw(s._side, header + b"\x00" * (2 * MiB))
                except OSError:
                    pass  # the daemon may close the socket before the rest arrives
                with pytest.raises(InvalidArgument, match="bulk socket of session"):
                    s.sync()
        with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:  # an announced upload that never comes
            up = device_pb2.Upload(handle=s.new_handle(), last=True, bulk_bytes=protocol.CHUNK_BYTES + 1)
            _put(s, device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString())
            with pytest.raises(InvalidArgument, match="at most"):
                s.sync()
    finally:
        stop.set()
        t.join(60)
    assert not other_errors, other_errors


@pytest.mark.parametrize("carrier", ["stream", "side"])
def test_a_frame_announcing_many_bulk_chunks_is_refused(bulk_daemon: Any, carrier: str, monkeypatch: Any) -> None:
    """The stream's reader reads a frame's bulk uploads into the daemon's memory before the frame meets its
    session queue's back-pressure (64 MiB): a frame of 4,096 tiny Upload commands each announcing 16 MiB made the
    daemon hold 64 GiB (round 17). A frame's bulk uploads now announce at most the queue's bytes in all (clients
    send one chunk a frame): the seventeenth 4 MiB chunk of one frame is INVALID_ARGUMENT, before its bytes are
    read (before, all 68 MiB were read and uploaded); the next session uploads the same tensor chunk by chunk.
    Both carriers of the frame: its stream, and its side socket (round 26), where the chunks' bytes follow the frame
    on the same socket (written in order here, not from a second thread)."""
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1" if carrier == "side" else "0")
    chunk = client_bulk.CHUNK
    n = 17
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        assert s._side is not None
        h = s.new_handle()
        cmds = []
        for k in range(n):
            up = device_pb2.Upload(handle=h, offset=k * chunk, last=k == n - 1, bulk_bytes=chunk)
            if k == 0:
                up.meta.dtype, up.meta.shape[:] = 1, [n * chunk // 4]  # float32
            cmds.append(device_pb2.Command(upload=up))
        _put(s, device_pb2.ClientFrame(commands=cmds).SerializeToString())
        side = s._side

        def send() -> None:
            try:
                for k in range(n):
                    _send_raw(side, protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, h, k * chunk, chunk) + bytes(chunk))
            except OSError:
                pass  # the daemon closes the socket with the session

        assert side.frames == (carrier == "side")
        t = threading.Thread(target=send, daemon=True)
        if carrier == "side":
            s._side_barrier()  # the frame is on the socket (its sender thread's): the chunks' bytes follow it
            for k in range(n - 1):  # the daemon reads 16 chunks (64 MiB), then refuses the 17th's announcement
                _send_raw(side, protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, h, k * chunk, chunk) + bytes(chunk))
        else:
            t.start()
        with pytest.raises(InvalidArgument, match="announce more than"):
            s.sync()
    if t.is_alive():
        t.join(30)
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        big = _bits(n * chunk, seed=5)
        assert torch.equal(s.download(s.upload(big)), big)


def test_a_bulk_chunk_over_the_workers_chunk_size_is_refused_before_it_is_read(bulk_daemon: Any) -> None:
    """The worker refuses an upload chunk over `protocol.CHUNK_BYTES` (4 MiB); the side channel's reader accepted
    `bulk_bytes` up to 16 MiB and read them into the daemon's memory first, for the worker to refuse. The reader
    now refuses with the worker's bound, before reading: its message, not the worker's ("exceeds"), comes back
    although the 16 MiB follow on the socket; the next session uploads a whole chunk."""
    n = 4 * protocol.CHUNK_BYTES
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        assert s._side is not None
        h = s.new_handle()
        up = device_pb2.Upload(handle=h, last=True, bulk_bytes=n)
        up.meta.dtype, up.meta.shape[:] = 1, [n // 4]  # float32
        _put(s, device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString())
        side = s._side

        def send() -> None:
            try:
                _send_raw(side, protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, h, 0, n) + bytes(n))
            except OSError:
                pass  # the daemon closes the socket with the session

        t = threading.Thread(target=send, daemon=True)
        if s._carrier is None:  # (frames on the socket: no bytes from a second thread beside them; none needed)
            t.start()
        with pytest.raises(InvalidArgument, match=f"a bulk chunk of {n} bytes; at most {protocol.CHUNK_BYTES} "):
            s.sync()
    if t.is_alive():
        t.join(30)
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        whole = _bits(protocol.CHUNK_BYTES, seed=6)
        assert torch.equal(s.download(s.upload(whole)), whole)


def test_bulk_flags_without_a_side_socket_are_refused(bulk_daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_bulk, "connect", lambda *a, **k: None)  # this client never opens the socket
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        h = s.upload(torch.ones(3))
        _put(
            s,
            device_pb2.ClientFrame(
                commands=[device_pb2.Command(get=device_pb2.Get(request_id=77, handle=h, bulk=True))]
            ).SerializeToString(),
        )
        with pytest.raises(InvalidArgument, match="has none"):
            s.sync()
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        up = device_pb2.Upload(handle=s.new_handle(), last=True, bulk_bytes=1024)
        _put(s, device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString())
        with pytest.raises(InvalidArgument, match="has none"):
            s.sync()


def test_bulk_flags_behind_other_commands_are_refused(bulk_daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader passes over an Upload or Get without bulk flags on the fields it parsed (server/service.py,
    `_take_bulk`); a flagged one later in the frame, after ordinary uploads and gets (and, in the second frame,
    after an empty command, so that the parsed commands and the spans no longer line up), is still refused."""
    monkeypatch.setattr(client_bulk, "connect", lambda *a, **k: None)  # this client never opens the socket
    for empty in ([], [device_pb2.Command()]):
        for flagged in ("get", "upload"):
            with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
                h = s.upload(torch.ones(3))
                s.sync()
                plain = device_pb2.Upload(handle=s.new_handle(), last=True, data=torch.ones(3).numpy().tobytes())
                plain.meta.dtype, plain.meta.shape[:] = 1, [3]
                get = device_pb2.Get(request_id=5, handle=h)
                cmds = [device_pb2.Command(upload=plain), device_pb2.Command(get=get)]
                if flagged == "get":
                    last = device_pb2.Command(get=device_pb2.Get(request_id=77, handle=h, bulk=True))
                else:
                    last = device_pb2.Command(upload=device_pb2.Upload(handle=s.new_handle(), last=True, bulk_bytes=64))
                _put(s, device_pb2.ClientFrame(commands=[*cmds, *empty, last]).SerializeToString())
                with pytest.raises(InvalidArgument, match="has none"):
                    s.sync()


def test_falls_back_to_the_stream_when_the_side_port_is_closed_or_absent(
    daemon_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    d = daemon_factory(bulk_listen="127.0.0.1:0")
    d.running.bulk.stop()  # the port named in AttachReply refuses connections now
    caplog.set_level(logging.INFO, logger="gpupool.client.bulk")
    for _ in range(2):
        with Session.attach(d.address, d.token()) as s:
            assert s._side is None
            big = torch.randn(5 * MiB)
            assert torch.equal(s.download(s.upload(big)), big)
    lines = [r for r in caplog.records if "transfers use the stream" in r.getMessage()]
    assert len(lines) == 1, "the fallback is said once per daemon"
    old = daemon_factory()  # no side port (as an old daemon): AttachReply names none
    with Session.attach(old.address, old.token()) as s:
        assert s._side is None
        big = torch.randn(5 * MiB)
        assert torch.equal(s.download(s.upload(big)), big)


def _half_sent_chunk(bulk_daemon: Any) -> Session:
    """A new session with a 4 MiB bulk upload announced and 1 MiB of its bytes sent on its side socket."""
    s = Session.attach(bulk_daemon.address, bulk_daemon.token())
    assert s._side is not None
    up = device_pb2.Upload(handle=s.new_handle(), last=True, bulk_bytes=4 * MiB)
    up.meta.dtype, up.meta.shape[:] = 1, [MiB]
    _put(s, device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString())
    _send_raw(s._side, protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, up.handle, 0, 4 * MiB) + b"\x01" * MiB)
    return s


def test_detach_in_the_middle_of_a_transfer(bulk_daemon: Any) -> None:
    """An upload announced and half sent, then Detach: the daemon closes the session's socket, its stream reader
    ends, nothing leaks into the next session and the daemon goes on serving."""
    s = _half_sent_chunk(bulk_daemon)
    time.sleep(0.3)
    s.close()  # Detach while the daemon waits for the other 3 MiB
    _all_sessions_end(bulk_daemon)
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s2:
        big = torch.randn(9 * MiB)
        assert torch.equal(s2.download(s2.upload(big)), big)


@pytest.mark.parametrize("frames", ["1", "0"])
def test_a_download_cut_by_the_daemon_fails_the_wait_clearly(
    bulk_daemon: Any, monkeypatch: pytest.MonkeyPatch, frames: str
) -> None:
    """The daemon closes the session (Detach from elsewhere) while a bulk download is in flight: the client's
    wait fails with the session's own reason (FAILED_PRECONDITION, "detached"), never a hang or a wrong tensor.
    Until round 28 it could fail with the side socket's close instead ("the daemon closed the bulk socket",
    UNAVAILABLE): the close shut the socket before the end record went (frames on it), and on the stream carrier
    the client took the socket's close for the reason and the daemon's writer ended the stream with its failed
    send. Both carriers of the session's frames."""
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", frames)
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        assert s._side is not None and (s._carrier is not None) == (frames == "1")
        h = s.upload(torch.randn(64 * MiB))
        s.sync()
        threading.Timer(0.05, lambda: bulk_daemon.running.daemon.detach(s.session_id)).start()
        try:
            back = s.download(h)
        except GpupoolError as exc:
            assert isinstance(exc, FailedPrecondition) and "detached" in str(exc), repr(exc)
            return
        assert back.numel() == 64 * MiB  # the download won the race: it is whole


def _idle_from(source: str, port: int, n: int) -> list[socket.socket]:
    """`n` connections to the side port from the loopback address `source` (127.0.0.0/8) that never say hello."""
    out = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        out.append(sock)
    return out


def test_hello_limits_per_source(daemon_factory: Any) -> None:
    """Idle connections that never say hello are bounded per source: one past the bound pushes out its source's
    oldest (not itself: a real client behind a busy address still gets in), and a real client gets in."""
    d = daemon_factory(bulk_listen="127.0.0.1:0")
    port = _side_port(d)
    idle = _idle_from("127.0.0.1", port, bulkside.MAX_PENDING_PER_SOURCE)
    try:
        with _raw_side(d.address, port, insecure=False) as extra:  # heard (before: closed at once)
            assert _hello_answer(extra, "nobody") == b"unknown or closed session"
        assert _closed_without_answer(idle[0]), "the source's oldest connection is pushed out"
        with Session.attach(d.address, d.token()) as s:
            assert s._side is not None
    finally:
        for sock in idle:
            sock.close()


def test_strangers_from_many_addresses_cannot_keep_a_client_off_the_side_port(daemon_factory: Any) -> None:
    """Round 17: the side port refused newcomers once MAX_PENDING connections (8 sources x 8) were waiting for
    their hello, so idle strangers from 8 addresses, reconnecting as each timed out, kept every real client on the
    slower stream. A newcomer now pushes out the busiest source's oldest: the client's socket binds."""
    d = daemon_factory(bulk_listen="127.0.0.1:0")
    port = _side_port(d)
    sources = bulkside.MAX_PENDING // bulkside.MAX_PENDING_PER_SOURCE
    idle = [
        sock for k in range(sources) for sock in _idle_from(f"127.0.0.{k + 2}", port, bulkside.MAX_PENDING_PER_SOURCE)
    ]
    try:
        with Session.attach(d.address, d.token()) as s:
            assert s._side is not None, "the client's side socket should bind past the strangers"
            big = torch.randn(5 * MiB)
            assert torch.equal(s.download(s.upload(big)), big)
        assert _closed_without_answer(idle[0]), "the oldest of the (equally) busiest sources is pushed out"
    finally:
        for sock in idle:
            sock.close()


def test_a_silent_connection_is_dropped_after_the_hello_timeout(
    daemon_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulkside, "HELLO_TIMEOUT", 0.5)
    d = daemon_factory(bulk_listen="127.0.0.1:0")
    with socket.create_connection(("127.0.0.1", _side_port(d)), timeout=10) as silent:
        t0 = time.monotonic()
        assert _closed_without_answer(silent)
        assert time.monotonic() - t0 < 8


def test_a_stalled_upload_holds_no_other_session(bulk_daemon: Any) -> None:
    """Session A announces an upload and never sends its bytes: its reader waits on its own socket, while
    session B on the same device moves big transfers both ways; A's Detach then ends A's wait."""
    a = Session.attach(bulk_daemon.address, bulk_daemon.token(lease_id="stalled"))
    try:
        up = device_pb2.Upload(handle=a.new_handle(), last=True, bulk_bytes=8 * MiB)
        up.meta.dtype, up.meta.shape[:] = 1, [2 * MiB]
        _put(a, device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString())
        time.sleep(0.2)
        _another_session_moves(bulk_daemon, 8 * MiB)
    finally:
        a.close()
    _all_sessions_end(bulk_daemon)


def test_a_stalled_download_holds_no_other_session(bulk_daemon: Any) -> None:
    """Session A asks for a 64 MiB download over the side socket and never reads it: its two download slots
    (server/worker.py) fill, its writer blocks on its own socket and its worker is parked by its reply bound,
    while session B on the same device moves big transfers both ways; A's Detach then ends it all."""
    a = Session.attach(bulk_daemon.address, bulk_daemon.token(lease_id="stalled"))
    try:
        h = a.upload(_bits(64 * MiB, seed=9))
        a.sync()
        get = device_pb2.Get(handle=h, request_id=77, bulk=True)
        _put(a, device_pb2.ClientFrame(commands=[device_pb2.Command(get=get)]).SerializeToString())
        time.sleep(0.5)
        _another_session_moves(bulk_daemon, 40 * MiB)  # three pieces: both of B's own slots and one more
    finally:
        a.close()
    _all_sessions_end(bulk_daemon)


def _another_session_moves(bulk_daemon: Any, size: int) -> None:
    """Session B on the same device moves three bit-exact transfers of `size` bytes both ways."""
    with Session.attach(bulk_daemon.address, bulk_daemon.token(lease_id="busy")) as b:
        for seed in range(3):
            big = _bits(size, seed=seed)
            assert torch.equal(b.download(b.upload(big)), big)


def _all_sessions_end(bulk_daemon: Any) -> None:
    """Every session of the daemon ends within 10 s (a detached one takes its worker and streams with it)."""
    deadline = time.time() + 10
    while bulk_daemon.running.daemon.session_list() and time.time() < deadline:
        time.sleep(0.05)
    assert bulk_daemon.running.daemon.session_list() == []


def test_a_hello_dripped_byte_by_byte_is_dropped_when_due(daemon_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """HELLO_TIMEOUT bounded each read of the handshake and hello, so a stranger sending a byte a little more
    often than that held its slot for as long as it liked; now the whole hello is due HELLO_TIMEOUT after the
    connection arrives."""
    monkeypatch.setattr(bulkside, "HELLO_TIMEOUT", 1.0)
    monkeypatch.setenv("GPUPOOL_INSECURE", "1")
    d = daemon_factory(bulk_listen="127.0.0.1:0", tls=tls.TlsConfig(insecure=True))
    hello = protocol.bulk_hello("x" * 100)
    with socket.create_connection(("127.0.0.1", _side_port(d)), timeout=10) as drip:
        dropped = False
        for b in hello[:40]:  # 40 bytes, 0.25 s apart: 10 s, each gap far under the timeout
            try:
                drip.sendall(bytes([b]))
            except OSError:
                dropped = True
                break
            time.sleep(0.25)
        if not dropped:
            drip.settimeout(0.5)
            try:
                dropped = drip.recv(10) == b""
            except ConnectionResetError:
                dropped = True
            except TimeoutError:  # still open
                dropped = False
        assert dropped, "a hello dripped byte by byte kept its connection past its due time"


def test_an_upload_and_a_download_from_two_threads_both_move(bulk_daemon: Any) -> None:
    """One session, two user threads (a session supports other threads working while one records a step, round 23):
    one uploads 48 MiB tensors, the other downloads a 64 MiB one, at once. Before round 24 each end held its side
    socket's lock across a blocking send: the client's upload waited for the daemon's reader, which waited for the
    daemon's lock, held by its writer sending a download the client's reader could not take (the upload held the
    client's lock). Nothing moved for 30 s, and the session ended with "an announced upload stalled" (here, within the
    first transfers). Now both ends wait with the lock released (gpupool/duplex.py): every transfer is byte-exact."""
    rounds = 4
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        assert s._side is not None
        big = _bits(64 * MiB, seed=1)
        h = s.upload(big)
        s.sync()
        failed: list[BaseException] = []
        done = [0, 0]
        last: list[int] = []

        def up() -> None:
            try:
                for k in range(rounds):
                    if last:
                        s.free(last)
                    last[:] = [s.upload(_bits(48 * MiB, seed=10 + k))]
                    done[0] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                failed.append(exc)

        def down() -> None:
            try:
                for _ in range(rounds):
                    assert torch.equal(s.download(h), big)
                    done[1] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                failed.append(exc)

        threads = [threading.Thread(target=f, daemon=True) for f in (up, down)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failed and done == [rounds, rounds], (failed, done)
        assert torch.equal(s.download(last[0]), _bits(48 * MiB, seed=10 + rounds - 1))  # the uploads too


class _Gate(TcpRelay):
    """A relay to a daemon's side port that stops moving bytes while `flowing` is clear: to the client, a daemon that
    does not read or write for a while (its session's queue behind a long kernel, a daemon at a breakpoint) on a
    live host, whose kernel acknowledges what fits in its buffers and answers keepalive probes."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.flowing = threading.Event()
        self.flowing.set()
        super().__init__(upstream)

    def _relay(self, down: socket.socket, up: socket.socket, n: int) -> None:
        for a, b in ((down, up), (up, down)):
            threading.Thread(target=self._gated, args=(a, b), daemon=True).start()

    def _gated(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        shut(src, dst)


@pytest.mark.parametrize("frames", [False, True])
def test_a_daemon_that_does_not_read_for_a_while_is_waited_for(
    bulk_daemon: Any, monkeypatch: pytest.MonkeyPatch, frames: bool
) -> None:
    """The client's end of the side socket waits as long as its daemon is alive (round 28, as the daemon's end since
    round 27): until then 60 s without a byte moving (`IO_TIMEOUT`) failed the transfer and the session, of a daemon
    only busy. Its socket has the kernel's keepalive (`client_bulk.PEER_*`, shortened here so that its probes go
    out several times during the pause); a 48 MiB upload (more than the socket buffers on the way hold) and its
    download wait through a pause of the bytes' path, unfinished, and complete byte for byte after it."""
    monkeypatch.setattr(client_bulk, "PEER_IDLE", 1.0)
    monkeypatch.setattr(client_bulk, "PEER_INTERVAL", 1.0)
    monkeypatch.setattr(client_bulk, "PEER_PROBES", 2)
    ch = tls.channel(bulk_daemon.address, CHANNEL_OPTIONS, token=False)
    reply = device_pb2_grpc.DeviceStub(ch).Attach(device_pb2.AttachRequest(token=bulk_daemon.token()), timeout=10)
    gate = _Gate(("127.0.0.1", reply.bulk_port))
    side = client_bulk.connect(bulk_daemon.address, gate.port, reply.session_id, frames=frames)
    assert side is not None
    assert side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert side.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1
    assert side.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 2
    big = _bits(48 * MiB, seed=5)
    got: list[Any] = []
    with Session(ch, reply, bulk_daemon.address, side) as s:
        assert torch.equal(s.download(s.upload(torch.arange(2 * MiB))), torch.arange(2 * MiB))
        gate.flowing.clear()

        def transfer() -> None:
            try:
                got.append(s.download(s.upload(big)))
            except BaseException as exc:  # noqa: BLE001 - the test reads it
                got.append(exc)

        t = threading.Thread(target=transfer, daemon=True)
        t.start()
        t.join(5.0)  # five keepalive idle times, with two probes a second after each
        assert t.is_alive() and not got, f"the transfer should wait for the paused path, got {got}"
        gate.flowing.set()
        t.join(120)
        assert len(got) == 1 and isinstance(got[0], torch.Tensor), got
        assert torch.equal(got[0], big)
    gate.close()


def test_uploads_land_in_their_own_sessions_upload_slots(bulk_daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 29: a big bulk upload's bytes are read straight into an upload slot of the memory the session shares
    with its own worker (server/worker.py `ProcessRunner.upload_span`). Two sessions uploading at once, more chunks
    than there are slots, each get their own bytes back; then a third breaks off in the middle of a chunk: its
    session ends with a clear error, and two new sessions still move exact bytes through the slots."""
    from gpupool.server import worker

    taken: list[tuple[int, bool]] = []
    real = worker.ProcessRunner.upload_span

    def counted(self: worker.ProcessRunner, size: int) -> memoryview | None:
        span = real(self, size)
        taken.append((id(self), span is not None))
        return span

    monkeypatch.setattr(worker.ProcessRunner, "upload_span", counted)
    named: list[int] = []  # the upload slots slice requests named
    request = slices.shared_request

    def naming(req: slices.SliceRequest, size: int, up_slot: int = -1) -> bytes:
        named.append(up_slot)
        return request(req, size, up_slot)

    monkeypatch.setattr(slices, "shared_request", naming)
    errors: list[BaseException] = []

    def loop(seed: int) -> None:
        try:
            with Session.attach(bulk_daemon.address, bulk_daemon.token(lease_id=f"l{seed}")) as s:
                for k in range(3):
                    big = _bits(6 * protocol.CHUNK_BYTES + 8, seed=seed * 10 + k)
                    assert torch.equal(s.download(s.upload(big)), big)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def both(seeds: tuple[int, int]) -> None:
        threads = [threading.Thread(target=loop, args=(seed,)) for seed in seeds]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors

    both((1, 2))
    runners = {r for r, _ in taken}
    assert len(runners) == 2 and sum(got for _, got in taken) >= 2 * 3 * 4, taken  # slots used by both workers
    assert any(k >= 0 for k in named), named  # and the worker ran slices from them (how many: timing's)

    s = _half_sent_chunk(bulk_daemon)
    s._side.sock.shutdown(socket.SHUT_RDWR)  # the connection drops with 3 MiB of the chunk unsent
    with pytest.raises(GpupoolError, match="closed|side socket|bulk socket"):
        s.sync()
    s.close()
    both((3, 4))


def test_the_reader_reads_the_next_chunk_while_the_worker_runs_one(
    bulk_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 35: a bulk upload's chunk read into an upload slot is run by the device's thread, so that the session's
    reader reads the next chunk into the next slot meanwhile. Until then the reader ran each chunk's slice itself
    (the idle device's inline slice, `Daemon.submit`), waiting for the worker's copy before it read on: the reader
    and the worker took turns, and only one slot was ever used. Here the first slot's slice waits (in the daemon,
    before its request goes out) for the reader to take a second slot: on the old path the reader itself waits
    there, so no second slot comes; the bytes arrive exact either way."""
    from gpupool.server import worker

    real_span, real_run = worker.ProcessRunner.upload_span, worker.ProcessRunner.run
    second = threading.Event()
    spans: list[bool] = []
    overlapped: list[bool] = []

    def span(self: worker.ProcessRunner, size: int) -> memoryview | None:
        got = real_span(self, size)
        spans.append(got is not None)
        if sum(spans) >= 2:
            second.set()
        return got

    def run(self: worker.ProcessRunner, req: Any, commands: int, parts: Any = ()) -> Any:
        if len(parts) == 1 and self.holds(parts[0]) and not overlapped:
            overlapped.append(second.wait(10))  # the reader took the next chunk's slot while this one waits
        return real_run(self, req, commands, parts)

    monkeypatch.setattr(worker.ProcessRunner, "upload_span", span)
    monkeypatch.setattr(worker.ProcessRunner, "run", run)
    with Session.attach(bulk_daemon.address, bulk_daemon.token()) as s:
        big = _bits(3 * protocol.CHUNK_BYTES + 8, seed=35)
        assert torch.equal(s.download(s.upload(big)), big)
    assert overlapped == [True], (overlapped, spans)


def test_uploads_from_the_bulk_threshold_up_take_the_side_socket(daemon_factory: Any) -> None:
    """Round 52: an upload of `bulk.MIN_UPLOAD` (1 MiB) to `CHUNK_BYTES` (4 MiB) goes on the side socket straight from
    the tensor's memory, as larger ones did (until round 52 inside a frame: three copies of its bytes on the client,
    fresh pages each, and one more in the daemon), so a daemon whose frames hold little more than 1 MiB
    (`max_message_bytes`) takes them; until round 52 the frame of one over its limit ended the session. The sizes at and
    around the threshold and the chunk size come back bit for bit, those under it inside a frame as before, and a
    neighbour session on the same device, uploading its own bytes of the same sizes in between, reads only its own."""
    d = daemon_factory(fake_gpu_memory=128 * MiB, bulk_listen="127.0.0.1:0", max_message_bytes=MiB + 4096)
    low, chunk = client_bulk.MIN_UPLOAD, protocol.CHUNK_BYTES
    with (
        Session.attach(d.address, d.token(lease_id="a")) as a,
        Session.attach(d.address, d.token(lease_id="b")) as b,
    ):
        assert a._side is not None and b._side is not None
        for n in (low - 4, low, low + 64 * 1024, chunk - 4, chunk, chunk + 4):
            x, y = _bits(n, seed=n), _bits(n, seed=n + 1)
            hx = a.upload(x)
            hy = b.upload(y)
            assert torch.equal(a.download(hx), x), n
            assert torch.equal(b.download(hy), y), n
            a.free([hx])
            b.free([hy])
        a.sync()
        b.sync()
