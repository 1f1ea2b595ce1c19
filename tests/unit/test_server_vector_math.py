"""The zygote sets MKL's vector math functions up before it forks any session worker (server/executor.py
`warm_vector_math`, called by `CommandExecutor.warm_up`): their first call in a process is not safe on several
threads at once, and a fresh worker's first parallel `sqrt` (an Adam state of 3200 elements, two OpenMP threads) gave
the second thread's half ~3e-4 off now and then (round 21's flaky bit-for-bit encoder test)."""

from __future__ import annotations

from typing import Any

import torch
from gpupool.server import executor
from gpupool.server.executor import VECTOR_MATH_OPS, CommandExecutor, warm_vector_math
from gpupool.server.slices import SliceLedger
from torch.utils._python_dispatch import TorchDispatchMode


class _Calls(TorchDispatchMode):
    """Every CPU op called under it: (op name, dtype, numel of its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, torch.dtype, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.device.type == "cpu":
            self.calls.append((func._schema.name.removeprefix("aten::"), x.dtype, x.numel()))
        return func(*args, **(kwargs or {}))


def _warmed(calls: list[tuple[str, torch.dtype, int]]) -> set[tuple[str, torch.dtype]]:
    # one element: below ATen's grain (2048) for these kernels, so the call runs on this thread only
    return {(name, dtype) for name, dtype, numel in calls if numel == 1}


def test_each_vector_math_function_is_called_once_per_dtype_on_one_thread() -> None:
    with _Calls() as mode:
        warm_vector_math()
    # ATen's `IMPLEMENT_VML_MKL` list (aten/src/ATen/cpu/vml.h), the functions MKL's vector math library runs
    aten_vml = set("acos asin atan cos erf erfc erfinv exp log log1p sin sqrt tan tanh".split())
    assert aten_vml <= set(VECTOR_MATH_OPS)
    want = {(name, dtype) for name in VECTOR_MATH_OPS for dtype in (torch.float32, torch.float64)}
    assert want <= _warmed(mode.calls), sorted(map(str, want - _warmed(mode.calls)))
    assert "sqrt" in VECTOR_MATH_OPS  # the one the flaky test's optimizer hit (`_foreach_sqrt` of Adam's states)


def test_the_executor_warm_up_the_zygote_runs_before_forking_sets_them_up(monkeypatch: Any) -> None:
    called: list[bool] = []
    real = executor.warm_vector_math
    monkeypatch.setattr(executor, "warm_vector_math", lambda: (called.append(True), real())[1])
    with _Calls() as mode:
        CommandExecutor(SliceLedger()).warm_up()
    assert called == [True]
    assert ("sqrt", torch.float32) in _warmed(mode.calls)
