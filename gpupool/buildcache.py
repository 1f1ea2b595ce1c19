"""Private build folders in a shared build cache (the C++ client, client/native/build.py; the daemon's native runner,
server/native_runner.py): each build runs in a `build-*` folder of its own and moves its result into place.

A build killed midway (SIGKILL, SIGTERM, a lost machine) never runs its `finally`, so its folder stayed behind with
its object files, for good. Now each builder holds an exclusive `flock` on the folder's `.owner` file for as long as
it builds (a file that appears already locked: made under another name, locked, then renamed), and every build
(and every use of a cached library) first removes the `build-*` folders whose `.owner` it can lock: their builder is
gone (the kernel drops a lock with its process). A live builder's folder is never touched, whatever its age, so
concurrent builders stay safe. A folder without an `.owner` (an older gpupool's, or a builder killed between making
the folder and its lock) is removed once older than ORPHAN_SECONDS, far more than a build takes.

The native runner's build also takes its cache folder's build lock (`exclusive`) for the whole build: processes that
start on an empty cache at once build it once (the others wait, bounded, then use that build).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = "build-"
OWNER = ".owner"  # locked by the builder for as long as it builds
LOCK = ".build-lock"  # in a cache folder: locked by the one process that builds into it (`exclusive`)
POLL = 0.2  # seconds between tries of a lock another process holds
ORPHAN_SECONDS = 3600.0  # a folder with no `.owner` this old is left over (a build takes 1-2 min)


@contextmanager
def exclusive(parent: Path, deadline: float, late: str) -> Iterator[None]:
    """Hold `parent`'s build lock (an exclusive `flock` on its LOCK file) for the block: one builder at a time, so
    processes that start at once on an empty cache (two daemons, a daemon and scripts/setup.sh) build once, the
    others waiting and then using that build, instead of each compiling the same source (minutes of CPU on a slow
    host). The kernel drops the lock with its holder, so a builder killed midway never blocks the next. Waits until
    `deadline` (time.monotonic()) at most: then RuntimeError(`late`)."""
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent / LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(late) from None
                time.sleep(min(POLL, left))
        yield
    finally:
        os.close(fd)  # (drops the lock)


@contextmanager
def private_build_dir(parent: Path) -> Iterator[Path]:
    """A new `build-*` folder under `parent`, locked as this process's until the block ends, then removed (left-over
    folders of dead builders removed first)."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep(parent)
    tmp = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    fd = -1
    try:
        fd = os.open(tmp / (OWNER + ".new"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else holds it
        os.replace(tmp / (OWNER + ".new"), tmp / OWNER)  # `.owner` is locked from the moment it exists
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if fd >= 0:
            os.close(fd)


def sweep(parent: Path) -> list[Path]:
    """Remove the `build-*` folders under `parent` whose builder is gone; the folders removed."""
    try:
        found = [p for p in parent.iterdir() if p.name.startswith(PREFIX)]
    except OSError:
        return []
    removed = []
    for folder in found:
        try:
            fd = os.open(folder / OWNER, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                old = time.time() - folder.stat().st_mtime > ORPHAN_SECONDS
            except OSError:
                continue
            if old:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            continue
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its builder is alive (or another sweep holds it)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed
