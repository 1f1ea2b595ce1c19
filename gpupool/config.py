"""Shared configuration helpers: sizes ("8GiB"), host:port addresses, flags that fall back to GPUPOOL_* env vars.

Each program keeps its own frozen ``Config`` dataclass; this module only gives them one way to read flags.
"""

from __future__ import annotations

import argparse
import functools
import grp
import importlib.machinery
import importlib.util
import logging
import os
import pwd
import re
import resource
import select
import signal
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from "8GiB", "512MiB", "6GB", "1024" (plain numbers are bytes)."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"negative size {text}")
        return text
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 8GiB, 512MiB, 6GB, 1048576)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """Human-readable binary size: 8589934592 -> '8.0GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def split_address(address: str) -> tuple[str, int]:
    """("127.0.0.1", 50051) from "127.0.0.1:50051"; "[::1]:5" and ":5" work too."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not a HOST:PORT address: {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def env_name(flag: str) -> str:
    """--fake-gpu-memory -> GPUPOOL_FAKE_GPU_MEMORY."""
    return "GPUPOOL_" + flag.lstrip("-").replace("-", "_").upper()


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    default: Any = None,
    type: Callable[[str], Any] = str,
    help: str,
    shown_as: Callable[[Any], str] = str,
    env: str = "",
    old_env: str = "",
    **kwargs: Any,
) -> None:
    """Add `--flag` whose default comes from $GPUPOOL_FLAG when set (`env`: another name, where GPUPOOL_FLAG says too
    little: `gpupool down --timeout`'s $GPUPOOL_DOWN_TIMEOUT); the help text names the variable and shows the
    default as `shown_as` writes it (a connection string without its password; a size as its flag takes it, 8GiB
    not 8589934592). `old_env`: the variable's former name, still read where `env` is not set, with a line saying
    it is deprecated."""
    if type is size_arg and shown_as is str:
        shown_as = _size_text
    env = env or env_name(flag)
    read = env
    if old_env in os.environ and env not in os.environ:
        print(f"{parser.prog}: ${old_env} ({flag}) is deprecated: set ${env} instead (read this time)", file=sys.stderr)
        read = old_env
    if read in os.environ:
        raw = os.environ[read]
        if kwargs.get("action") == "store_true":
            default = raw.strip().lower() in ("1", "true", "yes", "on")
        else:
            try:
                default = type(raw)
            except (ValueError, TypeError) as exc:
                parser.error(f"${read}={raw!r}: {exc}")
    shown = "" if default in (None, False, "") else f" (default: {shown_as(default)})"
    if kwargs.get("action") == "store_true":
        parser.add_argument(flag, default=default, help=f"{help}{shown} [env {env}]", **kwargs)
    else:
        parser.add_argument(flag, default=default, type=type, help=f"{help}{shown} [env {env}]", **kwargs)


def _size_text(n: int) -> str:
    """A size as `--help` shows it: in the largest binary unit that divides it (16MiB), else in bytes."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def size_arg(text: str) -> int:
    """argparse type for sizes."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


class UnsafeCacheDir(PermissionError):
    """A cache folder that another user could write into: a library built there could be replaced under us."""


FLUSH_OPS_DEFAULT = 32  # client/torch/runtime.py FLUSH_OPS: commands queued before a frame goes out
FLUSH_OPS_MAX = 65536  # the most commands a frame (native_client.cpp checks the same bound)
_WHOLE_RE = re.compile(r"\s*\+?[0-9]{1,6}\s*", re.ASCII)


def flush_ops(environ: Any = None) -> int:
    """$GPUPOOL_FLUSH_OPS, the commands a client queues before a frame goes out (unset or empty: 32): the one parser
    of both clients (client/torch/runtime.py, and client/native/backend.py, which hands it to the C++ client). A value
    that is not a whole number from 1 to FLUSH_OPS_MAX raises ValueError with one line naming the variable."""
    text = (os.environ if environ is None else environ).get("GPUPOOL_FLUSH_OPS", "")
    if not text.strip():
        return FLUSH_OPS_DEFAULT
    n = int(text) if _WHOLE_RE.fullmatch(text) else 0  # not int()'s "1_000" or "\u0661"
    if not 1 <= n <= FLUSH_OPS_MAX:
        raise ValueError(f"GPUPOOL_FLUSH_OPS={text} is not a number of commands from 1 to {FLUSH_OPS_MAX}")
    return n


def fused_sdpa(environ: Any = None) -> bool:
    """$GPUPOOL_FUSED_SDPA, whether `scaled_dot_product_attention` on gpupool may take the fused backend (one record a
    call, run fused by the daemon: server/attention.py): 1 (the default, also when unset or empty) or 0 (torch's math
    path). The one parser of both clients (client/torch/native.py, and client/native/backend.py, which hands it to
    the C++ client at connect); any other value raises ValueError with one line naming the variable."""
    text = (os.environ if environ is None else environ).get("GPUPOOL_FUSED_SDPA", "")
    value = text.strip()
    if not value:
        return True
    if value not in ("0", "1") or not text.isascii():
        raise ValueError(f"GPUPOOL_FUSED_SDPA={text} is not 0 (torch's math path) or 1 (the fused backend)")
    return value == "1"


def withheld_features(environ: Any = None) -> frozenset[str]:
    """$GPUPOOL_WITHHOLD_FEATURES, for `gpupool serve`: feature names (gpupool/protocol.py FEATURES, comma- or
    space-separated) the daemon neither names in AttachReply.features nor serves, as a daemon from before them would
    (to test clients against it, or to turn a feature off). Empty (the default): none withheld. An unknown name raises
    ValueError with one line naming the variable."""
    from gpupool import protocol

    text = (os.environ if environ is None else environ).get("GPUPOOL_WITHHOLD_FEATURES", "")
    names = frozenset(re.split(r"[\s,]+", text.strip())) - {""}
    unknown = sorted(names - set(protocol.FEATURES))
    if unknown:
        raise ValueError(f"GPUPOOL_WITHHOLD_FEATURES={text}: {', '.join(unknown)} is not a feature of this daemon "
                         f"({', '.join(protocol.FEATURES)})")  # fmt: skip
    return names


def cache_dir(name: str, env: str) -> Path:
    """A folder of gpupool's cache: `$ENV` when set, else `$XDG_CACHE_HOME/gpupool/NAME` (default
    `~/.cache/gpupool/NAME`): where builds that outlive a process (the client's device guard and C++ client, the
    daemon's native runner) are kept. Those builds are shared libraries this process loads, so the folder is
    created owner-only when missing and refused (`UnsafeCacheDir`) when another user could plant a file in it:
    see `check_private_dir`."""
    explicit = os.environ.get(env)
    if explicit:
        path = Path(explicit)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "gpupool" / name
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_dir(path)
    return path


def check_private_dir(
    path: Path, what: str = "cache folder", risk: str = "a library built there could be replaced"
) -> None:
    """Raise UnsafeCacheDir unless only this user (and root) can change what `path` holds: the folder and every
    folder above it (symbolic links resolved) belong to this user or root, and none is writable by others, or by a
    group other than this user's private group or root's (`_private_group`: umask 002 on a system with user-private
    groups is fine) - except, above the folder itself, one with the sticky bit (/tmp), where others cannot rename
    what is ours. Until round 28 any folder of this process's own group passed: with a primary group shared by
    several users (`users`, `staff`) and umask 002, each of them could plant a library in it."""
    real = Path(os.path.realpath(path))
    me = os.geteuid()
    for i, folder in enumerate((real, *real.parents)):
        st = folder.stat()
        if st.st_uid not in (me, 0):
            raise UnsafeCacheDir(f"{what} {path}: {folder} belongs to uid {st.st_uid}, not this user")
        others = bool(st.st_mode & stat.S_IWOTH)
        group = bool(st.st_mode & stat.S_IWGRP) and not _private_group(st.st_gid)
        if (others or group) and (i == 0 or not st.st_mode & stat.S_ISVTX):
            raise UnsafeCacheDir(
                f"{what} {path}: {folder} is writable by {_writers(others, st.st_gid)} "
                f"(mode {stat.S_IMODE(st.st_mode):o}); {risk}: use a folder only "
                f"you can write (chmod {'go' if others else 'g'}-w)"
            )


def _private_group(gid: int) -> bool:
    """Whether group `gid` is this user's private group, so that its write bit lets no one else in: this process's
    own group, named as this user, listing no other member, and no other account's primary group (the user-private
    group convention, which umask 002 assumes). A group that cannot be looked up is not. Root's group (gid 0) is
    trusted as root is (its members are the administrator's choice): a container running an arbitrary uid in group 0
    with group-writable folders (OpenShift's convention) keeps its caches."""
    if gid != os.getegid():
        return False
    return gid == 0 or _private_group_of(os.geteuid(), gid)


@functools.lru_cache(maxsize=8)
def _private_group_of(uid: int, gid: int) -> bool:
    try:
        name = pwd.getpwuid(uid).pw_name
        entry = grp.getgrgid(gid)
    except KeyError:
        return False
    if entry.gr_name != name or any(member != name for member in entry.gr_mem):
        return False
    try:
        return all(p.pw_uid == uid or p.pw_gid != gid for p in pwd.getpwall())
    except OSError:
        return False


def _writers(others: bool, gid: int) -> str:
    """Who else can write a file or folder, in words (its mode's write bits, `_private_group`)."""
    if others:
        return "other users"
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        name = str(gid)
    return f"other users (group {name}, gid {gid}, is not this user's private group)"


def check_private_file(path: Path) -> None:
    """Raise UnsafeCacheDir unless only this user (and root) can change the file `path` (a cached build about to be
    loaded): it belongs to this user or root and is writable by no other user (nor a group other than this user's
    private group or root's: `_private_group`), and its folder, where a rename could swap it, passes
    `check_private_dir` (symbolic links resolved).
    `cache_dir` checks the cache's root only: a build's own folder below it (`torch-*/`) or the library itself made
    writable by others (a build under umask 0, a `chmod`) let another user replace the code a daemon imports."""
    real = Path(os.path.realpath(path))
    check_private_dir(real.parent)
    _check_private_stat(path, real.stat())


def open_private_file(path: Path) -> int:
    """`path` opened for reading, then checked as `check_private_file` checks a path, but on what was opened: the
    open file's owner and mode (fstat) and the folder it was opened in (its /proc/self/fd link). Load it as
    `/proc/self/fd/N`: `check_private_file` then a load by name left a window in which a symbolic link on the way
    (a cache named under /tmp, its link another user's) could be pointed elsewhere after the check. The caller
    closes the descriptor; UnsafeCacheDir (closed) when refused. Opened without waiting (O_NONBLOCK, O_NOCTTY) and
    refused unless a regular file: a named pipe planted where a build is looked for (a folder others can write, refused
    only after the open) held the opening process for good, and a device is no build."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeCacheDir(f"cached file {path} is not a regular file (mode {st.st_mode:o})")
        os.set_blocking(fd, True)
        check_private_dir(Path(os.readlink(f"/proc/self/fd/{fd}")).parent)
        _check_private_stat(path, st)
    except BaseException:
        os.close(fd)
        raise
    return fd


_LOADED_FDS: list[int] = []  # the descriptors `load_name` named to the dynamic loader: open for good


def load_name(fd: int) -> str:
    """`/proc/self/fd/N` for a library opened by `open_private_file` that this process loads for good (the clients'
    device guard, native op path and C++ client), its descriptor kept open from now on: the dynamic loader knows a
    loaded library by the name it was given and answers a later load of that name with it, so a number closed and
    reused for another library would load the first one again (seen: the op path's `/proc/self/fd/13` answered the
    guard's load of the same name, "undefined symbol: gpupool_current_device"). One descriptor a library."""
    _LOADED_FDS.append(fd)
    return f"/proc/self/fd/{fd}"


def load_private(path: Path, load: Callable[[str], _T]) -> _T:
    """`load(name)` of the library at `path`, checked as opened and loaded as opened (`open_private_file`,
    `load_name`: no name looked up again between the check and the load): `ctypes.CDLL`, or an extension's import.
    A load that fails before the dynamic loader took the library (not an ELF file, an undefined symbol) gives its
    descriptor back: until round 28 it stayed open for good, one a failed attempt. One the loader took (an
    extension whose init then raised) keeps it, as `load_name` says."""
    fd = open_private_file(path)
    name = load_name(fd)
    try:
        return load(name)
    except BaseException:
        if not _dl_loaded(name):
            _LOADED_FDS.remove(fd)
            os.close(fd)
        raise


def _dl_loaded(name: str) -> bool:
    """Whether the dynamic loader holds a library loaded as `name` (dlopen with RTLD_NOLOAD: it loads nothing)."""
    import ctypes

    try:
        ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return False
    return True


def import_private_extension(name: str, path: Path) -> Any:
    """The Python extension module `name` built at `path`, checked as opened and imported as opened
    (`load_private`), its `__file__` naming `path`; UnsafeCacheDir when refused. The clients' native op path and the
    daemon's native runner."""

    def load(opened: str) -> Any:  # (no .so suffix: the loader is named)
        loader = importlib.machinery.ExtensionFileLoader(name, opened)
        spec = importlib.util.spec_from_file_location(name, opened, loader=loader)
        if spec is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module

    module = load_private(path, load)
    module.__file__ = str(path)
    return module


def _check_private_stat(path: Path, st: os.stat_result) -> None:
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafeCacheDir(f"cached library {path} belongs to uid {st.st_uid}, not this user")
    writers = _other_writers(st)
    if writers:
        raise UnsafeCacheDir(
            f"cached library {path} is writable by {writers} (mode {stat.S_IMODE(st.st_mode):o}): "
            f"it could be replaced; remove it (it is built again) or chmod go-w"
        )


def _other_writers(st: os.stat_result) -> str:
    """Who other than the owner may write the file of `st`, in words ("" when nobody): other users by the mode, or
    a group other than this user's private group or root's (`_private_group`)."""
    others = bool(st.st_mode & stat.S_IWOTH)
    if others or (st.st_mode & stat.S_IWGRP and not _private_group(st.st_gid)):
        return _writers(others, st.st_gid)
    return ""


class UnsafeFile(PermissionError):
    """A file the program trusts (keys, credentials) that others than its owner may write."""


def read_trusted(path: str | os.PathLike[str], what: str, *, secret: bool = False) -> bytes:
    """The bytes of a file the program trusts - the token signing key, the token public keys a daemon admits
    sessions by, the scheduler's credentials (hashes of API tokens and their roles), TLS private keys and CA
    bundles -, refused (UnsafeFile) when a user other than its owner may write it (`open_trusted`). Whoever could
    write such a file could add a public key of their own (and mint tokens for any lease of the host), an admin
    line, a CA of their own, or a signing key they know. `secret`: a private key or an API token, refused also when
    other users may read it."""
    fd = open_trusted(path, what, secret=secret)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def open_trusted(path: str | os.PathLike[str], what: str, *, secret: bool = False) -> int:
    """`path` opened for reading and checked as opened (fstat, so a rename between a check and the read changes
    nothing): refused (UnsafeFile, closed) when a user other than its owner may write it - the other users (a mode
    like 0666, a shared folder under umask 0), or a group other than the reader's private group or root's
    (`_private_group`, as for build caches) -, when it is not a regular file (a named pipe: refused without waiting
    on it), and, with `secret` (a private key: the token signing key, a TLS key; an API token), when other users may
    read it (mode bits for others: a group's read bit is how a deployment shares a key with a service's group,
    root:gpupool 0640, or Kubernetes with a pod's fsGroup). The caller closes the
    descriptor; a library that wants a path (`ssl`) reads it as `/proc/self/fd/N`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{what} {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        writers = _other_writers(st)
        if writers:
            raise UnsafeFile(
                f"{what} {path} is writable by {writers} (mode {mode:o}): refused, as anyone who can write it could "
                f"change whom this program trusts (chmod go-w {path})"
            )
        if secret and st.st_mode & stat.S_IROTH:
            raise UnsafeFile(
                f"{what} {path} is readable by other users (mode {mode:o}): refused, a secret (a private key, an API "
                f"token) must be readable by its owner (and a group it is shared with) only (chmod o-rwx {path})"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_secret(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a secret (a private key, an API token) to `path`, readable by its owner only, as a new file renamed over
    the path: never into the file that was there. Whoever could read that one (a key left 0644: why it is being
    replaced) and holds it open keeps reading the old bytes, and a path that is another user's file is replaced,
    not written into (O_TRUNC wrote the new secret into the old file, where a descriptor opened earlier reads it
    whatever mode the file gets afterwards). The file is 0600 whatever the umask, from its creation on."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken bits from O_CREAT's mode, never added any: this is exact
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StopSignals:
    """SIGINT and SIGTERM (`signums`) waited for by the main thread, with handlers that do nothing in Python: the C
    handler writes the signal's number to a pipe (`signal.set_wakeup_fd`, whichever thread the kernel delivered it
    to) and `wait` reads it. The daemon's handler logged ("got SIGINT: draining") and set an Event: a handler runs in
    the main thread between two bytecodes, and where that thread held a non-reentrant lock, the log sink's
    (gpupool/logsink.py `LineSink.put`, in the first signal's handler when `gpupool up`'s SIGTERM followed a
    terminal's SIGINT, or in `logging.shutdown`'s flush) or the Event's, the handler waited for it forever: the
    daemon never stopped, and `up` killed it after 15 s with its last lines unwritten (journey40: 2 of 5 stops).
    `gpupool up` waits on one too since round 41 (its handler set an Event, whose lock the main thread held inside
    the Event's wait: the same deadlock)."""

    def __init__(self, signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signums = signums
        self.got: int | None = None
        self._read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)  # (the main thread only; the write end kept for good)
        for signum in signums:
            signal.signal(signum, _no_op)

    def wait(self, timeout: float | None = None) -> int | None:
        """The first of `signums` received, waiting for it at most `timeout` s (None: until one comes); None if none
        came in time."""
        if self.got is None:
            ready = select.select([self._read], [], [], timeout)[0]
            while ready:
                try:
                    data = os.read(self._read, 256)
                except BlockingIOError:
                    break
                self.got = next((n for n in data if n in self.signums), self.got)
                if self.got is not None:
                    break
        return self.got


def _no_op(_signum: int, _frame: object) -> None:
    """A handler that runs no Python of its own (see `StopSignals`): its being there makes the C handler write the
    wakeup byte and keeps Python's default (KeyboardInterrupt, the end of the process) from running."""


def more_open_files() -> None:
    """The soft limit of open descriptors raised to the hard one (the scheduler's and the daemon's `main`): every
    connection holds one from its accept on, before any TLS handshake or credential, and with systemd's soft default
    of 1,024 one client that opened 1,100 connections refused every other caller (round 37; `tls.HANDSHAKE_OPTION`).
    The hard limit is the operator's (`LimitNOFILE`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or hard == resource.RLIM_INFINITY:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        logging.getLogger(__name__).warning("open files limited to %d (cannot raise it to %d: %s)", soft, hard, exc)
        return
    logging.getLogger(__name__).info("open files: at most %d (was %d)", hard, soft)


def setup_logging(program: str, level: str | None = None, background: bool = False) -> None:
    """One log format per program: time, program, level, logger, message. `background`: lines go to stderr from a
    thread of their own and a log call never waits on it (gpupool/logsink.py; the daemon's and the scheduler's: a
    stderr pipe nobody read stalled every session, every scheduler call), Python's warnings with them; and (unless
    GPUPOOL_STDERR_DIRECT=1) descriptor 2 becomes a pipe this process drains itself (`logsink.install`), so that
    nothing else written there waits on stderr either (tracebacks Python prints, gRPC's and torch's C++ output)."""
    level = level or os.environ.get("GPUPOOL_LOG_LEVEL", "INFO")
    handlers: list[logging.Handler] | None = None
    if background:
        from gpupool import logsink

        if os.environ.get("GPUPOOL_STDERR_DIRECT", "") not in ("1", "yes", "true"):
            logsink.install()
        handlers = [logsink.BackgroundStderr()]
        logging.captureWarnings(True)
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s {program} %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
    )
