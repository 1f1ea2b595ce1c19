"""A daemon's first start on a slow host with an empty build cache, and a worker's start refused for want of memory.

The zygote builds the native runner (server/native_runner.py) when the cache has none for this source and torch: on
a slow host (the device host under gVisor, a small VM's first `gpupool up`) that build alone passed the daemon's 120 s
bound on the zygote's start (server/zygote.py START_TIMEOUT), and the daemon did not start. The build is made slow
here by the test-only hook GPUPOOL_TEST_RUNNER_BUILD_SECONDS (native_runner.SLOW_BUILD_ENV: the build lasts at least
that long), on a real build into an empty cache (XDG_CACHE_HOME in a temporary folder); the bound itself is made 60 s
by the test-only hook GPUPOOL_TEST_ZYGOTE_START_SECONDS (zygote.START_TIMEOUT_TEST_ENV), so that a build past it
lasts 70 s, not the 130 s that passing the real 120 s took (round 44's CI: 137 s, the suite's slowest test). Not
shorter: the zygote's start without the build (torch's import, beside the other daemon's) must fit in the bound, and
took over 30 s at load 25 here; it is about a sixth of the real build's CPU, which the test's 300 s bounds.

A worker's start that the kernel refuses for memory (ENOMEM) is made real by capping the daemon's address space
(RLIMIT_AS, as tests/integration/test_daemon_abuse.py caps it, which is how round 36's CI met it): the daemon maps each
worker's 64 MiB of shared memory (worker.SHARED_BYTES) and that mapping fails.
"""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import native_runner, worker, zygote
from scheduler_fixtures import Proc
from support import DaemonHandle, MiB, processes_naming, start_serve_process, stop_process

from gpupool import buildcache, errors, up

pytestmark = pytest.mark.skipif(native_runner.missing() is not None, reason=f"native runner: {native_runner.missing()}")


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {"XDG_CACHE_HOME": str(cache), "GPUPOOL_NATIVE_RUNNER": "1", "GPUPOOL_NATIVE_RUNNER_SANITIZE": "0"}
    env["GPUPOOL_NATIVE_RUNNER_CACHE"] = ""  # (empty: unset, the cache under XDG_CACHE_HOME)
    return {**env, **extra}


def _serves(d: DaemonHandle) -> None:
    with Session.attach(d.address, d.token(quota_bytes=16 * MiB)) as s:
        [h] = s.call("aten::mul.Tensor", Handle(s.upload(torch.arange(4.0))), 3)
        assert torch.equal(s.download(h), torch.arange(4.0) * 3)


def _log(proc: object) -> str:
    return "".join(getattr(proc, "log_lines", []))


@pytest.mark.slow
def test_a_daemon_and_gpupool_up_start_at_once_on_an_empty_cache_with_a_build_slower_than_the_start_bound(
    tmp_path: Path, token_key_file: Path, token_key: bytes
) -> None:
    """`gpupool serve` and `gpupool up` (its own daemon), started at once on one empty cache, with a build longer than
    the daemons' bound on their zygote's start (made 60 s here, START_TIMEOUT_TEST_ENV): both start (the base:
    "cannot start: the zygote is not ready after 120 s", and `up` gave its daemon 120 s too), each says it builds the
    runner and loads it, the first one serves; one library in the cache (one build: the other waited on the cache
    folder's build lock, then loaded it) and no build folder left."""
    cache = tmp_path / "cache"
    start = 60  # the daemons' bound on their zygote's start, and a build 10 s longer
    env = _env(cache, **{zygote.START_TIMEOUT_TEST_ENV: str(start), native_runner.SLOW_BUILD_ENV: str(start + 10)})
    bound = up.START_TIMEOUT + up.BUILD_TIMEOUT + 60
    pool = Proc(["up", "--fake-gpus", "1", "--fake-gpu-memory", "512MiB", "--scheduler-listen", "127.0.0.1:0",
                 "--listen", "127.0.0.1:0", "--state", str(tmp_path / "state" / "scheduler.db"),
                 "--metrics-listen", "127.0.0.1:0", "--scheduler-metrics-listen", "127.0.0.1:0"], env=env)  # fmt: skip
    proc = None
    try:
        proc, address = start_serve_process(token_key_file, "--fake-gpus", "1", env=env, timeout=bound)
        _serves(DaemonHandle(address, token_key, "test-host", process=proc))
        pool.wait_for("gpupool is up", timeout=bound)
        for log in (_log(proc), pool.log()):
            assert "building the native runner (first start" in log, log[-3000:]
            assert "native runner built in" in log and "no build loaded" not in log, log[-3000:]
        libraries = list(cache.rglob("gpupool_native_runner.so"))
        assert len(libraries) == 1, libraries
        assert not list(libraries[0].parent.glob("build-*"))
    finally:
        pool.popen.send_signal(signal.SIGTERM)
        pool.popen.wait(60)
        if proc is not None:
            stop_process(proc)


def test_up_waits_for_its_daemon_as_long_as_the_daemon_bounds_its_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpupool up` repeats the build's bound (server/native_runner.py imports torch): the same variable and default."""
    assert (up.BUILD_TIMEOUT_ENV, up.BUILD_TIMEOUT) == (native_runner.BUILD_TIMEOUT_ENV, native_runner.BUILD_TIMEOUT)
    assert up.START_TIMEOUT == zygote.START_TIMEOUT
    monkeypatch.setenv(up.BUILD_TIMEOUT_ENV, "30")
    assert up._daemon_start_bound() == zygote.START_TIMEOUT + 30 + 60


def test_the_test_hook_bounds_the_zygote_s_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The slow test above passes on a bound it shortens (START_TIMEOUT_TEST_ENV): the bound a daemon's start waits
    with is the hook's (else that test would pass whether or not the build counts against it), START_TIMEOUT without."""
    assert zygote.start_timeout() == zygote.START_TIMEOUT
    monkeypatch.setenv(zygote.START_TIMEOUT_TEST_ENV, "1")
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^the zygote is not ready after 1 s$"):
        zygote.Zygote().wait_ready()  # (never started)
    assert time.monotonic() - began < zygote.START_TIMEOUT / 2


def test_a_build_past_its_bound_leaves_the_daemon_on_the_python_path(
    tmp_path: Path, token_key_file: Path, token_key: bytes
) -> None:
    """GPUPOOL_NATIVE_RUNNER_BUILD_TIMEOUT=3 and a build that takes a minute: the build is killed (its compiler too:
    no process of it left, no folder or library in the cache), one warning says so, and the daemon starts and serves
    on the Python path (the base had no bound: a build that never ended meant a daemon that never started)."""
    cache = tmp_path / "cache"
    env = _env(cache, **{native_runner.SLOW_BUILD_ENV: "60", native_runner.BUILD_TIMEOUT_ENV: "3"})
    proc, address = start_serve_process(token_key_file, "--fake-gpus", "1", env=env)
    try:
        _serves(DaemonHandle(address, token_key, "test-host", process=proc))
        log = _log(proc)
        warnings = [line for line in log.splitlines() if " WARNING " in line and "native runner" in line]
        assert len(warnings) == 1, log[-3000:]
        assert f"did not finish within 3 s ({native_runner.BUILD_TIMEOUT_ENV})" in warnings[0], warnings
        assert "learned runs stay in Python, as with GPUPOOL_NATIVE_RUNNER=0" in warnings[0], warnings
        assert not processes_naming(cache)
        assert not list(cache.rglob("gpupool_native_runner.so")) and not list(cache.rglob("build-*"))
    finally:
        stop_process(proc)


def test_a_daemon_killed_mid_build_takes_the_build_with_it(tmp_path: Path, token_key_file: Path) -> None:
    """`kill -9` of a daemon whose zygote builds the runner at its first start: the zygote dies with it (its
    PDEATHSIG), and the build with the zygote (`buildcache.run_build`: the build's session leader hears of its
    parent's death and kills its session, ninja and compilers included): no process of the build is left, and no
    library (round 37: the build, a session of its own, ran on for minutes). The killed build's folder is nobody's:
    the next build or load removes it (test_buildcache.py builds again after a killed build)."""
    cache = tmp_path / "cache"
    env = _env(cache, **{native_runner.SLOW_BUILD_ENV: "600"})
    daemon = Proc(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "0", "--fake-gpus", "1",
                   "--token-key-file", str(token_key_file)], env=env)  # fmt: skip
    try:
        daemon.wait_for("building the native runner", timeout=150)
        deadline = time.monotonic() + 120
        while not any(" -c " in line for line in processes_naming(cache)):  # a compiler runs
            assert time.monotonic() < deadline and daemon.popen.poll() is None, daemon.log()[-3000:]
            time.sleep(0.05)
        zygotes = _children(daemon.popen.pid)  # the build folder's lock holder (`buildcache.private_build_dir`)
        assert zygotes, daemon.log()[-3000:]
        daemon.popen.kill()
        daemon.popen.wait()
        deadline = time.monotonic() + 60  # (a bound on a hang, not a timing: it takes milliseconds)
        # The build dies with the zygote's building thread, which can end before the zygote's last thread drops its
        # files (the kernel frees a process's memory, then its files): wait for both, or the lock still stands.
        while processes_naming(cache) or any(map(_alive, zygotes)):
            assert time.monotonic() < deadline, (processes_naming(cache), [z for z in zygotes if _alive(z)])
            time.sleep(0.05)
    finally:
        if daemon.popen.poll() is None:
            daemon.popen.kill()
            daemon.popen.wait()
        for line in processes_naming(cache):
            try:
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not list(cache.rglob("gpupool_native_runner.so"))
    [killed] = list(cache.rglob("build-*"))
    assert buildcache.sweep(killed.parent) == [killed]


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (/proc/PID/stat's fourth field, past the command's parenthesis)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(name))
    return found


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has closed its files: dead here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def _address_space(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_a_worker_start_refused_for_memory_is_tried_again_then_resource_exhausted(
    serve_process: object, token_key: bytes
) -> None:
    """The daemon's address space capped just above what it maps now: a worker's start fails ENOMEM (the mapping of
    its shared memory). Lifted while the daemon tries again, the Attach succeeds; kept, the Attach fails
    RESOURCE_EXHAUSTED saying the host is out of memory (the base: UNAVAILABLE at the first failure), and the daemon
    serves again once memory is back."""
    d = serve_process("--fake-gpus", "1")  # type: ignore[operator]
    proc = d.process
    _serves(d)  # (the front's threads, the first session's worker: started while memory is plenty)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)

    def cap() -> None:
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (_address_space(proc.pid) + worker.SHARED_BYTES // 2, hard))

    def lift() -> None:
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (hard, hard))

    # Kept: RESOURCE_EXHAUSTED after the tries.
    cap()
    try:
        with pytest.raises(errors.ResourceExhausted, match=r"host test-host is out of memory: cannot start a session "
                           r"worker \(\[Errno 12\] Cannot allocate memory\); try again later"):  # fmt: skip
            Session.attach(d.address, d.token(quota_bytes=16 * MiB))
    finally:
        lift()
    _serves(d)
    # Lifted while the daemon tries again: the Attach succeeds.
    seen = len(proc.log_lines)
    cap()
    result: list[object] = []
    attach = threading.Thread(target=lambda: result.append(_attach_and_serve(d)))
    attach.start()
    try:
        deadline = time.monotonic() + 120
        while not any("could not start" in line for line in proc.log_lines[seen:]):
            assert time.monotonic() < deadline and attach.is_alive(), proc.log_lines[seen:]
            time.sleep(0.01)
    finally:
        lift()
    attach.join()
    assert result == [True], result
    assert proc.poll() is None


def _attach_and_serve(d: DaemonHandle) -> object:
    try:
        _serves(d)
        return True
    except Exception as exc:
        return exc
