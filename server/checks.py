"""Op signatures: what the daemon's shape-only checks of an op depend on, so that their verdict is computed once.

A training loop sends the same op on the same shapes thousands of times. The checks of `executor._run_op` that
look only at the op and at its arguments' metadata and plain values (enum types, element counts against the
quota, list counts, the compute bound, the bytes the meta kernel allocates) give the same answer for the same
signature: tensors by (dtype, shape, stride, storage offset), tensor lists by their tensors, `Scalar` arguments of
ops with tensor inputs by their Python type only (they decide type promotion, never a shape: an optimizer's
changing step sizes still hit), everything else by type and value. Checks that read tensor values (index
ranges of embedding and pooling backwards, `guards.validate`), the quota and handle limits run on every op.
Ops whose list counts may read a tensor's value (`tensor_split` with a tensor) are never cached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import fallbacks, guards

_Tensor = torch.Tensor
_Plan = tuple[tuple[bool, ...], frozenset[str]]  # per positional argument: Scalar keyed by type; those kwargs


def _plan(op: torch._ops.OpOverload) -> _Plan | None:
    schema = op._schema
    if schema.name in guards._LIST_COUNTS:
        return None
    elems = []  # each argument's type, Optional and List unwrapped once
    for a in schema.arguments:
        t = a.type
        if isinstance(t, torch.OptionalType):
            t = t.getElementType()
        if isinstance(t, torch.ListType):
            t = t.getElementType()
        elems.append(t)
    has_tensors = any(
        isinstance(t.getElementType() if isinstance(t, torch.OptionalType) else t, torch.TensorType) and not a.is_out
        for a, t in zip(schema.arguments, elems, strict=True)
    )
    by_type = [has_tensors and isinstance(t, torch.NumberType) for t in elems]
    names = frozenset(a.name for a, b in zip(schema.arguments, by_type, strict=True) if b)
    return tuple(by_type), names


# Factories that return uninitialized memory (the allocator's previous contents, possibly another session's).
UNINITIALIZED = frozenset(
    {
        "aten::empty",
        "aten::empty_strided",
        "aten::empty_like",
        "aten::empty_permuted",
        "aten::new_empty",
        "aten::new_empty_strided",
    }
)
# In-place ops that grow a storage without writing the new bytes. (An out= op resizes its output too, but then
# writes every element: zeroing after it would wipe its result.)
GROW_UNINITIALIZED = frozenset({"aten::resize_", "aten::resize_as_", "aten::_resize_output_"})


class OpPlan:
    """What the executor needs to know of one allowed op overload, computed once: no schema lookups per op."""

    __slots__ = (
        "op",
        "name",
        "takes_device",
        "seeded",
        "mutable",
        "layouts",
        "grown",
        "uninitialized",
        "into_out",
        "validate",
        "run",
        "sig",
        "reshapes",
    )

    def __init__(self, op: torch._ops.OpOverload, device: torch.device) -> None:
        schema = op._schema
        self.op = op
        self.name = schema.name
        self.takes_device = any(a.name == "device" and a.kwarg_only for a in schema.arguments)
        self.seeded = torch.Tag.nondeterministic_seeded in op.tags
        self.mutable = schema.is_mutable
        # whether some argument's layout is checked (`guards.check_written`, `check_reads`): a written one, or one a
        # kernel reads as contiguous memory
        self.layouts = bool(guards.written_params(op) or guards.read_params(op))
        self.grown = self.name in GROW_UNINITIALIZED
        self.uninitialized = self.name in UNINITIALIZED
        # its out= form: only `out`'s elements are zeroed after it (`sessions.zero_made`), not its whole storage
        self.into_out = self.uninitialized and any(a.is_out for a in schema.arguments)
        self.validate = self.name.startswith("aten::_foreach_") or guards.value_guarded(self.name)
        # fallbacks: accelerator-only ops; `op._op` is the builtin `OpOverload.__call__` calls (one Python frame less)
        self.run = guards.replacement(op) or fallbacks.lookup(op, device) or op._op
        self.sig = _plan(op)
        # may change a tensor's meta or storage in place: its written handles are recounted, learned runs check
        # their inputs' metas again (server/runs.py)
        self.reshapes = self.mutable and not _keeps_meta(op)


# In-place ops that write values only, never a tensor's sizes, strides or storage (besides the pointwise ones); the
# fused optimizers write their lists' elements in place (through data pointers their guard checked: server/guards.py).
_VALUES_ONLY = frozenset(
    {"aten::copy_", "aten::zero_", "aten::fill_", "aten::bernoulli_", "aten::normal_", "aten::uniform_"}
    | {f"aten::_fused_{name}_" for name in guards.FUSED_OPTIMIZERS}
)


def _keeps_meta(op: torch._ops.OpOverload) -> bool:
    """Whether a mutable op leaves every tensor's meta (dtype, sizes, strides, offset, storage) as it was: in-place
    pointwise ops (an in-place result never broadcasts to another shape), `_foreach_` in-place ops and a few
    others that write values only. Out= ops resize their outputs, `resize_`, `set_` and the in-place views
    (`t_`, `squeeze_`, ...) change metas: they do not."""
    schema = op._schema
    name = schema.name
    if any(a.is_out for a in schema.arguments) or "resize" in name or "set_" in name:
        return False
    return torch.Tag.pointwise in op.tags or name.startswith("aten::_foreach_") or name in _VALUES_ONLY


def _key(v: Any, by_type: bool) -> Any:
    tv = type(v)
    if isinstance(v, _Tensor):
        return (v.dtype, v.shape, v.stride(), v.storage_offset())
    if tv is list:
        if not by_type:  # a list of one plain type (int[] sizes, dims): one tuple, its values keyed with that type
            types = set(map(type, v))
            if len(types) == 1:
                t = types.pop()
                if t is int or t is float or t is bool:
                    return (list, t, tuple(v))
        return tuple(_key(x, by_type) for x in v)
    if by_type and (tv is float or tv is int or tv is bool or tv is complex):
        return tv
    return (tv, v)


def signature(op: OpPlan, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """A signature of the op's shape-only checks (hashable unless an argument is not: the caller's lookup then
    raises TypeError), or None if its checks must run every time."""
    plan = op.sig
    if plan is None:
        return None
    by_type, names = plan
    n = len(by_type)
    key: list[Any] = [op]  # the plan: hashed by identity (an OpOverload hashes in Python)
    for i, v in enumerate(args):
        if v.__class__ is _Tensor:  # the common case inline (`_key` keys every tensor the same way)
            key.append((v.dtype, v.shape, v.stride(), v.storage_offset()))
        else:
            key.append(_key(v, i < n and by_type[i]))
    if kwargs:
        for name in sorted(kwargs):
            key.append((name, _key(kwargs[name], name in names)))
    if op.reshapes:  # what an out= op or a resize grows depends on its tensors' storages too (`storage_sizes`)
        key.append(storage_sizes(args, kwargs))
    return tuple(key)


def storage_sizes(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[int, ...]:
    """The byte sizes of the storages of an op's tensor arguments (in lists too), in order, and which of them share
    one: what an op that may grow a storage (out=, `resize_`) allocates is the size it needs less what the storage
    holds, so a size learned for one layout holds for another tensor of that layout only with the same storage size
    (round 42, hostile42: `neg.out` into an empty view of a 12 MiB tensor, which grows nothing, taught the caches 0
    bytes for every zero-element `out`, and the next one grew 12 MiB unchecked); and outputs that share a storage
    grow it once, outputs of their own storages each theirs (red42: `_foreach_neg.out` into 64 views of one empty
    storage taught 1 MiB, and into 64 fresh empty tensors grew 64 MiB past a 16 MiB quota). A tensor whose storage
    an earlier one holds is keyed as -1 - that one's place."""
    sizes: list[int] = []
    first: dict[int, int] = {}  # a storage (its StorageImpl's address) -> the place of the first tensor holding it
    for v in (*args, *kwargs.values()):
        for t in v if type(v) is list or type(v) is tuple else (v,):
            if isinstance(t, _Tensor):
                storage = t.untyped_storage()
                seen = first.setdefault(storage._cdata, len(sizes))
                sizes.append(storage.nbytes() if seen == len(sizes) else -1 - seen)
    return tuple(sizes)
