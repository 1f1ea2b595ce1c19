"""A real GPU's worker under Landlock (server/landlock.py): what CUDA loads lazily once the worker is confined still
loads (its libraries' folders are read from /proc/self/maps after its CUDA context exists), and the daemon's key
stays out of reach; (round 40) it sees its own GPU alone (CUDA_VISIBLE_DEVICES, cuda:0) and may open no other GPU's
device file, and the zygote holds none open for workers to inherit. Needs a CUDA device (bench/real_gpu_tests.txt);
not checked before round 39's next device run. The other GPUs' files are refused only where the host has several
GPUs; on one GPU the own file's grant, the count and the held files are checked (tests/unit/test_gpu_isolation.py
checks the refusal on a modelled driver tree)."""

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
from gpupool.server import landlock
from gpupool.server.devices import CudaDevice
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


def _gpu_spec(index: int, order: dict[str, object]) -> WorkerSpec:
    """The spec the daemon gives a session worker of GPU `index` (server/daemon.py `_new_runner`)."""
    d = CudaDevice(index)
    device = {"index": index, "uuid": d.uuid, "model": d.model, "memory_bytes": d.capacity, "fake": False}
    return WorkerSpec(session_id=worker_attacks.PREFIX + json.dumps(order), number=1, device=device,
                      quota=1024 * MiB, max_handles=1000, max_op_flops=0, memory_limit=0, cpu_threads=1, user="",
                      seccomp=True)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_each_gpus_worker_sees_and_opens_its_own_gpu_only(zygote: Zygote) -> None:
    """Every GPU of the host, one worker each: CUDA_VISIBLE_DEVICES is its GPU's UUID, CUDA counts one device (a
    session's lease device: the shim's cuda:0), and it is that GPU; of the host's /dev/nvidiaN it holds and opens its
    own only. Until round 40 it saw every GPU and Landlock granted every /dev/nvidia*. (Round 41) Of the driver's
    /proc/driver/nvidia/gpus and of /sys/bus/pci/devices it reads its own GPU's folder only, and it opens no MIG
    capability file of /dev/nvidia-caps (a whole GPU's context opens none); until round 41 every GPU's and all."""
    pcis = sorted(os.listdir("/proc/driver/nvidia/gpus"))
    caps = sorted(os.listdir("/dev/nvidia-caps")) if os.path.isdir("/dev/nvidia-caps") else []
    for index in range(torch.cuda.device_count()):
        uuid = CudaDevice(index).uuid
        minor = landlock.gpu_minor(uuid)
        assert minor is not None, f"GPU {index} ({uuid}) not in /proc/driver/nvidia/gpus"
        own = f"/dev/nvidia{minor}"
        others = sorted(f"/dev/nvidia{m}" for m in range(256) if m != minor and os.path.exists(f"/dev/nvidia{m}"))
        ctx = {"gpu_pcis": pcis, "caps": caps}
        runner = zygote.spawn(_gpu_spec(index, {"probes": ["gpu_isolation"], "ctx": ctx}), MiB)
        try:
            got = worker_attacks.read_report(runner._sock, 300.0)["gpu_isolation"]
        finally:
            runner.close()
        assert got.startswith("report: "), got
        report = json.loads(got[len("report: ") :])
        assert report["visible"] == uuid, report
        assert report["device_count"] == 1, report
        assert landlock.gpu_minor(report["uuid"]) == minor, report  # its cuda:0 is its own GPU
        assert [p for p in report["held"] if p in others] == [], report  # no other GPU's file from before
        assert report["opened"] == [own], report
        assert report["refused"] == [f"{p} EACCES" for p in others], report
        own_pci = landlock.own_gpu(uuid)[0]  # type: ignore[index]
        assert report["driver_read"] == report["sys_read"] == [own_pci], report
        assert report["caps_opened"] == [], report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_zygote_holds_no_nvidia_file_for_its_workers_to_inherit(zygote: Zygote) -> None:
    """NVML (torch's device count under the zygote's PYTORCH_NVML_BASED_CUDA_CHECK) opens every GPU's file and keeps
    it open; the zygote shuts it down before it forks (server/zygote.py `_release_nvml`), and says what it holds."""
    held = landlock.nvidia_files(landlock.GpuLayout(fds=f"/proc/{zygote.pid}/fd"))
    assert held == [], held
