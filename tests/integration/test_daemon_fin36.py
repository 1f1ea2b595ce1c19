"""Round 36 review (fin36), through real daemons: a collective on a conjugate view (`aten::_conj`, an allowed op: a
view whose conjugate bit is set, its bytes those of the tensor it views) moves its values, as every other op reads
them; the daemon handed the view itself to the transport, which raised on it (gloo's `view_as_real`, the secure hub's
byte view): UNAVAILABLE, the group broken."""

from __future__ import annotations

from typing import Any

import test_collectives
import torch
from gpupool.client.session import Handle, Session
from test_collectives import collective

from gpupool import compact

T = compact.tensor
group = test_collectives.group  # two daemons' sessions of one lease, joined, over each transport (a fixture)


def _rec(op_id: int, name: str | None, outputs: list[int], args: list[bytes]) -> bytes:
    return b"".join([compact.head(op_id, name, outputs), compact.U8.pack(len(args)), *args, compact.U8.pack(0)])


class _Ops:
    """Eager ops of one session by name (an op id each, named at its first use)."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.ids: dict[str, int] = {}

    def __call__(self, name: str, *args: int) -> Handle:
        out = self.s.new_handle()
        known = name in self.ids
        op_id = self.ids.setdefault(name, len(self.ids))
        self.s.eager_op(_rec(op_id, None if known else name, [out], [T(Handle(a)) for a in args]))
        return Handle(out)

    def values(self, h: int) -> torch.Tensor:
        """`h`'s values (a Get sends a conjugate view's raw bytes: its clone's are its values)."""
        return self.s.download(self("aten::clone.default", h))


def test_collectives_on_a_conjugate_view_move_its_values(group: Any) -> None:
    """rank 0's allreduce tensor and allgather input, and rank 1's broadcast tensor, are conjugate views. On 603b88d
    each failed on that rank ("view_as_real doesn't work on unresolved conjugated tensors" over gloo, "torch.Tensor.view
    is not supported for conjugate view tensors" over the secure hub): UNAVAILABLE, the group broken."""
    (s0, s1), _, _ = group
    ops = [_Ops(s0), _Ops(s1)]
    x0 = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    x1 = torch.tensor([-5 + 0.5j, 7j], dtype=torch.complex64)
    c0 = ops[0]("aten::_conj.default", s0.upload(x0))  # its values: conj(x0)
    a1 = Handle(s1.upload(x1))
    collective(s0, "allreduce", [c0], op="sum")
    collective(s1, "allreduce", [a1], op="sum")
    want = x0.conj() + x1
    assert torch.equal(ops[0].values(c0), want) and torch.equal(s1.download(a1), want)

    g0 = ops[0]("aten::_conj.default", s0.upload(x0))
    outs = [[Handle(s.upload(torch.zeros(2, dtype=torch.complex64))) for _ in range(2)] for s in (s0, s1)]
    collective(s0, "allgather", outs[0], [g0])
    collective(s1, "allgather", outs[1], [Handle(s1.upload(x1))])
    for s, o in zip((s0, s1), outs, strict=True):
        assert torch.equal(s.download(o[0]), x0.conj()) and torch.equal(s.download(o[1]), x1)

    # a conjugate view as broadcast's tensor on the receiving rank: it takes the root's values
    b0 = Handle(s0.upload(x0))
    b1 = ops[1]("aten::_conj.default", s1.upload(torch.zeros(2, dtype=torch.complex64)))
    collective(s0, "broadcast", [b0], root=0)
    collective(s1, "broadcast", [b1], root=0)
    assert torch.equal(ops[1].values(b1), x0)


def test_a_get_of_a_conjugate_view_sends_its_values(daemon_factory: Any) -> None:
    """A Get sent a conjugate view's raw bytes, those of the tensor it views: `x.conj()` downloaded as `x` (every op
    on the view reads conj(x): its clone downloaded right). Both a whole Get and one in pieces (a big tensor)."""
    d = daemon_factory()
    with Session.attach(d.address, d.token(tenant="conj")) as s:
        ops = _Ops(s)
        for n in (2, 3 * 1024 * 1024):  # 24 MiB of complex64: several pieces of a session worker's Get
            x = torch.complex(torch.arange(n, dtype=torch.float32), torch.ones(n))
            c = ops("aten::_conj.default", s.upload(x))
            got = s.download(c)
            assert torch.equal(got, x.conj().resolve_conj()), n
