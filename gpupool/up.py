"""`gpupool up`: a whole pool on this machine in one command - a scheduler and one daemon.

The two programs run as child processes (they never import each other). Next to the scheduler's state `up`
keeps (creating them on first use, owner-only) a token signing key and its public key, and a local CA
(`pki/ca.crt`, `pki/ca.key`; or the CA in `--ca-dir`) with certificates for the
scheduler, the daemon (a host certificate named by its host id), the user
(a tenant certificate), an operator (admin) and Prometheus (`pki/metrics-prometheus`: the one certificate besides
the operator's that the metrics endpoints answer, and no gRPC service accepts); every link is mutual TLS, the
metrics pages too (HTTPS). The daemon serves the real GPUs
torch sees, else 2 fake ones, with its side port on (`--bulk-listen`: a session's frames, replies and large
transfers on one TLS socket instead of gRPC messages, docs/wire.md; `--bulk-listen off` keeps them on the gRPC
stream). Once the daemon has registered, `up` prints where everything listens and the
exports clients use; SIGINT (Ctrl-C, where its terminal's reaches it) or SIGTERM stops both, or `gpupool down`
from another shell (gpupool/down.py: it
finds this `up` by the `up.json` it keeps locked in the state folder while it runs).
Ports may be 0 (tests): the bound ports are read from the children's "listening on" log lines.

`up` supervises: a child that dies is started again on the address it had bound (the daemon alone when
the daemon died - the scheduler and every other lease of the pool carry on; the scheduler from its state
when it died), with a backoff, giving up after `MAX_RESTARTS` within `RESTART_WINDOW` seconds. The
children never outlive `up`: each asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import getpass
import hashlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from gpupool import pki, tls, tokens, uplog
from gpupool.config import (
    StopSignals,
    UnsafeCacheDir,
    add_flag,
    check_private_dir,
    format_size,
    size_arg,
    split_address,
)
from gpupool.down import PoolRecord, already_runs, running, state_file
from gpupool.errors import GpupoolError, InvalidArgument
from gpupool.protocol import HostState

LISTEN_RE = re.compile(r"listening on (\S+:\d+)")
METRICS_RE = re.compile(r"metrics on (https?://\S+)")
START_TIMEOUT = 120.0
# A daemon's first start may build its native runner after its zygote's imports, with a bound of its own
# (server/native_runner.py's, repeated here: that module imports torch; docs/operations.md "First start"); the daemon
# exits when either bound passes, so `up` waits for its "listening" while it lives (`_daemon_start_bound` at most).
BUILD_TIMEOUT_ENV, BUILD_TIMEOUT = "GPUPOOL_NATIVE_RUNNER_BUILD_TIMEOUT", 900.0
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
PR_SET_PDEATHSIG = 1
LOG_ENV = "GPUPOOL_UP_LOG"  # set by `up --detach` for the `up` it starts: the path of up.log (`_keep_log`)


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in the parent: between fork and exec the child only calls it (no dlopen there)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux
        return None


def _die_with_parent(prctl: Callable[..., int] | None, parent: int) -> None:
    """In the child before exec: SIGTERM when `up` dies, however it dies (Linux; elsewhere a no-op)."""
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # `up` died before the prctl took effect
        os._exit(1)


@dataclass(frozen=True)
class UpConfig:
    fake_gpus: int | None
    fake_gpu_memory: int
    scheduler_listen: str
    listen: str
    state: Path
    metrics_listen: str
    scheduler_metrics_listen: str
    bulk_listen: str = ""  # the daemon's --bulk-listen ("": off)


def default_state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "gpupool"


def default_host_id(state: Path) -> str:
    """The daemon's host id of a pool given none (`--host-id`): the host name for the default state folder, else the
    host name and 6 hex digits of the state folder's path (a second pool's own --state, journey42), the same at every
    start of that pool. Until round 43 every pool's daemon was the host name: two pools on one host showed the same
    host and, their fake GPUs' UUIDs deriving from it, the same GPUs to smi and Prometheus."""
    name = socket.gethostname()
    folder = state.parent.resolve()
    if folder == default_state_dir().resolve():
        return name
    return f"{name}-{hashlib.sha256(os.fsencode(folder)).hexdigest()[:6]}"


def _example() -> str:
    """A line naming a script to run where this is a checkout of the repository (`train.py` is the user's own, and
    ops43 ran the banner's line in a fresh clone: "can't open file .../train.py")."""
    script = Path(__file__).resolve().parents[1] / "examples" / "sentiment" / "train.py"
    if not script.is_file():
        return ""
    return f"    (train.py is yours; to try one: python {script} --device gpupool --data sample --epochs 1)\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpupool up", description=__doc__.split("\n")[0])
    add_flag(p, "--fake-gpus", type=int, help="serve N fake GPUs (default: the real GPUs torch sees, else 2 fake)")
    add_flag(p, "--fake-gpu-memory", type=size_arg, default=8 * 1024**3, help="memory of each fake GPU, e.g. 8GiB")
    add_flag(p, "--scheduler-listen", default="127.0.0.1:50050", help="scheduler gRPC HOST:PORT")
    add_flag(p, "--listen", default="127.0.0.1:50051", help="daemon gRPC HOST:PORT")
    add_flag(
        p,
        "--state",
        default=str(default_state_dir() / "scheduler.db"),
        help="scheduler state (SQLite; a folder: DIR/scheduler.db); the token keys and the local CA are kept next to "
        "it",
    )
    add_flag(p, "--metrics-listen", default="127.0.0.1:9450", help="daemon Prometheus HOST:PORT, HTTPS (0: off)")
    add_flag(
        p, "--scheduler-metrics-listen", default="127.0.0.1:9451", help="scheduler Prometheus HOST:PORT, HTTPS (0: off)"
    )
    add_flag(
        p,
        "--bulk-listen",
        default="auto",
        help="daemon side port HOST:PORT: each session's frames, replies and large transfers on one TLS socket "
        "instead of gRPC messages (docs/wire.md); auto (default): --listen's host, a free port; off: none",
    )
    add_flag(
        p,
        "--host-id",
        default="",
        help="the daemon's host id (its certificate's name; default: the host name, and for a --state outside the "
        "default folder -<6 hex digits of that folder>: two pools on one host never share one, nor their fake GPUs' "
        "UUIDs, and each keeps its own across restarts)",
    )
    add_flag(
        p,
        "--ca-dir",
        default="",
        help="issue certificates from the CA in DIR (ca.crt, ca.key; made if absent): a folder of this user's that "
        "no other user can write",
    )
    add_flag(
        p,
        "--detach",
        action="store_true",
        help="run the pool in the background: return once it is up, printing its banner; its log goes to up.log in "
        "the state folder (the previous start's in up.log.1); `gpupool down` stops it",
    )
    add_flag(
        p,
        "--log-size",
        type=size_arg,
        default=uplog.DEFAULT_BYTES,
        help="with --detach: past SIZE, up.log is moved to up.log.1 (the one before dropped) and a fresh one begun, so "
        "the log takes at most twice SIZE on disk; 0: no cap",
    )
    return p


def _detach(argv: list[str], state: Path, a: argparse.Namespace) -> int:
    """`up --detach`: this `up` again, without --detach, in a session of its own (no terminal's Ctrl-C or hangup
    reaches it) with its log in up.log; its lines are passed on until it is up, then its banner printed."""
    os.umask(0o077)
    state.parent.mkdir(parents=True, exist_ok=True)
    check_state_dir(state.parent)  # (raised: the one-line refusal of gpupool/cli.py)
    other = running(state.parent)
    if other is not None:  # (refused before its log is touched: until round 52 this truncated the running pool's)
        raise InvalidArgument(already_runs(state.parent, other.get("pid", "?")))
    busy = _busy(a)
    if busy:
        print(busy, file=sys.stderr)
        return 1
    log = state.parent / "up.log"
    with contextlib.suppress(OSError):  # (this start's log a fresh one: the previous start's kept in up.log.1)
        if log.stat().st_size:
            os.replace(log, f"{log}.1")
    env = {k: v for k, v in os.environ.items() if k != "GPUPOOL_DETACH"}
    args = [x for x in argv if not (len(x) > 2 and "--detach".startswith(x))]  # (argparse takes --d too)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:  # (`up` writes its log through a keeper of its own that caps up.log, `_keep_log`: until then, here)
        popen = subprocess.Popen(
            [sys.executable, "-m", "gpupool.cli", "up", *args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**env, "PYTHONUNBUFFERED": "1", LOG_ENV: str(log)},
        )  # fmt: skip
    finally:
        os.close(out)
    banner: list[str] = []
    pending, ended = "", False
    with _Follow(log) as lines:
        try:
            while not banner or STOPS not in banner[-1]:
                chunk = lines.readline()
                if not chunk:
                    if ended:  # (read to its end after it exited)
                        sys.stderr.write(pending)
                        print(f"gpupool up: the pool did not start (its log: {log})", file=sys.stderr)
                        return 1
                    ended = popen.poll() is not None
                    time.sleep(0 if ended else 0.1)
                    continue
                pending += chunk
                if pending.endswith("\n"):  # (else a line still being written)
                    if banner or pending.startswith("gpupool is up:"):
                        banner.append(pending)
                    else:
                        sys.stderr.write(pending)
                    pending = ""
        except KeyboardInterrupt:
            os.killpg(popen.pid, signal.SIGTERM)  # its scheduler and daemon are of its process group
            popen.wait()
            print("gpupool up: interrupted: the pool that was starting is stopped", file=sys.stderr)
            return 130
    down = banner[-1].split("`")[1]  # (the banner's `gpupool down ...`)
    print("".join(banner[:-1]) + f"It runs detached (pid {popen.pid}; its log: {log}): `{down}` stops it.", flush=True)
    return 0


class _Follow:
    """up.log read line by line as its keeper writes it, across a rotation (`--log-size`): the moved file read to its
    end (complete once moved: the keeper moves it at a line's start and writes to the new one after), then the new."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, errors="replace")  # noqa: SIM115 - closed by __exit__, or replaced and closed here

    def readline(self) -> str:
        line = self.file.readline()
        if line:
            return line
        try:
            moved = os.stat(self.path).st_ino != os.fstat(self.file.fileno()).st_ino
        except FileNotFoundError:  # (between the keeper's move and its new file)
            moved = False
        if not moved:
            return ""
        line = self.file.readline()  # (what it wrote before it moved the file and after our read above)
        if line:
            return line
        self.file.close()
        self.file = open(self.path, errors="replace")  # noqa: SIM115
        return self.file.readline()

    def __enter__(self) -> _Follow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


KEEPER: subprocess.Popen[bytes] | None = None


def _keep_log(path: str, limit: int) -> None:
    """The detached `up`'s descriptors 1 and 2 made a pipe that its log's keeper (gpupool/uplog.py, a child process:
    `gpupool down` waits for it) appends to `path`, capped at `limit` bytes. Without a keeper (it did not start) they
    stay up.log itself, uncapped, as until round 52."""
    global KEEPER
    read, write = os.pipe()
    try:
        KEEPER = uplog.start(read, path, limit)
    except OSError as exc:
        print(f"gpupool up: its log is not capped (no keeper: {exc})", file=sys.stderr)
    else:
        os.dup2(write, 1)
        os.dup2(write, 2)
        atexit.register(_log_written, KEEPER)
    finally:
        os.close(read)
        os.close(write)


def _log_written(keeper: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """At `up`'s exit: its end of the pipe closed and the keeper waited for, so that the log is whole when `up` has
    ended (`up --detach`, which reads it to its end once `up` exits, shows a failed start's last lines: its reason)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    with contextlib.suppress(subprocess.TimeoutExpired):
        keeper.wait(timeout)


@dataclass(frozen=True)
class Credentials:
    """What `up` keeps next to the state: token keys and the local CA's certificates."""

    key: Path
    public: Path
    ca: Path
    scheduler: pki.CertFiles
    daemon: pki.CertFiles
    user: pki.CertFiles
    admin: pki.CertFiles
    metrics: pki.CertFiles  # Prometheus' client certificate for the /metrics endpoints (role metrics)

    def client(self, who: pki.CertFiles) -> tls.TlsConfig:
        return tls.TlsConfig(cert=str(who.cert), key=str(who.key), ca=str(self.ca))


def _server_names(*addresses: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The DNS names and IP addresses the servers' certificates name: loopback's, this host's name, and the hosts
    of `addresses` (HOST:PORT; one without a port, a metrics port's "0" (off), names none)."""
    dns, ips = ["localhost", socket.gethostname()], ["127.0.0.1", "::1"]
    for address in addresses:
        try:
            host = split_address(address)[0]
        except ValueError:
            continue
        if host in ("0.0.0.0", "::"):
            continue
        try:
            ips.append(str(ipaddress.ip_address(host)))
        except ValueError:
            dns.append(host)
    return tuple(dns), tuple(ips)


def _san_names(cert_pem: bytes) -> set[str]:
    """The DNS names and IP addresses a certificate names (its subject alternative names)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return set()
    return set(san.get_values_for_type(x509.DNSName)) | {str(i) for i in san.get_values_for_type(x509.IPAddress)}


def _dialled(url: str | None) -> str | None:
    """A metrics page's URL as the programs log it, as a client on this machine dials it: a wildcard host (0.0.0.0,
    ::) as loopback, which the servers' certificates name (`_server_names`; 0.0.0.0 is no name of theirs, and HTTPS
    checks the name), an IPv6 host in brackets."""
    m = re.fullmatch(r"(https?)://(.*):(\d+)(/\S*)", url or "")
    if m is None:
        return url
    scheme, host, port, path = m.groups()
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}{path}"


def check_state_dir(directory: Path, what: str = "state folder") -> None:
    """InvalidArgument unless `directory` is this user's and only this user (and root) can change what it holds
    (`config.check_private_dir`: it and the folders above it). `up` reuses the token key and CA key it finds there:
    until round 35 it took any folder, so in one another user owned (made before `up` ran: /tmp/gpupool) that
    user's own key, planted 0600, passed every mode check and signed the pool's tokens; and root's `up` with
    `--state` in a shared folder (a /tmp) made that folder 0700 for everyone."""
    st = directory.stat()
    if st.st_uid != os.geteuid():
        raise InvalidArgument(
            f"{what} {directory} belongs to uid {st.st_uid}, not to this user: its owner could have put a token "
            f"key or CA of theirs in it; use a folder of your own ({'--ca-dir' if what == 'CA folder' else '--state'})"
        )
    try:
        check_private_dir(directory, what, "another user could put a token key or CA key of theirs in it")
    except UnsafeCacheDir as exc:
        raise InvalidArgument(str(exc)) from None


def make_credentials(directory: Path, host_id: str, *addresses: str, ca_dir: Path | None = None) -> Credentials:
    """Token keys and certificates in `directory` (kept when present; files are owner-only)."""
    directory.mkdir(parents=True, exist_ok=True)
    check_state_dir(directory)
    if ca_dir is not None:
        # As the state folder: the CA key found there is trusted, and it signs every certificate of the pool. Until
        # round 39 `--ca-dir` took any folder: a CA planted in one another user owned or could write (or rename: a
        # folder above it writable without a sticky bit) issued their own admin certificate of the pool.
        ca_dir.mkdir(parents=True, exist_ok=True)
        check_state_dir(ca_dir, "CA folder")
    os.chmod(directory, 0o700)
    key, public = directory / "token.key", directory / "token.pub"
    try:
        signer = tokens.load_signer(key)
        if not public.exists():
            public.write_bytes(tokens.public_pem(signer.public))
    except Exception as exc:  # noqa: BLE001 - missing or unusable (e.g. an old HMAC key): make a fresh one
        if key.exists():  # said, never silent: one others may read is replaced (docs/security.md)
            print(f"gpupool up: {exc}: replaced by a fresh token key (tokens signed by the old one no longer verify)",
                  file=sys.stderr)  # fmt: skip
        tokens.generate_key_file(key, public)
    ca = pki.LocalCA(ca_dir or directory / "pki")
    dns, ips = _server_names(*addresses)

    def cert(role: str, name: str, server: bool = False) -> pki.CertFiles:
        names = (*dns, name) if role == "host" else dns  # a host's certificate also names its host id
        out = directory / "pki" / f"{role}-{name}"
        files = pki.CertFiles(out.with_name(out.name + ".crt"), out.with_name(out.name + ".key"))
        if files.cert.exists() and files.key.exists():
            pem = files.cert.read_bytes()
            # (a server's must name every address it serves now: a --metrics-listen on another address, say)
            covers = not server or _san_names(pem) >= {*names, *ips}
            if pki.identity_of(pem) == (role, name) and pki.issued_by(pem, ca) and covers:
                return files
        return ca.issue(role, name, out, dns=names if server else (), ips=ips if server else ())

    user = getpass.getuser()
    return Credentials(
        key, public, ca.cert_path, cert("server", "scheduler", True), cert("host", host_id, True),
        cert("tenant", user), cert("admin", "admin"), cert("metrics", "prometheus"),
    )  # fmt: skip


SECOND_POOL = (
    "a second pool needs its own --state and ports: --scheduler-listen, --listen, --metrics-listen, "
    "--scheduler-metrics-listen 127.0.0.1:0 each (free ones)"
)


def _in_use(child: Child) -> str:
    """The fix, when `child` died of a port in use: most often a second `gpupool up` on one host (journey42), whose
    defaults are the first one's ports (and state)."""
    if child.popen.poll() is None or not any("is in use" in line for line in child.lines):
        return ""
    return f": a port is in use (another `gpupool up` on this host?); {SECOND_POOL}"


def _busy(a: argparse.Namespace) -> str:
    """The one line when a port of the pool cannot be bound (`tls.first_unbindable`), "" when none: told before its
    programs start (round 54: a busy --listen was found after the scheduler had started and the daemon's zygote had
    imported torch, 10-20 s), its log lines and gRPC's none of it; the daemon's and the scheduler's wording since round
    55, where `up` had its own)."""
    listens = {"--scheduler-listen": a.scheduler_listen, "--listen": a.listen, "--metrics-listen": a.metrics_listen,
               "--scheduler-metrics-listen": a.scheduler_metrics_listen,
               "--bulk-listen": _bulk_listen(a.bulk_listen, a.listen)}  # fmt: skip
    flag = tls.first_unbindable(listens)
    if not flag:
        return ""
    return f"gpupool up: {tls.listen_refusal(listens[flag], flag, 'program', f'; {SECOND_POOL}')}"


class Child:
    """A gpupool program whose log is passed through to our stderr and searched for what it says."""

    def __init__(self, name: str, args: list[str]) -> None:
        self.name = name
        self.args = args
        self.restarts: list[float] = []  # monotonic times of restarts
        self._spawn()

    def _spawn(self) -> None:
        self.lines: list[str] = []
        parent, prctl = os.getpid(), _prctl()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "gpupool.cli", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=lambda: _die_with_parent(prctl, parent),  # noqa: PLW1509 - only prctl/getppid, no locks taken
        )
        self._thread = threading.Thread(target=self._pump, args=(self.popen,), daemon=True)
        self._thread.start()

    def restart(self, args: list[str]) -> bool:
        """Start the program again with `args`; False once it has been restarted too often to keep trying."""
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            return False
        self.args = args
        self._spawn()
        return True

    def _pump(self, popen: subprocess.Popen[str]) -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            self.lines.append(line)
            sys.stderr.write(line)

    def find(self, rx: re.Pattern[str], timeout: float, signals: StopSignals | None = None) -> str | None:
        """The first match of `rx` in the program's log; None when it ended or `timeout` passed without one;
        `Stopped` when one of `signals` came meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _check(signals)
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m.group(1)
            if self.popen.poll() is not None:
                self._thread.join(timeout=1)
                return next((m.group(1) for m in map(rx.search, self.lines) if m), None)
            time.sleep(0.05)
        return None

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class Stopped(Exception):
    """SIGINT or SIGTERM while `up` starts its pool (a first start's build may take minutes: `gpupool down` or Ctrl-C
    then stops it at once; until round 51 they waited for the start to end)."""


def _check(signals: StopSignals | None) -> None:
    if signals is not None and signals.wait(0) is not None:
        raise Stopped


def _daemon_start_bound() -> float:
    """How long `up` waits for its daemon to say it listens: the daemon's own bounds (its zygote's start, then a first
    start's build of the native runner, BUILD_TIMEOUT_ENV) and a minute, a backstop only (the daemon exits first)."""
    try:
        build = float(os.environ.get(BUILD_TIMEOUT_ENV) or BUILD_TIMEOUT)
    except ValueError:  # (the daemon says so and builds nothing)
        build = 0.0
    return START_TIMEOUT + max(build, 0.0) + 60.0


def _real_gpus() -> int:
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable torch/CUDA simply means fake GPUs
        return 0


def _tls_args(who: pki.CertFiles, ca: Path) -> list[str]:
    return ["--tls-cert", str(who.cert), "--tls-key", str(who.key), "--tls-ca", str(ca)]


def _wait_registered(
    scheduler: str, daemon: str, timeout: float, tls_config: tls.TlsConfig, signals: StopSignals | None = None
) -> bool:
    from gpupool.client.pool import SchedulerClient  # the client only, never the daemon or scheduler code

    client = SchedulerClient(scheduler, tls_config)
    port = daemon.rsplit(":", 1)[1]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            _check(signals)
            try:
                if any(h.state == HostState.UP and h.address.endswith(f":{port}") for h in client.list_pool().hosts):
                    return True
            except GpupoolError:
                pass
            time.sleep(0.2)
        return False
    finally:
        client.close()


def _with(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag`'s value replaced by `value`."""
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


def _bulk_listen(value: str, listen: str) -> str:
    """The daemon's --bulk-listen: `auto`, the gRPC port's host with a free port; `off`, none."""
    if value == "off":
        return ""
    return f"{listen.rsplit(':', 1)[0]}:0" if value == "auto" else value


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    a.state = str(state_file(a.state))
    if a.detach:
        return _detach(argv, Path(a.state), a)
    log = os.environ.pop(LOG_ENV, "")  # (a detached `up`: none of its children's business)
    if log:
        _keep_log(log, a.log_size)
    cfg = UpConfig(
        a.fake_gpus, a.fake_gpu_memory, a.scheduler_listen, a.listen, Path(a.state), a.metrics_listen,
        a.scheduler_metrics_listen, _bulk_listen(a.bulk_listen, a.listen),
    )  # fmt: skip
    os.umask(0o077)  # what we and the children write (state with lease ids, WAL, keys) is owner-only
    cfg.state.parent.mkdir(parents=True, exist_ok=True)
    a.host_id = a.host_id or default_host_id(cfg.state)
    # SIGINT and SIGTERM through a wakeup pipe (`StopSignals`), waited for below: until round 41 `up`'s handler set an
    # Event, which takes the Event's lock, in the main thread between two bytecodes: a signal landing while that thread
    # held it (inside `stop.wait` between its waits, or in the handler of a signal just before: a double Ctrl-C, a
    # Ctrl-C and a SIGTERM) waited for it forever, and `up` never stopped (stop40's deadlock of the daemon). Before
    # up.json names this process: a `gpupool down` that finds it is never lost.
    signals = StopSignals()
    try:
        check_state_dir(cfg.state.parent)
        # Before the credentials: a second `up` on this folder must not issue its certificates anew under the first
        record = PoolRecord(cfg.state.parent)  # (up.json: how `gpupool down` finds and stops this pool)
    except (GpupoolError, OSError) as exc:
        print(f"gpupool up: {exc}", file=sys.stderr)
        return 1
    try:
        return _run(a, cfg, record, signals)
    finally:
        record.close()


STOPS = "stops both"  # the banner's last line's words (`_stop_line`), which `_detach` waits for


def _stop_line(state: Path) -> str:
    """The banner's last line: how this pool stops (`gpupool down` names a --state other than the default). Ctrl-C
    only where one reaches this `up` (`ctrl_c_reaches`): until round 55 every banner said "Ctrl-C stops both", also
    `--detach`'s child's and scripts/demo.sh's `up` (sessions of their own: no terminal's Ctrl-C reaches them; the
    demo's Ctrl-C is the demo's own, which stops its training first)."""
    down = "gpupool down" + ("" if state == Path(build_parser().get_default("state")) else f" --state {state}")
    if ctrl_c_reaches():
        return f"Ctrl-C {STOPS} (or `{down}` from another shell, or `kill -INT {os.getpid()}`)."
    return f"`{down}` {STOPS} (or `kill -INT {os.getpid()}`; no terminal's Ctrl-C reaches this `up`)."


def ctrl_c_reaches() -> bool:
    """Whether a Ctrl-C typed at a terminal reaches this process: its controlling terminal's foreground process group
    is its own (False without one: `setsid`, `up --detach`'s child, a service; or in its background: `gpupool up &`)."""
    try:
        tty = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:  # (ENXIO: no controlling terminal)
        return False
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(tty)


def _run(a: argparse.Namespace, cfg: UpConfig, record: PoolRecord, signals: StopSignals) -> int:
    busy = _busy(a)
    if busy:
        print(busy, file=sys.stderr)
        return 1
    try:
        creds = make_credentials(
            cfg.state.parent,
            a.host_id,
            cfg.scheduler_listen,
            cfg.listen,
            cfg.scheduler_metrics_listen,  # HTTPS too: their certificates name the metrics ports' hosts
            cfg.metrics_listen,
            ca_dir=Path(a.ca_dir) if a.ca_dir else None,
        )
    except (GpupoolError, OSError, ValueError) as exc:
        # a CA key others may read (pki.LocalCA), a directory not ours, a --host-id or user name no certificate can
        # name (pki.identity_uri: 'a/b'; a traceback until round 35): one line
        print(f"gpupool up: {exc}", file=sys.stderr)
        return 1  # as the gpupool command's own one-line refusals (gpupool/cli.py)
    for path in (cfg.state, Path(f"{cfg.state}-wal"), Path(f"{cfg.state}-shm")):
        if path.exists():
            os.chmod(path, 0o600)  # made by an older version with the default umask
    children: list[Child] = []
    try:
        sched = Child(
            "scheduler",
            ["scheduler", "--listen", cfg.scheduler_listen, "--state", str(cfg.state), "--token-key-file",
             str(creds.key), "--metrics-listen", cfg.scheduler_metrics_listen, *_tls_args(creds.scheduler, creds.ca)],
        )  # fmt: skip
        children.append(sched)
        record.child("scheduler", sched.popen.pid)
        # torch's import for the GPU count (2-5 s on 2 cores) runs while the scheduler starts, not before it
        real = _real_gpus() if cfg.fake_gpus is None else 0
        fake = 0 if real else (2 if cfg.fake_gpus is None else cfg.fake_gpus)
        sched_addr = sched.find(LISTEN_RE, START_TIMEOUT, signals)
        if sched_addr is None:
            print(f"gpupool up: the scheduler did not start (see its log above){_in_use(sched)}", file=sys.stderr)
            return 1
        daemon_args = ["serve", "--listen", cfg.listen, "--token-public-keys", str(creds.public), "--scheduler",
                       sched_addr, "--metrics-listen", cfg.metrics_listen, "--host-id", a.host_id,
                       *_tls_args(creds.daemon, creds.ca),
                       # Every caller of the daemon holds a certificate of the pool's CA (the user's tenant one, the
                       # operator's): required, so its Status shows the admin every session and a tenant its own.
                       "--tls-client-auth", "require",
                       # The revocations it hears, kept for a restart while the scheduler is down (round 45)
                       "--state-dir", str(cfg.state.parent / "daemon"),
                       # One machine's pool runs multi-GPU jobs (DDP) out of the box: the workers of multi-device
                       # leases (their tokens grant it) may open sockets for collectives (docs/security.md).
                       "--worker-network", "on",
                       *(["--bulk-listen", cfg.bulk_listen] if cfg.bulk_listen else [])]  # fmt: skip
        if fake:
            daemon_args += ["--fake-gpus", str(fake), "--fake-gpu-memory", str(cfg.fake_gpu_memory)]
        daemon = Child("daemon", daemon_args)
        children.append(daemon)
        record.child("scheduler", sched.popen.pid, sched_addr)
        record.child("daemon", daemon.popen.pid)
        daemon_addr = daemon.find(LISTEN_RE, _daemon_start_bound(), signals)
        admin = creds.client(creds.admin)
        if daemon_addr is None or not _wait_registered(sched_addr, daemon_addr, START_TIMEOUT, admin, signals):
            print(
                f"gpupool up: the daemon did not start or register (see its log above){_in_use(daemon)}",
                file=sys.stderr,
            )
            return 1
        gpus = f"{real} GPU(s)" if real else f"{fake} fake GPU(s) of {format_size(cfg.fake_gpu_memory)}"
        pages = [_dialled(sched.find(METRICS_RE, 1)), _dialled(daemon.find(METRICS_RE, 1))]
        scrape = next((p for p in pages if p), None)
        print(
            f"gpupool is up: {gpus}\n"
            f"  scheduler  {sched_addr}  metrics {pages[0] or 'off'}  state {cfg.state}\n"
            f"  daemon     {daemon_addr}  metrics {pages[1] or 'off'}\n"
            f"  token key  {creds.key} (public: {creds.public})\n"
            f"  TLS        CA {creds.ca}; admin certificate {creds.admin.cert}\n"
            + (
                f"  metrics    Prometheus' client certificate {creds.metrics.cert} (key {creds.metrics.key}):\n"
                f"    curl --cacert {creds.ca} --cert {creds.metrics.cert} --key {creds.metrics.key} {scrape}\n"
                if scrape
                else ""
            )
            + "Use it:\n"
            f"  export GPUPOOL_SCHEDULER={sched_addr}\n"
            + "".join(f"  export {k}={v}\n" for k, v in tls.client_env(creds.client(creds.user)).items())
            + "  gpupool run -n 1 -p 0.5 -- python train.py\n"
            + _example()
            + "  gpupool smi\n"
            + _stop_line(cfg.state),
            flush=True,
        )
        record.child("daemon", daemon.popen.pid, daemon_addr)
        # From now on each restarts on the address it bound, so leases and the daemon's registration stay valid.
        sched.args = _with(sched.args, "--listen", sched_addr)
        daemon.args = _with(_with(daemon.args, "--listen", daemon_addr), "--scheduler", sched_addr)
        while signals.wait(0.5) is None:
            for child in children:
                if child.popen.poll() is None:
                    continue
                code = child.popen.returncode
                if not child.restart(child.args):
                    print(f"gpupool up: the {child.name} keeps exiting ({code}); stopping", file=sys.stderr)
                    return 1
                record.child(child.name, child.popen.pid)
                print(f"gpupool up: the {child.name} exited ({code}); started it again", file=sys.stderr, flush=True)
        return 0
    except Stopped:  # (while it started)
        return 0
    finally:
        for child in reversed(children):  # the daemon first: it drains its sessions while the scheduler lives
            child.stop()
        if signals.got is not None:
            print("gpupool up: stopped", file=sys.stderr)
