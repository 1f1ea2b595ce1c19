"""tests/conftest.py's check of the thread that runs the tests (`support.ThreadState`): a test that leaves a dispatch
mode entered, grad mode off or another default dtype fails (an error at its teardown, naming what changed), the state
is put back, and the tests after it run as they would have (round 46's final CI: a worker's main thread left with a
TorchDispatchMode-like state by an earlier test failed a later, unrelated test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from thread_state import ThreadState

TESTS = Path(__file__).resolve().parents[1]

LEAKY = """
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Passing(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_a_mode_left_entered():
    Passing().__enter__()


def test_grad_left_off_and_float64():
    torch.set_grad_enabled(False)
    torch.set_default_dtype(torch.float64)


def test_a_key_left_excluded():
    torch._C._dispatch_tls_set_dispatch_key_excluded(torch._C.DispatchKey.ADInplaceOrView, True)


def test_after_them_the_thread_is_as_new():
    C = torch._C
    assert C._len_torch_dispatch_stack() == 0
    assert not C._dispatch_tls_is_dispatch_key_included(C.DispatchKey.Python)
    assert not C._dispatch_tls_is_dispatch_key_excluded(C.DispatchKey.ADInplaceOrView)
    assert torch.is_grad_enabled() and torch.get_default_dtype() == torch.float32


def test_a_mode_entered_and_left():
    with Passing():
        torch.ones(2).add(1)
"""


def test_a_test_that_leaves_the_thread_changed_fails_and_the_next_runs_clean(tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "thread_state", "-p", "no:xdist",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_leaky.py")],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )  # fmt: skip
    out = ran.stdout + ran.stderr
    assert ran.returncode == 1, out[-3000:]
    assert "5 passed, 3 errors" in out, out[-3000:]  # (a test that errs at its teardown passed its call)
    changed = "left the thread running the tests changed"
    assert f"test_a_mode_left_entered {changed}: dispatch_modes: () -> ('Passing',)" in out
    keys = "{ADInplaceOrView, BackendSelect} -> {ADInplaceOrView, BackendSelect, Python, PythonTLSSnapshot}"
    assert f"included: {keys}" in out
    assert f"test_grad_left_off_and_float64 {changed}: grad: True -> False; " in out
    assert "default_dtype: torch.float32 -> torch.float64; put back" in out
    assert f"test_a_key_left_excluded {changed}: excluded: " in out
    assert "ERROR test_leaky.py::test_after_them_the_thread_is_as_new" not in out


def test_the_state_of_this_thread_is_a_fresh_threads() -> None:
    """What the check compares: here (pytest's thread, between tests) the thread-local part is a new thread's."""
    assert ThreadState.now().changes_from(ThreadState.in_fresh_thread(), thread_local_only=True) == ""
    # A new thread's count of torch threads is the last one any thread set (OpenMP's is per thread; torch's new thread
    # takes the process's last `set_num_threads`): an earlier test's in-process daemon under `--isolation thread` set
    # its own threads' (round 52's CI: "threads: 1 -> 2"). This thread's count set again, a new thread's is this one's.
    torch.set_num_threads(torch.get_num_threads())
    with torch.no_grad():
        assert ThreadState.now().changes_from(ThreadState.in_fresh_thread()) == "grad: True -> False"
