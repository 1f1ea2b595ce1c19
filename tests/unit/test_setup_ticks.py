"""scripts/setup.sh's quiet pip installs say they are alive: `ticking WHAT COMMAND...` (the function setup.sh runs each
`pip install -q` under) prints what is coming, a line every $GPUPOOL_SETUP_TICK s (30 by default) while the command
runs, and its end with the time it took, and returns the command's status (round 49's walk: pip sat 253 s silent at
load 17, announced as "quiet until done"). The function is setup.sh's own text, run by bash; the command a real one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _ticking(*command: str, tick: str = "0.5") -> tuple[subprocess.CompletedProcess[str], float]:
    script = (REPO / "scripts" / "setup.sh").read_text()
    function = re.search(r"^ticking\(\) \{.*?^\}\n", script, re.MULTILINE | re.DOTALL)
    assert function, "scripts/setup.sh has no ticking() function"
    assert re.search(r"^ticking \"pip: torch.*pip install -q", script, re.MULTILINE), "torch's pip not under ticking"
    assert re.search(r"^ticking \"pip: gpupool.*pip install -q", script, re.MULTILINE), "the project's pip not either"
    env = {**os.environ, "GPUPOOL_SETUP_TICK": tick}
    began = time.monotonic()
    done = subprocess.run(["bash", "-c", function[0] + 'set -euo pipefail\nticking "$@"', "bash", *command],
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    return done, time.monotonic() - began


def test_a_long_quiet_command_gets_a_line_every_tick_and_its_end() -> None:
    done, took = _ticking("pip: something slow", "sleep", "2.2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "setup: pip: something slow (a line every 0.5 s while it works)", lines
    ticks = [ln for ln in lines if re.fullmatch(r"setup: \.\.\. pip: something slow: \d+ s so far", ln)]
    assert 3 <= len(ticks) <= 5, lines
    assert re.fullmatch(r"setup: pip: something slow: done in \d+ s", lines[-1]), lines
    assert took < 10, took  # the ticker killed mid-sleep holds no pipe open: the output ends with the command


def test_a_failing_command_keeps_its_status_and_says_so() -> None:
    done, _ = _ticking("pip: broken", "bash", "-c", "exit 3", tick="30")
    assert done.returncode == 3, done.stdout
    assert done.stdout.splitlines()[-1].startswith("setup: pip: broken: failed (exit 3) in "), done.stdout


def test_the_demos_setup_installs_the_project_without_devs_tools() -> None:
    """Round 54's fresh-clone walk: the demo's setup spent 7+ min (load 15) pip-installing `.[dev]` (linters, type
    checkers, test runners, selenium, scikit-learn), none of which the demo runs: it asks setup.sh for `.[demo]`
    (flask, for --web); setup.sh's own default stays dev (scripts/test.sh). setup.sh's lines, run by bash, with
    `ticking` saying what it would run."""
    script = (REPO / "scripts" / "setup.sh").read_text()
    lines = re.search(r"^extras=.*\nticking \"pip: gpupool.*\\\n.*\n", script, re.MULTILINE)
    assert lines, "scripts/setup.sh: no `extras=` before the project's pip install"
    demo = (REPO / "scripts" / "demo.sh").read_text()
    assert "GPUPOOL_SETUP_EXTRAS=demo bash scripts/setup.sh" in demo

    def installs(**env: str) -> str:
        given = {k: v for k, v in os.environ.items() if k != "GPUPOOL_SETUP_EXTRAS"} | env
        done = subprocess.run(["bash", "-c", 'ticking() { echo "$1 | ${*: -2}"; }\n' + lines[0]], env=given,
                              capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        return done.stdout.strip()

    assert installs(GPUPOOL_SETUP_EXTRAS="demo") == "pip: gpupool and its demo extras | -e .[demo]"
    assert installs() == "pip: gpupool and its dev extras | -e .[dev]"
    assert installs(GPUPOOL_SETUP_EXTRAS="") == "pip: gpupool | -e ."
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["demo"] == ["flask>=3"] and "flask>=3" in extras["dev"]


def test_the_demos_setup_leaves_the_python_clients_native_pieces_to_their_first_use() -> None:
    """Round 56's fresh-clone walk: the demo's setup built the Python client's device guard and op path (90 s at load
    13-14), which the demo, on `gpupool run`'s C++ client, never loads: it passes GPUPOOL_SETUP_SHIM=0, and setup.sh's
    step says so instead (the capture guard, both clients', is still built). setup.sh's own step, run by Python."""
    demo = (REPO / "scripts" / "demo.sh").read_text()
    assert "GPUPOOL_SETUP_SHIM=0 GPUPOOL_SETUP_EXTRAS=demo bash scripts/setup.sh" in demo
    script = (REPO / "scripts" / "setup.sh").read_text()
    step = re.search(r"^GPUPOOL_NATIVE=0 GPUPOOL_NATIVE_OPS=0 python3 - <<'PY'.*?\n(.*?)^PY$", script, re.M | re.S)
    assert step, "scripts/setup.sh: no step building the Python client's native pieces"
    env = {**os.environ, "GPUPOOL_NATIVE": "0", "GPUPOOL_NATIVE_OPS": "0", "GPUPOOL_SETUP_SHIM": "0"}
    done = subprocess.run([sys.executable, "-"], input=step[1], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        "setup: the Python client's native device guard and op path: built at its first use (GPUPOOL_SETUP_SHIM=0)"
    ), lines
    assert not [ln for ln in lines if ln.startswith(("setup: native device guard:", "setup: native op path:"))], lines
    assert lines[-1].startswith("setup: capture guard check: "), lines
