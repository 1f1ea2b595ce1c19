"""The fixed cost of a medium transfer (64 KiB - 4 MiB): CPU milliseconds a transfer on each end, in a tight loop.

`daemon_wire.py --sweep` scans /proc for the daemon's process tree between every two transfers (milliseconds at load),
so the transfer after each scan runs cold and its small-size CPU figures are inflated (BENCHMARKS.md, round 52). Here
each session times --reps transfers of a size back to back, one scan before and one after the loop: per transfer, the
client process's CPU (all its threads) and the daemon's process tree's (its front's reader and writer, the session's
worker), and the wall. An upload is `x.to(dev)` and the synchronize after it (the C++ client; `Session.upload` and
`sync` for the Python one); a download is `.cpu()` (`Session.download`), checked bit-exact once a loop. A size of a
few bytes gives the fixed cost (an upload in the frame and its round trip; a Get answered on the stream).

Each tree runs its own daemon (`gpupool serve --fake-gpus 1 --bulk-listen 127.0.0.1:0`, as `gpupool up` runs it; TLS,
and `--insecure` with --kinds plain) and its own client (a child of its interpreter); with --against the trees
alternate within each round. Medians over --rounds sessions. CPU per transfer is the figure to read on a loaded box.

    cd bench && nice -n 5 ../.venv/bin/python transfer_loop.py --sizes 65536,1048576,4194304 --kinds tls,plain \
        --against /work/wt/base --against-python /work/wt/base/.venv/bin/python [--clients native,python]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import daemon_wire  # noqa: E402 - the daemon starter and the loopback keys live there

CHILD = (
    daemon_wire.CHILD_START
    + r"""
def up(big):
    if client == "native":
        held = big.to(dev)
        torch.gpupool.synchronize()
        return held
    held = session.upload(big)
    session.sync()
    return held

def down(held):
    return held.cpu() if client == "native" else session.download(held)

def drop(held):
    if client == "native":
        return
    session.free([held])

out = {}
for size in sizes:
    big = torch.randint(0, 255, (size,), dtype=torch.uint8)
    for _ in range(3):  # warm: slots, pools, pages
        held = up(big)
        assert torch.equal(down(held), big), f"the {size}-byte round trip is not bit-exact"
        drop(held)
    held = None
    d0, c0, t0 = tree_ns(daemon), time.process_time(), time.perf_counter()
    for _ in range(reps):
        if held is not None:
            drop(held)  # (the C++ client's: freed as the next one's tensor replaces it)
        held = up(big)
    t1, c1 = time.perf_counter(), time.process_time()
    d1 = tree_ns(daemon)
    c1b, t1b = time.process_time(), time.perf_counter()
    for _ in range(reps):
        back = down(held)
    t2, c2 = time.perf_counter(), time.process_time()
    d2 = tree_ns(daemon)
    assert torch.equal(back, big), f"the {size}-byte round trip is not bit-exact"
    drop(held)
    ms = 1e3 / reps
    out[size] = {"up_client": (c1 - c0) * ms, "up_daemon": (d1 - d0) / 1e6 / reps, "up_wall": (t1 - t0) * ms,
                 "down_client": (c2 - c1b) * ms, "down_daemon": (d2 - d1) / 1e6 / reps, "down_wall": (t2 - t1b) * ms}
session.close()
print("LOOP " + json.dumps(out), flush=True)
"""
)


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def _total(runs: list[dict[str, dict[str, float]]], size: int, d: str) -> float:
    """The median over sessions of client + daemon CPU ms a transfer of `size` in direction `d` (up, down)."""
    return statistics.median(r[str(size)][f"{d}_client"] + r[str(size)][f"{d}_daemon"] for r in runs)


def session_figures(
    address: str, token: str, sizes: list[int], reps: int, client: str, daemon_pid: int, python: str,
    cwd: str | None, insecure: bool,
) -> dict[str, dict[str, float]]:  # fmt: skip
    argv = [address, token, ",".join(map(str, sizes)), str(reps), client, str(daemon_pid), str(HERE)]
    got: dict[str, dict[str, float]] = daemon_wire.child_session(CHILD, "LOOP", argv, python, cwd, insecure, client)
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="65536,1048576,4194304", help="bytes a transfer, comma-separated")
    ap.add_argument("--kinds", default="tls", help="tls, plain (--insecure daemons) or both")
    ap.add_argument("--clients", default="native", help="native (the C++ client), python, or both")
    ap.add_argument("--reps", type=int, default=100, help="transfers of each size and direction a session")
    ap.add_argument("--rounds", type=int, default=3, help="sessions of each tree, kind and client (medians)")
    ap.add_argument("--against", help="another checkout, its daemon and client alternating with this one's")
    ap.add_argument("--against-python", default=sys.executable, help="the interpreter that imports --against's")
    args = ap.parse_args()

    sizes = [int(x) for x in args.sizes.split(",")]
    kinds, clients = args.kinds.split(","), args.clients.split(",")
    trees = ["this", "other"] if args.against else ["this"]
    load0 = os.getloadavg()[0]
    figures: dict[str, list[dict[str, dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = daemon_wire.loopback_keys(tmp, True)
        daemons = {}
        try:
            daemon_wire.start_kinds(daemons, key_file, kinds, args.against, args.against_python)
            for i in range(args.rounds):
                for kind, client, tree, address, token, pid, python, cwd in daemon_wire.round_sessions(
                    i, daemons, key, kinds, clients, trees, args
                ):
                    got = session_figures(address, token, sizes, args.reps, client, pid, python, cwd, kind == "plain")
                    figures.setdefault(f"{kind}/{client}/{tree}", []).append(got)
                print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for proc, _ in daemons.values():
                proc.terminate()
                proc.wait(30)
    print(f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}; {args.reps} transfers a size a session, medians of "
          f"{args.rounds} sessions; ms a transfer (CPU: client / daemon tree; wall)")  # fmt: skip
    names = {"this": "branch", "other": "base"}
    print("| kind / client / tree | size | up+Sync CPU client / daemon | up wall | down CPU client / daemon "
          "| down wall |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, runs in figures.items():
        kind, client, tree = name.split("/")
        for size in sizes:
            med = {k: statistics.median(r[str(size)][k] for r in runs) for k in runs[0][str(size)]}
            print(f"| {kind} / {client} / {names[tree]} | {_size(size)} | {med['up_client']:.3f} / "
                  f"{med['up_daemon']:.3f} | {med['up_wall']:.3f} | {med['down_client']:.3f} / "
                  f"{med['down_daemon']:.3f} | {med['down_wall']:.3f} |")  # fmt: skip
    if args.against:
        print("\nbranch / base, client+daemon CPU a transfer:")
        for kind in kinds:
            for client in clients:
                this, other = figures[f"{kind}/{client}/this"], figures[f"{kind}/{client}/other"]
                for size in sizes:
                    row = [f"{d} {_total(this, size, d) / _total(other, size, d):.2f}x" for d in ("up", "down")]
                    print(f"  {kind} / {client} / {_size(size)}: {', '.join(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
