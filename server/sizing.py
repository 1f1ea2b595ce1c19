"""How many bytes an op will allocate, before it runs: the daemon admits an op against the session's quota and
the device's free memory with this number.

- `MetaSizer.new_bytes`: run the op on `meta` tensors (no data, no allocation) and count the storages it
  creates or grows; cached by (op, metadata, arguments). NO_META when the op has no meta kernel or a
  data-dependent output shape.
- `no_meta_bound`: for those, an upper bound computed from the real inputs without allocating the output: a
  2-element `bincount`, `one_hot` or `repeat_interleave`, or a `nonzero` of a huge expanded view, is refused
  before it can exhaust host memory.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map

from gpupool.errors import InvalidArgument, ResourceExhausted

from . import checks
from .opargs import Args, Kwargs, arg, checked, tensors

_META = torch.device("meta")

# The op has no meta kernel or a data-dependent output shape: its size is known only after running it.
NO_META = -1
# Distinct element layouts (shapes, strides, dtypes, scalar types) a `_foreach_` op's lists longer than 256 entries
# may hold: each is sized by one meta call (`MetaSizer._per_element`), ~0.3 ms here. An optimizer's lists hold a
# model's parameters, whose shapes repeat layer after layer (tens of distinct ones).
MAX_LIST_LAYOUTS = 1024


def _meta_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("T", value.dtype, tuple(value.shape), value.stride(), value.storage_offset())
    if isinstance(value, list | tuple):
        return tuple(_meta_key(v) for v in value)
    if isinstance(value, float) and value != value:  # NaN != NaN would defeat the cache
        return ("nan",)
    return (type(value).__name__, value)


class MetaSizer:
    """How many new bytes an op will allocate, computed on `meta` tensors and cached by (op, metadata, args)."""

    def __init__(self, max_entries: int = 8192) -> None:
        self._cache: dict[Any, int] = {}
        self._max = max_entries
        self._lock = threading.Lock()

    def new_bytes(self, op: torch._ops.OpOverload, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
        """Bytes of storage the op allocates or grows, or NO_META when only running it can tell."""
        if torch.Tag.dynamic_output_shape in op.tags:
            return NO_META
        if _too_long(args) or _too_long(list(kwargs.values())):  # a key of megabytes, 8192 times over
            name = op._schema.name
            if name.startswith("aten::_foreach_"):
                return self._per_element(op, args, kwargs)
            if name in _LONG_LISTS:
                return int(checked(name, _LONG_LISTS[name], args, kwargs))
            return _meta_new_bytes(op, args, kwargs)
        key: Any = (op, _meta_key(tuple(args)), _meta_key(tuple(sorted(kwargs.items()))))
        if op._schema.is_mutable:  # an out= op or a resize grows what its storages lack: their sizes are part of it
            key = (key, checks.storage_sizes(args, kwargs))
        try:
            hit = self._cache.get(key)
        except TypeError:  # unhashable argument: compute without caching
            return _meta_new_bytes(op, args, kwargs)
        if hit is not None:
            return hit
        size = _meta_new_bytes(op, args, kwargs)
        with self._lock:
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[key] = size
        return size

    def _per_element(self, op: torch._ops.OpOverload, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
        """`new_bytes` of a `_foreach_` op over lists longer than `_too_long`'s: its meta kernel sizes element by
        element in Python (~250-300 us each here: 65,536 one-element tensors held the device's thread ~20 s a
        command, round 42), and what element i allocates depends only on the i-th entries' layouts and scalars'
        types (the outputs are new tensors, one per element; nothing grows in place). So each distinct element
        layout is sized once, on one-element lists (cached as any short call), times its count; a list of more than
        MAX_LIST_LAYOUTS distinct ones is refused (RESOURCE_EXHAUSTED) before any is sized."""
        per = {a.name for a in op._schema.arguments if str(a.type) in _PER_ELEMENT}  # Tensor[], Scalar[] (not int[])
        names = [a.name for a in op._schema.arguments]
        lists = [i for i, a in enumerate(args) if isinstance(a, list | tuple) and i < len(names) and names[i] in per]
        klists = [k for k, v in kwargs.items() if isinstance(v, list | tuple) and k in per]
        if not lists and not klists:
            return _meta_new_bytes(op, args, kwargs)
        n = max([len(args[i]) for i in lists] + [len(kwargs[k]) for k in klists])
        columns = [args[i] for i in lists] + [kwargs[k] for k in klists]
        groups: dict[Any, list[int]] = {}  # an element's layouts -> [its first index, how many]
        whole = [c for c in columns if len(c) == n]
        if len(whole) < len(columns):  # lists of different lengths: torch refuses them (its message, one element)
            j = min(len(c) for c in columns)
            return self.new_bytes(
                op,
                [args[i][j : j + 1] if i in lists else a for i, a in enumerate(args)],
                {k: (v[j : j + 1] if k in klists else v) for k, v in kwargs.items()},
            )
        for j, key in enumerate(zip(*[map(_element_key, c) for c in columns], strict=True)):
            seen = groups.get(key)
            if seen is not None:
                seen[1] += 1
                continue
            if len(groups) >= MAX_LIST_LAYOUTS:
                raise ResourceExhausted(
                    f"{op._schema.name}: tensor lists of {n} entries in more than {MAX_LIST_LAYOUTS} distinct "
                    "shapes, strides or dtypes: sizing them would hold the device; split the call"
                )
            groups[key] = [j, 1]
        total = 0
        for j, count in groups.values():
            one = list(args)
            for i in lists:
                one[i] = args[i][j : j + 1]
            kone = {k: (v[j : j + 1] if k in klists else v) for k, v in kwargs.items()}
            size = self.new_bytes(op, one, kone)
            if size == NO_META:
                return NO_META
            total += count * size
        return total


_PER_ELEMENT = frozenset({"List[Tensor]", "List[Optional[Tensor]]", "List[number]"})


def _element_key(value: Any) -> Any:
    """What an entry of a list argument contributes to the bytes its element allocates or grows: a tensor's layout
    and its storage's size (an out= list's tensor grows its storage to what it lacks), a scalar's type (not its
    value: a `ScalarList`'s per-element values change no size)."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.shape, value.stride(), value.storage_offset(), value.untyped_storage().nbytes())
    return type(value)


def _block_diag(args: Args, kwargs: Kwargs) -> int:
    """`block_diag`'s output bytes from its inputs' shapes (its meta kernel concatenates block by block in Python:
    ~540 us an input here, 65,536 inputs ~35 s of the device's thread): rows and columns summed, at the largest
    dtype the inputs promote to (an upper bound of torch's result type)."""
    rows = cols = 0
    dtype = None
    for i, t in enumerate(arg(args, kwargs, 0, "tensors")):
        if t.dim() > 2:
            raise InvalidArgument(
                f"torch.block_diag: Input tensors must have 2 or fewer dimensions. Input {i} has {t.dim()} dimensions"
            )
        r, c = (1, 1) if t.dim() == 0 else (1, t.shape[0]) if t.dim() == 1 else tuple(t.shape)
        rows, cols = rows + r, cols + c
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return rows * cols * (dtype.itemsize if dtype is not None else 4)


def _joined(args: Args, kwargs: Kwargs) -> int:
    """`stack`'s and `cat`'s output bytes from their inputs' shapes (their meta kernels: ~28 and ~13 us an input
    here): every input's elements once (the kernels refuse shapes that do not fit together), at the largest dtype
    they promote to."""
    dtype = None
    numel = 0
    for t in arg(args, kwargs, 0, "tensors"):
        numel += t.numel()
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return numel * dtype.itemsize if dtype is not None else 0


# Ops sized from their list arguments' shapes, not their meta kernels, where a list is longer than `_too_long`'s limit
_LONG_LISTS: dict[str, Callable[[Args, Kwargs], int]] = {
    "aten::block_diag": _block_diag,
    "aten::stack": _joined,
    "aten::cat": _joined,
}


def _too_long(values: Sequence[Any], limit: int = 256) -> bool:
    return any(isinstance(v, list | tuple) and len(v) > limit for v in values)


def _meta_new_bytes(op: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    storages: dict[int, torch.Tensor] = {}  # real storage id -> meta tensor sharing one meta storage

    def to_meta(value: Any) -> Any:
        if isinstance(value, torch.device):
            return _META  # factories must not allocate for real while being sized
        if not isinstance(value, torch.Tensor):
            return value
        real = value.untyped_storage()
        base = storages.get(real._cdata)
        if base is None:
            base = torch.empty(real.nbytes(), dtype=torch.uint8, device="meta")
            storages[real._cdata] = base
        meta = torch.empty(0, dtype=value.dtype, device="meta")
        meta.set_(base.untyped_storage(), value.storage_offset(), value.shape, value.stride())
        return meta

    meta_args = tree_map(to_meta, list(args))
    meta_kwargs = tree_map(to_meta, dict(kwargs))
    before = {b.untyped_storage()._cdata: b.untyped_storage().nbytes() for b in storages.values()}
    try:
        out = op(*meta_args, **meta_kwargs)
    except NotImplementedError:
        return NO_META
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:  # torch's Python meta kernels
        # (decompositions) refuse bad arguments with AssertionError: nll_loss_forward with a 2-D target
        if "meta" in str(exc).lower() and ("not implemented" in str(exc).lower() or "backend" in str(exc).lower()):
            return NO_META
        raise InvalidArgument(str(exc).split("\n")[0]) from None
    total = 0
    for b in storages.values():  # inputs grown by resize_/out= variants
        s = b.untyped_storage()
        total += max(0, s.nbytes() - before[s._cdata])
    seen = set(before)
    for t in _flatten(out):
        s = t.untyped_storage()
        if s._cdata not in seen:
            seen.add(s._cdata)
            total += s.nbytes()
    return total


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _flatten(v)]
    return []


# ---- ops without meta kernels: bounds from the real inputs ----


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _generic(args: Args, kwargs: Kwargs) -> int:
    """Outputs shaped like the inputs (elementwise, reductions, gradients): at most twice their bytes."""
    return 2 * sum(_nbytes(t) for t in tensors(list(args) + list(kwargs.values()))) + 64


def _nonzero(args: Args, kwargs: Kwargs) -> int:
    self = args[0]
    return int(torch.count_nonzero(self)) * max(1, self.dim()) * 8


def _masked_select(args: Args, kwargs: Kwargs) -> int:
    self, mask = arg(args, kwargs, 0, "self"), arg(args, kwargs, 1, "mask")
    numel = math.prod(torch.broadcast_shapes(self.shape, mask.shape))
    repeat = numel // mask.numel() if mask.numel() else 0
    return int(torch.count_nonzero(mask)) * repeat * self.element_size()


def _max_plus_one(t: torch.Tensor) -> int:
    return int(t.max()) + 1 if t.numel() else 0


def _bincount(args: Args, kwargs: Kwargs) -> int:
    self = args[0]
    return max(int(arg(args, kwargs, 2, "minlength", 0)), _max_plus_one(self)) * 8


def _one_hot(args: Args, kwargs: Kwargs) -> int:
    self, classes = args[0], int(arg(args, kwargs, 1, "num_classes", -1))
    return self.numel() * (classes if classes >= 0 else _max_plus_one(self)) * 8


def _repeat_interleave(args: Args, kwargs: Kwargs) -> int:
    repeats = args[0]
    total = int(repeats.sum()) if repeats.numel() else 0
    size = arg(args, kwargs, 1, "output_size")
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
    bins = arg(args, kwargs, 1, "bins", 100)
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
    return int(checked(op._schema.name, _BOUNDS.get(op._schema.name, _generic), args, kwargs))
