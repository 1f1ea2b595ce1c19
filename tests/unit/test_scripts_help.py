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
