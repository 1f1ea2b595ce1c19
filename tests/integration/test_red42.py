"""Round 42's red team, part 2 (red42), through real daemons.

An out= op's growth depends on which of its tensors share a storage, not only on their storages' sizes: outputs that
are views of one storage grow it once, outputs of their own storages each grow theirs. hostile42 keyed the size caches
(the sizer's and the verdict cache) by every tensor's layout and storage size, so a `_foreach_neg.out` into 64 views
of one empty storage taught them one output's bytes (1 MiB), and the same call into 64 fresh empty tensors (the same
layouts and storage sizes) was admitted at 1 MiB and grew 64 MiB past a 16 MiB quota before the check after the kernel
refused it.

And the compact eager records (the torch shim's path) keyed an out= op's verdict by their template and their tensors'
metas only, and a learned run replayed an out= step with the bytes it was learned with: hostile42's `neg.out` into an
empty view of a 12 MiB tensor, then into a fresh zero-element tensor, still grew 12 MiB past a 16 MiB quota there."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session

from gpupool import compact, errors

MiB = 1024**2
K = 64  # outputs


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_an_out_op_is_sized_by_which_outputs_share_a_storage(daemon_factory: Any, isolation: str) -> None:
    """`_foreach_neg.out` of a 1 MiB tensor into K views of one empty storage grows 1 MiB; into K fresh empty tensors
    K MiB, refused before the kernel past a 16 MiB quota (on 43b34ae: admitted at the cached 1 MiB, refused only after
    the kernel had grown K MiB); the session stays within its quota and goes on."""
    d = daemon_factory(isolation=isolation)
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=16 * MiB)) as s:
        x = Handle(s.upload(torch.ones(256 * 1024)))  # 1 MiB
        room = Handle(s.upload(torch.ones(0)))
        views = [Handle(h) for h in (s.call("aten::slice.Tensor", room, 0, 0, 0)[0] for _ in range(K))]
        s.call("aten::_foreach_neg.out", [x] * K, out=views, outputs=0)
        s.sync()
        assert torch.equal(s.download(views[-1]), -torch.ones(256 * 1024))
        fresh = [Handle(s.upload(torch.ones(0))) for _ in range(K)]
        s.call("aten::_foreach_neg.out", [x] * K, out=fresh, outputs=0)
        with pytest.raises(errors.ResourceExhausted, match=f"{K * MiB} bytes requested"):
            s.sync()
        small = torch.arange(256 * 1024, dtype=torch.float32)  # 1 MiB
        assert torch.equal(s.download(s.upload(small)), small)


def _neg_out(x: int, out: int, first: bool) -> bytes:
    """A compact eager record of `neg.out(x, out=out)` (op id 0, named the first time)."""
    head = compact.head(0, "aten::neg.out" if first else None, [])
    return head + b"\1" + compact.tensor(x) + b"\1" + compact.kwarg_key("out") + compact.tensor(out)


def _refused_before_the_kernel(s: Session, x: Handle) -> None:
    """`neg.out` of the 12 MiB `x` into a fresh zero-element tensor is refused before the kernel (the bytes it asks),
    and the session, within its 16 MiB quota, uploads 1 MiB after it."""
    fresh = Handle(s.upload(torch.ones(0)))
    s.sync()
    s.eager_op(_neg_out(x, fresh, False))
    with pytest.raises(errors.ResourceExhausted, match="12582912 bytes requested"):
        s.sync()
    small = torch.arange(256 * 1024, dtype=torch.float32)  # 1 MiB
    assert torch.equal(s.download(s.upload(small)), small)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_learned_runs_out_step_is_sized_by_its_storages(daemon_factory: Any, isolation: str) -> None:
    """Three compact `neg.out` records into empty views of a 12 MiB tensor (room: 0 bytes) make a learned run; a
    fourth into a fresh zero-element tensor of the same layout matches it (on 43b34ae: run with the learned 0 bytes,
    grew 12 MiB past a 16 MiB quota, refused only after the kernel, the session then counted at 24 MiB and refusing a
    1 MiB upload). A run's out= step is sized again from its storages now (executor `_run_step`)."""
    d = daemon_factory(isolation=isolation)
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=16 * MiB)) as s:
        x = Handle(s.upload(torch.ones(3 * MiB)))  # 12 MiB
        for k in range(3):
            [room] = s.call("aten::slice.Tensor", x, 0, 0, 0)
            s.eager_op(_neg_out(x, room, k == 0))
            s.sync()
        assert torch.equal(s.download(Handle(room)), s.download(x))  # the view grew over x's storage: x itself
        _refused_before_the_kernel(s, x)


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_templated_out_record_is_sized_by_its_storages(daemon_factory: Any, isolation: str) -> None:
    """Compact `slice` + `neg.out` into the slice's empty view, four times in one frame: the records' template keyed
    `neg.out`'s verdict (0 bytes) by metas only, and a lone `neg.out` into a fresh zero-element tensor (no learned run
    starts with it) hit that verdict (on 43b34ae: grew 12 MiB past a 16 MiB quota, refused only after the kernel).
    The template's verdict key holds the storages' sizes now (server/templates.py `fill`)."""
    d = daemon_factory(isolation=isolation)
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=16 * MiB)) as s:
        x = Handle(s.upload(torch.ones(3 * MiB)))  # 12 MiB
        s.sync()
        for k in range(4):
            room = s.new_handle()
            head = compact.head(1, "aten::slice.Tensor" if k == 0 else None, [room])
            s.eager_op(head + b"\4" + compact.tensor(x) + compact.encode_value(0) * 3 + b"\0")
            s.eager_op(_neg_out(x, room, k == 0))
        s.sync()
        assert torch.equal(s.download(Handle(room)), s.download(x))  # the view grew over x's storage: x itself
        _refused_before_the_kernel(s, x)
