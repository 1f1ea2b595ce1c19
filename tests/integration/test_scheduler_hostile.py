"""A tenant against the scheduler as the pool's credential and capacity authority (round 31's review): a real
`gpupool scheduler` on loopback, daemons simulated by real Register/Heartbeat clients (`SimHost`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpupool.client.pool import Lease, SchedulerClient, lease
from scheduler_fixtures import GiB, Proc, SimHost, start_scheduler, wait_until

from gpupool.errors import GpupoolError, ResourceExhausted

FAST = ["--host-timeout", "5", "--heartbeat-interval", "0.3"]


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    proc, address = start_scheduler(tmp_path, *FAST, "--tenant-max-share", "1", "--tenant-max-waiting", "8")
    yield proc, address
    proc.stop()


def held_share(address: str, tenant: str) -> float:
    """The GPUs' worth of shares the tenant's active leases hold, as ListPool shows them."""
    pool = SchedulerClient(address).list_pool()
    return sum(d.share for x in pool.leases if x.tenant == tenant for d in x.devices)


def test_waiting_memory_requests_cannot_pass_the_tenant_share_limit(limited: tuple[Proc, str]) -> None:
    """A waiting request is counted against `--tenant-max-share` by an estimate (its memory over the largest device
    of the pool: a lower bound), and round 30 granted it when room came without counting again: with one 64 GiB
    device in the pool, four waiting requests for 16 GiB were estimated at 0.25 GPU each, passed a limit of 1, and
    got four whole 16 GiB devices - four times the tenant's limit. A grant now counts what it really takes."""
    address = limited[1]
    big, small_host = SimHost(address, "big", memory=64 * GiB), SimHost(address, "small", gpus=4, memory=16 * GiB)
    hosts = [big.start(), small_host.start()]
    fillers = [lease(1, 1.0, scheduler=address, tenant=f"filler{i}") for i in range(5)]  # every device full
    results: list[Lease | GpupoolError] = []
    lock = threading.Lock()

    def ask() -> None:
        try:
            got: Lease | GpupoolError = lease(1, memory=16 * GiB, scheduler=address, tenant="mallory", wait=60)
        except GpupoolError as exc:
            got = exc
        with lock:
            results.append(got)

    waiters = [threading.Thread(target=ask) for _ in range(4)]
    for t in waiters:
        t.start()
    wait_until(lambda: SchedulerClient(address).list_pool().waiting == 4, what="mallory's four requests waiting")
    small = [x for x in fillers if x.devices[0].host_id == "small"]
    assert len(small) == 4
    for x in small:
        x.release()
    for t in waiters:
        t.join(60)
    granted = [x for x in results if isinstance(x, Lease)]
    refused = [x for x in results if not isinstance(x, Lease)]
    later: list[Lease] = []
    try:
        assert held_share(address, "mallory") <= 1.0
        assert len(results) == 4 and len(granted) == 1, results
        assert all(isinstance(x, ResourceExhausted) and "limit of 1" in x.message for x in refused), refused
        # the refused requests took nothing: the devices they would have had are free for others
        later += [lease(1, 1.0, scheduler=address, tenant=f"later{i}") for i in range(3)]
    finally:
        for x in [*granted, *fillers, *later]:
            x.release()
        for h in hosts:
            h.stop()
