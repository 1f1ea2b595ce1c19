"""`gpupool serve` as a real process (flags, env, health, SIGTERM), session lifetime (detach, expiry, refresh,
revocation), a lost daemon, and the metrics endpoint."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.session import Handle, Session
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import daemon_status, kernel_clock_held, metrics_context, operator_tls, scrape, tls_channel

from gpupool import errors, metrics_http
from gpupool._proto import device_pb2, device_pb2_grpc
from gpupool.tokens import public_session_id

MiB = 1024**2


def status(address: str, *sessions: Session) -> device_pb2.StatusReply:
    """Status naming `sessions` (it shows those only, unless the daemon sees the test's operator certificate:
    `operator_tls`)."""
    return daemon_status(address, *sessions)


def health(address: str) -> int:
    with tls_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_serve_process_flags_env_health_and_sigterm(serve_process: Any) -> None:
    d = serve_process("--fake-gpus", "2", env={"GPUPOOL_FAKE_GPU_MEMORY": "64MiB"})
    assert health(d.address) == health_pb2.HealthCheckResponse.SERVING
    reply = status(d.address)
    assert reply.host_id == d.host_id and not reply.draining
    assert [(x.info.index, x.info.memory_bytes, x.info.fake) for x in reply.devices] == [
        (0, 64 * MiB, True),
        (1, 64 * MiB, True),
    ]
    assert len({x.info.uuid for x in reply.devices}) == 2
    s = Session.attach(d.address, d.token(device=1))
    assert s.device.index == 1
    x = torch.randn(64, 64)
    h = Handle(s.upload(x))
    outs = [s.call("aten::mm.default", h, h)[0] for _ in range(50)]  # in flight when SIGTERM lands
    d.process.send_signal(signal.SIGTERM)
    try:
        assert torch.equal(s.download(outs[-1]), x @ x)
    except errors.Unavailable:
        pass  # the daemon may already have closed the session; it must not hang or crash
    assert d.process.wait(timeout=30) == 0
    with pytest.raises(errors.Unavailable):
        s.sync()
    s.close()
    log = "".join(d.process.log_lines)
    assert "draining" in log and "stopped" in log


def test_lost_daemon_fails_waits_within_seconds(serve_process: Any) -> None:
    d = serve_process("--fake-gpus", "1", "--fake-gpu-memory", "64MiB")
    s = Session.attach(d.address, d.token())
    s.upload(torch.ones(4))
    s.sync()
    d.process.kill()
    start = time.monotonic()
    with pytest.raises(errors.Unavailable):
        s.sync()
    assert time.monotonic() - start < 10
    with pytest.raises(errors.Unavailable):
        s.upload(torch.ones(4))
        s.flush()
    s.close()


def test_bad_flags_exit_with_an_error(token_key_file: Any) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "serve", "--fake-gpu-memory", "lots"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "not a size" in out.stderr
    help_ = subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert help_.returncode == 0 and "GPUPOOL_FAKE_GPUS" in help_.stdout and "--scheduler" in help_.stdout


def test_detach_frees_memory_and_ends_the_session(daemon_factory: Any) -> None:
    daemon = daemon_factory(tls=operator_tls())  # the test's certificate sees the device's totals
    s = Session.attach(daemon.address, daemon.token(tenant="t1"))
    s.upload(torch.zeros(MiB // 4))
    s.sync()
    assert status(daemon.address).devices[0].used_bytes == MiB
    s.close()
    reply = status(daemon.address)
    assert reply.devices[0].used_bytes == 0 and not reply.sessions
    with tls_channel(daemon.address) as channel:
        stub = device_pb2_grpc.DeviceStub(channel)
        stub.Detach(device_pb2.DetachRequest(session_id=s.session_id))  # again: a no-op
        with pytest.raises(grpc.RpcError) as info:
            stub.Detach(device_pb2.DetachRequest(session_id="never-attached"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        stream = channel.stream_stream("/gpupool.v1.Device/Stream", request_serializer=None)
        with pytest.raises(grpc.RpcError) as info:  # a late stream learns why its session ended
            list(stream(iter([b""]), metadata=(("gpupool-session", s.session_id),), timeout=10))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "detached" in (info.value.details() or "")


def test_expired_lease_closes_the_session_unless_refreshed(daemon: Any) -> None:
    """`kept` refreshes its lease's token and outlives its first one; `dropped` does not. (Round 50: the refresh came
    after both attaches and within the first token's 1.5 s, which loads of 30-47 outran, 1 run in 10: `kept` now
    refreshes right after its attach, its first token as long as the sleep that outlasts it.)"""
    lease = "lease-refreshed"
    kept = Session.attach(daemon.address, daemon.token(ttl=2.5, lease_id=lease))
    kept.refresh(daemon.token(ttl=60, lease_id=lease))
    dropped = Session.attach(daemon.address, daemon.token(ttl=1.5))
    dropped.upload(torch.zeros(1000))
    kept.sync()
    time.sleep(2.5)  # past both first tokens' ends (each minted before this)
    with pytest.raises(errors.FailedPrecondition, match="expired"):
        dropped.sync()
    [h] = kept.call("aten::ones.default", [3])
    assert kept.download(h).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(errors.PermissionDenied, match="another lease"):  # (genuine, not this session's: round 52)
        kept.refresh(daemon.token(ttl=60, lease_id="another-lease"))
    kept.sync()  # a refused refresh harms nothing: the session keeps its old expiry
    shown = status(daemon.address, kept, dropped).sessions  # (naming both: only the kept one is left)
    assert [x.session_id for x in shown] == [public_session_id(kept.session_id)]
    kept.close()
    dropped.close()


def _switches(tid: int) -> int:
    """A thread of this process: its context switches so far (each wake-up of a sleeping thread is one)."""
    with open(f"/proc/self/task/{tid}/status") as f:
        return sum(int(line.split(":")[1]) for line in f if "ctxt_switches" in line)


def test_the_lease_reaper_sleeps_until_the_first_lease_ends(daemon: Any) -> None:
    """Round 45: the reaper sleeps until the first open session's lease ends (at most `reap_interval`, 10 s, on an idle
    daemon; since round 48 at most `clock_look`, 1 s, while a session is open: a step of the wall clock moves its end)
    and is woken by a new session: an idle daemon's reaper does not wake (until round 45: every 0.5 s, ~2.9k
    instructions a wake), and a session whose lease ends sooner than the reaper's sleep is still closed at its end."""
    reaper = daemon.running.daemon._reaper
    assert reaper.native_id is not None
    assert not daemon.running.daemon.session_list()
    with kernel_clock_held(exclusive=False):  # (a step of the kernel's clock wakes it: test_sec49_clock's, held off)
        before = _switches(reaper.native_id)
        time.sleep(1.5)
        assert _switches(reaper.native_id) - before <= 1, "the reaper of an idle daemon woke"
    with Session.attach(daemon.address, daemon.token(ttl=3600)) as long_lived, kernel_clock_held(exclusive=False):
        time.sleep(0.3)
        before = _switches(reaper.native_id)
        time.sleep(2.5)
        assert _switches(reaper.native_id) - before <= 4, "the reaper woke more than once a second"
        short = Session.attach(daemon.address, daemon.token(ttl=1.0))
        ends = time.monotonic() + 1.0
        while short.session_id in [x.session_id for x in daemon.running.daemon.session_list()]:
            assert time.monotonic() < ends + 2.0, "a lease ending before the reaper's sleep was not closed at its end"
            time.sleep(0.05)
        with pytest.raises(errors.FailedPrecondition, match="expired"):
            short.sync()
        short.close()
        long_lived.sync()


def test_a_slow_close_does_not_make_the_reaper_late_for_the_next_lease(daemon: Any, monkeypatch: Any) -> None:
    """Round 45 review (datarev45): the reaper measured its next sleep from the time it took before closing the
    expired sessions, so a close that took long (an inline close waits for the session's running slice) made the
    next lease's end that much later: here A's close takes 3 s, B's lease ends 2 s after A's, and B was closed ~2 s
    after A's close returned (the stale sleep); now at once (its end passed while the reaper was busy).

    Both tokens are minted, and the close slowed, before either attach (round 50): A's lease of 1 s from its token
    used to end during B's attach at load 20-30 (5 runs in 15), closed before the slow close was in place, and B's
    end followed its own token's mint, after A's attach. A's lease is 3 s: its attach must come within it."""
    d = daemon.running.daemon
    original = d.close_session
    closed: dict[str, float] = {}
    slow: set[str] = set()

    def slow_close(s: Any, *args: Any, **kwargs: Any) -> Any:
        if s.session_id in slow:
            time.sleep(3.0)
        try:
            return original(s, *args, **kwargs)
        finally:
            closed.setdefault(s.session_id, time.monotonic())

    monkeypatch.setattr(d, "close_session", slow_close)
    tokens = daemon.token(ttl=3.0), daemon.token(ttl=5.0)  # B's lease ends 2 s after A's, however long attaches take
    a = Session.attach(daemon.address, tokens[0])
    slow.add(a.session_id)
    b = Session.attach(daemon.address, tokens[1])
    deadline = time.monotonic() + 15.0
    while b.session_id not in closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.session_id in closed and b.session_id in closed, closed
    late = closed[b.session_id] - closed[a.session_id]
    assert late < 1.0, f"the lease ending during a slow close was closed {late:.2f} s after the close ended"
    a.close()
    b.close()


def test_refresh_is_not_held_up_by_a_backlog(daemon_factory: Any) -> None:
    """A client far ahead of the device (seconds of queued work, the daemon's queue full so its stream reader
    waits) still gets its renewed token in before the old one expires: the refresh does not wait behind ops. The
    session outlives its first token (the daemon's expiry sweep passing several times) with its backlog unfinished."""
    daemon = daemon_factory(queue_commands=16, reap_interval=0.1)
    # The client must send its backlog and the refresh within the first token's life for the case to exist: on a
    # loaded box (load ~17 on 2 cores) queueing once took longer than 2 s. Then the case is tried again with a
    # longer token and a backlog to match; a refresh sent in time must always keep the session.
    for ttl in (2.0, 4.0, 8.0):
        lease, mms = f"lease-backlog-{ttl:g}", int(25 * ttl)
        expires = time.time() + ttl
        s = Session.attach(daemon.address, daemon.token(ttl=ttl, lease_id=lease))
        [a] = s.call("aten::ones.default", [2048, 2048])
        for _ in range(mms):  # 50 x 17 GFLOP per 2 s of token: seconds of work (~4 s quiet), queued in no time
            s.free(s.call("aten::mm.default", Handle(a), Handle(a)))
        s.flush()
        if time.time() > expires - 0.5:  # the client was slower than the token: no refresh in time to check
            with contextlib.suppress(errors.GpupoolError):
                s.close()
            continue
        s.refresh(daemon.token(ttl=60, lease_id=lease))
        time.sleep(max(0.0, expires + 0.6 - time.time()))
        # before: closed ("expired") at the first token's end, the refresh having waited behind the backlog
        mine = [x for x in status(daemon.address, s).sessions if x.lease_id == lease]
        assert len(mine) == 1, "the session ended with its first token: the refresh did not reach it in time"
        assert mine[0].ops < 1 + mms, "the backlog must outlast the first token for this test to mean anything"
        s.close()  # its backlog goes with it
        return
    pytest.fail("the client never queued its backlog within a token's life (8 s at most)")


def test_revoked_leases_are_closed_and_freed(daemon_factory: Any) -> None:
    daemon = daemon_factory(tls=operator_tls())  # the test's certificate sees every session and the totals
    s = Session.attach(daemon.address, daemon.token(lease_id="L1"))
    other = Session.attach(daemon.address, daemon.token(lease_id="L2"))
    s.upload(torch.zeros(MiB // 4))
    s.sync()
    daemon.running.daemon.revoke_leases(["L1", "unknown"])
    with pytest.raises(errors.FailedPrecondition, match="revoked"):
        s.sync()
    assert [x.lease_id for x in status(daemon.address).sessions] == ["L2"]
    assert status(daemon.address).devices[0].used_bytes == 0
    other.sync()
    s.close()
    other.close()


def test_registration_source_protocol(daemon: Any) -> None:
    from gpupool.server.daemon import RegistrationSource

    d = daemon.running.daemon
    source: RegistrationSource = d
    with Session.attach(daemon.address, daemon.token(lease_id="L9", share=0.5, tenant="team")) as s:
        s.upload(torch.zeros(256))
        s.sync()
        sessions, devices = source.usage()
        assert [(x.lease_id, x.tenant, x.share, x.used_bytes) for x in sessions] == [("L9", "team", 0.5, 1024)]
        assert devices[0].used_bytes == 1024 and source.devices()[0].fake
        assert devices[0].free_bytes == devices[0].info.memory_bytes - 1024  # (terms54: a fake GPU's own bound)
        assert source.host_id == daemon.host_id and not source.draining()


def test_second_attach_of_a_lease_does_not_evict_the_first(daemon: Any) -> None:
    """A copied token cannot take the session from its holder; after the holder detaches it attaches again."""
    token = daemon.token(lease_id="same")
    first = Session.attach(daemon.address, token)
    with pytest.raises(errors.FailedPrecondition, match="already has a session"):
        Session.attach(daemon.address, token)
    first.sync()  # the holder is untouched
    first.close()
    second = Session.attach(daemon.address, token)
    second.sync()
    assert second.handle_base != first.handle_base
    second.close()


def test_metrics_endpoint_outlasts_idle_and_slow_clients(daemon: Any) -> None:
    """A local client opens many connections to /metrics and sends a partial request on each (slowloris). Each
    held a thread of the daemon for as long as the client liked (prometheus_client's server, then round 19's):
    thousands held that many threads and sockets. Now at most MAX_CONNECTIONS are served at once (the others are
    closed unanswered) and a silent one is dropped after REQUEST_SECONDS; a scrape is answered after that. Since
    round 40 the endpoint is TLS: every other connection never starts its handshake (the handshake, in the
    connection's thread, is bounded as the request is), the others finish it and send a partial request."""

    def serving() -> int:
        return sum("process_request_thread" in t.name for t in threading.enumerate())

    before = serving()
    n = metrics_http.MAX_CONNECTIONS + 16
    conns = []
    context = metrics_context()
    for k in range(n):
        c = socket.create_connection(("127.0.0.1", daemon.metrics_port), timeout=10)
        if k % 2:
            c = context.wrap_socket(c, server_hostname="127.0.0.1")
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the request never ends
        conns.append(c)  # (even k: silent, its handshake never starts)
    deadline = time.monotonic() + 3  # the server accepts them one by one
    while serving() - before <= metrics_http.MAX_CONNECTIONS and time.monotonic() < deadline:
        time.sleep(0.05)
    held = serving() - before
    assert 0 < held <= metrics_http.MAX_CONNECTIONS, f"{held} threads serve {n} idle connections"
    start = time.monotonic()
    for c in conns:  # each is closed by the server: at once past the cap, after REQUEST_SECONDS else
        c.settimeout(metrics_http.REQUEST_SECONDS + 10 - (time.monotonic() - start))
        try:
            assert c.recv(1024) == b""
        except (ConnectionResetError, ssl.SSLEOFError):
            pass
        c.close()
    assert time.monotonic() - start < metrics_http.REQUEST_SECONDS + 5
    text = scrape(daemon.metrics_port)
    assert "gpupool_device_info{" in text
    deadline = time.monotonic() + 5
    while serving() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert serving() <= before


def test_a_client_holding_every_metrics_connection_never_keeps_a_scrape_out(daemon: Any) -> None:
    """One client holds MAX_CONNECTIONS connections to /metrics, each trickling a header line every 0.3 s (so no
    read ever times out) and reopened as soon as it is dropped. Round 20 closed every further connection unanswered:
    Prometheus' scrapes all failed for as long as the client liked. Now a scrape takes the slot of the oldest
    connection still sending its request, and is answered; the threads serving stay within MAX_CONNECTIONS."""
    port = daemon.metrics_port

    def serving() -> int:
        return sum("process_request_thread" in t.name for t in threading.enumerate())

    context = metrics_context()

    def opened() -> socket.socket:
        c = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=2), server_hostname="127.0.0.1")
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the request never ends (its handshake done: TLS)
        return c

    before = serving()
    stop = threading.Event()
    conns = [opened() for _ in range(metrics_http.MAX_CONNECTIONS)]
    reopened = [0]

    def hold() -> None:
        while not stop.wait(0.3):
            for k, c in enumerate(conns):
                try:
                    c.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    c.close()
                    try:
                        conns[k] = opened()
                        reopened[0] += 1
                    except OSError:
                        pass

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        deadline = time.monotonic() + 5
        while serving() - before < metrics_http.MAX_CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert serving() - before == metrics_http.MAX_CONNECTIONS  # every slot is the client's
        most = 0
        for _ in range(10):
            text = scrape(port, timeout=5)
            assert "gpupool_device_info{" in text
            most = max(most, serving() - before)
            time.sleep(0.1)
        assert most <= metrics_http.MAX_CONNECTIONS and reopened[0] > 0  # its connections were taken, not added
    finally:
        stop.set()
        holder.join()
        for c in conns:
            c.close()


def test_metrics_endpoint(daemon: Any) -> None:
    with Session.attach(daemon.address, daemon.token(tenant="acme", lease_id="LM", share=0.5)) as s:
        h = Handle(s.upload(torch.randn(32, 32)))
        s.call("aten::mm.default", h, h)
        s.call("aten::not_an_op.default")
        with pytest.raises(errors.InvalidArgument):
            s.sync()
        text = scrape(daemon.metrics_port)
        assert 'gpupool_session_share{UUID="GPU-' in text and 'lease="LM"' in text
        assert "gpupool_session_memory_used_bytes{" in text and "gpupool_session_memory_limit_bytes{" in text
    text = scrape(daemon.metrics_port)
    for name in (
        "gpupool_device_info{",
        "gpupool_device_memory_capacity_bytes{",
        "gpupool_device_memory_used_bytes{",
        "gpupool_device_busy_seconds_total{",
        "gpupool_device_sessions{",
        "gpupool_tenant_busy_seconds_total{",
        "gpupool_tenant_ops_total{",
        "gpupool_transfer_bytes_total{",
        "gpupool_batch_duration_seconds_bucket{",
    ):
        assert name in text, name
    assert 'gpupool_tenant_errors_total{UUID="GPU-' in text and 'code="INVALID_ARGUMENT"' in text
    assert 'tenant="acme"' in text  # tenant counters outlive the session
    assert 'gpupool_transfer_bytes_total{direction="upload",host="test-host"} 4096.0' in text
    assert "gpupool_device_sessions{UUID=" in text and "} 0.0" in text


def _proc_gid(pid: int) -> int:
    """The group /proc/PID/status belongs to: the process's own gid while it is dumpable, root's (0) once it is not
    (the kernel's task_dump_owner), so a test sees PR_GET_DUMPABLE of another process."""
    return os.stat(f"/proc/{pid}/status").st_gid


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="runs the daemon with another gid")
def test_the_daemon_and_its_zygote_are_not_dumpable(serve_process: Any) -> None:
    """A worker that keeps a non-root daemon's uid (no `--worker-user` drop; where no Landlock confines it) could
    read the daemon's and the zygote's /proc/PID (environ, maps, fd; mem, whose memory holds every session id and
    the TLS key) while they were dumpable (22f7ba0: both were; a worker makes itself not dumpable). The daemon runs
    as root here, with group 65534, so the owner of its /proc files tells it."""
    d = serve_process("--fake-gpus", "1", wrap=["setpriv", "--regid", "65534", "--clear-groups"])
    assert d.process is not None
    pid = d.process.pid
    with open(f"/proc/{pid}/status") as f:
        assert any(line.split()[1:3] == ["65534", "65534"] for line in f if line.startswith("Gid:"))  # it runs so
    zygotes = [int(e) for e in os.listdir("/proc") if e.isdigit() and _parent(int(e)) == pid]
    with contextlib.suppress(OSError):
        zygotes = [z for z in zygotes if b"zygote" in Path(f"/proc/{z}/cmdline").read_bytes()]
    assert len(zygotes) == 1, zygotes
    assert {"daemon": _proc_gid(pid), "zygote": _proc_gid(zygotes[0])} == {"daemon": 0, "zygote": 0}
    s = Session.attach(d.address, d.token(device=0))  # it serves, and its worker is not dumpable either
    assert s.call("aten::add.Tensor", Handle(s.upload(torch.ones(4))), 1.0)[0] is not None
    worker = next(x.worker_pid for x in status(d.address, s).sessions)
    assert _proc_gid(worker) == 0
    s.close()


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0
