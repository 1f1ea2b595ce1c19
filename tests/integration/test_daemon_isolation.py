"""One worker process per session: a crash ends only its session, host resources are bounded per session, and
workers run sandboxed. Real daemons on loopback; the crashes are real signals delivered to a live worker."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
import torch
from gpupool.client.session import Session
from support import MiB, operator_tls, session_usage, tls_channel

from gpupool import errors
from gpupool._proto import device_pb2, device_pb2_grpc
from gpupool.tokens import public_session_id


def status(address: str) -> device_pb2.StatusReply:
    """Status as the test's (admin) certificate: every session where the daemon requires certificates (the
    tests here that count every session start theirs so), none where it does not."""
    with tls_channel(address) as ch:
        return device_pb2_grpc.DeviceStub(ch).Status(device_pb2.StatusRequest(), timeout=10)


usage = session_usage  # the session's row (Status naming it)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if any(line.startswith("State:") and "Z" in line for line in f):
                    return
        except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between the open and the read
            return
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} still alive")


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL, signal.SIGABRT])
def test_a_crashing_worker_ends_only_its_session(daemon_factory: Any, sig: signal.Signals) -> None:
    daemon = daemon_factory(tls=operator_tls())  # the test's certificate sees every session and the totals
    neighbour = Session.attach(daemon.address, daemon.token(quota_bytes=16 * MiB))
    x = torch.randn(1000, dtype=torch.float64)
    hx = neighbour.upload(x)
    (hy,) = neighbour.call("aten::mul.Tensor", hx, hx)
    neighbour.sync()
    before = usage(daemon.address, neighbour)

    victim = Session.attach(daemon.address, daemon.token(quota_bytes=16 * MiB))
    victim.upload(torch.ones(1000))
    victim.sync()
    pid = usage(daemon.address, victim).worker_pid
    assert pid > 0 and pid not in (os.getpid(), before.worker_pid)
    os.kill(pid, sig)
    with pytest.raises(errors.Internal) as info:
        victim.sync()
    assert sig.name in str(info.value) and "worker" in str(info.value)
    victim.close()
    wait_gone(pid)

    # The neighbour is untouched: its values bit-exact, its memory and share as they were, and it keeps working.
    assert torch.equal(neighbour.download(hy), x * x)
    after = usage(daemon.address, neighbour)
    assert (after.used_bytes, after.limit_bytes, after.share, after.worker_pid) == (
        before.used_bytes,
        before.limit_bytes,
        before.share,
        before.worker_pid,
    )
    (hz,) = neighbour.call("aten::add.Tensor", hy, hx)
    assert torch.equal(neighbour.download(hz), x * x + x)
    st = status(daemon.address)
    assert [s.session_id for s in st.sessions] == [public_session_id(neighbour.session_id)]
    assert st.devices[0].used_bytes == st.sessions[0].used_bytes == after.used_bytes + 8000  # the victim's are back
    # The daemon keeps serving new sessions.
    again = Session.attach(daemon.address, daemon.token(quota_bytes=16 * MiB))
    assert torch.equal(again.download(again.upload(torch.arange(5))), torch.arange(5))
    again.close()
    neighbour.close()


def test_workers_are_sandboxed_and_die_with_their_session(daemon: Any) -> None:
    s = Session.attach(daemon.address, daemon.token(quota_bytes=16 * MiB))
    s.sync()
    pid = usage(daemon.address, s).worker_pid
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # a filter is loaded
    s.close()
    wait_gone(pid)


def test_a_handle_flood_is_refused_and_the_daemon_returns_to_baseline(serve_process: Any) -> None:
    d = serve_process("--fake-gpus", "1", "--fake-gpu-memory", "64MiB", "--max-handles", "20000")
    assert d.process is not None
    warm = Session.attach(d.address, d.token(quota_bytes=MiB))  # first session: the daemon's one-time setup
    warm.close()
    time.sleep(0.5)
    baseline = rss(d.process.pid)
    s = Session.attach(d.address, d.token(quota_bytes=MiB))
    base = s.upload(torch.zeros(0))
    for _ in range(25):  # zero-byte views cost no quota, but each is a handle
        for _ in range(1000):
            s.call("aten::view.default", base, [0])
        s.flush()
    with pytest.raises(errors.ResourceExhausted) as info:
        s.sync()
    assert "handle limit" in str(info.value) and "20000" in str(info.value)
    assert usage(d.address, s).handles <= 20000
    s.close()
    deadline = time.monotonic() + 10
    while rss(d.process.pid) > baseline + 8 * MiB and time.monotonic() < deadline:
        time.sleep(0.2)
    assert rss(d.process.pid) <= baseline + 8 * MiB, (rss(d.process.pid), baseline)


def shared_mappings(pid: int) -> int:
    """How many session workers' shared buffers (server/zygote.py's memfd "gpupool-shared") process `pid` maps."""
    with open(f"/proc/{pid}/maps") as f:
        return sum("gpupool-shared" in line for line in f)


def test_a_closed_sessions_shared_buffer_is_unmapped_at_once(serve_process: Any) -> None:
    # Each session maps its worker's 64 MiB shared buffer into the daemon; a closed session's runner lived on until
    # the collector found it, and with it the mapping: 41-56 of 100 churned sessions' buffers stayed mapped, and a
    # daemon under a 6 GiB address-space cap refused new workers ([Errno 12], round 36's CI). Now closing unmaps it.
    d = serve_process("--fake-gpus", "1", "--fake-gpu-memory", "64MiB", "--tls-client-auth", "require")  # (`status`)
    assert d.process is not None
    for i in range(24):
        s = Session.attach(d.address, d.token(quota_bytes=MiB))
        h = s.upload(torch.full((256,), float(i)))
        assert float(s.download(h)[0]) == i
        s.close()
    deadline = time.monotonic() + 10
    while (status(d.address).sessions or shared_mappings(d.process.pid) > 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not status(d.address).sessions
    assert shared_mappings(d.process.pid) <= 2  # every closed session's buffer went with it (0 here; the base kept 7)


def _attach_together(address: str, tokens_: list[str]) -> tuple[list[Session], list[BaseException]]:
    """Attach with each token at once (a thread each, released together): the sessions and the refusals."""
    import threading

    go = threading.Barrier(len(tokens_))
    got: list[Session] = []
    refused: list[BaseException] = []

    def one(tok: str) -> None:
        go.wait()
        try:
            got.append(Session.attach(address, tok))
        except errors.GpupoolError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=one, args=(t,)) for t in tokens_]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return got, refused


def test_concurrent_attaches_hold_one_session_per_lease_and_the_session_limit(serve_process: Any) -> None:
    # A worker starts outside the daemon's lock (a fork; retried for seconds when memory is short): the checks
    # before it (one session per lease and device, --max-sessions) counted only started sessions, so Attaches at
    # once all passed them (round 37's final review). Starting ones count now.
    d = serve_process(
        "--fake-gpus", "1", "--fake-gpu-memory", "64MiB", "--max-sessions", "2", "--tls-client-auth", "require"
    )  # (`status`: every session)
    one_lease = d.token(quota_bytes=MiB, lease_id="the-lease")
    got, refused = _attach_together(d.address, [one_lease] * 4)
    try:
        assert len(got) == 1, (len(got), refused)
        assert all(isinstance(e, errors.FailedPrecondition) for e in refused), refused
    finally:
        for s in got:
            s.close()
    deadline = time.monotonic() + 10
    while status(d.address).sessions and time.monotonic() < deadline:
        time.sleep(0.1)
    got, refused = _attach_together(d.address, [d.token(quota_bytes=MiB) for _ in range(5)])
    try:
        assert len(got) == 2, (len(got), refused)
        assert all(isinstance(e, errors.ResourceExhausted) for e in refused), refused
    finally:
        for s in got:
            s.close()


def test_max_pool_backwards_with_bad_indices_are_refused(daemon: Any) -> None:
    s = Session.attach(daemon.address, daemon.token(quota_bytes=16 * MiB))
    x = torch.randn(1, 2, 8, 8)
    out, idx = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
    hx, hg = s.upload(x), s.upload(torch.ones_like(out))
    for bad in (-(1 << 20), 1 << 20):
        hi = s.upload(torch.full_like(idx, bad))
        s.call("aten::max_pool2d_with_indices_backward.default", hg, hx, [2, 2], [2, 2], [0, 0], [1, 1], False, hi)
        with pytest.raises(errors.InvalidArgument, match="indices must lie in"):
            s.sync()
        s.call("aten::adaptive_max_pool2d_backward.default", hg, hx, hi)
        with pytest.raises(errors.InvalidArgument, match="indices must lie in"):
            s.sync()
    (hgi,) = s.call(
        "aten::max_pool2d_with_indices_backward.default", hg, hx, [2, 2], [2, 2], [0, 0], [1, 1], False, s.upload(idx)
    )
    want = torch.ops.aten.max_pool2d_with_indices_backward.default(
        torch.ones_like(out), x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
    )
    assert torch.equal(s.download(hgi), want)
    s.close()


def test_ops_off_the_allowlist_are_denied_by_name(daemon: Any) -> None:
    s = Session.attach(daemon.address, daemon.token(quota_bytes=16 * MiB))
    h = s.upload(torch.ones(3))
    # A real aten op with length-like arguments that no traced model or OpInfo sample sends.
    s.call("aten::_segment_reduce_backward.default", h, h, h, "sum", h)
    with pytest.raises(errors.PermissionDenied, match="_segment_reduce_backward.*allowlist"):
        s.sync()
    (h2,) = s.call("aten::add.Tensor", h, h)
    assert torch.equal(s.download(h2), torch.full((3,), 2.0))
    s.close()


def test_streams_per_tenant_are_bounded(daemon_factory: Any) -> None:
    d = daemon_factory(max_streams_per_tenant=2)
    sessions = [Session.attach(d.address, d.token(tenant="greedy", quota_bytes=MiB)) for _ in range(2)]
    for s in sessions:
        s.sync()
    third = Session.attach(d.address, d.token(tenant="greedy", quota_bytes=MiB))
    with pytest.raises(errors.ResourceExhausted, match="open streams"):
        third.sync()
    other = Session.attach(d.address, d.token(tenant="someone-else", quota_bytes=MiB))
    other.sync()
    for s in [*sessions, other]:
        s.close()


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.mark.skipif(os.geteuid() != 0, reason="the user drop applies to a daemon running as root")
def test_a_root_daemons_workers_drop_to_an_unprivileged_user(daemon_factory: Any) -> None:
    d = daemon_factory(worker_uids="off")  # the default --worker-user, nobody, for every worker (a uid each: auto)
    s = Session.attach(d.address, d.token(quota_bytes=16 * MiB))
    assert s.download(s.upload(torch.arange(4.0))).tolist() == [0.0, 1.0, 2.0, 3.0]
    pid = usage(d.address, s).worker_pid
    fields = _proc_status(pid)
    uids, gids = fields["Uid"].split(), fields["Gid"].split()
    assert set(uids) == {"65534"} and set(gids) == {"65534"}, (uids, gids)  # real, effective, saved, fs
    assert fields["Groups"].strip() == "" and int(fields["CapEff"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    s.close()
    wait_gone(pid)

    kept = daemon_factory(worker_user="keep")  # the explicit opt-out
    s = Session.attach(kept.address, kept.token(quota_bytes=16 * MiB))
    s.sync()
    assert _proc_status(usage(kept.address, s).worker_pid)["Uid"].split()[0] == "0"
    s.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="the user check applies to a daemon running as root")
def test_an_unknown_worker_user_stops_the_daemon_at_start(daemon_factory: Any) -> None:
    with pytest.raises(errors.InvalidArgument, match="no-such-user-here: no such user"):
        daemon_factory(worker_user="no-such-user-here")


def _join_alone(s: Session, tokens: list[str], rank: int = 0) -> None:
    """GroupJoin as client/distributed.py sends it; rank 0 hosts the group's store (it opens a socket)."""
    join = device_pb2.GroupJoin(rank=rank, size=len(tokens), tokens=tokens, timeout_seconds=2.0)
    if rank == 0:
        join.port_handle = s.new_handle()
    else:
        join.store_address = "127.0.0.1:9"
    s.command(device_pb2.Command(group_join=join))
    s.sync()


def test_only_workers_of_a_multi_device_lease_get_network(daemon_factory: Any) -> None:
    """The grant is per lease (the token's `network` claim), bounded by the daemon's --worker-network: a worker
    without it really cannot open a socket (its seccomp filter says EPERM), one with it can."""
    import uuid

    d = daemon_factory(fake_gpus=2, fake_gpu_memory=64 * MiB, worker_network=True)
    lease = uuid.uuid4().hex
    # A two-device lease whose tokens lack the claim (as a single-device lease's do): no socket for its workers.
    plain = [d.token(lease_id=lease, device=i) for i in range(2)]
    s = Session.attach(d.address, plain[0])
    with pytest.raises(errors.PermissionDenied, match="may not open network sockets"):
        _join_alone(s, plain)
    s.close()
    # The same lease's tokens with the claim (what the scheduler signs for several devices): the store listens.
    lease = uuid.uuid4().hex
    granted = [d.token(lease_id=lease, device=i, network=True) for i in range(2)]
    s = Session.attach(d.address, granted[0])
    _join_alone(s, granted)
    s.close()
    # A one-rank group needs no socket: it works without the grant (collectives are the identity).
    single = d.token()
    s = Session.attach(d.address, single)
    _join_alone(s, [single])
    h = s.upload(torch.tensor([1.0, 2.0]))
    s.command(device_pb2.Command(collective=device_pb2.Collective(kind="allreduce", tensors=[h], reduce_op="sum")))
    assert s.download(h).tolist() == [1.0, 2.0]
    s.close()
    # The daemon's flag is the upper bound: with --worker-network off even a granted token gets no socket.
    off = daemon_factory(host_id="host-off", fake_gpus=2, fake_gpu_memory=64 * MiB)
    lease = uuid.uuid4().hex
    granted = [off.token(lease_id=lease, device=i, network=True) for i in range(2)]
    s = Session.attach(off.address, granted[1])
    with pytest.raises(errors.PermissionDenied, match="may not open network sockets"):
        _join_alone(s, granted, rank=1)
    s.close()


def _zygote_of(daemon_pid: int) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == daemon_pid and b"gpupool.server.zygote" in cmdline:
            return int(entry)
    raise AssertionError(f"daemon {daemon_pid} has no zygote")


def test_a_killed_zygote_comes_back_and_sessions_go_on(serve_process: Any) -> None:
    d = serve_process("--fake-gpus", "1", "--fake-gpu-memory", "64MiB")
    assert d.process is not None
    old = Session.attach(d.address, d.token(quota_bytes=16 * MiB))
    x = torch.randn(64, dtype=torch.float64)
    hx = old.upload(x)
    old.sync()
    worker = usage(d.address, old).worker_pid
    zygote = _zygote_of(d.process.pid)
    os.kill(zygote, signal.SIGKILL)
    wait_gone(zygote)
    # The session of a worker the dead zygote forked goes on: same worker, same tensors, more work.
    (hy,) = old.call("aten::mul.Tensor", hx, hx)
    assert torch.equal(old.download(hy), x * x) and usage(d.address, old).worker_pid == worker
    # A new zygote (started by the daemon's supervisor thread) forks the workers of new sessions.
    deadline = time.monotonic() + 150
    while True:
        try:
            new = Session.attach(d.address, d.token(quota_bytes=16 * MiB))
            break
        except (errors.Unavailable, errors.GpupoolError):  # the new zygote still imports torch (a loaded host)
            assert time.monotonic() < deadline
            time.sleep(1)
    assert torch.equal(new.download(new.upload(torch.arange(6))), torch.arange(6))
    assert _zygote_of(d.process.pid) != zygote and usage(d.address, new).worker_pid not in (0, worker)
    assert torch.equal(old.download(hx), x)
    new.close()
    old.close()
    wait_gone(worker)  # the orphaned worker ends with its session (its socket closed)
    assert d.process.poll() is None


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if b"=" in item)


def test_workers_wait_for_openmp_work_without_spinning_unless_the_operator_says(
    daemon: Any, serve_process: Any
) -> None:
    """A worker's OpenMP threads sleep between and at the end of parallel regions (server/zygote.py WAIT_POLICY):
    libgomp's default spin made each small float64 GEMM of an LSTM cost milliseconds on a loaded host
    (bench/omp_wait.py). The policy is in the environment libgomp reads when torch loads (the zygote's, which every
    worker inherits); an operator's own OMP_WAIT_POLICY is kept."""
    s = Session.attach(daemon.address, daemon.token(quota_bytes=16 * MiB))
    s.sync()
    assert _environ(usage(daemon.address, s).worker_pid)["OMP_WAIT_POLICY"] == os.environ.get(
        "OMP_WAIT_POLICY", "PASSIVE"
    )
    s.close()
    d = serve_process("--fake-gpus", "1", env={"OMP_WAIT_POLICY": "ACTIVE"})
    s = Session.attach(d.address, d.token(quota_bytes=16 * MiB))
    assert s.download(s.upload(torch.arange(4.0))).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert _environ(usage(d.address, s).worker_pid)["OMP_WAIT_POLICY"] == "ACTIVE"
    s.close()
