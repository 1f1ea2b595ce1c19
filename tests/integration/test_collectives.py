"""Collectives between real daemons (server/collectives.py), driven through the op stream as the `gpupool`
torch.distributed backend drives them: correctness of each collective, refused joins, mismatched calls,
a rank that never calls and a daemon that dies (each a clear error within seconds, no hang).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid

import pytest
import torch
from gpupool.client.session import Session
from gpupool.server.seclink import bind_in
from support import DaemonHandle, MiB

from gpupool import tokens
from gpupool._proto import device_pb2
from gpupool.errors import GpupoolError, InvalidArgument, PermissionDenied, Unavailable
from gpupool.protocol import COLLECTIVE_PORTS

TIMEOUT = 4.0


def join_all(sessions: list[Session], tokens: list[str], timeout: float = TIMEOUT, host: str = "127.0.0.1") -> int:
    """What client/distributed.py's creator does: rank 0's daemon hosts the store, the others join it (at `host`,
    an address or a name the joining daemon resolves once, server/collectives.py `_resolve_store`). The store's port."""
    h = sessions[0].new_handle()
    join = device_pb2.GroupJoin(rank=0, size=len(sessions), tokens=tokens, port_handle=h, timeout_seconds=timeout)
    sessions[0].command(device_pb2.Command(group_join=join))
    (port,) = sessions[0].sync([h])
    for rank, s in enumerate(sessions[1:], 1):
        join = device_pb2.GroupJoin(
            rank=rank, size=len(sessions), tokens=tokens, store_address=f"{host}:{port}", timeout_seconds=timeout
        )
        s.command(device_pb2.Command(group_join=join))
        s.sync()
    return int(port)


def collective(s: Session, kind: str, tensors: list[int], inputs: list[int] = (), op: str = "", root: int = 0) -> None:  # type: ignore[assignment]
    msg = device_pb2.Collective(kind=kind, tensors=tensors, inputs=list(inputs), reduce_op=op, root=root)
    s.command(device_pb2.Command(collective=msg))
    s.flush()


def hosts(daemon_factory, transport: str) -> list[DaemonHandle]:  # type: ignore[no-untyped-def]
    """Two daemons (two hosts) granting network on `transport` (gloo with its operator's opt-in to connect anywhere)."""
    return [
        daemon_factory(
            host_id=f"host-{i}", fake_gpu_memory=64 * MiB, worker_network=True, collectives=transport,
            gloo_connect_anywhere=transport == "gloo",
        )
        for i in range(2)
    ]  # fmt: skip


@pytest.fixture(params=["secure", "gloo"])
def group(daemon_factory, request) -> tuple[list[Session], list[DaemonHandle], list[str]]:  # type: ignore[no-untyped-def]
    """Two daemons (two hosts), one session each, of one lease; joined. Over each transport (--collectives):
    the secure default (server/seclink.py) and the plaintext gloo opt-in."""
    lease = uuid.uuid4().hex
    daemons = hosts(daemon_factory, request.param)
    tokens = [d.token(lease_id=lease, network=True) for d in daemons]
    sessions = [Session.attach(d.address, t) for d, t in zip(daemons, tokens, strict=True)]
    join_all(sessions, tokens, host="localhost")  # a name: rank 1's daemon connects to the address it resolved
    yield sessions, daemons, tokens
    for s in sessions:
        s.close()


def test_collectives_compute_across_daemons(group) -> None:  # type: ignore[no-untyped-def]
    (s0, s1), _, _ = group
    a0, a1 = s0.upload(torch.tensor([1.0, 2.0, 3.0])), s1.upload(torch.tensor([10.0, 20.0, 30.0]))
    collective(s0, "allreduce", [a0], op="sum")
    collective(s1, "allreduce", [a1], op="sum")
    assert s0.download(a0).tolist() == s1.download(a1).tolist() == [11.0, 22.0, 33.0]

    m0, m1 = s0.upload(torch.tensor([2.0, 4.0])), s1.upload(torch.tensor([4.0, 8.0]))
    collective(s0, "allreduce", [m0], op="avg")
    collective(s1, "allreduce", [m1], op="avg")
    assert s1.download(m1).tolist() == [3.0, 6.0]

    b0, b1 = s0.upload(torch.zeros(2)), s1.upload(torch.tensor([7.0, 8.0]))
    collective(s0, "broadcast", [b0], root=1)
    collective(s1, "broadcast", [b1], root=1)
    assert s0.download(b0).tolist() == [7.0, 8.0]

    x0, x1 = s0.upload(torch.tensor([1.0])), s1.upload(torch.tensor([2.0]))
    outs0 = [s0.upload(torch.zeros(1)) for _ in range(2)]
    outs1 = [s1.upload(torch.zeros(1)) for _ in range(2)]
    collective(s0, "allgather", outs0, [x0])
    collective(s1, "allgather", outs1, [x1])
    assert [s1.download(h).item() for h in outs1] == [1.0, 2.0]

    r0, r1 = s0.upload(torch.arange(4.0)), s1.upload(torch.arange(4.0) * 10)
    o0, o1 = s0.upload(torch.zeros(2)), s1.upload(torch.zeros(2))
    collective(s0, "reduce_scatter", [o0], [r0], op="sum")
    collective(s1, "reduce_scatter", [o1], [r1], op="sum")
    assert s0.download(o0).tolist() == [0.0, 11.0] and s1.download(o1).tolist() == [22.0, 33.0]

    collective(s0, "barrier", [])
    collective(s1, "barrier", [])
    s0.sync()
    s1.sync()


def test_mismatched_shapes_fail_on_every_rank_and_the_group_survives(group) -> None:  # type: ignore[no-untyped-def]
    (s0, s1), _, _ = group
    a0, a1 = s0.upload(torch.ones(3)), s1.upload(torch.ones(4))
    collective(s0, "allreduce", [a0], op="sum")
    collective(s1, "allreduce", [a1], op="sum")
    for s in (s0, s1):
        with pytest.raises(InvalidArgument, match="ranks disagree.*rank 0: allreduce.*3 elements.*rank 1.*4 elements"):
            s.sync()
    d0, d1 = s0.upload(torch.ones(2)), s1.upload(torch.ones(2, dtype=torch.float64))
    collective(s0, "allreduce", [d0], op="sum")
    collective(s1, "allreduce", [d1], op="sum")
    for s in (s0, s1):
        with pytest.raises(InvalidArgument, match="float32.*float64"):
            s.sync()
    ok0, ok1 = s0.upload(torch.ones(2)), s1.upload(torch.ones(2))
    collective(s0, "allreduce", [ok0], op="sum")
    collective(s1, "allreduce", [ok1], op="sum")
    assert s0.download(ok0).tolist() == [2.0, 2.0]


def _group_still_works(s0: Session, s1: Session) -> None:
    ok0, ok1 = s0.upload(torch.ones(2)), s1.upload(torch.ones(2) * 2)
    collective(s0, "allreduce", [ok0], op="sum")
    collective(s1, "allreduce", [ok1], op="sum")
    assert s0.download(ok0).tolist() == s1.download(ok1).tolist() == [3.0, 3.0]


def test_calls_the_honest_client_never_sends_are_refused_on_every_rank_and_the_group_survives(group) -> None:  # type: ignore[no-untyped-def]
    """(round 38) Raw calls one rank's (hostile or buggy) client sends and its peer's does not: each one
    INVALID_ARGUMENT on every rank before a byte moves, the group usable after it. On the base the allgather whose
    outputs had the input's size but another shape, the bool avg, the bool sum (secure) and int16 (gloo) broke the
    group mid-call (UNAVAILABLE), and a
    call refused by its own daemon (two broadcast tensors) left its peer waiting out the group's timeout."""
    (s0, s1), _, _ = group
    # allgather: outputs of the input's element count, another shape, on rank 1 only
    x0, x1 = s0.upload(torch.arange(4.0)), s1.upload(torch.arange(4.0))
    outs0 = [s0.upload(torch.zeros(4)) for _ in range(2)]
    outs1 = [s1.upload(torch.zeros(2, 2)) for _ in range(2)]
    collective(s0, "allgather", outs0, [x0])
    collective(s1, "allgather", outs1, [x1])
    with pytest.raises(InvalidArgument, match=r"rank 1: a call its daemon refused"):
        s0.sync()
    with pytest.raises(InvalidArgument, match=r"allgather takes outputs of its input's shape \[4\]"):
        s1.sync()
    _group_still_works(s0, s1)
    # bool allreduce avg on both ranks (the signatures agree)
    b0, b1 = s0.upload(torch.tensor([True, False])), s1.upload(torch.tensor([True, True]))
    collective(s0, "allreduce", [b0], op="avg")
    collective(s1, "allreduce", [b1], op="avg")
    for s in (s0, s1):
        with pytest.raises(InvalidArgument, match="avg"):
            s.sync()
    _group_still_works(s0, s1)
    # bool sum (an or, as gloo's): the secure hub summed bytes to 2, refused as a forgery, the group broken
    b0, b1 = s0.upload(torch.tensor([True, False, False])), s1.upload(torch.tensor([True, True, False]))
    collective(s0, "allreduce", [b0], op="sum")
    collective(s1, "allreduce", [b1], op="sum")
    assert s0.download(b0).tolist() == s1.download(b1).tolist() == [True, True, False]
    # int16: the secure transport sums it; gloo has no int16 ("Invalid scalar type" mid-call, the group broken)
    h0, h1 = s0.upload(torch.ones(2, dtype=torch.int16)), s1.upload(torch.ones(2, dtype=torch.int16))
    collective(s0, "allreduce", [h0], op="sum")
    collective(s1, "allreduce", [h1], op="sum")
    for s, h in ((s0, h0), (s1, h1)):
        try:
            assert s.download(h).tolist() == [2, 2]
        except InvalidArgument as exc:
            assert "the gloo transport has no int16" in str(exc)
    _group_still_works(s0, s1)
    # a broadcast of two tensors on rank 0 only (refused by rank 0's daemon before the agreement on the base)
    c0, d0, c1 = s0.upload(torch.ones(1)), s0.upload(torch.ones(1)), s1.upload(torch.zeros(2))
    collective(s0, "broadcast", [c0, d0], root=0)
    collective(s1, "broadcast", [c1], root=0)
    with pytest.raises(InvalidArgument, match="one tensor per rank"):
        s0.sync()
    with pytest.raises(InvalidArgument, match="rank 0: a call its daemon refused"):
        s1.sync()
    _group_still_works(s0, s1)
    # reduce_scatter whose output is not 1/size of its input, on rank 1 only
    r0, r1 = s0.upload(torch.arange(4.0)), s1.upload(torch.arange(4.0))
    o0, o1 = s0.upload(torch.zeros(2)), s1.upload(torch.zeros(3))
    collective(s0, "reduce_scatter", [o0], [r0], op="sum")
    collective(s1, "reduce_scatter", [o1], [r1], op="sum")
    for s in (s0, s1):
        with pytest.raises(InvalidArgument):
            s.sync()
    _group_still_works(s0, s1)


def test_a_handle_one_rank_cannot_resolve_fails_every_rank_and_the_group_survives(group) -> None:  # type: ignore[no-untyped-def]
    """(round 38 review) A rank whose input was freed (or poisoned by an op that failed there only) refused the call
    before the agreement: its peer waited out the group's timeout (UNAVAILABLE) and the group was over. Now the
    refusing rank takes its part, marked refused: it hears its own error, the peer INVALID_ARGUMENT at once."""
    (s0, s1), _, _ = group
    a0, gone1 = s0.upload(torch.ones(2)), s1.upload(torch.ones(2))
    s1.free([gone1])
    collective(s0, "allreduce", [a0], op="sum")
    collective(s1, "allreduce", [gone1], op="sum")
    with pytest.raises(InvalidArgument, match="rank 1: a call its daemon refused"):
        s0.sync()
    with pytest.raises(GpupoolError) as err:
        s1.sync()
    assert not isinstance(err.value, Unavailable), err.value
    _group_still_works(s0, s1)


def test_rank_that_never_calls_is_a_clear_error_in_seconds(group) -> None:  # type: ignore[no-untyped-def]
    (s0, _), _, _ = group
    a0 = s0.upload(torch.ones(3))
    start = time.monotonic()
    collective(s0, "allreduce", [a0], op="sum")
    with pytest.raises(Unavailable, match="collective allreduce.*rank 0 of 2"):
        s0.sync()
    assert time.monotonic() - start < 10.0
    with pytest.raises(Unavailable):  # the group is broken: later collectives fail at once, and say why
        collective(s0, "barrier", [])
        s0.sync()


def test_dead_daemon_fails_its_peers_within_seconds(serve_process, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    lease = uuid.uuid4().hex
    d0 = daemon_factory(host_id="host-0", fake_gpu_memory=64 * MiB, worker_network=True)
    d1 = serve_process("--fake-gpus", "1", "--fake-gpu-memory", "64MiB", "--worker-network", "on")
    tokens = [d0.token(lease_id=lease, network=True), d1.token(lease_id=lease, network=True)]
    s0, s1 = Session.attach(d0.address, tokens[0]), Session.attach(d1.address, tokens[1])
    join_all([s0, s1], tokens, timeout=60.0)  # the error must come from the dead peer, not the timeout
    a0, a1 = s0.upload(torch.ones(2)), s1.upload(torch.ones(2))
    collective(s0, "allreduce", [a0], op="sum")
    collective(s1, "allreduce", [a1], op="sum")
    assert s0.download(a0).tolist() == [2.0, 2.0]
    assert d1.process is not None
    d1.process.kill()
    d1.process.wait()
    start = time.monotonic()
    collective(s0, "allreduce", [a0], op="sum")
    with pytest.raises(Unavailable, match="collective allreduce"):
        s0.sync()
    assert time.monotonic() - start < 10.0
    with pytest.raises(GpupoolError):
        s1.sync()
    s0.close()
    s1.close()


def test_joins_are_refused_unless_every_token_is_of_the_same_lease(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(host_id="host-0", fake_gpus=2, fake_gpu_memory=64 * MiB, worker_network=True)
    lease = uuid.uuid4().hex
    mine, other = d.token(lease_id=lease, network=True), d.token(lease_id=uuid.uuid4().hex, device=1)
    peer = d.token(lease_id=lease, device=1, network=True)
    s = Session.attach(d.address, mine)

    def join(rank: int, tokens: list[str], address: str = "127.0.0.1:1") -> None:
        msg = device_pb2.GroupJoin(rank=rank, size=len(tokens), tokens=tokens, store_address=address)
        s.command(device_pb2.Command(group_join=msg))
        s.sync()

    with pytest.raises(PermissionDenied, match="token is of lease"):
        join(1, [other, mine])
    with pytest.raises(PermissionDenied, match="not this session's device"):
        join(1, [mine, peer])
    with pytest.raises(InvalidArgument, match="ranks share device"):
        join(1, [mine, mine])
    with pytest.raises(GpupoolError, match="signature|malformed"):
        join(1, [mine[:-4] + "AAAA", mine])
    with pytest.raises(PermissionDenied, match="not on a private network"):
        join(1, [peer, mine], "8.8.8.8:4000")
    with pytest.raises(InvalidArgument, match="bad group"):
        join(3, [peer, mine])
    s.close()


def test_a_rank_names_no_store_port_outside_its_daemons_collective_ports(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """The store's address is the client's word: a daemon connects to no port outside its --collective-ports (the
    same range on every daemon of a pool: rank 0's store is in it), the only ports its worker may reach under Landlock
    (round 42). On ca5fb68 the join was taken and its worker dialled the port (here the daemon's own)."""
    d = daemon_factory(fake_gpu_memory=64 * MiB, worker_network=True)
    lease = uuid.uuid4().hex
    tokens = [d.token(lease_id=lease, host="absent-host"), d.token(lease_id=lease, network=True)]
    with Session.attach(d.address, tokens[1]) as s:
        port = int(d.address.rpartition(":")[2])
        join = device_pb2.GroupJoin(rank=1, size=2, tokens=tokens, store_address=f"127.0.0.1:{port}")
        s.command(device_pb2.Command(group_join=join))
        with pytest.raises(InvalidArgument, match=f"store port {port} is outside this daemon's --collective-ports"):
            s.sync()
        assert s.download(s.upload(torch.ones(1))).tolist() == [1.0]  # the session stays usable


def test_collective_before_join_is_refused(daemon) -> None:  # type: ignore[no-untyped-def]
    s = Session.attach(daemon.address, daemon.token())
    h = s.upload(torch.ones(2))
    collective(s, "allreduce", [h], op="sum")
    with pytest.raises(GpupoolError, match="before joining a group"):
        s.sync()
    assert s.download(s.upload(torch.ones(1))).tolist() == [1.0]  # the session stays usable
    s.close()


def test_a_waiting_collective_leaves_other_devices_sessions_alone(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    lease = uuid.uuid4().hex
    a = daemon_factory(host_id="host-0", fake_gpus=2, fake_gpu_memory=64 * MiB, worker_network=True)
    b = daemon_factory(host_id="host-1", fake_gpu_memory=64 * MiB, worker_network=True)
    tokens = [a.token(lease_id=lease, network=True), b.token(lease_id=lease, network=True)]
    s0, s1 = Session.attach(a.address, tokens[0]), Session.attach(b.address, tokens[1])
    other = Session.attach(a.address, a.token(device=1))  # another tenant, the same daemon
    wait = 12.0  # the group's timeout: how long rank 0's collective waits for rank 1
    join_all([s0, s1], tokens, timeout=wait)
    h = s0.upload(torch.ones(2))
    began = time.monotonic()
    collective(s0, "allreduce", [h], op="sum")  # rank 1 never calls: rank 0 waits for it
    time.sleep(0.5)
    x = other.upload(torch.arange(3.0))
    assert other.download(x).tolist() == [0.0, 1.0, 2.0]
    # served while the collective still waited: before its timeout, counted from before it was sent (a daemon that
    # held the other device until the collective gave up would answer `wait` s after `began` or later). Causality,
    # not a wall-clock figure (3 s, which a busy CI machine may exceed), with `wait` s of room.
    assert time.monotonic() - began < wait
    with pytest.raises(Unavailable, match="collective allreduce"):
        s0.sync()
    assert other.download(x).tolist() == [0.0, 1.0, 2.0]
    for s in (s0, s1, other):
        s.close()


def two_ranks(daemon_factory, transport: str) -> tuple[list[DaemonHandle], list[str], list[Session]]:  # type: ignore[no-untyped-def]
    """Two daemons (two hosts) on `transport`, and a session on each of one lease (not joined yet)."""
    lease = uuid.uuid4().hex
    daemons = hosts(daemon_factory, transport)
    tokens = [d.token(lease_id=lease, network=True) for d in daemons]
    return daemons, tokens, [Session.attach(d.address, t) for d, t in zip(daemons, tokens, strict=True)]


@pytest.mark.parametrize("transport", ["secure", "gloo"])
def test_a_waiting_collective_leaves_its_own_devices_other_sessions_alone(daemon_factory, transport: str) -> None:  # type: ignore[no-untyped-def]
    """A tenant holding both ranks holds back rank 1: rank 0's collective waits for it (up to the group's
    timeout, 300 s at most, every call). It held its device's thread all that time, so another tenant's session
    on the same device got nothing done (round 17). The collective now waits in its group's thread: the other
    tenant's ops are served while it waits, and it completes, correct, once rank 1 calls."""
    daemons, tokens, (s0, s1) = two_ranks(daemon_factory, transport)
    other = Session.attach(daemons[0].address, daemons[0].token(tenant="other"))  # device 0 of host-0, as s0
    join_all([s0, s1], tokens, timeout=60.0)
    h0, h1 = s0.upload(torch.ones(4)), s1.upload(torch.full((4,), 2.0))
    collective(s0, "allreduce", [h0], op="sum")  # rank 1 does not call yet: rank 0 waits
    done = threading.Event()
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            s0.sync()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            done.set()

    t = threading.Thread(target=wait)
    t.start()
    x = other.upload(torch.arange(3.0))
    [y] = other.call("aten::mul.Tensor", x, x)
    assert other.download(y).tolist() == [0.0, 1.0, 4.0]
    assert not done.is_set(), f"rank 0's collective ended before the other tenant was served: {outcome}"
    collective(s1, "allreduce", [h1], op="sum")
    s1.sync()
    t.join(60)
    assert outcome == [None]
    assert s0.download(h0).tolist() == [3.0] * 4 and s1.download(h1).tolist() == [3.0] * 4
    for s in (s0, s1, other):
        s.close()


def _slices(d: DaemonHandle) -> int:
    """Slices the daemon's device 0 has run (gpupool_batch_duration_seconds' count)."""
    hist = d.running.daemon.ledger.slices.get(0)
    return sum(hist.counts) if hist is not None else 0


@pytest.mark.parametrize("transport", ["secure", "gloo"])
def test_a_lone_waiting_collective_keeps_its_device_in_one_slice(daemon_factory, transport: str) -> None:  # type: ignore[no-untyped-def]
    """With nobody else on its device, a collective waiting for its peers keeps the device's thread: it does not
    end its slice every 5 ms (POLL_SECONDS) for nobody, paying a slice round trip through the daemon each time
    (round 18's first version: ~200 slices a second). Counted in the daemon's slice histogram, not timed: rank 1
    calls a second late, and rank 0's device runs a handful of slices in all, not one per look."""
    daemons, tokens, (s0, s1) = two_ranks(daemon_factory, transport)
    join_all([s0, s1], tokens, timeout=60.0)
    h0, h1 = s0.upload(torch.ones(4)), s1.upload(torch.full((4,), 2.0))
    s0.sync()
    before = _slices(daemons[0])
    collective(s0, "allreduce", [h0], op="sum")
    time.sleep(1.0)  # rank 0 waits for rank 1 all this while
    collective(s1, "allreduce", [h1], op="sum")
    s0.sync()
    s1.sync()
    slices = _slices(daemons[0]) - before
    assert slices <= 4, f"rank 0's lone collective ran in {slices} slices"
    assert s0.download(h0).tolist() == [3.0] * 4 and s1.download(h1).tolist() == [3.0] * 4
    for s in (s0, s1):
        s.close()


@pytest.mark.parametrize("transport", ["secure", "gloo"])
def test_ranks_holding_differently_renewed_tokens_form_one_group(daemon_factory, transport: str) -> None:  # type: ignore[no-untyped-def]
    """Each rank's process renews the lease on its own, so the ranks send different tokens of it (another expiry,
    another signature). The group is keyed from the lease's `group` claim, the same in all of them: it forms.
    Tokens naming different group secrets are refused."""
    lease = uuid.uuid4().hex
    daemons = hosts(daemon_factory, transport)
    group = tokens.lease_group(daemons[0].key, lease)
    assert group == tokens.lease_group(daemons[1].key, lease)  # one scheduler key for both daemons
    first, renewed = (
        [d.token(lease_id=lease, network=True, group=group, ttl=ttl) for d in daemons] for ttl in (3600.0, 3000.0)
    )
    assert first[0] != renewed[0]
    sessions = [Session.attach(d.address, t) for d, t in zip(daemons, first, strict=True)]
    try:
        h = sessions[0].new_handle()
        join = device_pb2.GroupJoin(rank=0, size=2, tokens=first, port_handle=h, timeout_seconds=TIMEOUT)
        sessions[0].command(device_pb2.Command(group_join=join))
        (port,) = sessions[0].sync([h])
        join = device_pb2.GroupJoin(
            rank=1, size=2, tokens=renewed, store_address=f"127.0.0.1:{port}", timeout_seconds=TIMEOUT
        )
        sessions[1].command(device_pb2.Command(group_join=join))
        sessions[1].sync()
        a0, a1 = sessions[0].upload(torch.tensor([1.0, 2.0])), sessions[1].upload(torch.tensor([10.0, 20.0]))
        collective(sessions[0], "allreduce", [a0], op="sum")
        collective(sessions[1], "allreduce", [a1], op="sum")
        assert sessions[0].download(a0).tolist() == sessions[1].download(a1).tolist() == [11.0, 22.0]
        sessions.pop().close()  # the device's session of this lease: a new one may attach
        other = [first[0], daemons[1].token(lease_id=lease, network=True, group="0" * 64, device=0)]
        with Session.attach(daemons[1].address, other[1]) as s:
            join = device_pb2.GroupJoin(rank=1, size=2, tokens=other, store_address=f"127.0.0.1:{port}")
            s.command(device_pb2.Command(group_join=join))
            with pytest.raises(PermissionDenied, match="another group secret"):
                s.sync()
    finally:
        for s in sessions:
            s.close()


def test_each_rank_sends_its_daemon_its_own_token_alone_and_the_group_forms(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """A lease token is a bearer credential for its device's session: a rank whose join carried every rank's
    token handed a hostile host of the job the others' devices (to attach as the tenant while their rank's
    session is not attached). The client's join (client/distributed.py `_join_message`) sends scheduler-style
    tokens (with the lease's `group` claim) alone; each daemon, given only its own rank's, forms the group and
    reduces. Hand-minted tokens (no `group` claim) still go all together, rank 0's first: the group's secret comes
    from rank 0's token then; a one-token join with such a token is refused, saying why."""
    from gpupool.client.distributed import _join_message

    lease = uuid.uuid4().hex
    daemons = [daemon_factory(host_id=f"host-{i}", fake_gpu_memory=64 * MiB, worker_network=True) for i in range(2)]
    group = tokens.lease_group(daemons[0].key, lease)
    # lease order: host-1's device first, so rank r's token is not simply the r-th
    lease_tokens = [d.token(lease_id=lease, network=True, group=group) for d in reversed(daemons)]
    devices = [1, 0]  # rank 0 on lease device 1 (host-0), rank 1 on lease device 0 (host-1)
    joins = [_join_message(lease_tokens, devices, rank, TIMEOUT) for rank in range(2)]
    assert [list(j.tokens) for j in joins] == [[lease_tokens[1]], [lease_tokens[0]]]
    assert [(j.rank, j.size) for j in joins] == [(0, 2), (1, 2)]
    hand = [d.token(lease_id=lease, network=True) for d in reversed(daemons)]
    assert list(_join_message(hand, devices, 1, TIMEOUT).tokens) == [hand[1], hand[0]]  # rank order

    sessions = [Session.attach(d.address, lease_tokens[dev]) for d, dev in zip(daemons, devices, strict=True)]
    try:
        joins[0].port_handle = h = sessions[0].new_handle()
        sessions[0].command(device_pb2.Command(group_join=joins[0]))
        (port,) = sessions[0].sync([h])
        joins[1].store_address = f"127.0.0.1:{port}"
        sessions[1].command(device_pb2.Command(group_join=joins[1]))
        sessions[1].sync()
        a0, a1 = sessions[0].upload(torch.tensor([1.0, 2.0])), sessions[1].upload(torch.tensor([10.0, 20.0]))
        collective(sessions[0], "allreduce", [a0], op="sum")
        collective(sessions[1], "allreduce", [a1], op="sum")
        assert sessions[0].download(a0).tolist() == sessions[1].download(a1).tolist() == [11.0, 22.0]
    finally:
        for s in sessions:
            s.close()
    with Session.attach(daemons[1].address, hand[0]) as s:
        join = device_pb2.GroupJoin(rank=1, size=2, tokens=[hand[0]], store_address=f"127.0.0.1:{port}")
        s.command(device_pb2.Command(group_join=join))
        with pytest.raises(InvalidArgument, match="needs the lease's `group` claim"):
            s.sync()
        assert s.download(s.upload(torch.ones(1))).tolist() == [1.0]  # the session stays usable


def _rank_0_alone(daemon: DaemonHandle) -> Session:
    """A session that joined, as rank 0, a two-rank group whose rank 1 (on an absent host) never comes."""
    lease = uuid.uuid4().hex
    tokens = [daemon.token(lease_id=lease, network=True), daemon.token(lease_id=lease, host="absent-host")]
    s = Session.attach(daemon.address, tokens[0])
    h = s.new_handle()
    join = device_pb2.GroupJoin(rank=0, size=2, tokens=tokens, port_handle=h, timeout_seconds=60.0)
    s.command(device_pb2.Command(group_join=join))
    s.sync([h])
    return s


@pytest.mark.parametrize(("transport", "isolation"), [("secure", "thread"), ("gloo", "thread"), ("secure", "process")])
def test_abandoned_collectives_end_with_their_sessions(daemon_factory, transport: str, isolation: str) -> None:  # type: ignore[no-untyped-def]
    """--isolation thread (sessions in the daemon's process; in its own worker process, the default, a session's
    collective ends with the process, killed at close: checked too): sessions join groups whose rank 1 never
    comes, start a collective (it waits for the group to form, keeping the device while nobody else waits) and
    close. The closed session had left the fair queue, so it was never told that others waited: its collective
    kept the device, every other session of it waiting, for the group's timeout (60 s here, 300 s at most), and
    its thread then waited out the timeout again holding the session's tensors. Both end with the session now."""
    daemon = daemon_factory(fake_gpu_memory=64 * MiB, worker_network=True, collectives=transport, isolation=isolation)
    other = Session.attach(daemon.address, daemon.token(tenant="other"))

    def collective_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("gpupool-collective-")}

    before = collective_threads()
    started = time.monotonic()
    for _ in range(3):
        s = _rank_0_alone(daemon)
        collective(s, "allreduce", [s.upload(torch.ones(4))], op="sum")
        time.sleep(0.2)  # its slice waits in the collective
        s.close()
        x = other.upload(torch.arange(3.0))  # another tenant of the device is served
        assert other.download(x).tolist() == [0.0, 1.0, 2.0]
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"the device was held {elapsed:.0f} s by closed sessions' collectives"
    deadline = time.monotonic() + 10
    while collective_threads() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    left = collective_threads() - before
    assert not left, f"{len(left)} collectives' threads outlived their sessions"
    other.close()


def _listening_sockets() -> int:
    """TCP sockets of this process (the daemon's, under --isolation thread) in LISTEN state."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                count += fields[3] == "0A" and fields[9] in mine
    return count


@pytest.mark.parametrize("transport", ["secure", "gloo"])
def test_abandoned_groups_end_their_threads_and_sockets(daemon_factory, transport: str) -> None:  # type: ignore[no-untyped-def]
    """Sessions join groups whose rank 1 never comes and close without a collective. Each group's join thread
    (`gpupool-group-N`), rank 0's store and (secure) hub listener, or (gloo) its rendezvous, stayed until the
    group's timeout (60 s here, 300 s at most): a tenant looping join-and-close held threads and listening
    sockets without bound. They end with the session now (Group.close sets the join's stop)."""
    daemon = daemon_factory(fake_gpu_memory=64 * MiB, worker_network=True, collectives=transport, isolation="thread")

    def group_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("gpupool-group-")}

    with Session.attach(daemon.address, daemon.token(tenant="warm")) as warm:  # the daemon's own threads started
        warm.download(warm.upload(torch.ones(1)))
    time.sleep(0.5)
    before, listening, tasks = group_threads(), _listening_sockets(), len(os.listdir("/proc/self/task"))
    n = 8
    for _ in range(n):
        s = _rank_0_alone(daemon)
        time.sleep(0.2)  # its join waits for rank 1
        assert _listening_sockets() > listening  # rank 0's store (and hub) listen: the count sees them
        s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (group_threads() - before or _listening_sockets() > listening):
        time.sleep(0.1)
    left = group_threads() - before
    assert not left, f"{len(left)} of {n} abandoned groups' join threads outlived their sessions"
    assert _listening_sockets() <= listening, f"{_listening_sockets() - listening} listening sockets left"
    grown = len(os.listdir("/proc/self/task")) - tasks
    assert grown < n, f"{grown} threads more after {n} abandoned groups"


def test_a_join_to_a_dead_store_ends_with_its_session(daemon_factory, closed_collective_port) -> None:  # type: ignore[no-untyped-def]
    """Rank 1 names a store address where nothing answers (a closed port: refused, retried). Its join thread
    (`gpupool-group-N`) ran one TCPStore constructor with the group's timeout (60 s here, 300 s at most) that no
    session close reached: a tenant looping join-and-close under --isolation thread held a thread per loop for
    that long. The store is now reached in short attempts that stop with the session."""
    daemon = daemon_factory(fake_gpu_memory=64 * MiB, worker_network=True, isolation="thread")
    before = _group_threads()
    n = 4
    for _ in range(n):
        lease = uuid.uuid4().hex
        tokens = [daemon.token(lease_id=lease, host="absent-host"), daemon.token(lease_id=lease, network=True)]
        s = Session.attach(daemon.address, tokens[1])
        join = device_pb2.GroupJoin(
            rank=1, size=2, tokens=tokens, store_address=f"127.0.0.1:{closed_collective_port}", timeout_seconds=60.0
        )
        s.command(device_pb2.Command(group_join=join))
        s.sync()
        time.sleep(0.3)  # its join retries the dead address
        assert _group_threads() - before, "the join thread is not running: the test sees nothing"
        s.close()
    _joins_end(before, n, "a dead store")


def _group_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("gpupool-group-")}


def _joins_end(before: set[threading.Thread], n: int, where: str) -> None:
    """The join threads started since `before` end within 10 s (their sessions closed)."""
    deadline = time.monotonic() + 10
    while _group_threads() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _group_threads() - before
    assert not left, f"{len(left)} of {n} joins to {where} outlived their sessions"


def test_a_join_to_a_port_that_accepts_and_never_answers_ends_with_its_session(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """Rank 1 names a store address that accepts connections and never answers (no store; a listener that waits
    for its client to speak in its own protocol). torch's TCPStore client constructor waits for the store's answer
    to its handshake without its timeout and cannot be interrupted from Python: round 22's join thread
    (`gpupool-group-N`) hung in it for the daemon's life, its socket open, after the session closed (a tenant
    looping join-and-close under --isolation thread held a thread and a socket per loop). The client now talks to
    the store through the join's own loopback relay, which closes at the join's deadline and with the session: the
    constructor sees the connection end and raises, the thread ends, the address's connection is closed."""
    daemon = daemon_factory(fake_gpu_memory=64 * MiB, worker_network=True, isolation="thread")
    silent = socket.socket()  # accepts (the kernel's backlog and accept below), never says anything
    bind_in(COLLECTIVE_PORTS, lambda port: silent.bind(("127.0.0.1", port)))
    silent.listen(16)
    accepted: list[socket.socket] = []
    before = _group_threads()
    n = 3
    try:
        for _ in range(n):
            lease = uuid.uuid4().hex
            tokens = [daemon.token(lease_id=lease, host="absent-host"), daemon.token(lease_id=lease, network=True)]
            s = Session.attach(daemon.address, tokens[1])
            join = device_pb2.GroupJoin(
                rank=1, size=2, tokens=tokens, store_address=f"127.0.0.1:{silent.getsockname()[1]}",
                timeout_seconds=60.0,
            )  # fmt: skip
            s.command(device_pb2.Command(group_join=join))
            s.sync()
            silent.settimeout(10)
            conn, _ = silent.accept()  # the join reached the address (its probe, or the store client's connection)
            accepted.append(conn)
            time.sleep(1.0)  # past the probe: a store client waits for its handshake's answer
            assert _group_threads() - before, "the join thread is not running: the test sees nothing"
            s.close()
        _joins_end(before, n, "a silent port")
        for conn in accepted:  # every connection the daemon opened to the address is closed (reads its end)
            conn.settimeout(5)
            while conn.recv(4096):
                pass
    finally:
        for conn in accepted:
            conn.close()
        silent.close()


def test_a_join_to_a_dead_store_does_not_flood_the_daemons_log(daemon_factory, capfd, closed_collective_port) -> None:  # type: ignore[no-untyped-def]
    """Every failed TCPStore constructor writes c10d's error and its C++ stack trace (~6 KB, 40 lines) to the
    daemon's stderr: round 20's 0.5 s store attempts let a tenant naming a dead address write ~4 KB/s of log per
    join, for the group's timeout (up to 300 s), join after join. Attempts now only open a TCP connection until
    the address accepts: a join retrying a dead port for 3 s writes no c10d line."""
    daemon = daemon_factory(fake_gpu_memory=64 * MiB, worker_network=True, isolation="thread")
    lease = uuid.uuid4().hex
    tokens = [daemon.token(lease_id=lease, host="absent-host"), daemon.token(lease_id=lease, network=True)]
    with Session.attach(daemon.address, tokens[1]) as s:
        capfd.readouterr()  # what came before
        join = device_pb2.GroupJoin(
            rank=1, size=2, tokens=tokens, store_address=f"127.0.0.1:{closed_collective_port}", timeout_seconds=60
        )
        s.command(device_pb2.Command(group_join=join))
        s.sync()
        time.sleep(3.0)  # its join retries the dead address (round 20: 2-3 failed constructors in this time)
        assert any(t.name.startswith("gpupool-group-") for t in threading.enumerate()), "no join is retrying"
        err = capfd.readouterr().err
    assert "c10d" not in err and len(err) < 2000, f"{len(err)} bytes of stderr in 3 s: {err[:300]}"


def test_a_store_address_s_state_is_not_told_to_the_tenant(daemon_factory, closed_collective_port) -> None:  # type: ignore[no-untyped-def]
    """The daemon connects to whatever store address rank 1's client names, so its error must not say what is
    there: round 20 answered "nothing answers there (Connection refused)" for a closed port, "(timed out)" for a
    black-holed one, a c10d error or "did not form within" for one that accepts (a tenant could map the open ports
    and hosts of the daemon's network). A closed port, a port that accepts but is no store, and another group's
    store now each give one message and status, by the group's deadline (the detail is in the daemon's log). So
    does a name the daemon cannot resolve (round 21 answered at once "cannot resolve group store host ...: [Errno
    -2] Name or service not known", and went on with a name it could: which names its resolver knows)."""
    daemon = daemon_factory(fake_gpu_memory=64 * MiB, worker_network=True, isolation="thread")
    accepting = socket.socket()  # accepts connections (the kernel's backlog), says nothing: no store
    bind_in(COLLECTIVE_PORTS, lambda port: accepting.bind(("127.0.0.1", port)))
    accepting.listen(16)
    lease0 = uuid.uuid4().hex  # another lease's group, its rank 1 absent: a real store, without this lease's mark
    tokens0 = [daemon.token(lease_id=lease0, network=True), daemon.token(lease_id=lease0, host="absent-host")]
    other = Session.attach(daemon.address, tokens0[0])
    h = other.new_handle()
    other.command(device_pb2.Command(group_join=device_pb2.GroupJoin(rank=0, size=2, tokens=tokens0, port_handle=h)))
    (store_port,) = other.sync([h])
    timeout = 4.0
    outcomes, took = [], []
    try:
        with contextlib.ExitStack() as stack:  # the four joins at once (one wait for their deadlines, not four)
            joined = []
            for address in (f"127.0.0.1:{closed_collective_port}", f"127.0.0.1:{accepting.getsockname()[1]}",
                            f"127.0.0.1:{store_port}", f"no-such-host.invalid:{closed_collective_port}"):  # fmt: skip
                lease = uuid.uuid4().hex
                tokens = [daemon.token(lease_id=lease, host="absent-host"), daemon.token(lease_id=lease, network=True)]
                s = stack.enter_context(Session.attach(daemon.address, tokens[1]))
                join = device_pb2.GroupJoin(
                    rank=1, size=2, tokens=tokens, store_address=address, timeout_seconds=timeout
                )
                s.command(device_pb2.Command(group_join=join))
                s.sync()
                joined.append((s, lease, s.upload(torch.ones(2))))
            time.sleep(timeout + 1.0)  # every join has given up: each collective reads its outcome at once
            for s, lease, a in joined:
                start = time.monotonic()
                collective(s, "allreduce", [a], op="sum")
                with pytest.raises(GpupoolError) as err:
                    s.sync()
                took.append(time.monotonic() - start)
                outcomes.append((type(err.value).__name__, str(err.value).replace(lease, "LEASE")))
    finally:
        accepting.close()
        other.close()
    assert len(set(outcomes)) == 1, f"the tenant tells the addresses apart: {outcomes}"
    assert outcomes[0][0] == "Unavailable" and "did not form" in outcomes[0][1], outcomes
    # and when: each by the group's deadline from the join (round 21's first version: the port that accepts, its
    # TCPStore constructor hung, answered a collective called after the deadline one timeout later): under one
    # timeout, which that version could not be, rather than half of one (a busy CI machine's margin)
    assert max(took) < timeout, f"seconds from the collective to its error, per address: {took}"
