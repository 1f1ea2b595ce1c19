"""Round 48 (warts48): a GPU UUID is its first live host's. A host could register another host's GPU UUIDs, and
placement, which gives a multi-GPU lease distinct physical GPUs (distinct UUIDs), then counted the victim's GPUs as
taken twice (a semi-trusted host's denial of service). Now the second host's Register is refused (ALREADY_EXISTS)."""

from __future__ import annotations

import time

import pytest
from gpupool.scheduler.hosts import DeviceSpec
from gpupool.scheduler.leases import Core, CoreConfig
from gpupool.scheduler.placement import Request
from gpupool.scheduler.store import MemoryStore

from gpupool.errors import AlreadyExists

GiB = 1024**3


def _devs(*uuids: str) -> list[DeviceSpec]:
    return [DeviceSpec(i, u, "fake", 8 * GiB, True) for i, u in enumerate(uuids)]


def test_a_host_may_not_register_another_live_host_s_gpu_uuid() -> None:
    core = Core(MemoryStore(), b"k" * 32, CoreConfig(host_timeout=0.6))
    core.hosts.register("victim", "127.0.0.1:6000", _devs("GPU-a", "GPU-b"))
    core.hosts.register("other", "127.0.0.1:6001", _devs("GPU-c"))
    with pytest.raises(AlreadyExists, match="GPU GPU-a.*live host victim registered first"):
        core.hosts.register("mallory", "127.0.0.1:6002", _devs("GPU-z", "GPU-a"))
    assert "mallory" not in core.pool.hosts
    with pytest.raises(AlreadyExists, match="live host victim"):  # (nor by re-registering a host it holds)
        core.hosts.register("other", "127.0.0.1:6001", _devs("GPU-c", "GPU-b"))
    # the real host restarting (its Register again, the same UUIDs) keeps them, and its 2-GPU lease is placed
    core.hosts.register("victim", "127.0.0.1:6000", _devs("GPU-a", "GPU-b"))
    lease = core.allocate(Request(2, fraction=0.5), tenant="t", ttl=30)
    assert {g.host_id for g in lease.grants} == {"victim"} and len(lease.grants) == 2
    # GPU-cuda<i> (torch's fallback where a GPU reports no UUID) and "" are every such host's: not bound
    core.hosts.register("old1", "127.0.0.1:6003", _devs("GPU-cuda0", ""))
    core.hosts.register("old2", "127.0.0.1:6004", _devs("GPU-cuda0", ""))
    # a host silent past the live window (half --host-timeout) frees its UUIDs: a daemon moved to another host id
    time.sleep(0.4)
    core.hosts.register("moved", "127.0.0.1:6005", _devs("GPU-a"))
