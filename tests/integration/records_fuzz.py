"""A structure-aware fuzzer of a live daemon's hostile inputs, from real recorded frames (round 32).

`record` (run as `python records_fuzz.py ADDRESS TOKEN OUT` in a process of its own: the torch shim) trains a tiny
MLP through the shim against the daemon under test, eagerly (compact eager records, `Command.eager_op`) and then
captured (DefineGraph, RunGraph with inputs by value and uploaded), with uploads and `.item()`s, and saves every
frame the client sent. `Fuzzer` replays that recording on fresh sessions, its handles moved to each session's
(`relocate`: the protobuf fields and the compact records' handles, parsed as the daemon parses them), with
mutations chosen by a seeded `random.Random`: in a compact record, a field set to a boundary value (every u64,
i64, u8 count, u16 list length, tag, geometry entry and name byte the record has: `record_fields`), bytes flipped,
cut or inserted, records dropped, repeated or swapped between frames; in a DefineGraph or RunGraph or Upload, any
scalar field of the message set to a boundary value (handles of the neighbour, 2^64-1, huge shapes, other dtypes),
repeated fields grown or emptied; whole frames dropped, repeated or cut; and the carrier: the gRPC stream, or the
session's side socket (`GPBULK2`), whose record headers are mutated too (kind, id, offset, length, a record split
across writes, a close mid-record).

After each case: every error a reply carries and the stream's end are statuses a client can act on (never
UNKNOWN or INTERNAL, no traceback), no reply carries the canary bytes another session holds on the device, and
the daemon is alive; throughout, `support.Healthy` computes exact results on the same device in another session.
"""

from __future__ import annotations

import functools
import json
import os
import random
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from gpupool import compact, protocol
from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2

# ---- the recording ----


def record(address: str, token: str, out: str) -> None:
    """Train through the shim against `address` and write the frames it sent (hex) and its session's number."""
    import torch
    from gpupool.client import bulk
    from gpupool.client.torch import runtime
    from torch import nn

    import gpupool.torch as gt

    bulk.connect = lambda *a, **k: None  # every byte in the frames: replayed on the stream and on a side socket
    torch.manual_seed(0)
    dev = gt.attach(address, token)
    session = runtime.get(dev.index).session
    frames: list[bytes] = []
    put = session._put

    def keep(frame: Any, *rest: Any) -> None:  # (rest: the queued size, `Session._put`)
        frames.append(frame if isinstance(frame, bytes) else frame.SerializeToString())
        put(frame, *rest)

    session._put = keep
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2, device=dev), capturable=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = (model(x) - y).abs().mean() + model[0].weight.square().sum() * 1e-4
        loss.backward()
        opt.step()
        return loss

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)) for _ in range(4)]
    for x, y in data[:3]:
        step(x.to(dev), y.to(dev)).item()
    captured = gt.capture(step)
    for i in range(6):
        x, y = data[i % 4]
        captured(x, y).item()
    big = torch.arange(40_000, dtype=torch.float32).to(dev)  # a bigger upload (160 kB, in chunks of the frame)
    (big * 2).sum().item()
    [p.detach().cpu() for p in model.parameters()]  # downloads
    gt.detach_all()
    Path(out).write_text(json.dumps({"number": session.handle_base >> 32, "frames": [f.hex() for f in frames]}))


# ---- moving a recording's handles to another session ----


def _move_fn(old: int, new: int) -> Any:
    def move(h: int) -> int:
        return (new << 32) | (h & 0xFFFFFFFF) if h >> 32 == old else h

    return move


def record_fields(data: bytes) -> list[tuple[int, str]]:
    """Every field of a well-formed compact record, as (offset, kind): kind "u64h" (a handle), "u64", "i64",
    "f64", "u8" (counts, tags, name lengths, enum numbers), "u16" (list lengths), "u32" (the op id). Parsed as
    compact.decode_parts does; a record it cannot parse gives what was found before the fault."""
    out: list[tuple[int, str]] = [(0, "u32"), (4, "u8")]
    try:
        pos = 5 + data[4]
        n_out = data[pos]
        out.append((pos, "u8"))
        pos += 1
        for _ in range(n_out):
            out.append((pos, "u64h"))
            pos += 8

        def value(pos: int) -> int:
            tag = data[pos]
            out.append((pos, "u8"))
            pos += 1
            if tag in (compact.TENSOR,):
                out.append((pos, "u64h"))
                return pos + 8
            if tag == compact.VIEW:
                out.append((pos, "u64h"))
                return geometry(pos + 8)
            if tag in (compact.INT,):
                out.append((pos, "i64"))
                return pos + 8
            if tag == compact.FLOAT:
                out.append((pos, "f64"))
                return pos + 8
            if tag in (compact.NONE, compact.DEVICE, compact.CPU):
                return pos
            if tag in (compact.BOOL, compact.DTYPE, compact.LAYOUT, compact.MEMORY_FORMAT):
                out.append((pos, "u8"))
                return pos + 1
            if tag in (compact.TENSORS, compact.INTS, compact.FLOATS, compact.BOOLS):
                (n,) = struct.unpack_from("<H", data, pos)
                out.append((pos, "u16"))
                pos += 2
                size = 1 if tag == compact.BOOLS else 8
                kind = {compact.TENSORS: "u64h", compact.INTS: "i64", compact.FLOATS: "f64"}.get(tag, "u8")
                for i in range(n):
                    out.append((pos + i * size, kind))
                return pos + n * size
            if tag == compact.VIEWS:
                (n,) = struct.unpack_from("<H", data, pos)
                out.append((pos, "u16"))
                pos += 2
                for _ in range(n):
                    kind = data[pos]
                    out.append((pos, "u8"))
                    out.append((pos + 1, "u64h"))
                    pos = geometry(pos + 9) if kind == compact.VIEW else pos + 9
                return pos
            raise ValueError(tag)

        def geometry(pos: int) -> int:
            rank = data[pos]
            out.append((pos, "u8"))
            pos += 1
            for i in range(2 * rank + 1):
                out.append((pos + 8 * i, "i64"))
            return pos + 8 * (2 * rank + 1)

        n_args = data[pos]
        out.append((pos, "u8"))
        pos += 1
        for _ in range(n_args):
            pos = value(pos)
        n_kw = data[pos]
        out.append((pos, "u8"))
        pos += 1
        for _ in range(n_kw):
            out.append((pos, "u8"))
            pos = value(pos + 1 + data[pos])
    except (IndexError, struct.error, ValueError):
        pass
    return out


def relocate_record(data: bytes, old: int, new: int) -> bytes:
    move = _move_fn(old, new)
    buf = bytearray(data)
    for pos, kind in record_fields(data):
        if kind == "u64h":
            struct.pack_into("<Q", buf, pos, move(struct.unpack_from("<Q", buf, pos)[0]))
    return bytes(buf)


_HANDLE_FIELDS = {
    "Upload": ("handle",),
    "Get": ("handle",),
    "Free": ("handles",),
    "Sync": ("scalar_handles",),
    "Op": ("outputs",),
    "Arg": ("tensor",),
    "TensorList": ("handles",),
    "DefineGraph": ("persistent",),
    "GraphWrite": ("handle",),
    "RunGraph": ("inputs", "outputs", "drop_writes"),
}


def _relocate_message(msg: Any, move: Any) -> None:
    names = _HANDLE_FIELDS.get(msg.DESCRIPTOR.name, ())
    for fd, value in msg.ListFields():
        if fd.name in names:
            if fd.is_repeated:
                getattr(msg, fd.name)[:] = [move(h) for h in value]
            else:
                setattr(msg, fd.name, move(value))
        elif fd.message_type is not None:
            if fd.message_type.GetOptions().map_entry:
                for v in value.values():
                    if hasattr(v, "DESCRIPTOR"):
                        _relocate_message(v, move)
            elif fd.is_repeated:
                for v in value:
                    _relocate_message(v, move)
            else:
                _relocate_message(value, move)


def relocate(frame: bytes, old: int, new: int) -> list[bytes]:
    """A recorded frame's commands (each serialized) with the handles of session `old` moved to session `new`."""
    move = _move_fn(old, new)
    out = []
    for c in device_pb2.ClientFrame.FromString(frame).commands:
        if c.WhichOneof("cmd") == "eager_op":
            c.eager_op = relocate_record(c.eager_op, old, new)
        else:
            _relocate_message(c, move)
        out.append(c.SerializeToString())
    return out


def join(commands: list[bytes]) -> bytes:
    """A ClientFrame of serialized commands (each possibly malformed: the frame carries its bytes as they are)."""
    return b"".join(protocol.FRAME_COMMANDS_TAG + protocol.varint(len(c)) + c for c in commands)


# ---- mutations ----


@functools.cache
def allowed_ops() -> list[str]:
    """The daemon's allowlist (server/allowed_ops.txt): names a renamed record calls with another op's arguments."""
    text = (Path(__file__).resolve().parents[2] / "server" / "allowed_ops.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


_SIZES = {"u64h": 8, "u64": 8, "i64": 8, "f64": 8, "u8": 1, "u16": 2, "u32": 4}
U64_EDGES = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
I64_EDGES = [0, 1, -1, 2, 3, 7, 255, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, -(2**63), -(2**31)]
U8_EDGES = [0, 1, 2, 15, 16, 64, 65, 127, 128, 254, 255]
U16_EDGES = [0, 1, 2, 255, 256, 4096, 65535]
F64_EDGES = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e308, 5e-324]


@dataclass
class Case:
    """One fuzz case: the commands of each frame, the carrier, and what was done (for a report)."""

    frames: list[list[bytes]]
    carrier: str = "stream"
    side: str = "none"  # a side socket mutation
    did: list[str] = field(default_factory=list)
    bulk: dict[int, list[bytes]] = field(default_factory=dict)  # side socket records sent after frame i's


class Mutator:
    def __init__(self, rng: random.Random, base: int, neighbour_base: int) -> None:
        self.rng = rng
        self.base = base
        self.neighbour = neighbour_base

    def handle(self) -> int:
        r = self.rng
        return r.choice([
            self.neighbour + r.randint(1, 40), self.base + r.randint(1, 400), self.base + 10**6, self.base,
            r.choice(U64_EDGES), r.getrandbits(64),
        ])  # fmt: skip

    def record(self, data: bytes, did: list[str]) -> bytes:
        r = self.rng
        how = r.choice(["field"] * 6 + ["flip", "cut", "insert", "grow", "rename", "rename"])
        buf = bytearray(data)
        if how == "rename" and len(data) > 5 and 0 < data[4] <= len(data) - 5:
            # another allowed op with this one's arguments (the op id keeps the new name for later records)
            name = r.choice(allowed_ops()).encode()
            did.append(f"record renamed {data[5 : 5 + data[4]].decode(errors='replace')} -> {name.decode()}")
            return struct.pack("<IB", struct.unpack_from("<I", data)[0], len(name)) + name + data[5 + data[4] :]
        if how == "field":
            fields = [(p, k) for p, k in record_fields(data) if p + _SIZES[k] <= len(data)] or [(0, "u8")]
            pos, kind = r.choice(fields) if data else (0, "grow")
            if kind == "u64h":
                struct.pack_into("<Q", buf, pos, self.handle())
            elif kind in ("u64", "i64"):
                struct.pack_into("<q", buf, pos, r.choice(I64_EDGES))
            elif kind == "f64":
                struct.pack_into("<d", buf, pos, r.choice(F64_EDGES))
            elif kind == "u8":
                buf[pos] = r.choice(U8_EDGES + list(range(17)))
            elif kind == "u16":
                struct.pack_into("<H", buf, pos, r.choice(U16_EDGES))
            elif kind == "u32":
                struct.pack_into("<I", buf, pos, r.choice([0, 1, 4095, 4096, 2**32 - 1, r.randint(0, 64)]))
            else:
                buf += b"\x01"
            did.append(f"record {kind}@{pos}")
        elif how == "flip" and buf:
            i = r.randrange(len(buf))
            buf[i] ^= 1 << r.randrange(8)
            did.append(f"record flip@{i}")
        elif how == "cut":
            n = r.randrange(len(buf) + 1)
            del buf[n:]
            did.append(f"record cut@{n}")
        elif how == "insert":
            i = r.randrange(len(buf) + 1)
            buf[i:i] = bytes(r.getrandbits(8) for _ in range(r.choice([1, 2, 8, 9])))
            did.append(f"record insert@{i}")
        else:
            buf += bytes(r.getrandbits(8) for _ in range(r.choice([1, 8, 100])))
            did.append("record grow")
        return bytes(buf)

    def message(self, msg: Any, did: list[str], depth: int = 0) -> None:
        """Set one scalar field somewhere in `msg` (a protobuf message) to a boundary value, or grow or empty a
        repeated field."""
        r = self.rng
        fields = [f for f in msg.DESCRIPTOR.fields if not (f.message_type and f.message_type.GetOptions().map_entry)]
        if not fields:
            return
        fd = r.choice(fields)
        value = getattr(msg, fd.name)
        if fd.message_type is not None:
            if fd.is_repeated:
                if len(value) and r.random() < 0.7:
                    self.message(r.choice(value), did, depth + 1)
                elif len(value) and r.random() < 0.5:
                    del value[r.randrange(len(value))]
                    did.append(f"{msg.DESCRIPTOR.name}.{fd.name} one fewer")
                else:
                    value.add()
                    did.append(f"{msg.DESCRIPTOR.name}.{fd.name} empty one more")
            elif depth < 6:
                self.message(value, did, depth + 1)
            return
        name = f"{msg.DESCRIPTOR.name}.{fd.name}"
        t = fd.type
        if t == fd.TYPE_BYTES:
            new: Any = r.choice([b"", b"\x02" * 4, bytes(r.getrandbits(8) for _ in range(r.choice([1, 7, 64])))])
        elif t == fd.TYPE_STRING:
            new = r.choice(["", "aten::add.Tensor", "aten::from_file", "x" * 300, "aten::mm.default"])
        elif t == fd.TYPE_BOOL:
            new = r.random() < 0.5
        elif t in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
            new = r.choice(F64_EDGES)
        elif t == fd.TYPE_ENUM:
            new = r.choice([0, 1, 2, 5, 11, 14, 15, 99])
        elif t in (fd.TYPE_UINT64, fd.TYPE_FIXED64):
            new = self.handle() if r.random() < 0.5 else r.choice(U64_EDGES + [2, 3, 4, 16, 1000])
        elif t in (fd.TYPE_UINT32, fd.TYPE_FIXED32):
            new = r.choice([0, 1, 2, 3, 255, 2**16, 2**32 - 1])
        else:
            new = r.choice(I64_EDGES)
            if t in (fd.TYPE_INT32, fd.TYPE_SINT32, fd.TYPE_SFIXED32):
                new = max(-(2**31), min(2**31 - 1, new))
        try:
            if fd.is_repeated:
                if len(value) and r.random() < 0.6:
                    value[r.randrange(len(value))] = new
                elif r.random() < 0.5:
                    value.append(new)
                else:
                    del value[:]
            else:
                setattr(msg, fd.name, new)
        except (TypeError, ValueError):
            return
        did.append(f"{name}={new!r:.40}")

    def command(self, raw: bytes, did: list[str]) -> bytes:
        r = self.rng
        try:
            c = device_pb2.Command.FromString(raw)
        except Exception:  # noqa: BLE001 - mutated before into bytes that do not parse: mutate the bytes
            c = device_pb2.Command()
        kind = c.WhichOneof("cmd")
        if kind is None:
            i = r.randrange(len(raw) + 1)
            did.append(f"bytes flipped@{i}")
            return raw[:i] + bytes([r.getrandbits(8)]) + raw[i + 1 :]
        if kind == "eager_op":
            return device_pb2.Command(eager_op=self.record(c.eager_op, did)).SerializeToString()
        if r.random() < 0.85:
            self.message(c, did)
            return c.SerializeToString()
        i = r.randrange(len(raw) + 1)
        did.append(f"{kind} bytes cut@{i}")
        return raw[:i]

    def case(self, recording: list[list[bytes]]) -> Case:
        r = self.rng
        frames = [list(f) for f in recording]
        case = Case(frames)
        for _ in range(r.choice([1, 1, 1, 2, 3, 5])):
            f = r.randrange(len(frames))
            cmds = frames[f]
            how = r.choice(["command"] * 8 + ["drop", "repeat", "swap", "frame"])
            if how == "command" and cmds:
                i = r.randrange(len(cmds))
                cmds[i] = self.command(cmds[i], case.did)
            elif how == "drop" and cmds:
                del cmds[r.randrange(len(cmds))]
                case.did.append(f"frame {f}: a command dropped")
            elif how == "repeat" and cmds:
                i = r.randrange(len(cmds))
                cmds.insert(i, cmds[i])
                case.did.append(f"frame {f}: a command repeated")
            elif how == "swap":
                g = r.randrange(len(frames))
                if cmds and frames[g]:
                    i, j = r.randrange(len(cmds)), r.randrange(len(frames[g]))
                    cmds[i], frames[g][j] = frames[g][j], cmds[i]
                    case.did.append(f"commands swapped between frames {f} and {g}")
            else:
                frames[f] = []
                case.did.append(f"frame {f} dropped")
        case.carrier = r.choice(["stream", "stream", "side"])
        if case.carrier == "side" and r.random() < 0.5:
            self.bulk(case)
        if case.carrier == "side" and r.random() < 0.25:
            case.side = r.choice(["kind", "id", "offset", "length", "split", "close"])
            case.did.append(f"side record {case.side}")
        return case

    def bulk(self, case: Case) -> None:
        """Uploads' bytes moved to the side socket (`bulk_bytes`, then a BULK_HEAD and the bytes after the frame),
        Gets marked `bulk`; sometimes a header or its bytes that do not match the command."""
        r = self.rng
        for f, cmds in enumerate(case.frames):
            for i, raw in enumerate(cmds):
                try:
                    c = device_pb2.Command.FromString(raw)
                except Exception:  # noqa: BLE001 - a command mutated into garbage stays as it is
                    continue
                if c.WhichOneof("cmd") == "get":
                    c.get.bulk = True
                    cmds[i] = c.SerializeToString()
                    continue
                if c.WhichOneof("cmd") != "upload" or not c.upload.data:
                    continue
                data = c.upload.data
                kind, handle, offset, length = protocol.BULK_UPLOAD, c.upload.handle, c.upload.offset, len(data)
                c.upload.data = b""
                c.upload.bulk_bytes = length
                if r.random() < 0.08:
                    which = r.choice(["kind", "handle", "offset", "length", "short", "announce"])
                    case.did.append(f"bulk upload {which}")
                    if which == "kind":
                        kind = r.choice([0, protocol.BULK_DOWNLOAD, protocol.BULK_FRAME, protocol.BULK_END, 9])
                    elif which == "handle":
                        handle = self.handle()
                    elif which == "offset":
                        offset = r.choice(U64_EDGES)
                    elif which == "length":
                        length = r.choice([0, length - 1, length + 1, 2**40])
                    elif which == "short":
                        data = data[: len(data) // 2]
                    else:
                        c.upload.bulk_bytes = r.choice([0, length + 1, protocol.CHUNK_BYTES + 1, 2**63])
                cmds[i] = c.SerializeToString()
                case.bulk.setdefault(f, []).append(protocol.BULK_HEAD.pack(kind, handle, offset, length) + data)


# ---- running a case ----

STREAM_ENDS = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "FAILED_PRECONDITION", "CANCELLED"}
FINAL = 2**63 + 4242
PATIENCE = 10.0  # seconds a side-socket case waits for its answer before it closes its socket


@dataclass
class Outcome:
    codes: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)
    finished: bool = False  # the final sync was answered, or the session was ended with a status
    gave_up: bool = False  # the side socket was closed by the case after PATIENCE s without an answer


def _note(out: Outcome, raw: bytes) -> None:
    out.replies.append(raw)
    try:
        frame = device_pb2.ServerFrame.FromString(raw)
    except Exception:  # noqa: BLE001 - a reply that does not parse is a finding of its own
        out.codes.append("UNPARSABLE_REPLY")
        return
    kind = frame.WhichOneof("reply")
    err = (
        frame.error
        if kind == "error"
        else frame.sync.error
        if kind == "sync" and frame.sync.HasField("error")
        else None
    )
    if err is not None:
        out.codes.append(err.code)
        out.messages.append(err.message)
    if kind == "sync" and frame.request_id == FINAL:
        out.finished = True


def run_case(channel: grpc.Channel, token: str, address: str, build: Any, timeout: float) -> tuple[Case, Outcome]:
    """Attach a fresh session with `token`, send the frames `build(handle_base)` gives (a Case and its joined
    frames), then a final sync; the case and what came back."""
    from gpupool.client import bulk as client_bulk

    stub = device_pb2_grpc.DeviceStub(channel)
    reply = stub.Attach(device_pb2.AttachRequest(token=token), timeout=10)
    case, frames = build(reply.handle_base)
    out = Outcome()
    done = threading.Event()
    final = protocol.sync_frame(FINAL)
    side = None
    if case.carrier == "side":
        side = client_bulk.connect(address, reply.bulk_port, reply.session_id, frames=True)
        assert side is not None and side.frames

    def requests() -> Iterator[bytes]:
        if side is None:
            yield from frames
            yield final
        done.wait(timeout + 5)

    stream = channel.stream_stream("/gpupool.v1.Device/Stream", request_serializer=None, response_deserializer=None)
    call = stream(requests(), metadata=((protocol.SESSION_METADATA, reply.session_id),), timeout=timeout)

    def read_stream() -> None:
        try:
            for raw in call:
                _note(out, raw)
                if out.finished:
                    break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED or not done.is_set():
                out.codes.append(f"stream:{exc.code().name}")
                out.messages.append(exc.details() or "")
                out.finished = True

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    if side is not None:
        _side_send(side, case, frames, final, out, timeout)
    reader.join(timeout if side is None or out.gave_up else 2)
    done.set()
    call.cancel()
    if side is not None:
        side.close()
    try:
        stub.Detach(device_pb2.DetachRequest(session_id=reply.session_id), timeout=10)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
    return case, out


def _side_send(side: Any, case: Case, frames: list[bytes], final: bytes, out: Outcome, timeout: float) -> None:
    from gpupool import duplex
    from gpupool.errors import GpupoolError

    records = []
    for i, f in enumerate(frames):
        records.append(protocol.frame_record(f))
        records.extend(case.bulk.get(i, ()))
    records.append(protocol.frame_record(final))
    frames = frames + [final]
    rng = random.Random(len(frames) * 7919 + sum(len(f) for f in frames))
    k = rng.randrange(len(records))
    head = bytearray(records[k][: protocol.BULK_HEAD.size])
    field = {"kind": 0, "id": 4, "offset": 12, "length": 20}.get(case.side)
    if field is not None:
        if field == 0:
            struct.pack_into("<I", head, 0, rng.choice([0, 1, 2, 4, 5, 2**32 - 1]))
        else:
            struct.pack_into(
                "<Q",
                head,
                field,
                rng.choice([0, 1, 2**31, 2**63, 2**64 - 1, len(records[k]) - protocol.BULK_HEAD.size + 1]),
            )
        records[k] = bytes(head) + records[k][protocol.BULK_HEAD.size :]

    def send() -> None:
        try:
            for i, rec in enumerate(records):
                if case.side == "split" and i == k:
                    for j in range(0, len(rec), 7):
                        duplex.send_all(side.sock, side.lock, [rec[j : j + 7]], 10.0)
                elif case.side == "close" and i == k:
                    duplex.send_all(side.sock, side.lock, [rec[: max(1, len(rec) // 2)]], 10.0)
                    side.close()
                    return
                else:
                    duplex.send_all(side.sock, side.lock, [rec], 10.0)
        except (OSError, ValueError):
            pass  # the daemon ended the session: its reason comes as BULK_END

    sender = threading.Thread(target=send, daemon=True)
    sender.start()

    def receive() -> None:
        try:
            while True:
                kind, ident, body = side.recv_record()
                if kind == protocol.BULK_END:
                    name = grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == ident)).name
                    out.codes.append(f"stream:{name}")
                    out.messages.append(body.decode(errors="replace"))
                    out.finished = True
                    return
                _note(out, body)
                if out.finished:
                    return
        except StopIteration:
            out.codes.append("stream:UNKNOWN_CODE")
            out.finished = True
        except GpupoolError as exc:
            out.messages.append(str(exc))
            # the daemon closed the socket (a close mid-record ends the session: no reply expected), or we did
            out.finished = out.finished or not out.gave_up

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    receiver.join(PATIENCE)
    if receiver.is_alive():
        # The daemon waits for bytes the case announced and never sent, as long as the peer lives (by design: a
        # paused client). Give up as a client would: close the socket; the session must then end (its stream).
        out.gave_up = True
        side.close()
        receiver.join(10)
    sender.join(10)


def check(outcome: Outcome, canary: bytes) -> list[str]:
    """What is wrong with a case's outcome (empty: nothing)."""
    from support import ACTIONABLE  # (here: `record` runs as a script, where tests/ is not on the path)

    bad = []
    for code in outcome.codes:
        plain = code.removeprefix("stream:")
        if plain not in (STREAM_ENDS if code.startswith("stream:") else ACTIONABLE):
            bad.append(f"status {code}")
    for m in outcome.messages:
        if "Traceback" in m or 'File "' in m:
            bad.append(f"a traceback in an error: {m[:300]}")
    if not outcome.finished:
        bad.append("no answer to the final sync and no end of the session")
    if any(canary in r for r in outcome.replies):
        bad.append("a reply carries bytes of another session")
    return bad


def main(argv: list[str]) -> int:
    if argv[:1] == ["record"]:
        record(*argv[1:4])
        return 0
    print(__doc__)
    return 2


def canary_tensor(seed: int) -> Any:
    """A tensor whose every 16 bytes are one random pattern (the canary), and the pattern."""
    import torch

    pattern = random.Random(seed).randbytes(16)
    data = pattern * 4096
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone(), pattern


def recorded(address: str, token: str, directory: Path) -> tuple[int, list[bytes]]:
    """Record a training's frames through the shim in a process of its own: (the session number, the frames)."""
    import subprocess

    out = directory / "recording.json"
    env = {**os.environ, "GPUPOOL_SIDE_FRAMES": "0"}
    done = subprocess.run(
        [sys.executable, __file__, "record", address, token, str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    d = json.loads(out.read_text())
    return d["number"], [bytes.fromhex(f) for f in d["frames"]]


def neighbour_base(stub: Any, token: str) -> tuple[str, int]:
    reply = stub.Attach(device_pb2.AttachRequest(token=token), timeout=10)
    return reply.session_id, reply.handle_base


def upload_frame(handle: int, t: Any) -> bytes:
    from gpupool import wire

    meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(t.dtype), shape=list(t.shape))
    up = device_pb2.Upload(handle=handle, meta=meta, data=wire.tensor_to_bytes(t), last=True)
    return device_pb2.ClientFrame(commands=[device_pb2.Command(upload=up)]).SerializeToString()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
