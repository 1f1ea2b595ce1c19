"""What a root worker's private /proc costs at its start (`sandbox.private_proc`: unshare of the mount namespace,
every mount made private, a new proc mounted hidepid=2), side by side with a child that does nothing, in one run.

Each case forks a child (as the zygote forks a worker), which times its part and exits; the parent reports the
median and the fastest microseconds of the part, and of the whole fork-to-exit, over --rounds, the cases
alternating. Also the entries a child's uid sees in /proc after it (its own processes only) against the host's.
Root only.

    sudo python bench/private_proc_cost.py --rounds 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server import sandbox  # noqa: E402


def child(case: str, w: int, uid: int) -> None:
    t = time.perf_counter_ns()
    why = sandbox.private_proc() if case == "private" else ""
    spent = time.perf_counter_ns() - t
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    seen = sum(1 for e in os.listdir("/proc") if e.isdigit())
    os.write(w, f"{spent} {seen} {why}\n".encode())
    os._exit(0)


def run(case: str, uid: int) -> tuple[float, float, int, str]:
    r, w = os.pipe()
    t = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child(case, w, uid)
    os.close(w)
    line = os.read(r, 4096).decode()
    os.waitpid(pid, 0)
    whole = time.perf_counter_ns() - t
    os.close(r)
    spent, seen, why = line.rstrip("\n").split(" ", 2)
    return int(spent) / 1e3, whole / 1e3, int(seen), why


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--uid", type=int, default=2_000_065_000, help="a uid of no account for the children")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("root only")
    got: dict[str, list[tuple[float, float, int, str]]] = {"none": [], "private": []}
    for _ in range(args.rounds):
        for case in got:
            got[case].append(run(case, args.uid))
    print(f"{'case':8} {'part us med':>12} {'min':>8} {'fork..exit us med':>18} {'min':>8} {'/proc pids seen':>16}")
    for case, rows in got.items():
        part = [r[0] for r in rows]
        whole = [r[1] for r in rows]
        seen = statistics.median(r[2] for r in rows)
        print(f"{case:8} {statistics.median(part):12.1f} {min(part):8.1f} {statistics.median(whole):18.1f} "
              f"{min(whole):8.1f} {seen:16.0f}  {rows[-1][3]}")  # fmt: skip
    ratio = statistics.median(r[1] for r in got["private"]) / statistics.median(r[1] for r in got["none"])
    print(f"fork..exit private / none: {ratio:.2f}x")


if __name__ == "__main__":
    main()
