"""The pure parts of `--cuda` (client/cuda): which device arguments map where, and that the torch
entry point does nothing unless $GPUPOOL_CUDA asks for it (a process-wide switch, so checked in a child)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from gpupool.client.cuda import devices, requested

import gpupool.torch  # noqa: F401 - registers the device type the mapping targets

GP = "gpupool"


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("cuda", torch.device(GP)),
        ("cuda:1", torch.device(GP, 1)),
        (torch.device("cuda"), torch.device(GP)),
        (torch.device("cuda", 2), torch.device(GP, 2)),
        (0, torch.device(GP, 0)),
        (3, torch.device(GP, 3)),
        ("cpu", "cpu"),
        (torch.device("cpu"), torch.device("cpu")),
        ("cudax", "cudax"),
        (True, True),
        (None, None),
    ],
)
def test_to_gpupool(given: object, want: object) -> None:
    assert devices.to_gpupool(given) == want


def test_map_location_keeps_strings_strings_and_maps_dicts() -> None:
    assert devices.map_location("cuda:0") == "gpupool:0"
    assert devices.map_location(torch.device("cuda", 1)) == torch.device(GP, 1)
    assert devices.map_location({"cuda:0": "cuda:1", "cpu": "cpu"}) == {"cuda:0": "gpupool:1", "cpu": "cpu"}
    assert devices.map_location("cpu") == "cpu"
    fn = lambda storage, loc: storage  # noqa: E731
    assert devices.map_location(fn) is fn


@pytest.mark.parametrize(("value", "on"), [("", False), ("0", False), ("false", False), ("1", True), ("yes", True)])
def test_requested_reads_gpupool_cuda(monkeypatch: pytest.MonkeyPatch, value: str, on: bool) -> None:
    monkeypatch.setenv("GPUPOOL_CUDA", value)
    assert requested() is on


CHILD = """
import torch
from gpupool.client import cuda
print(cuda.enabled(), torch.cuda.is_available(), torch._C._get_privateuse1_backend_name())
"""


def run_child(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "GPUPOOL_CUDA"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, env={**base, **env}
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_autoload_at_import_torch_only_with_gpupool_cuda() -> None:
    assert run_child() == "False False privateuseone"
    assert run_child(GPUPOOL_CUDA="1") == "True True gpupool"  # no scheduler is asked until a tensor moves
    assert run_child(GPUPOOL_CUDA="1", TORCH_DEVICE_BACKEND_AUTOLOAD="0") == "False False privateuseone"


def test_pin_memory_works_with_gpupool_registered_and_without_cuda() -> None:
    """torch's own kernel raises NotImplementedError for the PrivateUse1 backend, breaking DataLoaders."""
    assert torch._C._get_privateuse1_backend_name() == GP and not requested()
    x = torch.arange(6.0)
    pinned = x.pin_memory()
    assert torch.equal(pinned, x) and pinned.data_ptr() != x.data_ptr()
    data = torch.utils.data.TensorDataset(torch.arange(6.0))
    batches = list(torch.utils.data.DataLoader(data, batch_size=4, pin_memory=True))
    assert [b[0].tolist() for b in batches] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0]]


def test_a_torchrun_rank_maps_cuda_numbers_of_the_lease_onto_its_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank LOCAL_RANK=1 of a 2-device lease sees its own device as gpupool:0 (client/torch/api.py), so the
    script's cuda:1 / model.to(1) / DDP device_ids=[1] must be gpupool:0 there, and cuda:0 the other device."""
    from gpupool.client.cuda import nccl

    monkeypatch.setattr(devices, "_SHIFT", [(1, 2)])
    assert devices.to_gpupool(1) == devices.to_gpupool("cuda:1") == torch.device(GP, 0)
    assert devices.to_gpupool(torch.device("cuda", 0)) == torch.device(GP, 1)
    assert devices.to_gpupool("cuda") == torch.device(GP)  # the current device (set_device(local_rank) -> 0)
    assert [devices.cuda_index(i) for i in (0, 1)] == [1, 0] and devices.pool_index(5) == 5  # out of range: as is
    parsed = devices._parse_to(torch._C._nn._parse_to, (1,), {})  # Module.to(local_rank)
    assert parsed[0] == torch.device(GP, 0)
    assert devices._parse_to(torch._C._nn._parse_to, (), {"device": "cuda:0"})[0] == torch.device(GP, 1)
    assert [nccl._ddp_index(d) for d in (1, torch.device("cuda", 1), "cuda:0", None)] == [0, 0, 1, None]
    monkeypatch.setattr(devices, "_SHIFT", [(0, 2)])  # one process holding the whole lease: numbers as they are
    assert devices.to_gpupool(1) == torch.device(GP, 1) and devices.cuda_index(1) == 1


@pytest.mark.parametrize(("asked", "ok"), [("nccl", True), ("NCCL", True), ("cuda:nccl", True),
                                           ("cpu:gloo,cuda:nccl", False), ("cuda:nccl,cpu:gloo", False)])  # fmt: skip
def test_nccl_backend_strings(asked: str, ok: bool) -> None:
    from gpupool.client.cuda import nccl

    if ok:
        assert nccl._translate(asked) == "gpupool"
    else:
        with pytest.raises(RuntimeError, match="not available on a pooled GPU"):
            nccl._translate(asked)


DIST_CHILD = """
import datetime, sys
import torch, torch.distributed as dist
from torch.distributed import TCPStore
assert dist.is_nccl_available()
store = TCPStore("127.0.0.1", 0, 1, True)
try:
    dist.init_process_group("cpu:gloo,cuda:nccl", store=store, rank=0, world_size=1)
except RuntimeError as exc:
    assert "'cpu:gloo,cuda:nccl' is not available on a pooled GPU" in str(exc), exc
else:
    raise AssertionError("mixed nccl string accepted")
dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=20))
assert dist.get_backend() == "gloo"
t = torch.ones(3)
dist.all_reduce(t)
print("ok", t.tolist())
"""


def test_under_cuda_gloo_still_works_and_mixed_nccl_strings_are_refused() -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("GPUPOOL_LEASE",)}
    env = {**base, "GPUPOOL_CUDA": "1"}
    done = subprocess.run([sys.executable, "-c", DIST_CHILD], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok [1.0, 1.0, 1.0]"
