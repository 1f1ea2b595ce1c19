"""Defining a captured step's graph on the daemon (DefineGraph): validation, slot tables and the memory plan.

A graph is the eager `Op` records of one step with graph-local slots in place of handles (device.proto). At
definition every op goes through what an eager op goes through: the name through the allowlist (`OpTable`),
the arguments through `wire.decode_arg` and the guards (`check_enums`, `check_counts`, `check_inputs`,
`validate`), and the whole graph through a dry run on `meta` tensors, which gives every slot's shape and the
graph's peak memory; ops whose output shapes only running them can tell (no meta kernel, data-dependent shapes)
and ops that re-point or grow storages are refused.

What comes out is a `Graph` of prebuilt `Call`s: the resolved overload (or its checked replacement), an argument
list built once with the slot positions to fill in, and the slots to drop after their last use. Running it is
graph.py's part.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from gpupool import metas, wire
from gpupool._proto import device_pb2, tensor_pb2
from gpupool.errors import GpupoolError, InvalidArgument, ResourceExhausted

from . import attention, checks, cost, fallbacks, guards, metalists
from .sessions import WorkerSession, extent, oom_message, out_of_memory

metas.register()  # Meta kernels torch lacks (a fused Adam's tensor-lr overload): a graph's ops run on meta tensors

if TYPE_CHECKING:
    from .ops import OpTable

MAX_GRAPH_OPS = 100_000
# A run binds each input and persistent tensor (a handle looked up and its metadata compared, or an input's bytes
# copied) on the device's thread, in one command, not pieced, and its TorchScript trace (process isolation, once a
# definition) takes each as a graph input (round 37, graph37: a graph of 100,000 inputs held the device's thread
# 0.12-0.28 s a run and 3.4 s at its trace; 100,000 persistent tensors 0.04-0.12 s and 3.0 s; a neighbour's op
# waited as long). An honest step's inputs are its arguments, its persistent tensors its parameters, gradients and
# optimizer state (a few thousand for the largest models). Refused at the definition past these.
MAX_GRAPH_INPUTS = 4_096
MAX_GRAPH_PERSISTENT = 16_384
# Entries of one tensor list of a graph op (eager ops: guards.MAX_TENSORS, 65,536). Round 44 (hostile44): a graph op
# naming one slot 65,536 times held its worker (the definition is cut between ops, not within one) for 3-16 s here
# (`_foreach_lerp.List`, `_foreach_norm`: the per-entry decoding, guards and outputs), 16,384 for ~0.7-1.3 s
# (bench/graph_list_define.py)
GRAPH_MAX_LIST = 16_384
# Host memory a graph holds once defined and traced (RSS growth of the process that holds it, the session's worker
# or an `--isolation thread` daemon, past a first small graph; the peak: what the definition parses and builds at
# once). Round 35 fitted ~3.5 KB an op and ~790 bytes a tensor reference or output slot to `neg` chains and
# `_foreach_neg` ops; round 38 (gmem38, bench/host_memory.py --probe estimate) measured every argument that is not
# a tensor at ~3.5 KB more: the TorchScript trace (graph_trace.py) writes each as a constant node, defaults
# included, and its executor copies the graph and compiles each node (a chain of `_to_copy`, six arguments at
# their defaults, held 27 KB an op, estimated 5 KB; `arange.start_step` and `add` 4.1x the estimate), and an inline
# tensor's bytes at ~5-7x (the frame's copies, its parsed message and the decoded tensor at once). Fitted
# as upper bounds of every shape measured, both isolations: `host_bytes`.
OP_BYTES = 6_000
REF_BYTES = 1_100
CONST_BYTES = 4_500  # an argument of an op's schema that is not a tensor or list of tensors (a trace constant)
# bytes counted per byte of an inline tensor: its frame's copies (gRPC's, the front's, the worker's), the parsed
# message and the decoded tensor at once (200 ops of a 64 KiB inline tensor, `--isolation thread`: a peak of 6.6x)
INLINE_COPIES = 8
# An input or persistent tensor, held per graph (its metadata, its slot's entries, the traced graph's input), and a
# dimension of its metadata: round 36 fitted 1,500 and 24 bytes (rev36); at graph37's limits (4,096 inputs and
# 16,384 persistent tensors) a definition grew a daemon by ~2x that (58 MiB at 1 dimension, 117 MiB at 64 against
# estimates of 29 and 59 MiB). Outputs and writes count REF_BYTES. `building`.
INPUT_BYTES = 3_500
DIM_BYTES = 64
_EVERY = 256  # records a piece of a pass over a graph's ops takes (`building`): well under a millisecond
MAX_DIMS = 64
_META = torch.device("meta")
# Ops that re-point or grow storages: a graph's memory must be known before it runs.
NOT_IN_GRAPHS = frozenset({"aten::resize_", "aten::resize_as_", "aten::_resize_output_", "aten::set_"})


class Host(Protocol):
    """What graphs need of the executor: its op table, its ledger, its seeded-op runner and its record of a command's
    error (`GraphTable.run_raw`)."""

    ops: OpTable
    ledger: Any
    native: Any  # the C++ runner's module (server/native_runner.py), or None

    def _seeded(self, s: WorkerSession, op: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any: ...

    def _failed(self, s: WorkerSession, cmd: Any, exc: Exception, reply: Callable[[Any], None]) -> None: ...


class _Ref:
    """A slot while arguments are decoded."""

    __slots__ = ("slot",)

    def __init__(self, slot: int) -> None:
        self.slot = slot


Meta = tuple[tuple[int, ...], tuple[int, ...], int, torch.dtype]


def meta_of(t: torch.Tensor) -> Meta:
    return (tuple(t.shape), tuple(t.stride()), int(t.storage_offset()), t.dtype)


@dataclass(slots=True)
class Call:
    """One prebuilt op of a graph."""

    name: str
    fn: Callable[..., Any]
    args: list[Any]
    fill: list[tuple[int, int]]  # (argument position, slot)
    fill_lists: list[tuple[int, list[int]]]  # (argument position, slots; 0 = None)
    kwargs: dict[str, Any]
    kfill: list[tuple[str, Any]]  # (name, slot or list of slots)
    outs: list[int]  # slot per returned value, 0 skips
    single: bool  # the op returns one tensor
    dead: list[int]  # slots whose last use is this op
    check: Callable[[list[Any], dict[str, Any]], None] | None  # a guard that reads values
    zero: int  # outputs are uninitialized memory: 0, ZERO_STORAGE or ZERO_ELEMENTS (`sessions.zero_made`)
    seeded: bool  # draws random numbers from the session's generator
    replaced: bool = False  # runs guards.replacement's Python code instead of the kernel
    kernel: str | None = None  # a fused attention call's kernel (attention.graph_kernel)
    # A value-guarded call's arguments as its definition's dry run saw them (meta tensors, constants): what the guard
    # reads of them other than values (shapes, dtypes), for running it before a CUDA graph's replay (graph_cuda.py)
    guard_meta: tuple[list[Any], dict[str, Any]] | None = None


@dataclass
class Graph:
    graph_id: int
    n_slots: int
    input_meta: list[Meta]
    externals: list[tuple[int, int, Meta]]  # (slot, handle, metadata)
    calls: list[Call]
    outputs: list[int]
    writes: dict[int, int]  # handle -> slot
    peak: int  # bytes the run allocates at most at once
    mutated: list[int]  # persistent handles whose storages ops grow (out= resizes): recounted after a run
    input_bytes: list[int] = field(default_factory=list)  # per input: its bytes when sent by value
    contiguous: list[bool] = field(default_factory=list)  # per input: may it be sent by value
    reserve: int = 0  # bytes the session's used memory counts for this graph: peak + inputs sent by value
    device: torch.device = _META  # where its tensors live
    host_bytes: int = 0  # the host memory it holds, estimated (`host_bytes`): the session's --max-graph-memory
    runs: int = 0
    cuda: Any = None
    cuda_failed: bool = False
    # graph_cuda.verdict at definition, on every device: (the value guards to run before a CUDA graph's replay, None)
    # or (None, why no CUDA graph may hold the graph)
    cuda_verdict: tuple[Any, str | None] = (None, "not decided")
    traced: Any = None  # graph_trace.Traced once the graph runs as a TorchScript graph
    trace_refused: bool = False  # graph_trace said no (or failed): the Python replay for good
    # the layouts of its fused attention calls a Python replay recorded for its trace (graph_trace.replay_recording)
    layouts: Any = None
    plan: list[Step] = field(default_factory=list)  # the calls as graph.execute runs them (`compile_calls`)
    # Per persistent tensor: [a weak reference to the tensor last found to have its metadata, that tensor's
    # version counter when the last run ended] (graph._externals); [None, -1] until then.
    seen: list[list[Any]] = field(default_factory=list)
    # The persistent tensors (indexes into `externals`) no op of the graph may change the metadata of in place:
    # only these skip the check when their version is unchanged (the others are checked on every run).
    stable: list[int] = field(default_factory=list)
    # The session's `mutations` when its last run ended (-1: none yet, or it failed, or it checked nothing): a run
    # that finds it one less than the count (no command that may change a tensor's metadata ran since, but this
    # run) and each persistent handle still bound to the tensor last checked skips every version read
    # (graph._externals); `unstable`: the others of `externals`, checked on every run either way.
    quiet: int = -1
    unstable: list[int] = field(default_factory=list)
    # The quiet run's look-ups (graph._quiet), in C calls: the persistent tensors out of the session's table by their
    # handles (a tuple, in `externals` order), their slots; and the weak references of `seen` as the last run that
    # read them left them (graph._seen_after: a run is quiet only right after a run that ended well).
    pick_externals: Callable[[dict[int, Any]], tuple[Any, ...]] = field(init=False, repr=False)
    external_slots: tuple[int, ...] = field(init=False, default=())
    external_handles: tuple[int, ...] = field(init=False, default=())
    input_sizes: list[list[int]] = field(init=False, default_factory=list)  # per input: its sizes as a list
    quiet_refs: tuple[Any, ...] | None = None
    # graph._quick's C++ plan of its traced quiet runs (native_runner.GraphPlan), made at its first run after the
    # trace; False: that graph takes graph._run
    fast: Any = None
    # The input and persistent slots whose storages an op of the graph that writes (a mutable schema) reads: their
    # values at an op may differ from the run's start (graph_cuda.py runs guards before a replay on the others only)
    written: frozenset[int] = frozenset()
    # Per persistent tensor: its storage's bytes at the definition, the least a run takes (graph._externals): every
    # view the definition checked lies within them (round 44: a persistent `set_` onto a smaller storage since)
    external_nbytes: list[int] = field(default_factory=list)
    # `device.type`, read once: torch.device builds that string anew (a C++ stream) on every read, and a run asked
    # for it once per step and once per input sent by value
    device_type: str = field(init=False, default="meta")

    def __post_init__(self) -> None:
        self.device_type = self.device.type
        self.input_sizes = [list(m[0]) for m in self.input_meta]
        self.external_handles = tuple(h for _, h, _ in self.externals)
        self.pick_externals = _picker(list(self.external_handles))
        self.external_slots = tuple(slot for slot, _, _ in self.externals)


def _picker(keys: list[int]) -> Callable[[dict[int, Any]], tuple[Any, ...]]:
    """`lambda d: tuple(d[k] for k in keys)` in one C call (KeyError where one is missing)."""
    if len(keys) >= 2:
        return operator.itemgetter(*keys)
    if keys:
        key = keys[0]
        return lambda d: (d[key],)
    return lambda d: ()


# How a call's uninitialized outputs are zeroed (`Call.zero`, `sessions.zero_made`): a new tensor's whole storage, or
# an out= form's `out`'s elements only (its storage is the session's, other views of it too)
ZERO_STORAGE, ZERO_ELEMENTS = 1, 2


def _out_form(op: torch._ops.OpOverload) -> bool:
    return any(a.is_out for a in op._schema.arguments)


# How a step gathers its positional arguments (graph.execute): all from slots (two or more, by one
# itemgetter), one slot alone, or a template with slots filled in (constants, lists of slots, keyword slots).
GATHER, ONE, FILL = 0, 1, 2
# One call as the hot loop runs it: (mode, fn, gather (itemgetter / slot / template), fill, fill_lists, kwargs,
# kfill, check, the one output slot or 0, the output slots when several (else ()), zero, dead slots).
Step = tuple[
    int, Callable[..., Any], Any, Any, Any, dict[str, Any], Any, Any, int, tuple[int, ...], int, tuple[int, ...]
]


def compile_calls(calls: list[Call]) -> list[Step]:
    """The hot loop's form of each call: what can be decided once (how to gather arguments, where outputs go) is
    decided here, so that a run does no per-op branching on the call's structure beyond one mode test."""
    plan: list[Step] = []
    for c in calls:
        gather: Any
        slots_only = not c.fill_lists and not c.kfill and len(c.fill) == len(c.args)
        if slots_only and len(c.fill) >= 2 and [pos for pos, _ in c.fill] == list(range(len(c.args))):
            mode, gather = GATHER, operator.itemgetter(*(slot for _, slot in c.fill))
        elif slots_only and len(c.fill) == 1:
            mode, gather = ONE, c.fill[0][1]
        else:
            mode, gather = FILL, c.args
        out1 = c.outs[0] if c.single else 0
        outs = () if c.single or not any(c.outs) else tuple(c.outs)
        plan.append(
            (mode, c.fn, gather, tuple(c.fill), tuple(c.fill_lists), c.kwargs, tuple(c.kfill), c.check, out1, outs,
             c.zero, tuple(c.dead))
        )  # fmt: skip
    return plan


# ---- definition ----


def _meta_tensor(
    m: Meta, storages: dict[Any, torch.Tensor] | None = None, key: Any = None, real: int | None = None
) -> torch.Tensor:
    """A meta tensor of metadata `m` on a meta storage of the bytes it reaches, or of `real` (a persistent tensor's
    storage's own size: a zero-element view may sit past its storage's end, which an out= op then grows from there),
    shared with the slots of the same `key`."""
    shape, stride, offset, dtype = m
    if len(shape) > MAX_DIMS or len(stride) != len(shape) or offset < 0 or any(d < 0 for d in shape):
        raise InvalidArgument(f"bad tensor metadata {list(shape)} / {list(stride)} + {offset}")
    extent = 1 + sum((d - 1) * abs(st) for d, st in zip(shape, stride, strict=True)) if all(shape) else 0
    base = storages.get(key) if storages is not None and key is not None else None
    nbytes = (offset + extent) * wire.itemsize(dtype) if real is None else real
    if base is None:
        base = torch.empty(nbytes, dtype=torch.uint8, device=_META)
        if storages is not None and key is not None:
            storages[key] = base
    t = torch.empty(0, dtype=dtype, device=_META)
    t.set_(base.untyped_storage(), offset, shape, stride)
    return t


def _proto_meta(m: tensor_pb2.TensorMeta) -> Meta:
    return (tuple(m.shape), tuple(m.stride), int(m.storage_offset), wire.dtype_from_proto(m.dtype))


def host_bytes(ops: int, refs: int, data: int = 0, constants: int = 0) -> int:
    """The host memory a graph of `ops` ops holding `refs` references (tensor arguments, output slots, entries of
    list arguments), `constants` arguments that are not tensors (each of its ops' schema's, given or left to its
    default: the trace's constant nodes) and `data` bytes of inline tensors (INLINE_COPIES a byte) and of its inputs,
    persistent tensors, outputs and writes (`building`: INPUT_BYTES an input or persistent tensor and DIM_BYTES a
    dimension of its metadata, REF_BYTES an output or write) takes once defined and traced, estimated: what a
    session's --max-graph-memory counts. An upper bound of what was measured (OP_BYTES)."""
    return ops * OP_BYTES + refs * REF_BYTES + constants * CONST_BYTES + data


def _check_room(s: WorkerSession, msg: device_pb2.DefineGraph, estimate: int, room: int) -> None:
    if estimate > room:
        held = s.max_graph_bytes - room
        raise ResourceExhausted(
            f"graph {msg.graph_id} of {len(msg.ops)} ops would hold about {estimate} bytes of the daemon's host "
            f"memory; the session's other graphs hold about {held} of its {s.max_graph_bytes} byte graph memory "
            "limit (--max-graph-memory): drop a graph, or capture a smaller step"
        )


def building(
    host: Host, s: WorkerSession, msg: device_pb2.DefineGraph, room: int | None = None
) -> Generator[None, None, Graph]:
    """The definition in small pieces: each `next` does a bounded part of it (one op's checks and dry run, or
    `_EVERY` ops' worth of a pass over the records), so that graph.py can stop after a time budget and go on in
    the session's next slice; returns the Graph. A fault is raised by the piece that finds it. `room`: the host
    bytes (`host_bytes`) the session's graph memory limit has left for this graph (None: no limit); a graph
    estimated past it is refused before any op of it is built."""
    if len(msg.ops) > MAX_GRAPH_OPS:
        raise InvalidArgument(f"a graph of {len(msg.ops)} ops; at most {MAX_GRAPH_OPS}")
    if len(msg.input_meta) != msg.inputs:
        raise InvalidArgument(f"{msg.inputs} inputs but {len(msg.input_meta)} input metadata")
    # what its inputs, persistent tensors, outputs and writes hold (round 36: until then uncounted), their metadata
    # by their dimensions as they are read (`DIM_BYTES`); the room checked before each piece builds more
    held = INPUT_BYTES * (len(msg.input_meta) + len(msg.persistent)) + REF_BYTES * (len(msg.outputs) + len(msg.writes))

    def check_held() -> None:
        if room is not None:
            _check_room(s, msg, host_bytes(len(msg.ops), 0, held), room)

    check_held()
    if msg.inputs > MAX_GRAPH_INPUTS or len(msg.persistent) > MAX_GRAPH_PERSISTENT:
        raise InvalidArgument(
            f"a graph of {msg.inputs} inputs and {len(msg.persistent)} persistent tensors; at most "
            f"{MAX_GRAPH_INPUTS} and {MAX_GRAPH_PERSISTENT}"
        )
    dev = s.device.torch_device
    meta_slots: list[Any] = [None]
    # in pieces of `_EVERY`, as every pass below (round 36, rev36: a graph of one op and 250,000 inputs, a 2.5 MB
    # definition, built them in one piece and held the device's thread, every other session's ops, for 12-17 s)
    input_meta: list[Meta] = []
    for i, pm in enumerate(msg.input_meta):
        if i and not i % _EVERY:
            check_held()
            yield
        input_meta.append(_proto_meta(pm))
        held += DIM_BYTES * len(input_meta[-1][0])
        meta_slots.append(_meta_tensor(input_meta[-1]))
    input_storages = {t.untyped_storage()._cdata for t in meta_slots[1:]}
    storages: dict[Any, torch.Tensor] = {}
    externals: list[tuple[int, int, Meta]] = []
    external_nbytes: list[int] = []
    external_storages: set[int] = set()
    external_handle: dict[int, int] = {}
    for i, h in enumerate(msg.persistent):
        if i and not i % _EVERY:
            check_held()
            yield
        t = s.resolve(h)  # ownership, existence
        held += DIM_BYTES * t.dim()
        m = meta_of(t)
        externals.append((len(meta_slots), h, m))
        external_handle[len(meta_slots)] = h
        storage = t.untyped_storage()
        external_nbytes.append(storage.nbytes())
        meta_slots.append(_meta_tensor(m, storages, storage._cdata, storage.nbytes()))
        external_storages.add(meta_slots[-1].untyped_storage()._cdata)
    fixed = len(meta_slots)  # inputs and persistent tensors: never dropped, never counted
    known: dict[int, bool] = {}
    for slot in range(1, fixed):
        if not slot % _EVERY:
            yield
        known[meta_slots[slot].untyped_storage()._cdata] = True
    # Memory: storage -> [bytes, live slots]; slot -> its storage's key (only for storages the graph allocates).
    alloc: dict[int, list[int]] = {}
    slot_storage: dict[int, int] = {}
    last_use: dict[int, int] = {}
    kept = {int(w.slot) for w in msg.writes} | {int(x) for x in msg.outputs}
    last_read, refs, data, constants = yield from _last_reads(host, msg)
    estimate = host_bytes(len(msg.ops), refs, INLINE_COPIES * data + held, constants)
    if room is not None:
        _check_room(s, msg, estimate, room)
    calls: list[Call] = []
    produced: dict[int, int] = {}  # slot -> the op that produces it
    mutated: set[int] = set()
    reshaped: set[int] = set()  # external slots a mutable op that may change metas reads
    # their handles: recounted after every run even where the definition saw no growth (a storage resized since)
    resized: set[int] = set()
    grows_externals = False
    written_storages: set[int] = set()  # meta storages a mutable op reads (so may write): `Graph.written`
    # `_past_growth`'s: the meta storages an out= op of the graph writes (so may grow), and which of their slots
    grown_storages: dict[int, int] = {}
    written_slots: set[int] = set()
    moved_slots: set[int] = set()
    live = peak = grown = total_work = 0
    # What the calls whose work their values decide (guards.py `_LOOPS`) may do at a run, each: the bound less the
    # rest's work, shared among them (set once all ops are known; the dry run sees no values)
    loop_budget = [s.max_op_flops]

    for i, op_msg in enumerate(msg.ops):
        where = f"graph op {i} ({op_msg.name})"
        try:
            call, meta_out, reads, work, before = _prebuild(host, s, op_msg, meta_slots, dev, loop_budget)
        except GpupoolError as exc:
            raise type(exc)(f"{where}: {exc.message}") from None
        except (RuntimeError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise InvalidArgument(f"{where}: {str(exc).splitlines()[0][:300]}") from None
        total_work += work
        if total_work > s.max_op_flops:
            raise ResourceExhausted(
                f"{where}: the graph's ops would do about {total_work:.3g} multiply-adds and element visits in "
                f"one run, more than the {s.max_op_flops:.3g} one command may take on this device (a run is not "
                "pre-empted between its ops): capture a smaller step, or run it eagerly"
            )
        for slot in reads:
            last_use[slot] = i
        op = host.ops.resolve(op_msg.name)
        _past_growth(
            where, op, op_msg, meta_slots, reads, call.outs, meta_out, grown_storages, written_slots, moved_slots
        )
        if op._schema.is_mutable:
            keeps = checks._keeps_meta(op)
            written_storages.update(st._cdata for st in _storages(meta_slots, reads))
            for slot in reads:
                if slot in external_handle:
                    mutated.add(external_handle[slot])
                    if not keeps:
                        reshaped.add(slot)
                        resized.add(external_handle[slot])
        for slot, value in zip(call.outs, meta_out, strict=False):
            if not slot:
                continue
            if slot != len(meta_slots):
                raise InvalidArgument(f"{where}: output slot {slot}; the next free slot is {len(meta_slots)}")
            if value is None or not isinstance(value, torch.Tensor):
                raise InvalidArgument(f"{where}: output slot {slot} gets no tensor")
            if value.layout != torch.strided or value.dim() > MAX_DIMS:
                raise InvalidArgument(f"{where}: returns a {value.layout} tensor of {value.dim()} dimensions")
            meta_slots.append(value)
            produced[slot] = i
            st = value.untyped_storage()
            key = st._cdata
            if key not in known:
                known[key] = True
                alloc[key] = [st.nbytes(), 0]
                live += st.nbytes()
            if key in alloc:
                alloc[key][1] += 1
                slot_storage[slot] = key
        for st in _storages(meta_slots, reads):  # out= outputs and in-place ops growing their arguments
            growth = st.nbytes() - before.get(st._cdata, st.nbytes())
            if growth > 0 and st._cdata in input_storages:
                # An input is bound anew at each run, in a storage of any size that holds its metadata (a
                # zero-element view may sit past its end), and is not recounted after it: what an out= op grows
                # there was counted nowhere once the run ended, and what it does not write was never zeroed (round
                # 43, hostile43: uninitialized memory read back through another view of the storage).
                raise InvalidArgument(
                    f"{where}: an out= or resizing op grows a graph input's storage (inputs are bound anew at each "
                    "run); make the tensor a persistent one"
                )
            if growth > 0:
                grown += growth
                grows_externals = grows_externals or st._cdata in external_storages
        peak = max(peak, live + grown)
        calls.append(call)
        # Slots read for the last time here, or never read: their storage may go.
        for slot in set(reads) | {o for o in call.outs if o}:
            if slot >= fixed and slot not in kept and last_read.get(slot, i) <= i:
                key2 = slot_storage.pop(slot, None)
                if key2 is not None:
                    entry = alloc[key2]
                    entry[1] -= 1
                    if entry[1] == 0:
                        live -= entry[0]
        yield

    loops = sum(1 for op_msg in msg.ops if guards.value_loops(host.ops.resolve(op_msg.name)._schema.name))
    loop_budget[0] = max(0, s.max_op_flops - total_work) // max(1, loops)
    n_slots = len(meta_slots)
    for slot in list(msg.outputs) + [w.slot for w in msg.writes]:
        if not 0 < slot < n_slots:
            raise InvalidArgument(f"graph output slot {slot} is not defined (the graph has {n_slots - 1} slots)")
    writes: dict[int, int] = {}
    for w in msg.writes:
        s.check_handle(w.handle)
        writes[w.handle] = int(w.slot)
    # Runtime drops: each slot after its last reading op (kept slots and fixed ones never).
    for slot in range(fixed, n_slots):
        if slot in kept:
            continue
        at = last_use.get(slot)
        if at is None:  # never read: dropped after the op that makes it (was a scan of every call per slot)
            at = produced.get(slot, len(calls) - 1)
        calls[at].dead.append(slot)
        if not slot % _EVERY:
            yield
    input_bytes: list[int] = []
    contiguous: list[bool] = []
    for i, m in enumerate(input_meta):
        if i and not i % _EVERY:
            yield
        input_bytes.append(_nbytes(m))
        contiguous.append(_contiguous(m))
    graph = Graph(
        msg.graph_id,
        n_slots,
        input_meta,
        externals,
        calls,
        [int(x) for x in msg.outputs],
        writes,
        peak,
        sorted(mutated) if grows_externals else sorted(resized),
        input_bytes,
        contiguous,
        peak + sum(b for b, c in zip(input_bytes, contiguous, strict=True) if c),
        dev,
    )
    graph.host_bytes = estimate
    graph.external_nbytes = external_nbytes
    graph.plan = yield from _compiled(calls)
    graph.stable = [k for k, (slot, _, _) in enumerate(externals) if slot not in reshaped]
    graph.unstable = [k for k, (slot, _, _) in enumerate(externals) if slot in reshaped]
    written: set[int] = set()
    for slot in range(1, fixed) if written_storages else ():
        if not slot % _EVERY:
            yield
        if meta_slots[slot].untyped_storage()._cdata in written_storages:
            written.add(slot)
    graph.written = frozenset(written)
    return graph


def _nbytes(m: Meta) -> int:
    n = 1
    for d in m[0]:
        n *= d
    return n * wire.itemsize(m[3])


def _contiguous(m: Meta) -> bool:
    """Row-major with no offset: the layout of an input sent by value."""
    shape, stride, offset, _ = m
    expect = 1
    for d, st in zip(reversed(shape), reversed(stride), strict=True):
        if d != 1 and st != expect:
            return False
        expect *= d
    return offset == 0


def _compiled(calls: list[Call]) -> Generator[None, None, list[Step]]:
    """`compile_calls` in pieces of `_EVERY` calls."""
    plan: list[Step] = []
    for at in range(0, len(calls), _EVERY):
        plan += compile_calls(calls[at : at + _EVERY])
        yield
    return plan


def _last_reads(host: Host, msg: device_pb2.DefineGraph) -> Generator[None, None, tuple[dict[int, int], int, int, int]]:
    """slot -> index of the last op that reads it (in pieces of `_EVERY` ops), the graph's references (tensor
    arguments, output slots, entries of list arguments), its inline tensors' bytes and its ops' arguments that are
    not tensors (`host_bytes`)."""
    last: dict[int, int] = {}
    refs = data = constants = 0
    per_name: dict[str, int] = {}
    for i, op in enumerate(msg.ops):
        if i and not i % _EVERY:
            yield
        refs += len(op.outputs)
        n = per_name.get(op.name)
        if n is None:
            n = per_name[op.name] = _constants(host, op.name)
        constants += n
        for a in list(op.args) + list(op.kwargs.values()):
            kind = a.WhichOneof("value")
            if kind == "tensor":
                last[a.tensor] = i
                refs += 1
            elif kind == "tensors":
                handles = a.tensors.handles
                refs += len(handles)
                for h in handles:
                    if h:
                        last[h] = i
                    else:  # None in a Tensor?[]: a constant node of the trace
                        constants += 1
            elif kind in _LISTS:
                refs += len(getattr(a, kind).values)
            elif kind == "inline":
                data += len(a.inline.data)
    return last, refs, data, constants


def _constants(host: Host, name: str) -> int:
    """The arguments of op `name`'s schema that are not tensors or lists of tensors (a Tensor? too): each may be a
    constant node of the graph's trace, given or not (graph_trace `_Builder.recorder` writes defaults out). 0 for
    an op the allowlist refuses (its definition fails at it)."""
    try:
        schema = host.ops.resolve(name)._schema
    except GpupoolError:
        return 0
    return sum(1 for a in schema.arguments if not _tensor_type(a.type))


def _tensor_type(t: Any) -> bool:
    """A schema type that holds a tensor, never None: Tensor, Tensor[] (a Tensor? may be None, a constant node;
    Tensor?[]'s None entries are counted where they come, `_last_reads`)."""
    if t.kind() == "ListType":
        t = t.getElementType()
    return t.kind() == "TensorType"


_LISTS = frozenset({"ints", "floats", "bools"})


def _arg_slots(op: torch._ops.OpOverload, msg: device_pb2.Op, written: bool) -> set[int]:
    """The slots `msg` passes for `op`'s out= arguments, or (`written`) for every argument its schema writes."""
    out: set[int] = set()
    for k, a in enumerate(op._schema.arguments):
        if not (a.is_out or (written and a.alias_info is not None and a.alias_info.is_write)):
            continue
        v = msg.kwargs[a.name] if a.name in msg.kwargs else msg.args[k] if k < len(msg.args) else None
        if v is None:
            continue
        which = v.WhichOneof("value")
        if which == "tensor":
            out.add(int(v.tensor))
        elif which == "tensors":
            out.update(int(h) for h in v.tensors.handles)
    return out


def _past_growth(
    where: str, op: torch._ops.OpOverload, msg: device_pb2.Op, meta_slots: list[Any], reads: list[int],
    outs: Sequence[int], meta_out: list[Any], grown: dict[int, int], written: set[int], moved: set[int],
) -> None:  # fmt: skip
    """Refuse an op that may read bytes an earlier out= op of the graph grew a storage by without writing them (round
    44, hostile44). An out= op into a tensor that sits past its storage's end (a zero-element view) grows the storage
    up to it; the bytes in between are zeroed by the recount when the run ends (`_finish`), not before the graph's
    next op: an `as_strided` over that storage then read them within the run (the allocator's old bytes: another
    session's under `--isolation thread`). A tensor of such a storage (`grown`: its meta storage -> the number of
    slots when an out= op first wrote it) may be read after it where its bytes are known to be old or written: a
    slot made before (within the storage as it was: the run checks a persistent tensor's storage is no smaller than
    at the definition, graph._externals) unless an in-place view moved it since (`moved`), an out= tensor, or an
    output within such a read's bytes (`written`). Every path that runs a graph (the Python replay, the TorchScript
    trace, the C++ plan, a CUDA graph) runs its definition's ops, so the refusal is here. The sets are updated."""
    if grown:
        outs_written = _arg_slots(op, msg, False)

        def known(slot: int) -> bool:
            first = grown.get(meta_slots[slot].untyped_storage()._cdata)
            return first is None or slot in written or (slot < first and slot not in moved) or slot in outs_written

        for slot in reads:
            if isinstance(meta_slots[slot], torch.Tensor) and not known(slot):
                raise InvalidArgument(
                    f"{where}: reads slot {slot}, a view of a storage an earlier out= op of the graph may grow past "
                    "it (its new bytes are zeroed when the run ends): read the out= tensor itself, or split the graph"
                )
        ranges = [
            (int(t.storage_offset()) * t.element_size(), extent(t), t.untyped_storage()._cdata)
            for t in (meta_slots[r] for r in reads)
            if isinstance(t, torch.Tensor) and t.numel()
        ]
        if op._schema.is_mutable and not checks._keeps_meta(op) and not _out_form(op):  # an in-place view
            for slot in _arg_slots(op, msg, True):
                written.discard(slot)
                moved.add(slot)
        for slot, value in zip(outs, meta_out, strict=False):
            if slot and isinstance(value, torch.Tensor) and value.untyped_storage()._cdata in grown and value.numel():
                st, lo = value.untyped_storage()._cdata, int(value.storage_offset()) * value.element_size()
                if any(c == st and a <= lo and extent(value) <= b for a, b, c in ranges):
                    written.add(slot)
    if _out_form(op):
        for slot in _arg_slots(op, msg, False):
            t = meta_slots[slot] if 0 < slot < len(meta_slots) else None
            if isinstance(t, torch.Tensor):
                grown.setdefault(t.untyped_storage()._cdata, len(meta_slots))
                written.add(slot)
                moved.discard(slot)


def _storages(meta_slots: list[Any], reads: list[int]) -> list[torch.UntypedStorage]:
    return [meta_slots[r].untyped_storage() for r in reads if isinstance(meta_slots[r], torch.Tensor)]


def _meta_arg(v: Any, meta_slots: list[Any]) -> Any:
    """A decoded argument of a graph's op as its dry run takes it: slots as their meta tensors. (A module function, not
    a closure calling itself: that closure's cell made a reference cycle holding `meta_slots`, the graph's meta
    tensors, until the next garbage collection: one per definition until round 54.)"""
    if isinstance(v, _Ref):
        return meta_slots[v.slot]
    if isinstance(v, list):
        return [_meta_arg(x, meta_slots) for x in v]
    if isinstance(v, torch.device):
        return _META
    if isinstance(v, torch.Tensor) and v.dim() > 0:  # inline tensors live on the device
        return v.to(_META)
    return v


def _prebuild(
    host: Host,
    s: WorkerSession,
    msg: device_pb2.Op,
    meta_slots: list[Any],
    dev: torch.device,
    loop_budget: list[int] | None = None,
) -> tuple[Call, list[Any], list[int], int, dict[int, int]]:
    """Resolve and check one op of a graph, run it on meta tensors; returns the prebuilt call, the meta outputs
    (one per output slot), the slots it reads, the work it does (multiply-adds, or elements it visits) and the
    sizes of the storages it reads from before it ran (what an out= resize grew: its peak, `Graph.mutated`)."""
    op = host.ops.resolve(msg.name)  # the allowlist: PermissionDenied / InvalidArgument
    if op._schema.name in NOT_IN_GRAPHS:
        raise InvalidArgument("this op changes storages; it cannot be part of a graph")
    if torch.Tag.dynamic_output_shape in op.tags:
        raise InvalidArgument("this op has data-dependent output shapes; it cannot be part of a graph")
    n = len(meta_slots)
    reads: list[int] = []

    def ref(slot: int) -> _Ref:
        if not 0 < slot < n:
            raise InvalidArgument(f"slot {slot} is not defined yet (slots 1..{n - 1} are)")
        reads.append(slot)
        return _Ref(slot)

    # decode_arg hands whatever `ref` returns through untouched: slots become _Ref markers, not tensors.
    args = [wire.decode_arg(a, ref, dev) for a in msg.args]  # type: ignore[arg-type]
    kwargs = {k: wire.decode_arg(v, ref, dev) for k, v in msg.kwargs.items()}  # type: ignore[arg-type]
    if any(a.name == "device" and a.kwarg_only for a in op._schema.arguments) and kwargs.get("device") is None:
        kwargs["device"] = dev
    lists = [len(v) for v in list(args) + list(kwargs.values()) if isinstance(v, list)]
    guards.check_counts(op, lists, [], {})
    if lists and max(lists) > GRAPH_MAX_LIST:
        raise InvalidArgument(
            f"a tensor list of {max(lists)} entries in a graph op (at most {GRAPH_MAX_LIST}: a definition is not cut "
            "within an op, and its checks of each entry would hold the device for seconds); split the call"
        )

    margs = [_meta_arg(a, meta_slots) for a in args]
    mkwargs = {k: _meta_arg(v, meta_slots) for k, v in kwargs.items()}
    guards.check_enums(op, margs, mkwargs)
    # the slots' layouts are the runs' (inputs and persistent tensors are checked per run)
    guards.check_written(op, margs, mkwargs)
    guards.check_reads(op, margs, mkwargs)
    guards.check_inputs(margs, mkwargs, s.quota)
    guards.check_counts(op, [], margs, mkwargs)
    cost.check(op, margs, mkwargs, s.max_op_flops)  # shapes decide the work: meta tensors tell it as well
    if op._schema.name in attention.NAMES:  # sized for the graph's device, not by its meta tensors' (no device)
        temporary = attention.graph_temporary(op._schema.name, margs, mkwargs, dev)
    else:
        temporary = cost.temporary(op, margs, mkwargs)
    if temporary > s.quota:  # a graph's op is admitted once, here: its temporary must at least fit the quota
        raise ResourceExhausted(
            f"{msg.name} would allocate {temporary} bytes while it runs, more than the {s.quota} byte quota"
        )
    work = max(cost.estimate(op, margs, mkwargs), _elements([*margs, *mkwargs.values()]))
    value_guard = op._schema.name in guards.VALUE_GUARDS
    if not value_guard:
        guards.validate(op, margs, mkwargs, s.max_op_flops)
    # before the dry run (round 35, fin35: taken after it, an out= op's growth of its meta slot was never seen, so
    # a persistent tensor it grew was never recounted: uncounted bytes, unzeroed where the op then failed)
    before = {st._cdata: st.nbytes() for st in _storages(meta_slots, reads)}
    try:
        out = metalists.run(op, op, margs, mkwargs)  # a long list: from its distinct entries (round 43)
    except NotImplementedError:
        raise InvalidArgument("this op has no meta kernel; it cannot be part of a graph") from None
    values = flat(out)
    # Views: torch checks a view's bounds against its storage, but not on meta storages. Round 34 (red34): the meta
    # kernels of CPU `mse_loss` and `smooth_l1_loss` (mean, sum) give a 0-d result a storage of its 4 bytes, their CPU
    # kernels one of the elementwise loss's size, only its first element written; a graph's `as_strided` over the
    # real buffer passed the definition and its runs downloaded another session's freed bytes under `--isolation
    # thread`. A view past its slot's meta storage is refused at the definition.
    for v in values:
        if isinstance(v, torch.Tensor) and v.numel() and (reach := extent(v)) > v.untyped_storage().nbytes():
            raise InvalidArgument(
                f"{msg.name}: a view of {reach} bytes past its storage's {v.untyped_storage().nbytes()}"
            )
    outs = [int(h) for h in msg.outputs]
    if len(outs) > len(values):
        raise InvalidArgument(f"{len(outs)} output slots given, the op returns {len(values)} values")

    fill: list[tuple[int, int]] = []
    fill_lists: list[tuple[int, list[int]]] = []
    template: list[Any] = []
    for i, a in enumerate(args):
        if isinstance(a, _Ref):
            fill.append((i, a.slot))
            template.append(None)
        elif isinstance(a, list) and any(isinstance(x, _Ref) for x in a):
            fill_lists.append((i, [x.slot if isinstance(x, _Ref) else 0 for x in a]))
            template.append(None)
        else:
            template.append(a)
    kfill: list[tuple[str, Any]] = []
    ktemplate: dict[str, Any] = {}
    for k, v in kwargs.items():
        if isinstance(v, _Ref):
            kfill.append((k, v.slot))
        elif isinstance(v, list) and any(isinstance(x, _Ref) for x in v):
            kfill.append((k, [x.slot if isinstance(x, _Ref) else 0 for x in v]))
        else:
            ktemplate[k] = v
    # The overload's C++ entry point itself (OpOverload.__call__ is one Python frame around it); on a fake GPU an
    # accelerator-only op runs its CPU equivalent, as eager ops do (not fallbacks' faster compositions of ops that
    # have a CPU kernel: those would keep the graph from TorchScript, which runs the kernel at its own speed).
    replacement = guards.replacement(op)
    if replacement is not None and replacement is guards.META_LAYOUT.get(op._schema.name):
        if guards.keeps_kernel_layout(op._schema.name, margs, mkwargs):  # (a contiguous conv: the kernel's own layout)
            replacement = None
    if replacement is None and op._schema.name in fallbacks.NAMES:
        replacement = fallbacks.lookup(op, dev)
    attention_kernel = None
    if op._schema.name in attention.NAMES:  # the fused attention's kernel, decided now (graph_trace writes it out)
        attention_kernel = attention.graph_kernel(op._schema.name, margs, mkwargs, dev)
        replacement = attention.graph_call(op._schema.name, attention_kernel)
        if attention_kernel == attention.KEPT and len(values) > 6:  # its philox_seed holds the kept scores
            values = [*values[:6], attention.kept_seed_meta(margs, mkwargs), *values[7:]]
    fn: Callable[..., Any] = replacement or op._op
    # The fused attention's forward is tagged as seeded (its dropout): it draws only with dropout_p > 0 (its kernel is
    # then the dropout composition, or on CUDA the one that keeps its scores, which draw from the session's stream as
    # an eager call does).
    drawing = (None, attention.DROPOUT, attention.KEPT)
    draws = torch.Tag.nondeterministic_seeded in op.tags and attention_kernel in drawing
    if draws:
        seeded, kernel = host._seeded, fn

        def fn(*a: Any, **k: Any) -> Any:
            return seeded(s, kernel, a, k)  # type: ignore[arg-type]

    check = None
    if value_guard:
        budget = loop_budget if loop_budget is not None else [s.max_op_flops]

        def check(a: list[Any], k: dict[str, Any]) -> None:
            guards.validate(op, a, k, budget[0])

    call = Call(
        msg.name,
        fn,
        template,
        fill,
        fill_lists,
        ktemplate,
        kfill,
        outs,
        isinstance(out, torch.Tensor) and len(outs) == 1,
        [],
        check,
        # zeroed, as on the eager path (round 34: one list): ZERO_STORAGE, or ZERO_ELEMENTS for an out= form's `out`
        (ZERO_ELEMENTS if _out_form(op) else ZERO_STORAGE) if op._schema.name in checks.UNINITIALIZED else 0,
        draws,
        replacement is not None,
        attention_kernel,
        (margs, mkwargs) if value_guard else None,
    )
    return call, values[: len(outs)], reads, work + _elements(values), before


def _elements(values: list[Any]) -> int:
    """Elements of the tensors among `values` (and in their lists): what an op linear in its data visits."""
    n = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            n += v.numel()
        elif isinstance(v, list | tuple):
            n += _elements(list(v))
    return n


def flat(out: Any) -> list[Any]:
    if isinstance(out, tuple | list):
        return [v for item in out for v in (item if isinstance(item, list | tuple) else [item])]
    return [out]


# What a step of a graph's run may raise besides GpupoolError, each named by its op (`step_error`)
STEP_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, OverflowError, MemoryError)


def step_error(graph_id: int, i: int, name: str, exc: BaseException) -> GpupoolError:
    """The error a run reports for op `i` (`name`) of graph `graph_id` raising `exc` (a GpupoolError or one of
    `STEP_ERRORS`): its own status, RESOURCE_EXHAUSTED for the device's memory, else INVALID_ARGUMENT. One wording for
    graph.execute and a CUDA graph's guards run before its replay (graph_cuda.PreGuards)."""
    where = f"graph {graph_id} op {i} ({name})"
    if isinstance(exc, GpupoolError):
        return type(exc)(f"{where}: {exc.message}")
    if out_of_memory(exc):
        return ResourceExhausted(f"{where}: {oom_message(exc)}")
    return InvalidArgument(f"{where}: {str(exc)[:300]}")
