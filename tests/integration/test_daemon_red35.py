"""Round 35 red team (red35): a holder of a lease's tokens posing as a rank of its own collective group, through
real daemons (fake GPUs, loopback, TLS), both isolations and both transports."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist
from gpupool.client.session import Handle, Session
from gpupool.server import collectives
from support import Healthy, MiB
from test_collectives import collective, join_all

from gpupool import errors
from gpupool._proto import device_pb2

N = 64


def _forged_rank(port: int, lease: str, basis: str, transport: str) -> collectives.Group:
    """Rank 1 of a group of two, run in this process (no daemon session): all it needs is the group's secret,
    which the lease's tokens give (a hand-minted lease's: rank 0's token; the scheduler's: their `group` claim)."""
    key = collectives._front_key(collectives.group_secret(basis))  # (hole53) rank 0's store asks for the secret
    store = collectives._connect_store(["127.0.0.1"], port, 2, 10.0, threading.Event(), key=key)
    owner = hashlib.sha256(b"gpupool-group:" + basis.encode()).hexdigest()
    g = collectives.Group(lease, 1, 2, 10.0, transport)
    g.form(store, owner, collectives.group_secret(basis), "127.0.0.1", torch.device("cpu"))
    assert g.broken is None, g.broken
    return g


@contextmanager
def forged_pair(
    daemon_factory: Any, isolation: str, transport: str
) -> Iterator[tuple[Session, Callable[[], collectives.Group]]]:
    """Rank 0 of a two-device lease's group, a session of a fresh daemon, and a function that returns rank 1 once
    formed in this process (`_forged_rank`): call it after rank 0's collective is sent."""
    d = daemon_factory(
        isolation=isolation,
        fake_gpus=2,
        fake_gpu_memory=64 * MiB,
        worker_network=True,
        collectives=transport,
        gloo_connect_anywhere=transport == "gloo",
    )
    lease = uuid.uuid4().hex
    tokens = [d.token(lease_id=lease, device=i, network=True) for i in range(2)]
    with Session.attach(d.address, tokens[0]) as s:
        port_handle = s.new_handle()
        join = device_pb2.GroupJoin(rank=0, size=2, tokens=tokens, port_handle=port_handle, timeout_seconds=10)
        s.command(device_pb2.Command(group_join=join))
        (port,) = s.sync([port_handle])
        formed: list[collectives.Group] = []
        joiner = threading.Thread(target=lambda: formed.append(_forged_rank(int(port), lease, tokens[0], transport)))
        joiner.start()

        def forged() -> collectives.Group:
            joiner.join(20)
            (g,) = formed
            return g

        yield s, forged


def agree(g: collectives.Group, sig: list[int]) -> dict[str, Any]:
    """The agreement every call begins with, as an honest rank sends it: on gloo the all-gather of the ranks'
    signatures (collectives.py `_agree`); on the secure links (round 40) the record in the transfer's first frame
    (`seclink.Agreement`): the keyword argument of the transfer's call that carries it."""
    if isinstance(g.pg, collectives.seclink.SecureGroup):
        return {"agreement": collectives.seclink.Agreement(collectives._SIGNATURE.pack(*sig), lambda _: None)}
    mine = torch.tensor(sig, dtype=torch.int64)
    g.pg.allgather([[torch.empty_like(mine) for _ in range(2)]], [mine]).wait()
    return {}


def _agree(g: collectives.Group, kind: str, op: str, root: int) -> dict[str, Any]:
    """The agreement of a call of N bools, as rank 0 sends it."""
    sig = [collectives.KINDS.index(kind), collectives._OPS.index(op), root, 1, 0, N, 0]
    return agree(g, [*sig, collectives._DTYPES[torch.bool]])


def send_forged(g: collectives.Group, kind: str, bad: torch.Tensor, extra: dict[str, Any]) -> None:
    """Rank 1's part of a `kind` call with `bad` as its bytes (broadcast from root 1; allreduce and reduce_scatter
    with MAX), `extra` its agreement (`agree`). The hub may hang up on the forged rank: the daemon's side is the
    test."""
    try:
        if kind == "broadcast":
            opts = dist.BroadcastOptions()
            opts.rootRank = 1
            g.pg.broadcast([bad], opts, **extra).wait()
        elif kind == "allgather":
            g.pg.allgather([[torch.empty_like(bad) for _ in range(2)]], [bad], **extra).wait()
        else:
            ropts = dist.AllreduceOptions()
            ropts.reduceOp = dist.ReduceOp.MAX  # type: ignore[assignment]
            g.pg.allreduce([bad], ropts, **extra).wait()
    except Exception:  # noqa: S110
        pass


@pytest.mark.parametrize(
    ("isolation", "transport", "kind"),
    [
        ("process", "secure", "broadcast"),
        ("process", "gloo", "broadcast"),
        ("thread", "secure", "broadcast"),
        ("thread", "gloo", "broadcast"),
        ("thread", "secure", "allreduce"),  # the secure hub reduces the forged bytes itself
    ],
)
def test_a_forged_rank_writes_no_bool_bytes_but_0_and_1(
    daemon_factory: Any, isolation: str, transport: str, kind: str
) -> None:
    """A bool tensor's bytes are 0 or 1 on every upload path (anything else is undefined behaviour in torch's
    kernels), but a collective wrote what its peers sent: a tenant posing as rank 1 of its own lease's group from a
    plain process broadcast bytes of 7 into its session's bool tensor (downloaded through `view(uint8)`), in either
    isolation and transport. The collective now fails, its outputs are poisoned and the group is over."""
    with forged_pair(daemon_factory, isolation, transport) as (s, forged):
        h = Handle(s.upload(torch.zeros(N, dtype=torch.bool)))
        root = 1 if kind == "broadcast" else 0
        op = "" if kind == "broadcast" else "max"
        s.command(device_pb2.Command(collective=device_pb2.Collective(kind=kind, tensors=[h], root=root, reduce_op=op)))
        s.flush()
        g = forged()
        send_forged(g, kind, torch.full((N,), 7, dtype=torch.uint8).view(torch.bool), _agree(g, kind, op, root))
        with pytest.raises(errors.InvalidArgument, match="bool bytes other than 0 and 1"):
            s.sync()  # it was answered: the tensor's bytes downloaded as [7, 7, ...] through view(uint8)
        with pytest.raises(errors.InvalidArgument, match="bool bytes"):
            s.download(h)  # poisoned: the collective's outputs are dropped
        with pytest.raises(errors.Unavailable, match="bool bytes"):  # the group is over
            s.command(device_pb2.Command(collective=device_pb2.Collective(kind="barrier")))
            s.sync()
        if isinstance(g.pg, collectives.seclink.SecureGroup):
            g.pg.close()


def _gloo_pair(d: Any) -> list[Session]:
    """Two sessions of one two-device lease on `d`, joined into one group."""
    lease = uuid.uuid4().hex
    tokens = [d.token(lease_id=lease, device=i, network=True) for i in range(2)]
    ranks = [Session.attach(d.address, t) for t in tokens]
    join_all(ranks, tokens, timeout=5)
    return ranks


def test_honest_ranks_calls_that_differ_in_bytes_are_refused(serve_process: Any) -> None:
    """Calls whose signatures agreed (`_agree`) but whose bytes did not: gloo's receiving thread then met more bytes
    than it expected (`gloo::EnforceNotMet`, uncaught in its thread: `std::terminate`), and under `--isolation
    thread` the daemon aborted with every tenant's sessions; two honest sessions of one lease, nothing forged.
    complex64 and complex128 had one number in the signature (64 of each: 1,024 bytes where 512 were expected),
    and a broadcast ran one gloo call per tensor (10 + 20 elements against 20 + 10). Both are refused before a byte
    moves now, and the daemon and its other tenant go on."""
    d = serve_process(
        "--fake-gpus", "2", "--fake-gpu-memory", "64MiB", "--isolation", "thread",
        "--collectives", "gloo", "--worker-network", "on",
    )  # fmt: skip
    neighbour = Healthy(d.address, d.token(tenant="neighbour", quota_bytes=16 * MiB, device=1), pause=0.01)
    ranks = _gloo_pair(d)
    for s, dtype in zip(ranks, (torch.complex64, torch.complex128), strict=True):
        collective(s, "broadcast", [Handle(s.upload(torch.ones(N, dtype=dtype)))], root=1)
    for s in ranks:
        with pytest.raises(errors.InvalidArgument, match="ranks disagree"):
            s.sync()  # it was UNAVAILABLE "Stream removed": the daemon was gone
        s.close()
    ranks = _gloo_pair(d)
    for s, split in zip(ranks, ((10, 20), (20, 10)), strict=True):
        collective(s, "broadcast", [Handle(s.upload(torch.ones(n))) for n in split], root=1)
    for s in ranks:  # (round 38) a refused call takes its part in the agreement: both ranks call, then each hears
        with pytest.raises(errors.InvalidArgument, match="one tensor per rank"):
            s.sync()
        s.close()
    assert d.process is not None and d.process.poll() is None
    neighbour.check(min_iterations=2)
