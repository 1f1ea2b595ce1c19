"""Sessions: one attached lease on one device, its tensors under client-chosen handles, and their memory.

Memory is accounted per storage (views share one, counted once) against the session quota and the
device capacity shared by all sessions of the device. Handles are `handle_base + n`; a handle with
another session's base is PERMISSION_DENIED, one never created NOT_FOUND. Failed ops poison their
outputs: using such a handle fails with the original error.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from gpupool.server.devices import Device

from gpupool.errors import GpupoolError, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from gpupool.tokens import TokenClaims

HANDLE_BITS = 32


@dataclass
class Poison:
    """Why a handle has no tensor: the failure of the op that should have produced it."""

    code: str
    op: str
    message: str


@dataclass
class DeviceMemory:
    """Bytes in use on one device across all its sessions."""

    device: Device
    used: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Session:
    """State of one session. Mutated only by its device's executor thread (under `lock`) and by close()."""

    def __init__(
        self, session_id: str, number: int, claims: TokenClaims, device: Device, memory: DeviceMemory, quota: int
    ) -> None:
        self.session_id = session_id
        self.number = number
        self.handle_base = number << HANDLE_BITS
        self.claims = claims
        self.lease_id = claims.lease_id
        self.tenant = claims.tenant or claims.lease_id
        self.device = device
        self.memory = memory
        self.quota = quota
        self.share = claims.share
        self.expires_at = claims.expires_at
        self.lock = threading.RLock()
        self.tensors: dict[int, torch.Tensor] = {}
        self.poisoned: dict[int, Poison] = {}
        self.uploads: dict[int, int] = {}  # handle -> next expected byte offset of an upload in progress
        self._storages: dict[int, list[int]] = {}  # storage id -> [handles referencing it, bytes counted]
        self.used = 0
        self.error: Poison | None = None  # first error since the last sync
        self.rng_state: torch.Tensor | None = None
        self.busy_seconds = 0.0
        self.ops = 0
        self.closed = False
        self.close_reason = ""
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()  # replies for the stream, in order
        self.entry: Any = None  # its place in the device's fair queue
        self.streaming = False

    # ---- handles ----

    def check_handle(self, handle: int) -> None:
        """Raise unless `handle` is in this session's range."""
        if handle >> HANDLE_BITS != self.number:
            raise PermissionDenied(f"handle {handle:#x} belongs to another session")
        if handle == self.handle_base:
            raise InvalidArgument("handle 0 of a session is reserved")

    def resolve(self, handle: int) -> torch.Tensor:
        t = self.tensors.get(handle)
        if t is not None:
            return t
        self.check_handle(handle)
        poison = self.poisoned.get(handle)
        if poison is not None:
            raise PoisonedInput(poison, handle)
        raise NotFound(f"handle {handle:#x} was never created (or was freed)")

    # ---- memory ----

    def admit(self, new_bytes: int) -> None:
        """Refuse an allocation of `new_bytes` that would exceed the quota or the device capacity."""
        if self.used + new_bytes > self.quota:
            raise ResourceExhausted(
                f"memory quota exceeded: {new_bytes} bytes requested, {self.used} used of a {self.quota} byte limit"
            )
        dev = self.memory
        if dev.used + new_bytes > dev.device.capacity:
            raise ResourceExhausted(
                f"device {dev.device.index} full: {new_bytes} bytes requested, "
                f"{dev.used} used of {dev.device.capacity} bytes"
            )

    def _account(self, delta: int) -> None:
        self.used += delta
        with self.memory.lock:
            self.memory.used += delta

    def bind(self, handle: int, tensor: torch.Tensor) -> None:
        """Register `tensor` under `handle` (replacing what was there), counting new storages once."""
        self.check_handle(handle)
        self.unbind(handle)
        self.poisoned.pop(handle, None)
        storage = tensor.untyped_storage()
        entry = self._storages.get(storage._cdata)
        if entry is None:
            nbytes = storage.nbytes()
            self._storages[storage._cdata] = [1, nbytes]
            self._account(nbytes)
        else:
            entry[0] += 1
        self.tensors[handle] = tensor

    def unbind(self, handle: int) -> bool:
        t = self.tensors.pop(handle, None)
        self.uploads.pop(handle, None)
        if t is None:
            return False
        key = t.untyped_storage()._cdata
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self._account(-entry[1])
        return True

    def recount(self, tensors: list[torch.Tensor]) -> None:
        """Re-read the size of storages an op may have resized (in-place and out= ops)."""
        for t in tensors:
            entry = self._storages.get(t.untyped_storage()._cdata)
            if entry is not None:
                nbytes = t.untyped_storage().nbytes()
                if nbytes != entry[1]:
                    self._account(nbytes - entry[1])
                    entry[1] = nbytes

    def free(self, handles: list[int]) -> None:
        for h in handles:
            if not self.unbind(h) and self.poisoned.pop(h, None) is None:
                self.check_handle(h)  # freeing unknown handles is harmless; freeing another session's is not

    def poison(self, handle: int, err: Poison) -> None:
        if handle >> HANDLE_BITS == self.number and handle != self.handle_base:
            self.unbind(handle)
            self.poisoned[handle] = err

    def record_error(self, err: Poison) -> None:
        if self.error is None:
            self.error = err

    def release_all(self) -> None:
        """Drop every tensor (close, revoke, expiry)."""
        with self.lock:
            for h in list(self.tensors):
                self.unbind(h)
            self.poisoned.clear()
            self.uploads.clear()


class PoisonedInput(GpupoolError):
    """An input handle whose producing op failed; carries that op's error."""

    def __init__(self, poison: Poison, handle: int) -> None:
        super().__init__(f"input {handle:#x} has no value: {poison.message}", op=poison.op)
        self.poison = poison
