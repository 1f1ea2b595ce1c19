"""A fake GPU's big uploads land in the host memory of an upload of the same size the session freed.

On a fake GPU a tensor is host memory, and a big one is memory glibc maps fresh at every allocation and unmaps at
its free (its mmap threshold stops at 32 MiB): each upload of 256 MiB faulted its 65,536 pages in again, each
zeroed by the kernel, in the worker's copy of the bytes, ~2/3 of that copy's CPU (BENCHMARKS.md, "Round 29,
xfer29" and "Round 30, xfer30"). A loop that uploads a batch every step paid it every step; on a real GPU the
upload lands in device memory, which CUDA's caching allocator already reuses.

Each session (`WorkerSession.upload_pool`, a fake GPU's only) keeps a uint8 tensor over the storage of each
upload of `MIN_BYTES` or more (gpupool/hostpool.py's `Pool`, here with exact sizes: the session's count of its
memory is what it was). The next upload of exactly that many bytes takes a kept storage that nothing of the
session refers to any more (its handles freed, no view of it left: torch's storage use count and CPython's
reference count read as for a storage nobody holds) instead of fresh memory. What is reused is the same session's
memory, in its own worker, and an upload's tensor is never read before every byte of it was written (a handle
still being uploaded is refused as an input and to a Get, `WorkerSession.resolve`), so no tensor ever shows bytes
the upload did not write; a factory of uninitialized memory (`torch.empty`) stays zeroed as before.

Memory: the storages kept, used or not, are at most `GPUPOOL_UPLOAD_CACHE` bytes (the daemon's environment,
default `DEFAULT_KEEP`, 0 off); past that the oldest is let go. The idle ones are not in the session's count (a
freed upload frees quota as before), so the worker holds at most that much host memory beyond what the session's
count says, and less near its quota: before an allocation the session admits that would leave the idle ones no
room under the quota (`WorkerSession.admit`), after any allocation that failed for memory, and at the session's
end, they are let go.
"""

from __future__ import annotations

import math

import torch

from gpupool import hostpool

MiB = 1024 * 1024
MIN_BYTES = 8 * MiB  # uploads at least this large take a reusable storage (the chunked path's: > 4 MiB)
DEFAULT_KEEP = 512 * MiB  # bytes of storages kept per session, used or not (under the worker's 1 GiB slack)
ENV = "GPUPOOL_UPLOAD_CACHE"


# read when the daemon starts (a malformed value stops it there); its workers inherit it
KEEP = hostpool.keep_from_env(ENV, DEFAULT_KEEP)


class UploadPool(hostpool.Pool):
    """The storages of one session's big uploads (see the module's docstring); `held`: their bytes, used or not
    (what `WorkerSession.admit` looks at before it asks which are idle)."""

    def __init__(self, keep: int) -> None:
        super().__init__(keep)
        self.held = 0

    def _idle(self, keeper: torch.Tensor) -> bool:
        # and of the size it was kept at: a storage an op grew in place (resize_) is counted at its new size
        return super()._idle(keeper) and keeper.untyped_storage().nbytes() == keeper.nbytes

    def take_upload(self, shape: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """A contiguous tensor of `shape` and `dtype` for an upload, and whether its memory is a kept storage (its
        pages in memory); a small upload, or any with reuse off, gets plain `torch.empty`'s."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.keep <= 0 or nbytes < MIN_BYTES:
            return torch.empty(shape, dtype=dtype), False
        got = self.take(nbytes, shape, dtype)
        self.held = sum(k.nbytes for k in self.kept)
        return got

    def forget(self, storage: torch.UntypedStorage) -> None:
        """Stop keeping `storage` (an op resized it: `WorkerSession.recount`). Kept, it would hold its new size
        once the session freed it -- never offered again (`_idle`), but counted at its old size in `held` and
        against `keep`: a session that grew its uploads in place and freed them left the worker holding that much
        host memory its count no longer showed (round 30)."""
        with self._lock:
            key = storage._cdata
            self.kept = [k for k in self.kept if k.untyped_storage()._cdata != key]
            self.held = sum(k.nbytes for k in self.kept)

    def shed(self, room: int) -> None:
        """Let idle kept storages go, oldest first, until those left idle hold at most `room` bytes; and stop
        keeping the ones in use (the session's tensors still: only not offered again), so that `held` is at most
        `room` and the caller's next allocation of that size does not ask again."""
        with self._lock:
            idle = [k for k in self.kept if self._idle(k)]
            held = sum(k.nbytes for k in idle)
            while idle and held > room:
                held -= idle.pop(0).nbytes
            self.kept, self.held = idle, held

    def release(self) -> None:
        super().release()
        self.held = 0
