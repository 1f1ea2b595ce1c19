"""Ranks of one host through rank 0's store front (link56): `--ranks` ranks (threads of one process, so every
connection comes from 127.0.0.1) each prove the group's secret to a real `_StoreFront` (`collectives._store_master`,
over loopback) as a join does (`_prove`; a connection closed before the front's admission dials again after
STORE_ATTEMPT_SECONDS, as `_connect_store`), `--trials` times each, with and without a stranger on the same address
opening connections as fast as it can (`--flood`: each held open, the 64 newest kept). Under this checkout's gpupool
and, with `--against-python`, another's (its venv's editable install: the base). Prints per size the trials where
every rank was admitted within `--timeout`, the median and worst time, the median number of dials a trial that were
closed before the admission (pushed out or turned away) and the stranger's connections a second.

    nice -n 5 .venv/bin/python bench/front_one_host.py --ranks 8,12,16,31 --trials 5 \\
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def trial(ranks: int, timeout: float, flood: bool) -> dict[str, Any]:
    from gpupool.server import collectives
    from gpupool.server.seclink import bind_in

    from gpupool.protocol import COLLECTIVE_PORTS

    key = collectives._front_key("a group's secret")
    master, front = bind_in(
        COLLECTIVE_PORTS,
        lambda port: collectives._store_master("127.0.0.1", port, ranks + 1, timeout, key, COLLECTIVE_PORTS, "x"),
    )
    flooder: subprocess.Popen[str] | None = None
    if flood:  # a process of its own (its own interpreter lock), opening connections from 127.0.0.1 until stopped
        flooder = subprocess.Popen(
            [sys.executable, __file__, "--flood-port", str(front.port)], stdout=subprocess.PIPE, text=True
        )
        assert flooder.stdout is not None and flooder.stdout.readline()  # under way

    def join() -> tuple[bool, int]:
        deadline = time.monotonic() + timeout
        closed = 0
        while time.monotonic() < deadline:
            start = time.monotonic()
            sock = socket.create_connection(("127.0.0.1", front.port), timeout=timeout)
            try:
                collectives._prove(sock, key, deadline)
                return True, closed
            except OSError:
                closed += 1
                time.sleep(max(0.0, start + collectives.STORE_ATTEMPT_SECONDS - time.monotonic()))
            finally:
                sock.close()
        return False, closed

    began = time.monotonic()
    with ThreadPoolExecutor(ranks) as pool:
        out = list(pool.map(lambda _: join(), range(ranks)))
    took = time.monotonic() - began
    rate = 0.0
    if flooder is not None:
        flooder.terminate()
        opened, seconds = (float(x) for x in flooder.communicate()[0].split())
        rate = opened / seconds
    front.close()
    del master
    return {
        "ranks": ranks,
        "flood": flood,
        "formed": all(ok for ok, _ in out),
        "seconds": took,
        "closed": sum(n for _, n in out),
        "rate": rate,
    }


def flood(port: int) -> None:
    """The stranger: connections to `port` as fast as it can, each held open (the 64 newest); at SIGTERM prints how
    many it opened and in how many seconds."""
    import signal

    held: list[socket.socket] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    opened, began = 0, time.monotonic()
    print("flooding", flush=True)
    while not stop.is_set():
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=1))
        except OSError:
            continue
        opened += 1
        if len(held) > 64:
            held.pop(0).close()
    print(opened, time.monotonic() - began, flush=True)


def child(sizes: list[int], trials: int, timeout: float) -> None:
    logging.disable(logging.WARNING)  # the front's "refused a connection" lines
    for ranks in sizes:
        for flooded in (False, True):
            for _ in range(trials):
                print(json.dumps(trial(ranks, timeout, flooded)), flush=True)


def run(python: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    cmd = [python, __file__, "--child", "--ranks", args.ranks, "--trials", str(args.trials)]
    out = subprocess.run([*cmd, "--timeout", str(args.timeout)], capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="8,12,16,31", help="ranks but rank 0 (all dialing), comma-separated")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=10.0, help="each rank's (a failed trial takes it)")
    parser.add_argument("--against-python", help="another checkout's python (its venv's editable gpupool)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--flood-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_port:
        flood(args.flood_port)
        return
    sizes = [int(n) for n in args.ranks.split(",")]
    if args.child:
        child(sizes, args.trials, args.timeout)
        return
    rows = [("branch", sys.executable)] + ([("base", args.against_python)] if args.against_python else [])
    results = {name: run(python, args) for name, python in rows}
    head = ("checkout", "ranks", "flood", "formed", "median s", "worst s", "closed", "conn/s")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (9, 6, 6, 7, 9, 8, 7, 7), strict=True)))
    for ranks in sizes:
        for flooded in (False, True):
            for name, _ in rows:
                got = [r for r in results[name] if r["ranks"] == ranks and r["flood"] == flooded]
                ok = [r["seconds"] for r in got if r["formed"]] or [float("nan")]
                formed = f"{sum(r['formed'] for r in got)}/{len(got)}"
                print(
                    f"{name:>9} {ranks:>6} {'yes' if flooded else 'no':>6} {formed:>7} {statistics.median(ok):>9.3f}"
                    f" {max(ok):>8.3f} {statistics.median(r['closed'] for r in got):>7.1f}"
                    f" {statistics.median(r['rate'] for r in got):>7.0f}"
                )


if __name__ == "__main__":
    main()
