"""Shared helpers for scheduler integration tests: real `gpupool scheduler` / `gpupool serve` processes on
loopback (port 0, bound ports read from their logs), and an in-test daemon stand-in that speaks the real
Register/Heartbeat protocol through `server.registration.Registrar`.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gpupool.server.registration import Registrar
from support import daemon_args

from gpupool import tokens
from gpupool._proto import device_pb2, scheduler_pb2
from gpupool.tls import TlsConfig

ROOT = Path(__file__).resolve().parents[2]
GiB = 1024**3
LISTEN_RE = re.compile(r"listening on (\S+):(\d+)")
METRICS_RE = re.compile(r"metrics on https?://(\S+):(\d+)")


class Proc:
    """A gpupool program as a child process; its log is collected and searched for bound ports."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.args = daemon_args(list(args))  # a daemon gets the public key of the scheduler's key file
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._eof = threading.Event()  # `_drain` read the end of its output
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "gpupool.cli", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self._eof.set()
            self._seen.notify_all()

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 60.0) -> re.Match[str]:
        """The first log line matching `pattern` (waiting for it), or AssertionError with the log. A program that
        has ended is looked for until `_drain` has read all it wrote (round 51 gave up once it had ended: its last
        lines, still in the pipe, unread)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self._eof.is_set():
                    break
                self._seen.wait(min(left, 0.2))
        raise AssertionError(f"{self.args[0]}: no {rx.pattern!r} in log:\n" + self.log())

    def log(self) -> str:
        """Its last 80 lines; of a program that has ended, once `_drain` has read all it wrote (up to 30 s: a test
        that reads the log of a program just ended, `popen.wait()` returned, read it before the last lines came)."""
        if self.popen.poll() is not None:
            self._eof.wait(30)
        return "\n".join(self.lines[-80:])

    def port(self) -> int:
        """The port it listens on, once it does (150 s: a daemon waits up to 120 s for its zygote, support.py)."""
        return int(self.wait_for(LISTEN_RE, timeout=150.0).group(2))

    def metrics_port(self) -> int:
        return int(self.wait_for(METRICS_RE).group(2))

    def kill(self) -> None:
        """kill -9."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


def key_file(tmp: Path) -> Path:
    path = tmp / "token.key"
    if not path.exists():
        tokens.generate_key_file(path)
    return path


def start_scheduler(tmp: Path, *extra: str, state: Path | None = None) -> tuple[Proc, str]:
    """A `gpupool scheduler` on 127.0.0.1:0; returns it and its address."""
    proc = Proc(
        [
            "scheduler",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--state",
            str(state or tmp / "scheduler.db"),
            "--token-key-file",
            str(key_file(tmp)),
            *extra,
        ]
    )
    return proc, f"127.0.0.1:{proc.port()}"


def start_daemon(tmp: Path, scheduler: str, host_id: str, *extra: str, memory: str = "256MiB") -> tuple[Proc, str]:
    """A `gpupool serve --fake-gpus 1` registering with `scheduler` (heartbeat 0.5 s); returns it and its address."""
    proc = Proc(
        ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "0", "--fake-gpus", "1", "--fake-gpu-memory",
         memory, "--token-key-file", str(key_file(tmp)), "--host-id", host_id, "--scheduler", scheduler,
         "--heartbeat-interval", "0.5", *extra]
    )  # fmt: skip
    return proc, f"127.0.0.1:{proc.port()}"


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """Is `pid` a live (not zombie) process?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class SimHost:
    """A daemon stand-in: fixed devices, sessions the test sets, revocations recorded; real Registrar inside."""

    def __init__(
        self,
        scheduler: str,
        host_id: str,
        gpus: int = 1,
        memory: int = 8 * GiB,
        interval: float = 0.3,
        tls_config: TlsConfig | None = None,
    ):
        self.host_id = host_id
        self._devices = [
            device_pb2.DeviceInfo(index=i, uuid=f"GPU-{host_id}-{i}", model="fake", memory_bytes=memory, fake=True)
            for i in range(gpus)
        ]
        self.sessions: list[device_pb2.SessionUsage] = []
        self.revoked: list[str] = []
        self.is_draining = False
        address = f"127.0.0.1:{40000 + len(host_id)}"
        self.registrar = Registrar(scheduler, host_id, address, self, interval, tls_config=tls_config)
        self.refused: list[str] = []  # what the scheduler refused of its registrar (each failed step, why)
        failed = self.registrar._failed

        def note(why: str) -> None:
            self.refused.append(why)
            failed(why)

        self.registrar._failed = note  # type: ignore[method-assign]

    def devices(self) -> list[device_pb2.DeviceInfo]:
        return list(self._devices)

    def usage(self) -> tuple[list[device_pb2.SessionUsage], list[device_pb2.DeviceUsage]]:
        devs = [device_pb2.DeviceUsage(info=d, used_bytes=1000 + d.index) for d in self._devices]
        return list(self.sessions), devs

    def draining(self) -> bool:
        return self.is_draining

    def revoke_leases(self, lease_ids: list[str]) -> None:
        self.revoked.extend(lease_ids)
        self.sessions = [s for s in self.sessions if s.lease_id not in lease_ids]

    def start(self) -> SimHost:
        self.registrar.start()
        assert self.registrar.registered.wait(30), f"{self.host_id} did not register"
        return self

    def stop(self) -> None:
        self.registrar.stop()


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, every: float = 0.1, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def pool_state(address: str, timeout: float = 30.0) -> scheduler_pb2.PoolState:
    """ListPool once the scheduler at `address` answers (a fresh one may still be starting; gRPC shares a subchannel
    in reconnect backoff among channels), within `timeout` s."""
    from gpupool.client.pool import SchedulerClient

    from gpupool.errors import Unavailable

    out: list[scheduler_pb2.PoolState] = []

    def ask() -> bool:
        try:
            out.append(SchedulerClient(address).list_pool())
            return True
        except Unavailable:
            return False

    wait_until(ask, timeout=timeout, what=f"scheduler {address} answering")
    return out[0]


# A job for `gpupool run -- python -c TRAIN_UNTIL_FILE PATH`: trains until the file PATH exists (the test creates it
# once what it waits for happened; 120 s at most), a line a step with the time the daemon answered it, "done" last.
TRAIN_UNTIL_FILE = """
import os, sys, time, torch, gpupool.torch as gt
d = gt.device()
w = torch.ones(4, device=d)
t0, i = time.time(), 0
while not os.path.exists(sys.argv[1]) and time.time() - t0 < 120:
    w = w + 1
    print("step", i, w.sum().item(), time.time(), flush=True)  # the time: when the daemon answered
    i += 1
    time.sleep(0.2)
print("done", i, w.sum().item(), flush=True)
"""


def silence_when_down(address: str, host_id: str, timeout: float) -> float:
    """Wait (up to `timeout` s) until the scheduler at `address` lists `host_id` down; how long the host had then been
    silent (this process's clock at that answer less the host's last_seen, both time.time() on this machine).

    A host is down for its silence (--host-timeout, a sweep every 0.5 s): bound this, not the wall clock since the
    host stopped. A scheduler slowed by a busy machine sweeps late, and one that did not run for a while forgives the
    silence and starts it again (scheduler/leases.py `alive`), so a bound from the kill flakes under load."""
    from gpupool.client.pool import SchedulerClient

    seen: list[float] = []

    def down() -> bool:
        host = next(h for h in SchedulerClient(address).list_pool().hosts if h.host_id == host_id)
        if host.state == "down":
            seen.append(time.time() - host.last_seen)
        return bool(seen)

    wait_until(down, timeout=timeout, what=f"host {host_id} down")
    return seen[0]


def _pg_tool(name: str) -> str | None:
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


class Postgres:
    """A throwaway PostgreSQL server (initdb + pg_ctl) on a Unix socket in a temp dir: no TCP port at all.

    PostgreSQL refuses to run as root, so under root (CI) its files belong to, and it runs as, the `postgres`
    user that Debian's package creates; otherwise as the current user.
    """

    def __init__(self) -> None:
        initdb, self._pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
        if initdb is None or self._pg_ctl is None:
            raise RuntimeError("PostgreSQL is not installed (scripts/setup.sh installs Debian's postgresql)")
        self.dir = Path(tempfile.mkdtemp(prefix="gpupool-pg-"))
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self.data = self.dir / "data"
        self._run([initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
        opts = f"-k {self.dir} -c listen_addresses='' -c fsync=off -c max_connections=50"
        self._run([self._pg_ctl, "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts, "-w", "start"])
        self.dsn = f"postgresql://postgres@/postgres?host={self.dir}"

    def _demote(self) -> None:
        if self._user is not None:
            os.setgroups([])
            os.setgid(self._user.pw_gid)
            os.setuid(self._user.pw_uid)

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=self._demote)  # noqa: PLW1509
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def stop(self) -> None:
        try:
            self._run([str(self._pg_ctl), "-D", str(self.data), "-m", "immediate", "stop"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
