"""Subgroups of a job's collective group (round 45): `dist.new_group(ranks)` and a DeviceMesh's dimensions run their
collectives among their members' daemons, each a group of its own there (server/collectives.py `_join_subgroup`).
Until round 45 every collective of a subgroup was one FailedPrecondition ("a second gpupool process group"), so a 2-D
mesh (data parallel beside tensor or pipeline parallel, FSDP's HYBRID_SHARD) could not run.

Two levels: the daemons' protocol on both transports (`--collectives secure`, the default, and `gloo`), driven
through the op stream as client/distributed.py drives it, with what they refuse (a rank outside the subgroup joins
it or names it in a collective; malformed joins); and a 4-rank torchrun job of a 2x2 DeviceMesh on a pool of fake
GPUs (the collectives on each dimension, DDP over one and an allreduce over the other, FSDP2 on the 2-D mesh as
HYBRID_SHARD shards, a receive without a source in a subgroup of two), checked against torch's own gloo groups of the
same ranks over CPU tensors in the same job, with the same seeds.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from examples_fixtures import REPO, gpupool_up
from gpupool.client.native.backend import compiler_missing
from gpupool.client.session import Session
from gpupool.server import collectives
from support import MiB
from test_collectives import TIMEOUT, collective, join_all
from test_three_ranks import _ranks

from gpupool._proto import device_pb2
from gpupool.errors import FailedPrecondition, InvalidArgument, PermissionDenied, ResourceExhausted

RUN_TIMEOUT = 240  # seconds: a hang fails the test, it never holds CI


def _join(s: Session, number: int, members: list[int], **extra: Any) -> None:
    join = device_pb2.GroupJoin(subgroup=number, members=members, timeout_seconds=TIMEOUT, **extra)
    s.command(device_pb2.Command(group_join=join))
    s.sync()


def _on(s: Session, number: int, kind: str, tensors: list[int], **kw: Any) -> None:
    msg = device_pb2.Collective(kind=kind, tensors=tensors, subgroup=number, **kw)
    s.command(device_pb2.Command(collective=msg))
    s.flush()


def the_group_goes_on(sessions: list[Session]) -> None:
    """An allreduce of each rank's number over the sessions' whole group (three ranks: 3.0 on each)."""
    c = [s.upload(torch.tensor([float(r)])) for r, s in enumerate(sessions)]
    for s, h in zip(sessions, c, strict=True):
        collective(s, "allreduce", [h], op="sum")
    assert [s.download(h).tolist() for s, h in zip(sessions, c, strict=True)] == [[3.0]] * 3


@pytest.mark.parametrize("transport", ["secure", "gloo"])
def test_subgroups_run_among_their_members_and_refuse_the_others(daemon_factory, transport: str) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(
        fake_gpus=3, fake_gpu_memory=64 * MiB, worker_network=True, collectives=transport,
        gloo_connect_anywhere=transport == "gloo",
    )  # fmt: skip
    lease = uuid.uuid4().hex
    toks = [d.token(lease_id=lease, network=True, device=i) for i in range(3)]
    sessions = [Session.attach(d.address, t) for t in toks]
    try:
        s0, s1, s2 = sessions
        with pytest.raises(FailedPrecondition, match="before the session joined its group"):
            _join(s0, 1, [0, 2])
        join_all(sessions, toks)
        # rank 1 is no member of [0, 2]: its daemon refuses the join, and a collective naming a subgroup it never joined
        with pytest.raises(PermissionDenied, match=r"rank 1 of the group is not a member of subgroup \[0, 2\]"):
            _join(s1, 1, [0, 2])
        t1 = s1.upload(torch.tensor([5.0]))
        _on(s1, 1, "allreduce", [t1], reduce_op="sum")
        with pytest.raises(FailedPrecondition, match="subgroup 1, which this session never joined"):
            s1.sync()
        for bad, why in (([2, 0], "ascending"), ([0, 3], "ascending"), ([], "its number")):
            with pytest.raises(InvalidArgument, match=why):
                _join(s0, 7, bad)
        with pytest.raises(InvalidArgument, match="no tokens"):
            _join(s0, 7, [0, 2], tokens=toks[:1])
        _join(s0, 1, [0, 2])
        _join(s2, 1, [0, 2])
        with pytest.raises(InvalidArgument, match="numbered 1 already"):
            _join(s0, 1, [0, 2])
        _join(s1, 2, [1, 2])  # rank 2 joins [1, 2] after [0, 2]: the daemons form them in that order
        _join(s2, 2, [1, 2])
        a = [s.upload(torch.tensor([1.0, 2.0]) * (r + 1)) for r, s in enumerate(sessions)]
        _on(s0, 1, "allreduce", [a[0]], reduce_op="sum")
        _on(s2, 1, "allreduce", [a[2]], reduce_op="sum")
        _on(s1, 2, "broadcast", [a[1]], root=1)  # subgroup rank 1: global rank 2
        _on(s2, 2, "broadcast", [a[2]], root=1)
        assert s0.download(a[0]).tolist() == [4.0, 8.0]  # ranks 0 and 2 only
        assert s2.download(a[2]).tolist() == s1.download(a[1]).tolist() == [4.0, 8.0]
        # an allgather on [1, 2]
        outs = [[s.upload(torch.zeros(2)) for _ in range(2)] for s in (s1, s2)]
        for s, out, r in ((s1, outs[0], 1), (s2, outs[1], 2)):
            msg = device_pb2.Collective(
                kind="allgather", tensors=out, inputs=[s.upload(torch.full((2,), float(r)))], subgroup=2
            )
            s.command(device_pb2.Command(collective=msg))
            s.flush()
        for s, out in ((s1, outs[0]), (s2, outs[1])):
            assert [s.download(h).tolist() for h in out] == [[1.0, 1.0], [2.0, 2.0]]
        # ranks that disagree in a subgroup: refused on both, the subgroup goes on
        b0, b2 = s0.upload(torch.ones(3)), s2.upload(torch.ones(4))
        _on(s0, 1, "allreduce", [b0], reduce_op="sum")
        _on(s2, 1, "allreduce", [b2], reduce_op="sum")
        for s in (s0, s2):
            with pytest.raises(InvalidArgument, match="ranks disagree"):
                s.sync()
        _on(s0, 1, "barrier", [])
        _on(s2, 1, "barrier", [])
        s0.sync()
        s2.sync()
        the_group_goes_on(sessions)  # the default group
    finally:
        for s in sessions:
            s.close()


def test_a_sessions_subgroups_are_its_own_bounded_and_checked(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """Round 45 review (datarev45; held on unmod45's merge, pins it): members listed twice or past the group's size,
    number 0, a list without the session's own rank are refused; subgroup numbers are the session's own (the
    largest uint32 is one; another session's number is one this session never joined, FAILED_PRECONDITION, even
    where that session holds it); the 33rd subgroup is RESOURCE_EXHAUSTED, and the session, its 32 subgroups and
    the group go on."""
    d = daemon_factory(fake_gpus=2, fake_gpu_memory=64 * MiB, worker_network=True)
    lease = uuid.uuid4().hex
    toks = [d.token(lease_id=lease, network=True, device=i) for i in range(2)]
    sessions = [Session.attach(d.address, t) for t in toks]
    try:
        s0, s1 = sessions
        join_all(sessions, toks)
        for number, members, error, why in (
            (3, [0, 0], InvalidArgument, "distinct ranks"),
            (3, [0, 2**32 - 1], InvalidArgument, "distinct ranks"),
            (3, [0, 1, 1], InvalidArgument, "distinct ranks"),
            (0, [0], InvalidArgument, "its number"),
            (3, [1], PermissionDenied, "not a member"),
        ):
            with pytest.raises(error, match=why):
                _join(s0, number, members)
        numbers = [*range(1, 32), 2**32 - 1]
        for number in numbers:  # subgroups of one rank: their collectives are the identity
            _join(s0, number, [0])
        with pytest.raises(ResourceExhausted, match="at most 32 subgroups"):
            _join(s0, 40, [0])
        t0, t1 = s0.upload(torch.tensor([2.0])), s1.upload(torch.tensor([3.0]))
        _on(s0, 2**32 - 1, "allreduce", [t0], reduce_op="sum")
        assert s0.download(t0).tolist() == [2.0]
        for s, t, number in ((s0, t0, 40), (s1, t1, 5)):  # 5: s0's, never s1's
            _on(s, number, "allreduce", [t], reduce_op="sum")
            with pytest.raises(FailedPrecondition, match=f"subgroup {number}, which this session never joined"):
                s.sync()
        u0, u1 = s0.upload(torch.tensor([2.0])), s1.upload(torch.tensor([3.0]))  # (a refused call's are poisoned)
        for s, t in ((s0, u0), (s1, u1)):
            collective(s, "allreduce", [t], op="sum")
        assert s0.download(u0).tolist() == s1.download(u1).tolist() == [5.0]
    finally:
        for s in sessions:
            s.close()


def _leave(s: Session, number: int) -> None:
    s.command(device_pb2.Command(group_leave=device_pb2.GroupLeave(subgroup=number)))
    s.sync()


def _sockets() -> int:
    """This process's open sockets (the daemon's sessions run in it: --isolation thread)."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:  # closed meanwhile
            continue
    return count


def _two_ranks(daemon_factory: Any, transport: str) -> tuple[list[Session], list[str]]:
    """Two sessions of one lease on the two fake GPUs of one daemon run in this process (--isolation thread), and
    their tokens."""
    d = daemon_factory(
        fake_gpus=2, fake_gpu_memory=64 * MiB, worker_network=True, collectives=transport,
        gloo_connect_anywhere=transport == "gloo", isolation="thread",
    )  # fmt: skip
    lease = uuid.uuid4().hex
    toks = [d.token(lease_id=lease, network=True, device=i) for i in range(2)]
    return [Session.attach(d.address, t) for t in toks], toks


@pytest.mark.parametrize("transport", ["secure", "gloo"])
def test_a_left_subgroup_frees_its_number_its_place_and_its_links(daemon_factory, transport: str) -> None:  # type: ignore[no-untyped-def]
    """Round 46: `dist.destroy_process_group(subgroup)` reaches the daemons (`GroupLeave`). Until then they were not
    told: a subgroup's links stayed until the session ended and it kept its place among the session's 32, so a
    script that made and dropped subgroups in a loop was refused its 33rd (RESOURCE_EXHAUSTED). Here 34 more subgroups
    of the same two ranks are made, used and left one after another, on both transports, and no socket stays behind;
    a left number is refused (leave and collective), the default group cannot be left, 32 held at once is still the
    limit, and a subgroup left before its members formed it forms and closes without holding them up."""
    sessions, toks = _two_ranks(daemon_factory, transport)

    def cycle(number: int) -> list[list[float]]:
        for s in sessions:
            _join(s, number, [0, 1])
        hs = [s.upload(torch.tensor([number * (r + 1.0)])) for r, s in enumerate(sessions)]
        for s, h in zip(sessions, hs, strict=True):
            _on(s, number, "allreduce", [h], reduce_op="sum")
        got = [s.download(h).tolist() for s, h in zip(sessions, hs, strict=True)]
        for s in sessions:
            _leave(s, number)
        return got

    try:
        s0, s1 = sessions
        join_all(sessions, toks)
        with pytest.raises(InvalidArgument, match="the session's own group ends with the session"):
            _leave(s0, 0)
        assert cycle(1) == [[3.0], [3.0]]  # the default group's links formed: count from here
        before = _sockets()
        for number in range(2, 36):
            assert cycle(number) == [[3.0 * number]] * 2, number
        deadline = time.monotonic() + 10  # (a closed link's threads end in their next poll)
        while _sockets() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sockets() <= before, f"{_sockets() - before} sockets of 34 left subgroups stayed open"
        with pytest.raises(FailedPrecondition, match="subgroup 35, which this session never joined or left already"):
            _leave(s0, 35)
        t = s0.upload(torch.tensor([1.0]))
        _on(s0, 35, "allreduce", [t], reduce_op="sum")
        with pytest.raises(FailedPrecondition, match="subgroup 35, which this session never joined"):
            s0.sync()
        # 32 held at once is still the limit; a leave makes room
        for number in range(100, 132):
            _join(s0, number, [0])
        with pytest.raises(ResourceExhausted, match="at most 32 subgroups of its group at once"):
            _join(s0, 132, [0])
        _leave(s0, 100)
        _join(s0, 132, [0])
        for number in range(101, 133):
            _leave(s0, number)
        # rank 0 leaves a subgroup before rank 1 joined it: its close waits behind the formation, which rank 1 then
        # completes with it (closing it at once left rank 1 waiting out the group's timeout, the group's thread held)
        _join(s0, 200, [0, 1])
        _leave(s0, 200)
        _join(s1, 200, [0, 1])
        _leave(s1, 200)
        started = time.monotonic()
        c = [s.upload(torch.tensor([float(r)])) for r, s in enumerate(sessions)]
        for s, h in zip(sessions, c, strict=True):
            collective(s, "allreduce", [h], op="sum")
        assert [s.download(h).tolist() for s, h in zip(sessions, c, strict=True)] == [[1.0]] * 2
        assert time.monotonic() - started < TIMEOUT, "the default group waited out a subgroup's formation"
    finally:
        for s in sessions:
            s.close()


@pytest.mark.parametrize("transport", ["secure", "gloo"])
def test_subgroups_made_and_left_in_a_loop_leave_no_keys_in_rank_0s_store(daemon_factory, transport: str) -> None:  # type: ignore[no-untyped-def]
    """Round 46: a left subgroup's keys (rank 0's hub address, a pair link's listener, gloo's ranks' addresses) stayed
    in the group's store, which rank 0's session hosts (under --isolation thread the daemon's own process, uncapped):
    a client that made and left subgroups of the same ranks in a loop grew it by a few hundred bytes a cycle, without
    bound (each made again takes a new secret, so new keys). Here 12 such cycles (formed, used, left), a send/recv's
    pair link and 8 subgroups whose formation fails (one rank never comes) leave the store's key count where it was."""
    sessions, toks = _two_ranks(daemon_factory, transport)

    def cycle(number: int) -> None:
        for s in sessions:
            _join(s, number, [0, 1])
        hs = [s.upload(torch.tensor([float(r + 1)])) for r, s in enumerate(sessions)]
        for s, h in zip(sessions, hs, strict=True):
            _on(s, number, "allreduce", [h], reduce_op="sum")
        assert [s.download(h).tolist() for s, h in zip(sessions, hs, strict=True)] == [[3.0], [3.0]]
        for s in sessions:
            _leave(s, number)

    def settled(store: Any, keys: int) -> int:
        deadline = time.monotonic() + TIMEOUT  # (a failed formation's keys go in the group's thread)
        while (now := int(store.num_keys())) > keys and time.monotonic() < deadline:
            time.sleep(0.05)
        return now

    try:
        port = join_all(sessions, toks)
        key = collectives._front_key(collectives.group_secret(toks[0]))  # (hole53) rank 0's store asks for it
        store = collectives._connect_store(["127.0.0.1"], port, 2, TIMEOUT, threading.Event(), key=key)
        cycle(1)  # the default group's links formed: count from here
        keys = store.num_keys()
        for number in range(2, 14):
            cycle(number)
        hs = [s.upload(torch.tensor([float(r)])) for r, s in enumerate(sessions)]
        for r, (s, h) in enumerate(zip(sessions, hs, strict=True)):  # the group's pair link (send/recv)
            msg = device_pb2.Collective(kind="p2p", tensors=[h], peers=[1 - r], tags=[7], sending=[r == 0])
            s.command(device_pb2.Command(collective=msg))
            s.flush()
        assert [s.download(h).tolist() for s, h in zip(sessions, hs, strict=True)] == [[0.0], [0.0]]
        assert settled(store, keys) == keys, "12 subgroups made and left grew rank 0's store"
        for s in sessions:  # rank 0 alone, then rank 1 alone: each formation fails, then its rank leaves
            for number in range(20, 24):
                join = device_pb2.GroupJoin(subgroup=number, members=[0, 1], timeout_seconds=0.3)
                s.command(device_pb2.Command(group_join=join))
                _leave(s, number)
            c = [s.upload(torch.tensor([1.0])) for s in sessions]  # runs in the groups' threads after those
            for s, h in zip(sessions, c, strict=True):
                collective(s, "allreduce", [h], op="sum")
            assert [s.download(h).tolist() for s, h in zip(sessions, c, strict=True)] == [[2.0], [2.0]]
            assert settled(store, keys) == keys, "subgroups that failed to form left their keys in rank 0's store"
        cycle(30)  # the group and its subgroups go on
    finally:
        for s in sessions:
            s.close()


# ---- a 2x2 mesh under torchrun ----

SCRIPT = """
import json, sys, torch, torch.distributed as dist, torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
import gpupool.torch  # the Python client's device (the C++ client's comes with `import torch`)
from gpupool.client import distributed as gd
from gpupool._proto import device_pb2
dist.init_process_group("gpupool")
rank, n = dist.get_rank(), dist.get_world_size()
# gpupool: a DeviceMesh (its dimensions new_group's subgroups); the reference: torch's gloo groups of the same ranks
mesh = init_device_mesh("gpupool", (2, 2), mesh_dim_names=("dp", "tp"))
ref_world = dist.new_group(backend="gloo")
ref = {}
for dim, layout in (("dp", [[0, 2], [1, 3]]), ("tp", [[0, 1], [2, 3]])):
    for ranks in layout:
        g = dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            ref[dim] = g
ref_mesh = DeviceMesh.from_group([ref["dp"], ref["tp"]], "cpu", [[0, 1], [2, 3]], mesh_dim_names=("dp", "tp"))
runs = {"gpupool": (torch.device("gpupool", 0), mesh.get_group("dp"), mesh.get_group("tp"), None),
        "gloo": (torch.device("cpu"), ref["dp"], ref["tp"], ref_world)}
meshes = {"gpupool": mesh, "gloo": ref_mesh}
def collectives(dev, dp, tp, world):
    out = []
    t = torch.full((3,), rank + 1.0, device=dev); dist.all_reduce(t, group=tp); out.append(t.tolist())
    t = torch.full((3,), rank + 1.0, device=dev); dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dp)
    out.append(t.tolist())
    t = torch.full((2,), rank * 1.0, device=dev); dist.broadcast(t, group_src=1, group=dp); out.append(t.tolist())
    outs = [torch.zeros(2, device=dev) for _ in range(2)]
    dist.all_gather(outs, torch.full((2,), rank * 1.0, device=dev), group=tp); out.append([o.tolist() for o in outs])
    big = torch.arange(4.0, device=dev) + 10 * rank; half = torch.zeros(2, device=dev)
    dist.reduce_scatter_tensor(half, big, group=dp); out.append(half.tolist())
    whole = torch.zeros(4, device=dev)
    dist.all_gather_into_tensor(whole, torch.full((2,), rank + 0.5, device=dev), group=tp); out.append(whole.tolist())
    dist.barrier(group=tp); dist.barrier(group=dp)
    return out
def train(dev, dp, tp, world):
    # data parallel over dp (DDP on the dp group), then the replicas averaged over tp
    torch.manual_seed(0)
    m = DDP(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(dev), process_group=dp)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for i in range(3):
        g = torch.Generator().manual_seed(100 * rank + i)
        x, y = torch.randn(6, 4, generator=g).to(dev), torch.randn(6, 2, generator=g).to(dev)
        ((m(x) - y) ** 2).mean().backward(); opt.step(); opt.zero_grad()
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    mine = [round(v, 5) for v in flat.cpu().tolist()]
    dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=tp)
    return [mine, [round(v, 5) for v in flat.cpu().tolist()]]
def after(dev, dp, tp, world):
    t = torch.full((2,), rank + 1.0, device=dev); dist.all_reduce(t, group=world); return t.tolist()
def hsdp(dev, dp, tp, world):
    # FSDP2 on the 2-D mesh (HSDP: replicated over dp, sharded over tp), as FSDP's HYBRID_SHARD
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(dev)
    mesh2d = meshes["gpupool" if dev.type == "gpupool" else "gloo"]
    for layer in (m[0], m[2], m):
        fully_shard(layer, mesh=mesh2d)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for i in range(2):
        g = torch.Generator().manual_seed(100 * rank + i)
        x, y = torch.randn(6, 4, generator=g).to(dev), torch.randn(6, 2, generator=g).to(dev)
        ((m(x) - y) ** 2).mean().backward(); opt.step(); opt.zero_grad()
    return [round(v, 5) for p in m.parameters() for v in p.full_tensor().reshape(-1).cpu().tolist()]
def anysource(dev, dp, tp, world):
    # a receive without a source in a subgroup of two: from its other member, told in the subgroup's ranks
    t = torch.full((2,), rank + 1.0, device=dev)
    if dist.get_rank(tp) == 0:
        dist.send(t, group_dst=1, group=tp)
        return None
    return [dist.recv(t, group=tp), t.tolist()]
def churn(dev, dp, tp, world):
    # subgroups made, used and dropped in a loop, 33 held over the session's life with the mesh's 2: until round 46
    # destroy_process_group(subgroup) told the daemons nothing, and the 31st new_group was refused (32 at most)
    out = []
    for i in range(31):
        g = [dist.new_group(r) for r in ([0, 1], [2, 3])][rank // 2]
        t = torch.full((1,), rank + 10.0 * i, device=dev); dist.all_reduce(t, group=g); out.append(t.item())
        dist.destroy_process_group(g)
    return out
def refused():
    # what a rank outside a subgroup meets at its daemon: the join refused, a collective naming it refused
    parent, out = gd._joined[0][2], []
    other = [0, 1] if rank >= 2 else [2, 3]
    for cmd in (device_pb2.Command(group_join=device_pb2.GroupJoin(subgroup=99, members=other)),
                device_pb2.Command(collective=device_pb2.Collective(kind="barrier", subgroup=99))):
        parent._rt.command(cmd)
        try:
            parent._rt.sync()
            out.append("ran")
        except Exception as exc:  # (the Python client's are torch-facing classes: the status code tells)
            out.append(exc.code.name + ": " + str(exc).splitlines()[0])
    return out
res = {}
for name in ("collectives", "train", "hsdp", "anysource", "churn", "after"):
    for backend, args in runs.items():
        if name == "churn" and backend == "gloo":  # (its sums are told below: gloo's groups cost as long again)
            continue
        try:
            res[f"{name} {backend}"] = globals()[name](*args)
        except Exception as exc:
            res[f"{name} {backend}"] = "refused " + type(exc).__name__ + ": " + str(exc).splitlines()[0]
res["refused"] = refused()
print("rank %d %s\\n" % (rank, json.dumps(res)), end="", flush=True)  # one write: the ranks share stdout
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def four_gpu_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with gpupool_up(tmp_path_factory.mktemp("up4"), "--fake-gpus", "4", "--fake-gpu-memory", "256MiB") as env:
        yield env


@pytest.mark.slow
@pytest.mark.parametrize("client", ["native", "shim"])
def test_a_2x2_mesh_runs_data_parallel_beside_another_dimension_as_gloo_does(
    four_gpu_pool: dict[str, str], tmp_path: Path, client: str
) -> None:
    if client == "native" and (why := compiler_missing()) is not None:
        pytest.skip(f"native client: {why}")
    script = tmp_path / "mesh.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    env.update(four_gpu_pool, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", str(script)]
    cmd = [sys.executable, "-m", "gpupool.cli", "run", "--client", client, "-n", "4", "--", *torchrun]
    ranks = _ranks(cmd, env, tmp_path, RUN_TIMEOUT, f"2x2 mesh ({client})")
    assert sorted(ranks) == [0, 1, 2, 3], ranks
    for rank, res in ranks.items():
        for name in ("collectives", "train", "hsdp", "anysource", "after"):
            mine, gloo = res[f"{name} gpupool"], res[f"{name} gloo"]
            assert mine == gloo, (rank, name, mine, gloo)
            assert not str(gloo).startswith("refused"), (rank, name, gloo)
        assert res["anysource gpupool"] == (None if rank % 2 == 0 else [rank - 1, [float(rank)] * 2])
        # 31 subgroups made, used and destroyed in a row (round 46): each allreduce sums its pair's ranks' values
        assert res["churn gpupool"] == [(1.0 if rank < 2 else 5.0) + 20.0 * i for i in range(31)], res["churn gpupool"]
        assert res["train gpupool"][0] != res["train gpupool"][1]  # the tp average changed the dp replicas
        other = "[0, 1]" if rank >= 2 else "[2, 3]"
        join, call = res["refused"]
        assert join == (
            f"PERMISSION_DENIED: rank {rank} of the group is not a member of subgroup {other}: only its members join it"
        ), join
        assert call.startswith("FAILED_PRECONDITION: "), call
        assert call.endswith("collective barrier on subgroup 99, which this session never joined"), call
