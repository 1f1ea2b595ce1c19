"""A traced captured step's quiet run in one C++ call (round 41: graph._quick, native_runner `GraphPlan.run`) must do
exactly what `graph._run` does: the same outputs and kept tensors bound, the same bytes counted, and every refusal
the same (an input of other metadata, bytes sent by value of another length, a handle freed, rebound, of another
session, a persistent tensor rebound or reshaped in place, a traced function that raises), with the session left
as the Python path leaves it. Twin sessions run the same commands, one with the C++ call and one without (its
graph's `fast` set to False: `_run` always)."""

from __future__ import annotations

import random
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from gpupool.server import devices, graph, slices
from gpupool.server.devices import FakeDevice
from gpupool.server.executor import CommandExecutor
from gpupool.server.sessions import DeviceMemory, WorkerSession
from test_server_slice_timer import _Event, _Stream

from gpupool import wire
from gpupool._proto import device_pb2, tensor_pb2
from gpupool.errors import InvalidArgument

GID = 1


class Twin:
    """A session, its executor and its graph: two persistent tensors `w` (4, 3) and `v` (3,), a batch `x` sent
    by value and `b` by handle; it keeps `x + w` and outputs `(x + w + b) * 2 + v`."""

    def __init__(self, quick: bool) -> None:
        dev = FakeDevice(0, "h", 1 << 30)
        self.s = s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
        self.ex = CommandExecutor(slices.SliceLedger())
        self.ex.exclusive_rng = True  # as in a session's worker process (graph_trace.refusal)
        assert self.ex.native is not None
        self.base = s.handle_base
        self.w, self.v, self.kept, self.b = self.base + 1, self.base + 2, self.base + 3, self.base + 4
        s.bind(self.w, torch.arange(12.0).reshape(4, 3))
        s.bind(self.v, torch.ones(3))
        s.bind(self.b, torch.full((4, 3), 0.5))

        def t(k: int) -> tensor_pb2.Arg:
            return tensor_pb2.Arg(tensor=k)

        body = [
            device_pb2.Op(name="aten::add.Tensor", args=[t(1), t(3)], outputs=[5]),
            device_pb2.Op(name="aten::add.Tensor", args=[t(5), t(2)], outputs=[6]),
            device_pb2.Op(name="aten::mul.Tensor", args=[t(6), tensor_pb2.Arg(f=2.0)], outputs=[7]),
            device_pb2.Op(name="aten::add.Tensor", args=[t(7), t(4)], outputs=[8]),
        ]
        meta = wire.meta_to_proto(torch.ones(4, 3))
        msg = device_pb2.DefineGraph(
            graph_id=GID, inputs=2, input_meta=[meta, meta], persistent=[self.w, self.v], ops=body, outputs=[8],
            writes=[device_pb2.GraphWrite(handle=self.kept, slot=5)],
        )  # fmt: skip
        self.ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
        assert s.error is None, s.error
        self.g = self.ex.graphs._of(s)[GID]
        if not quick:
            self.g.fast = False
        self.next = 100

    def run(self, x: bytes | None = None, b: int | None = None, outputs: list[int] | None = None,
            inputs: list[int] | None = None) -> tuple[Any, ...]:  # fmt: skip
        """RunGraph: its error (code, message) or None, and the session's state after it."""
        if outputs is None:
            self.next += 1
            outputs = [self.base + self.next]
        msg = device_pb2.RunGraph(graph_id=GID, inputs=inputs or [0, self.b if b is None else b], outputs=outputs)
        msg.input_data.append(torch.full((4, 3), float(self.next)).numpy().tobytes() if x is None else x)
        self.s.error = None
        self.ex.execute(self.s, device_pb2.Command(run_graph=msg), _no_reply)
        err = self.s.error
        return (None if err is None else (err.code, err.message)), self.state()

    def op(self, name: str, handle: int) -> None:
        """An in-place op on `handle` (a command that may change metadata: the next run is not quiet)."""
        op = device_pb2.Op(name=name, args=[tensor_pb2.Arg(tensor=handle)], outputs=[handle])
        self.s.error = None
        self.ex.execute(self.s, device_pb2.Command(op=op), _no_reply)
        assert self.s.error is None, self.s.error

    def command(self, cmd: device_pb2.Command) -> tuple[Any, ...]:
        """Any other command: its error message or None, and the session's state after it."""
        self.s.error = None
        self.ex.execute(self.s, cmd, _no_reply)
        return (None if self.s.error is None else self.s.error.message), self.state()

    def state(self) -> tuple[Any, ...]:
        s = self.s
        tensors = {h - self.base: (tuple(t.shape), t.stride(), t.tolist()) for h, t in s.tensors.items()}
        poisoned = {h - self.base: (p.code, p.message) for h, p in s.poisoned.items()}
        storages = sorted(n for _, n in s._storages.values())
        return tensors, poisoned, storages, s.used, s.memory.used, s.ops, self.g.runs


def _no_reply(item: object) -> None:
    raise AssertionError("graph commands are not answered")


@pytest.fixture
def twins(native_runner_module: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Twin, Twin, list[WorkerSession]]:
    """(quick, slow, the sessions each `graph._run` call ran for)."""
    ran: list[WorkerSession] = []
    real = graph._run

    def counted(host: Any, s: WorkerSession, *a: Any, **k: Any) -> Any:
        ran.append(s)
        return real(host, s, *a, **k)

    monkeypatch.setattr(graph, "_run", counted)
    return Twin(True), Twin(False), ran


def _both(quick: Twin, slow: Twin, step: Any) -> Any:
    got = step(quick)
    assert got == step(slow)
    return got[0]


def test_a_quiet_traced_run_takes_one_cpp_call_and_binds_what_the_python_binds(twins: Any) -> None:
    """From the run after the trace on, with nothing between runs, `_run` is not called; outputs, kept tensors,
    storages and bytes are the Python path's. On 50464ae every run called `_run`."""
    quick, slow, ran = twins
    for _ in range(6):
        assert _both(quick, slow, lambda t: t.run()) is None
    assert quick.g.traced is not None and quick.g.fast not in (None, False)
    first = ran.count(quick.s)
    assert first <= 3, first  # the runs before the trace and the first traced one, not quiet yet
    for _ in range(4):
        assert _both(quick, slow, lambda t: t.run()) is None
    assert ran.count(quick.s) == first
    assert ran.count(slow.s) == 10


@pytest.mark.parametrize(
    "bad",
    [
        "short bytes", "long bytes", "input shape", "input strides", "input dtype", "input offset", "input freed",
        "input uploading", "one input", "output of another session", "output handle 0", "too many outputs",
        "persistent rebound", "persistent freed", "persistent reshaped in place", "traced function raises",
        "traced function returns one tensor",
    ],
)  # fmt: skip
def test_every_refusal_and_failure_of_a_quiet_run_is_the_python_paths(twins: Any, bad: str) -> None:
    """Each bad case after quiet runs: the same error on both twins, the same state (outputs and kept tensors
    poisoned or unbound, bytes, storages, runs), and the next good run again the same (and quick again)."""
    quick, slow, ran = twins
    for _ in range(5):
        assert _both(quick, slow, lambda t: t.run()) is None

    def step(t: Twin) -> Any:
        s = t.s
        if bad == "short bytes":
            return t.run(x=bytes(47))
        if bad == "long bytes":
            return t.run(x=bytes(49))
        if bad == "input shape":
            s.bind(t.b, torch.ones(3, 4))
        elif bad == "input strides":
            s.bind(t.b, torch.ones(3, 4).t())
        elif bad == "input dtype":
            s.bind(t.b, torch.ones(4, 3, dtype=torch.float64))
        elif bad == "input offset":
            s.bind(t.b, torch.ones(13)[1:].view(4, 3))
        elif bad == "input freed":
            s.free([t.b])
        elif bad == "input uploading":
            s.uploads[t.b] = 0
            try:
                return t.run()
            finally:
                s.uploads.pop(t.b)
        elif bad == "one input":
            return t.run(inputs=[0])
        elif bad == "output of another session":
            return t.run(outputs=[(7 << 32) + 5])
        elif bad == "output handle 0":
            return t.run(outputs=[t.base])
        elif bad == "too many outputs":
            return t.run(outputs=[t.base + 50, t.base + 51])
        elif bad == "persistent rebound":
            s.bind(t.w, torch.zeros(3, 4).t())  # same sizes, other strides; no command counted
        elif bad == "persistent freed":
            s.free([t.v])
        elif bad == "persistent reshaped in place":
            t.op("aten::t_.default", t.w)
        elif bad == "traced function raises":
            real = t.g.traced.fn

            def boom(*a: Any) -> Any:
                raise RuntimeError("boom\nRuntimeError: the kernel failed")

            t.g.traced.fn = boom
            try:
                return t.run()
            finally:
                t.g.traced.fn = real
        elif bad == "traced function returns one tensor":
            real = t.g.traced.fn
            t.g.traced.fn = lambda *a: real(*a)[0]
            try:
                return t.run()
            finally:
                t.g.traced.fn = real
        return t.run()

    err = _both(quick, slow, step)
    assert err is not None, bad
    # the session as good as before, then quiet again
    if bad in ("input shape", "input strides", "input dtype", "input offset", "input freed"):
        for t in (quick, slow):
            t.s.bind(t.b, torch.full((4, 3), 0.5))
    elif bad == "persistent rebound":
        for t in (quick, slow):
            t.s.bind(t.w, torch.arange(12.0).reshape(4, 3))
    elif bad == "persistent freed":
        for t in (quick, slow):
            t.s.bind(t.v, torch.ones(3))
    elif bad == "persistent reshaped in place":
        for t in (quick, slow):
            t.op("aten::t_.default", t.w)
    before = ran.count(quick.s)
    for _ in range(3):
        assert _both(quick, slow, lambda t: t.run()) is None
    assert ran.count(quick.s) - before <= 1  # the first run after a failure or a command reads them again


def test_a_graph_that_does_not_qualify_takes_the_python_path(native_runner_module: Any) -> None:
    """A session of a subclass of `WorkerSession` (its own `rebind_all` may differ) keeps `_run`: no plan."""

    class Own(WorkerSession):
        pass

    t = Twin(True)
    t.s.__class__ = Own
    for _ in range(5):
        assert t.run()[0] is None
    assert t.g.traced is not None and t.g.fast is False


def test_a_closed_sessions_graphs_go_with_it(native_runner_module: Any) -> None:
    """`GraphTable._of` keeps the session it last served and its graphs for the next run (round 41): that must not
    keep a closed session's graphs alive (its host memory, a CUDA graph's pool), and another session's look-up
    must find its own. (Pins what held on 50464ae, where only the weak dictionary held them.)"""
    import gc
    import weakref

    one, two = Twin(True), Twin(True)
    two.ex = one.ex  # two sessions of one executor
    for t in (one, two):
        assert t.run()[0] is None or t is two  # (two's graph is defined on its own executor: NotFound here)
    table = one.ex.graphs
    assert table._of(one.s) is table._of(one.s) and GID in table._of(one.s)
    assert table._of(two.s) == {}
    assert table._of(one.s)[GID] is one.g
    gone = weakref.ref(one.g)
    one.g = None  # type: ignore[assignment]
    one.s = None  # type: ignore[assignment]
    gc.collect()
    assert gone() is None
    assert table._last is None or table._last[0]() is not None


def _random_command(t: Twin, c: dict[str, Any]) -> Any:
    """Command `c` (`test_a_random_sequence_...`'s draw) on twin `t`: its error and the session's state."""
    hs = [t.w, t.v, t.b, t.kept, t.base + 200, t.base + c["fresh"], 0, (9 << 32) + 1]
    h, kind = hs[c["at"]], c["kind"]
    if kind == "run":
        return t.run()
    if kind == "outputs":
        return t.run(outputs=[h, hs[c["other"]]][: c["n_out"]])
    if kind == "inputs":
        return t.run(inputs=[0, h])
    if kind == "bytes":
        return t.run(x=bytes(c["nbytes"]))
    if kind == "upload":
        value = torch.ones(c["shape"], dtype=c["dtype"])
        up = device_pb2.Upload(handle=h, meta=wire.meta_to_proto(value), data=value.numpy().tobytes(), last=True)
        return t.command(device_pb2.Command(upload=up))
    if kind == "free":
        return t.command(device_pb2.Command(free=device_pb2.Free(handles=[h])))
    op = device_pb2.Op(name=c["name"], args=[tensor_pb2.Arg(tensor=h)], outputs=[h])
    return t.command(device_pb2.Command(op=op))


@pytest.mark.parametrize("seed", range(16))
def test_a_random_sequence_of_commands_leaves_both_paths_the_same(twins: Any, seed: int) -> None:
    """Seeded sequences of RunGraphs (output handles that alias a persistent tensor, the input, the kept handle,
    each other, another session's, handle 0; input handles of any of those; bytes of other lengths), uploads that
    bind handles anew (other shapes and dtypes too), frees and in-place metadata ops between them: after every
    command both twins hold the same tensors, errors and bytes (round 41's review, graphrev41: pins what holds on
    282dfc8; on 50464ae both twins took `_run`). Quiet runs happen in every sequence: the C++ call is compared."""
    quick, slow, ran = twins
    rng = random.Random(seed)
    for _ in range(120):
        c = {
            "kind": rng.choice(["run"] * 12 + ["outputs", "inputs", "bytes", "upload", "free", "op"]),
            "at": rng.randrange(8), "other": rng.randrange(8), "n_out": rng.choice([0, 1, 1, 2]),
            "fresh": rng.randrange(100, 110), "shape": rng.choice([(4, 3), (3, 4), (3,), (12,)]),
            "dtype": rng.choice([torch.float32, torch.float64]), "nbytes": rng.choice([48, 47, 0]),
            "name": rng.choice(["aten::t_.default", "aten::squeeze_.default", "aten::relu_.default"]),
        }  # fmt: skip
        _both(quick, slow, lambda t, c=c: _random_command(t, c))
    assert ran.count(slow.s) - ran.count(quick.s) > 0  # some runs took the C++ call


def test_a_quiet_run_reads_the_messages_bytes_in_cpp(twins: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 42: a quiet run's message is read by the plan from its bytes (`GraphPlan.run_raw`, from
    `GraphTable.run`): neither `_quick` (its lists of upb's containers) nor `_run` is called, and both twins end the
    same, also where the inputs' bytes were taken out of the message (`data`, as a slice's `strip_payload` hands
    them). On ca5fb68 every quiet run called `_quick`."""
    quick, slow, ran = twins
    for _ in range(5):
        assert _both(quick, slow, lambda t: t.run()) is None
    calls: list[int] = []
    real = graph._quick

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(graph, "_quick", counted)
    before = ran.count(quick.s)

    def taken(t: Twin) -> Any:  # the batch's bytes beside the message, as `_WithTakenBytes` passes them
        t.next += 1
        msg = device_pb2.RunGraph(graph_id=GID, inputs=[0, t.b], outputs=[t.base + t.next])
        t.s.error = None
        t.ex.execute(t.s, device_pb2.Command(run_graph=msg), _no_reply, [bytes(48), b""])
        err = t.s.error
        return (None if err is None else (err.code, err.message)), t.state()

    for _ in range(3):
        assert _both(quick, slow, lambda t: t.run()) is None
        assert _both(quick, slow, taken) is None
    assert calls.count(1) == 6  # the slow twin's runs only (its plan is False: `_quick` declines)
    assert ran.count(quick.s) == before


def test_a_quiet_run_the_bytes_reading_declines_takes_the_python_path(twins: Any) -> None:
    """A message with `drop_writes` is run by the Python path (the kept handle dropped first, then `_quick`): the
    same state on both twins, and quick again after. `run_raw` of bytes other than what it reads (a field it does
    not read, a truncated field, a wrong wire type) returns None with nothing done; the same message with its
    repeated fields not packed runs as packed."""
    quick, slow, _ = twins
    for _ in range(5):
        assert _both(quick, slow, lambda t: t.run()) is None

    def dropping(t: Twin) -> Any:
        t.next += 1
        msg = device_pb2.RunGraph(graph_id=GID, inputs=[0, t.b], outputs=[t.base + t.next], drop_writes=[t.kept])
        msg.input_data.append(torch.full((4, 3), 3.0).numpy().tobytes())
        t.s.error = None
        t.ex.execute(t.s, device_pb2.Command(run_graph=msg), _no_reply)
        err = t.s.error
        return (None if err is None else (err.code, err.message)), t.state()

    kept = quick.s.tensors[quick.kept].tolist()
    assert _both(quick, slow, dropping) is None
    assert quick.kept not in quick.g.writes and quick.s.tensors[quick.kept].tolist() == kept  # bound no more
    for _ in range(2):
        assert _both(quick, slow, lambda t: t.run()) is None
    t, g, s = quick, quick.g, quick.s
    x = torch.full((4, 3), 7.0).numpy().tobytes()

    def varint(v: int) -> bytes:
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)

    data = b"\x52" + varint(len(x)) + x + b"\x52\x00"  # input_data: x, then b's empty entry
    before = t.state()
    for bad in (b"\x20" + varint(t.kept), b"\x28\x01", b"\x10", b"\x12\x05\x01", b"\x0a\x01\x01"):
        out = t.base + 300
        raw = b"\x08\x01" + b"\x10\x00" + b"\x10" + varint(t.b) + b"\x18" + varint(out) + data + bad
        assert g.fast.run_raw(s, raw, None, g.quiet_refs, g.writes, g.traced.fn) is None, bad
        assert t.state() == before
    out = t.base + 301
    unpacked = b"\x08\x01" + b"\x10\x00" + b"\x10" + varint(t.b) + b"\x18" + varint(out) + data
    s.mutations += 1  # as `execute` counts a RunGraph
    assert g.fast.run_raw(s, unpacked, None, g.quiet_refs, g.writes, g.traced.fn) is True
    g.quiet = s.mutations
    packed = device_pb2.RunGraph(graph_id=GID, inputs=[0, t.b], outputs=[out], input_data=[x, b""])
    slow.s.error = None
    slow.ex.execute(slow.s, device_pb2.Command(run_graph=packed), _no_reply)
    assert slow.s.error is None
    want = ((7.0 + torch.arange(12.0).reshape(4, 3) + 0.5) * 2 + 1).tolist()
    assert s.tensors[out].tolist() == slow.s.tensors[out].tolist() == want


@pytest.mark.parametrize("seed", range(8))
def test_run_raw_reads_any_bytes_as_upb_reads_them(twins: Any, seed: int) -> None:
    """`GraphPlan.run_raw` as a parser of hostile bytes (graphrev42): seeded RunGraph bytes (fields in any order and
    repeated, inputs and outputs packed, unpacked or both, overlong and 10-byte varints, handles up to 2**64 - 1,
    counts other than the graph's, `drop_writes`, unknown fields, other wire types, truncations, random byte
    damage) run with a traced function that records its arguments and raises (nothing is bound). Where upb parses
    the bytes to a message with no `drop_writes` and no unknown field: the same answer and the same arguments as
    `GraphPlan.run` of upb's lists; where it finds either, or refuses the bytes: None, nothing bound. Two mutants of
    `graph_run_raw` each fail some seeds: a packed field's last varint read past the field's length, `drop_writes`
    read as outputs. (Pins what holds on f8bb937.)"""
    quick, _, _ = twins
    for _ in range(5):
        assert quick.run()[0] is None
    t, g, s = quick, quick.g, quick.s
    plan, refs = g.fast, g.quiet_refs
    assert plan and refs is not None
    rng = random.Random(seed)
    x = torch.full((4, 3), 7.0).numpy().tobytes()

    def vi(v: int) -> bytes:
        return _varint(v, rng.choice([0, 0, 0, 1, 2]))

    def handle() -> int:
        return rng.choice([0, 0, t.b, t.kept, t.w, t.base + 200, (9 << 32) + 1, (1 << 64) - 1, 1 << 63, 5])

    def field() -> bytes:
        k = rng.random()
        if k < 0.08:
            return b"\x08" + vi(rng.choice([GID, GID, 2, (1 << 64) - 1]))
        if k < 0.5:  # inputs / outputs, one or packed
            f = rng.choice([2, 3])
            if rng.random() < 0.5:
                return bytes([f << 3]) + vi(handle())
            body = b"".join(vi(handle()) for _ in range(rng.randrange(4)))
            return bytes([f << 3 | 2]) + vi(len(body)) + body
        if k < 0.8:
            d = rng.choice([x, x, b"", bytes(47), bytes(rng.randrange(100))])
            return b"\x52" + vi(len(d)) + d
        if k < 0.85:
            return b"\x20" + vi(handle())  # drop_writes
        if k < 0.9:
            return bytes([rng.choice([0x11, 0x15, 0x0A, 0x50, 0x2A, 0x3B, 0x78])]) + bytes(rng.randrange(10))
        return _varint(rng.randrange(5, 3000) << 3) + vi(rng.randrange(1 << 20))  # an unknown varint field

    def repeated(f: int, values: list[int]) -> list[bytes]:  # in runs, each packed or not
        out, i = [], 0
        while i < len(values):
            j = rng.randrange(i + 1, len(values) + 1)
            if rng.random() < 0.5:
                body = b"".join(vi(v) for v in values[i:j])
                cut = rng.random() < 0.1 and body[-1:] != b"\x00"  # the length ends inside the last varint
                out.append(bytes([f << 3 | 2]) + vi(len(body) - cut) + body)
            else:
                out += [bytes([f << 3]) + vi(v) for v in values[i:j]]
            i = j
        return out

    def damage(b: bytes) -> bytes:
        if not b or rng.random() < 0.75:
            return b
        i = rng.randrange(len(b))
        k = rng.randrange(3)
        if k == 0:
            return b[:i]
        if k == 1:
            return b[:i] + bytes([rng.randrange(256)]) + b[i + 1 :]
        return b[:i] + bytes([rng.randrange(256)]) + b[i:]

    class Stop(Exception):
        pass

    picks = len(g.traced.picks)

    def spy(seen: list[Any]) -> Any:
        def fn(*args: Any) -> Any:
            live = {id(v): h for h, v in s.tensors.items()}
            seen.append(
                [live.get(id(a), None if not isinstance(a, torch.Tensor) else a.tolist()) for a in args[:picks]]
            )
            seen.append([live.get(id(a), "fresh") for a in args[picks:]])  # the kept tensors' buffers (round 52)
            raise Stop

        return fn

    before = t.state()
    answered = 0
    for _ in range(400):
        fields = [b"\x08" + vi(GID)] + [field() for _ in range(rng.randrange(4))]
        if rng.random() < 0.7:  # a message the graph may run: its two inputs and their bytes, outputs
            fields += repeated(2, [rng.choice([0, t.b]), rng.choice([0, t.b, 0, (1 << 64) - 1])])
            fields += repeated(3, [t.base + rng.randrange(300, 400) for _ in range(rng.choice([0, 1, 1, 2]))])
            fields += [b"\x52" + vi(len(d)) + d for d in rng.choice([[x, b""], [x, x], [x], [b"", x], []])]
        rng.shuffle(fields)
        raw = damage(b"".join(fields))
        got: list[Any] = []
        r = plan.run_raw(s, raw, None, refs, g.writes, spy(got))
        assert t.state() == before, raw
        try:
            msg = device_pb2.RunGraph.FromString(raw)
        except DecodeError:
            assert r is None, raw  # upb refuses them (the daemon never hands such bytes on): None, nothing bound
            continue
        known = device_pb2.RunGraph(
            graph_id=msg.graph_id, inputs=msg.inputs, outputs=msg.outputs, input_data=msg.input_data
        )
        if msg.drop_writes or known.ByteSize() != msg.ByteSize():  # an unknown field (upb keeps its bytes)
            assert r is None, raw
            continue
        want: list[Any] = []
        r_type, r = type(r), None  # (its traceback holds the call's arguments: the kept tensor's buffer, round 52)
        w = plan.run(s, msg.inputs[:], msg.outputs[:], msg.input_data[:], refs, g.writes, spy(want))
        assert t.state() == before, raw
        assert (r_type is type(None)) == (w is None) and got == want, raw
        if w is not None:
            assert r_type is Stop and type(w) is Stop
            answered += 1
    assert answered > 0


# ---- round 43: a frame of one RunGraph read from its bytes (`slices.lone_run_graph`, `CommandExecutor.run_graph_raw`)


def _varint(v: int, extra: int = 0) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F or extra else 0))
        v >>= 7
        if not v:
            if extra:
                out += b"\x80" * (extra - 1) + b"\x00"
            return bytes(out)


def _frame_of(body: bytes, extra: int = 0) -> bytes:
    """A ClientFrame of one command whose `run_graph` holds `body` (`extra`: overlong lengths)."""
    cmd = b"\xaa\x01" + _varint(len(body), extra) + body
    return b"\x0a" + _varint(len(cmd), extra) + cmd


def _slice(t: Twin, payload: bytes, budget: float = 10.0) -> tuple[Any, ...]:
    """`slices.run_commands` of a frame's bytes as a worker runs it (the payload a view of its shared memory): what
    the result says, the session's error, and its state. The slow twin's slice runs through `run_commands`' plain
    loop (round 44: its `execute` a function with no executor behind it: every frame parsed whole by upb, the
    reference), the quick twin's as a worker's."""
    t.s.error = None
    req = slices.SliceRequest(1 << 30, 1 << 20, budget, memoryview(bytearray(payload)))
    marks: list[int] = []
    execute = t.ex.execute if t.g.fast is not False else lambda *a: t.ex.execute(*a)
    try:
        r = slices.run_commands(t.s, execute, t.ex.ledger, req, t.s.memory.device.slice_timer(), marks.append)
    except (DecodeError, InvalidArgument):  # (a frame that does not split: the front refuses it, no worker sees it)
        return ("DecodeError",), t.state()
    if r.malformed:  # (round 44, reader44: the commands before the one protobuf refuses ran, nothing after)
        return ("malformed", r.executed, marks), t.state()
    err = t.s.error
    said = (r.executed, r.partial, r.replies, dict(r.errors), dict(r.events), r.ops, r.used, r.handles, marks)
    return said, (None if err is None else (err.code, err.message)), t.state()


def _same(quick: Twin, slow: Twin, step: Any) -> Any:
    got = step(quick)
    assert got == step(slow)
    return got


def _run_body(t: Twin, out: int | None = None, b: int | None = None) -> bytes:
    if out is None:
        t.next += 1
        out = t.base + t.next
    x = torch.full((4, 3), float(t.next)).numpy().tobytes()
    msg = device_pb2.RunGraph(graph_id=GID, inputs=[0, t.b if b is None else b], outputs=[out], input_data=[x])
    return msg.SerializeToString()


def _quiet_and_spied(quick: Twin, slow: Twin, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], list[Any]]:
    """Both twins' graph traced and quiet (five runs); then the sessions whose slices `frame_commands` parsed and
    whose RunGraphs `GraphTable.run` ran (from the parsed command), as two lists that fill as they do."""
    for _ in range(5):
        assert _same(quick, slow, lambda t: _slice(t, _frame_of(_run_body(t))))[1] is None
    framed: list[Any] = []
    run: list[WorkerSession] = []
    real_frame, real_run = slices.frame_commands, graph.GraphTable.run

    def frame_commands(payload: Any, native: Any) -> Any:
        framed.append(native)
        return real_frame(payload, native)

    def counted(self: Any, s: WorkerSession, *a: Any, **k: Any) -> Any:
        run.append(s)
        return real_run(self, s, *a, **k)

    monkeypatch.setattr(slices, "frame_commands", frame_commands)
    monkeypatch.setattr(graph.GraphTable, "run", counted)
    return framed, run


def test_a_lone_run_graph_frame_runs_from_its_bytes(twins: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 43: a slice whose frame is one RunGraph that the graph's quiet run takes is run from the frame's bytes:
    no `frame_commands` (upb's parse of the frame) and no `GraphTable.run` (the message's `SerializeToString`); the
    slow twin (no plan) parses the command and executes it. Both end the same, with the same slice results. On
    7b5ed4d every slice called `frame_commands` and `GraphTable.run`."""
    quick, slow, ran = twins
    framed, run = _quiet_and_spied(quick, slow, monkeypatch)
    before = ran.count(quick.s)
    for _ in range(4):
        said = _same(quick, slow, lambda t: _slice(t, _frame_of(_run_body(t))))[0]
        assert said[0] == 1 and said[4] == {"replayed": 1}
    # the slow twin's plan declines: its command parsed in the slice and executed (`GraphTable.run`), no frame read
    assert quick.s not in run and run.count(slow.s) == 4 and framed == []
    assert ran.count(quick.s) == before
    # a failing quiet run (an output handle of another session) from the bytes: poisoned and counted as before
    bad = _frame_of(_run_body(quick, out=(9 << 32) + 1))
    bad_slow = _frame_of(_run_body(slow, out=(9 << 32) + 1))
    got = _slice(quick, bad)
    assert got == _slice(slow, bad_slow) and got[1] is not None, got


def test_lone_run_graph_frames_of_any_bytes_run_as_the_parsed_command(twins: Any) -> None:
    """Frames of one RunGraph whose bytes the plan's reading declines or that are not what `lone_run_graph` reads
    (`graph_id` repeated with the last one another graph's, or first another's, or absent; `drop_writes`; an
    unknown field; overlong lengths; a truncated message; two commands; a reshaped persistent tensor between runs;
    an input of another shape) give both twins the same slice results, errors and state, quiet again after."""
    quick, slow, _ = twins
    for _ in range(5):
        assert _same(quick, slow, lambda t: _slice(t, _frame_of(_run_body(t))))[1] is None

    def variants(t: Twin) -> list[bytes]:
        body = _run_body(t)
        other = device_pb2.RunGraph(graph_id=2).SerializeToString()
        return [
            _frame_of(body + other),  # graph_id read last: 2, never defined
            _frame_of(other + _run_body(t)),  # first 2, then GID: the graph upb reads
            _frame_of(_run_body(t)[2:]),  # no graph_id: 0
            _frame_of(_run_body(t) + b"\x20" + _varint(t.kept)),  # drop_writes
            _frame_of(_run_body(t) + b"\xf8\x01\x05"),  # an unknown field
            _frame_of(_run_body(t), extra=2),  # overlong lengths
            _frame_of(_run_body(t)) + _frame_of(_run_body(t)),  # two commands
            _frame_of(_run_body(t, b=t.v)),  # an input of another shape: the Python path's error
            _frame_of(_run_body(t)[:-3]),  # truncated inside input_data
        ]

    n = len(variants(quick))
    slow.next = quick.next
    for k in range(n):
        got = _same(quick, slow, lambda t, k=k: _slice(t, variants(t)[k]))
        assert got[0][0] not in ("DecodeError", "malformed") or k == n - 1, (k, got)
        for _ in range(2):
            assert _same(quick, slow, lambda t: _slice(t, _frame_of(_run_body(t))))[1] is None
    quick.op("aten::t_.default", quick.w)
    slow.op("aten::t_.default", slow.w)
    got = _same(quick, slow, lambda t: _slice(t, _frame_of(_run_body(t))))
    assert got[1] is not None  # the persistent tensor's metadata changed in place: the Python path's error


def test_run_raw_checks_the_graph_id_as_upb_reads_it(twins: Any) -> None:
    """`GraphPlan.run_raw(..., graph_id=)` (round 43): None, nothing done, where the message's `graph_id` as upb
    reads it (its last value; 0 where it has none) is not the one given; the same run as without it elsewhere."""
    quick, _, _ = twins
    for _ in range(5):
        assert quick.run()[0] is None
    t, g, s = quick, quick.g, quick.s
    before = t.state()
    for bad in (b"\x08\x02", b"\x08\x82\x80\x80\x00"):  # another graph's, last (overlong too)
        assert g.fast.run_raw(s, _run_body(t) + bad, None, g.quiet_refs, g.writes, g.traced.fn, GID) is None
    assert g.fast.run_raw(s, _run_body(t)[2:], None, g.quiet_refs, g.writes, g.traced.fn, GID) is None  # none: 0
    assert t.state() == before
    s.mutations += 1  # as `execute` counts a RunGraph
    body = b"\x08\x07" + _run_body(t)  # 7 first, then GID last: GID's
    assert g.fast.run_raw(s, body, None, g.quiet_refs, g.writes, g.traced.fn, GID) is True
    assert t.state() != before


# ---- round 44: frames of RunGraphs only read from their bytes (native_runner.cpp `graph_frame`, `slices._run_graphs`)


def _frames_of(*bodies: bytes) -> bytes:
    return b"".join(_frame_of(b) for b in bodies)


def test_a_frame_of_several_run_graphs_runs_from_its_bytes(twins: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 44: a frame of several RunGraphs (capture's batch of steps) that their graph's quiet run takes runs from
    the frame's bytes, each from its own: no `frame_commands` (upb's parse of the frame) and no `GraphTable.run`;
    the slow twin (no plan) parses each command and executes it. Both end the same, with the same slice results
    (one progress mark a command). On b647913 a frame of more than one command went to `frame_commands`."""
    quick, slow, ran = twins
    framed, run = _quiet_and_spied(quick, slow, monkeypatch)
    before = ran.count(quick.s)
    for k in (2, 3, 5):
        said = _same(quick, slow, lambda t, k=k: _slice(t, _frames_of(*[_run_body(t) for _ in range(k)])))[0]
        assert said[0] == k and said[4] == {"replayed": k} and said[-1] == list(range(k)), said
    assert quick.s not in run and run.count(slow.s) == 10 and framed == []
    assert ran.count(quick.s) == before


def test_frames_of_several_run_graphs_of_any_bytes_run_as_the_parsed_commands(twins: Any) -> None:
    """Frames of RunGraphs where some run the plan's reading declines (`drop_writes`, another graph, an input of
    another shape, an output of another session: a failure mid-frame, the runs after it still run), where one is
    not what `graph_frame` reads (an unknown field, a truncated one, an overlong length, an empty command, a Sync
    among them: the whole frame parsed), and a time budget that ends the slice after its first command: both twins
    give the same slice results, errors and state, quiet again after. (The parsed path is the reference: on b647913
    both twins parse these frames, which this pins.)"""
    quick, slow, _ = twins
    for _ in range(5):
        assert _same(quick, slow, lambda t: _slice(t, _frame_of(_run_body(t))))[1] is None
    other = device_pb2.RunGraph(graph_id=2).SerializeToString()
    sync = device_pb2.Command(sync=device_pb2.Sync(request_id=7)).SerializeToString()

    def variants(t: Twin) -> list[bytes]:
        r = lambda **k: _run_body(t, **k)  # noqa: E731
        return [
            _frames_of(r(), r() + b"\x20" + _varint(t.kept), r()),  # drop_writes in the middle
            _frames_of(r(), r() + other, r()),  # the middle one's graph_id read last: 2, never defined
            _frames_of(r(), r(b=t.v), r()),  # an input of another shape: the Python path's error
            _frames_of(r(), r(out=(9 << 32) + 1), r()),  # an output of another session: fails mid-frame
            _frames_of(r(), r() + b"\xf8\x01\x05"),  # an unknown field: the whole frame parsed
            _frames_of(r(), r()[:-3]),  # truncated inside input_data: upb refuses it, only the first runs
            _frames_of(r()) + _frame_of(r(), extra=1),  # an overlong length
            _frames_of(r(), r()) + b"\x0a\x00",  # an empty command
            _frames_of(r()) + b"\x0a" + _varint(len(sync)) + sync + _frame_of(r()),  # a Sync between them
        ]

    n = len(variants(quick))
    slow.next = quick.next
    for k in range(n):
        got = _same(quick, slow, lambda t, k=k: _slice(t, variants(t)[k]))
        # (round 44, reader44: a worker says `malformed` where upb refuses a command, having run those before it)
        assert (got[0] == ("malformed", 1, [0])) == (k == 5), (k, got)
        for _ in range(2):
            assert _same(quick, slow, lambda t: _slice(t, _frame_of(_run_body(t))))[1] is None
    said = _same(quick, slow, lambda t: _slice(t, _frames_of(*[_run_body(t) for _ in range(3)]), budget=0.0))[0]
    assert said[0] == 1 and said[-1] == [0], said  # over its budget after the first: the rest in the next slice
    quick.op("aten::t_.default", quick.w)
    slow.op("aten::t_.default", slow.w)
    got = _same(quick, slow, lambda t: _slice(t, _frames_of(_run_body(t), _run_body(t))))
    assert got[1] is not None  # the persistent tensor's metadata changed in place: the Python path's error


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_graph_frame_reads_any_bytes_as_upb_reads_them(native_runner_module: Any, seed: int) -> None:
    """native_runner.cpp `graph_frame` as a parser of hostile frames: seeded frames of RunGraph commands (fields
    in any order and repeated, packed or not, overlong and 10-byte varints, unknown fields, other wire types,
    overlong or truncated lengths, other commands and empty ones among them, random byte damage). Where it reads a
    frame, upb parses the frame and each RunGraph's bytes on their own to the same commands, and its graph ids are
    upb's; it reads some of every seed's frames. (b647913 has no `graph_frame`.)"""
    read = native_runner_module.graph_frame
    rng = random.Random(seed)

    def vi(v: int) -> bytes:
        return _varint(v, rng.choice([0, 0, 0, 0, 1, 2]))

    def field() -> bytes:
        k = rng.random()
        if k < 0.2:
            return b"\x08" + vi(rng.choice([GID, 2, 0, (1 << 64) - 1]))
        if k < 0.5:
            f = rng.choice([2, 3, 4])
            if rng.random() < 0.5:
                return bytes([f << 3]) + vi(rng.choice([0, 5, (1 << 64) - 1, 1 << 40]))
            body = b"".join(vi(rng.randrange(1 << rng.choice([7, 35, 64]))) for _ in range(rng.randrange(4)))
            cut = rng.random() < 0.1 and len(body) > 0
            return bytes([f << 3 | 2]) + _varint(len(body) - cut) + body
        if k < 0.8:
            d = bytes(rng.randrange(40))
            return b"\x52" + vi(len(d)) + d
        if k < 0.9:
            return bytes([rng.choice([0x09, 0x0D, 0x0A, 0x50, 0x12 | 1, 0x18 | 5, 0x78])]) + bytes(rng.randrange(9))
        return b"\x08" + b"\xff" * 9 + bytes([rng.choice([1, 2, 0x7F])])  # 10-byte varints, some past 64 bits

    def command() -> bytes:
        body = b"".join(field() for _ in range(rng.randrange(6)))
        k = rng.random()
        if k < 0.8:
            return b"\xaa\x01" + vi(len(body)) + body
        if k < 0.85:
            return b""
        if k < 0.9:
            return device_pb2.Command(sync=device_pb2.Sync(request_id=3)).SerializeToString()
        if k < 0.95:
            return b"\xaa\x01" + _varint(len(body)) + body + b"\x28\x01"  # a field after the run_graph
        return b"\xaa\x01" + _varint(len(body) + 1) + body  # its length past the command's end

    read_some = 0
    for _ in range(600):
        payload = b"".join(b"\x0a" + vi(len(c)) + c for c in (command() for _ in range(rng.randrange(1, 5))))
        if rng.random() < 0.15:
            i = rng.randrange(len(payload))
            payload = payload[:i] + bytes([rng.randrange(256)]) + payload[i + rng.randrange(2) :]
        got = read(payload)
        for view in (memoryview(bytearray(payload)), bytearray(payload)):
            assert read(view) == got
        if got is None:
            continue
        read_some += 1
        cmds = device_pb2.ClientFrame.FromString(payload).commands  # never refused where it read the frame
        assert len(cmds) == len(got), payload
        for c, (gid, raw) in zip(cmds, got, strict=True):
            assert c.WhichOneof("cmd") == "run_graph" and c.ListFields()[0][0].name == "run_graph", payload
            msg = device_pb2.RunGraph.FromString(raw)
            assert msg == c.run_graph and gid == msg.graph_id, payload
            assert device_pb2.Command(run_graph=msg) == c, payload
    assert read_some > 20, read_some


def test_the_modules_fast_calls_are_the_plans_and_refuse_bad_arguments(twins: Any) -> None:
    """Round 44: the module's METH_FASTCALL `run_raw(plan, ...)` is `plan.run_raw(session, raw, None, ...)` (the same
    answers, nothing done where it declines); both fast calls refuse a wrong argument count or kind with a Python
    error (never a crash), and `graph_frame` of something that is no buffer is None. (b647913 has neither.)"""
    quick, _, _ = twins
    for _ in range(5):
        assert quick.run()[0] is None
    t, g, s, mod = quick, quick.g, quick.s, quick.ex.native
    args = (g.quiet_refs, g.writes, g.traced.fn, GID)
    with pytest.raises(TypeError):
        mod.run_raw(g.fast, s, bytearray(_run_body(t)), *args)  # bytes only, as the slice gives
    with pytest.raises(TypeError):
        mod.run_raw(g.fast, s)
    with pytest.raises((TypeError, RuntimeError)):
        mod.run_raw(object(), s, _run_body(t), *args)
    with pytest.raises(TypeError):
        mod.graph_frame()
    assert mod.graph_frame(object()) is None and mod.graph_frame(b"") is None
    before = t.state()
    assert mod.run_raw(g.fast, s, _run_body(t) + b"\x08\x02", *args) is None  # another graph's id, last
    assert mod.run_raw(g.fast, s, _run_body(t) + b"\x20\x01", *args) is None  # drop_writes
    assert t.state() == before
    s.mutations += 1  # as `execute` counts a RunGraph
    assert mod.run_raw(g.fast, s, _run_body(t), *args) is True
    assert t.state() != before


@pytest.mark.parametrize("quick", [True, False])
def test_a_run_on_a_poisoned_input_poisons_its_outputs_with_that_inputs_error(quick: bool) -> None:
    """Round 44 (fuzzrev44, scripts/fuzz_native.py graph-daemon on the merged tree): a RunGraph that failed on a
    poisoned input poisoned its outputs and kept tensors with `PoisonedInput` itself (`Poison.of`: UNKNOWN, the
    base class's code), so a later read of them said UNKNOWN "input ... has no value: ...". They carry the input's
    poison, as an op's outputs do (`Poison.carried`): its status and message."""
    t = Twin(quick)
    for _ in range(5):  # traced and quiet: the quick twin's next runs take the plan
        assert t.run()[0] is None
    err, _ = t.run(inputs=[0], outputs=[t.b])  # one input of two: INVALID_ARGUMENT, `b` poisoned with it
    assert err is not None and err[0] == grpc.StatusCode.INVALID_ARGUMENT, err
    first = t.s.poisoned[t.b]
    _slice(t, _frame_of(_run_body(t, out=t.base + 200)))  # a run that reads `b`, from the frame's bytes
    for h in (t.base + 200, t.kept):
        p = t.s.poisoned[h]
        assert (p.code, p.message) == (first.code, first.message), (h - t.base, p)


# ---- round 45: `GraphTable.run_raw` ends a quiet run itself (`_quick_raw`'s raw case and `_ran` inline), any other
# case through `_quick_rest`


def _two(native_runner_module: Any) -> tuple[Twin, Twin]:
    """(quick, slow) twins with learned-run state (whose `epoch` a RunGraph moves), traced and quiet."""
    quick, slow = Twin(True), Twin(False)
    for t in (quick, slow):
        t.ex._eager_state(t.s)
    for _ in range(5):
        assert _both_same(quick, slow, lambda t: _slice(t, _frame_of(_run_body(t))))[1] is None
    return quick, slow


def _both_same(quick: Twin, slow: Twin, step: Any) -> Any:
    """`step` of each twin: the same slice results, error and state, and the same learned-run epoch."""
    got = _same(quick, slow, step)
    assert quick.ex._eager[quick.s.session_id][3].epoch == slow.ex._eager[slow.s.session_id][3].epoch
    return got


def _swap_fn(t: Twin, fn: Any) -> None:
    """`t`'s traced function replaced by `fn` (None: the real one back)."""
    real = t.__dict__.setdefault("real_fn", t.g.traced.fn)
    t.g.traced.fn = real if fn is None else fn


def test_a_raw_run_ends_every_case_as_the_parsed_run(
    native_runner_module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 45: a quiet run from a frame's bytes (`GraphTable.run_raw`, which ends the common case itself) ends each
    case as the parsing twin ends it (slice results, errors, state, counts, learned-run epoch), quick again after:
    the common one (no `_quick_raw`, no `_ran` frame: counted inline); a graph whose persistent storages a run
    recounts (`g.mutated`); a traced function that raises or returns something else than its kept tensors (the
    plan's answer, ended by `_quick_end`: the run failed and poisoned); a run whose binding raises (a session at its
    handle limit: ResourceExhausted, the run poisoned). (Behaviour that holds on f47ac67 too: this pins the inline
    end against it.)"""
    quick, slow = _two(native_runner_module)
    ends: list[Any] = []
    real = graph.GraphTable._quick_rest

    def rest(self: Any, s: WorkerSession, g: Any, r: Any, *a: Any) -> None:
        ends.append(r if r is True else "other")
        return real(self, s, g, r, *a)

    monkeypatch.setattr(graph.GraphTable, "_quick_rest", rest)
    for _ in range(3):
        said = _both_same(quick, slow, lambda t: _slice(t, _frame_of(_run_body(t))))[0]
        assert said[0] == 1 and said[4] == {"replayed": 1}
    assert ends == []  # the common end, inline

    def fails(*a: Any) -> Any:
        raise RuntimeError("the traced function failed")

    def wrong(*a: Any) -> Any:
        return (a[0],) * 3  # not one tensor a kept slot

    cases: list[tuple[str, Any, Any]] = [
        ("mutated", lambda t: setattr(t.g, "mutated", [t.w]), lambda t: setattr(t.g, "mutated", [])),
        ("raises", lambda t: _swap_fn(t, fails), lambda t: _swap_fn(t, None)),
        ("wrong", lambda t: _swap_fn(t, wrong), lambda t: _swap_fn(t, None)),
        (
            "handles",
            lambda t: setattr(t.s, "max_handles", t.s.handle_count()),
            lambda t: setattr(t.s, "max_handles", 99),
        ),
    ]
    want = {"mutated": [True], "raises": ["other"], "wrong": ["other"], "handles": []}
    for name, setup, undo in cases:
        for t in (quick, slow):
            setup(t)
        ends.clear()
        got = _both_same(quick, slow, lambda t: _slice(t, _frame_of(_run_body(t))))
        assert ends == want[name], (name, ends)
        assert (got[1] is None) == (name == "mutated"), (name, got)
        for t in (quick, slow):
            undo(t)
        for _ in range(3):  # quiet again
            assert _both_same(quick, slow, lambda t: _slice(t, _frame_of(_run_body(t))))[1] is None, name
    # a run that reads a poisoned input: its outputs carry the input's poison
    _both_same(quick, slow, lambda t: t.run(inputs=[0], outputs=[t.b]))  # one input of two: `b` poisoned
    got = _both_same(quick, slow, lambda t: _slice(t, _frame_of(_run_body(t, out=t.base + 300))))
    assert got[1] is not None and quick.base + 300 in quick.s.poisoned, got


# ---- round 47: a slice of one quiet RunGraph written straight into the shared buffer (`slices.run_slice_into`)


def _wire(t: Twin, payload: bytes, into: bool, budget: float = 10.0) -> tuple[Any, ...]:
    """A slice as the daemon reads it back: the result's bytes decoded (all but its seconds), the progress marks,
    the session's error and its state. `into`: the worker's `run_slice_into` (its result written into the shared
    buffer, or returned and encoded); else `run_commands`, then `encode_result` (the reference)."""
    t.s.error = None
    req = slices.SliceRequest(1 << 30, 1 << 20, budget, memoryview(bytearray(payload)))
    marks: list[int] = []
    timer = t.s.memory.device.slice_timer()
    if into:
        buf = memoryview(bytearray(1 << 16))
        got = slices.run_slice_into(t.s, t.ex.execute, t.ex.ledger, req, timer, marks.append, buf)
        body = bytes(buf[:got]) if got.__class__ is int else b"".join(slices.encode_result(got)[1:])
    else:
        r = slices.run_commands(t.s, t.ex.execute, t.ex.ledger, req, timer, marks.append)
        body = b"".join(slices.encode_result(r)[1:])
    d = slices.decode_result(body, 1 << 20)
    said = (d.executed, d.used, d.ops, d.handles, d.uploaded, d.downloaded, d.errors, d.events, d.replies,
            d.error_pending, d.partial, d.busy, d.graph_bytes, d.malformed)  # fmt: skip
    err = t.s.error
    return said, marks, (None if err is None else (err.code, err.message)), t.state()


def test_a_quiet_run_graph_slice_is_packed_from_the_counts_with_run_commands_bytes(
    native_runner_module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 47: a worker's slice of one RunGraph its graph's quiet run takes (`slices.run_slice_into`) writes its
    result of one event straight into the shared buffer from the session's and the ledger's counts: no
    `run_commands`, no `SliceResult` made; every other slice (a failing run, one the plan declines, several
    RunGraphs, a frame not of RunGraphs only, a malformed one, a reply) goes the usual way. Twin sessions, one
    through `run_slice_into` and one through `run_commands` + `encode_result`, read back the same result bytes
    (but the seconds), the same progress marks, errors and state. (cc9a7236 has no `run_slice_into`.)"""
    quick, slow = _two(native_runner_module)
    made: list[Any] = []
    real_result, real_run = slices.SliceResult, slices.run_commands

    class Counted(real_result):  # type: ignore[misc,valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            made.append(1)
            super().__init__(*a, **k)

    def run_commands(*a: Any, **k: Any) -> Any:
        made.append("run_commands")
        return real_run(*a, **k)

    for _ in range(5):  # traced and quiet
        _both_same(quick, slow, lambda t: _wire(t, _frame_of(_run_body(t)), t is quick))
    monkeypatch.setattr(slices, "SliceResult", Counted)
    monkeypatch.setattr(slices, "run_commands", run_commands)
    for _ in range(3):
        said, marks, err, _ = _both_same(quick, slow, lambda t: _wire(t, _frame_of(_run_body(t)), t is quick))
        assert said[0] == 1 and said[7] == {"replayed": 1} and marks == [0] and err is None
    made.clear()
    req = slices.SliceRequest(1 << 30, 1 << 20, 10.0, memoryview(bytearray(_frame_of(_run_body(quick)))))
    buf = memoryview(bytearray(1 << 16))
    got = slices.run_slice_into(quick.s, quick.ex.execute, quick.ex.ledger, req, quick.s.memory.device.slice_timer(),
                                None, buf)  # fmt: skip
    assert got.__class__ is int and made == []  # the quiet slice: packed from the counts
    assert slices.decode_result(buf[:got], 1).events == {"replayed": 1} and quick.s.error is None
    _wire(slow, _frame_of(_run_body(slow)), False)  # the same slice for the other twin
    assert quick.state() == slow.state()
    monkeypatch.setattr(slices, "SliceResult", real_result)
    monkeypatch.setattr(slices, "run_commands", real_run)
    other = device_pb2.RunGraph(graph_id=2).SerializeToString()
    sync = device_pb2.Command(sync=device_pb2.Sync(request_id=7)).SerializeToString()

    def variants(t: Twin) -> list[bytes]:
        r = lambda **k: _run_body(t, **k)  # noqa: E731
        return [
            _frame_of(r(out=(9 << 32) + 1)),  # an output of another session: the run fails, an error counted
            _frame_of(r() + b"\x20" + _varint(t.kept)),  # drop_writes: the plan declines, the parsed command
            _frame_of(r() + other),  # another graph (never defined): NOT_FOUND
            _frame_of(r(b=t.v)),  # an input of another shape: the Python path's error
            _frames_of(r(), r(), r()),  # several RunGraphs
            _frame_of(r() + b"\xf8\x01\x05"),  # an unknown field: not `graph_frame`'s, the whole frame parsed
            _frames_of(r()) + b"\x0a" + _varint(len(sync)) + sync,  # a Sync after it: a reply
            _frame_of(r()[:-3]),  # truncated inside input_data: malformed
            b"\x0a" + _varint(len(sync)) + sync,  # no RunGraph at all
        ]

    n = len(variants(quick))
    slow.next = quick.next
    for k in range(n):
        _both_same(quick, slow, lambda t, k=k: _wire(t, variants(t)[k], t is quick))
        for _ in range(2):
            assert _both_same(quick, slow, lambda t: _wire(t, _frame_of(_run_body(t)), t is quick))[2] is None
    quick.op("aten::t_.default", quick.w)
    slow.op("aten::t_.default", slow.w)
    got = _both_same(quick, slow, lambda t: _wire(t, _frame_of(_run_body(t)), t is quick))
    assert got[2] is not None  # reshaped in place: the Python path's error


# ---- round 48: a slice of one RunGraph on a GPU's timer takes the one-graph path (`slices._one_graph_into`)


def test_a_run_graph_slice_on_a_gpus_timer_takes_the_one_graph_path(
    native_runner_module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 48: a worker's slice of one RunGraph on a CUDA device's timer (`devices.SliceTimer`, driven here by
    test_server_slice_timer's STAND-IN events and stream: no CUDA on this host) runs through `run_slice_into`'s
    one-graph path (no `_run_graphs`, no `run_commands`), as a fake device's does: the quiet run packed from the
    counts, every other case (a failing run, one the plan declines, another graph, an input of another shape) the
    usual way. Each twin has a timer of its own over a stream that launches 4 ms of work a slice: the results read
    back the same (their seconds too, booked late, and `busy`), with the same marks, errors, state and learned-run
    epoch. On dabf16a0 such a slice went through `_run_graphs`."""
    quick, slow = _two(native_runner_module)
    for t in (quick, slow):  # (each twin's own FakeDevice object: its timer replaced on the instance only)
        stream = _Stream(work_per_slice=0.004)
        timer = devices.SliceTimer(_Event, lambda stream=stream: stream, None, 2)
        monkeypatch.setattr(t.s.memory.device, "slice_timer", lambda timer=timer: timer)
    ran: list[str] = []
    real = slices._run_graphs

    def spied(*a: Any, **k: Any) -> Any:
        ran.append("_run_graphs")
        return real(*a, **k)

    def wire(t: Twin, payload: bytes, into: bool) -> tuple[Any, ...]:
        timer = t.s.memory.device.slice_timer()
        said = _wire(t, payload, into)
        return (*said, timer.reported)  # every second booked so far, from the stand-in clock

    def step(t: Twin) -> tuple[Any, ...]:
        return wire(t, _frame_of(_run_body(t)), t is quick)

    monkeypatch.setattr(slices, "_run_graphs", spied)
    busy = []
    for _ in range(4):
        said = _both_same(quick, slow, step)
        assert said[0][0] == 1 and said[0][7] == {"replayed": 1} and said[1] == [0] and said[2] is None
        busy.append(said[0][11])
    assert True in busy  # the stand-in GPU ran behind: results said so, and their seconds came later
    assert ran.count("_run_graphs") == 4  # the slow twin's only (run_commands' frame of RunGraphs)
    other = device_pb2.RunGraph(graph_id=2).SerializeToString()
    cases = [
        lambda t: _run_body(t, out=(9 << 32) + 1),  # an output of another session: the run fails, an error counted
        lambda t: _run_body(t) + b"\x20" + _varint(t.kept),  # drop_writes: the plan declines, the parsed command
        lambda t: _run_body(t) + other,  # another graph (never defined): NOT_FOUND
        lambda t: _run_body(t, b=t.v),  # an input of another shape: the Python path's error
    ]
    slow.next = quick.next
    for case in cases:
        ran.clear()
        got = _both_same(quick, slow, lambda t, case=case: wire(t, _frame_of(case(t)), t is quick))
        assert ran == ["_run_graphs"], ran  # the slow twin's
        assert got[0][0] == 1 and (got[2] is not None or case is cases[1]), got
        for _ in range(2):
            assert _both_same(quick, slow, step)[2] is None


def _dropout_steps(quick: bool, steps: int) -> tuple[Any, list[Any]]:
    """A session whose graph draws random numbers (dropout: `aten::native_dropout`, a seeded call) run `steps` times
    through a worker's slices from `torch.manual_seed(7)` (the session's Seed command), each run the same input: (its
    graph, each run's dropout output and kept mask). `quick` False: the plan taken away (`_run`'s path, the
    reference). Both in one process: one session's runs all end before the other's start (the device's generator
    holds one session's stream at a time: `exclusive_rng`)."""
    dev = FakeDevice(0, "h", 1 << 30)
    s = WorkerSession("s", 1, dev, DeviceMemory(dev), 1 << 28)
    ex = CommandExecutor(slices.SliceLedger())
    ex.exclusive_rng = True  # as in a session's worker process (graph_trace.refusal)
    base, w, kept = s.handle_base, s.handle_base + 1, s.handle_base + 2
    s.bind(w, torch.arange(12.0).reshape(4, 3))
    ops = [
        device_pb2.Op(name="aten::add.Tensor", args=[tensor_pb2.Arg(tensor=1), tensor_pb2.Arg(tensor=2)], outputs=[3]),
        device_pb2.Op(name="aten::native_dropout.default", outputs=[4, 5],
                      args=[tensor_pb2.Arg(tensor=3), tensor_pb2.Arg(f=0.5), tensor_pb2.Arg(b=True)]),
    ]  # fmt: skip
    meta = wire.meta_to_proto(torch.ones(4, 3))
    msg = device_pb2.DefineGraph(graph_id=GID, inputs=1, input_meta=[meta], persistent=[w], ops=ops, outputs=[4],
                                 writes=[device_pb2.GraphWrite(handle=kept, slot=5)])  # fmt: skip
    ex.execute(s, device_pb2.Command(define_graph=msg), _no_reply)
    ex.execute(s, device_pb2.Command(seed=device_pb2.Seed(seed=7)), _no_reply)
    assert s.error is None, s.error
    g = ex.graphs._of(s)[GID]
    if not quick:
        g.fast = False
    x = torch.full((4, 3), 1.5).numpy().tobytes()
    got = []
    for k in range(steps):
        if k == steps // 2:  # `torch.manual_seed` again mid-stream: the next run's draws start from it
            ex.execute(s, device_pb2.Command(seed=device_pb2.Seed(seed=11)), _no_reply)
        out = base + 100 + k
        body = device_pb2.RunGraph(graph_id=GID, inputs=[0], outputs=[out], input_data=[x]).SerializeToString()
        req = slices.SliceRequest(1 << 30, 1 << 20, 10.0, memoryview(bytearray(_frame_of(body))))
        buf = memoryview(bytearray(1 << 16))
        res = slices.run_slice_into(s, ex.execute, ex.ledger, req, dev.slice_timer(), None, buf)
        assert res.__class__ is int and s.error is None, s.error
        assert slices.decode_result(buf[:res], 1).events.get("replayed") == 1
        got.append((s.tensors[out].tolist(), s.tensors[kept].tolist()))
        s.free([out])
    return g, got


def test_a_seeded_traced_graph_takes_the_plan_and_draws_as_the_python_path(native_runner_module: Any) -> None:
    """Round 48: a traced graph with random ops (dropout, as the encoder's captured step) runs its quiet runs through
    the C++ plan (`graph._fast_plan`; before, `_run` and `Traced.run` every step: the encoder's worker slice was
    ~208k instructions, bench/graph_replay.py --measure outside-slice): the session's stream is loaded into the
    device's generator before the plan's call, as `Traced.run` loads it, so every run draws the same numbers as the
    reference path's, run after run (the stream moves: the masks differ), and from a new seed after a Seed command
    (which leaves the next run quiet). On dabf16a0 a seeded trace had no plan."""
    g, quick = _dropout_steps(True, 10)
    assert g.traced is not None and g.traced.seeded and g.fast is not False, (g.traced, g.fast)
    ref_g, slow = _dropout_steps(False, 10)
    assert ref_g.traced is not None and ref_g.fast is False
    assert quick == slow
    assert len({str(mask) for _, mask in quick}) > 5  # (a fixed mask would pass the comparison for nothing)
