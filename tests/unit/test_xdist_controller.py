"""pytest-xdist's controller (scripts/test.sh: `-n 2`) loads tests/conftest.py and calls its hooks, but runs no test:
it starts the workers once those hooks are done. Round 51's conftest imported support.py (torch, grpc, the client and
the daemon's registration) and thread_state.py (torch), and made a CA, in the controller too: 2.4-2.7 s of CPU before
the first worker started, at load 8 (and tests/integration/conftest.py the shim's and the pools' fixtures, where a
run names that folder). Now what only tests use is imported in the processes that run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    # before xdist's own sessionstart starts the workers: what the controller imported, then an end with no worker
    heavy = sorted(m for m in ("torch", "grpc", "support", "thread_state", "gpupool.server", "gpupool.client")
                   if m in sys.modules)
    print("controller-imported", "workerinput" in vars(session.config), heavy, flush=True)
    pytest.exit("probed", returncode=0)
"""


def test_the_xdist_controller_imports_nothing_of_the_tests(tmp_path: Path) -> None:
    (tmp_path / "controller_probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "controller_probe", "-n", "2",
         "--dist", "loadfile", "tests", "tests/integration"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    [line] = [x for x in ran.stdout.splitlines() if x.startswith("controller-imported")]
    assert line == "controller-imported False []", ran.stdout[-3000:]
