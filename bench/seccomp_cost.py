"""What a session worker's seccomp filter costs each system call: this checkout's server/sandbox.py filter against
another checkout's (`--against`), and none, side by side in one run.

Each case is a forked child that loads its filter (`seccomp_filter()`, a worker's without network) and then times
the calls a worker makes per slice: a 4-byte send and recv on a socket pair (its session socket's), and getppid
(a call the filter lets through after all its rules). Median nanoseconds per call over --rounds, the cases
alternating within each round; and the fastest round's (the least disturbed by a loaded host). With --network, a
worker granted network's filter (round 43: its IPv4 and IPv6 sockets TCP only), a TCP socket()+close timed too,
and each filter's length in BPF instructions (PTRACE_SECCOMP_GET_FILTER: root).

    python bench/seccomp_cost.py --against /work/wt/base [--network]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent.parent


def load(checkout: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, checkout / "server" / "sandbox.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def bpf_length(sandbox: ModuleType, network: bool) -> int:
    """Instructions of `sandbox`'s filter, loaded in a child and read by this (root) process through ptrace."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        sandbox.seccomp_filter(network)
        os.write(w, b"x")
        time.sleep(60)
        os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    try:
        if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
            return -1
        os.waitpid(pid, 0)
        return int(libc.ptrace(0x420C, pid, None, None))  # PTRACE_SECCOMP_GET_FILTER of filter 0, no buffer: length
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def measure(sandbox: ModuleType | None, calls: int, network: bool = False) -> tuple[float, float, float]:
    """ns per getppid, ns per send+recv pair, ns per TCP socket()+close (`network` only), in a child under
    `sandbox`'s filter (None: no filter)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            a, b = socket.socketpair()
            if sandbox is not None and not sandbox.seccomp_filter(network):
                raise SystemExit("no libseccomp")
            t = time.perf_counter_ns()
            for _ in range(calls):
                os.getppid()
            ppid = (time.perf_counter_ns() - t) / calls
            t = time.perf_counter_ns()
            for _ in range(calls):
                a.send(b"word")
                b.recv(4)
            pair = (time.perf_counter_ns() - t) / calls
            tcp = 0.0
            if network:
                t = time.perf_counter_ns()
                for _ in range(calls // 20):
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
                tcp = (time.perf_counter_ns() - t) / (calls // 20)
            os.write(w, f"{ppid} {pair} {tcp}".encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100).decode().split()
    os.close(r)
    os.waitpid(pid, 0)
    return float(out[0]), float(out[1]), float(out[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, help="another checkout (its server/sandbox.py)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--network", action="store_true", help="a worker granted network's filter (and TCP socket())")
    args = ap.parse_args()
    cases: dict[str, ModuleType | None] = {"none": None, "this": load(HERE, "sandbox_this")}
    if args.against:
        cases["against"] = load(args.against, "sandbox_against")
    got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, module in cases.items():
            got[name].append(measure(module, args.calls, args.network))
    print(f"{'filter':>8} {'getppid ns':>11} {'send+recv ns':>13} {'min getppid':>12} {'min send+recv':>14}"
          + (f" {'tcp socket ns':>14} {'BPF':>5}" if args.network else "")
          + f"   ({args.rounds} rounds, {args.calls} calls{', network' if args.network else ''})")  # fmt: skip
    for name, module in cases.items():
        ppid = statistics.median(g[0] for g in got[name])
        pair = statistics.median(g[1] for g in got[name])
        low = min(g[0] for g in got[name]), min(g[1] for g in got[name])
        more = ""
        if args.network:
            length = bpf_length(module, True) if module is not None and os.geteuid() == 0 else 0
            more = f" {statistics.median(g[2] for g in got[name]):>14.0f} {length:>5}"
        print(f"{name:>8} {ppid:>11.0f} {pair:>13.0f} {low[0]:>12.0f} {low[1]:>14.0f}{more}")
    if args.against:
        base = statistics.median(g[1] for g in got["against"])
        this = statistics.median(g[1] for g in got["this"])
        none = statistics.median(g[1] for g in got["none"])
        print(
            f"send+recv medians: this/against {this / base:.3f}, "
            f"this-none {this - none:+.0f} ns, against-none {base - none:+.0f} ns"
        )


if __name__ == "__main__":
    main()
