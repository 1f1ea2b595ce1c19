"""The side socket's uploads and downloads: system calls, CPU and GB/s per MiB on both ends, this checkout against
another (round 39: `tls.SideSocket`'s buffered records), next to raw TCP and raw TLS floors measured in the same run.

Each tree runs its own daemon (`gpupool serve --fake-gpus 1 --bulk-listen 127.0.0.1:0`, TLS by default) and its own
client (a subprocess of its interpreter: both ends of the side socket are that tree's), alternating trees each
round. A client attaches, warms up, then times --reps uploads of --size-mib (each followed by a Sync) and --reps
downloads of it (bit-exact), and counts for each phase, from the kernel:
- read-family and write-family system calls (`syscr`, `syscw` of /proc/PID/io: read, recvfrom, recvmsg / write,
  sendto, sendmsg...; polls not counted) of the client's process and of the daemon's (the side socket's reader and
  writer run there; a session's worker gets the bytes through shared memory);
- CPU time of each (the client's process, all its threads; the daemon's process tree's live threads, from
  /proc/PID/task/TID/schedstat);
each per MiB moved. The floors (bench/daemon_wire.py `tcp_figures`: one client, a server process, the same size)
give GB/s of raw TCP and of raw TLS through Python's ssl with its per-record writes, and the client end's system
calls a MiB.

    nice -n 5 python bench/side_syscalls.py --against /work/wt/base [--size-mib 64 --reps 4 --rounds 3]
    nice -n 5 python bench/side_syscalls.py --against /work/wt/base --insecure   (plaintext daemons: no TLS)
    nice -n 5 python bench/side_syscalls.py --pair [--size-mib 16 --rounds 9]   (the socket layer alone, in-process)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MiB = 1024**2


def _io(pid: int | str) -> tuple[int, int]:
    with open(f"/proc/{pid}/io") as f:
        d = dict(line.split(": ") for line in f.read().splitlines())
    return int(d["syscr"]), int(d["syscw"])


def tree_ns(pid: int) -> int:
    """CPU nanoseconds of the live threads of process `pid` and of its live descendants (the daemon, its zygote,
    workers), from the scheduler's own counts (/proc/PID/task/TID/schedstat)."""
    return tasks_ns(tree_tasks(pid))


def tree_tasks(pid: int) -> list[str]:
    """The schedstat files of the live threads of process `pid` and of its live descendants: a scan of /proc
    (milliseconds at load), which `tasks_ns` then reads without (round 56: the sweep's transfers of 64 KiB-1 MiB
    between two scans ran cold, and its small sizes' CPU figures were inflated)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parents[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except OSError:
                pass
    paths, todo = [], [pid]
    while todo:
        p = todo.pop()
        todo += [c for c, pp in parents.items() if pp == p]
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        paths += [f"/proc/{p}/task/{t}/schedstat" for t in tasks]
    return paths


def tasks_ns(paths: list[str]) -> int:
    """CPU nanoseconds of the threads of `tree_tasks`' files that are still alive."""
    total = 0
    for path in paths:
        try:
            with open(path, "rb") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def client(args: argparse.Namespace) -> int:
    """One session of this interpreter's gpupool: warm-up, then the timed uploads and downloads; a JSON line."""
    import torch
    from gpupool.client.session import Session

    size = args.size_mib * MiB
    big = torch.randint(0, 255, (size,), dtype=torch.uint8)
    out: dict[str, float] = {}
    with Session.attach(args.address, args.token) as s:
        h = s.upload(big)
        s.sync()
        assert torch.equal(s.download(h), big)
        s.free([h])
        for phase in ("up", "down"):
            handles = [] if phase == "up" else [s.upload(big) for _ in range(args.reps)]
            s.sync()
            c0, d0, cc0, dc0 = _io("self"), _io(args.daemon_pid), time.process_time(), tree_ns(int(args.daemon_pid))
            t0 = time.perf_counter()
            backs = []
            for i in range(args.reps):
                if phase == "up":
                    handles.append(s.upload(big))
                    s.sync()
                else:
                    backs.append(s.download(handles[i]))
            dt = time.perf_counter() - t0
            c1, d1, cc1, dc1 = _io("self"), _io(args.daemon_pid), time.process_time(), tree_ns(int(args.daemon_pid))
            mib = args.reps * size / MiB
            out[f"{phase}_gbs"] = args.reps * size / dt / 1e9
            out[f"{phase}_client_reads"] = (c1[0] - c0[0]) / mib
            out[f"{phase}_client_writes"] = (c1[1] - c0[1]) / mib
            out[f"{phase}_daemon_reads"] = (d1[0] - d0[0]) / mib
            out[f"{phase}_daemon_writes"] = (d1[1] - d0[1]) / mib
            out[f"{phase}_client_us"] = (cc1 - cc0) / mib * 1e6
            out[f"{phase}_daemon_us"] = (dc1 - dc0) / mib / 1e3
            for back in backs:
                assert torch.equal(back, big), "a download is not bit-exact"
            s.free(handles)
    print(json.dumps(out))
    return 0


def _floor(port: int, size: int, tls: bool) -> dict[str, float]:
    from daemon_wire import tcp_figures

    c0 = _io("self")
    got = tcp_figures(port, size, 1, tls=tls)
    c1 = _io("self")
    mib = size / MiB
    return {"up_gbs": got["up"], "down_gbs": got["down"], "client_reads": (c1[0] - c0[0]) / mib,
            "client_writes": (c1[1] - c0[1]) / mib}  # fmt: skip


def _calls() -> tuple[int, int]:
    """This thread's read-family and write-family system calls so far."""
    with open("/proc/thread-self/io") as f:
        d = dict(line.split(": ") for line in f.read().splitlines())
    return int(d["syscr"]), int(d["syscw"])


def pair(args: argparse.Namespace) -> int:
    """--pair: the socket layer alone, in this process: a loopback TCP connection with the side socket's own TLS
    contexts (`tls.SocketServerTls`, `tls.socket_client_context`), both ends non-blocking, unbuffered and buffered
    (`SideSocket.buffer`) alternately; --size-mib sent one way with `duplex.send_all` (a 24-byte header and the
    bytes, as a download) by one thread and read with `duplex.recv_into` by another: each thread's CPU time and
    system calls a MiB; then a 178-byte frame record's `send_all` (CPU a send) and reading 100 of them."""
    import threading

    import loopback_tls

    from gpupool import duplex, protocol

    size = args.size_mib * MiB
    data, head, frame = bytes(size), b"h" * 24, protocol.frame_record(b"x" * 150)
    runs: dict[bool, list[tuple[float, ...]]] = {False: [], True: []}
    ctxs = loopback_tls.contexts()

    def one(buffered: bool) -> tuple[float, ...]:
        a, b = loopback_tls.pair(ctxs, nodelay=False)
        for end in (a, b):
            if buffered:
                assert end.buffer()
        la, lb = threading.Lock(), threading.Lock()
        out: list[float] = []

        def send() -> None:
            c, t = _calls()[1], time.thread_time()
            duplex.send_all(a, la, [head, data], 30.0)
            out.extend((time.thread_time() - t, _calls()[1] - c))

        into = memoryview(bytearray(len(head) + size))
        sender = threading.Thread(target=send)
        c, t = _calls()[0], time.thread_time()
        sender.start()
        duplex.recv_into(b, lb, into, 30.0)
        recv_cpu, reads = time.thread_time() - t, _calls()[0] - c
        sender.join(30)
        small_send = small_recv = 0.0
        buf = memoryview(bytearray(len(frame) * 100))
        for _ in range(20):
            t = time.thread_time()
            for _ in range(100):
                duplex.send_all(a, la, [frame], 10.0)
            small_send += time.thread_time() - t
            t = time.thread_time()
            duplex.recv_into(b, lb, buf, 10.0)
            small_recv += time.thread_time() - t
        a.close()
        b.close()
        mib = size / MiB
        return (out[0] / mib * 1e6, out[1] / mib, recv_cpu / mib * 1e6, reads / mib, small_send / 2000 * 1e6,
                small_recv / 2000 * 1e6)  # fmt: skip

    load0 = os.getloadavg()[0]
    for r in range(args.rounds):
        for buffered in (False, True) if r % 2 == 0 else (True, False):
            runs[buffered].append(one(buffered))
    med = {k: [statistics.median(run[i] for run in v) for i in range(6)] for k, v in runs.items()}
    print(f"\nside socket layer alone (loopback TCP, TLS, this process), {args.size_mib} MiB one way, medians of "
          f"{args.rounds}; load {load0:.1f} -> {os.getloadavg()[0]:.1f}")  # fmt: skip
    names = ("sender CPU us a MiB", "sender writes a MiB", "receiver CPU us a MiB", "receiver reads a MiB",
             "178-byte frame: send_all us", "178-byte frame: read us")  # fmt: skip
    print(f"{'':<30}{'unbuffered':>12}{'buffered':>12}{'ratio':>8}")
    for i, name in enumerate(names):
        print(f"{name:<30}{med[False][i]:>12.2f}{med[True][i]:>12.2f}{med[True][i] / med[False][i]:>8.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", metavar="DIR", default="", help="also another checkout (its .venv/bin/python)")
    p.add_argument("--against-python", default="")
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--reps", type=int, default=4, help="transfers of each direction a session")
    p.add_argument("--rounds", type=int, default=3, help="sessions a tree (medians)")
    p.add_argument("--insecure", action="store_true", help="plaintext daemons and clients (no TLS)")
    p.add_argument("--pair", action="store_true", help="the socket layer alone: buffered vs unbuffered, in-process")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    for a in ("--address", "--token", "--daemon-pid"):
        p.add_argument(a, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        return client(args)
    if args.pair:
        return pair(args)
    from daemon_wire import loopback_keys, start_daemon, start_floor, stop

    from gpupool import tokens

    trees = {"this": (sys.executable, str(HERE.parent))}
    if args.against:
        trees["other"] = (args.against_python or str(Path(args.against) / ".venv/bin/python"), args.against)
    size = args.size_mib * MiB
    load0 = os.getloadavg()[0]
    extra = ("--bulk-listen", "127.0.0.1:0") + (("--insecure",) if args.insecure else ())
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in [*trees, "raw TCP", "raw TLS"]}
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = loopback_keys(tmp, not args.insecure)
        daemons = {name: start_daemon(key_file, *extra, python=py, cwd=cwd) for name, (py, cwd) in trees.items()}
        floor, (tcp_port, _, tls_port, _) = start_floor()
        try:
            for r in range(args.rounds):
                for name in trees if r % 2 == 0 else reversed(list(trees)):
                    (proc, address), (py, cwd) = daemons[name], trees[name]
                    claims = tokens.TokenClaims(f"{name}-{r}", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
                    cmd = [py, str(HERE / "side_syscalls.py"), "--client", "--address", address, "--token",
                           tokens.mint(key, claims), "--daemon-pid", str(proc.pid), "--size-mib",
                           str(args.size_mib), "--reps", str(args.reps)]  # fmt: skip
                    got = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=os.environ, check=False)
                    if got.returncode:
                        raise RuntimeError(f"{name}'s client failed:\n{got.stderr[-3000:]}")
                    rows[name].append(json.loads(got.stdout.strip().splitlines()[-1]))
                rows["raw TCP"].append(_floor(int(tcp_port), size, False))
                rows["raw TLS"].append(_floor(int(tls_port), size, True))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            stop([proc for proc, _ in daemons.values()], floor)
    med = {name: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for name, runs in rows.items()}
    names = list(trees)
    kind = "plaintext" if args.insecure else "TLS"
    print(f"\nside socket, {kind}: {args.reps} x {args.size_mib} MiB each way a session, medians of {args.rounds} "
          f"sessions a tree; load {load0:.1f} -> {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'per MiB':<28}" + "".join(f"{n:>10}" for n in names) + ("  this/other" if len(names) > 1 else ""))
    for phase, label in (("up", "upload"), ("down", "download")):
        for k, what in (("client_writes", "client writes"), ("client_reads", "client reads"),
                        ("daemon_writes", "daemon writes"), ("daemon_reads", "daemon reads"),
                        ("client_us", "client CPU us"), ("daemon_us", "daemon CPU us"), ("gbs", "GB/s")):  # fmt: skip
            vals = [med[n][f"{phase}_{k}"] for n in names]
            ratio = f"{vals[0] / vals[1]:>12.2f}" if len(vals) > 1 and vals[1] else ""
            print(
                f"{label + ' ' + what:<28}"
                + "".join(f"{v:>10.1f}" if k != "gbs" else f"{v:>10.3f}" for v in vals)
                + ratio
            )
    for floor_name in ("raw TCP", "raw TLS"):
        f = med[floor_name]
        print(f"{floor_name + ' GB/s up / down':<28}{f['up_gbs']:>10.3f}{f['down_gbs']:>10.3f}   (its client: "
              f"{f['client_writes']:.1f} writes, {f['client_reads']:.1f} reads a MiB)")  # fmt: skip
    for n in names:
        ratios = []
        for phase, label in (("up", "upload"), ("down", "download")):
            v, tcp, tls = med[n][f"{phase}_gbs"], med["raw TCP"][f"{phase}_gbs"], med["raw TLS"][f"{phase}_gbs"]
            ratios.append(f"{label} / raw TCP {v / tcp:.2f}, / raw TLS {v / tls:.2f}")
        print(f"{n}: " + "; ".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
