"""Hostile records against a session whose runs were LEARNED (server/runs.py), through a live `gpupool serve`.

A real training loop (the shim: Linear-ReLU-Dropout-Linear, Adam, cross entropy) is recorded once per daemon at the
client's `Session._put` (its frames as they went out). Each case then replays those frames into two fresh sessions,
their handles moved to each session's own base: session L gets them as they are, so its worker learns runs from
the first steps and runs the later ones inside them (the daemon's gpupool_eager_learned_ops_total must grow);
session P gets every record with its op name spelled out, which defines the op id anew each time and so never hits
a template nor learns a run (the plain path, the reference: it must count no learned op). After the clean steps
both get the same mutated steps: deterministic attacks (another session's handle, never created, freed, zero and
base handles as inputs and outputs, outputs aliasing the record's input or what the run holds, in-place meta
changes between steps through t_/squeeze_/unsqueeze_/resize_/as_strided_/set_/detach_ and a batch grown in place
under a small quota, uploads/frees/seeds and a half-finished upload between records, records cut or extended by a
byte, NaN/inf/huge/negative numbers, the quota hit mid-run, a step reversed or cut in half, uninitialized outputs
(empty*, new_empty*, resize, resize_as) inside the runs) and a bounded hypothesis part (flips of handle and
number bytes, handle swaps, foreign outputs, record drops, duplicates and moves).

Oracle: after every frame of at most 64 commands both sessions answer the same sync outcome (status, op without
its overload, message with handles relative to the session's base), never INTERNAL/UNKNOWN; at the end every
handle either holds the same bytes in both or fails in both the same way; no downloaded value carries the canary
another session writes and frees before each case, and the uninitialized outputs are zeros (past what `resize`
keeps of `self`); a neighbour training on the same device stays bit-exact throughout; the daemon stays up and
SERVING, and its device accounting returns to zero once every session closed. Two daemons: sessions in worker
processes (the default: the shared buffer, the worker's results) and `--isolation thread` (one process, one
allocator: the canary's freed bytes are there to be handed out).
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import resource
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.session import Session
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import DaemonHandle, Healthy, MiB, scrape, start_serve_process, stop_process, tls_channel
from torch import nn

from gpupool import compact, wire
from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2

GiB = 1024**3
QUOTA = 64 * MiB
EXPECTED = {"INVALID_ARGUMENT", "PERMISSION_DENIED", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}
CANARY = -7.125e-33  # the canary session writes it and frees it; no other session may ever read it
EXAMPLES = int(os.environ.get("GPUPOOL_LEARNED_FUZZ_EXAMPLES", "8"))
CLEAN_STEPS = 3  # replayed as recorded before the attack (the runs are learned from them)
SPAN = 1 << 32

# ---- recording a real training loop ----


class Recording:
    """The frames a real shim training loop sent, as command lists per step, for handle base `base`."""

    def __init__(self, base: int, steps: list[list[device_pb2.Command]], names: dict[int, bytes]) -> None:
        self.base, self.steps, self.names = base, steps, names


def _train(device: torch.device, steps: int) -> None:
    torch.manual_seed(0)
    # with dropout: random ops inside the learned runs (the native runner draws them in a worker process); the seed
    # above goes to the device too, so both sessions of a case draw alike
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 2)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 8, generator=gen), torch.randint(0, 2, (4,), generator=gen)
    xd, yd = x.to(device), y.to(device)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xd), yd)
        loss.backward()
        opt.step()
        loss.item()  # a round trip per step: the step's commands go out as frames of their own


def record(daemon: DaemonHandle, steps: int) -> Recording:
    import gpupool.torch as gt

    sent: list[tuple[Session, bytes]] = []
    put = Session._put

    def spy(self: Session, frame: Any, *rest: Any) -> None:  # (rest: the queued size, `Session._put`)
        sent.append((self, frame if isinstance(frame, bytes) else frame.SerializeToString()))
        put(self, frame, *rest)

    Session._put = spy  # type: ignore[method-assign]
    try:
        device = gt.attach(daemon.address, daemon.token(tenant="recorder"))
        try:
            _train(device, steps)
        finally:
            gt.detach_all()
    finally:
        Session._put = put  # type: ignore[method-assign]
    # other sessions of this process (a neighbour) send frames meanwhile: the recorder is the one of eager records
    eager: dict[int, int] = {}
    for t, raw in sent:
        cmds = device_pb2.ClientFrame.FromString(raw).commands
        eager[id(t)] = eager.get(id(t), 0) + sum(c.WhichOneof("cmd") == "eager_op" for c in cmds)
    ours = next(t for t, _ in sent if id(t) == max(eager, key=eager.__getitem__))
    base = ours.handle_base
    per_step: list[list[device_pb2.Command]] = [[]]
    names: dict[int, bytes] = {}
    for _, raw in [(t, raw) for t, raw in sent if t is ours]:
        for cmd in device_pb2.ClientFrame.FromString(raw).commands:
            kind = cmd.WhichOneof("cmd")
            if kind in ("get", "sync"):  # the step's round trip: each replay sends its own syncs
                if per_step[-1]:
                    per_step.append([])
                continue
            if kind == "upload":
                assert not cmd.upload.bulk_bytes, "small uploads travel on the stream"
            if kind == "eager_op" and cmd.eager_op[4]:
                op_id, n = struct.unpack_from("<IB", cmd.eager_op)
                names[op_id] = cmd.eager_op[5 : 5 + n]
            per_step[-1].append(cmd)
    return Recording(base, [s for s in per_step if s], names)


# ---- compact records: where their handles and numbers are ----


def fields(rec: bytes, lists: list[int] | None = None) -> tuple[list[int], list[int], list[int], list[int]]:
    """Byte offsets of a record's output handles, input handles (tensors, tensor lists, views and the elements of
    tensor lists with views), ints (a view's sizes, strides and offset among them) and floats; `lists`, when given,
    gets the offset of each tensor list with views (compact.VIEWS)."""
    n_name = rec[4]
    pos = 5 + n_name
    n_out = rec[pos]
    outs = [pos + 1 + 8 * i for i in range(n_out)]
    pos += 1 + 8 * n_out
    ins: list[int] = []
    ints: list[int] = []
    floats: list[int] = []

    def value(pos: int) -> int:
        tag = rec[pos]
        if tag == compact.TENSOR:
            ins.append(pos + 1)
            return pos + 9
        if tag == compact.VIEW:  # a handle, a rank, then sizes, strides and offset: numbers to attack as ints
            ins.append(pos + 1)
            n = 2 * rec[pos + 9] + 1
            ints.extend(pos + 10 + 8 * i for i in range(n))
            return pos + 10 + 8 * n
        if tag in (compact.INT, compact.FLOAT):
            (ints if tag == compact.INT else floats).append(pos + 1)
            return pos + 9
        if tag == compact.VIEWS:  # each element a tensor or a view argument, its tag included
            if lists is not None:
                lists.append(pos)
            (n,) = struct.unpack_from("<H", rec, pos + 1)
            pos += 3
            for _ in range(n):
                assert rec[pos] in (compact.TENSOR, compact.VIEW)
                pos = value(pos)
            return pos
        if tag in (compact.NONE, compact.DEVICE, compact.CPU):
            return pos + 1
        if tag in (compact.TENSORS, compact.INTS, compact.FLOATS, compact.BOOLS):
            (n,) = struct.unpack_from("<H", rec, pos + 1)
            size = 1 if tag == compact.BOOLS else 8
            at = [pos + 3 + size * i for i in range(n)]
            {compact.TENSORS: ins, compact.INTS: ints, compact.FLOATS: floats}.get(tag, []).extend(at)
            return pos + 3 + size * n
        return pos + 2

    n_args = rec[pos]
    pos += 1
    for _ in range(n_args):
        pos = value(pos)
    n_kw = rec[pos]
    pos += 1
    for _ in range(n_kw):
        pos = value(pos + 1 + rec[pos])
    assert pos == len(rec)
    return outs, ins, ints, floats


def handles_of(cmd: device_pb2.Command) -> tuple[list[int], list[int]]:
    """(outputs, inputs) of a recorded eager record."""
    outs, ins, _, _ = fields(cmd.eager_op)
    get = lambda at: struct.unpack_from("<Q", cmd.eager_op, at)[0]  # noqa: E731
    return [get(at) for at in outs], [get(at) for at in ins]


def moved(cmd: device_pb2.Command, old: int, new: int) -> device_pb2.Command:
    """`cmd` with its handles in [old, old + 2^32) moved to `new`'s range (0 and foreign handles stay)."""

    def mv(h: int) -> int:
        return h - old + new if old <= h < old + SPAN else h

    out = device_pb2.Command()
    out.CopyFrom(cmd)
    kind = out.WhichOneof("cmd")
    if kind == "eager_op":
        rec = bytearray(out.eager_op)
        try:
            outs, ins, _, _ = fields(bytes(rec))
        except (AssertionError, IndexError, struct.error):  # mangled on purpose: moved as it is
            return out
        for at in outs + ins:
            struct.pack_into("<Q", rec, at, mv(struct.unpack_from("<Q", rec, at)[0]))
        out.eager_op = bytes(rec)
    elif kind == "upload":
        out.upload.handle = mv(out.upload.handle)
    elif kind == "get":
        out.get.handle = mv(out.get.handle)
    elif kind == "free":
        out.free.handles[:] = [mv(h) for h in out.free.handles]
    elif kind == "op":
        for a in list(out.op.args) + list(out.op.kwargs.values()):
            if a.WhichOneof("value") == "tensor":
                a.tensor = mv(a.tensor)
            elif a.WhichOneof("value") == "tensors":
                a.tensors.handles[:] = [mv(h) for h in a.tensors.handles]
        out.op.outputs[:] = [mv(h) for h in out.op.outputs]
    return out


def plain(cmd: device_pb2.Command, names: dict[int, bytes]) -> device_pb2.Command:
    """The record with its op name spelled out: it defines its op id anew, so it never hits a template or a run."""
    if cmd.WhichOneof("cmd") != "eager_op" or len(cmd.eager_op) < 5 or cmd.eager_op[4]:
        return cmd
    (op_id,) = struct.unpack_from("<I", cmd.eager_op)
    name = names.get(op_id)
    if name is None:
        return cmd
    return device_pb2.Command(eager_op=cmd.eager_op[:4] + bytes([len(name)]) + name + cmd.eager_op[5:])


# ---- a raw session: frames in, every reply collected ----


def _op(name: str) -> str:
    """An error's op without its overload: a record that names its op reports the name it gave ("aten::sum.
    dim_IntList"), a record by id the op's schema name ("aten::sum"); the plain session names every record."""
    return name.split(".", 1)[0]


class Raw:
    def __init__(self, daemon: DaemonHandle, channel: grpc.Channel, tenant: str, quota: int = QUOTA) -> None:
        self.stub = device_pb2_grpc.DeviceStub(channel)
        reply = self.stub.Attach(device_pb2.AttachRequest(token=daemon.token(tenant=tenant, quota_bytes=quota)))
        self.session_id, self.base = reply.session_id, reply.handle_base
        self.out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.replies: dict[int, Any] = {}
        self.chunks: dict[int, list[bytes]] = {}
        self.errors: list[tuple[str, str, str]] = []
        self.arrived = threading.Condition()
        self.ended: grpc.RpcError | None = None
        self.rid = 0
        stream = channel.stream_stream(
            "/gpupool.v1.Device/Stream",
            request_serializer=None,
            response_deserializer=device_pb2.ServerFrame.FromString,
        )
        self.call = stream(self._frames(), metadata=(("gpupool-session", self.session_id),), timeout=120)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _frames(self) -> Iterator[bytes]:
        while (raw := self.out.get()) is not None:
            yield raw

    def _read(self) -> None:
        try:
            for frame in self.call:
                kind = frame.WhichOneof("reply")
                with self.arrived:
                    if kind == "chunk":
                        self.chunks.setdefault(frame.request_id, []).append(frame.chunk.data)
                        if frame.chunk.last:
                            self.replies[frame.request_id] = frame.chunk
                    else:
                        self.replies[frame.request_id] = getattr(frame, kind)
                        err = frame.error if kind == "error" else frame.sync.error
                        if err.code:
                            self.errors.append((err.code, err.op, err.message))
                    self.arrived.notify_all()
        except grpc.RpcError as exc:
            with self.arrived:
                self.ended = exc
                self.arrived.notify_all()

    def send(self, cmds: list[device_pb2.Command]) -> None:
        self.out.put(device_pb2.ClientFrame(commands=cmds).SerializeToString())

    def request(self, cmd: device_pb2.Command) -> Any:
        """Send one Get or Sync (after everything sent before it) and wait for its answer."""
        self.rid += 1
        getattr(cmd, cmd.WhichOneof("cmd") or "sync").request_id = self.rid
        self.send([cmd])
        deadline = time.monotonic() + 60
        with self.arrived:
            while self.rid not in self.replies and self.ended is None:
                assert self.arrived.wait(max(0.0, deadline - time.monotonic())), "no answer in 60 s"
        if self.ended is not None:
            raise AssertionError(f"the stream ended: {self.ended.code()} {self.ended.details()}")
        return self.replies[self.rid]

    def outcome(self) -> tuple[str, str, str]:
        """The first error since the last sync: (status, op, message), or ("", "", "")."""
        reply = self.request(device_pb2.Command(sync=device_pb2.Sync()))
        if not reply.HasField("error"):
            return ("", "", "")
        return reply.error.code, _op(reply.error.op), self.relative(reply.error.message)

    def relative(self, message: str) -> str:
        """An error message with this session's handles as offsets from its base and others' unnamed (the two
        sessions' bases differ), a malformed record's without its byte positions and values (the plain
        session's records hold names)."""
        if message.startswith("malformed eager op"):
            return "malformed eager op"

        def sub(m: re.Match[str]) -> str:
            h = int(m.group(0), 16)
            # another range's handle: a mangled record read from bytes holding this session's base shifted
            return f"base+{h - self.base}" if self.base <= h < self.base + SPAN else "another"

        return re.sub(r"0x[0-9a-f]+", sub, message)

    def value(self, handle: int) -> tuple[Any, ...]:
        """("", its bytes) of a handle's value, or (status, op, message) of why it has none."""
        reply = self.request(device_pb2.Command(get=device_pb2.Get(handle=handle)))
        rid = self.rid
        if isinstance(reply, tensor_pb2.Error):
            return reply.code, _op(reply.op), self.relative(reply.message)
        first = self.chunks.pop(rid)
        return "", b"".join(first)

    def close(self) -> None:
        self.out.put(None)
        self.call.cancel()
        self.stub.Detach(device_pb2.DetachRequest(session_id=self.session_id), timeout=10)


# ---- the daemon, a neighbour, a canary ----


def serve(tmp: Path, *args: str, native: bool = True) -> Iterator[DaemonHandle]:
    key = secrets.token_hex(32).encode()
    key_file = tmp / "token.key"
    key_file.write_bytes(key + b"\n")
    proc, address = start_serve_process(
        key_file,
        *("--fake-gpus", "1", "--fake-gpu-memory", "64GiB", "--metrics-listen", "127.0.0.1:0", *args),
        "--tls-client-auth",  # the test's (admin) certificate sees every session in Status, and the totals
        "require",
        env={"GPUPOOL_LOG_LEVEL": "INFO", "GPUPOOL_NATIVE_RUNNER": "1" if native else "0"},
    )
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (6 * GiB, 6 * GiB))
    port = 0
    deadline = time.monotonic() + 30
    while not port and time.monotonic() < deadline:
        lines = list(proc.log_lines)  # type: ignore[attr-defined]
        found = [re.search(r"metrics on https?://\S+:(\d+)/metrics", line) for line in lines]
        port = next((int(m.group(1)) for m in found if m), 0)
        time.sleep(0.05)
    assert port, "the daemon logged no metrics port"
    yield DaemonHandle(address, key, "test-host", process=proc, metrics_port=port)
    assert proc.poll() is None, "the daemon died"
    assert stop_process(proc) == 0


class World:
    """The recording, a channel, the neighbour and the canary writer, shared by every case of the module."""

    def __init__(self, daemon: DaemonHandle) -> None:
        self.daemon = daemon
        self.rec = record(daemon, CLEAN_STEPS + 3)
        self.channel = tls_channel(daemon.address, options=[("grpc.max_receive_message_length", 64 * MiB)])
        self.neighbour = Healthy(daemon.address, daemon.token(tenant="neighbour", quota_bytes=QUOTA))
        self.canary: Session | None = Session.attach(daemon.address, daemon.token(tenant="canary", quota_bytes=QUOTA))
        self.cases = 0

    def write_canary(self) -> None:
        assert self.canary is not None
        for _ in range(3):
            h = self.canary.upload(torch.full((4096,), CANARY))
            self.canary.free([h])
        h = self.canary.upload(torch.full((4096,), CANARY))
        self.canary.free([h])
        self.canary.sync()

    def close(self) -> None:
        if self.canary is not None:
            self.canary.close()
            self.canary = None
        self.neighbour.close()
        self.channel.close()


def world_of(daemon: DaemonHandle) -> Iterator[World]:
    w = World(daemon)
    try:
        yield w
        assert not w.neighbour.failures, w.neighbour.failures
        assert w.neighbour.iterations > 0
        w.close()
        assert not w.neighbour.failures, w.neighbour.failures
        channel = tls_channel(daemon.address)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = device_pb2_grpc.DeviceStub(channel)
        deadline = time.monotonic() + 20
        while True:  # every session closed: the device's accounting is back to nothing
            status = stub.Status(device_pb2.StatusRequest(), timeout=10)
            if not status.sessions and status.devices[0].used_bytes == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not status.sessions and status.devices[0].used_bytes == 0, status
        channel.close()
    finally:
        w.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Sessions in worker processes (the default): the shared buffer, the worker's result path; learned runs'
    fast steps in the native runner (server/native_runner.py) where it can be built."""
    for daemon in serve(tmp_path_factory.mktemp("learned-fuzz")):
        yield from world_of(daemon)


@pytest.fixture(scope="module")
def world_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """`world` with `GPUPOOL_NATIVE_RUNNER=0`: learned runs on the Python path only."""
    for daemon in serve(tmp_path_factory.mktemp("learned-fuzz-python"), native=False):
        yield from world_of(daemon)


_WORLDS = {"process": "world", "process-python": "world_python", "thread": "world_thread"}


@pytest.fixture(scope="module")
def world_thread(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Sessions sharing the daemon process (`--isolation thread`): one allocator, one executor (its verdict
    cache) for all, so the canary's freed bytes are there for an uninitialized output to hand out."""
    for daemon in serve(tmp_path_factory.mktemp("learned-fuzz-thread"), "--isolation", "thread"):
        yield from world_of(daemon)


Mutation = Callable[[list[device_pb2.Command], int], list[device_pb2.Command]]  # (a step's commands, base)


def attack(
    world: World, mutate: Mutation, quota: int = QUOTA, steps: int = 2, zeros: dict[int, int] | None = None
) -> list[tuple[Any, ...]]:
    """Replay the recording into a learning session and a plain one, the steps after the clean ones mutated by
    `mutate` (given commands for the session's base); compare what both answer. `zeros`: handles (offsets from
    the base) whose bytes from the given offset on must be zero. Returns the errors."""
    rec = world.rec
    world.write_canary()
    before = learned_ops(world.daemon, "learned")
    sessions = [Raw(world.daemon, world.channel, "learned", quota), Raw(world.daemon, world.channel, "plain", quota)]
    seen: list[list[Any]] = [[], []]
    bound: set[int] = set()
    try:
        for k, s in enumerate(sessions):
            for t, step in enumerate(rec.steps[: CLEAN_STEPS + steps]):
                cmds = [moved(c, rec.base, s.base) for c in step]
                if t >= CLEAN_STEPS:
                    cmds = mutate(cmds, s.base)
                if k:
                    cmds = [plain(c, {**rec.names, **EXTRA_NAMES}) for c in cmds]
                for i in range(0, len(cmds), 64):  # frames of at most 64: more frames, more outcomes to compare
                    s.send(cmds[i : i + 64])
                    seen[k].append(s.outcome())
                if not k:
                    for c in cmds:
                        if c.WhichOneof("cmd") == "eager_op":
                            try:
                                bound.update(h - s.base for h in handles_of(c)[0] if s.base <= h < s.base + SPAN)
                            except (AssertionError, IndexError, struct.error):
                                pass
                        elif c.WhichOneof("cmd") == "upload":
                            bound.add(c.upload.handle - s.base)
        for k, s in enumerate(sessions):
            for h in sorted(bound):
                seen[k].append(s.value(s.base + h))
                start = (zeros or {}).get(h)
                if start is not None:
                    assert seen[k][-1][0] == "" and not any(seen[k][-1][1][start:]), f"bytes of base+{h} not zeroed"
        for k, s in enumerate(sessions):
            for error in s.errors:
                assert error[0] in EXPECTED, (error, "learned" if k == 0 else "plain")
            assert s.ended is None
        assert len(seen[0]) == len(seen[1])
        for i, (a, b) in enumerate(zip(seen[0], seen[1], strict=True)):
            assert a == b, f"answer {i}: learned {_short(a)} != plain {_short(b)}"
            if a[0] == "" and isinstance(a[1], bytes) and len(a[1]) % 4 == 0:
                values = torch.frombuffer(bytearray(a[1]), dtype=torch.float32)
                assert not (values == CANARY).any(), "a value another session wrote and freed"
        assert not world.neighbour.failures, world.neighbour.failures
        assert world.daemon.process is not None and world.daemon.process.poll() is None, "the daemon died"
        # the learning session ran records inside learned runs (the clean steps at least); the plain one never
        assert learned_ops(world.daemon, "learned") > before and learned_ops(world.daemon, "plain") == 0
        world.cases += 1
        return [x for x in seen[0] if x[0]]  # the errors
    finally:
        for s in sessions:
            s.close()


def _short(answer: tuple[Any, ...]) -> str:
    """An answer for an assertion message: an error as it is, a value as its size and a digest."""
    if isinstance(answer[1], str):
        return repr(answer)
    return f"a value of {len(answer[1])} bytes ({hashlib.sha256(answer[1]).hexdigest()[:12]})"


def learned_ops(daemon: DaemonHandle, tenant: str) -> float:
    """gpupool_eager_learned_ops_total of a tenant: its eager records run inside learned runs."""
    text = scrape(daemon.metrics_port)
    pattern = rf'^gpupool_eager_learned_ops_total{{[^}}]*tenant="{tenant}"[^}}]*}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


# ---- deterministic attacks ----


def _eager(cmds: list[device_pb2.Command]) -> list[int]:
    return [i for i, c in enumerate(cmds) if c.WhichOneof("cmd") == "eager_op"]


def _set(cmd: device_pb2.Command, at: int, fmt: str, value: Any) -> device_pb2.Command:
    rec = bytearray(cmd.eager_op)
    struct.pack_into(fmt, rec, at, value)
    return device_pb2.Command(eager_op=bytes(rec))


def _inputs_from_the_step(cmds: list[device_pb2.Command]) -> list[tuple[int, int, int]]:
    """(record index, input offset, index of the record that bound it) of inputs an earlier record made."""
    made: dict[int, int] = {}
    out = []
    for i in _eager(cmds):
        outs, ins, _, _ = fields(cmds[i].eager_op)
        for at in ins:
            h = struct.unpack_from("<Q", cmds[i].eager_op, at)[0]
            if h in made:
                out.append((i, at, made[h]))
        for at in outs:
            h = struct.unpack_from("<Q", cmds[i].eager_op, at)[0]
            if h:
                made[h] = i
    return out


def _every(n: int) -> Callable[[list[Any]], list[Any]]:
    return lambda xs: xs[:: max(1, len(xs) // n)]


def _internal_input(handle: Callable[[int, int], int], picks: int = 6) -> Mutation:
    """Set some inputs that came from earlier records of the step to `handle(base, old handle)`."""

    def mutate(cmds: list[device_pb2.Command], base: int) -> list[device_pb2.Command]:
        cmds = list(cmds)
        for i, at, _ in _every(picks)(_inputs_from_the_step(cmds)):
            old = struct.unpack_from("<Q", cmds[i].eager_op, at)[0]
            cmds[i] = _set(cmds[i], at, "<Q", handle(base, old))
        return cmds

    return mutate


def _outputs(handle: Callable[[list[device_pb2.Command], int, int, int], int], picks: int = 6) -> Mutation:
    """Set the first output of some records to `handle(cmds, record index, base, old)`."""

    def mutate(cmds: list[device_pb2.Command], base: int) -> list[device_pb2.Command]:
        cmds = list(cmds)
        for i in _every(picks)(_eager(cmds)):
            outs = fields(cmds[i].eager_op)[0]
            if outs:
                old = struct.unpack_from("<Q", cmds[i].eager_op, outs[0])[0]
                cmds[i] = _set(cmds[i], outs[0], "<Q", handle(cmds, i, base, old))
        return cmds

    return mutate


def _first_input(cmds: list[device_pb2.Command], i: int, base: int, old: int) -> int:
    ins = handles_of(cmds[i])[1]
    return ins[0] if ins else old


def _held_by_the_run(cmds: list[device_pb2.Command], i: int, base: int, old: int) -> int:
    """The output of an earlier record of the step that a later record still takes (what a run keeps)."""
    for j, _, made in _inputs_from_the_step(cmds):
        if made < i < j:
            return handles_of(cmds[made])[0][0]
    return old


def _interleave(extra: Callable[[int], list[device_pb2.Command]]) -> Mutation:
    def mutate(cmds: list[device_pb2.Command], base: int) -> list[device_pb2.Command]:
        out: list[device_pb2.Command] = []
        for n, c in enumerate(cmds):
            out.append(c)
            if n % 7 == 3:
                out += extra(base)
        return out

    return mutate


def _free_inputs_midway(cmds: list[device_pb2.Command], base: int) -> list[device_pb2.Command]:
    """Free a handle an earlier record of the step made just before the record that takes it."""
    cmds = list(cmds)
    for i, at, _ in reversed(_every(5)(_inputs_from_the_step(cmds))):
        h = struct.unpack_from("<Q", cmds[i].eager_op, at)[0]
        cmds.insert(i, device_pb2.Command(free=device_pb2.Free(handles=[h])))
    return cmds


def _numbers(value: float | int) -> Mutation:
    def mutate(cmds: list[device_pb2.Command], base: int) -> list[device_pb2.Command]:
        cmds = list(cmds)
        for i in _eager(cmds):
            _, _, ints, floats = fields(cmds[i].eager_op)
            for at in floats if isinstance(value, float) else ints:
                cmds[i] = _set(cmds[i], at, "<d" if isinstance(value, float) else "<q", value)
        return cmds

    return mutate


def _bytes(edit: Callable[[bytes], bytes], picks: int = 5) -> Mutation:
    def mutate(cmds: list[device_pb2.Command], base: int) -> list[device_pb2.Command]:
        cmds = list(cmds)
        for i in _every(picks)(_eager(cmds)):
            cmds[i] = device_pb2.Command(eager_op=edit(cmds[i].eager_op))
        return cmds

    return mutate


def _reshape_params(name: str, args: Callable[[int], list[tensor_pb2.Arg]]) -> Mutation:
    """Before the step: an in-place op (an `Op` message) on every uploaded tensor (parameters, batch): their
    metas change in place, through ops whose epoch counting the learned runs rely on."""

    def mutate(cmds: list[device_pb2.Command], base: int) -> list[device_pb2.Command]:
        params = [base + h for h in range(1, 64)]
        ops = [
            device_pb2.Command(op=device_pb2.Op(name=name, args=[tensor_pb2.Arg(tensor=h), *args(h)], outputs=[0]))
            for h in params
        ]
        return ops + cmds

    return mutate


def _grow_batch(cmds: list[device_pb2.Command], base: int) -> list[device_pb2.Command]:
    """Before the step: the batch (the first addmm's input) grows in place to 50000 rows, the same tensor object:
    a run that kept its learned verdict (an epoch not bumped by `resize_`) would admit a few bytes per record
    and meet the quota only after allocating, with another error than the plain path's refusal."""
    first = next(i for i in _eager(cmds) if len(handles_of(cmds[i])[1]) == 3)
    x = handles_of(cmds[first])[1][1]
    size = tensor_pb2.Arg(ints=tensor_pb2.IntList(values=[50000, 8]))
    grow = device_pb2.Op(name="aten::resize_.default", args=[tensor_pb2.Arg(tensor=x), size], outputs=[0])
    return [device_pb2.Command(op=grow), *cmds]


UNINITIALIZED = {  # op id (unused by the recording) -> the op and its arguments after `self`, None: no `self`
    901: ("aten::empty_like.default", []),
    902: ("aten::new_empty.default", [[4096]]),
    903: ("aten::resize.default", [[4096]]),
    904: ("aten::resize_as.default", ["template"]),
    905: ("aten::empty.memory_format", None),
    906: ("aten::new_empty_strided.default", [[4096], [1]]),
}
EXTRA_NAMES = {op_id: name.encode() for op_id, (name, _) in UNINITIALIZED.items()}


def _uninitialized() -> Mutation:
    """Records whose outputs start as the allocator's memory, inside the step (so inside its learned runs from
    the third time on): what they hand out must be zeros (and what `self` gave), never freed bytes of others."""
    defined: set[tuple[int, int]] = set()  # (session base, op id): names go with each session's first use

    def mutate(cmds: list[device_pb2.Command], base: int) -> list[device_pb2.Command]:
        return _with_uninitialized(cmds, base, defined)

    return mutate


def _with_uninitialized(
    cmds: list[device_pb2.Command], base: int, defined: set[tuple[int, int]]
) -> list[device_pb2.Command]:
    x = next(ins[0] for i in _eager(cmds) if (ins := handles_of(cmds[i])[1]))  # a parameter
    extra = []
    for n, (op_id, (name, rest)) in enumerate(UNINITIALIZED.items()):
        known = (base, op_id) in defined
        defined.add((base, op_id))
        args = [compact.encode_value([4096])] if rest is None else [compact.tensor(x)]
        for value in rest or []:
            args.append(compact.tensor(base + 0x7100) if value == "template" else compact.encode_value(value))
        parts = [compact.head(op_id, None if known else name, [base + 0x7000 + n]), bytes([len(args)]), *args, b"\0"]
        extra.append(device_pb2.Command(eager_op=b"".join(parts)))
    template = device_pb2.Command(
        upload=device_pb2.Upload(
            handle=base + 0x7100,
            meta=tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(torch.float32), shape=[64, 64]),
            data=b"\0" * 4 * 4096,
            last=True,
        )
    )
    return [template, *cmds[:3], *extra, *cmds[3:]]


def _quota_eater(cmds: list[device_pb2.Command], base: int) -> list[device_pb2.Command]:
    """Fill the quota but a few KiB mid-step: the run's later records hit the quota."""
    at = len(cmds) // 2
    meta = tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(torch.float32), shape=[(QUOTA - 64 * 1024) // 4 - 4096])
    up = device_pb2.Upload(handle=base + 9999, meta=meta, data=b"", last=False)
    return [*cmds[:at], device_pb2.Command(upload=up), *cmds[at:]]


A = tensor_pb2.Arg
ATTACKS: dict[str, Mutation] = {
    "another session's handle as an internal input": _internal_input(lambda base, old: (1 << 32) + 1),
    "a never created handle as an internal input": _internal_input(lambda base, old: base + 77777),
    "handle 0 as an internal input": _internal_input(lambda base, old: 0),
    "the handle base as an internal input": _internal_input(lambda base, old: base),
    "an internal input taken from another record of the step": _internal_input(lambda base, old: old + 1),
    "freed handles mid-run": _free_inputs_midway,
    "an output equal to the record's input": _outputs(_first_input),
    "an output equal to a handle the run holds": _outputs(_held_by_the_run),
    "an output equal to the previous record's": _outputs(lambda c, i, base, old: (old - 1) % 2**64),
    "another session's handle as an output": _outputs(lambda c, i, base, old: (1 << 32) + 5),
    "handle 0 as an output (the result dropped)": _outputs(lambda c, i, base, old: 0),
    "the handle base as an output": _outputs(lambda c, i, base, old: base),
    "handle 2^64-1 as an output": _outputs(lambda c, i, base, old: 2**64 - 1),
    "uploads, frees, gets and seeds between records": _interleave(
        lambda base: [
            device_pb2.Command(seed=device_pb2.Seed(seed=5)),
            device_pb2.Command(free=device_pb2.Free(handles=[base + 5000])),
            device_pb2.Command(
                upload=device_pb2.Upload(
                    handle=base + 5000,
                    meta=tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(torch.float32), shape=[2]),
                    data=b"\0" * 8,
                    last=True,
                )
            ),
        ]
    ),
    "a half-finished upload between records": _interleave(
        lambda base: [
            device_pb2.Command(
                upload=device_pb2.Upload(
                    handle=base + 1,  # the first uploaded tensor, uploaded again: half of it
                    meta=tensor_pb2.TensorMeta(dtype=wire.dtype_to_proto(torch.float32), shape=[4]),
                    data=b"\0" * 8,
                )
            )
        ]
    ),
    "records cut by one byte": _bytes(lambda r: r[:-1]),
    "records extended by one byte": _bytes(lambda r: r + b"\0"),
    "NaN step sizes": _numbers(float("nan")),
    "infinite step sizes": _numbers(float("inf")),
    "huge ints": _numbers(2**62),
    "negative ints": _numbers(-1),
    "t_ of every tensor before the step": _reshape_params("aten::t_.default", lambda h: []),
    "unsqueeze_ of every tensor before the step": _reshape_params("aten::unsqueeze_.default", lambda h: [A(i=0)]),
    "squeeze_ of every tensor before the step": _reshape_params("aten::squeeze_.default", lambda h: []),
    "resize_ of every tensor before the step": _reshape_params(
        "aten::resize_.default", lambda h: [A(ints=tensor_pb2.IntList(values=[2, 2]))]
    ),  # noqa: E501
    "as_strided_ of every tensor before the step": _reshape_params(
        "aten::as_strided_.default",
        lambda h: [A(ints=tensor_pb2.IntList(values=[1])), A(ints=tensor_pb2.IntList(values=[1]))],
    ),
    "set_ of every tensor to the first before the step": _reshape_params(
        "aten::set_.source_Tensor", lambda h: [A(tensor=h - (h & 0xFFFF) + 1)]
    ),
    "detach_ of every tensor before the step": _reshape_params("aten::detach_.default", lambda h: []),
    "the quota hit mid-run": _quota_eater,
    "the step's records reversed": lambda cmds, base: list(reversed(cmds)),
    "the step's second half only": lambda cmds, base: cmds[len(cmds) // 2 :],
}


def test_the_recorded_loop_sends_view_arguments(world: World) -> None:
    """The shim's view ops (a Linear's weight.t(), the loss's views) travel as view arguments (compact.VIEW): the
    attacks below hit them (their handles as inputs, their sizes, strides and offsets as ints)."""
    views = 0
    for cmds in world.rec.steps:
        for i in _eager(cmds):
            rec = cmds[i].eager_op
            views += sum(rec[at - 1] == compact.VIEW for at in fields(rec)[1])
    assert views >= len(world.rec.steps)


def test_the_recorded_loop_sends_tensor_lists_with_views(world: World) -> None:
    """Adam's `_foreach_` lists of gradients hold views (a Linear's weight gradient is a `t()`): they travel as
    tensor lists with views (compact.VIEWS), whose elements' handles and geometries the attacks below hit."""
    per_step = []
    for cmds in world.rec.steps:
        lists: list[int] = []
        for i in _eager(cmds):
            fields(cmds[i].eager_op, lists)
        per_step.append(len(lists))
    assert all(per_step), per_step


@pytest.mark.parametrize("runner", ["native", "python"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_on_learned_runs(request: pytest.FixtureRequest, name: str, runner: str) -> None:
    world = request.getfixturevalue("world" if runner == "native" else "world_python")
    attack(world, ATTACKS[name])


@pytest.mark.parametrize("isolation", list(_WORLDS))
def test_uninitialized_outputs_inside_learned_runs_hold_no_freed_bytes(
    request: pytest.FixtureRequest, isolation: str
) -> None:
    w = request.getfixturevalue(_WORLDS[isolation])
    # all zeros but what `resize` keeps of `self` (the first parameter: 16 x 8 floats)
    zeros = {
        0x7000 + n: 512 if name.startswith("aten::resize") else 0 for n, (name, _) in enumerate(UNINITIALIZED.values())
    }
    errors = attack(w, _uninitialized(), steps=3, zeros=zeros)  # (the recording's freed handles answer NOT_FOUND)
    assert not [e for e in errors if e[1] in {_op(name) for name, _ in UNINITIALIZED.values()}], errors


def test_a_batch_grown_in_place_meets_the_quota_as_on_the_plain_path(world: World) -> None:
    outcomes = attack(world, _grow_batch, quota=4 * MiB)
    assert any(o[0] == "RESOURCE_EXHAUSTED" for o in outcomes), outcomes  # it did reach the quota


# ---- mutated frames (hypothesis) ----


@st.composite
def mutations(draw: Any) -> list[tuple[str, int, int]]:
    return draw(
        st.lists(
            st.tuples(
                st.sampled_from(["flip", "swap", "drop", "dup", "move", "foreign"]),
                st.integers(0, 2**16),
                st.integers(0, 2**16),
            ),
            min_size=1,
            max_size=6,
        )
    )


def _parsed(rec: bytes) -> tuple[list[int], list[int], list[int], list[int]]:
    """`fields` of a record, or none for one an earlier mutation mangled."""
    try:
        return fields(rec)
    except (AssertionError, IndexError, struct.error):
        return [], [], [], []


def mutated(plan: list[tuple[str, int, int]]) -> Mutation:
    def mutate(cmds: list[device_pb2.Command], base: int) -> list[device_pb2.Command]:
        cmds = list(cmds)
        eager = _eager(cmds)
        for what, a, b in plan:
            if not eager:
                break
            i, j = eager[a % len(eager)], eager[b % len(eager)]
            rec = cmds[i].eager_op
            if what == "flip":  # a byte of a handle or number: tags and counts stay (a record with another layout
                # reads bytes holding the session's base as tags and counts, and the two sessions' bases differ;
                # cut and extended records are deterministic cases)
                outs, ins, ints, floats = _parsed(rec)
                slots = outs + ins + ints + floats
                if slots:
                    at = slots[a % len(slots)] + b % 8
                    cmds[i] = device_pb2.Command(eager_op=rec[:at] + bytes([rec[at] ^ (1 + b % 255)]) + rec[at + 1 :])
            elif what == "swap":  # an input handle of one record into another record's input
                ins_i, ins_j = _parsed(rec)[1], _parsed(cmds[j].eager_op)[1]
                if ins_i and ins_j:
                    h = struct.unpack_from("<Q", cmds[j].eager_op, ins_j[b % len(ins_j)])[0]
                    cmds[i] = _set(cmds[i], ins_i[a % len(ins_i)], "<Q", h)
            elif what == "drop":
                cmds[i] = device_pb2.Command(free=device_pb2.Free())
            elif what == "dup":
                cmds.insert(j, cmds[i])
                eager = _eager(cmds)
            elif what == "move":
                c = cmds.pop(i)
                cmds.insert(j if j < len(cmds) else len(cmds), c)
                eager = _eager(cmds)
            elif what == "foreign":
                outs = _parsed(rec)[0]
                if outs:
                    cmds[i] = _set(cmds[i], outs[a % len(outs)], "<Q", (1 << 32) + b)
        return cmds

    return mutate


@pytest.mark.slow
@pytest.mark.parametrize("isolation", list(_WORLDS))
def test_mutated_frames_of_learned_runs(request: pytest.FixtureRequest, isolation: str) -> None:
    world = request.getfixturevalue(_WORLDS[isolation])

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        derandomize=not os.environ.get("GPUPOOL_FUZZ_RANDOM"),
    )
    @given(mutations())
    def fuzz(plan: list[tuple[str, int, int]]) -> None:
        attack(world, mutated(plan), steps=1)

    fuzz()
