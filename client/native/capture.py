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
watched in C++ (`watch`): a Free of one is seen at the next call (`fired`), which re-records the step (a persistent
tensor was dropped or replaced) or stops writing the handle.

A replay is one RunGraph appended to the device's frame (in order with its eager records; the frame goes out every
HOLD_STEPS replays, or as any frame does: every $GPUPOOL_FLUSH_OPS commands, or at a sync); its outputs are new device
tensors bound to fresh handles.
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
from gpupool.client.capture_step import MAX_GRAPHS, StepCache
from torch.utils._pytree import tree_flatten, tree_unflatten

from gpupool import compact, protocol, wire
from gpupool._proto import device_pb2, tensor_pb2

from . import backend

log = logging.getLogger("gpupool.torch")
_graph_ids = itertools.count(1)
BY_VALUE_BYTES = 256 * 1024  # CPU arguments up to this size (together) travel inside the RunGraph command
# Replays go out HOLD_STEPS to a frame at the most (client/torch/capture.py's first frame after a pause), so that the
# daemon starts on them while the client goes on; a sync or a full frame sends them sooner.
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
    outputs: list[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]]  # (leaf index, sizes, strides, dtype)
    spec: Any
    leaves: list[Any]
    consts: list[torch.Tensor]
    built: Built
    valid: bool = True
    why: str = ""
    drop_writes: list[int] = field(default_factory=list)
    watching: list[int] = field(default_factory=list)
    ops: int = 0  # aten ops it runs per step


class _Device:
    """What capture keeps per device: the handles defined graphs watch (handle -> [(graph, persistent?)])."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.device = torch.device(backend.NAME, index)
        self.watched: dict[int, list[tuple[_Graph, bool]]] = {}
        self.held = 0  # replays appended to the frame since the last one this module sent

    def poll(self) -> None:
        """Graphs hear of the watched handles freed since the last call."""
        if not self.watched:
            return
        for h in _ops().fired(self.index):
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
        leaves, spec, structure = self._structure(args, kwargs)
        dev = _device(self._index(leaves))
        dev.poll()
        key = self._key(structure, leaves)
        g = self._graph_for(key, dev.device)
        if g is not None:
            return self._replay(dev, g, leaves)
        leaves = [x.to(dev.device) if _is_cpu_tensor(x) else x for x in leaves]
        args, kwargs = tree_unflatten(leaves, spec)
        if self._eager_now():
            return self.fn(*args, **kwargs)
        return self._record(dev, key, leaves, args, kwargs)

    def _index(self, leaves: list[Any]) -> int:
        found = {int(x.device.index) for x in leaves if _on_device(x)}
        if len(found) > 1:
            raise CaptureError("the arguments of a captured step are on more than one gpupool device")
        if found:
            return found.pop()
        if self.device is not None and torch.device(self.device).index is not None:
            return int(torch.device(self.device).index)  # type: ignore[arg-type]
        return int(_ops().current_device())

    # ---- recording ----

    def _record(self, dev: _Device, key: Any, leaves: list[Any], args: Any, kwargs: Any) -> Any:
        ops = _ops()
        handles = {id(x): int(ops.wire_handle(x)) for x in leaves if _on_device(x)}
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
        outputs = [(i, tuple(x.shape), tuple(x.stride()), x.dtype) for i, x in enumerate(out_leaves) if _on_device(x)]
        plain = [None if _on_device(x) else x for x in out_leaves]
        g = _Graph(dev.index, graph_id, key, outputs, spec, plain, consts, built, ops=len(msg.ops))
        dev.watch(g)
        self.graphs[key] = g
        self.stats["defined"] += 1
        log.info(
            "%s: graph %d defined for %s: %d ops, %d inputs, %d persistent tensors",
            dev.device, graph_id, self.name, len(msg.ops), msg.inputs, len(msg.persistent),
        )  # fmt: skip

    def _release(self, g: _Graph, drop: bool) -> None:
        _device(g.index).unwatch(g)
        if drop:
            backend.flush()
            backend.session(g.index).drop_graph(g.graph_id)

    # ---- replay ----

    def _replay(self, dev: _Device, g: _Graph, leaves: list[Any]) -> Any:
        ops = _ops()
        inputs: list[int] = []
        data: list[bytes] = []
        keep: list[torch.Tensor] = []  # uploads of large CPU arguments, alive until the run is queued
        by_value = sum(x.numel() * x.element_size() for x in leaves if _is_cpu_tensor(x)) <= BY_VALUE_BYTES
        for x in leaves:
            if _on_device(x):
                inputs.append(int(ops.wire_handle(x)))
                data.append(b"")
            elif isinstance(x, torch.Tensor):
                if by_value:
                    inputs.append(0)
                    data.append(wire.host_bytes(x.detach().contiguous()).tobytes())
                else:
                    keep.append(x.to(dev.device))
                    inputs.append(int(ops.wire_handle(keep[-1])))
                    data.append(b"")
        made = [ops.new_output(list(s), list(st), dt, dev.index) for _, s, st, dt in g.outputs]
        handles = ops.adopt(made, False)
        run = device_pb2.RunGraph(graph_id=g.graph_id, inputs=inputs, outputs=handles)
        if g.drop_writes:
            run.drop_writes.extend(g.drop_writes)
            g.drop_writes.clear()
        if by_value and any(data):
            run.input_data.extend(data)
        raw = device_pb2.Command(run_graph=run).SerializeToString()
        entry = bytearray(protocol.FRAME_COMMANDS_TAG + protocol.varint(len(raw)) + raw)
        ops.append_command(torch.frombuffer(entry, dtype=torch.uint8), dev.index)
        ops.adopt(made, True)
        dev.held += 1
        if dev.held >= HOLD_STEPS:
            dev.held = 0
            backend.flush()
        self.stats["replayed"] += 1
        out = list(g.leaves)
        for t, (i, *_) in zip(made, g.outputs, strict=True):
            out[i] = t
        return tree_unflatten(out, g.spec)


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
