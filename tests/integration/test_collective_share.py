"""Each tenant's share of --collective-ports (round 43, server/portshare.py): real daemons on loopback in one process
(so in one network namespace: the daemons of one host, which count together), their sessions' workers real and
confined, and a worker's own bind rights (Landlock ABI 4+) held to its session's block of the range."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import torch
from gpupool.client.session import Session
from support import MiB
from test_collectives import collective, join_all

from gpupool.errors import GpupoolError, ResourceExhausted
from gpupool.protocol import COLLECTIVE_PORTS

SHARE = (
    rf"this tenant's sessions granted network \(collectives between daemons\) hold 8 ports of --collective-ports "
    rf"{COLLECTIVE_PORTS[0]}-{COLLECTIVE_PORTS[1]} on this host, its share \(--collective-ports-per-tenant 8; 4 a "
    r"session\)"
)


def test_a_tenant_past_its_share_of_the_collective_ports_is_refused_and_others_go_on(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """On 7b5ed4d the listeners of every group of a host took any free port of the one range, and a tenant's sessions
    granted network took as many as they liked (a group each; 64 sessions a daemon, and the daemons of a host share
    the range), so one tenant could leave every other tenant's next group RESOURCE_EXHAUSTED. Now each such session
    holds a block of 4 ports of its own, and one tenant at most --collective-ports-per-tenant of the host's (here 8:
    two sessions), counted across the host's daemons: its third is RESOURCE_EXHAUSTED naming the limit on either
    daemon, while its sessions without network attach, and another tenant's sessions attach and their group forms
    and computes; a closed session's block is its tenant's again."""
    daemons = [
        daemon_factory(
            host_id=f"host-{i}", fake_gpus=2, fake_gpu_memory=64 * MiB, worker_network=True,
            collective_ports_per_tenant=8,
        )
        for i in range(2)
    ]  # fmt: skip

    def attach(i: int, tenant: str, device: int = 0, network: bool = True, lease: str = "") -> Session:
        d = daemons[i]
        token = d.token(tenant=tenant, lease_id=lease or uuid.uuid4().hex, device=device, network=network)
        return Session.attach(d.address, token)

    hog = [attach(0, "hog"), attach(1, "hog")]  # its share: one session on each daemon of the host
    for i in (0, 1):
        with pytest.raises(ResourceExhausted, match=SHARE):
            attach(i, "hog", device=1)
    attach(0, "hog", device=1, network=False).close()  # (no network: no ports)

    lease = uuid.uuid4().hex
    tokens = [daemons[i].token(tenant="other", lease_id=lease, device=1, network=True) for i in (0, 1)]
    ranks = [Session.attach(daemons[i].address, tokens[i]) for i in (0, 1)]
    join_all(ranks, tokens)
    handles = [s.upload(torch.tensor([1.0, 2.0]) * (r + 1)) for r, s in enumerate(ranks)]
    for s, h in zip(ranks, handles, strict=True):
        collective(s, "allreduce", [h], op="sum")
    assert [s.download(h).tolist() for s, h in zip(ranks, handles, strict=True)] == [[3.0, 6.0]] * 2

    hog.pop().close()  # its block comes back (once its worker is gone) to its tenant
    attach(1, "hog", device=1).close()
    for s in hog + ranks:
        s.close()


def test_an_attach_that_fails_after_its_worker_started_gives_back_the_worker_its_uid_and_its_block(
    daemon_factory, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """An Attach whose worker started but whose session then failed to join its device's queue (fault injected: the
    queue's add raises) left on 5c01be9 its worker running, its worker uid and its block of --collective-ports held
    for the daemon's life: with a share of one block the tenant's every later session granted network was
    RESOURCE_EXHAUSTED. Now the failed Attach kills the worker and gives both back; the tenant's next one attaches."""
    d = daemon_factory(fake_gpu_memory=64 * MiB, worker_network=True, collective_ports_per_tenant=4)
    daemon = d.running.daemon
    queue = daemon.queues[0]
    started: list[Any] = []

    def fail(owner: Any, share: float) -> Any:
        started.append((owner.runner.pid, owner.worker_uid))
        raise RuntimeError("injected: the device's queue refused the session")

    monkeypatch.setattr(queue, "add", fail)
    with pytest.raises(GpupoolError):
        Session.attach(d.address, d.token(tenant="t", lease_id=uuid.uuid4().hex, network=True))
    monkeypatch.undo()
    [(pid, uid)] = started
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"the failed Attach's worker {pid} still runs"
    if daemon._uids is not None and uid > 0:
        assert uid not in daemon._uids._held  # (given back: free once its worker is reaped)
    Session.attach(d.address, d.token(tenant="t", lease_id=uuid.uuid4().hex, network=True)).close()  # its block


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
