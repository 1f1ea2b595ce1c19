"""What a slice's hand-off to the session's worker costs by itself: a ping-pong between two processes on one core.

The daemon hands each slice to the session's worker process and waits for its result (server/worker.py
`ProcessRunner.run`: the frame's bytes into shared memory, a request word on a Unix stream socket, the result's length
word back). On the launch-bound benchmarks the front and the worker share the daemon's one core, so every slice costs
two context switches, front -> worker -> front. This measures the bare mechanism, 4-byte messages each way, with the
processes pinned to one core (`--core`), for the carriers a shared-memory ring would choose from:

- `unix`: a Unix stream socket pair (what the daemon uses), `seqpacket`: the same as SOCK_SEQPACKET,
- `pipe`: two pipes, `eventfd`: two eventfds (a ring's doorbell: the payload would be in shared memory).

Printed per round trip: the wall time and the calling side's thread CPU (what the daemon's front pays: the send, the
wake-up of its peer, its own switch out and back in). With `--ops N` the peer runs N small torch ops (a 16x64 @ 64x64
matmul, relu, mul: a tiny MLP's slice) between receiving and answering, and the calling side runs a little Python
between round trips, so that both come back to caches the other has used (the daemon's case), the hand-off's share
printed apart from that Python's.

    taskset -c 1 python bench/handoff_pingpong.py
    taskset -c 1 python bench/handoff_pingpong.py --kinds unix,eventfd --ops 33 --trips 3000

`--spin-us 0,30` (the `unix` carrier) repeats each run with the calling side spinning that long on a non-blocking
read of the answer before it blocks (server/worker.py `ProcessRunner.run`'s `--worker-spin-us`), and `--cores A,B`
pins the caller to core A and the peer to core B (an idle host's case: each side a core of its own). Printed beside
each: the voluntary context switches (blocking waits) of each side a round trip, and the load average.

    python bench/handoff_pingpong.py --kinds unix --cores 0,1 --spin-us 0,30 --ops 4 --trips 3000
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
from collections.abc import Callable

KINDS = ("unix", "seqpacket", "pipe", "eventfd")
MSG = b"abcd"


def carrier(
    kind: str, spin: float = 0.0
) -> tuple[Callable[[], None], Callable[[], None], Callable[[], None], Callable[[], None]]:
    """(send from A, receive at A, send from B, receive at B) for one carrier; A spins `spin` seconds on a `unix`
    socket's non-blocking read before it blocks (the daemon's `spin_word`)."""
    if kind in ("unix", "seqpacket"):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM if kind == "unix" else socket.SOCK_SEQPACKET)
        if spin > 0:
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            from server.worker import spin_word

            return (
                (lambda: a.sendall(MSG)),
                (lambda: None if spin_word(a, spin) else a.recv(4) and None),
                (lambda: b.sendall(MSG)),
                (lambda: b.recv(4) and None),
            )
        return (
            (lambda: a.sendall(MSG)),
            (lambda: a.recv(4) and None),
            (lambda: b.sendall(MSG)),
            (lambda: b.recv(4) and None),
        )
    if kind == "pipe":
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        return (
            (lambda: os.write(w1, MSG) and None),
            (lambda: os.read(r2, 4) and None),
            (lambda: os.write(w2, MSG) and None),
            (lambda: os.read(r1, 4) and None),
        )
    e1, e2 = os.eventfd(0), os.eventfd(0)
    return (
        (lambda: os.eventfd_write(e1, 1)),
        (lambda: os.eventfd_read(e2) and None),
        (lambda: os.eventfd_write(e2, 1)),
        (lambda: os.eventfd_read(e1) and None),
    )


def peer_work(ops: int) -> Callable[[], None]:
    if ops <= 0:
        return lambda: None
    import torch

    torch.set_num_threads(1)
    x, w = torch.randn(16, 64), torch.randn(64, 64)

    def work() -> None:
        y = x
        for _ in range(ops):
            y = torch.mm(y, w).relu_()
            y.mul_(0.01)

    return work


def front_work(on: bool) -> Callable[[], int]:
    table = {i: str(i) for i in range(20000)}

    def work() -> int:  # ~20 us of dict and str work over a ~1 MB table
        return sum(len(table[i]) for i in range(0, 20000, 40)) if on else 0

    return work


def measure(kind: str, trips: int, ops: int, spin: float = 0.0, cores: tuple[int, int] | None = None) -> str:
    send_a, recv_a, send_b, recv_b = carrier(kind, spin)
    work = peer_work(ops)
    if cores is not None:
        os.sched_setaffinity(0, {cores[0]})
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_nvcsw
    pid = os.fork()
    if pid == 0:  # the peer: the worker's part
        try:
            if cores is not None:
                os.sched_setaffinity(0, {cores[1]})
            for _ in range(trips):
                recv_b()
                work()
                send_b()
        finally:
            os._exit(0)
    mine = front_work(ops > 0)
    handoff = python = 0.0
    own0 = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    t0 = time.perf_counter()
    for _ in range(trips):
        c = time.thread_time()
        mine()
        c1 = time.thread_time()
        send_a()
        recv_a()
        handoff += time.thread_time() - c1
        python += c1 - c
    wall = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - own0
    os.waitpid(pid, 0)
    peer = resource.getrusage(resource.RUSAGE_CHILDREN).ru_nvcsw - child0
    name = kind + (f"+spin{spin * 1e6:.0f}" if spin > 0 else "")
    out = f"{name:>14}: wall {wall / trips * 1e6:7.1f} us, hand-off CPU {handoff / trips * 1e6:5.1f} us"
    out += f", the caller's Python {python / trips * 1e6:5.1f} us" if ops > 0 else ""
    out += f", blocking waits caller {own / trips:4.2f} peer {peer / trips:4.2f}"
    return out + f" per round trip (load {os.getloadavg()[0]:.1f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ",".join(KINDS))
    p.add_argument("--trips", type=int, default=20000)
    p.add_argument("--ops", type=int, default=0, help="torch ops the peer runs a round trip (0: none)")
    p.add_argument("--core", type=int, default=-1, help="pin both processes to this core (default: as started)")
    p.add_argument("--cores", default="", help="A,B: pin the caller to core A, the peer to core B")
    p.add_argument("--spin-us", default="0", help="comma-separated: the caller's spin before it blocks (unix only)")
    a = p.parse_args(argv)
    kinds = a.kinds.split(",")
    if any(k not in KINDS for k in kinds):
        p.error(f"--kinds: one of {', '.join(KINDS)}")
    spins = [float(x) * 1e-6 for x in a.spin_us.split(",")]
    cores = tuple(int(x) for x in a.cores.split(",")) if a.cores else None
    if cores is not None and len(cores) != 2:
        p.error("--cores: A,B")
    if a.core >= 0:
        os.sched_setaffinity(0, {a.core})
    print(f"{a.trips} round trips, peer ops {a.ops}, cores {sorted(os.sched_getaffinity(0))} {a.cores}")
    for kind in kinds:
        for spin in spins if kind == "unix" else [0.0]:
            print(measure(kind, a.trips, a.ops, spin, cores), flush=True)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
