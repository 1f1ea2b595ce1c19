"""The client's side of a bulk upload on a frames socket (round 35, issue 8: uploads >= 0.6 of raw TCP): the
client's `Session._upload_side` (since tail38 each 4 MiB chunk's frame and bytes one item of the sender thread, one
barrier an upload; before, each chunk's frame through the sender, a barrier, then the caller wrote its bytes) next
to round 35's try (one barrier an upload, then the caller writes each chunk's frame and bytes itself; no faster
here, BENCHMARKS.md "Round 35, slot35"), in the same process against the same daemon (this tree's,
plaintext or --tls, one fake GPU), sessions alternating.

Per variant, medians over --sessions of a session's later upload of --size-mib MiB (after a first one and its
free): the wall time of `upload` alone and with the sync after it, the client's CPU over it, and the client
process's voluntary context switches (its threads' waits: what the hand-offs cost, whatever the load).

    nice python bench/side_upload_ab.py --sessions 8 [--tls]

`--stream` (round 39): the session's frames on its gRPC stream (GPUPOOL_SIDE_FRAMES=0), only the bytes on the side
socket: `_upload_side` (since tail39 each chunk's frame and bytes one item of gRPC's sending thread, which writes
the bytes once gRPC wrote the frame) next to 1344c19's path (each chunk's frame queued for gRPC, then the caller
writes its bytes itself: an interrupt inside that write lost the session).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import daemon_wire  # noqa: E402 - the daemon starter lives there

MiB = 1024 * 1024


def _one_barrier(self: Any, side: Any, h: int, meta: Any, data: memoryview, keep: Any = None) -> None:
    """Round 35's try: the frames queued before the upload sent (one barrier), then this thread writes each chunk's
    frame on the side socket itself, then its bytes (no hand-off to the sender thread a chunk)."""
    from gpupool.client.session import side_chunks

    from gpupool.errors import Unavailable

    carrier = self._carrier
    with self._lock:
        self.flush()
        self._side_barrier()
        for off, end, frame in side_chunks(h, meta, data.nbytes):
            if self._dead is not None:
                raise self._dead
            try:
                carrier.send_frame(frame)
            except Unavailable as exc:
                self._dead = self._dead or self._end_reason(exc)
                raise self._dead from None
            self.frames_put += 1
            try:
                side.send_upload(h, off, data[off:end])
            except Unavailable as exc:
                self._dead = self._dead or exc
                raise


def _caller_writes(self: Any, side: Any, h: int, meta: Any, data: memoryview, keep: Any = None) -> None:
    """1344c19's path where the frames use the stream: each chunk's frame queued for gRPC, then this thread writes
    the chunk's bytes on the side socket itself."""
    from gpupool.client.session import side_chunks

    from gpupool.errors import Unavailable

    with self._lock:
        self.flush()
        for off, end, frame in side_chunks(h, meta, data.nbytes):
            self._put(frame)
            try:
                side.send_upload(h, off, data[off:end])
            except Unavailable as exc:
                self._dead = self._dead or exc
                raise


def _switches() -> int:
    with open("/proc/self/status") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--tls", action="store_true")
    p.add_argument("--stream", action="store_true", help="frames on the gRPC stream (GPUPOOL_SIDE_FRAMES=0)")
    args = p.parse_args()
    if args.stream:
        os.environ["GPUPOOL_SIDE_FRAMES"] = "0"

    import torch
    from gpupool.client.session import Session

    from gpupool import tokens

    variants = {
        "sender": Session._upload_side,
        "caller" if args.stream else "one-barrier": _caller_writes if args.stream else _one_barrier,
    }
    other = list(variants)[1]
    extra = ("--bulk-listen", "127.0.0.1:0", *(() if args.tls else ("--insecure",)))
    load0 = os.getloadavg()[0]
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    big = torch.randint(0, 255, (args.size_mib * MiB,), dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = daemon_wire.loopback_keys(tmp, args.tls)
        proc, address = daemon_wire.start_daemon(key_file, *extra)
        try:
            for i in range(args.sessions):
                for name in variants if i % 2 == 0 else reversed(list(variants)):
                    Session._upload_side = variants[name]  # type: ignore[method-assign]
                    claims = tokens.TokenClaims(f"{name}-{i}", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
                    with Session.attach(address, tokens.mint(key, claims)) as s:
                        assert (s._carrier is None) == args.stream, "the session's frames travel elsewhere"
                        s.free([s.upload(big)])
                        s.sync()
                        sw, cpu, t0 = _switches(), time.process_time(), time.perf_counter()
                        h = s.upload(big)
                        t1 = time.perf_counter()
                        s.sync()
                        t2, cpu, sw = time.perf_counter(), time.process_time() - cpu, _switches() - sw
                        s.free([h])
                    rows[name].append(
                        {
                            "upload_ms": (t1 - t0) * 1e3,
                            "with_sync_ms": (t2 - t0) * 1e3,
                            "client_cpu_ms": cpu * 1e3,
                            "switches": sw,
                        }
                    )
                print(f"sessions {i + 1}/{args.sessions} done", file=sys.stderr)
        finally:
            Session._upload_side = variants["sender"]  # type: ignore[method-assign]
            proc.terminate()
            proc.wait(30)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    carrier = "frames on the stream" if args.stream else "frames on the side socket"
    how = f"{'TLS' if args.tls else 'plaintext'}, {carrier}, medians of {args.sessions}"
    print(f"\n{args.size_mib} MiB later uploads, {how}")
    print(f"(load {load0:.1f} at the start, {load} at the end)")
    keys = ["upload_ms", "with_sync_ms", "client_cpu_ms", "switches"]
    print(f"{'client':<12}" + "".join(f"{k:>15}" for k in keys))
    med = {name: {k: statistics.median(r[k] for r in rows[name]) for k in keys} for name in variants}
    for name in variants:
        print(f"{name:<12}" + "".join(f"{med[name][k]:>15.0f}" for k in keys))
    ratio = f"{other.split('-')[0]}/sender"
    print(f"{ratio:<12}" + "".join(f"{med[other][k] / max(med['sender'][k], 1e-9):>15.2f}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
