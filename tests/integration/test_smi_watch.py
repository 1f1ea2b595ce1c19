"""`gpupool smi --watch`: a live view of a real pool while a tenant computes on half a fake GPU - its row shows
memory, share, busy % and a non-zero ops/s (rates from two polls of the daemon's Status); and `gpupool smi`'s
"graphs" column: a session's captured graphs' host memory of its `--max-graph-memory` (round 37)."""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def _tenant(pool_env: dict[str, str], script: str, share: str, ready: str) -> Iterator[dict[str, str]]:
    """`gpupool run -n 1 -p SHARE` of a Python `script`, from its first line `ready` until the block's end; yields
    the environment a `gpupool smi` of the pool runs in."""
    env = {**os.environ, **pool_env, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "-n", "1", "-p", share, "--", sys.executable, "-c", script]
    worker = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == ready
        yield env
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def _smi(env: dict[str, str], *args: str) -> list[list[str]]:
    """`gpupool smi ARGS`' tables, as the cells of each line (rich draws a header's bars heavier)."""
    done = subprocess.run([sys.executable, "-m", "gpupool.cli", "smi", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "tenants" in done.stdout, done.stdout
    return [[c.strip() for c in re.split("[│┃]", line) if c.strip()] for line in done.stdout.splitlines()]


def test_watch_shows_a_busy_tenant_with_ops_per_second(pool_env: dict[str, str]) -> None:
    # The tenant is the credential's name: `gpupool up` issues this user a tenant certificate of its own name.
    tenant = getpass.getuser()
    with _tenant(pool_env, WORK, "0.5", "computing") as env:
        table = _smi(env, "--watch", "--interval", "3", "--count", "3")
        rows = [cells for cells in table if len(cells) == 10 and tenant in cells and "%" in cells[-2]]  # tenants row
        assert rows, table
        cells = rows[-1]
        busy, ops = cells[-2], cells[-1]
        assert re.fullmatch(r"\d+\.\d%", busy) and float(busy[:-1]) > 0, cells
        assert float(ops.replace(",", "")) > 0, cells
        assert "0.5" in cells


GRAPH = """
import time, torch
from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2
from gpupool.client.pool import Lease
from gpupool.client.session import Session
lease = Lease.from_env()
s = Session.attach(lease.devices[0].address, lease.devices[0].token)
x = torch.ones(4)
op = device_pb2.Op(name="aten::neg.default", args=[tensor_pb2.Arg(tensor=1)], outputs=[2])
meta = [wire.meta_to_proto(x)]
for g in (1, 2):
    s.define_graph(device_pb2.DefineGraph(graph_id=g, inputs=1, input_meta=meta, ops=[op], outputs=[2]))
s.sync()
print("defined", flush=True)
time.sleep(300)
"""


def test_smi_shows_a_sessions_graph_memory_of_its_limit(pool_env: dict[str, str]) -> None:
    """A session holding two captured graphs: its row's "graphs" cell is their estimated host memory (Status's
    `graph_bytes`, field 52) of the daemon's `--max-graph-memory` (`graph_limit_bytes`, 53: 256 MiB, the default
    `gpupool up` runs with). Before round 37 smi showed neither (quota36 left it)."""
    tenant = getpass.getuser()
    with _tenant(pool_env, GRAPH, "0.25", "defined") as env:
        table = _smi(env)
        header = next(cells for cells in table if "graphs" in cells)
        rows = [cells for cells in table if len(cells) == len(header) and tenant in cells and "0.25" in cells]
        assert rows, table
        used, limit = rows[-1][header.index("graphs")].split("/")
        assert limit == "256.0MiB", rows[-1]
        value, unit = re.fullmatch(r"([0-9.]+)(B|KiB|MiB)", used).groups()  # type: ignore[union-attr]
        assert float(value) > 0 and unit in ("KiB", "MiB"), rows[-1]  # two graphs of one op: ~10-20 KB


def test_watch_into_a_pipe_prints_a_line_an_interval_and_the_logs_new_lines(
    pool_env: dict[str, str], tmp_path: Path
) -> None:
    """`gpupool smi --watch` off a terminal (scripts/demo.sh piped: `| tee`, a CI log, a notebook): a redrawn frame
    shows nothing there until the last one (round 49's walk: the piped demo sat 144-416 s silent while it trained).
    Each interval prints one line of the pool - the busy tenant's memory, busy % and ops/s - while smi still runs, and
    every new line of --log as it comes (not only the last 8 in the final frame); the full view closes it."""
    tenant = getpass.getuser()
    log = tmp_path / "train.log"
    log.write_text("".join(f"step {i}: loss 0.{i}\n" for i in range(20)))
    with _tenant(pool_env, WORK, "0.5", "computing") as env:
        cmd = [sys.executable, "-m", "gpupool.cli", "smi", "--watch", "--interval", "1", "--count", "4"]
        smi = subprocess.Popen([*cmd, "--log", str(log)], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert smi.stdout is not None
            lines = [smi.stdout.readline() for _ in range(21)]  # the log's 20 lines, then the first interval's
            assert smi.poll() is None, lines  # ... while the watch still runs
            with open(log, "a") as f:
                f.write("epoch 1: train loss 0.5\n")
            rest, _ = smi.communicate(timeout=120)
        finally:
            if smi.poll() is None:
                smi.kill()
                smi.wait()
    assert smi.returncode == 0, rest
    assert lines[:20] == [f"step {i}: loss 0.{i}\n" for i in range(20)], lines
    out = "".join(lines) + rest
    assert "epoch 1: train loss 0.5\n" in out, out  # a line the log gained while smi watched
    summaries = [ln for ln in out.splitlines() if re.match(r"\d\d:\d\d:\d\d pool: 1/1 host\(s\) up, 1 GPU\(s\)", ln)]
    assert len(summaries) == 4, out
    busy = re.search(rf"{re.escape(tenant)} on \S+/0: memory \S+/\S+, share 0.5, busy (\d+\.\d)%, ([\d,]+) ops/s",
                     summaries[-1])  # fmt: skip
    assert busy and float(busy[1]) > 0 and int(busy[2].replace(",", "")) > 0, summaries
    assert "tenants" in rest and rest.endswith("╯\n"), rest[-500:]  # the full view once, at the end
