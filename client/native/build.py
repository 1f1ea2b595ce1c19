"""Building the C++ client (native_client.cpp) without importing torch: `gpupool run --native-client` checks for the
library before it leases (the child imports torch, not `gpupool run`). The library is cached per torch version and
source hash under gpupool.config.cache_dir("native-client"), built in a private folder and moved into place
atomically; backend.py loads it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

from gpupool import buildcache, config

SOURCE = Path(__file__).with_name("native_client.cpp")
HEADER = Path(__file__).parent.parent / "sdpa_choice.h"  # shared with the shim's guard: part of the build key
_LIB = "gpupool_native_client"


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


def build(verbose: bool = False) -> Path:
    """The library, built now unless cached. Each build runs in a private folder and its result is moved into place
    (`os.replace`, atomic), as server/native_runner.py's: concurrent first uses each build and the last one wins, and
    a build killed midway leaves no lock behind (cpp_extension's own build-folder lock waits forever for a dead
    holder), and the folder of a build killed midway is removed by the next build or use (gpupool/buildcache.py).
    Raises BuildError with one line saying why."""
    final = built_path()
    if final.exists():
        buildcache.sweep(final.parent)  # the folders of builds killed midway (gpupool/buildcache.py)
        _check_private(final)
        return final
    why = compiler_missing()
    if why:
        raise BuildError(f"cannot build the native client: {why}")
    from torch.utils import cpp_extension

    with buildcache.private_build_dir(final.parent) as tmp:
        print(f"gpupool: building the native client (once per torch version, ~1-2 min) into {final.parent}",
              file=sys.stderr)  # fmt: skip
        try:
            cpp_extension.load(name=_LIB, sources=[str(SOURCE)], extra_cflags=["-O2"], build_directory=str(tmp),
                               extra_include_paths=[str(HEADER.parent)],
                               is_python_module=False, verbose=verbose)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the compiler's output is in the message: its last line says why
            last = [ln for ln in str(exc).splitlines() if ln.strip()][-1:] or [type(exc).__name__]
            raise BuildError(f"the native client did not build: {last[0][:300]}") from exc
        os.replace(tmp / f"{_LIB}.so", final)
    _check_private(final)
    return final


def _check_private(path: Path) -> None:
    """BuildError unless only this user could have written the library and its folder (`config.check_private_file`,
    as the daemon's and the shim's cached builds): another user able to replace it would run code in this process."""
    try:
        config.check_private_file(path)
    except config.UnsafeCacheDir as exc:
        raise BuildError(f"refusing to load the native client: {exc}") from exc
