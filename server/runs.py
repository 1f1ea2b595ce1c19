"""Eager run caching: the sequences of compact eager records a training loop sends every step, run as prebuilt steps.

A training step sends the same records every step (server/templates.py), in the same order, and each record's
tensor inputs come from the same places: an output of a record a few places back, or a tensor made before (a
parameter, an optimizer state, the batch). Only the handle numbers change (and a non-capturable optimizer's
step sizes, by-type fields of their templates). The client cuts frames at 256 commands and sends frees in
batches, not at step boundaries, so a slice holds several steps and starts anywhere in one: runs are keyed by
the records themselves, never by their position in a slice.

While a session worker runs a span of consecutive eager records (`CommandExecutor.eager_span`) that match no
trace, it records each one that hit a template (`Runs.rec`: the template, its unpacked fields, its verdict key)
and then `build`s a `Trace` of them: per record (a `Step`) its template, the verdict (new bytes) the normal
path computed for it, and where each tensor input came from: output j of an earlier step of the trace
(`src` >= 0: an index into the run's list of kept outputs) or "external" (-1, with the meta it had: dtype,
shape, stride, offset). Later spans `match` records against a trace step by step: the record must hit the
step's template (its fixed bytes equal), each internal input's handle must hold the very tensor the earlier
step of this run bound (identity: the same object the normal path would resolve), and each external input must
resolve and have the learned meta. Internal tensors' metas then follow from the external ones (a step is traced
only when its verdict was cached, so its output metas are a function of its input metas and fixed bytes), so
the learned verdict holds and the step runs through `_run_op` with it: every per-op check, the quota, value
guards, seeding, zeroing, recounting and accounting still run as on the normal path.

A trace remembers (weakly) the trace that followed it the last time it ran to its end (`Trace.next`): the Python
path tries that one first, and the native runner goes on into it without returning (server/native_runner.py); and
the one that followed it before that (`Trace.alt`, `follows`), which the native runner tries where `next` does not
take the record: a trace met at two places of a step (a transformer's layers) is followed by another at each.
Traces learned apart stay apart (a recording ends where a record matches a learned trace's first step, so one
training step is often several traces): that chaining, not longer traces, is what keeps a step in one C++ call.

Traces are per session (`CommandExecutor.forget` drops them), indexed by their first record's first 5 bytes
and length, at most PER_HEAD per head, MAX_ENTRIES steps and tensor inputs and MAX_RUN_BYTES (estimated, templates
included) per session (cleared when full),
and dropped with
the templates when an op id is defined anew. A trace holds no tensor.

A view argument (`compact.VIEW`, templates' V_ARG/V_KW) is traced as a tensor input whose source is its handle's
tensor (the identity or meta check applies to that tensor); its geometry is among the template's fixed bytes and
`compact.view_of` applies it, with its checks against the tensor's storage, for every record. A tensor list with
views (`compact.VIEWS`, templates' LV_ARG/LV_KW) is traced as a tensor list of its elements' handles' tensors,
each with its own source and check; the elements' geometries come from the template's fixed bytes and are applied
with `view_of` for every record.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from operator import call, is_
from typing import Any

from gpupool.compact import view_of

from .guards import fixed_by_template, value_guarded
from .templates import (
    C_ARG,
    L_ARG,
    L_KW,
    LV_ARG,
    LV_KW,
    N_ARG,
    N_KW,
    NL_ARG,
    NL_KW,
    T_ARG,
    T_KW,
    V_ARG,
    V_KW,
    Template,
)

PER_HEAD = 16  # traces kept per head (first record's op id and length); the most recently run or learned first
MAX_ENTRIES = 1 << 16  # steps and tensor inputs of all a session's traces (each ~100-300 bytes); cleared when full
MAX_LEN = 4096  # steps of one trace (a slice holds at most a few thousand commands)
# Round 37 (quota37): traces are bounded by bytes too. A trace keeps its steps' templates alive (also after the
# template table dropped them: server/templates.py `Template.nbytes`, up to ~16 MiB each), and per tensor input a
# meta and a check cell (tracemalloc: ~100 bytes a tensor of a 65,535-tensor list, 12 bytes a byte of its record).
# Each trace is counted at `ENTRY_BYTES` a step or tensor input plus its distinct templates' bytes, a session's
# traces at most `MAX_RUN_BYTES` (cleared when full).
ENTRY_BYTES = 256
MAX_RUN_BYTES = 64 << 20
_TENSOR_KINDS = (T_ARG, T_KW, L_ARG, L_KW)
_SINGLE = (T_ARG, T_KW, V_ARG, V_KW)  # one tensor input each (a view's: the tensor it is a view of)
_VIEW_LISTS = (LV_ARG, LV_KW)  # a tensor list with views: per element (field, geometry or None) where others count
_COUNTED = (*_TENSOR_KINDS, V_ARG, V_KW, *_VIEW_LISTS)
EXTERNAL, NONE = -1, -2  # a tensor input's source: resolved by handle (meta checked), or a None in a Tensor?[]
_MISSES = 3  # other objects an external input's check cell sees before it turns off (`_checked`)
_MISSING = itertools.repeat(object())  # what `match` reads for a handle that holds no tensor (never a live one)


class Step:
    """One record of a trace: its template, the verdict, its inputs' sources, and which outputs later steps use."""

    __slots__ = ("tpl", "plan", "need", "ins", "tensors", "others", "keep", "n_out", "single", "check", "fast")

    def __init__(self, tpl: Template, need: int, ins: list[tuple[Any, ...]], keep: tuple[int, ...]) -> None:
        self.tpl = tpl
        self.plan = tpl.plan
        self.need = need  # new bytes: the verdict of the shape-only checks, as the normal path cached it
        # per template step: (kind, field, where, count, source(s), meta(s) and check cell(s) of the external ones)
        self.ins = ins
        # the same, split: single tensors (is a keyword, field, where, source, meta, cell, a view's geometry or
        # None), then everything else
        self.tensors = [
            (k == T_KW or k == V_KW, i, w, s, m, c, n if k == V_ARG or k == V_KW else None)
            for k, i, w, n, s, m, c in ins
            if k in _SINGLE
        ]
        # each with a cell for the whole list when all its tensors are external (an optimizer's parameters and
        # states): the weak references of the tensors last found to have the learned metas, and at which epoch
        self.others = [(*e, _list_cell(e)) for e in ins if e[0] not in _SINGLE]
        self.keep = keep  # output slots whose bound tensor a later step takes (appended to the run's list)
        self.n_out = tpl.n_out
        self.single = False  # set by `CommandExecutor`: one output, a plain dense tensor when the run was learned
        plan = self.plan
        # Whether its value guards (`guards.validate`) run per record. A `_foreach_` op's own guard (its lists'
        # lengths) reads only lengths the template fixes (tensor and number lists' counts are fixed bytes), and
        # the record this step was learned from passed it: only an op with a value guard of its own runs it.
        # An op whose guard reads only what the step fixes (the fused attention's: `guards.fixed_by_template`) does not.
        self.check = (
            bool(plan.validate) and value_guarded(plan.name) and not fixed_by_template(plan.name, tpl.args, tpl.kwargs)
        )
        # `CommandExecutor.eager_span` runs it inline: one output, none of the per-op extras `_run_step` handles
        self.fast = self.n_out == 1 and not (
            plan.reshapes or plan.takes_device or plan.seeded or plan.uninitialized or self.check
        )


class Trace:
    """A learned sequence of steps, valid under the quota and compute bound it was learned with."""

    __slots__ = ("steps", "quota", "flops", "next", "alt", "weight", "nbytes", "native", "__weakref__")

    def __init__(self, steps: list[Step], quota: int, flops: int) -> None:
        self.steps = steps
        self.native: Any = None  # its native form (server/native_runner.py) once compiled, False when none runs
        self.quota = quota
        self.flops = flops
        # the trace that followed it the last time it ran to its end (weakly: an evicted one goes)
        self.next: Callable[[], Trace | None] = _nothing
        # the one that followed it before `next` did (`follows`), also weakly: the native runner tries it where
        # `next`'s first step does not take the record
        self.alt: Callable[[], Trace | None] = _nothing
        # what it holds: its steps and their tensor inputs (`Runs` bounds the sum)
        self.weight = len(steps) + sum(
            e[3] if e[0] in _TENSOR_KINDS else len(e[3]) if e[0] in _VIEW_LISTS else 1
            for step in steps
            for e in step.ins
            if e[0] in _COUNTED
        )
        # the host memory it holds, estimated (`MAX_RUN_BYTES`): its entries and the templates it keeps alive
        self.nbytes = ENTRY_BYTES * self.weight + sum({id(st.tpl): st.tpl.nbytes for st in steps}.values())


def _nothing() -> None:
    return None


def follows(trace: Trace, cand: Trace) -> None:
    """`cand` followed `trace` (it ran from the record after `trace`'s last): it becomes `trace.next`, and the run
    that was `next` becomes `alt`. A run met at two places of a training step (a transformer's layers run the same
    records) is followed by one run at the first and another at the second: with `next` alone, each place found
    the other's there, and the native runner handed the record back to the Python path at every such place."""
    old = trace.next()
    if old is not cand:
        if old is not None:
            trace.alt = trace.next
        trace.next = weakref.ref(cand)


def _list_cell(e: tuple[Any, ...]) -> list[Any] | None:
    if (e[0] == L_ARG or e[0] == L_KW) and all(src == EXTERNAL for src in e[4]):
        return [(), -1, 3]  # weak references, epoch, misses left
    return None


class Runs:
    """A session's traces and the recording in progress."""

    __slots__ = ("heads", "count", "nbytes", "rec", "hits", "native", "learned", "epoch", "ctx", "carry")

    def __init__(self) -> None:
        self.heads: dict[tuple[bytes, int], list[Trace]] = {}
        self.count = 0
        self.nbytes = 0  # their `Trace.nbytes` together
        self.rec: list[tuple[Template, tuple[Any, ...], Any]] | None = None  # filled by `_eager_op` when set
        self.hits = 0  # records run inside a trace
        self.native = 0  # of them, run by the native runner (server/native_runner.py)
        self.learned = 0  # traces built
        self.epoch = 0  # ops (and commands) so far that may have changed a tensor's meta in place (`_checked`)
        # the native runner's context for this session (`CommandExecutor._native_ctx`): (its key, the Ctx) or None
        self.ctx: tuple[tuple[Any, ...], Any] | None = None
        # where the session's last span stopped (`CommandExecutor.eager_span`: its slice's end, its time budget, a
        # command it does not run): (the session, the epoch then, the run under way, its step, its kept outputs, the
        # run that had just ended; all held weakly), for the next span's first record; None otherwise
        self.carry: tuple[Any, ...] | None = None

    def clear(self) -> None:
        self.heads.clear()
        self.count = self.nbytes = 0
        self.carry = None

    def add(self, head: tuple[bytes, int], trace: Trace) -> None:
        if trace.nbytes > MAX_RUN_BYTES:  # alone past the bound: not kept (its records take the normal path)
            return
        if self.count + trace.weight > MAX_ENTRIES or self.nbytes + trace.nbytes > MAX_RUN_BYTES:
            self.clear()
        seen = self.heads.setdefault(head, [])
        if len(seen) >= PER_HEAD:
            old = seen.pop()  # the oldest
            self.count -= old.weight
            self.nbytes -= old.nbytes
        seen.insert(0, trace)
        self.count += trace.weight
        self.nbytes += trace.nbytes


Record = tuple[Template, tuple[Any, ...], Any]  # a record that ran on the normal path: template, fields, verdict key


def build_all(records: list[Record], verdicts: dict[Any, int], quota: int, flops: int) -> list[Trace]:
    """Traces of records that ran one after another on the normal path: one per maximal part of them whose
    verdicts are cached (a record whose verdict is not, say one whose outputs' shapes depend on values, is left
    out and the run's next trace starts after it), each at most MAX_LEN steps."""
    out: list[Trace] = []
    part: list[tuple[Template, tuple[Any, ...], Any, int]] = []
    for tpl, fields, sig in records:
        need = verdicts.get((sig, quota, flops)) if sig is not None else None
        if need is None or need < 0 or len(part) >= MAX_LEN:
            if part:
                out.append(build(part, quota, flops))
            part = []
            if need is None or need < 0:
                continue
        part.append((tpl, fields, sig, need))
    if part:
        out.append(build(part, quota, flops))
    return out


def build(records: list[tuple[Template, tuple[Any, ...], Any, int]], quota: int, flops: int) -> Trace:
    """A trace of consecutive records, each (template, fields, verdict key, verdict)."""
    where_bound: dict[int, tuple[int, int]] = {}  # handle -> (step, output slot) that bound it last
    steps: list[tuple[Template, int, list[list[Any]]]] = []
    for k, (tpl, fields, sig, need) in enumerate(records):
        metas = iter(sig[1:])
        ins: list[list[Any]] = []
        for kind, i, where, n in tpl.steps:
            if kind in _SINGLE:
                count = n if kind == V_ARG or kind == V_KW else 1  # a view keeps its geometry there
                ins.append([kind, i, where, count, where_bound.get(fields[i], EXTERNAL), next(metas)])
            elif kind == L_ARG or kind == L_KW:
                raw = fields[i : i + n]
                srcs = [NONE if h == 0 else where_bound.get(h, EXTERNAL) for h in raw]
                ins.append([kind, i, where, n, srcs, next(metas)])
            elif kind in _VIEW_LISTS:
                srcs = [where_bound.get(fields[f], EXTERNAL) for f, _ in n]
                ins.append([kind, i, where, n, srcs, next(metas)])
            else:
                ins.append([kind, i, where, n, None, None])
        steps.append((tpl, need, ins))
        for j, h in enumerate(fields[1 : 1 + tpl.n_out]):
            if h:
                where_bound[h] = (k, j)
    # Number the kept outputs in run order: the run appends step k's kept outputs after step k ran.
    used = sorted({src for _, _, ins in steps for e in ins for src in _sources(e[4]) if isinstance(src, tuple)})
    index = {src: n for n, src in enumerate(used)}
    out: list[Step] = []
    for k, (tpl, need, ins) in enumerate(steps):
        final: list[tuple[Any, ...]] = []
        for kind, i, where, n, src, meta in ins:
            if kind in _SINGLE:
                if isinstance(src, tuple):
                    final.append((kind, i, where, n, index[src], None, None))
                else:
                    final.append((kind, i, where, n, EXTERNAL, meta, [None, -1, _MISSES]))
            elif kind == L_ARG or kind == L_KW or kind in _VIEW_LISTS:
                ids = tuple(index[s] if isinstance(s, tuple) else s for s in src)
                final.append((kind, i, where, n, ids, meta, [[None, -1, _MISSES] for _ in ids]))
            else:
                final.append((kind, i, where, n, None, None, None))
        keep = tuple(j for (d, j) in used if d == k)
        out.append(Step(tpl, need, final, keep))
    return Trace(out, quota, flops)


def _sources(src: Any) -> list[Any]:
    return list(src) if isinstance(src, list) else [src]


def match(
    step: Step, data: bytes, get: Any, resolve: Any, objs: list[Any], epoch: int
) -> tuple[list[Any], dict[str, Any], tuple[Any, ...]] | None:
    """(args, kwargs, fields) of a record that matches `step` (its template, its inputs' sources and the external
    inputs' metas), None otherwise; raises what resolving an external handle raises (the caller then runs the
    record on the normal path, which raises the same). `objs`: the run's kept outputs so far (all bound in the
    session: `CommandExecutor.eager_span` ends a run at a step that unbinds a tensor); `epoch`: the
    session's count of ops that may have changed a tensor's meta in place (`Runs.epoch`)."""
    tpl = step.tpl
    if len(data) != tpl.size:
        return None
    fields = tpl.unpack(data)
    if tpl.fixed_of(fields) != tpl.fixed:
        return None
    args = tpl.args.copy()
    kwargs = tpl.kwargs.copy()
    for kw, i, where, src, meta, cell, geometry in step.tensors:
        t = get(fields[i])
        if src >= 0:
            if t is None or t is not objs[src]:
                return None
        else:
            if t is None:
                t = resolve(fields[i])
            ref = cell[0]
            if ref is None or cell[1] != epoch or ref() is not t:
                if not _checked(t, meta, cell, epoch):
                    return None
        if geometry is not None:
            t = view_of(t, geometry)
        if kw:
            kwargs[where] = t
        else:
            args[where] = t
    for kind, i, where, n, src, meta, cell, whole in step.others:
        if kind == N_ARG:
            args[where] = fields[i]
        elif kind == L_ARG or kind == L_KW:
            v: list[Any]
            if whole is not None and whole[2]:  # the same live objects as last time, no meta change since?
                v = list(map(get, fields[i : i + n], _MISSING))
                if whole[1] == epoch and all(map(is_, v, map(call, whole[0]))):
                    if kind == L_ARG:
                        args[where] = v
                    else:
                        kwargs[where] = v
                    continue
            v = []
            for h, s, m, c in zip(fields[i : i + n], src, meta, cell, strict=True):
                if s == NONE:
                    if h:
                        return None
                    v.append(None)
                    continue
                t = get(h)
                if s >= 0:
                    if t is None or t is not objs[s]:
                        return None
                else:
                    if t is None:
                        t = resolve(h)
                    ref = c[0]
                    if ref is None or c[1] != epoch or ref() is not t:
                        if not _checked(t, m, c, epoch):
                            return None
                v.append(t)
            if whole is not None and whole[2]:  # every element passed its check at this epoch
                if whole[1] == epoch:  # but other objects than last time (a step's gradients): not worth it
                    whole[2] -= 1
                whole[0] = tuple(map(weakref.ref, v))
                whole[1] = epoch
            if kind == L_ARG:
                args[where] = v
            else:
                kwargs[where] = v
        elif kind == N_KW:
            kwargs[where] = fields[i]
        elif kind == NL_ARG:
            args[where] = list(fields[i : i + n])
        elif kind == NL_KW:
            kwargs[where] = list(fields[i : i + n])
        elif kind == LV_ARG or kind == LV_KW:
            v = []
            for (f, g), s, m, c in zip(n, src, meta, cell, strict=True):
                h = fields[f]
                t = get(h)
                if s >= 0:
                    if t is None or t is not objs[s]:
                        return None
                else:
                    if t is None:
                        t = resolve(h)
                    ref = c[0]
                    if ref is None or c[1] != epoch or ref() is not t:
                        if not _checked(t, m, c, epoch):
                            return None
                v.append(t if g is None else view_of(t, g))
            if kind == LV_ARG:
                args[where] = v
            else:
                kwargs[where] = v
        elif kind == C_ARG:
            args[where] = list(args[where])
        else:
            kwargs[where] = list(kwargs[where])
    return args, kwargs, fields


def _checked(t: Any, meta: Any, cell: list[Any], epoch: int) -> bool:
    """Whether external input `t` has the learned `meta`, where its `cell` did not vouch for it (`match` asks the
    cell first). The cell remembers (weakly) the last tensor found to have it, at which epoch: the same live
    object with no op since that could have changed a meta in place still has it (a weak reference keeps no
    freed tensor alive, and a dead one never compares equal). An input that is another object each time (an
    output of another run, made anew every step) turns its cell off after _MISSES of them: a weak reference
    per record that never vouches is only cost."""
    if (t.dtype, t.shape, t.stride(), t.storage_offset()) != meta:
        return False
    ref = cell[0]
    if ref is None:
        if cell[2]:
            cell[0] = weakref.ref(t)
    elif ref() is not t:
        cell[2] -= 1
        cell[0] = weakref.ref(t) if cell[2] else None
    cell[1] = epoch
    return True


def written(step: Step, fields: tuple[Any, ...]) -> list[int]:
    """The record's input handles in the order `templates.fill` lists them (for a mutable op's recount)."""
    handles: list[int] = []
    for kind, i, _, n, _, _, _ in step.ins:
        if kind in _SINGLE:
            handles.append(fields[i])
        elif kind == L_ARG or kind == L_KW:
            handles.extend(h for h in fields[i : i + n] if h)
        elif kind in _VIEW_LISTS:
            handles.extend(fields[f] for f, _ in n)
    return handles
