"""Many sessions at once on one daemon whose sessions' frames travel on TLS side sockets (round 33's review of the
direct reply write and the frame reader's read-ahead): well-behaved clients mixing eager ops, a sync after every op,
scalar reads and downloads of megabytes; raw clients that send downloads and syncs in one write and read nothing for
a while (their replies: big chunk frames through the session's writer, small sync replies written directly); raw
clients that hang up in the middle of their replies; raw clients whose requests end with a malformed frame (the
session's end written while its replies may be left in part on a paused socket). Every reply is checked exact and
in order, nothing may hang (every wait has a limit), and the daemon is alive and exact after.
GPUPOOL_SIDE_STRESS_SECONDS makes a longer campaign (the CI run: a few seconds), GPUPOOL_SIDE_STRESS_ISOLATION=process
one with a worker process a session."""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import pytest
import torch
from gpupool.client import bulk as client_bulk
from gpupool.client.session import CHANNEL_OPTIONS, Handle, Session
from test_side_frames import _next_record

from gpupool import duplex, protocol, tls, wire
from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2

MiB = 1024**2
SECONDS = float(os.environ.get("GPUPOOL_SIDE_STRESS_SECONDS", "3"))
ISOLATION = os.environ.get("GPUPOOL_SIDE_STRESS_ISOLATION", "thread")  # or "process": a worker process a session


@pytest.fixture
def side_daemon(daemon_factory: Any) -> Any:
    return daemon_factory(fake_gpu_memory=1024 * MiB, bulk_listen="127.0.0.1:0", isolation=ISOLATION)


def _well_behaved(daemon: Any, seed: int, stop: float, failures: list[str], counts: list[int]) -> None:
    rng = random.Random(seed)
    try:
        with Session.attach(daemon.address, daemon.token()) as s:
            assert s._carrier is not None, "frames should travel on the side socket"
            while time.monotonic() < stop:
                n = rng.choice([1, 7, 1000, 70_000, 400_000, 1_100_000])
                x = torch.randint(-1000, 1000, (n,), dtype=torch.int64, generator=torch.Generator().manual_seed(seed))
                seed += 1
                hx = Handle(s.upload(x))
                [hy] = s.call("aten::mul.Tensor", hx, hx)
                s.sync()
                [hz] = s.call("aten::add.Tensor", Handle(hy), hx)
                s.sync()
                [total] = s.call("aten::sum.default", Handle(hz))
                want = x * x + x
                got = s.sync([total])
                if got != [int(want.sum())]:
                    failures.append(f"session {seed}: sum {got} != {int(want.sum())}")
                if rng.random() < 0.5:
                    back = s.download(hz)
                    if not torch.equal(back, want):
                        failures.append(f"session {seed}: a download of {n} elements differs")
                s.free([hx, hy, hz, total])
                counts[0] += 1
    except Exception as exc:  # noqa: BLE001 - collected for the test's verdict
        failures.append(f"well-behaved client {seed}: {type(exc).__name__}: {exc}")


def _raw(daemon: Any) -> tuple[Session, client_bulk.BulkSocket]:
    """A session of the test's own making: its stream open (the writer), its frames socket (raw records)."""
    ch = tls.channel(daemon.address, CHANNEL_OPTIONS, token=False)
    reply = device_pb2_grpc.DeviceStub(ch).Attach(device_pb2.AttachRequest(token=daemon.token()), timeout=10)
    s = Session(ch, reply, daemon.address, None)
    sock = client_bulk.connect(daemon.address, reply.bulk_port, reply.session_id, frames=True)
    assert sock is not None and sock.frames
    return s, sock


def _reply(sock: client_bulk.BulkSocket, rid: int, what: str, data: bytes) -> str:
    """ "" when the next replies are the answer to request `rid` (a sync's, or a download's chunks, whole), "end"
    when the session's end (a malformed frame's) came instead, else what came."""
    parts = bytearray()
    while True:
        got = _next_record(sock, 60.0)
        if isinstance(got, tuple) and got[0] == protocol.BULK_END and b"malformed" in got[2] and not parts:
            return "end"
        if what == "sync":
            return "" if got == (protocol.BULK_FRAME, 0, protocol.sync_reply(rid)) else str(got)[:200]
        if not (isinstance(got, tuple) and got[0] == protocol.BULK_FRAME):
            return str(got)[:200]
        frame = device_pb2.ServerFrame.FromString(got[2])
        if frame.request_id != rid or not frame.HasField("chunk") or frame.chunk.offset != len(parts):
            return f"out of order: {str(frame)[:200]}"
        parts += frame.chunk.data
        if frame.chunk.last:
            return "" if bytes(parts) == data else "the bytes differ"


def _pauser(
    daemon: Any, seed: int, stop: float, failures: list[str], counts: list[int], hang_up: bool, bad: bool = False
) -> None:
    """Downloads of megabytes and lone syncs in one write, nothing read for a while; then every reply checked in
    order (chunks of each download whole, each sync's answer after the download before it), or (`hang_up`) the
    socket closed after part of them."""
    rng = random.Random(seed)
    try:
        s, sock = _raw(daemon)
        h = s.handle_base + 1
        data = torch.randint(0, 1 << 30, (rng.choice([300_000, 600_000]),), dtype=torch.int32)
        up = device_pb2.Upload(handle=h, offset=0, last=True)
        up.meta.CopyFrom(tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(torch.int32), shape=[len(data)], stride=[1]))
        duplex.send_all(
            sock.sock, sock.lock, [protocol.frame_record(protocol.upload_frame(up, data.numpy().tobytes()))], 10
        )
        while time.monotonic() < stop:
            plan = [rng.choice(["get", "sync", "sync"]) for _ in range(rng.randint(2, 8))]
            records = []
            for rid, what in enumerate(plan, 1):
                if what == "get":
                    get = device_pb2.Get(request_id=rid, handle=h)
                    records.append(
                        protocol.frame_record(
                            device_pb2.ClientFrame(commands=[device_pb2.Command(get=get)]).SerializeToString()
                        )
                    )
                else:
                    records.append(protocol.frame_record(protocol.sync_frame(rid)))
            if bad:  # a malformed frame behind them: the session's end after their replies
                records.append(protocol.frame_record(b"\x0a\x05\xff\xff"))
            duplex.send_all(sock.sock, sock.lock, [b"".join(records)], 10)
            time.sleep(rng.choice([0.0, 0.05, 0.3]))  # paused: the daemon's writes wait, or are left in part
            if hang_up:  # (a download here is one chunk: one record a command)
                for _ in range(rng.randint(0, len(plan) - 1)):
                    _next_record(sock, 60.0)
                sock.close()
                s.close()
                counts[0] += 1
                return
            for rid, what in enumerate(plan, 1):
                # (the session's end comes after the replies of every frame before the bad one: until round 34 it
                # could pass those still queued for the device's thread)
                verdict = _reply(sock, rid, what, data.numpy().tobytes())
                if verdict:
                    failures.append(f"client {seed}: {what} {rid}: {verdict}")
                    return
            else:
                if bad:
                    got = _next_record(sock, 60.0)
                    if not (isinstance(got, tuple) and got[0] == protocol.BULK_END and b"malformed" in got[2]):
                        failures.append(f"bad client {seed}: {str(got)[:200]}")
            counts[0] += 1
            if bad:
                break
        sock.close()
        s.close()
    except Exception as exc:  # noqa: BLE001 - collected for the test's verdict
        failures.append(f"paused client {seed}: {type(exc).__name__}: {exc}")


def test_many_side_socket_sessions_at_once_get_every_reply_exact_and_in_order(
    side_daemon: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("GPUPOOL_SIDE_FRAMES", "1")
    stop = time.monotonic() + SECONDS
    failures: list[str] = []
    good, paused, hung, bad = [0], [0], [0], [0]
    threads = [
        threading.Thread(target=_well_behaved, args=(side_daemon, 100 * i, stop, failures, good)) for i in range(6)
    ]
    threads += [
        threading.Thread(target=_pauser, args=(side_daemon, 1000 + i, stop, failures, paused, False)) for i in range(3)
    ]

    def hang_ups() -> None:
        i = 0
        while time.monotonic() < stop:
            _pauser(side_daemon, 5000 + i, stop + 1, failures, hung, True)
            i += 1

    threads.append(threading.Thread(target=hang_ups))

    def bad_ones() -> None:
        i = 0
        while time.monotonic() < stop:
            _pauser(side_daemon, 7000 + i, stop + 1, failures, bad, False, True)
            i += 1

    threads.append(threading.Thread(target=bad_ones))
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not failures, failures[:5]
    assert good[0] and paused[0] and hung[0] and bad[0], (good, paused, hung, bad)
    with Session.attach(side_daemon.address, side_daemon.token()) as s:  # the daemon alive and exact after
        x = torch.arange(1000, dtype=torch.int64)
        [y] = s.call("aten::mul.Tensor", Handle(s.upload(x)), 3)
        assert torch.equal(s.download(y), x * 3)
    print(f"rounds: well-behaved {good[0]}, paused {paused[0]}, hung up {hung[0]}, bad frame {bad[0]}")
