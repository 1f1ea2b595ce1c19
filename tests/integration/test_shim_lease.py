"""The gpupool device on leases from a real pool (`gpupool up`: scheduler + daemon with fake GPUs):
`gpupool run` hands its lease to `gpupool.torch.device()` in the child (on either client), `device()` outside
`gpupool run` allocates a lease of $GPUPOOL_FRACTION of a GPU and `detach_all()` gives it back, and
`gpupool.lease(...).device()` attaches through the shim."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gpupool.client.pool import SchedulerClient, lease
from gpupool.client.torch import runtime
from scheduler_fixtures import ROOT, wait_until

import gpupool.torch as gt

pytestmark = pytest.mark.slow

CHILD = """
import torch, gpupool.torch as gt
from gpupool.client import native
d = gt.device()
x = torch.arange(4.0, device=d) * 2
if native.active():  # `gpupool run`'s default client (the C++ one)
    session = native.session(d)
else:
    from gpupool.client.torch import runtime
    session = runtime.get(d.index).session
print("trained", d, x.sum().item(), session.share, session.quota_bytes, "native" if native.active() else "shim")
"""


@pytest.fixture(scope="module")
def pool(two_gpu_pool: str) -> str:
    """The shared pool of two 512 MiB fake GPUs (conftest.py: two_gpu_pool); the scheduler's address."""
    return two_gpu_pool


def no_leases(address: str) -> bool:
    return not SchedulerClient(address).list_pool().leases


@pytest.mark.parametrize("client", ["shim", "native"])
def test_gpupool_run_child_gets_the_leased_device(pool: str, tmp_path: Path, client: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPUPOOL_SCHEDULER": pool}
    env.pop("GPUPOOL_LEASE", None)
    ran = subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "run", "-n", "1", "-p", "0.5", "--client", client, "--",
         sys.executable, "-c", CHILD],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert f"trained gpupool:0 12.0 0.5 {256 * 1024**2} {client}" in ran.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


# The lease's TTL: 6 s, renewed by `gpupool run` every 2 s. With 2 s (renewals every 0.7 s) the lease itself expired
# in round 27's suite run while the box was at load 20-50: the renewals starved, not the child.
LATE_TTL = 6
LATE_CHILD = f"""
import time
time.sleep({LATE_TTL + 3})  # past the lease's TTL: the tokens in $GPUPOOL_LEASE have expired, the lease has not
import torch, gpupool.torch as gt
print("late", (torch.ones(3, device=gt.device()) * 2).sum().item())
"""


def test_a_child_that_attaches_after_its_tokens_expired_renews_first(pool: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPUPOOL_SCHEDULER": pool}
    env.pop("GPUPOOL_LEASE", None)
    ran = subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "run", "-n", "1", "-p", "0.5", "--ttl", str(LATE_TTL), "--",
         sys.executable, "-c", LATE_CHILD],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "late 6.0" in ran.stdout
    wait_until(lambda: no_leases(pool), timeout=10, what="the run's lease to be released")


def test_device_allocates_its_own_lease_and_detach_releases_it(pool: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUPOOL_LEASE", raising=False)
    monkeypatch.setenv("GPUPOOL_SCHEDULER", pool)
    monkeypatch.setenv("GPUPOOL_FRACTION", "0.25")
    try:
        d = gt.device()
        assert d == torch.device("gpupool:0") and gt.device() == d  # attached once
        rt = runtime.get(0)
        assert rt is not None and rt.session.share == pytest.approx(0.25)
        assert (torch.ones(3, device="gpupool") * 3).sum().item() == 9.0  # "gpupool" means the current device
        assert len(SchedulerClient(pool).list_pool().leases) == 1
    finally:
        gt.detach_all()
    wait_until(lambda: no_leases(pool), timeout=10, what="detach_all to release the lease")


def test_lease_device_and_token_refresh(pool: str) -> None:
    with lease(gpus=1, fraction=0.5, scheduler=pool) as held:
        d = held.device(0)
        x = torch.randn(8, 8).to(d)
        held.renew()  # subscribers get the fresh token, sent down the session's stream
        assert torch.allclose((x @ x).cpu(), x.cpu() @ x.cpu(), atol=1e-5)
        gt.detach_all()
    wait_until(lambda: no_leases(pool), timeout=10, what="the lease to be released")


def test_stop_renewing_ends_the_renewals_and_keeps_the_lease(pool: str) -> None:
    """A child of `gpupool run` stops renewing its parent's lease at exit without giving it back."""
    # a TTL well past the test's few steps: with 1 s, a pause of a second on a busy box between the last renewal and
    # the listing below lets the scheduler expire it; stop_renewing wakes the thread from its wait whatever the period
    held = lease(gpus=1, fraction=0.5, scheduler=pool, ttl=30)
    try:
        held.start_renewing()
        thread = held._thread
        assert thread is not None and thread.is_alive()
        held.stop_renewing()
        thread.join(timeout=5)
        assert not thread.is_alive()
        assert [x.lease_id for x in SchedulerClient(pool).list_pool().leases] == [held.lease_id]  # not released
    finally:
        held.release()
    wait_until(lambda: no_leases(pool), timeout=10, what="the lease to be released")
