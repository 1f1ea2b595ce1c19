"""Recording a captured step and building its graph (DefineGraph) from the recording: the definition half of
step capture, shared by both clients (client/torch/capture.py and client/native/capture.py replay).

While a step records, every command the recording thread sends its device also lands in a `Recording` (the
Python client: the runtime's `recorders`, by thread: other threads' commands meanwhile are neither recorded nor
refused; the C++ client: the tape of native_client.cpp, decoded by client/native/capture.py). `build`
turns one recording into slots: 1..n the step's tensor inputs, then the tensors that existed before the step
(bound by identity: parameters, optimizer state), then uploads made inside the step, then op outputs in order.
`compare` says where two recordings of the same call differ (a Python number that changes from step to step would
replay stale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch.utils._pytree import tree_flatten

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2

NOT_IN_GRAPHS = ("aten::resize_", "aten::resize_as_", "aten::_resize_output_", "aten::set_")

# A device tensor's handle, or None for anything else (a CPU tensor, a value): each client's own.
HandleOf = Callable[[Any], "int | None"]


class CaptureError(RuntimeError):
    """A step given to `gpupool.torch.capture` cannot be captured (a sync inside it, Python numbers that change
    from step to step, ...); the message says what and how to fix it."""


@dataclass
class Recording:
    """Every command the recording thread sent one runtime during one call of the step."""

    rt: Any  # the device's runtime (its `device` names it)
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


class Elsewhere(Recording):
    """Installed on every other device for the recording thread while a step records: a captured step uses one
    device (other threads use any device meanwhile)."""

    def op(self, name: str, args: Any, kwargs: Any, outputs: list[int]) -> None:
        raise CaptureError(f"{self.rt.device}: a captured step must run on one gpupool device ({name})")


@dataclass
class Built:
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


def build(rec: Recording, leaves: list[Any], result: Any, handle_of: HandleOf) -> Built:
    """Slots: 1..n the step's inputs, then persistent tensors (first use order), then uploads made inside the
    step (kept as persistent inputs), then op outputs in order. `handle_of`: a device tensor's handle, else None."""
    input_handles = [h for h in map(handle_of, leaves) if h is not None]
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
    out_handles = [handle_of(x) for x in out_leaves]
    outputs = []
    for x, oh in zip(out_leaves, out_handles, strict=True):
        if oh is not None:
            if oh not in slot_of:
                raise CaptureError("a captured step returns a tensor it did not compute or receive")
            outputs.append(slot_of[oh])
        elif isinstance(x, torch.Tensor):
            raise CaptureError("a captured step returns a CPU tensor; return device tensors (read them after)")
    returned = {h for h in out_handles if h is not None}
    writes = {
        h: slot_of[h]
        for h in rec.produced
        if h not in rec.dead and h not in returned and h not in rec.consts and h in slot_of
    }
    metas = [wire.meta_to_proto(x) for x in leaves if handle_of(x) is not None]
    scalars = [x for x in out_leaves if not isinstance(x, torch.Tensor)]
    consts = [rec.consts[h] for h in const_handles]
    return Built(ops, input_handles, metas, persistent, const_handles, consts, outputs, writes, scalars)


def _to_slots(a: tensor_pb2.Arg, slot_of: dict[int, int]) -> tensor_pb2.Arg:
    kind = a.WhichOneof("value")
    if kind == "tensor":
        return tensor_pb2.Arg(tensor=slot_of[a.tensor])
    if kind == "tensors":
        slots = [slot_of[h] if h else 0 for h in a.tensors.handles]
        return tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=slots))
    return a


def compare(a: Built, b: Built) -> str:
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
