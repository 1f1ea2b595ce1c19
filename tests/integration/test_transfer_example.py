"""The transfer-learning example, small, through a real pool: pretrain on digits 0-5 on half a fake GPU, export the
checkpoint, then scratch / frozen features + new head / fine-tune on digits 6-9 from 5 examples each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from examples_fixtures import REPO, pool_env  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # pool start-up and training: minutes on a loaded box


def test_small_transfer_run_through_gpupool(pool_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    pytest.importorskip("sklearn")
    out = tmp_path / "transfer"
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "-n", "1", "-p", "0.5", "--", sys.executable,
           "examples/transfer/transfer.py", "--device", "gpupool", "--pretrain-steps", "60", "--steps", "30",
           "--repeats", "1", "--width", "16", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, **pool_env}, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["device"].startswith("gpupool") and results["novel"] == [6, 7, 8, 9]
    assert results["pretrain_test_acc"] > 0.5  # 60 steps on 6 classes: well above chance (1/6)
    for method in ("scratch", "frozen", "fine-tune"):
        (acc,) = results["accuracy"][method]
        assert 0.25 < acc <= 1.0, (method, acc)  # above chance on 4 classes
    state = torch.load(out / "pretrained.pt", map_location="cpu", weights_only=True)
    assert state["head.weight"].shape == (6, 128)  # the exported base network: 6 classes, 2 x width x 2 x 2 features
    assert "frozen" in done.stdout and "fine-tune" in done.stdout
