"""The sentiment example through a real pool: `gpupool up` (one fake GPU, loopback, port 0), then
`gpupool run -n 1 -p 0.5 -- python examples/sentiment/train.py --device gpupool --epochs 1 --limit 2000`,
then the saved model served through the pool with infer.py, on the real reviews of the subset shipped in the
repository (examples/sentiment/sample)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from examples_fixtures import REPO, pool_env  # noqa: F401 (a fixture)

from examples.sentiment import data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # pool start-up and training: minutes on a loaded box


def test_one_epoch_on_2000_reviews_through_gpupool_then_serve(pool_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    env = {**os.environ, **pool_env}
    out = tmp_path / "model"
    train_cmd = [sys.executable, "-m", "gpupool.cli", "run", "-n", "1", "-p", "0.5", "--",
                 sys.executable, "examples/sentiment/train.py", "--device", "gpupool", "--epochs", "1",
                 "--limit", "2000", "--data", str(data.SAMPLE), "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out), "--no-progress"]  # fmt: skip
    done = subprocess.run(train_cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"epoch 1: train loss [\d.]+ acc [\d.]+ \| test loss [\d.]+ acc [\d.]+", done.stderr)
    results = json.loads((out / "config.json").read_text())["results"]
    assert results["device"].startswith("gpupool")
    assert results["train_reviews"] == results["test_reviews"] == 2000
    (epoch,) = results["history"]
    # one epoch on 2,000 reviews is too little to promise an accuracy; the loss must be a real number that moved
    assert 0.0 < epoch["train_loss"] < 1.0 and 0.0 < epoch["test_loss"] < 1.0 and 0.4 <= epoch["test_acc"] <= 1.0, epoch

    texts = "a wonderful, moving film. i loved it!\nboring, awful and a total waste of time.\n"
    infer_cmd = [sys.executable, "-m", "gpupool.cli", "run", "-n", "1", "-p", "0.25", "--",
                 sys.executable, "examples/sentiment/infer.py", "--device", "gpupool", "--model", str(out),
                 "--json"]  # fmt: skip
    done = subprocess.run(infer_cmd, input=texts, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == texts.splitlines()
    assert all(r["label"] in ("pos", "neg") and 0.0 <= r["p_pos"] <= 1.0 for r in rows)
