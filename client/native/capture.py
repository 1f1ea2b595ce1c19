"""Step capture on the C++ client (`gpupool.torch.capture` under `gpupool run --native-client`).

The same contract as the Python client's (client/torch/capture.py, whose docstring is the reference): call 1 runs
eagerly; calls 2 and 3 run eagerly while the calling thread's commands to the device are recorded, the two recordings
must agree (else `CaptureError` names the op and argument that changed); then the graph is defined on the daemon
(DefineGraph) and every later call with the same guard key (client/capture_guard.py: argument shapes and values,
module training flags, optimizer settings, the plain Python values the step reads) is one RunGraph command.

How it records: native_client.cpp keeps a tape of the commands the recording thread writes into the device's frame
(`record_start` / `record_stop`: the compact eager records, the Python fallback's `Op`s, uploads, and every Free)
while they go out as always; the records of a recording name views by view handle (an `as_strided` record, its
handle the recording's own and freed at its end), since a graph names tensors by slot. `record_stop` hands the tape
over; `_decode` turns it into the shared `Recording` (client/capture_record.py), from which `build` makes the
DefineGraph as for the Python client. Tensors a graph binds by identity, and the tensors it leaves behind, are
watched in C++ (`watch`): a Free of one is seen at the next call (`fired`, or `replay`, which then writes nothing),
which re-records the step (a persistent tensor was dropped or replaced) or stops writing the handle.

A replay is one RunGraph appended to the device's frame (in order with its eager records; the frame goes out every
HOLD_STEPS replays, or as any frame does: every $GPUPOOL_FLUSH_OPS commands, or at a sync); its outputs are new device
tensors bound to fresh handles. After the guard key (Python), it is one call of native_client.cpp's `replay` (round
44: it had been six torch.ops calls, `fired`, `current_device`, `new_output`, `adopt` twice and `append_command`, and
the command built with protobuf in Python): it checks the arguments' devices (a graph recorded with no device tensor
argument runs on the device that was current then: another current device drops it and records anew), writes the
RunGraph (CPU arguments by value, up to BY_VALUE_BYTES together; above, Python uploads them and calls again) and
returns the outputs, their handles the daemon's from then on.
Inside a recording, syncs (`.item()`, `.cpu()`, `synchronize`), `torch.manual_seed`, `resize_`/`set_` and ops on
another device raise CaptureError (native_client.cpp's own checks, RuntimeErrors, too); uploads over 4 MiB inside a
step are refused.
The graph cache and the rule from recordings to a graph are the Python client's (client/capture_step.py). Not here
(yet): the Python client's frames of 4, 8, then 16 steps, sent by a 1 ms timer when steps stop coming.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from gpupool.client.capture_record import Built, CaptureError, Recording, build
from gpupool.client.capture_step import MAX_GRAPHS, NOT_AS_RECORDED, StepCache
from torch.utils._pytree import tree_flatten, tree_unflatten

from gpupool import compact, wire
from gpupool._proto import device_pb2, tensor_pb2

from . import backend

log = logging.getLogger("gpupool.torch")
_graph_ids = itertools.count(1)
# CPU arguments up to this size (together) travel inside the RunGraph command (native_client.cpp: kByValueBytes)
BY_VALUE_BYTES = 256 * 1024
# Replays go out HOLD_STEPS to a frame at the most (client/torch/capture.py's first frame after a pause), so that the
# daemon starts on them while the client goes on; a sync or a full frame sends them sooner. native_client.cpp's
# kHoldSteps, which counts them (per device).
HOLD_STEPS = 4


def _ops() -> Any:
    return torch.ops.gpupool_native


def _on_device(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == backend.NAME


def _is_cpu_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cpu"


@dataclass
class _Graph:
    index: int
    graph_id: int
    key: Any
    outputs: list[int]  # the returned leaves that are device tensors (new ones per replay), by index
    spec: Any
    leaves: list[Any]
    consts: list[torch.Tensor]
    built: Built
    valid: bool = True
    why: str = ""
    drop_writes: list[int] = field(default_factory=list)
    watching: list[int] = field(default_factory=list)
    ops: int = 0  # aten ops it runs per step
    tensors: list[int] | None = None  # the arguments' leaves that are tensors, by index (None: all of them)
    current: bool = False  # the call names no device (no device tensor argument): it runs on the current device
    single: bool = False  # the step returns one tensor (no pytree to rebuild per replay)
    cleared: list[Any] = field(default_factory=list)  # parameters whose `.grad` a replay sets to None (`_cleared`)


class _Device:
    """What capture keeps per device: the handles defined graphs watch (handle -> [(graph, persistent?)])."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.device = torch.device(backend.NAME, index)
        self.watched: dict[int, list[tuple[_Graph, bool]]] = {}

    def poll(self, fired: list[int] | None = None) -> None:
        """Graphs hear of the watched handles freed since the last call (`fired`: as `replay` returned them)."""
        if not self.watched:
            return
        for h in _ops().fired(self.index) if fired is None else fired:
            for g, persistent in self.watched.pop(h, ()):
                if not persistent:
                    g.drop_writes.append(h)
                elif g.valid:
                    g.valid, g.why = False, f"a tensor it binds by identity ({h:#x}) was dropped or replaced"

    def watch(self, g: _Graph) -> None:
        fresh = []
        for h, persistent in [(h, True) for h in g.built.persistent] + [(h, False) for h in g.built.writes]:
            if h not in self.watched:
                fresh.append(h)
            self.watched.setdefault(h, []).append((g, persistent))
            g.watching.append(h)
        if fresh:
            _ops().watch(self.index, fresh, True)

    def unwatch(self, g: _Graph) -> None:
        gone = []
        for h in g.watching:
            entries = self.watched.get(h)
            if entries is None:
                continue
            entries[:] = [e for e in entries if e[0] is not g]
            if not entries:
                del self.watched[h]
                gone.append(h)
        if gone:
            _ops().watch(self.index, gone, False)


_devices: dict[int, _Device] = {}


def _device(index: int) -> _Device:
    d = _devices.get(index)
    if d is None:
        d = _devices[index] = _Device(index)
    return d


class CapturedStep(StepCache):
    """The callable `capture(fn)` returns on the C++ client: one graph per guard key (client/capture_step.py, as the
    Python client's). `stats` counts eager, recorded and replayed calls and graphs defined."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._busy.acquire(False):  # one call at a time (`StepCache._busy`)
            raise CaptureError(self._busy_why())
        try:
            leaves, spec, structure = self._structure(args, kwargs)
            key, g = self._lookup(structure, leaves)
            while g is not None:  # `_replay` hears of the watched handles freed meanwhile (dev.poll's) before it runs
                out = self._replay(g, leaves)
                if out is not _AGAIN:
                    return out
                g = self._valid_graph(key)
            dev = _device(self._index(leaves))
            dev.poll()
            g = self._graph_for(key, dev.device)  # None: an invalid graph is forgotten (and said), a new key is said
            leaves = [x.to(dev.device) if _is_cpu_tensor(x) else x for x in leaves]
            args, kwargs = tree_unflatten(leaves, spec)
            if self._eager_now():
                return self.fn(*args, **kwargs)
            return self._record(dev, key, leaves, args, kwargs)
        finally:
            self._busy.release()

    def _index(self, leaves: list[Any]) -> int:
        found = {int(x.device.index) for x in leaves if _on_device(x)}
        if len(found) > 1:
            raise CaptureError("the arguments of a captured step are on more than one gpupool device")
        if found:
            return found.pop()
        index = self._fixed_index()
        return int(_ops().current_device()) if index is None else index

    def _fixed_index(self) -> int | None:
        """The device of `capture(device=)` when it names an index, else None (the current device's)."""
        if self.device is not None and torch.device(self.device).index is not None:
            return int(torch.device(self.device).index)  # type: ignore[arg-type]
        return None

    # ---- recording ----

    def _record(self, dev: _Device, key: Any, leaves: list[Any], args: Any, kwargs: Any) -> Any:
        ops = _ops()
        handles = {id(x): int(ops.wire_handle(x)) for x in leaves if _on_device(x)}
        self._note_grads()
        ops.record_start(dev.index)
        backend.RECORDING.on = True  # syncs refuse (backend.py)
        try:
            result = self.fn(*args, **kwargs)
            for x in tree_flatten(result)[0]:
                if _on_device(x):
                    handles[id(x)] = int(ops.wire_handle(x))
        except RuntimeError as exc:
            first = str(exc).split("\n", 1)[0]
            if not isinstance(exc, CaptureError) and any(says in first for says in _REFUSED_IN_CPP):
                raise CaptureError(first) from None  # native_client.cpp's refusals, as the Python client's class
            raise
        finally:
            backend.RECORDING.on = False
            tape = ops.record_stop(dev.index)
        self.stats["recorded"] += 1
        rec = Recording(dev)
        _decode(tape.numpy().tobytes(), rec)
        built = build(rec, leaves, result, lambda x: handles.get(id(x)) if _on_device(x) else None)
        return self._settle(dev, key, built, result)

    def _define(self, dev: _Device, key: Any, built: Built, result: Any) -> None:
        self._make_room()
        ops = _ops()
        consts = [t.to(dev.device) for t in built.consts]  # kept by the graph: persistent inputs
        graph_id = next(_graph_ids)
        msg = built.message(graph_id, [int(ops.wire_handle(c)) for c in consts])
        backend.flush()  # the eager records before it (the tensors it binds) go first
        backend.session(dev.index).define_graph(msg)
        out_leaves, spec = tree_flatten(result)
        outputs = [i for i, x in enumerate(out_leaves) if _on_device(x)]
        params = self.kept_params()  # (their `.grad`s: `move_kept`, `regrad`)
        fresh = [p for p in params if id(p) in self._no_grad]
        ops.replay_outputs(dev.index, graph_id, [out_leaves[i] for i in outputs], list(built.writes), params, fresh)
        plain = [None if _on_device(x) else x for x in out_leaves]
        # The call's arguments as its guard key has them (client/capture_guard.py leaf_key): a tensor's key starts
        # with "cpu" or its device, any other value's with "value"
        kinds = [k[0] for k in key[1]]
        tensors = [i for i, kind in enumerate(kinds) if kind != "value"]
        g = _Graph(dev.index, graph_id, key, outputs, spec, plain, consts, built, ops=len(msg.ops),
                   tensors=None if len(tensors) == len(kinds) else tensors,
                   current=self._fixed_index() is None and not any(isinstance(k, torch.device) for k in kinds),
                   single=spec.is_leaf() and bool(outputs))  # fmt: skip
        g.cleared = self._cleared()
        dev.watch(g)
        self.graphs[key] = g
        self.stats["defined"] += 1
        log.log(
            self._level("defined"),  # (the first at INFO)
            "%s: graph %d defined for %s: %d ops, %d inputs, %d persistent tensors",
            dev.device, graph_id, self.name, len(msg.ops), msg.inputs, len(msg.persistent),
        )  # fmt: skip

    def _release(self, g: _Graph, drop: bool) -> None:
        _device(g.index).unwatch(g)
        _ops().replay_forget(g.index, g.graph_id)
        if drop:
            backend.flush()
            backend.session(g.index).drop_graph(g.graph_id)

    # ---- replay ----

    def _replay(self, g: _Graph, leaves: list[Any]) -> Any:
        """One RunGraph of `g` with these arguments: native_client.cpp `replay` checks their devices, writes the
        command (CPU arguments by value) and makes the outputs (fresh handles) in one call; the frame goes out every
        HOLD_STEPS replays. _AGAIN where it did not run: the graph is no longer valid (a tensor it binds went away,
        or the current device changed: it is dropped), the caller looks again."""
        inputs = leaves if g.tensors is None else [leaves[i] for i in g.tensors]
        while True:
            made, why = _ops().replay(g.index, g.graph_id, g.current, inputs, g.drop_writes)
            if not why:
                break
            if why[0] == _TOO_BIG:  # uploads of the CPU arguments, alive until the run is queued
                inputs = [x.to(_device(g.index).device) if _is_cpu_tensor(x) else x for x in inputs]
            elif why[0] == _ELSEWHERE:  # recorded on the then current device: recorded anew on this one
                log.info("%s: graph %d dropped: the current device changed", _device(g.index).device, g.graph_id)
                self._forget(g.key, drop=True)
                return _AGAIN
            elif why[0] == _NOT_AS_RECORDED:  # a parameter's `.grad` the step would add to (client/torch/capture.py)
                log.info("%s: graph %d re-recorded: %s", _device(g.index).device, g.graph_id, NOT_AS_RECORDED)
                self.stats["rerecorded"] += 1
                self._forget(g.key, drop=True)
                return _AGAIN
            else:  # watched handles freed: the graph may no longer be valid, or stops writing some
                _device(g.index).poll(why)
                if not g.valid:
                    return _AGAIN
        if g.drop_writes:
            g.drop_writes.clear()  # sent with this run
        self.stats["replayed"] += 1
        for ref in g.cleared:  # (usual: none) as eagerly, where the recorded step set `p.grad` to None
            p = ref()
            if p is not None:
                p.grad = None
        if g.single:
            return made[0]
        out = list(g.leaves)
        for t, i in zip(made, g.outputs, strict=True):
            out[i] = t
        return tree_unflatten(out, g.spec)


_AGAIN = object()  # `_replay` did not run: look for the graph again
_ELSEWHERE, _TOO_BIG, _NOT_AS_RECORDED = -1, -2, -3  # native_client.cpp `replay`'s reasons


def capture(
    fn: Callable[..., Any] | None = None, *, device: Any = None, watch: Iterable[Any] = (), max_graphs: int = MAX_GRAPHS
) -> Any:
    """`gpupool.torch.capture` on the C++ client (client/torch/capture.py's `capture` says the arguments)."""
    if fn is None:
        return lambda f: CapturedStep(f, device, watch, max_graphs)
    return CapturedStep(fn, device, watch, max_graphs)


# ---- the tape, decoded into the shared Recording ----


# What native_client.cpp's own checks of a recording say (TORCH_CHECK: a RuntimeError), raised as CaptureError: an op
# on another device than the step's, set_ (and resize_ past a storage) inside a recording.
_REFUSED_IN_CPP = (": a captured step must run on one gpupool device (", "inside a step being captured")


class _ViewArgument(Exception):
    """compact.view_of asked a _Ref for its layout: the record has a VIEW argument (tag 14 or 15)."""


class _Ref:
    """A tensor handle in a decoded compact record."""

    __slots__ = ("h",)

    def __init__(self, h: int) -> None:
        self.h = h

    @property
    def layout(self) -> Any:  # compact.view_of's first question about the tensor a VIEW argument names
        raise _ViewArgument


_DEVICE = object()  # compact.DEVICE decodes to this: the session's device
_GPU_DEVICE = tensor_pb2.Arg(device=tensor_pb2.DeviceRef(type="gpupool", index=-1))
_names: dict[int, str] = {}


def _op_name(op_id: int) -> str:
    name = _names.get(op_id)
    if name is None:
        name = _names[op_id] = str(_ops().op_name(op_id))
    return name


def _no_tensor(t: torch.Tensor) -> Any:
    raise CaptureError("a CPU tensor inside a compact record of a step being captured")


def _arg(v: Any) -> tensor_pb2.Arg:
    if isinstance(v, _Ref):
        return tensor_pb2.Arg(tensor=v.h)
    if v is _DEVICE:
        return _GPU_DEVICE
    if isinstance(v, list) and v and all(x is None or isinstance(x, _Ref) for x in v):
        return tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=[0 if x is None else x.h for x in v]))
    return wire.encode_arg(v, _no_tensor)


def _contiguous(sizes: list[int]) -> list[int]:
    strides, step = [], 1
    for n in reversed(sizes):
        strides.append(step)
        step *= max(n, 1)
    return strides[::-1]


def _decode(tape: bytes, rec: Recording) -> None:
    """The tape's commands (ClientFrame.commands entries) into `rec`, in order."""
    for cmd in device_pb2.ClientFrame.FromString(tape).commands:
        kind = cmd.WhichOneof("cmd")
        if kind == "eager_op":
            try:
                op_id, _, outputs, args, kwargs, _ = compact.decode_parts(cmd.eager_op, _Ref, _DEVICE)  # type: ignore[arg-type]
            except _ViewArgument:  # a VIEW argument (never written while recording)
                raise CaptureError("a view argument in a recorded step (the C++ client's records)") from None
            name = _op_name(op_id)
            if name == "aten::empty_strided" and len(args) == 2 and args[1] == _contiguous(args[0]):
                # a held-back empty (`ones_like`, `zeros`: empty + fill_): the daemon zeroes an empty anyway, and a
                # graph with a factory of uninitialized memory keeps the Python replay (server/graph_trace.py)
                name, args = "aten::zeros", args[:1]
            rec.op(name, [_arg(a) for a in args], {k: _arg(v) for k, v in kwargs.items()}, outputs)
        elif kind == "op":
            rec.op(cmd.op.name, list(cmd.op.args), dict(cmd.op.kwargs), list(cmd.op.outputs))
        elif kind == "upload":
            up = cmd.upload
            if up.offset or not up.last or up.bulk_bytes:
                rec.refuse("an upload of more than 4 MiB")
            dtype = wire.dtype_from_proto(up.meta.dtype)
            rec.upload(up.handle, wire.bytes_to_tensor(up.data, dtype, list(up.meta.shape)))
        elif kind == "free":
            for h in cmd.free.handles:
                rec.released(h)
        else:
            raise CaptureError(f"a {kind} command inside a step being captured")
