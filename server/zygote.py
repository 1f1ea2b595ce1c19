"""The zygote: a warm, single-threaded process that forks session workers.

Forking the daemon itself would copy a process full of gRPC and executor threads (and, on a GPU host, maybe a
CUDA context): unsafe. So the daemon starts the zygote once (`python -m gpupool.server.zygote FD`, a fresh
interpreter, before any session exists): it imports torch and the executor, loads torch's meta kernels, and
never touches CUDA. Each Attach asks it for a worker: the daemon sends the worker's socket and progress word
over the control socket (SCM_RIGHTS) with a JSON spec; the zygote forks, and the child runs
`worker.worker_main`. Forking a warm process costs milliseconds, not the seconds of importing torch.

The zygote is the workers' parent: it reaps them and tells the daemon how each ended (exit code or signal),
and it kills a worker on request (only its own live children, so a recycled pid is never hit). It dies when
the daemon closes the control socket (or with the daemon's supervisor thread, PDEATHSIG); a zygote that dies
is started again by that thread, and the workers it had keep serving their sessions: a worker ends when the
daemon closes its socket (the session ends, or the daemon dies), not with its parent.

Messages are JSON lines over a Unix socket: the zygote and the daemon trust each other; workers never talk
on this socket.

Single-threaded means at each fork: a thread that holds a lock (malloc's, OpenMP's, the import lock) when the
process forks leaves that lock held forever in the child, whose first use of it deadlocks the session's worker.
Importing torch starts one thread here: OpenBLAS's thread pool (numpy's copy, which torch's import loads; on a
16-core host, 15 threads), idle on a condition variable. OpenBLAS stops and joins it itself before every fork
(`blas_thread_shutdown_`, its pthread_atfork handler), and the zygote stops it the same way once it is warm
(`_stop_blas_threads`), so the zygote is single-threaded from its ready message on and nothing restarts the pool (only a
threaded BLAS call would). The zygote checks it (`_other_threads`, the count Python 3.12's fork() warning reads) when
it is ready and after each fork, and names any other thread to the daemon, which logs it as an error: a library
that starts a thread the zygote does not know how to stop is found at the first start, not as a hung worker.
"""

from __future__ import annotations

import array
import collections
import ctypes
import fcntl
import json
import logging
import mmap
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from gpupool import buildcache, protocol

from . import nvml, runner_source
from .worker import SHARED_BYTES, ProcessRunner, WorkerSpec

log = logging.getLogger(__name__)
_LOG_FORMAT = "%(asctime)s gpupool-zygote %(levelname)s %(name)s: %(message)s"
OWN_BYTES = 64 * 1024  # the zygote's own log lines kept while its stderr has no room (`StderrSink.log`)
OWN_RETRY_MS = 100  # ... tried again this often meanwhile (and the end of a line a write cut)
# The zygote's start (importing torch on a loaded host), not counting a build of the native runner: a zygote that
# builds one says so (`{"building": ...}`, `_build_runner`), and the daemon then waits for the build (bounded by the
# build's own bound, server/native_runner.py `build_timeout`, plus BUILD_GRACE) with this bound stopped.
START_TIMEOUT = 120.0
# Test-only (tests/integration/test_first_start.py): the daemon's bound on its zygote's start in seconds, in place of
# START_TIMEOUT, so that a build longer than the bound lasts seconds, not minutes. Never set it on a real host.
START_TIMEOUT_TEST_ENV = "GPUPOOL_TEST_ZYGOTE_START_SECONDS"
BUILD_GRACE = 30.0  # beyond the build's own bound: a zygote that overran it is stuck
SPAWN_TIMEOUT = 60.0
RESTART_MIN, RESTART_MAX = 0.5, 30.0  # seconds before starting a zygote again (doubling while it dies young)


def describe(status: int) -> str:
    """A wait status in words: 'killed by SIGSEGV', 'exited with code 3'."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exited with code {os.WEXITSTATUS(status)}"
    return f"ended (status {status})"


# libgomp's, read once when torch loads it (so here, in the zygote's environment, for every worker it forks): how
# an OpenMP thread waits for the next parallel region, and how the region's first thread waits at its end for the
# others. GNU's default spins (GOMP_SPINCOUNT, 300k iterations) before sleeping. A worker's intra-op team is
# every core (torch's default), and MKL takes a float64 GEMM as small as a (9, 51) x (51, 204) LSTM gate product to
# two threads: on a host where other processes hold the cores (other sessions' workers, the front, the clients) the
# team's second thread is not running, and the first spins at the barrier until the scheduler runs it, so each such
# op costs milliseconds instead of ~30 us (pytorch/examples' time_sequence_prediction, float64 LSTMCells and LBFGS:
# ~3 ms a daemon op on a loaded 2-core box, 88 % of the worker's samples in libgomp; bench/omp_wait.py). PASSIVE
# sleeps at once: the same threads, the same partition of every op's work (the same bits), no spinning. An
# operator's own OMP_WAIT_POLICY is kept.
WAIT_POLICY = "PASSIVE"


# Variables of the daemon's environment its zygote (and so every session worker, whose /proc/self/environ and
# os.environ hold them) does not get: credentials by their names (round 38: a worker running a tenant's code read
# the daemon's GPUPOOL_API_TOKEN there, and would any cloud key the daemon was started with).
SECRET_NAMES = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|AUTH|COOKIE|SESSION|_KEY($|_)|APIKEY|ACCESS_KEY")


def worker_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less the variables whose names say they hold a credential (SECRET_NAMES, any case)."""
    return {k: v for k, v in env.items() if not SECRET_NAMES.search(k.upper())}


def resolver_options(theirs: str) -> str:
    """RES_OPTIONS for the zygote (and so every worker, whose glibc reads it when it first loads resolv.conf): the
    operator's, plus `use-vc`: name lookups over TCP to port 53, since a worker granted network may open no UDP socket
    (sandbox.py `SOCK_STREAM`, round 43) and Landlock lets it connect to port 53 (landlock.net_rules)."""
    return theirs if "use-vc" in theirs.split() else f"{theirs} use-vc".strip()


def _thp_default() -> str:
    """THP_MEM_ALLOC_ENABLE for workers unless the operator set it: huge pages only where they are cheap."""
    return "1" if protocol.huge_pages_are_cheap() else "0"


class Zygote:
    """The daemon's handle on the zygote process: spawn, kill, and learn how workers ended.

    A supervisor thread (alive as long as the daemon) starts the zygote and starts it again whenever it dies,
    waiting longer each time it dies young; an Attach only ever waits for it to be ready. The supervisor is its
    parent thread on purpose: the zygote dies with the thread that started it (PDEATHSIG), and a gRPC thread
    may end at any time. Workers outlive a zygote that dies (their sessions go on); they end when the daemon
    closes their socket.
    """

    def __init__(self, program: Sequence[str] = ()) -> None:
        # what runs as the zygote: `python -m gpupool.server.zygote`, or (tests only) a program that runs this
        # module's `main` (tests/integration/worker_attacks.py: attacker code inside real, confined workers)
        self._program = list(program) or [sys.executable, "-m", "gpupool.server.zygote"]
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._ended: dict[int, int] = {}  # pid -> wait status (kept until asked for)
        self._replies: dict[int, dict[str, Any]] = {}
        self._next = 1
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dead = True
        self._ready = False
        self._stopping = False
        self._building: tuple[float, float] | None = None  # (since, bound) while the zygote builds the native runner
        self._build_seconds = 0.0  # spent in builds that ended
        self._supervisor: threading.Thread | None = None
        self.starts = 0  # zygotes started so far (1 + restarts)

    def start(self) -> None:
        """Start the supervisor, which starts the zygote; it gets ready (imports torch) in the background, so
        the daemon starts serving at once and only the first Attach may wait for it."""
        with self._lock:
            if self._supervisor is not None:
                return
            self._supervisor = threading.Thread(target=self._supervise, name="gpupool-zygote-supervisor", daemon=True)
        self._supervisor.start()

    def _launch(self) -> None:
        digest = runner_source.source()[1]  # the runner's source as this daemon read it: the zygote builds that
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc = subprocess.Popen(
            [*self._program, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            # torch's CPU allocator puts tensors of 2 MiB and more on transparent huge pages: a fresh tensor's
            # first touch (every upload, and every tensor of a fake GPU) faults 512x less often; but only where
            # the kernel does not compact memory in those faults (protocol.huge_pages_are_cheap).
            env={
                **worker_environment(os.environ),
                "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", _thp_default()),
                runner_source.DIGEST_ENV: digest,
                # A CUDA device must never be touched before a fork: torch poisons every later fork ("Cannot
                # re-initialize CUDA in forked subprocess") once this process asked the CUDA runtime anything, even
                # a device count (torch.cuda.is_available(), which torch.utils.cpp_extension's import calls to find
                # CUDA_HOME when the zygote builds the native runner: seen on an H200 host, every worker of the
                # first start failed). With this torch answers those questions from NVML instead.
                "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", WAIT_POLICY),
                "RES_OPTIONS": resolver_options(os.environ.get("RES_OPTIONS", "")),
            },
        )
        theirs.close()
        with self._lock:
            self._proc, self._sock = proc, ours
            self._dead, self._ready = False, False
            self.starts += 1
        threading.Thread(target=self._listen, args=(ours,), name="gpupool-zygote", daemon=True).start()

    def _supervise(self) -> None:
        backoff = RESTART_MIN
        while True:
            began = time.monotonic()
            try:
                self._launch()
            except OSError as exc:
                log.error("cannot start the zygote: %s", exc)
                with self._cond:
                    self._dead = True
                    self._cond.notify_all()
            with self._cond:
                self._cond.wait_for(lambda: self._dead or self._stopping)
                if self._stopping:
                    return
                proc = self._proc
            if proc is not None:
                try:
                    proc.wait(timeout=5)  # reap it (its socket closed: it is gone or going)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            lived = time.monotonic() - began
            backoff = RESTART_MIN if lived > 60 else min(backoff * 2, RESTART_MAX)
            log.error("the zygote (pid %d) ended after %.1f s: starting a new one in %.1f s", self.pid, lived, backoff)
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, backoff):
                    return

    def wait_ready(self, timeout: float | None = None, *, builds: bool = True) -> None:
        """Wait until the zygote is ready: `timeout` seconds at most (None: `start_timeout()`), not counting (with
        `builds`: the daemon's start) the time it spends building the native runner meanwhile, which has its own
        bound (the one the zygote told, plus BUILD_GRACE). An Attach waits `timeout` in all (a restarted zygote's
        build included)."""
        if timeout is None:
            timeout = start_timeout()
        with self._cond:
            began = time.monotonic()
            built0 = self._built_for(began)
            while not self._stopping and not (self._ready and not self._dead):
                now = time.monotonic()
                if builds and self._building is not None:
                    since, bound = self._building
                    left = since + bound + BUILD_GRACE - now
                    late = f"the zygote's build of the native runner is not done after {bound + BUILD_GRACE:.0f} s"
                else:
                    left = began + timeout + (self._built_for(now) - built0 if builds else 0.0) - now
                    late = f"the zygote is not ready after {timeout:.0f} s"
                if left <= 0:
                    raise RuntimeError(late)
                self._cond.wait(left)
            if self._stopping:
                raise RuntimeError("the zygote was stopped")

    def _built_for(self, now: float) -> float:
        """Seconds the zygotes spent building the native runner up to `now` (a build under way counted so far)."""
        return self._build_seconds + (now - self._building[0] if self._building is not None else 0.0)

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else 0

    def spawn(self, spec: WorkerSpec, max_reply: int, spin: float = 0.0) -> ProcessRunner:
        """A new worker for a session (waiting, within SPAWN_TIMEOUT, for a restarting zygote); `spin`: seconds
        the daemon reads its results without blocking before it sleeps on them (`ProcessRunner.spin`)."""
        self.wait_ready(SPAWN_TIMEOUT, builds=False)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        progress_fd = os.memfd_create("gpupool-shared", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(progress_fd, SHARED_BYTES)
            # Its size for good: the worker holds a descriptor of the file (Python's mmap keeps a duplicate), and a
            # file shrunk under this process's mapping faults it (SIGBUS: the whole daemon) at its next copy into
            # the buffer (round 38: one ftruncate from a worker's code did it)
            fcntl.fcntl(progress_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            progress = mmap.mmap(progress_fd, SHARED_BYTES)
            reply = self._call({"spawn": asdict(spec)}, [theirs.fileno(), progress_fd])
        finally:
            theirs.close()
            os.close(progress_fd)
        if "pid" not in reply:
            ours.close()
            progress.close()
            if isinstance(reply.get("errno"), int):  # the fork's own error (ENOMEM: the host is out of memory)
                raise OSError(reply["errno"], f"the zygote could not start a worker: {reply.get('error')}")
            raise RuntimeError(f"the zygote could not start a worker: {reply.get('error', reply)}")
        return ProcessRunner(int(reply["pid"]), ours, progress, max_reply, spin)

    def kill(self, pid: int) -> None:
        """SIGKILL a worker of ours (a no-op for one that already ended)."""
        try:
            self._send({"kill": pid})
        except OSError:
            pass

    def wait_ended(self, pid: int, timeout: float) -> str:
        """How worker `pid` ended, waiting up to `timeout` for the zygote to reap it."""
        with self._cond:
            self._cond.wait_for(lambda: pid in self._ended or self._dead, timeout)
            status = self._ended.pop(pid, None)
        return "ended, cause unknown" if status is None else describe(status)

    def forget(self, pid: int) -> None:
        with self._lock:
            self._ended.pop(pid, None)

    def stop(self) -> None:
        with self._cond:
            sock, self._sock = self._sock, None
            self._dead = self._stopping = True
            self._cond.notify_all()
        if sock is not None:
            sock.close()  # the zygote exits on EOF and its workers die with it
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    # ---- plumbing ----

    def _send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        sock = self._sock
        if sock is None:
            raise OSError("zygote stopped")
        data = json.dumps(msg).encode() + b"\n"
        if fds:
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            sock.sendall(data)

    def _call(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        with self._lock:
            rid = self._next
            self._next += 1
            msg["id"] = rid
            self._send(msg, fds)  # under the lock: messages with descriptors must not interleave
            if not self._cond.wait_for(lambda: rid in self._replies or self._dead, SPAWN_TIMEOUT):
                raise RuntimeError("the zygote did not answer")
            if rid not in self._replies:
                raise RuntimeError("the zygote died")
            return self._replies.pop(rid)

    def _listen(self, sock: socket.socket) -> None:
        while True:
            line = _read_line(sock)
            hello = json.loads(line or b"{}")
            if "building" not in hello and "built" not in hello:
                break
            self._build_news(hello)
        with self._cond:
            if hello.get("ready") is True:
                log.info("zygote %d ready", self.pid)
                _threads_at_fork(self.pid, hello, "ready")
                if hello.get("gpu_files"):  # (`_release_nvml`: none expected)
                    files = ", ".join(map(str, hello["gpu_files"]))
                    log.error("the zygote (pid %d) holds NVIDIA device files open, which every worker inherits "
                              "(Landlock narrows no descriptor): %s", self.pid, files)  # fmt: skip
                self._ready = True
            elif self._sock is sock:
                log.error("the zygote did not start: %r", line)
                self._dead = True
            self._cond.notify_all()
        buf = b""
        while not self._dead:
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                with self._cond:
                    if "ended" in msg:
                        self._ended[int(msg["ended"])] = int(msg["status"])
                        while len(self._ended) > 4096:  # never asked for: forget the oldest
                            self._ended.pop(next(iter(self._ended)))
                    elif "id" in msg:
                        _threads_at_fork(self.pid, msg, f"forked worker {msg.get('pid')}")
                        self._replies[int(msg["id"])] = msg
                    self._cond.notify_all()
        with self._cond:
            if self._building is not None:  # died building
                self._build_seconds += time.monotonic() - self._building[0]
                self._building = None
            if self._sock is sock:  # (not a zygote already replaced, nor one stopped on purpose)
                self._sock = None
                sock.close()
                self._dead = True
            self._cond.notify_all()

    def _build_news(self, msg: dict[str, Any]) -> None:
        """A zygote's word on its build of the native runner (`_build_runner`): begun, or ended."""
        now = time.monotonic()
        with self._cond:
            if "building" in msg:
                info = msg["building"]
                self._building = (now, float(info["bound"]))
                log.info(
                    "building the native runner (first start, %s; at most %d s, %s) into %s: sessions can attach "
                    "once it is done (a line every 15 s meanwhile)",
                    info["estimate"], info["bound"], info["variable"], info["where"],
                )  # fmt: skip
            elif self._building is not None:
                took = now - self._building[0]
                self._build_seconds += took
                self._building = None
                if msg["built"]:
                    log.info("native runner built in %.0f s", took)
                else:  # (the zygote's warning says why)
                    log.info("no native runner after %.0f s: learned runs stay in Python", took)
            self._cond.notify_all()


def _threads_at_fork(pid: int, msg: dict[str, Any], when: str) -> None:
    """Log the zygote's threads besides its main one (its ready message's or a spawn reply's `threads`): it forks
    workers with them (see the module's docstring)."""
    if msg.get("threads"):
        log.error("the zygote (pid %d) %s with other threads, which may deadlock its workers: %s", pid, when,
                  ", ".join(map(str, msg["threads"])))  # fmt: skip


_shared_lock = threading.Lock()
_shared: Zygote | None = None


def shared_zygote() -> Zygote:
    """The process's zygote (one per daemon process; tests run several daemons in one process)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            z = Zygote()
            z.start()
            _shared = z
        return _shared


def _read_line(sock: socket.socket) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        out += chunk
    return out.strip()


# ---- the zygote process ----


# Modules session workers import on first use. A root daemon's workers run as an unprivileged user
# (--worker-user), which may be unable to read the Python installation (e.g. one under /root): import them here.
PRELOAD = (
    "encodings.idna",  # socket.getaddrinfo of a name (collectives' store address)
    "encodings.punycode",
    "torch.distributed",
    "torch.distributed.distributed_c10d",
    "torch._subclasses.schema_check_mode",  # what some ops' dispatch (quantile, nanquantile) imports on first use
)


def _zygote(ctrl: socket.socket, sink: StderrSink | None = None) -> None:
    import importlib
    import tempfile

    import torch  # noqa: F401  (first, as before: what everything below imports)

    from .executor import CommandExecutor
    from .slices import SliceLedger

    tempfile.gettempdir()  # probes by writing a file: cache the answer before workers lose the right to
    for name in PRELOAD:  # what workers import lazily, before they may no longer read Python's files
        importlib.import_module(name)
    _build_runner(ctrl)
    CommandExecutor(SliceLedger()).warm_up()  # meta kernels (torch._dynamo among them), once, inherited by every worker
    from . import landlock, sandbox

    landlock.read_paths()  # what workers may read under Landlock: found once here (modules, libraries), inherited
    sandbox.seccomp_library()  # (`ldconfig -p`: an exec, once here rather than in every worker)
    _stop_blas_threads()
    _release_nvml()
    nvml.NVML.forbid()  # (quota55: the front's measure of free memory never starts NVML here nor in a worker)
    children: set[int] = set()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # The daemon died or stopped (PR_SET_PDEATHSIG, `main`, lands before the end of `ctrl` is read below): its
    # workers go with it, even one that never reads its session socket again (a tenant's code blocked in a call)
    signal.signal(signal.SIGTERM, lambda *_: _end(children))
    hello = {"ready": True, "threads": _other_threads(), "gpu_files": landlock.nvidia_files()}
    ctrl.sendall(json.dumps(hello).encode() + b"\n")
    outputs: dict[int, WorkerOutput] = {}  # read end of a worker's stdout and stderr -> what forwards it
    sink = sink or StderrSink()  # where they go (and the zygote's own lines): the daemon's stderr, never waited on
    poller = select.poll()  # (not select(): a worker's pipe may be numbered past FD_SETSIZE)
    for fd in (ctrl.fileno(), wake_r):
        poller.register(fd, select.POLLIN)
    buf = b""
    while True:
        waiting = bool(sink.own or sink.rest)  # lines (or a cut line's end) the pipe had no room for: again soon
        ready = {fd for fd, _events in poller.poll(OWN_RETRY_MS if waiting else None)}
        if waiting:
            sink.flush_own()
        if wake_r in ready:
            os.read(wake_r, 4096)
        for fd in ready:
            if fd in outputs and not outputs[fd].pump():
                poller.unregister(fd)
                del outputs[fd]  # (closed by `pump`)
        _reap(ctrl, children)
        if ctrl.fileno() not in ready:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(ctrl, 65536, 8)
        except OSError:
            data, fds = b"", []
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if "spawn" in msg:
                mine, fds = fds[:2], fds[2:]
                out_r, out_w = os.pipe()
                try:
                    spec = WorkerSpec(**msg["spawn"])
                    pid = _fork_worker(ctrl, wake_r, wake_w, mine, spec, out_w, [*outputs, out_r, *sink.private])
                except OSError as exc:  # the kernel refused the fork (ENOMEM, EAGAIN): this worker only
                    for fd in (*mine, out_r, out_w):
                        os.close(fd)
                    reply = {"id": msg["id"], "errno": exc.errno, "error": f"fork: {exc.strerror}"}
                else:
                    os.close(out_w)
                    outputs[out_r] = WorkerOutput(out_r, pid, sink)
                    poller.register(out_r, select.POLLIN)
                    children.add(pid)
                    # a thread here now was here at the fork (none ends by itself): the daemon names it
                    reply = {"id": msg["id"], "pid": pid, "threads": _other_threads()}
                ctrl.sendall(json.dumps(reply).encode() + b"\n")
            elif "kill" in msg and int(msg["kill"]) in children:
                os.kill(int(msg["kill"]), signal.SIGKILL)
        for fd in fds:
            os.close(fd)
    for pid in children:  # the daemon is gone: so are its sessions
        os.kill(pid, signal.SIGKILL)


def start_timeout() -> float:
    """The daemon's bound on its zygote's start: START_TIMEOUT, or the test hook's seconds (START_TIMEOUT_TEST_ENV)."""
    raw = os.environ.get(START_TIMEOUT_TEST_ENV, "").strip()
    return float(raw) if raw else START_TIMEOUT


def _build_runner(ctrl: socket.socket) -> None:
    """Load the native runner (server/native_runner.py), telling the daemon first when that means a build (an empty
    cache: a host's first start, a new torch or source), and when it ended: the daemon waits for a build with the
    build's own bound (`build_timeout`) instead of its bound on the zygote's start (START_TIMEOUT), which a build on a
    slow host overran (round 36: the daemon's first start failed). A build that fails or overruns its bound leaves
    the runner off (one warning, `native_runner.load`): the Python path runs, as with GPUPOOL_NATIVE_RUNNER=0."""
    from . import native_runner

    if not native_runner.needs_build():
        return  # (loaded, or not, by the executor's warm-up below)
    try:
        bound = native_runner.build_timeout()
    except ValueError:  # `load` says so, and builds nothing
        bound = 0.0
    where = str(native_runner.cache_dir())
    info = {"bound": bound, "estimate": buildcache.estimate(native_runner.BUILD_CPU),
            "variable": native_runner.BUILD_TIMEOUT_ENV, "where": where}  # fmt: skip
    ctrl.sendall(json.dumps({"building": info}).encode() + b"\n")
    built = native_runner.load() is not None
    ctrl.sendall(json.dumps({"built": built}).encode() + b"\n")


def _stop_blas_threads() -> None:
    """Stop the thread pool of every OpenBLAS loaded here the way its own fork handler does (`blas_thread_shutdown_`:
    the threads told to exit and joined; the next threaded BLAS call starts them again): see the module's docstring.
    A library without that function is left as it is (`_other_threads` then names its threads)."""
    seen: set[str] = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            path = fields[5].strip() if len(fields) == 6 else ""
            if "openblas" not in os.path.basename(path).lower() or path in seen:
                continue
            seen.add(path)
            try:
                stop = ctypes.CDLL(path, mode=os.RTLD_NOLOAD).blas_thread_shutdown_
            except (OSError, AttributeError):
                continue
            stop.restype = ctypes.c_int
            stop()


def _release_nvml() -> int:
    """Shut NVML down where something here started it (torch's device count with PYTORCH_NVML_BASED_CUDA_CHECK:
    torch.utils.cpp_extension's import asks it when the zygote builds the native runner on a host with a CUDA
    toolkit). NVML opens the device file of every GPU of the host and keeps them open until its last shutdown; the
    zygote's descriptors are every worker's after the fork, where Landlock narrows none of them: any tenant's code
    could send another GPU's driver ioctls through them. Returns how many shutdowns it took (torch starts NVML once
    a count and never shuts it down); a library that is not loaded is left unloaded (RTLD_NOLOAD)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1", mode=os.RTLD_NOLOAD)
        shutdown = nvml.nvmlShutdown
    except (OSError, AttributeError):
        return 0
    shutdown.restype = ctypes.c_int
    count = 0
    while count < 4096 and shutdown() == 0:  # NVML_SUCCESS until the last reference; then UNINITIALIZED
        count += 1
    return count


def _other_threads() -> list[str]:
    """The names of this process's threads other than the calling one (/proc/self/task: what Python 3.12's fork()
    counts for its "multi-threaded" warning)."""
    me = str(threading.get_native_id())
    names = []
    for tid in os.listdir("/proc/self/task"):
        if tid != me:
            try:
                with open(f"/proc/self/task/{tid}/comm") as comm:
                    names.append(f"{tid} {comm.read().strip()}")
            except OSError:  # ended meanwhile
                pass
    return names


class StderrSink:
    """The zygote's stderr (the daemon's) as forwarded workers' output goes to it: a write never waits. Where it is a
    pipe (a parent that started `gpupool serve` with stderr=PIPE and never reads it: some tests and supervisors do),
    it is opened again non-blocking (a description of its own: the daemon's stays blocking), and what does not fit
    is dropped and counted, whole lines only, then said in one line when a write goes through again. Until round 38
    the zygote's write blocked on a full pipe, and with it every spawn (no session started). A file or a terminal is
    written as it is (a file does not block)."""

    def __init__(self) -> None:
        self.fd = 2
        self.private: list[int] = []  # descriptors of ours a worker must not hold
        try:
            if stat.S_ISFIFO(os.fstat(2).st_mode):
                self.fd = os.open("/proc/self/fd/2", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                self.private = [self.fd]
        except OSError:
            pass
        self.rest = b""  # the unwritten end of a line a write cut (lines stay whole)
        self.dropped = 0  # bytes of lines dropped since the last that went
        self.own: collections.deque[bytes] = collections.deque()  # the zygote's own lines not written yet
        self.own_bytes = 0
        self.own_dropped = 0  # ... dropped, past OWN_BYTES kept, since the last kept

    def log(self, line: str) -> None:
        """One of the zygote's own log lines (`SinkHandler`): written now where the pipe has room, else kept (up to
        OWN_BYTES, past that dropped and counted) and written before any worker's output as room comes: the
        zygote's loop tries again every OWN_RETRY_MS while any wait (`flush_own`). Until round 39 the zygote's own
        lines went to its stderr as it is, blocking on a full pipe."""
        data = line.encode("utf-8", "backslashreplace")
        if self.own_bytes + len(data) > OWN_BYTES:
            self.own_dropped += 1
            return
        self.own.append(data)
        self.own_bytes += len(data)
        self.flush_own()

    def flush_own(self) -> bool:
        """Write what waits (a cut line's end, then the zygote's own lines) as far as the pipe takes it; whether
        anything still waits."""
        if self.rest:  # (a line's end goes before anything else)
            rest, self.rest = self.rest, b""
            if self._put(rest) == 0:
                self.rest = rest
            if self.rest:
                return True
        while self.own:
            line = self.own[0]
            if self._put(line) == 0:
                return True
            self.own.popleft()
            self.own_bytes -= len(line)
            if self.rest:
                return True
        if self.own_dropped:
            note = f"gpupool-zygote: {self.own_dropped} of its own log lines dropped (stderr full)\n".encode()
            if self._put(note) == 0:
                return True
            self.own_dropped = 0
        return bool(self.rest)

    def write(self, lines: list[str]) -> None:
        data = [line.encode() for line in lines]
        if (self.rest or self.own or self.own_dropped) and self.flush_own():
            self.dropped += sum(map(len, data))
            return
        if self.dropped:
            note = f"gpupool-zygote: {self.dropped} bytes of workers' output dropped (stderr full)\n"
            if self._put(note.encode()) == 0:
                self.dropped += sum(map(len, data))
                return
            self.dropped = 0
            if self.rest:
                self.dropped = sum(map(len, data))
                return
        for i, line in enumerate(data):
            n = self._put(line)
            if n < len(line):
                self.dropped += (0 if n else len(line)) + sum(map(len, data[i + 1 :]))
                return

    def _put(self, data: bytes) -> int:
        """Write what the pipe takes of `data` now; returns how many bytes went (a part: the rest is `rest`). Of a
        pipe, half is left to the daemon's own log lines: forwarding fills it only up to the other half."""
        try:
            room = fcntl.fcntl(self.fd, fcntl.F_GETPIPE_SZ) // 2 - _unread(self.fd) if self.private else len(data)
            if room <= 0:
                return 0
            n = os.write(self.fd, data[:room])
        except BlockingIOError:
            return 0
        except OSError:
            return len(data)  # (stderr closed: nothing to forward to)
        if 0 < n < len(data):
            self.rest = data[n:]
        return n


class SinkHandler(logging.Handler):
    """The zygote's log handler: its lines through its `StderrSink` (`StderrSink.log`), never waited on."""

    def __init__(self, sink: StderrSink) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.log(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's own convention: a record that cannot be formatted is reported
            self.handleError(record)


def _unread(fd: int) -> int:
    """The bytes a pipe holds that its reader has not read (FIONREAD, of either end)."""
    got = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, got)
    return got[0]


class WorkerOutput:
    """A worker's stdout and stderr, forwarded to the zygote's stderr (the daemon's) as lines that name the worker,
    printable, at most LINE_BYTES each and BURST_BYTES at once then RATE_BYTES a second per worker (what is dropped
    past that is counted in the next line). Until round 38 workers wrote to the daemon's stderr itself: a worker
    running a tenant's code could write anything there without bound (forged log lines, terminal escapes, a disk
    filled), and truncate it where it is a file."""

    LINE_BYTES = 4096
    BURST_BYTES = 256 * 1024
    RATE_BYTES = 4096.0
    _UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

    def __init__(self, fd: int, pid: int, sink: StderrSink) -> None:
        self.fd, self.pid, self.sink = fd, pid, sink
        self.partial = b""
        self.allowance = float(self.BURST_BYTES)
        self.since = time.monotonic()
        self.dropped = 0

    def pump(self) -> bool:
        """Read what the worker wrote and forward its whole lines; False (and the pipe closed) at its end."""
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            data = b""
        if not data:
            if self.partial:
                self._emit([self.partial])
            os.close(self.fd)
            return False
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        while len(self.partial) > self.LINE_BYTES:  # a line without end: forwarded in pieces
            lines.append(self.partial[: self.LINE_BYTES])
            self.partial = self.partial[self.LINE_BYTES :]
        if lines:
            self._emit(lines)
        return True

    def _emit(self, lines: list[bytes]) -> None:
        now = time.monotonic()
        self.allowance = min(self.BURST_BYTES, self.allowance + (now - self.since) * self.RATE_BYTES)
        self.since = now
        out = []
        for raw in lines:
            if self.allowance < len(raw) + 1:  # (no line forwarded is shorter than it was written)
                self.dropped += len(raw) + 1
                continue
            text = self._UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", raw.decode("utf-8", "backslashreplace"))
            note = f" [{self.dropped} bytes of this worker's output dropped before this line]" if self.dropped else ""
            line = f"gpupool-worker {self.pid}: {text}{note}\n"
            if self.allowance < len(line):  # (as forwarded: escapes and the prefix count)
                self.dropped += len(raw) + 1
                continue
            self.allowance -= len(line)
            self.dropped = 0
            out.append(line)
        if out:
            self.sink.write(out)


def _end(children: set[int]) -> None:
    """SIGKILL every worker of ours, then exit (the daemon is gone: so are its sessions)."""
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(0)


def _reap(ctrl: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        try:
            ctrl.sendall(json.dumps({"ended": pid, "status": status}).encode() + b"\n")
        except OSError:
            pass


def _fork_worker(
    ctrl: socket.socket, wake_r: int, wake_w: int, fds: list[int], spec: WorkerSpec, out: int, others: list[int]
) -> int:
    """Fork a worker whose stdout and stderr are `out` (a pipe the zygote reads: `WorkerOutput`); `others`: the
    read ends of the other workers' pipes, which it must not hold."""
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        return pid
    code = 70
    try:
        # the worker's log lines go to its stderr (the pipe below, once set), not the zygote's sink, whose
        # descriptor it closes here (`others`)
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        plain = logging.StreamHandler(sys.stderr)
        plain.setFormatter(logging.Formatter(_LOG_FORMAT))
        root.addHandler(plain)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (the zygote's: `_end`)
        for fd in (wake_r, wake_w, *others):
            os.close(fd)
        ctrl.close()
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        from .worker import worker_main

        code = worker_main(socket.socket(fileno=fds[0]), fds[1], spec)
    except BaseException:
        log.exception("session %d worker failed", spec.number)
    finally:
        os._exit(code)


def main() -> None:
    parent = os.getppid()
    # PR_SET_PDEATHSIG: die with the daemon (strictly: with the thread that started us, the supervisor's, which ends
    # at `Zygote.stop`), even mid-import. SIGTERM, whose default ends the process as SIGKILL did, and which once
    # workers exist kills them first (`_end`): until round 39 (fin39) the death signal was SIGKILL, the zygote died
    # before it read the end of `ctrl`, and a worker that did not read its socket (attacker code blocked in a read)
    # outlived the daemon, with its GPU memory, its uid and its code running.
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)  # the daemon died before the line above
    # Not dumpable (exec made it so again): its memory holds every spec it was sent, and each worker it forks
    # starts so (server/sandbox.py `not_dumpable`)
    from .sandbox import not_dumpable

    not_dumpable()
    # Its own lines never wait on the daemon's stderr (a pipe nobody reads): through the sink its workers' output
    # takes (round 39; until then a full pipe blocked the zygote's own log lines, and warnings, and every spawn)
    sink = StderrSink()
    handler = SinkHandler(sink)
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT, handlers=[handler])
    logging.captureWarnings(True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the daemon decides
    ctrl = socket.socket(fileno=int(sys.argv[1]))
    _zygote(ctrl, sink)


if __name__ == "__main__":
    main()
