"""The pool's capacity model: hosts, their devices, what is allocated on each, and an index of free capacity.

Shares are accounted in integer units (`SHARE_UNITS` per whole device) so that any sequence of takes and
gives returns exactly to where it started - float sums would drift and let a device be over-committed by
rounding. Memory is accounted in bytes. Only devices of hosts that are up sit in the free index, so
placement never has to skip over a dead host.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gpupool.protocol import HostState

SHARE_UNITS = 1_000_000
# Multi-GPU placement looks hosts up by their k-th largest free device (k = 2..MAX_KTH), so that a request for
# k pieces visits only hosts that can hold them instead of every host with enough free share in total.
MAX_KTH = 8
KTH_SCALE = 1 << 40  # key = k-th largest free units * KTH_SCALE + the host's total free units (the tie-break)

DeviceKey = tuple[str, int]  # (host_id, device index)

# The daemon's name of a GPU that reports no UUID (server/devices.py `CudaDevice`: "GPU-cuda<index>"): its host's
# own, not the GPU's, so every such host has a "GPU-cuda0".
FALLBACK_PREFIX = "GPU-cuda"


def physical_gpu(host_id: str, uuid: str, index: int) -> str:
    """The physical GPU a host's device is, as placement (distinct GPUs for a multi-GPU lease) and the UUID binding
    (hosts.py `_check_uuids`) count it: its UUID where that names one GPU worldwide; where it does not (the daemon's
    fallback `GPU-cuda<index>`, or none), the host's own name of it, host id first, so two hosts' `GPU-cuda0` are two
    GPUs, each bound to its host. Until round 49 (sec49) such a name was global: the pool counted every host's
    `GPU-cuda0` (and every "") as one GPU, so a multi-GPU lease over two such hosts was never placed, and none over
    one host's devices without UUIDs; host ids are printable (hosts.py), so no real UUID has this form."""
    tail = uuid[len(FALLBACK_PREFIX) :]
    if uuid and not (uuid.startswith(FALLBACK_PREFIX) and tail.isascii() and tail.isdigit()):
        return uuid  # (no regex: a Register of 8 GPUs computes it 16 times)
    return f"{host_id}\x00{uuid or index}"


K = TypeVar("K")
T = TypeVar("T")


@dataclass
class PoolDevice:
    """One GPU of a host and what the scheduler has handed out on it."""

    host_id: str
    index: int
    uuid: str
    model: str
    capacity_bytes: int
    fake: bool = False
    allocated_bytes: int = 0
    allocated_units: int = 0
    used_bytes: int = 0  # as last reported by the daemon
    # the leases of the sessions on it, as last reported by the daemon (its heartbeat's; "" for an id no lease has):
    # ListPool shows a tenant `used_bytes` only where they are all its own (free51)
    session_leases: frozenset[str] = frozenset()
    # (terms54) its free memory as the daemon last measured it (`DeviceUsage.free_bytes`; None: not measured) and the
    # bytes each lease's sessions held then (by lease id): a raised quota must fit them (leases.py `Core._new_terms`)
    measured_free: int | None = None
    lease_used: Mapping[str, int] = field(default_factory=dict)

    gpu: str = field(init=False, repr=False, compare=False)  # the physical GPU: `physical_gpu`

    def __post_init__(self) -> None:
        self.gpu = physical_gpu(self.host_id, self.uuid, self.index)

    @property
    def key(self) -> DeviceKey:
        return (self.host_id, self.index)

    @property
    def free_units(self) -> int:
        return SHARE_UNITS - self.allocated_units

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.allocated_bytes

    def fits(self, quota_bytes: int, units: int) -> bool:
        return self.allocated_bytes + quota_bytes <= self.capacity_bytes and self.allocated_units + units <= SHARE_UNITS


@dataclass
class Host:
    """A daemon: where clients reach it, its devices, and whether it is up."""

    host_id: str
    address: str
    devices: dict[int, PoolDevice]
    labels: dict[str, str] = field(default_factory=dict)
    state: HostState = HostState.UP
    last_seen: float = 0.0
    cordoned: bool = False  # drained by an operator (`gpupool host drain`): kept draining whatever it reports

    @property
    def free_units(self) -> int:
        return sum(d.free_units for d in self.devices.values())

    def measured_free(self, device: PoolDevice) -> int | None:
        """(smi54) `device`'s free memory as its daemon last measured it, as an operator sees it (ListPool's
        `DeviceState.measured_free_bytes`, the scheduler's `gpupool_pool_memory_free_bytes`): None where not measured,
        or where this host is down (a measure of a daemon no longer heard from)."""
        return device.measured_free if self.state != HostState.DOWN else None

    def matches(self, labels: dict[str, str], device: PoolDevice) -> bool:
        """Does this host/device carry every requested label? `model` also matches the device model."""
        for k, v in labels.items():
            if k == "model" and device.model == v:
                continue
            if k == "uuid" and device.uuid == v:
                continue
            if self.labels.get(k) != v:
                return False
        return True


@dataclass(frozen=True)
class Grant:
    """A piece of one device held by a lease."""

    host_id: str
    device: int
    quota_bytes: int
    units: int
    # (terms53) Bytes counted on the device past the quota: what its session may hold past a quota an operator lowered
    # (`Core.set_terms`) until the lease's older tokens have ended and its daemon reports them freed (`Core.note_kept`).
    # Stored with its lease (store.py, the `kept` column: terms54), not in its tokens.
    kept_bytes: int = 0

    @property
    def key(self) -> DeviceKey:
        return (self.host_id, self.device)

    @property
    def held_bytes(self) -> int:
        """What the device's accounting counts for it: its quota and the bytes kept past it."""
        return self.quota_bytes + self.kept_bytes

    @property
    def share(self) -> float:
        return self.units / SHARE_UNITS


class FreeIndex(Generic[K, T]):
    """Items bucketed by exact free share units, the distinct values kept sorted, for O(log n) placement.

    Used for devices (keyed by DeviceKey, valued by their free units) and for hosts (keyed by host id,
    valued by the sum over their devices). The iterators are live views: finish (or drop) one before
    changing any allocation.
    """

    def __init__(self) -> None:
        self._values: list[int] = []
        self._buckets: dict[int, dict[K, T]] = {}

    def add(self, key: K, free: int, item: T) -> None:
        bucket = self._buckets.get(free)
        if bucket is None:
            bucket = self._buckets[free] = {}
            bisect.insort(self._values, free)
        bucket[key] = item

    def remove(self, key: K, free: int) -> None:
        bucket = self._buckets.get(free)
        if bucket is None or bucket.pop(key, None) is None:
            return
        if not bucket:
            del self._buckets[free]
            del self._values[bisect.bisect_left(self._values, free)]

    def ascending(self, min_free: int) -> Iterator[T]:
        """Items with at least `min_free` free units, fullest first (binpack order)."""
        i = bisect.bisect_left(self._values, min_free)
        for value in self._values[i:]:
            yield from self._buckets[value].values()

    def descending(self, min_free: int) -> Iterator[T]:
        """Items with at least `min_free` free units, emptiest first (spread order)."""
        i = bisect.bisect_left(self._values, min_free)
        for value in reversed(self._values[i:]):
            yield from self._buckets[value].values()

    def max_free(self) -> int:
        return self._values[-1] if self._values else 0

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())


class Pool:
    """All hosts and devices; take/give move capacity and keep both free indexes in step.

    Only hosts that are up (and their devices) are indexed, so placement never skips over a dead host.
    """

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        self.index: FreeIndex[DeviceKey, PoolDevice] = FreeIndex()
        self.host_index: FreeIndex[str, Host] = FreeIndex()
        self.kth: dict[int, FreeIndex[str, Host]] = {k: FreeIndex() for k in range(2, MAX_KTH + 1)}
        self.max_capacity = 0  # of any device ever registered: bounds what a memory request may ask
        # Changes whenever the devices up change (a host added, removed, up or not); not with allocations.
        self.epoch = 0
        # Physical GPU (`physical_gpu`: a GPU UUID, or a host's own name of a GPU without one) -> the host that set it
        # last (hosts.py `_check_uuids` checks that host still holds it and lives); an entry outlives its host's
        # removal until another host sets it (at most one a GPU ever set).
        self.uuid_host: dict[str, str] = {}

    def device(self, key: DeviceKey) -> PoolDevice | None:
        host = self.hosts.get(key[0])
        return host.devices.get(key[1]) if host else None

    @staticmethod
    def _kth_keys(host: Host) -> list[tuple[int, int]]:
        """(k, key in self.kth[k]) for every k the host can serve."""
        frees = sorted((d.free_units for d in host.devices.values()), reverse=True)
        total = sum(frees)
        return [(k, frees[k - 1] * KTH_SCALE + total) for k in range(2, min(MAX_KTH, len(frees)) + 1)]

    def _unindex_host(self, host: Host) -> None:
        self.host_index.remove(host.host_id, host.free_units)
        for k, key in self._kth_keys(host):
            self.kth[k].remove(host.host_id, key)

    def _index_host(self, host: Host) -> None:
        self.host_index.add(host.host_id, host.free_units, host)
        for k, key in self._kth_keys(host):
            self.kth[k].add(host.host_id, key, host)

    def _unindex(self, host: Host) -> None:
        self._unindex_host(host)
        for dev in host.devices.values():
            self.index.remove(dev.key, dev.free_units)

    def _index(self, host: Host) -> None:
        self._index_host(host)
        for dev in host.devices.values():
            self.index.add(dev.key, dev.free_units, dev)

    def set_host(self, host: Host) -> None:
        """Add or replace a host (its devices start with nothing allocated; leases are re-applied by the caller)."""
        old = self.hosts.get(host.host_id)
        self.epoch += 1
        if old is not None and old.state == HostState.UP:
            self._unindex(old)
        self.hosts[host.host_id] = host
        for d in host.devices.values():
            self.uuid_host[d.gpu] = host.host_id
        self.max_capacity = max([self.max_capacity, *(d.capacity_bytes for d in host.devices.values())])
        if host.state == HostState.UP:
            self._index(host)

    def remove_host(self, host_id: str) -> None:
        """Forget a host (the caller has ended its leases)."""
        host = self.hosts.pop(host_id)
        self.epoch += 1
        if host.state == HostState.UP:
            self._unindex(host)

    def set_state(self, host_id: str, state: HostState) -> None:
        host = self.hosts[host_id]
        if host.state == state:
            return
        self.epoch += 1
        if host.state == HostState.UP:
            self._unindex(host)
        host.state = state
        if state == HostState.UP:
            self._index(host)

    def _move(self, grants: list[Grant], sign: int) -> None:
        """Add (sign +1) or remove (-1) grants; each host is re-indexed once, however many of its devices moved."""
        by_host: dict[str, list[Grant]] = {}
        for g in grants:
            by_host.setdefault(g.host_id, []).append(g)
        for host_id, mine in by_host.items():
            host = self.hosts.get(host_id)
            if host is None:
                continue
            moved = {g.device: host.devices[g.device] for g in mine if g.device in host.devices}
            indexed = host.state == HostState.UP
            if indexed:
                self._unindex_host(host)
                for dev in moved.values():
                    self.index.remove(dev.key, dev.free_units)
            for g in mine:
                if g.device in moved:
                    moved[g.device].allocated_bytes += sign * g.held_bytes
                    moved[g.device].allocated_units += sign * g.units
            if indexed:
                for dev in moved.values():
                    self.index.add(dev.key, dev.free_units, dev)
                self._index_host(host)

    def take(self, grants: list[Grant]) -> None:
        self._move(grants, +1)

    def give(self, grants: list[Grant]) -> None:
        self._move(grants, -1)

    def up_devices(self) -> Iterator[tuple[Host, PoolDevice]]:
        for host in self.hosts.values():
            if host.state == HostState.UP:
                for dev in host.devices.values():
                    yield host, dev

    def largest_free_fraction(self) -> float:
        return self.index.max_free() / SHARE_UNITS

    def largest_free_bytes(self) -> int:
        return max((d.free_bytes for _, d in self.up_devices()), default=0)
