"""The daemons' NCCL groups (`--collectives gloo` on real GPUs with `--landlock off --seccomp off`:
server/collectives.py `_process_group`) on one CUDA device, as far as one GPU shows them (round 46). A job's ranks
need distinct GPUs, so its NCCL groups and subgroups of several ranks never ran on the machines lent so far (one GPU):
what one rank shows is pinned here. The group is NCCL's (`_is_nccl`, which its subgroups follow: a group that fell
back to gloo has gloo subgroups); send/recv at three or more ranks are refused on it (FAILED_PRECONDITION, the group
goes on) instead of breaking it (NCCL took the host copies and headers of `_gloo_p2p`: UNAVAILABLE, the group broken);
and a subgroup left mid-job (`Collectives.leave`) shuts its NCCL group down. Needs CUDA and torch's NCCL
(bench/real_gpu_tests.txt); skips without."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gpupool.server import collectives, seclink

from gpupool.errors import FailedPrecondition

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs a CUDA device and torch's NCCL"
)


def test_a_nccl_group_refuses_p2p_and_its_left_subgroup_shuts_nccl_down() -> None:
    dev = torch.device("cuda", 0)
    store = dist.HashStore()
    pg = collectives._process_group(dist.PrefixStore("group/", store), 0, 1, 30.0, "127.0.0.1", dev)
    assert collectives._is_nccl(pg), type(pg)
    group = collectives.Group("lease", 0, 1, 30.0, transport="gloo")
    group.pg = pg
    group.ready.set()
    t = torch.full((3,), 2.0, device=dev)
    with torch.cuda.device(dev):
        pg.allreduce([t]).wait()
    torch.cuda.synchronize(dev)
    assert t.tolist() == [2.0, 2.0, 2.0]  # one rank: the identity, run by NCCL
    send = seclink.Transfer(1, 0, True, t, collectives._dtype_code(t.dtype), None)
    with pytest.raises(FailedPrecondition, match="do not run over NCCL"):
        collectives.Collectives._p2p(group, [(send, t)])
    assert group.broken is None  # refused, not broken
    sub = collectives.Group("lease", 0, 1, 30.0, transport="gloo")
    sub.parent, sub.members = group, (0,)
    sub.pg = collectives._process_group(dist.PrefixStore("sub/", store), 0, 1, 30.0, "127.0.0.1", dev)
    assert collectives._is_nccl(sub.pg)
    sub.ready.set()
    with torch.cuda.device(dev):
        sub.close()
    assert sub.pg is None and sub.closed
    with torch.cuda.device(dev):
        pg.allreduce([t]).wait()  # the group's own NCCL goes on
    torch.cuda.synchronize(dev)
    assert t.tolist() == [2.0, 2.0, 2.0]
    group.close()
