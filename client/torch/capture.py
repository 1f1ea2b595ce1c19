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
device receives is recorded; the two recordings must agree (same ops, same Python numbers in them), otherwise
the step is not capturable as written and `CaptureError` says which op and argument changed (default Adam's
bias corrections: use `capturable=True`). Then the graph is defined on the daemon (DefineGraph: the recorded
`Op`s with graph-local slots) and every later call sends one RunGraph with the step's input handles; the
user's Python, autograd and optimizer code no longer run.

Tensors bind in three ways: tensor arguments of the step by position (CPU ones are uploaded, in the frame of
the RunGraph); tensors that existed before the step (parameters, optimizer state, gradients kept across steps)
by identity; tensors the step creates and leaves behind (new `.grad`s) keep their handles, rebound by every
run; the step's returned tensors get fresh handles per call (`.item()` them whenever).

Each graph holds for one guard key: the arguments' shapes, dtypes, strides and non-tensor values; the `training`
flag of every module, and the hyperparameters and parameter set of every optimizer the step uses (found in its
closure, globals and bound object, or given as `watch=`). A call with a new key records a graph of its own (kept
in a small cache, so alternating batch shapes or train/eval replay without recording again); a graph whose
tensors bound by identity were dropped or replaced is re-recorded. Inside a recording, sync points (`.item()`,
`.cpu()`, printing, ops with data-dependent shapes) and `torch.manual_seed` raise `CaptureError`.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2

from . import api, runtime
from .errors import CaptureError
from .runtime import DeviceRuntime
from .tensor import RemoteTensor, upload_new, wrap

log = logging.getLogger("gpupool.torch")
_graph_ids = itertools.count(1)
RECORD_ATTEMPTS = 3  # recordings that may disagree before the step is declared uncapturable
MAX_GRAPHS = 16  # graphs one captured step keeps (the daemon holds at most 32 per session)
NOT_IN_GRAPHS = ("aten::resize_", "aten::resize_as_", "aten::_resize_output_", "aten::set_")


@dataclass
class _Recording:
    """Every command one runtime received during one call of the step."""

    rt: DeviceRuntime
    ops: list[tuple[str, list[tensor_pb2.Arg], dict[str, tensor_pb2.Arg], list[int]]] = field(default_factory=list)
    consts: dict[int, torch.Tensor] = field(default_factory=dict)  # handle -> uploaded CPU data
    produced: set[int] = field(default_factory=set)
    dead: set[int] = field(default_factory=set)  # produced handles the client let go of

    def op(self, name: str, args: Any, kwargs: Any, outputs: list[int]) -> None:
        if name.split(".")[0] in NOT_IN_GRAPHS:
            self.refuse(f"{name} (it re-points or grows a storage)")
        self.ops.append((name, list(args), dict(kwargs or {}), list(outputs)))
        self.produced.update(h for h in outputs if h)

    def upload(self, handle: int, tensor: torch.Tensor) -> None:
        self.consts[handle] = tensor.detach().clone()
        self.produced.add(handle)

    def released(self, handle: int) -> None:
        self.dead.add(handle)

    def refuse(self, what: str) -> NoReturn:
        raise CaptureError(
            f"{what} inside a step being captured: a replayed step cannot stop for the client. Move it out of "
            "the step (return the tensor and call .item() on the result), or do not capture this function"
        )


class _Elsewhere(_Recording):
    """Installed on every other device while a step records: a captured step uses one device."""

    def op(self, name: str, args: Any, kwargs: Any, outputs: list[int]) -> None:
        raise CaptureError(f"{self.rt.device}: a captured step must run on one gpupool device ({name})")


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
    valid: bool = True
    why: str = ""
    drop_writes: list[int] = field(default_factory=list)
    watching: list[int] = field(default_factory=list)  # handles whose release this graph hears of
    ops: int = 0  # aten ops it runs per step


class CapturedStep:
    """The callable `capture(fn)` returns. It keeps one graph per guard key (argument shapes and values, module
    flags, optimizer settings), like a compiler's cache: alternating batch shapes or train/eval each get their
    own graph. `stats` counts eager, recorded and replayed calls and graphs defined."""

    def __init__(
        self, fn: Callable[..., Any], device: Any = None, watch: Iterable[Any] = (), max_graphs: int = MAX_GRAPHS
    ) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = getattr(fn, "__name__", "step")
        self.device = device
        self.watched = list(watch) or _discover(fn)
        self.max_graphs = max_graphs
        self.graphs: dict[Any, _Graph] = {}  # by guard key, least recently used first
        self._recorded: dict[Any, tuple[_Built, int]] = {}  # key -> (last recording, recordings that disagreed)
        self._first = True
        self.stats = {"eager": 0, "recorded": 0, "replayed": 0, "defined": 0, "rerecorded": 0}

    @property
    def state(self) -> str:
        return "replay" if self.graphs else ("eager" if self._first else "record")

    # ---- the call ----

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        rt = self._runtime(leaves)
        leaves = [upload_new(rt, x) if _is_cpu_tensor(x) else x for x in leaves]
        key = (spec, tuple(_leaf_key(x) for x in leaves), self._watch_key())
        g = self.graphs.get(key)
        if g is not None:
            if g.valid:
                self.graphs[key] = self.graphs.pop(key)  # most recently used
                return self._replay(rt, g, leaves)
            log.info("%s: graph %d re-recorded: %s", rt.device, g.graph_id, g.why)
            self.stats["rerecorded"] += 1
            self._forget(key)
        elif self.graphs and key not in self._recorded:
            log.info("%s: %s records a new graph: %s", rt.device, self.name, _difference(self.graphs, key))
        args, kwargs = tree_unflatten(leaves, spec)
        if self._first:
            self._first = False
            self.stats["eager"] += 1
            return self.fn(*args, **kwargs)
        return self._record(rt, key, leaves, args, kwargs)

    def _runtime(self, leaves: list[Any]) -> DeviceRuntime:
        found = {x._gp_rt for x in leaves if isinstance(x, RemoteTensor)}
        if len(found) > 1:
            raise CaptureError("the arguments of a captured step are on more than one gpupool device")
        if found:
            return found.pop()
        index = torch.device(self.device).index if self.device is not None else None
        return api.runtime_for(index)

    def _watch_key(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for obj in self.watched:
            if isinstance(obj, torch.nn.Module):
                out.append(tuple(m.training for m in obj.modules()))
            elif isinstance(obj, torch.optim.Optimizer):
                for group in obj.param_groups:
                    out.append(tuple(id(p) for p in group["params"]))
                    out.append(tuple((k, _value_key(v)) for k, v in group.items() if k != "params"))
        return tuple(out)

    # ---- recording ----

    def _record(self, rt: DeviceRuntime, key: Any, leaves: list[Any], args: Any, kwargs: Any) -> Any:
        if rt.pending:
            rt.materialize_pending()
        rec = _Recording(rt)
        others = [o for o in runtime.all_runtimes() if o is not rt]
        rt.recorder = rec
        for o in others:
            o.recorder = _Elsewhere(o)
        try:
            result = self.fn(*args, **kwargs)
        finally:
            rt.recorder = None
            for o in others:
                o.recorder = None
        self.stats["recorded"] += 1
        built = _build(rec, leaves, result)
        previous = self._recorded.get(key)
        if previous is None:
            self._recorded[key] = (built, 0)
            return result
        mismatch = _compare(previous[0], built)
        if mismatch:
            attempts = previous[1] + 1
            if attempts >= RECORD_ATTEMPTS:
                del self._recorded[key]
                raise CaptureError(
                    f"this step cannot be captured: two recordings differ at {mismatch}. Python numbers that change "
                    "from step to step would be replayed stale: make them tensors on the device (for Adam/AdamW: "
                    "capturable=True; a changing lr as a gpupool tensor), or pass them as tensor arguments"
                )
            self._recorded[key] = (built, attempts)
            return result
        del self._recorded[key]
        self._define(rt, key, built, result)
        return result

    def _define(self, rt: DeviceRuntime, key: Any, built: _Built, result: Any) -> None:
        while len(self.graphs) >= self.max_graphs:
            self._forget(next(iter(self.graphs)), drop=True)
        consts = [upload_new(rt, t) for t in built.consts]  # kept by the graph: persistent inputs
        graph_id = next(_graph_ids)
        msg = built.message(graph_id, [c._gp_h for c in consts])
        rt.define_graph(msg)
        out_leaves, spec = tree_flatten(result)
        outputs = [(i, _meta(x)) for i, x in enumerate(out_leaves) if isinstance(x, RemoteTensor)]
        plain = [None if isinstance(x, RemoteTensor) else x for x in out_leaves]
        g = _Graph(rt, graph_id, key, outputs, spec, plain, consts, ops=len(msg.ops))
        for h in built.persistent:
            rt.watched.setdefault(h, []).append(functools.partial(_invalidate, g))
        for h in built.writes:
            rt.watched.setdefault(h, []).append(g.drop_writes.append)
        g.watching = list(built.persistent) + list(built.writes)
        self.graphs[key] = g
        self.stats["defined"] += 1
        log.info(
            "%s: graph %d defined for %s: %d ops, %d inputs, %d persistent tensors",
            rt.device, g.graph_id, self.name, len(msg.ops), msg.inputs, len(msg.persistent),
        )  # fmt: skip

    def _forget(self, key: Any, drop: bool = False) -> None:
        g = self.graphs.pop(key, None)
        if g is None:
            return
        for h in g.watching:
            watchers = g.rt.watched.get(h)
            if watchers:
                watchers[:] = [w for w in watchers if getattr(w, "args", (None,))[0] is not g
                               and getattr(w, "__self__", None) is not g.drop_writes]  # fmt: skip
                if not watchers:
                    del g.rt.watched[h]
        if drop:
            g.rt.drop_graph(g.graph_id)

    # ---- replay ----

    def _replay(self, rt: DeviceRuntime, g: _Graph, leaves: list[Any]) -> Any:
        inputs = [x._gp_h for x in leaves if isinstance(x, RemoteTensor)]
        handles = [rt.new_handle() for _ in g.outputs]
        drops, g.drop_writes[:] = list(g.drop_writes), []
        rt.run_graph(g.graph_id, inputs, handles, drops)
        self.stats["replayed"] += 1
        out = list(g.leaves)
        for h, (i, m) in zip(handles, g.outputs, strict=True):
            out[i] = wrap(rt, h, m[0], m[1], m[2], m[3])
        return tree_unflatten(out, g.spec)

    def drop(self) -> None:
        """Forget every graph (the daemon frees them); the next calls record again."""
        for key in list(self.graphs):
            self._forget(key, drop=True)
        self._recorded.clear()


def _invalidate(g: _Graph, handle: int) -> None:
    if g.valid:
        g.valid, g.why = False, f"a tensor it binds by identity ({handle:#x}) was dropped or replaced"


def capture(
    fn: Callable[..., Any] | None = None, *, device: Any = None, watch: Iterable[Any] = (), max_graphs: int = MAX_GRAPHS
) -> Any:
    """Capture a training step: `step = capture(fn)` or `@capture(watch=[model, opt])`; see the module docstring.

    `device`: where CPU tensor arguments go when no argument is a gpupool tensor (default: the current device).
    `watch`: modules and optimizers whose training flags / settings decide the graph (default: found in `fn`).
    `max_graphs`: graphs kept (one per argument shape, train/eval, ...), least recently used dropped first."""
    if fn is None:
        return lambda f: CapturedStep(f, device, watch, max_graphs)
    return CapturedStep(fn, device, watch, max_graphs)


# ---- building a graph from a recording ----


@dataclass
class _Built:
    ops: list[device_pb2.Op]
    inputs: list[int]
    input_meta: list[tensor_pb2.TensorMeta]
    persistent: list[int]
    const_handles: list[int]
    consts: list[torch.Tensor]
    outputs: list[int]
    writes: dict[int, int]  # handle -> slot
    scalars: list[Any]  # non-tensor results
    key: Any = None  # the guard key of the call it was recorded in

    def message(self, graph_id: int, const_handles: list[int]) -> device_pb2.DefineGraph:
        msg = device_pb2.DefineGraph(graph_id=graph_id, inputs=len(self.inputs), outputs=self.outputs)
        msg.persistent.extend(self.persistent + const_handles)
        msg.input_meta.extend(self.input_meta)
        msg.ops.extend(self.ops)
        for h, slot in self.writes.items():
            msg.writes.add(slot=slot, handle=h)
        return msg


def _build(rec: _Recording, leaves: list[Any], result: Any) -> _Built:
    """Slots: 1..n the step's inputs, then persistent tensors (first use order), then uploads made inside the
    step (kept as persistent inputs), then op outputs in order."""
    input_handles = [x._gp_h for x in leaves if isinstance(x, RemoteTensor)]
    n_inputs = len(input_handles)
    slot_of: dict[int, int] = {}
    for i, h in enumerate(input_handles):
        slot_of.setdefault(h, i + 1)
    persistent: list[int] = []
    for _, args, kwargs, _ in rec.ops:
        for h in wire.arg_handles([*args, *kwargs.values()]):
            if h not in slot_of and h not in rec.produced and h not in persistent:
                persistent.append(h)
    base = n_inputs + 1
    for i, h in enumerate(persistent):
        slot_of[h] = base + i
    const_handles = list(rec.consts)
    base += len(persistent)
    for i, h in enumerate(const_handles):
        slot_of[h] = base + i
    next_slot = base + len(const_handles)
    ops = []
    for name, args, kwargs, outputs in rec.ops:
        op = device_pb2.Op(name=name)
        op.args.extend(_to_slots(a, slot_of) for a in args)
        for k, v in kwargs.items():
            op.kwargs[k].CopyFrom(_to_slots(v, slot_of))
        for h in outputs:
            if h:
                slot_of[h] = next_slot
                next_slot += 1
                op.outputs.append(slot_of[h])
            else:
                op.outputs.append(0)
        ops.append(op)
    out_leaves = tree_flatten(result)[0]
    outputs = []
    for x in out_leaves:
        if isinstance(x, RemoteTensor):
            if x._gp_h not in slot_of:
                raise CaptureError("a captured step returns a tensor it did not compute or receive")
            outputs.append(slot_of[x._gp_h])
        elif isinstance(x, torch.Tensor):
            raise CaptureError("a captured step returns a CPU tensor; return device tensors (read them after)")
    returned = {x._gp_h for x in out_leaves if isinstance(x, RemoteTensor)}
    writes = {
        h: slot_of[h]
        for h in rec.produced
        if h not in rec.dead and h not in returned and h not in rec.consts and h in slot_of
    }
    metas = [_meta_proto(x) for x in leaves if isinstance(x, RemoteTensor)]
    scalars = [x for x in out_leaves if not isinstance(x, torch.Tensor)]
    consts = [rec.consts[h] for h in const_handles]
    return _Built(ops, input_handles, metas, persistent, const_handles, consts, outputs, writes, scalars)


def _to_slots(a: tensor_pb2.Arg, slot_of: dict[int, int]) -> tensor_pb2.Arg:
    kind = a.WhichOneof("value")
    if kind == "tensor":
        return tensor_pb2.Arg(tensor=slot_of[a.tensor])
    if kind == "tensors":
        slots = [slot_of[h] if h else 0 for h in a.tensors.handles]
        return tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=slots))
    return a


def _compare(a: _Built, b: _Built) -> str:
    """'' when two recordings describe the same graph; else where they first differ."""
    if a.input_meta != b.input_meta:
        return "the metadata of its inputs"
    if len(a.ops) != len(b.ops):
        return f"the number of ops ({len(a.ops)} vs {len(b.ops)})"
    for i, (x, y) in enumerate(zip(a.ops, b.ops, strict=True)):
        if x != y:
            if x.name != y.name:
                return f"op {i} ({x.name} vs {y.name})"
            for j, (u, v) in enumerate(zip(x.args, y.args, strict=False)):
                if u != v:
                    return f"op {i} ({x.name}), argument {j}: {_show(u)} vs {_show(v)}"
            return f"op {i} ({x.name}), its keyword arguments or outputs"
    if a.persistent != b.persistent:
        return "the tensors it uses from before the step"
    if len(a.consts) != len(b.consts) or any(not torch.equal(u, v) for u, v in zip(a.consts, b.consts, strict=True)):
        return "the data it uploads (CPU tensors created inside the step: pass them as arguments)"
    if a.outputs != b.outputs or a.scalars != b.scalars:
        return "what it returns"
    return ""


def _show(a: tensor_pb2.Arg) -> str:
    kind = a.WhichOneof("value")
    return repr(getattr(a, kind)) if kind in ("i", "f", "b", "s") else str(a).strip().replace("\n", " ")[:80]


def _difference(graphs: dict[Any, _Graph], new: Any) -> str:
    old = list(graphs)[-1]
    if old[0] != new[0]:
        return "the structure of its arguments changed"
    if old[1] != new[1]:
        return "an argument's shape, dtype, stride or value changed"
    return "a module's training flag or an optimizer's settings or parameters changed"


# ---- small helpers ----


def _is_cpu_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, RemoteTensor)


def _meta(t: RemoteTensor) -> Any:
    return (tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.dtype)


def _meta_proto(t: RemoteTensor) -> tensor_pb2.TensorMeta:
    return wire.meta_to_proto(t)


def _leaf_key(x: Any) -> Any:
    if isinstance(x, RemoteTensor):
        return x._gp_key
    return ("value", _value_key(x))


def _value_key(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        if isinstance(v, RemoteTensor):
            return ("tensor", id(v))
        return ("cpu", v.tolist()) if v.numel() <= 16 else ("cpu", id(v))
    try:
        hash(v)
    except TypeError:
        return ("id", id(v))
    return (type(v), v)


def _discover(fn: Callable[..., Any]) -> list[Any]:
    """Modules and optimizers a step function reaches: its closure, the globals it names, its bound object."""
    found: list[Any] = []
    candidates: list[Any] = []
    target = getattr(fn, "__func__", fn)
    owner = getattr(fn, "__self__", None)
    if owner is not None:
        candidates.append(owner)
        candidates.extend(vars(owner).values() if hasattr(owner, "__dict__") else [])
    for cell in getattr(target, "__closure__", None) or ():
        try:
            candidates.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    code = getattr(target, "__code__", None)
    globs = getattr(target, "__globals__", {})
    if code is not None:
        candidates.extend(globs[n] for n in code.co_names if n in globs)
    for c in candidates:
        if isinstance(c, torch.nn.Module | torch.optim.Optimizer) and not any(c is f for f in found):
            found.append(c)
    return found
