"""The DDP example end to end: `gpupool up --fake-gpus 2`, then
`gpupool run -n 2 -- torchrun --nproc-per-node 2 examples/ddp/train.py`; with the same global batch, the
parameters after K steps equal a single-device run (computed here on the CPU) within float tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from scheduler_fixtures import ROOT, Proc

from examples.ddp import train

STEPS = 3
GLOBAL_BATCH = 16


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[str]:
    proc = Proc(
        ["up", "--fake-gpus", "2", "--fake-gpu-memory", "512MiB", "--scheduler-listen", "127.0.0.1:0",
         "--listen", "127.0.0.1:0", "--state", str(tmp_path / "state" / "scheduler.db"),
         "--metrics-listen", "127.0.0.1:0", "--scheduler-metrics-listen", "127.0.0.1:0"]
    )  # fmt: skip
    try:
        yield proc.wait_for(r"export GPUPOOL_SCHEDULER=(\S+)", timeout=120).group(1)
    finally:
        proc.stop()


def run_ddp(scheduler: str, ranks: int, out: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "-n", str(ranks), "--",
           sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           str(ROOT / "examples" / "ddp" / "train.py"), "--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH),
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPUPOOL_SCHEDULER": scheduler, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_two_ranks_train_like_one_device(pool: str, tmp_path: Path) -> None:
    out = tmp_path / "ranks2.pt"
    done = run_ddp(pool, 2, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "joined the daemons' group" in done.stderr
    got = torch.load(out)
    reference = train.train(torch.device("cpu"), STEPS, GLOBAL_BATCH, 0.05, 0, rank=0, world=1).state_dict()
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    initial = train.build_model(0).state_dict()
    assert any(not torch.equal(got[k], initial[k]) for k in initial)  # it trained (a test that can fail)
