"""A session's frames on its authenticated side socket instead of its gRPC stream (round 26; docs/wire.md "Frames
on the side socket"), through real in-process daemons: the same training bit for bit on both carriers, in both
isolation modes; hostile socket peers (an oversized or garbage record header, a frame cut short, a second
socket, a socket for another session's id, a frame on the stream of a socket session) end only their own session,
with the right status and a reason, on the socket and on the stream; a live peer paused in the middle of a frame
is waited for; a poisoned op's error at the next sync; a detach or close while frames are in flight."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import grpc
import pytest
import torch
from gpupool.client import bulk as client_bulk
from gpupool.client.session import CHANNEL_OPTIONS, Handle, Session
from gpupool.server import bulkside

from gpupool import duplex, protocol, tls
from gpupool._proto import device_pb2, device_pb2_grpc
from gpupool.errors import FailedPrecondition, GpupoolError, InvalidArgument, Unavailable

MiB = 1024**2


@pytest.fixture(params=["process", "thread"])
def side_daemon(request: Any, daemon_factory: Any) -> Any:
    return daemon_factory(fake_gpu_memory=256 * MiB, bulk_listen="127.0.0.1:0", isolation=request.param)


def _attach(daemon: Any, monkeypatch: Any, side: bool = True) -> Session:
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1" if side else "0")
    s = Session.attach(daemon.address, daemon.token())
    assert (s._carrier is not None) == side, "the session's frames should travel on the carrier asked for"
    return s


def _train(s: Session, steps: int = 12) -> list[float]:
    """A linear regression by hand, on the daemon: the loss of each step as `.item()` reads it."""
    g = torch.Generator().manual_seed(3)
    x = Handle(s.upload(torch.randn(64, 8, generator=g)))
    y = Handle(s.upload(torch.randn(64, 1, generator=g)))
    w = Handle(s.upload(torch.zeros(8, 1)))
    xt = s.call("aten::t.default", x)[0]
    losses = []
    for _ in range(steps):
        [pred] = s.call("aten::mm.default", x, w)
        [diff] = s.call("aten::sub.Tensor", pred, y)
        [sq] = s.call("aten::mul.Tensor", diff, diff)
        [loss] = s.call("aten::mean.default", sq)
        [grad] = s.call("aten::mm.default", xt, diff)
        [w] = s.call("aten::sub.Tensor", w, grad, alpha=0.01)
        s.free([pred, diff, sq, grad])
        losses.append(float(s.sync([loss])[0]))
        s.free([loss])
    return losses


def test_training_losses_are_bit_equal_over_both_carriers(side_daemon: Any, monkeypatch: Any) -> None:
    with _attach(side_daemon, monkeypatch, side=True) as s:
        on_side = _train(s)
        big = torch.arange(3 * MiB, dtype=torch.int32)  # a bulk upload and download on the same socket
        assert torch.equal(s.download(s.upload(big)), big)
        assert s.frames_put > 12
    with _attach(side_daemon, monkeypatch, side=False) as s:
        on_stream = _train(s)
    assert on_side == on_stream
    assert on_side[-1] < on_side[0]


def _bare(daemon: Any, token: str = "") -> tuple[Session, str, int]:
    """A session whose stream is open but that opened no side socket: (session, its id, the side port)."""
    ch = tls.channel(daemon.address, CHANNEL_OPTIONS, token=False)
    reply = device_pb2_grpc.DeviceStub(ch).Attach(device_pb2.AttachRequest(token=token or daemon.token()), timeout=10)
    return Session(ch, reply, daemon.address, None), reply.session_id, reply.bulk_port


def _peer(daemon: Any, port: int, session_id: str) -> client_bulk.BulkSocket:
    """A frames socket of the test's own, bound to `session_id` (its hello and the daemon's answer)."""
    sock = client_bulk.connect(daemon.address, port, session_id, frames=True)
    assert sock is not None and sock.frames
    return sock


def _send_raw(sock: client_bulk.BulkSocket, data: bytes) -> None:
    duplex.send_all(sock.sock, sock.lock, [data], 10.0)


def _ended(s: Session) -> GpupoolError:
    """How the session's stream ended (its status), as an idle client learns it."""
    assert s._stream_ended.wait(30), "the session's stream should end"
    assert s._dead is not None
    return s._dead


def _end_record(sock: client_bulk.BulkSocket) -> tuple[int, str]:
    kind, code, body = sock.recv_record()
    assert kind == protocol.BULK_END
    return code, body.decode()


def _neighbour_works(s: Session) -> None:
    h = s.upload(torch.tensor([2.0, 3.0]))
    [out] = s.call("aten::mul.Tensor", Handle(h), Handle(h))
    assert torch.equal(s.download(out), torch.tensor([4.0, 9.0]))


@pytest.mark.parametrize(
    "case",
    ["oversized", "garbage", "truncated", "zero_length", "stream_frame"],
)
def test_a_hostile_peer_ends_only_its_own_session(side_daemon: Any, monkeypatch: Any, case: str) -> None:
    neighbour = _attach(side_daemon, monkeypatch)
    victim, sid, port = _bare(side_daemon)
    peer = _peer(side_daemon, port, sid)
    limit = side_daemon.running.daemon.config.max_message_bytes
    want: tuple[type[GpupoolError], str]
    if case == "oversized":  # never trusted past the stream's message limit: nothing of it is read or held
        _send_raw(peer, protocol.BULK_HEAD.pack(protocol.BULK_FRAME, 0, 0, limit + 1))
        want = (InvalidArgument, f"1 to {limit} bytes\\), got kind 3, id 0, offset 0, length {limit + 1}")
    elif case == "garbage":
        _send_raw(peer, b"\xff" * protocol.BULK_HEAD.size)
        want = (InvalidArgument, "expected a frame record")
    elif case == "zero_length":
        _send_raw(peer, protocol.BULK_HEAD.pack(protocol.BULK_FRAME, 0, 0, 0))
        want = (InvalidArgument, "expected a frame record")
    elif case == "truncated":
        _send_raw(peer, protocol.BULK_HEAD.pack(protocol.BULK_FRAME, 0, 0, 100) + b"\x0a" * 10)
        peer.close()
        want = (Unavailable, "closed in the middle of a frame")
    else:  # a frame on the stream of a session whose frames use its side socket: one order per session
        _send_raw(peer, protocol.frame_record(protocol.sync_frame(7)))
        assert peer.recv_record()[0] == protocol.BULK_FRAME  # answered on the socket
        victim._put(protocol.sync_frame(8))
        want = (InvalidArgument, "a frame on the stream of a session whose frames use its side socket")
    err = _ended(victim)
    assert isinstance(err, want[0]), err
    assert re.search(want[1], str(err)), err
    if case not in ("truncated",):  # the same end on the socket (where the peer still reads)
        code, reason = _end_record(peer)
        assert code == want[0].code.value[0]
        assert re.search(want[1], reason), reason
    _neighbour_works(neighbour)
    victim.close()
    peer.close()
    neighbour.close()


def test_a_second_socket_and_another_sessions_id_are_refused(side_daemon: Any, monkeypatch: Any) -> None:
    a = _attach(side_daemon, monkeypatch)
    b = _attach(side_daemon, monkeypatch)
    port = side_daemon.running.bulk.port
    # session b's client (or anyone holding a's id) asks for a's frames socket: a has one, so it is refused
    assert client_bulk.connect(side_daemon.address, port, a.session_id, frames=True) is None
    assert client_bulk.connect(side_daemon.address, port, b.session_id, frames=True) is None
    assert client_bulk.connect(side_daemon.address, port, "not-a-session", frames=True) is None
    _neighbour_works(a)
    _neighbour_works(b)
    # a session whose first frame came on its stream gets no frames socket afterwards (one order per session)
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "0")
    c, sid, _ = _bare(side_daemon)
    c.sync()
    assert client_bulk.connect(side_daemon.address, port, sid, frames=True) is None
    _neighbour_works(c)
    for s in (a, b, c):
        s.close()


def test_a_poisoned_ops_error_reaches_the_next_sync_on_the_socket(side_daemon: Any, monkeypatch: Any) -> None:
    with _attach(side_daemon, monkeypatch) as s:
        a = Handle(s.upload(torch.ones(2, 3)))
        s.call("aten::mm.default", a, a)  # 2x3 @ 2x3: fails on the device
        with pytest.raises(GpupoolError, match="mm|shape|size"):
            s.sync()
        _neighbour_works(s)  # the session goes on


def test_detach_and_close_while_frames_are_in_flight(side_daemon: Any, monkeypatch: Any) -> None:
    neighbour = _attach(side_daemon, monkeypatch)
    s = _attach(side_daemon, monkeypatch)
    a = Handle(s.upload(torch.randn(128, 128)))
    for _ in range(600):  # several frames of work
        s.call("aten::mm.default", a, a)
    s.flush()
    got: list[BaseException] = []

    def wait() -> None:
        try:
            s.sync()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            got.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    s._stub.Detach(device_pb2.DetachRequest(session_id=s.session_id), timeout=10)
    t.join(60)
    assert not t.is_alive(), "a waiter on the socket should learn of the detach"
    assert not got or isinstance(got[0], GpupoolError)
    with pytest.raises(GpupoolError):
        s.sync()
    s.close()
    t2 = _attach(side_daemon, monkeypatch)
    b = Handle(t2.upload(torch.randn(128, 128)))
    for _ in range(600):
        t2.call("aten::mm.default", b, b)
    t2.flush()
    t2.close()  # mid-flight: its frames are moot
    _neighbour_works(neighbour)
    neighbour.close()


def _short_keepalive(monkeypatch: Any) -> None:
    """The side socket's TCP keepalive probes after 1 s of silence, 1 s apart (bulkside.PEER_*)."""
    monkeypatch.setattr(bulkside, "PEER_IDLE", 1.0)
    monkeypatch.setattr(bulkside, "PEER_INTERVAL", 1.0)
    monkeypatch.setattr(bulkside, "PEER_PROBES", 1)


def test_an_idle_session_outlives_its_sockets_keepalive(side_daemon: Any, monkeypatch: Any) -> None:
    """Between frames a session may idle for ever: its client's kernel answers the side socket's probes."""
    _short_keepalive(monkeypatch)
    with _attach(side_daemon, monkeypatch) as s:
        _neighbour_works(s)
        threading.Event().wait(3.0)  # past the first probe and a whole probe cycle, without a byte
        _neighbour_works(s)


def test_a_peer_paused_in_the_middle_of_a_frame_is_waited_for(side_daemon: Any, monkeypatch: Any) -> None:
    """A live peer that stops in the middle of a record (its client stopped by Ctrl-Z while it sent) keeps its
    session, however long, and the frame goes on where it stopped (until round 27, 30 s without a byte ended the
    session as a stall); its neighbour is not held meanwhile. What the daemon holds of the frame is what came."""
    _short_keepalive(monkeypatch)
    neighbour = _attach(side_daemon, monkeypatch)
    victim, sid, port = _bare(side_daemon)
    peer = _peer(side_daemon, port, sid)
    record = protocol.frame_record(protocol.sync_frame(7))
    _send_raw(peer, record[: protocol.BULK_HEAD.size + 2])
    threading.Event().wait(3.0)  # past every keepalive timer of the socket
    _neighbour_works(neighbour)
    assert not victim._stream_ended.is_set(), victim._dead
    _send_raw(peer, record[protocol.BULK_HEAD.size + 2 :])
    kind, _, body = peer.recv_record()
    assert kind == protocol.BULK_FRAME and device_pb2.ServerFrame.FromString(body).request_id == 7
    victim.close()
    peer.close()
    neighbour.close()


def _free_then_sync(request_id: int) -> bytes:
    """A frame of two commands (not a lone Sync, which the reader answers at once when the session is idle)."""
    free = device_pb2.Command(free=device_pb2.Free(handles=[]))
    sync = device_pb2.Command(sync=device_pb2.Sync(request_id=request_id))
    return device_pb2.ClientFrame(commands=[free, sync]).SerializeToString()


def test_a_half_closed_stream_ends_nothing_of_a_socket_session(side_daemon: Any, monkeypatch: Any) -> None:
    """The stream's half-close of a session whose frames use its side socket: the socket's reader alone queues its
    commands. Round 26 queued the stream's end from the stream's reader, between the socket's frames (here behind a
    neighbour's slices: the device's thread met it mid-slice, "slice failed", and dropped the frames around it), or
    ended the session on it while frames still came on the socket."""
    neighbour = _attach(side_daemon, monkeypatch)
    victim, sid, port = _bare(side_daemon)
    peer = _peer(side_daemon, port, sid)
    a = Handle(neighbour.upload(torch.randn(1024, 1024)))
    for _ in range(4):  # the device busy for a while: the victim's frames and its stream's end queue up
        neighbour.call("aten::mm.default", a, a)
    neighbour.flush()
    _send_raw(peer, protocol.frame_record(_free_then_sync(7)))
    victim._send.put(None)  # the stream's half-close (its request iterator ends)
    threading.Event().wait(0.01)
    _send_raw(peer, protocol.frame_record(_free_then_sync(8)))
    threading.Event().wait(0.3)
    _send_raw(peer, protocol.frame_record(protocol.sync_frame(9)))
    answers: list[Any] = []
    reader = threading.Thread(target=lambda: answers.extend(peer.recv_record() for _ in range(3)), daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():  # a frame dropped unanswered (the end met mid-slice): let the reader go
        peer.close()
    assert answers == [(protocol.BULK_FRAME, 0, protocol.sync_reply(rid)) for rid in (7, 8, 9)]
    victim._stub.Detach(device_pb2.DetachRequest(session_id=sid), timeout=10)
    assert "detached" in str(_ended(victim))  # its end as the stream says it (a Detach closes the socket first)
    _neighbour_works(neighbour)
    victim.close()
    peer.close()
    neighbour.close()


def _next_record(sock: client_bulk.BulkSocket, timeout: float = 30.0) -> Any:
    """The socket's next record, or the error reading it raised; AssertionError when nothing came in `timeout` s."""
    got: list[Any] = []

    def read() -> None:
        try:
            got.append(sock.recv_record())
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            got.append(exc)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        sock.close()
        t.join(10)
        raise AssertionError(f"nothing came on the side socket in {timeout:.0f} s")
    return got[0]


@pytest.mark.parametrize("how", ["detach", "expiry"])
def test_a_detach_or_the_leases_end_closes_a_frames_socket_with_its_end_record(
    side_daemon: Any, monkeypatch: Any, how: str
) -> None:
    """The session's end goes on its frames socket as a BULK_END record (its status code, the reason) before the
    socket closes, whatever ended it (docs/wire.md). Until round 28 a Detach or the lease's end shut the socket down
    first: the client read a bare close (and waited up to 5 s for the stream's status to learn why), and the
    replies queued before the end were lost with it. The daemon then closes the socket (its reader thread and
    descriptor go); a neighbour is untouched."""
    neighbour = _attach(side_daemon, monkeypatch)
    token = side_daemon.token(ttl=6.0) if how == "expiry" else side_daemon.token()
    victim, sid, port = _bare(side_daemon, token)
    peer = _peer(side_daemon, port, sid)
    _send_raw(peer, protocol.frame_record(protocol.sync_frame(7)))
    assert _next_record(peer) == (protocol.BULK_FRAME, 0, protocol.sync_reply(7))
    front = side_daemon.running.daemon.session(sid)
    reader = f"gpupool-side-{front.number}"  # the socket's own thread (bulkside.BulkPort._hello)
    assert any(t.name == reader for t in threading.enumerate())
    if how == "detach":
        victim._stub.Detach(device_pb2.DetachRequest(session_id=sid), timeout=10)
        why = "session closed: detached"
    else:
        why = "session closed: lease .* expired"
    end = _next_record(peer)
    assert isinstance(end, tuple) and end[0] == protocol.BULK_END, end
    assert end[1] == grpc.StatusCode.FAILED_PRECONDITION.value[0], end
    assert re.fullmatch(why, end[2].decode()), end
    after = _next_record(peer)  # then the daemon closes it
    assert isinstance(after, Unavailable) and "closed" in str(after), after
    err = _ended(victim)
    assert isinstance(err, FailedPrecondition) and re.search(why, str(err)), err
    peer.close()  # the daemon's end, shut for writing after the end record, closes once the client's does
    for _ in range(100):  # (or after bulkside.LINGER s in any case)
        if front.bulk.sock.fileno() == -1:
            break
        threading.Event().wait(0.1)
    assert front.bulk.closed and front.bulk.sock.fileno() == -1, "the daemon's end of the socket is closed"
    for _ in range(100):  # its reader thread ends with it
        if not any(t.name == reader for t in threading.enumerate()):
            break
        threading.Event().wait(0.1)
    assert not any(t.name == reader for t in threading.enumerate()), f"{reader} outlived its session"
    _neighbour_works(neighbour)
    victim.close()
    peer.close()
    neighbour.close()


def test_a_client_not_reading_at_its_sessions_end_still_learns_why(side_daemon: Any, monkeypatch: Any) -> None:
    """A session closed (here by a Detach from elsewhere) while its client reads nothing: its bulk downloads fill its
    frames socket and the daemon's writer waits on it. The socket is kept `END_GRACE` s for the replies and the
    BULK_END, then closed, and the stream still ends with the session's own status (FAILED_PRECONDITION,
    "detached"). Until round 28 the close shut the socket under the writer, whose failed send ended the stream with
    UNAVAILABLE ("sending a download failed: Broken pipe") instead: the client learned the wrong reason."""
    monkeypatch.setattr(bulkside, "END_GRACE", 1.0)
    neighbour = _attach(side_daemon, monkeypatch)
    s = _attach(side_daemon, monkeypatch)
    h = s.upload(torch.randn(4 * MiB))  # 16 MiB
    for _ in range(6):  # 96 MiB of replies asked for, none read
        s._request(device_pb2.Command(get=device_pb2.Get(handle=h, bulk=True)))
    s.flush()
    front = side_daemon.running.daemon.session(s.session_id)
    deadline = threading.Event()
    for _ in range(300):  # the writer is stuck once the session's unread replies pile up behind the full socket
        if front.outbox_bytes >= 8 * MiB:
            break
        deadline.wait(0.1)
    assert front.outbox_bytes >= 8 * MiB, front.outbox_bytes
    s._stub.Detach(device_pb2.DetachRequest(session_id=s.session_id), timeout=10)
    err = _ended(s)
    assert isinstance(err, FailedPrecondition) and "detached" in str(err), err
    _neighbour_works(neighbour)
    s.close()
    neighbour.close()


def test_frames_sent_after_a_detach_run_nothing(side_daemon: Any, monkeypatch: Any) -> None:
    """A frames socket stays open a little after its session closed (for the replies queued before the end and its
    BULK_END, round 28): what its client sends meanwhile (a lone Sync the reader would answer itself, an upload
    and a Sync behind it) runs nothing and is answered by nothing but the end."""
    victim, sid, port = _bare(side_daemon)
    peer = _peer(side_daemon, port, sid)
    _send_raw(peer, protocol.frame_record(protocol.sync_frame(7)))
    assert _next_record(peer) == (protocol.BULK_FRAME, 0, protocol.sync_reply(7))
    victim._stub.Detach(device_pb2.DetachRequest(session_id=sid), timeout=10)  # returns once the session closed
    up = device_pb2.Command(upload=device_pb2.Upload(handle=victim.handle_base + 5, last=True, data=b"\0" * 16))
    up.upload.meta.dtype, up.upload.meta.shape[:] = 1, [4]
    sync = device_pb2.Command(sync=device_pb2.Sync(request_id=9))
    for frame in (protocol.sync_frame(8), device_pb2.ClientFrame(commands=[up, sync]).SerializeToString()):
        try:
            _send_raw(peer, protocol.frame_record(frame))
        except OSError:
            break  # the daemon closed the socket already
    end = _next_record(peer)
    assert isinstance(end, tuple) and end[0] == protocol.BULK_END and b"detached" in end[2], end
    assert isinstance(_next_record(peer), Unavailable)
    victim.close()
    peer.close()


def _slices(daemon: Any) -> int:
    """The slices the daemon ran on device 0 so far (its ledger's slice histogram)."""
    ledger = daemon.running.daemon.ledger
    with ledger._lock:
        hist = ledger.slices.get(0)
        return 0 if hist is None else sum(hist.counts)


def test_frames_already_on_the_socket_run_as_one_slice_in_order(side_daemon: Any, monkeypatch: Any) -> None:
    """Frames that wait on the socket when the one before them was read (a client ahead of its daemon) are read and
    checked first, then queued together (round 29): fewer slices than frames, every answer in the frames' order,
    and a frame that comes later on its own runs as before."""
    victim, sid, port = _bare(side_daemon)
    peer = _peer(side_daemon, port, sid)
    _send_raw(peer, protocol.frame_record(protocol.sync_frame(1)))
    assert _next_record(peer) == (protocol.BULK_FRAME, 0, protocol.sync_reply(1))
    before = _slices(side_daemon)
    _send_raw(peer, b"".join(protocol.frame_record(_free_then_sync(rid)) for rid in range(10, 16)))  # one write
    assert [_next_record(peer) for _ in range(6)] == [
        (protocol.BULK_FRAME, 0, protocol.sync_reply(rid)) for rid in range(10, 16)
    ]
    assert _slices(side_daemon) - before < 6  # at least two of the six frames shared a slice
    _send_raw(peer, protocol.frame_record(_free_then_sync(20)))
    assert _next_record(peer) == (protocol.BULK_FRAME, 0, protocol.sync_reply(20))
    victim.close()
    peer.close()


def test_round_trip_answers_go_out_without_a_hand_off_to_the_writer(side_daemon: Any, monkeypatch: Any) -> None:
    """A round trip's answer on a frames socket is written by the thread that produced it (the stream's reader that
    answered a lone Sync or ran the slice, or the device's thread), not handed to the session's writer thread
    (round 33: the hand-off cost ~8 system calls and 2 context switches a round trip), in order."""
    victim, sid, port = _bare(side_daemon)
    peer = _peer(side_daemon, port, sid)
    front = side_daemon.running.daemon.session(sid)
    for rid in range(1, 5):  # lone Syncs (answered by the reader) and slices that run in the worker
        frame = protocol.sync_frame(rid) if rid % 2 else _free_then_sync(rid)
        _send_raw(peer, protocol.frame_record(frame))
        assert _next_record(peer) == (protocol.BULK_FRAME, 0, protocol.sync_reply(rid))
    assert front.written_direct == 4 and front.outbox.pending == 0
    _send_raw(peer, b"".join(protocol.frame_record(_free_then_sync(rid)) for rid in range(10, 16)))
    assert [_next_record(peer) for _ in range(6)] == [
        (protocol.BULK_FRAME, 0, protocol.sync_reply(rid)) for rid in range(10, 16)
    ]
    victim.close()
    peer.close()


def _busy(daemon: Any, neighbour: Session, n: int = 6) -> None:
    """Keep the device busy with a neighbour's matrix products for a while (tens of milliseconds each): another
    session's frames meanwhile queue for the device's thread instead of running in their reader. Returns once the
    first of them runs."""
    a = Handle(neighbour.upload(torch.randn(1024, 1024)))
    neighbour.sync()
    for _ in range(n):
        neighbour.call("aten::mm.default", a, a)
    neighbour.flush()
    entry = daemon.running.daemon.session(neighbour.session_id).entry
    for _ in range(1000):
        if entry.running:
            return
        threading.Event().wait(0.005)
    raise AssertionError("the neighbour's products never ran")


@pytest.mark.parametrize("busy", [False, True])
@pytest.mark.parametrize("bad", ["malformed_command", "garbage_header", "oversized_header"])
def test_a_bad_frame_behind_held_frames_ends_the_session_after_their_answers(
    side_daemon: Any, monkeypatch: Any, bad: str, busy: bool
) -> None:
    """A bad record right behind good frames on the socket (one write: the reader holds the good ones while it reads
    on) ends the session with the same error as alone, after the good frames ran and were answered, in order; a
    neighbour session is untouched. `busy`: the good frames' commands wait for the device's thread (a neighbour's
    slices run). Until round 34 the reader's error went to the outbox at once and passed the answers of frames still
    queued for that thread (with `--isolation thread` the device's thread always ran them): the client lost results
    it had asked for first, though read_side's docstring promised the frames' order."""
    neighbour = _attach(side_daemon, monkeypatch)
    victim, sid, port = _bare(side_daemon)
    peer = _peer(side_daemon, port, sid)
    limit = side_daemon.running.daemon.config.max_message_bytes
    good = b"".join(protocol.frame_record(_free_then_sync(rid)) for rid in (31, 32, 33))
    want: tuple[type[GpupoolError], str]
    if bad == "malformed_command":  # cut as a command of kind 30 (an eager op), whose body protobuf refuses
        tail = protocol.frame_record(b"\x0a\x03\xf2\x01\x7f")
        want = (InvalidArgument, "malformed ClientFrame")
    elif bad == "garbage_header":
        tail = b"\xff" * protocol.BULK_HEAD.size
        want = (InvalidArgument, "expected a frame record")
    else:
        tail = protocol.BULK_HEAD.pack(protocol.BULK_FRAME, 0, 0, limit + 1)
        want = (InvalidArgument, f"got kind 3, id 0, offset 0, length {limit + 1}")
    if busy:
        _busy(side_daemon, neighbour)
    _send_raw(peer, good + tail)
    answers = [(protocol.BULK_FRAME, 0, protocol.sync_reply(rid)) for rid in (31, 32, 33)]
    got = []
    while isinstance(record := _next_record(peer), tuple) and record[0] == protocol.BULK_FRAME:
        got.append(record)
    assert got == answers, (got, record)
    assert isinstance(record, tuple), record
    kind, code, body = record
    reason = body.decode()
    assert kind == protocol.BULK_END and code == want[0].code.value[0] and re.search(want[1], reason), reason
    err = _ended(victim)
    assert isinstance(err, want[0]) and re.search(want[1], str(err)), err
    _neighbour_works(neighbour)
    victim.close()
    peer.close()
    neighbour.close()


def test_frames_held_to_be_batched_run_before_the_next_frames_bulk_bytes_are_read(
    side_daemon: Any, monkeypatch: Any
) -> None:
    """The side reader holds a frame while the next one is already on the socket, to queue both as one slice
    (round 29's `_Batch`); a next frame whose bulk upload's bytes follow queues the held ones first (round 30): the
    reader may wait for those bytes as long as the client takes (here: until the test sends them), or for an upload
    slot the held frames' own uploads hold. Round 29 read them with the frame before still held: its Sync was not
    answered until the upload's bytes came."""
    victim, sid, port = _bare(side_daemon)
    peer = _peer(side_daemon, port, sid)
    up = device_pb2.Upload(handle=victim.new_handle(), last=True, bulk_bytes=2 * MiB)
    up.meta.dtype, up.meta.shape[:] = 1, [MiB // 2]  # float32
    announce = device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()
    _send_raw(peer, protocol.frame_record(_free_then_sync(7)) + protocol.frame_record(announce))  # in one go
    answer: list[Any] = []
    reader = threading.Thread(target=lambda: answer.append(peer.recv_record()), daemon=True)
    reader.start()
    reader.join(20)  # (generous: the test's daemon answers in milliseconds)
    before = list(answer)  # what came while the upload's bytes had not
    bytes_sent = protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, up.handle, 0, 2 * MiB) + b"\x00" * (2 * MiB)
    _send_raw(peer, bytes_sent)
    reader.join(20)
    assert before == [(protocol.BULK_FRAME, 0, protocol.sync_reply(7))], answer
    _send_raw(peer, protocol.frame_record(protocol.sync_frame(8)))  # the session goes on, the upload done
    assert peer.recv_record() == (protocol.BULK_FRAME, 0, protocol.sync_reply(8))
    victim.close()
    peer.close()


def test_the_end_of_frames_queued_behind_a_busy_device_comes_after_their_answers_on_the_stream(
    side_daemon: Any, monkeypatch: Any
) -> None:
    """The same on the gRPC stream (the other carrier): a malformed frame behind frames queued for the busy device's
    thread ends the stream with INVALID_ARGUMENT after their answers (until round 34, before them)."""
    neighbour = _attach(side_daemon, monkeypatch)
    ch = tls.channel(side_daemon.address, CHANNEL_OPTIONS, token=False)
    reply = device_pb2_grpc.DeviceStub(ch).Attach(device_pb2.AttachRequest(token=side_daemon.token()), timeout=10)
    rids = list(range(41, 49))
    frames = [_free_then_sync(rid) for rid in rids] + [b"\x0a\x03\xf2\x01\x7f"]
    done = threading.Event()

    def requests() -> Any:
        yield from frames
        done.wait(30)

    stream = ch.stream_stream(
        "/gpupool.v1.Device/Stream", request_serializer=None, response_deserializer=device_pb2.ServerFrame.FromString
    )
    _busy(side_daemon, neighbour)
    call = stream(requests(), metadata=((protocol.SESSION_METADATA, reply.session_id),), timeout=60)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for frame in call:
            got.append((frame.request_id, frame.WhichOneof("reply")))
    done.set()
    assert got == [(rid, "sync") for rid in rids], got
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert "malformed ClientFrame" in (info.value.details() or "")
    _neighbour_works(neighbour)
    ch.close()
    neighbour.close()


def test_a_session_ended_while_its_socket_binds_answers_the_hello_first(side_daemon: Any, monkeypatch: Any) -> None:
    """Round 34: `BulkPort._hello` bound the link to its session, then sent the BULK_OK without the link's lock, while
    another thread could already write on it: a Detach (or the lease's end) right then had the stream's writer send
    the BULK_END (two threads in OpenSSL on one connection) and close the socket, before or under the BULK_OK; the
    client read an end as its hello's answer. Here the session is detached the moment it is bound (the real close,
    from another thread; the bind waits up to a second for the writer to close the socket): the client must read its
    BULK_OK, then the BULK_END saying why.

    The wait is a second of the clock, not 100 waits of 10 ms (2-3.6 s at load 26: round 50), and the socket's grace
    after the close (`bulkside.END_GRACE`, 5 s, for a client that never reads) is longer than the test holds the
    hello: the held hello delays the writer's BULK_END, and where the wait and the writer's turn took the 5 s the grace
    closed the socket first and the client read a close without its end (1 run in 15 at load 22, both isolations)."""
    from gpupool.server.front import FrontSession

    daemon = side_daemon.running.daemon
    bind = FrontSession.bind_bulk
    monkeypatch.setattr(bulkside, "END_GRACE", 60.0)  # (a reading client's end comes from the writer, not the grace)

    def bind_then_detach(s: FrontSession, link: Any) -> bool:
        if not bind(s, link):
            return False
        closer = threading.Thread(target=daemon.close_session, args=(s, "detached"))
        closer.start()
        until = time.monotonic() + 1.0
        while not link.closed and time.monotonic() < until:  # the writer closed the socket (old) or waits (now)
            threading.Event().wait(0.01)
        return True

    monkeypatch.setattr(FrontSession, "bind_bulk", bind_then_detach)
    victim, sid, port = _bare(side_daemon)
    peer = client_bulk.connect(side_daemon.address, port, sid, frames=True)
    assert peer is not None, "the hello should be answered with BULK_OK"
    end = _next_record(peer)
    assert isinstance(end, tuple) and end[0] == protocol.BULK_END and b"detached" in end[2], end
    err = _ended(victim)
    assert isinstance(err, FailedPrecondition) and "detached" in str(err), err
    victim.close()
    peer.close()


def test_replies_before_a_bad_frame_reach_a_slow_client_whose_bytes_the_daemon_left_unread(
    side_daemon: Any, monkeypatch: Any
) -> None:
    """A bad frame with more bytes behind it (never read: the reader stops at the bad one), behind Gets of 16 MiB
    that its client is slow to read: the replies and the BULK_END reach the client whole, then the socket ends with
    a plain close. Until round 34 the writer closed the socket right after the BULK_END, with the client's unread
    bytes in the daemon's kernel buffer: the close reset the connection, and the reset dropped the replies (and the
    end) the kernel had not yet delivered; the client read a reset in the middle of a download."""
    victim, sid, port = _bare(side_daemon)
    peer = _peer(side_daemon, port, sid)
    h = victim.handle_base + 5
    data = torch.arange(MiB, dtype=torch.float32)  # 4 MiB inline, then four Gets of it: 16 MiB of replies
    up = device_pb2.Command(upload=device_pb2.Upload(handle=h, last=True, data=data.numpy().tobytes()))
    up.upload.meta.dtype, up.upload.meta.shape[:] = 1, [MiB]
    gets = [device_pb2.Command(get=device_pb2.Get(handle=h, request_id=40 + i)) for i in range(4)]
    frame = device_pb2.ClientFrame(commands=[up, *gets]).SerializeToString()
    bad = protocol.frame_record(b"\x0a\x03\xf2\x01\x7f")  # malformed (as the held-frames test's)
    _send_raw(peer, protocol.frame_record(frame) + bad + b"\0" * 65536)  # the zeros: never read by the daemon
    threading.Event().wait(1.0)  # the client reads nothing for a while: the replies fill the kernel's buffers
    got = bytearray()
    while isinstance(record := _next_record(peer), tuple) and record[0] == protocol.BULK_FRAME:
        got += device_pb2.ServerFrame.FromString(record[2]).chunk.data
    assert isinstance(record, tuple), f"the socket broke after {len(got)} bytes of replies: {record}"
    assert record[0] == protocol.BULK_END and b"malformed ClientFrame" in record[2], record
    assert bytes(got) == data.numpy().tobytes() * 4
    after = _next_record(peer)  # then the daemon's end closes (a FIN, not a reset)
    assert isinstance(after, Unavailable) and "closed" in str(after), after
    assert isinstance(_ended(victim), InvalidArgument)
    victim.close()
    peer.close()


@pytest.mark.parametrize("rows", [100, 256], ids=["by_value_200KiB", "upload_512KiB"])
def test_captured_steps_on_the_socket_train_as_eager_with_a_new_batch_every_step(
    side_daemon: Any, monkeypatch: Any, rows: int
) -> None:
    """The stock MLP's shape of step through the shim, its frames on the side socket: a batch of `rows` x 500 floats
    a step, a different one each step, inside the RunGraph (200 KiB, by value) or as an Upload before it (512 KiB);
    such frames are read into the socket's reused frame buffers (server/bulkside.py `REUSE_MIN`), so a step that ran
    on another step's bytes (a buffer read into while its frame was queued) would train differently (it did, with the
    buffers' check left out: every case failed). Captured losses equal eager ones on the same daemon, and both fall."""
    from gpupool.client.torch import runtime

    import gpupool.torch as gt

    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1")
    batches = [torch.randn(rows, 500, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    targets = [b[:, :4].sum(1, keepdim=True) for b in batches]

    def train(captured: bool) -> list[float]:
        dev = gt.attach(side_daemon.address, side_daemon.token())
        try:
            rt = runtime.get(dev.index)
            assert rt is not None and rt.session._carrier is not None, "frames should go on the side socket"
            torch.manual_seed(5)
            model = torch.nn.Linear(500, 1).to(dev)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)

            def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x.to(dev)), y.to(dev))
                loss.backward()
                opt.step()
                return loss.detach()

            run = gt.capture(step) if captured else step
            for x, y in zip(batches[:3], targets[:3], strict=True):  # the capture records in these
                run(x, y).item()
            # no sync between steps: the client runs ahead, so the reader reads frames while earlier ones are queued
            losses = [run(x, y) for _ in range(3) for x, y in zip(batches, targets, strict=True)]
            return [float(v.item()) for v in losses]
        finally:
            gt.detach_all()

    eager, captured = train(False), train(True)
    assert captured == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert eager[-1] < eager[0]


def test_the_reader_reads_the_next_big_frame_while_the_worker_runs_one(daemon_factory: Any, monkeypatch: Any) -> None:
    """Round 38: a frame of `bulk.SIDE_QUEUED` bytes or more on the side socket (a captured step's 512 KiB batch) is
    run by the device's thread, so that the session's side reader reads and decrypts the next frame meanwhile. Until
    then the reader ran an idle device's slice itself (`Daemon.submit`'s inline slice) and read nothing until the
    worker answered: the reader and the worker took turns, and the client's sends waited on a full socket (~2-3x the
    stream's wall a step, BENCHMARKS.md "Round 38, side38"). Here the first big frame's slice waits (in the daemon,
    before its request goes out) for the reader to read the second, sent only once that slice started: on the old
    path the reader itself waits there, so the second frame is never read in time; the bytes arrive exact either
    way."""
    from gpupool.server import bulk, worker

    daemon = daemon_factory(fake_gpu_memory=256 * MiB, bulk_listen="127.0.0.1:0", isolation="process")
    real_run, real_recv = worker.ProcessRunner.run, bulkside.BulkLink.recv_frame
    started, second = threading.Event(), threading.Event()
    big_frames: list[int] = []
    overlapped: list[bool] = []

    def recv_frame(self: bulkside.BulkLink, limit: int) -> Any:
        got = real_recv(self, limit)
        if got is not None and len(got) >= bulk.SIDE_QUEUED:
            big_frames.append(len(got))
            if len(big_frames) >= 2:
                second.set()
        return got

    def run(self: worker.ProcessRunner, req: Any, commands: int, parts: Any = ()) -> Any:
        if len(req.payload) + sum(map(len, parts)) >= bulk.SIDE_QUEUED and not overlapped:
            started.set()
            overlapped.append(second.wait(10))  # the reader read the next frame while this one waits
        return real_run(self, req, commands, parts)

    monkeypatch.setattr(bulkside.BulkLink, "recv_frame", recv_frame)
    monkeypatch.setattr(worker.ProcessRunner, "run", run)
    with _attach(daemon, monkeypatch) as s:
        a, b = (torch.randn(128 * 1024, generator=torch.Generator().manual_seed(i)) for i in (1, 2))  # 512 KiB each
        ha = s.upload(a)  # (under `bulk.MIN_UPLOAD`: inside the frame, as a captured step's batch)
        s.flush()
        assert started.wait(30), "the first big frame's slice never started"
        hb = s.upload(b)
        s.flush()
        assert torch.equal(s.download(ha), a) and torch.equal(s.download(hb), b)
    assert overlapped == [True], (overlapped, big_frames)


class _FrameParses:
    """`service.device_pb2` for a test: counts the front's protobuf parses (`ClientFrame.FromString`) of frames
    holding `marker` (a command's bytes)."""

    def __init__(self, marker: bytes) -> None:
        self.calls = 0
        outer = self

        class ClientFrame:
            @staticmethod
            def FromString(raw: Any) -> Any:  # noqa: N802 (protobuf's name)
                if marker in bytes(raw):
                    outer.calls += 1
                return device_pb2.ClientFrame.FromString(raw)

        self.ClientFrame = ClientFrame

    def __getattr__(self, name: str) -> Any:
        return getattr(device_pb2, name)


# Hostile commands put between a frame's two Syncs (a Free, Sync 52, the command, a Free, Sync 53), behind a good
# frame (Sync 51): (what, the command's `commands` entry, the Syncs answered before the session ends with
# INVALID_ARGUMENT "malformed ClientFrame", whether the front's protobuf check refused the frame).
_HOSTILE = [
    # an eager record whose length runs past its command's end: left to the worker, which runs Sync 52 first
    ("truncated eager record", b"\x0a\x03\xf2\x01\x7f", (51, 52), False),
    # a RunGraph field hidden behind an eager record (protobuf's oneof: the last member wins), its graph_id's varint
    # unfinished: the frame holds no command of kind RunGraph, so the worker's upb parse refuses it (graph_frame,
    # which runs RunGraphs without a parse, takes only commands whose first tag is run_graph's)
    ("RunGraph behind an eager record", b"\x0a\x09\xf2\x01\x01\x00\xaa\x01\x02\x08\xff", (51, 52), False),
    # a malformed RunGraph among eager records: a RunGraph's frame is checked in the front, nothing of it runs
    ("malformed RunGraph", b"\x0a\x05\xaa\x01\x02\x08\xff", (51,), True),
    # a Get protobuf refuses: an Upload's or Get's bytes are checked in the front (the side channel reads them)
    ("malformed Get", b"\x0a\x03\x1a\x01\xff", (51,), True),
    # a truncated unknown field inside a Sync's place (field 99, length-delimited, 5 bytes announced, 1 there)
    ("truncated unknown field", b"\x0a\x04\x9a\x06\x05\x00", (51, 52), False),
]


def test_hostile_commands_in_small_frames_end_only_their_session_wherever_they_are_checked(
    side_daemon: Any, monkeypatch: Any
) -> None:
    """Round 45: the front no longer parses a small frame holding no RunGraph with protobuf (`slices.split_graphs`'s
    flag, read by the C++ or Python reading as it reads the kinds); the worker's parse, before any of the slice's
    commands runs, refuses a malformed command there, after the commands before it ran (docs/wire.md). Each hostile
    command ends its session with INVALID_ARGUMENT "malformed ClientFrame" on the socket and the stream, after the
    answers of what ran: the good frame's always, the bad frame's own Sync before it only where the worker checked
    it; nothing after it (Sync 53) runs; the neighbour is untouched. A RunGraph anywhere in the frame, and a bad
    Upload or Get, are still refused by the front (nothing of the frame runs). Until round 45 the front parsed every
    small frame: Sync 52 was never answered."""
    from gpupool.server import service

    neighbour = _attach(side_daemon, monkeypatch)
    free = device_pb2.ClientFrame(commands=[device_pb2.Command(free=device_pb2.Free(handles=[]))]).SerializeToString()
    for what, command, answered, front in _HOSTILE:
        parses = _FrameParses(command)
        monkeypatch.setattr(service, "device_pb2", parses)
        victim, sid, port = _bare(side_daemon)
        peer = _peer(side_daemon, port, sid)
        bad = _free_then_sync(52) + command + free + protocol.sync_frame(53)
        _send_raw(peer, protocol.frame_record(_free_then_sync(51)) + protocol.frame_record(bad))
        got = []
        while isinstance(record := _next_record(peer), tuple) and record[0] == protocol.BULK_FRAME:
            got.append(record)
        assert got == [(protocol.BULK_FRAME, 0, protocol.sync_reply(rid)) for rid in answered], (what, got, record)
        assert isinstance(record, tuple), (what, record)
        kind, code, body = record
        assert kind == protocol.BULK_END and code == InvalidArgument.code.value[0], (what, record)
        assert b"malformed ClientFrame" in body, (what, body)
        err = _ended(victim)
        assert isinstance(err, InvalidArgument) and "malformed ClientFrame" in str(err), (what, err)
        assert (parses.calls > 0) == front, (what, parses.calls)
        monkeypatch.undo()
        _neighbour_works(neighbour)
        victim.close()
        peer.close()
    neighbour.close()
