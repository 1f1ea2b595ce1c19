"""A synced call's system calls and instructions on both ends of the side carrier (round 41, front41): the client's
process and the daemon's front (its process: the side socket's reader and writer, gRPC's threads), this checkout's
against another's, counted rather than timed (exact on the loaded 2-core box).

Each tree runs in a child of its own interpreter (both ends that tree's): a daemon as `gpupool up` runs it
(`gpupool serve --fake-gpus 1 --bulk-listen 127.0.0.1:0`, TLS), one session on its side socket, warmed up, then
--calls calls of a kind, each waited for before the next (a synced step's round trip):
- `sync`: a lone Sync (`Session.sync()`);
- `step`: a captured step of one tiny op and its `.item()` as the shim sends them (bench/item_legs.py's `step`:
  RunGraph and Sync in one frame, the scalar's bytes back).

`--measure syscalls`: `strace -c -f` attached to the client's process and to the front's for the calls only, by
name, per call (EAGAIN returns apart, as name!); idle threads' calls over the window are in it (gRPC's pollers).
`--measure instr`: both processes under callgrind, instrumentation on around the calls only (all threads: what a
call costs each process in all), per call. The session's worker runs outside (its own process, not traced).

    nice -n 5 python bench/call_counts.py [--calls 500] [--kinds sync,step] [--measure syscalls|instr]
        [--against /work/wt/base --against-python /work/wt/base/.venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


SITECUSTOMIZE = """
import sys
if "serve" in sys.orig_argv:
    from gpupool.server import bulkside
    bulkside.HELLO_TIMEOUT = 300.0
"""


def _instr(path: Path) -> int:
    """The instruction total (`totals:`; its `summary:` line is not one when instrumentation was switched) of a
    callgrind output file written at its process's exit (instrumentation was on around the calls only)."""
    m = re.search(r"^totals:\s+(\d+)", path.read_text(errors="replace"), re.M)
    return int(m.group(1)) if m else 0


def child(args: argparse.Namespace) -> int:
    """One tree's figures (this file run by that tree's python, importing its gpupool)."""
    import cgtools
    import daemon_wire
    import torch
    from gpupool.client.session import Session
    from item_legs import _step_graph, _stepper
    from side_reader import syscall_table

    from gpupool import tokens

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        key, key_file = daemon_wire.loopback_keys(tmp, tls=True)
        python = sys.executable
        if args.measure == "instr":
            wrapper = Path(tmp) / "python-cg"
            prefix = " ".join(cgtools.valgrind(Path(tmp) / "front.cg.%p"))  # (%p: a forked child's file is its own)
            wrapper.write_text(f'#!/bin/sh\nexec {prefix} {sys.executable} "$@"\n')
            wrapper.chmod(0o755)
            python = str(wrapper)
        # under callgrind the daemon is slow to answer: its side port's hello deadline (and the client's) longer
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        path_before = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(site), path_before) if x)
        try:
            proc, address = daemon_wire.start_daemon(key_file, "--bulk-listen", "127.0.0.1:0", python=python)
        finally:
            os.environ["PYTHONPATH"] = path_before
        try:
            from gpupool.client import bulk

            bulk.CONNECT_TIMEOUT = 300.0
            claims = tokens.TokenClaims("counts", "bench", 0, 0, 1.0, time.time() + 3600, "bench")
            s = Session.attach(address, tokens.mint(key, claims), timeout=300.0)
            if getattr(s, "_carrier", None) is None:
                raise RuntimeError("the session's frames are not on its side socket")
            scalar = s.upload(torch.ones(()))
            _step_graph(s, 1)
            for kind in args.kinds.split(","):
                call = _stepper(s, kind, 1, scalar)
                for _ in range(200):
                    call()
                tracers: list[subprocess.Popen[bytes]] = []
                files = {part: Path(tmp) / f"{kind}-{part}.out" for part in ("client", "front")}
                pids = {"client": os.getpid(), "front": proc.pid}
                if args.measure == "syscalls":
                    for part, pid in pids.items():
                        cmd = ["strace", "-c", "-f", "-o", str(files[part]), "-p", str(pid)]
                        tracers.append(subprocess.Popen(cmd, stderr=subprocess.DEVNULL))
                    time.sleep(1.5)  # (attached)
                else:
                    for pid in pids.values():
                        cgtools.control("--instr=on", pid=pid)
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    call()
                wall = time.perf_counter() - t0
                figures: dict[str, Any] = {"wall us": round(wall / args.calls * 1e6, 1)}
                if args.measure == "syscalls":
                    for t in tracers:
                        t.send_signal(signal.SIGINT)
                        t.wait(30)
                    for part in pids:
                        figures[part] = syscall_table(str(files[part]), args.calls)
                else:  # (one kind a child: the counts are the files' at each process's exit)
                    for pid in pids.values():
                        cgtools.control("--instr=off", pid=pid)
                out[kind] = figures
            s.close()
        finally:
            proc.terminate()
            proc.wait(120)
        if args.measure == "instr":
            out[args.kinds]["front"] = {"instructions": _instr(Path(tmp) / f"front.cg.{proc.pid}") / args.calls}
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--kinds", default="sync,step", help="comma-separated, of sync,item,step")
    p.add_argument("--measure", choices=("syscalls", "instr"), default="syscalls")
    p.add_argument("--against", metavar="DIR", help="another checkout: its client and daemon, measured alike")
    p.add_argument("--against-python", default=sys.executable)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    trees = {"this": sys.executable}
    if args.against:
        trees["other"] = args.against_python
    results: dict[str, Any] = {}
    load0 = os.getloadavg()[0]
    # under callgrind a child per kind (each process's count is its output file's, written at its exit)
    runs = [args.kinds] if args.measure == "syscalls" else args.kinds.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for name, python in trees.items():
            results[name] = {}
            for kinds in runs:
                cmd = [python, str(HERE / "call_counts.py"), "--child", "--calls", str(args.calls), "--kinds", kinds,
                       "--measure", args.measure]  # fmt: skip
                cg = Path(tmp) / f"{name}-{kinds}-client.cg"
                if args.measure == "instr":
                    import cgtools

                    cmd = [*cgtools.valgrind(f"{cg}.%p"), *cmd]  # (%p: a forked child's file is its own)
                child_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                stdout, stderr = child_proc.communicate()
                if child_proc.returncode:
                    print(stdout[-3000:], stderr[-3000:], file=sys.stderr)
                    return 1
                results[name].update(json.loads(stdout.strip().splitlines()[-1]))
                if args.measure == "instr":
                    count = _instr(Path(f"{cg}.{child_proc.pid}"))
                    results[name][kinds]["client"] = {"instructions": count / args.calls}
    print(f"\na synced call's counts per call, {args.measure} (load {load0:.1f} -> {os.getloadavg()[0]:.1f})")
    for kind in args.kinds.split(","):
        print(f"\n{kind}" + "".join(f"{n:>14}" for n in trees))
        rows = sorted({(part, k) for r in results.values() for part in ("client", "front") for k in r[kind][part]})
        for part, k in rows:
            cells = "".join(f"{results[n][kind][part].get(k, 0):>14.2f}" for n in trees)
            print(f"  {part:<7}{k:<22}" + cells)
        print(f"  {'wall us (instrumented)':<29}" + "".join(f"{results[n][kind]['wall us']:>14.1f}" for n in trees))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
