"""Building the C++ client (native_client.cpp) without importing torch: `gpupool run --native-client` checks for the
library before it leases (the child imports torch, not `gpupool run`). The library is cached per torch version and
source hash under gpupool.config.cache_dir("native-client"), built in a private folder and moved into place
atomically; backend.py loads it. One process builds into a cache folder at a time (its build lock,
`buildcache.exclusive`, as the daemon's native runner): the others wait and use that build. The build runs in a
session of its own that dies with the process that started it, compilers included (`buildcache.run_build`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpupool import buildcache, config

SOURCE = Path(__file__).with_name("native_client.cpp")
HEADER = Path(__file__).parent.parent / "sdpa_choice.h"  # shared with the shim's guard: part of the build key
_LIB = "gpupool_native_client"
# How long a build may take, a wait for another process's build of the same library included (~1-2 min; minutes on
# a loaded host), before it is given up (the build killed, BuildError: `gpupool run`'s default takes the Python client)
BUILD_TIMEOUT = 900.0
# CPU seconds a build takes on an idle core, about: the estimate its first line gives scales it by the load per core
# (`buildcache.estimate`), and its progress lines (one every 15 s while it compiles) count against it
BUILD_CPU = 30.0  # (round 49's walks: ~31 s of CPU and 177 s of wall time at load 22; 98 s of wall time at load 5)


class BuildError(RuntimeError):
    """The C++ client could not be built here (no compiler, no ninja, or the compiler failed)."""


def compiler_missing() -> str | None:
    """Why the backend cannot be built here, or None."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')} not on PATH)"
    if shutil.which("ninja") is None:
        return "no ninja (torch.utils.cpp_extension needs it)"
    return None


def cache_dir() -> Path:
    return config.cache_dir("native-client", "GPUPOOL_NATIVE_CLIENT_CACHE")


def built_path() -> Path:
    """Where the library of this torch and this source lives once built (a folder per torch version and source hash:
    checkouts of other sources never replace each other's library under each other's running processes)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + b"\0" + HEADER.read_bytes()).hexdigest()[:16]  # either: a rebuild
    return cache_dir() / f"torch-{torch_version()}-{digest}" / f"{_LIB}.so"


def torch_version() -> str:
    """torch's version as its installed distribution names it (torch.__version__ for pip's and conda's wheels), read
    without importing torch (seconds); torch.__version__ where no distribution metadata exists."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        import torch

        return str(torch.__version__)


def _tool_key(name: str) -> str:
    """A tool on PATH as the build would find it: its path, size and mtime (an upgrade or a new one: another key)."""
    found = shutil.which(name)
    if found is None:
        return f"{name}: none"
    try:
        st = os.stat(found)
    except OSError:
        return f"{name}: {found}"
    return f"{name}: {os.path.realpath(found)} {st.st_size} {st.st_mtime_ns}"


def failed_marker() -> Path:
    """Where a failed build of this library is remembered: beside its library, keyed by all the build depends on
    (the library's folder: torch's version and the source's digest; here the compiler $CXX names and ninja, each by
    path, size and mtime), so that a new compiler, ninja or torch builds again by itself."""
    cxx = os.environ.get("CXX", "c++")
    key = "\0".join((cxx, _tool_key(cxx), _tool_key("ninja")))
    return built_path().parent / f"failed-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _failed_before(marker: Path) -> str | None:
    """The line of a build that failed before with the same key, or None: none, unreadable, or a file another user
    could have written (`config.open_private_file`, the library's rules: such a file is ignored, the build runs)."""
    try:
        fd = config.open_private_file(marker)
    except (OSError, config.UnsafeCacheDir):
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            seen = json.loads(f.read(4096))
        return f"{seen['why']} (a build failed at {seen['at']}; `gpupool run --client native` retries)"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remember_failure(marker: Path, why: str) -> None:
    """Write the marker (owner-only, moved into place): best effort, a cache that cannot take it builds again."""
    at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".failed-", dir=marker.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"at": at, "why": why}, f)
        os.replace(tmp, marker)
    except OSError:
        pass


def build(verbose: bool = False, retry_failed: bool = True) -> Path:
    """The library, built now unless cached. With `retry_failed` False (`gpupool run`'s default client), a build that
    failed before with the same key (`failed_marker`: source, torch, compiler, ninja) is not tried again: BuildError
    at once, saying when it failed (a failing build costs seconds to a minute a run); `--client native` retries, and
    a build that succeeds removes the marker. One process builds at a time: a builder holds the cache folder's build
    lock (`buildcache.exclusive`, which the kernel drops with its holder), and a process that waited for it uses the
    build it made (round 37: concurrent first uses each built, minutes of CPU each). The build runs in a process of
    its own that dies with this one, its compilers too (`buildcache.run_build`), in a private folder, and its result
    is moved into place (`os.replace`, atomic): a build killed midway leaves no library, and its folder is removed by
    the next build or use (gpupool/buildcache.py). Waiting and building take at most BUILD_TIMEOUT seconds. Raises
    BuildError with one line saying why."""
    final = built_path()
    if final.exists():
        buildcache.sweep(final.parent)  # the folders of builds killed midway (gpupool/buildcache.py)
        _check_private(final)
        return final
    why = compiler_missing()
    if why:
        raise BuildError(f"cannot build the native client: {why}")
    marker = failed_marker()
    if not retry_failed and (before := _failed_before(marker)):
        raise BuildError(before)
    deadline = time.monotonic() + BUILD_TIMEOUT
    late = f"the native client's build did not finish within {BUILD_TIMEOUT:.0f} s"
    try:
        with buildcache.exclusive(final.parent, deadline, late):
            if not final.exists():  # else another process built it while this one waited
                _build(final, marker, deadline, late, verbose)
    except config.UnsafeCacheDir:
        raise
    except OSError as exc:  # a cache that cannot take a build: root's shared cache (scripts/setup.sh) under another
        # user, a read-only or full disk; `gpupool run`'s default then takes the Python client, as for a build error
        raise BuildError(f"cannot build the native client in {final.parent}: {exc}") from exc
    except RuntimeError as exc:
        if isinstance(exc, BuildError):
            raise
        raise BuildError(str(exc)) from exc  # late (`exclusive`, `run_build`)
    _check_private(final)
    return final


def _build(final: Path, marker: Path, deadline: float, late: str, verbose: bool) -> None:
    with buildcache.private_build_dir(final.parent) as tmp:
        print(f"gpupool: building the native client (once per torch version and source: "
              f"{buildcache.estimate(BUILD_CPU)}; a line every {buildcache.PROGRESS_EVERY:.0f} s) into {final.parent}",
              file=sys.stderr, flush=True)  # fmt: skip
        started = time.monotonic()
        spec: dict[str, Any] = {"name": _LIB, "sources": [str(SOURCE)], "extra_cflags": ["-O2"],
                                "build_directory": str(tmp), "extra_include_paths": [str(HEADER.parent)],
                                "is_python_module": False, "verbose": verbose}  # fmt: skip
        code, out = buildcache.run_build(spec, deadline, late, progress=_progress, what="the native client",
                                         cpu=BUILD_CPU)  # fmt: skip
        if verbose:
            print(out, end="", file=sys.stderr)
        if code != 0:  # one line: the compiler's first error (until round 49 the output's last line, ninja's
            # "build stopped: subcommand failed.")
            why = f"the native client did not build: {buildcache.failure_line(out, code)}"
            _remember_failure(marker, why)
            raise BuildError(why)
        os.replace(tmp / f"{_LIB}.so", final)
    marker.unlink(missing_ok=True)
    # the end of the wait the line above announced (2-5 min on a loaded host), as the runner and the shim's paths say
    print(f"gpupool: built the native client in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def _progress(line: str) -> None:
    print(f"gpupool: {line}", file=sys.stderr, flush=True)


def _check_private(path: Path) -> None:
    """BuildError unless only this user could have written the library and its folder (`config.check_private_file`,
    as the daemon's and the shim's cached builds): another user able to replace it would run code in this process."""
    try:
        config.check_private_file(path)
    except config.UnsafeCacheDir as exc:
        raise BuildError(f"refusing to load the native client: {exc}") from exc
