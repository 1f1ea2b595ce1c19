"""How long a join's own TCPStore client takes to get through its store relay (server/collectives.py `_Relay`) while
another local process floods the relay's port with connects, this checkout against another checkout, side by side
in one run.

Each side (that checkout's python and gpupool, in a process of its own) starts a real TCPStore, a `_Relay` to it,
and a stranger process of `--threads` threads, each looping non-blocking connects to the relay's port (keeping its
last 32 sockets open), as hostrev43 did (round 43): at 127.0.0.1:<port>, or with `--informed` at the relay's own
address (since round 43 a random one of 127.0.0.0/8, which a worker cannot read; a host process can, in
/proc/net/tcp). Once the flood has run `--ramp` s, the join's client (dist.TCPStore through the relay, timeout
60 s: nan when not through) is made and timed; the flood's connects so far are counted.

    nice -n 5 python bench/relay_flood.py --against /work/wt/base --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOOD = """
import collections, socket, sys, threading
host, port, threads = sys.argv[3], int(sys.argv[1]), int(sys.argv[2])
count = [0] * threads
def flood(i):
    held = collections.deque()
    while True:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((host, port))
        count[i] += 1
        held.append(s)
        if len(held) > 32:
            held.popleft().close()
try:  # where round 42's relays listened (tests/unit/test_server_collectives_resolve.py reads this line)
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    print("reached", flush=True)
except ConnectionRefusedError:
    print("refused", flush=True)
for i in range(threads):
    threading.Thread(target=flood, args=(i,), daemon=True).start()
print("flooding", flush=True)
sys.stdin.read()  # until the join is through
print(sum(count), flush=True)
"""

JOIN = """
import socket, subprocess, sys, threading, time
from datetime import timedelta
import torch.distributed as dist
from gpupool.server.collectives import _Relay
master = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False)
upstream = socket.create_connection(("127.0.0.1", master.port), timeout=5)
stop = threading.Event()
relay = _Relay(upstream, stop)
aim = getattr(relay, "host", "127.0.0.1") if sys.argv[4] == "informed" else "127.0.0.1"
flood = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(relay.port), sys.argv[2], aim], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
time.sleep(float(sys.argv[3]))
start = time.monotonic()
try:
    host = getattr(relay, "host", "127.0.0.1")  # round 42's relay: 127.0.0.1
    store = dist.TCPStore(host, relay.port, 2, is_master=False, timeout=timedelta(seconds=60))
    store.set("k", "v")
    took = time.monotonic() - start
except Exception:
    took = float("nan")
connects = flood.communicate("", timeout=60)[0].split()[-1]
stop.set()
relay.done.wait(5)
print(f"{took:.3f} {connects}")
"""


def side(python: str, cwd: Path, threads: int, ramp: float, aim: str) -> tuple[float, int]:
    out = subprocess.run([python, "-c", JOIN, FLOOD, str(threads), str(ramp), aim], cwd=cwd, capture_output=True,
                         text=True, timeout=180, check=True)  # fmt: skip
    took, connects = out.stdout.split()[-2:]
    return float(took), int(connects)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="16,64", help="the flood's thread counts, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="runs a side and thread count (alternating sides)")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds the flood runs before the join connects")
    parser.add_argument("--informed", action="store_true", help="flood the relay's own address, not 127.0.0.1")
    parser.add_argument("--against", type=Path, help="another checkout (e.g. /work/wt/base)")
    parser.add_argument("--against-python", default=sys.executable, help="that checkout's python")
    args = parser.parse_args()
    sides = [("tree", sys.executable, ROOT)]
    if args.against:
        sides.append(("against", args.against_python, args.against))
    for threads in (int(t) for t in args.threads.split(",")):
        took: dict[str, list[float]] = {name: [] for name, _, _ in sides}
        for _ in range(args.runs):
            for name, python, cwd in sides:
                seconds, connects = side(python, cwd, threads, args.ramp, "informed" if args.informed else "loopback")
                took[name].append(seconds)
                print(f"threads {threads} {name}: join {seconds:.3f} s ({connects} connects by the flood)", flush=True)
        summary = ", ".join(
            f"{name} median {statistics.median(v):.3f} s (max {max(v):.3f})" for name, v in took.items()
        )
        print(f"threads {threads}: {summary}", flush=True)


if __name__ == "__main__":
    main()
