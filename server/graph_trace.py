"""A captured step run by TorchScript's C++ interpreter instead of the Python replay loop (CPU-backed devices).

graph.execute calls each prebuilt kernel from Python: per op a loop iteration, argument gathering and the call's
own Python-to-C++ argument parsing, about 4-6 us on this project's box, where a tiny model's kernels take 3-10 us.
Once a graph has run once the plain way, its calls are written into a TorchScript graph (torch._C.Graph), one
node per call with the call's own overload and arguments, while graph.execute runs the calls on meta copies of
the step's tensors (a dry run: nothing is read, written or drawn, so a failure midway harms nothing); from then
on the session's runs call that graph's function: one Python call per step, the ops dispatched in C++. Nothing
from the wire is parsed or evaluated here: the nodes are the calls the daemon itself built and checked at
DefineGraph (the allowlist, guards, size and quota checks all ran there), and the graph is kept only when it
holds exactly those calls in order (`_same_ops`: no tracer, so no kernel's meta code or decomposition can slip
in) and no meta constant. The graph executor's optimisation passes are off: the same kernels in the same order as
the Python replay, so the same bits.

A graph runs this way only when every run would call exactly the same kernels with the same arguments:
- on a CPU-backed device (fake GPUs): real GPUs capture CUDA graphs instead (graph_cuda.py);
- in a session's own worker process (`exclusive_rng`): its random ops draw from the device's default generator,
  which holds the session's stream there, so they draw the same numbers as the Python replay (the session's
  stream is loaded before each run, as the Python replay's first random op would);
- with no value guard (`check`: Python that reads tensor values on every run) except those rewritten as tensor
  ops that the graph keeps (`_TRACED_GUARDS`: the embedding backward's index range), no factory of uninitialized
  memory (zeroed per run by Python) and no Python replacement of a kernel (guards.replacement: it may branch on
  values) except the fused attention's (server/attention.py), whose composition of aten calls -- its kernel decided
  at DefineGraph, branching on shapes only -- is written into the graph call by call (`_ComposedOps`; a call with
  dropout as one node of server/attention.py's `gpupool_attention` operators, whose Python kernels read and set
  generator states, which no aten op does: the interpreter calls them back), where the dry run's tensors are laid
  out as a real run's were (the composition decides copies and layouts on strides, and some meta kernels lay out
  their outputs otherwise than the CPU's, e.g. `_linalg_svd`'s Vh: the graph would hand the CPU flash kernel a
  tensor it misreads). A graph with fused attention calls is traced after a Python replay that records its
  compositions' layouts (`replay_recording`), and runs as TorchScript from the run after;
- with arguments a node can hold (tensors, lists of tensors -- an empty one typed by the schema --, numbers, strings,
  dtypes, devices, ...; a Python number where the overload takes a tensor only for add/sub/mul/div, whose .Scalar
  overloads are that call).
Anything else, or a graph that fails to build, keeps graph.execute (logged once per graph).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Generator
from typing import Any, NamedTuple

import torch

from gpupool.errors import InvalidArgument, ResourceExhausted

from . import attention, guards, metalists, opargs
from .graph_build import Graph, Host
from .sessions import oom_message, out_of_memory

log = logging.getLogger(__name__)

TRACE_AFTER_RUNS = 1  # a graph's first run is the plain replay; the next one is traced
# A piece of a trace (`trace`): this many inputs or nodes of a pass over them, or this many calls of its dry run (each
# a meta kernel, some of them Python: about what an op of the definition's dry run costs, which goes one op a piece)
PIECE = 256
DRY_PIECE = 16
# A graph of more nodes (calls, constants, lists) keeps the Python replay: TorchScript compiles a graph at its first
# call, one C++ call of ~120 us a node at load 20 here, not pieceable (round 38: 0.93 s for 8,000 `neg` nodes; with
# the trace in pieces a neighbour still waited 3.2 s at 8,000 ops at load 45). An honest step's graph is a few
# hundred calls, under a thousand nodes with their constants (the encoder's 350 calls, 404 constants).
TRACE_MAX_NODES = 4_096
_META = torch.device("meta")
_C: Any = torch._C  # TorchScript's IR and graph executor bindings (untyped)


def refusal(host: Host, g: Graph) -> str | None:
    """Why `g` must keep the Python replay, or None when it may be traced."""
    if g.device.type != "cpu":
        return f"{g.device.type} device"
    if not getattr(host, "exclusive_rng", False):
        return "sessions share this process"
    kept = set(g.outputs) | set(g.writes.values())
    if not kept:
        return "no outputs"
    if len(g.calls) > TRACE_MAX_NODES:
        return f"{len(g.calls)} ops; a TorchScript graph holds at most {TRACE_MAX_NODES} nodes"
    for c in g.calls:
        if c.check is not None and host.ops.resolve(c.name)._schema.name not in _TRACED_GUARDS:
            return f"{c.name} has a value guard"
        if c.zero:
            return f"{c.name} returns uninitialized memory"
        if c.replaced and c.kernel is None:
            return f"{c.name} runs a Python replacement"
    return None


class _Builder:
    """A TorchScript graph being written, one node per call, while graph.execute runs the calls on meta tensors.
    Each tensor's value in the graph is found by the tensor's identity (every tensor of the dry run is kept alive
    until the graph is done, so no identity is reused)."""

    def __init__(self) -> None:
        self.graph: Any = _C.Graph()
        self.values: dict[int, Any] = {}
        self.alive: list[torch.Tensor] = []
        self.composed: dict[int, list[str]] = {}  # per fused attention call (by index): the ops it wrote

    def input(self, t: torch.Tensor) -> None:
        v = self.graph.addInput()
        v.setType(_C.TensorType.get())
        self.bind(t, v)

    def bind(self, t: torch.Tensor, v: Any) -> None:
        self.values[id(t)] = v
        self.alive.append(t)

    def node(self, kind: str, inputs: list[Any], outputs: int) -> Any:
        n = self.graph.create(kind, inputs, outputs)
        self.graph.insertNode(n)
        return n

    def value(self, v: Any, spec: Any) -> Any:
        """The graph's value for one argument (`spec`: its schema argument)."""
        if isinstance(v, torch.Tensor):
            if v.is_meta:
                return self.values[id(v)]  # a KeyError (a tensor from nowhere) fails the trace
            return self.graph.insertConstant(v)  # a tensor the definition carried inline (a real one)
        if isinstance(v, list | tuple) and not v and spec is not None and spec.type.kind() == "ListType":
            element = spec.type.getElementType()  # an empty tensor list (a fused Adam's max_exp_avg_sqs without
            if element.kind() in ("TensorType", "OptionalType", "IntType"):  # amsgrad; a 0-d tensor's size): a
                n = self.node("prim::ListConstruct", [], 1)  # constant cannot tell its type
                n.output().setType(_C.ListType(element))
                return n.output()
        if isinstance(v, list | tuple) and any(isinstance(x, torch.Tensor) for x in v):
            if any(x is not None and not isinstance(x, torch.Tensor) for x in v):
                raise ValueError("a list mixing tensors and other values")
            items = [self.value(x, None) if x is not None else self.graph.insertConstant(None) for x in v]
            n = self.node("prim::ListConstruct", items, 1)
            element = _C.TensorType.get() if all(x is not None for x in v) else _C.OptionalType(_C.TensorType.get())
            n.output().setType(_C.ListType(element))
            return n.output()
        if spec is not None and str(spec.type) == "Tensor" and isinstance(v, bool | int | float | complex):
            raise ValueError("a number where the schema takes a tensor")  # see _SCALAR_TWINS
        if isinstance(v, torch.memory_format):
            return self.graph.insertConstant(_MEMORY_FORMATS[v])
        return self.graph.insertConstant(list(v) if isinstance(v, tuple) else v)

    def recorder(self, op: torch._ops.OpOverload) -> Any:
        """The callable graph.execute runs for `op` in the dry run: the kernel on meta tensors, and its node."""
        schema = op._schema
        twin = _SCALAR_TWINS.get(f"{schema.name}.{schema.overload_name}")
        returns = [str(r.type) for r in schema.returns]
        kernel = op._op

        def call(*a: Any, **k: Any) -> Any:
            out = metalists.run(op, kernel, [_dry(v) for v in a], {name: _dry(v) for name, v in k.items()})
            use = schema
            given = [a[i] if i < len(a) else k[spec.name] if spec.name in k else spec.default_value
                     for i, spec in enumerate(schema.arguments)]  # fmt: skip
            if twin is not None and isinstance(given[1], bool | int | float):
                use = twin._schema  # `x * 2.5` as the .Scalar overload: the same kernel on a wrapped number
            values = [self.value(v, spec) for v, spec in zip(given, use.arguments, strict=True)]
            if returns == ["List[Tensor]"]:
                results = list(out)
                n = self.node(schema.name, values, 1)
                n.output().setType(_C.ListType(_C.TensorType.get()))
                outputs = list(self.node("prim::ListUnpack", [n.output()], len(results)).outputs())
            else:
                if any(r != "Tensor" and not r.startswith("Tensor(") for r in returns):
                    raise ValueError(f"{schema.name} returns {returns}")
                results = [] if not returns else list(out) if len(returns) > 1 else [out]
                n = self.node(schema.name, values, len(results))
                outputs = list(n.outputs())
            if n.schema() != str(use):
                raise ValueError(f"{schema.name}.{schema.overload_name} resolved to {n.schema()}")
            for t, v in zip(results, outputs, strict=True):
                v.setType(_C.TensorType.get())
                if isinstance(t, torch.Tensor):
                    self.bind(t, v)
            return out

        return call


# Overloads taking a Tensor that the client may give a Python number (which the kernel call wraps into a
# "wrapped number" tensor), and the .Scalar overload ATen implements as exactly that call.
_SCALAR_TWINS = {
    f"aten::{name}.Tensor": getattr(torch.ops.aten, name).Scalar
    for name in ("add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_")
}


def _embedding_dense_backward(b: _Builder, kernel: Any) -> Any:
    def call(*given: Any, **k: Any) -> Any:
        a = list(given)
        n = int(opargs.arg(a, k, 2, "num_weights", 0))
        if len(a) > 1:
            a[1] = guards.checked_indices(a[1], n, b.recorder)
        else:
            k["indices"] = guards.checked_indices(k["indices"], n, b.recorder)
        return kernel(*a, **k)

    return call


# Value guards a traced graph keeps, as tensor ops in its graph (schema name -> the call wrapped with them).
_TRACED_GUARDS = {"aten::embedding_dense_backward": _embedding_dense_backward}
# TorchScript holds memory formats as ints (c10::MemoryFormat's values).
_MEMORY_FORMATS = {torch.contiguous_format: 0, torch.preserve_format: 1, torch.channels_last: 2,
                   torch.channels_last_3d: 3}  # fmt: skip


def _dry(v: Any) -> Any:
    return _META if isinstance(v, torch.device) else v


class _ComposedOps(attention.Ops):
    """A fused attention call's composition (server/attention.py) written out: each aten call it makes becomes a
    node (`_Builder.recorder`); a part that is not aten calls through here (the math composition, a CUDA kernel)
    fails the trace, which keeps the Python replay."""

    traceable = True

    def __init__(self, b: _Builder, device: torch.device, names: list[str], real: list[Any] | None = None) -> None:
        self.b, self.real, self.names = b, device, names
        self.layouts, self.at = real, 0  # the real run's layouts of this call (`_RecordingOps`), and where we are

    def call(self, op: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
        self.names.append(op._schema.name)
        out = self.b.recorder(op)(*args, **kwargs)
        self.same((op._schema.name, _layout(out)))
        return out

    def same(self, entry: Any) -> None:
        """The dry run's tensors must be laid out as the real run's were at this point of the composition: its
        layout decisions (`attention._dense_or_copy`, `_like`, `_matching_layout`) are written into the graph as
        taken here, on meta tensors, and some ops' meta kernels lay their outputs out otherwise than their CPU
        kernels (`_linalg_svd`'s Vh, `max_unpool2d` of a channels-last input), where the graph would hand the
        CPU flash kernel a tensor whose last dimension is not contiguous, which it misreads."""
        if self.layouts is None:
            return
        if self.at >= len(self.layouts) or self.layouts[self.at] != entry:
            raise ValueError("a fused attention call's tensors are laid out otherwise than their meta tensors")
        self.at += 1

    def device(self, t: torch.Tensor) -> torch.device:
        return self.real  # the graph's constants name the real device; the dry run's kernels get meta (`_dry`)

    def untraceable(self, why: str) -> None:
        raise ValueError(f"a fused attention call runs {why}")


def _layout(v: Any) -> Any:
    """What a composition's layout decisions read of a value: a tensor's shape, strides and dtype."""
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), v.stride(), v.dtype)
    if isinstance(v, list | tuple):
        return tuple(_layout(x) for x in v)
    return None


def _arguments(a: Any, k: dict[str, Any]) -> Any:
    return ("arguments", _layout([*a, *k.values()]))


class _RecordingOps(attention.Ops):
    """A fused attention call's composition run for real (the Python replay before a trace), each aten call's
    result's layout kept (`layouts`) for the dry run to compare with (`_ComposedOps.same`)."""

    def __init__(self, layouts: list[Any]) -> None:
        self.layouts = layouts

    def call(self, op: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
        out = op._op(*args, **kwargs)
        self.layouts.append((op._schema.name, _layout(out)))
        return out


def composes(g: Graph) -> bool:
    """Whether `g` holds a fused attention call, whose composition's layout decisions the trace must check against
    a real run's (`replay_recording`)."""
    return any(c.kernel is not None for c in g.calls)


def _composition(name: str) -> Any:
    """The composition (server/attention.py) a fused attention call of schema `name` runs: forward or backward."""
    return attention.forward if name == attention.FORWARD else attention.backward


def replay_recording(host: Host, s: Any, g: Graph, slots: list[Any], execute: Any) -> dict[int, list[Any]]:
    """Run the step as the Python replay does (`execute`), each fused attention call's composition recording the
    layouts of its arguments and of each aten call's result (by call index), for `trace`. A call that draws (the
    dropout forward) draws as the replay's does, on the session's stream (`host._seeded`; round 23 called the
    composition bare: after a new seed it drew from where the device's generator was, not from the seed)."""
    seen: dict[int, list[Any]] = {}
    plan = list(g.plan)
    for i, c in enumerate(g.calls):
        if c.kernel is None:
            continue
        composed = _composition(host.ops.resolve(c.name)._schema.name)

        def call(*a: Any, _i: int = i, _f: Any = composed, _k: str = c.kernel, **k: Any) -> Any:
            layouts = seen.setdefault(_i, [])
            layouts.append(_arguments(a, k))
            return _f(_RecordingOps(layouts), _k, *a, **k)

        step = list(plan[i])
        step[1] = call
        if c.seeded:

            def seeded(*a: Any, _call: Any = call, **k: Any) -> Any:
                return host._seeded(s, _call, list(a), k)

            step[1] = seeded
        plan[i] = tuple(step)
    real, g.plan = g.plan, plan
    try:
        execute(g, slots)
    finally:
        g.plan = real
    return seen


def _composed(b: _Builder, g: Graph, i: int, name: str, kernel: str, real: dict[int, list[Any]] | None) -> Any:
    ops = _ComposedOps(b, g.device, b.composed.setdefault(i, []), None if real is None else real.get(i, []))
    composed = _composition(name)

    def call(*a: Any, **k: Any) -> Any:
        ops.same(_arguments(a, k))
        out = composed(ops, kernel, *a, **k)
        if ops.layouts is not None and ops.at != len(ops.layouts):  # the real run made more calls
            raise ValueError("a fused attention call's tensors are laid out otherwise than their meta tensors")
        return out

    return call


def _recording_plan(
    host: Host, g: Graph, b: _Builder, real: dict[int, list[Any]] | None = None, start: int = 0, stop: int | None = None
) -> list[Any]:
    """g.plan[start:stop] as the dry run executes it: every call through `b`, each value-guarded call's Python check
    replaced by the same check as tensor ops (recorded too), each fused attention call by its composition's aten
    calls."""
    plan = []
    for i in range(start, len(g.calls) if stop is None else min(stop, len(g.calls))):
        c = g.calls[i]
        step = list(g.plan[i])
        op = host.ops.resolve(c.name)
        fn = b.recorder(op)  # the kernel itself: a seeded call's Python wrapper only picks the generator
        if c.kernel is not None:
            fn = _composed(b, g, i, op._schema.name, c.kernel, real)
        if c.check is not None:
            fn = _TRACED_GUARDS[op._schema.name](b, fn)
            step[7] = None
        step[1] = fn
        plan.append(tuple(step))
    return plan


class Buffer(NamedTuple):
    """A kept tensor the traced function writes into a buffer it is given (`_into_buffers`): its slot, the handle
    `writes` binds it to, its sizes, strides and dtype (its storage offset 0), and its storage's bytes (all of
    them: the buffer is exactly that storage)."""

    slot: int
    handle: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int

    def fresh(self) -> torch.Tensor:
        """A buffer of its own (memory the run's binding then counts, as a kernel's output)."""
        return torch.empty_strided(self.sizes, self.strides, dtype=self.dtype)


class Traced:
    """A graph's TorchScript function and how its slots map to the function's inputs and outputs. The function's
    arguments are the `picks`' slots, then one per `buffers`: what the kept tensor is written into (the tensor
    its handle held after the last run where nothing else may see it: native_runner.cpp `graph_run`; else a fresh
    one), which the function returns as that kept tensor."""

    def __init__(self, fn: Any, g: Graph, kept: list[int], seeded: bool) -> None:
        self.fn = fn
        self.buffers: list[Buffer] = []
        self.n_inputs = len(g.input_meta)
        self.externals = [slot for slot, _, _ in g.externals]
        self.kept = kept
        self.seeded = seeded
        # The function's arguments out of the slots in one call (a tuple; itemgetter of one index returns the item)
        picks = self.picks = [*range(1, self.n_inputs + 1), *self.externals]
        self._pick = operator.itemgetter(*picks) if len(picks) > 1 else None

    def args(self, slots: list[Any]) -> Any:
        if self._pick is None:
            return [*slots[1 : self.n_inputs + 1], *(slots[x] for x in self.externals)]
        return self._pick(slots)

    def run(self, host: Host, s: Any, g: Graph, slots: list[Any]) -> None:
        if self.seeded:
            host._seeded(s, _nothing, [], {})  # the device's generator holds this session's stream
        try:  # (the Python path: every buffer a fresh one; `_quick`'s plan writes into the last run's where it may)
            out = self.fn(*self.args(slots), *[b.fresh() for b in self.buffers])
            for slot, value in zip(self.kept, out, strict=True):  # (a ValueError: not one value a kept slot)
                slots[slot] = value
        except (RuntimeError, TypeError, ValueError, IndexError, OverflowError, MemoryError) as exc:
            raise failure(g, exc) from None


def _no_meta(graph: Any) -> None:
    """The dry run's device must never reach the graph: every constant device and tensor must be a real one."""
    for _ in _no_meta_pieces(graph):
        pass


def _no_meta_pieces(graph: Any) -> Generator[None, None, None]:
    """`_no_meta` in pieces of `PIECE` nodes."""
    for k, node in enumerate(graph.nodes()):
        if k and not k % PIECE:
            yield
        if node.kind() != "prim::Constant" or not node.outputsSize():
            continue
        value = node.output().toIValue()
        if (isinstance(value, torch.device) and value.type == "meta") or (
            isinstance(value, torch.Tensor) and value.is_meta
        ):
            raise ValueError("the graph holds a meta constant")


# The ops the embedding backward's kept index check adds before it (guards.checked_indices).
_GUARD_OPS = {"aten::embedding_dense_backward": ["aten::new_zeros", "aten::reshape", "aten::index_select",
                                                  "aten::sum", "aten::add"]}  # fmt: skip


def _same_ops(host: Host, g: Graph, b: _Builder) -> Generator[None, None, None]:
    """The graph must run exactly the graph's calls, in order (plus the index checks of _TRACED_GUARDS); in pieces
    of `PIECE` calls and nodes."""
    want: list[str] = []
    for i, c in enumerate(g.calls):
        if i and not i % PIECE:
            yield
        name = host.ops.resolve(c.name)._schema.name
        if c.kernel is not None:  # a fused attention call: the aten calls of its composition, one node each
            want += b.composed[i]
            continue
        want += _GUARD_OPS.get(name, []) if c.check is not None else []
        want.append(name)
    got: list[str] = []
    for k, n in enumerate(b.graph.nodes()):
        if k and not k % PIECE:
            yield
        if k >= TRACE_MAX_NODES:  # its compile, at the first call, is one command (`TRACE_MAX_NODES`)
            raise ValueError(f"the graph holds more than {TRACE_MAX_NODES} nodes")
        kind = n.kind()
        if not kind.startswith("prim::"):
            got.append(kind)
    if got != want:
        raise ValueError(f"the graph holds {len(got)} ops where the step has {len(want)}")


# Functional overloads whose out= overload runs the same kernel (structured kernels: the functional form allocates
# its output and calls it), by schema; autogenerated out= forms (the functional, then a copy) are not here. (Round
# 53: the encoder's layer-norm and embedding gradients copied into their buffers after the op -- `copy_`, or
# `narrow_copy.out`'s memcpy -- cost the whole step more inside the call than the worker saved: BENCHMARKS.md.)
_aten = torch.ops.aten
_OUT_FORMS = {
    str(f._schema): o
    for f, o in [(_aten.mm.default, _aten.mm.out), (_aten.bmm.default, _aten.bmm.out),
                 (_aten.addmm.default, _aten.addmm.out), (_aten.sum.dim_IntList, _aten.sum.IntList_out),
                 (_aten.add.Tensor, _aten.add.out), (_aten.sub.Tensor, _aten.sub.out),
                 (_aten.mul.Tensor, _aten.mul.out), (_aten.div.Tensor, _aten.div.out)]
}  # fmt: skip


def _view_of(node: Any) -> bool:
    """Whether `node` is a view op (its one output an alias of its first argument, nothing written)."""
    if not node.kind().startswith("aten::") or node.outputsSize() != 1 or node.inputsSize() < 1:
        return False
    schema = _C.parse_schema(node.schema())
    ret, arg = schema.returns[0].alias_info, schema.arguments[0].alias_info
    return ret is not None and arg is not None and not ret.is_write and not arg.is_write and len(schema.returns) == 1


def _into_buffers(b: _Builder, g: Graph, kept: list[int], result: Any) -> list[Buffer]:
    """Rewrite the graph so that each kept tensor its handle in `writes` takes on every run (a step's new gradient)
    whose memory one op of `_OUT_FORMS` makes -- the op's result itself or a chain of views of it (a weight's
    gradient is `t(mm(...))`, a bias's `view(sum(...))`) -- is written into a buffer the function takes as an
    argument: that op's out= form into the buffer (viewed as the op's result by `as_strided` where the kept tensor
    is a view of it), and the function returns the buffer as the kept tensor, which the graph's later ops read
    (the views made of the result for it are gone: the `as_strided` is the one view a run makes, as before). The
    buffer must be laid out as the kept tensor (offset 0, its storage exactly the result's): the last run's kept
    tensor is, and a fresh one (`Buffer.fresh`) is. Round 52: a step's new gradients were new tensors every run, the
    last run's freed (~2.3k instructions a tensor of the worker's, an allocation each on a real device). `result`:
    the graph's output list node."""
    handles: dict[int, list[int]] = {}
    for h, slot in g.writes.items():
        handles.setdefault(slot, []).append(h)
    metas = {b.values[id(t)].unique(): t for t in b.alive if id(t) in b.values}
    graph, claimed, found = b.graph, set(), []
    for k, slot in enumerate(kept):
        if len(handles.get(slot, ())) != 1 or slot in g.outputs:
            continue
        value = result.inputsAt(k)
        chain, node = [], value.node()
        while node.kind().startswith("aten::") and node.schema() not in _OUT_FORMS and _view_of(node):
            chain.append(node)
            node = node.inputsAt(0).node()
        if not node.kind().startswith("aten::") or node.schema() not in _OUT_FORMS or node.outputsSize() != 1:
            continue
        made, want = metas.get(node.output().unique()), metas.get(value.unique())
        if made is None or want is None or node.output().unique() in claimed:
            continue
        nbytes = made.untyped_storage().nbytes()
        buffer = Buffer(slot, handles[slot][0], tuple(want.shape), want.stride(), want.dtype, nbytes)
        span = _dry_tensor((buffer.sizes, buffer.strides, 0, want.dtype)).untyped_storage().nbytes()
        if want.storage_offset() or made.storage_offset() or made.dtype != want.dtype or span != nbytes:
            continue  # (the buffer must be exactly the result's storage, a fresh one too)
        claimed.add(node.output().unique())
        into = graph.addInput()
        into.setType(_C.TensorType.get())
        with graph.insert_point_guard(node):
            base = into
            if chain:  # the buffer as the op's result (the kept tensor is a view of it)
                base = b.node("aten::as_strided", [into, graph.insertConstant(list(made.shape)),
                                                   graph.insertConstant(list(made.stride())), graph.insertConstant(0)],
                              1).output()  # fmt: skip
                base.setType(_C.TensorType.get())
            out = b.node(node.kind(), [*node.inputs(), base], 1)
        if out.schema() != str(_OUT_FORMS[node.schema()]._schema):
            raise ValueError(f"{node.kind()}'s out= form resolved to {out.schema()}")
        out.output().setType(_C.TensorType.get())
        node.output().replaceAllUsesWith(out.output())
        node.destroy()
        if chain:  # every reader of the kept tensor (the output list, the optimizer's ops) reads the buffer itself:
            value.replaceAllUsesWith(into)  # laid out as the views made it, on the memory the op wrote
            for view in chain:  # the views no one reads now (the first one at least)
                if view.output().uses():
                    break
                view.destroy()
        found.append(buffer)
    return found


def failure(g: Graph, exc: BaseException) -> BaseException:
    """The error a run of `g`'s traced function that raised `exc` answers (`Traced.run`, graph._quick): an
    allocation that failed is the session's RESOURCE_EXHAUSTED, an op's error INVALID_ARGUMENT; anything else is
    `exc` itself."""
    if not isinstance(exc, RuntimeError | TypeError | ValueError | IndexError | OverflowError | MemoryError):
        return exc
    if out_of_memory(exc):
        return ResourceExhausted(f"graph {g.graph_id}: {oom_message(exc)}")
    return InvalidArgument(f"graph {g.graph_id}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    """The error of a failed op, from the TorchScript interpreter's report (its last line; the rest is a trace)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.removeprefix("RuntimeError: ")[:300]


def _nothing() -> None:
    return None


def _dry_tensor(m: Any) -> torch.Tensor:
    """A meta tensor of metadata `m` (graph_build.Meta): what every run's tensor in that slot is laid out as (a run
    checks its inputs and persistent tensors against the graph's metadata before any op)."""
    return torch.empty_strided(m[0], m[1], dtype=m[3], device=_META)


def trace(
    host: Host, s: Any, g: Graph, execute: Any, real: dict[int, list[Any]] | None = None
) -> Generator[None, None, Traced | None]:
    """Write the step's TorchScript graph from a dry run of its calls on meta tensors laid out as its inputs and
    persistent tensors (nothing is read or written, no random number drawn, so a failure midway harms nothing), in
    pieces: each `next` does at most `PIECE` inputs' or nodes' or `DRY_PIECE` calls' worth of it (graph.py runs
    pieces for a time budget a slice, the device serving its other sessions between). Returns the graph's
    `Traced`, or None.
    `real`: the layouts a run of the step's fused attention calls met (`replay_recording`); the dry run must meet
    the same, or the graph keeps the Python replay. (Until round 38 one command: a graph of 20,000 ops held the
    device's thread 37 s at load 11, a neighbour's op waited as long; the dry run's meta kernels cost about what
    the definition's, which went in pieces.)"""
    kept = sorted(set(g.outputs) | set(g.writes.values()))
    layout = Traced(None, g, kept, any(c.seeded for c in g.calls))
    b = _Builder()
    inner: list[Any] = [None] * g.n_slots
    try:
        metas = [*g.input_meta, *(m for _, _, m in g.externals)]
        for k, slot in enumerate([*range(1, layout.n_inputs + 1), *layout.externals]):
            if k and not k % PIECE:
                yield
            inner[slot] = _dry_tensor(metas[k])
            b.input(inner[slot])
        for at in range(0, len(g.calls), DRY_PIECE):
            yield
            execute(g, inner, _recording_plan(host, g, b, real, at, at + DRY_PIECE), at)
        if any(not isinstance(inner[k], torch.Tensor) for k in kept):
            raise ValueError("an output is not a tensor")
        # a list, not a tuple: TorchScript hands a tuple back to Python by building its TupleType (a TensorType
        # per element) on every call, ~2x the cost of the call's own argument handling; a list is copied as is
        result = b.node("prim::ListConstruct", [b.values[id(inner[k])] for k in kept], 1)
        result.output().setType(_C.ListType(_C.TensorType.get()))
        b.graph.registerOutput(result.output())
        yield
        b.graph.lint()
        yield from _same_ops(host, g, b)
        yield from _no_meta_pieces(b.graph)
        yield
        layout.buffers = _into_buffers(b, g, kept, result)
        b.graph.lint()
        yield
        # Run as written, without the graph executor's optimisation passes: the same kernels in the same order as
        # the Python replay, so the same bits. (Process-wide: this is a session's own worker process.)
        _C._set_graph_executor_optimize(False)
        fn = _C._create_function_from_graph(f"gpupool_graph_{g.graph_id}", b.graph)
        yield  # its first call compiles it: in a slice of its own where the budget is spent
    except Exception as exc:  # noqa: BLE001 - this is an optimisation: a refusal keeps the Python replay
        log.info("session %d: graph %d stays on the Python replay: its TorchScript graph failed: %s", s.number,
                 g.graph_id, (str(exc).splitlines() or [type(exc).__name__])[0][:200])  # fmt: skip
        return None
    layout.fn = fn
    nodes = sum(1 for n in b.graph.nodes() if not n.kind().startswith("prim::"))
    log.info("session %d: graph %d runs as a TorchScript graph (%d ops, %d fused attention; %d nodes; %d of %d kept "
             "tensors written into their last buffers)", s.number, g.graph_id, len(g.calls), len(b.composed), nodes,
             len(layout.buffers), len(kept))  # fmt: skip
    return layout
