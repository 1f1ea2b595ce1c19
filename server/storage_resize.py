"""Storage resize (Command.resize_storage): torch's `untyped_storage().resize_(n)` on a session's tensor, in place.

FSDP2 frees each unsharded parameter between its uses with `resize_(0)` on its storage and gets it back with
`resize_(nbytes)` before the next all-gather writes it (torch's `_fsdp_param.free_storage`/`alloc_storage`); every
tensor on that storage (the all-gather output, the unsharded parameter, views of them) keeps its identity, so the
daemon resizes the storage itself, under whichever of its handles the client names.

A storage that shrinks would leave its tensors reaching past its end -- torch's kernels then read and write freed
memory (a CPU kernel on a tensor of a 0-byte storage segfaults; CUDA's fault the context) -- so:

- at 0 every handle of the storage whose tensor has elements is **resized away**: it leaves `tensors` for
  `poisoned` as a `ResizedAway` (its tensor kept there), so every path that looks a handle up (the eager ops, the
  C++ runner, graphs, syncs, collectives) refuses it with INVALID_ARGUMENT naming the resize, until the storage
  grows back; a Free forgets it as any failed handle. Its bytes leave the session's count with it.
- a shrink to more than 0 bytes that a tensor of the storage would reach past is refused (INVALID_ARGUMENT);
  nothing changes. (torch allows it on CUDA; nothing sound could be done with such a tensor.)
- growing charges the new bytes to the session's quota first (`admit`: RESOURCE_EXHAUSTED naming used and limit,
  nothing changed), zeroes every byte the storage gains (an allocator hands out other tenants' freed memory as it
  was), and brings back each handle of it resized away whose tensor fits again (all of them, at the size it had).

Growth from 0 names a handle that was resized away (the client knows no other name for the storage): that handle
must fit the new size. The op is the storage form of `aten::resize_` and goes with it: a daemon whose allowlist
lacks `aten::resize_.default` refuses it (PERMISSION_DENIED). A handle still being uploaded, another session's or an
unknown one is refused as any op's argument is.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from gpupool._proto import device_pb2
from gpupool.errors import FailedPrecondition, InvalidArgument

from .sessions import Poison, WorkerSession, extent, zero_bytes

# Sizes at or past this are refused before anything else: a negative size cast to unsigned, and nothing any
# device holds (RESOURCE_EXHAUSTED is for sizes a larger quota could grant).
MAX_NBYTES = 1 << 62
ALLOWED_AS = "aten::resize_.default"


@dataclass
class ResizedAway(Poison):
    """A handle whose storage was resized to 0 bytes: its tensor, kept until the storage grows back (or the handle
    is freed, which drops it with the rest of the poisoned entry)."""

    tensor: Any = field(default=None, repr=False)
    handle: int = 0  # the handle it was made for

    def carried(self) -> Poison:
        # what an op that fails on it poisons its outputs with and records: its error without the tensor. Round 37
        # (fin37): the same object, its tensor too, so a failed op's output (and the session's recorded error) held
        # the storage alive where neither the session's count nor the index saw it.
        return Poison(self.code, self.op, self.message)


def _resized_away(handle: int, tensor: torch.Tensor, nbytes: int) -> ResizedAway:
    why = f"its storage was resized to {nbytes} bytes (untyped_storage().resize_): resize it back before using it"
    return ResizedAway(grpc.StatusCode.INVALID_ARGUMENT, "", why, tensor=tensor, handle=handle)


class _Away:
    """One session's handles resized away, by storage (`_cdata`): the handles its growth may bring back. An entry
    whose handle was freed or bound anew since (its `poisoned` entry is no longer the ResizedAway recorded) is
    stale: skipped, and swept once stale entries could outnumber the live ones.

    `members`: the handles counted on each storage as its last resize left them, so the next one need not scan every
    handle of the session (~0.2 us a handle on this box: 2 ms a resize at 10,000 handles, four resizes per FSDP
    parameter per step); trusted only where the storage's own count of handles says none was added since."""

    __slots__ = ("by_storage", "count", "members", "held")

    def __init__(self) -> None:
        self.by_storage: dict[int, dict[int, ResizedAway]] = {}
        self.count = 0
        self.members: dict[int, list[int]] = {}
        # Storages the index holds (its ResizedAway entries keep their tensors, so their storages, alive): each
        # counted once more in the session's `_storages` while it does, so its bytes stay in the session's count
        # whatever its handles do. Round 37 (fin37): a storage counted by its live handles only left the count with
        # the last of them while a handle resized away still held it: an empty view grew it back (to a size the
        # resized-away handle did not fit) and was freed, 12 MiB held a cycle past a 16 MiB quota, unbounded.
        self.held: set[int] = set()

    def hold(self, s: WorkerSession, key: int) -> None:
        """Count storage `key` for the index (its entry exists: a handle of it is counted when this is called)."""
        if key not in self.held:
            self.held.add(key)
            s._storages[key][0] += 1

    def let_go(self, s: WorkerSession, key: int) -> None:
        """The index holds storage `key` no more: its count for the index goes (and its bytes, if that was the last)."""
        if key in self.held:
            self.held.discard(key)
            entry = s._storages.get(key)
            if entry is not None:
                entry[0] -= 1
                if entry[0] == 0:
                    del s._storages[key]
                    s._account(-entry[1])

    def counted(self, s: WorkerSession, key: int) -> list[int]:
        """The handles counted on storage `key`: those of its last resize if they all still are and no other is
        (as many as its entry counts: handles are distinct), else every handle of the session looked at."""
        keys = s._keys
        entry = s._storages.get(key)
        cached = self.members.get(key)
        if cached is not None:
            live = [h for h in cached if keys.get(h) == key]
            if len(live) == (entry[0] - (key in self.held) if entry is not None else 0):
                return live
        return [h for h, k in keys.items() if k == key]

    def remember(self, s: WorkerSession, key: int, handles: list[int]) -> None:
        if len(self.members) > 2 * len(s._storages) + 64:  # storages gone since: a cache, dropped whole
            self.members.clear()
        self.members[key] = handles

    def add(self, s: WorkerSession, key: int, handle: int, away: ResizedAway) -> None:
        self.by_storage.setdefault(key, {})[handle] = away
        self.count += 1
        if self.count > 2 * len(s.poisoned) + 64:
            self.sweep(s)

    def sweep(self, s: WorkerSession) -> None:
        poisoned = s.poisoned
        for key in list(self.by_storage):
            kept = {h: a for h, a in self.by_storage[key].items() if poisoned.get(h) is a}
            if kept:
                self.by_storage[key] = kept
            else:
                del self.by_storage[key]
                self.let_go(s, key)
        self.count = sum(len(v) for v in self.by_storage.values())

    def holds(self, key: int, handle: int, away: ResizedAway) -> bool:
        return self.by_storage.get(key, {}).get(handle) is away

    def take(self, s: WorkerSession, key: int) -> list[tuple[int, ResizedAway]]:
        """The live entries of storage `key`, removed from the index."""
        found = self.by_storage.pop(key, {})
        self.count -= len(found)
        poisoned = s.poisoned
        return [(h, a) for h, a in found.items() if poisoned.get(h) is a]


_sessions: weakref.WeakKeyDictionary[WorkerSession, _Away] = weakref.WeakKeyDictionary()


def _fits(t: torch.Tensor, nbytes: int) -> bool:
    return t.numel() == 0 or extent(t) <= nbytes


def resize(s: WorkerSession, msg: device_pb2.ResizeStorage) -> None:
    """Resize the storage of `msg.handle`'s tensor to `msg.nbytes` (the module's docstring says what follows)."""
    handle, nbytes = msg.handle, msg.nbytes
    s.check_handle(handle)
    if nbytes >= MAX_NBYTES:
        raise InvalidArgument(f"storage resize to {nbytes} bytes: a size must be below {MAX_NBYTES} (2**62)")
    away = _sessions.get(s)
    if away is None:
        away = _sessions[s] = _Away()
    t = s.tensors.get(handle)
    named_away = None
    if t is None:
        p = s.poisoned.get(handle)
        # the handle resized away itself (an op that failed on one poisons its outputs with a copy: `carried`)
        if not isinstance(p, ResizedAway) or p.handle != handle:
            s.resolve(handle)  # raises: failed, never created or freed
            raise AssertionError("unreachable")  # pragma: no cover
        named_away, t = p, p.tensor
    if s.uploads and handle in s.uploads:
        raise FailedPrecondition(f"handle {handle:#x} is still being uploaded")
    if t.device.type != s.device.torch_device.type:  # (cannot be: every tensor of a session is on its device)
        raise InvalidArgument(f"handle {handle:#x} is not on the session's device")
    storage = t.untyped_storage()
    key = storage._cdata
    if named_away is not None and not away.holds(key, handle, named_away):
        s.resolve(handle)  # (cannot be: the index has every handle resized away) raises its poison
    old = storage.nbytes()
    if nbytes == old:
        return
    if not storage.resizable():
        raise InvalidArgument(f"handle {handle:#x}: its storage cannot be resized")
    tensors = s.tensors
    live = away.counted(s, key)  # the handles counted on this storage
    if nbytes < old:
        past = [h for h in live if not _fits(tensors[h], nbytes)]
        if past and nbytes:
            raise InvalidArgument(
                f"storage resize of handle {handle:#x} to {nbytes} bytes: handle {past[0]:#x} reaches past that "
                f"(to {extent(tensors[past[0]])}); a storage shrinks to 0 or to a size all its tensors fit"
            )
        storage.resize_(nbytes)
        if past:
            away.hold(s, key)  # before the handles' counts go: the storage stays counted while the index holds it
        for h in past:
            mark = _resized_away(h, tensors.pop(h), nbytes)
            s._uncount(h)
            s.poisoned[h] = mark
            away.add(s, key, h, mark)
        _recounted(s, storage, key, nbytes)
        away.remember(s, key, [h for h in live if h in tensors])
        return
    # growth
    if named_away is not None and not _fits(t, nbytes):
        raise InvalidArgument(
            f"storage resize of handle {handle:#x} to {nbytes} bytes: the handle reaches past that (to {extent(t)})"
        )
    entry = s._storages.get(key)
    counted = entry[1] if entry is not None else 0  # (an entry is there: the index's own count, `_Away.hold`)
    s.admit(nbytes - counted)
    storage.resize_(nbytes)  # an allocation that fails (the device's OOM) changes nothing
    zero_bytes(storage, old, nbytes)
    _recounted(s, storage, key, nbytes)
    for h, mark in away.take(s, key):
        back = mark.tensor
        if _fits(back, nbytes):
            del s.poisoned[h]
            tensors[h] = back
            s._count(h, back, zero=False)  # a storage no counted handle held: counted now, at its new size
            live.append(h)
        else:
            away.add(s, key, h, mark)
    if key not in away.by_storage:  # every handle resized away is back (or was freed): the index holds it no more
        away.let_go(s, key)
    away.remember(s, key, live)


def _recounted(s: WorkerSession, storage: torch.UntypedStorage, key: int, nbytes: int) -> None:
    """The session's count of a storage at its new size (where handles still count it)."""
    entry = s._storages.get(key)
    if entry is not None and entry[1] != nbytes:
        s._account(nbytes - entry[1])
        entry[1] = nbytes
    if s.upload_pool.kept:  # a kept upload's storage at another size is no longer the pool's
        s.upload_pool.forget(storage)
