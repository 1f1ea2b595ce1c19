"""The clients' small native libraries, compiled at first use from the sources shipped in this package: the Python
client's device guard (client/torch/native_guard.cpp) and op path (client/torch/native_ops.cpp), and the captured
step's guard check (client/capture_guard.cpp, both clients'). One file per library in a per-user cache
(`$GPUPOOL_NATIVE_CACHE`, default `$XDG_CACHE_HOME/gpupool/native` or `~/.cache/gpupool/native`), built under the
folder's file lock (processes starting together build it once) into a temporary file renamed into place. Nothing is
downloaded. (The C++ client's own library, through torch's cpp_extension, is client/native/build.py's.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from gpupool import config

log = logging.getLogger("gpupool.torch")


class BuildError(RuntimeError):
    """A native library could not be built (no compiler, or the compiler failed)."""


def cache_dir() -> Path:
    return config.cache_dir("native", "GPUPOOL_NATIVE_CACHE")


def compiler() -> list[str]:
    cxx = shlex.split(os.environ.get("CXX") or "") or ["c++"]
    if shutil.which(cxx[0]) is None:
        raise BuildError(f"no C++ compiler ({cxx[0]!r} not found; set $CXX)")
    return cxx


def build_cached(path: Path, command: Any, what: str) -> Path:
    """`path`, compiling it first with `command(tmp)` if the cache has none (under a lock; atomic rename); a library
    another user could have written (`config.check_private_file`) raises UnsafeCacheDir: never loaded."""
    config.check_private_file(_cached(path, command, what))
    return path


def extension_path(source: Path, prefix: str) -> Path:
    """Where a CPython extension built from `source` lives: one file per (Python build, machine, source). It uses
    CPython's C API only. The interpreter is its file, not the name it was started by: a venv's `python` and
    `python3` (scripts/setup.sh builds with the one, the README's commands run the other) are one Python, and until
    round 53 a script's first captured step built the capture guard again (a new user's first `--capture`)."""
    key = hashlib.sha256()
    python = os.path.realpath(sys.executable)
    for part in (sys.version, sysconfig.get_config_var("SOABI") or "", platform.machine(), python):
        key.update(str(part).encode() + b"\0")
    key.update(source.read_bytes())
    return cache_dir() / f"{prefix}-{sys.implementation.cache_tag}-{key.hexdigest()[:16]}.so"


def extension_command(source: Path) -> Any:
    """The compile command (a function of the output path) of a CPython extension from `source`."""

    def command(out: Path) -> list[str]:
        include = sysconfig.get_paths()["include"]
        return [*compiler(), "-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", f"-I{include}",
                "-o", str(out), str(source)]  # fmt: skip

    return command


def python_extension(source: Path, name: str, prefix: str, what: str) -> Any:
    """The CPython extension module `name` built from `source` (at first use: `build_cached`), imported as opened
    (`config.import_private_extension`). Raises BuildError (not CPython, no compiler, a failed build) or
    UnsafeCacheDir."""
    if sys.implementation.name != "cpython":
        raise BuildError(f"{what} needs CPython")
    path = build_cached(extension_path(source, prefix), extension_command(source), what)
    return config.import_private_extension(name, path)


def _cached(path: Path, command: Any, what: str) -> Path:
    import fcntl

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file: wait for it
        if path.is_file():
            return path
        for stale in path.parent.glob(path.stem + ".*.tmp"):  # a build killed midway (only the lock's holder
            stale.unlink(missing_ok=True)  # makes one, so none is anyone's now)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            cmd = command(Path(tmp))
            start = time.monotonic()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise BuildError(f"{cmd[0]}: {exc}") from exc
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                first = next((ln for ln in lines if "error" in ln), lines[0] if lines else "")
                detail = f": {first.strip()[:300]}" if first.strip() else " (no output)"
                raise BuildError(f"{cmd[0]} exited with {done.returncode}{detail}")
            os.replace(tmp, path)
            log.info("gpupool: built %s in %.1f s: %s", what, time.monotonic() - start, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path
