"""Scrapes of the metrics endpoint (gpupool/metrics_http.py) while one client holds every connection slot, this
checkout's server against another checkout's, side by side in one run.

Each side's server (`serve_metrics` on loopback, a registry of 50 gauges, run by that checkout's python in a process
of its own) is scraped `--scrapes` times alone, then again while a holder in this process keeps MAX_CONNECTIONS
connections open, each sending one header line every 0.3 s (so no read ever times out) and reopened within 20 ms
of being dropped: a slowloris client. Printed per side: scrapes answered, the median scrape time, and how many holder
connections it reopened (those it saw dropped). Round 20's server closed every connection past its 32 unanswered,
so a holder kept every scrape out; this checkout's gives the oldest connection still sending its request up to a
newcomer. Both sides serve plain HTTP (`serve_metrics` without a TLS config: since round 40 this checkout's logs a
warning saying so), so the slot rule is compared alone; the TLS endpoints' scrapes are bench/metrics_scale.py's.

    nice -n 10 python bench/metrics_hold.py --against /work/wt/base --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOLD = 32  # round 20's MAX_CONNECTIONS (this checkout's too)

SERVER = """
import sys, time
from prometheus_client import CollectorRegistry, Gauge
from gpupool.metrics_http import serve_metrics
r = CollectorRegistry()
for k in range(50):
    Gauge(f"bench_gauge_{k}", "a gauge", registry=r).set(k)
s = serve_metrics("127.0.0.1", 0, r)
print(s.server_port, flush=True)
sys.stdin.read()
"""


def _scrapes(port: int, n: int) -> tuple[int, list[float]]:
    ok, times = 0, []
    for _ in range(n):
        start = time.perf_counter()
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            ok += b"bench_gauge_49" in body
            times.append(time.perf_counter() - start)
        except OSError:
            pass
        time.sleep(0.05)
    return ok, times


def _side(python: str, tree: Path, scrapes: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([python, "-c", SERVER], cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    port = int(proc.stdout.readline())
    try:
        alone, alone_t = _scrapes(port, scrapes)

        def opened() -> socket.socket:
            c = socket.create_connection(("127.0.0.1", port), timeout=2)
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            return c

        conns = [opened() for _ in range(HOLD)]
        stop, dropped = threading.Event(), [0]

        def hold() -> None:
            tick = 0
            while not stop.wait(0.02):  # a dropped connection is seen (readable: its end) and reopened at once
                tick += 1
                readable = set(select.select(conns, [], [], 0)[0])
                for k, c in enumerate(conns):
                    try:
                        if c in readable:
                            raise OSError("dropped")
                        if tick % 15 == 0:
                            c.sendall(b"X-Slow: 1\r\n")
                    except OSError:
                        c.close()
                        dropped[0] += 1
                        try:
                            conns[k] = opened()
                        except OSError:
                            pass

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        time.sleep(1.0)  # every slot is the holder's
        held, held_t = _scrapes(port, scrapes)
        stop.set()
        holder.join()
        for c in conns:
            c.close()
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    med = statistics.median
    return {"alone": alone, "alone_ms": med(alone_t) * 1e3 if alone_t else float("nan"), "held": held,
            "held_ms": med(held_t) * 1e3 if held_t else float("nan"), "dropped": dropped[0]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", type=Path, required=True, help="the other checkout")
    p.add_argument("--against-python", default=sys.executable, help="its python (its venv's)")
    p.add_argument("--scrapes", type=int, default=20)
    a = p.parse_args()
    sides = {"this": _side(sys.executable, ROOT, a.scrapes), "against": _side(a.against_python, a.against, a.scrapes)}
    print(f"{'side':8} {'alone ok':>9} {'alone ms':>9} {'held ok':>8} {'held ms':>8} {'holder reopened':>16}")
    for name, r in sides.items():
        print(f"{name:8} {r['alone']:>6}/{a.scrapes:<2} {r['alone_ms']:9.2f} {r['held']:>5}/{a.scrapes:<2} "
              f"{r['held_ms']:8.2f} {r['dropped']:16}")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
