"""A session worker's Python profile, for benches only (bench/worker_probe.py, bench/real_gpu.sh's `probe` stage).

With `GPUPOOL_WORKER_PROFILE=DIR` in the daemon's environment (as GPUPOOL_OP_AUDIT, server/opaudit.py: the operator's
switch, never the wire's), every session worker opens `DIR/worker-PID.prof` before its sandbox closes and keeps a
`cProfile` profiler, off until the worker gets SIGUSR1 (from a process of its own user: the bench, around the steps
it times), on until the next SIGUSR1, and so on. Each time it goes off, the worker writes what was profiled so far
into the file, in pstats' format (`marshal` of cProfile's statistics, read by `pstats.Stats(path)`): a worker is
killed at its session's end, so it writes nothing then. Off (the variable unset) nothing of this runs. The
profiler makes each Python call several times dearer: read its figures as shares of the worker's time, not as the
time itself.
"""

from __future__ import annotations

import cProfile
import marshal
import os
import signal
from pathlib import Path

ENV = "GPUPOOL_WORKER_PROFILE"
_active: list[WorkerProfile] = []  # this worker's (what its signal handler profiles into)


class WorkerProfile:
    def __init__(self, folder: str) -> None:
        path = Path(folder) / f"worker-{os.getpid()}.prof"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
        self.fd = os.open(path, flags, 0o600)  # before the sandbox, which may forbid making files
        self.profiler = cProfile.Profile()
        self.on = False
        signal.signal(signal.SIGUSR1, self.toggle)

    def toggle(self, *_: object) -> None:
        """SIGUSR1: profile from now on, or stop and write (the handler runs in the worker's main thread, which runs
        the ops)."""
        self.on = not self.on
        if self.on:
            self.profiler.enable()
            return
        self.profiler.disable()
        self.profiler.create_stats()
        data = memoryview(marshal.dumps(self.profiler.stats))  # type: ignore[attr-defined]
        # No ftruncate (the sandbox refuses it: round 38, a worker shrinking its shared buffer's file killed the
        # daemon): written from offset 0 over the last one; `pstats` reads one marshalled object and ignores the rest.
        at = 0
        while at < len(data):
            at += os.pwrite(self.fd, data[at:], at)


def from_env() -> None:
    """In a worker, before its sandbox: the profiler, where the daemon's environment asks for it."""
    folder = os.environ.get(ENV, "")
    if folder:
        _active.append(WorkerProfile(folder))
