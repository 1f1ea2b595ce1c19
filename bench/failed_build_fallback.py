"""What a default `gpupool run` spends choosing its client where the C++ client's build fails (a compiler that fails:
$CXX=false), before leasing: building again each run (every run until round 26; `--client native` still does) against
the remembered failure (client/native/build.py `failed_marker`), side by side in one run, alternating, each a fresh
interpreter (`from gpupool.client.native import build; build.build(retry_failed=...)`, the step client/run.py
`_choose_client` takes; python's start-up included). Wall seconds, medians; a private cache folder of its own.

    python bench/failed_build_fallback.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CODE = """import sys
from gpupool.client.native import build
try:
    build.build(retry_failed=sys.argv[1] == "1")
except build.BuildError:
    pass
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "CXX": "false", "GPUPOOL_NATIVE_CLIENT_CACHE": cache}

        def run(retry: bool) -> float:
            start = time.perf_counter()
            cmd = [sys.executable, "-c", CODE, "1" if retry else "0"]
            subprocess.run(cmd, env=env, capture_output=True, check=True)
            return time.perf_counter() - start

        run(True)  # the first failure: remembered from here on
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.runs):
            for retry in (True, False):
                times[retry].append(run(retry))
    again, remembered = statistics.median(times[True]), statistics.median(times[False])
    print(f"{'builds again (before)':>24} {again:8.3f} s   {' '.join(f'{t:.2f}' for t in times[True])}")
    print(f"{'remembered (now)':>24} {remembered:8.3f} s   {' '.join(f'{t:.2f}' for t in times[False])}")
    print(f"{'ratio':>24} {again / remembered:8.1f}x   (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
