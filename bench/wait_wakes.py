"""How two waits of round 38 wake, this checkout against another's python in one run (`--against-python`): a
reader waiting for the host's queued-bytes room (`fairqueue.HostQueued`: blocked 1 s, then another device's queue
frees the room) and a builder waiting for a cache folder's build lock (`buildcache.exclusive`: a holder process that
lets go after 1 s). Printed per side: the reader's wake-ups in its wait, and how long after the release each waiter
had what it waited for (medians of --rounds).

    nice -n 5 .venv/bin/python bench/wait_wakes.py --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOLD = """
import sys, time
from pathlib import Path
from gpupool import buildcache
with buildcache.exclusive(Path(sys.argv[1]), time.monotonic() + 5, "late"):
    print("held", flush=True)
    sys.stdin.readline()
print(time.perf_counter(), flush=True)  # (the lock dropped just before)
sys.stdin.readline()
"""


def host_room() -> tuple[int, float]:
    from gpupool.server.fairqueue import FairQueue, HostQueued

    mib = 1 << 20
    host = HostQueued(4 * mib)
    q0, q1 = FairQueue(host=host), FairQueue(host=host)
    a, b = q0.add("a", 1.0), q1.add("b", 1.0)
    q0.put(a, ["op"], 4 * mib)
    q0.put(a, ["op"], 4 * mib)
    q1.put(b, ["op"], 4 * mib)
    woke = [0]
    real = q1._cond.wait

    def counted(timeout: float | None = None) -> bool:
        woke[0] += 1
        return real(timeout)

    q1._cond.wait = counted  # type: ignore[method-assign]
    done: list[float] = []
    t = threading.Thread(target=lambda: done.append(q1.put(b, ["op"], mib) and time.perf_counter()))
    t.start()
    time.sleep(1.0)
    t0 = time.perf_counter()
    q0.take(1)
    t.join()
    return woke[0], (done[0] - t0) * 1e3


def build_lock() -> float:
    from gpupool import buildcache

    with tempfile.TemporaryDirectory() as tmp:
        h = subprocess.Popen(
            [sys.executable, "-c", HOLD, tmp], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert h.stdin is not None and h.stdout is not None and h.stdout.readline().strip() == "held"
        got: list[float] = []

        def wait() -> None:
            with buildcache.exclusive(Path(tmp), time.monotonic() + 60, "late"):
                got.append(time.perf_counter())

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(1.0)
        h.stdin.write("go\n")
        h.stdin.flush()
        released = float(h.stdout.readline())
        t.join()
        h.stdin.write("end\n")
        h.stdin.flush()
        h.wait()
        return (got[0] - released) * 1e3


def measure(rounds: int) -> dict[str, float]:
    rooms = [host_room() for _ in range(rounds)]
    locks = [build_lock() for _ in range(rounds)]
    return {
        "host_room_wakeups": statistics.median(r[0] for r in rooms),
        "host_room_ms": statistics.median(r[1] for r in rooms),
        "build_lock_ms": statistics.median(locks),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--against-python", default="")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.json:
        print(json.dumps(measure(args.rounds)))
        return 0
    import os

    load0 = os.getloadavg()[0]
    sides = {"this": measure(args.rounds)}
    if args.against_python:
        out = subprocess.run([args.against_python, __file__, "--json", "--rounds", str(args.rounds)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        sides["base"] = json.loads(out.stdout.splitlines()[-1])
    print(f"medians of {args.rounds}; load {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    for name, got in sides.items():
        print(f"{name:5} " + "  ".join(f"{k} {v:.2f}" for k, v in got.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
