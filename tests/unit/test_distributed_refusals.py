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


def test_send_and_recv_refuse_peers_that_are_not_another_rank() -> None:
    """Until round 38 every send/recv was one InvalidArgument; then a group of two ran them (a broadcast from the
    sender) and a larger group refused them; since round 44 a larger group runs them too (the daemons' rank-to-rank
    links: tests/integration/test_p2p_links.py), all but a peer that is no other rank and a receive without a
    source."""
    pg, t = ProcessGroupGpupool(0, 3, None), torch.zeros(2)
    for call, what, peer in ((lambda: pg.send([t], 0, 0), "send", 0), (lambda: pg.recv([t], 3, 0), "recv", 3)):
        with pytest.raises(InvalidArgument, match=f"{what} on gpupool: rank 0 of 3 sends to and receives from another "
                           f"rank of the group \\(0-2\\), not {peer}"):  # fmt: skip
            call()
    with pytest.raises(InvalidArgument, match="recv without a source on gpupool runs in a group of two only"):
        pg.recv_anysource([t], 0)
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
