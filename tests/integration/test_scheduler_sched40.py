"""Round 40 (sched40): the scheduler as the pool's credential authority under races and floods, and its output.

Found and fixed here (fails on c586b76):
- Renew extended a lease under the core's lock, let it go, then took it again to mint the lease's tokens: a Release
  (or an expiry, a host lost) that came between was answered first, and Renew handed out fresh tokens of a lease
  already ended (its hosts refused them only from their next heartbeat) (scheduler/service.py `Renew`, `_lease_pb`);
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gpupool.client.pool import SchedulerClient
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from scheduler_fixtures import GiB, SimHost, key_file
from support import get_pki

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


def _read_until(fd: int, pattern: bytes, timeout: float) -> bytes:
    """Read the pipe (non-blocking `fd`) until `pattern` is in what was read, or `timeout`."""
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


def test_a_scheduler_whose_stderr_pipe_is_not_read_still_answers_and_loses_no_line(tmp_path: Path) -> None:
    """A `gpupool scheduler` whose stderr is a pipe of 4 KiB that its reader stopped reading (a supervisor started it
    with stderr=PIPE and waits on something else): 100 hosts register (each logs a line, under the core's lock), all
    answered; once the pipe is read, every line is there, whole, in order. On c586b76 the scheduler's log lines were
    written from the thread that logged: the Register whose line met the full pipe never answered, holding the core's
    lock, and nothing after it did (scheduler/cli.py: its log lines through gpupool/logsink.py `BackgroundStderr`)."""
    fifo = tmp_path / "stderr"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    writer = os.open(fifo, os.O_WRONLY)
    cmd = [sys.executable, "-m", "gpupool.cli", "scheduler", "--listen", "127.0.0.1:0", "--metrics-listen", "0"]
    cmd += ["--state", str(tmp_path / "state.db"), "--token-key-file", str(key_file(tmp_path))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=writer)
    os.close(writer)
    channel = None
    try:
        said = _read_until(reader, rb"listening on (\S+:\d+)", 60)
        m = re.search(rb"listening on (\S+:\d+)", said)
        assert m, said[-2000:]
        channel = tls.channel(m.group(1).decode(), cfg=get_pki().client_config("admin", "ops"))
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        info = device_pb2.DeviceInfo(index=0, uuid="GPU-0", model="fake", memory_bytes=GiB, fake=True)
        for n in range(100):  # (the pipe is not read meanwhile)
            request = scheduler_pb2.RegisterRequest(host_id=f"host{n:03d}", address="127.0.0.1:40001", devices=[info])
            try:
                stub.Register(request, timeout=20)
            except grpc.RpcError as err:
                pytest.fail(f"Register {n} not answered with the scheduler's stderr full: {err}")
        said += _read_until(reader, rb"host host099 registered", 60)
        lines = said.decode(errors="replace").splitlines()
        registered = [m.group(1) for line in lines if (m := re.search(r"host (host\d+) registered", line))]
        assert registered == [f"host{n:03d}" for n in range(100)], registered[-3:]
        assert "dropped" not in said.decode(errors="replace")
        assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ scheduler ", line) for line in lines if line), lines
    finally:
        if channel is not None:
            channel.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        os.close(reader)
