"""Each tenant's share of --collective-ports (round 43, server/portshare.py): real daemons on loopback in one process
(so in one network namespace: the daemons of one host, which count together), their sessions' workers real and
confined, and a worker's own bind rights (Landlock ABI 4+) held to its session's block of the range."""

from __future__ import annotations

import uuid

import pytest
import torch
from gpupool.client.session import Session
from support import MiB
from test_collectives import collective, join_all

from gpupool.errors import ResourceExhausted
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
