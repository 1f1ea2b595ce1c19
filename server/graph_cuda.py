"""A captured step as a torch.cuda.CUDAGraph (real GPUs only): the whole step one graph launch per run.

graph.py runs a graph on a CUDA device eagerly twice (lazy kernel and library set-up), then captures it here once
and replays the capture from then on. What may become a CUDA graph (`refusal`, decided once per graph, logged once
when refused):

- random ops, in a session's own worker process (`exclusive_rng`, the default process isolation): there the device's
  default generator holds the session's stream (executor.py `_seeded`, `_RNG_OWNER`), and torch registers the default
  CUDA generator with every capture: a capture records each random kernel's philox offset relative to the generator's
  offset at launch (and moves nothing), and each replay first reads the generator's seed and offset into the graph,
  then advances the offset by the whole graph's increment (CUDAGeneratorImpl.h, "CUDA Graph-safe RNG states"). So a
  replay draws exactly the numbers the same ops draw eagerly from the same state, fresh ones every replay, and
  `torch.manual_seed` between replays starts the stream again as it does for eager ops: the session's stream is
  loaded into the generator (in place: the state object the graph registered) before the capture and before every
  replay (`host._seeded`, as graph_trace's Traced does). A worker serves one session, so no other session's ops move
  that generator between replays. Where sessions share a process (`--isolation thread`) every random op swaps
  generator states in and out, which cannot run under a capture: such graphs stay eager;
- fused attention calls with dropout only as a CUDA device's graph defines them (server/attention.py `KEPT`): the
  forward draws its mask from the default generator like any random op and keeps its softmax and mask in its
  `philox_seed`'s storage (counted in the graph's memory plan), the backward reads them there. The dropout
  composition proper -- its forward reads the generator's state on the host, its backward builds a private
  generator from a state kept in a tensor (a host sync) -- is refused before any capture, by its calls: a backward
  whose philox_seed no forward of the same graph kept (one from outside the step);
- value guards (`Call.check`: Python that reads tensor values, e.g. an embedding backward's index range) only where
  every value they read is the run's own input or a persistent tensor no op of the graph writes (`Graph.written`):
  those guards run before each replay on those tensors (`PreGuards`), with the dry run's meta tensors for the
  arguments they read only the shapes of; a guard that reads a value the step computes keeps the graph eager.

A capture that fails anyway (an op that syncs, a kernel the capture refuses) leaves the device as it was: the
capture ended, the session's stream back, its generator where it stood; the graph stays eager from then on.
(No GPU was at hand when this was written: bench/real_gpu.sh's `cudagraph` stage is its check.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from gpupool import wire
from gpupool.errors import GpupoolError, InvalidArgument

from . import attention, guards, staging
from .graph_build import STEP_ERRORS, Graph, Host, step_error
from .sessions import WorkerSession

log = logging.getLogger(__name__)

Execute = Callable[..., None]  # graph.execute(g, slots, plan=None)


def _nothing() -> None:
    return None


def _keep(capture: Graph | None) -> None:
    """`run`'s `hold` where nothing counts graphs' memory (tests of the capture alone)."""


# ---- what may become a CUDA graph ----


def refusal(host: Host, g: Graph) -> str | None:
    """Why `g` must keep the eager replay on a CUDA device for good (None: it may be captured; its value guards are
    `pre_guards`' business)."""
    seeded = False
    kept: set[int] = set()  # the slots of the philox_seeds `attention.KEPT` forwards return: their kept scores
    for c in g.calls:
        if c.kernel == attention.KEPT and len(c.outs) > 6 and c.outs[6]:
            kept.add(c.outs[6])
        elif c.kernel == attention.DROPOUT:
            backward = host.ops.resolve(c.name)._schema.name == attention.BACKWARD
            if not backward or _source(c, 14, "philox_seed") not in kept:
                return (
                    f"{c.name} with dropout reads and sets generator states on the host (the fused attention's "
                    "dropout composition, where no forward of the step kept its scores), which a capture cannot hold"
                )
        seeded = seeded or c.seeded
    if seeded and not getattr(host, "exclusive_rng", False):
        return "it draws random numbers and sessions share this process (each random op swaps generator states)"
    return None


class PreGuards:
    """A graph's value guards, run before a replay on the run's own input and persistent tensors (`pre_guards`)."""

    __slots__ = ("graph_id", "items")

    def __init__(self, graph_id: int, items: list[tuple[int, str, Any, list[Any], dict[str, Any], list[Any]]]) -> None:
        self.graph_id = graph_id
        # per guarded call: (its index, its name, its check, its argument template, keyword template, the picks:
        # (True, position, slot) or (False, name, slot): the real tensors put in before the check)
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def run(self, slots: list[Any], sent: dict[int, torch.Tensor] | None = None) -> None:
        """Each guard on the run's tensors (`slots`: inputs and persistent ones filled; `sent`: inputs sent by value
        as they came, on the CPU, read there instead: the same values, and no wait for the device); raises what the
        guard raises, named as graph.execute names it."""
        for i, name, check, template, ktemplate, picks in self.items:
            args, kwargs = list(template), dict(ktemplate)
            for positional, key, slot in picks:
                t = slots[slot] if sent is None or slot not in sent else sent[slot]
                if positional:
                    args[key] = t
                else:
                    kwargs[key] = t
            try:
                check(args, kwargs)
            except (GpupoolError, *STEP_ERRORS) as exc:
                raise step_error(self.graph_id, i, name, exc) from None

    def aliased(self, g: Graph, slots: list[Any]) -> str | None:
        """Why these guards may not run before the replays of a capture made with `slots` (None: they may): a
        persistent tensor a guard reads shares its storage with one the step writes. `Graph.written` is what the
        definition saw, when the handles named the tensors they named then; a handle may name a view of another
        persistent tensor since (an eager `alias`, `set_`), and then the step writes what the guard read before it
        ran. The capture's replays keep every persistent tensor's storage where it was at the capture (`places`),
        so what shares a storage now shares it at every replay, and what does not never does. (The inputs are
        copied into the capture's own tensors: nothing of the step writes them but through their own slots.)"""
        n_inputs = len(g.input_meta)
        written = {slots[slot].untyped_storage()._cdata for slot in g.written if slot > n_inputs}
        for i, name, _, _, _, picks in self.items:
            for _, _, slot in picks:
                if slot > n_inputs and slots[slot].untyped_storage()._cdata in written:
                    return (
                        f"the value guard of {name} (op {i}) reads slot {slot}, a persistent tensor whose storage the "
                        "step writes through another persistent tensor"
                    )
        return None


def places(g: Graph, slots: list[Any]) -> list[tuple[int, int, int]]:
    """Where each persistent tensor of a run lies: its first byte's address and its storage's (address, bytes). A
    capture's kernels hold the addresses the persistent tensors and the views the step makes of them had at the
    capture, anywhere in their storages (a view may reach past the tensor it was made of: `as_strided`, a storage
    two persistent tensors shared at the definition); a replay is safe only where every one of those bytes still
    belongs to the same tensor's storage. The first byte's address alone (until round 30's review) let a handle
    name a tensor at that address in a smaller storage (a fresh allocation where the old storage's start was), and
    the replay then read and wrote memory the allocator had handed to something else since."""
    out = []
    for slot, _, _ in g.externals:
        t = slots[slot]
        storage = t.untyped_storage()
        out.append((t.data_ptr(), storage.data_ptr(), storage.nbytes()))
    return out


def pre_guards(host: Host, g: Graph) -> tuple[PreGuards, None] | tuple[None, str]:
    """(the guards that run before each replay, None), or (None, why the graph's guards cannot run that way)."""
    n_inputs = len(g.input_meta)
    fixed = {slot for slot, _, _ in g.externals} | set(range(1, n_inputs + 1))
    items: list[tuple[int, str, Any, list[Any], dict[str, Any], list[Any]]] = []
    for i, c in enumerate(g.calls):
        if c.check is None:
            continue
        schema = host.ops.resolve(c.name)._schema.name
        reads = guards.VALUE_READS.get(schema)
        if reads is None or c.guard_meta is None:
            return None, f"{c.name} has a value guard that cannot run before the replay"
        template, ktemplate = list(c.guard_meta[0]), dict(c.guard_meta[1])
        picks: list[Any] = []
        for pos, name in reads:
            source = _source(c, pos, name)
            if source is _LIST:
                return None, f"the value guard of {c.name} reads a list of tensors"
            if source is _CONSTANT:  # given in the op itself: the real value, as the op gets it
                if pos < len(template):
                    template[pos] = c.args[pos]
                elif name in c.kwargs:
                    ktemplate[name] = c.kwargs[name]
                continue
            assert isinstance(source, int)
            if source not in fixed:
                return None, f"the value guard of {c.name} (op {i}) reads slot {source}, which the step computes"
            if source in g.written:
                return None, f"the value guard of {c.name} (op {i}) reads slot {source}, which an op of the step writes"
            picks.append((True, pos, source) if pos < len(template) else (False, name, source))
        items.append((i, c.name, c.check, template, ktemplate, picks))
    return PreGuards(g.graph_id, items), None


_LIST = object()
_CONSTANT = object()


def _source(c: Any, pos: int, name: str) -> Any:
    """Where argument (`pos`, `name`) of call `c` comes from, as `opargs.arg` finds it in the arguments graph.execute
    hands the guard: a slot, `_LIST` (a list holding slots) or `_CONSTANT` (the op's own value, or absent)."""
    if pos < len(c.args):
        for at, slot in c.fill:
            if at == pos:
                return slot
        if any(at == pos for at, _ in c.fill_lists):
            return _LIST
        return _CONSTANT
    for key, ref in c.kfill:
        if key == name:
            return ref if isinstance(ref, int) else _LIST
    return _CONSTANT


def unguarded_plan(g: Graph) -> list[Any]:
    """g.plan without its value guards (they run before each replay instead: `PreGuards`)."""
    plan = []
    for step in g.plan:
        if step[7] is not None:
            step = (*step[:7], None, *step[8:])
        plan.append(step)
    return plan


# ---- capture and replay ----


class CudaGraph:
    """A torch.cuda.CUDAGraph of the whole step, with static copies of the inputs.

    Valid only while the persistent tensors keep their places (`places`: `run` says False otherwise, the eager path
    from then on).
    """

    def __init__(self, host: Host, s: WorkerSession, g: Graph, slots: list[Any], execute: Execute,
                 checks: PreGuards) -> None:  # fmt: skip
        self.checks = checks if len(checks) else None
        why = self.checks.aliased(g, slots) if self.checks is not None else None
        if why is not None:
            raise InvalidArgument(why)  # run() keeps the eager replay, which runs each guard at its op
        self.places = places(g, slots)
        self.n_inputs = len(g.input_meta)
        self.static = list(slots)
        for i in range(1, self.n_inputs + 1):
            self.static[i] = slots[i].clone()
        self.seeded = any(c.seeded for c in g.calls)
        self.kept = sorted(set(g.outputs) | set(g.writes.values()))
        # A replay launches on the current device's stream: the graph's own device made current where it is not
        self.device = g.device if torch.cuda.current_device() != (g.device.index or 0) else None
        plan = unguarded_plan(g) if self.checks is not None else None
        # No warm-up run: the graph ran eagerly twice already (lazy kernel and library set-up is done), and a
        # warm-up would apply the step twice. Capture records kernels without running them; run() replays.
        self.graph = capture(host, s, g.device, lambda: execute(g, self.static, plan), self.seeded)

    def run(self, host: Host, s: WorkerSession, g: Graph, slots: list[Any], sent: dict[int, Any] | None) -> bool:
        if places(g, slots) != self.places:
            return False
        if self.checks is not None:
            self.checks.run(slots, sent)  # before anything of the step runs, as eagerly before its op
        pinned = s.staging
        for i in range(1, self.n_inputs + 1):
            src = slots[i]
            # an input sent by value (graph._run leaves it on the CPU here): straight into the capture's input,
            # queued from pinned memory (server/staging.py), no device tensor of its own; else torch's copy
            if src.device.type != "cpu" or pinned is None or not pinned.copy(self.static[i], wire.host_bytes(src)):
                self.static[i].copy_(src)
        if self.seeded:
            host._seeded(s, _nothing, [], {})  # the device's generator holds this session's stream
        if self.device is None:
            self.graph.replay()
        else:
            with torch.cuda.device(self.device):
                self.graph.replay()
        for slot in self.kept:  # outputs get fresh handles: copies, since the next replay overwrites these
            slots[slot] = self.static[slot].clone()
        return True


# The capture's cudaStreamCaptureMode: "thread_local" checks only the capturing thread's own calls, as torch's own
# CUDA graph trees capture. Under torch's default, "global", every call CUDA deems unsafe during a capture (an
# allocation, a synchronous copy, an event query) fails in every other thread of the process meanwhile. Where
# sessions share the daemon's process (--isolation thread) the host's other devices' threads and other sessions'
# collective threads make such calls at any time: another tenant's op or collective would fail for this session's
# capture. In a worker the session's collective group has threads of its own (its formation goes on while the
# session runs; an NCCL group's watchdog). Their work is on other streams (the capture's is a non-blocking one of
# torch's pool), so nothing of theirs joins the capture.
CAPTURE_MODE = "thread_local"


def capture(host: Host, s: WorkerSession, device: torch.device, body: Callable[[], None], seeded: bool) -> Any:
    """A torch.cuda.CUDAGraph of `body`'s kernels on `device`. A failure leaves no capture under way, the stream
    that was current current again and the generator's state as it was (a capture moves no generator: restored all
    the same), then raises."""
    if seeded:
        host._seeded(s, _nothing, [], {})  # the session's stream in the device's generator, before the capture
    rng = torch.cuda.get_rng_state(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device):
        before = torch.cuda.current_stream(device)
        try:
            with torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE):
                body()
        except BaseException:
            _abandon(graph, before, device, rng)
            raise
    return graph


def _abandon(graph: Any, before: Any, device: torch.device, rng: torch.Tensor) -> None:
    """After a failed capture: torch.cuda.graph's exit ends the capture, but when that raises (an invalidated capture)
    it neither restores the current stream nor stops routing allocations to the graph's pool."""
    if torch.cuda.current_stream(device) != before:
        if torch.cuda.is_current_stream_capturing():
            with contextlib.suppress(RuntimeError):
                graph.capture_end()
        with contextlib.suppress(RuntimeError):  # raises when capture_end got that far itself
            torch._C._cuda_endAllocateToPool(device.index or 0, graph.pool())
        torch.cuda.set_stream(before)
    _release_generator(device)
    with contextlib.suppress(RuntimeError):
        torch.cuda.set_rng_state(rng, device)


def _release_generator(device: torch.device) -> None:
    """Take the device's default generator out of capture mode after a failed capture. Every capture registers that
    generator and sets its state "capturing" (CUDAGeneratorState::capture_prologue); only a `capture_end` that gets
    past cudaStreamEndCapture clears it (capture_epilogue). Where the capture was invalidated (a sync, an unsafe call
    under it) `capture_end` raises first, and in torch before 2.13 (one capture flag per generator state: the device
    host runs 2.11) the flag stays set: every later random op on that device in the process -- the session's next
    eager dropout -- failed with "Offset increment outside graph capture encountered unexpectedly" (the round 31
    device run). A throwaway capture of one kernel runs prologue and epilogue again and clears it (torch 2.13's
    per-capture states need nothing: harmless there). A failure here is logged, not raised: the capture failed
    already and the session goes on eagerly."""
    try:
        scratch = torch.zeros(1, device=device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE):
            scratch.add_(1)
        del graph
    except Exception as exc:  # noqa: BLE001 - the session goes on eagerly; its random ops may fail (logged)
        log.warning("after a failed CUDA graph capture the device's generator may still be capturing: %s", exc)


def verdict(host: Host, g: Graph) -> tuple[PreGuards, None] | tuple[None, str]:
    """Whether a CUDA graph may hold `g` (decided at its definition, on any device): (its value guards to run before
    each replay, None) or (None, why not)."""
    why = refusal(host, g)
    return (None, why) if why is not None else pre_guards(host, g)


def describe(decided: tuple[Any, str | None]) -> str:
    """`verdict`'s answer in words (the log line of a graph's definition)."""
    checks, why = decided
    if checks is None:
        return f"no CUDA graph: {why}"
    return f"a CUDA graph may hold it ({len(checks)} value guards before each replay)"


def run(host: Host, s: WorkerSession, g: Graph, slots: list[Any], execute: Execute,
        sent: dict[int, torch.Tensor] | None = None, hold: Callable[[Graph | None], None] = _keep) -> None:  # fmt: skip
    """A run of `g` on its CUDA device: the capture's replay; the first time, the capture where the graph's verdict
    allows it. `sent`: the inputs sent by value, on the CPU (`PreGuards.run`). `hold(g)`: count `g`'s capture's
    memory in the session's (ResourceExhausted past its quota: no capture), `hold(None)`: count its graphs as they
    are (graph.py `GraphTable._reserve`)."""
    if g.cuda is None:
        checks, why = g.cuda_verdict
        if checks is None:
            g.cuda_failed = True
            log.info("session %d: graph %d stays eager on CUDA: %s", s.number, g.graph_id, why)
            execute(g, slots)
            return
        try:
            hold(g)  # its private pool holds its peak for as long as the capture lives
        except GpupoolError as exc:
            log.info("session %d: graph %d stays eager on CUDA: %s", s.number, g.graph_id, exc.message)
            g.cuda_failed = True
            execute(g, slots)
            return
        try:
            g.cuda = CudaGraph(host, s, g, slots, execute, checks)
        except Exception as exc:  # capture is an optimisation: any refusal keeps the eager path
            log.info("session %d: graph %d stays eager on CUDA: the capture failed: %s", s.number, g.graph_id, exc)
            g.cuda_failed = True
            hold(None)
            execute(g, slots)
            return
        log.info(
            "session %d: graph %d captured as a CUDA graph (%d value guards run before each replay%s)",
            s.number,
            g.graph_id,
            len(checks),
            ", random ops on the session's stream" if g.cuda.seeded else "",
        )
    if not g.cuda.run(host, s, g, slots, sent):
        g.cuda, g.cuda_failed = None, True
        hold(None)
        on_device(s, g, slots)
        execute(g, slots)


def on_device(s: WorkerSession, g: Graph, slots: list[Any]) -> None:
    """The inputs sent by value that graph._run left on the CPU for a capture's replay (`CudaGraph.run`) onto
    the graph's device, for the eager replay instead."""
    for i in range(1, len(g.input_meta) + 1):
        t = slots[i]
        if t is not None and t.device.type == "cpu":
            slots[i] = staging.onto(s.staging, t, g.device)
