"""Two first uses of the C++ client at once on an empty cache (two `gpupool run`s starting together), this checkout
against another (`--against DIR`, its .venv), side by side in one run: how many of them build, how many compiler
calls they make, and the CPU time of the two processes and everything they started (compilers included). Then the
same with the first process killed (SIGKILL) while it compiles: how long until no process of its build is left (30 s
at most), and how many are left then.

The compiler is $CXX (default c++) through a wrapper that counts its compile calls (`-c`); `--source tiny` builds a
one-line source in place of native_client.cpp (seconds), `--source real` the C++ client itself (1-2 min of CPU a
build).

    nice python bench/concurrent_builds.py --against /work/wt/base --source real
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUILD = """
import sys
from pathlib import Path
from gpupool.client.native import build
if sys.argv[1] != "real":
    build.SOURCE = Path(sys.argv[1])
print(build.build(retry_failed=True), flush=True)
"""


def _naming(folder: Path) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(folder).encode() in cmdline and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def side(python: str, source: str, tmp: Path, kill: bool) -> dict[str, object]:
    calls = tmp / "calls"
    cxx = tmp / "cxx"
    real = shutil.which(os.environ.get("CXX", "c++")) or "c++"
    cxx.write_text(f'#!/bin/sh\ncase " $* " in *" -c "*) echo c >> {calls} ;; esac\nexec {real} "$@"\n')
    cxx.chmod(0o755)
    cache = tmp / "cache"
    env = {**os.environ, "GPUPOOL_NATIVE_CLIENT_CACHE": str(cache), "CXX": str(cxx)}
    start = [python, "-c", BUILD, source]
    procs = [subprocess.Popen(start, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    if kill:
        while not calls.exists():  # the first one compiles
            time.sleep(0.05)
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
        t0 = time.monotonic()
        while _naming(tmp) and time.monotonic() < t0 + 30:
            time.sleep(0.05)
        gone = time.monotonic() - t0
        left = _naming(tmp)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        return {"all gone after s": round(gone, 2) if not left else None, "left after 30 s": len(left)}
    procs.append(subprocess.Popen(start, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    errs = [p.stderr.read() if p.stderr else "" for p in procs]
    for p in procs:
        p.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "exit": [p.returncode for p in procs],
        "building": sum(e.count("gpupool: building the native client") for e in errs),
        "compiles": len(calls.read_text().splitlines()) if calls.exists() else 0,
        "cpu_s": round(cpu, 1),
        "libraries": len(list(cache.rglob("gpupool_native_client.so"))),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default="", metavar="DIR")
    p.add_argument("--against-python", default="")
    p.add_argument("--source", default="tiny", choices=("tiny", "real"))
    p.add_argument("--kill-only", action="store_true", help="the killed builder alone")
    args = p.parse_args()
    sides = [("this", sys.executable)]
    if args.against:
        sides.append(("base", args.against_python or str(Path(args.against) / ".venv/bin/python")))
    load0 = os.getloadavg()[0]
    for kill in (True,) if args.kill_only else (False, True):
        for name, python in sides:
            with tempfile.TemporaryDirectory(prefix="concurrent-builds-") as tmp:
                source = "real"
                if args.source == "tiny":
                    source = str(Path(tmp) / "tiny.cpp")
                    Path(source).write_text('extern "C" int gpupool_probe() { return 1; }\n')
                got = side(python, source, Path(tmp), kill)
            print(f"{'killed' if kill else 'two at once':12} {name:5} {got}", flush=True)
    print(f"load {load0:.1f} -> {os.getloadavg()[0]:.1f}; source {args.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
