"""More than 8 ranks of one host joining a secure group's star (sec55a): `--ranks` ranks (threads of one process, so
every connection comes from 127.0.0.1) run `seclink.form` over real loopback sockets, `--trials` times each, under
this checkout's gpupool and, with `--against-python`, another's (its venv's editable install: the base). Prints per
size the groups formed, the median and worst time to form, and the median number of handshakes the hub pushed out.
A group that does not form fails at `--timeout` (the base's rank pushed out between the hub's hello and its proof).

    nice -n 5 .venv/bin/python bench/seclink_one_host.py --ranks 9,12,16,32,64 --trials 7 \\
        --against-python /work/wt/base/.venv/bin/python                                  # ~3 min with the base's
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class _Store:
    """The two calls `seclink.form` makes of the group's store; `get` waits for its key."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.changed = threading.Condition()

    def set(self, key: str, value: str) -> None:
        with self.changed:
            self.values[key] = value.encode()
            self.changed.notify_all()

    def get(self, key: str) -> bytes:
        with self.changed:
            self.changed.wait_for(lambda: key in self.values)
            return self.values[key]


def trial(ranks: int, timeout: float) -> dict[str, Any]:
    from gpupool.server import seclink

    pushed = [0]
    drop = seclink._Hub._drop

    def counted(self: Any, sel: Any, h: Any, why: str) -> None:
        pushed[0] += "pushed out" in why
        drop(self, sel, h, why)

    seclink._Hub._drop = counted  # type: ignore[method-assign]
    store = _Store()
    start = time.monotonic()
    with ThreadPoolExecutor(ranks) as pool:
        joins = [
            pool.submit(seclink.form, store, b"s" * 64, "lease", r, ranks, timeout, "127.0.0.1") for r in range(ranks)
        ]
        out = [j.exception() or j.result() for j in joins]
    took = time.monotonic() - start
    seclink._Hub._drop = drop  # type: ignore[method-assign]
    failed = [str(o) for o in out if isinstance(o, BaseException)]
    for o in out:
        if not isinstance(o, BaseException):
            o.close()
    return {"ranks": ranks, "formed": not failed, "seconds": took, "pushed": pushed[0], "error": failed[:1]}


def child(sizes: list[int], trials: int, timeout: float) -> None:
    logging.disable(logging.WARNING)  # the hub's "refused a collective link" lines
    for ranks in sizes:
        for _ in range(trials):
            print(json.dumps(trial(ranks, timeout)), flush=True)


def run(python: str, args: argparse.Namespace, script: str = __file__) -> list[dict[str, Any]]:
    """`script --child` (this one, or bench/front_one_host.py) under `python`: its JSON lines."""
    cmd = [python, script, "--child", "--ranks", args.ranks, "--trials", str(args.trials)]
    out = subprocess.run([*cmd, "--timeout", str(args.timeout)], capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def arguments(doc: str | None, ranks: str, what: str, timeout: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default=ranks, help=f"{what}, comma-separated")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=10.0, help=f"{timeout} (a failed trial takes it)")
    parser.add_argument("--against-python", help="another checkout's python (its venv's editable gpupool)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = arguments(__doc__, "9,12,16,32", "group sizes", "the group's timeout")
    sizes = [int(n) for n in args.ranks.split(",")]
    if args.child:
        child(sizes, args.trials, args.timeout)
        return
    rows = [("branch", sys.executable)] + ([("base", args.against_python)] if args.against_python else [])
    results = {name: run(python, args) for name, python in rows}
    print(f"{'checkout':>9} {'ranks':>6} {'formed':>7} {'median s':>9} {'worst s':>8} {'pushed out':>11}  first error")
    for ranks in sizes:
        for name, _ in rows:
            got = [r for r in results[name] if r["ranks"] == ranks]
            ok = [r["seconds"] for r in got if r["formed"]] or [float("nan")]
            error = next((r["error"][0] for r in got if r["error"]), "")
            print(
                f"{name:>9} {ranks:>6} {sum(r['formed'] for r in got):>3}/{len(got):<3} {statistics.median(ok):>9.3f} "
                f"{max(ok):>8.3f} {statistics.median(r['pushed'] for r in got):>11.1f}  {error[:70]}"
            )


if __name__ == "__main__":
    main()
