"""A short, deterministic slice of scripts/fuzz_native.py (the fuzz of the C++ paths that read a client's bytes,
native_runner.cpp), in-process: its `parsers` mode (the frame readers `eager_frame`, `eager_records` and
`split_frame` against upb's parse and the Python reading; `free` against `WorkerSession.free` on an identical
session, on structure-aware and damaged Free messages; an upload split at every byte) and its `runs` mode (a
recorded training stream whose uploads and frees among the records are damaged, split into chunks, or inserted, run
by the native runner, the Python path and every command on its own: the three agree on everything a client can
observe). Under AddressSanitizer and UBSan through scripts/fuzz_native.sh (longer runs, other seeds) or
scripts/runner_asan.sh (this file among the others).

Pins behaviour that holds on the base for its fixed seed (the campaign's one finding, a zero-element upload shape
refused in different words with the runner on and off, has its own test in test_server_native_upload.py: BENCHMARKS.md
"Round 41, fuzz41"); it fails where a reader accepts bytes its reference reads otherwise, or the runner's uploads and
frees among a run's records leave a session in another state than the plain path."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import fuzz_native  # noqa: E402

sys.path.remove(str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("GPUPOOL_RUNNER_FUZZ_RECORDINGS")  # (scripts/runner_asan.sh's folder of recordings)
    if given:
        return Path(given) / "tiny-mlp.json"
    out = tmp_path_factory.mktemp("recording") / "tiny-mlp.json"
    cmd = [sys.executable, str(ROOT / "bench" / "eager_replay.py"), "--dump", "tiny-mlp", str(out), "--steps", "4"]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300)
    return out


def _args(seed: int, inputs: int, recording: Path) -> argparse.Namespace:
    return argparse.Namespace(seed=seed, seconds=1e9, inputs=inputs, skip=0, recording=[str(recording)])


def test_parsers_agree_with_their_references(native_runner_module: Any, recording: Path) -> None:
    counts = fuzz_native.parsers(_args(41, 2000, recording), native_runner_module)
    print(dict(counts))
    assert counts["inputs"] == 2000
    # the slice reached each reader's accepting and refusing sides
    assert counts["frame:parsed"] > 200 and counts["frame:refused"] > 200, counts
    assert counts["free:freed"] > 30 and counts["free:error"] > 30 and counts["free:left"] > 10, counts
    assert counts["upload splits"] > 100, counts  # an upload split at every byte (and pairs of bytes), N and P alike


def test_damaged_uploads_and_frees_among_records_run_alike(native_runner_module: Any, recording: Path) -> None:
    counts = fuzz_native.runs(_args(41, 10, recording), native_runner_module)
    print(dict(counts))
    assert counts["frames"] >= 10 and counts["native records"] > 0, counts
    # uploads and frees ran inside the runner's runs (`Ctx::between`), and some frames met errors
    assert counts["between in native runs"] > 0 and counts["slices with errors"] > 0, counts
