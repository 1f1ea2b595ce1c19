"""Shared fixtures: a token key, real daemons in-process (fake GPUs, loopback, port 0) and `gpupool serve` as a
subprocess. Every daemon started here is stopped in teardown. Plain helpers live in support.py.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from support import DaemonFactory, DaemonHandle

# support.py (and thread_state.py) import torch, grpc and the product (1-3 s of CPU): imported where a test process
# needs them, not at this module's import, which pytest-xdist's controller does too though it runs no test
_PKI_DIRECTORY: list[Path] = []


def runs_no_test(config: pytest.Config) -> bool:
    """Whether this process is pytest-xdist's controller (tests given to workers, not only collected): it loads this
    module and calls its hooks, but runs no test nor fixture, so it sets up nothing of the tests' (round 51: it
    imported torch and made a CA before it started the workers)."""
    dist = getattr(config.option, "dist", "no") != "no" and bool(getattr(config.option, "tx", None))
    return dist and not hasattr(config, "workerinput") and not config.option.collectonly


def pytest_configure(config: pytest.Config) -> None:
    """Every program the tests start speaks TLS (support.Pki); the CA lives as long as the session. No test leaves
    the thread running the tests changed (tests/thread_state.py, a plugin registered here)."""
    if runs_no_test(config):
        return
    from support import install_test_tls

    config.pluginmanager.import_plugin("thread_state")
    _PKI_DIRECTORY.append(install_test_tls(Path(tempfile.mkdtemp(prefix="gpupool-test-pki-"))).directory)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The modules with a test marked `slow` first, each module's tests in their order: under scripts/test.sh's two
    workers (pytest-xdist, `--dist loadfile`: a worker takes the next module when it is done with one) the long
    modules start early and the many short ones even out the end, instead of a long module running alone last.
    (Only with `--no-loadscope-reorder`, which scripts/test.sh passes: by default xdist re-sorts the modules by their
    number of tests, and the long modules of one or two tests came last.)"""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)  # stable: False (slow) first


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the process's zygote (server/zygote.py: a fresh interpreter that imports torch and warms up, 8-17 s)
    once the tests are known, if any of them starts an in-process daemon: it gets ready in the background while the
    tests before that one run, instead of inside that test's `daemon_factory` (the daemons of this process share
    it, as before)."""
    if session.config.option.collectonly:
        return
    if any("daemon_factory" in getattr(item, "fixturenames", ()) for item in session.items):
        from gpupool.server.zygote import shared_zygote

        shared_zygote()


# Test files that use another's cached runs (functools.cache: once a process) go to the same pytest-xdist worker, as
# one work unit of `--dist loadfile`, run in the collection's order: test_native_client_cuda.py and
# test_native_client_devices.py compare with test_cuda_scripts.py's CPU references (amp.py, mnist_style.py,
# model_parallel.py, torchrun ddp_torchrun.py) and its shim's pooled amp.py run, which a worker of their own made again
# (round 54's CI: the amp test took 14 s, the pooled shim run included; round 55)
SHARED_WORK_UNITS = {
    "tests/integration/test_native_client_cuda.py": "tests/integration/test_cuda_scripts.py",
    "tests/integration/test_native_client_devices.py": "tests/integration/test_cuda_scripts.py",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile` with SHARED_WORK_UNITS' files in their test file's unit (else xdist's own scheduler)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedFileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SHARED_WORK_UNITS.get(scope, scope)

    return SharedFileScheduling(config, log)


# Each test's setup + call + teardown seconds, summed per test file and per pytest-xdist worker ("main" without xdist):
# on xdist's controller, which receives every worker's reports (with their `duration`), for the summary below
_FILE_SECONDS: defaultdict[str, float] = defaultdict(float)
_WORKER_SECONDS: defaultdict[str, float] = defaultdict(float)
SLOWEST_FILES = 30


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _FILE_SECONDS[report.nodeid.split("::")[0]] += report.duration
    _WORKER_SECONDS[getattr(report, "worker_id", None) or "main"] += report.duration


def slowest(seconds: Mapping[str, float], count: int) -> list[tuple[str, float]]:
    """The `count` entries with the most seconds, most first (ties by name)."""
    return sorted(seconds.items(), key=lambda entry: (-entry[1], entry[0]))[:count]


@pytest.hookimpl(trylast=True)  # (after the durations)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    """After `--durations=30`'s phases: the SLOWEST_FILES test files with the most summed seconds, and each xdist
    worker's busy total (round 54: a file's tests and fixtures together, to balance the workers' files by)."""
    if not _FILE_SECONDS or hasattr(terminalreporter.config, "workerinput"):
        return
    write = terminalreporter.write_line
    terminalreporter.write_sep("=", f"slowest {SLOWEST_FILES} test files (setup + call + teardown, summed)")
    for name, seconds in slowest(_FILE_SECONDS, SLOWEST_FILES):
        write(f"{seconds:8.2f}s {name}")
    busy = ", ".join(f"{worker} {seconds:.1f}s" for worker, seconds in sorted(_WORKER_SECONDS.items()))
    write(f"busy per worker: {busy}")


def pytest_unconfigure(config: pytest.Config) -> None:
    for directory in _PKI_DIRECTORY:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def warm_this_process() -> None:
    """This test process's MKL vector math functions set up before its first test, as the daemon's zygote sets them
    up for its workers (server/executor.py `warm_vector_math`): the first parallel call of one in a process now and
    then gives the second thread's half a few bits off (BENCHMARKS.md "Round 22, flaky22"), and a test comparing two
    computations in this process (a unit test's executor against torch, a thread-isolation daemon against a local
    reference) must not depend on which of them came first. References in other, fresh processes: support.py
    `assert_float32_close`."""
    from gpupool.server.executor import warm_vector_math

    warm_vector_math()


@pytest.fixture(scope="session")
def native_runner_module() -> Any:
    """The daemon's native runner (server/native_runner.cpp), built or loaded from its cache; skips where it cannot be
    built (fails where it can and did not: `support.native_runner_or_skip`)."""
    from support import native_runner_or_skip

    return native_runner_or_skip()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test (support.dead_port: bound, not listening)."""
    from support import dead_port

    with dead_port() as port:
        yield port


@pytest.fixture
def closed_collective_port() -> Iterator[int]:
    """`closed_port` in the daemons' default --collective-ports (a rank names no group store port outside it)."""
    from support import dead_port

    from gpupool.protocol import COLLECTIVE_PORTS

    with dead_port(COLLECTIVE_PORTS) as port:
        yield port


@pytest.fixture
def token_key() -> bytes:
    """A fresh token seed: `mint_token(token_key, ...)` signs with the Ed25519 key derived from it, daemons get
    only its public key (`support.verifier`, `support.public_key_file`)."""
    return secrets.token_hex(32).encode()


@pytest.fixture
def token_key_file(tmp_path: Path, token_key: bytes) -> Path:
    path = tmp_path / "token.key"
    path.write_bytes(token_key + b"\n")
    return path


@pytest.fixture
def daemon_factory(token_key: bytes) -> Iterator[DaemonFactory]:
    """Start in-process daemons: `daemon_factory(fake_gpus=2, fake_gpu_memory=64 * MiB, **Config fields)`."""
    from gpupool.server.app import RunningDaemon
    from gpupool.server.daemon import DaemonConfig
    from support import TEST_HOST, DaemonHandle, MiB, get_pki, verifier

    started: list[RunningDaemon] = []

    def start(**overrides: Any) -> DaemonHandle:
        fields: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "host_id": TEST_HOST,
            "fake_gpus": 1,
            "fake_gpu_memory": 256 * MiB,
            "token_key": token_key,
            "metrics_listen": "127.0.0.1:0",
            "tls": get_pki().server_config(),
        }
        fields.update(overrides)
        seed = fields["token_key"]
        if isinstance(seed, bytes):
            fields["token_key"] = verifier(seed)  # the daemon holds the public key only
        running = RunningDaemon(DaemonConfig(**fields))
        started.append(running)
        return DaemonHandle(
            running.address, seed, fields["host_id"], running=running, metrics_port=running.metrics_port
        )

    yield start
    for running in started:
        running.stop(grace=1.0, drain=False)


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> DaemonHandle:
    """One in-process daemon with one 256 MiB fake GPU."""
    return daemon_factory()


@pytest.fixture
def serve_process(token_key_file: Path, token_key: bytes) -> Iterator[Callable[..., DaemonHandle]]:
    """Start `gpupool serve` subprocesses: `serve_process("--fake-gpus", "1")` -> DaemonHandle."""
    from support import TEST_HOST, DaemonHandle, start_serve_process, stop_process

    procs: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None, wrap: Sequence[str] = ()) -> DaemonHandle:
        proc, address = start_serve_process(token_key_file, *args, env=env, wrap=wrap)
        procs.append(proc)
        return DaemonHandle(address, token_key, TEST_HOST, process=proc)

    yield start
    for proc in procs:
        stop_process(proc)
