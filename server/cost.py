"""The compute an op will cost, from its inputs' shapes, refused past a bound before it runs.

Expanded views are free to make (a few bytes of real memory), and a per-input element cap (guards.check_inputs)
keeps elementwise work linear in the quota; but contractions multiply sizes: a matmul of two expanded
32768 x 32768 views is 7e13 multiply-adds, hours on a CPU-backed device, and a worker cannot be pre-empted
inside a kernel. So ops whose work grows faster than their inputs are estimated here (output elements times
contraction length) and refused when the estimate passes the device's bound (`--max-op-flops`). Not only
contractions: a sliding-window pool reads its whole window per output position (a window as large as an
expanded input, at stride 1: input x window reads), dense linear algebra is cubic in the matrix side, pairwise
distances and the multilabel margin loss are quadratic (round 17 estimated only the contractions: a max pool held
a fake GPU for days). Ops whose work a *value* decides (a polynomial's degree) are guards.py's `_LOOPS`.

An integer argument can decide both: `mvlgamma(x, p)` evaluates p lgammas per element through a temporary of p
values per element (torch's kernel broadcasts an arange of p against x), memory the sizer (outputs only) never
sees. Its work is estimated here, and its temporary (`temporary`) is admitted against the quota with its output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from gpupool.errors import ResourceExhausted

from . import attention
from .opargs import arg

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


def _ints(value: Any, dims: int, default: int) -> list[int]:
    """An int[N] argument as N ints (one int stands for all; empty: `default`)."""
    if value is None:
        return [default] * dims
    if isinstance(value, int):
        return [value] * dims
    values = [int(v) for v in value]
    if not values:
        return [default] * dims
    return values * dims if len(values) == 1 else values


def _pool(dims: int, stride_at: int, padding_at: int) -> Callable[[Args, Kwargs], int]:
    """A sliding-window pool (self, kernel_size, stride, padding, ...): every output position reads the whole
    window, so a window as large as the input at stride 1 is input x window reads (the input may be an expanded
    view, the output far smaller than either): output positions (at most (size + 2 * padding - window) / stride
    + 2 per dimension) x window elements."""

    def cost(args: Args, kwargs: Kwargs) -> int:
        x = _t(args, 0)
        if x is None or x.dim() < dims:
            return 0
        kernel = _ints(arg(args, kwargs, 1, "kernel_size"), dims, 1)
        stride = _ints(arg(args, kwargs, stride_at, "stride"), dims, 0)
        stride = [s if s > 0 else k for s, k in zip(stride, kernel, strict=False)]
        padding = _ints(arg(args, kwargs, padding_at, "padding"), dims, 0)
        sizes = x.shape[-dims:]
        positions = _numel(x.shape[:-dims])
        for size, k, s, pad in zip(sizes, kernel, stride, padding, strict=False):
            positions *= max(1, (size + 2 * max(pad, 0) - k) // max(s, 1) + 2)  # + 1, + 1 more for ceil_mode
        return positions * _numel(kernel)

    return cost


def _fractional_pool(dims: int) -> Callable[[Args, Kwargs], int]:
    """(self, kernel_size, output_size, random_samples): output positions x window elements."""

    def cost(args: Args, kwargs: Kwargs) -> int:
        x = _t(args, 0)
        if x is None or x.dim() < dims:
            return 0
        kernel = _ints(arg(args, kwargs, 1, "kernel_size"), dims, 1)
        out = _ints(arg(args, kwargs, 2, "output_size"), dims, 1)
        return _numel(x.shape[:-dims]) * _numel(out) * _numel(kernel)

    return cost


def _pool_backward(dims: int) -> Callable[[Args, Kwargs], int]:
    """An average pool's backward (grad_output, self, kernel_size, ...): each gradient element spreads over its
    window."""

    def cost(args: Args, kwargs: Kwargs) -> int:
        grad = _t(args, 0)
        if grad is None:
            return 0
        return grad.numel() * _numel(_ints(arg(args, kwargs, 2, "kernel_size"), dims, 1))

    return cost


def _matrix(t: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, rows, columns) of a (batch of) matrix; (0, 0, 0) for anything else."""
    if t is None or t.dim() < 2:
        return 0, 0, 0
    return _numel(t.shape[:-2]), int(t.shape[-2]), int(t.shape[-1])


def _decomposition(at: int, factor: int = 1) -> Callable[[Args, Kwargs], int]:
    """A factorization, inverse or decomposition of an m x n matrix (LU, QR, Cholesky, eigen- and singular values):
    about m * n * min(m, n) per matrix (`factor` times that for the iterative ones: eigenvalues, SVD, exp)."""

    def cost(args: Args, kwargs: Kwargs) -> int:
        batch, m, n = _matrix(_t(args, at))
        return factor * batch * m * n * min(m, n)

    return cost


def _solve(a_at: int, b_at: int, factor: bool) -> Callable[[Args, Kwargs], int]:
    """A solve with an n x n matrix A (factorized first when `factor`) for the columns of B: n * n per column,
    B's batch and A's broadcast."""

    def cost(args: Args, kwargs: Kwargs) -> int:
        a, b = _t(args, a_at), _t(args, b_at)
        batch_a, m, n = _matrix(a)
        if b is None:
            return 0
        columns = b.numel() // max(1, int(b.shape[-2]) if b.dim() > 1 else b.numel())  # B's columns, batch included
        work = max(batch_a, 1) * m * n * min(m, n) if factor else 0
        return work + max(m, n) * max(m, n) * max(columns, batch_a)

    return cost


def _pdist(args: Args, kwargs: Kwargs) -> int:
    """Every pair of the n rows (n x m): n * (n - 1) / 2 * m."""
    x = _t(args, 0)
    if x is None or x.dim() != 2:
        return 0
    n, m = int(x.shape[0]), int(x.shape[1])
    return n * (n - 1) // 2 * m


def _multilabel_margin(self_at: int) -> Callable[[Args, Kwargs], int]:
    """(N, C) scores: per sample, every target label against every class: N * C * C."""

    def cost(args: Args, kwargs: Kwargs) -> int:
        x = _t(args, self_at)
        if x is None or x.dim() == 0:
            return 0
        c = int(x.shape[-1])
        return x.numel() * c

    return cost


def _trilinear(args: Args, kwargs: Kwargs) -> int:
    """i1, i2, i3 with dimensions inserted at expand1..3: the product of the largest size of each dimension
    (every combination of the three is multiplied once)."""
    found = [_t(args, i) for i in range(3)]
    if any(t is None for t in found):
        return 0
    shapes = []
    for i, t in enumerate(found):
        shape = list(t.shape)  # type: ignore[union-attr]
        for d in sorted(int(e) for e in (arg(args, kwargs, 3 + i, f"expand{i + 1}") or [])):
            shape.insert(d, 1)
        shapes.append(shape)
    ndim = max(len(s) for s in shapes)
    return _numel([max((s[d] if d < len(s) else 1) for s in shapes) for d in range(ndim)])


def _foreach_mm(args: Args, kwargs: Kwargs) -> int:
    first, second = arg(args, kwargs, 0, "self"), arg(args, kwargs, 1, "mat2")
    if not isinstance(first, list | tuple) or not isinstance(second, list | tuple):
        return 0
    mm = _mm(0, 1)
    return sum(mm([a, b], {}) for a, b in zip(first, second, strict=False))


def _isin(args: Args, kwargs: Kwargs) -> int:
    """isin(elements, test_elements): torch's kernel compares every element with every test element when the test
    elements are few (fewer than 10 * n ** 0.145, numpy's heuristic, at::isin_out): n * m comparisons, n an
    expanded view's; past that it sorts both (n log n, like the sorts, not estimated)."""
    elements, test = _t(args, 0), _t(args, 1)
    if elements is None or test is None:
        return 0
    n, m = elements.numel(), test.numel()
    if m >= int(10.0 * math.pow(max(n, 1), 0.145)) + 1:  # + 1: float rounding never hides the naive path
        return 0
    return n * m


def _mvlgamma_p(args: Args, kwargs: Kwargs) -> tuple[torch.Tensor | None, int]:
    return _t(args, 0), max(int(arg(args, kwargs, 1, "p", 1)), 0)


def _mvlgamma(args: Args, kwargs: Kwargs) -> int:
    """p lgammas per element (and a sum of them)."""
    x, p = _mvlgamma_p(args, kwargs)
    return 0 if x is None else _numel(x.shape) * p


def _mvlgamma_bytes(args: Args, kwargs: Kwargs) -> int:
    """The kernel's (..., p) temporary: an arange of p, broadcast against every element, in x's floating dtype."""
    x, p = _mvlgamma_p(args, kwargs)
    return 0 if x is None else (_numel(x.shape) + 1) * p * max(x.element_size(), 4)


def _embedding_bag(indices_at: int, rows_at: int) -> Callable[[Args, Kwargs], int]:
    """An embedding bag (or its backward): every index adds (or spreads) a row of D elements: indices x D, where
    neither input holds that many (an expanded view of indices into one bag of a wide, expanded weight)."""

    def cost(args: Args, kwargs: Kwargs) -> int:
        indices, rows = _t(args, indices_at), _t(args, rows_at)
        if indices is None or rows is None or rows.dim() == 0:
            return 0
        return indices.numel() * int(rows.shape[-1])

    return cost


_COSTS: dict[str, Callable[[Args, Kwargs], int]] = {
    "aten::mm": _mm(0, 1),
    "aten::bmm": _mm(0, 1),
    "aten::matmul": _mm(0, 1),
    "aten::addmm": _mm(1, 2),
    "aten::addmm_": _mm(1, 2),  # the in-place forms are schemas of their own names
    "aten::baddbmm_": _mm(1, 2),
    "aten::addbmm_": _mm(1, 2),
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
    "aten::_scaled_dot_product_fused_attention_overrideable": _attention,
    "aten::_scaled_dot_product_fused_attention_overrideable_backward": lambda a, k: 3 * _attention(a[1:], k),
    "aten::scaled_dot_product_attention": _attention,
    "aten::_scaled_mm": _mm(0, 1),
    "aten::_scaled_mm_v2": _mm(0, 1),
    "aten::_foreach_mm": _foreach_mm,
    "aten::_conv_depthwise2d": _conv,
    "aten::conv_depthwise3d": _conv,
    "aten::_trilinear": _trilinear,
    "aten::_pdist_forward": _pdist,
    "aten::multilabel_margin_loss_forward": _multilabel_margin(0),
    "aten::multilabel_margin_loss_backward": _multilabel_margin(1),
    "aten::isin": _isin,
    "aten::_embedding_bag": _embedding_bag(1, 0),  # (weight, indices, ...)
    "aten::_embedding_bag_forward_only": _embedding_bag(1, 0),
    "aten::_embedding_bag_backward": _embedding_bag(1, 0),  # (grad, indices, ...)
    "aten::_embedding_bag_dense_backward": _embedding_bag(1, 0),
    "aten::_embedding_bag_per_sample_weights_backward": _embedding_bag(2, 0),  # (grad, weight, indices, ...)
    # pools: output positions x window
    "aten::max_pool2d_with_indices": _pool(2, 2, 3),
    "aten::max_pool3d_with_indices": _pool(3, 2, 3),
    "aten::avg_pool2d": _pool(2, 2, 3),
    "aten::avg_pool3d": _pool(3, 2, 3),
    "aten::avg_pool2d_backward": _pool_backward(2),
    "aten::fractional_max_pool2d": _fractional_pool(2),
    "aten::fractional_max_pool3d": _fractional_pool(3),
    # dense linear algebra: cubic in the matrix side
    "aten::cholesky": _decomposition(0),
    "aten::linalg_cholesky_ex": _decomposition(0),
    "aten::cholesky_inverse": _decomposition(0, 2),
    "aten::linalg_inv_ex": _decomposition(0, 2),
    "aten::linalg_lu": _decomposition(0),
    "aten::linalg_lu_factor_ex": _decomposition(0),
    "aten::linalg_ldl_factor_ex": _decomposition(0),
    "aten::_linalg_det": _decomposition(0),
    "aten::_linalg_slogdet": _decomposition(0),
    "aten::geqrf": _decomposition(0, 2),
    "aten::linalg_qr": _decomposition(0, 2),
    "aten::linalg_householder_product": _decomposition(0, 2),
    "aten::_linalg_eigh": _decomposition(0, 10),
    "aten::linalg_eig": _decomposition(0, 25),
    "aten::_linalg_svd": _decomposition(0, 20),
    "aten::linalg_pinv": _decomposition(0, 20),
    "aten::linalg_matrix_exp": _decomposition(0, 30),
    "aten::linalg_lstsq": _solve(0, 1, True),
    "aten::ormqr": _solve(0, 2, False),
    "aten::triangular_solve": _solve(1, 0, False),
    "aten::linalg_solve_triangular": _solve(0, 1, False),
    "aten::cholesky_solve": _solve(1, 0, False),
    "aten::linalg_lu_solve": _solve(0, 2, False),
    "aten::linalg_ldl_solve": _solve(0, 2, False),
    "aten::_linalg_solve_ex": _solve(0, 1, True),
    # an integer argument's work: p lgammas per element
    "aten::mvlgamma": _mvlgamma,
    "aten::mvlgamma_": _mvlgamma,
}

# Bytes an op allocates besides its outputs, for the time it runs (freed when it returns).
_TEMPORARIES: dict[str, Callable[[Args, Kwargs], int]] = {
    "aten::mvlgamma": _mvlgamma_bytes,
    "aten::mvlgamma_": _mvlgamma_bytes,
    attention.FORWARD: attention.forward_bytes,
    attention.BACKWARD: attention.backward_bytes,
}


def _of(
    table: Mapping[str, Callable[[Args, Kwargs], int]], op: torch._ops.OpOverload, args: Args, kwargs: Kwargs
) -> int:
    f = table.get(op._schema.name)
    if f is None:
        return 0
    try:
        return int(f(args, kwargs))
    except (AttributeError, IndexError, TypeError, ValueError, OverflowError):
        return 0  # arguments that do not fit the schema fail in the op itself


def estimate(op: torch._ops.OpOverload, args: Args, kwargs: Kwargs) -> int:
    """Multiply-adds the op will do (0 for ops whose work is linear in their inputs, bounded elsewhere)."""
    return _of(_COSTS, op, args, kwargs)


def temporary(op: torch._ops.OpOverload, args: Args, kwargs: Kwargs) -> int:
    """Bytes the op allocates besides its outputs while it runs (0 for most ops), admitted with its outputs."""
    return _of(_TEMPORARIES, op, args, kwargs)


def check(op: torch._ops.OpOverload, args: Args, kwargs: Kwargs, limit: int) -> None:
    n = estimate(op, args, kwargs)
    if n > limit:
        raise ResourceExhausted(
            f"{op._schema.name} would do about {n:.3g} multiply-adds (expanded views?), more than the {limit:.3g} "
            "one op may take on this device"
        )
