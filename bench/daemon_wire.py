"""Daemon wire benchmark: 256 MiB upload/download, tiny-op throughput and sync round trips of a real
`gpupool serve` (fake GPU, loopback), next to floors measured in the same run on the same machine:
a raw TCP socket and a raw TLS socket (throughput, 1-byte ping-pong) and a bare Python gRPC echo, plaintext and
TLS (unary and stream); and the same figures of a second daemon serving plaintext (`--insecure`). Each daemon is
compared with the floor of its own kind (TLS with TLS, plaintext with plaintext) and with raw TCP, and the
issue's targets (transfers >= 0.6 of raw TCP, sync p50 <= 1.3x a gRPC stream ping-pong) are checked for both.
Two more daemons run with `--bulk-listen` (TLS and plaintext): their upload and download take the bulk side
socket (docs/wire.md), printed under the stream's rows and checked against the same targets. Last, it prints
the bare gRPC floor over the raw floors: where that is below 0.6, no daemon that carries tensor bytes over gRPC
can meet the transfer target, however little it adds.

    python bench/daemon_wire.py [--repeat 3] [--size-mib 256] [--ops 10000] [--syncs 1000]
    python bench/daemon_wire.py --isolation-cost [--repeat 5]
    python bench/daemon_wire.py --against /work/main [--against-python python3] [--tls] [--bulk] [--repeat 6]
    python bench/daemon_wire.py --sweep 1048576,16777216,67108864 --kinds tls,plain --clients python,native
        [--against DIR --against-python PY] [--repeat 3 --reps 3]

Each figure is the median of --repeat runs; the table prints gpupool / floor ratios. With --isolation-cost it
instead compares two daemons started side by side, `--isolation process` (each session in its own worker
process, the default) and `--isolation thread` (sessions in the daemon process), measured alternately. With
--against DIR it compares this tree's daemon with another checkout's (before/after a change), side by side, and both
with a bare gRPC stream ping-pong of their kind measured in the same alternating blocks, and their transfers
with the raw TCP and raw TLS socket floors measured after each alternating pair (the floor of the daemons' kind,
TLS with --tls, is the one the 0.6 target is checked against; with --tls the ratio to raw TCP is printed too; and
a raw download of that kind into a fresh tensor, as a client's download lands, and a raw upload into fresh memory on
the floor server, as a fake GPU's first upload lands in its worker, beside the floor's reused buffers;
with --bulk also each session's second download of the same tensor with the client's reuse of dropped downloads'
memory turned off, gpupool/hostpool.py: the first lands where the previous session's dropped download was),
and the session's second upload of the same size after it freed the first, as a loop's next batch (on a fake GPU
the first lands in fresh host memory, the second, server/uploadpool.py, where the first was).

--sweep (round 47): each tree's own client (the Python client, the C++ client or both: --clients), TLS and
plaintext daemons (--kinds) with the side port, against raw TCP and raw TLS floors through Python's ssl and through
OpenSSL in C (bench/tls_floor.c, built with `cc` into a temporary folder), with each end's CPU seconds a GiB
(see `sweep`).
"""

from __future__ import annotations

import argparse
import json
import mmap
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
from collections.abc import Callable, Iterable, Iterator
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


def _tls_files() -> tuple[str, str, str]:
    """(CA, certificate, key) of the loopback PKI this run made (pki.loopback_env)."""
    return os.environ["GPUPOOL_TLS_CA"], os.environ["GPUPOOL_TLS_CERT"], os.environ["GPUPOOL_TLS_KEY"]


def floor_server() -> None:
    """TCP and TLS sink/source/echo, gRPC echo servers (plaintext and TLS); prints
    'PORTS tcp grpc tls grpc_tls' and serves until stdin closes."""
    import ssl

    import grpc

    lsock = socket.create_server(("127.0.0.1", 0))
    tls_lsock = socket.create_server(("127.0.0.1", 0))
    _, cert, key = _tls_files()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    blob = b"\x5a" * CHUNK

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(CHUNK)
        held: list[mmap.mmap] = []
        with conn:
            while True:
                head = conn.recv(9)
                if not head:
                    for fresh in held:
                        fresh.close()
                    return
                kind, n = head[:1], struct.unpack("!Q", head[1:9])[0]
                if kind == b"U":  # upload: read n bytes, ack
                    left = n
                    while left:
                        got = conn.recv_into(buf, min(left, CHUNK))
                        left -= got
                    conn.sendall(b"k")
                elif kind == b"F":  # upload into fresh memory (an anonymous mapping of n bytes, as a fake GPU's
                    fresh = mmap.mmap(-1, n)  # first upload lands: its pages faulted in by the bytes), ack; it is
                    held.append(fresh)  # unmapped when the connection ends (a worker's is not unmapped in its upload)
                    left = n
                    with memoryview(fresh) as view:
                        while left:
                            left -= conn.recv_into(view[n - left :], min(left, CHUNK))
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

    def accept(listener: socket.socket, wrap: bool) -> None:
        while True:
            conn, _ = listener.accept()
            if wrap:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = server_ctx.wrap_socket(conn, server_side=True)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, args=(lsock, False), daemon=True).start()
    threading.Thread(target=accept, args=(tls_lsock, True), daemon=True).start()

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
    with open(key, "rb") as k, open(cert, "rb") as c:
        creds = grpc.ssl_server_credentials([(k.read(), c.read())])
    tls_port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    print(f"PORTS {lsock.getsockname()[1]} {port} {tls_lsock.getsockname()[1]} {tls_port}", flush=True)
    sys.stdin.read()
    server.stop(0)


# ---------------------------------------------------------------- measurements


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def tcp_figures(port: int, size: int, pings: int, tls: bool = False, fresh: bool = False) -> dict[str, float]:
    """Upload, download and ping-pong of a raw socket; the upload read into one reused 4 MiB buffer and the
    download into one, or with `fresh` the upload into a fresh mapping of `size` bytes on the floor server (as a
    fake GPU's first upload lands in the worker) and the download into a fresh tensor, as a client's download lands
    (their pages faulted in by the bytes)."""
    import ssl

    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = raw
        if tls:  # the same exchange through Python's ssl (OpenSSL), as the TLS daemon's peer would see it
            ctx = ssl.create_default_context(cafile=_tls_files()[0])
            s = ctx.wrap_socket(raw, server_hostname="localhost")
        blob = b"\xa5" * CHUNK
        t0 = time.perf_counter()
        s.sendall((b"F" if fresh else b"U") + struct.pack("!Q", size))
        for off in range(0, size, CHUNK):
            s.sendall(memoryview(blob)[: min(CHUNK, size - off)])
        s.recv(1)
        up = size / (time.perf_counter() - t0) / 1e9
        buf = memoryview(bytearray(CHUNK))
        t0 = time.perf_counter()
        if fresh:
            import torch

            buf = memoryview(torch.empty(size, dtype=torch.uint8).numpy()).cast("B")
        s.sendall(b"D" + struct.pack("!Q", size))
        left = size
        while left:
            left -= s.recv_into(buf[size - left :] if fresh else buf, min(left, CHUNK))
        down = size / (time.perf_counter() - t0) / 1e9
        s.sendall(b"P" + struct.pack("!Q", pings))
        rtts = []
        for _ in range(pings):
            t0 = time.perf_counter()
            s.sendall(b"x")
            s.recv(1)
            rtts.append(time.perf_counter() - t0)
    return {"up": up, "down": down, "p50": percentile(rtts, 0.5), "p99": percentile(rtts, 0.99)}


def _floor_channel(port: int, tls: bool) -> Any:
    """A channel to the floor server on `port` (TLS with the test certificates, or plaintext)."""
    import grpc

    target = f"127.0.0.1:{port}"
    if not tls:
        return grpc.insecure_channel(target, options=GRPC_OPTIONS)
    with open(_tls_files()[0], "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(target, creds, options=[*GRPC_OPTIONS, ("grpc.ssl_target_name_override", "localhost")])


def grpc_figures(port: int, size: int, pings: int, messages: int, tls: bool = False) -> dict[str, float]:
    import queue

    channel = _floor_channel(port, tls)
    with channel as ch:
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


def round_trip(s: Any, size: int, what: str) -> tuple[float, float, int]:
    """Upload `size` random bytes and download them again through session `s`: (upload GB/s, download GB/s,
    the tensor's handle); asserts the bytes came back exact."""
    import torch

    big = torch.randint(0, 255, (size,), dtype=torch.uint8)
    t0 = time.perf_counter()
    h = s.upload(big)
    s.sync()
    up = size / (time.perf_counter() - t0) / 1e9
    t0 = time.perf_counter()
    back = s.download(h)
    down = size / (time.perf_counter() - t0) / 1e9
    assert torch.equal(back, big), f"{what} is not bit-exact"
    return up, down, h


def gpupool_figures(address: str, token: str, size: int, ops: int, syncs: int) -> dict[str, float]:
    import torch
    from gpupool.client.session import Handle, Session

    with Session.attach(address, token) as s:
        up, down, h = round_trip(s, size, "the round trip")
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
        rtts, items = [], []
        for _ in range(syncs):
            t0 = time.perf_counter()
            s.sync()
            rtts.append(time.perf_counter() - t0)
        for _ in range(syncs):  # what `loss.item()` pays: a Sync that asks for one scalar (a slice on the worker)
            t0 = time.perf_counter()
            s.sync([int(a)])
            items.append(time.perf_counter() - t0)
    return {
        "up": up,
        "down": down,
        "ops": op_rate,
        "p50": percentile(rtts, 0.5),
        "p99": percentile(rtts, 0.99),
        "item_p50": percentile(items, 0.5),
        "item_p99": percentile(items, 0.99),
    }


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` and every live descendant (a daemon, its zygote, workers)."""
    stats: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime + stime
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, (0, 0.0))[1]
        todo += [c for c, (ppid, _) in stats.items() if ppid == p]
    return total


def transfer_figures(address: str, token: str, size: int, pid: int = 0, fresh_first: bool = False) -> dict[str, float]:
    """Upload and download only, on a daemon started with --bulk-listen: the bytes take the side socket. With
    `pid` (the daemon's), also the CPU seconds per GiB of the daemon's process tree and of this client. The tensor
    is downloaded twice: as a client does (into the memory of a big download dropped before, where the client kept
    one: gpupool/hostpool.py) and with that reuse off (fresh memory), in that order or, `fresh_first`, the other."""
    import torch
    from gpupool.client.session import Session

    from gpupool import hostpool

    gib = size / 2**30
    with Session.attach(address, token) as s:
        assert s._side is not None, f"no bulk side socket to {address}"
        big = torch.randint(0, 255, (size,), dtype=torch.uint8)
        s.sync()
        d0, c0, t0 = tree_cpu(pid) if pid else 0.0, time.process_time(), time.perf_counter()
        h = s.upload(big)
        s.sync()
        d1, c1, t1 = tree_cpu(pid) if pid else 0.0, time.process_time(), time.perf_counter()

        def download(reuse: bool) -> tuple[float, float, float]:
            pool = hostpool.pool()
            keep = pool.keep
            pool.keep = keep if reuse else 0
            try:
                d0, c0, t0 = tree_cpu(pid) if pid else 0.0, time.process_time(), time.perf_counter()
                back = s.download(h)
                d1, c1, t1 = tree_cpu(pid) if pid else 0.0, time.process_time(), time.perf_counter()
            finally:
                pool.keep = keep
            assert torch.equal(back, big), "the side channel's round trip is not bit-exact"
            return t1 - t0, c1 - c0, d1 - d0

        if fresh_first:
            fresh = download(False)
            down = download(True)
        else:
            down = download(True)
            fresh = download(False)
        s.free([h])  # then a later upload of the same size, as a loop's next batch (server/uploadpool.py)
        s.sync()
        d2, t2 = tree_cpu(pid) if pid else 0.0, time.perf_counter()
        s.upload(big)
        s.sync()
        d3, t3 = tree_cpu(pid) if pid else 0.0, time.perf_counter()
    return {
        "up": size / (t1 - t0) / 1e9,
        "up_again": size / (t3 - t2) / 1e9,
        "up_again_daemon_cpu": (d3 - d2) / gib,
        "down": size / down[0] / 1e9,
        "down_fresh": size / fresh[0] / 1e9,
        "up_daemon_cpu": (d1 - d0) / gib,
        "down_daemon_cpu": down[2] / gib,
        "up_client_cpu": (c1 - c0) / gib,
        "down_client_cpu": down[1] / gib,
        "down_fresh_client_cpu": fresh[1] / gib,
    }


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


def loopback_keys(tmp: str, tls: bool = True) -> tuple[bytes, Path]:
    """A token seed and the file of its public key (what daemons get), and this process's environment set for
    the loopback PKI under `tmp` (plus GPUPOOL_INSECURE when not `tls`)."""
    from gpupool import pki, tokens

    key = secrets.token_hex(32).encode()
    key_file = Path(tmp) / "key.pub"
    key_file.write_bytes(tokens.public_pem(tokens.Signer.from_seed(key).public))
    os.environ.update(pki.loopback_env(Path(tmp) / "pki"))
    if not tls:
        os.environ["GPUPOOL_INSECURE"] = "1"
    return key, key_file


def start_daemon(
    key_file: Path, *extra: str, python: str = sys.executable, cwd: str | None = None
) -> tuple[subprocess.Popen[str], str]:
    cmd = [
        python,
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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"listening on (\S+:\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout or []], daemon=True).start()
            return proc, m.group(1)
    raise RuntimeError("gpupool serve did not start")


def start_floor() -> tuple[subprocess.Popen[str], list[str]]:
    """The floor server (`floor_server`) in a process of its own, and its ports: TCP, gRPC, TLS, gRPC over TLS."""
    floor = subprocess.Popen(
        [sys.executable, __file__, "--floor-server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert floor.stdout is not None
    return floor, floor.stdout.readline().split()[1:]


def stop(daemons: Iterable[subprocess.Popen[str]], floor: subprocess.Popen[str]) -> None:
    """End the daemons, then the floor server (its stdin closed)."""
    for proc in daemons:
        proc.terminate()
        proc.wait(30)
    if floor.stdin:
        floor.stdin.close()
    floor.wait(30)


def cpu_seconds(pid: int) -> float:
    """CPU seconds its live threads have run so far, to the nanosecond (the scheduler's own count in
    /proc/PID/task/*/schedstat; /proc/PID/stat's ticks are too coarse for blocks of 50 round trips)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total / 1e9


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def isolation_cost(args: argparse.Namespace) -> int:
    """The same figures against a process-isolated and an in-thread daemon, alternating, medians side by side."""
    from gpupool import tokens

    size = args.size_mib * MiB
    modes = ("thread", "process")
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = loopback_keys(tmp)  # both daemons and this process speak TLS
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
        (".item() round trip p50 (us)", "item_p50", 1e6),
        (f"{args.ops} tiny adds + 1 sync (ops/s)", "ops", 1.0),
    ):
        print(f"{name:<34}{t[key_] * scale:>12.3f}{p[key_] * scale:>12.3f}{p[key_] / t[key_]:>16.2f}")
    return 0


def _stream_ping(port: int, tls: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    """A bare gRPC stream ping-pong of 16 bytes to the floor server (its Echo, as `grpc_figures` measures it):
    (one round trip, close)."""
    return echo_pinger(_floor_channel(port, tls))


def echo_pinger(channel: Any) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one 16-byte round trip on the floor server's Echo stream over `channel`, close)."""
    import queue

    q: queue.Queue[bytes | None] = queue.Queue()
    replies = iter(channel.stream_stream("/floor/Echo", None, None)(iter(q.get, None)))

    def ping() -> None:
        q.put(b"x" * 16)
        next(replies)

    def close() -> None:
        q.put(None)
        channel.close()

    return ping, close


def against(args: argparse.Namespace) -> int:
    """This tree's daemon next to another checkout's (--against DIR, run by --against-python), side by side:
    the same client, alternating sessions (transfers and tiny-op throughput) and blocks of 50 syncs and 50
    `.item()` syncs (one scalar), medians and this/other ratios; beside them, in the same alternating blocks, a
    bare gRPC stream ping-pong of the same kind (TLS or plaintext, the floor server's): each daemon's ratio to it
    comes out of one run."""
    import torch
    from gpupool.client.session import Session

    from gpupool import tokens

    size = args.size_mib * MiB
    extra: tuple[str, ...] = () if args.tls else ("--insecure",)
    if args.bulk:
        extra += ("--bulk-listen", "127.0.0.1:0")
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = loopback_keys(tmp, args.tls)
        daemons = {
            "other": start_daemon(key_file, *extra, python=args.against_python, cwd=args.against),
            "this": start_daemon(key_file, *extra),
        }
        floor, (tcp_port, grpc_port, tls_port, grpc_tls_port) = start_floor()
        floor_times: list[float] = []
        figures: dict[str, list[dict[str, float]]] = {k: [] for k in daemons}
        raws: dict[str, list[dict[str, float]]] = {"tcp": [], "tls": [], "fresh": []}  # raw floors, same blocks
        rtts: dict[str, list[float]] = {k: [] for k in daemons}
        items: dict[str, list[float]] = {k: [] for k in daemons}  # Syncs with one scalar: `.item()`
        cpu = {k: {"sync": 0.0, "item": 0.0} for k in daemons}  # the daemon process's CPU seconds over them
        try:
            for i in range(args.repeat):
                for name in daemons if i % 2 == 0 else reversed(list(daemons)):
                    claims = tokens.TokenClaims(f"{name}-{i}", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
                    token = tokens.mint(key, claims)
                    if args.bulk:
                        fresh_first = (i // 2) % 2 == 1  # (each tree gets both orders)
                        figures[name].append(
                            transfer_figures(daemons[name][1], token, size, daemons[name][0].pid, fresh_first)
                        )
                    else:
                        figures[name].append(gpupool_figures(daemons[name][1], token, size, args.ops, 1))
                raws["tcp"].append(tcp_figures(int(tcp_port), size, 1))
                raws["tls"].append(tcp_figures(int(tls_port), size, 1, tls=True))
                raws["fresh"].append(tcp_figures(int(tls_port if args.tls else tcp_port), size, 1, args.tls, True))
                print(f"transfers {i + 1}/{args.repeat} done", file=sys.stderr)
            sessions, scalars = {}, {}
            for name, (_, address) in daemons.items():
                claims = tokens.TokenClaims(f"{name}-syncs", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
                sessions[name] = Session.attach(address, tokens.mint(key, claims))
                scalars[name] = [sessions[name].upload(torch.ones(()))]
                sessions[name].sync()
            ping, close_floor = _stream_ping(int(grpc_tls_port if args.tls else grpc_port), args.tls)
            ping()
            for block in range(max(1, args.syncs // 50)):
                for _ in range(50):
                    t0 = time.perf_counter()
                    ping()
                    floor_times.append(time.perf_counter() - t0)
                for name in sessions if block % 2 == 0 else reversed(list(sessions)):
                    for kind, times, handles in (("sync", rtts[name], []), ("item", items[name], scalars[name])):
                        c0 = cpu_seconds(daemons[name][0].pid)
                        for _ in range(50):
                            t0 = time.perf_counter()
                            sessions[name].sync(handles)
                            times.append(time.perf_counter() - t0)
                        cpu[name][kind] += cpu_seconds(daemons[name][0].pid) - c0
            for session in sessions.values():
                session.close()
            close_floor()
        finally:
            stop([proc for proc, _ in daemons.values()], floor)
    o, t = median_of(figures["other"]), median_of(figures["this"])
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nthis tree against {args.against} ({'TLS' if args.tls else 'plaintext'} daemons side by side"
        f"{', side socket' if args.bulk else ''}, load {load})"
    )
    print(f"{'metric':<34}{'other':>12}{'this':>12}{'this/other':>12}")
    rows = [(f"upload {args.size_mib} MiB (GB/s)", "up"), (f"download {args.size_mib} MiB (GB/s)", "down")]
    if args.bulk:  # the session's second upload of that size, after it freed the first (server/uploadpool.py)
        rows.insert(1, ("upload again, first freed (GB/s)", "up_again"))
    for name, k in rows:
        print(f"{name:<34}{o[k]:>12.3f}{t[k]:>12.3f}{t[k] / o[k]:>12.2f}")
    rt, rs = median_of(raws["tcp"]), median_of(raws["tls"])
    own, own_name = (rs, "raw TLS") if args.tls else (rt, "raw TCP")
    print(f"{'raw TCP floor up / down (GB/s)':<34}{rt['up']:>12.3f}{rt['down']:>12.3f}")
    print(f"{'raw TLS floor up / down (GB/s)':<34}{rs['up']:>12.3f}{rs['down']:>12.3f}")
    rf, rfu = median_of(raws["fresh"])["down"], median_of(raws["fresh"])["up"]
    print(f"{own_name + ' down, fresh tensor':<34}{'':>12}{rf:>12.3f}   (the download into new memory)")
    print(f"{'  download / that':<34}{o['down'] / rf:>12.2f}{t['down'] / rf:>12.2f}")
    print(f"{own_name + ' up, fresh memory':<34}{'':>12}{rfu:>12.3f}   (the floor server reads into new memory)")
    print(f"{'  upload / that':<34}{o['up'] / rfu:>12.2f}{t['up'] / rfu:>12.2f}   (a session's first upload)")
    if args.bulk:  # the same client's download with its reuse of dropped downloads' memory off (gpupool/hostpool)
        name = "download, reuse off (GB/s)"
        print(f"{name:<34}{o['down_fresh']:>12.3f}{t['down_fresh']:>12.3f}{t['down_fresh'] / o['down_fresh']:>12.2f}")
        for what, k in (("reuse off / raw fresh", "down_fresh"), ("reuse on / reuse off", "down")):
            of, tf = (rf, rf) if k == "down_fresh" else (o["down_fresh"], t["down_fresh"])
            print(f"{'  ' + what:<34}{o[k] / of:>12.2f}{t[k] / tf:>12.2f}")
    for k, what in (("up", "upload"), ("up_again", "upload again"), ("down", "download")):
        if k not in t:
            continue
        raw_k = "up" if k == "up_again" else k
        ratios = [(own_name, own[raw_k])] + ([("raw TCP", rt[raw_k])] if args.tls else [])
        for raw_name, floor_k in ratios:
            name = f"  {what} / {raw_name}"
            met = "met" if t[k] / floor_k >= 0.6 else "NOT met"
            print(f"{name:<34}{o[k] / floor_k:>12.2f}{t[k] / floor_k:>12.2f}   (>= 0.6: {met})")
    if args.bulk:
        for k in (
            "up_daemon_cpu",
            "up_again_daemon_cpu",
            "down_daemon_cpu",
            "up_client_cpu",
            "down_client_cpu",
            "down_fresh_client_cpu",
        ):
            name = k.replace("_cpu", "").replace("down_fresh", "down(reuse off)").replace("_", " ") + " CPU (s/GiB)"
            print(f"{name:<34}{o[k]:>12.3f}{t[k]:>12.3f}{t[k] / o[k]:>12.2f}")
    ping_p50 = statistics.median(floor_times) * 1e6
    for name, times in (("sync round trip p50 (us)", rtts), (".item() round trip p50 (us)", items)):
        po, pt = statistics.median(times["other"]) * 1e6, statistics.median(times["this"]) * 1e6
        print(f"{name:<34}{po:>12.0f}{pt:>12.0f}{pt / po:>12.2f}")
        print(f"{'  / gRPC stream ping-pong':<34}{po / ping_p50:>12.2f}{pt / ping_p50:>12.2f}")
    if not args.bulk:
        name = f"{args.ops} tiny adds + 1 sync (ops/s)"
        print(f"{name:<34}{o['ops']:>12.0f}{t['ops']:>12.0f}{t['ops'] / o['ops']:>12.2f}")
    n = len(rtts["this"]) / 1e6
    for name, kind in (("daemon CPU per sync (us)", "sync"), ("daemon CPU per .item() (us)", "item")):
        co, ct = cpu["other"][kind] / n, cpu["this"][kind] / n
        print(f"{name:<34}{co:>12.0f}{ct:>12.0f}{ct / co if co else 0.0:>12.2f}")
    print("(daemon CPU: what its process's threads ran, not its session workers')")
    kind = "TLS" if args.tls else "plaintext"
    print(f"bare {kind} gRPC stream ping-pong p50 (us), in the same blocks: {ping_p50:.0f}")
    return 0


# A sweep's session, run in a child process of the tree's own interpreter (so each tree's client talks to its own
# daemon): argv ADDRESS TOKEN SIZES REPS CLIENT DAEMON_PID BENCH_DIR; prints one JSON object. CLIENT `python`:
# Session.upload (then a Sync) and Session.download; `native`: the C++ client (client/native/, the default of
# `gpupool run`): `x.to(dev)` then `torch.gpupool.synchronize()`, and `.cpu()`. Per size, after one untimed round,
# the median of REPS of each, as GB/s (`up:SIZE`, `down:SIZE`), and the CPU seconds a GiB of this process
# (`up_client:SIZE`...) and of the daemon's process tree (its front, zygote and the session's worker, schedstat:
# `up_daemon:SIZE`...), each transfer checked bit-exact. A size that fails (the C++ client of 41939607 at 16 MiB) is
# reported; the sizes after it are not measured.
# A child session's start (bench/transfer_loop.py's too): its arguments, the C++ client loaded where asked for, the
# session attached (and the C++ client's device connected to it), the CPU counts of the daemon's tree at hand.
CHILD_START = r"""
import json, os, statistics, sys, time
import torch
address, token, sizes, reps, client, daemon, bench = sys.argv[1:8]
sizes, reps, daemon = [int(x) for x in sizes.split(",")], int(reps), int(daemon)
if client == "native":
    from gpupool.client.native import backend as nc
    nc.load()
    nc.claim()
from gpupool.client.session import Session

sys.path.insert(0, bench)
from side_syscalls import tasks_ns, tree_ns, tree_tasks  # (this checkout's bench: the daemon's tree's CPU ns)

session = Session.attach(address, token, timeout=120.0)
if client == "native":
    nc.connect(session)
    dev = nc.device()
"""
SWEEP_CHILD = (
    CHILD_START
    + r"""
tasks = []  # the daemon tree's threads, found once a size (a scan of /proc between transfers ran them cold: round 56)
def tree_cpu(pid):
    return tasks_ns(tasks) / 1e9

out = {"side": session._side is not None}
def measure(size):
    big = torch.randint(0, 255, (size,), dtype=torch.uint8)
    got = {"up": [], "down": [], "up_client": [], "down_client": [], "up_daemon": [], "down_daemon": []}
    for rep in range(reps + 1):  # (the first, untimed, warms the size's paths up: slots, pools, pages)
        if rep == 1:
            tasks[:] = tree_tasks(daemon)
        d0, c0, t0 = tree_cpu(daemon), time.process_time(), time.perf_counter()
        if client == "native":
            held = big.to(dev)
            torch.gpupool.synchronize()
        else:
            held = session.upload(big)
            session.sync()
        t1, c1 = time.perf_counter(), time.process_time()
        d1 = tree_cpu(daemon)  # (before round 56 a scan of /proc: the download's clocks start after it)
        c1b, t1b = time.process_time(), time.perf_counter()
        back = held.cpu() if client == "native" else session.download(held)
        t2, c2 = time.perf_counter(), time.process_time()
        d2 = tree_cpu(daemon)
        assert torch.equal(back, big), f"the {size}-byte round trip is not bit-exact"
        del back
        if client == "native":
            del held
        else:
            session.free([held])
        gib = size / 2**30
        if rep == 0:
            continue
        got["up"].append(t1 - t0)
        got["down"].append(t2 - t1b)
        got["up_client"].append((c1 - c0) / gib)
        got["down_client"].append((c2 - c1b) / gib)
        got["up_daemon"].append((d1 - d0) / gib)
        got["down_daemon"].append((d2 - d1) / gib)
    for k, v in got.items():
        out[f"{k}:{size}"] = size / statistics.median(v) / 1e9 if k in ("up", "down") else statistics.median(v)

failed = None
for size in sizes:  # in the order given; a failure (the session is then gone) is reported, the rest not measured
    if failed is None:
        try:
            measure(size)
        except Exception as exc:
            failed = f"{type(exc).__name__}: {str(exc).splitlines()[-1][:200] if str(exc) else ''}"
    if failed is not None:
        out[f"failed:{size}"] = failed
if failed is None:
    session.close()
print("SWEEP " + json.dumps(out), flush=True)
"""
)


def sweep_figures(
    address: str, token: str, sizes: list[int], reps: int, client: str, daemon_pid: int, python: str,
    cwd: str | None, insecure: bool,
) -> dict[str, float]:  # fmt: skip
    """One session of `client` (python or native) in a child process of `python` (the tree's interpreter, run in
    `cwd`): SWEEP_CHILD's figures."""
    argv = [address, token, ",".join(map(str, sizes)), str(reps), client, str(daemon_pid), str(Path(__file__).parent)]
    out = child_session(SWEEP_CHILD, "SWEEP", argv, python, cwd, insecure, client)
    if not out.pop("side"):
        raise RuntimeError(f"the {client} client's session to {address} has no side socket")
    return out


def child_session(
    script: str, tag: str, argv: list[str], python: str, cwd: str | None, insecure: bool, client: str
) -> dict[str, Any]:
    """`script` (CHILD_START and its measures) run by `python` in `cwd` with `argv`: the JSON of its line `TAG ...`."""
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}  # (the C++ client must own PrivateUse1)
    env.pop("GPUPOOL_INSECURE", None)
    if insecure:
        env["GPUPOOL_INSECURE"] = "1"
    done = subprocess.run([python, "-c", script, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith(tag + " ")), None)
    if line is None:
        raise RuntimeError(f"{client} {tag.lower()} session failed ({done.returncode}): {done.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(line[len(tag) + 1 :])
    return out


def c_floor_binary(tmp: str) -> str | None:
    """bench/tls_floor.c built into `tmp` (raw TCP and raw TLS through OpenSSL in C), or None with a line on stderr
    where no C compiler or OpenSSL headers are here."""
    out = str(Path(tmp) / "tls_floor")
    src = str(Path(__file__).with_name("tls_floor.c"))
    done = subprocess.run(["cc", "-O2", src, "-o", out, "-lssl", "-lcrypto"], capture_output=True, text=True)
    if done.returncode:
        print(f"no C floors: building {src} failed: {done.stderr[-500:]}", file=sys.stderr)
        return None
    return out


def c_floor_figures(binary: str, tls: bool, size: int, reps: int) -> dict[str, float]:
    """bench/tls_floor.c's exchange (`tcp_figures`' in C), `reps` times on one connection: medians of GB/s each way
    and of each end's CPU seconds a GiB (`up`, `down`, `up_client`, `up_server`, `down_client`, `down_server`)."""
    ca, cert, key = _tls_files()
    done = subprocess.run(
        [binary, "tls" if tls else "tcp", cert, key, ca, str(size), str(reps)], capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"tls_floor failed: {done.stderr[-1000:]}")
    rows = [[float(x) for x in line.split()] for line in done.stdout.splitlines() if line.strip()]
    names = ("up", "down", "up_client", "up_server", "down_client", "down_server")
    return {name: statistics.median(r[i] for r in rows) for i, name in enumerate(names)}


def start_kinds(daemons: dict[Any, Any], key_file: Path, kinds: list[str], against: str | None, python: str) -> None:
    """Into `daemons`, (kind, tree): a daemon of each kind (tls, plain: `--insecure`) with the side port, as `gpupool
    up` runs them, of this tree and, with `against`, of that checkout (run by `python`)."""
    for kind in kinds:
        extra = ("--bulk-listen", "127.0.0.1:0") + (("--insecure",) if kind == "plain" else ())
        daemons[kind, "this"] = start_daemon(key_file, *extra)
        if against:
            daemons[kind, "other"] = start_daemon(key_file, *extra, python=python, cwd=against)


def round_sessions(
    i: int, daemons: dict[Any, Any], key: bytes, kinds: list[str], clients: list[str], trees: list[str], args: Any
) -> Iterator[tuple[str, str, str, str, str, int, str, str | None]]:
    """Round `i`'s sessions, the trees alternating from round to round: (kind, client, tree, the daemon's address, a
    lease token for it, its pid, the tree's interpreter, the folder it runs in)."""
    from gpupool import tokens

    for kind in kinds:
        for client in clients:
            for tree in trees if i % 2 == 0 else reversed(trees):
                proc, address = daemons[kind, tree]
                claims = tokens.TokenClaims(f"{tree}-{i}", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
                python = sys.executable if tree == "this" else args.against_python
                cwd = None if tree == "this" else args.against
                yield kind, client, tree, address, tokens.mint(key, claims), proc.pid, python, cwd


def sweep(args: argparse.Namespace) -> int:
    """--sweep: uploads and downloads of each size through this tree's daemon and, with --against, another
    checkout's, each by its own client (--clients: the Python client, the C++ client or both, each session a child
    process of the tree's interpreter), for each kind of daemon (--kinds: TLS, the default, and --insecure
    plaintext; all with the side port, `--bulk-listen`, as `gpupool up` runs them), alternating trees; after each
    round the floors of each size on the same box: raw TCP and raw TLS through Python's ssl (`tcp_figures`) and
    through OpenSSL in C (bench/tls_floor.c: no Python between the records and the bytes), one send of the bytes
    and a 1-byte answer, one request and the bytes back. Medians over --repeat rounds; the ratios to raw TCP are
    issue 8's transfer target (>= 0.6), those to raw TLS in C say what TLS itself leaves. CPU seconds a GiB: each
    end of ours (the client process; the daemon's process tree) and of the C floors (client, server)."""
    sizes = [int(x) for x in args.sweep.split(",")]
    kinds = args.kinds.split(",") if args.kinds else ["tls" if args.tls else "plain"]
    clients = args.clients.split(",")
    trees = ["this", "other"] if args.against else ["this"]
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = loopback_keys(tmp, True)
        daemons: dict[tuple[str, str], tuple[subprocess.Popen[str], str]] = {}
        floor: subprocess.Popen[str] | None = None
        binary: str | None = None
        try:
            start_kinds(daemons, key_file, kinds, args.against, args.against_python)
            floor, (tcp_port, _, tls_port, _) = start_floor()
            binary = c_floor_binary(tmp)
            figures: dict[str, list[dict[str, float]]] = {}
            raws: dict[str, list[dict[str, float]]] = {"tcp": [], "tls": []}  # Python's and (c:...) C's
            for i in range(args.repeat):
                for kind, client, tree, address, token, pid, python, cwd in round_sessions(
                    i, daemons, key, kinds, clients, trees, args
                ):
                    got = sweep_figures(address, token, sizes, args.reps, client, pid, python, cwd, kind == "plain")
                    figures.setdefault(f"{kind}/{client}/{tree}", []).append(got)
                for name, port, tls in (("tcp", tcp_port, False), ("tls", tls_port, True)):
                    row: dict[str, float] = {}
                    for size in sizes:
                        runs = [tcp_figures(int(port), size, 1, tls=tls) for _ in range(args.reps)]
                        row[f"up:{size}"] = statistics.median(r["up"] for r in runs)
                        row[f"down:{size}"] = statistics.median(r["down"] for r in runs)
                        if binary:
                            for k, v in c_floor_figures(binary, tls, size, args.reps).items():
                                row[f"c:{k}:{size}"] = v
                    raws[name].append(row)
                print(f"sweep {i + 1}/{args.repeat} done", file=sys.stderr)
        finally:
            for proc, _ in daemons.values():
                proc.terminate()
                proc.wait(30)
            if floor is not None:
                stop([], floor)
    sweep_report(args, sizes, kinds, clients, trees, figures, raws, load0, binary is not None)
    return 0


def sweep_report(
    args: argparse.Namespace, sizes: list[int], kinds: list[str], clients: list[str], trees: list[str],
    figures: dict[str, list[dict[str, float]]], raws: dict[str, list[dict[str, float]]], load0: float, c_floors: bool,
) -> None:  # fmt: skip
    """--sweep's tables, one set a kind of daemon: GB/s beside the floors, ratios to raw TCP and raw TLS in C (or,
    without a C compiler, Python's), CPU seconds a GiB of each end, and issue 8's target for each column."""
    med: dict[str, dict[str, Any]] = {}
    for name, runs in figures.items():  # medians of what each session measured; a size that failed in any: its reason
        keys = {k for r in runs for k in r}
        med[name] = {k: statistics.median(r[k] for r in runs if k in r) for k in keys if not k.startswith("failed:")}
        for k in keys - med[name].keys():
            med[name][k] = next(r[k] for r in runs if k in r)
            med[name].update({f"{d}{k[6:]}": None for d in ("up", "down", "up_client", "down_client", "up_daemon",
                                                            "down_daemon")})  # fmt: skip
            print(f"{name}: failed at {k[7:]} bytes (then not measured): {med[name][k]}")
    floor = {k: median_of(v) for k, v in raws.items()}
    where = "C" if c_floors else "py"
    print(f"\nuploads (+ a Sync) and downloads, medians of {args.reps} a session over {args.repeat} sessions each, "
          f"daemons with a side port; load {load0:.1f} -> {os.getloadavg()[0]:.1f}")  # fmt: skip

    def floor_of(name: str, d: str, size: int) -> float:
        return floor[name][f"c:{d}:{size}" if c_floors else f"{d}:{size}"]

    def fmt(v: float | None, spec: str = ".3f") -> str:
        return "fail" if v is None else format(v, spec)

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{a / b:.2f}"

    def table(head: list[str], rows: list[list[str]], width: int = 10) -> None:
        print("".join(f"{h:>{width}}" for h in head))
        for row in rows:
            print("".join(f"{c:>{width}}" for c in row))

    short = {"python": "py", "native": "C++"}
    for kind in kinds:
        cols = [(c, t) for c in clients for t in trees]
        names = [f"{short.get(c, c)}:{t}" for c, t in cols]
        print(f"\n{'TLS' if kind == 'tls' else 'plaintext (--insecure)'} daemons, GB/s (ours: CLIENT:TREE; floors: raw "
              f"TCP and raw TLS through Python, and through OpenSSL in C)")  # fmt: skip
        rows = []
        for size in sorted(sizes):
            for d in ("up", "down"):
                row = [str(size), d] + [fmt(med[f"{kind}/{c}/{t}"][f"{d}:{size}"]) for c, t in cols]
                row += [f"{floor['tcp'][f'{d}:{size}']:.3f}", f"{floor['tls'][f'{d}:{size}']:.3f}"]
                if c_floors:
                    row += [f"{floor_of('tcp', d, size):.3f}", f"{floor_of('tls', d, size):.3f}"]
                rows.append(row)
        table(["bytes", "dir", *names, "TCP py", "TLS py"] + (["TCP C", "TLS C"] if c_floors else []), rows)
        print(
            f"ratios: ours / raw TCP ({where}), ours / raw TLS ({where})" + (", this / other" if len(trees) > 1 else "")
        )
        rows = []
        for size in sorted(sizes):
            for d in ("up", "down"):
                ours = {(c, t): med[f"{kind}/{c}/{t}"][f"{d}:{size}"] for c, t in cols}
                row = [str(size), d] + [ratio(v, floor_of("tcp", d, size)) for v in ours.values()]
                row += [ratio(v, floor_of("tls", d, size)) for v in ours.values()]
                if len(trees) > 1:
                    row += [ratio(ours[c, "this"], ours[c, "other"]) for c in clients]
                rows.append(row)
        head = ["bytes", "dir"] + [f"{n}/TCP" for n in names] + [f"{n}/TLS" for n in names]
        head += [f"{short.get(c, c)} t/o" for c in clients] if len(trees) > 1 else []
        table(head, rows, 12)
        print("CPU seconds a GiB: ours (client process / daemon process tree)" + (", C floors (client / server)"
              if c_floors else ""))  # fmt: skip
        rows = []
        for size in sorted(sizes):
            for d in ("up", "down"):
                row = [str(size), d]
                for c, t in cols:
                    m = med[f"{kind}/{c}/{t}"]
                    row.append(f"{fmt(m[f'{d}_client:{size}'], '.2f')}/{fmt(m[f'{d}_daemon:{size}'], '.2f')}")
                if c_floors:
                    for name in ("tcp", "tls"):
                        f = floor[name]
                        row.append(f"{f[f'c:{d}_client:{size}']:.2f}/{f[f'c:{d}_server:{size}']:.2f}")
                rows.append(row)
        table(["bytes", "dir", *names] + (["TCP C", "TLS C"] if c_floors else []), rows, 12)
        for c, t in cols:
            pairs = [(size, d) for size in sizes for d in ("up", "down")]
            got = [med[f"{kind}/{c}/{t}"][f"{d}:{size}"] for size, d in pairs]
            lows = [v / floor_of("tcp", d, size) for v, (size, d) in zip(got, pairs, strict=True) if v is not None]
            verdict = "met" if lows and None not in got and min(lows) >= 0.6 else "NOT met"
            lowest = f"{min(lows):.2f}" if lows else "-"
            failed = ", some failed" if None in got else ""
            print(f"  {kind} {c} client, {t}: transfers >= 0.6 x raw TCP ({where}), every size and way: {verdict} "
                  f"(lowest {lowest}{failed})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--ops", type=int, default=10_000)
    p.add_argument("--syncs", type=int, default=1000)
    p.add_argument("--isolation-cost", action="store_true", help="compare --isolation process with thread")
    p.add_argument("--against", metavar="DIR", help="compare with the daemon of another checkout (side by side)")
    p.add_argument("--against-python", default="python3", help="the interpreter that imports --against's gpupool")
    p.add_argument("--tls", action="store_true", help="with --against: TLS daemons (default: plaintext)")
    p.add_argument("--bulk", action="store_true", help="with --against: daemons with --bulk-listen (side socket)")
    p.add_argument("--sweep", metavar="BYTES,...", default="", help="uploads and downloads of each size against the "
                   "raw TCP and TLS floors (with --against: both trees; --tls, --bulk as there)")  # fmt: skip
    p.add_argument("--reps", type=int, default=5, help="with --sweep: transfers of each size a session (the median)")
    p.add_argument("--kinds", default="", help="with --sweep: the daemons' kinds, tls,plain (plain: --insecure); "
                   "default: tls with --tls, else plain")  # fmt: skip
    p.add_argument("--clients", default="python", help="with --sweep: python,native (native: the C++ client)")
    p.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.floor_server:
        floor_server()
        return 0
    if args.isolation_cost:
        return isolation_cost(args)
    if args.sweep:
        return sweep(args)
    if args.against:
        return against(args)
    from gpupool import tokens

    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = loopback_keys(tmp)  # the daemon and this process speak TLS
        daemon, address = start_daemon(key_file)
        plain_daemon, plain_address = start_daemon(key_file, "--insecure")
        side = ("--bulk-listen", "127.0.0.1:0")
        bulk_daemon, bulk_address = start_daemon(key_file, *side)
        plain_bulk_daemon, plain_bulk_address = start_daemon(key_file, "--insecure", *side)
        floor, (tcp_port, grpc_port, tls_port, grpc_tls_port) = start_floor()
        try:
            claims = tokens.TokenClaims("bench", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
            token = tokens.mint(key, claims)
            measures: dict[str, Callable[[], dict[str, float]]] = {
                "tls": lambda: gpupool_figures(address, token, size, args.ops, args.syncs),
                "plain": plaintext(lambda: gpupool_figures(plain_address, token, size, args.ops, args.syncs)),
                "tls_bulk": lambda: transfer_figures(bulk_address, token, size),
                "plain_bulk": plaintext(lambda: transfer_figures(plain_bulk_address, token, size)),
                "tcp": lambda: tcp_figures(int(tcp_port), size, args.syncs),
                "tls_tcp": lambda: tcp_figures(int(tls_port), size, args.syncs, tls=True),
                "grpc": lambda: grpc_figures(int(grpc_port), size, args.syncs, args.ops),
                "grpc_tls": lambda: grpc_figures(int(grpc_tls_port), size, args.syncs, args.ops, tls=True),
            }
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in measures}
            for i in range(args.repeat):
                for name, fn in measures.items():
                    runs[name].append(fn())
                print(f"run {i + 1}/{args.repeat} done", file=sys.stderr)
        finally:
            stop((daemon, plain_daemon, bulk_daemon, plain_bulk_daemon), floor)
    report(args, {k: median_of(v) for k, v in runs.items()})
    return 0


def report(args: argparse.Namespace, m: dict[str, dict[str, float]]) -> None:
    """Each daemon next to the floors of its kind, then the issue's targets for both."""
    us = 1e6
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ndaemon wire bench: medians of {args.repeat} runs, loopback, {os.cpu_count()} CPUs, fake GPU, load {load}")
    for daemon, raw, rpc, label in (("tls", "tls_tcp", "grpc_tls", "TLS"), ("plain", "tcp", "grpc", "plaintext")):
        g, t, r, tcp = m[daemon], m[raw], m[rpc], m["tcp"]
        raw_name = "raw TLS" if raw == "tls_tcp" else "raw TCP"
        print(f"\n{label} daemon (the default is TLS)")
        print(
            f"{'metric':<34}{'gpupool':>10}{raw_name:>10}{'gRPC':>10}{'/gRPC':>8}{'/' + raw_name:>10}{'/raw TCP':>10}"
        )
        for name, key, rkey, scale in (
            (f"upload {args.size_mib} MiB (GB/s)", "up", "up", 1.0),
            (f"download {args.size_mib} MiB (GB/s)", "down", "down", 1.0),
            ("sync round trip p50 (us)", "p50", "stream_p50", us),
            ("sync round trip p99 (us)", "p99", "stream_p99", us),
            (".item() round trip p50 (us)", "item_p50", "stream_p50", us),
        ):
            if key not in t:  # the raw floors have no .item()
                print(f"{name:<34}{g[key] * scale:>10.3f}{'':>10}{r[rkey] * scale:>10.3f}{g[key] / r[rkey]:>8.2f}")
                continue
            print(
                f"{name:<34}{g[key] * scale:>10.3f}{t[key] * scale:>10.3f}{r[rkey] * scale:>10.3f}"
                f"{g[key] / r[rkey]:>8.2f}{g[key] / t[key]:>10.2f}{g[key] / tcp[key]:>10.2f}"
            )
        b = m[daemon + "_bulk"]
        for name, key in ((f"upload {args.size_mib} MiB, side socket", "up"), ("download, side socket", "down")):
            print(
                f"{name:<34}{b[key]:>10.3f}{t[key]:>10.3f}{r[key]:>10.3f}"
                f"{b[key] / r[key]:>8.2f}{b[key] / t[key]:>10.2f}{b[key] / tcp[key]:>10.2f}"
            )
        ops = f"{args.ops} tiny adds + 1 sync (ops/s)"
        print(f"{ops:<34}{g['ops']:>10.0f}{'':>10}{r['msgs']:>10.0f}{g['ops'] / r['msgs']:>8.2f}")
        print(f"{'gRPC unary round trip p50/p99 (us)':<54}{r['unary_p50'] * us:>6.0f}/{r['unary_p99'] * us:<5.0f}")
    print(
        "\ngRPC floor: upload/download = one stream of 4 MiB messages; round trips = stream ping-pong of 16 B;"
        " ops/s floor = 100 B messages/s on one stream (one message per op)."
    )
    print("\ntargets (issue 8 item 4)")
    for daemon, raw, rpc, label in (("tls", "tls_tcp", "grpc_tls", "TLS"), ("plain", "tcp", "grpc", "plaintext")):
        g = m[daemon]
        checks = []
        for path, f in (("", g), (" (side socket)", m[daemon + "_bulk"])):
            checks += [
                (f"{d}{path} >= 0.6 x raw TCP", f[k] / m["tcp"][k], f[k] / m["tcp"][k] >= 0.6)
                for d, k in (("upload", "up"), ("download", "down"))
            ]
            if raw == "tls_tcp":
                checks += [
                    (f"{d}{path} >= 0.6 x raw TLS", f[k] / m[raw][k], f[k] / m[raw][k] >= 0.6)
                    for d, k in (("upload", "up"), ("download", "down"))
                ]
        ratio = g["p50"] / m[rpc]["stream_p50"]
        checks.append((f"sync p50 <= 1.3 x {'TLS ' if raw == 'tls_tcp' else ''}gRPC ping-pong", ratio, ratio <= 1.3))
        if raw == "tls_tcp":
            ratio = g["p50"] / m["grpc"]["stream_p50"]
            checks.append(("sync p50 <= 1.3 x plaintext gRPC ping-pong", ratio, ratio <= 1.3))
        for what, value, ok in checks:
            print(f"  {label:<10} {what:<44} {value:>6.2f}  {'met' if ok else 'NOT met'}")
    print("\nwhat gRPC itself allows (bare gRPC floor / raw floor: below 0.6, no daemon speaking gRPC can meet it)")
    floors = (
        ("TLS", "grpc_tls", "tls_tcp", "raw TLS"),
        ("TLS", "grpc_tls", "tcp", "raw TCP"),
        ("plaintext", "grpc", "tcp", "raw TCP"),
    )
    for label, rpc, raw, raw_name in floors:
        for d, k in (("upload", "up"), ("download", "down")):
            ratio = m[rpc][k] / m[raw][k]
            what = f"gRPC {d} / {raw_name}"
            print(f"  {label:<10} {what:<44} {ratio:>6.2f}  {'reachable' if ratio >= 0.6 else 'NOT reachable'}")


if __name__ == "__main__":
    sys.exit(main())


def alternate(
    names: list[str], repeat: int, measure: Callable[[str, int], dict[str, float]]
) -> dict[str, dict[str, Any]]:
    """`measure(name, i)` for each tree `repeat` times, in alternating order (A B, B A, ...: neither always runs on
    the box's warmer or busier turn), each result said on stderr; returns each tree's medians over its runs."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for i in range(repeat):
        for name in names if i % 2 == 0 else reversed(names):
            runs[name].append(measure(name, i))
            print(name, i, runs[name][-1], file=sys.stderr)
    return {name: {k: statistics.median(r[k] for r in got) for k in got[0]} for name, got in runs.items()}


def this_and_other(
    args: argparse.Namespace, flags: tuple[str, ...], measure: Callable[[str, bytes, str], dict[str, float]]
) -> dict[str, dict[str, Any]]:
    """Start this tree's daemon and `args.against`'s (`--against-python`) with `flags` and one loopback key, run
    `measure(address, key, name)` on each `args.repeat` times in alternating order (`alternate`; `name` tells the
    runs apart), stop both; returns each tree's medians ("this", "other")."""
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = loopback_keys(tmp)
        daemons = {
            "other": start_daemon(key_file, *flags, python=args.against_python, cwd=args.against),
            "this": start_daemon(key_file, *flags),
        }
        try:
            return alternate(list(daemons), args.repeat, lambda name, i: measure(daemons[name][1], key, f"{name}-{i}"))
        finally:
            stop_all([proc for proc, _ in daemons.values()])


def downloads_while(action: Callable[[], None], b: Any, handle: Any) -> list[float]:
    """Run `action` (another tenant's long command, to its sync) in a thread, and meanwhile time session `b`'s
    downloads of `handle` one after the other until it returns: the seconds each download took."""
    return times_while(action, lambda: b.download(handle))


def times_while(action: Callable[[], None], step: Callable[[], Any]) -> list[float]:
    """Run `action` in a thread, and meanwhile `step` (a neighbour's download, round trip) one after the other until
    it returns: the seconds each step took."""
    done = threading.Event()

    def run() -> None:
        try:
            action()
        finally:
            done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    waits: list[float] = []
    while not done.is_set():
        t0 = time.perf_counter()
        step()
        waits.append(time.perf_counter() - t0)
    t.join()
    return waits


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def print_table(medians: dict[str, dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """One row a tree: its name, then each (title, key, format) column of its medians, right-aligned."""
    print(f"{'':8}" + "".join(f"{title:>{len(title) + 2}}" for title, _, _ in columns))
    for name, med in medians.items():
        print(f"{name:8}" + "".join(f"{med[key]:>{len(title) + 2}{fmt}}" for title, key, fmt in columns))
