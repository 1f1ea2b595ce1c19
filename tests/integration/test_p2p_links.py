"""Send and receive between two ranks of a group of three (round 44), driven through the op stream as the `gpupool`
backend drives them (`Collective{kind: p2p}`: client/distributed.py `_flush_links`), over both transports: the secure
default's rank-to-rank links (server/seclink.py `Links`, formed at a pair's first transfer) and gloo's own send and
recv (server/collectives.py `_gloo_p2p`).

Until round 44 the daemons had no such call ("unknown collective 'p2p'") and the clients refused send/recv in a group
of more than two ranks, so pipelines of more than two stages did not run (tests/integration/test_three_ranks.py runs
them as scripts, against torch's gloo).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.client.session import Handle, Session
from support import MiB
from test_collectives import collective, join_all

from gpupool._proto import device_pb2
from gpupool.errors import InvalidArgument, ResourceExhausted


def p2p(s: Session, *transfers: tuple[int, int, int, bool]) -> None:
    """One batch of (handle, peer, tag, sending)."""
    msg = device_pb2.Collective(kind="p2p")
    for h, peer, tag, sending in transfers:
        msg.tensors.append(h)
        msg.peers.append(peer)
        msg.tags.append(tag)
        msg.sending.append(sending)
    s.command(device_pb2.Command(collective=msg))
    s.flush()


@pytest.fixture(params=["secure", "gloo"])
def three(daemon_factory: Any, request: pytest.FixtureRequest) -> Iterator[list[Session]]:
    """Three sessions of one lease on the three fake GPUs of one daemon, joined, on each transport."""
    d = daemon_factory(
        fake_gpus=3, fake_gpu_memory=64 * MiB, worker_network=True, collectives=request.param,
        gloo_connect_anywhere=request.param == "gloo",
    )  # fmt: skip
    lease = uuid.uuid4().hex
    toks = [d.token(lease_id=lease, network=True, device=i) for i in range(3)]
    sessions = [Session.attach(d.address, t) for t in toks]
    join_all(sessions, toks)
    yield sessions
    for s in sessions:
        s.close()


def test_send_and_receive_between_any_two_of_three_ranks(three: list[Session]) -> None:
    s0, s1, s2 = three
    # a ring of 300,000 floats each way (several 1 MiB frames), every rank sending and receiving in one batch
    n = 300_000
    xs = [s.upload(torch.arange(float(n)) * (r + 1)) for r, s in enumerate(three)]
    ys = [s.upload(torch.zeros(n)) for s in three]
    for r, s in enumerate(three):
        p2p(s, (xs[r], (r + 1) % 3, 0, True), (ys[r], (r - 1) % 3, 0, False))
    for r, s in enumerate(three):
        assert torch.equal(s.download(ys[r]), torch.arange(float(n)) * ((r - 1) % 3 + 1)), r
    # ranks 1 and 2 alone (rank 0 runs nothing), tagged sends received in the other order; int64 and bool
    a, b = s1.upload(torch.tensor([1, 2], dtype=torch.int64)), s1.upload(torch.tensor([True, False, True]))
    ra, rb = s2.upload(torch.zeros(2, dtype=torch.int64)), s2.upload(torch.zeros(3, dtype=torch.bool))
    p2p(s1, (a, 2, 5, True), (b, 2, 6, True))
    p2p(s2, (rb, 1, 6, False), (ra, 1, 5, False))
    assert s2.download(ra).tolist() == [1, 2] and s2.download(rb).tolist() == [True, False, True]
    # a pipeline: 0 -> 1 -> 2, each send its own batch
    t0, t1, t2 = s0.upload(torch.full((4,), 3.0)), s1.upload(torch.zeros(4)), s2.upload(torch.zeros(4))
    p2p(s0, (t0, 1, 0, True))
    p2p(s1, (t1, 0, 0, False))
    p2p(s1, (t1, 2, 0, True))
    p2p(s2, (t2, 1, 0, False))
    assert s2.download(t2).tolist() == [3.0] * 4
    # every rank's collectives run on after it, on the star
    oks = [s.upload(torch.ones(2) * (r + 1)) for r, s in enumerate(three)]
    for s, h in zip(three, oks, strict=True):
        collective(s, "allreduce", [h], op="sum")
    assert [s.download(h).tolist() for s, h in zip(three, oks, strict=True)] == [[6.0, 6.0]] * 3


def test_a_disagreeing_or_refused_transfer_fails_its_receiver_and_the_group_goes_on(three: list[Session]) -> None:
    s0, s1, s2 = three
    # sizes disagree: the receiver fails before a byte is written (what was sent is read and dropped); the sender's
    # send went, as gloo's
    x, y = s0.upload(torch.ones(3)), s2.upload(torch.full((4,), 9.0))
    p2p(s0, (x, 2, 0, True))
    p2p(s2, (y, 0, 0, False))
    s0.sync()
    with pytest.raises(InvalidArgument, match=r"disagree \(tag 0\): rank 0 sends 3 elements .* receives 4 elements"):
        s2.sync()
    # dtypes disagree
    x, y = s1.upload(torch.ones(2)), s2.upload(torch.zeros(2, dtype=torch.float64))
    p2p(s1, (x, 2, 0, True))
    p2p(s2, (y, 1, 0, False))
    with pytest.raises(InvalidArgument, match="disagree"):
        s2.sync()
    # a send its own daemon refuses (a handle of no tensor there): its part taken, both ranks told
    r = s1.upload(torch.zeros(2))
    p2p(s0, (0xDEAD00, 1, 0, True))
    p2p(s1, (r, 0, 0, False))
    with pytest.raises(InvalidArgument, match="rank 0's daemon refused its send"):
        s1.sync()
    with pytest.raises(Exception, match="0xdead00|handle"):
        s0.sync()
    # malformed calls: refused at once, nothing taken part in
    h = s0.upload(torch.zeros(1))
    for bad in ([(h, 0, 0, True)], [(h, 3, 0, False)]):
        p2p(s0, *bad)
        with pytest.raises(InvalidArgument, match="cannot send to or receive from rank"):
            s0.sync()
    msg = device_pb2.Collective(kind="p2p", tensors=[h], peers=[1, 2], tags=[0], sending=[True])
    s0.command(device_pb2.Command(collective=msg))
    with pytest.raises(InvalidArgument, match="a peer, a tag and a direction"):
        s0.sync()
    # the group goes on: a transfer and a collective of every rank
    x, y = s0.upload(torch.full((2,), 7.0)), s2.upload(torch.zeros(2))
    p2p(s0, (x, 2, 0, True))
    p2p(s2, (y, 0, 0, False))
    assert s2.download(y).tolist() == [7.0, 7.0]
    oks = [s.upload(torch.ones(1)) for s in three]
    for s, o in zip(three, oks, strict=True):
        collective(s, "allreduce", [o], op="sum")
    assert [s.download(o).item() for s, o in zip(three, oks, strict=True)] == [3.0] * 3


def test_a_tensor_of_more_values_than_the_quota_is_refused_and_the_group_goes_on(three: list[Session]) -> None:
    """One element expanded to 2**36 (256 GiB of values, 4 bytes of memory), sent to rank 1: refused
    RESOURCE_EXHAUSTED naming the quota, with its part taken (rank 1's receive fails INVALID_ARGUMENT at once), and
    the group goes on; the same view in an allreduce is refused alike. On aa4f78c the sender's daemon tried to
    allocate its dense copy outside the quota (256 GiB: "can't allocate memory"; a smaller view, say 4 GiB in a
    64 MiB session, was allocated) before the call took its part, and rank 1's group broke at its timeout
    (UNAVAILABLE)."""
    s0, s1, s2 = three
    [wide] = s0.call("aten::expand.default", Handle(s0.upload(torch.ones(1))), [2**36])
    r = s1.upload(torch.zeros(4))
    p2p(s0, (wide, 1, 0, True))
    p2p(s1, (r, 0, 0, False))
    with pytest.raises(ResourceExhausted, match=r"p2p of tensor .* exceed the session's \d+ byte quota"):
        s0.sync()
    with pytest.raises(InvalidArgument, match="rank 0's daemon refused its send"):
        s1.sync()
    x, y = s0.upload(torch.arange(4.0)), s1.upload(torch.zeros(4))
    p2p(s0, (x, 1, 0, True))
    p2p(s1, (y, 0, 0, False))
    s0.sync()
    assert s1.download(y).tolist() == [0.0, 1.0, 2.0, 3.0]
    # every rank's allreduce of such a view (the ranks agree: 2**36 floats each)
    for s in three:
        [v] = s.call("aten::expand.default", Handle(s.upload(torch.ones(1))), [2**36])
        collective(s, "allreduce", [v], op="sum")
    for s in three:
        with pytest.raises(ResourceExhausted, match="allreduce of tensor .* exceed the session's"):
            s.sync()
    oks = [s.upload(torch.ones(1)) for s in three]
    for s, o in zip(three, oks, strict=True):
        collective(s, "allreduce", [o], op="sum")
    assert [s.download(o).item() for s, o in zip(three, oks, strict=True)] == [3.0] * 3
