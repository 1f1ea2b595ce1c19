"""What Landlock costs a session worker's start (server/landlock.py `restrict`), in one run, cases alternating:

- part: a child forked from a torch-warm parent (as the zygote forks a worker) sets no_new_privs and applies the
  worker's ruleset, timing `restrict` alone; against a child that does nothing, and with --against the base
  checkout's server/landlock.py `restrict` in the same parent (round 41: /proc/self's entries one rule each);
- whole: a real zygote's worker from `Zygote.spawn` to its first answer (a ping: it is confined, its shared buffer
  mapped, serving), with `landlock=True` against `landlock=False` in one zygote, and with --against a base checkout's
  zygote (its own Python) side by side in the same run.

Also the rules a worker gets (folders and files it may read) and the system calls `restrict` makes (strace -c, where
strace exists). Root only where workers drop their user (the default spec keeps the caller's).

    nice -n 5 .venv/bin/python bench/landlock_cost.py --rounds 40 --against /work/wt/base \
        --against-python /work/wt/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BLOCK = (30100, 30103)  # (round 43) a session's block of the default --collective-ports (server/portshare.py)
sys.path.insert(0, str(ROOT))

SPAWNER = r"""
import json, os, struct, sys, time
sys.path.insert(0, sys.argv[1])
from gpupool.server import slices
from gpupool.server.worker import WorkerSpec
from gpupool.server.zygote import Zygote

def spec(**kw):
    fields = dict(session_id="bench", number=1, device={"index": 0, "uuid": "fake-0", "model": "fake",
                  "memory_bytes": 1 << 30, "fake": True}, quota=64 << 20, max_handles=1000, max_op_flops=0,
                  memory_limit=0, cpu_threads=1, user="", seccomp=True)
    return WorkerSpec(**{**fields, **kw})

z = Zygote()
z.start()
z.wait_ready()
cases = json.loads(sys.argv[2])
for line in sys.stdin:
    kw = cases[int(line)]
    t = time.perf_counter_ns()
    runner = z.spawn(spec(**kw), 1 << 20)
    runner._sock.sendall(slices.PING_REQUEST)
    got = runner._sock.recv(4)
    spent = time.perf_counter_ns() - t
    assert struct.unpack("<I", got)[0] == slices.PONG, got
    runner.close()
    print(spent / 1e3, flush=True)
z.stop()
"""


class Spawner:
    """A process holding a real zygote of the checkout at `root`, spawning a worker per request."""

    def __init__(self, python: str, root: str, cases: list[dict[str, object]]) -> None:
        import json

        self.proc = subprocess.Popen([python, "-c", SPAWNER, root, json.dumps(cases)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=root)  # fmt: skip

    def spawn(self, case: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{case}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)


def _module_at(path: str, name: str) -> Any:
    """server/landlock.py of another checkout (it imports the standard library only), as a module of its own."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def part(rounds: int, against: str = "", network: bool = False) -> dict[str, list[float]]:
    import ctypes
    import inspect

    import torch  # noqa: F401  (a warm parent: torch's modules and libraries, as the zygote's)

    from server import executor, landlock  # noqa: F401

    rules = landlock.read_paths()
    own, listed = landlock.proc_self() if hasattr(landlock, "proc_self") else ([f"/proc/{os.getpid()}"], [])
    print(f"read rules of every worker: {len(rules)} (+ /proc/self: {len(own)} read, {len(listed)} listed; /dev/null)")
    for path in rules:
        print(f"  {path}")
    modules = {"landlock": landlock}
    if against:  # (round 41) the base's restrict in the same parent, cases alternating
        modules["base landlock"] = _module_at(os.path.join(against, "server", "landlock.py"), "base_landlock")
        modules["base landlock"].read_paths()  # (found once in the parent, as the zygote does for its workers)
    got: dict[str, list[float]] = {"none": [], **{name: [] for name in modules}}
    kwargs: dict[str, dict[str, Any]] = {name: {"network": network} for name in modules}
    for name, module in modules.items():  # (round 42) a network worker's TCP port rules: --collective-ports
        if network and "ports" in inspect.signature(module.restrict).parameters:
            from gpupool.protocol import COLLECTIVE_PORTS

            kwargs[name]["ports"] = COLLECTIVE_PORTS
        if network and "own" in inspect.signature(module.restrict).parameters:  # (round 43) its session's block
            kwargs[name]["own"] = BLOCK
    for _ in range(rounds):
        for case in got:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
                t = time.perf_counter_ns()
                if case in modules:
                    applied, missing = modules[case].restrict(gpu=False, **kwargs[case])
                    assert applied, missing
                os.write(w, str(time.perf_counter_ns() - t).encode())
                os._exit(0)
            os.close(w)
            got[case].append(int(os.read(r, 64)) / 1e3)
            os.close(r)
            os.waitpid(pid, 0)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--against", default="", help="a base checkout: its zygote's workers, side by side")
    ap.add_argument("--against-python", default=sys.executable)
    ap.add_argument(
        "--network",
        action="store_true",
        help="a worker granted network: its ruleset (its TCP ports), and (whole) its seccomp filter",
    )
    args = ap.parse_args()
    rows = part(args.rounds, args.against, args.network)
    print(f"{'part':28} {'us med':>10} {'min':>10}")
    for case, xs in rows.items():
        print(f"{case:28} {statistics.median(xs):10.1f} {min(xs):10.1f}")
    net: dict[str, Any] = {"network": True} if args.network else {}
    ours = [{"landlock": True, **net, **({"collective_share": BLOCK} if net else {})}, {"landlock": False, **net}]
    spawners = {"landlock on": (Spawner(sys.executable, str(ROOT), ours), 0)}
    spawners["landlock off"] = (spawners["landlock on"][0], 1)
    if args.against:
        spawners["base"] = (Spawner(args.against_python, args.against, [net]), 0)
    whole: dict[str, list[float]] = {name: [] for name in spawners}
    try:
        for _ in range(args.rounds):
            for name, (sp, case) in spawners.items():
                whole[name].append(sp.spawn(case))
    finally:
        for sp, _ in {id(s): (s, c) for s, c in spawners.values()}.values():
            sp.close()
    print(f"{'spawn to first answer':28} {'us med':>10} {'min':>10} {'ratio to off':>13}")
    off = statistics.median(whole["landlock off"])
    for name, xs in whole.items():
        print(f"{name:28} {statistics.median(xs):10.1f} {min(xs):10.1f} {statistics.median(xs) / off:13.2f}")


if __name__ == "__main__":
    main()
