"""Every scripts/*.sh answers --help (and -h) with its header (what it does, its options) and runs nothing (round 48,
warts48: `scripts/runner_asan.sh --help` started the whole sanitized build and test run; demo.sh, setup.sh, test.sh
installed or started a pool; gen_proto.sh took --help for its output folder).

The scripts run with a PATH of bash, sed, dirname alone and PYTHON=/bin/false, so that a script that ignores --help
fails fast (no python, pip or gpupool to find) instead of installing or building anything."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["runner_asan.sh", "fuzz_native.sh", "setup.sh", "demo.sh", "test.sh", "gen_proto.sh", "lint_imports.sh"]


def _bare_path(tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "dirname"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


@pytest.mark.parametrize(("script", "flag"), [(s, "--help") for s in SCRIPTS] + [("runner_asan.sh", "-h")])
def test_script_help_prints_its_header_and_runs_nothing(script: str, flag: str, tmp_path: Path) -> None:
    path = REPO / "scripts" / script
    first = path.read_text().splitlines()[1].removeprefix("# ")
    env = {
        "PATH": _bare_path(tmp_path),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "PYTHON": sys.executable if script == "fuzz_native.sh" else "/bin/false",
        "GPUPOOL_SKIP_APT": "1",
        "GPUPOOL_DEMO_SETUP": "0",
        "RUNNER_ASAN_DIR": str(tmp_path / "asan"),
    }
    proc = subprocess.Popen(
        ["bash", str(path), flag],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{script} {flag} did not end within 60 s (it ran instead of printing help): {out[-2000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-2000:]
    assert out.startswith(first), out[:500]
    assert "--help / -h" in out
    assert not (tmp_path / "asan").exists()  # (runner_asan.sh's work folder: nothing made)
    if script == "fuzz_native.sh":
        assert "--seconds" in out  # (fuzz_native.py's own options follow the header)


def test_lint_imports_says_its_contracts_only() -> None:
    """scripts/lint_imports.sh (scripts/test.sh runs it) prints its contracts and their verdicts: until round 53 a
    fresh clone's import-linter 2.17 put a DeprecationWarning of its --config and a 10-line ASCII logo first."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "lint_imports.sh")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 3 kept, 0 broken." in done.stdout, done.stdout
    assert "Deprecat" not in done.stdout + done.stderr and "╔" not in done.stdout, done.stdout + done.stderr


def test_test_sh_names_each_step_before_it_runs(tmp_path: Path) -> None:
    """Round 55's walk of the README's second command: `bash scripts/test.sh` ran mypy (2-3 min) and the suite (~30
    min on 2 cores) without a word of what ran or how long it takes. Each step is named as it starts, the suite with
    its length (or the arguments that narrow it). The tools are stubs that print what they were asked to run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for stub, does in (("python3", 'echo "RUN python3 $*"'), ("bash", 'echo "RUN bash $*"'), ("diff", "true")):
        (bin_dir / stub).write_text(f"#!/bin/sh\n{does}\n")
        (bin_dir / stub).chmod(0o755)
    for tool in ("env", "mktemp", "rm", "dirname", "sed", "cat"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    bash = shutil.which("bash")
    assert bash is not None
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}

    def steps(*args: str) -> list[str]:
        done = subprocess.run([bash, str(REPO / "scripts" / "test.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.splitlines()

    lines = steps()
    assert lines[0] == "RUN bash scripts/setup.sh", lines
    runs = [i for i, line in enumerate(lines) if line.startswith("RUN ")][1:]
    assert len(runs) == 4 and all(lines[i - 1].startswith("test.sh: ") for i in runs), lines
    assert lines[1].startswith("test.sh: generated code"), lines  # (gen_proto.sh's output goes to a log)
    assert lines[runs[0] - 1] == "test.sh: ruff check ." and "(2-3 min on 2 cores)" in lines[runs[1] - 1], lines
    said = lines[runs[3] - 1]
    assert said.startswith("test.sh: pytest (the whole suite: about 21 min on 2 cores"), said
    assert lines[runs[3]].startswith("RUN python3 -m pytest -q -p no:cacheprovider --durations=30"), lines
    assert steps("tests/unit")[-2] == "test.sh: pytest tests/unit"
