"""The worker's cyclic collector after its setup (server/worker.py `settle_gc`): the setup's objects are kept out of
full collections, and garbage cycles made afterwards are still collected (a session that makes them for hours must
not grow). Run in a fresh interpreter: freezing is for the life of a process."""

from __future__ import annotations

import json
import subprocess
import sys

PROGRAM = r"""
import gc, json
import torch
from gpupool.server import executor, worker

torch.set_grad_enabled(False)
before = len(gc.get_objects())
worker.settle_gc()
frozen = gc.get_freeze_count()
live = [0]

class Node:
    def __init__(self):
        live[0] += 1
        self.other = self  # a reference cycle: only the cyclic collector frees it

    def __del__(self):
        live[0] -= 1

most = 0
for i in range(300_000):
    Node()
    most = max(most, live[0])
print(json.dumps({"before": before, "frozen": frozen, "most": most, "enabled": gc.isenabled(),
                  "tracked": len(gc.get_objects())}))
"""


def test_setup_objects_are_frozen_and_later_cycles_are_still_collected() -> None:
    out = subprocess.run([sys.executable, "-c", PROGRAM], check=True, capture_output=True, text=True, timeout=300)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["enabled"]
    assert r["frozen"] >= r["before"] * 0.9 > 50_000  # torch's objects: out of every later collection
    assert r["most"] < 20_000  # of 300k cycles made, never more than a few collections' worth alive at once
    assert r["tracked"] < 20_000  # what a collection scans now: not the setup's objects
