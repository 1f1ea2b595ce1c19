"""The bulk side socket's transfer loop before and after round 24 (gpupool/duplex.py), side by side in one run.

Before, each end held its socket's lock across a blocking `sendall` / `recv_into` (a socket with a timeout); since
round 24 the socket is non-blocking and the lock is held for one call at a time (`duplex.send_all`/`recv_into`,
waiting in `select` with it released), which fixed a deadlock of one session's upload and download from two threads
(tests/integration/test_daemon_bulk.py). This measures what that costs one transfer: a loopback TLS connection (the
loopback PKI, as the daemon's side port) or a plaintext one, a sender thread writing `--size-mib` in 4 MiB chunks
(header and bytes, as `BulkSocket.send_upload`) and a receiver reading them into one buffer, each end with the old
loop and the new, alternating, fresh connections each time; medians of `--repeat` runs of the wall-clock rate and
of the process's CPU seconds per GiB (both ends: time.process_time), and new/old.

    nice python bench/bulk_duplex.py [--size-mib 256] [--repeat 7] [--plaintext]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Any

import loopback_tls

from gpupool import duplex, protocol

MiB = 1024**2
CHUNK = 4 * MiB
TIMEOUT = 60.0


def _old_send(sock: Any, lock: threading.Lock, views: list[Any]) -> None:
    with lock:  # round 23's BulkSocket.send_upload / BulkLink.send_download
        for v in views:
            sock.sendall(v)


def _old_recv(sock: Any, lock: threading.Lock, view: memoryview) -> None:
    with lock:  # round 23's _recv_into
        got = 0
        while got < len(view):
            k = sock.recv_into(view[got:], len(view) - got)
            if k == 0:
                raise OSError("closed")
            got += k


def _new_send(sock: Any, lock: threading.Lock, views: list[Any]) -> None:
    duplex.send_all(sock, lock, views, TIMEOUT)


def _new_recv(sock: Any, lock: threading.Lock, view: memoryview) -> None:
    if duplex.recv_into(sock, lock, view, TIMEOUT) < len(view):
        raise OSError("closed")


def _one(kind: str, size: int, ctxs: tuple[Any, Any] | None) -> tuple[float, float]:
    """(GB/s, CPU s/GiB) of one transfer of `size` bytes with the `kind` ("old"/"new") loop at both ends."""
    send, recv = (_old_send, _old_recv) if kind == "old" else (_new_send, _new_recv)
    s, c = loopback_tls.pair(ctxs)
    for x in (c, s):
        if kind == "old":
            x.settimeout(TIMEOUT)
        else:
            x.setblocking(False)
    data = memoryview(bytearray(os.urandom(CHUNK)))
    into = memoryview(bytearray(size))
    head = memoryview(bytearray(protocol.BULK_HEAD.size))
    clock, slock = threading.Lock(), threading.Lock()

    def receiver() -> None:
        for off in range(0, size, CHUNK):
            recv(s, slock, head)
            recv(s, slock, into[off : off + CHUNK])

    t = threading.Thread(target=receiver)
    c0, w0 = time.process_time(), time.perf_counter()
    t.start()
    for off in range(0, size, CHUNK):
        send(c, clock, [protocol.BULK_HEAD.pack(protocol.BULK_UPLOAD, 1, off, CHUNK), data])
    t.join()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    for x in (c, s):
        x.close()
    return size / wall / 1e9, cpu / (size / 1024**3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--plaintext", action="store_true", help="a plaintext connection (the daemon's --insecure)")
    args = p.parse_args()
    size = args.size_mib // 4 * 4 * MiB
    ctxs = None if args.plaintext else loopback_tls.contexts()
    runs: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    _one("new", 16 * MiB, ctxs)  # warm-up
    for i in range(args.repeat):
        for kind in ("old", "new") if i % 2 == 0 else ("new", "old"):
            runs[kind].append(_one(kind, size, ctxs))
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nbulk socket loop, {'plaintext' if args.plaintext else 'TLS'}, {args.size_mib} MiB one way, "
          f"medians of {args.repeat} (load {load})")  # fmt: skip
    print(f"{'metric':<28}{'old (lock held)':>16}{'new (duplex)':>14}{'new/old':>9}")
    for i, name in enumerate(("rate (GB/s)", "CPU, both ends (s/GiB)")):
        o, n = med["old"][i], med["new"][i]
        print(f"{name:<28}{o:>16.3f}{n:>14.3f}{n / o:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
