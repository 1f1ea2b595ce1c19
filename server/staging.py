"""A session's input bytes onto a CUDA device through pinned host memory, without waiting for the device.

torch's `copy_` from pageable host memory to a CUDA tensor (what an Upload's chunk and a RunGraph's input sent by
value took) is `cudaMemcpyAsync` then `cudaStreamSynchronize` (ATen/native/cuda/Copy.cu, `copy_kernel_cuda`:
`memcpy_and_sync` unless non_blocking): the worker's thread waits until the device has run everything queued
before the copy (the previous step's kernels) and the driver has staged the bytes through its own pinned memory,
each a costly driver call where driver calls are costly (the H200 host's gVisor). A copy from page-locked
memory with `non_blocking=True` is queued instead: the thread goes on at once.

Each session on a CUDA device (`WorkerSession.staging`) keeps `BUFFERS` pinned buffers (torch's caching host
allocator's), used in turn, each of at most `MAX_BYTES` (a protocol chunk: 4 MiB): at most `BUFFERS * MAX_BYTES`
bytes of pinned host memory a session, held from its first staged copy to its end (`held`, `close`). A copy:

1. takes the next buffer, waiting on its event first: the event was recorded on the stream right after the last
   copy that read the buffer was queued, so once it completed no queued copy reads the buffer any more -- the
   only wait, and only where the device is `BUFFERS` copies behind;
2. writes the bytes into it (a memcpy on the host: the caller's bytes may be reused as soon as it returns);
3. queues `dst.copy_(buffer, non_blocking=True)` on the current stream -- the stream the session's ops that
   read `dst` are queued on after it, so they see every byte -- and records the buffer's event after it.

A buffer given back to torch (a bigger one replacing it, the session's end) while a copy from it is queued stays
reserved: the non-blocking copy recorded its use with the caching host allocator (`recordEvent` in Copy.cu), which
hands the block out again only once that completed. Nothing of this is needed on a CPU-backed device (no pinned
memory, no device to wait for): `for_device` gives None there. (No GPU was at hand when this was written:
tests/unit/test_staging_cuda.py's `cuda` tests check it on bench/real_gpu.sh's `tests` stage.)
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from gpupool import protocol, wire

log = logging.getLogger(__name__)

BUFFERS = 2
MAX_BYTES = protocol.CHUNK_BYTES  # larger copies (none: an Upload chunk is at most this) take torch's path
MIN_ALLOC = 64 * 1024  # a buffer's size: the copy's bytes rounded up to a power of two, at least this


class Staging:
    """A session's pinned staging buffers on one CUDA device (the module's docstring)."""

    __slots__ = ("device", "buffers", "events", "next", "held", "copies", "failed")

    def __init__(self, device: torch.device) -> None:
        # with its index: a tensor's device always has one, and torch.device("cuda") != torch.device("cuda", 0)
        self.device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        self.buffers: list[torch.Tensor | None] = [None] * BUFFERS
        self.events: list[Any] = [None] * BUFFERS
        self.next = 0
        self.held = 0  # bytes of pinned memory held now (at most BUFFERS * MAX_BYTES)
        self.copies = 0  # copies staged (tests, logs)
        self.failed = False  # no pinned memory could be had: every copy takes torch's path from then on

    def copy(self, dst: torch.Tensor, data: Any) -> bool:
        """Queue a copy of `data` (a bytes-like object of exactly `dst`'s bytes) into `dst`, a contiguous tensor (or
        a contiguous byte range of one) on this device; False (nothing done) where it is larger than MAX_BYTES:
        the caller copies as before."""
        n = len(data)
        if n > MAX_BYTES or dst.device != self.device or self.failed:
            return False
        if n == 0:
            return True
        k = self.next
        self.next = (k + 1) % BUFFERS
        event = self.events[k]
        if event is not None:
            event.synchronize()  # the last copy queued from this buffer has run: nothing reads it any more
        buf = self.buffers[k]
        if buf is None or buf.numel() < n:
            size = max(MIN_ALLOC, 1 << (n - 1).bit_length())
            try:
                fresh = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as exc:  # no page-locked memory to be had (a host's limit, a sandbox): torch's path
                self.failed = True
                log.warning(
                    "no pinned staging buffer of %d bytes (%s): this session's uploads wait for its device", size, exc
                )
                return False
            self.held -= 0 if buf is None else buf.numel()
            self.buffers[k] = buf = fresh
            self.held += size
        wire.host_bytes(buf)[:n] = data
        if event is None:
            event = self.events[k] = torch.cuda.Event()
        wire.byte_view(dst).copy_(buf[:n], non_blocking=True)
        event.record(torch.cuda.current_stream(self.device))
        self.copies += 1
        return True

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of contiguous CPU tensor `t` on this device (a new tensor, its bytes queued: `copy`)."""
        out = torch.empty(t.shape, dtype=t.dtype, device=self.device)
        if not self.copy(out, wire.host_bytes(t)):
            out.copy_(t)
        return out

    def close(self) -> None:
        """Give the buffers back (the session's end; see the module's docstring for copies still queued)."""
        self.buffers = [None] * BUFFERS
        self.events = [None] * BUFFERS
        self.held = 0


def for_device(device: torch.device) -> Staging | None:
    """A session's staging on `device`: None unless it is a CUDA device torch can use here."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return Staging(device)


def onto(staging: Staging | None, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Contiguous CPU tensor `t` on `device`: queued through a session's `staging` where it has one, else torch's
    copy (a fake GPU's, or a CUDA device's without pinned memory)."""
    return staging.tensor(t) if staging is not None else t.to(device)
