"""The daemon's side-socket reader alone, a synced frame at a time: its system calls (by name, EAGAINs apart) and
its instructions a frame, this checkout's and another's (round 40, front40); since round 41 (front41) the client's
end too (`client/bulk.py` `BulkSocket`: the frame's write, the reply's read), its instructions a frame.

In this process, over a loopback TCP connection with the side socket's own TLS contexts (bench/loopback_tls.py),
both ends buffered as bound ones are (`SideSocket.buffer`): a thread of its own runs the front reader's socket calls
of `DeviceServicer.read_side` for each frame (`BulkLink.recv_frame`, `BulkLink.ready`) and the reply's write as
`FrontSession._write_now` makes it (`BulkLink.send_now`; until round 42 `send_frame`, the writer's), while the main
thread plays a client that sends a frame (an 85-byte RunGraph and Sync, a tiny captured step's size) through the
session's `BulkSocket` as a synced call does (`send_frame_now`, `Session._write_inline`'s; until round 42
`send_frame`, the sender's) and waits for its reply (`recv_record`) before the next. What the daemon does between
the frame and the reply (split, slice, worker) is left out: this counts the socket path only.

    python bench/side_reader.py [--frames 2000] [--measure syscalls|instr]
        [--against DIR --against-python DIR/.venv/bin/python]   (this file run by that python, importing DIR's gpupool)

`syscalls`: `strace -c` of the reader thread while it reads --frames frames (and of the client's thread:
`client ...`); `instr`: callgrind of the process, instrumentation on around the frames only, each thread apart, the
reader thread's total and the client's (the main thread's: its waits for the reply included).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FRAME = b"\x08\x07" + b"s" * 83  # (the bytes are never parsed here: the reader's socket calls only)
REPLY = b"\x08\x07\x12\x04\x08\x01\x10\x02"


def run(frames: int, measure: str, out: str, frame_bytes: int = len(FRAME)) -> dict[str, object]:
    """One process's figures: `measure` on the reader thread for `frames` synced frames of `frame_bytes`."""
    frame = FRAME[:frame_bytes] + b"s" * (frame_bytes - len(FRAME))
    import cgtools
    import loopback_tls
    from gpupool.client import bulk as client_bulk
    from gpupool.server import bulkside

    from gpupool import protocol

    sock, client = loopback_tls.pair(loopback_tls.contexts())  # (no thread started: callgrind numbers them)
    tid: list[int] = []
    go, started = threading.Event(), threading.Event()

    def reader() -> None:  # the server's end, all of it in this one thread (callgrind numbers threads by creation)
        assert sock.buffer()
        link = bulkside.BulkLink(sock, 1, frames=True)
        tid.append(threading.get_native_id())
        started.set()
        go.wait()
        for _ in range(frames + 1):
            got = link.recv_frame(1 << 20)
            assert got is not None and len(got) == len(frame)
            link.ready()
            # (as `FrontSession._write_now` writes a small reply: from the thread that has it, without waiting)
            assert link.send_now(protocol.frame_record(REPLY)) == len(REPLY) + protocol.BULK_HEAD.size
        link.close()

    thread = threading.Thread(target=reader, name="side-reader")
    thread.start()
    assert client.buffer()
    side = client_bulk.BulkSocket(client, frames=True)  # the client's end as a session uses it

    def step() -> None:
        rest = side.send_frame_now(frame)  # (as a session's synced call writes it: `Session._write_inline`)
        if rest:  # (a large frame the socket did not take at once: its sender writes the rest)
            side.send_rest(rest)
        kind, _, body = side.recv_record()
        assert kind == protocol.BULK_FRAME and body == REPLY

    started.wait(10)
    go.set()
    step()  # the first frame: both ends warm
    tracers = []
    if measure == "syscalls":  # the reader thread, and the client's (this main thread)
        for path, who in ((out, tid[0]), (out + ".client", threading.get_native_id())):
            tracers.append(subprocess.Popen(["strace", "-c", "-o", path, "-p", str(who)], stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # (attached)
    elif measure == "instr":
        cgtools.control("--instr=on")
    t0 = time.perf_counter()
    for _ in range(frames):
        step()
    wall = time.perf_counter() - t0
    for tracer in tracers:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
    if measure == "instr":
        cgtools.control("--instr=off")
    thread.join(30)
    client.close()
    return {"wall_us": round(wall / frames * 1e6, 1)}


def syscall_table(path: str, frames: int) -> dict[str, float]:
    """strace -c's table: calls a frame by name, and errors (EAGAIN) a frame as name!."""
    rows: dict[str, float] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls = int(parts[3])
            errors = int(parts[4]) if len(parts) == 6 else 0
            rows[parts[-1]] = round(calls / frames, 2)
            if errors:
                rows[parts[-1] + " (errors)"] = round(errors / frames, 2)
    return rows


def measure_tree(
    python: str, frames: int, measure: str, tmp: str, name: str, frame_bytes: int = len(FRAME)
) -> dict[str, object]:
    """This file run by `python` (whose gpupool is that tree's) in a child: its figures."""
    out = str(Path(tmp) / f"{name}.out")
    cmd = [python, str(HERE / "side_reader.py"), "--child", "--frames", str(frames), "--measure", measure, "--out", out,
           "--frame-bytes", str(frame_bytes)]  # fmt: skip
    if measure == "instr":
        import cgtools

        cmd = [*cgtools.valgrind(out, "--separate-threads=yes"), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    figures: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    if measure == "syscalls":
        figures.update(syscall_table(out, frames))
        figures.update({"client " + k: v for k, v in syscall_table(out + ".client", frames).items()})
    elif measure == "instr":
        # callgrind's files: OUT-01 (the main thread: the client's end), OUT-02 (the reader: the first thread started)
        for name, suffix in (("instructions", "-02"), ("client instructions", "-01")):
            text = Path(out + suffix).read_text()
            totals = [line for line in text.splitlines() if line.startswith(("totals:", "summary:"))]
            figures[name] = round(int(totals[-1].split()[1]) / frames)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--measure", choices=("syscalls", "instr"), default="syscalls")
    p.add_argument("--against", default="", help="another checkout (its gpupool, run by --against-python)")
    p.add_argument("--against-python", default=sys.executable)
    p.add_argument("--frame-bytes", type=int, default=len(FRAME), help="a frame's size (a captured batch: 64 KiB+)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run(args.frames, args.measure, args.out, args.frame_bytes)))
        return 0
    trees = {"this": sys.executable}
    if args.against:
        trees["other"] = args.against_python
    with tempfile.TemporaryDirectory() as tmp:
        got = {
            name: measure_tree(python, args.frames, args.measure, tmp, name, args.frame_bytes)
            for name, python in trees.items()
        }
    keys = sorted({k for figures in got.values() for k in figures})
    print(f"the side reader's socket path, a synced frame ({args.measure}, {args.frames} frames, load "
          f"{os.getloadavg()[0]:.1f})")  # fmt: skip
    print(f"  {'':24}" + "".join(f"{name:>12}" for name in got))
    for k in keys:
        print(f"  {k:24}" + "".join(f"{got[name].get(k, 0):>12}" for name in got))
    return 0


if __name__ == "__main__":
    sys.exit(main())
