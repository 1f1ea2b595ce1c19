"""One worker process per session: a crash ends only its session, host resources are bounded per session, and
workers run sandboxed. Real daemons on loopback; the crashes are real signals delivered to a live worker."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.session import Session
from support import MiB

from gpupool import errors
from gpupool._proto import device_pb2, device_pb2_grpc
from gpupool.tokens import public_session_id


def status(address: str) -> device_pb2.StatusReply:
    with grpc.insecure_channel(address) as ch:
        return device_pb2_grpc.DeviceStub(ch).Status(device_pb2.StatusRequest(), timeout=10)


def usage(address: str, s: Session) -> device_pb2.SessionUsage:
    tag = public_session_id(s.session_id)
    return next(u for u in status(address).sessions if u.session_id == tag)


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
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} still alive")


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL, signal.SIGABRT])
def test_a_crashing_worker_ends_only_its_session(daemon: Any, sig: signal.Signals) -> None:
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
