"""A captured step run by TorchScript's C++ interpreter instead of the Python replay loop (CPU-backed devices).

graph.execute calls each prebuilt kernel from Python: per op a loop iteration, argument gathering and the call's
own Python-to-C++ argument parsing, about 4-6 us on this project's box, where a tiny model's kernels take 3-10 us.
Once a graph has run once the plain way, `torch.jit.trace` records graph.execute running the graph's prebuilt
calls on meta copies of its tensors (a dry run: nothing is read, written or drawn, so a trace that fails midway
harms nothing), and from then on the session's runs call the traced function: one Python call per step, the ops
dispatched in C++. Nothing is parsed or
evaluated from the wire: the trace records the calls the daemon itself built and checked at DefineGraph (the
allowlist, guards, size and quota checks all ran there), on the tensors of this session.

A graph is traced only when every run would call exactly the same kernels with the same arguments:
- on a CPU-backed device (fake GPUs): real GPUs capture CUDA graphs instead (graph._CudaGraph);
- in a session's own worker process (`exclusive_rng`): its random ops draw from the device's default generator,
  which holds the session's stream there, so traced random ops draw the same numbers as the Python replay (the
  session's stream is loaded before each traced run, as the Python replay's first random op would);
- with no value guard (`check`: Python that reads tensor values on every run) except those rewritten as tensor
  ops that the trace keeps (`_TRACED_GUARDS`: the embedding backward's index range), no factory of uninitialized
  memory (zeroed per run by Python) and no Python replacement of a kernel (guards.replacement: it may branch on
  values);
- with arguments of the kinds the tracer records (tensors, lists of tensors, numbers, strings, dtypes, ...).
Anything else, or a trace that fails, keeps graph.execute (logged once per graph).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from gpupool.errors import InvalidArgument, ResourceExhausted

from . import guards, opargs
from .graph_build import Graph, Host

log = logging.getLogger(__name__)

TRACE_AFTER_RUNS = 1  # a graph's first run is the plain replay; the next one is traced
MAX_ATTEMPTS = 16  # dry traces per graph (each failing one names one more call to record by hand)
_META = torch.device("meta")
_C: Any = torch._C  # the tracer's and the graph executor's private bindings (untyped)
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def refusal(host: Host, g: Graph) -> str | None:
    """Why `g` must keep the Python replay, or None when it may be traced."""
    if g.device.type != "cpu":
        return f"{g.device.type} device"
    if not getattr(host, "exclusive_rng", False):
        return "sessions share this process"
    kept = set(g.outputs) | set(g.writes.values())
    if not kept:
        return "no outputs"
    for c in g.calls:
        if c.check is not None and host.ops.resolve(c.name)._schema.name not in _TRACED_GUARDS:
            return f"{c.name} has a value guard"
        if c.zero:
            return f"{c.name} returns uninitialized memory"
        if c.replaced:
            return f"{c.name} runs a Python replacement"
        if not all(_traceable(v) for v in (*c.args, *c.kwargs.values())):
            return f"{c.name} takes an argument the tracer does not record"
    return None


def _embedding_dense_backward(kernel: Any) -> Any:
    def call(*given: Any, **k: Any) -> Any:
        a = list(given)
        n = int(opargs.arg(a, k, 2, "num_weights", 0))
        if len(a) > 1:
            a[1] = guards.checked_indices(a[1], n)
        else:
            k["indices"] = guards.checked_indices(k["indices"], n)
        return kernel(*a, **k)

    return call


# Value guards a traced graph keeps, as tensor ops in the trace (schema name -> the kernel wrapped with them).
_TRACED_GUARDS = {"aten::embedding_dense_backward": _embedding_dense_backward}


def _recorded(op: torch._ops.OpOverload, kernel: Any) -> Any:
    """`kernel` for the tracer when its arguments include one the tracer cannot record (bool[N], e.g. the
    output_mask of the convolution, layer and batch norm backwards) or a device (which the dry run must replace by
    meta): run untraced, and put the node into the trace by hand, with every argument in schema order (constants as
    constants). The node must resolve to `op` itself, else the trace fails (and the graph keeps the Python
    replay)."""
    schema = op._schema

    def call(*a: Any, **k: Any) -> Any:
        state = _C._get_tracing_state()
        _C._set_tracing_state(None)
        try:  # the dry run's tensors are meta tensors: so are its devices (the node keeps the real one)
            out = kernel(*(_dry(v) for v in a), **{name: _dry(v) for name, v in k.items()})
        finally:
            _C._set_tracing_state(state)
        graph: Any = state.graph()
        values = []
        for i, spec in enumerate(schema.arguments):
            v = a[i] if i < len(a) else k[spec.name] if spec.name in k else spec.default_value
            if isinstance(v, list | tuple) and any(isinstance(x, torch.Tensor) for x in v):
                raise ValueError(f"{schema.name}: a list of tensors beside an argument the tracer cannot take")
            if isinstance(v, torch.Tensor):
                values.append(_C._get_value_trace(v))
            else:
                constant = _MEMORY_FORMATS.get(v, v) if isinstance(v, torch.memory_format) else v
                values.append(graph.insertConstant(constant))
        results = out if isinstance(out, tuple) else (out,)
        node = graph.create(schema.name, values, len(results))
        graph.insertNode(node)
        if node.schema() != str(schema):
            raise ValueError(f"{schema.name}: recorded as {node.schema()}")
        for t, v in zip(results, node.outputs(), strict=True):
            v.setType(_C.TensorType.get())
            if isinstance(t, torch.Tensor):
                _C._set_value_trace(t, v)
        return out

    return call


# TorchScript holds memory formats as ints (c10::MemoryFormat's values).
_MEMORY_FORMATS = {torch.contiguous_format: 0, torch.preserve_format: 1, torch.channels_last: 2,
                   torch.channels_last_3d: 3}  # fmt: skip


def _dry(v: Any) -> Any:
    return _META if isinstance(v, torch.device) else v


def _by_hand(v: Any) -> bool:
    """An argument the tracer cannot take (bool[N]) or must not run as given on meta tensors (a device)."""
    if isinstance(v, list | tuple):
        return bool(v) and all(isinstance(x, bool) for x in v)
    return isinstance(v, torch.device)


def _traced_plan(host: Host, g: Graph, by_hand: set[int], at: list[int]) -> list[Any]:
    """g.plan as the tracer runs it: each value-guarded call's Python check replaced by the same check as tensor
    ops; calls in `by_hand`, or with arguments the tracer cannot take, recorded by hand; `at[0]` says which call
    runs (so that a failed trace names the call to record by hand in the next attempt)."""
    plan = list(g.plan)
    for i, c in enumerate(g.calls):
        step = list(plan[i])
        op = host.ops.resolve(c.name)
        fn = step[1]
        if i in by_hand or any(_by_hand(v) for v in (*c.args, *c.kwargs.values())):
            fn = _recorded(op, fn)
        if c.check is not None:
            fn = _TRACED_GUARDS[op._schema.name](fn)
            step[7] = None
        step[1] = _counted(fn, i, at)
        plan[i] = tuple(step)
    return plan


def _counted(fn: Any, i: int, at: list[int]) -> Any:
    def call(*a: Any, **k: Any) -> Any:
        at[0] = i
        return fn(*a, **k)

    return call


def _traceable(v: Any) -> bool:
    if isinstance(v, list | tuple):
        return all(_traceable(x) for x in v)
    return v is None or isinstance(v, _PLAIN) or isinstance(v, torch.Tensor)


class Traced:
    """A graph's traced function and how its slots map to the function's inputs and outputs."""

    def __init__(self, fn: Any, g: Graph, kept: list[int], seeded: bool) -> None:
        self.fn = fn
        self.n_inputs = len(g.input_meta)
        self.externals = [slot for slot, _, _ in g.externals]
        self.kept = kept
        self.seeded = seeded

    def args(self, slots: list[Any]) -> list[torch.Tensor]:
        return [*slots[1 : self.n_inputs + 1], *(slots[x] for x in self.externals)]

    def run(self, host: Host, s: Any, g: Graph, slots: list[Any]) -> None:
        if self.seeded:
            host._seeded(s, _nothing, [], {})  # the device's generator holds this session's stream
        try:
            out = self.fn(*self.args(slots))
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise ResourceExhausted(f"graph {g.graph_id}: device out of memory: {exc}") from None
        except (RuntimeError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise InvalidArgument(f"graph {g.graph_id}: {_reason(exc)}") from None
        for slot, value in zip(self.kept, out, strict=True):
            slots[slot] = value


def _no_meta(graph: Any) -> None:
    """A dry run's device must not leak into the trace (a Python meta kernel run under the tracer could record a
    factory on the meta device): every constant device and tensor must be a real one."""
    for node in graph.nodes():
        if node.kind() != "prim::Constant" or not node.outputsSize():
            continue
        value = node.output().toIValue()
        if (isinstance(value, torch.device) and value.type == "meta") or (
            isinstance(value, torch.Tensor) and value.is_meta
        ):
            raise ValueError("the trace holds a meta constant")


def _reason(exc: BaseException) -> str:
    """The error of a failed op, from the TorchScript interpreter's report (its last line; the rest is a trace)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.removeprefix("RuntimeError: ")[:300]


def _nothing() -> None:
    return None


def trace(host: Host, s: Any, g: Graph, slots: list[Any], execute: Any) -> Traced | None:
    """Trace the step on meta copies of its tensors (a dry run: no data is read or written, no random number
    drawn), so a tracer that refuses an op midway harms nothing. Returns the traced function, or None."""
    kept = sorted(set(g.outputs) | set(g.writes.values()))
    layout = Traced(None, g, kept, any(c.seeded for c in g.calls))
    ran: list[list[Any]] = []

    def step(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inner: list[Any] = [None] * g.n_slots
        inner[1 : layout.n_inputs + 1] = tensors[: layout.n_inputs]
        for slot, t in zip(layout.externals, tensors[layout.n_inputs :], strict=True):
            inner[slot] = t
        execute(g, inner)
        ran.append(inner)
        return tuple(inner[k] for k in kept)

    dry = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=_META) for t in layout.args(slots))
    # Traced graphs run as traced, without the graph executor's optimisation passes: the same kernels in the same
    # order as the Python replay, so the same bits. (Process-wide, and this is a session's own worker process.)
    _C._set_graph_executor_optimize(False)
    by_hand: set[int] = set()
    plan = g.plan
    for _ in range(MAX_ATTEMPTS):
        at = [-1]
        ran.clear()
        g.plan = _traced_plan(host, g, by_hand, at)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about in-place ops on inputs: expected here
                fn = torch.jit.trace(step, dry, check_trace=False)
            if not ran or any(not isinstance(ran[0][k], torch.Tensor) for k in kept):
                raise ValueError("an output is not a tensor")
            _no_meta(fn.graph)
            break
        except Exception as exc:  # noqa: BLE001 - tracing is an optimisation: a refusal keeps the Python replay
            # An op whose meta kernel is Python (sizes turn into traced values) fails under the tracer: record
            # that call by hand next time. Anything else, or a call that failed by hand too, ends the attempts.
            if ran or at[0] < 0 or at[0] in by_hand:
                log.info("session %d: graph %d stays on the Python replay: the trace failed: %s", s.number,
                         g.graph_id, str(exc).splitlines()[0][:200])  # fmt: skip
                return None
            by_hand.add(at[0])
        finally:
            g.plan = plan
    else:
        log.info("session %d: graph %d stays on the Python replay: %d ops would need recording by hand",
                 s.number, g.graph_id, len(by_hand))  # fmt: skip
        return None
    layout.fn = fn
    log.info("session %d: graph %d runs as a TorchScript graph (%d ops)", s.number, g.graph_id, len(g.calls))
    return layout
