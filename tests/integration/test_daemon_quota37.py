"""Round 37 red team (quota37), through real daemons: an uninitialized factory's out= form zeroes its `out`, never
the session's other views of that storage; the commands sessions queue behind work that runs are bounded per host."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import fairqueue
from support import Healthy, MiB, tls_channel
from test_daemon_red34 import CANARY, _plant
from test_daemon_rev35 import pair

from gpupool import wire
from gpupool._proto import device_pb2, device_pb2_grpc, tensor_pb2

__all__ = ["pair"]

N = 30_000  # floats: a block the allocator hands back to the next allocation of its size (`_plant`)

# (name, positional arguments after the first): each makes `N` floats into `out`
_FACTORY_OUTS = [
    ("aten::empty.out", lambda s: ([N],)),
    ("aten::empty_like.out", lambda s: (Handle(s.upload(torch.ones(N))),)),
    ("aten::empty_strided.out", lambda s: ([N], [1])),
    ("aten::empty_permuted.out", lambda s: ([N], [0])),
    ("aten::new_empty.out", lambda s: (Handle(s.upload(torch.ones(1))), [N])),
    ("aten::new_empty_strided.out", lambda s: (Handle(s.upload(torch.ones(1))), [N], [1])),
]


@pytest.mark.parametrize(("name", "args"), _FACTORY_OUTS, ids=[n for n, _ in _FACTORY_OUTS])
def test_an_uninitialized_out_form_keeps_the_sessions_other_views(pair: tuple[Session, Session], name, args) -> None:
    """`empty.out` (and the other uninitialized factories' out= forms) into a view of `x` zeroed `x`'s WHOLE storage
    on a490c2a: the session's own data around the view lost (fin36). Only `out`'s elements are zeroed now: neither
    what the session wrote around them nor another session's freed bytes (the generated out= forms copy an
    uninitialized tensor into them; `_plant` puts a victim's bytes where that tensor is allocated)."""
    victim, s = pair
    x = torch.arange(3 * N, dtype=torch.float32) + 1
    h = Handle(s.upload(x))
    [v] = s.call("aten::slice.Tensor", h, 0, N, 2 * N)  # x[N:2N], N elements
    for _ in range(3):  # the allocator does not hand the planted blocks back every time
        _plant(victim, N)
        s.call(name, *args(s), out=Handle(v), outputs=[0])
        got = s.download(h)
        assert torch.equal(got[:N], x[:N]) and torch.equal(got[2 * N :], x[2 * N :]), "the session's own data lost"
        assert not got[N : 2 * N].any(), f"{int((got == CANARY).sum())} of another session's values read"


def test_an_out_form_that_grows_its_out_zeroes_the_growth_only(pair: tuple[Session, Session]) -> None:
    """`empty.out` growing a view at the end of `x` past `x`'s storage: the bytes before the view stay `x`'s, the
    growth (allocator memory) is zeroed, and an `as_strided` over the whole storage reads no freed bytes."""
    victim, s = pair
    x = torch.arange(2 * N, dtype=torch.float32) + 1
    h = Handle(s.upload(x))
    [v] = s.call("aten::slice.Tensor", h, 0, N, 2 * N)
    _plant(victim, 3 * N)
    s.call("aten::empty.out", [2 * N], out=Handle(v), outputs=[0])  # the storage grows from 2N to 3N floats
    whole = Handle(s.call("aten::as_strided.default", h, [3 * N], [1])[0])
    got = s.download(whole)
    assert torch.equal(got[:N], x[:N]), "the session's own data lost"
    assert not got[N:].any(), f"{int((got == CANARY).sum())} of another session's values read"


def test_a_graphs_empty_out_into_a_view_keeps_the_rest_of_its_storage(pair: tuple[Session, Session]) -> None:
    """The same in a captured graph (`graph.execute`'s zeroing): `empty.out` into a slice of a persistent tensor
    zeroed the persistent tensor's whole storage at every run on a490c2a."""
    _, s = pair
    x = torch.arange(16, dtype=torch.float32) + 1
    w = Handle(s.upload(x))
    body = [
        device_pb2.Op(
            name="aten::slice.Tensor",
            args=[tensor_pb2.Arg(tensor=2), tensor_pb2.Arg(i=0), tensor_pb2.Arg(i=4), tensor_pb2.Arg(i=8)],
            outputs=[3],
        ),
        device_pb2.Op(
            name="aten::empty.out",
            args=[tensor_pb2.Arg(ints=tensor_pb2.IntList(values=[4]))],
            kwargs={"out": tensor_pb2.Arg(tensor=3)},
        ),
        device_pb2.Op(name="aten::add.Tensor", args=[tensor_pb2.Arg(tensor=1), tensor_pb2.Arg(tensor=1)], outputs=[4]),
    ]
    one = torch.ones(1)
    s.define_graph(
        device_pb2.DefineGraph(
            graph_id=1, inputs=1, input_meta=[wire.meta_to_proto(one)], persistent=[w], ops=body, outputs=[4]
        )
    )
    want = x.clone()
    want[4:8] = 0
    for _ in range(3):
        y = s.new_handle()
        s.run_graph(1, [Handle(s.upload(one))], [y])
        assert torch.equal(s.download(Handle(y)), 2 * one)
        assert torch.equal(s.download(w), want), "the session's own data lost"


class _Busy:
    """A raw stream that keeps its device busy (a frame of `MATMULS` slow matmuls into one handle) and sends `UPLOADS`
    frames of 4 MiB uploads behind them, reading every reply (it never parks)."""

    MATMULS = 3000  # ~0.27 GMAC each: minutes of work on a loaded 2-core box, far longer than the test
    UPLOADS = 40  # 160 MiB: past a session's own 64 MiB queue and gRPC's buffers

    def __init__(self, d: Any, tenant: str) -> None:
        self.channel = tls_channel(d.address, options=[("grpc.max_receive_message_length", 64 * MiB)])
        token = d.token(tenant=tenant, quota_bytes=64 * MiB)
        reply = device_pb2_grpc.DeviceStub(self.channel).Attach(device_pb2.AttachRequest(token=token))
        self.session_id = reply.session_id
        base = reply.handle_base
        self.sent = 0
        self.release = threading.Event()
        a_meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[256, 4096])
        meta = tensor_pb2.TensorMeta(dtype=tensor_pb2.DTYPE_UINT8, shape=[4 * MiB])

        def frame(*commands: device_pb2.Command) -> bytes:
            return device_pb2.ClientFrame(commands=list(commands)).SerializeToString()

        def gen() -> Iterator[bytes]:
            a, at, y = base + 1, base + 2, base + 3
            up = device_pb2.Upload(handle=a, meta=a_meta, data=bytes(256 * 4096 * 4), last=True)
            yield frame(device_pb2.Command(upload=up))
            t = device_pb2.Op(name="aten::t.default", args=[tensor_pb2.Arg(tensor=a)], outputs=[at])
            mm = device_pb2.Op(
                name="aten::mm.default", args=[tensor_pb2.Arg(tensor=a), tensor_pb2.Arg(tensor=at)], outputs=[y]
            )
            yield frame(device_pb2.Command(op=t), *[device_pb2.Command(op=mm)] * self.MATMULS)
            for i in range(self.UPLOADS):
                up = device_pb2.Upload(handle=base + 100 + i, meta=meta, data=bytes([i]) * (4 * MiB), last=True)
                yield frame(device_pb2.Command(upload=up))
                self.sent += 1
            self.release.wait(120)

        stream = self.channel.stream_stream("/gpupool.v1.Device/Stream", None, device_pb2.ServerFrame.FromString)
        self.call: Any = stream(gen(), metadata=(("gpupool-session", self.session_id),), timeout=120)
        threading.Thread(target=self._read, daemon=True).start()  # every reply read: it never parks

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for _ in self.call:
                pass

    def end(self) -> None:
        self.call.cancel()
        self.release.set()
        self.channel.close()


def test_sessions_behind_slow_work_queue_within_the_hosts_bound(daemon_factory: Any) -> None:
    """Sessions that read their replies but whose commands wait behind work that runs (slow matmuls here; a
    collective waiting for its peers is another such wait) each queued up to their own 64 MiB on a490c2a, counted
    against nothing: three of one tenant held ~180 MiB of queued uploads in the daemon process (8 sessions ~1 GiB,
    bench/host_memory.py --probe busy). Past their first 4 MiB each, the host's sessions together now queue at most
    `--max-queued-bytes` (8 MiB here); a neighbour of another tenant goes on, and a session's end frees room for
    the others."""
    limit = 8 * MiB
    d = daemon_factory(fake_gpu_memory=512 * MiB, max_queued_bytes=limit)
    daemon = d.running.daemon
    neighbour = Healthy(d.address, d.token(tenant="neighbour", quota_bytes=8 * MiB), pause=0.02)
    busy = [_Busy(d, "busy") for _ in range(3)]
    try:
        entries: list[Any] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(entries) < len(busy):
            found = {s.session_id: s.entry for s in daemon.session_list()}
            entries = [found[b.session_id] for b in busy if b.session_id in found]
            time.sleep(0.05)
        assert len(entries) == len(busy)

        def past_first() -> int:
            return sum(max(0, e.nbytes - fairqueue.PARKED_BYTES) for e in entries)

        state: tuple[int, int] = (-1, -1)
        for _ in range(60):  # until neither the clients hand frames nor the queues grow for a second
            time.sleep(1.0)
            now = (past_first(), sum(b.sent for b in busy))
            if now == state:
                break
            state = now
        assert past_first() <= limit, f"{past_first() / MiB:.1f} MiB queued past the sessions' first 4 MiB"
        assert all(b.sent < _Busy.UPLOADS for b in busy), "a session's uploads were all taken (did its work end?)"
        assert sum(e.nbytes for e in entries) <= limit + len(entries) * (fairqueue.PARKED_BYTES + 4 * MiB)
        # the one holding the most past its first 4 MiB ends: that is room for the others, whose readers queue again
        most = max(range(len(busy)), key=lambda i: entries[i].nbytes)
        assert entries[most].nbytes > fairqueue.PARKED_BYTES
        others = [e for i, e in enumerate(entries) if i != most]
        held = sum(e.nbytes for e in others)
        busy[most].end()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(e.nbytes for e in others) <= held:
            time.sleep(0.1)
        assert sum(e.nbytes for e in others) > held, "no room freed by a session's end"
        assert past_first() <= limit
        assert neighbour.iterations > 0
    finally:
        for b in busy:
            b.end()
        neighbour.check()
        neighbour.close()


def _held(ex: Any) -> tuple[int, int, int]:
    """What a session's executor holds of what it learned, measured apart from the daemon's own estimates: the bytes
    of the records its templates were learned from, and the members of its verdicts' signatures and of its traces'
    steps and tensor inputs (nested tuples walked)."""
    from gpupool.server import templates

    def members(v: Any) -> int:
        n, todo = 0, [v]
        while todo:
            t = todo.pop()
            n += len(t)
            todo.extend(e for e in t if isinstance(e, tuple))
        return n

    _, _, table, known = next(iter(ex._eager.values()))
    tpl_bytes = sum(t.size for sizes in table.heads.values() for seen in sizes.values() for t in seen)
    verdicts = sum(members(k) for k in ex._verdicts)
    kept: dict[int, templates.Template] = {}
    steps = 0
    for seen in known.heads.values():
        for trace in seen:
            steps += trace.weight
            kept.update((id(st.tpl), st.tpl) for st in trace.steps)
    return tpl_bytes, verdicts, steps + sum(t.size for t in kept.values())


def test_what_a_session_learns_of_its_records_is_bounded_by_bytes(daemon_factory: Any, monkeypatch: Any) -> None:
    """Record templates, verdicts and learned runs were bounded by counts only (4,096, 8,192, 65,536 entries), each
    entry as big as its record (a frame's 16 MiB: 12-24 bytes of the worker a byte of it, tracemalloc; under
    `--isolation thread` the daemon's, every tenant's). Bounded by bytes now (estimated); here the bounds made small
    (the daemon is in this process), and 24 records of each kind, each of its own length: a `view` with 8 lists of
    ~4,000 bools (fails: a template alone) and `_foreach_add` over ~1,000 tensors, sent twice (a template, a verdict
    keyed by 1,000 metas, a learned run)."""
    from gpupool.server import executor, runs, templates

    from gpupool import compact

    bound = 2 * MiB
    monkeypatch.setattr(templates, "MAX_TEMPLATE_BYTES", bound, raising=False)
    monkeypatch.setattr(executor, "MAX_VERDICT_BYTES", bound, raising=False)
    monkeypatch.setattr(runs, "MAX_RUN_BYTES", bound, raising=False)
    d = daemon_factory(isolation="thread")
    with Session.attach(d.address, d.token(tenant="learner", quota_bytes=64 * MiB)) as s:
        x = Handle(s.upload(torch.ones(4)))
        ids = {"aten::view.default": 0, "aten::_foreach_add.Scalar": 1}
        for name, op_id in ids.items():
            s.eager_op(compact.head(op_id, name, [0]) + b"\1" + compact.tensor(x) + b"\0")
            with contextlib.suppress(Exception):
                s.sync()

        def rec(op_id: int, out: int, args: list[bytes]) -> bytes:
            return compact.head(op_id, None, [out]) + compact.U8.pack(len(args)) + b"".join(args) + b"\0"

        for k in range(24):
            bools = compact.TAG_U16.pack(compact.BOOLS, 4000 - k) + bytes(4000 - k)
            s.eager_op(rec(0, s.new_handle(), [compact.tensor(x), *[bools] * 8]))
            with contextlib.suppress(Exception):
                s.sync()
            for _ in range(2):
                out = s.new_handle()
                s.eager_op(rec(1, out, [compact.tensors([x] * (1000 - k)), compact.encode_value(1.0)]))
                s.sync()
                s.free([out])
        s.sync()
        [front] = [f for f in d.running.daemon.session_list()]
        ex = front.runner._state.executor
        tpl_bytes, verdicts, steps = _held(ex)
        learned = bool(ex._verdicts) and any(t for _, _, t, _ in ex._eager.values())
    # the daemon's estimates: 16 bytes a byte of a template's record, 40 a member of a signature, 256 a step or
    # tensor input of a trace and its templates' estimates (16 a byte of their records); on a490c2a all 48
    # templates (~0.95 MB of records), 24 verdicts (~150,000 members) and 24 traces (~24,000 steps and inputs, and
    # ~190 KB of records) stayed
    assert learned, "nothing learned at all"
    assert tpl_bytes * 16 <= bound, f"templates of {tpl_bytes} bytes of records kept"
    assert verdicts * 40 <= bound, f"verdicts of {verdicts} members kept"
    assert steps * 16 <= bound, f"traces of {steps} steps, inputs and template bytes kept"
