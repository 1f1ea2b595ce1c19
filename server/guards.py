"""Guards for ops whose inputs torch trusts or whose memory only running them can tell.

- `validate`: checks that torch's own CPU kernels skip for a few ops a training client legitimately sends
  (embedding backwards, fused optimizers). Fuzzing found these writing out of bounds, corrupting the heap and
  aborting the whole daemon on bad indices or mismatched lists.
- `replacement`: checked implementations for ops whose kernels reach out of bounds (`_reshape_alias` sets any
  sizes and strides on a storage, where `as_strided` checks them; `_unsafe_masked_index*` read and write
  wherever their indices point, where torch's decomposition clamps them; `_index_put_impl_` runs as
  `index_put_`, its `unsafe` flag ignored).
- `check_enums`, `check_counts`: dtype-like parameters must not be plain ints; list arguments and list
  results are capped. (How many bytes an op will allocate is sizing.py's business.)
- `check_inputs`: no tensor argument may be logically larger than the session's quota in elements. Expanded
  views are free to make, but an op reading 2^40 broadcast elements would hold the device for hours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch._prims_common import suggest_memory_format

from gpupool import config, metas, protocol
from gpupool.errors import InvalidArgument, ResourceExhausted

from . import attention
from .opargs import Args, Kwargs, arg, checked, tensors
from .sessions import zero_bytes

_INTEGERS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def bounds(t: torch.Tensor) -> tuple[int, int]:
    """`int(t.min())` and `int(t.max())` of a non-empty tensor, for an integer one with one kernel (`aminmax`) where
    they were two (round 31); on a GPU both values are written into the two elements of one tensor and read on the
    host with one copy, where the two `.item()`s were two copies, each a wait for the device's stream (on the CPU a
    read is free, and the 2-element tensor and `out=` cost more than they save: ~4 us). Other dtypes (a hostile
    client's float or bool indices) as before."""
    if t.dtype not in _INTEGERS:
        return int(t.min()), int(t.max())
    if t.device.type == "cpu":
        lo, hi = torch.aminmax(t)
        return int(lo), int(hi)
    both = torch.empty(2, dtype=t.dtype, device=t.device)
    torch.aminmax(t, out=(both[0], both[1]))
    low, high = both.tolist()
    return low, high


def _in_range(t: Any, low: int, high: int, what: str) -> None:
    if isinstance(t, torch.Tensor) and t.numel() and t.device.type != "meta":  # values are checked when known
        lo, hi = bounds(t)
        if lo < low or hi >= high:
            raise InvalidArgument(f"{what} must lie in [{low}, {high}), got values in [{lo}, {hi}]")


def _embedding_dense_backward(args: Args, kwargs: Kwargs) -> None:
    _in_range(arg(args, kwargs, 1, "indices"), 0, int(arg(args, kwargs, 2, "num_weights", 0)), "indices")


def checked_indices(indices: torch.Tensor, num_weights: int, via: Callable[[Any], Any] = lambda op: op) -> torch.Tensor:
    """`indices`, after the range check of `_embedding_dense_backward` made of tensor ops, for a graph traced by
    server/graph_trace.py (where no Python guard runs): index_select on a (num_weights, 0) tensor, which holds no
    bytes, raises for any index outside [0, num_weights); its empty result's sum (0) is added to the indices so
    that the check feeds the op and the tracer keeps it. `via(op)` gives the callable that runs each op (the
    trace records them by hand)."""
    aten = torch.ops.aten
    probe = via(aten.new_zeros.default)(indices, [num_weights, 0], dtype=torch.float32)
    hits = via(aten.index_select.default)(probe, 0, via(aten.reshape.default)(indices, [-1]))
    return via(aten.add.Tensor)(indices, via(aten.sum.default)(hits, dtype=indices.dtype))


def _embedding_bag_dense_backward(args: Args, kwargs: Kwargs) -> None:
    grad, indices = arg(args, kwargs, 0, "grad"), arg(args, kwargs, 1, "indices")
    num_weights = int(arg(args, kwargs, 5, "num_weights", 0))
    _in_range(indices, 0, num_weights, "indices")
    _in_range(arg(args, kwargs, 2, "offset2bag"), 0, max(1, grad.size(0)) if grad.dim() else 1, "offset2bag")
    _in_range(arg(args, kwargs, 4, "maximum_indices"), -1, num_weights, "maximum_indices")
    offset2bag = arg(args, kwargs, 2, "offset2bag")
    if isinstance(offset2bag, torch.Tensor) and offset2bag.numel() not in (0, indices.numel()):
        raise InvalidArgument("offset2bag must have one entry per index")


def _embedding_bag_per_sample_weights_backward(args: Args, kwargs: Kwargs) -> None:
    grad, weight = arg(args, kwargs, 0, "grad"), arg(args, kwargs, 1, "weight")
    _in_range(arg(args, kwargs, 2, "indices"), 0, weight.size(0) if weight.dim() else 0, "indices")
    _in_range(arg(args, kwargs, 4, "offset2bag"), 0, grad.size(0) if grad.dim() else 0, "offset2bag")


# A fused optimizer's tensor-list arguments: each holds one tensor per parameter, except the step counts (one
# number per parameter); those that may be empty (max_exp_avg_sqs without amsgrad, momentum_buffer_list without
# momentum) are left to torch's own length checks when they are.
_STEPS = "state_steps"
_MAY_BE_EMPTY = frozenset({"max_exp_avg_sqs", "momentum_buffer_list"})
_DENSE = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _strides(t: torch.Tensor) -> list[int]:
    """A tensor's strides where they matter (a dimension of size 1 may have any)."""
    return [st for n, st in zip(t.shape, t.stride(), strict=True) if n != 1]


def _fused_optimizer(args: Args, kwargs: Kwargs, schema: Any) -> None:
    """torch's CPU fused optimizers (`_fused_adam_`, ...) walk every tensor of a parameter's lists as numel()
    contiguous elements from its data pointer, trusting them all to match the parameter: a one-element grad read
    past its storage, an expanded parameter (stride 0) wrote past its one element and corrupted the heap, an
    empty found_inf was read. So every per-parameter tensor must have its parameter's shape, strides, dtype and
    device, each parameter must be dense (contiguous in some memory format), each list as long as the parameters,
    each step count and each tensor scalar (lr, grad_scale, found_inf) one element on the parameters' device."""
    lists: dict[str, list[Any]] = {}
    scalars: list[Any] = []
    for i, spec in enumerate(schema.arguments):
        v = arg(args, kwargs, i, spec.name) if not spec.kwarg_only else kwargs.get(spec.name)
        if isinstance(v, list | tuple):
            lists[spec.name] = list(v)
        elif isinstance(v, torch.Tensor):
            scalars.append((spec.name, v))
    params = lists.get("self", [])
    if not params or not all(isinstance(p, torch.Tensor) for p in params):
        raise InvalidArgument("a fused optimizer needs a list of parameter tensors")
    device = params[0].device
    # Each distinct parameter, and each distinct (parameter, tensor) pair of a list, is checked once (round 44,
    # hostile44: a graph naming one slot in every list 65,536 times was ~30 us of this per reference)
    seen: set[Any] = set()
    for i, p in enumerate(params):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.device != device or not p.dtype.is_floating_point:
            raise InvalidArgument(f"parameter {i} must be a floating-point tensor on {device}")
        if not any(p.is_contiguous(memory_format=f) for f in _DENSE if f == torch.contiguous_format or p.dim() >= 4):
            raise InvalidArgument(f"parameter {i} must be dense (contiguous), not a view with strides {p.stride()}")
    for name, values in lists.items():
        if name == "self" or (not values and name in _MAY_BE_EMPTY):
            continue
        if len(values) != len(params):
            raise InvalidArgument(f"{name} holds {len(values)} tensors for {len(params)} parameters")
        pairs: set[tuple[int, int]] = set()
        for i, (p, t) in enumerate(zip(params, values, strict=True)):
            pair = (id(p), id(t))  # (both alive: the lists hold them)
            if pair in pairs:
                continue
            pairs.add(pair)
            if not isinstance(t, torch.Tensor) or t.device != device:
                raise InvalidArgument(f"{name}[{i}] must be a tensor on {device}")
            if name == _STEPS:
                if t.numel() != 1:
                    raise InvalidArgument(f"{name}[{i}] must hold one number, not {t.numel()}")
            elif t.shape != p.shape or _strides(t) != _strides(p) or t.dtype != p.dtype:
                raise InvalidArgument(
                    f"{name}[{i}] ({list(t.shape)}, strides {list(t.stride())}, {t.dtype}) must match its parameter "
                    f"({list(p.shape)}, strides {list(p.stride())}, {p.dtype})"
                )
    for name, t in scalars:
        if t.numel() != 1 or t.device != device:
            raise InvalidArgument(f"{name} must be one number on {device}, not {t.numel()} on {t.device}")


def _fractional_pool_backward(dims: int) -> Callable[[Args, Kwargs], None]:
    """The CPU kernel scatters grad_output through `indices` into self's plane unchecked (SIGSEGV)."""

    def check(args: Args, kwargs: Kwargs) -> None:
        grad, self = arg(args, kwargs, 0, "grad_output"), arg(args, kwargs, 1, "self")
        indices = arg(args, kwargs, 4, "indices")
        out = list(arg(args, kwargs, 3, "output_size"))
        if (
            tuple(indices.shape) != tuple(grad.shape)
            or self.dim() < dims
            or list(grad.shape[-dims:]) != out
            or tuple(grad.shape[:-dims]) != tuple(self.shape[:-dims])
        ):
            raise InvalidArgument(
                f"grad_output {list(grad.shape)} and indices {list(indices.shape)} do not match output_size {out} "
                f"of input {list(self.shape)}"
            )
        _in_range(indices, 0, math.prod(self.shape[-dims:]), "indices")

    return check


def _pool_backward(dims: int, indices_at: int) -> Callable[[Args, Kwargs], None]:
    """Max-pool backwards scatter grad_output through `indices` into a plane of `self` without checking them:
    out-of-range or negative indices segfaulted the daemon, chosen ones wrote chosen values at chosen offsets."""

    def check(args: Args, kwargs: Kwargs) -> None:
        grad, self = arg(args, kwargs, 0, "grad_output"), arg(args, kwargs, 1, "self")
        indices = arg(args, kwargs, indices_at, "indices")
        if (
            tuple(indices.shape) != tuple(grad.shape)
            or self.dim() not in (dims + 1, dims + 2)
            or grad.dim() != self.dim()
            or tuple(grad.shape[:-dims]) != tuple(self.shape[:-dims])
        ):
            raise InvalidArgument(
                f"grad_output {list(grad.shape)} and indices {list(indices.shape)} do not fit input {list(self.shape)}"
            )
        _in_range(indices, 0, math.prod(self.shape[-dims:]), "indices")

    return check


def _adaptive_avg_pool_backward(dims: int) -> Callable[[Args, Kwargs], None]:
    """The CPU kernel walks grad_output's planes (its leading dims) into grad_input, which has self's shape: more
    planes in grad_output wrote past grad_input (SIGSEGV, a corrupted heap), fewer read past grad_output."""

    def check(args: Args, kwargs: Kwargs) -> None:
        grad, self = arg(args, kwargs, 0, "grad_output"), arg(args, kwargs, 1, "self")
        if grad.dim() != self.dim() or tuple(grad.shape[:-dims]) != tuple(self.shape[:-dims]):
            raise InvalidArgument(f"grad_output {list(grad.shape)} does not fit input {list(self.shape)}")

    return check


def _antialias_backward(args: Args, kwargs: Kwargs) -> None:
    """The antialiased bilinear backward's CPU kernel walks a window of 1/scale input pixels per output pixel when a
    scale is given (not clamped to the input, as its forward's is): scales of 1e-9 on an 8x8 image held a thread for
    40 s, 1e-12 would for hours. torch's interpolate passes the scale_factor its output size came from
    (out = floor(in * scale)), so a scale that honest calls send never makes the window wider than in/out, the
    size's own; a smaller one is refused."""
    out, size = arg(args, kwargs, 1, "output_size"), arg(args, kwargs, 2, "input_size")
    if arg(args, kwargs, 3, "align_corners") or len(out) != 2 or len(size) != 4:
        return  # align_corners: the sizes decide, the scales are unused; other lengths: torch's own checks
    for d, name in enumerate(("scales_h", "scales_w")):
        scale = arg(args, kwargs, 4 + d, name)
        if scale is not None and scale > 0 and not size[2 + d] * scale >= out[d] * (1 - 1e-6):
            raise InvalidArgument(
                f"{name} {scale} does not fit input size {size[2 + d]} and output size {out[d]} "
                "(output = floor(input * scale))"
            )


_REFLECTION = 2  # grid_sampler's padding_mode


def _grid_sampler_backward(dims: int) -> Callable[[Args, Kwargs], None]:
    """The CPU kernel reads grad_output at every grid position, trusting it to be (N, C, *grid's positions): a
    smaller one was read past its end (heap bytes in grad_input); with reflection padding a NaN or infinite grid
    value made an index anywhere (SIGSEGV; torch's forward kernel clamps them)."""

    def check(args: Args, kwargs: Kwargs) -> None:
        grad, image, grid = (arg(args, kwargs, i, n) for i, n in enumerate(("grad_output", "input", "grid")))
        want = [image.size(0), image.size(1), *grid.shape[1:-1]] if image.dim() == dims + 2 else None
        if want is None or grid.dim() != dims + 2 or list(grad.shape) != want:
            raise InvalidArgument(
                f"grad_output {list(grad.shape)} does not fit input {list(image.shape)} and grid {list(grid.shape)}"
            )
        if arg(args, kwargs, 4, "padding_mode") != _REFLECTION or grid.device.type == "meta" or not grid.numel():
            return
        if not bool(torch.isfinite(grid).all()):
            raise InvalidArgument("grid values must be finite with reflection padding")

    return check


def _weight_norm(backward: bool) -> Callable[[Args, Kwargs], None]:
    """weight_norm's fused CPU kernel (`nn.utils.weight_norm`, `parametrizations.weight_norm`: torch's `_weight_norm`
    sends it for dim 0 or the last dim) walks v's rows (dim 0) or columns (the last dim) and reads g (and the
    backward's saved norms) at each row's or column's index, unchecked: a 1-element g beside a 4-row v read 3 floats
    past g's storage (round 40: heap bytes in w). g and the norms hold one value per slice of v along `dim`, the
    backward's grad_w has v's shape; the kernel checks dtypes itself. (It reads them by raw pointer, as contiguous:
    `_CONTIGUOUS_INPUTS`.) It divides v's element count by v's size along `dim`: a v without a slice is refused."""

    def check(args: Args, kwargs: Kwargs) -> None:
        names = ("grad_w", "saved_v", "saved_g", "saved_norms") if backward else ("v", "g")
        given = {name: arg(args, kwargs, i, name) for i, name in enumerate(names)}
        dim = arg(args, kwargs, len(names), "dim", 0)
        v = given["saved_v" if backward else "v"]
        if v.dim() == 0 or dim not in (0, v.dim() - 1):
            raise InvalidArgument(f"dim {dim} is neither the first nor the last of v {list(v.shape)}")
        n = v.size(dim)
        if n == 0:  # the kernel divides v's element count by n (int64): SIGFPE, the worker killed (round 40 review)
            raise InvalidArgument(f"v {list(v.shape)} has no slice along dim {dim}")
        per_slice = ("saved_g", "saved_norms") if backward else ("g",)
        wrong: list[str] = [name for name in per_slice if given[name].numel() != n]
        if backward and tuple(given["grad_w"].shape) != tuple(v.shape):
            wrong.insert(0, "grad_w")
        if wrong:
            raise InvalidArgument(
                f"{wrong[0]} {list(given[wrong[0]].shape)} does not fit v {list(v.shape)} (one value per slice along "
                f"dim {dim}: {n})"
            )

    return check


_VALIDATORS: dict[str, Callable[[Args, Kwargs], None]] = {
    "aten::_weight_norm_interface": _weight_norm(backward=False),
    "aten::_weight_norm_interface_backward": _weight_norm(backward=True),
    "aten::max_pool2d_with_indices_backward": _pool_backward(2, 7),
    "aten::max_pool3d_with_indices_backward": _pool_backward(3, 7),
    "aten::adaptive_max_pool2d_backward": _pool_backward(2, 2),
    "aten::adaptive_max_pool3d_backward": _pool_backward(3, 2),
    "aten::fractional_max_pool2d_backward": _fractional_pool_backward(2),
    "aten::fractional_max_pool3d_backward": _fractional_pool_backward(3),
    "aten::_adaptive_avg_pool2d_backward": _adaptive_avg_pool_backward(2),
    "aten::_adaptive_avg_pool3d_backward": _adaptive_avg_pool_backward(3),
    "aten::_upsample_bilinear2d_aa_backward": _antialias_backward,
    "aten::grid_sampler_2d_backward": _grid_sampler_backward(2),
    "aten::grid_sampler_3d_backward": _grid_sampler_backward(3),
    "aten::embedding_dense_backward": _embedding_dense_backward,
    "aten::_embedding_bag_dense_backward": _embedding_bag_dense_backward,
    "aten::_embedding_bag_backward": _embedding_bag_dense_backward,
    "aten::_embedding_bag_per_sample_weights_backward": _embedding_bag_per_sample_weights_backward,
    **attention.VALIDATORS,  # shapes, dtypes, dropout_p, scale of the fused attention ops (server/attention.py)
}
# Features withheld by $GPUPOOL_WITHHOLD_FEATURES (gpupool/config.py `withheld_features`; AttachReply.features
# leaves them out): served as a daemon from before them served them. "sdpa_dropout": the fused attention with
# dropout_p other than 0 is refused as before round 23, so a client that ignored the features list would fail here.
WITHHELD = config.withheld_features()


def _no_fused_dropout(check: Callable[[Args, Kwargs], None], index: int) -> Callable[[Args, Kwargs], None]:
    def refuse(args: Args, kwargs: Kwargs) -> None:
        check(args, kwargs)
        if arg(args, kwargs, index, "dropout_p", 0.0) != 0:
            raise InvalidArgument(f"fused attention: dropout_p must be 0 (this daemon withholds the "
                                  f"{protocol.FEATURE_SDPA_DROPOUT} feature: GPUPOOL_WITHHOLD_FEATURES)")  # fmt: skip

    return refuse


if protocol.FEATURE_SDPA_DROPOUT in WITHHELD:
    for _name, _index in ((attention.FORWARD, 4), (attention.BACKWARD, 12)):
        _VALIDATORS[_name] = _no_fused_dropout(_VALIDATORS[_name], _index)
# Guards that need the overload's schema (its argument names): the fused optimizers' lists, in place and in their
# functional and out= forms (`_fused_adam`, `_fused_adam.out`, ...: the same kernel on clones of the lists they
# write, reading the others -- a one-element grad -- as the in-place form does; an `out` list must match too).
FUSED_OPTIMIZERS = ("adam", "adamw", "sgd", "adagrad")  # torch's CPU fused optimizers: aten::_fused_NAME_ and forms
_SCHEMA_VALIDATORS: dict[str, Callable[[Args, Kwargs, Any], None]] = {
    f"aten::_fused_{name}{form}": _fused_optimizer for name in FUSED_OPTIMIZERS for form in ("_", "")
}


# Guards that read argument values (index ranges): a caller validating on meta tensors (step capture's define)
# must run these again on the real tensors of every run.
VALUE_GUARDS = frozenset(
    {
        "aten::fractional_max_pool2d_backward",
        "aten::fractional_max_pool3d_backward",
        "aten::max_pool2d_with_indices_backward",
        "aten::max_pool3d_with_indices_backward",
        "aten::adaptive_max_pool2d_backward",
        "aten::adaptive_max_pool3d_backward",
        "aten::embedding_dense_backward",
        "aten::_embedding_bag_dense_backward",
        "aten::_embedding_bag_backward",
        "aten::_embedding_bag_per_sample_weights_backward",
        "aten::grid_sampler_2d_backward",
        "aten::grid_sampler_3d_backward",
    }
)


# ---- kernels that loop per element as many times as an argument's value says ----
#
# Shapes bound every other op's work (cost.py, `check_inputs`), but these kernels (ATen/native/Math.h) run a
# recurrence per element whose length is a value: the Laguerre and Legendre polynomials (and the Chebyshev ones
# for |x| just past 1) loop n times, the Hurwitz zeta function (and polygamma of order 2 or more, which calls it)
# steps from q up to 9 one at a time, so a negative q is |q| steps. One element with n = 1e15 or q = -1e15 + 0.5
# held the device's thread for months (measured here: 1e8 steps take 1-3 s), and a kernel is never pre-empted.
# The loops are counted from the values (read from the tensors: a sync on a GPU, as the index guards) and bounded
# as multiply-adds are (`--max-op-flops`).


def _elements(*values: Any) -> int:
    """Elements of the result: the broadcast of the tensor arguments' shapes (numbers broadcast as scalars)."""
    shapes = [v.shape for v in values if isinstance(v, torch.Tensor)]
    return math.prod(torch.broadcast_shapes(*shapes)) if shapes else 1


def _largest(value: Any, sign: int = 1) -> float:
    """The largest of `sign * value` over a tensor's values (or a number); unknown (meta, empty): 0; NaN: inf
    (a kernel casts it to int64, which is undefined: CUDA saturates)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta" or not value.numel():
            return 0.0
        if value.is_complex():
            value = value.real
        found = float(value.max() if sign > 0 else value.min()) * sign
    else:
        found = float(value) * sign
    return math.inf if math.isnan(found) else found


def _degree_loops(args: Args, kwargs: Kwargs) -> float:
    """Orthogonal polynomials (x, n): up to n steps per element."""
    x, n = arg(args, kwargs, 0, "x"), arg(args, kwargs, 1, "n")
    return _elements(x, n) * max(0.0, _largest(n))


def _zeta_steps(q: Any) -> float:
    return max(0.0, _largest(q, -1))  # steps from q up to 9: only a negative q makes them many


def _zeta_loops(args: Args, kwargs: Kwargs) -> float:
    x, q = arg(args, kwargs, 0, "self"), arg(args, kwargs, 1, "other")
    return _elements(x, q) * _zeta_steps(q)


def _polygamma_loops(n_at: int, x_at: int) -> Callable[[Args, Kwargs], float]:
    """polygamma(n, x) of order 2 or more is zeta(n + 1, x)."""

    def loops(args: Args, kwargs: Kwargs) -> float:
        n, x = int(arg(args, kwargs, n_at, "n", 0)), arg(args, kwargs, x_at, "self")
        return _elements(x) * _zeta_steps(x) if n >= 2 else 0.0

    return loops


_LOOPS: dict[str, Callable[[Args, Kwargs], float]] = {
    **{
        f"aten::special_{name}_polynomial_{kind}": _degree_loops
        for name, kinds in (
            ("chebyshev", "tuvw"),
            ("shifted_chebyshev", "tuvw"),
            ("hermite", ("h", "he")),
            ("laguerre", "l"),
            ("legendre", "p"),
        )
        for kind in kinds
    },
    "aten::special_zeta": _zeta_loops,
    "aten::polygamma": _polygamma_loops(0, 1),
    "aten::polygamma_": _polygamma_loops(1, 0),
}


# The arguments each value guard reads the values of, as `arg` finds them (position, name): of every other argument
# it reads only metadata (shapes, dtypes), so it may run before a run on meta tensors for those and the real
# tensors for these (a CUDA graph's replay, server/graph_cuda.py). A guard missing here is never run that way.
VALUE_READS: dict[str, tuple[tuple[int, str], ...]] = {
    "aten::embedding_dense_backward": ((1, "indices"),),
    "aten::_embedding_bag_dense_backward": ((1, "indices"), (2, "offset2bag"), (4, "maximum_indices")),
    "aten::_embedding_bag_backward": ((1, "indices"), (2, "offset2bag"), (4, "maximum_indices")),
    "aten::_embedding_bag_per_sample_weights_backward": ((2, "indices"), (4, "offset2bag")),
    "aten::max_pool2d_with_indices_backward": ((7, "indices"),),
    "aten::max_pool3d_with_indices_backward": ((7, "indices"),),
    "aten::adaptive_max_pool2d_backward": ((2, "indices"),),
    "aten::adaptive_max_pool3d_backward": ((2, "indices"),),
    "aten::fractional_max_pool2d_backward": ((4, "indices"),),
    "aten::fractional_max_pool3d_backward": ((4, "indices"),),
    "aten::grid_sampler_2d_backward": ((2, "grid"),),
    "aten::grid_sampler_3d_backward": ((2, "grid"),),
    **{name: ((1, "n"),) for name in _LOOPS if name.startswith("aten::special_") and name != "aten::special_zeta"},
    "aten::special_zeta": ((1, "other"),),
    "aten::polygamma": ((1, "self"),),
    "aten::polygamma_": ((0, "self"),),
}


def value_loops(name: str) -> bool:
    """Whether op `name`'s work is decided by its arguments' values (checked by `validate` against a bound)."""
    return name in _LOOPS


def _check_loops(name: str, args: Args, kwargs: Kwargs, limit: int) -> None:
    loops = _LOOPS.get(name)
    if loops is None:
        return
    n = checked(name, loops, args, kwargs)
    if n > limit:
        raise ResourceExhausted(
            f"{name} would loop about {n:.3g} times (its degree or order, times its elements), more than the "
            f"{limit:.3g} it may take on this device (--max-op-flops; in a graph, what its other ops leave, shared "
            "among such ops)"
        )


def _foreach_lengths(args: Args, kwargs: Kwargs) -> None:
    """_foreach_ kernels walk their lists in step; _foreach_copy_ with a shorter `self` aborted the daemon."""
    lengths = {len(v) for v in list(args) + list(kwargs.values()) if isinstance(v, list) and v}
    lengths |= {len(v) for v in list(args) + list(kwargs.values()) if isinstance(v, list) and not v}
    if len(lengths) > 1:
        raise InvalidArgument(f"list arguments of different lengths {sorted(lengths)}")


VALUE_GUARDS |= frozenset(_LOOPS)


def value_guarded(name: str) -> bool:
    """Whether op `name` has a guard of its own in `validate` (besides a `_foreach_` op's lists' lengths)."""
    return name in _VALIDATORS or name in _SCHEMA_VALIDATORS or name in _LOOPS


def fixed_guard(name: str, args: Args, kwargs: Kwargs) -> list[tuple[int, int]] | None:
    """Whether all that `validate` reads of op `name`'s arguments is what a learned run's step fixes (server/runs.py),
    but for the devices of a few tensor arguments: None where it reads more, else the pairs of tensor arguments (by
    schema position) whose devices it compares. What a step fixes: its tensors' dims, dtypes and shapes (an external
    input's meta is checked per record, an internal one's follows from them, as for the step's learned verdict) and
    the template's constant values (`args`, `kwargs`: the template's, None where each record puts its own). With
    the devices equal per record, the step passes the guard whenever the record it was learned from did (a verdict
    is cached only once `validate` passed). So for the fused attention's guards (server/attention.py: shapes, dtypes,
    constant dropout_p, scale and flags); a backward with dropout also compares its philox_seed's device with the
    query's (14, 1)."""
    if name in _SCHEMA_VALIDATORS or name in _LOOPS:
        return None
    if name == attention.FORWARD:
        return []
    if name == attention.BACKWARD:
        p = arg(args, kwargs, 12, "dropout_p", 0.0)
        if not isinstance(p, float | int) or isinstance(p, bool):
            return None
        return [] if p <= 0 else [(14, 1)]
    return None


def fixed_by_template(name: str, args: Args, kwargs: Kwargs) -> bool:
    """Whether op `name`'s guard reads nothing a learned step does not fix (`fixed_guard`, no devices compared): such
    a step need not run it per record."""
    return fixed_guard(name, args, kwargs) == []


def index_ranges(name: str, args: Args, kwargs: Kwargs) -> list[tuple[int, int, int]] | None:
    """`validate`'s whole work for op `name` as value ranges of its tensor arguments, (schema position, low, high):
    each argument's values must lie in [low, high) (`_in_range`), with bounds the template's constant values fix
    (`args`, `kwargs` as for `fixed_by_template`), for the native runner to check per record (server/native_runner.py);
    None where the guard is anything else."""
    if name in _SCHEMA_VALIDATORS or name in _LOOPS or _VALIDATORS.get(name) is not _embedding_dense_backward:
        return None
    n = arg(args, kwargs, 2, "num_weights")
    if type(n) is not int or arg(args, kwargs, 1, "indices") is not None:  # indices: a record's own tensor (None)
        return None
    return [(1, 0, n)]


def validate(op: torch._ops.OpOverload, args: Args, kwargs: Kwargs, max_flops: int) -> None:
    """The guards of op's argument values; `max_flops`: the most work one op may do (the session's bound)."""
    name = op._schema.name
    if name.startswith("aten::_foreach_"):
        checked(name, _foreach_lengths, args, kwargs)
    check = _VALIDATORS.get(name)
    if check is not None:
        checked(name, check, args, kwargs)
    with_schema = _SCHEMA_VALIDATORS.get(name)
    if with_schema is not None:
        checked(name, lambda a, k: with_schema(a, k, op._schema), args, kwargs)
    _check_loops(name, args, kwargs, max_flops)


def _checked_reshape_alias(self: torch.Tensor, size: list[int], stride: list[int]) -> torch.Tensor:
    return torch.as_strided(self, size, stride, self.storage_offset())


def _clamped(x: torch.Tensor, indices: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [None if i is None else i.clamp(-x.size(d), x.size(d) - 1) for d, i in enumerate(indices)]


def _masked_index(x: torch.Tensor, mask: torch.Tensor, indices: list[Any], fill: Any) -> torch.Tensor:
    """torch's own decomposition: masked-off indices may be anything, so clamp them and index with checks
    (the eager kernel reads wherever they point)."""
    return torch.ops.aten.index.Tensor(x, _clamped(x, indices)).masked_fill(~mask, fill)


def _masked_index_put_accumulate(x: torch.Tensor, mask: torch.Tensor, indices: list[Any], values: Any) -> Any:
    masked = values.masked_fill(~mask, 0)
    return torch.ops.aten.index_put.default(x, _clamped(x, indices), masked, True)


def _index_put_impl_checked(
    self: torch.Tensor, indices: list[Any], values: torch.Tensor, accumulate: bool = False, unsafe: bool = False
) -> torch.Tensor:
    """`_index_put_impl_` is what `index_put_` calls under its composite kernel (a PrivateUse1 client such as
    the C++ one sees it, not `index_put_`); its `unsafe` flag lets a CUDA kernel skip the index bounds check.
    Run as `index_put_`: always checked, whatever the client asked."""
    return torch.ops.aten.index_put_.default(self, indices, values, accumulate)


def _grown_zeroed(inplace: Callable[..., Any]) -> Callable[..., Any]:
    """The functional (and out=) form of an in-place resize (`resize`, `resize_as`: a clone of `self`, resized),
    with the bytes the resize added zeroed: torch leaves them as the allocator had them, which may be another
    session's freed data. The out= form then copies the whole result into `out`, resized to it."""

    def run(self: torch.Tensor, *args: Any, out: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        t = self.clone()
        before = t.untyped_storage().nbytes()
        inplace(t, *args, **kwargs)
        storage = t.untyped_storage()
        if storage.nbytes() > before:
            zero_bytes(storage, before, storage.nbytes())
        if out is None:
            return t
        out.resize_(t.shape)
        return out.copy_(t)  # writes every element of `out`: what its resize added too

    return run


def _conv_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout torch's meta kernel of `convolution_backward` gives its gradients (`_conv_memory_format` in
    torch/_meta_registrations.py): channels_last (or channels_last_3d) when the input or the weight is."""
    formats = {suggest_memory_format(input), suggest_memory_format(weight)}
    for fmt in (torch.channels_last, torch.channels_last_3d):
        if fmt in formats:
            return fmt
    return torch.contiguous_format


def _laid_out(t: torch.Tensor | None, fmt: torch.memory_format) -> torch.Tensor | None:
    """`t`, or a copy of it in the memory format `fmt` where it is not (strides may then differ from the client's only
    in dimensions of size 1, which a view's geometry never steps along)."""
    return t if t is None or t.is_contiguous(memory_format=fmt) else t.clone(memory_format=fmt)


def keeps_kernel_layout(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """Whether an op of META_LAYOUT lays its outputs out as the meta kernel does by itself: a conv (or its backward)
    of a contiguous input and weight (both the CPU and the cuDNN kernels then return contiguous outputs). A captured
    step's graph, whose calls' layouts are fixed, then calls the kernel (and may run as TorchScript)."""
    if name not in ("aten::convolution", "aten::convolution_backward"):
        return False  # _linalg_svd, linalg_eig: the CPU kernels' column-major Vh and eigenvectors are copied
    at = 0 if name == "aten::convolution" else 1
    input, weight = arg(args, kwargs, at, "input"), arg(args, kwargs, at + 1, "weight")
    return _conv_format(input, weight) is torch.contiguous_format


def _convolution(*args: Any, **kwargs: Any) -> torch.Tensor:
    """`convolution` with the layout both clients compute for its output on the meta device: contiguous (a session
    with the "conv_layout" feature: cuDNN's, gpupool/metas.py `conv_output_format`). torch's meta
    kernel leaves it contiguous (it cannot tell the backend), while the CPU and cuDNN kernels return channels_last
    for a channels_last input or weight; a view the client then made (`torch.flatten`, `.view`) was sent with the
    contiguous geometry and read the channels_last storage's bytes in the wrong order: a channels_last conv net
    trained on scrambled activations, silently (until round 38; tests/cuda_scripts/cuda_idioms.py)."""
    out = torch.ops.aten.convolution.default(*args, **kwargs)
    if not metas.conv_layout_on():
        return _laid_out(out, torch.contiguous_format)  # type: ignore[return-value]
    # the "conv_layout" feature (round 43): as cuDNN lays it out, which the session's client computes too
    fmt = metas.conv_output_format(arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"))
    return _laid_out(out, fmt)  # type: ignore[return-value]


def _convolution_backward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor | None, ...]:
    """`convolution_backward` with the layouts torch's meta kernel gives its gradients (`_conv_format`), which the CPU
    and cuDNN kernels give for float inputs too (cuDNN not for float64): a no-op copy-free check there."""
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward.default(*args, **kwargs)
    input, weight = arg(args, kwargs, 1, "input"), arg(args, kwargs, 2, "weight")
    fmt = _conv_format(input, weight)
    return _laid_out(grad_input, fmt), _laid_out(grad_weight, fmt), grad_bias


def _linalg_svd(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_linalg_svd` with the layout both clients compute for `Vh` on the meta device: row-major (torch's meta kernel
    takes a meta tensor for a CUDA one, whose cuSOLVER kernel gives row-major), while the CPU kernel (a fake GPU's)
    gives it column-major. A view the client made of it was sent with the row-major geometry and read the storage
    transposed: `torch.svd`'s V (`Vh.mH`) came back as Vh on both clients (until round 39)."""
    u, s, vh = torch.ops.aten._linalg_svd.default(*args, **kwargs)
    return u, s, _laid_out(vh, torch.contiguous_format)  # type: ignore[return-value]


def _linalg_eig(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`linalg_eig` with the layout of its eigenvectors the meta kernel gives (row-major; the CPU kernel's are
    column-major): a view of them (`vecs[:, 0]`, `vecs.mT`) read other elements (until round 39)."""
    values, vectors = torch.ops.aten.linalg_eig.default(*args, **kwargs)
    return values, _laid_out(vectors, torch.contiguous_format)  # type: ignore[return-value]


_REPLACEMENTS: dict[str, Callable[..., Any]] = {
    "aten::resize": _grown_zeroed(torch.Tensor.resize_),
    "aten::resize_as": _grown_zeroed(torch.Tensor.resize_as_),
    "aten::_reshape_alias": _checked_reshape_alias,
    "aten::_unsafe_masked_index": _masked_index,
    "aten::_unsafe_masked_index_put_accumulate": _masked_index_put_accumulate,
    "aten::_index_put_impl_": _index_put_impl_checked,
    **attention.REPLACEMENTS,  # no kernel on a CPU or CUDA device for the overrideable backend: server/attention.py
}


# Kernels that read some tensor arguments as if contiguous, whatever their strides: the embedding bags' CPU kernels
# walk indices, offsets (and offset2bag, per-sample weights) by raw pointer, so an expanded (stride 0) view of
# one element read past its storage (round 18: expanded indices read the worker's heap, an out-of-range word came
# back in the error message; expanded offsets segfaulted the worker). They get contiguous copies of every input
# (an expanded input's copy is within `check_inputs`' element bound); outputs (`out=`) are left as they are.
_CONTIGUOUS_INPUTS = frozenset(
    {
        "aten::_weight_norm_interface",  # reads v, g (and the norms) by raw pointer: _weight_norm above
        "aten::_weight_norm_interface_backward",
        "aten::_embedding_bag",
        "aten::_embedding_bag_forward_only",
        "aten::_embedding_bag_backward",
        "aten::_embedding_bag_dense_backward",
        "aten::_embedding_bag_per_sample_weights_backward",
    }
)


def _contiguous(v: Any) -> Any:
    return v.contiguous() if isinstance(v, torch.Tensor) else v


def _with_contiguous_inputs(op: torch._ops.OpOverload) -> Callable[..., Any]:
    kernel = op._op
    outs = frozenset(a.name for a in op._schema.arguments if a.is_out)

    def run(*args: Any, **kwargs: Any) -> Any:
        return kernel(
            *[_contiguous(a) for a in args], **{k: v if k in outs else _contiguous(v) for k, v in kwargs.items()}
        )

    return run


# Ops (default overloads) whose outputs the daemon lays out as the clients' meta kernels do, a view of an output
# being sent as the geometry the client computed: see _convolution. The native runner calls these too.
META_LAYOUT: dict[str, Callable[..., Any]] = {
    "aten::convolution": _convolution,
    "aten::convolution_backward": _convolution_backward,
    "aten::_linalg_svd": _linalg_svd,
    "aten::linalg_eig": _linalg_eig,
}


def replacement(op: torch._ops.OpOverload) -> Callable[..., Any] | None:
    if op._overloadname == "default" and op._schema.name in META_LAYOUT:
        return META_LAYOUT[op._schema.name]
    if op._schema.name in _CONTIGUOUS_INPUTS:
        return _with_contiguous_inputs(op)
    return _REPLACEMENTS.get(op._schema.name)


MAX_TENSORS = 65536  # tensors in one list argument or returned by one op: each costs ~600 bytes of host RAM


def _dim_size(args: Args, kwargs: Kwargs, i: int, default: int = 0) -> int:
    self, dim = args[0], int(arg(args, kwargs, i, "dim", default))
    return int(self.size(dim)) if self.dim() and -self.dim() <= dim < self.dim() else 1


def _split_count(args: Args, kwargs: Kwargs) -> int:
    size = int(arg(args, kwargs, 1, "split_size", 1))
    return -(-_dim_size(args, kwargs, 2) // size) if size > 0 else 1


def _sections(args: Args, kwargs: Kwargs) -> int:
    value = arg(args, kwargs, 1, "sections", 1)
    if isinstance(value, list | tuple):
        return len(value) + 1
    if isinstance(value, torch.Tensor):
        return int(value.item()) if value.dim() == 0 else value.numel() + 1
    return int(value)


# How many tensors an op returning Tensor[] makes, from its arguments (views cost no quota, but RAM and time).
_LIST_COUNTS: dict[str, Callable[[Args, Kwargs], int]] = {
    "aten::split": _split_count,
    "aten::unsafe_split": _split_count,
    "aten::split_copy": _split_count,
    "aten::unbind": lambda a, k: _dim_size(a, k, 1),
    "aten::unbind_copy": lambda a, k: _dim_size(a, k, 1),
    "aten::chunk": lambda a, k: int(arg(a, k, 1, "chunks", 1)),
    "aten::unsafe_chunk": lambda a, k: int(arg(a, k, 1, "chunks", 1)),
    "aten::split_with_sizes": lambda a, k: len(arg(a, k, 1, "split_sizes", [])),
    "aten::unsafe_split_with_sizes": lambda a, k: len(arg(a, k, 1, "split_sizes", [])),
    "aten::split_with_sizes_copy": lambda a, k: len(arg(a, k, 1, "split_sizes", [])),
    "aten::tensor_split": _sections,
    "aten::hsplit": _sections,
    "aten::vsplit": _sections,
    "aten::dsplit": _sections,
}


def check_counts(op: torch._ops.OpOverload, msg_lists: Sequence[int], args: Args, kwargs: Kwargs) -> None:
    """Refuse list arguments or list results of more than MAX_TENSORS tensors (host memory, not quota)."""
    if any(n > MAX_TENSORS for n in msg_lists):
        raise InvalidArgument(f"a tensor list argument of {max(msg_lists)} tensors; at most {MAX_TENSORS}")
    count = _LIST_COUNTS.get(op._schema.name)
    if count is None or not (args or kwargs):  # the message's list lengths alone, before its arguments are decoded
        return
    n = int(checked(op._schema.name, count, args, kwargs))
    if n > MAX_TENSORS:
        raise InvalidArgument(f"{op._schema.name} would return {n} tensors; at most {MAX_TENSORS}")


_ENUMS: dict[str, type] = {
    "ScalarType": torch.dtype,
    "Layout": torch.layout,
    "MemoryFormat": torch.memory_format,
    "Device": torch.device,
}
_enum_params: dict[torch._ops.OpOverload, list[tuple[int, str, type]]] = {}


def _enums(op: torch._ops.OpOverload) -> list[tuple[int, str, type]]:
    found = _enum_params.get(op)
    if found is None:
        found = []
        for i, a in enumerate(op._schema.arguments):
            declared = str(getattr(a, "real_type", a.type)).removeprefix("Optional[").removesuffix("]")
            if declared in _ENUMS:
                found.append((i, a.name, _ENUMS[declared]))
        _enum_params[op] = found
    return found


def check_enums(op: torch._ops.OpOverload, args: Args, kwargs: Kwargs) -> None:
    """dtype, layout, memory_format and device parameters are ints to the dispatcher: a plain int such as
    dtype=-1 became an invalid ScalarType and crashed the daemon (segfault in `ones`, `sum`, `_to_copy`). Also
    refused here (the same shape-only checks, eager and graph): a view of another dtype's bytes as bool."""
    for i, name, kind in _enums(op):
        value = args[i] if i < len(args) else kwargs.get(name)
        if value is not None and not isinstance(value, kind):
            raise InvalidArgument(f"argument {name!r} must be a {kind.__name__}, not {type(value).__name__}")
    if op._schema.name in _REINTERPRETS:
        _check_bool_reinterpret(op._schema.name, args, kwargs)


# Ops that show a tensor's bytes as another dtype (`view(dtype)`, `view_copy(dtype)`; `set_(source)` makes `self` a
# view of `source`'s storage whatever the two dtypes). A non-bool tensor's bytes seen as bool are bytes other than
# 0 and 1, which every upload path refuses (`wire.check_bool_bytes`): round 21's check was bypassed by uploading
# uint8 bytes 2..255 and viewing them as bool. Any other view between dtypes is allowed (every bit pattern of
# gpupool's other dtypes is a value).
_REINTERPRETS = frozenset({"aten::view", "aten::view_copy", "aten::set_"})


def _check_bool_reinterpret(name: str, args: Args, kwargs: Kwargs) -> None:
    self = args[0] if args else kwargs.get("self")
    if not isinstance(self, torch.Tensor):
        return
    if name == "aten::set_":
        source = args[1] if len(args) > 1 else kwargs.get("source")
        if self.dtype is torch.bool and isinstance(source, torch.Tensor) and source.dtype is not torch.bool:
            raise InvalidArgument(f"set_: a bool tensor cannot take the storage of a {source.dtype} tensor (its "
                                  "bytes would be bool bytes other than 0 and 1)")  # fmt: skip
        return
    dtype = args[1] if len(args) > 1 else kwargs.get("dtype")
    if dtype is torch.bool and self.dtype is not torch.bool:
        raise InvalidArgument(f"{name}: a {self.dtype} tensor's bytes cannot be viewed as bool (bytes other than "
                              "0 and 1); convert it (`!= 0`, `.bool()`) instead")  # fmt: skip


def check_inputs(args: Args, kwargs: Kwargs, limit: int) -> None:
    for t in tensors(list(args) + list(kwargs.values())):
        if t.numel() > limit:
            raise ResourceExhausted(
                f"a tensor argument has {t.numel()} elements (an expanded view?), more than the {limit} "
                "elements the session's memory quota could hold"
            )


# ---- written tensors whose elements overlap in memory ----
#
# A tensor whose strides do not overlap spans at least numel() elements of its storage, so a kernel that writes it as
# if contiguous (after torch's resize_output: a whole result from its data pointer) stays inside that storage; one
# with internal overlap (stride 0 of an expanded view, or strides that alias) spans fewer, and such a kernel writes
# past it. torch refuses a stride-0 output in most of its kernels ("more than one element of the written-to tensor
# refers to a single memory location"), but not in all: round 32 found avg_pool3d.out and three backwards'
# grad_input writing a whole result through one element (SIGSEGV, a corrupted heap). So every tensor an op writes
# (a schema argument annotated `Tensor(a!)` / `Tensor(a!)[]`: out=, in-place self, running statistics, an
# optimizer's state lists) must not overlap itself, whatever the op (`check_written`).
#
# Left alone: ops that write no element (the in-place views, tag `inplace_view`: `resize_`, `set_`, `as_strided_`,
# `unsqueeze_`, ...: metadata only), and the few that torch runs on an expanded tensor without a deprecation
# warning, whose kernels write through the strides (TensorIterator with torch's overlap check off, or a memset of a
# tensor that is dense): `fill_` with a number, `zero_`, `_foreach_zero_`. Refused although torch runs them (with
# "Use of ... on expanded tensors is deprecated"): masked_fill_, index_fill_, index_put_; also the ones torch runs
# without a word where no module sends an overlapping tensor and the kernel was not read on every device: tril_/triu_,
# batch norm's running statistics, rrelu's noise. A written tensor that partially overlaps another argument of the
# same op is not refused: each access stays inside its own tensor's extent (inside its storage), the result is
# what torch's kernels make of it (their own assert_no_partial_overlap refuses most such calls, as locally).
OVERLAP_ALLOWED = frozenset({"aten::fill_.Scalar", "aten::zero_.default", "aten::_foreach_zero_.default"})
# Arguments an op writes although its schema does not say so: `native_batch_norm` updates its running statistics in
# training mode (its schema marks them `Tensor?`, where `_native_batch_norm_legit`'s says `Tensor(a!)`). On the CPU
# the update goes through the strides (the oob_sweep.py layouts found no fault), but that is a property of one
# kernel: the rule is the written tensors', so they are refused overlapping as `_native_batch_norm_legit`'s are
# (whatever `training` says; an honest client's running statistics are a module's dense buffers).
WRITTEN_UNMARKED: dict[str, tuple[str, ...]] = {"aten::native_batch_norm": ("running_mean", "running_var")}
_written: dict[torch._ops.OpOverload, tuple[tuple[int, str], ...]] = {}


def written_params(op: torch._ops.OpOverload) -> tuple[tuple[int, str], ...]:
    """The arguments op writes elements of, each (schema position, name); computed once per overload (the eager
    path asks when it computes a verdict, a graph at its definition)."""
    found = _written.get(op)
    if found is None:
        schema = op._schema
        if torch.Tag.inplace_view in op.tags or f"{schema.name}.{op._overloadname}" in OVERLAP_ALLOWED:
            found = ()
        else:
            unmarked = WRITTEN_UNMARKED.get(schema.name, ())
            found = tuple(
                (i, a.name)
                for i, a in enumerate(schema.arguments)
                if a.alias_info is not None and a.alias_info.is_write or a.name in unmarked
            )
        _written[op] = found
    return found


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether some two elements of `t` may be one memory location: its dims of more than one element, ordered by
    stride, must each step past all that the smaller ones reach (stride > sum of stride * (size - 1) below it).
    Exact for what torch's views make (expanded, sliced, permuted, channels-last); a layout that does not overlap
    but fails this order test (strides that interleave) is refused as well, as torch's `is_non_overlapping_and_dense`
    would call it not dense. An empty tensor has no element to write."""
    if t.is_contiguous():  # torch's cached flag: the common case, one call
        return False
    shape = t.shape
    if 0 in shape:
        return False
    reach = 0
    for stride, size in sorted((st, n) for n, st in zip(shape, t.stride(), strict=True) if n != 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _overlapping(name: str, what: str, t: torch.Tensor) -> InvalidArgument:
    return InvalidArgument(
        f"{name}: unsupported operation: argument {what!r} is written, and some of its elements refer to a single "
        f"memory location (sizes {list(t.shape)}, strides {list(t.stride())}: an expanded or overlapping view); "
        "clone() it first"
    )


def check_written(op: torch._ops.OpOverload, args: Args, kwargs: Kwargs) -> None:
    """Refuse (INVALID_ARGUMENT, naming the op and the argument) any tensor op writes whose elements overlap in
    memory (`overlaps_itself`). A function of its arguments' shapes and strides only: part of an eager op's cached
    verdict (so learned runs and the native runner, which run only steps whose verdict was cached and check their
    inputs' strides per record, never meet one) and of a graph's definition (its slots' layouts are fixed there)."""
    for i, name in written_params(op):
        v = args[i] if i < len(args) else kwargs.get(name)
        if isinstance(v, torch.Tensor):
            if overlaps_itself(v):
                raise _overlapping(op._schema.name, name, v)
        elif isinstance(v, list | tuple):  # Tensor(a!)[]
            for k, t in enumerate(v):
                if isinstance(t, torch.Tensor) and overlaps_itself(t):
                    raise _overlapping(op._schema.name, f"{name}[{k}]", t)


# ---- read tensors whose elements overlap in memory ----
#
# The read side of the rule above: a kernel that reads an argument as numel() contiguous elements from its data
# pointer (whatever its strides) stays inside the storage when the tensor does not overlap itself (it spans at least
# numel() elements from there), and reads past it when it does (an expanded view of one element: numel() - 1
# elements of whatever lies after the storage, another session's bytes under `--isolation thread` or on a GPU shared
# by sessions). tests/integration/oob_sweep.py places every tensor argument of every allowlisted overload against a
# PROT_NONE guard page in six layouts; the arguments below are the ones whose CPU kernels read past the storage
# (SIGSEGV there). Honest clients never send them overlapping: autograd gives these backwards its saved forward
# outputs (mean, rstd, indices) and `grad.contiguous()` (group norm), and locally torch reads the same bytes past
# the storage (a wrong result or a crash), so such a call has no meaning to keep. Refused (INVALID_ARGUMENT naming the
# op and the argument) when the verdict is computed, as written tensors are: the native runner and learned runs
# never meet them, and they cost nothing per op. Arguments torch's kernels do read through the strides stay allowed
# overlapping (layer norm's and the pools' grad_output: `x.sum().backward()` sends an expanded one).
READ_DENSE: dict[str, tuple[str, ...]] = {
    "aten::native_layer_norm_backward": ("mean", "rstd"),
    "aten::native_group_norm_backward": ("grad_out", "input", "mean", "rstd", "weight"),
    "aten::adaptive_max_pool3d_backward": ("indices",),
    "aten::fractional_max_pool2d_backward": ("indices",),
    "aten::fractional_max_pool3d_backward": ("indices",),
    "aten::median": ("self",),  # the dim overloads' `median_with_indices_impl`
    "aten::nanmedian": ("self",),
    # the fused attention (server/attention.py) gives this kernel copies of such views; a raw client may call it
    "aten::_scaled_dot_product_flash_attention_for_cpu": ("query", "key", "value"),
}
_read: dict[torch._ops.OpOverload, tuple[tuple[int, str], ...]] = {}


def read_params(op: torch._ops.OpOverload) -> tuple[tuple[int, str], ...]:
    """The arguments op's kernels read as contiguous memory (`READ_DENSE`), each (schema position, name)."""
    found = _read.get(op)
    if found is None:
        names = READ_DENSE.get(op._schema.name, ())
        found = _read[op] = tuple((i, a.name) for i, a in enumerate(op._schema.arguments) if a.name in names)
    return found


def check_reads(op: torch._ops.OpOverload, args: Args, kwargs: Kwargs) -> None:
    """Refuse (INVALID_ARGUMENT, naming the op and the argument) a tensor whose elements overlap in memory as an
    argument `READ_DENSE` names. Shapes and strides only: part of an eager op's verdict and a graph's definition."""
    for i, name in read_params(op):
        v = args[i] if i < len(args) else kwargs.get(name)
        if isinstance(v, torch.Tensor) and overlaps_itself(v):
            raise InvalidArgument(
                f"{op._schema.name}: unsupported operation: its kernel reads argument {name!r} as contiguous memory, "
                f"and some of its elements refer to a single memory location (sizes {list(v.shape)}, strides "
                f"{list(v.stride())}: an expanded or overlapping view); pass a contiguous tensor (.contiguous())"
            )
