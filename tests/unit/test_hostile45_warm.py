"""Round 45 (hostile45): a daemon's warm-up loads what a session's first elementwise op would load on its clock.

The meta kernels of torch's Python references (`add.Tensor`'s, every elementwise op's: `server/sizing.py` sizes an
op with them) import torch._dynamo at their first call: 1-8 s on this box. The zygote imported it for process
workers; `--isolation thread` ran `CommandExecutor.warm_up` only, which did not, so the first such op of any
session held the device's thread that long while every other session on the device waited (a neighbour's round
trip of a tiny add measured 3.9-21 s at load 20-30 on f47ac67; bench-free probe in BENCHMARKS.md "Round 45,
hostile45"). Now `warm_up` imports it and runs an elementwise meta kernel. On f47ac67 this fails: torch._dynamo is
not loaded after the warm-up, and the first `add.Tensor` sized loads it."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
from gpupool.server import slices
from gpupool.server.executor import CommandExecutor
import torch
ex = CommandExecutor(slices.SliceLedger())
ex.warm_up()
warm = "torch._dynamo" in sys.modules
before = set(sys.modules)
one = torch.ones(3, 2)
for op in (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor, torch.ops.aten.sub.Tensor, torch.ops.aten.div.Tensor):
    ex.sizer.new_bytes(op, [one, one], {})
print(json.dumps({"warm": warm, "loaded_by_ops": sorted(set(sys.modules) - before)}))
"""


def test_warm_up_loads_what_the_first_elementwise_op_sized_would() -> None:
    """In a fresh interpreter (this process's modules stay as they are): after `warm_up`, torch._dynamo is loaded and
    sizing the first elementwise ops imports no module at all."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"warm": True, "loaded_by_ops": []}, got
