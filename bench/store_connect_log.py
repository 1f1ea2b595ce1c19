"""Bytes a daemon writes to its stderr while one rank's join retries a dead store address (server/collectives.py
`_connect_store`), this checkout against another checkout, side by side in one run.

Each side's `_connect_store` (that checkout's python and gpupool, in a process of its own) tries a closed loopback
port with the group's timeout of 60 s until a stop set after `--seconds`, as a closed session's join does; its
process's stderr is counted (c10d writes each failed TCPStore constructor's error and C++ stack trace there).

    nice -n 10 python bench/store_connect_log.py --against /work/wt/base --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JOIN = """
import inspect, sys, threading, time
from gpupool.server.collectives import _connect_store
stop = threading.Event()
threading.Timer(float(sys.argv[2]), stop.set).start()
start = time.monotonic()
where = "127.0.0.1" if "host" in inspect.signature(_connect_store).parameters else ["127.0.0.1"]  # rounds <= 21: a host
try:
    _connect_store(where, int(sys.argv[1]), 2, 60.0, stop)
except Exception as exc:
    print(f"{time.monotonic() - start:.2f} {type(exc).__name__}", flush=True)
"""


def _side(python: str, tree: Path, port: int, seconds: float) -> tuple[int, int, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([python, "-c", JOIN, str(port), str(seconds)], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=seconds + 120)  # fmt: skip
    return len(done.stderr.encode()), done.stderr.count("[c10d]"), done.stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", type=Path, required=True, help="the other checkout")
    p.add_argument("--against-python", default=sys.executable, help="its python (its venv's)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long the join retries before its session closes")
    a = p.parse_args()
    with socket.socket() as probe:  # a port nobody listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    print(f"{'side':8} {'stderr bytes':>12} {'c10d lines':>10} {'bytes/s':>8}  ended after")
    for name, python, tree in (("this", sys.executable, ROOT), ("against", a.against_python, a.against)):
        n, lines, ended = _side(python, tree, port, a.seconds)
        print(f"{name:8} {n:12} {lines:10} {n / a.seconds:8.0f}  {ended}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
