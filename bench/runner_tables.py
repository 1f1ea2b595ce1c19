"""What the session's Python handle tables and tensor objects cost the C++ runner, per op, from a worker's profile.

The eager worker's runner (server/native_runner.cpp `Ctx::run`, `bind_new`, `several`, `free_loop`) keeps a session's
tensors where the Python path (server/sessions.py `WorkerSession`, server/executor.py) keeps them: exact dicts of
Python ints (`tensors`: handle -> tensor object, `_keys`: handle -> storage key, `_storages`: storage key -> [handles,
bytes]), each output wrapped in a Python tensor object. Round 55 (perf55) counted what that costs, as the input of the
design that would move the tables into C++. This reads one worker dump of `bench/daemon_ab.py --profile DIR` (the
largest cg.PID.N of a side's folder is its worker) with `callgrind_annotate --inclusive=yes --tree=caller` and prints,
per op (`--ops`: the ops in the counted window, e.g. 560 for the tiny MLP's 20 steps of 28), the instructions of:

  look-ups     dict look-ups the runner calls (`_PyDict_GetItem_KnownHash`, `_PyDict_Contains_KnownHash`,
               `PyDict_GetItemWithError`, `PyDict_Contains`)
  inserts      `_PyDict_SetItem_KnownHash`, `PyDict_SetItem` from the runner
  pops         `_PyDict_Pop`, `_PyDict_DelItem_KnownHash`, `PyDict_DelItem` from the runner
  key ints     the Python ints the runner makes for keys (`PyLong_FromUnsignedLongLong`, `PyLong_FromVoidPtr`)
  entries      the storage entries' lists (`Entries::take`) and their counts (`PyNumber_Add`) from the runner
  wrap         `THPVariable_Wrap` from the runner: each output's Python tensor object
  unwrap       `THPVariable_dealloc` less the tensor's own release in it (`reset_not_null_` of the TensorImpl from
               `THPVariable_clear`): the Python object's end (its GC untracking, torch's GIL release around the
               release, pybind11's internals), all callers (a freed handle's object dies in `free_loop`)

    python bench/runner_tables.py /tmp/cg/this.tiny-mlp --ops 560
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

RUNNER_SO = "gpupool_native_runner"
KINDS = {
    "look-ups": (
        "_PyDict_GetItem_KnownHash",
        "_PyDict_Contains_KnownHash",
        "PyDict_GetItemWithError",
        "PyDict_Contains",
    ),
    "inserts": ("_PyDict_SetItem_KnownHash", "PyDict_SetItem"),
    "pops": ("_PyDict_Pop", "_PyDict_DelItem_KnownHash", "PyDict_DelItem"),
    "key ints": ("PyLong_FromUnsignedLongLong", "PyLong_FromVoidPtr"),
    "entries": ("Entries::take(", "PyNumber_Add"),
    "wrap": ("THPVariable_Wrap(",),
}
# the runner's callers that read the session's counters (`s.used`, `memory.used`: attribute dicts), not its tables
NOT_TABLES = ("(anonymous namespace)::Fields::", "(anonymous namespace)::Counter::")
LINE = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+([<*>])\s+(\S+?:)?(.*?)(?: \((\d[\d,]*)x\))?(?: \[([^\[\]]*)\])?\s*$")


def _name(function: str) -> str:
    """The function's name without its arguments (`f(int)` -> `f`; C functions as they are)."""
    return function.split("(", 1)[0].strip()


def _blocks(dump: Path) -> list[list[tuple[int, str, str, int, str]]]:
    """The caller tree: blocks of (instructions, '<' or '*', function, calls, object file), a function's callers
    first, then itself (inclusive)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--tree=caller", "--threshold=100", "--auto=no",
                          str(dump)], capture_output=True, text=True, check=True).stdout  # fmt: skip
    blocks: list[list[tuple[int, str, str, int, str]]] = [[]]
    for line in out.splitlines():
        if not line.strip():
            blocks.append([])
            continue
        m = LINE.match(line)
        if m:
            n, mark, _file, function, calls, obj = m.groups()
            count = int((calls or "0").replace(",", ""))
            blocks[-1].append((int(n.replace(",", "")), mark, function, count, obj or ""))
    return [b for b in blocks if b and b[-1][1] == "*"]


def _matches(function: str, symbol: str) -> bool:
    return symbol in function if symbol.endswith("(") else _name(function) == symbol


def breakdown(dump: Path) -> dict[str, tuple[int, int]]:
    """Instructions and calls of each kind (`KINDS`, and `unwrap`) in one worker dump."""
    got = {kind: (0, 0) for kind in (*KINDS, "unwrap")}
    dealloc = released = 0
    for block in _blocks(dump):
        function = block[-1][2]
        for kind, symbols in KINDS.items():
            if any(_matches(function, s) for s in symbols):
                of = [c for c in block[:-1] if RUNNER_SO in c[4] and not c[2].startswith(NOT_TABLES)]
                n, calls = sum(c[0] for c in of), sum(c[3] for c in of)
                got[kind] = (got[kind][0] + n, got[kind][1] + calls)
        if function.startswith("THPVariable_dealloc("):
            dealloc += block[-1][0]
        if "intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reset_not_null_(" in function:
            released += sum(c[0] for c in block[:-1] if c[2].startswith("THPVariable_clear("))
    got["unwrap"] = (dealloc - released, 0)
    return got


def _worker(path: Path) -> Path:
    """`path` itself, or in a folder the largest dump (the session's worker)."""
    if path.is_file():
        return path
    dumps = [d for d in path.glob("cg.*") if d.stat().st_size > 0]
    if not dumps:
        raise SystemExit(f"no callgrind dump in {path}")
    return max(dumps, key=lambda d: d.stat().st_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", nargs="+", type=Path, help="a worker's dump, or a side's folder of them")
    parser.add_argument("--ops", type=int, required=True, help="ops in the counted window")
    a = parser.parse_args(argv)
    for path in a.profiles:
        dump = _worker(path)
        got = breakdown(dump)
        total = sum(n for n, _ in got.values())
        print(f"{dump}: per op (of {a.ops})")
        for kind, (n, calls) in got.items():
            each = f"  {calls / a.ops:5.1f} calls/op, {n / calls:5.0f} each" if calls else ""
            print(f"  {kind:<9} {n / a.ops:7.0f}{each}")
        print(f"  {'all':<9} {total / a.ops:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
