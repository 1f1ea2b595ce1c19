"""The compute an op will cost, from its inputs' shapes, refused past a bound before it runs.

Expanded views are free to make (a few bytes of real memory), and a per-input element cap (guards.check_inputs)
keeps elementwise work linear in the quota; but contractions multiply sizes: a matmul of two expanded
32768 x 32768 views is 7e13 multiply-adds, hours on a CPU-backed device, and a worker cannot be pre-empted
inside a kernel. So ops whose work grows faster than their inputs are estimated here (output elements times
contraction length) and refused when the estimate passes the device's bound (`--max-op-flops`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from gpupool.errors import ResourceExhausted

Args = Sequence[Any]
Kwargs = Mapping[str, Any]

FAKE_GPU_FLOPS = 10**12  # about a minute of one CPU core at worst
REAL_GPU_FLOPS = 10**15  # about a second of a current GPU


def _t(args: Args, i: int) -> torch.Tensor | None:
    v = args[i] if len(args) > i else None
    return v if isinstance(v, torch.Tensor) else None


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _mm(a_at: int, b_at: int) -> Callable[[Args, Kwargs], int]:
    """(..., n, k) @ (..., k, m): broadcast batch x n x m x k multiply-adds."""

    def cost(args: Args, kwargs: Kwargs) -> int:
        a, b = _t(args, a_at), _t(args, b_at)
        if a is None or b is None or a.dim() == 0 or b.dim() == 0:
            return 0
        k = a.shape[-1]
        n = a.shape[-2] if a.dim() > 1 else 1
        m = b.shape[-1] if b.dim() > 1 else 1
        try:
            batch = _numel(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
        except RuntimeError:
            batch = max(_numel(a.shape[:-2]), _numel(b.shape[:-2]))
        return batch * n * m * k

    return cost


def _conv(args: Args, kwargs: Kwargs) -> int:
    """Output elements (at most input positions x out channels) x in channels per group x kernel size."""
    x, w = _t(args, 0), _t(args, 1)
    if x is None or w is None or w.dim() < 2:
        return 0
    positions = _numel(x.shape[2:]) * (x.shape[0] if x.dim() > 2 else 1)
    return positions * _numel(w.shape)  # w: out x in/groups x kernel


def _cdist(args: Args, kwargs: Kwargs) -> int:
    a, b = _t(args, 0), _t(args, 1)
    if a is None or b is None or a.dim() < 2 or b.dim() < 2:
        return 0
    return _numel(a.shape[:-1]) * b.shape[-2] * a.shape[-1]


def _attention(args: Args, kwargs: Kwargs) -> int:
    q, k = _t(args, 0), _t(args, 1)
    if q is None or k is None or q.dim() < 2 or k.dim() < 2:
        return 0
    return 2 * _numel(q.shape[:-1]) * k.shape[-2] * q.shape[-1]


_COSTS: dict[str, Callable[[Args, Kwargs], int]] = {
    "aten::mm": _mm(0, 1),
    "aten::bmm": _mm(0, 1),
    "aten::matmul": _mm(0, 1),
    "aten::addmm": _mm(1, 2),
    "aten::_addmm_activation": _mm(1, 2),
    "aten::baddbmm": _mm(1, 2),
    "aten::addbmm": _mm(1, 2),
    "aten::convolution": _conv,
    "aten::_convolution": _conv,
    "aten::conv1d": _conv,
    "aten::conv2d": _conv,
    "aten::conv3d": _conv,
    "aten::convolution_backward": lambda a, k: 2 * _conv(a[1:], k),  # (grad_output, input, weight, ...)
    "aten::cdist": _cdist,
    "aten::_cdist_forward": _cdist,
    "aten::_scaled_dot_product_flash_attention_for_cpu": _attention,
    "aten::_scaled_dot_product_attention_math": _attention,
    "aten::scaled_dot_product_attention": _attention,
}


def estimate(op: torch._ops.OpOverload, args: Args, kwargs: Kwargs) -> int:
    """Multiply-adds the op will do (0 for ops whose work is linear in their inputs, bounded elsewhere)."""
    cost = _COSTS.get(op._schema.name)
    if cost is None:
        return 0
    try:
        return int(cost(args, kwargs))
    except (AttributeError, IndexError, TypeError, ValueError):
        return 0  # arguments that do not fit the schema fail in the op itself


def check(op: torch._ops.OpOverload, args: Args, kwargs: Kwargs, limit: int) -> None:
    n = estimate(op, args, kwargs)
    if n > limit:
        raise ResourceExhausted(
            f"{op._schema.name} would do about {n:.3g} multiply-adds (expanded views?), more than the {limit:.3g} "
            "one op may take on this device"
        )
