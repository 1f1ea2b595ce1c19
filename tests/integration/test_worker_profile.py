"""A bench's Python profile of a session worker (server/workerprofile.py, GPUPOOL_WORKER_PROFILE in the daemon's
environment, as bench/worker_probe.py and bench/real_gpu.sh's `probe` stage use it): SIGUSR1 turns it on and off,
and it covers what ran in between, written as the profiler goes off (a worker is killed at its session's end)."""

from __future__ import annotations

import os
import pstats
import signal
import time
from pathlib import Path

import torch
from gpupool.client.session import Handle, Session
from gpupool.server import workerprofile
from support import MiB


def test_a_workers_profile_covers_what_ran_between_two_signals(serve_process: object, tmp_path: Path) -> None:
    folder = tmp_path / "profiles"
    folder.mkdir()
    d = serve_process("--fake-gpus", "1", env={workerprofile.ENV: str(folder)})  # type: ignore[operator]
    with Session.attach(d.address, d.token(quota_bytes=16 * MiB)) as s:
        h = Handle(s.upload(torch.arange(4.0)))
        [out] = s.call("aten::mul.Tensor", h, 3)  # not profiled
        assert torch.equal(s.download(out), torch.arange(4.0) * 3)  # (the worker is serving: past its setup)
        [prof] = folder.glob("worker-*.prof")  # made before the sandbox closed
        pid = int(prof.stem.split("-")[1])
        assert prof.stat().st_size == 0
        os.kill(pid, signal.SIGUSR1)  # on
        [out] = s.call("aten::neg", out)
        assert torch.equal(s.download(out), torch.arange(4.0) * -3)
        os.kill(pid, signal.SIGUSR1)  # off: written
        deadline = time.monotonic() + 60  # (a bound on a hang: the worker's handler runs at once)
        while prof.stat().st_size == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # (written in one go; a slow box)
        stats = pstats.Stats(str(prof))
    ran = {name for _file, _line, name in stats.stats}  # type: ignore[attr-defined]
    assert "run_commands" in ran, sorted(ran)[:50]
    assert prof.stat().st_mode & 0o077 == 0
