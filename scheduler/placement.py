"""Placement policies: which devices a request gets.

- ``binpack`` (default): the fullest device that fits, so whole devices stay free for whole-device requests.
- ``spread``: the emptiest device, so tenants interfere as little as possible.

A multi-GPU request prefers one host: hosts are visited in policy order of their total free share (binpack:
fullest first, keeping whole hosts free for whole-host jobs) and the first that can hold all ``gpus`` pieces
wins; only when no single host can are devices of several hosts combined. The pieces of one request always land
on distinct physical GPUs (distinct UUIDs, not only distinct (host, index)): its ranks form one collective group,
and NCCL refuses two ranks on one GPU. Placement never changes the pool; the caller takes the grants it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gpupool.config import format_size
from gpupool.errors import InvalidArgument, shown
from gpupool.protocol import Policy

from .capacity import KTH_SCALE, MAX_KTH, SHARE_UNITS, Grant, Host, Pool, PoolDevice

POLICIES = tuple(p.value for p in Policy)  # names, as flags and messages spell them
MAX_GPUS = 1024


@dataclass(frozen=True)
class Request:
    """What a client asks for: `gpus` devices, each a `fraction` of a device or `memory_bytes` of one."""

    gpus: int
    fraction: float | None = None
    memory_bytes: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    policy: Policy = Policy.BINPACK

    def describe(self) -> str:
        if self.fraction is not None:
            size = f"fraction {self.fraction:g}"
        else:
            size = f"memory {format_size(self.memory_bytes or 0)}"
        where = f" with labels {dict(self.labels)}" if self.labels else ""
        return f"{self.gpus} GPU(s) x {size}{where}"


def fraction_units(fraction: float) -> int:
    """Share units of a fraction (at least one unit: a positive fraction never rounds to nothing)."""
    return max(1, min(SHARE_UNITS, round(fraction * SHARE_UNITS)))


def size_on(req: Request, dev: PoolDevice) -> tuple[int, int] | None:
    """(quota_bytes, share units) that `req` takes on `dev`; None when it cannot fit even an empty `dev`."""
    if req.fraction is not None:
        units = fraction_units(req.fraction)
        return dev.capacity_bytes * units // SHARE_UNITS, units
    mem = req.memory_bytes or 0
    if mem > dev.capacity_bytes or dev.capacity_bytes <= 0:
        return None
    units = max(1, -(-mem * SHARE_UNITS // dev.capacity_bytes))  # ceil: the share never undercounts the memory
    return mem, units


def validate(req: Request, pool: Pool) -> None:
    """Raise InvalidArgument for a request no pool could ever satisfy."""
    if req.gpus <= 0 or req.gpus > MAX_GPUS:
        raise InvalidArgument(f"gpus must be in [1, {MAX_GPUS}], got {req.gpus}")
    if (req.fraction is None) == (req.memory_bytes is None):
        raise InvalidArgument("give exactly one of fraction or memory")
    if req.fraction is not None and not 0.0 < req.fraction <= 1.0:
        raise InvalidArgument(f"fraction must be in (0, 1], got {req.fraction:g}")
    if req.memory_bytes is not None:
        if req.memory_bytes <= 0:
            raise InvalidArgument("memory must be positive")
        largest = pool.max_capacity
        if largest and req.memory_bytes > largest:
            raise InvalidArgument(
                f"memory {format_size(req.memory_bytes)} is larger than any device in the pool "
                f"(largest: {format_size(largest)})"
            )
    if req.policy not in POLICIES:
        raise InvalidArgument(f"unknown placement policy {shown(str(req.policy))} (known: {', '.join(POLICIES)})")


def policy_of(name: str) -> Policy:
    """The policy a request names; INVALID_ARGUMENT for one there is not."""
    try:
        return Policy(name)
    except ValueError:
        raise InvalidArgument(f"unknown placement policy {shown(name)} (known: {', '.join(POLICIES)})") from None


def _fits(req: Request, host: Host, dev: PoolDevice) -> Grant | None:
    if req.labels and not host.matches(dict(req.labels), dev):
        return None
    size = size_on(req, dev)
    if size is None or not dev.fits(*size):
        return None
    return Grant(dev.host_id, dev.index, size[0], size[1])


def min_units(pool: Pool, req: Request) -> int:
    """A lower bound of the share units one piece of `req` takes on any device."""
    if req.fraction is not None:
        return fraction_units(req.fraction)
    return max(1, -(-(req.memory_bytes or 0) * SHARE_UNITS // (pool.max_capacity or 1)))


def could_fit(pool: Pool, req: Request) -> bool:
    """Whether `req` would fit the devices up now were nothing allocated on them (distinct GPUs enough that match
    its labels and can hold a piece)."""
    uuids = set()
    for host, dev in pool.up_devices():
        if (not req.labels or host.matches(dict(req.labels), dev)) and size_on(req, dev) is not None:
            uuids.add(dev.gpu)
            if len(uuids) >= req.gpus:
                return True
    return False


def place(pool: Pool, req: Request) -> list[Grant] | None:
    """The grants for `req` under its policy, or None when nothing fits now."""
    spread = req.policy == Policy.SPREAD
    least = min_units(pool, req)
    if req.gpus > 1:
        # One host if any can hold it: binpack takes the host whose gpus-th largest free device is the
        # smallest that fits (then the fullest host), spread the emptiest; within it the devices in the same
        # order. Up to MAX_KTH pieces the index holds only hosts with enough devices free enough.
        if req.gpus <= MAX_KTH:
            index, floor = pool.kth[req.gpus], least * KTH_SCALE
        else:
            index, floor = pool.host_index, req.gpus * least
        hosts = index.descending if spread else index.ascending
        for host in hosts(floor):
            fitting = [(dev, g) for dev in host.devices.values() if (g := _fits(req, host, dev)) is not None]
            if len({dev.gpu for dev, _ in fitting}) >= req.gpus:
                fitting.sort(key=lambda dg: (dg[0].free_units, dg[0].index), reverse=spread)
                return _distinct(fitting, req.gpus)
    devices = pool.index.descending(least) if spread else pool.index.ascending(least)
    chosen: list[Grant] = []
    uuids: set[str] = set()
    for dev in devices:
        grant = _fits(req, pool.hosts[dev.host_id], dev) if dev.gpu not in uuids else None
        if grant is not None:
            chosen.append(grant)
            uuids.add(dev.gpu)
            if len(chosen) == req.gpus:
                return chosen
    return None


def _distinct(fitting: list[tuple[PoolDevice, Grant]], n: int) -> list[Grant]:
    """The first `n` grants in order whose devices are distinct physical GPUs (`PoolDevice.gpu`)."""
    seen: set[str] = set()
    out: list[Grant] = []
    for dev, grant in fitting:
        if dev.gpu not in seen:
            seen.add(dev.gpu)
            out.append(grant)
    return out[:n]
