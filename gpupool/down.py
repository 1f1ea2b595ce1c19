"""`gpupool down`: stop the pool that `gpupool up` runs on a state folder, from any shell of the user who started it.

While it runs, `gpupool up` keeps `up.json` in its state folder (the folder of `--state`, owner-only): its pid and
the kernel's start time of that pid, its scheduler's and daemon's addresses and pids, and an exclusive lock
(flock) on that file, which the kernel drops when `up` ends, however it ends. `down` sends that `up` SIGTERM - its
stop: the daemon first (its sessions end with "host ... is shutting down", UNAVAILABLE, to their clients), then the
scheduler, each waited for (a terminal's Ctrl-C reaches the two with `up`: they stop together) - and waits until
the lock is free and the children are gone. A file whose lock nobody holds is stale (its `up` died): removed,
nothing signalled, so a pid the kernel gave since to another process is never killed; nor is a pid whose start time
or command line is not the recorded `gpupool up`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gpupool.config import add_flag
from gpupool.errors import InvalidArgument

RECORD = "up.json"
TIMEOUT = 90.0  # `up` bounds its stop (each child 15 s, then SIGKILL): this is a backstop


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command's name (which may hold spaces and parentheses): the state first,
    the parent's pid second; OSError where there is no such process (or no /proc)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()


def started(pid: int) -> int | None:
    """The kernel's start time of process `pid` (clock ticks after boot, /proc/PID/stat's 22nd field): with the pid
    it names one process, never a later one given the same pid. None where there is no such process (or no /proc)."""
    try:
        fields = _stat(pid)
    except OSError:
        return None
    return int(fields[19]) if len(fields) > 19 and fields[0] != "Z" else None  # a zombie has ended


def alive(pid: int, start: int | None) -> bool:
    """Whether the process `pid` that started at `start` (`started`) runs."""
    return start is not None and started(pid) == start


def descendants(pid: int) -> dict[int, int | None]:
    """`pid` and every process below it (its children, theirs: the daemon's zygote, its session workers, the log
    pumps), each with its start time (`started`); {} without /proc."""
    parents: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if entry.name.isdigit():
                    parent = int(_stat(entry.name)[1])
                    parents.setdefault(parent, []).append(int(entry.name))
    found: dict[int, int | None] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        found[p] = started(p)
        todo += parents.get(p, [])
    return found


def is_up(pid: int, start: int | None) -> bool:
    """Whether `pid` is the `gpupool up` that started at `start`: that start time, and `up` on its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return alive(pid, start) and "up" in argv[1:] and "gpupool" in " ".join(argv)


class PoolRecord:
    """`up`'s side: the state folder's `up.json`, locked for as long as this `up` runs."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / RECORD
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = read(self.fd).get("pid", "?")
            os.close(self.fd)
            raise InvalidArgument(already_runs(folder, other)) from None
        self.fields: dict[str, Any] = {"pid": os.getpid(), "start": started(os.getpid())}
        self.write()

    def write(self, **fields: Any) -> None:
        self.fields.update(fields)
        data = json.dumps(self.fields).encode()
        os.ftruncate(self.fd, 0)  # (`down` reads it again until it parses)
        os.pwrite(self.fd, data, 0)

    def child(self, name: str, pid: int, address: str | None = None) -> None:
        """Record the pid (and address) of the scheduler or daemon `up` started."""
        entry = {"pid": pid, "start": started(pid), "address": address or self.fields.get(name, {}).get("address")}
        self.write(**{name: entry})

    def close(self) -> None:
        """The pool stopped: the file removed (while still locked: only our own), then the lock dropped."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        os.close(self.fd)


def state_file(state: str) -> Path:
    """`--state` of `up` and `down`: the scheduler's state file, `DIR/scheduler.db` where it names a folder (until
    round 52 `up --state DIR` kept its keys and CA in DIR's parent and stopped: "unable to open database file", and
    `down --state DIR` checked DIR's parent: "/tmp is writable by other users")."""
    path = Path(state)
    return path / "scheduler.db" if path.is_dir() else path


def already_runs(folder: Path, pid: object) -> str:
    """The refusal of a second `gpupool up` on a state folder whose pool runs."""
    return (
        f"a pool already runs on {folder} (gpupool up, pid {pid}): `gpupool down` with its --state stops it; a second "
        "pool needs its own --state and ports"
    )


def running(folder: Path) -> dict[str, Any] | None:
    """The record of the `gpupool up` that runs on `folder` (it holds up.json's lock); None where none does."""
    try:
        fd = os.open(folder / RECORD, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return None if _free(fd) else read(fd)
    finally:
        os.close(fd)


def read(fd: int) -> dict[str, Any]:
    """The record in `fd` ({} when it holds none yet: `up` between its truncate and its write, tried again)."""
    for _ in range(50):
        try:
            data = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
        except ValueError:
            data = None
        if isinstance(data, dict):
            return data
        time.sleep(0.02)
    return {}


def _free(fd: int) -> bool:
    """Whether no `up` holds the record's lock (it ended)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def build_parser() -> argparse.ArgumentParser:
    from gpupool.up import default_state_dir

    p = argparse.ArgumentParser(prog="gpupool down", description=__doc__.split("\n")[0])
    add_flag(
        p,
        "--state",
        default=str(default_state_dir() / "scheduler.db"),
        help="the pool's scheduler state, as given to `gpupool up`, or its folder (which holds up.json)",
    )
    # $GPUPOOL_DOWN_TIMEOUT: $GPUPOOL_TIMEOUT, the name of every `--timeout`, until round 54 (still read, deprecated)
    add_flag(p, "--timeout", type=float, default=TIMEOUT, help="seconds to wait for the pool to stop",
             env="GPUPOOL_DOWN_TIMEOUT", old_env="GPUPOOL_TIMEOUT")  # fmt: skip
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    try:
        return stop(state_file(a.state), a.timeout)
    except (InvalidArgument, OSError) as exc:  # a folder of another user's, or one we may not read: one line
        print(f"gpupool down: {exc}", file=sys.stderr)
        return 1


def stop(state: Path, timeout: float) -> int:
    from gpupool.up import check_state_dir

    folder = state.parent
    none = f"gpupool down: no pool runs on {state} (`gpupool up` starts one)"
    if not folder.is_dir():
        print(none, file=sys.stderr)
        return 1
    check_state_dir(folder)  # ours alone, as `up` made it: nobody else's file names the process we signal
    try:
        fd = os.open(folder / RECORD, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        print(none, file=sys.stderr)
        return 1
    try:
        if _free(fd):
            rec = read(fd)
            with contextlib.suppress(OSError):
                if os.stat(folder / RECORD).st_ino == os.fstat(fd).st_ino:
                    os.unlink(folder / RECORD)
            print(f"{none[:-1]}; its gpupool up, pid {rec.get('pid', '?')}, ended without a stop: its up.json removed, "
                  "nothing signalled)", file=sys.stderr)  # fmt: skip
            return 1
        rec = read(fd)
        pid = int(rec.get("pid", 0))
        if not is_up(pid, rec.get("start")):  # (the lock held by another process than the one named)
            print(f"gpupool down: {folder / RECORD} names pid {pid}, which is not that gpupool up: nothing signalled",
                  file=sys.stderr)  # fmt: skip
            return 1
        tree = descendants(pid)  # (each waited for below: the daemon's zygote and workers end after the daemon)
        with contextlib.suppress(ProcessLookupError):  # (it ended just now: its lock is free below)
            os.kill(pid, signal.SIGTERM)
        print(f"gpupool down: stopping the pool on {state} (gpupool up, pid {pid})", file=sys.stderr, flush=True)
        deadline = time.monotonic() + timeout
        while not _free(fd):
            if time.monotonic() > deadline:
                print(f"gpupool down: gpupool up (pid {pid}) has not stopped within {timeout:g} s (its log says why; "
                      f"`kill -9 {pid}` ends it and its children)", file=sys.stderr)  # fmt: skip
                return 1
            time.sleep(0.1)
    finally:
        os.close(fd)
    # `up` waited for its scheduler and daemon; what ran below them ends after them (a daemon's zygote when the
    # daemon's end of its socket closes). One still there at the deadline (`up` killed meanwhile) gets SIGKILL.
    for name in ("daemon", "scheduler"):
        child = rec.get(name) or {}
        tree.setdefault(child.get("pid", pid), child.get("start"))
    while any(alive(p, start) for p, start in tree.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = [p for p, start in tree.items() if alive(p, start)]
    for p in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    stopped = [f"gpupool up (pid {pid})"]
    for name in ("daemon", "scheduler"):
        child = rec.get(name) or {}
        if child.get("pid"):
            stopped.append(f"its {name} {child.get('address') or ''} (pid {child['pid']})".replace("  ", " "))
    others = len(tree) - len(stopped)
    print(
        f"gpupool down: stopped {', '.join(stopped)}" + (f" and {others} processes under them" if others > 0 else "")
        + (f" ({len(killed)} killed: still there after {timeout:g} s)" if killed else "")
        + f"; the state in {folder} is kept for the next `gpupool up`"
    )  # fmt: skip
    return 0
