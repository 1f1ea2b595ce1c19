"""Round 36 hardening (hard36), through real daemons: the C++ runner's binding zeroes a new storage outside its
result as the Python path does (server/native_runner.cpp `bind_new`, `zero_several`), so the reduced losses no longer
need to stay in Python (round 34's `guards.BUFFERED_RESULTS`, gone); `bind_new` tests a result's extent, not its
element count."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import test_collectives
import torch
from gpupool.client.session import Handle, Session
from gpupool.server import native_runner
from support import scrape
from test_collectives import collective
from test_daemon_red34 import CANARY, MiB, _plant
from test_daemon_rev35 import _whole

from gpupool import compact
from gpupool._proto import device_pb2
from gpupool.errors import InvalidArgument

T, V = compact.tensor, compact.encode_value
group = test_collectives.group  # two daemons' sessions of one lease, joined, over each transport (a fixture)


def _rec(op_id: int, name: str | None, outputs: list[int], args: list[bytes]) -> bytes:
    return b"".join([compact.head(op_id, name, outputs), compact.U8.pack(len(args)), *args, compact.U8.pack(0)])


def _native_ops(metrics_port: int, tenant: str) -> float:
    text = scrape(metrics_port)
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gpupool_eager_native_ops_total{") and f'tenant="{tenant}"' in line
    )


@pytest.mark.parametrize("loss", ["aten::mse_loss.default", "aten::smooth_l1_loss.default"])
def test_a_reduced_loss_in_a_learned_run_holds_no_freed_bytes(daemon_factory: Any, loss: str) -> None:
    """`mse_loss` and `smooth_l1_loss` (mean) return a 0-d loss over a buffer of the elementwise loss's size, its
    other bytes never written. Round 34 kept their steps out of the C++ runner (`guards.BUFFERED_RESULTS`), whose
    binding zeroed nothing; now they run there (the daemon's native op count grows) and the runner zeroes the
    buffer outside the result: a view over the whole storage holds none of another session's freed values, and
    the loss is torch's. (An op the runner took that no scan had found would have leaked the same way.)"""
    if not native_runner.enabled() or native_runner.missing() is not None:
        pytest.skip("no C++ runner here")
    d = daemon_factory(isolation="thread")
    n = 30_000
    with (
        Session.attach(d.address, d.token(tenant="victim", quota_bytes=64 * MiB)) as victim,
        Session.attach(d.address, d.token(tenant="reader", quota_bytes=64 * MiB)) as s,
    ):
        x, y = torch.rand(n), torch.rand(n)
        a, b = Handle(s.upload(x)), Handle(s.upload(y))
        want = getattr(torch.nn.functional, loss.split("::")[1].split(".")[0])(x, y)
        leaked = []
        for step in range(8):  # the first steps teach the run; the later ones run in the runner
            _plant(victim, n)
            out, neg = s.new_handle(), s.new_handle()
            s.eager_op(_rec(0, loss if step == 0 else None, [out], [T(a), T(b)]))
            s.eager_op(_rec(1, "aten::neg" if step == 0 else None, [neg], [T(out)]))
            got = _whole(s, Handle(out), n)
            leaked.append(int((got == CANARY).sum()))
            assert torch.equal(got[1:], torch.zeros(n - 1)), (step, leaked)
            assert torch.equal(s.download(Handle(neg)), -want)
            s.free([out, neg])
        assert not any(leaked), leaked
        assert _native_ops(d.metrics_port, "reader") >= 4, "the runner ran none of the steps"


def test_complex_collectives_gather_average_and_refuse_orderings(group: Any) -> None:
    """A complex allgather over gloo failed mid-call (UNAVAILABLE "Invalid scalar type", the group broken): it runs
    on the real views now, as torch.distributed's own all_gather sends them. A complex allreduce "avg" summed and
    then raised (floor division of a complex tensor): UNAVAILABLE. min, max and product on complex tensors (gloo
    refused them mid-call, the secure hub's `torch.maximum` raised) are INVALID_ARGUMENT before a byte moves, and
    the group goes on. Both transports."""
    (s0, s1), _, _ = group
    x0 = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    x1 = torch.tensor([-5 + 0.5j, 7j], dtype=torch.complex64)
    ins = [Handle(s.upload(x)) for s, x in ((s0, x0), (s1, x1))]
    outs = [[Handle(s.upload(torch.zeros(2, dtype=torch.complex64))) for _ in range(2)] for s in (s0, s1)]
    for s, i, o in zip((s0, s1), ins, outs, strict=True):
        collective(s, "allgather", o, [i])
    for s, o in zip((s0, s1), outs, strict=True):
        assert torch.equal(s.download(o[0]), x0) and torch.equal(s.download(o[1]), x1)

    a0, a1 = Handle(s0.upload(x0)), Handle(s1.upload(x1))
    collective(s0, "allreduce", [a0], op="avg")
    collective(s1, "allreduce", [a1], op="avg")
    assert torch.equal(s0.download(a0), (x0 + x1) / 2) and torch.equal(s1.download(a1), (x0 + x1) / 2)

    for op in ("max", "min", "product"):
        for s, x in ((s0, x0), (s1, x1)):
            collective(s, "allreduce", [Handle(s.upload(x))], op=op)  # (its output is poisoned: a new one each)
        for s in (s0, s1):  # (round 38) a refused call takes its part in the agreement: both call, then each hears
            with pytest.raises(InvalidArgument, match=f"reduce op {op} is not defined for complex"):
                s.sync()
    a0, a1 = Handle(s0.upload(x0)), Handle(s1.upload(x1))
    collective(s0, "allreduce", [a0], op="sum")  # the group is not broken
    collective(s1, "allreduce", [a1], op="sum")
    assert torch.equal(s0.download(a0), x0 + x1)


def test_a_group_join_with_port_handle_0_says_what_is_missing(daemon_factory: Any) -> None:
    """Rank 0 hosts the group's store and writes its port into `port_handle`; a join naming 0 was refused as
    PERMISSION_DENIED "handle 0x0 belongs to another session" (after the store had opened a port). Now
    INVALID_ARGUMENT naming the field, before any port opens; the session joins with a handle afterwards."""
    d = daemon_factory(fake_gpus=2, worker_network=True)
    lease = uuid.uuid4().hex
    tokens = [d.token(lease_id=lease, device=i, network=True) for i in range(2)]
    with Session.attach(d.address, tokens[0]) as s:
        join = device_pb2.GroupJoin(rank=0, size=2, tokens=tokens, port_handle=0, timeout_seconds=5)
        s.command(device_pb2.Command(group_join=join))
        with pytest.raises(InvalidArgument, match="port_handle 0: it needs a handle of this session"):
            s.sync()
        join.port_handle = h = s.new_handle()
        s.command(device_pb2.Command(group_join=join))
        (port,) = s.sync([h])
        assert 0 < int(port) < 65536
