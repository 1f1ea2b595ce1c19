"""Step capture: a whole training step recorded once and replayed by the daemon as one command per step.

    @gpupool.torch.capture
    def step(x, y):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for x, y in batches:
        loss = step(x, y)          # call 1 eager, calls 2-3 recorded, then one RunGraph per call

Call 1 runs eagerly (the optimizer creates its state). Calls 2 and 3 run eagerly too while every command the
calling thread sends its device is recorded (capture_record.py; other threads' commands meanwhile go out
unrecorded); the two recordings must agree (same ops, same Python numbers in them), otherwise the step is not
capturable as written and `CaptureError` says which op and argument changed (default Adam's bias corrections: use
`capturable=True`). Then the graph is defined on the daemon (DefineGraph:
the recorded `Op`s with graph-local slots) and every later call sends one RunGraph; the user's Python, autograd
and optimizer code no longer run, and the call returns without waiting for the daemon (the returned tensors are
handles: `.item()` them whenever).

Tensors bind in three ways: tensor arguments of the step by position (small CPU ones travel by value inside the
RunGraph command, larger ones are uploaded in the same frame); tensors that existed before the step (parameters,
optimizer state, gradients kept across steps) by identity; tensors the step creates and leaves behind (new
`.grad`s) keep their handles, rebound by every run; the step's returned tensors get fresh handles per call.

Each graph holds for one guard key: the arguments' shapes, dtypes, strides and non-tensor values; the `training`
flag of every module, and the hyperparameters and parameter set of every optimizer the step uses (found in its
closure, globals and bound object, or given as `watch=`); and the plain Python values (numbers, strings, bools)
the step reads from its closure, the globals its code names and its bound object's attributes. A call with a new
key records a graph of its own (kept in a small cache, so alternating batch shapes or train/eval replay without
recording again); when only such a Python value changed and the new recording equals the graph's, the value
does not matter to the step and is no longer watched. A graph whose tensors bound by identity were dropped or
replaced is re-recorded. Inside a recording, sync points (`.item()`, `.cpu()`, printing, ops with data-dependent
shapes) and `torch.manual_seed` raise `CaptureError`. A step runs one call at a time: a call from another thread while
one is under way raises `CaptureError` (client/capture_step.py `StepCache._busy_why`).

The rule, as with CUDA graphs: a replay repeats the recorded computation. Python values the step reads in any
other way -- an attribute of another object (`cfg.scale`), a dict or list entry, a global read by a helper the
step calls, the clock -- are baked in as they were when the step recorded; make them tensor arguments (or device
tensors the step reads) if they change.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from gpupool.client.capture_record import Built, CaptureError, Elsewhere, Recording, build
from gpupool.client.capture_step import MAX_GRAPHS, NOT_AS_RECORDED, RECORD_ATTEMPTS, StepCache
from torch.utils._pytree import tree_flatten, tree_unflatten

from gpupool import compact, wire

from . import api, encode, native, native_ops, runtime
from .runtime import DeviceRuntime
from .tensor import RemoteTensor, RemoteView, own, upload_new, wrap, wrapper_args
from .transfer import _lazy_view

# Whether a recorded step's scaled_dot_product_attention calls WITH dropout send the fused op (as eager calls do) or
# torch's math path. The math path: its ~30 aten calls per call become TorchScript nodes of the step's graph
# (server/graph_trace.py), where the daemon's fused dropout call is one node that calls back into Python and
# recomputes the forward in its backward: the encoder's captured step took 1.6x the daemon's CPU with it (BENCHMARKS.md
# "Round 23, lead"). Both give the same bits (tests/integration/test_attention_dropout.py); True is for tests of the
# daemon's fused dropout inside graphs.
FUSED_DROPOUT_IN_GRAPHS = False

log = logging.getLogger("gpupool.torch")
_graph_ids = itertools.count(1)
__all__ = ["MAX_GRAPHS", "RECORD_ATTEMPTS", "CapturedStep", "capture"]
BY_VALUE_BYTES = 256 * 1024  # CPU arguments up to this size (together) travel inside the RunGraph command
# Replays travel several to a frame while they come fast, so that the daemon pays for one gRPC message and one
# hop to the session's worker per few steps: HOLD_STEPS in the first frame after a pause (the daemon, idle,
# starts soon), twice as many in each next frame that fills before its deadline (the client runs ahead of the
# daemon, which has the frames before it still to run), up to HOLD_MAX_STEPS. A held step goes out at a sync
# (`.item()`), with any other command that sends the frame, or HOLD_SECONDS after the frame's first step,
# whichever comes first: the daemon never waits long for it. A frame the timer sent holds as many as came in
# that time; a sync or any other frame starts again from HOLD_STEPS.
HOLD_STEPS = 4
HOLD_MAX_STEPS = 16
HOLD_SECONDS = 0.001


@dataclass
class _Graph:
    """A defined graph, as the client replays it."""

    rt: DeviceRuntime
    graph_id: int
    key: Any
    outputs: list[tuple[int, Any]]  # one per returned tensor: (output index, metadata); others below
    spec: Any
    leaves: list[Any]  # the returned pytree's leaves; tensors are filled in per replay
    consts: list[RemoteTensor]  # uploads of the recorded step, kept alive as persistent inputs
    built: Built  # the recording it was defined from (a recording after a Python value changed is compared)
    valid: bool = True
    why: str = ""
    drop_writes: list[int] = field(default_factory=list)
    watching: list[int] = field(default_factory=list)  # handles whose release this graph hears of
    ops: int = 0  # aten ops it runs per step
    single: bool = False  # the step returns one tensor (no pytree to rebuild per replay)
    writes: list[int] = field(default_factory=list)  # handles it writes (`rt.kept`: their aliases move at a replay)
    # [handle, the parameter (a weak reference), its `.grad`, fresh] where it writes a parameter's `.grad`: `_regrad`.
    # The graph holds the `.grad` itself, so that `opt.zero_grad()` between steps (`p.grad = None`) leaves its handle
    # to the run, which gives it back; fresh: the recording began with no `.grad` there (capture_step `_note_grads`)
    grads: list[list[Any]] = field(default_factory=list)
    fresh: bool = False  # one of them is (`_replay` then hands every one to `_regrad`)
    grads_off: Any = None  # where it has `grads`: native_ops.cpp `grads_off`, else `_grads_off`
    cleared: list[Any] = field(default_factory=list)  # parameters whose `.grad` a replay sets to None (`_cleared`)


class CapturedStep(StepCache):
    """The callable `capture(fn)` returns. It keeps one graph per guard key (argument shapes and values, module
    flags, optimizer settings, Python values the step reads), like a compiler's cache: alternating batch shapes
    or train/eval each get their own graph (client/capture_step.py, shared with the C++ client). `stats` counts
    eager, recorded and replayed calls and graphs defined."""

    # ---- the call ----

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._busy.acquire(False):  # one call at a time (`StepCache._busy`)
            raise CaptureError(self._busy_why())
        try:
            leaves, spec, structure = self._structure(args, kwargs)
            rt = self._runtime(leaves)
            for x in leaves:  # a graph's inputs are daemon tensors equal to them
                if type(x) is RemoteView:
                    own(x)
            key, g = self._lookup(structure, leaves, rt.device)
            if g is not None:
                out = self._replay(rt, g, leaves)
                if out is not _AGAIN:
                    return out
            leaves = [upload_new(rt, x) if _is_cpu_tensor(x) else x for x in leaves]
            args, kwargs = tree_unflatten(leaves, spec)
            if self._eager_now():
                return self.fn(*args, **kwargs)
            return self._record(rt, key, leaves, args, kwargs)
        finally:
            self._busy.release()

    def _runtime(self, leaves: list[Any]) -> DeviceRuntime:
        found: DeviceRuntime | None = None  # (a loop, not a set comprehension: per call)
        for x in leaves:
            if isinstance(x, RemoteTensor):
                if found is None:
                    found = x._gp_rt
                elif x._gp_rt is not found:
                    raise CaptureError("the arguments of a captured step are on more than one gpupool device")
        if found is not None:
            return found
        index = torch.device(self.device).index if self.device is not None else None
        return api.runtime_for(index)

    # ---- recording ----

    def _record(self, rt: DeviceRuntime, key: Any, leaves: list[Any], args: Any, kwargs: Any) -> Any:
        if rt.pending:
            rt.materialize_pending()
        # Only this thread's commands are recorded (and, as always, sent): another thread's ops, uploads and syncs
        # on this device meanwhile (a data loader, a metrics thread) go out unrecorded and unrefused. backward runs
        # on this thread (client/engine.py), so its ops are recorded too.
        rec = Recording(rt)
        self._note_grads()
        others = [o for o in runtime.all_runtimes() if o is not rt]
        rt.start_recording(rec)
        for o in others:
            o.start_recording(Elsewhere(o))
        # SDPA calls with dropout take torch's math path while this thread records (native.set_capturing), unless
        # FUSED_DROPOUT_IN_GRAPHS: the daemon traces the math path's aten calls into the graph.
        was_capturing = native.set_capturing(not FUSED_DROPOUT_IN_GRAPHS)
        try:
            result = self.fn(*args, **kwargs)
        finally:
            native.set_capturing(was_capturing)
            rt.stop_recording()
            for o in others:
                o.stop_recording()
        self.stats["recorded"] += 1
        return self._settle(rt, key, build(rec, leaves, result, _handle_of), result)

    def _define(self, rt: DeviceRuntime, key: Any, built: Built, result: Any) -> None:
        self._make_room()
        consts = [upload_new(rt, t) for t in built.consts]  # kept by the graph: persistent inputs
        graph_id = next(_graph_ids)
        msg = built.message(graph_id, [c._gp_h for c in consts])
        rt.define_graph(msg)
        out_leaves, spec = tree_flatten(result)
        outputs = [(i, _meta(x)) for i, x in enumerate(out_leaves) if isinstance(x, RemoteTensor)]
        plain = [None if isinstance(x, RemoteTensor) else x for x in out_leaves]
        g = _Graph(rt, graph_id, key, outputs, spec, plain, consts, built, ops=len(msg.ops), single=spec.is_leaf())
        for h in built.persistent:
            rt.watched.setdefault(h, []).append(functools.partial(_invalidate, g))
        for h in built.writes:
            rt.watched.setdefault(h, []).append(g.drop_writes.append)
        g.watching = list(built.persistent) + list(built.writes)
        g.writes = list(built.writes)
        for h in g.writes:
            rt.kept.setdefault(h, [])
        writes = set(g.writes)
        for p in self.kept_params():  # a `.grad` the recorded step made anew (zero_grad(set_to_none=True))
            h = p.grad.__dict__.get("_gp_h")
            if h in writes:
                g.grads.append([h, weakref.ref(p), p.grad, id(p) in self._no_grad])
                g.fresh |= g.grads[-1][3]
        if g.grads:
            ops = native_ops.load()
            g.grads_off = _grads_off if ops is None else ops.grads_off
        g.cleared = self._cleared()
        self.graphs[key] = g
        self.stats["defined"] += 1
        log.log(
            self._level("defined"),  # (the first at INFO)
            "%s: graph %d defined for %s: %d ops, %d inputs, %d persistent tensors",
            rt.device, g.graph_id, self.name, len(msg.ops), msg.inputs, len(msg.persistent),
        )  # fmt: skip

    def _release(self, g: _Graph, drop: bool) -> None:
        for h in g.watching:
            watchers = g.rt.watched.get(h)
            if watchers:
                watchers[:] = [w for w in watchers if getattr(w, "args", (None,))[0] is not g
                               and getattr(w, "__self__", None) is not g.drop_writes]  # fmt: skip
                if not watchers:
                    del g.rt.watched[h]
        for h in g.writes:
            g.rt.kept.pop(h, None)
        if drop:
            g.rt.drop_graph(g.graph_id)

    # ---- replay ----

    def _replay(self, rt: DeviceRuntime, g: _Graph, leaves: list[Any]) -> Any:
        inputs: list[int] = []
        data: list[bytes] = []
        keep: list[RemoteTensor] = []  # uploads of large CPU arguments, alive until the run is queued
        size = 0  # of the CPU arguments (a loop: a generator costs more than two small tensors' sizes)
        for x in leaves:
            if _is_cpu_tensor(x):
                size += x.nbytes
        by_value = size <= BY_VALUE_BYTES
        ops = native_ops.load() if size else None
        for x in leaves:
            if isinstance(x, RemoteTensor):
                inputs.append(x._gp_h)
                data.append(b"")
            elif isinstance(x, torch.Tensor):
                if by_value:
                    inputs.append(0)
                    data.append(_host_bytes(x, ops))
                else:
                    keep.append(upload_new(rt, x))
                    inputs.append(keep[-1]._gp_h)
                    data.append(b"")
        if g.grads:  # (usual: each `.grad` its parameter's, held by it and the graph alone: `off` is None)
            # Every parameter's `.grad` (round 56: the first one's until then): set to None (`opt.zero_grad()` before
            # the call), replaced (another graph's of the step: its other shapes), or held (`g = p.grad`): `_regrad`
            if g.fresh:
                off: Any = range(len(g.grads))
            else:
                with torch._C.DisableTorchFunctionSubclass():  # (torch's `.grad` getter: no __torch_function__ lookup)
                    off = g.grads_off(g.grads, _GRAD_REFS - 2, _GRAD_GETTER)
            for i in off or ():
                entry = g.grads[i]
                p = entry[1]()
                if p is not None and _regrad(rt, entry, p):
                    log.info("%s: graph %d re-recorded: %s", rt.device, g.graph_id, NOT_AS_RECORDED)
                    self.stats["rerecorded"] += 1
                    self._forget(g.key, drop=True)
                    return _AGAIN
        kept = rt.kept
        for h in g.writes:
            if kept.get(h):  # aliases of a kept tensor made since the last run
                _unalias(rt, h)
        handles = [rt.new_handle() for _ in g.outputs]
        drops, g.drop_writes[:] = list(g.drop_writes), []
        held = _held(rt)
        rt.run_graph(g.graph_id, inputs, handles, drops, data if by_value and any(data) else (), flush=False)
        held.add()
        self.stats["replayed"] += 1
        for ref in g.cleared:  # (usual: none)
            _clear_grad(ref)
        out = list(g.leaves)
        for h, (i, m) in zip(handles, g.outputs, strict=True):
            out[i] = wrap(rt, h, m[0], m[1], m[2], m[3], m)
        rt.spend(sum(math.prod(m[0]) * m[3].itemsize for _, m in g.outputs))  # (the client's count: reserve52)
        return out[0] if g.single else tree_unflatten(out, g.spec)


class _Held:
    """The replays of one runtime that wait in its frame (see HOLD_STEPS), and the thread that sends them when
    no further step comes within HOLD_SECONDS. Which steps share a frame never changes a result: commands keep
    their order, and every sync sends whatever waits."""

    def __init__(self, rt: DeviceRuntime) -> None:
        self.rt = rt
        self.count = 0  # steps in the frame being filled
        self.limit = HOLD_STEPS  # steps that send it (grows to HOLD_MAX_STEPS while frames fill fast)
        self.frames = -1  # the session's frames_put after this holder last sent or saw one (-1: none yet)
        self.deadline = 0.0
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._timer, name=f"gpupool-capture-{rt.device}", daemon=True)
        self.thread.start()

    def add(self) -> None:
        session = self.rt.session
        with self.lock:
            if session.frames_put != self.frames:  # another command sent the frame (a sync, an upload, ...)
                self.frames = session.frames_put
                self.count = 0
                self.limit = HOLD_STEPS
            self.count += 1
            full = self.count >= self.limit
            if full:
                self.count = 0
                self.limit = min(2 * self.limit, HOLD_MAX_STEPS)
                self.frames += 1  # the frame this flush sends (counted before: the timer may read it meanwhile)
            else:
                soon = time.monotonic() + HOLD_SECONDS
                if self.count == 1 or self.deadline > soon:
                    self.deadline = soon
                    self.wake.set()
        if full:
            self.rt.flush()

    def _timer(self) -> None:
        while not self.rt.closed:
            if not self.wake.wait(timeout=1.0):
                continue
            self.wake.clear()
            while True:
                with self.lock:
                    if self.count and self.rt.session.frames_put != self.frames:  # a sync sent them meanwhile
                        self.frames, self.count, self.limit = self.rt.session.frames_put, 0, HOLD_STEPS
                    left = self.deadline - time.monotonic() if self.count else None
                    if left is not None and left <= 0:
                        # steps come slower than the limit per HOLD_SECONDS: frames of as many as came
                        self.limit = max(HOLD_STEPS, self.count)
                        self.count = 0
                        self.frames += 1
                if left is None:
                    break
                if left > 0:
                    self.wake.wait(left)  # an earlier deadline wakes it
                    self.wake.clear()
                    continue
                try:
                    self.rt.session.flush()
                except Exception:  # noqa: BLE001 - a dead stream fails the user's next call, with its reason
                    log.debug("%s: sending held steps failed", self.rt.device, exc_info=True)
                break


_holders: weakref.WeakKeyDictionary[DeviceRuntime, _Held] = weakref.WeakKeyDictionary()
_holders_lock = threading.Lock()


def _held(rt: DeviceRuntime) -> _Held:
    h = _holders.get(rt)
    if h is None:
        with _holders_lock:
            h = _holders.get(rt)
            if h is None:
                h = _holders[rt] = _Held(rt)
    return h


def _unalias(rt: DeviceRuntime, h: int) -> None:
    """Before a run binds handle `h` anew (a kept tensor: a new `p.grad` a step), the tensors that share it since the
    last run (`p.grad.detach()`, `p.grad.view(-1)`: transfer.py `_keep`) move to a new handle, an alias of the old
    tensor on the daemon: as eagerly, where autograd leaves a new tensor in `p.grad`, they keep their values."""
    aliases = _noted(rt, h)
    with rt._lock:
        extra = rt.shared.get(h, 0) - len(aliases)
        if not aliases or extra < 0:  # none alive, or the kept tensor itself is gone (the run drops its write)
            return
        _move(rt, h, aliases, extra)


def _noted(rt: DeviceRuntime, h: int) -> list[RemoteTensor]:
    """The aliases of kept handle `h` noted since the last run (`_keep`) still on it; the notes start again."""
    refs, rt.kept[h] = rt.kept.get(h, []), []
    return [t for t in (r() for r in refs) if t is not None and t.__dict__.get("_gp_h") == h]


def _move(rt: DeviceRuntime, h: int, tensors: list[RemoteTensor], extra: int) -> None:
    """Under rt._lock: `tensors`, which share handle `h`, move to a new handle, an `alias` of the old tensor on the
    daemon; `extra` holders of `h` besides its first stay (`rt.shared`)."""
    if extra:
        rt.shared[h] = extra
    else:
        rt.shared.pop(h, None)
    moved = rt.new_handle()
    if len(tensors) > 1:
        rt.shared[moved] = len(tensors) - 1
    rt.op("aten::alias", [encode.handle_arg(h)], {}, [moved])
    for t in tensors:
        d = t.__dict__
        d["_gp_h"] = moved
        arg = d.get("_gp_v")
        if arg is not None:  # a lazy view: its view argument names the handle
            d["_gp_v"] = compact.TAG_U64.pack(compact.VIEW, moved) + arg[compact.TAG_U64.size :]


# References to a parameter's `.grad` in a check of it (`_regrad`, `_grads_off`) when nothing else holds it: the
# graph's (`_Graph.grads`), its local name, getrefcount's argument, and torch's own (the tensor's Python object is kept
# while its parameter's `.grad` slot holds the tensor); `grads_off` is told the two besides the check's own.
_GRAD_REFS = 4
_AGAIN = object()  # `_replay` did not run: the graph is forgotten, the call records


_GRAD_GETTER = torch._C.TensorBase.__dict__["grad"]  # (`grads_off` calls it)


def _grads_off(grads: list[list[Any]], refs: int, getter: Any = None) -> list[int] | None:
    """native_ops.cpp `grads_off` where the native op path is off: the indices of the entries of `_Graph.grads` whose
    live parameter's `.grad` is not the graph's tensor, or whose tensor more than `refs` (its entry's and its
    parameter's) hold; None where there is none."""
    off = []
    for i, entry in enumerate(grads):
        p, grad = entry[1](), entry[2]
        # (getrefcount's: `grad`, its argument, `entry`'s is counted in `refs`)
        if p is not None and (p.grad is not grad or sys.getrefcount(grad) > refs + 2):
            off.append(i)
    return off or None


def _regrad(rt: DeviceRuntime, entry: list[Any], p: torch.Tensor) -> bool:
    """Before a run that writes parameter `p`'s `.grad` anew (`entry`, `_Graph.grads`: its handle, `p`, the `.grad` the
    graph holds, fresh), as eagerly, where autograd leaves a new tensor in `p.grad` each step: where the script holds
    it (`g = p.grad`), `g` keeps its values: `g` and the aliases noted of it (`_unalias`'s) move to a new handle, an
    alias of the old tensor on the daemon, and a new tensor on the handle, which the run writes, becomes `p.grad`;
    where `p.grad` is None (`opt.zero_grad()` between steps) or another tensor (another graph's of the step: the step
    sets it to None itself), the graph's `.grad` (or that new one) becomes `p.grad`. True where the graph cannot replay
    as the eager step runs: the recording began without a `.grad` (fresh) and there is one, which eagerly the step
    would add to."""
    h, grad, now = entry[0], entry[2], p.grad
    if now is not None and entry[3]:
        return True
    d = grad.__dict__
    if d.get("_gp_h") != h:
        return False
    # its references here: the graph's, this frame's `grad` (and `now`, then torch's too, where it is `p.grad`),
    # getrefcount's argument
    if sys.getrefcount(grad) <= (5 if now is grad else 3):
        if now is not grad:
            p.grad = grad
        return False
    aliases = _noted(rt, h)
    key, arg = d["_gp_key"], d.get("_gp_v")
    with rt._lock:
        extra = rt.shared.get(h, 0) - len(aliases)
        if extra < 0:
            return False
        if arg is not None:  # a lazy view: so is the new `.grad`, its view argument naming `h`
            fresh: RemoteTensor = _lazy_view(rt, h, key, arg, *wrapper_args(key[0], key[1], key[2]))
        else:
            fresh = wrap(rt, h, key[0], key[1], key[2], key[3], key)
        _move(rt, h, [grad, *aliases], extra)  # (`fresh` is now the first holder of `h`)
    p.grad = fresh
    entry[2] = fresh
    return False


def _clear_grad(ref: Any) -> None:
    """After a replay of a graph whose recorded step set this parameter's `.grad` to None (`_Graph.cleared`)."""
    p = ref()
    if p is not None:
        p.grad = None


def _invalidate(g: _Graph, handle: int) -> None:
    if g.valid:
        g.valid, g.why = False, f"a tensor it binds by identity ({handle:#x}) was dropped or replaced"


def capture(
    fn: Callable[..., Any] | None = None, *, device: Any = None, watch: Iterable[Any] = (), max_graphs: int = MAX_GRAPHS
) -> Any:
    """Capture a training step: `step = capture(fn)` or `@capture(watch=[model, opt])`; see the module docstring.

    `device`: where CPU tensor arguments go when no argument is a gpupool tensor (default: the current device).
    `watch`: modules and optimizers whose training flags / settings decide the graph (default: found in `fn`).
    `max_graphs`: graphs kept (one per argument shape, train/eval, ...), least recently used dropped first.

    A replay repeats the recorded computation: Python values the step reads other than its arguments, its
    closure, the globals its code names and its bound object's attributes are baked in (module docstring)."""
    if fn is None:
        return lambda f: CapturedStep(f, device, watch, max_graphs)
    return CapturedStep(fn, device, watch, max_graphs)


# ---- small helpers ----


def _handle_of(x: Any) -> int | None:
    return x._gp_h if isinstance(x, RemoteTensor) else None


def _is_cpu_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, RemoteTensor)


def _host_bytes(x: torch.Tensor, ops: Any) -> bytes:
    """A CPU argument's bytes, sent by value: `ops` (native_ops.cpp's module, or None) copies them in one C call."""
    t = (x if x.is_cpu else x.cpu()).contiguous()  # (contiguous: the tensor itself when it is)
    if ops is not None:
        return ops.bytes_at(t.data_ptr(), t.nbytes)  # type: ignore[no-any-return]
    return wire.host_bytes(t).tobytes()


def _meta(t: RemoteTensor) -> Any:
    return (tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.dtype)
