"""Executes a session's commands (ops, uploads, downloads, frees, seeds, syncs) on its device.

This is the one place that touches tensors. `CommandExecutor.execute` takes protobuf commands and emits
protobuf replies through a callback, so a process boundary (one worker process per session) can later
sit between it and the gRPC front without changing either side.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from grpc import StatusCode

from gpupool import compact, prefault, protocol, wire
from gpupool._proto import device_pb2
from gpupool.errors import GpupoolError, InvalidArgument, ResourceExhausted

from . import bulk, checks, cost, guards, native_runner, runs, sizing, storage_resize, templates
from .collectives import Collectives
from .graph import GraphTable
from .ops import OpTable
from .sessions import HANDLE_BITS, Poison, PoisonedInput, WorkerSession, oom_message, out_of_memory, zero_made
from .sizing import NO_META, MetaSizer
from .slices import SideChunk, eager_records, mark_word
from .speedmodel import SpeedModel

log = logging.getLogger(__name__)
# torch.frombuffer warns that protobuf's bytes are read-only; we only ever copy out of them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

MAX_DIMS = 64
MAX_VERDICTS = 8192  # cached op signatures (cleared when full)
# Round 37 (quota37): and their bytes, estimated (`_key_bytes`): a signature holds its tensors' metas (~200 bytes
# each: tracemalloc measured 24 bytes a byte of a record of a 65,535-tensor list) and its int lists' values, and a
# record template's keeps the template alive (`Template.nbytes`); 8,192 of records near a frame's 16 MiB were
# ~3 TiB. A session's executor (one per session, in its worker or, under `--isolation thread`, in the daemon).
MAX_VERDICT_BYTES = 64 << 20
# May change tensors' metas or storages in place (learned runs check them again); other kinds: no
_RESHAPING = frozenset({"run_graph", "define_graph", "drop_graph", "collective", "group_join", "resize_storage"})
# Change no tensor's metadata in place (a tensor they bind is a new object; an upload's later chunks write bytes
# only); every other kind counts in `WorkerSession.mutations` (graph._externals), eager spans too
KEEPS_METAS = frozenset({"upload", "get", "free", "sync", "seed"})
_COMPUTE = object()  # _run_op's default: compute the op's signature
# The commands `eager_span` runs among eager records (through `run_commands`' own `execute`) without ending the span:
# they answer nothing, never end a slice (no reply room, no piece left) and change no tensor's meta in place
_BETWEEN = frozenset({"upload", "free"})
_FREE_KEY = 0x22  # a command's first byte where it is one `free` field (`Command.free`, 4, length-delimited)


def _carry(s: WorkerSession, epoch: int, trace: Any, k: int, objs: list[Any], after: Any) -> tuple[Any, ...] | None:
    """`Runs.carry` for a span that stopped (its slice's end, another command): its runs and the run's kept outputs
    held weakly (a run evicted from the session's runs, or a tensor freed, is not kept alive by it; None where an
    output takes no weak reference: the run then does not go on)."""
    refs = _refs(objs) if trace is not None else []
    if refs is None:
        return None
    return (s, epoch, _weak(trace), k, refs, _weak(after))


def _refs(objs: list[Any]) -> list[Any] | None:
    """Weak references of a run's kept outputs (None for a None), or None where one takes no weak reference."""
    try:
        return [None if o is None else weakref.ref(o) for o in objs]
    except TypeError:
        return None


def _weak(o: Any) -> Callable[[], Any]:
    return _NONE if o is None else weakref.ref(o)


def _NONE() -> None:
    return None


# `wire.dtype_from_proto` as a list by number (None: no dtype), for the native runner's uploads (`_native_ctx`)
_WIRE_DTYPES = [wire.TORCH_DTYPES.get(v) for v in range(max(wire.TORCH_DTYPES) + 1)]  # type: ignore[call-overload]
_NO_OBJS: list[Any] = []  # a learned run's kept outputs when none runs (never appended to: a run starts with [])
_Tensor = torch.Tensor
_STRIDED = torch.strided

# With `exclusive_rng`: a default generator (named by the lock that guards it: fake GPUs share the CPU's) -> the
# session whose stream it holds. One table per process, whatever the number of executors.
_RNG_OWNER: dict[Any, weakref.ref[WorkerSession]] = {}

Reply = Callable[[device_pb2.ServerFrame | bytes | list[Any]], None]  # a frame (or its bytes), or download frames


class CommandLedger(Protocol):
    """Where execution is counted (metrics)."""

    def op(self, session: WorkerSession) -> None: ...
    def error(self, session: WorkerSession, code: StatusCode) -> None: ...
    def transfer(self, direction: str, nbytes: int) -> None: ...
    def graph(self, session: WorkerSession, event: str, ops: int = 0) -> None: ...
    def learned(self, session: WorkerSession, n: int, native: int = 0) -> None: ...


class CommandExecutor:
    """Runs commands of sessions; holds only caches (op table, meta sizes), no session state."""

    # a slice of RunGraphs runs from its bytes (`slices.run_slice_into`: `graphs.run_raw`, `run_graph_raw`,
    # `eager_span`)
    graph_slices = True

    def __init__(self, ledger: CommandLedger) -> None:
        self.ops = OpTable()
        self.sizer = MetaSizer()
        self.ledger = ledger
        self.graphs = GraphTable(self)  # captured steps (server/graph.py)
        self.collectives = Collectives()  # configured by the daemon (token verifier, peer-facing host)
        self.speed: SpeedModel | None = None  # fake GPUs' speed model (server/speedmodel.py), when asked for
        # True in a session's own worker process: its random ops leave the session's stream in the device's
        # generator instead of swapping states per op (`_seeded`).
        self.exclusive_rng = False
        self.piece_bytes = 0  # > 0: a Get answers at most this many bytes per run (workers: bulk.PIECE_BYTES)
        # A worker's download slot for this slice (slices.SideChunk): a bulk Get's chunks of bulk.SIDE_MIN bytes
        # or more are written there, for the daemon to send on the side socket without copying them out.
        self.side_slot: memoryview | None = None
        self.side_used = 0
        self._op_ids: dict[str, dict[int, str | checks.OpPlan]] = {}  # session id -> compact op id -> its op
        # session id -> (its op id table, its torch device (a property builds it anew), its record templates, its
        # learned runs of records)
        self._eager: dict[str, tuple[dict[int, str | checks.OpPlan], torch.device, templates.Table, runs.Runs]] = {}
        self.graphs.eager = self._eager  # (a RunGraph from its bytes ends the learned runs' epoch: `run_raw`)
        self._plans: dict[str, checks.OpPlan] = {}  # allowed op name -> its plan
        self._verdicts: dict[Any, int] = {}  # op signature -> new bytes, once its shape-only checks passed
        self._verdict_bytes = 0  # their signatures' bytes, estimated (`_key_bytes`, MAX_VERDICT_BYTES)
        # the C++ runner of learned runs' fast steps (server/native_runner.py), None: the Python path only
        self.native: Any = native_runner.load()

    def forget(self, s: WorkerSession) -> None:
        """Drop what this executor keeps for a closed session (its op id table, its device): a process that
        outlives its sessions (`--isolation thread`) must not keep one table per session it ever served."""
        self._op_ids.pop(s.session_id, None)
        self._eager.pop(s.session_id, None)
        s.defining = None  # a graph definition under way holds the session (a reference cycle)

    def warm_up(self) -> None:
        """Load torch's meta kernels now (about a second, once per process), not on some session's clock, and
        make MKL's vector math functions ready before any worker forks (`warm_vector_math`). torch._dynamo too:
        the meta kernels of torch's Python references (elementwise ops: `add.Tensor`'s) import it at their first
        call, 1-8 s here (round 45, hostile45: under `--isolation thread` the first such op of any session held
        the device's thread, every session on it waiting, that long; the zygote imported it for its workers)."""
        import torch._dynamo  # noqa: F401  (workers may not write its cache: imported before they fork)

        one = torch.ones(2, 2)
        self.sizer.new_bytes(torch.ops.aten.mm.default, [one, one], {})
        self.sizer.new_bytes(torch.ops.aten.add.Tensor, [one, one], {})
        warm_vector_math()

    def execute(self, s: WorkerSession, cmd: device_pb2.Command, reply: Reply, data: Any = None) -> None:
        """Run one command; `data`: an upload's bytes, or a RunGraph's `input_data` (a list), parsed out of its span
        by hand (server/bulk.py)."""
        kind = cmd.WhichOneof("cmd")
        if kind not in KEEPS_METAS:
            s.mutations += 1
            if kind in _RESHAPING:  # may change tensors' metas in place: learned runs check them again
                state = self._eager.get(s.session_id)
                if state is not None:
                    state[3].epoch += 1
        try:
            if kind == "eager_op":
                self._eager_op(s, cmd.eager_op)
            elif kind == "op":
                self._op(s, cmd.op)
            elif kind == "upload":
                self._upload(s, cmd.upload, data)
            elif kind == "get":
                reply(self._get(s, cmd.get))
            elif kind == "free":
                native = self.native  # `WorkerSession.free` in C++ (native_runner.cpp `free_handles`), or here
                if (
                    native is None
                    or s.__class__.free is not _FREE
                    or not native.free(s, cmd.free.SerializeToString(), self._native_keys(s))
                ):
                    s.free(list(cmd.free.handles))
            elif kind == "seed":
                self._seed(s, cmd.seed.seed)
            elif kind == "rng_state":  # torch.cuda.get_rng_state / set_rng_state (round 43)
                self._rng_state(s, cmd.rng_state)
            elif kind == "resize_storage":  # untyped_storage().resize_ (server/storage_resize.py): resize_'s allowlist
                self.ops.resolve(storage_resize.ALLOWED_AS)
                storage_resize.resize(s, cmd.resize_storage)
            elif kind == "sync":
                reply(self._sync(s, cmd.sync))
            elif kind == "run_graph":
                self.graphs.run(s, cmd.run_graph, data)
            elif kind == "define_graph":
                self.graphs.define(s, cmd.define_graph)
            elif kind == "drop_graph":
                self.graphs.drop(s, cmd.drop_graph)
            elif kind == "collective":  # torch.distributed backend "gpupool" (server/collectives.py)
                self.collectives.run(s, cmd.collective)
            elif kind == "group_join":
                self.collectives.join(s, cmd.group_join)
            elif kind == "group_leave":  # (round 46) dist.destroy_process_group(subgroup)
                self.collectives.leave(s, cmd.group_leave)
            else:
                raise InvalidArgument("empty command")
        except Exception as exc:
            self._failed(s, cmd, exc, reply)

    def run_between(self, s: WorkerSession, raw: bytes, reply: Reply) -> bool:
        """`execute` of an upload or a free given as its command's bytes, outside a learned run
        (`slices.FrameCommands.between`: native_runner.cpp `eager_frame` read them, a message upb takes, to the same
        fields; a step's first uploads, a free after a run ended), run by the native runner (`Ctx.between`) where
        it takes it, as it runs one among a run's records (round 40): `_upload`'s checks in its order and its
        one-chunk `filled` path (a fake GPU's), `WorkerSession.free` (any device's, as `native.free`). True: run,
        or failed and recorded as `execute` records it. False: nothing done (no runner, another session class, a
        real GPU's upload, a chunk, a check that fails, whose error is Python's): the caller parses the command and
        executes it. Until round 50 upb parsed each such command into a message here, and a free's was serialized
        again for `native.free`. Neither kind counts in `s.mutations` (`KEEPS_METAS`) nor ends an epoch, as in
        `execute`."""
        native = self.native
        if native is None or s.__class__ is not WorkerSession or (raw[0] != _FREE_KEY and not s.device.fake):
            return False  # (a real GPU's context runs frees only: `_native_ctx`'s `ups`)
        state = self._eager.get(s.session_id)
        if state is None:
            state = self._eager_state(s)
        memory = s.memory
        count = self.ledger.op if getattr(self.ledger, "counts_ops", True) else None
        ctx = self._native_ctx(native, s, state[3], memory, memory.device.capacity, count, state[1])
        try:
            got = ctx.between(raw)
        except Exception as exc:  # (an upload's transfer count raised after it bound the tensor) as `execute`
            got = exc
        if got.__class__ is bool:
            return got  # type: ignore[no-any-return]
        self._failed(s, device_pb2.Command.FromString(raw), got, reply)  # (cannot fail: read by `eager_frame`)
        return True

    def run_graph_raw(self, s: WorkerSession, raw: bytes, reply: Reply, graph_id: int) -> bool:
        """`execute` of a RunGraph given as its bytes, which no upb parse read (`slices.run_commands` of a frame of
        RunGraphs: native_runner.cpp `graph_frame`, which read `graph_id` as upb reads it), where the graph's quiet
        run takes it (`GraphTable.run_raw`, which makes `execute`'s counts and records an error as it does): True,
        run (or failed). False, nothing done, where it does not: the caller parses the command and executes it.
        (A slice of one RunGraph calls `graphs.run_raw` itself: `slices.run_slice_into`.)"""
        n = self.graphs.run_raw(s, raw, reply, graph_id)
        if n > 0:  # a quiet run: its event is the caller's to count
            self.ledger.graph(s, "replayed", n - 1)
        return n >= 0

    def _failed(self, s: WorkerSession, cmd: device_pb2.Command, exc: Exception, reply: Reply) -> None:
        """A command raised `exc`: the error it answers or records, with its status (run spans share it)."""
        if isinstance(exc, PoisonedInput):
            self._fail(s, cmd, exc.poison, reply)
        elif isinstance(exc, GpupoolError):
            self._fail(s, cmd, Poison.of(exc, self._what(s, cmd)), reply)
        elif out_of_memory(exc):
            s.upload_pool.release()  # the host memory of freed uploads kept for reuse: the session's next try has it
            err = Poison(StatusCode.RESOURCE_EXHAUSTED, self._what(s, cmd), oom_message(exc))
            self._fail(s, cmd, err, reply)
        elif isinstance(exc, RuntimeError | TypeError | ValueError | IndexError | OverflowError):
            self._fail(s, cmd, Poison(StatusCode.INVALID_ARGUMENT, self._what(s, cmd), _first_lines(exc)), reply)
        else:  # a bug must cost one command, never the daemon
            log.error("internal error executing %s for session %d", cmd.WhichOneof("cmd"), s.number, exc_info=exc)
            self._fail(s, cmd, Poison(StatusCode.INTERNAL, self._what(s, cmd), f"{type(exc).__name__}: {exc}"), reply)

    def _what(self, s: WorkerSession, cmd: device_pb2.Command) -> str:
        """What failed, for the error: an op's name, a collective's kind, or nothing."""
        kind = cmd.WhichOneof("cmd")
        if kind == "op":
            return cmd.op.name
        if kind == "collective":
            return f"collective {cmd.collective.kind}"
        if kind == "resize_storage":
            return "untyped_storage().resize_"
        if kind != "eager_op":
            return ""
        try:  # the record may be malformed
            _, op_id, name, _ = compact.read_head(cmd.eager_op)
        except InvalidArgument:
            return "eager op"
        entry = self._op_ids.get(s.session_id, {}).get(op_id, "eager op")
        return name or (entry if isinstance(entry, str) else entry.name)

    def _fail(self, s: WorkerSession, cmd: device_pb2.Command, err: Poison, reply: Reply) -> None:
        self.ledger.error(s, err.code)
        kind = cmd.WhichOneof("cmd")
        if kind == "get":
            reply(device_pb2.ServerFrame(request_id=cmd.get.request_id, error=s.error_proto(err)))
            return
        if kind == "sync":  # a failed sync (bad scalar handle) reports its own error
            first = s.error or err
            s.error = None
            sync = device_pb2.SyncReply(error=s.error_proto(first))
            reply(device_pb2.ServerFrame(request_id=cmd.sync.request_id, sync=sync))
            return
        s.record_error(err)
        if kind == "op" or kind == "eager_op":
            for h in cmd.op.outputs if kind == "op" else compact.outputs_of(cmd.eager_op):
                if h:
                    s.poison(h, err)
        elif kind == "upload":
            s.poison(cmd.upload.handle, err)
        elif kind == "collective":
            for h in cmd.collective.tensors:
                s.poison(h, err)

    # ---- ops ----

    def _op(self, s: WorkerSession, msg: device_pb2.Op) -> None:
        plan = self._plan(msg.name, s)
        lists = [len(a.tensors.handles) for a in msg.args if a.WhichOneof("value") == "tensors"]
        if lists and max(lists) > guards.MAX_TENSORS:  # before resolving millions of handles
            guards.check_counts(plan.op, lists, [], {})
        dev = s.device.torch_device
        args = [wire.decode_arg(a, s.resolve, dev) for a in msg.args]
        kwargs = {k: wire.decode_arg(v, s.resolve, dev) for k, v in msg.kwargs.items()}
        written = lambda: wire.arg_handles([*msg.args, *msg.kwargs.values()])  # noqa: E731
        self._run_op(s, plan, args, kwargs, msg.outputs, written, dev)

    def _eager_state(
        self, s: WorkerSession
    ) -> tuple[dict[int, str | checks.OpPlan], torch.device, templates.Table, runs.Runs]:
        state = self._eager.get(s.session_id)
        if state is None:
            table = self._op_ids.setdefault(s.session_id, {})
            state = self._eager[s.session_id] = (table, s.device.torch_device, templates.Table(), runs.Runs())
        return state

    def _eager_op(self, s: WorkerSession, data: bytes) -> None:
        """A compact eager record (gpupool/compact.py): names are defined once per session, then referred to by id.
        A record laid out as one seen before takes its template (server/templates.py), any other the full decode."""
        state = self._eager.get(s.session_id)
        if state is None:
            state = self._eager_state(s)
        table, dev, learned, known = state
        get = None if s.uploads else s.tensors.get  # a half-uploaded handle must go through resolve's check
        sizes = learned.heads.get(data[:5])
        seen = sizes.get(len(data)) if sizes is not None else None
        if seen is not None:
            for tpl in seen:
                fields = tpl.unpack(data)
                if tpl.fixed_of(fields) == tpl.fixed:
                    args, kwargs, handles, sig = templates.fill(tpl, fields, s.resolve, get)
                    self._run_op(s, tpl.plan, args, kwargs, fields[1 : 1 + tpl.n_out], handles.copy, dev, sig)
                    if known.rec is not None:  # `eager_span` is learning a run
                        known.rec.append((tpl, fields, sig))
                    return
        try:
            op_id, name, outputs, args, kwargs, handles = compact.decode_parts(data, s.resolve, dev, get)
        except Exception:
            # The record failed before it ran (an input an earlier failed op poisoned, say): its definition still
            # holds, as the client counts it sent. Until round 40 it was lost, and every later record of that id
            # failed ("eager op id N was never defined"): a script that caught one refusal was served no further.
            _, op_id, name, _ = compact.read_head(data)  # (a head that does not read failed decode_parts alike)
            if name:
                _enter(table, learned, known, op_id, name)
            raise
        if name:
            _enter(table, learned, known, op_id, name)
        entry = table.get(op_id)
        if entry is None:
            raise InvalidArgument(f"eager op id {op_id} was never defined in this session")
        if entry.__class__ is str:  # resolved (through the allowlist) on first use; a denied name stays denied
            entry = table[op_id] = self._plan(entry, s)  # type: ignore[arg-type]
        if not name:
            new = templates.learn(data, args, kwargs, entry)
            if new is not None:
                learned.add(data, new)
        self._run_op(s, entry, args, kwargs, outputs, lambda: handles, dev)  # type: ignore[arg-type]

    def eager_span(
        self,
        s: WorkerSession,
        commands: Sequence[device_pb2.Command],
        i: int,
        reply: Reply,
        progress: Callable[[int], None] | None,
        start: float,
        budget: float,
        records: Sequence[bytes] | None = None,
        between: Callable[..., None] | None = None,
    ) -> tuple[int, bool]:
        """Run the consecutive eager records from `commands[i]` on, through learned runs where they match
        (server/runs.py) and on the normal path (`execute`, learning runs) where not, marking `progress` before
        each as `slices.run_commands` does. Returns the index of the first command not run (a command that is no
        eager record and not run here, or the end) and whether the slice's time budget passed (measured from
        `start`).

        `records`: each command's `eager_op` field (`eager_records`; empty where the command is another kind: a
        oneof's other fields read as their default), read once per slice rather than through a message object
        and `WhichOneof` per command. An empty eager record ends the span too (the normal path refuses it).

        `between`: the slice's `execute` (`slices.run_commands` passes its own: a slice whose big uploads' bytes
        were taken out hands them over there). With it, the uploads and frees among the records (`_BETWEEN`: they
        answer nothing, end no slice and change no tensor's meta in place) run here, through it, as
        `run_commands` runs them, and the run under way goes on after them (round 39: each one ended the span,
        and the record after it, inside a run, took the normal path where it was no run's first record; the
        encoder ~0.4 a step, after the frees that land anywhere in a step). Its kept outputs are held weakly
        across the command: one it frees or binds anew is not kept alive (and fails the identity check). With the
        native runner a one-chunk upload or a free among a run's records runs inside `Ctx.run` (round 40:
        `commands.between`, `slices.FrameCommands`; native_runner.cpp `Ctx::between`), which drops such a kept
        output from its list too.

        A span that stops elsewhere (its slice's end, its time budget, another kind of command) leaves where it
        stopped (`Runs.carry`): the session's next span, where nothing since changed a tensor's meta in place (the
        epoch), goes on in the run under way there."""
        n = len(commands)
        if records is None:
            records = eager_records(commands)
        if not records[i]:  # before any setup: slices of uploads, gets, frees
            return i, False
        s.mutations += 1
        table, dev, learned, known = self._eager_state(s)
        get = s.tensors.get
        resolve = s.resolve
        match = runs.match
        perf = time.perf_counter
        trace: runs.Trace | None = None
        steps: list[runs.Step] = []
        k = 0
        objs: list[Any] = []
        after: runs.Trace | None = None  # the run that just ended at its last step
        over = False
        hits = 0  # records of this span run inside a learned run (added to `known.hits` at the end)
        natives = 0  # of which the C++ runner ran (server/native_runner.py)
        tensors, poisoned, number, base, max_handles = s.tensors, s.poisoned, s.number, s.handle_base, s.max_handles
        quota, memory, capacity = s.quota, s.memory, s.memory.device.capacity
        # the inline path leaves the speed model's hold and a counting ledger's call to `_run_step`
        plain = self.speed is None or not self.speed.active
        count = self.ledger.op if getattr(self.ledger, "counts_ops", True) else None
        native, ctx = self.native, None
        tries: Any = ()  # the runs C++ is offered for a record
        ups = getattr(commands, "between", None)  # the uploads and frees C++ runs among a run's records (FrameCommands)
        carry, known.carry = known.carry, None
        if carry is not None and carry[0] is s and carry[1] == known.epoch and not s.uploads:
            # this record follows the last one the session's previous span ran, inside a span that stopped at its
            # slice's end, its time budget or another command (a Sync, a Get): the run under way there goes on,
            # checked as any step is (`match`, or C++), its kept outputs those still alive (weakly held between
            # spans: a run holds them only while its session does; one freed, or bound again, fails the identity
            # check); where a run had just ended, the run that followed it last time is tried first, as within a
            # span
            ran, k0, refs, after = carry[2](), carry[3], carry[4], carry[5]()
            if ran is not None and ran.quota == s.quota and ran.flops == s.max_op_flops:
                trace, steps, k = ran, ran.steps, k0
                objs = [None if r is None else r() for r in refs]
        try:
            while i < n:
                data = records[i]
                if not data:
                    if between is None:
                        break
                    # an upload or a free the runner read (`FrameCommands.between`): run from its bytes where it
                    # takes it (`run_between`), else through its message; any other command ends the span
                    raw = ups[i] if ups is not None else None
                    if raw is None and commands[i].WhichOneof("cmd") not in _BETWEEN:
                        break
                    if known.rec is not None:  # the recording ends here, as at a span's end (runs learned as before)
                        self._learn(known, s)
                    if progress is not None:
                        progress(i)
                    if objs:  # held weakly across it (`_carry`'s reason): nothing else here holds them
                        refs = _refs(objs)
                        objs = tries = o = got = None  # type: ignore[assignment]
                        if raw is None or not self.run_between(s, raw, reply):
                            between(s, commands[i], reply)
                        if refs is None:  # (an output that takes no weak reference: the run ends)
                            trace, objs = None, _NO_OBJS
                        else:
                            objs = [None if r is None else r() for r in refs]
                    elif raw is None or not self.run_between(s, raw, reply):
                        between(s, commands[i], reply)
                    if s.uploads:  # a handle half uploaded: the records take the normal path's checks until it is done
                        trace, objs, after = None, _NO_OBJS, None
                    i += 1
                    if perf() - start > budget:
                        over = True
                        break
                    continue
                got = None  # (the last record's inputs: not held while C++ runs uploads, `Ctx::upload`)
                if native is not None and plain and not s.uploads:
                    # records of a run in C++ while they match (native_runner.py); where no run is under way (a
                    # span's first record, or after a run ended) the first step of each run the Python path would
                    # try (`after.next()`, then the runs of this first record, in the same order) is tried in C++:
                    # any run whose step C++ takes runs the record as the normal path would (the record's op and
                    # arguments, checked against that step's verdict), so which one it is only decides what the
                    # next records are checked against. Also while records are being recorded (`known.rec`: the
                    # normal path ran the ones before): a run C++ takes ends the recording right after its call,
                    # as the Python path ends it before the step runs (`_learn` reads only the recorded records,
                    # the verdicts and the session's quota and compute bound, none of which C++ changes)
                    if trace is not None:
                        tries = ((trace, k, objs, -1),)
                    else:
                        tries = self._native_candidates(known, after, data, s)
                    for cand, k0, o, at in tries:
                        nat = cand.native
                        if nat is None:
                            nat = cand.native = native_runner.compile_trace(native, cand, dev) or False
                        if not (nat and nat.runs(k0)):
                            continue
                        if ctx is None:
                            ctx = self._native_ctx(native, s, known, memory, capacity, count, dev)
                            word = mark_word(progress)  # a worker's shared word: C++ stores it, calls nothing
                            mark = progress if word is None else word
                        j, k1, done, flags, exc, chained = ctx.run(nat, k0, records, i, o, mark, start, budget, ups)
                        if not done and exc is None:
                            continue  # not taken: the Python path decides (match, or the normal path)
                        if cand is not trace:  # a run starts here
                            if at > 0:  # the most recently run first, as the Python path orders them
                                found = known.heads.get((data[:5], len(data)))
                                if found is not None and found[at] is cand:
                                    found.insert(0, found.pop(at))
                            if after is not None and at >= 0:
                                runs.follows(after, cand)
                            trace, steps, objs, after = cand, cand.steps, o, None
                        if known.rec is not None:  # a learned run starts here: the recording ends
                            self._learn(known, s)
                        if chained is not None:  # the records ran on into the runs that followed (`next`)
                            trace, objs = chained
                            steps = trace.steps
                        k = k1
                        break
                    else:
                        j = -1
                    if j >= 0:
                        hits += done
                        natives += done
                        i = j
                        if exc is not None:  # record i raised (the op, or its binding): as on the Python path
                            self._failed(s, commands[i], exc, reply)
                            trace, objs = None, _NO_OBJS
                            i += 1
                            if perf() - start > budget:
                                over = True
                                break
                            continue
                        if flags:
                            if flags & native_runner.END:
                                after, trace, objs = trace, None, _NO_OBJS
                            if flags & native_runner.OVER:
                                over = True
                                break
                            continue
                        if i >= n:
                            break
                        data = records[i]  # the record C++ left to the Python path
                        if not data:  # another command: run here (`between`) or the span's end
                            continue
                got = None
                if trace is not None and not s.uploads:  # a half-uploaded handle: the normal path's checks
                    try:
                        got = match(steps[k], data, get, resolve, objs, known.epoch)
                    except Exception:  # the normal path raises it again, with its status
                        got = None
                    if got is None and native is not None and plain:
                        # the run under way ends here (C++ left the record to this match, which failed too): the
                        # first steps of the runs tried next (those of this record: `after` is None while a run is
                        # under way) are C++'s to try first, as at a span's start (no progress marked yet: the
                        # record is marked once, by whichever runs it)
                        trace, objs = None, _NO_OBJS
                        continue
                if progress is not None:
                    progress(i)
                if not s.uploads:  # a half-uploaded handle must go through the normal path's checks
                    if got is None and after is not None:  # the run that followed it last time, first
                        cand = after.next()
                        if cand is not None and cand.quota == s.quota and cand.flops == s.max_op_flops:
                            objs = []
                            try:
                                got = match(cand.steps[0], data, get, resolve, objs, known.epoch)
                            except Exception:
                                got = None
                            if got is not None:
                                trace, steps, k = cand, cand.steps, 0
                    if got is None:
                        trace, objs = None, _NO_OBJS
                        found = known.heads.get((data[:5], len(data)))
                        if found is not None:
                            for at, cand in enumerate(found):
                                if cand.quota != s.quota or cand.flops != s.max_op_flops:
                                    continue
                                objs = []
                                try:
                                    got = match(cand.steps[0], data, get, resolve, objs, known.epoch)
                                except Exception:
                                    got = None
                                if got is not None:
                                    trace, steps, k = cand, cand.steps, 0
                                    if at:  # the most recently run first
                                        found.insert(0, found.pop(at))
                                    if after is not None:
                                        runs.follows(after, cand)
                                    break
                    after = None
                if got is not None:
                    if known.rec is not None:  # a learned run starts here: the recording ends
                        self._learn(known, s)
                    step = steps[k]
                    fields = got[2]  # its inputs (`got`) must not outlive this iteration, as on the normal path
                    outputs = fields[1 : 1 + step.n_out]
                    # A run holds its kept outputs (`objs`) only while its session does: a step that unbinds a
                    # tensor (fails, or rebinds an output handle) ends it, and whenever a run ends they go. Else
                    # records rebinding kept handles would leave them alive outside the accounting until the
                    # run's end: a run of thousands of steps holding many quotas of the device's memory.
                    try:
                        h = outputs[0] if step.fast and plain else 0
                        if h and h not in tensors:
                            # `_run_step` inline for the commonest step (one new output, no per-op extras): the
                            # same checks in the same order (tests/unit/test_server_runs.py compares the two)
                            if h >> HANDLE_BITS != number or h == base:
                                s.check_handle(h)  # raises
                            if h not in poisoned and len(tensors) + len(poisoned) >= max_handles:
                                s.admit_handles(1)  # raises
                            need = step.need
                            used_before = s.used
                            if need > 0 and (used_before + need > quota or memory.used + need > capacity):
                                s.admit(need)  # raises
                            args, kwargs = got[0], got[1]
                            run = step.plan.run
                            out = run(*args, **kwargs) if kwargs else run(*args)
                            del got, args, kwargs
                            s.ops += 1
                            if count is not None:
                                count(s)
                            if out.__class__ is _Tensor and h not in poisoned and (step.single or _dense(out)):
                                step.single = True
                                s.bind_new(h, out)
                                bound: Sequence[int] = outputs
                            else:
                                bound = self._bind_outputs(s, outputs, out, dev)
                            del out
                            if s.used > quota and s.used > used_before:
                                _over_quota(s, bound)  # raises
                            rebound = False
                        else:
                            rebound = self._run_step(s, step, got[0], got[1], outputs, fields, dev, known)
                    except Exception as exc:
                        self._failed(s, commands[i], exc, reply)
                        trace, objs = None, _NO_OBJS
                    else:
                        hits += 1
                        k += 1
                        if rebound:
                            trace, objs = None, _NO_OBJS
                        elif k == len(steps):
                            after, trace, objs = trace, None, _NO_OBJS
                        else:
                            for j in step.keep:
                                objs.append(get(outputs[j]))
                else:
                    if known.rec is None and not s.uploads:
                        known.rec = []
                    before = len(known.rec) if known.rec is not None else 0
                    # `execute` of an eager record (its kind `eager_op`, which changes no epoch): the command's
                    # message is needed only where it fails (`_failed`; a slice's `FrameCommands` makes it then)
                    try:
                        self._eager_op(s, data)
                    except Exception as exc:
                        self._failed(s, commands[i], exc, reply)
                    if known.rec is not None and len(known.rec) == before:  # no template hit, or it failed
                        self._learn(known, s)
                i += 1
                if perf() - start > budget:
                    over = True
                    break
        finally:
            if known.rec is not None:
                self._learn(known, s)
            if hits:  # the metrics gpupool_eager_learned_ops_total and gpupool_eager_native_ops_total
                known.hits += hits
                known.native += natives
                self.ledger.learned(s, hits, natives)
        if trace is not None or after is not None:
            known.carry = _carry(s, known.epoch, trace, k, objs, after)
        return i, over

    def _run_step(
        self,
        s: WorkerSession,
        step: runs.Step,
        args: list[Any],
        kwargs: dict[str, Any],
        outputs: Sequence[int],
        fields: tuple[Any, ...],
        dev: torch.device,
        known: runs.Runs,
    ) -> bool:
        """`_run_op` for a record that matched a step of a learned run (server/runs.py): the same checks in the same
        order with the learned verdict; the output checks that depend only on its meta are done once per step.
        Returns whether an output handle held a tensor before (the caller's run then ends: `eager_span`)."""
        plan = step.plan
        op = plan.op
        if plan.reshapes:
            known.epoch += 1
        if plan.takes_device and kwargs.get("device") is None:
            kwargs["device"] = dev
        new_handles = 0
        rebound = False
        tensors, poisoned, number, base = s.tensors, s.poisoned, s.number, s.handle_base
        for h in outputs:
            if h:
                if h >> HANDLE_BITS != number or h == base:
                    s.check_handle(h)  # raises
                if h not in tensors and h not in poisoned:
                    new_handles += 1
                elif h in tensors:
                    rebound = True
        if new_handles and len(tensors) + len(poisoned) + new_handles > s.max_handles:
            s.admit_handles(new_handles)  # raises
        if step.check:  # value guards run every time (a `_foreach_` op's list lengths: fixed by its template)
            guards.validate(op, args, kwargs, s.max_op_flops)
        need = step.need
        if plan.reshapes:
            # What an out= op or a resize grows depends on its tensors' storages (their sizes, which share one), which
            # a run's match does not check (it checks metas): sized again, through the sizer's cache, keyed by them.
            # Until red42 the learned verdict was used: three `neg.out`s into room taught a run 0 bytes, and a fourth
            # into a fresh zero-element tensor grew 12 MiB past a 16 MiB quota, refused only after the kernel.
            need = self.sizer.new_bytes(op, args, kwargs)
            need = (
                sizing.no_meta_bound(op, args, kwargs) if need == NO_META else need + cost.temporary(op, args, kwargs)
            )
        if need > 0:
            s.admit(need)
        used_before = s.used
        run = plan.run
        speed = self.speed if self.speed is not None and self.speed.active else None
        started = time.perf_counter() if speed is not None else 0.0
        out = self._call(s, plan, run, args, kwargs, lambda: runs.written(step, fields))
        if speed is not None:
            speed.hold_op(op, args, kwargs, out, started)
        s.ops += 1
        self.ledger.op(s)
        if plan.reshapes:
            s.recount(runs.written(step, fields), zero_growth=plan.grown)
        if plan.uninitialized:
            for t in _slots(out):
                if isinstance(t, torch.Tensor):
                    zero_made(t, plan.into_out)
        bound: Sequence[int]
        if len(outputs) == 1 and out.__class__ is _Tensor:
            h = outputs[0]
            if h and h not in tensors and h not in poisoned and (step.single or _dense(out)):
                step.single = True  # a function of the output's meta, and so of the step's inputs' metas
                s.bind_new(h, out)
                bound = outputs
            else:
                bound = self._bind_outputs(s, outputs, out, dev)
        else:
            bound = self._bind_outputs(s, outputs, out, dev)
        if s.used > s.quota and s.used > used_before:
            _over_quota(s, bound)  # raises
        return rebound

    @staticmethod
    def _native_candidates(
        known: runs.Runs, after: runs.Trace | None, data: bytes, s: WorkerSession
    ) -> list[tuple[runs.Trace, int, list[Any], int]]:
        """The runs whose first step `eager_span`'s Python path would try for record `data` where no run is under
        way, in its order: the one that followed the run that just ended, then those of this first record (with
        their position); each with a fresh list of kept outputs."""
        out: list[tuple[runs.Trace, int, list[Any], int]] = []
        if after is not None:
            cand = after.next()
            if cand is not None and cand.quota == s.quota and cand.flops == s.max_op_flops:
                out.append((cand, 0, [], -1))
        found = known.heads.get((data[:5], len(data)))
        if found is not None:
            for at, cand in enumerate(found):
                if cand.quota == s.quota and cand.flops == s.max_op_flops:
                    out.append((cand, 0, [], at))
        return out

    def _native_ctx(
        self, native: Any, s: WorkerSession, known: runs.Runs, memory: Any, capacity: int, count: Any, dev: torch.device
    ) -> Any:
        """The native runner's context for session `s` (its tables, quota, handle limit, compute bound, memory and
        counter, read once when it is made), kept in `known` from span to span and made again when any of those
        changed (~14k instructions a context: a span's first native record paid it before). The session's tables are
        dicts it never replaces; the key holds `s` itself, so a context never serves another session object."""
        key = (s, s.quota, s.max_handles, s.max_op_flops, memory, capacity, count, self.exclusive_rng)
        got = known.ctx
        if got is not None and got[0] == key:
            return got[1]
        # seeded records: in a session's own worker process (`exclusive_rng`) `_seeded`'s check that the device's
        # generator holds this session's stream, made in C++ per record; where sessions share it, Python's
        rng = (_RNG_OWNER, s.device.rng_lock) if self.exclusive_rng else None
        # uploads (`_upload`'s `filled` path) and frees among a run's records in C++: a fake GPU's session whose
        # methods are `WorkerSession`'s own
        ups = None
        if s.device.fake and s.__class__ is WorkerSession:
            ups = (self.ledger.transfer, s.upload_pool, _WIRE_DTYPES)
        ctx = native.Ctx(s, memory, count, self._binder(dev), _over_quota, capacity, rng, ups)
        known.ctx = (key, ctx)
        return ctx

    def _native_keys(self, s: WorkerSession) -> Any:
        """The native context kept for session `s` (`_native_ctx`), or None: a `Free` in C++ looks its handles up
        under the ints that context bound them with (its cache of handle ints, native_runner.cpp `Keys`)."""
        state = self._eager.get(s.session_id)
        got = None if state is None else state[3].ctx
        return got[1] if got is not None and got[0][0] is s else None

    def _binder(self, dev: torch.device) -> Callable[[WorkerSession, Any, Any], list[int]]:
        """`_bind_outputs` on `dev`, for the native runner's outputs that `bind_new` does not take. It holds the
        executor weakly: the context holding it is kept in the executor's own state (`_native_ctx`), and a cycle
        through a C++ object is one Python's collector cannot see (only this executor runs the context)."""
        ref = weakref.ref(self)
        return lambda s, handles, out: ref()._bind_outputs(s, handles, out, dev)  # type: ignore[union-attr]

    def _learn(self, known: runs.Runs, s: WorkerSession) -> None:
        """End the recording of a run of records: keep traces of it."""
        rec, known.rec = known.rec, None
        if not rec:
            return
        for trace in runs.build_all(rec, self._verdicts, s.quota, s.max_op_flops):
            known.add(trace.steps[0].tpl.head, trace)
            known.learned += 1
            log.debug("session %d: learned a run of %d eager records", s.number, len(trace.steps))

    def _keep_verdict(self, sig: Any, need: int) -> None:
        """Cache `need` for `sig`: at most MAX_VERDICTS and MAX_VERDICT_BYTES (estimated) in all, cleared when full;
        one signature alone past a quarter of the bytes is not kept (its checks run every time)."""
        nbytes = _key_bytes(sig)
        if nbytes > MAX_VERDICT_BYTES // 4:
            return
        if len(self._verdicts) >= MAX_VERDICTS or self._verdict_bytes + nbytes > MAX_VERDICT_BYTES:
            self._verdicts.clear()
            self._verdict_bytes = 0
        self._verdicts[sig] = need
        self._verdict_bytes += nbytes

    def _plan(self, name: str, s: WorkerSession) -> checks.OpPlan:
        plan = self._plans.get(name)
        if plan is None:
            plan = self._plans[name] = checks.OpPlan(self.ops.resolve(name), s.device.torch_device)
        return plan

    def _run_op(
        self,
        s: WorkerSession,
        plan: checks.OpPlan,
        args: list[Any],
        kwargs: dict[str, Any],
        outputs: Sequence[int],
        written: Callable[[], list[int]],
        dev: torch.device,
        sig: Any = _COMPUTE,
    ) -> None:
        """Check and run one decoded op. The checks that depend only on the op and its arguments' shapes, dtypes and
        values (enums, sizes against the quota, list counts, compute bound, new bytes) are cached per signature;
        value-dependent guards (indices) run every time, as do the quota and handle checks. `sig`: the verdict key
        a record template gave (server/templates.py), None for an op never cached; by default computed here.
        A record of a learned run (server/runs.py) takes `_run_step` instead: keep the two in step."""
        op = plan.op
        if plan.reshapes:  # learned runs check their inputs' metas again (server/runs.py)
            state = self._eager.get(s.session_id)
            if state is not None:
                state[3].epoch += 1
        if plan.takes_device and kwargs.get("device") is None:
            kwargs["device"] = dev  # factories without a device would allocate in host memory
        new_handles = 0
        tensors, poisoned, number, base = s.tensors, s.poisoned, s.number, s.handle_base
        for h in outputs:
            if h:
                if h >> HANDLE_BITS != number or h == base:
                    s.check_handle(h)  # raises
                if h not in tensors and h not in poisoned:
                    new_handles += 1
        if new_handles and len(tensors) + len(poisoned) + new_handles > s.max_handles:
            s.admit_handles(new_handles)  # raises
        if sig is _COMPUTE:
            sig = checks.signature(plan, args, kwargs)
        need = None
        if sig is not None:
            sig = (sig, s.quota, s.max_op_flops)  # the verdict of check_inputs and cost.check depends on these
            try:
                need = self._verdicts.get(sig)
            except TypeError:  # an unhashable value: the checks run every time
                sig = None
        if need is None:
            guards.check_enums(op, args, kwargs)
            if plan.layouts:  # no written tensor may overlap itself, nor one a kernel reads as contiguous memory
                guards.check_written(op, args, kwargs)  # (functions of strides: part of the verdict)
                guards.check_reads(op, args, kwargs)
            guards.check_inputs(args, kwargs, s.quota)
            guards.check_counts(op, [], args, kwargs)
            if plan.validate:  # value guards run before any kernel (even a meta kernel) reads the arguments
                guards.validate(op, args, kwargs, s.max_op_flops)
            cost.check(op, args, kwargs, s.max_op_flops)
            need = self.sizer.new_bytes(op, args, kwargs)
            if need != NO_META:
                need += cost.temporary(op, args, kwargs)  # what the kernel allocates besides (mvlgamma's p)
            if sig is not None and need != NO_META:
                self._keep_verdict(sig, need)
        elif plan.validate:  # the shape-only checks passed for this signature; the value guards run every time
            guards.validate(op, args, kwargs, s.max_op_flops)
        if need == NO_META:  # bounded from the real inputs, so its output cannot exhaust the host first
            need = sizing.no_meta_bound(op, args, kwargs)
        if need > 0:
            s.admit(need)
        used_before = s.used
        run = plan.run
        speed = self.speed if self.speed is not None and self.speed.active else None
        started = time.perf_counter() if speed is not None else 0.0
        out = self._call(s, plan, run, args, kwargs, written)
        if speed is not None:
            speed.hold_op(op, args, kwargs, out, started)
        s.ops += 1
        self.ledger.op(s)
        if plan.reshapes:  # an op that writes values only (`checks._keeps_meta`) leaves every storage as it was
            s.recount(written(), zero_growth=plan.grown)
        if plan.uninitialized:  # never hand out memory another session wrote and freed
            for t in _slots(out):
                if isinstance(t, torch.Tensor):
                    zero_made(t, plan.into_out)
        if len(outputs) == 1 and out.__class__ is _Tensor:  # the common case: one new handle, one tensor
            h = outputs[0]
            if (
                h
                and out.layout == _STRIDED
                and not out.is_quantized
                and not out.is_nested
                and out.dim() <= MAX_DIMS
                and h not in tensors
                and h not in poisoned
            ):
                s.bind_new(h, out)  # checked and admitted above
                bound: Sequence[int] = outputs
            else:
                bound = self._bind_outputs(s, outputs, out, dev)
        else:
            bound = self._bind_outputs(s, outputs, out, dev)
        if s.used > s.quota and s.used > used_before:
            _over_quota(s, bound)  # raises

    def _call(
        self,
        s: WorkerSession,
        plan: checks.OpPlan,
        run: Callable[..., Any],
        args: list[Any],
        kwargs: dict[str, Any],
        written: Callable[[], list[int]],
    ) -> Any:
        """Run one op's kernel (a random op on the session's generator), `written` its written handles.

        Round 34 (red34): torch's out= kernels resize their output before they check their arguments' values
        (`gather`, `take`, `index` with an index out of range): the failed op left its out= tensor grown, the new
        bytes unwritten - the allocator's old contents, under `--isolation thread` another session's freed data,
        downloadable - and uncounted (a 64 MiB quota held eight such tensors of 48 MiB at a `used` of 12 bytes).
        A failed op that may reshape has its written tensors recounted and their growth zeroed, as a resize_'s."""
        try:
            if plan.seeded:
                return self._seeded(s, run, args, kwargs)
            return run(*args, **kwargs) if kwargs else run(*args)
        except BaseException:
            if plan.reshapes:
                s.recount(written(), zero_growth=True)
            raise

    def _seeded(self, s: WorkerSession, op: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Run a random op on the session's own generator.

        In a session's worker process (`exclusive_rng`) the device's default generator holds the session's stream
        from its first random op on (`_RNG_OWNER`), and is loaded again only after `torch.manual_seed`: no
        state is copied per op. Where sessions share a process (`--isolation thread`) every random op swaps the
        session's state in and the process's own back out, so that nothing else drawing random numbers there
        ever moves a session's stream."""
        dev = s.device
        with dev.rng_lock:
            if self.exclusive_rng:
                ref = _RNG_OWNER.get(dev.rng_lock)
                if ref is None or ref() is not s:
                    if s.rng_state is None:
                        s.rng_state = dev.new_rng_state(secrets.randbits(62))
                    dev.set_rng_state(s.rng_state)
                    _RNG_OWNER[dev.rng_lock] = weakref.ref(s)
                return op(*args, **kwargs)
            saved = dev.get_rng_state()
            if s.rng_state is None:
                s.rng_state = dev.new_rng_state(secrets.randbits(62))
            dev.set_rng_state(s.rng_state)
            try:
                return op(*args, **kwargs)
            finally:
                s.rng_state = dev.get_rng_state()
                dev.set_rng_state(saved)

    def _seed(self, s: WorkerSession, seed: int) -> None:
        """`torch.manual_seed` of the session: its stream starts again (with `exclusive_rng`, the device's
        generator is loaded from it at the next random op)."""
        s.rng_state = s.device.new_rng_state(seed)
        with s.device.rng_lock:
            ref = _RNG_OWNER.get(s.device.rng_lock)
            if ref is not None and ref() is s:
                del _RNG_OWNER[s.device.rng_lock]

    def _rng_state(self, s: WorkerSession, cmd: device_pb2.RngState) -> None:
        """`get`: bind a copy of the session's generator state (the device's live one where the session holds it,
        `_seeded`) to a new handle; `set`: load a state from a handle's uint8 tensor, checked on a scratch generator
        of the device's kind first (torch refuses a state of another size or an out-of-range position)."""
        if protocol.FEATURE_RNG_STATE in guards.WITHHELD:
            raise InvalidArgument(f"this daemon withholds the {protocol.FEATURE_RNG_STATE} feature")
        if bool(cmd.get) == bool(cmd.set):
            raise InvalidArgument("RngState: name one handle, `get` or `set`")
        dev = s.device
        if cmd.get:
            with dev.rng_lock:
                ref = _RNG_OWNER.get(dev.rng_lock)
                if self.exclusive_rng and ref is not None and ref() is s:
                    state = dev.get_rng_state()
                else:
                    if s.rng_state is None:
                        s.rng_state = dev.new_rng_state(secrets.randbits(62))
                    state = s.rng_state.clone()
            self._bind_outputs(s, [cmd.get], state.to(dev.torch_device), dev.torch_device)
            return
        t = s.resolve(cmd.set)
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise InvalidArgument(f"RngState: a state is a 1-dim uint8 tensor, not {t.dtype} of shape {tuple(t.shape)}")
        state = t.detach().to("cpu", copy=True).contiguous()
        try:
            torch.Generator(device=dev.torch_device).set_state(state)
        except (RuntimeError, ValueError) as exc:
            raise InvalidArgument(f"RngState: not a generator state of this device: {exc}") from None
        s.rng_state = state
        with dev.rng_lock:  # loaded into the device's generator at the session's next random op
            ref = _RNG_OWNER.get(dev.rng_lock)
            if ref is not None and ref() is s:
                del _RNG_OWNER[dev.rng_lock]

    def _bind_outputs(self, s: WorkerSession, handles: Any, out: Any, dev: torch.device) -> list[int]:
        """Bind an op's returned values to its output handles (`_run_op` binds one new tensor itself)."""
        values = _slots(out)
        if len(handles) > len(values):
            raise InvalidArgument(f"{len(handles)} output handles given, the op returns {len(values)} values")
        pairs = []
        for h, value in zip(handles, values, strict=False):
            if not h or value is None:
                continue
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value, device=dev)
            if value.layout != torch.strided or value.is_quantized or value.is_nested:
                raise InvalidArgument(f"the op returns a {value.layout} tensor; only dense tensors live on the daemon")
            if value.dim() > MAX_DIMS:  # sizes and strides live in host RAM, outside the quota
                raise InvalidArgument(f"the op returns a tensor of {value.dim()} dimensions; at most {MAX_DIMS}")
            pairs.append((h, value))
        return s.bind_outputs(pairs)

    # ---- transfers ----

    def _upload(self, s: WorkerSession, up: device_pb2.Upload, data: memoryview | bytes | None = None) -> None:
        h = up.handle
        if data is None:
            data = up.data  # each access of a bytes field copies it
        if len(data) > wire.CHUNK_BYTES:
            raise InvalidArgument(f"upload chunk of {len(data)} bytes exceeds {wire.CHUNK_BYTES}")
        if up.offset == 0 and up.HasField("meta"):
            s.check_handle(h)
            meta = up.meta
            dtype = wire.dtype_from_proto(meta.dtype)
            shape = meta.shape[:]  # one C call: list() walks upb's container to an IndexError (~3k instr)
            if len(shape) > MAX_DIMS or (shape and min(shape) < 0):
                raise InvalidArgument(f"bad upload shape {shape}")
            if dtype is torch.bool:  # torch assumes 0 or 1 (the one-chunk and the chunked path alike)
                wire.check_bool_bytes(data)
            nbytes = math.prod(shape) * dtype.itemsize
            if not nbytes and shape and _sizes_overflow(shape):
                raise InvalidArgument(f"bad upload shape {shape}: its element count or strides overflow int64")
            s.admit(nbytes)  # before allocating: a forged 1 TB shape never allocates
            native = self.native
            if up.last and len(data) == nbytes and native is not None and s.device.fake:
                # The whole tensor in one chunk (every small upload): made and filled in one C call, bound only
                # once written (native_runner.cpp `filled`), never through `uploads`.
                s.rebind(h, native.filled(shape, dtype, data))
                self.ledger.transfer("upload", nbytes)
                return
            if s.device.fake:  # host memory: a kept storage of a freed upload where one fits (server/uploadpool.py)
                s.bind(h, s.upload_pool.take_upload(shape, dtype)[0])
            else:
                s.bind(h, torch.empty(shape, dtype=dtype, device=s.device.torch_device))
            s.uploads[h] = 0
        elif h not in s.uploads:
            s.check_handle(h)
            raise InvalidArgument(f"upload chunk for handle {h:#x} without a first chunk (offset 0 with meta)")
        elif s.tensors[h].dtype is torch.bool:  # a later chunk (the first was checked above)
            wire.check_bool_bytes(data)
        t = s.tensors[h]
        offset, total = s.uploads[h], t.numel() * t.element_size()
        if up.offset != offset or offset + len(data) > total:
            raise InvalidArgument(f"upload chunk at {up.offset}+{len(data)} does not follow {offset} of {total}")
        if data and t.device.type == "cpu":  # a plain memcpy: torch's copy_ splits 4 MiB over OpenMP threads,
            # which on a loaded host is 40x slower; fresh pages of a big one faulted in first, in one call
            if total >= prefault.MIN_BYTES:
                prefault.populate(t.data_ptr() + offset, len(data))
            wire.host_bytes(t)[offset : offset + len(data)] = data
        elif data:
            dst = wire.byte_view(t)[offset : offset + len(data)]
            if s.staging is None or not s.staging.copy(dst, data):  # CUDA: pinned, queued (server/staging.py)
                dst.copy_(torch.frombuffer(data, dtype=torch.uint8))
        self.ledger.transfer("upload", len(data))
        s.uploads[h] = offset + len(data)
        if up.last:
            del s.uploads[h]
            if offset + len(data) != total:
                raise InvalidArgument(f"upload ended at {offset + len(data)} of {total} bytes")

    def _get(
        self, s: WorkerSession, get: device_pb2.Get
    ) -> device_pb2.ServerFrame | list[bytes | protocol.Frame | SideChunk]:
        """Serialized chunk frames of the tensor's value, built now (so later ops cannot change them), each
        with one copy of the data: protobuf's own bytes fields would cost two more. With `piece_bytes` set
        (a session worker), at most that many bytes per call: `s.download` then holds the rest, and the same
        Get, run again first thing in the next slice, continues it (server/bulk.py).

        A Get is a sync point: with an error since the last sync it answers that error instead of the value
        (a failed in-place op leaves its tensor unpoisoned and unchanged: its value would be silently wrong)."""
        pending, s.download = s.download, None
        if pending is not None and pending[:2] == (get.request_id, get.handle):
            src, offset = pending[2], pending[3]
        elif s.error is not None:
            first, s.error = s.error, None
            return device_pb2.ServerFrame(request_id=get.request_id, error=s.error_proto(first))
        else:
            t = s.resolve(get.handle)
            # an expanded view: its copy would be a memory bomb (bounded by what the session holds where that is
            # more: a quota a refresh made smaller than it, round 52, leaves it what it holds)
            if t.numel() * t.element_size() > max(s.quota, s.used):
                raise ResourceExhausted(
                    f"download of {t.numel() * t.element_size()} bytes (an expanded view?) exceeds the session's "
                    f"{s.quota} byte quota"
                )
            # (a conjugate view, `aten::_conj`: its values, not the raw bytes of the tensor it views; until round
            # 36's review `x.conj()` downloaded as `x`)
            plain = t.device.type == "cpu" and t.is_contiguous() and not t.is_conj()
            src = t if plain else t.detach().cpu().resolve_conj().contiguous()
            offset = 0
        flat = wire.host_bytes(src)  # keeps no reference: `src` stays alive until the frames are built
        total = flat.nbytes
        stop = min(total, offset + self.piece_bytes) if self.piece_bytes else total
        head = device_pb2.ServerFrame(request_id=get.request_id).SerializeToString()
        frames: list[bytes | protocol.Frame | SideChunk] = []
        side = self.side_slot if get.bulk and self.piece_bytes else None
        while True:
            if offset >= stop and offset < total:
                s.download = (get.request_id, get.handle, src, offset)
                return frames
            n = min(wire.CHUNK_BYTES, total - offset)
            chunk = device_pb2.TensorChunk(offset=offset, last=offset + n >= total)
            if offset == 0:
                chunk.meta.CopyFrom(wire.meta_to_proto(src))
            if side is not None and n >= bulk.SIDE_MIN and self.side_used + n <= len(side):
                at = self.side_used  # one copy, into the slot the daemon sends from
                side[at : at + n] = flat[offset : offset + n]
                self.side_used += n
                meta = chunk.meta.SerializeToString() if offset == 0 else None
                frames.append(SideChunk(get.request_id, meta, offset, chunk.last, at, n))
            else:
                # A worker's frames stay views of `src` until its result copies them into the shared buffer
                # (slices.run_commands ends the slice after this Get, so no later op changes them first).
                frames.append(
                    protocol.chunk_frame(head, chunk, flat[offset : offset + n], src if self.piece_bytes else None)
                )
            self.ledger.transfer("download", n)
            offset += n
            if offset >= total:
                return frames

    def _sync(self, s: WorkerSession, sync: device_pb2.Sync) -> device_pb2.ServerFrame | bytes:
        """The answer to a Sync. Every `.item()` of a training loop runs this: float scalars (what `loss.item()`
        asks for) are answered with the frame's bytes built by hand (`protocol.sync_floats_reply`, the bytes
        protobuf writes, without a message object); other scalars and a pending error in a ServerFrame built in
        place (no SyncReply copied into its frame)."""
        values: list[Any] = []
        if s.error is None:
            floats = True
            for h in sync.scalar_handles:
                t = s.resolve(h)
                if t.numel() != 1:
                    raise InvalidArgument(f"scalar handle {h:#x} has {t.numel()} elements, not 1")
                v = t.item()
                floats = floats and v.__class__ is float
                values.append(v)
            if floats:
                return protocol.sync_floats_reply(sync.request_id, values)
        frame = device_pb2.ServerFrame(request_id=sync.request_id)
        reply = frame.sync
        reply.SetInParent()  # an empty SyncReply is an answer too
        if s.error is None:
            for v in values:
                if v.__class__ is float:
                    reply.values.add(f=v)
                else:
                    reply.values.append(wire.scalar_to_proto(v))
        else:
            reply.error.CopyFrom(s.error_proto(s.error))
            s.error = None
        return frame


_FREE = WorkerSession.free


def _enter(
    table: dict[int, str | checks.OpPlan], learned: templates.Table, known: runs.Runs, op_id: int, name: str
) -> None:
    """A compact record's definition: op id -> name in the session's table."""
    if op_id in table:  # defined anew: its templates and the runs holding them were learned for the old name
        learned.drop(op_id)
        known.clear()
    table[op_id] = name


def _over_quota(s: WorkerSession, bound: Sequence[int]) -> None:
    """An op's outputs took the session past its quota: unbind them and raise, naming the use the op would have
    made (read before the rollback: after it, `s.used` is back under the limit)."""
    would = s.used
    for h in bound:
        s.unbind(h)
    raise ResourceExhausted(
        f"memory quota exceeded: {would} bytes would be used of a {s.quota} byte limit",
        used_bytes=would,
        limit_bytes=s.quota,
    )


def _dense(out: torch.Tensor) -> bool:
    """Whether `_run_op` binds this returned tensor itself (else `_bind_outputs` checks it)."""
    return out.layout == _STRIDED and not out.is_quantized and not out.is_nested and out.dim() <= MAX_DIMS


# The unary ops whose CPU kernels call MKL's vector math library (ATen's `vml::v<op>`, UnaryOpsKernel.cpp), each
# with its own function per dtype.
VECTOR_MATH_OPS = (
    "acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "expm1", "lgamma", "log", "log10", "log1p",
    "log2", "sin", "sqrt", "tan", "tanh",
)  # fmt: skip


def warm_vector_math() -> None:
    """Call each MKL vector math function once, on one thread, before a worker forks from this process.

    The first call of such a function in a process is not safe on several threads at once (MKL sets the function
    up lazily; seen in round 21's flaky bit-for-bit encoder test): a float32 `sqrt` of 3200 elements (an embedding's
    Adam state, above ATen's grain of 2048 for these kernels) runs on two OpenMP threads, and now and then, in a fresh
    session worker where it was the first `sqrt`, the second thread's half came out ~3e-4 off (about 12 good bits),
    where every later call gives the same bits. One-element tensors never take the parallel path (a zygote must not
    start OpenMP's threads before it forks), and a forked worker inherits what these calls set up."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in VECTOR_MATH_OPS:
            getattr(torch, name)(x)


def _key_bytes(sig: Any) -> int:
    """The host memory a verdict's signature holds, estimated: 40 bytes a member of its tuples, nested (a meta's
    sizes and strides, an int list's values: a pointer and, mostly, an object each), and the template a record
    template's signature keeps alive (`Template.nbytes`). Walked once per signature cached (after the checks,
    which read every one of them)."""
    n, extra = 0, 0
    todo = [sig]
    while todo:
        v = todo.pop()
        n += len(v)
        for e in v:
            if isinstance(e, tuple):
                todo.append(e)
            elif e.__class__ is templates.Template:
                extra += e.nbytes
    return 128 + 40 * n + extra


def _slots(out: Any) -> list[Any]:
    """Returned values, one per output handle: tuples and Tensor[] lists flattened."""
    if isinstance(out, tuple | list):
        return [v for item in out for v in (item if isinstance(item, list | tuple) else [item])]
    return [out]


def _sizes_overflow(shape: list[int]) -> bool:
    """Whether a shape of no element (a zero among its sizes) overflows int64 on the way: its element count
    multiplied out left to right (the runner's `filled` refuses it: "a bad size") or its contiguous strides
    (torch's `empty`: "Stride calculation overflowed"; its count in uint64: "Storage size calculation overflowed").
    `_upload` refuses such a shape itself: until round 41 the runner on and off refused it in different words, and
    some ([2**62, 2, 0]) only with the runner on (scripts/fuzz_native.py). A shape with elements meets `admit`."""
    n = 1
    for d in shape:
        n *= d
        if n >= 1 << 63:
            return True
    stride = 1
    for d in reversed(shape[1:]):
        stride *= max(d, 1)
        if stride >= 1 << 63:
            return True
    return False


def _first_lines(exc: BaseException, limit: int = 600) -> str:
    """`exc`'s words for the client, without a C++ backtrace (audit55: torch's argument parser's c10 errors carry one,
    e.g. a graph input's metadata of more than 2^63 bytes: its frames named the worker's library paths and addresses,
    which tell a tenant where the daemon's code lies in memory under --isolation thread)."""
    text = str(exc).strip() or type(exc).__name__
    return text.split("\nException raised from ", 1)[0].split("\nframe #", 1)[0][:limit]
