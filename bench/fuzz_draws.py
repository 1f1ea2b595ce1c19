"""The CPU seconds test_daemon_fuzz.py spends drawing its examples (hypothesis, the test's settings, no daemon): this
checkout against another, alternating, with a digest of the frames drawn (the test's draws are not reproducible run
to run even with derandomize, so equal digests are not expected; the counts are).

    nice python bench/fuzz_draws.py --against /work/wt/base --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import hashlib, sys, time
sys.path[:0] = [sys.argv[1] + "/tests", sys.argv[1] + "/tests/integration"]
from hypothesis import HealthCheck, given, settings, strategies as st
import test_daemon_fuzz as F
h, n = hashlib.sha256(), [0]
@settings(max_examples=F.EXAMPLES, deadline=None, derandomize=F.DERANDOMIZE, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(F.frames(), min_size=1, max_size=4))
def fuzz(plans):
    n[0] += 1
    for p in plans:
        h.update(F.frame_bytes(p, (7 + n[0]) << 32))
t = time.process_time()
fuzz()
print(n[0], h.hexdigest()[:12], time.process_time() - t)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--against", required=True, help="the other checkout")
    p.add_argument("--against-python", required=True, help="a Python whose gpupool is that checkout")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    here = str(Path(__file__).resolve().parents[1])
    sides = {"other": (a.against_python, a.against), "this": (sys.executable, here)}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(a.rounds):
        for name, (python, repo) in sides.items():
            out = subprocess.run([python, "-c", CHILD, repo], capture_output=True, text=True, check=True).stdout.split()
            cpu[name].append(float(out[2]))
            print(f"{name:5} examples {out[0]} digest {out[1]} cpu {float(out[2]):.2f} s", flush=True)
    m = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"median cpu s: other {m['other']:.2f}  this {m['this']:.2f}  this/other {m['this'] / m['other']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
