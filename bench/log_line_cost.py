"""What one log line costs the program that logs it, with the daemon's and the scheduler's logging
(`setup_logging(background=True)`: gpupool/logsink.py's `BackgroundStderr` and `StderrPump`): this checkout against
another, side by side in one run (round 41: the pump became a process, and a log line is written to its pipe from the
logging call).

Each side logs `--lines` lines in a child process, its stderr a file, `--rounds` times, and prints the medians of the
wall time of a log call and of the child's CPU (user + system) a line; the pump's own work (a thread of the child on
the base, a process of its own since round 41) is not in the child's CPU since round 41.

    nice -n 5 .venv/bin/python bench/log_line_cost.py --against /work/wt/base \\
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, logging, resource, sys, time
from gpupool import logsink
from gpupool.config import setup_logging
setup_logging("cost", background=True)
log = logging.getLogger("cost")
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
n = int(sys.argv[1])
t, c = time.perf_counter(), cpu()
for i in range(n):
    log.info("line %d of the log cost bench", i)
wall, used = time.perf_counter() - t, cpu() - c
if logsink.PUMP is not None:
    logsink.PUMP.drain(30)
print(json.dumps({"wall us/line": wall / n * 1e6, "CPU us/line": used / n * 1e6}))
"""


def _once(python: str, checkout: Path, lines: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    with tempfile.TemporaryFile() as err:
        out = subprocess.run(
            [python, "-c", CHILD, str(lines)], cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=err, check=True
        ).stdout
        err.seek(0)
        got = sum(1 for _ in err)
    if got != lines:
        raise SystemExit(f"{checkout}: {got} of {lines} lines reached stderr")
    return json.loads(out)  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", type=Path, required=True, help="the other checkout")
    p.add_argument("--against-python", default=sys.executable, help="its python (its venv's)")
    p.add_argument("--lines", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"this": [], "against": []}
    for _ in range(a.rounds):  # (alternating: the load changes the same way for both)
        runs["this"].append(_once(sys.executable, ROOT, a.lines))
        runs["against"].append(_once(a.against_python, a.against, a.lines))
    keys = list(runs["this"][0])
    rows = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
    print(f"{'':>10} " + " ".join(f"{k:>13}" for k in keys))
    for name, row in rows.items():
        print(f"{name:>10} " + " ".join(f"{row[k]:13.1f}" for k in keys))
    print(f"{'ratio':>10} " + " ".join(f"{rows['this'][k] / rows['against'][k]:13.2f}" for k in keys))


if __name__ == "__main__":
    main()
