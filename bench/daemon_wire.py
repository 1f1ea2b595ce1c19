"""Daemon wire benchmark: 256 MiB upload/download, tiny-op throughput and sync round trips of a real
`gpupool serve` (fake GPU, loopback), next to floors measured in the same run on the same machine:
a raw TCP socket (throughput, 1-byte ping-pong) and a bare Python gRPC echo (unary and stream); and the cost
of TLS: the same figures of a second daemon serving plaintext (`--insecure`).

    python bench/daemon_wire.py [--repeat 3] [--size-mib 256] [--ops 10000] [--syncs 1000]
    python bench/daemon_wire.py --isolation-cost [--repeat 5]

Each figure is the median of --repeat runs; the table prints gpupool / floor ratios. With --isolation-cost it
instead compares two daemons started side by side, `--isolation process` (each session in its own worker
process, the default) and `--isolation thread` (sessions in the daemon process), measured alternately.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

MiB = 1024**2
CHUNK = 4 * MiB
GRPC_OPTIONS = [  # 4 MiB chunks plus framing exceed gRPC's 4 MiB default limit
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.max_send_message_length", 64 * MiB),
]


# ---------------------------------------------------------------- floor server (a separate process)


def floor_server() -> None:
    """TCP sink/source/echo and gRPC echo servers; prints 'PORTS tcp grpc' and serves until stdin closes."""
    import grpc

    lsock = socket.create_server(("127.0.0.1", 0))
    blob = b"\x5a" * CHUNK

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(CHUNK)
        with conn:
            while True:
                head = conn.recv(9)
                if not head:
                    return
                kind, n = head[:1], struct.unpack("!Q", head[1:9])[0]
                if kind == b"U":  # upload: read n bytes, ack
                    left = n
                    while left:
                        got = conn.recv_into(buf, min(left, CHUNK))
                        left -= got
                    conn.sendall(b"k")
                elif kind == b"D":  # download: send n bytes
                    left = n
                    while left:
                        k = min(left, CHUNK)
                        conn.sendall(memoryview(blob)[:k])
                        left -= k
                elif kind == b"P":  # ping-pong n times, 1 byte each way
                    for _ in range(n):
                        conn.recv(1)
                        conn.sendall(b"p")

    def accept() -> None:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()

    def unary(req: bytes, ctx: Any) -> bytes:
        return req

    def echo(reqs: Iterator[bytes], ctx: Any) -> Iterator[bytes]:
        yield from reqs

    def sink(reqs: Iterator[bytes], ctx: Any) -> bytes:
        return struct.pack("!Q", sum(len(r) for r in reqs))

    def source(req: bytes, ctx: Any) -> Iterator[bytes]:
        left = struct.unpack("!Q", req)[0]
        while left:
            k = min(left, CHUNK)
            yield blob if k == CHUNK else blob[:k]
            left -= k

    handlers = grpc.method_handlers_generic_handler(
        "floor",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Echo": grpc.stream_stream_rpc_method_handler(echo),
            "Sink": grpc.stream_unary_rpc_method_handler(sink),
            "Source": grpc.unary_stream_rpc_method_handler(source),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORTS {lsock.getsockname()[1]} {port}", flush=True)
    sys.stdin.read()
    server.stop(0)


# ---------------------------------------------------------------- measurements


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def tcp_figures(port: int, size: int, pings: int) -> dict[str, float]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        blob = b"\xa5" * CHUNK
        t0 = time.perf_counter()
        s.sendall(b"U" + struct.pack("!Q", size))
        for off in range(0, size, CHUNK):
            s.sendall(memoryview(blob)[: min(CHUNK, size - off)])
        s.recv(1)
        up = size / (time.perf_counter() - t0) / 1e9
        buf = bytearray(CHUNK)
        t0 = time.perf_counter()
        s.sendall(b"D" + struct.pack("!Q", size))
        left = size
        while left:
            left -= s.recv_into(buf, min(left, CHUNK))
        down = size / (time.perf_counter() - t0) / 1e9
        s.sendall(b"P" + struct.pack("!Q", pings))
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            s.sendall(b"x")
            s.recv(1)
            rtts.append(time.perf_counter() - t0)
    return {"up": up, "down": down, "p50": percentile(rtts, 0.5), "p99": percentile(rtts, 0.99)}


def grpc_figures(port: int, size: int, pings: int, messages: int) -> dict[str, float]:
    import queue

    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:  # the plaintext gRPC floor
        unary = ch.unary_unary("/floor/Unary", None, None)
        sink = ch.stream_unary("/floor/Sink", None, None)
        source = ch.unary_stream("/floor/Source", None, None)
        echo = ch.stream_stream("/floor/Echo", None, None)
        blob = b"\xa5" * CHUNK
        t0 = time.perf_counter()
        sink(iter([blob] * (size // CHUNK)))
        up = size / (time.perf_counter() - t0) / 1e9
        t0 = time.perf_counter()
        got = sum(len(c) for c in source(struct.pack("!Q", size)))
        down = got / (time.perf_counter() - t0) / 1e9
        unary(b"warm")
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            unary(b"x" * 16)
            rtts.append(time.perf_counter() - t0)
        q: queue.Queue[bytes | None] = queue.Queue()
        replies = iter(echo(iter(q.get, None)))
        srtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            q.put(b"x" * 16)
            next(replies)
            srtts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        msg = b"y" * 100  # one small message per op: what a naive one-message-per-op design would get
        sink(msg for _ in range(messages))
        msgs = messages / (time.perf_counter() - t0)
        q.put(None)
    return {
        "up": up,
        "down": down,
        "unary_p50": percentile(rtts, 0.5),
        "unary_p99": percentile(rtts, 0.99),
        "stream_p50": percentile(srtts, 0.5),
        "stream_p99": percentile(srtts, 0.99),
        "msgs": msgs,
    }


def gpupool_figures(address: str, token: str, size: int, ops: int, syncs: int) -> dict[str, float]:
    import torch
    from gpupool.client.session import Handle, Session

    with Session.attach(address, token) as s:
        big = torch.randint(0, 255, (size,), dtype=torch.uint8)
        t0 = time.perf_counter()
        h = s.upload(big)
        s.sync()
        up = size / (time.perf_counter() - t0) / 1e9
        t0 = time.perf_counter()
        back = s.download(h)
        down = size / (time.perf_counter() - t0) / 1e9
        assert torch.equal(back, big), "256 MiB round trip is not bit-exact"
        s.free([h])
        a = Handle(s.upload(torch.ones(1)))
        out = s.new_handle()
        s.call("aten::add.Tensor", a, a, outputs=[out])
        s.sync()
        t0 = time.perf_counter()
        for _ in range(ops):
            s.call("aten::add.Tensor", a, a, outputs=[out])
        s.sync()
        op_rate = ops / (time.perf_counter() - t0)
        rtts = []
        for _ in range(syncs):
            t0 = time.perf_counter()
            s.sync()
            rtts.append(time.perf_counter() - t0)
    return {"up": up, "down": down, "ops": op_rate, "p50": percentile(rtts, 0.5), "p99": percentile(rtts, 0.99)}


# ---------------------------------------------------------------- driver


def plaintext(fn: Callable[[], dict[str, float]]) -> Callable[[], dict[str, float]]:
    """Run `fn` with GPUPOOL_INSECURE=1: sessions connect in plaintext (to the --insecure daemon)."""

    def run() -> dict[str, float]:
        os.environ["GPUPOOL_INSECURE"] = "1"
        try:
            return fn()
        finally:
            del os.environ["GPUPOOL_INSECURE"]

    return run


def start_daemon(key_file: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        sys.executable,
        "-m",
        "gpupool.cli",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "0",
        "--fake-gpus",
        "1",
        "--fake-gpu-memory",
        "2GiB",
        "--token-public-keys",
        str(key_file),
        "--host-id",
        "bench",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"listening on (\S+:\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout or []], daemon=True).start()
            return proc, m.group(1)
    raise RuntimeError("gpupool serve did not start")


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def isolation_cost(args: argparse.Namespace) -> int:
    """The same figures against a process-isolated and an in-thread daemon, alternating, medians side by side."""
    from gpupool import pki, tokens

    size = args.size_mib * MiB
    modes = ("thread", "process")
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        key = secrets.token_hex(32).encode()  # a token seed; the daemons get its public key only
        key_file = Path(tmp) / "key.pub"
        key_file.write_bytes(tokens.public_pem(tokens.Signer.from_seed(key).public))
        os.environ.update(pki.loopback_env(Path(tmp) / "pki"))  # both daemons and this process speak TLS
        daemons = {m: start_daemon(key_file, "--isolation", m) for m in modes}
        try:
            for i in range(args.repeat):
                for m in modes:
                    claims = tokens.TokenClaims(f"bench-{m}-{i}", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
                    runs[m].append(gpupool_figures(daemons[m][1], tokens.mint(key, claims), size, args.ops, args.syncs))
                print(f"run {i + 1}/{args.repeat} done", file=sys.stderr)
        finally:
            for proc, _ in daemons.values():
                proc.terminate()
                proc.wait(30)
    t, p = median_of(runs["thread"]), median_of(runs["process"])
    print(f"\nisolation cost: medians of {args.repeat} alternating runs, loopback, {os.cpu_count()} CPUs, fake GPU")
    print(f"{'metric':<34}{'thread':>12}{'process':>12}{'process/thread':>16}")
    for name, key_, scale in (
        (f"upload {args.size_mib} MiB (GB/s)", "up", 1.0),
        (f"download {args.size_mib} MiB (GB/s)", "down", 1.0),
        ("sync round trip p50 (us)", "p50", 1e6),
        ("sync round trip p99 (us)", "p99", 1e6),
        (f"{args.ops} tiny adds + 1 sync (ops/s)", "ops", 1.0),
    ):
        print(f"{name:<34}{t[key_] * scale:>12.3f}{p[key_] * scale:>12.3f}{p[key_] / t[key_]:>16.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--ops", type=int, default=10_000)
    p.add_argument("--syncs", type=int, default=1000)
    p.add_argument("--isolation-cost", action="store_true", help="compare --isolation process with thread")
    p.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.floor_server:
        floor_server()
        return 0
    if args.isolation_cost:
        return isolation_cost(args)
    from gpupool import pki, tokens

    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory() as tmp:
        key = secrets.token_hex(32).encode()  # a token seed; the daemon gets its public key only
        key_file = Path(tmp) / "key.pub"
        key_file.write_bytes(tokens.public_pem(tokens.Signer.from_seed(key).public))
        os.environ.update(pki.loopback_env(Path(tmp) / "pki"))  # the daemon and this process speak TLS
        daemon, address = start_daemon(key_file)
        plain_daemon, plain_address = start_daemon(key_file, "--insecure")
        floor = subprocess.Popen(
            [sys.executable, __file__, "--floor-server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert floor.stdout is not None
            _, tcp_port, grpc_port = floor.stdout.readline().split()
            claims = tokens.TokenClaims("bench", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
            token = tokens.mint(key, claims)
            runs: dict[str, list[dict[str, float]]] = {"gpupool": [], "tcp": [], "grpc": [], "plain": []}
            measures: dict[str, Callable[[], dict[str, float]]] = {
                "gpupool": lambda: gpupool_figures(address, token, size, args.ops, args.syncs),
                "plain": plaintext(lambda: gpupool_figures(plain_address, token, size, args.ops, args.syncs)),
                "tcp": lambda: tcp_figures(int(tcp_port), size, args.syncs),
                "grpc": lambda: grpc_figures(int(grpc_port), size, args.syncs, args.ops),
            }
            for i in range(args.repeat):
                for name, fn in measures.items():
                    runs[name].append(fn())
                print(f"run {i + 1}/{args.repeat} done", file=sys.stderr)
        finally:
            for d in (daemon, plain_daemon):
                d.terminate()
                d.wait(30)
            if floor.stdin:
                floor.stdin.close()
            floor.wait(30)
    g, t, r, plain = (median_of(runs[k]) for k in ("gpupool", "tcp", "grpc", "plain"))
    us = 1e6
    rows = [
        (f"upload {args.size_mib} MiB (GB/s)", g["up"], t["up"], r["up"], g["up"] / r["up"], g["up"] / t["up"]),
        (
            f"download {args.size_mib} MiB (GB/s)",
            g["down"],
            t["down"],
            r["down"],
            g["down"] / r["down"],
            g["down"] / t["down"],
        ),
        (
            "sync round trip p50 (us)",
            g["p50"] * us,
            t["p50"] * us,
            r["stream_p50"] * us,
            g["p50"] / r["stream_p50"],
            g["p50"] / t["p50"],
        ),
        (
            "sync round trip p99 (us)",
            g["p99"] * us,
            t["p99"] * us,
            r["stream_p99"] * us,
            g["p99"] / r["stream_p99"],
            g["p99"] / t["p99"],
        ),
        (
            f"{args.ops} tiny adds + 1 sync (ops/s)",
            g["ops"],
            float("nan"),
            r["msgs"],
            g["ops"] / r["msgs"],
            float("nan"),
        ),
    ]
    print(f"\ndaemon wire bench: medians of {args.repeat} runs, loopback, {os.cpu_count()} CPUs, fake GPU")
    print(f"{'metric':<34}{'gpupool':>12}{'raw TCP':>12}{'gRPC floor':>12}{'/gRPC':>8}{'/TCP':>8}")
    for name, gv, tv, rv, ratio_g, ratio_t in rows:
        print(f"{name:<34}{gv:>12.3f}{tv:>12.3f}{rv:>12.3f}{ratio_g:>8.2f}{ratio_t:>8.2f}")
    print(
        f"{'gRPC unary round trip p50/p99 (us)':<34}{'':>12}{'':>12}"
        f"{r['unary_p50'] * us:>6.0f}/{r['unary_p99'] * us:<5.0f}"
    )
    print(
        "gRPC floor: upload/download = one stream of 4 MiB messages; round trips = stream ping-pong of 16 B;"
        " ops/s floor = 100 B messages/s on one stream (one message per op)."
    )
    print(f"\nTLS cost: the same daemon with TLS (the default) and with --insecure, medians of {args.repeat} runs")
    print(f"{'metric':<34}{'TLS':>12}{'plaintext':>12}{'TLS/plain':>10}")
    for label, key, scale in (
        (f"upload {args.size_mib} MiB (GB/s)", "up", 1.0),
        (f"download {args.size_mib} MiB (GB/s)", "down", 1.0),
        ("sync round trip p50 (us)", "p50", us),
        ("sync round trip p99 (us)", "p99", us),
        (f"{args.ops} tiny adds + 1 sync (ops/s)", "ops", 1.0),
    ):
        print(f"{label:<34}{g[key] * scale:>12.3f}{plain[key] * scale:>12.3f}{g[key] / plain[key]:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
