"""Ranks of one host through rank 0's store front (link56), against a real `_StoreFront`
(`collectives._store_master`, over loopback; every connection from 127.0.0.1), each rank proving the group's secret as
a join does (`_prove`; a dial closed before the front's admission dials again after STORE_ATTEMPT_SECONDS, as
`_connect_store`), under this checkout's gpupool and, with `--against-python`, another's (its venv's editable
install: the base). Two cases, `--trials` times each:
- burst N (`--ranks`): N ranks (threads) dial at once, each first dial's proof held until every rank had the front's
  hello (all N in their handshakes at once: what ranks of one host may be); later dials are not held;
- flood: one rank's every dial held between the front's hello and its proof while a stranger on its address opens
  40 connections (faster than one handshake's round trip), until `--timeout`.
Prints per case the trials where every rank was admitted, the median and worst time, and the median number of dials
a trial that the front closed before admitting them (pushed out, or turned away); and first the median time of one
handshake alone (200 one after another: what the keyed hello costs).

    nice -n 5 .venv/bin/python bench/front_one_host.py --ranks 8,12,16,31 --trials 5 \\
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import json
import logging
import select
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from seclink_one_host import arguments, run  # (bench/: the script's own folder)

STRANGERS = 40


class _Held:
    """A socket for `_prove` whose proof (its second send) waits for `ready()`; `replied()` is called before."""

    def __init__(self, sock: socket.socket, replied: Callable[[], None], ready: Callable[[], bool]) -> None:
        self.sock, self.replied, self.ready, self.sends = sock, replied, ready, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def sendall(self, data: bytes) -> None:
        self.sends += 1
        if self.sends == 2:
            self.replied()
            deadline = time.monotonic() + 60
            while not self.ready() and time.monotonic() < deadline:
                time.sleep(0.002)
        self.sock.sendall(data)


def _flood(port: int) -> list[socket.socket]:
    """A stranger's STRANGERS connections to `port`, returned once the front closed all but 8 of them."""
    strangers = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(STRANGERS)]
    closed: set[socket.socket] = set()
    deadline = time.monotonic() + 10
    while len(closed) < STRANGERS - 8 and time.monotonic() < deadline:
        readable, _, _ = select.select([s for s in strangers if s not in closed], [], [], 0.5)
        for s in readable:
            try:
                if s.recv(1) == b"":
                    closed.add(s)
            except OSError:
                closed.add(s)
    return strangers


def trial(ranks: int, timeout: float, flood: bool) -> dict[str, Any]:
    from gpupool.server import collectives
    from gpupool.server.seclink import bind_in

    from gpupool.protocol import COLLECTIVE_PORTS

    key = collectives._front_key("a group's secret")
    master, front = bind_in(
        COLLECTIVE_PORTS,
        lambda port: collectives._store_master("127.0.0.1", port, ranks + 1, timeout, key, COLLECTIVE_PORTS, "x"),
    )
    lock = threading.Lock()
    settled = [0]
    held: list[socket.socket] = []

    def replied() -> None:
        with lock:
            settled[0] += 1
        if flood:
            held.extend(_flood(front.port))

    def join() -> tuple[bool, int]:
        deadline = time.monotonic() + timeout
        closed = 0
        while time.monotonic() < deadline:
            start = time.monotonic()
            sock = socket.create_connection(("127.0.0.1", front.port), timeout=timeout)
            step = _Held(sock, replied, lambda: flood or settled[0] >= ranks) if flood or not closed else sock
            try:
                collectives._prove(step, key, deadline)  # type: ignore[arg-type]
                return True, closed
            except OSError:
                if not flood and not closed and getattr(step, "sends", 0) < 2:
                    with lock:
                        settled[0] += 1  # (closed before the front's hello)
                closed += 1
                time.sleep(max(0.0, start + collectives.STORE_ATTEMPT_SECONDS - time.monotonic()))
            finally:
                sock.close()
        return False, closed

    began = time.monotonic()
    with ThreadPoolExecutor(ranks) as pool:
        out = list(pool.map(lambda _: join(), range(ranks)))
    took = time.monotonic() - began
    for sock in held:
        sock.close()
    front.close()
    del master
    return {"ranks": ranks, "flood": flood, "formed": all(ok for ok, _ in out), "seconds": took,
            "closed": sum(n for _, n in out)}  # fmt: skip


def serial(n: int) -> float:
    """The median seconds of one handshake (connect, `_prove`, the admission), `n` one after another."""
    from gpupool.server import collectives
    from gpupool.server.seclink import bind_in

    from gpupool.protocol import COLLECTIVE_PORTS

    key = collectives._front_key("a group's secret")
    master, front = bind_in(
        COLLECTIVE_PORTS,
        lambda port: collectives._store_master("127.0.0.1", port, 2, 10.0, key, COLLECTIVE_PORTS, "x"),
    )
    took = []
    for _ in range(n):
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", front.port), timeout=10) as sock:
            collectives._prove(sock, key, time.monotonic() + 10)
        took.append(time.perf_counter() - start)
    front.close()
    del master
    return statistics.median(took)


def child(sizes: list[int], trials: int, timeout: float) -> None:
    logging.disable(logging.WARNING)  # the front's "refused a connection" lines
    print(json.dumps({"serial": serial(200)}), flush=True)
    for ranks in sizes:
        for _ in range(trials):
            print(json.dumps(trial(ranks, timeout, False)), flush=True)
    for _ in range(trials):
        print(json.dumps(trial(1, timeout, True)), flush=True)


def main() -> None:
    args = arguments(__doc__, "8,12,16,31", "ranks but rank 0 (all dialing)", "each rank's")
    sizes = [int(n) for n in args.ranks.split(",")]
    if args.child:
        child(sizes, args.trials, args.timeout)
        return
    rows = [("branch", sys.executable)] + ([("base", args.against_python)] if args.against_python else [])
    results = {name: run(python, args, __file__) for name, python in rows}
    for name, _ in rows:  # one handshake alone: what the keyed hello costs
        print(f"{name:>9}: one handshake alone, median of 200: {results[name][0]['serial'] * 1e3:.2f} ms")
        del results[name][0]
    print(f"{'checkout':>9} {'case':>9} {'formed':>7} {'median s':>9} {'worst s':>8} {'closed':>7}")
    for case in [*((n, False) for n in sizes), (1, True)]:
        for name, _ in rows:
            got = [r for r in results[name] if (r["ranks"], r["flood"]) == case]
            ok = [r["seconds"] for r in got if r["formed"]] or [float("nan")]
            label = "flood" if case[1] else f"burst {case[0]}"
            formed = f"{sum(r['formed'] for r in got)}/{len(got)}"
            print(
                f"{name:>9} {label:>9} {formed:>7} {statistics.median(ok):>9.3f} {max(ok):>8.3f}"
                f" {statistics.median(r['closed'] for r in got):>7.1f}"
            )


if __name__ == "__main__":
    main()
