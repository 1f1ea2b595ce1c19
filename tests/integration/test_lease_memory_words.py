"""What a user hears where the lease is too small for the sentiment example (round 49, the seed journey), on a real
pool (`gpupool up`, one fake GPU of 8 GiB, loopback; `gpupool run`'s default client), and the live view's last frame
in a log.

Round 48: `gpupool run -n 1 -p 0.25 -- python examples/sentiment/train.py --device gpupool` (the README's model, 2 GiB
of an 8 GiB GPU) ran a whole short epoch on a session whose quota had refused the weights' average at the start, then
died at its first read-back with a 25-line traceback of raw byte counts ("aten::clone: memory quota exceeded: 536870912
bytes requested, 1645501448 used of a 2147483648 byte limit"). Now train.py says it before the model goes to the
device, in one line, with what training needs and what the lease grants, and the `gpupool run` flags that fit; what
its estimate leaves out (a batch's activations) is caught at its first step (one sync), in the same words."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from examples_fixtures import REPO

from examples.sentiment import data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _train(pool_env: dict[str, str], tmp_path: Path, size: list[str], *flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "-n", "1", *size, "--", sys.executable,
           "examples/sentiment/train.py", "--device", "gpupool", "--epochs", "1", "--limit", "200", "--no-progress",
           "--log-every", "0", "--data", str(data.SAMPLE), "--cache-dir", str(tmp_path / "cache"), "--out",
           str(tmp_path / "out"), *flags]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=500, cwd=REPO, env={**os.environ, **pool_env})


def test_a_quarter_gpu_for_the_default_model_is_one_line_before_the_upload(
    pool_env: dict[str, str], tmp_path: Path
) -> None:
    """The README's model (its 2^20-row bigram table) on `-p 0.25` of the 8 GiB fake GPU: exit 2 with one error line
    naming what training needs (2.03 GiB: the weights, their average, Adam's moments) against the 2.00 GiB the lease
    grants, and `-p 0.5 (or -m 3GiB)`; said before the model went to the device (no epoch, no traceback)."""
    ran = _train(pool_env, tmp_path, ["-p", "0.25"])
    assert ran.returncode == 2, ran.stderr[-3000:]
    errors = [ln for ln in ran.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "Traceback" not in ran.stderr, ran.stderr[-3000:]
    assert re.search(
        r"training this model needs at least 2\.03GiB of the device's memory \(520\.\dMiB weights, "
        r"520\.\dMiB their average, 1\.02GiB Adam's moments, \d+KiB gradients; a batch's activations "
        r"besides\), and this lease grants 2\.00GiB \(0\.25 of the GPU's 8\.00GiB\): run it with gpupool "
        r"run -p 0\.5 \(or -m 3GiB\), or train a smaller model \(--bigram-buckets 0",
        errors[0],
    ), errors
    assert "model: ModelConfig" not in ran.stderr and "epoch 1" not in ran.stderr  # (logged once on the device)


def test_what_the_estimate_leaves_out_is_said_at_the_first_step(pool_env: dict[str, str], tmp_path: Path) -> None:
    """A small model whose weights and optimizer state fit a 12 MiB lease but whose batch of 200 reviews does not
    (activations the estimate leaves out): the first step brings the quota's refusal (of a tensor larger than the whole
    quota: at its call since round 50's cuda50, the client's words; else at the sync, the daemon's), said in one line
    with the numbers, the lease's and the flags that fit, then exit 2 (the base: the traceback at the epoch's end)."""
    small = ["--bigram-buckets", "0", "--embed-dim", "32", "--filters", "32", "--batch-size", "200"]
    ran = _train(pool_env, tmp_path, ["-m", "12MiB"], *small)
    assert ran.returncode == 2, ran.stderr[-3000:]
    errors = [ln for ln in ran.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "Traceback" not in ran.stderr, ran.stderr[-3000:]
    assert re.search(r"the device ran out of the lease's memory \(.*memory quota exceeded: \d+ bytes .*12582912 byte "
                     r"limit[^;]*\); training this model needs at least [0-9.]+MiB of the device's memory \(.*\), and "
                     r"this lease grants 12\.0MiB \([0-9.]+ of the GPU's 8\.00GiB\): run it with gpupool run -p 0\.25 "
                     r"\(or -m 16MiB\), or train with a smaller batch \(--batch-size\)", errors[0]), errors  # fmt: skip
    assert "epoch 1:" not in ran.stderr


def test_the_live_views_last_frame_ends_its_line_in_a_log(pool_env: dict[str, str], tmp_path: Path) -> None:
    """`gpupool smi --watch` into a pipe (scripts/demo.sh's output in a log, CI): its last frame ends with a newline,
    so the next line written (the demo's training log) starts a line of its own. rich ends a frame without one off a
    terminal: the round-49 walk's log had "╰───╯2026-12-07 01:44:15,981 INFO examples.sentiment.data: tokenizing"."""
    log = tmp_path / "train.log"
    log.write_text("the training's last line\n")
    env = {**os.environ, **pool_env, "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "gpupool.cli", "smi", "--watch", "--interval", "0.2", "--count", "1"]
    cmd += ["--log", str(log)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert "gpupool devices" in done.stdout and "the training's last line" in done.stdout, done.stdout
    assert done.stdout.endswith("╯\n"), repr(done.stdout[-200:])
