"""Property tests over random request/release sequences (hypothesis):

- no device is ever over-allocated in memory or share;
- binpack (and spread) never reject a single-GPU request that some device could fit, and a multi-GPU
  request is rejected only when fewer than `gpus` devices could each fit it;
- releasing returns exactly what was taken (the pool ends where it started);
- the device and host free indexes always agree with a brute-force scan.
"""

from __future__ import annotations

from gpupool.scheduler.capacity import KTH_SCALE, SHARE_UNITS, Grant, Host, Pool, PoolDevice
from gpupool.scheduler.placement import Request, place, size_on
from hypothesis import given, settings
from hypothesis import strategies as st

GiB = 1024**3

requests = st.one_of(
    st.builds(
        Request,
        gpus=st.integers(1, 3),
        fraction=st.sampled_from([0.1, 0.125, 0.25, 1 / 3, 0.5, 0.75, 1.0]) | st.floats(0.001, 1.0),
        policy=st.sampled_from(["binpack", "spread"]),
    ),
    st.builds(
        Request,
        gpus=st.integers(1, 2),
        memory_bytes=st.integers(1, 4 * GiB),
        policy=st.sampled_from(["binpack", "spread"]),
    ),
)
# an action: a request to place, or the index of a held lease to release
actions = st.lists(st.one_of(requests, st.integers(0, 50)), min_size=1, max_size=60)
shapes = st.lists(st.tuples(st.integers(1, 3), st.sampled_from([2 * GiB, 4 * GiB, 8 * GiB])), min_size=1, max_size=4)


def build(shape: list[tuple[int, int]]) -> Pool:
    pool = Pool()
    for h, (n, mem) in enumerate(shape):
        devs = {i: PoolDevice(f"h{h}", i, f"u{h}-{i}", "fake", mem, True) for i in range(n)}
        pool.set_host(Host(f"h{h}", f"h{h}:1", devs))
    return pool


def check_invariants(pool: Pool) -> None:
    devices = [d for _, d in pool.up_devices()]
    for d in devices:
        assert 0 <= d.allocated_units <= SHARE_UNITS
        assert 0 <= d.allocated_bytes <= d.capacity_bytes
    indexed = sorted((d.key, d.free_units) for d in pool.index.ascending(0))
    assert indexed == sorted((d.key, d.free_units) for d in devices)
    hosts = sorted((h.host_id, h.free_units) for h in pool.host_index.ascending(0))
    assert hosts == sorted((h.host_id, sum(d.free_units for d in h.devices.values())) for h in pool.hosts.values())
    for k, index in pool.kth.items():  # the k-th largest free device of every up host with k devices or more
        want = []
        for h in pool.hosts.values():
            frees = sorted((d.free_units for d in h.devices.values()), reverse=True)
            if h.state == "up" and len(frees) >= k:
                want.append((h.host_id, frees[k - 1]))
        stored = [(host_id, key // KTH_SCALE) for key, bucket in index._buckets.items() for host_id in bucket]
        assert sorted(want) == sorted(stored), k


def could_fit(pool: Pool, req: Request) -> int:
    """How many devices could each take one piece of `req` right now (brute force)."""
    n = 0
    for _, d in pool.up_devices():
        size = size_on(req, d)
        if size is not None and d.fits(*size):
            n += 1
    return n


@settings(max_examples=200, deadline=None)
@given(shape=shapes, script=actions)
def test_random_sequences_keep_the_books(shape: list[tuple[int, int]], script: list[Request | int]) -> None:
    pool = build(shape)
    held: list[list[Grant]] = []
    for action in script:
        if isinstance(action, int):
            if held:
                pool.give(held.pop(action % len(held)))
        else:
            fit = could_fit(pool, action)
            grants = place(pool, action)
            if grants is None:
                assert fit < action.gpus, f"rejected {action} although {fit} devices could fit it"
            else:
                assert len(grants) == action.gpus and len({g.key for g in grants}) == action.gpus
                for g in grants:
                    d = pool.device(g.key)
                    assert d is not None and d.fits(g.quota_bytes, g.units)
                pool.take(grants)
                held.append(grants)
        check_invariants(pool)
    for grants in held:
        pool.give(grants)
    for _, d in pool.up_devices():
        assert d.allocated_units == 0 and d.allocated_bytes == 0
    check_invariants(pool)


@settings(max_examples=100, deadline=None)
@given(shape=shapes, sizes=st.lists(st.sampled_from([0.25, 0.5, 0.75, 1.0]), min_size=1, max_size=20))
def test_binpack_uses_no_more_devices_than_spread(shape: list[tuple[int, int]], sizes: list[float]) -> None:
    used = {}
    for policy in ("binpack", "spread"):
        pool = build(shape)
        for f in sizes:
            grants = place(pool, Request(1, fraction=f, policy=policy))
            if grants:
                pool.take(grants)
        used[policy] = sum(1 for _, d in pool.up_devices() if d.allocated_units)
    assert used["binpack"] <= used["spread"]
