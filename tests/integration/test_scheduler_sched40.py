"""Round 40 (sched40): the scheduler as the pool's credential authority under races and floods, and its output.

Found and fixed here (fails on c586b76):
- Renew extended a lease under the core's lock, let it go, then took it again to mint the lease's tokens: a Release
  (or an expiry, a host lost) that came between was answered first, and Renew handed out fresh tokens of a lease
  already ended (its hosts refused them only from their next heartbeat) (scheduler/service.py `Renew`, `_lease_pb`);
- a host credential's heartbeats that change nothing were never limited: one host heartbeating in a loop held the
  core's lock as often as it liked (`--host-heartbeat-rate`, scheduler/auth.py `HostBeatRate`);
- the scheduler wrote its log lines from the thread that logged: with its stderr a pipe nobody read, the Register
  whose line met the full pipe never answered, holding the core's lock, and no call after it (scheduler/cli.py);
- what the daemon and the scheduler wrote to descriptor 2 outside Python's logging (gRPC's C++ core, tracebacks
  Python prints itself) waited on a full stderr: neither answered a call (gpupool/logsink.py `StderrPump`).
docs/security.md "Round 40 (sched40)".
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from gpupool.client.pool import SchedulerClient
from gpupool.client.session import Handle, Session
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from scheduler_fixtures import GiB, SimHost, key_file
from support import MiB, get_pki, read_until, start_serve_unread, stop_process

from gpupool import tls, tokens
from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc
from gpupool.errors import FailedPrecondition
from gpupool.protocol import LeaseState

PIPE_BYTES = 4096  # the smallest a pipe holds (a page): a few dozen log lines fill it


def _scheduler(tmp: Path, **kw: object) -> SchedulerServer:
    """A scheduler on loopback, its state a SQLite file (each decision a transaction on disk, as deployed), mutual TLS
    (the test PKI), no tenant call limit (the rounds below are many)."""
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=str(tmp / "state.db"), metrics_listen="0", tenant_rate=0.0,
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"), **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    return SchedulerServer(config, tokens.Signer.from_seed(b"sched40")).start()


@pytest.fixture
def sched(tmp_path: Path) -> Iterator[SchedulerServer]:
    server = _scheduler(tmp_path, heartbeat_interval=0.3)
    yield server
    server.stop(grace=0)


def test_renew_never_mints_a_token_for_a_lease_a_racing_release_ended(sched: SchedulerServer) -> None:
    """alice renews and releases the same lease at once, from two connections, 300 rounds. Every token the scheduler
    mints is minted while its lease is active (watched where it is minted, `Core.token`); a Renew the Release came
    before is refused (FAILED_PRECONDITION). On c586b76 (18 of 300 rounds here) Renew extended the lease under
    the core's lock, let the lock go and took it again to mint: the Release waiting on the lock came in between."""
    core = sched.core
    assert core is not None
    minted_ended: list[str] = []
    mint = core.token

    def watched(lease, index):  # type: ignore[no-untyped-def]
        if lease.state != LeaseState.ACTIVE:
            minted_ended.append(f"{lease.lease_id} ({lease.state})")
        return mint(lease, index)

    core.token = watched  # type: ignore[method-assign]
    host = SimHost(f"127.0.0.1:{sched.port}", "h1").start()
    address = f"127.0.0.1:{sched.port}"
    renewer = SchedulerClient(address, get_pki().client_config("tenant", "alice"))
    releaser = SchedulerClient(address, get_pki().client_config("tenant", "alice"))
    renewed = refused = 0
    try:
        for _ in range(300):
            lease = renewer.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.1, ttl_seconds=600))
            both = threading.Barrier(2)

            def release(lease_id: str = lease.lease_id, both: threading.Barrier = both) -> None:
                both.wait()
                releaser.release(lease_id)

            t = threading.Thread(target=release)
            t.start()
            both.wait()
            try:
                renewer.renew(lease.lease_id)
                renewed += 1
            except FailedPrecondition as exc:  # the Release came first: "lease ... is released"
                assert "released" in str(exc)
                refused += 1
            t.join(30)
        assert not minted_ended, f"{len(minted_ended)} of 300 rounds minted ended leases' tokens: {minted_ended[:3]}"
        assert renewed + refused == 300
    finally:
        host.stop()
        renewer.close()
        releaser.close()


def test_a_host_flooding_heartbeats_is_refused_past_its_rate_an_honest_host_never(sched: SchedulerServer) -> None:
    """h1 (its own host certificate) heartbeats as fast as it can, 300 calls, while h2 heartbeats every 0.3 s: past
    its bucket (10 s worth of `--host-heartbeat-rate`, 5 a second) h1 gets RESOURCE_EXHAUSTED naming the flag, and
    h2 is never refused. On c586b76 a heartbeat that changes nothing was never limited: all 300 (and as many as a
    host could send, each a hold of the core's lock with up to a message's worth of session ids) were served."""
    address = f"127.0.0.1:{sched.port}"
    honest = SimHost(address, "h2", tls_config=get_pki().client_config("host", "h2")).start()
    channel = tls.channel(address, cfg=get_pki().client_config("host", "h1"))
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    try:
        info = device_pb2.DeviceInfo(index=0, uuid="GPU-h1-0", model="fake", memory_bytes=GiB, fake=True)
        register = scheduler_pb2.RegisterRequest(host_id="h1", address="127.0.0.1:40001", devices=[info])
        stub.Register(register, timeout=10)
        served, refused = 0, []
        for _ in range(300):
            try:
                stub.Heartbeat(scheduler_pb2.HeartbeatRequest(host_id="h1"), timeout=10)
                served += 1
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err  # type: ignore[attr-defined]
                refused.append(err.details())  # type: ignore[attr-defined]
        assert refused, f"all {served} heartbeats of h1 served"
        assert "--host-heartbeat-rate" in refused[0] and "h1" in refused[0], refused[0]
        assert 50 <= served < 150, served  # its burst, and what refilled meanwhile
        time.sleep(1.0)  # h2 goes on heartbeating
        assert not honest.refused, honest.refused
        hosts = {h.host_id: h.state for h in SchedulerClient(address).list_pool().hosts}
        assert hosts == {"h1": "up", "h2": "up"}, hosts
    finally:
        channel.close()
        honest.stop()


PY_LINE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (scheduler|gpupool-serve|gpupool-zygote) "  # a Python log line
C_LINE = r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w./-]+:\d+\] "  # gRPC's core (absl's log format)
DROPPED = r"\.\.\. \d+ log lines dropped here "
TRACED = {"GRPC_VERBOSITY": "DEBUG", "GRPC_TRACE": "api"}  # gRPC's core writes lines of every call to descriptor 2


def _stalled(kind: str) -> tuple[int, int]:
    """(our end, the program's stderr) of a channel of ~4 KiB that we stop reading: a pipe (a supervisor's
    stderr=PIPE), or a unix stream socket (what systemd gives a service for journald)."""
    if kind == "pipe":
        r, w = os.pipe()
        fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    else:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PIPE_BYTES)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BYTES)
        r, w = ours.detach(), theirs.detach()
    os.set_blocking(r, False)
    return r, w


def _registered_unread(tmp: Path, kind: str, hosts: int, env: dict[str, str] | None = None) -> list[str]:
    """A `gpupool scheduler` whose stderr is `_stalled(kind)`, read until its "listening" line and then no more while
    `hosts` hosts register (an operator's certificate: each Register logs a line, under the core's lock), each of
    them answered (else the test fails); then its stderr read until the last registration's line: its lines."""
    reader, writer = _stalled(kind)
    cmd = [sys.executable, "-m", "gpupool.cli", "scheduler", "--listen", "127.0.0.1:0", "--metrics-listen", "0"]
    cmd += ["--state", str(tmp / "state.db"), "--token-key-file", str(key_file(tmp))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=writer, env={**os.environ, **(env or {})})
    os.close(writer)
    channel = None
    try:
        said = read_until(reader, rb"listening on (\S+:\d+)", 60)
        m = re.search(rb"listening on (\S+:\d+)", said)
        assert m, said[-2000:]
        channel = tls.channel(m.group(1).decode(), cfg=get_pki().client_config("admin", "ops"))
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for n in range(hosts):  # (its stderr is not read meanwhile)
            # (a GPU UUID of each host's own: since round 48 a live host's UUID is refused to any other)
            info = device_pb2.DeviceInfo(index=0, uuid=f"GPU-{n}", model="fake", memory_bytes=GiB, fake=True)
            request = scheduler_pb2.RegisterRequest(host_id=f"host{n:03d}", address="127.0.0.1:40001", devices=[info])
            try:
                stub.Register(request, timeout=20)
            except grpc.RpcError as err:
                pytest.fail(f"Register {n} not answered with the scheduler's stderr full: {err}")
        said += read_until(reader, f"host host{hosts - 1:03d} registered".encode(), 60)
        return said.decode(errors="replace").splitlines()
    finally:
        if channel is not None:
            channel.close()
        stop_process(proc)  # type: ignore[arg-type]
        os.close(reader)


def test_a_scheduler_whose_stderr_pipe_is_not_read_still_answers_and_loses_no_line(tmp_path: Path) -> None:
    """A `gpupool scheduler` whose stderr is a pipe of 4 KiB that its reader stopped reading (a supervisor started it
    with stderr=PIPE and waits on something else): 100 hosts register (each logs a line, under the core's lock), all
    answered; once the pipe is read, every line is there, whole, in order. On c586b76 the scheduler's log lines were
    written from the thread that logged: the Register whose line met the full pipe never answered, holding the core's
    lock, and nothing after it did (scheduler/cli.py: its log lines through gpupool/logsink.py `BackgroundStderr`)."""
    lines = _registered_unread(tmp_path, "pipe", 100)
    registered = [m.group(1) for line in lines if (m := re.search(r"host (host\d+) registered", line))]
    assert registered == [f"host{n:03d}" for n in range(100)], registered[-3:]
    assert not any("dropped" in line for line in lines)
    assert all(re.match(PY_LINE, line) for line in lines if line), lines


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_scheduler_whose_c_output_is_not_read_still_answers(tmp_path: Path, kind: str) -> None:
    """A `gpupool scheduler` with gRPC's core tracing every call (GRPC_TRACE=api: C++ writing to descriptor 2, not
    through Python's logging) and its stderr a pipe, or journald's kind of stream socket, of ~4 KiB that nobody reads
    after its "listening" line: 30 hosts register, all answered; once read, what arrives is whole lines, gRPC's and
    the scheduler's (none cut into another), the last registration's among them. On c586b76 (and with
    GPUPOOL_STDERR_DIRECT=1) gRPC's write waited on the full stderr and the scheduler answered no call
    (gpupool/logsink.py `StderrPump`: descriptor 2 a pipe the scheduler drains itself)."""
    lines = _registered_unread(tmp_path, kind, 30, TRACED)
    glued = [x for x in lines if any(m.start() > 0 for m in re.finditer(f"{PY_LINE}|{C_LINE}|{DROPPED}", x))]
    assert not glued, f"lines cut and joined: {glued[:3]}"  # (gRPC's lines may run over several: a PEM)
    assert sum(bool(re.match(C_LINE, x)) for x in lines) > 100  # gRPC's own lines came through
    registered = [m.group(1) for line in lines if (m := re.search(r"host (host\d+) registered", line))]
    assert registered[-1] == "host029" and registered == sorted(set(registered)), registered


PUMPED = """
import os, sys, threading
from gpupool import logsink
logsink.install(limit=8192)
for i in range(2000):  # what C code writes: straight to descriptor 2, 100 KB, far past the pipe and the buffer
    os.write(2, b"c line %04d %s\\n" % (i, b"x" * 40))
logsink.PUMP.settle()  # (all of it in the pump's pipe, 1 MiB, at once: read into the buffer, or dropped, before)
print("wrote", flush=True)
sys.stdin.readline()  # the test reads the pipe now
os.write(2, b"c line after\\n")
def fail():
    raise ValueError("in a thread")
t = threading.Thread(target=fail)
t.start()
t.join()
raise RuntimeError("the end")
"""


def test_what_is_written_to_descriptor_2_never_waits_past_the_buffer_is_dropped_counted_and_said() -> None:
    """A process with `logsink.install` (the daemon's and the scheduler's start, round 40), its stderr a pipe of 4 KiB
    nobody reads: 2,000 lines written straight to descriptor 2 (as C code does) return at once; once the pipe is
    read, the first lines are there in order, then one line counting the rest, dropped; then a line written after,
    a thread's traceback and the main thread's, printed by Python at its exit, all arrive. On c586b76 there was no
    pump: the first write past the pipe's 4 KiB blocked the process."""
    reader, writer = _stalled("pipe")
    proc = subprocess.Popen(
        [sys.executable, "-c", PUMPED], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=writer, text=True
    )
    os.close(writer)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        ready = select.select([proc.stdout], [], [], 60)[0]
        assert ready and proc.stdout.readline() == "wrote\n", "writes to descriptor 2 waited on the full pipe"
        got = b""
        while more := read_until(reader, rb"(?!)", 1.0):  # what the pipe and the buffer held: until 1 s of nothing
            got += more
        proc.stdin.write("go\n")
        proc.stdin.flush()
        got += read_until(reader, rb"RuntimeError: the end\n", 60)
        assert proc.wait(30) == 1
        text = got.decode()
        lines = text.splitlines()
        kept = [int(x.split()[2]) for x in lines if re.fullmatch(r"c line \d{4} x{40}", x)]
        assert kept == list(range(len(kept))) and 0 < len(kept) < 2000  # the first ones, in order
        (note,) = [x for x in lines if re.match(DROPPED, x)]
        assert len(kept) + int(note.split()[1]) == 2000, note
        assert lines.index(note) == len(kept) and lines[len(kept) + 1] == "c line after", lines[len(kept) - 1 :][:3]
        assert "ValueError: in a thread" in text and text.rstrip().endswith("RuntimeError: the end")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(reader)


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_daemon_whose_c_output_is_not_read_still_serves(
    tmp_path: Path, token_key_file: Path, token_key: bytes, kind: str
) -> None:
    """A `gpupool serve` with gRPC's core tracing every call (GRPC_TRACE=api: C++ writing to descriptor 2) and its
    stderr a pipe, or a stream socket as journald's, of ~4 KiB that nobody reads after its "listening" line: 10
    sessions attach, compute and close, all served; once read, the lines are whole, the last session's among them.
    On c586b76 (round 39 made the daemon's own log lines wait on nothing, not what C code writes) gRPC's write
    waited on the full stderr and no session was served."""
    reader, writer = _stalled(kind)
    proc, d, said = start_serve_unread(token_key_file, token_key, reader, writer, TRACED)
    try:
        served: list[int] = []

        def sessions() -> None:
            for _ in range(10):
                with Session.attach(d.address, d.token(quota_bytes=16 * MiB)) as s:
                    x = Handle(s.upload(torch.ones(4)))
                    (y,) = s.call("aten::add.Tensor", x, x)
                    assert s.download(y).tolist() == [2.0] * 4
                served.append(1)

        t = threading.Thread(target=sessions, daemon=True)
        t.start()  # (stderr is not read meanwhile)
        t.join(300)
        assert len(served) == 10, f"{len(served)} sessions served, then the daemon stopped answering"
        said += read_until(reader, rb"closed session 10 ", 60)
        lines = said.decode(errors="replace").splitlines()
        glued = [x for x in lines if any(m.start() > 0 for m in re.finditer(f"{PY_LINE}|{C_LINE}|{DROPPED}", x))]
        assert not glued, f"lines cut and joined: {glued[:3]}"
        assert sum(bool(re.match(C_LINE, x)) for x in lines) > 100  # gRPC's own lines came through
        assert any(re.search(r"closed session 10 ", x) for x in lines)
    finally:
        stop_process(proc)  # type: ignore[arg-type]
        os.close(reader)
