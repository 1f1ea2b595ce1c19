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
from support import DaemonHandle, Healthy, MiB, tls_channel

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
        status = device_pb2_grpc.DeviceStub(a.channel).Status(device_pb2.StatusRequest())
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
