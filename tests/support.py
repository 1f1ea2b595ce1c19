"""Test helpers shared by every test folder: a token minting helper, daemon handles, and `gpupool serve` as a
subprocess. A plain module (not a conftest) so test files can import it by name without clashing with the
conftest.py files of other folders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server.registration import Registrar

from gpupool import pki, protocol, tls, tokens
from gpupool._proto import device_pb2, device_pb2_grpc

TEST_HOST = "test-host"
# How long a test waits for a daemon it started to register with its scheduler (a heartbeat after the daemon's start;
# seconds on an idle box, more at load 30: 20 s until round 53). A bound on a hang, not a timing: the wait ends at
# the registration.
REGISTER_WAIT_S = 60.0
MiB = 1024**2
TEST_IDENTITY = ("admin", "test")  # the test process, and every server the helpers start, use this certificate


class Pki:
    """The tests' CA and certificates: every daemon/scheduler the helpers start serves TLS with `server`, and the
    test process connects with it as an operator's client certificate (GPUPOOL_TLS_* in os.environ, inherited by
    child processes). `issue()` makes more identities (a host, a tenant) for the security tests."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = pki.LocalCA(directory)
        self.ca_file = str(self.ca.cert_path)
        self.server = self.ca.issue(*TEST_IDENTITY, dns=("localhost",), ips=("127.0.0.1", "::1"))
        self._issued: dict[tuple[str, str], pki.CertFiles] = {}

    def issue(self, role: str, name: str) -> pki.CertFiles:
        if (role, name) not in self._issued:
            dns = ("localhost", name) if role == "host" else ("localhost",)  # a host's certificate names its id
            self._issued[role, name] = self.ca.issue(role, name, dns=dns, ips=("127.0.0.1",))
        return self._issued[role, name]

    def env(self) -> dict[str, str]:
        return {
            "GPUPOOL_CA_DIR": str(self.directory),  # `gpupool up` issues its certificates from the tests' CA
            "GPUPOOL_TLS_CA": self.ca_file,
            "GPUPOOL_TLS_CERT": str(self.server.cert),
            "GPUPOOL_TLS_KEY": str(self.server.key),
        }

    def server_config(self) -> tls.TlsConfig:
        return tls.TlsConfig(cert=str(self.server.cert), key=str(self.server.key), ca=self.ca_file)

    def client_config(self, role: str = "", name: str = "", **kw: Any) -> tls.TlsConfig:
        files = self.issue(role, name) if role else self.server
        return tls.TlsConfig(cert=str(files.cert), key=str(files.key), ca=self.ca_file, **kw)


_PKI: Pki | None = None


def install_test_tls(directory: Path) -> Pki:
    """Make the test CA and export GPUPOOL_TLS_* (for this process and the programs it starts): every server the
    helpers start speaks only TLS, and tests connect with `tls_channel` (or the library's own clients, which read
    GPUPOOL_TLS_*). `plaintext_channel` is grpc's real plaintext channel, for tests that show it is refused."""
    global _PKI
    _PKI = Pki(directory)
    os.environ.update(_PKI.env())
    return _PKI


def get_pki() -> Pki:
    assert _PKI is not None, "tests/conftest.py installs the test PKI"
    return _PKI


def has_pki() -> bool:
    """Whether this process has installed the test CA (`install_test_tls`: under pytest, tests/conftest.py did); a
    script that runs the helpers by itself (scripts/fuzz_native.py) installs one only when not."""
    return _PKI is not None


def assert_same_sessions(a: Any, b: Any) -> None:
    """Two WorkerSessions (server/sessions.py) that ran the same commands two ways (two executors, or one path and
    another) hold the same: poisoned handles (code, op, message), tensors (dtype, shape, strides, offset, and values:
    equal, or close with NaNs alike where floating), bytes used, ops and uploads in progress. A handle whose upload
    is under way is not read (its bytes are not all there yet)."""
    assert {h: (p.code, p.op, p.message) for h, p in a.poisoned.items()} == {
        h: (p.code, p.op, p.message) for h, p in b.poisoned.items()
    }
    assert a.tensors.keys() == b.tensors.keys()
    for h, t in a.tensors.items():
        if h in a.uploads:
            continue
        u = b.tensors[h]
        meta = (t.dtype, t.shape, t.stride(), t.storage_offset())
        assert meta == (u.dtype, u.shape, u.stride(), u.storage_offset()), h
        assert torch.equal(t, u) or (t.is_floating_point() and torch.allclose(t, u, equal_nan=True)), h
    assert (a.used, a.ops, a.uploads) == (b.used, b.ops, b.uploads)


def tls_socket_pair(server_ctx: Any, client_ctx: Any, tcp: bool = False) -> tuple[Any, Any]:
    """A TLS connection over a socket pair, handshaken: (the daemon's end with `server_ctx`, non-blocking as a bound
    side socket is; the client's end with `client_ctx`, blocking, for the server name "localhost"). `tcp`: over a
    loopback TCP connection (a side socket's kernel buffers), not a Unix socket pair."""
    if tcp:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            b = socket.create_connection(listener.getsockname())
            a, _ = listener.accept()
    else:
        a, b = socket.socketpair()
    ours = server_ctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    theirs = client_ctx.wrap_socket(b, server_hostname="localhost", do_handshake_on_connect=False)
    shake = threading.Thread(target=theirs.do_handshake)
    shake.start()
    ours.do_handshake()
    shake.join(10)
    ours.setblocking(False)
    return ours, theirs


def tls_channel(address: str, options: Any = ()) -> grpc.Channel:
    """A TLS channel to a test server with the test process's (operator) certificate and the test CA."""
    return tls.channel(address, options or ())


plaintext_channel = grpc.insecure_channel


def metrics_context(role: str = "", name: str = "prometheus") -> Any:
    """An ssl context that verifies a test server's certificate against the test CA and presents a client
    certificate: the test process's (admin) one, or a fresh `role` one named `name` (a metrics scraper's, a
    tenant's: gpupool/metrics_http.py decides which may scrape)."""
    import ssl

    files = get_pki().issue(role, name) if role else get_pki().server
    context = ssl.create_default_context(cafile=get_pki().ca_file)
    context.load_cert_chain(str(files.cert), str(files.key))
    return context


def scrape(port: int, role: str = "", name: str = "prometheus", *, plaintext: bool = False, timeout: float = 10) -> str:
    """The page of a test server's /metrics on 127.0.0.1:PORT: HTTPS with `metrics_context(role, name)`, or plain
    HTTP (`plaintext`: a server run with --metrics-plaintext or --insecure). urllib's errors propagate (a 403)."""
    import urllib.request

    if plaintext:
        url, context = f"http://127.0.0.1:{port}/metrics", None
    else:
        url, context = f"https://127.0.0.1:{port}/metrics", metrics_context(role, name)
    with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
        return str(resp.read().decode())


def public_key_file(key_file: Path) -> Path:
    """The public key file (`--token-public-keys`) for a token key file: a PEM private key, or the raw secret
    bytes tests use as a seed (see `tokens.Signer.from_seed`)."""
    data = key_file.read_bytes()
    if b"PRIVATE KEY" in data:
        signer = tokens.load_signer(key_file)
    else:
        signer = tokens.Signer.from_seed(data.strip())
    out = key_file.with_name(key_file.name + ".pub")
    out.write_bytes(tokens.public_pem(signer.public))
    return out


def daemon_args(args: list[str]) -> list[str]:
    """`serve` arguments with `--token-key-file K` turned into `--token-public-keys K.pub`: tests hand one key
    file to the scheduler and its daemons, but a daemon only ever gets the public key."""
    if not args or args[0] != "serve":
        return list(args)
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--token-key-file" and i + 1 < len(out):
            out[i], out[i + 1] = "--token-public-keys", str(public_key_file(Path(out[i + 1])))
        elif arg.startswith("--token-key-file="):
            out[i] = f"--token-public-keys={public_key_file(Path(arg.split('=', 1)[1]))}"
    return out


def verifier(seed: bytes) -> tokens.Verifier:
    """A daemon's verifier for tokens minted with the test seed `seed`."""
    return tokens.Verifier([tokens.Signer.from_seed(seed).public])


def mint_token(
    key: bytes | tokens.Signer,
    *,
    host: str = TEST_HOST,
    device: int = 0,
    share: float = 1.0,
    quota_bytes: int = 0,
    ttl: float = 3600.0,
    tenant: str = "",
    lease_id: str = "",
    network: bool = False,
    group: str = "",
) -> str:
    """A signed lease token for tests (negative ttl: already expired); `key` bytes are a seed. `network` and
    `group`: the claims the scheduler sets on tokens of a lease of several devices (their workers may open
    sockets; the lease's group secret, `tokens.lease_group`)."""
    claims = tokens.TokenClaims(
        lease_id=lease_id or uuid.uuid4().hex,
        host=host,
        device=device,
        quota_bytes=quota_bytes,
        share=share,
        expires_at=time.time() + ttl,
        tenant=tenant,
        network=network,
        group=group,
    )
    return tokens.mint(key, claims)


@dataclass
class DaemonHandle:
    """A daemon started for a test: its address, key, and a way to mint tokens for it."""

    address: str
    key: bytes
    host_id: str
    running: Any = None  # the in-process RunningDaemon (None for subprocesses)
    process: subprocess.Popen[str] | None = None
    metrics_port: int = 0
    log_lines: list[str] = field(default_factory=list)

    def token(self, **kwargs: Any) -> str:
        kwargs.setdefault("host", self.host_id)
        return mint_token(self.key, **kwargs)


DaemonFactory = Callable[..., DaemonHandle]


_LISTEN_RE = re.compile(r"listening on (\S+:\d+)")


def start_serve_process(
    key_file: Path,
    *args: str,
    timeout: float = 150.0,
    env: dict[str, str] | None = None,
    host_id: str = TEST_HOST,
    wrap: Sequence[str] = (),
) -> tuple[subprocess.Popen[str], str]:
    """Run `gpupool serve --listen 127.0.0.1:0 ...` and return (process, bound address) parsed from its log. `wrap`:
    a command that runs it (its arguments follow), such as `unshare -m` and a shell that mounts something first.

    `timeout` outlasts the daemon's own wait for its zygote (server/zygote.py START_TIMEOUT, 120 s): a start took
    25-50 s on a 2-core box at load 5-10 (two torch imports), so 60 s failed loaded runs, and a daemon that cannot
    start says why itself."""
    cmd = [
        *wrap,
        sys.executable,
        "-m",
        "gpupool.cli",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "0",
        "--token-public-keys",
        str(public_key_file(key_file)),
        "--host-id",
        host_id,
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    proc.log_lines = []  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        proc.log_lines.append(line)  # type: ignore[attr-defined]  (the start's lines too: what it said it did)
        m = _LISTEN_RE.search(line)
        if m:
            # Keep reading its log so a chatty daemon never blocks on a full pipe.
            threading.Thread(target=_drain, args=(proc,), daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    out = "".join(proc.log_lines) + proc.communicate(timeout=10)[0]  # type: ignore[attr-defined]
    raise RuntimeError(f"gpupool serve did not start (exit {proc.returncode}): {out}")


def _drain(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            proc.log_lines.append(line)  # type: ignore[attr-defined]
    except (OSError, ValueError):
        pass


def communicate(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """proc.communicate(): its stdout and stderr; one that runs past `timeout` is killed first (what it wrote is kept).
    For children a test starts side by side and then waits for in turn."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def stop_process(proc: subprocess.Popen[str], timeout: float = 20.0) -> int:
    """SIGTERM, wait, and SIGKILL as a last resort; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def processes_naming(folder: Path) -> list[str]:
    """Processes (but this one) whose command line names `folder`: a build's python, ninja, the compiler, under a
    test's own cache folder, as "PID: COMMAND LINE"."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline[:200]}")
    return found


class Program:
    """`python -m gpupool.cli ARGS` with its output in a log file; finds lines in that log (bound ports)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args = daemon_args(args)
        self.log = log
        self._log_file = log.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPUPOOL_LOG_LEVEL": "INFO"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpupool.cli", *args], stdout=self._log_file, stderr=subprocess.STDOUT, env=env
        )

    def wait_for(self, pattern: str, timeout: float = 90.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log.read_text(errors="replace"))
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never appeared; exit {self.proc.poll()}; log:\n{self.log.read_text()}")

    def ports(self) -> tuple[int, int]:
        """(gRPC port, metrics port) from the startup log."""
        grpc_port = int(self.wait_for(r"listening on \S*?:(\d+)").group(1))
        metrics_port = int(self.wait_for(r"metrics on https?://\S*?:(\d+)/metrics").group(1))
        return grpc_port, metrics_port

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


class Healthy:
    """A neighbour session doing verified work (matmuls, downloads, scalars) in a background thread: `check()`
    fails if any of it was wrong or failed while the test harmed its own session. `pause`: seconds between
    iterations (a neighbour that leaves the device to the session under test most of the time)."""

    def __init__(self, address: str, token: str, pause: float = 0.0) -> None:
        self.session = Session.attach(address, token)
        self.pause = pause
        self.iterations = 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        s = self.session
        try:
            while not self._stop.is_set():
                x = torch.randn(32, 32)
                h = Handle(s.upload(x))
                [y] = s.call("aten::mm.default", h, h)
                [total] = s.call("aten::sum.default", y)
                got = s.download(y)
                [value] = s.sync([total])
                assert torch.equal(got, x @ x) and value == (x @ x).sum().item()
                s.free([h, y, total])
                self.iterations += 1
                if self.pause:
                    self._stop.wait(self.pause)
        except BaseException as exc:  # reported by check()
            self.failures.append(exc)

    def check(self, min_iterations: int = 3, timeout: float = 60.0) -> None:
        """Wait for `min_iterations` more verified iterations (at most `timeout` s), then stop and detach; a
        second call checks nothing more."""
        if self._closed:
            return
        start, deadline = self.iterations, time.monotonic() + timeout
        while self.iterations < start + min_iterations and not self.failures and self._thread.is_alive():
            if time.monotonic() > deadline:
                break
            self._stop.wait(0.05)
        self.close()
        assert not self.failures, self.failures
        assert self.iterations >= min_iterations

    def close(self) -> None:
        """Stop the work and detach (once)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout=30)
        self.session.close()


def register_host(address: str, host_id: str, cfg: tls.TlsConfig) -> grpc.StatusCode | None:
    """Register `host_id` (one fake device) with the scheduler at `address` as a daemon would: None when it was
    accepted, else the refusal's status code."""

    class Source:
        def devices(self) -> list[device_pb2.DeviceInfo]:
            return [device_pb2.DeviceInfo(index=0, uuid=f"GPU-{host_id}", model="fake", memory_bytes=1 << 30)]

    reg = Registrar(address, host_id, "127.0.0.1:1", Source(), tls_config=cfg)  # type: ignore[arg-type]
    try:
        reg._register()
        return None
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    finally:
        reg._channel.close()


def registered_host(factory: DaemonFactory, address: str, public: Path, host_id: str, **flags: Any) -> DaemonHandle:
    """A daemon registered with the scheduler at `address` as `host_id` (its host certificate), verifying lease
    tokens with the public key file `public` only."""
    files = get_pki().issue("host", host_id)
    handle = factory(
        host_id=host_id,
        scheduler=address,
        heartbeat_interval=0.3,
        token_key=tokens.load_verifier(public),
        tls=tls.TlsConfig(cert=str(files.cert), key=str(files.key), ca=get_pki().ca_file),
        **flags,
    )
    assert handle.running.registrar.registered.wait(REGISTER_WAIT_S)
    return handle


class TcpRelay:
    """A TCP forwarder on loopback to `upstream`, each connection relayed both ways (`_relay`). With `source`
    (another loopback address, e.g. 127.0.0.2) its connections upstream come from there: a client through it
    is, to the server, a peer on another address."""

    def __init__(
        self, upstream: tuple[str, int], source: str | None = None, ports: tuple[int, int] | None = None
    ) -> None:
        self.upstream, self.source = upstream, source
        if ports is None:
            self.listener = socket.create_server(("127.0.0.1", 0))
        else:  # a port of a daemon's --collective-ports (a rank dials no hub port outside it)
            from gpupool.server.seclink import bind_in

            self.listener = bind_in(ports, lambda port: socket.create_server(("127.0.0.1", port)))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.connections = 0
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
                up = socket.create_connection(self.upstream, source_address=(self.source, 0) if self.source else None)
            except OSError:
                return
            self.socks += [down, up]
            self.connections += 1
            self._relay(down, up, self.connections - 1)

    def _relay(self, down: socket.socket, up: socket.socket, n: int) -> None:
        """Start copying connection n's bytes both ways (byte for byte here)."""
        for a, b in ((down, up), (up, down)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        shut(src, dst)

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            s.close()


@contextlib.contextmanager
def dead_port(ports: tuple[int, int] | None = None) -> Iterator[int]:
    """A loopback port where connections are refused, for as long as the block runs: a socket bound there and not
    listening (Linux answers a SYN to it with a reset, ECONNREFUSED at once). Binding port 0 and closing it, as the
    tests did before round 29, left a free port that another test's server (or a connection's source port) could
    take before the test connected to it; a bound socket keeps every other bind and autobind off the port. With
    `ports` (LOW, HIGH: a daemon's --collective-ports) a free port of that range."""
    with socket.socket() as held:
        if ports is None:
            held.bind(("127.0.0.1", 0))
        else:
            from gpupool.server.seclink import bind_in

            bind_in(ports, lambda port: held.bind(("127.0.0.1", port)))
        yield int(held.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (/proc's children lists)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # (a task that ended meanwhile)
                todo += [int(c) for c in task.read_text().split()]
    return out


def listening_sockets(pids: Sequence[int]) -> set[tuple[str, int]]:
    """The TCP sockets these processes listen on: (address, port), from /proc (the kernel's word: for a program
    that cannot say which port it bound, such as a daemon whose log goes nowhere)."""
    inodes = set()
    for p in pids:
        for fd in Path(f"/proc/{p}/fd").glob("*"):
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                raw, port = cols[1].split(":")
                found.add((_proc_net_address(raw), int(port, 16)))
    return found


def _proc_net_address(raw: str) -> str:
    """An address of /proc/net/tcp (one little-endian 32-bit word) or tcp6 (four); IPv4-mapped ones as IPv4."""
    ip = ipaddress.ip_address(b"".join(bytes.fromhex(raw[i : i + 8])[::-1] for i in range(0, len(raw), 8)))
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)


def shut(*socks: socket.socket) -> None:
    """Both directions of each socket shut down (a relay passing a close on), errors ignored."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# ---- a pooled run against a run in another, fresh process on the CPU ----
#
# Fake GPUs compute with CPU kernels, so a pooled run gives the numbers a CPU run gives, and on this box bit for bit.
# But a run in a fresh CPU process is not a fresh session worker: the daemon's zygote sets MKL's vector math functions
# up before it forks its workers (server/executor.py `warm_vector_math`), a plain torch process does not, and its
# first parallel call of one (Adam's `sqrt` of more than 2048 floats, on two threads) now and then gives the second
# thread's half a few bits off (BENCHMARKS.md "Round 22, flaky22"); training carries such bits into every later loss.
# Round 26's CI got such last bits in test_sentiment_example's local run (train loss 0.69710861 against the pool's
# 0.69710876). So where the reference is a training loop in a fresh CPU process, it is compared within float32
# rounding: 1e-5 relative, 1e-6 absolute. A pool against itself (two clients, captured against eager, two paths of
# one client) stays bit for bit: both sides run in warmed session workers of one daemon.
#
# The tolerance covers last bits, not the bad first call itself: that one was seen ~3e-4 off (executor.py), and in
# test_native_client_run's tiny MLP a 64 x 64 weight's Adam update 3e-4 off in one half at the first step leaves 2254
# weights beyond 1e-5 (round 28, flaky28). So a reference in a fresh CPU process starts with the zygote's warm-up
# (`warmed_python`), on as many threads as a session worker; then what is left is the kernels' last bits (every
# gradient of that MLP one ulp off at random, 40 seeds: weights at most 1.3e-7 apart, losses 1.1e-7 relative).
F32_REL = 1e-5
F32_ABS = 1e-6

# `python -c` code run before a reference's script: MKL's vector math set up as the daemon's zygote sets it up
_WARM_FIRST = "from gpupool.server.executor import warm_vector_math; warm_vector_math()\n"


def warmed_python(*args: str) -> list[str]:
    """The command line of `python ARGS` (a script and its arguments, or `-c CODE` and its) as a reference run in a
    fresh CPU process: the same script, argv and sys.path[0], but MKL's vector math functions set up first, on one
    thread, as server/executor.py `warm_vector_math` sets them up for the daemon's session workers."""
    if args[0] == "-c":
        return [sys.executable, "-c", _WARM_FIRST + args[1], *args[2:]]
    run = (
        "import os, runpy, sys\n"
        f"sys.argv[0] = {args[0]!r}\n"
        "sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    return [sys.executable, "-c", _WARM_FIRST + run, *args[1:]]


def assert_float32_close(got: Any, want: Any, what: str = "", abs_tol: float = F32_ABS) -> None:
    """`got` (a pooled run's numbers: a float, or lists of them nested as a script's JSON has them) is `want` (a fresh
    CPU process's) within float32 rounding: the same nesting, each number within F32_REL relative or `abs_tol`."""
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{what}: {len(got)} vs {len(want)} values"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_float32_close(g, w, f"{what}[{i}]", abs_tol)
    else:
        assert abs(got - want) <= max(F32_REL * abs(want), abs_tol), f"{what}: {got!r} vs {want!r}"


def assert_loss_lines_close(got: list[str], want: list[str]) -> None:
    """Printed loss lines (`step 3 loss 0.123456`, six decimals): the same lines but for the numbers, and those within
    float32 rounding, where one last bit may print the sixth decimal one off (so 2e-6 absolute)."""
    assert [line.rsplit(" ", 1)[0] for line in got] == [line.rsplit(" ", 1)[0] for line in want], (got, want)
    values = [[float(line.rsplit(" ", 1)[1]) for line in lines] for lines in (got, want)]
    assert_float32_close(values[0], values[1], "losses", abs_tol=2e-6)


# Statuses a client can act on. INTERNAL or UNKNOWN would mean a daemon bug reached the wire (the fuzzers' oracle).
ACTIONABLE = frozenset(
    {
        "INVALID_ARGUMENT",
        "PERMISSION_DENIED",
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "UNAUTHENTICATED",
    }
)


# How a fuzzed session's stream may end: its bytes malformed, or too much asked
STREAM_ENDS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})


def stream_errors(
    channel: grpc.Channel, session_id: str, requests: Iterator[bytes], final: int, timeout: float
) -> tuple[list[str], str | None]:
    """Send `requests` (serialized ClientFrames) on the session's stream and collect the error code of every reply
    that carries one (an error, a sync's error) until the sync of request id `final` answers: (the codes, None), or
    (the codes and "stream:<status>", the status's details) where the stream ended first, which must be with a status
    of STREAM_ENDS. The fuzzers' oracle (test_daemon_fuzz.py, scripts/fuzz_native.py) checks the codes."""
    stream = channel.stream_stream(
        "/gpupool.v1.Device/Stream", request_serializer=None, response_deserializer=device_pb2.ServerFrame.FromString
    )
    codes: list[str] = []
    call = stream(requests, metadata=(("gpupool-session", session_id),), timeout=timeout)
    try:
        for frame in call:
            kind = frame.WhichOneof("reply")
            if kind == "error":
                codes.append(frame.error.code)
            elif kind == "sync" and frame.sync.HasField("error"):
                codes.append(frame.sync.error.code)
            if kind == "sync" and frame.request_id == final:
                break
    except grpc.RpcError as exc:
        assert exc.code() in STREAM_ENDS, (exc.code(), exc.details())
        codes.append(f"stream:{exc.code().name}")
        return codes, exc.details() or ""
    finally:
        call.cancel()
    return codes, None


def operator_tls() -> tls.TlsConfig:
    """A daemon's TLS that requires client certificates (`--tls-client-auth require`): the test process's (admin)
    certificate then sees every session in Status and the devices' totals, an operator's view (server/service.py
    `_status_view`); every client of the tests holds that certificate."""
    return dataclasses.replace(get_pki().server_config(), client_auth="require")


def daemon_status(where: Any, *sessions: Any, timeout: float = 10.0) -> device_pb2.StatusReply:
    """A daemon's Status (`where`: its address or a DeviceStub) naming `sessions` (Sessions, or secret session ids
    as Attach returned them) in its metadata: a caller without an operator's certificate sees only the sessions it
    names (and a daemon under `--tls-client-auth none`, the default, sees no certificate)."""
    md = tuple((protocol.SESSION_METADATA, s if isinstance(s, str) else s.session_id) for s in sessions)
    if isinstance(where, str):
        with tls_channel(where) as channel:
            return device_pb2_grpc.DeviceStub(channel).Status(device_pb2.StatusRequest(), timeout=timeout, metadata=md)
    return where.Status(device_pb2.StatusRequest(), timeout=timeout, metadata=md)  # type: ignore[no-any-return]


def session_usage(where: Any, s: Any) -> device_pb2.SessionUsage:
    """The row of session `s` (a Session) in a daemon's Status (`daemon_status`, naming it)."""
    tag = tokens.public_session_id(s.session_id)
    return next(u for u in daemon_status(where, s).sessions if u.session_id == tag)


def wait_only_tenants(stub: Any, tenants: set[str], timeout: float = 20.0) -> None:
    """Wait until the daemon's only sessions are those of `tenants` and its device's bytes are exactly theirs
    (closed sessions hold nothing); assert it at `timeout`. The daemon must show the test every session: one that
    requires client certificates (`operator_tls`, `--tls-client-auth require`)."""
    deadline = time.monotonic() + timeout
    while True:
        status = stub.Status(device_pb2.StatusRequest(), timeout=10)
        others = [s for s in status.sessions if s.tenant not in tenants]
        balanced = status.devices[0].used_bytes == sum(s.used_bytes for s in status.sessions)
        if (not others and balanced) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not others and balanced, (others, status.devices[0].used_bytes)


def read_until(fd: int, pattern: bytes, timeout: float) -> bytes:
    """Read a pipe or socket (non-blocking `fd`) until `pattern` is in what was read, or `timeout`, or its end."""
    got, deadline = b"", time.monotonic() + timeout
    while not re.search(pattern, got) and time.monotonic() < deadline:
        select.select([fd], [], [], 0.2)
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            continue
        if not chunk:
            break
        got += chunk
    return got


def start_serve_unread(
    key_file: Path, token_key: bytes, reader: int, writer: int, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], DaemonHandle, bytes]:
    """`gpupool serve --fake-gpus 1` whose stderr is `writer` (closed here), read through `reader` (non-blocking) until
    its "listening" line and then no more by this: (the process, a handle on it, what was read)."""
    cmd = [sys.executable, "-m", "gpupool.cli", "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "0"]
    cmd += ["--token-public-keys", str(public_key_file(key_file)), "--host-id", TEST_HOST]
    cmd += ["--fake-gpus", "1", "--fake-gpu-memory", "256MiB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=writer, env={**os.environ, **(env or {})})
    os.close(writer)
    said = read_until(reader, rb"listening on (\S+:\d+)", 150)
    m = re.search(rb"listening on (\S+:\d+)", said)
    if not m:
        proc.kill()
        proc.wait()
        raise AssertionError(said[-2000:])
    return proc, DaemonHandle(m.group(1).decode(), token_key, TEST_HOST, process=proc), said  # type: ignore[arg-type]


def native_runner_or_skip() -> Any:
    """The daemon's native runner (server/native_runner.cpp), built or loaded from its cache. Skips only where it
    cannot be built here (disabled, no compiler or ninja, a sanitized build without ASan loaded); where it could be
    built and was not (the source does not compile), fails: round 40 merged a call that no longer matched its
    function's signature, and every test of the runner skipped as if no compiler were here."""
    from gpupool.server import native_runner

    m = native_runner.load()
    if m is None:
        why = None if native_runner.enabled() else "disabled (GPUPOOL_NATIVE_RUNNER=0)"
        why = why or native_runner.missing() or native_runner._no_asan()
        if why is not None:
            pytest.skip(f"the native runner cannot be built here: {why}")
        pytest.fail("the native runner did not build though it can be built here (see the warning logged)")
    return m


def in_threads(*fns: Callable[[], None], timeout: float = 300) -> None:
    """Run each of `fns` in a new thread of its own, all at once, and raise the first error any raised (in the
    caller's thread, where pytest reports it); each thread is waited for `timeout` seconds at most."""
    errors: list[BaseException] = []

    def body(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(fn,)) for fn in fns]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=timeout)
    late = [fn.__name__ for fn, th in zip(fns, threads, strict=True) if th.is_alive()]
    assert not late, f"{', '.join(late)} still running after {timeout:g} s"
    if errors:
        raise errors[0]


def in_fresh_thread(fn: Callable[[], None], timeout: float = 300) -> None:
    """Run `fn` in a new thread and raise what it raised: its thread-local dispatch and autograd state is the default
    a daemon's worker thread runs with (round 46: in a CI worker process whose main thread an earlier test had left
    with another thread-local dispatch state, the runner's dispatcher-free views -- `views_here` -- rightly declined,
    and the tests that count them failed)."""
    in_threads(fn, timeout=timeout)


KERNEL_CLOCK_LOCK = os.path.join(tempfile.gettempdir(), "gpupool-tests-kernel-clock-step.lock")


@contextlib.contextmanager
def kernel_clock_held(exclusive: bool) -> Iterator[None]:
    """Hold the machine's lock of the tests' steps of the kernel's wall clock (an flock on a fixed path; secrev49).
    The kernel's clock is the machine's, and a step of it wakes every daemon's reaper on the machine
    (server/clocksteps.py): the tests that step it (test_sec49_clock.py) hold it `exclusive` for their whole run,
    and a test that counts its reaper's wakes or asserts a session still open holds it shared over that window, so
    that a step by the suite's other xdist worker, or another checkout's run on the same box, falls outside it."""
    with open(KERNEL_CLOCK_LOCK, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
