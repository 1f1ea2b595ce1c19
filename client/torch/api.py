"""The public face of the device: attach leased GPUs as `gpupool:<i>`, synchronize, detach.

`device()` attaches on first use: inside `gpupool run` it takes the lease from `$GPUPOOL_LEASE`;
elsewhere it asks the scheduler (`$GPUPOOL_SCHEDULER`) for one GPU, or the fraction
`$GPUPOOL_FRACTION` of one, and renews that lease until `detach_all()` (or exit) releases it.
`attach(address, token)` talks to one daemon directly (tests, standalone daemons).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

import torch

from .. import pool
from ..pool import Lease
from ..session import Session
from . import native, runtime
from .runtime import DeviceRuntime

log = logging.getLogger("gpupool.torch")

_lock = threading.RLock()
_env_lease: list[Any] = []  # the lease of $GPUPOOL_LEASE, once parsed
_subscribed: set[int] = set()  # id() of leases whose renewals we forward


def current_index() -> int:
    """The calling thread's current gpupool device (per thread, as CUDA's): the native device guard's own variable,
    which torch's device guards and torch.accelerator read and set too (native.current_device)."""
    return int(native.current_device())


def set_device(index: int) -> None:
    """Make gpupool:<index> the calling thread's current device (`torch.gpupool.set_device`, torch.accelerator's
    set_device_index and torch's device guards set the same one)."""
    i = int(index)
    if not 0 <= i <= 127 or native.set_current_device(i) != 0:  # c10's DeviceIndex is a signed byte
        raise ValueError(f"gpupool device index {i} is out of range 0..127")


def runtime_for(index: int | None) -> DeviceRuntime:
    """The runtime of `gpupool:<index>`, attaching it on first use."""
    i = current_index() if index is None else index
    rt = runtime.get(i)
    if rt is None or rt.closed:
        device(i)
        rt = runtime.get(i)
    assert rt is not None
    return rt


def device(index: int = 0) -> torch.device:
    """`gpupool:<index>`, attached on first use (the leased device of `gpupool run`, or a new lease)."""
    with _lock:
        rt = runtime.get(index)
        if rt is not None and not rt.closed:
            return rt.device
        if os.environ.get("GPUPOOL_LEASE"):
            if not _env_lease:
                lease = Lease.from_env()
                if lease is None:
                    raise RuntimeError("$GPUPOOL_LEASE is set but holds no lease")
                lease.refresh_if_stale()
                lease.start_renewing()
                _env_lease.append(lease)
            lease = _env_lease[0]
            # A torchrun rank (LOCAL_RANK r) sees its own leased device first, as gpupool:0 (pool.rank_device).
            return attach_lease(lease, pool.rank_device(index, len(lease.devices)), as_index=index)
        fraction = float(os.environ.get("GPUPOOL_FRACTION") or 1.0)
        kwargs: dict[str, Any] = {"gpus": 1, "fraction": fraction}
        if os.environ.get("GPUPOOL_SCHEDULER"):
            kwargs["scheduler"] = os.environ["GPUPOOL_SCHEDULER"]
        lease = pool.lease(**kwargs)
        if hasattr(lease, "start_renewing"):
            lease.start_renewing()
        log.info("gpupool:%d: leased %s", index, getattr(lease, "lease_id", "?"))
        return attach_lease(lease, 0, as_index=index, owns_lease=True)


def env_lease() -> Any:
    """The renewed lease of $GPUPOOL_LEASE once a device of it is attached (`device()`), else None."""
    return _env_lease[0] if _env_lease else None


def attach_lease(lease: Any, index: int = 0, *, as_index: int | None = None, owns_lease: bool = False) -> torch.device:
    """Attach device `index` of a lease; it becomes `gpupool:<as_index>` (default: `index` if free)."""
    with _lock:
        for rt in runtime.all_runtimes():
            if rt.lease is lease and rt.lease_index == index:
                return rt.device
        leased = lease.devices[index]
        if as_index is None:
            existing = runtime.get(index)
            as_index = index if existing is None or existing.closed else runtime.next_free_index()
        session = Session.attach_tensors(leased.address, leased.token)
        rt = DeviceRuntime(as_index, session, lease=lease, owns_lease=owns_lease, lease_index=index)
        runtime.add(rt)
        native.device_attached(as_index, session, device_count())
        if id(lease) not in _subscribed and hasattr(lease, "subscribe"):
            _subscribed.add(id(lease))
            lease.subscribe(lambda *_: _forward_tokens(lease))
        return rt.device


def _forward_tokens(lease: Any) -> None:
    """After a renewal: every session of that lease gets its fresh token."""
    for rt in runtime.all_runtimes():
        if rt.lease is lease:
            try:
                rt.refresh(lease.devices[rt.lease_index].token)
            except Exception as exc:  # a dead session reports itself at its next sync
                log.warning("refreshing the token of %s: %s", rt.device, exc)


def attach(address: str, token: str, index: int | None = None) -> torch.device:
    """Attach one daemon directly with a lease token; returns its `gpupool:<i>` device."""
    with _lock:
        i = runtime.next_free_index() if index is None else index
        session = Session.attach_tensors(address, token)
        runtime.add(DeviceRuntime(i, session))
        native.device_attached(i, session, device_count())
        return torch.device("gpupool", i)


def synchronize(device: torch.device | str | int | None = None) -> None:
    """Wait until the daemon has run every queued op; raise the first error among them."""
    if device is None:
        for rt in runtime.all_runtimes():
            rt.sync()
        return
    index = device if isinstance(device, int) else torch.device(device).index
    runtime_for(index).sync()


def detach_all() -> None:
    """Close every session (the daemons free their tensors) and release leases this module took."""
    with _lock:
        for rt in runtime.remove_all():
            rt.close()
            if rt.owns_lease and rt.lease is not None:
                try:
                    rt.lease.release()
                except Exception as exc:  # the scheduler reclaims it at expiry anyway
                    log.warning("releasing lease of %s: %s", rt.device, exc)
        _subscribed.clear()
        for lease in _env_lease:
            lease.stop_renewing()
        _env_lease.clear()


def device_count() -> int:
    """Devices this process can name (`torch.gpupool.device_count()`): at least every attached index + 1 and the
    devices of $GPUPOOL_LEASE. The native device guard reports it to torch as its deviceCount (native.set_device_count
    at each attach); the autograd engine does not depend on it (backend.py runs backward on the calling thread)."""
    rts = runtime.all_runtimes()
    n = max([len(rts)] + [rt.index + 1 for rt in rts])
    return max(n, len(_env_lease[0].devices) if _env_lease else _env_lease_size())


_env_sizes: dict[str, int] = {}  # $GPUPOOL_LEASE -> its number of devices (read before any device is attached)


def _env_lease_size() -> int:
    raw = os.environ.get("GPUPOOL_LEASE") or ""
    if raw and raw not in _env_sizes:
        try:
            lease = Lease.from_env()
        except Exception:  # a malformed lease says so at attach (device()); it names no device here
            lease = None
        _env_sizes[raw] = len(lease.devices) if lease is not None else 0
    return _env_sizes.get(raw, 0)


atexit.register(detach_all)
