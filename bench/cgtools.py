"""callgrind for the bench scripts: start a program under it, and switch its instrumentation on and off from inside.

The figures of record on this noisy box are instruction counts. A script runs its measured process under
`valgrind(out_file, ...)` (instrumentation off at the start), and the process switches it on around what it counts
(`instrumented()`, or `control("--instr=on")` ... `control("--instr=off")` where the window spans functions).
Outside valgrind `callgrind_control` finds no such process and every call here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any


def valgrind(out_file: object, *more: str) -> list[str]:
    """The command prefix that runs a program under callgrind, instrumentation off until `control` turns it on."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", *more, f"--callgrind-out-file={out_file}"]


def control(*flags: str, pid: int | None = None) -> None:
    """Ask the callgrind that runs `pid` (default: this process) to do each of `flags` (`--instr=on`, `--dump=NAME`)."""
    for flag in flags:
        subprocess.run(["callgrind_control", flag, str(pid or os.getpid())], capture_output=True, check=False,
                       timeout=120)  # fmt: skip


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """callgrind's instrumentation on inside the block."""
    control("--instr=on")
    try:
        yield
    finally:
        control("--instr=off")


def add_against_flags(parser: Any, what: str, measure: bool = True) -> None:
    """--against DIR (`what`: what that checkout runs), --against-python and (with `measure`) --measure cpu|instr: the
    A/B flags of the in-process replays (eager_replay, front_replay, kernel_compare) and cuda_mode_overhead."""
    parser.add_argument("--against", metavar="DIR", help=what)
    parser.add_argument("--against-python", default=sys.executable, help="the python that imports DIR's gpupool")
    if measure:
        parser.add_argument(
            "--measure", choices=("cpu", "instr"), default="cpu", help="thread CPU time or instructions"
        )
