"""A session whose client reads none of its replies holds little of the daemon process (round 36, quota36).

Until round 36 such a session (parked at its unread-reply limit: fairqueue.py `block`) kept taking frames it could not
run into its queue up to the queue's 64 MiB, then gRPC's buffers: a stream asking for twenty 4 MiB downloads and
sending 4 MiB uploads behind them held ~120-140 MiB of the daemon process (bench/host_memory.py --probe queued; 64
sessions ~8.5 GiB outside every limit). Now a parked session's reader queues at most `fairqueue.PARKED_BYTES` of
commands and then waits (gRPC's flow control holds the client), and goes on once the client reads; small commands
(a checkpoint's Gets) still queue. A real in-process daemon (TLS, one fake GPU); a neighbour computes throughout."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from gpupool.server import fairqueue
from support import DaemonHandle, Healthy, MiB, tls_channel

from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2

UPLOADS = 24  # 4 MiB uploads the client sends behind its unread downloads: 96 MiB, past the queue's 64 MiB


class Parker:
    """A raw stream: uploads 4 MiB, asks for it back twenty times, sends UPLOADS more 4 MiB uploads (new handles),
    then one Get of the last; reads nothing until told to."""

    def __init__(self, d: DaemonHandle) -> None:
        self.channel = tls_channel(d.address, options=[("grpc.max_receive_message_length", 64 * MiB)])
        token = d.token(tenant="parker", quota_bytes=160 * MiB)
        reply = device_pb2_grpc.DeviceStub(self.channel).Attach(device_pb2.AttachRequest(token=token))
        self.session_id = reply.session_id
        x = reply.handle_base + 1
        self.last = x + UPLOADS
        meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_UINT8, shape=[4 * MiB])

        def upload(h: int, byte: int) -> bytes:
            up = device_pb2.Upload(handle=h, meta=meta, data=bytes([byte]) * (4 * MiB), last=True)
            return device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()

        gets = [device_pb2.Command(get=device_pb2.Get(request_id=i, handle=x)) for i in range(1, 21)]
        self.sent = 0
        self.release = threading.Event()

        def gen() -> Iterator[bytes]:
            yield upload(x, 7)
            yield device_pb2.ClientFrame(commands=gets).SerializeToString()
            for i in range(1, UPLOADS + 1):
                yield upload(x + i, i)
                self.sent += 1
            last = device_pb2.Command(get=device_pb2.Get(request_id=21, handle=self.last))
            yield device_pb2.ClientFrame(commands=[last]).SerializeToString()
            self.release.wait(120)

        stream = self.channel.stream_stream("/gpupool.v1.Device/Stream", None, device_pb2.ServerFrame.FromString)
        self.call: Any = stream(gen(), metadata=(("gpupool-session", self.session_id),), timeout=120)

    def end(self) -> None:
        self.call.cancel()
        self.release.set()
        self.channel.close()


def test_a_parked_session_queues_little_and_goes_on_when_read(daemon_factory: Any) -> None:
    d = daemon_factory(fake_gpu_memory=512 * MiB, outbox_bytes=16 * MiB)
    daemon = d.running.daemon
    neighbour = Healthy(d.address, d.token(tenant="reader", quota_bytes=8 * MiB), pause=0.02)
    p = Parker(d)
    try:
        # parked (its replies at its 16 MiB), and what it queued stops growing
        deadline = time.monotonic() + 30
        session = None
        while time.monotonic() < deadline:
            session = next((s for s in daemon.session_list() if s.session_id == p.session_id), None)
            if session is not None and session.entry.blocked:
                break
            time.sleep(0.05)
        assert session is not None and session.entry.blocked, "the session never parked"
        queued, sent = -1, -1
        for _ in range(60):  # until neither the client hands frames nor the queue grows for a second
            time.sleep(1.0)
            if (session.entry.nbytes, p.sent) == (queued, sent):
                break
            queued, sent = session.entry.nbytes, p.sent
        # one frame past the bound at most: the frame that found the queue under it (the old daemon: ~64 MiB)
        assert queued <= fairqueue.PARKED_BYTES + 4 * MiB + 64 * 1024, f"{queued / MiB:.1f} MiB queued while parked"
        assert p.sent < UPLOADS, "every upload was taken while the session was parked"
        assert neighbour.iterations > 0
        # it reads: its downloads come in order, the uploads behind them run, and so does its last Get
        for request_id in range(1, 21):
            frame = next(p.call)
            assert frame.request_id == request_id and frame.chunk.meta.shape == [4 * MiB]
            while not frame.chunk.last:
                frame = next(p.call)
        frame = next(p.call)
        assert frame.request_id == 21 and frame.chunk.data[:1] == bytes([UPLOADS])
        assert p.sent == UPLOADS
    finally:
        p.end()
        neighbour.check()
        neighbour.close()
