"""Private build folders in a shared build cache (the C++ client, client/native/build.py; the daemon's native runner,
server/native_runner.py): each build runs in a `build-*` folder of its own and moves its result into place.

A build killed midway (SIGKILL, SIGTERM, a lost machine) never runs its `finally`, so its folder stayed behind with
its object files, for good. Now each builder holds an exclusive `flock` on the folder's `.owner` file for as long as
it builds (a file that appears already locked: made under another name, locked, then renamed), and every build
(and every use of a cached library) first removes the `build-*` folders whose `.owner` it can lock: their builder is
gone (the kernel drops a lock with its process). A live builder's folder is never touched, whatever its age, so
concurrent builders stay safe. A folder without an `.owner` (an older gpupool's, or a builder killed between making
the folder and its lock) is removed once older than ORPHAN_SECONDS, far more than a build takes.

The native runner's build and the C++ client's take their cache folder's build lock (`exclusive`) for the whole build:
processes that start on an empty cache at once build it once (the others wait, bounded, then use that build). A waiter
blocks in `flock` itself (in a helper process: `_wait_lock`), so it has the lock the moment its holder lets go.

Both builds run `torch.utils.cpp_extension.load` in a process of their own (`run_build`), the leader of a session of
its own, which dies with the process that started it and takes the whole session with it (ninja and each compiler,
which ninja starts in process groups of their own): PR_SET_PDEATHSIG tells it when its parent dies (SIGKILL
included), and it kills its session's other processes (`kill_session`) before it exits. Round 37 saw a build run on
for minutes after its daemon was killed. The library is moved into place only by the builder, after a build that
succeeded, so a killed build leaves no library, only its `build-*` folder, which the next build or use removes.

A build takes minutes on a loaded host (the runner's 275 s at load ~15 on 2 cores, round 48), and said "~60 s" once
and then nothing until round 49. Now each says up front what it expects at this machine's load (`estimate`: its CPU on
an idle core stretched by the load per core), and `run_build` reports every PROGRESS_EVERY seconds while the compiler
runs (`progress_line`: the time so far, the CPU the build's processes used against what a build takes, what the
compiler is on). A failed build is one line: the compiler's first error (`failure_line`), not ninja's "build
stopped: subcommand failed." nor 300 characters of a command line.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = "build-"
OWNER = ".owner"  # locked by the builder for as long as it builds
LOCK = ".build-lock"  # in a cache folder: locked by the one process that builds into it (`exclusive`)
ORPHAN_SECONDS = 3600.0  # a folder with no `.owner` this old is left over (a build takes 1-2 min)
PROGRESS_EVERY = 15.0  # seconds between two progress lines of a build (`run_build`'s `progress`)


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
        if not _try_lock(fd) and not _wait_lock(fd, deadline):
            raise RuntimeError(late)
        yield
    finally:
        os.close(fd)  # (drops the lock)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


# The helper of `_wait_lock`: blocks in flock on the descriptor it inherited (argv[1]), then says so (one byte).
_WAITER = "import fcntl, os, sys; fcntl.flock(int(sys.argv[1]), fcntl.LOCK_EX); os.write(1, b'1')"


def _wait_lock(fd: int, deadline: float) -> bool:
    """Wait for the lock on `fd` until `deadline`; whether it is held. A `flock` lock belongs to the open file
    description, so a helper process given `fd` blocks in `flock` for this one and the lock is this process's the
    moment its holder lets go (round 37 tried again every 0.2 s); past the deadline the helper is killed. A process,
    not a thread: a thread blocked in `flock` cannot be stopped, and the zygote (the native runner's builder) must
    stay single-threaded for its forks. Where the helper ends without the lock (it could not start), the wait goes
    on by trying again every 0.2 s."""
    try:
        helper = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WAITER, str(fd)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        helper = None
    if helper is not None:
        assert helper.stdout is not None
        try:
            select.select([helper.stdout], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            helper.kill()  # (had it the lock, the description keeps it: `_try_lock` below succeeds)
            helper.wait()
            helper.stdout.close()
    while not _try_lock(fd):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(0.2, left))
    return True


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


def session_members(sid: int) -> list[int]:
    """The live processes of session `sid` (/proc/PID/stat's sixth field, read past the command's closing
    parenthesis; a zombie, state Z, is dead already: its parent or init reaps it)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != b"Z":
            found.append(int(name))
    return found


def kill_session(sid: int, spare: int = 0) -> None:
    """SIGKILL every process of session `sid` but `spare`: its process group is not enough, since ninja starts each
    compiler in a process group of its own (round 37: a killed build's `c++` ran on)."""
    for _ in range(20):  # again while any is left: ninja, before its kill landed, may have started another
        members = [pid for pid in session_members(sid) if pid != spare]
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


# What `run_build`'s process runs: `_build_main(parent pid, cpp_extension.load's keyword arguments as JSON, the
# seconds it lasts at least)`.
_BUILD = "import sys; from gpupool import buildcache as b; b._build_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])"
PR_SET_PDEATHSIG = 1


def run_build(
    spec: dict[str, object],
    deadline: float,
    late: str,
    at_least: float = 0.0,
    progress: Callable[[str], None] | None = None,
    what: str = "the build",
    cpu: float = 0.0,
    every: float | None = None,
) -> tuple[int, str]:
    """`torch.utils.cpp_extension.load(**spec)` in a process of its own, the leader of a new session, by `deadline`
    (time.monotonic()): its exit status and its output (stdout and stderr). Past the deadline, or when this thread
    is interrupted, the whole session is killed (its compilers too), then RuntimeError(`late`) or the interruption.
    Should this process die first (SIGKILL included), the build's leader hears of it (PR_SET_PDEATHSIG: of the
    thread that started it, so call this from a thread that waits for it, as this does) and kills its session.
    `at_least`: the build lasts at least this many seconds (tests, as a slow host). `progress`: called with a line
    (`progress_line` of `what` and `cpu`, the CPU seconds a build takes) every `every` seconds (None: PROGRESS_EVERY)
    while it runs, from this thread (no thread of its own: the zygote that builds the runner must stay
    single-threaded for its forks)."""
    every = PROGRESS_EVERY if every is None else every
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILD, str(os.getpid()), json.dumps(spec), repr(float(at_least))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a session of its own: killed whole, its compilers too (`kill_session`)
    )
    began = time.monotonic()
    due = began + every if progress is not None else deadline
    try:
        while True:
            try:  # (communicate again after its timeout loses no output: Python's documented retry)
                out = proc.communicate(timeout=max(0.0, min(due, deadline) - time.monotonic()))[0]
                break
            except subprocess.TimeoutExpired:
                if progress is None or time.monotonic() >= deadline:
                    raise
                progress(progress_line(what, time.monotonic() - began, session_cpu(proc.pid), cpu, proc.pid))
                due += every
    except BaseException as exc:  # late (or interrupted): the whole session goes, its leader not yet reaped
        kill_session(proc.pid)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise RuntimeError(late) from None
        raise
    return proc.returncode, out


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def expected_seconds(cpu: float) -> float:
    """How long a build of `cpu` seconds of CPU (one compiler at a time, as torch's builds of one source are) takes
    here now, about: its CPU stretched by the load per core (the 1-minute load average, the compiler counted), never
    less than the CPU itself. (Round 48's runner: ~45 s of CPU; 275 s at load ~15 on 2 cores, this says 6.2 min.)"""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return cpu * max(1.0, (load + 1.0) / cores())


def duration(seconds: float) -> str:
    """'45 s', '4 min', '4 min 30 s' (from 90 s on, in whole ten seconds, rounded down)."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(seconds) // 10 * 10, 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def estimate(cpu: float) -> str:
    """What a build of `cpu` seconds of CPU should take here, in words: 'about 4 min at this load (load 5.2 on 2
    cores; 45 s of CPU on an idle core)'."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    wait = expected_seconds(cpu)
    about = duration(wait) if wait < 90 else f"{max(2, round(wait / 60.0))} min"  # (an estimate: whole minutes)
    return f"about {about} at this load (load {load:.1f} on {cores()} cores; {cpu:.0f} s of CPU on an idle core)"


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def session_cpu(sid: int) -> float:
    """CPU seconds (user + system) that session `sid`'s processes used so far: each live one's own, and its waited-for
    children's (the compilers ninja ran and reaped: /proc/PID/stat's utime, stime, cutime, cstime)."""
    total = 0
    for pid in session_members(sid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])
        except (OSError, IndexError, ValueError):
            continue
    return total / _TICKS


def _compiling(sid: int) -> str:
    """What the build in session `sid` is doing now: 'compiling native_runner.cpp', 'linking', or ''."""
    names = []
    for pid in session_members(sid):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            if comm in ("cc1plus", "cc1"):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
                source = next((a for a in args if a.endswith((b".cpp", b".cc", b".cxx", b".c"))), b"")
                names.append("compiling " + (os.path.basename(source.decode(errors="replace")) or "C++"))
            elif comm in ("ld", "collect2", "ld.bfd", "ld.gold", "ld.lld"):
                names.append("linking")
        except OSError:
            continue
    return ", ".join(sorted(set(names)))


def progress_line(what: str, elapsed: float, used: float, cpu: float, sid: int = 0) -> str:
    """One progress line of a build: 'still building the native runner: 1 min 30 s so far, 38 s of CPU of the ~45 s a
    build takes on an idle core (compiling native_runner.cpp; load 5.2 on 2 cores)'. ("still": the build's first line,
    "building the native client (...)", stays the one that starts "building", which callers and tests count.)"""
    try:
        load = f"load {os.getloadavg()[0]:.1f} on {cores()} cores"
    except OSError:
        load = f"{cores()} cores"
    doing = _compiling(sid) if sid else ""
    of = f" of the ~{cpu:.0f} s a build takes on an idle core" if cpu > 0 else ""  # (more on a busy one)
    # The time left at the pace so far: `estimate`'s load-stretched guess, the build's first line, is coarse (round
    # 54's walk: "about 11 min" at load 27, niced processes counted; the runner built in 3 min 20 s)
    if cpu > used >= 0.1 * cpu and elapsed > 0:
        of += f", about {duration((cpu - used) * elapsed / used)} left at this pace"
    where = f"{doing}; {load}" if doing else load
    return f"still building {what}: {duration(elapsed)} so far, {used:.0f} s of CPU{of} ({where})"


_ERROR = re.compile(r"\berror:|\bfatal error\b|undefined reference", re.IGNORECASE)


def failure_line(out: str, code: int) -> str:
    """The one line that says why a build failed, from its output: the compiler's first error (`file:line:col: error:
    ...`, a linker's undefined reference, 'c++: fatal error: Killed signal terminated program cc1plus'), else the
    last line that is not ninja's own 'build stopped' nor a traceback's frame, else its exit status."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for ln in lines:
        if _ERROR.search(ln) and not ln.startswith(("RuntimeError:", "subprocess.CalledProcessError", "Traceback")):
            return ln[:300]
    for ln in reversed(lines):
        if not ln.startswith(("ninja: build stopped", "File ", "^")):
            return ln[:300]
    return f"exit status {code}"


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's waited-for children so far: its delta around `run_build` is
    the build's (the build's process waits for ninja, which waits for its compilers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _build_main(parent: int, spec: str, at_least: str) -> None:
    """The build's process (`run_build`): a session leader that ends its session when its parent dies."""
    import ctypes

    started = time.monotonic()

    def end(*_: object) -> None:
        kill_session(os.getpid(), spare=os.getpid())
        os._exit(1)

    signal.signal(signal.SIGTERM, end)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # its parent died before the prctl: nobody waits for this build
        end()
    from torch.utils import cpp_extension

    cpp_extension.load(**json.loads(spec))
    time.sleep(max(0.0, float(at_least) - (time.monotonic() - started)))
