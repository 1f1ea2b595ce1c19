"""Round 46 (hostile46): red team of round 45's new surfaces through real daemons.

Subgroups (unmod45, server/collectives.py `_join_subgroup`): ranks of one lease that disagree on a subgroup's members
(one names [0, 1], the other [0, 1, 2], the third never joins) or on how many subgroups of the same members came
before (the ordinal in its secret) form nothing together: each rank's collective on it fails (UNAVAILABLE, within
the join's timeout), and neither the group nor the subgroups they agree on are touched. The fused attention's C++
compositions (enc45) are fuzzed in-process against the Python runs they stand in for (scripts/fuzz_native.py
`attention`, tests/integration/test_native_fuzz.py)."""

from __future__ import annotations

import time
import uuid

import pytest
import torch
from gpupool.client.session import Session
from support import MiB
from test_collectives import join_all
from test_subgroups import _on, the_group_goes_on

from gpupool._proto import device_pb2
from gpupool.errors import Unavailable

FORM = 2.0  # seconds: a subgroup's join timeout here (its formation fails after it)


def _join(s: Session, number: int, members: list[int]) -> None:
    join = device_pb2.GroupJoin(subgroup=number, members=members, timeout_seconds=FORM)
    s.command(device_pb2.Command(group_join=join))
    s.sync()


def test_ranks_that_disagree_on_a_subgroup_form_nothing_together_and_the_rest_goes_on(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(fake_gpus=3, fake_gpu_memory=64 * MiB, worker_network=True)
    lease = uuid.uuid4().hex
    toks = [d.token(lease_id=lease, network=True, device=i) for i in range(3)]
    sessions = [Session.attach(d.address, t) for t in toks]
    try:
        s0, s1, s2 = sessions
        join_all(sessions, toks)
        # subgroups they agree on: [0, 2] (rank 0's number 2, rank 2's number 9: numbers are each session's own)
        # and [0, 1]
        _join(s0, 2, [0, 2])
        _join(s2, 9, [0, 2])
        _join(s0, 4, [0, 1])
        _join(s1, 4, [0, 1])
        # then ones they do not: members (rank 0 says [0, 1] again, rank 1 [0, 1, 2], which rank 2 never joins), and
        # the ordinal (rank 0 joins [0, 2] a second time, rank 2 does not)
        _join(s0, 1, [0, 1])
        _join(s1, 1, [0, 1, 2])
        _join(s0, 3, [0, 2])
        start = time.monotonic()
        bad = [s0.upload(torch.ones(2)), s1.upload(torch.ones(2)), s0.upload(torch.ones(1))]
        _on(s0, 1, "allreduce", [bad[0]], reduce_op="sum")
        _on(s1, 1, "allreduce", [bad[1]], reduce_op="sum")
        for s, match in ((s0, r"subgroup \[0, 1\]"), (s1, r"subgroup \[0, 1, 2\]")):
            with pytest.raises(Unavailable, match=match):
                s.sync()
        _on(s0, 3, "barrier", [bad[2]])
        with pytest.raises(Unavailable, match=r"subgroup \[0, 2\]"):
            s0.sync()
        assert time.monotonic() - start < 30 * FORM
        t = [s0.upload(torch.tensor([1.0])), s2.upload(torch.tensor([5.0]))]
        _on(s0, 2, "allreduce", [t[0]], reduce_op="sum")
        _on(s2, 9, "allreduce", [t[1]], reduce_op="sum")
        assert s0.download(t[0]).tolist() == s2.download(t[1]).tolist() == [6.0]
        # the subgroup they agree on, and the group, go on
        u = [s0.upload(torch.tensor([2.0])), s1.upload(torch.tensor([3.0]))]
        _on(s0, 4, "allreduce", [u[0]], reduce_op="sum")
        _on(s1, 4, "allreduce", [u[1]], reduce_op="sum")
        assert s0.download(u[0]).tolist() == s1.download(u[1]).tolist() == [5.0]
        the_group_goes_on(sessions)
    finally:
        for s in sessions:
            s.close()
