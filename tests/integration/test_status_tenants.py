"""A daemon's Status shows a caller only what its credentials may see (round 41: it answered every session's tenant,
lease id, memory, share, busy time and ops to any caller, a tenant too; round 42: under `--tls-client-auth none`, the
default, it still did). An operator's certificate (admin, metrics; seen under `--tls-client-auth require`) sees every
session; anyone else the sessions it holds: its tenant certificate's, the sessions whose secret ids it names, the
leases whose tokens it presents; an anonymous caller none. Real daemons on loopback, real certificates of the tests'
CA, real lease tokens, real sessions holding memory."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.session import Session
from support import MiB, daemon_status, get_pki, mint_token, tls_channel

from gpupool import protocol, tls
from gpupool._proto import device_pb2, device_pb2_grpc


def status_as(address: str, role: str = "", name: str = "", md: Any = ()) -> device_pb2.StatusReply:
    """Status with the test process's (admin) certificate, or a fresh `role` certificate named `name`; `md`: its
    metadata (sessions named, lease tokens)."""
    cfg = get_pki().client_config(role, name) if role else None
    with tls.channel(address, cfg=cfg, token=False) if cfg else tls_channel(address) as ch:
        return device_pb2_grpc.DeviceStub(ch).Status(device_pb2.StatusRequest(), timeout=10, metadata=md)


def with_sessions(d: Any) -> list[Session]:
    """alice's and bob's sessions on `d`'s one device, each holding memory (bob more)."""
    sessions = []
    for tenant, n in (("alice", 1000), ("bob", 5000)):
        s = Session.attach(d.address, d.token(quota_bytes=16 * MiB, tenant=tenant, lease_id=f"lease-{tenant}"))
        s.upload(torch.ones(n))
        s.sync()
        sessions.append(s)
    return sessions


@pytest.fixture
def shared(daemon_factory: Any) -> Any:
    """A daemon requiring client certificates, with alice's and bob's sessions (`with_sessions`)."""
    d = daemon_factory(tls=dataclasses.replace(get_pki().server_config(), client_auth="require"))
    sessions = with_sessions(d)
    yield d
    for s in sessions:
        s.close()


@pytest.fixture
def open_daemon(daemon_factory: Any) -> Any:
    """A daemon as `gpupool serve` starts one by default (`--tls-client-auth none`: it asks no caller for a
    certificate), with alice's and bob's sessions (`with_sessions`): (the daemon, [alice's, bob's])."""
    d = daemon_factory()
    assert d.running.daemon.config.tls.client_auth == "none"
    sessions = with_sessions(d)
    yield d, sessions
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


def test_an_anonymous_caller_of_a_default_daemon_sees_no_session(open_daemon: Any) -> None:
    """Round 42: under `--tls-client-auth none` Status answered anyone who reached the port with every session.
    Now a caller that names nothing gets the devices' inventory, no session and zeros (an answer, not an error: the
    inventory is no tenant's, smi keeps its tables), whatever certificate it presents (the daemon sees none)."""
    d, _ = open_daemon
    for role, name in (("", ""), ("tenant", "alice"), ("metrics", "prometheus")):
        reply = status_as(d.address, role, name)
        assert list(reply.sessions) == [], (role, reply.sessions)
        assert reply.devices[0].used_bytes == 0 and reply.devices[0].busy_seconds == 0.0
        assert reply.host_id == d.host_id and reply.devices[0].info.memory_bytes > 0


def test_a_caller_sees_the_sessions_it_names_by_their_secret_ids(open_daemon: Any) -> None:
    d, (alice, bob) = open_daemon
    mine = daemon_status(d.address, alice)
    assert [(u.tenant, u.lease_id) for u in mine.sessions] == [("alice", "lease-alice")]
    assert mine.devices[0].used_bytes == mine.sessions[0].used_bytes > 0  # alice's own bytes, not the device's
    both = daemon_status(d.address, alice, bob)
    assert sorted(u.tenant for u in both.sessions) == ["alice", "bob"]
    assert both.devices[0].used_bytes == sum(u.used_bytes for u in both.sessions) > mine.devices[0].used_bytes
    # a public tag (what Status shows) or a made-up id names nothing
    assert list(daemon_status(d.address, mine.sessions[0].session_id, "not-a-session").sessions) == []


def test_a_caller_sees_the_sessions_of_the_lease_whose_token_it_presents(open_daemon: Any) -> None:
    d, _ = open_daemon
    token = d.token(tenant="bob", lease_id="lease-bob")  # a token of bob's lease (a renewal's, say)
    reply = status_as(d.address, md=((protocol.LEASE_TOKEN_METADATA, token),))
    assert [(u.tenant, u.lease_id) for u in reply.sessions] == [("bob", "lease-bob")]
    # a token is checked as Attach checks it: another signer's, another host's, an expired one are refused
    for bad, code in (
        (mint_token(b"0" * 64, tenant="bob", lease_id="lease-bob"), grpc.StatusCode.UNAUTHENTICATED),
        (d.token(host="other-host", lease_id="lease-bob"), grpc.StatusCode.PERMISSION_DENIED),
        (d.token(lease_id="lease-bob", ttl=-10), grpc.StatusCode.UNAUTHENTICATED),
        ("garbage", grpc.StatusCode.UNAUTHENTICATED),
    ):
        with pytest.raises(grpc.RpcError) as info:
            status_as(d.address, md=((protocol.LEASE_TOKEN_METADATA, bad),))
        assert info.value.code() == code, (bad[:20], info.value.details())


def test_a_tenant_certificate_adds_the_sessions_it_names(shared: Any) -> None:
    """Under `require` a tenant sees its own tenant's sessions and those it proves it holds (their secret ids)."""
    bob = next(u for u in status_as(shared.address).sessions if u.tenant == "bob")
    assert [u.tenant for u in status_as(shared.address, "tenant", "alice").sessions] == ["alice"]
    secret = shared.running.daemon.session_list()
    bob_id = next(s.session_id for s in secret if s.tenant == "bob")
    named = status_as(shared.address, "tenant", "alice", md=((protocol.SESSION_METADATA, bob_id),))
    assert sorted(u.session_id for u in named.sessions) == sorted(
        u.session_id for u in status_as(shared.address).sessions
    )
    assert bob.session_id in {u.session_id for u in named.sessions}
