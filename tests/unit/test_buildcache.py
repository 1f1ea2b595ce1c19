"""A native build killed midway (SIGKILL: its `finally` never runs) leaves its private `build-*` folder in the cache;
the next build or use of the cache removes it (gpupool/buildcache.py), never a live builder's folder. The C++
client's build (client/native/build.py) is really started and killed; the runner's (server/native_runner.py) and
the shim's device guard (client/torch/native.py) are checked on folders and files left by killed processes."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from support import processes_naming

from gpupool import buildcache

HOLD = """
import sys
from pathlib import Path
from gpupool import buildcache
with buildcache.private_build_dir(Path(sys.argv[1])) as d:
    print(d, flush=True)
    sys.stdin.read()  # until told (or killed)
"""


def _holder(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    """A process holding a private build folder under `parent` (as a builder does while it compiles)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(parent)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def _killed_holder(parent: Path) -> Path:
    proc, folder = _holder(parent)
    proc.kill()
    proc.wait()
    assert (folder / buildcache.OWNER).exists()  # its `finally` never ran: left behind
    return folder


def test_a_killed_native_client_build_is_cleaned_by_the_next_use_and_a_live_one_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpupool.client.native import build

    if build.compiler_missing():
        pytest.skip(build.compiler_missing() or "")
    env = {**os.environ, "GPUPOOL_NATIVE_CLIENT_CACHE": str(tmp_path)}
    code = "from gpupool.client.native.build import build; build()"
    child = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("torch-*/build-*/" + buildcache.OWNER)):
        assert child.poll() is None and time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    time.sleep(1.0)  # compiling now
    os.killpg(child.pid, signal.SIGKILL)  # the builder and its compiler, as a lost machine or an OOM kill would
    child.wait()
    monkeypatch.setenv("GPUPOOL_NATIVE_CLIENT_CACHE", str(tmp_path))
    final = build.built_path()
    builds = list(final.parent.glob("build-*"))
    # (round 29: none here once, on a box whose machine-wide editable install another session re-pointed: the child,
    # run by that install, built another source's folder; its folders say which)
    assert len(builds) == 1, f"{builds} under {final.parent}; the child's: {list(tmp_path.glob('torch-*/build-*'))}"
    [killed] = builds
    live, live_folder = _holder(final.parent)  # a concurrent builder, still building
    try:
        final.write_bytes(b"")  # another build finished meanwhile: the next use finds the library cached
        assert build.build() == final
        assert not killed.exists() and live_folder.is_dir()
        assert sorted(final.parent.glob("build-*")) == [live_folder]
    finally:
        live.communicate("")
    assert not live_folder.exists() and not list(final.parent.glob("build-*"))


def test_the_runner_sweeps_a_killed_build_before_its_next_build_or_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpupool.server import native_runner

    monkeypatch.setenv("GPUPOOL_NATIVE_RUNNER_CACHE", str(tmp_path))
    monkeypatch.delenv("GPUPOOL_NATIVE_RUNNER_SANITIZE", raising=False)
    digest = hashlib.sha256(native_runner.SOURCE.read_bytes()).hexdigest()[:16]
    parent = tmp_path / f"torch-{torch.__version__}-{digest}"
    parent.mkdir()
    killed = _killed_holder(parent)
    live, live_folder = _holder(parent)
    orphan = parent / "build-olderversion"  # no `.owner`: an older gpupool's, left over long ago
    orphan.mkdir()
    young = parent / "build-justmade"  # no `.owner` yet: a builder between making its folder and its lock
    young.mkdir()
    old = time.time() - buildcache.ORPHAN_SECONDS - 60
    os.utime(orphan, (old, old))
    try:
        (parent / "gpupool_native_runner.so").write_bytes(b"")
        assert native_runner._built() == parent / "gpupool_native_runner.so"
        assert not killed.exists() and sorted(parent.glob("build-*")) == sorted([live_folder, young])
    finally:
        live.communicate("")


def test_the_device_guard_build_removes_a_killed_builds_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """client/torch/native.py builds under a lock into a temporary file: one left by a killed build is nobody's once
    the lock is held, and goes (here the compiler is `false`, so the build itself fails at once)."""
    from gpupool.client.torch import native

    monkeypatch.setenv("GPUPOOL_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    path = native.library_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = path.parent / f"{path.stem}.abc123.tmp"
    stale.write_bytes(b"\x7fELF half a library")
    with pytest.raises(native.BuildError):
        native.build()
    assert not stale.exists() and not list(path.parent.glob("*.tmp"))


def test_a_sweep_never_follows_what_is_planted_in_the_cache(tmp_path: Path) -> None:
    """Hostile entries in a cache folder (only its owner can plant them: config.check_private_dir refuses a folder
    others can write, but a user's own other tools can): a `build-*` symbolic link to a folder elsewhere, old and
    with an unlocked `.owner`, and a dead builder's folder whose `.owner` is a link to a file elsewhere or a FIFO.
    The sweep removes what is its own (the dead folders), never a link's target or what a link names, and never
    blocks (a FIFO opened for reading would). No hole found in round 21's sweep; kept as a guard."""
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    cache.mkdir()
    outside.mkdir()
    (outside / ".owner").write_text("not a lock")
    (outside / "precious").write_text("keep")
    old = time.time() - 2 * buildcache.ORPHAN_SECONDS
    os.utime(outside, (old, old))
    (cache / "build-link").symlink_to(outside, target_is_directory=True)
    linked = cache / "build-linked-owner"
    linked.mkdir()
    (linked / ".owner").symlink_to(outside / "precious")
    fifo = cache / "build-fifo"
    fifo.mkdir()
    os.mkfifo(fifo / ".owner")
    removed = buildcache.sweep(cache)
    assert (outside / "precious").read_text() == "keep" and (outside / ".owner").exists()
    assert not linked.exists() and not fifo.exists()  # dead builders' folders (nothing holds their lock)
    assert {p.name for p in removed} >= {"build-linked-owner", "build-fifo"}
    assert (cache / "build-link").is_symlink() or not (
        cache / "build-link"
    ).exists()  # the link at most, not its target


# A tiny extension module in place of native_runner.cpp (argv[1]): the same build and load, in seconds (the real source
# took ~45 s of CPU; tests/integration/test_first_start.py builds it from an empty cache)
TINY_RUNNER = """#include <Python.h>
static struct PyModuleDef tiny = {PyModuleDef_HEAD_INIT, "gpupool_native_runner", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit_gpupool_native_runner() { return PyModule_Create(&tiny); }
"""
RUNNER_BUILD = """
import sys, threading
from pathlib import Path
from gpupool.server import native_runner, runner_source
runner_source.SOURCE = Path(sys.argv[1])  # (read once, at the first `source()`)
mod = native_runner.load()
print(mod is not None, "torch.utils.cpp_extension" in sys.modules, threading.active_count())
"""


def test_the_runner_builds_in_a_process_of_its_own(tmp_path: Path) -> None:
    """The zygote builds the runner at its first start, then forks every session's worker: the build must leave
    nothing in it. torch.utils.cpp_extension's import asks the CUDA runtime for a device count on a CUDA host, which
    poisons every later fork (on an H200 host every worker of a daemon's first start failed "Cannot re-initialize
    CUDA in forked subprocess"). So the build runs in a child process: after a build from an empty cache the module
    is loaded, cpp_extension was never imported here and no thread was left behind (a tiny source built as the
    runner's is: `TINY_RUNNER`)."""
    from gpupool.server import native_runner

    why = native_runner.missing()
    if why is not None:
        pytest.skip(f"native runner: {why}")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for name in ("GPUPOOL_NATIVE_RUNNER", "GPUPOOL_NATIVE_RUNNER_CACHE", "GPUPOOL_NATIVE_RUNNER_SANITIZE",
                 native_runner.DIGEST_ENV):  # fmt: skip
        env.pop(name, None)
    source = tmp_path / "tiny_runner.cpp"
    source.write_text(TINY_RUNNER)
    out = subprocess.run([sys.executable, "-c", RUNNER_BUILD, str(source)], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "1"], out.stdout + out.stderr[-2000:]
    digest = hashlib.sha256(TINY_RUNNER.encode()).hexdigest()[:16]
    built = [p.parent.name for p in tmp_path.rglob("gpupool_native_runner.so")]
    assert built == [f"torch-{torch.__version__}-{digest}"]  # the tiny source's build


def test_one_builder_at_a_time_and_the_wait_for_another_is_bounded(tmp_path: Path) -> None:
    """`exclusive`: the cache folder's build lock (two daemons' first starts on an empty cache build once). A second
    holder waits, until its deadline at most (then the caller's message); the lock is free again once the holder is
    gone, a killed one included (the kernel drops a `flock` with its process)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match="^late$"):
            with buildcache.exclusive(tmp_path, time.monotonic() + 0.5, "late"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with buildcache.exclusive(tmp_path, time.monotonic() + 5, "late"):
        assert (tmp_path / buildcache.LOCK).stat().st_mode & 0o077 == 0


HOLD_LOCK = """
import sys, time
from pathlib import Path
from gpupool import buildcache
with buildcache.exclusive(Path(sys.argv[1]), time.monotonic() + 5, "late"):
    print("held", flush=True)
    sys.stdin.read()
"""


TINY = 'extern "C" int gpupool_probe() { return 1; }\n'
# `build()` of a tiny source (argv[1]) in place of native_client.cpp: the same build, in seconds
BUILD_TINY = """
import sys
from pathlib import Path
from gpupool.client.native import build
build.SOURCE = Path(sys.argv[1])
print(build.build(retry_failed=True), flush=True)
"""


def _slow_compiler(tmp_path: Path) -> tuple[Path, Path]:
    """A C++ compiler that, asked to compile (`-c`: ninja's compile step, not cpp_extension's `-v` check), first waits
    $SLOW_CXX seconds (in a copy of `sleep` under `tmp_path`, so its command line names the folder), then runs the
    real one; and the tiny source."""
    sleep = tmp_path / "slowsleep"
    sleep.write_bytes(Path(shutil.which("sleep") or "/bin/sleep").read_bytes())
    sleep.chmod(0o755)
    cxx = tmp_path / "cxx"
    cxx.write_text(f'#!/bin/sh\ncase " $* " in *" -c "*) [ -z "$SLOW_CXX" ] || {sleep} "$SLOW_CXX" ;; esac\n'
                   'exec c++ "$@"\n')  # fmt: skip
    cxx.chmod(0o755)
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY)
    return cxx, source


def _client_build(tmp_path: Path, cxx: Path, source: Path, slow: str) -> subprocess.Popen[str]:
    env = {**os.environ, "GPUPOOL_NATIVE_CLIENT_CACHE": str(tmp_path / "cache"), "CXX": str(cxx), "SLOW_CXX": slow}
    return subprocess.Popen([sys.executable, "-c", BUILD_TINY, str(source)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _kill_naming(folder: Path) -> None:
    for line in processes_naming(folder):
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _skip_without_compiler() -> None:
    from gpupool.client.native import build

    if build.compiler_missing():
        pytest.skip(build.compiler_missing() or "")


def test_two_native_client_builds_at_once_build_once(tmp_path: Path) -> None:
    """Two first uses of the C++ client at once on an empty cache (two `gpupool run`s): one builds, the other waits
    on the cache folder's build lock (`buildcache.exclusive`) and then uses that build. The base built in both (two
    "building" lines, each compiling; the full build is 1-2 min of CPU). The second starts once the first compiles
    (its compiler made slow: a real build of a tiny source)."""
    _skip_without_compiler()
    cxx, source = _slow_compiler(tmp_path)
    first = _client_build(tmp_path, cxx, source, "4")
    second = None
    try:
        deadline = time.monotonic() + 120
        while not processes_naming(tmp_path / "slowsleep"):  # the first one compiles
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        second = _client_build(tmp_path, cxx, source, "4")
        outs = [p.communicate(timeout=300) for p in (first, second)]
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    [library] = list((tmp_path / "cache").rglob("gpupool_native_client.so"))
    assert [out.strip() for out, _ in outs] == [str(library)] * 2
    said = [err.count("gpupool: building the native client") for _, err in outs]
    assert said == [1, 0], outs
    assert not list(library.parent.glob("build-*"))


def test_a_native_client_build_dies_with_its_process_and_the_next_one_builds(tmp_path: Path) -> None:
    """The process building the C++ client killed (SIGKILL) while its compiler runs: the build's session goes with it
    (`buildcache.run_build`: PR_SET_PDEATHSIG, then its session killed; no python, ninja or compiler of it left;
    the base's ninja and compiler ran on, the build in-process), no library is left in the cache, and the next
    build builds it (the killed build's folder removed)."""
    _skip_without_compiler()
    cxx, source = _slow_compiler(tmp_path)
    builder = _client_build(tmp_path, cxx, source, "600")
    try:
        deadline = time.monotonic() + 120
        while not processes_naming(tmp_path / "slowsleep"):  # compiling
            assert builder.poll() is None and time.monotonic() < deadline, builder.communicate()
            time.sleep(0.05)
        builder.kill()  # the builder alone, as `kill -9` of a daemon or of `gpupool run`
        builder.wait()
        deadline = time.monotonic() + 60  # (a bound on a hang, not a timing: it takes milliseconds)
        while processes_naming(tmp_path):
            assert time.monotonic() < deadline, processes_naming(tmp_path)
            time.sleep(0.05)
    finally:
        _kill_naming(tmp_path)
    assert not list((tmp_path / "cache").rglob("*.so"))
    [killed] = list((tmp_path / "cache").glob("torch-*/build-*"))
    again = _client_build(tmp_path, cxx, source, "")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert Path(out.strip()).is_file() and not killed.exists()


def test_a_waiter_has_the_build_lock_as_soon_as_its_holder_lets_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`exclusive` waits in `flock` itself (a helper process blocked on its descriptor), not by trying again every
    0.2 s (the base's POLL): with the base's pause made an hour long, its waiter slept past the holder's end. The
    bound below is a hang's, not a timing."""
    monkeypatch.setattr(buildcache, "POLL", 3600.0, raising=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    got: list[object] = []

    def wait() -> None:
        try:
            with buildcache.exclusive(tmp_path, time.monotonic() + 600, "late"):
                got.append(True)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            got.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        waiter.start()
        time.sleep(1.0)  # (waiting now)
        assert not got
        holder.communicate("")  # lets go
        waiter.join(60)
        assert got == [True]
    finally:
        holder.kill()
        holder.wait()


def test_a_native_client_build_says_when_it_is_done(tmp_path: Path) -> None:
    """A user's first `gpupool run` waits minutes for the C++ client's build after one "building" line: the build's
    end is one line too ("built the native client in N s", as the daemon's runner and the Python client's C paths
    say), and a use of the cached library says neither. The base said nothing at the end."""
    _skip_without_compiler()
    cxx, source = _slow_compiler(tmp_path)
    outs = []
    for _ in range(2):
        proc = _client_build(tmp_path, cxx, source, "")
        outs.append(proc.communicate(timeout=300))
        assert proc.returncode == 0, outs
    (_, first), (_, again) = outs
    # (its progress lines, "gpupool: still building ...", one every 15 s on a slow host: test_build_progress.py)
    lines = [ln for ln in first.splitlines() if ln.startswith("gpupool: ") and " still building " not in ln]
    assert lines[0].startswith("gpupool: building the native client") and len(lines) == 2, first
    assert re.fullmatch(r"gpupool: built the native client in \d+ s", lines[1]), first
    assert "gpupool:" not in again, again
