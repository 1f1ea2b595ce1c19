"""The runtime's batched frees: every dead handle goes out in exactly one Free, also when tensors die on other
threads while a batch is taken (`release` queues without the lock; `flush_frees` trims the list at its front)."""

from __future__ import annotations

import itertools
import threading
from typing import Any

from gpupool.client.torch import runtime


class FreeLog:
    """The session side of a runtime that only records the Free commands it is given (no daemon needed)."""

    quota_bytes = 0
    device = None
    handle_base = 1 << 32

    def __init__(self) -> None:
        self._handles = itertools.count(1)
        self.freed: list[int] = []

    def free(self, handles: Any) -> None:
        self.freed.extend(handles)

    def close(self) -> None: ...


def test_releases_racing_flushes_are_freed_exactly_once() -> None:
    log = FreeLog()
    rt = runtime.DeviceRuntime(99, log)
    per_thread, threads = 20000, 4

    def die(base: int) -> None:
        for i in range(per_thread):
            rt.release(base + i, 4)

    workers = [threading.Thread(target=die, args=(k * per_thread + 1,)) for k in range(threads)]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        rt.flush_frees()  # batches of FREE_BATCH taken while the others append
    rt.flush_frees(force=True)
    assert sorted(log.freed) == list(range(1, threads * per_thread + 1))


def test_shared_and_pending_handles_take_the_locked_path() -> None:
    log = FreeLog()
    rt = runtime.DeviceRuntime(98, log)
    rt.share(5)  # a detach holds handle 5 too: the first death is not a free
    rt.release(5)
    rt.pending[7] = ("aten::empty.memory_format", [], {})  # a held-back empty dies unsent: nothing to free
    rt.release(7)
    rt.release(8)
    rt.flush_frees(force=True)
    assert log.freed == [8] and not rt.pending and not rt.shared
    rt.release(5)
    rt.flush_frees(force=True)
    assert log.freed == [8, 5]
