"""A session worker on a real GPU host sees and may open its own GPU only (round 40): CUDA_VISIBLE_DEVICES names its
GPU (server/worker.py `visible_device`), and its Landlock ruleset grants the driver's control files and its own
GPU's device file, not every /dev/nvidia* of the host (server/landlock.py `gpu_devices`); a confined worker's
`--collectives gloo` group never tries NCCL (server/collectives.py `use_nccl`).

No GPU runs here: the driver's files are a tree laid out as the driver lays them out (/dev/nvidia*, the driver's
/proc/driver/nvidia/gpus/<PCI address>/information, a process's /proc/self/fd), which `GpuLayout` points at, and the
ruleset is the kernel's, applied in a child process. tests/integration/test_worker_landlock_cuda.py checks the same
on a real GPU host (bench/real_gpu_tests.txt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from gpupool.server import landlock
from gpupool.server.collectives import use_nccl
from gpupool.server.devices import cuda_uuid
from gpupool.server.worker import WorkerSpec, _see_own_gpu, visible_device

# four GPUs, whose device files' minors are not their PCI order (the driver numbers them as it probes them)
GPUS = [
    ("0000:18:00.0", "GPU-0b5c9a1e-7d3f-4e2a-9c61-1f2e3d4c5b6a", 2),
    ("0000:2a:00.0", "GPU-1c6dab2f-8e40-4f3b-ad72-202f4e5d6c7b", 0),
    ("0000:9a:00.0", "GPU-2d7ebc30-9f51-4a4c-be83-31305f6e7d8c", 3),
    ("0000:ab:00.0", "GPU-3e8fcd41-a062-4b5d-cf94-424160708e9d", 1),
]
CONTROL = ["nvidiactl", "nvidia-uvm"]
HELD_CONTROL = ["nvidia-uvm-tools", "nvidia-modeset"]  # granted only where the worker's CUDA context opened them
OTHERS = ["nvidia-nvswitchctl", "nvidia-nvswitch0"]  # the host's, never a worker's


def driver_tree(root: Path) -> landlock.GpuLayout:
    """/dev's NVIDIA files (plain files standing for the device nodes; a MIG capability file per GPU), the driver's
    /proc folder (its top files, a folder per GPU, the MIG capabilities of each), /sys's PCI devices (the bus's links
    into devices/, each GPU's folder, the NUMA nodes), a descriptor folder (empty: fill with `hold`)."""
    dev = root / "dev"
    (dev / "nvidia-caps").mkdir(parents=True)
    for name in [f"nvidia{minor}" for _pci, _uuid, minor in GPUS] + CONTROL + HELD_CONTROL + OTHERS:
        (dev / name).write_text(name)
    driver = root / "driver"
    (driver / "capabilities" / "mig").mkdir(parents=True)
    (driver / "capabilities" / "mig" / "monitor").write_text("DeviceFileMinor: 2\n")
    for name in ("params", "version", "registry"):
        (driver / name).write_text(f"{name}\n")
    (root / "sys" / "bus" / "pci" / "devices").mkdir(parents=True)
    (root / "sys" / "devices" / "system" / "node" / "node0").mkdir(parents=True)
    (root / "sys" / "devices" / "system" / "node" / "node0" / "cpulist").write_text("0-63\n")
    for pci, uuid, minor in GPUS:
        (dev / "nvidia-caps" / f"nvidia-cap{10 + minor}").write_text("")
        folder = driver / "gpus" / pci
        folder.mkdir(parents=True)
        (folder / "information").write_text(
            f"Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 100\nGPU UUID: \t {uuid}\nVideo BIOS: \t 96.00.99.00.01\n"
            f"Bus Type: \t PCIe\nDMA Size: \t 52 bits\nDMA Mask: \t 0xfffffffffffff\nBus Location: \t {pci}\n"
            f"Device Minor: \t {minor}\nGPU Excluded:\t No\n"
        )
        access = driver / "capabilities" / f"gpu{minor}" / "mig" / "gi1" / "access"
        access.parent.mkdir(parents=True)
        access.write_text(f"DeviceFileMinor: {10 + minor}\n")
        pcifolder = root / "sys" / "devices" / f"pci0000:{pci[5:7]}" / pci
        pcifolder.mkdir(parents=True)
        (pcifolder / "numa_node").write_text("0\n")
        (pcifolder / "config").write_bytes(uuid.encode())
        os.symlink(f"../../../devices/pci0000:{pci[5:7]}/{pci}", root / "sys" / "bus" / "pci" / "devices" / pci)
    (root / "fd").mkdir()
    return landlock.GpuLayout(dev=str(dev), driver=str(driver), fds=str(root / "fd"), sys=str(root / "sys"))


def hold(layout: landlock.GpuLayout, *names: str) -> None:
    for k, name in enumerate(names):
        os.symlink(os.path.join(layout.dev, name), os.path.join(layout.fds, str(10 + k)))


def test_the_minor_of_a_gpu_is_read_from_the_drivers_information_by_uuid_then_pci(tmp_path: Path) -> None:
    layout = driver_tree(tmp_path)
    for pci, uuid, minor in GPUS:
        assert landlock.gpu_minor(uuid, layout=layout) == minor
        assert landlock.gpu_minor(uuid.upper().removeprefix("GPU-"), layout=layout) == minor  # torch's bare form
        assert landlock.gpu_minor("", pci, layout) == minor
    assert landlock.gpu_minor("GPU-cuda0", layout=layout) is None  # the daemon's stand-in, no pci: none
    assert landlock.gpu_minor("GPU-ffffffff-0000-0000-0000-000000000000", "0000:9a:00.0", layout) == 3
    assert landlock.gpu_minor(GPUS[0][1], layout=landlock.GpuLayout(driver=str(tmp_path / "none"))) is None


def test_a_worker_is_granted_the_control_files_and_its_own_gpus_file_only(tmp_path: Path) -> None:
    """nvidiactl and nvidia-uvm, and its own GPU's file; nvidia-uvm-tools (UVM's event queues, for CUDA's tools) and
    nvidia-modeset only where its CUDA context opened them (round 41: on 50464ae wherever the host had them)."""
    layout = driver_tree(tmp_path)
    dev = layout.dev
    for _pci, uuid, minor in GPUS:
        granted, notes = landlock.gpu_devices(uuid, layout=layout)
        assert granted == [os.path.join(dev, n) for n in [*CONTROL, f"nvidia{minor}"]], granted
        assert notes == []
    hold(layout, "nvidia-uvm-tools")
    granted, _ = landlock.gpu_devices(GPUS[1][1], layout=layout)
    assert granted == [os.path.join(dev, n) for n in ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia0"]]
    # a host without nvidia-uvm (its module not loaded): not granted, not missing
    os.unlink(os.path.join(dev, "nvidia-uvm"))
    granted, _ = landlock.gpu_devices(GPUS[1][1], layout=layout)
    assert granted == [os.path.join(dev, n) for n in ["nvidiactl", "nvidia-uvm-tools", "nvidia0"]]


def test_without_the_drivers_word_the_gpu_file_it_holds_is_granted_and_another_held_is_named(tmp_path: Path) -> None:
    layout = driver_tree(tmp_path)
    dev = layout.dev
    hold(layout, "nvidiactl", "nvidia-uvm", "nvidia3")
    assert landlock.held_gpu_nodes(layout) == [os.path.join(dev, "nvidia3")]
    assert landlock.nvidia_files(layout) == [os.path.join(dev, n) for n in ("nvidia-uvm", "nvidia3", "nvidiactl")]
    granted, notes = landlock.gpu_devices("GPU-cuda5", layout=layout)  # a GPU the driver's /proc does not list
    assert granted == [os.path.join(dev, n) for n in [*CONTROL, "nvidia3"]], granted
    assert notes == [f"GPU GPU-cuda5 not in {layout.driver}/gpus: its device file granted: {dev}/nvidia3 (the GPU "
                     "files it holds open)"]  # fmt: skip
    # the worker of GPUS[1] (minor 0) holding minor 3's file from before its ruleset: granted its own, 3 named
    granted, notes = landlock.gpu_devices(GPUS[1][1], layout=layout)
    assert granted[-1] == os.path.join(dev, "nvidia0")
    assert notes == [f"{dev}/nvidia3 open from before the ruleset (not this worker's GPU)"]
    # nothing known, nothing held: no GPU file at all (the worker's CUDA fails rather than reach another GPU)
    os.unlink(os.path.join(layout.fds, "12"))
    granted, notes = landlock.gpu_devices("", layout=layout)
    assert granted == [os.path.join(dev, n) for n in CONTROL] and notes[0].endswith("granted: none"), notes


CHILD = textwrap.dedent(
    """
    import ctypes, json, os, sys
    from gpupool.server import landlock
    root, uuid = sys.argv[1], sys.argv[2]
    layout = landlock.GpuLayout(dev=root + "/dev", driver=root + "/driver", fds=root + "/fd", sys=root + "/sys")
    files = []  # (before: a confined process walks none of it)
    for top in ("dev", "driver", "sys"):
        for folder, dirs, names in os.walk(os.path.join(root, top)):
            files += [os.path.join(folder, n) for n in names]
    links = os.path.join(root, "sys", "bus", "pci", "devices")
    files += [os.path.join(links, pci, "numa_node") for pci in os.listdir(links)]  # through the bus's links
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # no_new_privs, as the sandbox sets before it
    applied, missing = landlock.restrict(network=False, gpu=True, gpu_uuid=uuid, layout=layout)
    got = {"applied": applied, "missing": missing, "opened": [], "refused": []}
    for path in sorted(files):
        name = os.path.relpath(path, root)
        try:  # a device file as CUDA opens one; the rest read
            os.close(os.open(path, os.O_RDWR if os.path.dirname(name) == "dev" else os.O_RDONLY))
            got["opened"].append(name)
        except OSError as exc:
            got["refused"].append(f"{name} {exc.errno}")
    print(json.dumps(got))
    """
)


@pytest.mark.skipif(landlock.abi() < 1, reason="this kernel has no Landlock")
def test_a_confined_worker_opens_its_own_gpus_files_and_not_another_tenants(tmp_path: Path) -> None:
    """The kernel's ruleset, on the modelled tree: of the device files, the control ones and its own GPU's, and of
    /dev/nvidia-caps the capability its CUDA context opened (a MIG instance's); of the driver's /proc its top files,
    its own GPU's folder and capabilities; of /sys its own GPU's PCI folder (directly or through the bus's link) and
    the NUMA nodes. Until round 40 every /dev/nvidia* (the four GPUs', the NVSwitch's) was granted read, write and
    ioctl; until round 41 (on 50464ae) nvidia-uvm-tools, nvidia-modeset, every capability file of /dev/nvidia-caps,
    every GPU's folder of the driver's /proc (UUIDs, PCI addresses, MIG layouts) and all of /sys/devices."""
    layout = driver_tree(tmp_path)
    pci, uuid, minor = GPUS[2]
    hold(layout, "nvidiactl", "nvidia-uvm", f"nvidia{minor}", f"nvidia-caps/nvidia-cap{10 + minor}")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), uuid], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    got = json.loads(out.stdout)
    assert got["applied"][0].startswith("landlock ABI"), got
    bus = f"pci0000:{pci[5:7]}"
    assert got["opened"] == sorted([
        *[f"dev/{name}" for name in [*CONTROL, f"nvidia{minor}", f"nvidia-caps/nvidia-cap{10 + minor}"]],
        "driver/params", "driver/version", "driver/registry", f"driver/gpus/{pci}/information",
        "driver/capabilities/mig/monitor", f"driver/capabilities/gpu{minor}/mig/gi1/access",
        f"sys/devices/{bus}/{pci}/numa_node", f"sys/devices/{bus}/{pci}/config", f"sys/bus/pci/devices/{pci}/numa_node",
        "sys/devices/system/node/node0/cpulist",
    ]), got  # fmt: skip
    refused = [entry.rsplit(" ", 1) for entry in got["refused"]]
    assert {errno for _name, errno in refused} == {"13"}, got  # EACCES
    names = {name for name, _errno in refused}
    for other_pci, _uuid, other in GPUS:
        if other != minor:
            theirs = {f"dev/nvidia{other}", f"dev/nvidia-caps/nvidia-cap{10 + other}",
                      f"driver/gpus/{other_pci}/information", f"driver/capabilities/gpu{other}/mig/gi1/access",
                      f"sys/bus/pci/devices/{other_pci}/numa_node"}  # fmt: skip
            assert theirs <= names, got
    assert {f"dev/{name}" for name in HELD_CONTROL + OTHERS} <= names, got


def test_a_worker_shows_cuda_its_own_gpu_by_uuid_else_by_the_daemons_numbering() -> None:
    uuid = GPUS[0][1]
    assert visible_device({"index": 3, "uuid": uuid}, {}) == uuid
    assert visible_device({"index": 3, "uuid": uuid}, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == uuid
    # the daemon's stand-in for a GPU whose properties named no UUID: its index, through the daemon's own list
    assert visible_device({"index": 1, "uuid": "GPU-cuda1"}, {}) == "1"
    assert visible_device({"index": 1, "uuid": "GPU-cuda1"}, {"CUDA_VISIBLE_DEVICES": "6, 2,3"}) == "2"
    assert visible_device({"index": 0, "uuid": "GPU-cuda0"}, {"CUDA_VISIBLE_DEVICES": f"{uuid},x"}) == uuid
    with pytest.raises(RuntimeError, match="not in the daemon's CUDA_VISIBLE_DEVICES"):
        visible_device({"index": 2, "uuid": "GPU-cuda2"}, {"CUDA_VISIBLE_DEVICES": "0,1"})


def test_a_mig_instance_is_named_as_cuda_visible_devices_takes_it(tmp_path: Path) -> None:
    """CUDA's properties name a MIG instance by its own UUID (cuDeviceGetUuid_v2), which is no GPU's: the daemon
    called it "GPU-<that>", which CUDA_VISIBLE_DEVICES matches to no device, so a worker of a MIG instance saw no GPU
    (fin40; before round 40 it inherited the daemon's list). The driver's information file of the GPU at the
    instance's PCI address names the parent GPU's UUID, another one: it is "MIG-<that>", which CUDA takes and the
    worker passes on; its device file is the parent's (by PCI address). A whole GPU keeps "GPU-"; where the
    driver's folder cannot be read, "GPU-" as before."""
    layout = driver_tree(tmp_path)
    pci, gpu, minor = GPUS[0]
    mig = "5f0e1d2c-3b4a-4958-8776-a5b4c3d2e1f0"
    assert cuda_uuid(mig, pci, layout) == f"MIG-{mig}"
    assert cuda_uuid(gpu[4:], pci, layout) == cuda_uuid(gpu, pci, layout) == gpu
    assert cuda_uuid(gpu[4:].upper(), pci.upper(), layout) == f"GPU-{gpu[4:].upper()}"
    assert cuda_uuid(mig, pci, landlock.GpuLayout(driver=str(tmp_path / "none"))) == f"GPU-{mig}"
    assert cuda_uuid(mig, "", layout) == f"GPU-{mig}"
    assert cuda_uuid(f"MIG-{mig}", "", layout) == f"MIG-{mig}"  # (a prefix already there is kept)
    assert visible_device({"index": 0, "uuid": f"MIG-{mig}"}, {}) == f"MIG-{mig}"
    devices, notes = landlock.gpu_devices(f"MIG-{mig}", pci, layout)
    assert devices[-1] == os.path.join(layout.dev, f"nvidia{minor}") and not notes, (devices, notes)


def _spec(fake: bool, uuid: str) -> WorkerSpec:
    device = {"index": 1, "uuid": uuid, "model": "m", "memory_bytes": 1 << 30, "fake": fake}
    return WorkerSpec("s", 1, device, 1 << 30, 1000, 0, 0, 1, "", False)


def test_a_real_gpus_worker_narrows_cuda_before_it_starts_and_a_fake_gpus_is_left_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    assert _see_own_gpu(_spec(True, GPUS[0][1])) == -1
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    assert _see_own_gpu(_spec(False, GPUS[3][1])) == 0  # cuda:0 in the worker, whatever the host's number
    assert os.environ["CUDA_VISIBLE_DEVICES"] == GPUS[3][1]
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ  # NVML would open every GPU's file


def test_a_confined_workers_gloo_group_never_tries_nccl() -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert not use_nccl(cuda, confined=True)
    assert use_nccl(cuda, confined=False)  # --landlock off --seccomp off: as before round 40
    assert not use_nccl(cpu, confined=False)
