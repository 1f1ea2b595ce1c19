"""Captured steps on the daemon: a graph is defined once (DefineGraph, see graph_build.py) and run once per
training step (RunGraph).

A run executes the graph's prebuilt calls (graph_build.Call): per run it only resolves the input and persistent
handles (checking that their metadata is what the graph was built for; for a persistent tensor that is the object
the last run ended with, its version counter unchanged, that verdict stands: `_externals`), takes inputs sent by
value (the batch, RunGraph.input_data) straight into their slots, fills slots, calls kernels, runs the guards that
read tensor values (embedding backward index ranges), and binds outputs. No protobuf decoding, name lookups or argument
checks per op.

Memory: a session that holds graphs has its largest graph's peak (temporaries plus inputs sent by value) counted
in its used bytes for as long as it holds it (one graph's inputs at most are kept past its run: `_spares`), so the
quota is checked once, at definition, and `gpupool smi` and the device's accounting see what the steps need; each
graph captured as a CUDA graph counts its whole peak on top (its private pool holds that memory from the capture on;
a capture the quota has no room for is not made).
The host memory a session's graphs hold (their prebuilt calls, slot tables and TorchScript graphs: ~5 KB an op,
graph_build.host_bytes) is bounded apart from the quota, by the daemon's --max-graph-memory per session: a
definition past it is refused before it is built (round 35; until then 32 graphs of 100,000 ops, 6-15 GiB); a
limit of 0 turns capture off (every definition FAILED_PRECONDITION). The session's estimate is mirrored to the
daemon with each slice's result (`WorkerSession.graph_bytes`): Status and the metrics show it.

On CUDA devices a graph is additionally captured as a CUDA graph once it has run eagerly twice, where it can
(graph_cuda.py: random ops in a session's own worker process, value guards that read only the run's inputs and
persistent tensors the step does not write); CPU-backed fake GPUs never take that path. On CPU-backed devices a
graph runs, from its second run on, as a TorchScript graph where it can (graph_trace.py): one call per step, the
ops dispatched in C++; where nothing that may change a tensor's metadata ran since its last run, the whole run
(checks, inputs, the call, binding) is one call of the C++ runner (`_quick`, round 41).
"""

from __future__ import annotations

import collections
import logging
import operator
import threading
import time
import weakref
from collections.abc import Callable, Generator, Sequence
from typing import Any, Protocol

import torch

from gpupool import wire
from gpupool._proto import device_pb2
from gpupool.errors import FailedPrecondition, GpupoolError, InvalidArgument, NotFound

from . import graph_cuda, graph_trace, slices, staging
from .graph_build import GATHER, ONE, STEP_ERRORS, ZERO_ELEMENTS, Graph, Host, building, flat, step_error
from .sessions import Poison, PoisonedInput, WorkerSession, zero_made

log = logging.getLogger(__name__)

MAX_GRAPHS = 32  # per session: each holds prebuilt calls in host memory (in all at most --max-graph-memory)
# A definition runs for at most about this long per slice (then the session's next slice goes on with it): a
# definition of 100,000 ops takes seconds, and held the device's thread for all of them as one command.
DEFINE_PIECE_SECONDS = 0.05
# A Python replay of a graph longer than this many calls runs in pieces of as many (the clock read between them)
# for about `piece_seconds` a slice (session workers): a graph the trace refuses (over graph_trace.TRACE_MAX_NODES)
# held the device's thread for its whole run (0.26-0.60 s for 20,000 `neg`s), every other session waiting.
REPLAY_PIECE_CALLS = 64
EVENTS = slices.GRAPH_EVENTS
# runs an iterator of C calls to its end, keeping nothing
_consume: Callable[[Any], None] = collections.deque(maxlen=0).extend


class GraphLedger(Protocol):
    def graph(self, session: WorkerSession, event: str, ops: int = 0) -> None: ...


def _advance(steps: Generator[None, None, Any], deadline: float) -> tuple[bool, Any]:
    """Run pieces of `steps` until it returns ((True, its value)) or `deadline` (perf_counter) has passed ((False,
    None))."""
    clock = time.perf_counter
    try:
        while True:
            next(steps)
            if clock() > deadline:
                return False, None
    except StopIteration as done:
        return True, done.value


class Tracing:
    """A graph's TorchScript trace under way (`GraphTable.run`, graph_trace.trace): held as the session's `defining`
    (slices.run_commands: the same RunGraph runs again first in the session's next slice, which goes on with it);
    the run itself runs once the trace is built."""

    __slots__ = ("graph", "steps")

    def __init__(self, graph: Graph, steps: Generator[None, None, Any]) -> None:
        self.graph = graph
        self.steps = steps


class Replaying:
    """A graph's Python replay under way (`_run`, graphs of more than REPLAY_PIECE_CALLS calls): held as the
    session's `defining`; the same RunGraph runs again first in the session's next slice and goes on with the run
    where it stopped (its inputs were resolved and checked once, in its first piece)."""

    __slots__ = ("graph", "steps", "slots", "outputs", "persistent")

    def __init__(
        self, graph: Graph, steps: Generator[None, None, Any], slots: list[Any], outputs: list[int],
        persistent: Sequence[torch.Tensor] | None,
    ) -> None:  # fmt: skip
        self.graph = graph
        self.steps = steps
        self.slots = slots
        self.outputs = outputs
        self.persistent = persistent


class Defining:
    """A graph definition under way (`GraphTable.define`): the command it came from (the one parse of it that is
    kept: later slices parse the same bytes again, and only its id and size are compared), its pieces left."""

    __slots__ = ("msg", "steps", "replaced")

    def __init__(self, msg: device_pb2.DefineGraph, steps: Generator[None, None, Graph], replaced: bool) -> None:
        self.msg = msg
        self.steps = steps
        self.replaced = replaced

    def advance(self, deadline: float) -> Graph | None:
        """Run pieces until the graph is built (returned) or `deadline` (perf_counter) has passed (None)."""
        return _advance(self.steps, deadline)[1]  # type: ignore[no-any-return]


class GraphTable:
    """The graphs of every session (weakly keyed: a closed session's graphs go with it), and the bytes each
    session has reserved for them (`_reserve`)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._graphs: weakref.WeakKeyDictionary[WorkerSession, dict[int, Graph]] = weakref.WeakKeyDictionary()
        self._reserved: weakref.WeakKeyDictionary[WorkerSession, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        # (a weak reference to the session `_of` last served, its graphs): a session's runs read them without the
        # lock and the weak dictionary's look-up (a new weak reference a call: ~6 us of a RunGraph, round 41);
        # dropped when that session goes (`_gone`), as its entry of `_graphs` is
        self._last: tuple[weakref.ref[WorkerSession], dict[int, Graph]] | None = None
        # > 0: a definition runs for about this many seconds per command (session workers: DEFINE_PIECE_SECONDS),
        # `define`'s pieces; 0: all of it at once
        self.piece_seconds = 0.0
        # the executor's learned runs of each session (`CommandExecutor._eager`, session id -> (..., runs.Runs)):
        # a RunGraph ends their epoch (`run_raw`)
        self.eager: dict[str, Any] = {}

    def _of(self, s: WorkerSession) -> dict[int, Graph]:
        last = self._last  # (one read: another thread may replace it)
        if last is not None and last[0]() is s:
            return last[1]
        with self._lock:
            found = self._graphs.get(s)
            if found is None:
                found = self._graphs[s] = {}
            self._last = (weakref.ref(s, self._gone), found)
            return found

    def _gone(self, ref: weakref.ref[WorkerSession]) -> None:
        last = self._last
        if last is not None and last[0] is ref:
            self._last = None

    def count(self, s: WorkerSession) -> int:
        return len(self._of(s))

    def reserved(self, s: WorkerSession) -> int:
        """Bytes counted in the session's used memory for its graphs' temporaries."""
        return self._reserved.get(s, 0)

    def _reserve(
        self, s: WorkerSession, graphs: dict[int, Graph], extra: Graph | None = None, capture: Graph | None = None
    ) -> None:
        """Count what `graphs` (and `extra`, about to join them) hold in the session's used bytes: the largest peak
        of those that run eagerly (one runs at a time, its temporaries freed after it) plus the whole peak of each
        captured as a CUDA graph (and of `capture`, about to be): a capture's private pool keeps its memory from the
        capture to the graph's end. A growth must pass the quota first (ResourceExhausted, nothing changed).
        (Until round 30's review only the largest peak was counted, and each of up to MAX_GRAPHS captures held its
        own pool.)"""
        every = [*graphs.values(), *([extra] if extra else [])]
        held = sum(g.reserve for g in every if g.cuda is not None or g is capture)
        want = held + max((g.reserve for g in every if g.cuda is None and g is not capture), default=0)
        delta = want - self._reserved.get(s, 0)
        if delta > 0:
            s.admit(delta)
        if delta:
            s.reserve(delta)
            self._reserved[s] = want

    # ---- commands ----

    def define(self, s: WorkerSession, msg: device_pb2.DefineGraph) -> None:
        """Build the graph for at most about `piece_seconds`; when that is not enough, `s.defining` keeps the
        rest and the same command, run again first in the session's next slice (slices.run_commands: nothing else
        of the session runs before it), goes on with it, while the device serves its other sessions between."""
        graphs = self._of(s)
        pending = s.defining
        if (
            not isinstance(pending, Defining)
            or pending.msg.graph_id != msg.graph_id
            or len(pending.msg.ops) != len(msg.ops)
        ):
            if s.max_graph_bytes <= 0:
                raise FailedPrecondition(
                    "graph capture is off on this daemon (--max-graph-memory 0): run the step eagerly"
                )
            replaced = msg.graph_id in graphs
            if not replaced and len(graphs) >= MAX_GRAPHS:
                raise InvalidArgument(f"a session holds at most {MAX_GRAPHS} graphs; drop one first")
            old = graphs.pop(msg.graph_id, None)
            s.graph_bytes = sum(g.host_bytes for g in graphs.values())  # the replaced graph's is free
            room = s.max_graph_bytes - s.graph_bytes
            pending = s.defining = Defining(msg, building(self.host, s, msg, room), old is not None)
        s.defining = None
        try:
            g = pending.advance(time.perf_counter() + self.piece_seconds if self.piece_seconds > 0 else float("inf"))
            if g is None:
                s.defining = pending
                return
            self._reserve(s, graphs, g)  # the whole graph's memory, before its first run
        except GpupoolError:
            self._reserve(s, graphs)  # the replaced graph is gone either way
            _pin(s, graphs)
            raise
        graphs[msg.graph_id] = g
        _pin(s, graphs)
        s.graph_bytes += g.host_bytes
        event = "rerecorded" if pending.replaced else "defined"
        self.host.ledger.graph(s, event)
        g.cuda_verdict = graph_cuda.verdict(self.host, g)  # decided for every device: fake GPUs log it too
        log.info(
            "session %d: graph %d %s: %d ops, %d inputs, %d persistent tensors, %d outputs, %d kept, peak %d bytes, "
            "host ~%d bytes; %s",
            s.number,
            msg.graph_id,
            event,
            len(g.calls),
            len(g.input_meta),
            len(g.externals),
            len(g.outputs),
            len(g.writes),
            g.peak,
            g.host_bytes,
            graph_cuda.describe(g.cuda_verdict),
        )

    def drop(self, s: WorkerSession, msg: device_pb2.DropGraph) -> None:
        graphs = self._of(s)
        g = graphs.pop(msg.graph_id, None)
        if g is not None:
            s.graph_bytes -= g.host_bytes
            self._reserve(s, graphs)
            _pin(s, graphs)
            self.host.ledger.graph(s, "dropped")

    def run(self, s: WorkerSession, msg: device_pb2.RunGraph, data: list[Any] | None = None) -> None:
        """A run of graph `msg.graph_id`; `data`: its inputs' bytes where the slice took them out of `msg`'s span (views
        of the slice's payload, server/bulk.py `strip_payload`), else None: `msg.input_data`."""
        g = self._of(s).get(msg.graph_id)
        if g is None:
            raise NotFound(f"graph {msg.graph_id} was never defined in this session (or was dropped)")
        plan = g.fast
        if plan and s.defining is None and g.quiet >= 0 and s.mutations == g.quiet + 1 and not s.uploads:
            # `_quick`'s run of the message's bytes (no `drop_writes`, nothing under way): its fields read in C++
            if self._quick_raw(s, g, plan, msg, data):
                return
        if msg.drop_writes:  # (iterating an empty repeated field raises and catches an IndexError)
            for h in msg.drop_writes[:]:
                g.writes.pop(h, None)
        pending = s.defining
        resumed = isinstance(pending, Replaying) and pending.graph is g
        if resumed:
            s.defining = None
        elif g.traced is None and not g.trace_refused and g.runs >= graph_trace.TRACE_AFTER_RUNS and g.cuda is None:
            if not self._trace(s, g):
                return  # a piece of the trace: this command runs again in the session's next slice
        try:
            if resumed:
                left = None if _resume(s, pending, self.piece_seconds) else pending  # type: ignore[arg-type]
            elif g.traced is not None and _quick(self.host, s, g, msg, data):
                left = None
            else:
                hold = lambda capture: self._reserve(s, self._of(s), capture=capture)  # noqa: E731
                left = _run(self.host, s, g, msg, hold, data, self.piece_seconds)
            if left is not None:
                s.defining = left
                return  # a piece of the run: this command runs again in the session's next slice
        except GpupoolError as exc:
            _poison_run(s, g, msg, exc)
            raise
        self._ran(s, g)

    def _ran(self, s: WorkerSession, g: Graph) -> None:
        g.runs += 1
        s.ops += len(g.calls)
        self.host.ledger.graph(s, "replayed", len(g.calls))  # (positional: no keyword dict a step)

    def _quick_raw(
        self, s: WorkerSession, g: Graph, plan: Any, msg: device_pb2.RunGraph, data: list[Any] | None
    ) -> bool:
        """`run` of a traced graph's quiet run through `_quick`'s plan given the message's bytes
        (`GraphPlan.run_raw`, round 42: the three lists `_quick` makes of upb's containers and `run`'s look at
        `drop_writes` were ~9k of the tiny MLP's ~55k instructions a RunGraph). False, nothing done, where the plan
        declines (`drop_writes`, a check that fails): `run` goes on as before. (`run_raw` runs the bytes as they came
        its own way, round 43; round 45: `_quick_raw`'s raw case inline there.)"""
        refs = g.quiet_refs
        if refs is None:
            return False
        try:
            if g.traced.seeded:  # (`Traced.run`'s: the device's generator holds this session's stream)
                self.host._seeded(s, graph_trace._nothing, [], {})
            _spares(s, plan)
            r = plan.run_raw(s, msg.SerializeToString(), data, refs, g.writes, g.traced.fn)
            if r is None:
                return False
        except GpupoolError as exc:
            _poison_run(s, g, msg, exc)
            raise
        self._quick_rest(s, g, r, msg, None)
        return True

    def _quick_rest(
        self, s: WorkerSession, g: Graph, r: Any, msg: device_pb2.RunGraph | None, raw: bytes | None
    ) -> None:
        """The rest of `_quick_raw` once its plan ran and returned `r` (not None): the counts, or `_quick_end` where the
        plan did not bind the run; a GpupoolError poisons the run (`msg`, else parsed from `raw`) and is raised."""
        try:
            if r is not True:
                if msg is None:
                    msg = device_pb2.RunGraph.FromString(raw)  # type: ignore[arg-type]
                _quick_end(self.host, s, g, r, msg.outputs[:])  # (`_finish`: the counts and `g.quiet`)
            else:
                if g.mutated:
                    s.recount(g.mutated)
                g.quiet = s.mutations
        except GpupoolError as exc:
            _poison_run(s, g, msg if msg is not None else device_pb2.RunGraph.FromString(raw), exc)  # type: ignore[arg-type]
            raise
        self._ran(s, g)

    def run_raw(self, s: WorkerSession, raw: bytes, reply: Callable[[Any], None], graph_id: int) -> int:
        """`CommandExecutor.execute` of a RunGraph given as its bytes (round 43), its `graph_id` as upb reads it
        (native_runner.cpp `graph_frame`, round 44), where its graph's quiet run takes it (`run`'s conditions, then
        the plan's `run_raw` of the bytes): the executor's counts of a RunGraph (`s.mutations`, the learned runs'
        epoch: `eager`) made, an error recorded as `execute` records it (`Host._failed`). Returns -1, nothing done
        (no count made), elsewhere (an unknown graph, anything `run` does otherwise, a plan that declines: the
        caller parses the command and executes it); 0, run (or failed) with its "replayed" event in the ledger;
        or 1 + n: run quietly, its n ops counted in `s.ops` and its "replayed" event NOT in the ledger: the caller
        reports it (`CommandExecutor.run_graph_raw`; `slices.run_slice_into` packs a slice's result of that one
        event, round 48). Round 48: `run_graph_raw`'s, `_of`'s and the ledger's frames of a captured step's slice
        are here."""
        last = self._last  # `_of`, its usual case inline
        g = (last[1] if last is not None and last[0]() is s else self._of(s)).get(graph_id)
        if g is None:
            return -1
        plan = g.fast
        # `run`'s quiet conditions, before `execute`'s count of this RunGraph (`s.mutations`, made below): the same
        # checks as `s.mutations == g.quiet + 1` after it
        if not (plan and s.defining is None and g.quiet >= 0 and s.mutations == g.quiet and not s.uploads):
            return -1
        refs = g.quiet_refs
        if refs is None:
            return -1
        s.mutations += 1  # as `execute` counts a RunGraph (`_RESHAPING`), and a RunGraph ends the learned runs' epoch
        state = self.eager.get(s.session_id)
        if state is not None:
            state[3].epoch += 1
        try:
            try:  # (the module's METH_FASTCALL `run_raw`: no pybind11 dispatch, round 44)
                if g.traced.seeded:  # (`Traced.run`'s: the device's generator holds this session's stream)
                    self.host._seeded(s, graph_trace._nothing, [], {})
                if s.spare_plan is not plan:
                    _spares(s, plan)
                r = self.host.native.run_raw(plan, s, raw, refs, g.writes, g.traced.fn, g.graph_id)
            except GpupoolError as exc:
                _poison_run(s, g, device_pb2.RunGraph.FromString(raw), exc)
                raise
            if r is None:  # declined, nothing done: the counts taken back
                s.mutations -= 1
                if state is not None:
                    state[3].epoch -= 1
                return -1
            if r is not True or g.mutated:
                self._quick_rest(s, g, r, None, raw)
                return 0
        except Exception as exc:  # raised once the plan read the bytes, which upb parses then
            self.host._failed(s, device_pb2.Command(run_graph=device_pb2.RunGraph.FromString(raw)), exc, reply)
            return 0
        g.quiet = s.mutations
        n = len(g.calls)  # `_ran`'s, but the ledger's event
        g.runs += 1
        s.ops += n
        return n + 1

    def _trace(self, s: WorkerSession, g: Graph) -> bool:
        """Build `g`'s TorchScript graph (graph_trace.trace) for at most about `piece_seconds` (0: all of it): True
        once it is built or refused (the run goes on), False when pieces are left (`s.defining` holds them, and the
        same RunGraph runs again first in the session's next slice). A graph with fused attention calls first runs
        once as the Python replay that records their layouts (`_run`), and is traced at its next run."""
        pending = s.defining
        if not isinstance(pending, Tracing) or pending.graph is not g:
            if _refused(self.host, s, g) or (graph_trace.composes(g) and g.layouts is None):
                return True
            pending = Tracing(g, graph_trace.trace(self.host, s, g, execute, g.layouts))
        s.defining = None
        deadline = time.perf_counter() + self.piece_seconds if self.piece_seconds > 0 else float("inf")
        done, traced = _advance(pending.steps, deadline)
        if not done:
            s.defining = pending
            return False
        g.traced, g.layouts = traced, None
        g.trace_refused = traced is None  # one attempt: a refusal keeps the Python replay from now on
        if traced is not None:
            self.host.ledger.graph(s, "traced")
        return True


def _spares(s: WorkerSession, plan: Any) -> None:
    """Make `plan` (a graph's C++ plan about to run; None: the Python path about to run a graph, or a definition or
    drop) the session's one plan that may keep its run's inputs sent by value for its next run (native_runner.cpp
    `GraphPlan.spare_inputs`, round 49), letting go of another's. Those inputs' memory is their graph's reservation
    (`Graph.reserve`: peak + inputs sent by value), and the session's count holds the reservation of its largest graph
    only (`GraphTable._reserve`: one graph runs at a time, its memory freed after it): while every plan kept its
    own (round 49), a session of 32 graphs, each run quietly once, held the inputs of all 32 in the worker's memory
    (under `--isolation thread` the daemon's) and counted one graph's, up to 31 quotas more than its count said
    (secrev50: 8 graphs of 32 MiB inputs, the process +291 MiB, the count +0). Now at most one graph's inputs are
    kept, within its reservation, and none while another graph runs."""
    held = s.spare_plan
    if held is not plan:
        if held is not None:
            held.let_go()
        s.spare_plan = plan


def _pin(s: WorkerSession, graphs: dict[int, Graph]) -> None:
    """`s.pinned` made the handles `graphs` read as persistent tensors, in place (the C++ runner holds the set): the
    table methods that unbind one of them bump `s.pins`, whose value a plan's last run ended with lets its next skip
    the persistent tensors' look-ups (native_runner.cpp `graph_run`). A kept tensor's handle that no graph reads is
    not pinned: a step that leaves a new tensor there (`x + w` kept) keeps the skip."""
    pinned: set[int] = set()
    for g in graphs.values():
        pinned.update(g.external_handles)
    s.pinned.clear()
    s.pinned.update(pinned)
    _spares(s, None)  # (a graph dropped or replaced: its plan's inputs go with its reservation)


# ---- runs ----


def _run(host: Host, s: WorkerSession, g: Graph, msg: device_pb2.RunGraph, hold: Callable[[Graph | None], None],
         data: list[Any] | None = None, piece_seconds: float = 0.0) -> Replaying | None:  # fmt: skip
    """A run of `g`; `hold`: what counts a CUDA graph's capture in the session's memory (`graph_cuda.run`); `data`:
    the inputs' bytes taken out of the command's span (`GraphTable.run`), else None: `msg.input_data`. With
    `piece_seconds` > 0, a Python replay of more than REPLAY_PIECE_CALLS calls stops at the first piece's end past
    about that long and returns what is left (`_resume` goes on with it); None: the run is done."""
    if s.spare_plan is not None:
        _spares(s, None)  # (its inputs are made anew here: none kept beside them)
    # [:]: a repeated field's slice is a list in one call; list() iterates it item by item to an IndexError
    inputs = msg.inputs[:]
    outputs = msg.outputs[:]
    if len(inputs) != len(g.input_meta):
        raise InvalidArgument(f"graph {g.graph_id} takes {len(g.input_meta)} inputs, got {len(inputs)}")
    if len(outputs) > len(g.outputs):
        raise InvalidArgument(f"graph {g.graph_id} has {len(g.outputs)} outputs, got {len(outputs)} handles")
    slots: list[Any] = [None] * g.n_slots
    tensors = s.tensors
    sent: dict[int, torch.Tensor] | None = None  # on a GPU: slot -> an input sent by value, as it came (on the CPU)
    on_host = g.device_type == "cpu"
    for i, h in enumerate(inputs):
        m = g.input_meta[i]
        if h:
            t = tensors.get(h) if not s.uploads else None
            if t is None:
                t = s.resolve(h)
            if t.shape != m[0] or t.stride() != m[1] or t.storage_offset() != m[2] or t.dtype != m[3]:
                raise InvalidArgument(
                    f"graph {g.graph_id} input {i} is {list(t.shape)} {list(t.stride())} {t.dtype}; the graph "
                    f"was defined for {list(m[0])} {list(m[1])} {m[3]} (define it again)"
                )
        else:
            if data is None:
                data = msg.input_data[:]
            t = _by_value(g, i, data, on_host, host.native if on_host else None)
            if not on_host:
                if sent is None:
                    sent = {}
                sent[i + 1] = t
                if g.cuda is None:  # a captured CUDA graph copies it into its own input (graph_cuda.CudaGraph.run)
                    t = staging.onto(s.staging, t, g.device)
        slots[i + 1] = t
    native = host.native
    found, versions = _externals(s, g, slots, native)
    persistent = found if versions else None  # (None: `_finish` takes no versions)
    for h in outputs:
        if h:
            s.check_handle(h)
    try:
        if g.cuda is not None or (not g.cuda_failed and g.device_type == "cuda" and g.runs >= 2):
            graph_cuda.run(host, s, g, slots, execute, sent, hold)
        elif g.traced is not None:
            g.traced.run(host, s, g, slots)
        elif (
            not g.trace_refused
            and g.runs >= graph_trace.TRACE_AFTER_RUNS
            and graph_trace.composes(g)
            and not _refused(host, s, g)
        ):
            # the run before the trace (`GraphTable._trace`): the Python replay, its fused attention calls' layouts
            # recorded for the trace to meet (some meta kernels lay outputs out otherwise)
            g.layouts = graph_trace.replay_recording(host, s, g, slots, execute)
        elif piece_seconds > 0 and len(g.plan) > REPLAY_PIECE_CALLS:
            steps = _pieces(g, slots)
            if not _advance(steps, time.perf_counter() + piece_seconds)[0]:
                return Replaying(g, steps, slots, outputs, persistent)
        else:
            execute(g, slots)
    except BaseException:
        _failed(s, g)
        raise
    _finish(s, g, slots, outputs, persistent, native)
    return None


def _quick(host: Host, s: WorkerSession, g: Graph, msg: device_pb2.RunGraph, data: list[Any] | None) -> bool:
    """A traced graph's quiet run in one call of the C++ runner (`native_runner.GraphPlan.run`, round 41): `_run`'s
    checks, the inputs sent by value made, the persistent tensors found (`_quiet`), the traced function called and
    the outputs and kept tensors bound (`_finish`), where the graph runs on the CPU and nothing that may change a
    tensor's metadata ran since its last run (`_externals`' quiet case). False, nothing done, where any of it does
    not hold (a check that fails included): `_run` then runs the command as before, and raises its error. The
    worker's own instructions a RunGraph on the tiny MLP (bench/graph_replay.py --measure outside): 102.0k through
    `_run`, `_by_value`, `_quiet`, `Traced.run` and `_finish` around round 40's C++ calls, ~66k here (of which
    `rebind_run` ~20k, the persistent look-ups ~2.5k, the inputs' copies ~3.2k)."""
    plan = g.fast
    if plan is None:
        plan = g.fast = _fast_plan(host, s, g)
    if plan is False or g.quiet < 0 or s.mutations != g.quiet + 1 or s.uploads or g.quiet_refs is None:
        return False
    if data is None:
        data = msg.input_data[:]
    outputs = msg.outputs[:]
    if g.traced.seeded:  # (`Traced.run`'s: the device's generator holds this session's stream)
        host._seeded(s, graph_trace._nothing, [], {})
    _spares(s, plan)
    r = plan.run(s, msg.inputs[:], outputs, data, g.quiet_refs, g.writes, g.traced.fn)
    if r is None:
        return False
    if r is not True:
        _quick_end(host, s, g, r, outputs)
        return True
    if g.mutated:
        s.recount(g.mutated)
    g.quiet = s.mutations
    return True


def _quick_end(host: Host, s: WorkerSession, g: Graph, r: Any, outputs: list[int]) -> None:
    """The end of a quick run whose plan did not bind it (`GraphPlan.run`'s answers other than True and None): the
    traced function's exception raised as `Traced.run` raises it, or the run finished in Python (`_finish`)."""
    if isinstance(r, BaseException):  # the traced function raised it (`Traced.run`)
        _failed(s, g)
        err = graph_trace.failure(g, r)
        if err is r:
            raise r
        raise err from None
    if type(r) is tuple:  # its value not a tuple of the kept tensors: `Traced.run`'s own zip
        slots, out = r
        try:
            for slot, value in zip(g.traced.kept, out, strict=True):
                slots[slot] = value
        except BaseException as exc:
            _failed(s, g)
            # (round 52: an error of the run, as `Traced.run` raises it: the kept tensors poisoned, their buffers
            # having been written into)
            err = graph_trace.failure(g, exc)
            if err is exc:
                raise
            raise err from None
    else:
        slots = r
    _finish(s, g, slots, outputs, None, host.native)


def _poison_run(s: WorkerSession, g: Graph, msg: device_pb2.RunGraph, exc: GpupoolError) -> None:
    """A run that raised `exc`: its outputs and kept tensors poisoned with it (a poisoned input's own poison, as an
    op's outputs carry it: `PoisonedInput`'s code is the base class's UNKNOWN, round 44 fuzzrev44)."""
    err = exc.poison.carried() if isinstance(exc, PoisonedInput) else Poison.of(exc, "")
    for h in list(msg.outputs) + list(g.writes):
        if h:
            s.poison(h, err)


def _fast_plan(host: Host, s: WorkerSession, g: Graph) -> Any:
    """`_quick`'s C++ plan of a traced graph (`native_runner.GraphPlan`), or False where the graph takes `_run`: no
    C++ runner, a session of a subclass, a graph off the CPU, persistent tensors the graph's own ops may reshape
    (`Graph.unstable`). A seeded trace (random ops: dropout) takes the plan too (round 48; before, `_run`): its
    callers load the session's stream into the device's generator first, as `Traced.run` does (`host._seeded`; a
    traced graph runs only where the session owns its process's generator, `graph_trace.refusal`), which a plan
    that then declines leaves as `_run`'s own `Traced.run` would find it."""
    traced, native = g.traced, host.native
    if native is None or type(s) is not WorkerSession or g.device_type != "cpu" or g.unstable:
        return False
    plan = native.GraphPlan(
        g.n_slots, [tuple(m) for m in g.input_meta], list(g.input_bytes), list(g.contiguous), g.external_handles,
        g.external_slots, list(traced.picks), list(traced.kept), list(g.outputs), s.number, s.handle_base, s.tensors,
    )  # fmt: skip
    if traced.buffers:  # (round 52) each run writes them into the last run's kept tensors where it may
        bufs = [(b.handle, b.slot, b.sizes, b.strides, b.dtype, b.nbytes) for b in traced.buffers]
        plan.buffers(bufs, _fresh_said(s.number, g.graph_id, traced.buffers))
    return plan


def _fresh_said(number: int, graph_id: int, buffers: list[graph_trace.Buffer]) -> Callable[[int, str], None]:
    """What a plan calls the first time a buffer of its graph's traced function is a fresh one, not the tensor its
    handle held (native_runner.cpp `buffer_arg`): a log at debug level. (The session's number, not the session: the
    plan is held by its graph, which the session's table holds weakly keyed by it.)"""

    def said(i: int, why: str) -> None:
        log.debug("session %d: graph %d: kept tensor %#x is written into a new buffer, not into its last one: %s",
                  number, graph_id, buffers[i].handle, why)  # fmt: skip

    return said


def _resume(s: WorkerSession, pending: Replaying, piece_seconds: float) -> bool:
    """Go on with a Python replay run in pieces (`_run`) until it is done (True) or about `piece_seconds` have
    passed (False; 0: until it is done)."""
    g = pending.graph
    deadline = time.perf_counter() + piece_seconds if piece_seconds > 0 else float("inf")
    try:
        if not _advance(pending.steps, deadline)[0]:
            return False
    except BaseException:
        _failed(s, g)
        raise
    _finish(s, g, pending.slots, pending.outputs, pending.persistent)
    return True


def _pieces(g: Graph, slots: list[Any]) -> Generator[None, None, None]:
    """`execute` of the whole plan, REPLAY_PIECE_CALLS calls at a time (errors name the call in the whole graph)."""
    plan, n = g.plan, REPLAY_PIECE_CALLS
    for start in range(0, len(plan), n):
        if start:
            yield  # between pieces only: the last one ends the run in its own slice
        execute(g, slots, plan[start : start + n], start)


def _failed(s: WorkerSession, g: Graph) -> None:
    _forget_seen(g)  # a run that failed midway may have left any of them half-written: check all next time
    if g.mutated:  # as a failed eager op's (`CommandExecutor._call`): torch's out= kernels resize their output
        s.recount(g.mutated, zero_growth=True)  # before they check its values; the growth counted and zeroed


def _finish(
    s: WorkerSession, g: Graph, slots: list[Any], outputs: list[int], persistent: Sequence[torch.Tensor] | None,
    native: Any = None,
) -> None:  # fmt: skip
    """A run's end: the persistent tensors' versions noted (where `_externals` read them: `persistent`), its outputs
    and kept tensors bound (`native`: the C++ runner's module, whose `rebind_run` does `rebind_all`'s work on the
    same pairs: round 40, ~52k of the tiny MLP's ~184k instructions a run were the Python's, 7 tensors)."""
    if persistent is not None:
        _seen_after(g, persistent)
    # every handle was checked: outputs above, writes at definition
    if native is None or type(s) is not WorkerSession or not native.rebind_run(s, outputs, g.outputs, g.writes, slots):
        bound = [(h, slots[slot]) for h, slot in zip(outputs, g.outputs, strict=False) if h]
        bound += [(h, slots[slot]) for h, slot in g.writes.items()]
        s.rebind_all(bound)
    if g.mutated:
        s.recount(g.mutated)
    g.quiet = s.mutations


def _refused(host: Host, s: WorkerSession, g: Graph) -> bool:
    """Whether `g` must keep the Python replay (graph_trace.refusal, decided once and logged)."""
    why = graph_trace.refusal(host, g)
    if why is not None:
        g.trace_refused = True
        log.info("session %d: graph %d stays on the Python replay: %s", s.number, g.graph_id, why)
    return why is not None


def _externals(s: WorkerSession, g: Graph, slots: list[Any], native: Any = None) -> tuple[Sequence[torch.Tensor], bool]:
    """Resolve the persistent tensors into their slots, each checked against the metadata the graph was built
    for. A tensor that is the same live object the last run ended with, its version counter unchanged since, has
    had no op on it in between -- every op that changes a tensor's sizes, strides, offset or storage in place
    (resize_, set_, as_strided_, transpose_, an out= resize, ...) bumps that counter -- so it still has the
    metadata it was checked for then: no need to read it again (`Graph.stable`: only for tensors no op of the
    graph itself may change the metadata of). Where no command that may change a tensor's metadata ran on the
    session since the last run ended (`WorkerSession.mutations`: only this run's own count since `Graph.quiet`),
    no version is read either: each handle still bound to the object last checked is enough (`_quiet`). Returns
    the tensors, in order, and whether the versions are to be taken when the run ends (`_seen_after`)."""
    tensors = s.tensors
    seen = g.seen
    if len(seen) != len(g.externals):
        seen[:] = [[None, -1] for _ in g.externals]
        g.quiet = -1
        g.quiet_refs = None
    uploads = s.uploads
    if g.quiet >= 0 and s.mutations == g.quiet + 1 and not uploads:
        quiet = _quiet(s, g, slots, native)
        if quiet is not None:
            return quiet, False
    found = []
    for (slot, h, m), cell, nbytes in zip(g.externals, seen, g.external_nbytes, strict=True):
        t = tensors.get(h) if not uploads else None
        if t is None:
            t = s.resolve(h)
        ref = cell[0]
        if ref is None or ref() is not t or cell[1] != t._version:
            if t.shape != m[0] or t.stride() != m[1] or t.storage_offset() != m[2] or t.dtype != m[3]:
                cell[0] = g.quiet_refs = None
                raise InvalidArgument(f"graph {g.graph_id}: persistent tensor {h:#x} changed shape or dtype since")
            if t.untyped_storage().nbytes() < nbytes:  # (`set_` onto a smaller one: views the definition checked
                # against its storage may reach past this one's old end, into what an out= op grows it by)
                cell[0] = g.quiet_refs = None
                raise InvalidArgument(
                    f"graph {g.graph_id}: persistent tensor {h:#x} is on a smaller storage than at the graph's "
                    f"definition ({t.untyped_storage().nbytes()} bytes, was {nbytes}): define it again"
                )
            cell[0], cell[1] = weakref.ref(t), -1  # checked now; its version is taken when the run ends
        slots[slot] = t
        found.append(t)
    return found, True


def _quiet(s: WorkerSession, g: Graph, slots: list[Any], native: Any = None) -> tuple[torch.Tensor, ...] | None:
    """`_externals` when nothing that may change a tensor's metadata ran since the last run: the tensors where
    each handle is still bound to the object the last run found (and checked); the ones the graph's own ops may
    reshape (not `Graph.stable`) checked as always. None where a handle was freed or bound anew. The look-ups,
    the identity tests and the slots' filling are C calls (`Graph.pick_externals`, `Graph.quiet_refs`): a loop of
    them here was ~1.6k instructions a persistent tensor (round 40: ~41k of the tiny MLP's ~184k a run), in C
    calls ~1.4k; the C++ runner's `quiet_externals` (`native`) does all of it in one."""
    refs = g.quiet_refs
    if refs is None:
        return None
    if native is not None:
        found = native.quiet_externals(s.tensors, g.external_handles, refs, slots, g.external_slots)
        if found is None:
            return None
    else:
        try:
            found = g.pick_externals(s.tensors)
        except KeyError:  # a handle freed
            return None
        if not all(map(operator.is_, found, map(operator.call, refs))):  # a handle bound anew (or its tensor gone)
            return None
        _consume(map(slots.__setitem__, g.external_slots, found))
    for k in g.unstable:
        t, m = found[k], g.externals[k][2]
        if t.shape != m[0] or t.stride() != m[1] or t.storage_offset() != m[2] or t.dtype != m[3]:
            g.seen[k][0] = g.quiet_refs = None
            raise InvalidArgument(f"graph {g.graph_id}: persistent tensor {g.externals[k][1]:#x} changed shape or "
                                  "dtype since")  # fmt: skip
    return found


def _seen_after(g: Graph, persistent: Sequence[torch.Tensor]) -> None:
    """After a run: each stable persistent tensor's version counter as the run left it (the run's own in-place
    ops count), for `_externals` to compare with next time."""
    seen = g.seen
    for k in g.stable:
        seen[k][1] = persistent[k]._version
    g.quiet_refs = tuple(cell[0] for cell in seen)  # every one set by `_externals` (the run read them all)


def _forget_seen(g: Graph) -> None:
    g.quiet = -1
    g.quiet_refs = None
    for cell in g.seen:
        cell[0], cell[1] = None, -1


def _by_value(g: Graph, i: int, data: Any, own: bool = True, native: Any = None) -> torch.Tensor:
    """Input `i` of a run from its bytes in RunGraph.input_data (`data`: bytes, or views of the slice's payload), on
    the CPU: with `own`, in memory the tensor owns (its memory is part of the graph's reservation), one copy;
    without, a view of those bytes where they are aligned for its dtype, no copy -- for a device's run, which
    copies it onto the device (the pinned staging buffer, server/staging.py) and reads it only for value guards,
    all before the command ends: the tensor must never outlive the command (the slice's payload is the shared
    buffer, which the daemon fills with the session's next slice), and never be bound to a handle. `native`: the C++
    runner's module, whose `filled` makes an owned copy in one call (round 40: ~14k instructions an input here)."""
    shape, _, _, dtype = g.input_meta[i]
    if i >= len(data):
        raise InvalidArgument(f"graph {g.graph_id} input {i}: handle 0 and no input_data for it")
    raw = data[i]
    if not g.contiguous[i] or len(raw) != g.input_bytes[i]:
        raise InvalidArgument(
            f"graph {g.graph_id} input {i}: {len(raw)} bytes given by value; the graph takes "
            f"{g.input_bytes[i]} bytes of {list(shape)} {dtype}, contiguous"
        )
    if dtype is torch.bool:
        wire.check_bool_bytes(raw)
    if own and native is not None:
        return native.filled(g.input_sizes[i], dtype, raw)  # type: ignore[no-any-return]
    if not raw:
        t = torch.empty(shape, dtype=dtype)
    else:
        view = None if own else torch.frombuffer(raw, dtype=dtype)  # 1-d, all of it (its length was checked)
        if view is not None and not view.data_ptr() % view.element_size():
            t = view
        else:
            # One copy, into memory the tensor owns: a run's outputs may be views of its inputs, bound to handles
            # that outlive the command's bytes
            t = torch.frombuffer(bytearray(raw), dtype=dtype)
        if len(shape) != 1:  # view(*sizes): torch parses a tuple argument ~3x slower than separate sizes
            t = t.view(*shape) if shape else t.view(())
    return t


def execute(g: Graph, slots: list[Any], plan: list[Any] | None = None, start: int = 0) -> None:
    """The hot loop: no protobuf, no name lookups, no argument checks beyond the value guards. Each step's
    structure was decided at definition (graph_build.compile_calls). `plan`: g.plan by default (a CUDA graph's
    capture runs it without the value guards, which run before each replay: graph_cuda.py); `start`: the index of
    its first call in the graph (a trace's pieces, graph_trace.trace), for errors."""
    i = 0
    steps = plan or g.plan
    try:
        for i, (mode, fn, gather, fill, fill_lists, kwargs, kfill, check, out1, outs, zero, dead) in enumerate(steps):  # noqa: B007
            if mode == GATHER:
                args = gather(slots)
            elif mode == ONE:
                args = (slots[gather],)
            else:
                args = gather.copy()
                for pos, slot in fill:
                    args[pos] = slots[slot]
                for pos, lst in fill_lists:
                    args[pos] = [slots[x] if x else None for x in lst]
            if kfill:
                kwargs = dict(kwargs)
                for name, ref in kfill:
                    kwargs[name] = [slots[x] if x else None for x in ref] if isinstance(ref, list) else slots[ref]
            if check is not None:
                check(list(args), kwargs)
            out = fn(*args, **kwargs) if kwargs else fn(*args)
            if out1:
                slots[out1] = out
            elif outs:
                for slot, value in zip(outs, flat(out), strict=False):
                    if slot:
                        slots[slot] = value
            if zero:  # what the op returns, as the eager path: an out= form's tensor may have no output slot
                for t in flat(out):
                    if isinstance(t, torch.Tensor):
                        zero_made(t, zero == ZERO_ELEMENTS)
            for slot in dead:
                slots[slot] = None
    except (GpupoolError, *STEP_ERRORS) as exc:
        raise step_error(g.graph_id, start + i, g.calls[start + i].name, exc) from None
