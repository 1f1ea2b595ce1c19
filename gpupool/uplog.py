"""The log of a detached `gpupool up` (`up --detach`): `up.log` in its state folder, capped at `--log-size`.

A detached `up` has no terminal: its own lines, and its scheduler's and daemon's (which it passes on), go to up.log.
Until round 52 they went there directly, and up.log grew for as long as the pool ran. Now `up` writes them into a pipe
that a small process of its own, the keeper (this module, run by `python -I -S`: no gpupool code, no imports but the
standard library's), appends to up.log; past `--log-size` bytes (default 10 MiB; 0: no cap) up.log is renamed
up.log.1 (replacing the one before) and a fresh up.log begun, at the start of a line: the log takes at most twice
`--log-size` on disk, and the last lines are always in up.log. up.log is opened O_APPEND, so logrotate's copytruncate
works on it too. The keeper ignores SIGINT, SIGTERM and SIGHUP (a stop's last lines are written) and ends once every
writer of the pipe has ended (`up`, which alone holds it: its children write into pipes of `up`'s own), so
`gpupool down`, which waits for every process under `up`, returns after the log's last line is written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

DEFAULT_BYTES = 10 * 1024**2


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _rotate(path: str, out: int) -> int:
    """`path` moved to `path`.1 and a fresh `path` opened (`out` kept where that fails: the cap is then missed)."""
    try:
        os.replace(path, f"{path}.1")
        fresh = _open(path)
    except OSError:
        return out
    os.close(out)
    return fresh


def keep(source: int, path: str, limit: int) -> None:
    """Append what `source` (a pipe) gives to `path` until its end, moving `path` to `path`.1 at a line's start
    whenever the next line would take it past `limit` bytes (0: never)."""
    out = _open(path)
    at_start = True  # the file ends with a newline (or is empty): where it may be rotated
    while True:
        try:
            chunk = os.read(source, 1 << 16)
        except InterruptedError:
            continue
        if not chunk:
            break
        for piece in chunk.splitlines(keepends=True):
            if limit and at_start:
                size = os.fstat(out).st_size  # (not counted: a copytruncate shrinks it under us)
                if size and size + len(piece) > limit:
                    out = _rotate(path, out)
            view = memoryview(piece)
            try:
                while view:
                    view = view[os.write(out, view) :]
            except OSError:  # (a full disk: the line is lost, never the pipe, whose writer would fail next)
                pass
            at_start = piece.endswith((b"\n", b"\r"))
    os.close(out)


STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # ignored: it ends when `up` does (its pipe's end)


def _ignore_stops() -> None:
    for sig in STOPS:
        signal.signal(sig, signal.SIG_IGN)


def start(source: int, path: str, limit: int) -> subprocess.Popen[bytes]:
    """The keeper of `path`, reading the pipe `source`: its stop signals ignored from its first instruction (an exec
    keeps an ignored signal ignored; set in its `main` only, a SIGTERM to `up`'s process group in its first
    milliseconds - Ctrl-C of `up --detach` while it starts - ended it before it set them)."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", __file__, path, str(limit)], stdin=source, stdout=subprocess.DEVNULL,
        preexec_fn=_ignore_stops,  # noqa: PLW1509 - signal dispositions only, no locks taken
    )  # fmt: skip


def main(argv: list[str]) -> None:
    """The keeper: `uplog.py PATH LIMIT`, the pipe on its stdin."""
    _ignore_stops()
    keep(0, argv[0], int(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
