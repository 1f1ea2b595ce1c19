"""Round 42's red team, part 2 (red42), through real daemons.

An out= op's growth depends on which of its tensors share a storage, not only on their storages' sizes: outputs that
are views of one storage grow it once, outputs of their own storages each grow theirs. hostile42 keyed the size caches
(the sizer's and the verdict cache) by every tensor's layout and storage size, so a `_foreach_neg.out` into 64 views
of one empty storage taught them one output's bytes (1 MiB), and the same call into 64 fresh empty tensors (the same
layouts and storage sizes) was admitted at 1 MiB and grew 64 MiB past a 16 MiB quota before the check after the kernel
refused it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session

from gpupool import errors

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
