"""Record templates: the compact eager records a training loop sends every step, decoded with one unpack.

A training step sends the same records every step (same op id, same argument layout, same non-tensor values),
only with other handle numbers and, for an optimizer, other step sizes. After a record was fully decoded
(`compact.decode_parts`, which stays the reference and the only path that reports malformed bytes), `learn` makes
a `Template` of it: one `struct.Struct` over the whole record whose output handles, tensor handles and the
numbers the op's verdict keys by type only (`checks.OpPlan.sig`: an optimizer's changing floats) are fields of
their own, and whose other bytes (op id, counts, tags, keywords, every other value) are `Ns` segments.

A later record hits a template when it has the template's length and its segments are byte for byte the
template's: it then has the same layout and the same non-tensor values (a number field holds any 8 bytes, as
the full decode reads them), so `fill` builds exactly what the full decode would (handles resolved in the same
order through the same session checks: a foreign, unknown, failed or half-uploaded handle raises the same error)
plus the op's verdict key: the template and its tensors' (dtype, shape, stride, offset), which determine the
full signature (`checks.signature`) since everything else in it is fixed by the template's bytes; for an op that may
grow a storage (out=, a resize: `OpPlan.reshapes`) also its storages' sizes and sharing (`checks.storage_sizes`).

A view argument (`compact.VIEW`: a handle and a geometry) has its handle as a field and its geometry among the
fixed bytes; its step (V_ARG, V_KW) carries the geometry (`compact.Geometry`) where other steps carry a count.
`fill` resolves the handle as for a tensor, keys the verdict by that tensor's meta (the view's meta follows from
its dtype and the fixed geometry) and applies the geometry with `compact.view_of`, whose checks against the
tensor's storage run for every record, as on the full decode.

A tensor list with views (`compact.VIEWS`) has each element's handle as a field and its kind byte and (for a view)
geometry among the fixed bytes; its step (LV_ARG, LV_KW) carries, per element, (field, geometry or None). `fill`
resolves the elements in order, keys the verdict by each handle's tensor's meta, and applies each geometry with
`compact.view_of`, as the full decode does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from gpupool import compact

from . import checks

T_ARG, T_KW, N_ARG, N_KW, L_ARG, L_KW, NL_ARG, NL_KW, C_ARG, C_KW, V_ARG, V_KW, LV_ARG, LV_KW = range(14)
MAX_TEMPLATES = 4096  # per session (each under a KiB); the table is cleared when full
PER_LAYOUT = 8  # templates kept per op id and record length (a loop calls `view` with many sizes)
# Round 37 (quota37): the table is bounded by bytes too. A template keeps its record's fixed bytes and decoded
# values (a list of 65,535 ints: Python objects of ~40 bytes each per 8 bytes of the wire; a tensor list with views
# one (field, geometry) per element): measured with tracemalloc at up to 12.7 bytes a byte of its record
# (bench/host_memory.py `_learned_record`), so that 4,096 templates of records near a frame's 16 MiB could hold
# ~800 GiB of the worker (under `--isolation thread`, of the daemon: every tenant's). Each is counted at
# `TEMPLATE_BYTES` + `BYTES_PER_RECORD_BYTE` a byte of its record, a session's at most `MAX_TEMPLATE_BYTES`, and a
# record longer than `MAX_TEMPLATE_RECORD` is not learned (it takes the full decode every time).
TEMPLATE_BYTES = 1024
BYTES_PER_RECORD_BYTE = 16
MAX_TEMPLATE_BYTES = 32 << 20
MAX_TEMPLATE_RECORD = 1 << 20  # two lists of 65,535 tensor handles (an optimizer's) fit; ~16 MiB counted


class Template:
    """One learned record layout (see the module docstring)."""

    __slots__ = (
        "size",
        "unpack",
        "fixed_of",
        "fixed",
        "n_out",
        "steps",
        "args",
        "kwargs",
        "plan",
        "keyed",
        "head",
        "nbytes",
    )

    def __init__(self, plan: Any) -> None:
        self.size = 0
        self.unpack: Callable[[bytes], tuple[Any, ...]] = struct.Struct("<").unpack_from
        self.fixed_of: Callable[[tuple[Any, ...]], Any] = itemgetter(0)
        self.fixed: Any = None
        self.n_out = 0
        # (kind, first field, argument index or keyword, count or a view's geometry)
        self.steps: list[tuple[int, int, Any, Any]] = []
        self.args: list[Any] = []  # the decoded arguments, None where each record puts its own
        self.kwargs: dict[str, Any] = {}
        self.plan = plan  # the op plan of the template's op id when it was learned
        self.keyed = plan.sig is not None  # whether the op's verdict is cached at all
        self.head: tuple[bytes, int] = (b"", 0)  # a record's first 5 bytes (op id, no name) and its length
        self.nbytes = TEMPLATE_BYTES  # the host memory it holds, estimated (`MAX_TEMPLATE_BYTES`)


class Table:
    """A session's templates: a record's first 5 bytes (op id, no name) -> its length -> templates, newest first."""

    __slots__ = ("heads", "count", "nbytes")

    def __init__(self) -> None:
        self.heads: dict[bytes, dict[int, list[Template]]] = {}
        self.count = 0
        self.nbytes = 0  # their `Template.nbytes` together

    def add(self, data: bytes, tpl: Template) -> None:
        """Keep `tpl`, learned from `data`: at most PER_LAYOUT per op id and length, MAX_TEMPLATES and
        MAX_TEMPLATE_BYTES in all (cleared when full; one alone past a quarter of that is not kept)."""
        if tpl.nbytes > MAX_TEMPLATE_BYTES // 4:
            return
        if self.count >= MAX_TEMPLATES or self.nbytes + tpl.nbytes > MAX_TEMPLATE_BYTES:
            self.heads.clear()
            self.count = self.nbytes = 0
        sizes = self.heads.setdefault(data[:5], {})
        seen = sizes.setdefault(len(data), [])
        if len(seen) >= PER_LAYOUT:
            self.nbytes -= seen.pop().nbytes  # the oldest
            self.count -= 1
        seen.insert(0, tpl)
        self.count += 1
        self.nbytes += tpl.nbytes

    def drop(self, op_id: int) -> None:
        """Forget the templates of an op id that was just defined anew (they were learned under its old name)."""
        sizes = self.heads.pop(compact.U32.pack(op_id) + b"\0", None)
        if sizes is not None:
            for seen in sizes.values():
                self.count -= len(seen)
                self.nbytes -= sum(t.nbytes for t in seen)


class _Layout:
    """The struct format being built: fixed byte runs become one `Ns` field each."""

    def __init__(self) -> None:
        self.fmt: list[str] = []
        self.run = 0
        self.count = 0
        self.fixed_at: list[int] = []
        self.steps: list[tuple[int, int, Any, Any]] = []

    def fixed(self, n: int) -> None:
        self.run += n

    def field(self, code: str, n: int = 1) -> int:
        self.flush()
        self.fmt.append(f"{n}{code}")
        self.count += n
        return self.count - n

    def flush(self) -> None:
        if self.run:
            self.fmt.append(f"{self.run}s")
            self.fixed_at.append(self.count)
            self.count += 1
            self.run = 0


def learn(data: bytes, args: list[Any], kwargs: dict[str, Any], plan: Any) -> Template | None:
    """A template of `data`, a record `compact.decode_parts` just decoded into `args` and `kwargs` without an
    error (so every byte of it is valid) for an op id whose plan is `plan`; None for a record that defines a name,
    or one longer than MAX_TEMPLATE_RECORD."""
    if data[4] or len(data) > MAX_TEMPLATE_RECORD:
        return None
    by_type, names = plan.sig if plan.sig is not None else ((), frozenset())
    lay = _Layout()
    n_out = data[5]
    lay.fixed(6)
    if n_out:
        lay.field("Q", n_out)
    pos = 6 + 8 * n_out
    n_args = data[pos]
    lay.fixed(1)
    pos += 1
    for i in range(n_args):
        pos = _value(lay, data, pos, i < len(by_type) and by_type[i], i, False)
    n_kwargs = data[pos]
    lay.fixed(1)
    pos += 1
    for _ in range(n_kwargs):
        k = data[pos]
        key = data[pos + 1 : pos + 1 + k].decode("ascii")
        lay.fixed(1 + k)
        pos = _value(lay, data, pos + 1 + k, key in names, key, True)
    if pos != len(data):  # cannot happen after a full decode; never guess
        return None
    lay.flush()
    st = struct.Struct("<" + "".join(lay.fmt))
    tpl = Template(plan)
    tpl.size = st.size
    tpl.head = (data[:5], len(data))
    tpl.nbytes = TEMPLATE_BYTES + BYTES_PER_RECORD_BYTE * len(data)
    tpl.unpack = st.unpack_from
    tpl.fixed_of = itemgetter(*lay.fixed_at)
    tpl.fixed = tpl.fixed_of(st.unpack_from(data))
    tpl.n_out = n_out
    tpl.steps = lay.steps
    tpl.args, tpl.kwargs = list(args), dict(kwargs)
    for kind, _, where, _ in lay.steps:  # never keep a tensor alive; each record puts its own there
        if kind in (T_ARG, N_ARG, L_ARG, NL_ARG, V_ARG, LV_ARG):
            tpl.args[where] = None
        elif kind in (T_KW, N_KW, L_KW, NL_KW, V_KW, LV_KW):
            tpl.kwargs[where] = None
    return tpl


def _value(lay: _Layout, data: bytes, pos: int, by_type: bool, where: Any, kw: bool) -> int:
    """Lay out the (valid) argument at `pos`; returns the position after it."""
    tag = data[pos]
    if tag == compact.TENSOR:
        lay.fixed(1)
        lay.steps.append((T_KW if kw else T_ARG, lay.field("Q"), where, 1))
        return pos + 9
    if tag == compact.VIEW:
        lay.fixed(1)
        field = lay.field("Q")
        g, end = compact.read_geometry(data, pos + 9)
        lay.fixed(end - pos - 9)
        lay.steps.append((V_KW if kw else V_ARG, field, where, g))
        return end
    if tag == compact.VIEWS:
        (n,) = compact.U16.unpack_from(data, pos + 1)
        lay.fixed(3)
        pos += 3
        elems: list[tuple[int, Any]] = []
        first = -1
        for _ in range(n):
            kind = data[pos]
            lay.fixed(1)
            field = lay.field("Q")
            first = field if first < 0 else first
            if kind == compact.VIEW:
                g, end = compact.read_geometry(data, pos + 9)
                lay.fixed(end - pos - 9)
                elems.append((field, g))
                pos = end
            else:
                elems.append((field, None))
                pos += 9
        lay.steps.append((LV_KW if kw else LV_ARG, first, where, tuple(elems)))
        return pos
    if tag == compact.INT or tag == compact.FLOAT:
        if by_type:
            lay.fixed(1)
            lay.steps.append((N_KW if kw else N_ARG, lay.field("q" if tag == compact.INT else "d"), where, 1))
        else:
            lay.fixed(9)
        return pos + 9
    if tag in (compact.NONE, compact.DEVICE, compact.CPU):
        lay.fixed(1)
        return pos + 1
    if tag in _LISTS:
        (n,) = compact.U16.unpack_from(data, pos + 1)
        lay.fixed(3)
        if tag == compact.TENSORS:
            lay.steps.append((L_KW if kw else L_ARG, lay.field("Q", n), where, n))
            return pos + 3 + 8 * n
        code, size = _LISTS[tag]
        if by_type and tag != compact.BOOLS:  # a Scalar[] keyed by type: an optimizer's per-tensor step sizes
            lay.steps.append((NL_KW if kw else NL_ARG, lay.field(code, n), where, n))
        else:
            lay.fixed(size * n)
            lay.steps.append((C_KW if kw else C_ARG, -1, where, 0))  # a fresh list per record, as decoded
        return pos + 3 + size * n
    lay.fixed(2)  # bool, dtype, layout, memory format: tag and one byte
    return pos + 2


_LISTS = {compact.TENSORS: ("Q", 8), compact.INTS: ("q", 8), compact.FLOATS: ("d", 8), compact.BOOLS: ("B", 1)}


def fill(
    tpl: Template, fields: tuple[Any, ...], resolve: compact.Resolve, get: Callable[[int], Any] | None
) -> tuple[list[Any], dict[str, Any], list[int], Any]:
    """(args, kwargs, handles, verdict key or None) of a record that hit `tpl`, `fields` its unpacked struct: what
    `compact.decode_parts` would give, its handles resolved in the same order through the same checks."""
    args = tpl.args.copy()
    kwargs = tpl.kwargs.copy()
    handles: list[int] = []
    keyed = tpl.keyed
    key: list[Any] = [tpl]
    for kind, i, where, n in tpl.steps:
        if kind == T_ARG:
            h = fields[i]
            handles.append(h)
            t = get(h) if get is not None else None
            if t is None:
                t = resolve(h)
            args[where] = t
            if keyed:
                key.append((t.dtype, t.shape, t.stride(), t.storage_offset()))
        elif kind == N_ARG:
            args[where] = fields[i]
        elif kind == L_ARG or kind == L_KW:
            raw = fields[i : i + n]
            if 0 in raw:  # 0 is None in a Tensor?[] list
                handles.extend([h for h in raw if h])
                v = [None if h == 0 else resolve(h) for h in raw]
            else:
                handles.extend(raw)
                v = list(map(resolve, raw))
            if keyed:
                metas = [None if t is None else (t.dtype, t.shape, t.stride(), t.storage_offset()) for t in v]
                key.append(tuple(metas))
            if kind == L_ARG:
                args[where] = v
            else:
                kwargs[where] = v
        elif kind == T_KW:
            h = fields[i]
            handles.append(h)
            t = kwargs[where] = resolve(h)
            if keyed:
                key.append((t.dtype, t.shape, t.stride(), t.storage_offset()))
        elif kind == N_KW:
            kwargs[where] = fields[i]
        elif kind == NL_ARG:
            args[where] = list(fields[i : i + n])
        elif kind == NL_KW:
            kwargs[where] = list(fields[i : i + n])
        elif kind == V_ARG or kind == V_KW:
            h = fields[i]
            handles.append(h)
            t = get(h) if get is not None and kind == V_ARG else None
            if t is None:
                t = resolve(h)
            if keyed:
                key.append((t.dtype, t.shape, t.stride(), t.storage_offset()))
            if kind == V_ARG:
                args[where] = compact.view_of(t, n)
            else:
                kwargs[where] = compact.view_of(t, n)
        elif kind == LV_ARG or kind == LV_KW:
            v = []
            metas = []
            for f, g in n:
                h = fields[f]
                handles.append(h)
                t = resolve(h)
                if keyed:
                    metas.append((t.dtype, t.shape, t.stride(), t.storage_offset()))
                v.append(t if g is None else compact.view_of(t, g))
            if keyed:
                key.append(tuple(metas))
            if kind == LV_ARG:
                args[where] = v
            else:
                kwargs[where] = v
        elif kind == C_ARG:
            args[where] = list(args[where])
        else:
            kwargs[where] = list(kwargs[where])
    if keyed and tpl.plan.reshapes:  # an out= op or a resize: what it grows depends on its storages (red42: the
        # template's key held metas only, and a record into a fresh zero-element tensor hit a verdict of 0 bytes an
        # out= into room had taught, grew past the quota and was refused only after the kernel)
        key.append(checks.storage_sizes(args, kwargs))
    return args, kwargs, handles, tuple(key) if keyed else None
