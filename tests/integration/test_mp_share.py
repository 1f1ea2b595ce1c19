"""client/mp_share.py in-process on the Python client: torch.multiprocessing's pickler refuses a gpupool tensor with
one RuntimeError that says why (a hogwild model sent to spawned processes; test_cuda_scripts.py runs the script on
both clients), and still shares CPU tensors as before."""

from __future__ import annotations

import io
from multiprocessing.reduction import ForkingPickler

import pytest
import torch


def test_a_device_tensor_or_parameter_is_refused_and_a_cpu_tensor_still_shared(dev: torch.device) -> None:
    for value in (torch.ones(3, device=dev), torch.nn.Linear(2, 2).to(dev).weight, torch.ones(4, device=dev)[1:]):
        with pytest.raises(RuntimeError, match=rf"a tensor on {dev} cannot be sent to another process .* CUDA IPC"):
            ForkingPickler(io.BytesIO()).dump(value)
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(torch.ones(3))  # POSIX shared memory, as torch does
    assert buffer.getvalue()
