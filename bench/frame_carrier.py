"""What carrying a session's frames costs over its two possible carriers, measured in one run (issue 8 items 2, 4):
(a) a TLS gRPC stream, handled as the daemon's Stream handles it (a reader thread iterating the request stream,
replies handed through a queue to the handler's generator, the client's frames through a SimpleQueue to gRPC's
sending thread, its replies read by the waiting thread with `next()`), and (b) a TLS socket carrying the same
bytes length-prefixed (`protocol.BULK_HEAD`, kind `BULK_FRAME`), handled as server/bulkside.py's frame reader
does (a reader thread, replies through a queue to a writer thread, gpupool/duplex.py on both ends; the client
writes its frame from the calling thread and reads its reply there).

No daemon and no worker: only the carrier. Two figures per carrier, alternating blocks, medians:
- round trip: a lone Sync's frame (`protocol.sync_frame`) and its 2-byte reply, p50 in us;
- a tiny frame: 30 eager-sized commands (~1.2 KB) with no reply, 200 of them then one round trip: CPU us per
  frame of the serving process (all its threads, gRPC's included) and of the client.

    python bench/frame_carrier.py [--rounds 5] [--pings 2000] [--frames 2000]
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

from gpupool import duplex, pki, protocol

KIND = 3  # protocol.BULK_FRAME (written out: the base tree has no such constant)
HEAD = protocol.BULK_HEAD
REPLY = protocol.sync_reply(1)


def _cpu(pid: int) -> float:
    """CPU seconds of the process's live threads, to the nanosecond (the scheduler's own count)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total / 1e9


def _needs_reply(raw: bytes) -> bool:
    return protocol.lone_sync(raw) is not None


def serve() -> None:
    import grpc

    cert, key = os.environ["GPUPOOL_TLS_CERT"], os.environ["GPUPOOL_TLS_KEY"]

    def stream(requests: Iterator[bytes], ctx: Any) -> Iterator[bytes]:
        out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

        def read() -> None:
            try:
                for raw in requests:
                    if _needs_reply(raw):
                        out.put(REPLY)
            except grpc.RpcError:
                pass  # the client went away at the end of the run
            out.put(None)

        threading.Thread(target=read, daemon=True).start()
        while True:
            item = out.get()
            if item is None:
                return
            yield item

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("fc", {"Stream": grpc.stream_stream_rpc_method_handler(stream)}),)
    )
    creds = grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
    gport = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def side(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = ctx.wrap_socket(conn, server_side=True)
        sock.setblocking(False)
        lock = threading.Lock()
        out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

        def write() -> None:
            while (item := out.get()) is not None:
                duplex.send_all(sock, lock, [HEAD.pack(KIND, 0, 0, len(item)) + item], 30.0)

        threading.Thread(target=write, daemon=True).start()
        head = bytearray(HEAD.size)
        while duplex.recv_into(sock, lock, memoryview(head), 3600.0) == HEAD.size:
            _, _, _, n = HEAD.unpack(head)
            body = bytearray(n)
            duplex.recv_into(sock, lock, memoryview(body), 30.0)
            if _needs_reply(bytes(body)):
                out.put(REPLY)
        out.put(None)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=side, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print(f"PORTS {gport} {listener.getsockname()[1]}", flush=True)
    sys.stdin.read()


class GrpcCarrier:
    def __init__(self, port: int) -> None:
        import grpc

        ca = Path(os.environ["GPUPOOL_TLS_CA"]).read_bytes()
        self.ch = grpc.secure_channel(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials(root_certificates=ca),
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
        self.q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.replies = iter(self.ch.stream_stream("/fc/Stream")(iter(self.q.get, None)))

    def send(self, raw: bytes) -> None:
        self.q.put(raw)

    def recv(self) -> bytes:
        return next(self.replies)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.q.put(None)
        self.ch.close()


class SocketCarrier:
    def __init__(self, port: int) -> None:
        ctx = ssl.create_default_context(cafile=os.environ["GPUPOOL_TLS_CA"])
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.sock.setblocking(False)
        self.lock = threading.Lock()
        self.head = bytearray(HEAD.size)

    def send(self, raw: bytes) -> None:
        duplex.send_all(self.sock, self.lock, [HEAD.pack(KIND, 0, 0, len(raw)) + raw], 30.0)

    def recv(self) -> bytes:
        duplex.recv_into(self.sock, self.lock, memoryview(self.head), 30.0)
        body = bytearray(HEAD.unpack(self.head)[3])
        duplex.recv_into(self.sock, self.lock, memoryview(body), 30.0)
        return bytes(body)

    def close(self) -> None:
        self.sock.close()


def tiny_frame() -> bytes:
    record = bytes(range(38))  # ~ an eager op record's size
    cmd = b"\x0a" + bytes([len(record) + 2]) + b"\x52" + bytes([len(record)]) + record
    return cmd * 30


def block(c: Any, pid: int, pings: int, frames: int) -> tuple[float, float, float]:
    sync = protocol.sync_frame(1)
    rtts = []
    for _ in range(pings):
        t0 = time.perf_counter()
        c.send(sync)
        c.recv()
        rtts.append(time.perf_counter() - t0)
    frame = tiny_frame()
    s0, c0 = _cpu(pid), _cpu(os.getpid())
    for _ in range(frames):
        c.send(frame)
    c.send(sync)
    c.recv()
    s1, c1 = _cpu(pid), _cpu(os.getpid())
    return statistics.median(rtts) * 1e6, (s1 - s0) / frames * 1e6, (c1 - c0) / frames * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve()
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(pki.loopback_env(Path(tmp) / "pki"))
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        gport, sport = (int(p) for p in proc.stdout.readline().split()[1:])
        carriers = {"grpc stream": GrpcCarrier(gport), "side socket": SocketCarrier(sport)}
        for c in carriers.values():  # warm both
            block(c, proc.pid, 200, 200)
        got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in carriers}
        for _ in range(args.rounds):
            for name, c in carriers.items():
                got[name].append(block(c, proc.pid, args.pings, args.frames))
        for c in carriers.values():
            c.close()
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait()
    print(f"load {os.getloadavg()[0]:.1f}; medians of {args.rounds} alternating blocks")
    print(f"{'carrier':<12} {'round trip p50 us':>18} {'server CPU us/frame':>20} {'client CPU us/frame':>20}")
    med = {k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in got.items()}
    for name, (rt, sc, cc) in med.items():
        print(f"{name:<12} {rt:>18.1f} {sc:>20.1f} {cc:>20.1f}")
    a, b = med["grpc stream"], med["side socket"]
    print(f"socket / grpc: round trip {b[0] / a[0]:.2f}, server CPU {b[1] / a[1]:.2f}, client CPU {b[2] / a[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
