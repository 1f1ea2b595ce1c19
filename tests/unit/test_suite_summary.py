"""tests/conftest.py's summary at the end of a run (round 54): the test files with the most summed seconds, most
first, and each pytest-xdist worker's busy total; its `--dist loadfile` scheduler's shared work units (round 55)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest


def _conftest() -> ModuleType:
    """tests/conftest.py as a module of its own name (pytest imported it as `conftest`, beside other folders' ones)."""
    spec = importlib.util.spec_from_file_location("suite_conftest", Path(__file__).resolve().parents[1] / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_slowest_files_come_most_first_ties_by_name_cut_at_the_count() -> None:
    slowest = _conftest().slowest
    seconds = {"tests/b.py": 2.0, "tests/a.py": 2.0, "tests/c.py": 9.5, "tests/d.py": 0.1}
    assert slowest(seconds, 3) == [("tests/c.py", 9.5), ("tests/a.py", 2.0), ("tests/b.py", 2.0)]
    assert slowest({}, 30) == []


def test_a_file_sums_its_tests_phases_and_a_worker_its_files(monkeypatch: pytest.MonkeyPatch) -> None:
    conftest = _conftest()
    reports = [("tests/a.py::t1", 1.5, "gw0"), ("tests/a.py::t2[x]", 2.0, "gw1"), ("tests/b.py::t", 0.25, "gw0")]
    for nodeid, duration, worker in reports:
        report = pytest.TestReport(nodeid, ("tests/a.py", 0, ""), {}, "passed", None, "call", duration=duration)
        report.worker_id = worker  # (as pytest-xdist's controller receives a worker's report)
        conftest.pytest_runtest_logreport(report)
    conftest.pytest_runtest_logreport(pytest.TestReport("tests/b.py::t", ("", 0, ""), {}, "passed", None, "teardown"))
    assert dict(conftest._FILE_SECONDS) == {"tests/a.py": 3.5, "tests/b.py": 0.25}
    assert dict(conftest._WORKER_SECONDS) == {"gw0": 1.75, "gw1": 2.0, "main": 0.0}


def test_files_sharing_cached_runs_are_one_loadfile_work_unit_in_the_collections_order() -> None:
    """test_native_client_cuda.py and test_native_client_devices.py use test_cuda_scripts.py's cached runs: under
    `--dist loadfile` they are its work unit (one worker, each run made once); other files are units of their own, and
    other --dist modes keep xdist's scheduler."""
    conftest = _conftest()
    options: dict[str, Any] = {"dist": "loadfile", "tx": ["2*popen"], "loadscopereorder": False}
    config = SimpleNamespace(getvalue=options.__getitem__, option=SimpleNamespace(**options))  # (what xdist reads)
    sched = conftest.pytest_xdist_make_scheduler(config, None)
    ids = [
        "tests/integration/test_cuda_scripts.py::test_a[default]",
        "tests/integration/test_native_client_cuda.py::test_b",
        "tests/integration/test_native_client_devices.py::test_c",
        "tests/integration/test_native_client_run.py::test_d",
    ]
    scopes = [sched._split_scope(nodeid) for nodeid in ids]
    assert scopes == ["tests/integration/test_cuda_scripts.py"] * 3 + ["tests/integration/test_native_client_run.py"]
    options["dist"] = "load"
    assert conftest.pytest_xdist_make_scheduler(config, None) is None
