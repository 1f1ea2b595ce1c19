"""A graph's dry run of an op over long tensor lists, without torch's Python meta kernels entry by entry.

A graph definition runs each op on meta tensors (graph_build `_prebuild`), and its trace runs them again
(graph_trace's recorder): they need every output's metadata, not only its bytes (sizing.py sizes eager ops). The meta
kernels of `_foreach_*`, `block_diag`, `cat` and `stack` are torch's Python, entry by entry (~130-540 us each here,
several times that under load): a definition naming one slot 16,384 times held the device's thread for seconds (round
42: `block_diag` 5.7 s, `_foreach_neg` 2.2 s; 47 s and 18 s at load 13). Lists longer than `sizing._too_long`'s 256
entries are run here instead:

- `_foreach_*`: what element i gives depends only on the i-th entries' layouts and scalars' types, so each distinct
  element (`sizing._element_key`) runs once on one-element lists and its outputs are laid out again for the others
  (fresh meta tensors of the same metadata); more than `sizing.MAX_LIST_LAYOUTS` distinct ones are RESOURCE_EXHAUSTED,
  as eager ops' sizing. An out= list (which each element may resize, sharing storages) over 256 entries is refused.
- `block_diag`, `cat`, `stack`: the kernel runs on the distinct entries, each twice (so the joined dimension is at
  least 2 long, its stride not a size-1 dimension's), and the output is that result's layout with the joined
  dimension the whole list's: one memory format decides both (`_laid_out`), else the list runs in one piece, up to
  `WHOLE_MAX` entries (refused beyond). An out= call over more than 256 entries is refused.
- any other op that returns tensors (`_chunk_cat`, round 44): its kernel over the whole list, up to `WHOLE_MAX`
  entries (refused beyond); one that returns nothing (the fused optimizers, in place, values only) runs whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from gpupool.errors import InvalidArgument, ResourceExhausted

from . import sizing

_META = torch.device("meta")
# A list whose output layout the distinct entries cannot tell runs whole up to this many entries (~0.1-0.5 s here).
WHOLE_MAX = 1024
_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def run(op: torch._ops.OpOverload, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """`fn(*args, **kwargs)` (the op's kernel on meta tensors), the same outputs' metadata computed from the distinct
    entries of a list longer than 256."""
    if not (sizing._too_long(args) or sizing._too_long(list(kwargs.values()))):
        return fn(*args, **kwargs)
    name = op._schema.name
    if name.startswith("aten::_foreach_"):
        return _foreach(op, fn, args, kwargs)
    if name in _JOINED:
        return _joined(op, fn, args, kwargs)
    if op._schema.returns:  # (round 44: `_chunk_cat` over 16,384 entries was ~1.5 s of its meta kernel)
        n = max(len(v) for v in [*args, *kwargs.values()] if isinstance(v, list | tuple))
        return _whole(op, fn, args, kwargs, n)
    return fn(*args, **kwargs)  # an in-place op of values only (`_fused_adam_`): its meta kernel makes no output


def _foreach(op: torch._ops.OpOverload, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    per = {a.name for a in op._schema.arguments if str(a.type) in sizing._PER_ELEMENT}
    names = [a.name for a in op._schema.arguments]
    lists = [i for i, a in enumerate(args) if isinstance(a, list | tuple) and i < len(names) and names[i] in per]
    klists = [k for k, v in kwargs.items() if isinstance(v, list | tuple) and k in per]
    columns = [args[i] for i in lists] + [kwargs[k] for k in klists]
    if not columns or len({len(c) for c in columns}) > 1:
        return fn(*args, **kwargs)  # torch refuses lists of different lengths before any entry
    if any(w != "self" for w in _written(op)):
        raise InvalidArgument(
            f"{op._schema.name}: an out= list of {len(columns[0])} entries in a graph (at most 256: each may resize "
            "its tensor); split the call"
        )
    groups: dict[Any, list[int]] = {}  # an element's layouts -> the indexes of its entries
    for j, key in enumerate(zip(*[map(sizing._element_key, c) for c in columns], strict=True)):
        seen = groups.get(key)
        if seen is not None:
            seen.append(j)
            continue
        if len(groups) >= sizing.MAX_LIST_LAYOUTS:
            raise ResourceExhausted(
                f"{op._schema.name}: tensor lists of {len(columns[0])} entries in more than {sizing.MAX_LIST_LAYOUTS} "
                "distinct shapes, strides or dtypes in a graph: its dry run would hold the device; split the call"
            )
        groups[key] = [j]
    outputs: list[Any] = [None] * len(columns[0])
    returns = [str(r.type) for r in op._schema.returns]
    for indexes in groups.values():
        j = indexes[0]
        one = [args[i][j : j + 1] if i in lists else a for i, a in enumerate(args)]
        kone = {k: (v[j : j + 1] if k in klists else v) for k, v in kwargs.items()}
        out = fn(*one, **kone)
        if not returns:
            continue
        if returns != ["List[Tensor]"] or not isinstance(out, list | tuple) or len(out) != 1:
            return fn(*args, **kwargs)  # (no such `_foreach_` op: every one returns nothing or a tensor an element)
        first = out[0]
        outputs[j] = first
        like = _maker(first)
        for k in indexes[1:]:
            outputs[k] = like()
    if not returns:
        return None
    if any(o is None for o in outputs):
        return fn(*args, **kwargs)
    return outputs


def _written(op: torch._ops.OpOverload) -> list[str]:
    return [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def _whole(op: torch._ops.OpOverload, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any],
           n: int) -> Any:  # fmt: skip
    """The kernel over the whole list, where its layout could not be told from the distinct entries': up to
    `WHOLE_MAX` entries (a fraction of a second), else refused."""
    if n > WHOLE_MAX:
        raise InvalidArgument(
            f"{op._schema.name} over {n} tensors of these layouts in a graph (at most {WHOLE_MAX}: its dry run would "
            "hold the device); split the call"
        )
    return fn(*args, **kwargs)


def _maker(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """`_like(t)` as a call of no argument: one `empty_strided` where that lays a tensor out as `t` on a storage of
    `t`'s size (an output of its own: offset 0, its storage its extent; round 44: ~12 us a call here where `_like`'s
    three were ~25, 65,536 outputs of `_foreach_norm` in a graph's dry run), else `_like`."""
    shape, stride, dtype = tuple(t.shape), tuple(t.stride()), t.dtype
    if t.storage_offset() != 0 or t.layout != torch.strided:
        return lambda: _like(t)
    made = torch.empty_strided(shape, stride, dtype=dtype, device=_META)
    if made.untyped_storage().nbytes() != t.untyped_storage().nbytes():
        return lambda: _like(t)
    return lambda: torch.empty_strided(shape, stride, dtype=dtype, device=_META)


def _like(t: torch.Tensor) -> torch.Tensor:
    """A fresh meta tensor laid out as `t`, on a storage of `t`'s size."""
    storage = torch.empty(t.untyped_storage().nbytes(), dtype=torch.uint8, device=_META)
    fresh = torch.empty(0, dtype=t.dtype, device=_META)
    fresh.set_(storage.untyped_storage(), t.storage_offset(), t.shape, t.stride())
    return fresh


def _joined(op: torch._ops.OpOverload, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    given = list(args)
    if given and isinstance(given[0], list | tuple):
        tensors, positional = list(given[0]), True
    elif isinstance(kwargs.get("tensors"), list | tuple):
        tensors, positional = list(kwargs["tensors"]), False
    else:
        return fn(*args, **kwargs)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return fn(*args, **kwargs)
    if _written(op):
        raise InvalidArgument(
            f"{op._schema.name}: out= of a list of {len(tensors)} tensors in a graph (at most 256); split the call"
        )
    firsts: dict[Any, torch.Tensor] = {}
    for t in tensors:
        firsts.setdefault((t.dtype, tuple(t.shape), t.stride(), t.storage_offset()), t)
    reduced = [t for t in firsts.values() for _ in range(2)]
    if positional:
        small = fn(reduced, *given[1:], **kwargs)
    else:
        small = fn(*given, **{**kwargs, "tensors": reduced})
    shape = _JOINED[op._schema.name](tensors, reduced, small, given, kwargs)
    out = None if shape is None else _laid_out(small, shape)
    return out if out is not None else _whole(op, fn, args, kwargs, len(tensors))


def _laid_out(small: torch.Tensor, shape: list[int]) -> torch.Tensor | None:
    """A meta tensor of `shape` laid out in the memory format whose strides `small` has, if one has them."""
    for f in _FORMATS:
        try:
            if torch.empty(small.shape, device=_META, memory_format=f).stride() == small.stride():
                return torch.empty(shape, dtype=small.dtype, device=_META, memory_format=f)
        except RuntimeError:  # channels_last of another number of dimensions
            continue
    return None


def _dim(given: list[Any], kwargs: Mapping[str, Any], ndim: int) -> int:
    d = given[1] if len(given) > 1 else kwargs.get("dim", 0)
    return int(d) % ndim if ndim else 0


def _cat_shape(tensors: list[torch.Tensor], reduced: list[torch.Tensor], small: torch.Tensor, given: list[Any],
               kwargs: Mapping[str, Any]) -> list[int] | None:  # fmt: skip
    """The whole list's output shape: `small`'s, its cat dimension summed over every entry of its dimensions (a
    legacy 1-D empty entry, which cat skips, adds nothing)."""
    d = _dim(given, kwargs, small.dim())
    shape = list(small.shape)
    shape[d] = sum(t.shape[d] for t in tensors if t.dim() == small.dim())
    if sum(t.shape[d] for t in reduced if t.dim() == small.dim()) != small.shape[d]:
        return None
    return shape


def _stack_shape(tensors: list[torch.Tensor], reduced: list[torch.Tensor], small: torch.Tensor, given: list[Any],
                 kwargs: Mapping[str, Any]) -> list[int] | None:  # fmt: skip
    d = _dim(given, kwargs, small.dim())
    if small.shape[d] != len(reduced):
        return None
    shape = list(small.shape)
    shape[d] = len(tensors)
    return shape


def _block_diag_shape(tensors: list[torch.Tensor], reduced: list[torch.Tensor], small: torch.Tensor,
                      given: list[Any], kwargs: Mapping[str, Any]) -> list[int] | None:  # fmt: skip
    def two(t: torch.Tensor) -> tuple[int, int]:
        return (1, 1) if t.dim() == 0 else (1, t.shape[0]) if t.dim() == 1 else (t.shape[0], t.shape[1])

    if small.dim() != 2 or [sum(two(t)[i] for t in reduced) for i in (0, 1)] != list(small.shape):
        return None
    return [sum(two(t)[i] for t in tensors) for i in (0, 1)]


_JOINED: dict[str, Callable[..., list[int] | None]] = {
    "aten::cat": _cat_shape,
    "aten::stack": _stack_shape,
    "aten::block_diag": _block_diag_shape,
}
