"""The host's count of unread replies (--max-unread-bytes), kept as one number (`server/front.py` `Unread`) instead of
a sum over every session at each slice: with many sessions, one flooding, it must read what the sum read.

A real in-process daemon (TLS, one fake GPU, 4 MiB of unread replies a session, 10 MiB for the host); hogs are raw
streams that ask for twenty 4 MiB downloads and do not read them (each parks at its own 4 MiB); reading neighbours
work beside them throughout."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from support import DaemonHandle, Healthy, MiB, daemon_status, tls_channel

from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2
from gpupool.tokens import public_session_id


class Hog:
    """A session whose client uploads 4 MiB, asks for it back twenty times and reads nothing until told to."""

    def __init__(self, d: DaemonHandle, tenant: str) -> None:
        self.channel = tls_channel(d.address, options=[("grpc.max_receive_message_length", 64 * MiB)])
        token = d.token(tenant=tenant, quota_bytes=16 * MiB)
        reply = device_pb2_grpc.DeviceStub(self.channel).Attach(device_pb2.AttachRequest(token=token))
        self.session_id = reply.session_id
        parse = device_pb2.ServerFrame.FromString
        stream = self.channel.stream_stream("/gpupool.v1.Device/Stream", None, parse)
        x = reply.handle_base + 1
        meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_UINT8, shape=[4 * MiB])
        up = device_pb2.Upload(handle=x, meta=meta, data=b"\7" * (4 * MiB), last=True)
        gets = [device_pb2.Command(get=device_pb2.Get(request_id=i, handle=x)) for i in range(1, 21)]
        frames = [device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()]
        frames.append(device_pb2.ClientFrame(commands=gets).SerializeToString())
        self.release = threading.Event()

        def gen() -> Iterator[bytes]:
            yield from frames
            self.release.wait(60)

        self.call: Any = stream(gen(), metadata=(("gpupool-session", self.session_id),), timeout=120)

    def end(self) -> None:
        self.call.cancel()
        self.release.set()
        self.channel.close()


def _counted(d: DaemonHandle) -> tuple[int, int]:
    """(the daemon's running count, the sum over its open sessions that the count stands for)."""
    daemon = d.running.daemon
    with daemon.unread.lock:  # no reply is queued or taken meanwhile
        return daemon.unread.total, sum(s.outbox_bytes for s in daemon.session_list())


def _parked(d: DaemonHandle, *hogs: Hog) -> list[int]:
    """Wait until each hog holds its own limit (4 MiB) of unread replies; returns what they hold."""
    ids = {h.session_id for h in hogs}
    held: list[int] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = [s.outbox_bytes for s in d.running.daemon.session_list() if s.session_id in ids]
        if len(held) == len(ids) and min(held) >= 4 * MiB:
            break
        time.sleep(0.05)
    return held


def _gone(d: DaemonHandle, hog: Hog) -> None:
    deadline = time.monotonic() + 30
    while any(s.session_id == hog.session_id for s in d.running.daemon.session_list()):
        assert time.monotonic() < deadline, "a cancelled stream's session stayed open"
        time.sleep(0.05)


def test_the_host_count_of_unread_replies_follows_many_sessions_and_one_flood(daemon_factory: Any) -> None:
    d = daemon_factory(fake_gpu_memory=512 * MiB, outbox_bytes=4 * MiB, max_unread_bytes=10 * MiB)
    neighbours = [Healthy(d.address, d.token(tenant=f"reader-{i}", quota_bytes=8 * MiB), pause=0.02) for i in range(4)]
    try:
        # Streams that end with their replies unread: their sessions close, and what they held counts no more
        # (12+ MiB in all, past the host's limit, would otherwise stay counted for good).
        for i in range(3):
            hog = Hog(d, f"gone-{i}")
            assert min(_parked(d, hog), default=0) >= 4 * MiB
            hog.end()
            _gone(d, hog)
            total, summed = _counted(d)
            assert total == summed, (i, total, summed)
        assert _counted(d)[0] < 4 * MiB

        # Two hogs park at 4 MiB each, within the host's 10 MiB: neither is ended.
        a, b = Hog(d, "hog-a"), Hog(d, "hog-b")
        held = _parked(d, a, b)
        assert len(held) == 2 and min(held) >= 4 * MiB, held
        total, summed = _counted(d)
        assert total == summed and total >= 8 * MiB, (total, summed)

        # A third would take the host past it: the one holding the most, counting its new replies, is ended.
        c = Hog(d, "hog-c")
        with pytest.raises(grpc.RpcError) as info:
            next(c.call)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-unread-bytes" in (info.value.details() or "")
        c.end()
        _gone(d, c)

        # Hog a reads all twenty of its replies: what it read leaves the count, so a new hog parks beside b.
        for request_id in range(1, 21):
            frame = next(a.call)
            assert frame.request_id == request_id and frame.chunk.meta.shape == [4 * MiB]
        deadline = time.monotonic() + 30
        while _counted(d)[0] >= 8 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        e = Hog(d, "hog-e")
        held = _parked(d, b, e)
        assert len(held) == 2 and min(held) >= 4 * MiB, held
        status = daemon_status(device_pb2_grpc.DeviceStub(a.channel), *(h.session_id for h in (a, b, e)))
        assert {public_session_id(h.session_id) for h in (a, b, e)} <= {s.session_id for s in status.sessions}
        total, summed = _counted(d)
        assert total == summed, (total, summed)
        for h in (a, b, e):
            h.end()
        for n in neighbours:
            n.check()  # sessions that read their replies are never the ones ended
    finally:
        for n in neighbours:
            n.close()


class Raw:
    """A raw stream whose client sends the frames it is given, one at a time (`send`), and reads nothing until told."""

    def __init__(self, d: DaemonHandle, tenant: str, quota: int) -> None:
        # without BDP probing the stream's window stays at 64 KiB: gRPC takes no more of the replies than that
        options = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.http2.bdp_probe", 0)]
        self.channel = tls_channel(d.address, options=options)
        self.stub = device_pb2_grpc.DeviceStub(self.channel)
        reply = self.stub.Attach(device_pb2.AttachRequest(token=d.token(tenant=tenant, quota_bytes=quota)))
        self.session_id, self.base = reply.session_id, reply.handle_base
        self.frames: list[bytes] = []
        self.ready = threading.Semaphore(0)
        self.done = threading.Event()

        def gen() -> Iterator[bytes]:
            while self.ready.acquire(timeout=60) and not self.done.is_set():
                yield self.frames.pop(0)

        stream = self.channel.stream_stream("/gpupool.v1.Device/Stream", None, device_pb2.ServerFrame.FromString)
        self.call: Any = stream(gen(), metadata=(("gpupool-session", self.session_id),), timeout=120)

    def send(self, *commands: device_pb2.Command) -> None:
        self.frames.append(device_pb2.ClientFrame(commands=list(commands)).SerializeToString())
        self.ready.release()

    def end(self) -> None:
        self.done.set()
        self.ready.release()
        self.call.cancel()
        self.channel.close()


def _upload(handle: int, n: int) -> device_pb2.Command:
    meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_UINT8, shape=[n])
    return device_pb2.Command(upload=device_pb2.Upload(handle=handle, meta=meta, data=b"\7" * n, last=True))


def _get(request_id: int, handle: int) -> device_pb2.Command:
    return device_pb2.Command(get=device_pb2.Get(request_id=request_id, handle=handle))


def _op(name: str, outputs: list[int], *args: tensor_pb2.Arg, **kwargs: tensor_pb2.Arg) -> device_pb2.Command:
    return device_pb2.Command(op=device_pb2.Op(name=name, args=list(args), kwargs=kwargs, outputs=outputs))


def _until(what: Any, why: str) -> None:
    deadline = time.monotonic() + 60
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.001)


def test_a_session_closed_during_its_own_slice_counts_what_it_holds(daemon_factory: Any) -> None:
    """A session closed while its slice runs (detached from another call; under --isolation thread the slice runs to
    its end, no worker is killed) has left the host's count (`Unread.leave`), but the replies its slice produced
    would join what it already holds: `_room_for_replies` counts those held bytes itself (`0 if s.counted else
    s.outbox_bytes`, daemon.py). Host limit 15 MiB: a neighbour holds 3 MiB unread, the session 2 MiB (less the 64 KiB
    window each client's gRPC takes), and its slice (a Sync of 2^20 scalars: 11 MiB of reply, ~1 s, during which it
    is detached) would take the host to ~16 MiB: the session is the one ended, its new reply is dropped, and its
    client reads one reply, then the detach. Counted as 0 (the mutant), ~14 MiB: the reply is queued, and its
    client would read two."""
    d = daemon_factory(fake_gpu_memory=512 * MiB, outbox_bytes=8 * MiB, max_unread_bytes=15 * MiB, isolation="thread")
    daemon = d.running.daemon
    held = Raw(d, "held", 16 * MiB)
    s = Raw(d, "closed-in-its-slice", 16 * MiB)
    try:
        held.send(_upload(held.base + 1, 3 * MiB), _get(1, held.base + 1))
        [hs] = [x for x in daemon.session_list() if x.session_id == held.session_id]
        [fs] = [x for x in daemon.session_list() if x.session_id == s.session_id]
        _until(lambda: hs.outbox_bytes >= 3 * MiB - 128 * 1024, "the neighbour's 3 MiB reply was never held")
        x, y = s.base + 1, s.base + 2
        s.send(_upload(x, 2 * MiB), _op("aten::ones.default", [y], tensor_pb2.Arg(ints=tensor_pb2.IntList())))
        s.send(_get(1, x))
        _until(lambda: fs.outbox_bytes >= 2 * MiB - 128 * 1024 and fs.lock.acquire(blocking=False), "no Get held")
        fs.lock.release()
        s.send(device_pb2.Command(sync=device_pb2.Sync(request_id=2, scalar_handles=[y] * (1 << 20))))
        _until(lambda: not fs.lock.acquire(blocking=False) or fs.lock.release(), "the slice never started")
        detach = threading.Thread(target=held.stub.Detach, args=(device_pb2.DetachRequest(session_id=s.session_id),))
        detach.start()
        _until(lambda: fs.closed, "the detach never closed the session")
        assert not fs.lock.acquire(blocking=False), "the slice ended before the detach: no closed-in-its-slice case"
        detach.join(60)
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for frame in s.call:
                got.append(frame.request_id)
        assert got == [1], got  # the Sync's reply was dropped: it would have taken the host past 15 MiB
        assert "detached" in (info.value.details() or ""), info.value.details()
        assert hs.outbox_bytes >= 3 * MiB - 128 * 1024 and not hs.closed  # the neighbour holding less: not ended
        with daemon.unread.lock:
            assert daemon.unread.total == sum(x.outbox_bytes for x in daemon.session_list())
    finally:
        held.end()
        s.end()
