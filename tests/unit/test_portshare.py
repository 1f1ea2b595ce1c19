"""server/portshare.py: blocks of --collective-ports given out by two daemons of one host (two PortShares in one
process: one network namespace), and each tenant's share counted across them."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from gpupool.server.portshare import PortShares

from gpupool.errors import InvalidArgument, ResourceExhausted


def test_two_daemons_of_a_host_give_out_disjoint_blocks_and_count_a_tenant_together() -> None:
    names = f"gpupool-test-{uuid.uuid4().hex[:12]}"  # (names of this test's own: real daemons of the host aside)
    a, b = PortShares((40000, 40015), per_tenant=8, names=names), PortShares((40000, 40015), per_tenant=8, names=names)
    try:
        first = [a.take("t1"), b.take("t1")]
        assert sorted(s.ports for s in first) == [(40000, 40003), (40004, 40007)]
        for shares in (a, b):
            with pytest.raises(ResourceExhausted, match=r"hold 8 ports of --collective-ports 40000-40015 on this "
                               r"host, its share \(--collective-ports-per-tenant 8; 4 a session\)"):  # fmt: skip
                shares.take("t1")
        others = [a.take("t2"), b.take("t2")]
        assert {s.ports for s in first + others} == {(40000, 40003), (40004, 40007), (40008, 40011), (40012, 40015)}
        with pytest.raises(ResourceExhausted, match=r"every port of --collective-ports 40000-40015 is held"):
            b.take("t3")
        a.give_back(first[0], 0)  # no worker: free at once, for any tenant of the host
        assert b.take("t3").ports == first[0].ports
        worker = subprocess.Popen(["sleep", "30"])
        a.give_back(others[0], worker.pid)  # its worker still runs: the block stays held until it is gone
        with pytest.raises(ResourceExhausted, match="every port"):
            b.take("t4")  # (waits GONE_WAIT_SECONDS for it)
        assert a.held() == [others[0].ports]
        worker.kill()
        worker.wait()
        assert a.take("t4").ports == others[0].ports
    finally:
        a.close()
        b.close()


def test_a_share_smaller_than_a_session_is_refused_and_a_narrow_range_gives_smaller_blocks() -> None:
    with pytest.raises(InvalidArgument, match=r"--collective-ports-per-tenant 2: a session granted network holds 4"):
        PortShares((40000, 40015), per_tenant=2)
    narrow = PortShares((40000, 40001), per_tenant=0, names=f"gpupool-test-{uuid.uuid4().hex[:12]}")
    try:
        assert narrow.take("t").ports == (40000, 40001)
        with pytest.raises(ResourceExhausted, match="every port"):
            narrow.take("t")
    finally:
        narrow.close()
