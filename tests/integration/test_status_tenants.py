"""A daemon's Status shows a caller only what its client certificate may see (round 41: it answered every
session's tenant, lease id, memory, share, busy time and ops to any caller, a tenant too). Real daemons on loopback
that require client certificates, real certificates of the tests' CA, real sessions holding memory."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from gpupool.client.session import Session
from support import MiB, get_pki, tls_channel

from gpupool import tls
from gpupool._proto import device_pb2, device_pb2_grpc


def status_as(address: str, role: str = "", name: str = "") -> device_pb2.StatusReply:
    """Status with the test process's (admin) certificate, or a fresh `role` certificate named `name`."""
    cfg = get_pki().client_config(role, name) if role else None
    with tls.channel(address, cfg=cfg, token=False) if cfg else tls_channel(address) as ch:
        return device_pb2_grpc.DeviceStub(ch).Status(device_pb2.StatusRequest(), timeout=10)


@pytest.fixture
def shared(daemon_factory: Any) -> Any:
    """A daemon requiring client certificates, with alice's and bob's sessions on its one device, each holding
    memory (bob more)."""
    d = daemon_factory(tls=dataclasses.replace(get_pki().server_config(), client_auth="require"))
    sessions = []
    for tenant, n in (("alice", 1000), ("bob", 5000)):
        s = Session.attach(d.address, d.token(quota_bytes=16 * MiB, tenant=tenant, lease_id=f"lease-{tenant}"))
        s.upload(torch.ones(n))
        s.sync()
        sessions.append(s)
    yield d
    for s in sessions:
        s.close()


def test_a_tenant_sees_only_its_own_sessions(shared: Any) -> None:
    every = status_as(shared.address)  # the operator (admin) sees every session and the device's totals
    assert sorted(u.tenant for u in every.sessions) == ["alice", "bob"]
    assert every.devices[0].used_bytes == sum(u.used_bytes for u in every.sessions) > 0
    alice = next(u for u in every.sessions if u.tenant == "alice")

    mine = status_as(shared.address, "tenant", "alice")
    assert [(u.tenant, u.lease_id, u.used_bytes) for u in mine.sessions] == [("alice", "lease-alice", alice.used_bytes)]
    # the device's figures are alice's own: its total less hers would be bob's usage
    assert mine.devices[0].used_bytes == alice.used_bytes < every.devices[0].used_bytes
    assert mine.devices[0].busy_seconds == pytest.approx(alice.busy_seconds)
    assert mine.devices[0].info == every.devices[0].info and mine.host_id == every.host_id

    assert [u.tenant for u in status_as(shared.address, "tenant", "carol").sessions] == []  # a tenant with none
    assert len(status_as(shared.address, "metrics", "prometheus").sessions) == 2  # scrapers read every tenant anyway
    for role in ("host", "server"):  # neither needs a tenant's usage
        reply = status_as(shared.address, role, "test-host")
        assert list(reply.sessions) == [] and reply.devices[0].used_bytes == 0
