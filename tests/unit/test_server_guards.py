"""The fused optimizers' guard (server/guards.py `_fused_optimizer`) in-process: what torch's own optimizers send
passes (every fused optimizer, channels_last weights, amsgrad, SGD without momentum, a tensor lr), and lists that
torch's CPU kernels would walk out of bounds are refused before the kernel runs. (Through a daemon:
tests/integration/test_daemon_abuse.py.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.server import guards
from gpupool.server.cost import FAKE_GPU_FLOPS
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gpupool.errors import InvalidArgument


class _Guarded(TorchDispatchMode):
    """Runs the daemon's guard on every fused optimizer call torch makes, before the kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if "_fused_" in func.name():
            guards.validate(func, list(args), dict(kwargs), FAKE_GPU_FLOPS)
            self.seen.append(str(func))
        return func(*args, **kwargs)


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.1, fused=True, amsgrad=True),
    "adamw-tensor-lr": lambda p: torch.optim.AdamW(p, lr=torch.tensor(0.1), fused=True),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, fused=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, fused=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_what_torch_optimizers_send_passes(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model[0].to(memory_format=torch.channels_last)
    opt = OPTIMIZERS[name](model.parameters())
    mode = _Guarded()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).sum().backward()
        with mode:
            opt.step()
    assert len(mode.seen) == 2, mode.seen


def _adam_args(p: Any = None, g: Any = None, steps: Any = None, **kw: Any) -> tuple[list[Any], dict[str, Any]]:
    n = 1000
    p = torch.zeros(n) if p is None else p
    g = torch.ones(n) if g is None else g
    args = [[p], [g], [torch.zeros(n)], [torch.zeros(n)], [], steps or [torch.tensor(1.0)]]
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False, **kw)
    return args, kwargs


@pytest.mark.parametrize(
    "case, match",
    [
        (_adam_args(p=torch.zeros(1).expand(1000)), "must be dense"),  # the kernel wrote 999 floats past it
        (_adam_args(g=torch.ones(1)), "must match its parameter"),  # read 999 floats past the grad
        (_adam_args(g=torch.ones(2000)[::2]), "must match its parameter"),  # strides the kernel does not follow
        (_adam_args(g=torch.ones(1000, dtype=torch.float64)), "must match its parameter"),
        (_adam_args(steps=[torch.tensor(1.0), torch.tensor(1.0)]), "2 tensors for 1 parameters"),
        (_adam_args(steps=[torch.zeros(0)]), "one number"),
        (_adam_args(found_inf=torch.zeros(0)), "found_inf must be one number"),  # read from an empty tensor
        (_adam_args(p=torch.zeros(1000, dtype=torch.int64), g=torch.ones(1000, dtype=torch.int64)), "floating"),
    ],
)
def test_lists_the_kernel_would_walk_out_of_bounds_are_refused(case: Any, match: str) -> None:
    args, kwargs = case
    with pytest.raises(InvalidArgument, match=match):
        guards.validate(torch.ops.aten._fused_adam_.default, args, kwargs, FAKE_GPU_FLOPS)


@pytest.mark.parametrize(
    "op",
    [
        torch.ops.aten._fused_adam.default,
        torch.ops.aten._fused_adam.out,
        torch.ops.aten._fused_adamw.default,
        torch.ops.aten._fused_adamw.tensor_lr_out,
    ],
    ids=str,
)
def test_the_functional_and_out_forms_are_guarded_as_the_in_place_one(op: Any) -> None:
    """`_fused_adam` (no underscore) runs the in-place kernel on clones of the lists it writes: a one-element grad
    was read 999 floats past its storage (the worker's heap came back in exp_avg)."""
    args, kwargs = _adam_args(g=torch.ones(1))
    if "tensor_lr" in str(op):
        kwargs["lr"] = torch.tensor(0.1)
    if str(op).endswith("out"):
        kwargs["out"] = [torch.zeros(1000)]
    with pytest.raises(InvalidArgument, match="must match its parameter"):
        guards.validate(op, args, kwargs, FAKE_GPU_FLOPS)
    args, _ = _adam_args()
    guards.validate(op, args, kwargs, FAKE_GPU_FLOPS)  # honest lists pass
    if str(op).endswith("out"):
        kwargs["out"] = [torch.zeros(1)]
        with pytest.raises(InvalidArgument, match="out\\[0\\]"):
            guards.validate(op, args, kwargs, FAKE_GPU_FLOPS)


def test_a_tensor_lr_must_be_one_number() -> None:
    args, kwargs = _adam_args()
    kwargs["lr"] = torch.zeros(3)
    with pytest.raises(InvalidArgument, match="lr must be one number"):
        guards.validate(torch.ops.aten._fused_adam_.tensor_lr, args, kwargs, FAKE_GPU_FLOPS)
    kwargs["lr"] = torch.tensor(0.1)
    guards.validate(torch.ops.aten._fused_adam_.tensor_lr, args, kwargs, FAKE_GPU_FLOPS)
