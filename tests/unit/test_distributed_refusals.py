"""The gpupool backend's own refusals (client/distributed.py), made before any command reaches a daemon: send/recv
outside a group of two, a rank's own rank as its peer, a root that is not a rank, a gather list that does not fit,
an all_to_all list that is not one tensor per rank.
Each is one InvalidArgument that says what the backend takes. (The collectives themselves run between real daemons:
tests/integration/test_cuda_scripts.py, collectives.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gpupool.client.distributed import ProcessGroupGpupool

from gpupool.errors import InvalidArgument


def _opts(cls: type, root: int) -> object:
    opts = cls()
    opts.rootRank = root
    return opts


def test_send_and_recv_run_in_a_group_of_two_only() -> None:
    """Until round 38 every send/recv was one InvalidArgument; now a group of two runs them (a broadcast from the
    sender), and a larger group says why not."""
    pg, t = ProcessGroupGpupool(0, 3, None), torch.zeros(2)
    for call in (lambda: pg.send([t], 1, 0), lambda: pg.recv([t], 1, 0), lambda: pg.recv_anysource([t], 0)):
        with pytest.raises(InvalidArgument, match="runs between the two ranks of a group of two.*this group has 3"):
            call()
    pair = ProcessGroupGpupool(1, 2, None)
    with pytest.raises(InvalidArgument, match="send on gpupool: rank 1's peer is rank 0, not 1"):
        pair.send([t], 1, 0)
    with pytest.raises(InvalidArgument, match="recv on gpupool: rank 1's peer is rank 0, not 2"):
        pair.recv([t], 2, 0)


def test_reduce_and_gather_refuse_roots_and_lists_that_do_not_fit() -> None:
    pg, t = ProcessGroupGpupool(0, 2, None), torch.zeros(2, 3)
    with pytest.raises(InvalidArgument, match="reduce root 2 is not a rank of a group of 2"):
        pg.reduce([t], _opts(dist.ReduceOptions, 2))
    with pytest.raises(
        InvalidArgument, match=r"root takes a list of 2 tensors shaped as the input \(2, 3\).*\[\(2, 3\)\]"
    ):
        pg.gather([[torch.zeros(2, 3)]], [t], _opts(dist.GatherOptions, 0))
    with pytest.raises(
        InvalidArgument, match=r"shaped as the input \(2, 3\) \(torch.float32\); got \[\(3, 2\), \(2, 3\)\]"
    ):
        pg.gather([[torch.zeros(3, 2), torch.zeros(2, 3)]], [t], _opts(dist.GatherOptions, 0))
    with pytest.raises(InvalidArgument, match="only the root \\(rank 1\\) takes a list; rank 0 got one"):
        pg.gather([[t, t]], [t], _opts(dist.GatherOptions, 1))


def test_all_to_all_refuses_lists_that_are_not_one_tensor_per_rank() -> None:
    """all_to_all runs since round 39 (an allgather: tests/integration/test_cuda_scripts.py); a list that is not one
    tensor per rank is refused before anything is sent (torch's own check lets it through). Until round 39 every
    all-to-all was one InvalidArgument ("all-to-all is not implemented")."""
    pg, t = ProcessGroupGpupool(0, 2, None), torch.zeros(2)
    with pytest.raises(InvalidArgument, match="all_to_all on gpupool takes 2 output and 2 input tensors; got 1 and 2"):
        pg.alltoall([t], [t, t])
