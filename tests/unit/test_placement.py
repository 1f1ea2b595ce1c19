"""Placement policies on a hand-built pool: binpack, spread, one host for multi-GPU leases, labels, sizes."""

from __future__ import annotations

import pytest
from gpupool.scheduler.capacity import SHARE_UNITS, Grant, Host, Pool, PoolDevice
from gpupool.scheduler.placement import Request, fraction_units, place, size_on, validate

from gpupool.errors import InvalidArgument
from gpupool.protocol import HostState

GiB = 1024**3


def make_pool(hosts: dict[str, int], memory: int = 8 * GiB, model: str = "fake") -> Pool:
    pool = Pool()
    for host_id, n in hosts.items():
        devs = {i: PoolDevice(host_id, i, f"{host_id}-{i}", model, memory, True) for i in range(n)}
        pool.set_host(Host(host_id, f"{host_id}:1", devs))
    return pool


def take(pool: Pool, req: Request) -> list[tuple[str, int]]:
    grants = place(pool, req)
    assert grants is not None, req
    pool.take(grants)
    return [g.key for g in grants]


def test_binpack_fills_one_device_before_the_next() -> None:
    pool = make_pool({"a": 1, "b": 1})
    first = take(pool, Request(1, fraction=0.5))
    assert take(pool, Request(1, fraction=0.5)) == first
    third = take(pool, Request(1, fraction=0.5))
    assert third != first
    assert take(pool, Request(1, fraction=0.5)) == third
    assert place(pool, Request(1, fraction=0.5)) is None


def test_binpack_picks_the_fullest_device_that_fits() -> None:
    pool = make_pool({"a": 3})
    pool.take([g for g in place(pool, Request(1, fraction=0.25)) or []])  # some device now 0.25 full
    fullest = take(pool, Request(1, fraction=0.5))  # lands on the 0.25 device -> 0.75
    assert pool.device(fullest[0]).allocated_units == fraction_units(0.75)  # type: ignore[union-attr]
    # 0.5 no longer fits there; binpack must take another device, not fail
    other = take(pool, Request(1, fraction=0.5))
    assert other != fullest


def test_spread_picks_the_emptiest_device() -> None:
    pool = make_pool({"a": 2, "b": 2})
    seen = {take(pool, Request(1, fraction=0.25, policy="spread"))[0] for _ in range(4)}
    assert len(seen) == 4


def test_multi_gpu_lease_prefers_one_host() -> None:
    pool = make_pool({"a": 2, "b": 4})
    pool.take(place(pool, Request(1, fraction=0.5)) or [])  # something somewhere
    keys = take(pool, Request(3, fraction=1.0))
    assert len({h for h, _ in keys}) == 1 and len(set(keys)) == 3


def test_multi_gpu_binpack_takes_the_fullest_host_spread_the_emptiest() -> None:
    for policy, want in (("binpack", "b"), ("spread", "a")):
        pool = make_pool({"a": 4, "b": 4})
        pool.take([Grant("b", 0, 8 * GiB, SHARE_UNITS), Grant("b", 1, 8 * GiB, SHARE_UNITS)])
        keys = take(pool, Request(2, fraction=1.0, policy=policy))
        assert {h for h, _ in keys} == {want}, policy


def test_multi_gpu_lease_spans_hosts_only_when_it_must() -> None:
    pool = make_pool({"a": 2, "b": 2})
    keys = take(pool, Request(3, fraction=1.0))
    assert len(set(keys)) == 3 and {h for h, _ in keys} == {"a", "b"}
    assert place(pool, Request(2, fraction=1.0)) is None


def test_memory_request_sizes_quota_and_share() -> None:
    pool = make_pool({"a": 1})
    dev = pool.device(("a", 0))
    assert dev is not None
    assert size_on(Request(1, memory_bytes=2 * GiB), dev) == (2 * GiB, SHARE_UNITS // 4)
    assert size_on(Request(1, fraction=0.5), dev) == (4 * GiB, SHARE_UNITS // 2)
    assert size_on(Request(1, memory_bytes=9 * GiB), dev) is None


def test_labels_select_the_model() -> None:
    pool = make_pool({"a": 1}, model="A100")
    small = make_pool({"b": 1}, model="T4")
    pool.set_host(small.hosts["b"])
    assert take(pool, Request(1, fraction=0.1, labels={"model": "T4"})) == [("b", 0)]
    assert place(pool, Request(1, fraction=0.1, labels={"model": "H100"})) is None


def test_down_hosts_get_nothing() -> None:
    pool = make_pool({"a": 1, "b": 1})
    pool.set_state("a", HostState.DOWN)
    assert take(pool, Request(1, fraction=1.0)) == [("b", 0)]
    assert place(pool, Request(1, fraction=0.1)) is None


def test_give_returns_exactly_what_was_taken() -> None:
    pool = make_pool({"a": 2})
    grants = place(pool, Request(2, fraction=1 / 3)) or []
    pool.take(grants)
    pool.give(grants)
    assert all(d.allocated_units == 0 and d.allocated_bytes == 0 for _, d in pool.up_devices())
    assert pool.largest_free_fraction() == 1.0


@pytest.mark.parametrize(
    "req, words",
    [
        (Request(0, fraction=0.5), "gpus"),
        (Request(-1, fraction=0.5), "gpus"),
        (Request(1, fraction=0.0), "fraction"),
        (Request(1, fraction=1.5), "fraction"),
        (Request(1), "exactly one"),
        (Request(1, memory_bytes=9 * GiB), "larger than any device"),
        (Request(1, fraction=0.5, policy="random"), "policy"),
    ],
)
def test_invalid_requests(req: Request, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        validate(req, make_pool({"a": 1}))


def test_fractional_multi_gpu_lease_lands_on_distinct_gpus() -> None:
    pool = make_pool({"a": 1, "b": 2})
    keys = take(pool, Request(2, fraction=0.25))  # both pieces would fit on one GPU; a job's ranks never share one
    assert len(set(keys)) == 2 and {h for h, _ in keys} == {"b"}
    keys = take(pool, Request(3, fraction=0.25))
    assert len(set(keys)) == 3


def test_multi_gpu_lease_skips_a_gpu_seen_twice() -> None:
    pool = Pool()
    same = {i: PoolDevice("a", i, "GPU-same", "fake", 8 * GiB, True) for i in range(2)}  # one GPU listed twice
    pool.set_host(Host("a", "a:1", same))
    assert place(pool, Request(2, fraction=0.5)) is None
    pool.set_host(Host("b", "b:1", {0: PoolDevice("b", 0, "GPU-other", "fake", 8 * GiB, True)}))
    keys = take(pool, Request(2, fraction=0.5))
    assert {h for h, _ in keys} == {"a", "b"}
