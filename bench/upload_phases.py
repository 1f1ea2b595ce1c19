"""Where a session's first big upload goes, process by process, next to its later one of the same size (issue 8:
a session's first upload >= 0.6 of raw TCP) and next to a raw socket's upload into reused and into fresh memory.

A daemon with `--bulk-listen` on one fake GPU (plaintext, or TLS with --tls); per session, one upload of
--size-mib MiB (the session's first: on a fake GPU the worker's tensor is fresh host memory), a free, and a second
upload of the same size (it lands in the first's memory, server/uploadpool.py). Around each upload, from /proc:
the CPU time (the scheduler's nanoseconds, schedstat) and minor page faults of the client (this process), the
daemon's front process (its reader receives the bytes into the session's upload slots) and its children (the zygote
and the session's worker: the worker copies each chunk out of its slot into the tensor, faulting a fresh tensor's
pages in first); and the wall time. After each session the raw floors of the same kind (bench/daemon_wire.py's
floor server): an upload into one reused 4 MiB buffer and one into a fresh mapping of the whole size. Medians
over --sessions; with --against DIR, DIR's daemon too (run by --against-python), sessions alternating.

On a box shared with other work the wall time follows the load; the CPU columns are what a change moves.

    nice python bench/upload_phases.py --against /work/wt/base --sessions 6
    nice python bench/upload_phases.py --tls
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import daemon_wire  # noqa: E402 - the daemon starter and the floor server live there

MiB = 1024 * 1024


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _process(pid: int) -> tuple[float, int]:
    """CPU seconds of `pid`'s live threads (schedstat) and its minor page faults so far (all its threads, the
    dead ones' included: /proc/PID/stat)."""
    cpu = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                    cpu += int(f.read().split()[0])
            except OSError:
                pass
        with open(f"/proc/{pid}/stat", "rb") as f:
            faults = int(f.read().rsplit(b")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0.0, 0
    return cpu / 1e9, faults


def snapshot(daemon: int) -> dict[str, tuple[float, int]]:
    """(CPU s, minor faults) of this process, the daemon's front process, and all its descendants together."""
    kids, below, todo = _children(), [], [daemon]
    while todo:
        p = todo.pop()
        below += kids.get(p, [])
        todo += kids.get(p, [])
    rest = [_process(p) for p in below]
    return {
        "client": _process(os.getpid()),
        "front": _process(daemon),
        "worker": (sum(c for c, _ in rest), sum(f for _, f in rest)),
    }


def upload(session: object, daemon: int, tensor: object) -> tuple[object, dict[str, float]]:
    """Upload `tensor` (and a sync), with the wall time and each part's CPU and faults over it."""
    before, t0 = snapshot(daemon), time.perf_counter()
    handle = session.upload(tensor)  # type: ignore[attr-defined]
    session.sync()  # type: ignore[attr-defined]
    wall, after = time.perf_counter() - t0, snapshot(daemon)
    row = {"wall_ms": wall * 1e3}
    for part, (cpu, faults) in after.items():
        row[f"{part}_ms"] = (cpu - before[part][0]) * 1e3
        row[f"{part}_faults"] = faults - before[part][1]
    return handle, row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--tls", action="store_true", help="a TLS daemon and TLS floors (default: plaintext)")
    p.add_argument("--against", metavar="DIR", help="also DIR's daemon, sessions alternating")
    p.add_argument("--against-python", default="python3", help="the interpreter that imports --against's gpupool")
    args = p.parse_args()

    import torch
    from gpupool.client.session import Session

    from gpupool import tokens

    size = args.size_mib * MiB
    extra = ("--bulk-listen", "127.0.0.1:0", *(() if args.tls else ("--insecure",)))
    load0 = os.getloadavg()[0]
    rows: dict[str, dict[str, list[dict[str, float]]]] = {}
    floors: dict[str, list[float]] = {"reused": [], "fresh": []}
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = daemon_wire.loopback_keys(tmp, args.tls)
        daemons = {"this": daemon_wire.start_daemon(key_file, *extra)}
        if args.against:
            daemons["other"] = daemon_wire.start_daemon(key_file, *extra, python=args.against_python, cwd=args.against)
        floor, (tcp_port, _, tls_port, _) = daemon_wire.start_floor()
        port = int(tls_port if args.tls else tcp_port)
        big = torch.randint(0, 255, (size,), dtype=torch.uint8)
        try:
            for i in range(args.sessions):
                for name in daemons if i % 2 == 0 else reversed(list(daemons)):
                    proc, address = daemons[name]
                    claims = tokens.TokenClaims(f"{name}-{i}", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
                    with Session.attach(address, tokens.mint(key, claims)) as s:
                        s.sync()
                        h, first = upload(s, proc.pid, big)
                        s.free([h])
                        s.sync()
                        _, again = upload(s, proc.pid, big)
                    rows.setdefault(name, {"first": [], "again": []})
                    rows[name]["first"].append(first)
                    rows[name]["again"].append(again)
                floors["reused"].append(daemon_wire.tcp_figures(port, size, 1, args.tls)["up"])
                floors["fresh"].append(daemon_wire.tcp_figures(port, size, 1, args.tls, fresh=True)["up"])
                print(f"sessions {i + 1}/{args.sessions} done", file=sys.stderr)
        finally:
            daemon_wire.stop([proc for proc, _ in daemons.values()], floor)
    kind = "TLS" if args.tls else "TCP"
    reused, fresh = statistics.median(floors["reused"]), statistics.median(floors["fresh"])
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{args.size_mib} MiB uploads, {'TLS' if args.tls else 'plaintext'}, medians of {args.sessions} sessions")
    print(f"(load {load0:.1f} at the start, {load} at the end)")
    print(f"raw {kind} upload into a reused buffer {reused:.3f} GB/s, into fresh memory {fresh:.3f} GB/s")
    keys = ["wall_ms", "client_ms", "front_ms", "worker_ms", "client_faults", "front_faults", "worker_faults"]
    print(f"{'tree / upload':<16}{'GB/s':>8}{'/raw':>7}{'/fresh':>8}" + "".join(f"{k:>15}" for k in keys))
    for name in rows:
        for which in ("first", "again"):
            med = {k: statistics.median(r[k] for r in rows[name][which]) for k in keys}
            rate = size / med["wall_ms"] / 1e6
            cells = "".join(f"{med[k]:>15.0f}" for k in keys)
            print(f"{name + ' ' + which:<16}{rate:>8.3f}{rate / reused:>7.2f}{rate / fresh:>8.2f}{cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
