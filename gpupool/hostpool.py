"""Host memory for big downloads, reused once the caller has dropped an earlier download's tensor.

A fresh 256 MiB tensor is 65,536 page faults, each zeroing a page, on the thread that receives the bytes: a raw
TLS socket receives 256 MiB into fresh memory at about half the speed it reaches into a reused buffer
(BENCHMARKS.md, "Round 27, xfer27"; gpupool/prefault.py moves the faults to a helper thread, which moves the work
but does not remove it). A loop that downloads a big result every step paid them every step: the allocator
returns a freed 256 MiB block to the kernel (glibc's mmap threshold stops at 32 MiB), and the next download
faulted its pages in again.

`empty(shape, dtype)` gives a download of `MIN_BYTES` or more an ordinary tensor (`torch.empty`'s storage, of
its size class, `size_class`) and keeps a uint8 tensor over that storage. The next big download looks at what it
keeps: a storage nobody else refers to any more (the caller dropped every tensor, view, numpy array and storage
object of it: torch's use count and CPython's reference count say so, `_refs`) and of the size class wanted is
handed out again, its pages already in memory. The caller's memory is never touched while anything of the caller's
refers to it; a reused tensor's old bytes are this process's own earlier download, and every byte the new one
shows is written by the download before it is returned (a failed download's tensor is never returned). A storage
moved into shared memory (`share_memory_`: another process may map it) is never reused.

Memory: the storages kept, used or not, are at most `GPUPOOL_DOWNLOAD_CACHE` bytes (default `DEFAULT_KEEP`,
512 MiB; 0 turns reuse off); past that the oldest is let go (its caller keeps it, as any tensor), so at most that
much memory stays allocated after the caller dropped everything, until the next big download or the process's end.
`release()` lets all of them go now.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import Any

import torch

MiB = 1024 * 1024
MIN_BYTES = 8 * MiB  # downloads at least this large take a reusable storage
DEFAULT_KEEP = 512 * MiB  # bytes of storages kept for reuse, used or not
ENV = "GPUPOOL_DOWNLOAD_CACHE"
_use_count: Any = getattr(torch._C, "_storage_Use_Count", None)  # absent in some torch: no reuse there


def _refs(keeper: torch.Tensor) -> tuple[int, int]:
    """Who refers to `keeper`'s storage: its C++ use count (tensors and views, a numpy array's tensor, ...) and
    the Python references to its storage object (one torch shares among all who ask: `untyped_storage()`)."""
    s = keeper.untyped_storage()
    return int(_use_count(s._cdata)), sys.getrefcount(s)


# What `_refs` reads of a tensor's storage that nothing else refers to (measured, not assumed: the counts are
# torch's and CPython's); None where it cannot be read, which turns reuse off.
_IDLE: tuple[int, int] | None = _refs(torch.empty(1, dtype=torch.uint8)) if _use_count is not None else None


def keep_from_env(env: str = ENV, default: int = DEFAULT_KEEP) -> int:
    """`GPUPOOL_DOWNLOAD_CACHE` (or `env`: the daemon's upload pool's, server/uploadpool.py) in bytes (unset:
    `default`); ValueError names a malformed value."""
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{env}={text!r}: expected a number of bytes (0 turns reuse off)") from None
    if value < 0:
        raise ValueError(f"{env}={text!r}: expected a number of bytes, 0 or more")
    return value


def size_class(nbytes: int) -> int:
    """The storage size a download of `nbytes` takes: whole MiB up to 64 MiB, then steps of 1/16 of the power of
    two at or below it (a storage is at most 1/16 larger than its download, and serves downloads near its size)."""
    if nbytes <= 64 * MiB:
        return -(-nbytes // MiB) * MiB
    step = (1 << (nbytes.bit_length() - 1)) // 16
    return -(-nbytes // step) * step


class Pool:
    """The storages of big downloads, oldest first (see the module's docstring)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep if _IDLE is not None else 0
        self.kept: list[torch.Tensor] = []  # a uint8 tensor over each storage, of its size class
        self.reused = 0  # downloads that took a kept storage (tests and benchmarks read it)
        self._lock = threading.Lock()

    def _idle(self, keeper: torch.Tensor) -> bool:
        """Whether nothing but this pool refers to `keeper`'s storage (no tensor, view, numpy array or storage
        object of the caller's), and it is in no shared memory."""
        return _refs(keeper) == _IDLE and not keeper.untyped_storage().is_shared()

    def take(self, size: int, shape: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """A contiguous tensor of `shape` and `dtype` over a storage of `size` bytes, and whether that storage is a
        kept one nobody used any more; else over a new one (kept, the oldest let go past `keep`). The tensor is made
        under the pool's lock: its reference is what tells another thread's `take` the storage is in use (until
        round 29 the tensor was made after the lock was let go, and a second thread could be handed the same
        storage in between: two downloads into one buffer)."""
        with self._lock:
            for k, keeper in enumerate(self.kept):
                if keeper.nbytes == size and self._idle(keeper):
                    self.kept.append(self.kept.pop(k))  # the newest again
                    self.reused += 1
                    return _over(keeper, shape, dtype), True
            fresh = torch.empty(size, dtype=torch.uint8)
            if size <= self.keep:
                self.kept.append(fresh)
                while sum(t.nbytes for t in self.kept) > self.keep:
                    self.kept.pop(0)
            return _over(fresh, shape, dtype), False

    def release(self) -> None:
        with self._lock:
            self.kept.clear()


def _over(keeper: torch.Tensor, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(keeper.untyped_storage(), 0, shape, ())  # no strides: contiguous


_pool = Pool(keep_from_env())


def pool() -> Pool:
    return _pool


def release() -> None:
    """Let every kept storage go (the memory of dropped downloads is freed now; the caller's tensors stay)."""
    _pool.release()


def empty(
    shape: list[int], dtype: torch.dtype, advise: Any = None, pool: Pool | None = None
) -> tuple[torch.Tensor, bool]:
    """An uninitialized contiguous CPU tensor for a download, and whether its memory was reused (its pages in
    memory: no faults to move off the filling thread). Small downloads, and all with reuse off, get
    `torch.empty`'s. `advise(tensor)`: called on a tensor over fresh memory before its first touch (huge pages);
    `pool`: the process's unless given."""
    nbytes = math.prod(shape) * dtype.itemsize
    p = _pool if pool is None else pool
    if p.keep <= 0 or nbytes < MIN_BYTES:
        fresh = torch.empty(shape, dtype=dtype)
        if advise is not None:
            advise(fresh)
        return fresh, False
    t, kept = p.take(size_class(nbytes), shape, dtype)
    if not kept and advise is not None:
        advise(t)
    return t, kept
