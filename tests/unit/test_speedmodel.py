"""The fake-GPU speed model: modelled op and collective times from FLOPs, bytes and declared peaks."""

from __future__ import annotations

import time

import pytest
import torch
from gpupool.server.speedmodel import LAUNCH_SECONDS, SpeedModel


def test_matmul_time_is_its_flops_at_the_declared_peak() -> None:
    a, b = torch.ones(64, 128), torch.ones(128, 32)
    out = torch.ops.aten.mm.default(a, b)
    model = SpeedModel(tflops=1e-6)  # 1 MFLOP/s
    assert model.op_seconds(torch.ops.aten.mm.default, [a, b], {}, out) == pytest.approx(
        LAUNCH_SECONDS + 2 * 64 * 128 * 32 / 1e6
    )


def test_memory_bound_op_time_is_its_bytes_at_the_declared_bandwidth() -> None:
    x = torch.ones(1000)
    out = torch.ops.aten.add.Tensor(x, x)
    model = SpeedModel(tflops=1.0, gbps=1e-6)  # 1000 bytes/s
    assert model.op_seconds(torch.ops.aten.add.Tensor, [x, x], {}, out) == pytest.approx(LAUNCH_SECONDS + 12.0)


def test_hold_waits_for_the_modelled_time_and_the_link_for_the_ring() -> None:
    model = SpeedModel(tflops=1e-9, link_gbps=1e-6)  # 1 kFLOP/s; 1000 bytes/s
    a = torch.ones(1, 10)
    b = torch.ones(10, 10)
    out = torch.ops.aten.mm.default(a, b)  # 200 FLOPs -> 0.2 s
    start = time.perf_counter()
    model.hold_op(torch.ops.aten.mm.default, [a, b], {}, out, start)
    assert time.perf_counter() - start >= 0.2
    start = time.perf_counter()
    model.hold_collective("allreduce", 100, 2, start)  # 2 * 1/2 * 100 bytes at 1000 bytes/s
    assert time.perf_counter() - start >= 0.1
    assert not SpeedModel().active
