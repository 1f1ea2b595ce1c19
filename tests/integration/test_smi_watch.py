"""`gpupool smi --watch`: a live view of a real pool while a tenant computes on half a fake GPU - its row shows
memory, share, busy % and a non-zero ops/s (rates from two polls of the daemon's Status)."""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import sys

import pytest
from examples_fixtures import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # pool start-up and training: minutes on a loaded box

WORK = """
import time, torch, gpupool.torch as gt
d = gt.device(); x = torch.ones(512, 512, device=d)
end = time.monotonic() + 300
while time.monotonic() < end:
    for _ in range(20):
        x = (x @ x).clamp(-1, 1)
    x.sum().item()
    print("computing", flush=True)  # after each sync: the daemon has run this round's ops
"""


def test_watch_shows_a_busy_tenant_with_ops_per_second(pool_env: dict[str, str]) -> None:
    # The tenant is the credential's name: `gpupool up` issues this user a tenant certificate of its own name.
    tenant = getpass.getuser()
    env = {**os.environ, **pool_env, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "-n", "1", "-p", "0.5", "--", sys.executable, "-c", WORK]
    worker = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "computing"
        done = subprocess.run([sys.executable, "-m", "gpupool.cli", "smi", "--watch", "--interval", "3", "--count",
                               "3"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        table = [[c.strip() for c in line.split("│") if c.strip()] for line in done.stdout.splitlines()]
        rows = [cells for cells in table if len(cells) == 9 and tenant in cells and "%" in cells[-2]]  # tenants row
        assert rows, done.stdout
        cells = rows[-1]
        busy, ops = cells[-2], cells[-1]
        assert re.fullmatch(r"\d+\.\d%", busy) and float(busy[:-1]) > 0, cells
        assert float(ops.replace(",", "")) > 0, cells
        assert "0.5" in cells and "tenants" in done.stdout
    finally:
        worker.terminate()
        worker.wait(timeout=30)
