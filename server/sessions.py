"""Sessions: one attached lease on one device, its tensors under client-chosen handles, and their memory.

Memory is accounted per storage (views share one, counted once) against the session quota and the
device capacity shared by all sessions of the device. Handles are `handle_base + n`; a handle with
another session's base is PERMISSION_DENIED, one never created NOT_FOUND. Failed ops poison their
outputs: using such a handle fails with the original error.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from gpupool._proto import tensor_pb2
from gpupool.errors import (
    FailedPrecondition,
    GpupoolError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    from_status,
    to_proto,
)

from . import staging
from .cost import FAKE_GPU_FLOPS, REAL_GPU_FLOPS
from .devices import Device
from .opargs import WHOLE
from .uploadpool import KEEP, UploadPool

HANDLE_BITS = 32
# Handles one session may hold (each costs ~1 KiB of host RAM: tensor, sizes, strides, dict entries).
MAX_HANDLES = 1 << 18
# Host memory one session's captured graphs may hold in all, as graph_build.host_bytes estimates it (their prebuilt
# calls, slot tables and TorchScript graphs; round 35): an honest training step's graph is a few MiB.
MAX_GRAPH_BYTES = 256 * 1024**2
# Handles a sync's error names as having no value (`WorkerSession.error_proto`, the op stream's `Error.poisoned`): the
# most recently failed first, so a bounded reply however many a client made fail (round 51).
MAX_POISONED_REPLY = 1 << 14


@dataclass
class Poison:
    """Why a handle has no tensor: the failure of the op that should have produced it."""

    code: grpc.StatusCode
    op: str
    message: str
    used_bytes: int | None = None  # a memory refusal's numbers (errors.ResourceExhausted)
    limit_bytes: int | None = None

    def carried(self) -> Poison:
        """The poison an op that fails on this handle records and poisons its outputs with: this one, or a copy
        that holds nothing (`storage_resize.ResizedAway` holds its tensor)."""
        return self

    @classmethod
    def of(cls, exc: GpupoolError, op: str) -> Poison:
        """The poison of a failed command `op` (its name, or "" for commands that are not ops)."""
        if isinstance(exc, ResourceExhausted):
            return cls(exc.code, op, exc.message, exc.used_bytes, exc.limit_bytes)
        return cls(exc.code, op, exc.message)

    def to_proto(self) -> tensor_pb2.Error:
        """The op stream's Error message that reports this failure."""
        exc = from_status(self.code, self.message, self.op, used_bytes=self.used_bytes, limit_bytes=self.limit_bytes)
        return to_proto(exc)


@dataclass
class DeviceMemory:
    """Bytes in use on one device across all its sessions. The daemon's count of each device (daemon.py) is shared
    by its threads and changed under `lock`; a session's own copy (worker._SessionState makes one per session,
    and slices.run_commands sets it before each slice from what the daemon says the session may still allocate:
    the device's free bytes or its quota's room, whichever is fewer, daemon.py `_device_free`, so it is the device's
    count only where the device binds first) is changed by `WorkerSession` only, on the one thread that runs the
    session's commands, without the lock."""

    device: Device
    used: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class WorkerSession:
    """Tensor state of one session, inside its worker (or, with `--isolation thread`, the daemon): handles,
    storages and their accounting. Mutated only by the thread running the session's commands."""

    def __init__(
        self,
        session_id: str,
        number: int,
        device: Device,
        memory: DeviceMemory,
        quota: int,
        *,
        max_handles: int = MAX_HANDLES,
        max_graph_bytes: int = MAX_GRAPH_BYTES,
        max_op_flops: int = 0,
        lease_id: str = "",
        host_id: str = "",
    ) -> None:
        self.session_id = session_id
        self.number = number
        self.lease_id = lease_id  # the lease and host its token named (collectives check their peers' against them)
        self.host_id = host_id
        self.handle_base = number << HANDLE_BITS
        self.device = device
        self.memory = memory
        self.quota = quota
        self.max_handles = max_handles
        self.max_graph_bytes = max_graph_bytes  # host memory of its graphs (server/graph.py `GraphTable.define`)
        self.graph_bytes = 0  # what its graphs hold of it, estimated (mirrored to the daemon: Status, metrics)
        # Most multiply-adds one op may do (cost.py): 0 picks the device kind's default.
        self.max_op_flops = max_op_flops or (FAKE_GPU_FLOPS if device.fake else REAL_GPU_FLOPS)
        self.lock = threading.RLock()
        self.tensors: dict[int, torch.Tensor] = {}
        self.poisoned: dict[int, Poison] = {}
        self.uploads: dict[int, int] = {}  # handle -> next expected byte offset of an upload in progress
        # A download answered in pieces (server/bulk.py): (request id, handle, source, next offset); nothing
        # else of the session runs until its last piece.
        self.download: tuple[int, int, torch.Tensor, int] | None = None
        # A graph definition built over several slices (server/graph.py `Defining`): as with a download, nothing
        # else of the session runs until it is done.
        self.defining: Any = None
        # A collective waiting for its peers in a thread of its own (server/collectives.py): as with a download,
        # nothing else of the session runs until it is done.
        self.waiting: Any = None
        self._storages: dict[int, list[int]] = {}  # storage id -> [handles referencing it, bytes counted]
        self._keys: dict[int, int] = {}  # handle -> the storage id it is counted under (set_ can swap storages)
        self.used = 0
        self.error: Poison | None = None  # first error since the last sync
        self.rng_state: torch.Tensor | None = None
        self.ops = 0
        # Commands that may change a tensor's metadata in place (ops, eager spans, graph runs, collectives, ...:
        # CommandExecutor.execute counts every kind but those of `executor.KEEPS_METAS`): a captured step's
        # persistent tensors are not read again while no such command ran between two runs (graph._externals)
        self.mutations = 0
        # The handles a captured graph of the session reads as persistent tensors (the union over its graphs, kept
        # by server/graph.py `_pin`; the same set object for the session's life: the C++ runner holds it), and
        # `pins`, bumped by every table method that unbinds one of them or may bind it anew
        # (`unbind`, `free`, `rebind_all`, `_uncount`; native_runner.cpp `free_loop`, `Ctx::unbind`, `rebind_run`):
        # while it is unchanged, each such handle is bound to the very tensor object it was (a captured step's plan
        # then skips its persistent tensors' look-ups: native_runner.cpp `graph_run`)
        self.pinned: set[int] = set()
        self.pins = 0
        # The one captured graph's C++ plan that may keep its inputs sent by value for its next run (server/graph.py
        # `_spares`): None where none may (secrev50)
        self.spare_plan: Any = None
        self.group: Any = None  # its collective group (server.collectives.Group), once joined
        # A fake GPU's big uploads land in the host memory of the session's freed ones (server/uploadpool.py)
        self.upload_pool = UploadPool(KEEP if device.fake else 0)
        # A CUDA device's input bytes go through pinned buffers, queued without waiting (server/staging.py)
        self.staging = None if device.fake else staging.for_device(device.torch_device)

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
            if self.uploads and handle in self.uploads:  # its bytes are not all there: never read them
                raise FailedPrecondition(f"handle {handle:#x} is still being uploaded")
            return t
        self.check_handle(handle)
        poison = self.poisoned.get(handle)
        if poison is not None:
            raise PoisonedInput(poison.carried(), handle)
        raise NotFound(f"handle {handle:#x} was never created (or was freed)")

    # ---- memory ----

    def admit(self, new_bytes: int) -> None:
        """Refuse an allocation of `new_bytes` that would exceed the quota or the device capacity. Near the quota,
        the idle host memory of freed uploads the session keeps is let go first (server/uploadpool.py)."""
        pool = self.upload_pool
        if pool.held and self.used + new_bytes + pool.held > self.quota:
            pool.shed(self.quota - self.used - new_bytes)
        if self.used + new_bytes > self.quota:
            raise ResourceExhausted(
                f"memory quota exceeded: {new_bytes} bytes requested, {self.used} used of a {self.quota} byte limit",
                used_bytes=self.used,
                limit_bytes=self.quota,
            )
        dev = self.memory
        if dev.used + new_bytes > dev.device.capacity:
            # What this session may know (secrev50): its own use and quota, and the device's size (every caller's
            # ListPool and Status show that). Until round 50 the message and `used_bytes` were the device's total,
            # so the total less its own was the other sessions' use (one tenant's exactly where two share a device),
            # which ListPool and Status show a tenant only where it is alone on the device. Nor the device's free
            # bytes (its size less that total: the same figure). The refusal itself says the free bytes are fewer
            # than those asked, as any allocation's outcome does. Nor did its worker know them before it asked (free51:
            # `dev.used` is the size less its quota's room where that binds first: then the quota refused above).
            raise ResourceExhausted(
                f"device {dev.device.index} full: {new_bytes} bytes requested, more than its {dev.device.capacity} "
                f"bytes have free beside its other sessions (whose use is not shown to a session); this session uses "
                f"{self.used} of its {self.quota} byte quota",
                used_bytes=self.used,
                limit_bytes=self.quota,
            )

    def reserve(self, delta: int) -> None:
        """Count (negative: uncount) bytes held for no handle: the temporaries of captured graphs (graph.py)."""
        self._account(delta)

    def _account(self, delta: int) -> None:
        self.used += delta
        self.memory.used += delta  # the session's own copy (DeviceMemory): no lock

    def handle_count(self) -> int:
        """Handles that cost host memory: live (views and zero-byte tensors too) and poisoned."""
        return len(self.tensors) + len(self.poisoned)

    def admit_handles(self, new: int) -> None:
        """Refuse `new` more handles past the session's limit (host memory is not free because bytes are)."""
        if new > 0 and self.handle_count() + new > self.max_handles:
            raise ResourceExhausted(
                f"handle limit reached: {self.handle_count()} handles held (live and failed) of a "
                f"{self.max_handles} handle limit; free tensors"
            )

    def bind(self, handle: int, tensor: torch.Tensor, zero: bool = True) -> None:
        """Register `tensor` under `handle` (replacing what was there), counting new storages once (a new one's
        bytes outside the tensor zeroed unless `zero` is False: `bind_outputs` zeroes after all of an op's)."""
        self.check_handle(handle)
        if handle not in self.tensors and handle not in self.poisoned:
            self.admit_handles(1)
        self.unbind(handle)
        self.poisoned.pop(handle, None)
        self._count(handle, tensor, zero)
        self.tensors[handle] = tensor

    def bind_outputs(self, pairs: Iterable[tuple[int, torch.Tensor]]) -> list[int]:
        """`bind` for an op's several outputs: a new storage's bytes are zeroed outside the extents of ALL of them
        that lie in it, once they are bound (round 35's lead: zeroed output by output, a first output's zeroing
        wiped what a second one over the same new storage held). The handles bound, in order."""
        fresh: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
        bound = []
        try:
            for handle, tensor in pairs:
                storage = tensor.untyped_storage()
                key = storage._cdata
                new = key not in self._storages
                self.bind(handle, tensor, zero=False)
                bound.append(handle)
                if new:
                    fresh[key] = (storage, [tensor])
                elif key in fresh:
                    fresh[key][1].append(tensor)
        finally:
            for storage, tensors in fresh.values():
                _zero_unwritten(tensors, storage)
        return bound

    def bind_new(self, handle: int, tensor: torch.Tensor) -> None:
        """`bind` for a handle the caller checked (`check_handle`), admitted (`admit_handles`) and found neither
        live nor failed: the eager ops' and graph runs' hot path (`_count` and `_account` inline).

        A storage no handle holds yet gets its bytes outside the tensor's extent zeroed (`_zero_outside`; round 34,
        red34): torch's CPU `mse_loss` and `smooth_l1_loss` (mean or sum) return a 0-d result over a storage of the
        elementwise loss's size whose other bytes were never written, and `as_strided` over the whole storage
        (views are checked against their storage) read them: under `--isolation thread` another session's freed
        data. The tensor stays as its kernel made it: a copy would change the layout the client's meta kernels
        computed (a gappy `empty_strided`'s views then reached past the copy's storage). Only a new storage its tensor
        does not cover (`covers`) pays: a view of a storage a handle holds stays a view. Round 36: the test was the
        storage larger than `tensor.nbytes`, which an expanded (stride 0) result over a larger buffer passed."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            if nbytes != tensor.nbytes or not tensor.is_contiguous():  # `covers`, inline: a kernel's buffer behind it?
                _zero_unwritten([tensor], storage)
            self._storages[key] = [1, nbytes]
            self.used += nbytes
            self.memory.used += nbytes
        else:
            entry[0] += 1
        self._keys[handle] = key
        self.tensors[handle] = tensor

    def zero_new(self, tensors: list[torch.Tensor]) -> None:
        """`_zero_unwritten` of `tensors`, an op's outputs over one storage no handle holds yet: the C++ runner's
        binding (server/native_runner.cpp `bind_new`, `zero_several`), where one of them does not cover it."""
        _zero_unwritten(tensors, tensors[0].untyped_storage())

    def rebind(self, handle: int, tensor: torch.Tensor) -> None:
        """`bind` for a handle the caller checked (`check_handle`): a captured step's outputs and the tensors it
        leaves behind, bound again after every run."""
        if handle in self.tensors:
            self.unbind(handle)
        elif self.poisoned.pop(handle, None) is None:
            self.admit_handles(1)
        self.bind_new(handle, tensor)

    def rebind_all(self, pairs: Iterable[tuple[int, torch.Tensor]]) -> None:
        """`rebind` for several handles at once (a captured step's outputs and kept tensors, after every run): the
        same bookkeeping inline, the bytes accounted once at the end (also when the handle limit stops it midway)."""
        tensors, keys, storages, pinned = self.tensors, self._keys, self._storages, self.pinned
        delta = 0
        fresh: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}  # zeroed at the end, as bind_outputs
        try:
            for handle, tensor in pairs:
                if pinned and handle in pinned:
                    self.pins += 1
                if tensors.pop(handle, None) is not None:  # `unbind`
                    if self.uploads:
                        self.uploads.pop(handle, None)
                    old = keys.pop(handle)
                    entry = storages[old]
                    entry[0] -= 1
                    if entry[0] == 0:
                        del storages[old]
                        delta -= entry[1]
                elif self.poisoned.pop(handle, None) is None:
                    self.admit_handles(1)
                storage = tensor.untyped_storage()  # `bind_new`
                key = storage._cdata
                found = storages.get(key)
                if found is None:
                    nbytes = storage.nbytes()
                    if not covers(tensor, nbytes):  # as `bind_new`: a graph's mse_loss holds the same buffer
                        fresh[key] = (storage, [tensor])
                    storages[key] = [1, nbytes]
                    delta += nbytes
                else:
                    found[0] += 1
                    if key in fresh:  # another output over the same new storage (`y[0]`, `y[1]`): keep its bytes
                        fresh[key][1].append(tensor)
                keys[handle] = key
                tensors[handle] = tensor
        finally:
            for storage, kept in fresh.values():
                _zero_unwritten(kept, storage)
            if delta:
                self._account(delta)

    def _count(self, handle: int, tensor: torch.Tensor, zero: bool = True) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is None:
            nbytes = storage.nbytes()
            if zero and not covers(tensor, nbytes):  # as `bind_new` (round 35, rev35: an output handle already
                _zero_unwritten([tensor], storage)  # live, a multi-output op, an out= op's set_ took this path)
            self._storages[key] = [1, nbytes]
            self._account(nbytes)
        else:
            entry[0] += 1
        self._keys[handle] = key

    def _uncount(self, handle: int) -> None:
        if self.pinned and handle in self.pinned:  # (`recount`'s set_, server/storage_resize.py's resize away)
            self.pins += 1
        key = self._keys.pop(handle)
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self._account(-entry[1])

    def unbind(self, handle: int) -> bool:
        if self.pinned and handle in self.pinned:
            self.pins += 1
        t = self.tensors.pop(handle, None)
        if self.uploads:
            self.uploads.pop(handle, None)
        if t is None:
            return False
        key = self._keys.pop(handle)  # `_uncount` inline: frees and every step's outputs pass here
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            nbytes = entry[1]
            self.used -= nbytes
            self.memory.used -= nbytes
        return True

    def recount(self, handles: list[int], *, zero_growth: bool = False) -> None:
        """After an in-place or out= op on these handles: follow tensors that now use another storage (set_)
        and re-read the sizes of storages that grew (resize_); `zero_growth` when the op left the new bytes
        unwritten. Otherwise the growth is zeroed outside all of these handles' tensors of that storage: round 44
        (hostile44), outside the first one met only, `add.out(b, b, out=w)` with `w` a zero-element view past the end
        of `b`'s storage zeroed the sum it had written into `w` (the input `b` met first); the others' extents lie
        within the storage as it was before the op, or are what it wrote."""
        by_storage: dict[int, list[torch.Tensor]] | None = None  # (made once, at a first growth: one pass)
        for h in handles:
            t = self.tensors.get(h)
            if t is None:
                continue
            storage = t.untyped_storage()
            if storage._cdata != self._keys[h]:
                self._uncount(h)
                self._count(h, t)
            entry = self._storages[storage._cdata]
            nbytes = storage.nbytes()
            if nbytes != entry[1]:
                if zero_growth and nbytes > entry[1]:
                    zero_bytes(storage, entry[1], nbytes)  # grown memory may hold another session's old data
                elif nbytes > entry[1]:
                    if by_storage is None:
                        by_storage = {}
                        for k in handles:
                            u = self.tensors.get(k)
                            if u is not None:
                                by_storage.setdefault(u.untyped_storage()._cdata, []).append(u)
                    _zero_outside(by_storage.get(storage._cdata, [t]), storage, entry[1], nbytes)
                self._account(nbytes - entry[1])
                entry[1] = nbytes
                if self.upload_pool.kept:  # a kept upload's storage at another size is no longer the pool's
                    self.upload_pool.forget(storage)

    def free(self, handles: list[int]) -> None:
        """`unbind` each (inline: every output of every step passes here), the bytes of the storages freed counted
        once at the end; freeing unknown handles is harmless, freeing another session's is not."""
        pop, keys, storages, uploads = self.tensors.pop, self._keys, self._storages, self.uploads
        if self.pinned and not self.pinned.isdisjoint(handles):
            self.pins += 1
        freed = 0
        try:
            for h in handles:
                t = pop(h, None)
                if uploads:
                    uploads.pop(h, None)
                if t is None:
                    if self.poisoned.pop(h, None) is None:
                        self.check_handle(h)  # raises for another session's
                    continue
                del t
                key = keys.pop(h)
                entry = storages[key]
                entry[0] -= 1
                if entry[0] == 0:
                    del storages[key]
                    freed += entry[1]
        finally:
            if freed:
                self.used -= freed
                self.memory.used -= freed

    def poison(self, handle: int, err: Poison) -> None:
        if handle >> HANDLE_BITS == self.number and handle != self.handle_base:
            self.unbind(handle)
            if handle in self.poisoned or self.handle_count() < self.max_handles:
                self.poisoned[handle] = err  # past the limit the error still reaches the next sync

    def error_proto(self, err: Poison) -> tensor_pb2.Error:
        """The `Error` a sync point (a Sync's or a Get's answer) reports `err` with: with the session's handles that
        have no value, the most recently failed first, at most MAX_POISONED_REPLY (a client sets back to None the
        `.grad`s a failed backward left on them: client/torch/errors.py `clear_grads`)."""
        proto = err.to_proto()
        if self.poisoned:
            proto.poisoned.extend(itertools.islice(reversed(self.poisoned), MAX_POISONED_REPLY))
        return proto

    def record_error(self, err: Poison) -> None:
        if self.error is None:
            self.error = err

    def release_all(self) -> None:
        """Drop every tensor (close, revoke, expiry)."""
        if self.group is not None:  # peers fail at their next collective instead of waiting for this rank
            self.group.close()
        with self.lock:
            for h in list(self.tensors):
                self.unbind(h)
            self.poisoned.clear()
            if self._storages:  # counted for handles resized away alone (server/storage_resize.py `_Away.hold`)
                self._account(-sum(entry[1] for entry in self._storages.values()))
                self._storages.clear()
            self.uploads.clear()
            self.upload_pool.release()
            if self.spare_plan is not None:  # a graph's inputs kept for its next run (server/graph.py `_spares`)
                self.spare_plan.let_go()
                self.spare_plan = None
            if self.staging is not None:
                self.staging.close()


_CPU_OOM = "DefaultCPUAllocator: can't allocate memory"


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation that failed: CUDA's caching allocator past the device or the worker's cap
    (torch.OutOfMemoryError), Python's, or torch's CPU allocator's (a plain RuntimeError: a fake GPU's worker
    past its RLIMIT_DATA), all the session's own RESOURCE_EXHAUSTED."""
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or (
        isinstance(exc, RuntimeError) and _CPU_OOM in str(exc)
    )


_TRIED = re.compile(r"Tried to allocate ([0-9][0-9.]* ?[KMGTPE]?i?B)")


def oom_message(exc: BaseException) -> str:
    """What a session is told of an allocation that failed (`out_of_memory`): "device out of memory", and for the
    CPU allocator's and Python's errors their text (the bytes this session asked for). Of CUDA's caching allocator's
    (torch.OutOfMemoryError) only the size it tried to allocate (secrev50): the rest of its text is the device's
    ("GPU 0 has a total capacity of C of which F is free", "Process P has M memory in use" for every process on the
    GPU: the other sessions' workers, their pids and use), which ListPool and Status show a tenant only where it is
    alone on the device (`WorkerSession.admit`'s refusal alike). Until round 50 the session was told all of it."""
    if isinstance(exc, torch.OutOfMemoryError):
        tried = _TRIED.search(str(exc))
        return "device out of memory" + (f": tried to allocate {tried.group(1)}" if tried else "")
    return f"device out of memory: {exc}"


def _zero_outside(
    tensors: list[torch.Tensor], storage: torch.UntypedStorage, start: int = 0, end: int | None = None
) -> None:
    """Zero the bytes [start, end) of `storage` (default: all of it) outside every one of `tensors`' extents (each a
    view of it), which their kernel wrote. Round 34 (red34): the CPU `mse_loss`, `smooth_l1_loss` (mean, sum) return
    a 0-d result over a buffer of the elementwise loss's size, and their out= forms (and `huber_loss.out`,
    `soft_margin_loss.out`) grow `out` to it, writing only its first element; a view over the whole storage read the
    rest: the allocator's old contents, another session's under `--isolation thread`. Several tensors of one new
    storage (an op's several outputs, a run's `y[0]` and `y[1]`) keep each other's bytes (round 35)."""
    end = storage.nbytes() if end is None else end
    at = start
    for lo, hi in sorted(
        (end, end) if t.numel() == 0 else (int(t.storage_offset()) * t.element_size(), extent(t)) for t in tensors
    ):
        if lo > at:
            zero_bytes(storage, at, min(lo, end))
        at = max(at, hi)
    if at < end:
        zero_bytes(storage, at, end)


def covers(t: torch.Tensor, nbytes: int) -> bool:
    """Whether `t`'s elements are every byte of its storage of `nbytes`, densely in order (`bind_new`'s cheap test;
    else `_zero_outside` measures the extent): not an expanded (stride 0) or gappy result, an offset, a buffer
    behind it. A permuted dense result (channels_last) takes the measuring path, which zeroes nothing there."""
    return nbytes == t.nbytes and t.is_contiguous()


def _zero_unwritten(tensors: list[torch.Tensor], storage: torch.UntypedStorage) -> None:
    """`_zero_outside` for a new storage, unless one of `tensors` is `WHOLE` (its kernel wrote every byte)."""
    if not any(getattr(t, WHOLE, False) for t in tensors):
        _zero_outside(tensors, storage)


def extent(t: torch.Tensor) -> int:
    """The bytes of `t`'s storage up to its last element's end (of a tensor with elements)."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return (int(t.storage_offset()) + int(last) + 1) * t.element_size()


def zero_made(t: torch.Tensor, into_out: bool) -> None:
    """Zero what an uninitialized factory (`checks.UNINITIALIZED`) made: a new tensor's whole storage, or, for its
    out= form (`into_out`: `t` is the op's `out`, a tensor the session holds), `t`'s elements only. Round 37
    (quota37, after fin36): the out= form's whole storage was zeroed, wiping the session's own other views of it
    (`empty.out` into `x[4:8]` zeroed all of `x`). What such an op leaves unwritten is only under `t`: its resize
    (`resize_output`) makes `t` contiguous from its offset, every byte it adds to the storage one of `t`'s, and
    torch's generated out= forms (`empty_like.out`, `empty_strided.out`, `new_empty.out`, ...) copy an
    uninitialized tensor into `t`'s elements: the allocator's old bytes, another session's under `--isolation
    thread`. The recount after an out= op zeroes any growth outside `t` besides (`WorkerSession.recount`)."""
    if not into_out:
        storage = t.untyped_storage()
        zero_bytes(storage, 0, storage.nbytes())
    elif t.layout == torch.strided:
        if t.numel():  # its elements' bytes, through its strides, whatever its dtype (a quantized one has no zero_)
            size = t.element_size()
            view = torch.empty(0, dtype=torch.uint8, device=t.device)
            strides = [st * size for st in t.stride()] + [1]
            view.set_(t.untyped_storage(), int(t.storage_offset()) * size, (*t.shape, size), strides)
            view.zero_()  # (an expanded one's too: fill_ allows overlap)
    else:  # no strided elements to zero (no such `out` is known to get here): the old whole storage
        storage = t.untyped_storage()
        zero_bytes(storage, 0, storage.nbytes())


def zero_bytes(storage: torch.UntypedStorage, start: int, end: int) -> None:
    """Zero bytes [start, end) of a storage: allocators hand out memory freed by other sessions as it was."""
    view = torch.empty(0, dtype=torch.uint8, device=storage.device)
    view.set_(storage, start, (end - start,), (1,))
    view.zero_()


class PoisonedInput(GpupoolError):
    """An input handle whose producing op failed; carries that op's error."""

    def __init__(self, poison: Poison, handle: int) -> None:
        super().__init__(f"input {handle:#x} has no value: {poison.message}", op=poison.op)
        self.poison = poison
