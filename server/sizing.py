"""Upper bounds on the bytes an op without a meta kernel (or with a data-dependent output shape) will allocate,
computed from the real inputs without allocating their output: a 2-element `bincount`, `one_hot` or
`repeat_interleave`, or a `nonzero` of a huge expanded view, is refused before it can exhaust host memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from gpupool.server.guards import Args, Kwargs, _arg, _checked, _tensors

from gpupool.errors import InvalidArgument

_META = torch.device("meta")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _generic(args: Args, kwargs: Kwargs) -> int:
    """Outputs shaped like the inputs (elementwise, reductions, gradients): at most twice their bytes."""
    return 2 * sum(_nbytes(t) for t in _tensors(list(args) + list(kwargs.values()))) + 64


def _nonzero(args: Args, kwargs: Kwargs) -> int:
    self = args[0]
    return int(torch.count_nonzero(self)) * max(1, self.dim()) * 8


def _masked_select(args: Args, kwargs: Kwargs) -> int:
    self, mask = _arg(args, kwargs, 0, "self"), _arg(args, kwargs, 1, "mask")
    numel = math.prod(torch.broadcast_shapes(self.shape, mask.shape))
    repeat = numel // mask.numel() if mask.numel() else 0
    return int(torch.count_nonzero(mask)) * repeat * self.element_size()


def _max_plus_one(t: torch.Tensor) -> int:
    return int(t.max()) + 1 if t.numel() else 0


def _bincount(args: Args, kwargs: Kwargs) -> int:
    self = args[0]
    return max(int(_arg(args, kwargs, 2, "minlength", 0)), _max_plus_one(self)) * 8


def _one_hot(args: Args, kwargs: Kwargs) -> int:
    self, classes = args[0], int(_arg(args, kwargs, 1, "num_classes", -1))
    return self.numel() * (classes if classes >= 0 else _max_plus_one(self)) * 8


def _repeat_interleave(args: Args, kwargs: Kwargs) -> int:
    repeats = args[0]
    total = int(repeats.sum()) if repeats.numel() else 0
    size = _arg(args, kwargs, 1, "output_size")
    if size is not None and int(size) != total:  # the kernel writes `total` elements into `output_size`
        raise InvalidArgument(f"output_size {size} does not match the sum of repeats {total}")
    return total * 8


def _unique(args: Args, kwargs: Kwargs) -> int:
    self = args[0]
    return self.numel() * (self.element_size() + 16) + 64


def _index(args: Args, kwargs: Kwargs) -> int:
    """Boolean masks become as many long indices as they have True entries; the meta kernel does the rest."""
    self, indices = args[0], args[1]
    meta: list[torch.Tensor | None] = []
    for idx in indices:
        if idx is None:
            meta.append(None)
        elif idx.dtype in (torch.bool, torch.uint8):
            n = int(torch.count_nonzero(idx))
            meta.extend([torch.empty(n, dtype=torch.long, device=_META)] * max(1, idx.dim()))
        else:
            meta.append(torch.empty(idx.shape, dtype=torch.long, device=_META))
    try:
        out = torch.ops.aten.index.Tensor(torch.empty(self.shape, dtype=self.dtype, device=_META), meta)
    except (RuntimeError, IndexError, TypeError, ValueError) as exc:
        raise InvalidArgument(str(exc).split("\n")[0]) from None
    return _nbytes(out)


def _histogram(args: Args, kwargs: Kwargs) -> int:
    bins = _arg(args, kwargs, 1, "bins", 100)
    n = math.prod(bins) if isinstance(bins, list) else int(bins) if isinstance(bins, int) else 0
    return 2 * (n + len(bins) if isinstance(bins, list) else n + 1) * 8 + _generic(args, kwargs)


def _adaptive_pool(args: Args, kwargs: Kwargs) -> int:
    self, size = args[0], list(args[1])
    spatial = math.prod(self.shape[-len(size) :]) if size and self.dim() >= len(size) else 1
    return (self.numel() // max(1, spatial)) * math.prod(size) * self.element_size()


_BOUNDS: dict[str, Callable[[Args, Kwargs], int]] = {
    "aten::nonzero": _nonzero,
    "aten::argwhere": _nonzero,
    "aten::masked_select": _masked_select,
    "aten::bincount": _bincount,
    "aten::one_hot": _one_hot,
    "aten::repeat_interleave": _repeat_interleave,
    "aten::_unique": _unique,
    "aten::_unique2": _unique,
    "aten::unique_dim": _unique,
    "aten::unique_consecutive": _unique,
    "aten::unique_dim_consecutive": _unique,
    "aten::index": _index,
    "aten::histogram": _histogram,
    "aten::_histogramdd_from_bin_cts": _histogram,
    "aten::_histogramdd_bin_edges": _histogram,
    "aten::adaptive_avg_pool2d": _adaptive_pool,
    "aten::adaptive_avg_pool3d": _adaptive_pool,
}


def no_meta_bound(op: torch._ops.OpOverload, args: Args, kwargs: Kwargs) -> int:
    """Most bytes the op may allocate; computed from the real inputs (one pass over them at most)."""
    return int(_checked(op._schema.name, _BOUNDS.get(op._schema.name, _generic), args, kwargs))
