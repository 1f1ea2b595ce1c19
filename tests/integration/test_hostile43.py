"""Red team, round 43 (hostile43): what round 42 left (docs/security.md "Red team, round 43").

Revocation by time, not by count (each fails on 7b5ed4d): a daemon remembered the 200,000 most recent revoked leases,
each for a day whatever its tokens' life; a tenant that allocated and released past that (~70 min at --tenant-rate
100) attached with the forgotten lease's token until the next heartbeat reported its session. Now the scheduler says,
for each revoked lease, until when one of its tokens may be presented (`HeartbeatReply.revoked_until`: the lease's
expiry and the slack), the daemon keeps each until then and forgets none by count, and the scheduler bounds how many a
tenant keeps alive (`--tenant-max-revoked`).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from gpupool.client.pool import SchedulerClient
from gpupool.client.session import Handle, Session
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from gpupool.scheduler.hosts import REVOCATION_SLACK
from scheduler_fixtures import SimHost, wait_until
from support import get_pki

from gpupool import errors, tokens, wire
from gpupool._proto import device_pb2, scheduler_pb2, tensor_pb2
from gpupool.errors import ResourceExhausted, Unauthenticated

MiB = 1024**2
SIGNER = tokens.Signer.from_seed(b"hostile43")


@pytest.fixture
def sched() -> Iterator[SchedulerServer]:
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=":memory:", metrics_listen="0", heartbeat_interval=0.3, tenant_max_revoked=3,
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"),
    )  # fmt: skip
    server = SchedulerServer(config, SIGNER).start()
    yield server
    server.stop(grace=0)


def test_a_released_leases_token_is_refused_until_it_expires_and_a_tenant_keeps_few_alive(
    sched: SchedulerServer,
) -> None:
    """A real registrar and verifier (a daemon's) under a real scheduler: alice releases a lease of an hour; its
    revocation reaches the host with the lease's expiry + the slack, and the verifier refuses its token until then
    (not a day from the heartbeat, and whatever number of leases is revoked after it). Three such leases ended, her
    fourth Allocate is RESOURCE_EXHAUSTED naming --tenant-max-revoked; bob's is granted. On 7b5ed4d: no
    `tenant_max_revoked` (a TypeError); the reply carried no times and the verifier kept 200,000 leases."""
    host = SimHost(sched.address, "h", gpus=1)
    verifier = tokens.Verifier([SIGNER.public])
    host.registrar.verifier = verifier
    host.start()
    alice = SchedulerClient(sched.address, get_pki().client_config("tenant", "alice"))
    bob = SchedulerClient(sched.address, get_pki().client_config("tenant", "bob"))
    try:
        grants = []
        for _ in range(3):
            lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=3600))
            assert verifier.verify(lease.devices[0].token).lease_id == lease.lease_id
            alice.release(lease.lease_id)
            grants.append(lease)
        wait_until(lambda: all(x.lease_id in host.revoked for x in grants), what="the revocations at the host")
        for lease in grants:
            with pytest.raises(Unauthenticated, match="released or revoked"):
                verifier.verify(lease.devices[0].token)
        # (a look at a later time forgets what expired by then: the earlier times first)
        assert all(verifier.revoked(x.lease_id, x.expires_at + REVOCATION_SLACK - 1) for x in grants)
        assert not any(verifier.revoked(x.lease_id, x.expires_at + REVOCATION_SLACK + 1) for x in grants)
        with pytest.raises(ResourceExhausted, match=r"ended 3 lease\(s\) whose tokens .*--tenant-max-revoked"):
            alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, ttl_seconds=3600))
        assert bob.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25))
    finally:
        alice.close()
        bob.close()
        host.stop()


def test_the_verifier_forgets_no_revoked_lease_by_count() -> None:
    """The oldest of 200,001 revoked leases is still refused (7b5ed4d forgot it: it kept 200,000; DID NOT RAISE)."""
    verifier = tokens.Verifier([SIGNER.public])
    now = time.time()
    token = tokens.mint(SIGNER, tokens.TokenClaims("first", "h", 0, 1 << 20, 0.5, now + 3600, "mallory"))
    verifier.revoke(["first"], now=now)
    verifier.revoke([f"cycled-{i}" for i in range(200_000)], now=now)
    with pytest.raises(Unauthenticated, match="released or revoked"):
        verifier.verify(token, now=now + 1)


def test_the_verifier_forgets_a_revoked_lease_when_its_tokens_expire() -> None:
    """Each revoked lease is kept until the time the scheduler gave (a NaN or missing one, or one past a token's
    longest life: `MAX_TTL`), then forgotten; revoked again later, the later time holds."""
    verifier = tokens.Verifier([SIGNER.public])
    now = time.time()
    verifier.revoke(["a", "b", "c", "d"], now=now, until=[now + 100, now + 10 * tokens.MAX_TTL, float("nan")])
    verifier.revoke(["a"], now=now, until=[now + 50])  # an earlier time does not shorten it
    assert all(verifier.revoked(x, now + 99) for x in "abcd")
    assert not verifier.revoked("a", now + 101) and verifier.revoked("b", now + 101)
    verifier.revoke(["b"], now=now + 200, until=[now + 300])
    assert all(verifier.revoked(x, now + tokens.MAX_TTL - 1) for x in "bcd")
    assert not any(verifier.revoked(x, now + tokens.MAX_TTL + 1) for x in "bcd")


GRAPH_N = 4096  # references of one slot in a graph op's list (past `sizing._too_long`'s 256)


def _list_graph(name: str, n: int, graph_id: int = 1) -> device_pb2.DefineGraph:
    """One input (a zero-element tensor) named `n` times in one op's list; its first output handed back."""
    many = tensor_pb2.Arg(tensors=tensor_pb2.TensorList(handles=[1] * n))
    op = device_pb2.Op(name=name, args=[many], outputs=[2])
    return device_pb2.DefineGraph(
        graph_id=graph_id, inputs=1, input_meta=[wire.meta_to_proto(torch.ones(0))], ops=[op], outputs=[2]
    )


@pytest.mark.parametrize(
    "name", ["aten::block_diag.default", "aten::_foreach_neg.default", "aten::stack.default", "aten::cat.default"]
)
def test_a_graphs_long_list_op_is_dry_run_on_its_distinct_entries(daemon_factory: Any, name: str) -> None:
    """A graph op whose list names one slot 4,096 times: its definition's dry run and its trace's (the second run)
    call no Python of torch's per entry (on 7b5ed4d its meta kernel ran over all of them, twice: tens of thousands of
    calls here, block_diag 5.7 s of the device's thread at 16,384, 47 s at load 13), and both runs compute what
    torch computes. Counted: Python calls into torch's modules on the daemon's threads (a profile on the threads it
    starts), no timing."""
    calls = [0]
    counting = threading.Event()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if counting.is_set() and event == "call" and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
            calls[0] += 1

    threading.setprofile(profile)
    try:
        d = daemon_factory(isolation="thread")
        with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=16 * MiB)) as s:
            x = Handle(s.upload(torch.ones(0)))
            s.define_graph(_list_graph(name, 2, graph_id=2))  # what torch imports at its first use, not counted
            for _ in range(2):
                s.run_graph(2, [int(x)], [s.new_handle()])
            s.sync()
            counting.set()
            s.define_graph(_list_graph(name, GRAPH_N))
            outs = [s.new_handle() for _ in range(2)]
            for out in outs:  # the first run replays the calls, the second traces them (TRACE_AFTER_RUNS)
                s.run_graph(1, [int(x)], [out])
            s.sync()
            counting.clear()
            op = getattr(torch.ops.aten, name.split("::")[1].split(".")[0]).default
            want = op([torch.ones(0)] * GRAPH_N)
            want = want[0] if isinstance(want, list) else want
            for out in outs:
                got = s.download(Handle(out))
                assert got.shape == want.shape and got.dtype == want.dtype and got.stride() == want.stride()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    assert calls[0] < GRAPH_N, f"{calls[0]} calls of torch's Python for a list of {GRAPH_N} entries"


def _slot(n: int) -> tensor_pb2.Arg:
    return tensor_pb2.Arg(tensor=n)


FAR = 3_500_000  # elements: a zero-element view this far into a 32-byte storage (14 MB past its end)


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_a_graphs_out_op_growing_a_view_past_its_storage_is_counted_or_refused(
    daemon_factory: Any, isolation: str
) -> None:
    """RunGraph out= ops on storages the definition did not size as they are: a zero-element view far past the end
    of a 32-byte storage. As a graph input, `neg.out` into it grew the storage at each run by what the definition
    never counted (it sized an input's storage by the bytes its metadata reaches) and left the bytes before the view
    unwritten: 7b5ed4d gave back ~16,000-96,000 nonzero bytes of uninitialized memory in a probe (here: refused at
    the definition, inputs are bound anew at each run). As a persistent tensor, the definition sized its storage the
    same way and counted 64 bytes: a view 32 MB out was admitted under a 16 MiB quota and grown by its run, counted
    only after the kernel (here: RESOURCE_EXHAUSTED at the definition); 14 MB out, the growth is counted and zeroed."""
    d = daemon_factory(isolation=isolation)
    with Session.attach(d.address, d.token(tenant="hostile", quota_bytes=16 * MiB)) as s:
        a = Handle(s.upload(torch.zeros(8)))
        src = Handle(s.upload(torch.ones(16)))
        body = [device_pb2.Op(name="aten::neg.out", args=[_slot(2)], kwargs={"out": _slot(1)}, outputs=[])]
        meta = [wire.meta_to_proto(torch.empty(FAR).as_strided([0], [1], FAR))]
        graph = device_pb2.DefineGraph(graph_id=1, inputs=1, input_meta=meta, persistent=[int(src)], ops=body)
        s.define_graph(graph)
        with pytest.raises(errors.InvalidArgument, match="grows a graph input's storage"):
            s.sync()
        [far] = s.call("aten::as_strided.default", a, [0], [1], 8 * MiB // 4 * 4)
        s.define_graph(device_pb2.DefineGraph(graph_id=2, inputs=0, persistent=[int(far), int(src)], ops=body))
        with pytest.raises(errors.ResourceExhausted):
            s.sync()
        [view] = s.call("aten::as_strided.default", a, [0], [1], FAR)
        s.define_graph(device_pb2.DefineGraph(graph_id=3, inputs=0, persistent=[int(view), int(src)], ops=body))
        s.run_graph(3, [], [])
        s.sync()
        [whole] = s.call("aten::as_strided.default", a, [FAR + 16], [1], 0)
        got = s.download(Handle(whole))
        assert int((got[:FAR] != 0).sum()) == 0 and torch.equal(got[FAR:], -torch.ones(16))
        with pytest.raises(errors.ResourceExhausted):
            s.upload(torch.zeros(MiB))  # 4 MiB: 14 MB grown + 4 MiB > 16 MiB
            s.sync()
