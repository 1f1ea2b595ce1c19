"""quota55: a real GPU's free memory measured through NVML in the daemon's front (server/nvml.py), which holds no CUDA
context under `--isolation process`; until 0c688a96 such a GPU was unmeasured (the scheduler's books alone). This host
has no NVIDIA driver: the library's absence is the real one, and the calls, the memory record's layout and the choice
of a device run against a stand-in library compiled here (tests/unit/nvml_stub.c, NVML's five calls and error codes).
The NVML path of a real GPU never ran here."""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpupool.server import devices, nvml

GiB = 1024**3
LOGGER = "gpupool.server.nvml"
INITS, SHUTDOWNS, BY_UUID, BY_PCI, MEMORY = range(5)


@pytest.fixture(scope="module")
def stub_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    if not shutil.which("cc"):
        pytest.skip("no C compiler for the stand-in NVML")
    out = tmp_path_factory.mktemp("nvml") / "libnvml_stub.so"
    source = Path(__file__).with_name("nvml_stub.c")
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(out), str(source)], check=True, timeout=120)
    return str(out)


@pytest.fixture
def stub(stub_path: str) -> Iterator[ctypes.CDLL]:
    """The stand-in (one copy in this process: the Nvml under test loads the same), emptied, nvmlInit succeeding."""
    lib = ctypes.CDLL(stub_path)
    lib.stub_add.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_ulonglong, ctypes.c_int)
    lib.stub_reset(0)
    yield lib
    lib.stub_reset(0)


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_no_libnvidia_ml_is_unmeasured_in_one_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    """No NVIDIA driver on the host (this one's: libnvidia-ml.so.1 cannot be loaded): None, the books decide; one
    debug line however often a heartbeat asks, no exception."""
    try:
        ctypes.CDLL(nvml.LIBRARY)
        name = "libnvidia-ml-quota55-absent.so.1"  # (a host with a driver: a name no host has)
    except OSError:
        name = nvml.LIBRARY
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    meter = nvml.Nvml(name)
    assert [meter.free_memory("GPU-0a1b", "0000:18:00.0") for _ in range(3)] == [None, None, None]
    (line,) = _lines(caplog)
    assert line.startswith(f"GPU free memory not measured by NVML: {name}: ") and not meter.started, line


def test_a_gpu_is_found_by_its_uuid_else_a_whole_gpu_by_its_pci_address(
    stub: ctypes.CDLL, stub_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The driver's free bytes (nvmlMemory_t's second field; past 32 bits) of the device CUDA_VISIBLE_DEVICES names
    (its UUID), else of the GPU at its PCI address (a GPU torch gave no UUID: "GPU-cuda1"), never the GPU of a MIG
    instance NVML does not know (its address is its GPU's: that memory is not the instance's). A device NVML does
    not find, or whose memory it cannot read (a GPU lost), is unmeasured, one debug line each however often asked;
    NVML is started once and each device's handle found once, its memory read at every ask."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    stub.stub_add(b"GPU-aaaa", b"0000:18:00.0", 80 * GiB, 64 * GiB + 12345, 0)
    stub.stub_add(b"GPU-bbbb", b"0000:3b:00.0", 80 * GiB, 5 * GiB + 1, 0)
    stub.stub_add(b"GPU-dddd", b"0000:86:00.0", 80 * GiB, GiB, 15)
    meter = nvml.Nvml(stub_path)
    for _ in range(2):
        assert meter.free_memory("GPU-aaaa", "0000:18:00.0") == 64 * GiB + 12345
        assert meter.free_memory("GPU-cuda1", "0000:3B:00.0") == 5 * GiB + 1  # (by its address)
        assert meter.free_memory("MIG-cccc", "0000:18:00.0") is None  # (not GPU-aaaa's)
        assert meter.free_memory("GPU-eeee", "") is None
        assert meter.free_memory("GPU-dddd", "0000:86:00.0") is None
    counts = [stub.stub_count(i) for i in range(5)]
    assert counts == [1, 0, 5, 1, 6] and meter.started, counts  # (by UUID 5 devices, by PCI GPU-cuda1; 3 x 2 reads)
    assert _lines(caplog) == [
        "free memory of GPU MIG-cccc (0000:18:00.0) not measured by NVML: no GPU of this UUID: Not Found (6)",
        "free memory of GPU GPU-eeee (?) not measured by NVML: no GPU of this UUID: Not Found (6)",
        "free memory of GPU GPU-dddd (0000:86:00.0) not measured by NVML: nvmlDeviceGetMemoryInfo: GPU is lost (15)",
    ]


def test_nvml_that_does_not_start_is_asked_once_and_a_forbidden_one_never(
    stub: ctypes.CDLL, stub_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """nvmlInit failing (a library without its driver loaded): unmeasured, one line, not retried every heartbeat.
    `forbid` (the zygote's, before it forks any worker: NVML's open files of every GPU would be tenant code's) shuts
    down an NVML started and never starts one again."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    stub.stub_reset(9)
    stub.stub_add(b"GPU-aaaa", b"0000:18:00.0", 80 * GiB, 64 * GiB, 0)
    meter = nvml.Nvml(stub_path)
    assert [meter.free_memory("GPU-aaaa") for _ in range(2)] == [None, None]
    assert stub.stub_count(INITS) == 1 and stub.stub_count(BY_UUID) == 0
    assert _lines(caplog) == ["GPU free memory not measured by NVML: nvmlInit: Driver Not Loaded (9)"]
    stub.stub_reset(0)
    stub.stub_add(b"GPU-aaaa", b"0000:18:00.0", 80 * GiB, 64 * GiB, 0)
    started = nvml.Nvml(stub_path)
    assert started.free_memory("GPU-aaaa") == 64 * GiB
    started.forbid()
    forbidden = nvml.Nvml(stub_path)
    forbidden.forbid()
    assert started.free_memory("GPU-aaaa") is None and forbidden.free_memory("GPU-aaaa") is None
    assert [stub.stub_count(i) for i in (INITS, SHUTDOWNS, MEMORY)] == [1, 1, 1]


def test_a_cuda_device_without_a_context_of_its_own_asks_nvml(
    stub: ctypes.CDLL, stub_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`CudaDevice.measured_free` under `--isolation process` (the daemon's heartbeat: `own_context` False) is the
    front's NVML's count of the device's UUID and PCI address; 0c688a96 answered None (unmeasured). (No CUDA here: the
    device is made without its constructor, which asks torch for its properties.)"""
    stub.stub_add(b"GPU-aaaa", b"0000:18:00.0", 80 * GiB, 7 * GiB, 0)
    monkeypatch.setattr(nvml, "NVML", nvml.Nvml(stub_path))
    dev = devices.CudaDevice.__new__(devices.CudaDevice)
    dev.index, dev.uuid, dev.pci = 0, "GPU-aaaa", "0000:18:00.0"
    assert dev.measured_free(3 * GiB, own_context=False) == 7 * GiB
    dev.uuid, dev.pci = "GPU-ffff", ""
    assert dev.measured_free(0, own_context=False) is None
