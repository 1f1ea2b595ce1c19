"""What the lease reaper costs while sessions are open, this checkout against another's python in one run
(`--against-python`): an in-process daemon (one fake GPU, thread isolation, plaintext loopback) holds --sessions
sessions of an hour's lease, sending nothing, for --seconds; the reaper thread's wake-ups (voluntary context switches,
/proc/self/task/TID/status) and CPU time (/proc/self/task/TID/schedstat, nanoseconds on the CPU) are read before and
after. Printed per side: looks a second and CPU microseconds a look and a second (medians of --rounds). Round 48
(sec48) made the reaper look at least once a second while any session is open (`DaemonConfig.clock_look`); before, at
most every `reap_interval` (10 s). The daemon's --max-sessions is raised to --sessions where it is more (64 by
default); a daemon holds at most 248 sessions however it is configured (each holds a gRPC stream, and
server/service.py serves `MAX_WORKERS - 8` RPCs at once: ResourceExhausted past them), so a look over thousands of
sessions cannot happen (secrev48: a look costs ~1.5 us a session more at load ~20, BENCHMARKS.md "Round 48,
secrev48").

    cd bench && nice -n 5 ../.venv/bin/python reaper_looks.py --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid


def _reaper_counters(tid: int) -> tuple[int, int]:
    """(voluntary context switches, nanoseconds on the CPU) of this process's thread `tid`."""
    with open(f"/proc/self/task/{tid}/status") as f:
        switches = next(int(line.split(":")[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        cpu_ns = int(f.read().split()[0])
    return switches, cpu_ns


def measure(sessions: int, seconds: float) -> dict[str, float]:
    """One round in this process: (looks a second, CPU us a look, CPU us a second) of the reaper."""
    from gpupool.client.session import Session
    from gpupool.server.app import RunningDaemon
    from gpupool.server.daemon import DaemonConfig

    from gpupool import tls, tokens

    os.environ["GPUPOOL_INSECURE"] = "1"  # (the client side of the plaintext loopback daemon: this process only)
    seed = b"reaper-looks-bench"
    config = DaemonConfig(
        listen="127.0.0.1:0",
        host_id="reaper-bench",
        fake_gpus=1,
        token_key=tokens.Verifier([tokens.Signer.from_seed(seed).public]),
        metrics_listen="0",
        tls=tls.TlsConfig(insecure=True),
        isolation="thread",
        max_sessions=max(DaemonConfig.max_sessions, sessions),  # (--max-sessions: a daemon raised to thousands)
    )
    running = RunningDaemon(config)
    held = []
    try:
        for _ in range(sessions):
            claims = tokens.TokenClaims(uuid.uuid4().hex, "reaper-bench", 0, 0, 1.0 / sessions, time.time() + 3600)
            held.append(Session.attach(running.address, tokens.mint(seed, claims)))
        time.sleep(1.0)
        tid = running.daemon._reaper.native_id
        assert tid is not None
        before = _reaper_counters(tid)
        time.sleep(seconds)
        after = _reaper_counters(tid)
    finally:
        for s in held:
            s.close()
        running.stop(grace=1.0, drain=False)
    looks = max(1, after[0] - before[0])
    cpu_us = (after[1] - before[1]) / 1000
    return {"looks_per_s": looks / seconds, "us_per_look": cpu_us / looks, "us_per_s": cpu_us / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=4, help="sessions held open, sending nothing (at most 248)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds measured a round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--against-python", default="", help="another checkout's python: the same rounds there")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # (a child's single round, as JSON)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.sessions, args.seconds)), flush=True)
        return
    sides = {"this": sys.executable}
    if args.against_python:
        sides["against"] = args.against_python
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, python in sides.items():  # (alternating: the box's load falls on both alike)
            cmd = [python, __file__, "--one", "--sessions", str(args.sessions), "--seconds", str(args.seconds)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.sessions} idle sessions, {args.seconds:g} s a round, medians of {args.rounds}:")
    for name, got in rows.items():
        med = {k: statistics.median(r[k] for r in got) for k in got[0]}
        print(
            f"  {name:8s} ({sides[name]}): {med['looks_per_s']:.2f} looks/s, {med['us_per_look']:.0f} us CPU a look, "
            f"{med['us_per_s']:.1f} us CPU a second"
        )


if __name__ == "__main__":
    main()
