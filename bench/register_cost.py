"""A scheduler Register's cost, in-process: a `Core` on a `MemoryStore`, HOSTS hosts of 8 fake GPUs registered one
after another (round 48, warts48: the GPU-UUID binding's check; round 49, sec49: a GPU's physical name,
`capacity.physical_gpu`, computed for every device). `--measure cpu` (the default): CPU time a Register, median of 5;
run it with each tree's Python for A/B:

    /work/wt/base/.venv/bin/python bench/register_cost.py base; .venv/bin/python bench/register_cost.py branch

`--measure instr`: callgrind's instructions a Register (the figure of record on a noisy box), one run of `--hosts`
(default 300 there), this tree's and, with `--against-python PY` (a Python whose `gpupool` is another checkout, e.g.
/work/wt/base/.venv/bin/python), that one's, side by side.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpupool.scheduler.hosts import DeviceSpec
from gpupool.scheduler.leases import Core, CoreConfig
from gpupool.scheduler.store import MemoryStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cgtools import control, valgrind  # noqa: E402


def _register_all(hosts: int, instr: bool = False) -> float:
    core = Core(MemoryStore(), b"k" * 32, CoreConfig(host_timeout=60))
    specs = [[DeviceSpec(i, f"GPU-{h}-{i}", "fake", 1 << 33, True) for i in range(8)] for h in range(hosts)]
    if instr:
        control("--instr=on")
    start = time.process_time()
    for h in range(hosts):
        core.hosts.register(f"h{h}", f"127.0.0.1:{1000 + h % 60000}", specs[h])
    spent = time.process_time() - start
    if instr:
        control("--instr=off")
    return spent


def _instructions(python: str, hosts: int) -> float:
    """Instructions a Register under callgrind, run by `python` (its own `gpupool`)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        cmd = [*valgrind(out), python, __file__, "--inner", "--hosts", str(hosts)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=1800, cwd=tmp)
        m = re.search(r"^totals:\s+(\d+)", out.read_text(errors="replace"), re.M)
        assert m, "no callgrind totals"
        return int(m.group(1)) / hosts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("label", nargs="?", default="this tree")
    parser.add_argument("--hosts", type=int, default=0, help="hosts registered (default: 2000 for cpu, 300 instr)")
    parser.add_argument("--measure", choices=("cpu", "instr"), default="cpu")
    parser.add_argument("--against-python", default="", help="--measure instr: another checkout's Python beside")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # (the process callgrind runs)
    args = parser.parse_args()
    if args.inner:
        _register_all(args.hosts, instr=True)
        return
    if args.measure == "instr":
        hosts = args.hosts or 300
        rows = [(args.label, sys.executable)] + ([("against", args.against_python)] if args.against_python else [])
        for label, python in rows:
            print(f"{label} ({python}): instructions a Register ({hosts} hosts x 8 GPUs): "
                  f"{_instructions(python, hosts):,.0f}", flush=True)  # fmt: skip
        return
    hosts = args.hosts or 2000
    runs = [_register_all(hosts) / hosts * 1e6 for _ in range(5)]
    print(f"{args.label}: us CPU a Register ({hosts} hosts x 8 GPUs), median of 5: "
          f"{statistics.median(runs):.1f} {[round(r, 1) for r in runs]}")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
