"""A real GPU's worker under Landlock (server/landlock.py): what CUDA loads lazily once the worker is confined still
loads (its libraries' folders are read from /proc/self/maps after its CUDA context exists), and the daemon's key
stays out of reach. Needs a CUDA device (bench/real_gpu_tests.txt); not checked before round 39's next device run."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import worker_attacks
from gpupool.server.worker import WorkerSpec
from gpupool.server.zygote import Zygote

MiB = 1024**2


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote(program=[sys.executable, worker_attacks.__file__])
    z.start()
    z.wait_ready()
    try:
        yield z
    finally:
        z.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_confined_gpu_worker_runs_cudnn_nvrtc_cublaslt_and_reads_no_key(zygote: Zygote) -> None:
    props = torch.cuda.get_device_properties(0)
    folder = Path(tempfile.mkdtemp(prefix="gpupool-daemon-"))
    key = folder / "server.key"
    key.write_text("the daemon's TLS key")
    key.chmod(0o600)
    order = {"probes": ["cuda_work", "read_daemon_files"], "ctx": {"daemon_files": [str(key)]}}
    spec = WorkerSpec(
        session_id=worker_attacks.PREFIX + json.dumps(order), number=1,
        device={"index": 0, "uuid": "GPU-landlock", "model": props.name, "memory_bytes": props.total_memory,
                "fake": False},
        quota=1024 * MiB, max_handles=1000, max_op_flops=0, memory_limit=0, cpu_threads=1,
        user="", seccomp=True,
    )  # fmt: skip
    runner = zygote.spawn(spec, MiB)
    try:
        got = worker_attacks.read_report(runner._sock, 300.0)
        assert got["cuda_work"] == "open: ['conv2d', 'jiterator', 'addmm', 'mem_get_info', 'device_count']", got
        assert got["read_daemon_files"].startswith("blocked"), got
    finally:
        runner.close()
        key.unlink()
        os.rmdir(folder)
