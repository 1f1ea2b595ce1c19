"""tokq52: the scheduler as the credential authority of a live session, against a real scheduler and daemon on loopback
(each test fails on da68e41a). Until round 52 a session kept the quota of its lease's first token for its life: a
refreshed token's quota (a scheduler that changes a lease's terms at its renewal) reached neither the daemon nor its
worker nor the client, and RefreshToken took a token of another tenant, another network grant or collective group, and
answered one of another host, lease or device UNAUTHENTICATED (the token is genuine: PERMISSION_DENIED, as Attach)."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rich.console
import torch
from gpupool.client import admin as admin_cli
from gpupool.client import smi
from gpupool.client.pool import Lease
from gpupool.client.session import Session
from scheduler_fixtures import ROOT, wait_until
from support import mint_token, registered_host
from test_security import Pool, start_pool

from gpupool import errors, protocol, tokens
from gpupool._proto import device_pb2, device_pb2_grpc, scheduler_pb2

KiB = 1024
MiB = 1024**2
HOST = "tokq52-host"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = start_pool(tmp_path)
    yield p
    p.scheduler.stop(grace=0.5)


def _limits(s: Session) -> tuple[int, int]:
    """(used, limit) of `s` in its daemon's Status, as its holder may read them."""
    reply = device_pb2_grpc.DeviceStub(s._channel).Status(
        device_pb2.StatusRequest(), timeout=30, metadata=((protocol.SESSION_METADATA, s.session_id),)
    )
    (u,) = reply.sessions
    return int(u.used_bytes), int(u.limit_bytes)


def _terms(signer: tokens.Signer, token: str, later: float, **changed: Any) -> str:
    """`token`'s claims with `changed`, `later` seconds further in expiry, signed by the scheduler's key: what a
    scheduler that changes a lease's terms at its renewal hands out."""
    claims = tokens.verify(signer, token)
    return tokens.mint(signer, dataclasses.replace(claims, expires_at=claims.expires_at + later, **changed))


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_refreshed_tokens_quota_holds_from_the_refresh_on(pool: Pool, daemon_factory: Any, isolation: str) -> None:
    """Alice's lease of half a 16 MiB fake GPU (8 MiB), her session holding 3 MiB. A renewal's token (same terms)
    changes nothing. A token of 2 MiB: from the refresh on her allocations are refused by the 2 MiB quota (the
    worker's words: "memory quota exceeded", her 3 MiB and the 2 MiB limit), her 3 MiB are intact and hers, the
    client's `quota_bytes` and Status say 2 MiB; once freed, what fits 2 MiB fits. The renewal's older token shown
    again (8 MiB, an earlier expiry) brings nothing back. A token of 12 MiB (more than her attach's 8): 10 MiB fit and
    come back whole. On da68e41a the 2 MiB token's refresh left her 8 MiB quota: the 1 KiB upload went through."""
    host = registered_host(daemon_factory, pool.address, pool.public, HOST, fake_gpu_memory=16 * MiB,
                           isolation=isolation)  # fmt: skip
    alice = pool.client("tenant", "alice")
    signer = tokens.load_signer(pool.key)
    lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
    told: list[int] = []
    with Session.attach(host.address, lease.devices[0].token) as s:
        getattr(s, "quota_hooks", []).append(told.append)  # (the C++ client's set_quota; none on da68e41a)
        assert s.quota_bytes == 8 * MiB
        x = torch.arange(3 * MiB // 4, dtype=torch.float32)
        h = s.upload(x)
        s.sync()
        renewed = alice.renew(lease.lease_id).devices[0].token  # the scheduler's renewal: the same terms
        s.refresh(renewed)
        assert (s.quota_bytes, told, _limits(s)) == (8 * MiB, [], (3 * MiB, 8 * MiB))

        s.refresh(_terms(signer, renewed, 1.0, quota_bytes=2 * MiB))
        assert (s.quota_bytes, told, _limits(s)) == (2 * MiB, [2 * MiB], (3 * MiB, 2 * MiB))
        s.upload(torch.zeros(KiB // 4))
        with pytest.raises(errors.ResourceExhausted, match="memory quota exceeded") as over:
            s.sync()
        assert (over.value.used_bytes, over.value.limit_bytes) == (3 * MiB, 2 * MiB), over.value.message
        assert torch.equal(s.download(h), x)  # what it held is intact, and still its own
        assert _limits(s) == (3 * MiB, 2 * MiB)

        s.refresh(renewed)  # the older token (8 MiB, an earlier end) again: it brings no quota back
        assert (s.quota_bytes, _limits(s)) == (2 * MiB, (3 * MiB, 2 * MiB))

        s.free([h])
        s.sync()
        assert _limits(s) == (0, 2 * MiB)
        small = s.upload(torch.ones(MiB // 4))
        s.sync()
        s.upload(torch.ones(MiB // 4 + 1))  # 1 MiB + 4 bytes more: past 2 MiB
        with pytest.raises(errors.ResourceExhausted, match="memory quota exceeded"):
            s.sync()
        s.free([small])
        s.sync()

        s.refresh(_terms(signer, renewed, 2.0, quota_bytes=12 * MiB))  # more than the attach's 8 MiB
        assert (s.quota_bytes, told, _limits(s)) == (12 * MiB, [2 * MiB, 12 * MiB], (0, 12 * MiB))
        y = torch.arange(10 * MiB // 4, dtype=torch.float32)
        big = s.upload(y)
        s.sync()
        assert torch.equal(s.download(big), y)
        assert _limits(s) == (10 * MiB, 12 * MiB)
    alice.close()


def test_a_refresh_refuses_a_token_of_another_host_device_lease_or_tenant_and_harms_nothing(
    pool: Pool, daemon_factory: Any
) -> None:
    """Alice's session, refreshed with hostile tokens: each refused with the right status and words, her session's
    end, quota and tensor untouched, bob's session on the same device untouched. Another host, device, lease (bob's
    real token), tenant, network grant or collective group, or a certificate binding not hers: PERMISSION_DENIED (on
    da68e41a: the first three UNAUTHENTICATED, the tenant, network and group ones taken). Another key, a changed
    signature, an expired token, garbage, an oversized token: UNAUTHENTICATED."""
    host = registered_host(daemon_factory, pool.address, pool.public, HOST, fake_gpu_memory=16 * MiB)
    alice, bob = pool.client("tenant", "alice"), pool.client("tenant", "bob")
    signer = tokens.load_signer(pool.key)
    a_lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25))
    b_lease = bob.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25))
    token, b_token = a_lease.devices[0].token, b_lease.devices[0].token
    daemon = host.running.daemon
    with Session.attach(host.address, token) as s, Session.attach(host.address, b_token) as b:
        x, z = torch.arange(1000.0), torch.ones(10)
        h, bh = s.upload(x), b.upload(z)
        s.sync()
        b.sync()
        (front,) = [f for f in daemon.session_list() if f.lease_id == a_lease.lease_id]
        ends = front.expires_at
        before = _limits(s)
        kid, body, sig = token.split(".")
        flipped = "B" if sig[10] == "A" else "A"
        claims = tokens.verify(signer, token)
        hostile: list[tuple[str, type[errors.GpupoolError], str]] = [
            (mint_token(b"not the scheduler's key", host=HOST, lease_id=a_lease.lease_id), errors.Unauthenticated,
             "unknown key"),
            (f"{kid}.{body}.{sig[:10]}{flipped}{sig[11:]}", errors.Unauthenticated, "signature|malformed"),
            (_terms(signer, token, -claims.expires_at + time.time() - 60), errors.Unauthenticated, "expired"),
            ("x", errors.Unauthenticated, "malformed"),
            ("a" * (tokens.MAX_TOKEN_LENGTH + 1), errors.Unauthenticated, "too long|malformed"),
            (_terms(signer, token, 60, host="other-host"), errors.PermissionDenied, "for host 'other-host'"),
            (_terms(signer, token, 60, device=1), errors.PermissionDenied, "another lease or device"),
            (b_token, errors.PermissionDenied, "another lease or device"),
            (_terms(signer, token, 60, tenant="bob"), errors.PermissionDenied, "tenant 'bob'"),
            (_terms(signer, token, 60, network=True), errors.PermissionDenied, "network grant, collective group"),
            (_terms(signer, token, 60, group=tokens.lease_group(signer, "another lease")), errors.PermissionDenied,
             "network grant, collective group"),
            (_terms(signer, token, 60, quota_bytes=16 * MiB, cert="sha256:" + "0" * 64), errors.PermissionDenied,
             "certificate binding"),
        ]  # fmt: skip
        for bad, what, words in hostile:
            with pytest.raises(what, match=words):
                s.refresh(bad)
            assert (front.expires_at, front.quota, s.quota_bytes) == (ends, 4 * MiB, 4 * MiB), words
        assert _limits(s) == before
        assert torch.equal(s.download(h), x) and torch.equal(b.download(bh), z)
        s.refresh(alice.renew(a_lease.lease_id).devices[0].token)  # her own renewal still goes through
        assert front.expires_at > ends
    alice.close()
    bob.close()


def _share(s: Session) -> float:
    reply = device_pb2_grpc.DeviceStub(s._channel).Status(
        device_pb2.StatusRequest(), timeout=30, metadata=((protocol.SESSION_METADATA, s.session_id),)
    )
    (u,) = reply.sessions
    return float(u.share)


def test_a_refreshed_tokens_share_weighs_the_session_and_a_share_below_the_schedulers_unit_is_refused(
    daemon: Any,
) -> None:
    """A refresh's share weighs the session in its device's queue from then on (Status, the queue's entry, the
    client). A share below the scheduler's unit (1e-6) is refused at Attach and at a refresh, UNAUTHENTICATED, the
    session untouched: on da68e41a a token of share 5e-324 attached, and the device's fair queue charged its first
    slice seconds / 5e-324 = inf, its virtual clock inf after the next: from then on it served its sessions in list
    order, one busy session starving the rest (checked on the queue alone)."""
    lease = "tokq52-share"
    with Session.attach(daemon.address, daemon.token(lease_id=lease, share=0.5, quota_bytes=MiB)) as s:
        (front,) = [f for f in daemon.running.daemon.session_list() if f.lease_id == lease]
        assert (front.entry.share, _share(s)) == (0.5, 0.5)
        s.refresh(daemon.token(lease_id=lease, share=0.25, quota_bytes=MiB, ttl=7200))
        assert (front.entry.share, _share(s), s.share) == (0.25, 0.25, 0.25)
        with pytest.raises(errors.Unauthenticated, match="out of range"):
            s.refresh(daemon.token(lease_id=lease, share=5e-324, quota_bytes=MiB, ttl=7300))
        assert (front.entry.share, _share(s), s.share) == (0.25, 0.25, 0.25)
        [h] = s.call("aten::ones.default", [3])
        assert s.download(h).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(errors.Unauthenticated, match="out of range"):
        Session.attach(daemon.address, daemon.token(share=5e-324, quota_bytes=MiB)).close()
    with Session.attach(daemon.address, daemon.token(share=tokens.MIN_SHARE, quota_bytes=MiB)) as least:
        least.sync()


NATIVE = """
import sys
import torch
from gpupool.client import native
native.enable()
session = native.attach(sys.argv[1], sys.argv[2])
x = torch.ones(3 * 1024 * 1024 // 4, device="gpupool")  # 3 MiB: within the 8 MiB quota
torch.gpupool.synchronize()  # (ran: a refresh is out of band, what is queued behind it meets the new quota)
session.refresh(sys.argv[3])  # the quota is 2 MiB from here on
print("quota", session.quota_bytes)
try:
    torch.empty(3 * 1024 * 1024 // 4, device="gpupool")  # more than the whole new quota
except Exception as exc:
    print("refused", type(exc).__name__, exc)
print("kept", float(x.cpu().sum()))  # (downloaded: a sum on the daemon would allocate, past the quota)
"""


def test_the_cpp_clients_quota_follows_a_refresh(daemon: Any) -> None:
    """The C++ client (`set_quota`, native_client.cpp HandleAllocator: a tensor over the session's whole quota is
    refused at its call, torch's OutOfMemoryError) takes a refresh's smaller quota: a 3 MiB tensor after a refresh to
    2 MiB is refused at the call, and the 3 MiB the session held before come back whole. On da68e41a the client kept
    the attach's 8 MiB: nothing was refused at the call."""
    from gpupool.client.native.backend import compiler_missing

    why = compiler_missing()
    if why is not None:
        pytest.skip(f"C++ client: {why}")
    lease = "tokq52-native"
    token = daemon.token(lease_id=lease, quota_bytes=8 * MiB)
    smaller = daemon.token(lease_id=lease, quota_bytes=2 * MiB, ttl=7200)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    cmd = [sys.executable, "-c", NATIVE, daemon.address, token, smaller]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"quota {2 * MiB}\n" in done.stdout, done.stdout
    assert "refused OutOfMemoryError" in done.stdout and "refused at the call" in done.stdout, done.stdout
    assert f"kept {3 * MiB // 4:.1f}\n" in done.stdout, done.stdout


def test_the_shims_quota_follows_a_refresh(attach: Any, serve: Any) -> None:
    """The Python shim's device (`DeviceRuntime.quota`: a factory's tensor over the whole quota is refused at its call,
    client/torch/remote.py `_fits_quota`) takes a refresh's smaller quota: after a refresh to 2 MiB a 3 MiB
    `torch.empty` is refused at the call, and the 3 MiB held before come back whole. On da68e41a it kept 8 MiB."""
    from gpupool.client.torch import runtime

    lease = "tokq52-shim"
    d = attach(lease_id=lease, quota_bytes=8 * MiB)
    x = torch.ones(3 * MiB // 4, device=d)
    torch.gpupool.synchronize()  # type: ignore[attr-defined]
    rt = runtime.get(d.index)
    assert rt is not None and rt.quota == 8 * MiB
    rt.refresh(serve.token(lease_id=lease, quota_bytes=2 * MiB, ttl=7200))
    assert rt.quota == rt.session.quota_bytes == 2 * MiB
    with pytest.raises(torch.OutOfMemoryError, match="refused at the call"):
        torch.empty(3 * MiB // 4, device=d)
    assert float(x.cpu().sum()) == 3 * MiB // 4


# ---- terms53: the scheduler changes a lease's terms (`gpupool lease terms`), its renewal carries them ----


def _pool_terms(client: Any) -> tuple[dict[str, tuple[int, float]], tuple[int, float]]:
    """Each active lease's (quota, share) by tenant, and the device's (allocated bytes, share): ListPool's."""
    state = client.list_pool()
    leases = {x.tenant: (x.devices[0].quota_bytes, round(x.devices[0].share, 6)) for x in state.leases}
    ((dev,),) = [h.devices for h in state.hosts]
    return leases, (dev.allocated_bytes, round(dev.allocated_share, 6))


def test_an_operator_changes_a_leases_terms_mid_job_and_its_session_holds_them_from_its_next_renewal(
    pool: Pool, daemon_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """terms53. Alice's half of a 16 MiB fake GPU holds 3 MiB; bob's quarter 1 MiB. Alice (her own lease), bob and a
    host's credential may not change its terms (PERMISSION_DENIED), nothing changed. The operator lowers alice's
    tenant to an eighth (`gpupool lease terms --tenant alice -p 0.125`): ListPool and the scheduler's metrics say 2
    MiB and 0.125 at once (the device's 8 MiB she may still hold stay counted), her session keeps 8 MiB until her
    lease's next renewal, from which on (one renewal, its subscriber's refresh, as the clients wire it) the daemon
    refuses her allocations past 2 MiB, her 3 MiB intact, and Status and the client say 2 MiB and 0.125. Once her
    older tokens have ended, the device counts what her daemon's heartbeats report past 2 MiB (1 MiB; none once
    freed). Raised to 12 MiB at a share of 0.75 (all bob leaves): 8 MiB fit after her next renewal. A byte more than
    the device has free, a share past the whole, more than the device's memory: refused at the call, nothing changed.
    Bob's terms, session and tensor are untouched throughout. On 536d6f64 there was no such call (SetLeaseTerms
    UNIMPLEMENTED): a renewal re-minted the first terms."""
    host = registered_host(daemon_factory, pool.address, pool.public, HOST, fake_gpu_memory=16 * MiB)
    alice, bob, ops = pool.client("tenant", "alice"), pool.client("tenant", "bob"), pool.client("admin", "ops")
    a_pb = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
    b_pb = bob.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25))
    lease = Lease._from_pb(a_pb, pool.address)
    lease._client = alice  # (renewed by alice's certificate)

    def metric(name: str, labels: dict[str, str]) -> float:  # (the samples whose labels include `labels`)
        families = pool.scheduler.metrics.registry.collect()
        samples = [x for f in families for x in f.samples if x.name == name]
        return sum(x.value for x in samples if labels.items() <= x.labels.items())

    with (
        Session.attach(host.address, a_pb.devices[0].token) as s,
        Session.attach(host.address, b_pb.devices[0].token) as b,
    ):
        lease.subscribe(lambda fresh: s.refresh(fresh.devices[0].token))  # (client/native/__init__.py's wiring)
        x = torch.arange(3 * MiB // 4, dtype=torch.float32)
        h, bh = s.upload(x), b.upload(torch.ones(MiB // 4))
        s.sync()
        b.sync()
        for who in (alice, bob, pool.client("host", HOST), pool.token_client("t0k")):
            with pytest.raises(errors.PermissionDenied, match="may not call this method"):
                who.set_lease_terms(a_pb.lease_id, fraction=1.0)
        assert _pool_terms(ops) == ({"alice": (8 * MiB, 0.5), "bob": (4 * MiB, 0.25)}, (12 * MiB, 0.75))

        assert admin_cli.lease_main(["terms", "--tenant", "alice", "-p", "0.125", "--scheduler", pool.address]) == 0
        assert f"lease {a_pb.lease_id}: {HOST}/0 2.0MiB share 0.125 (its sessions hold" in capsys.readouterr().out
        assert _pool_terms(ops) == ({"alice": (2 * MiB, 0.125), "bob": (4 * MiB, 0.25)}, (12 * MiB, 0.375))
        assert metric("gpupool_pool_memory_allocated_bytes", {"host": HOST}) == 12 * MiB
        assert metric("gpupool_lease_events_total", {"event": "changed"}) == 1
        assert (s.quota_bytes, _limits(s)) == (8 * MiB, (3 * MiB, 8 * MiB))  # until the lease's next renewal

        lease.renew()
        assert (s.quota_bytes, s.share, _limits(s), _share(s)) == (2 * MiB, 0.125, (3 * MiB, 2 * MiB), 0.125)
        s.upload(torch.zeros(KiB // 4))
        with pytest.raises(errors.ResourceExhausted, match="memory quota exceeded"):
            s.sync()
        assert torch.equal(s.download(h), x)
        core = pool.scheduler.core
        with core.lock:  # as once her older tokens (8 MiB) have ended: what her daemon reports past 2 MiB counts
            core.kept_until[a_pb.lease_id] = 0.0
        wait_until(lambda: _pool_terms(ops)[1] == (7 * MiB, 0.375), 60, what="her 1 MiB past the quota counted")
        s.free([h])
        s.sync()
        wait_until(lambda: _pool_terms(ops)[1] == (6 * MiB, 0.375), 60, what="her memory freed, heartbeated")
        # (terms54) the daemon measures its fake GPU's free memory (16 MiB less bob's 1), to the scheduler only
        assert core.pool.device((HOST, 0)).measured_free == 15 * MiB  # type: ignore[union-attr]
        mine = device_pb2_grpc.DeviceStub(s._channel).Status(
            device_pb2.StatusRequest(), timeout=30, metadata=((protocol.SESSION_METADATA, s.session_id),)
        )
        assert [d.HasField("free_bytes") for d in mine.devices] == [False]

        changed = ops.set_lease_terms(a_pb.lease_id, memory_bytes=12 * MiB, share=0.75)
        assert [(d.quota_bytes, d.share, d.token) for d in changed.devices] == [(12 * MiB, 0.75, "")]
        lease.renew()
        assert (s.quota_bytes, _limits(s), _share(s)) == (12 * MiB, (0, 12 * MiB), 0.75)
        y = torch.arange(8 * MiB // 4, dtype=torch.float32)
        big = s.upload(y)
        s.sync()
        assert torch.equal(s.download(big), y) and _limits(s) == (8 * MiB, 12 * MiB)

        for bad, what, words in (
            ({"memory_bytes": 12 * MiB + 1}, errors.ResourceExhausted, "12.0MiB and share 0.75 free .* do not fit"),
            ({"share": 0.76}, errors.ResourceExhausted, "do not fit; nothing changed"),
            ({"memory_bytes": 17 * MiB}, errors.InvalidArgument, r"more than device 0 of host .* has \(16\.0MiB\)"),
            ({"fraction": 0.0}, errors.InvalidArgument, r"fraction must be in \(0, 1\]"),
        ):
            with pytest.raises(what, match=words):
                ops.set_lease_terms(a_pb.lease_id, **bad)
        with pytest.raises(errors.NotFound):
            ops.set_lease_terms("0" * 32, fraction=0.5)
        assert _pool_terms(ops) == ({"alice": (12 * MiB, 0.75), "bob": (4 * MiB, 0.25)}, (16 * MiB, 1.0))
        lease.renew()
        assert (s.quota_bytes, _share(s)) == (12 * MiB, 0.75)
        assert (b.quota_bytes, _limits(b), _share(b)) == (4 * MiB, (MiB, 4 * MiB), 0.25)
        assert torch.equal(b.download(bh), torch.ones(MiB // 4))
    for c in (alice, bob, ops):
        c.close()


def test_a_raise_must_fit_the_free_memory_its_daemon_measures(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """terms54. A 16 MiB device (registered and heartbeated over the wire with the host's certificate, as a daemon
    does): alice's half (8 MiB), bob's quarter (4 MiB) holding 1 MiB. A heartbeat without a measure (an older daemon):
    the books alone, alice raised to 10 MiB. Its daemon then measures 5 MiB free (another process holds 10 MiB outside
    the pool): raising alice to 12 MiB (the books' room: 12 + 4 = 16) is refused, RESOURCE_EXHAUSTED naming the free
    memory and bob's 3 MiB promised and not yet used; nothing changed. Measured 14 MiB free: 12 + 3 > 14, refused;
    15 MiB: it fits. On 1ddcc310 a raise was checked against the books alone (the 12 MiB went through with 5 MiB
    free) and a heartbeat had no free memory to carry.
    smi54: each measure is the operator's to see (ListPool's `measured_free_bytes`, `gpupool smi`'s "free (measured)"
    column whole into a pipe, the scheduler's `gpupool_pool_memory_free_bytes`), none where unmeasured ("-", no
    series); a tenant's ListPool and smi show none (co-tenants' use). On 17b896e7 no view showed it. quota55: nor
    did `gpupool list-gpus`' lines and `gpupool smi --watch`'s one-line summary on 0c688a96; now an operator's do
    ("free (measured) 5.0MiB", "-" where unmeasured), a tenant's not."""
    host = pool.client("host", HOST)
    ops, alice, bob = pool.client("admin", "ops"), pool.client("tenant", "alice"), pool.client("tenant", "bob")
    info = device_pb2.DeviceInfo(index=0, uuid="GPU-terms54", model="fake", memory_bytes=16 * MiB, fake=True)
    host._call("Register", scheduler_pb2.RegisterRequest(host_id=HOST, address="127.0.0.1:1", devices=[info]))
    a_pb = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
    b_pb = bob.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25))

    def beat(free: int | None) -> None:
        usage = device_pb2.DeviceUsage(info=info, used_bytes=MiB)
        if free is not None:
            usage.free_bytes = free
        bobs = device_pb2.SessionUsage(lease_id=b_pb.lease_id, device=0, tenant="bob", used_bytes=MiB)
        reply = host._call("Heartbeat", scheduler_pb2.HeartbeatRequest(host_id=HOST, sessions=[bobs], devices=[usage],
                                                                       address="127.0.0.1:1"))  # fmt: skip
        assert not reply.reregister and not reply.revoked_leases

    def shown(client: Any) -> tuple[list[bool | int | str | None], dict[str, str], list[float]]:
        """(smi54) ListPool's measure to `client` (False: unset) with (quota55) the one `gpupool list-gpus`' line and
        `gpupool smi --watch`'s summary line show (None: no such field), `gpupool smi`'s devices row by its header
        (printed whole, as into a pipe), and the samples of the scheduler's free-memory gauge of the device."""
        state = client.list_pool()
        ((dev,),) = [h.devices for h in state.hosts]
        (listed,) = smi.list_gpus(state)
        summary = smi.summary(smi.Sample(state), None)
        lines = [re.search(rf"free \(measured\):? (?:{HOST}/0 )?(\S+?)[,;]?(?: |$)", t) for t in (listed, summary)]
        monkeypatch.delenv("COLUMNS", raising=False)  # (as into a pipe: the tables' natural width, nothing cut)
        out = rich.console.Console(file=io.StringIO(), force_terminal=False)
        smi.show(out, smi.devices_table(state))
        table = [[c.strip() for c in re.split("[┃│]", line) if c.strip()] for line in out.file.getvalue().splitlines()]
        header = next(cells for cells in table if "host" in cells and "capacity" in cells)
        row = next(cells for cells in table if cells and cells[0] == HOST)
        gauge = [x.value for f in pool.scheduler.metrics.registry.collect() for x in f.samples
                 if x.name == "gpupool_pool_memory_free_bytes" and x.labels["host"] == HOST]  # fmt: skip
        return (
            [dev.HasField("measured_free_bytes") and dev.measured_free_bytes, *(m and m.group(1) for m in lines)],
            dict(zip(header, row, strict=True)),
            gauge,
        )

    beat(None)
    views, row, gauge = shown(ops)  # unmeasured: "-", no series
    assert (views, row["free (measured)"], row["capacity"], gauge) == ([False, "-", "-"], "-", "16.0MiB", []), row
    ops.set_lease_terms(a_pb.lease_id, memory_bytes=10 * MiB, share=0.5)
    before = ({"alice": (10 * MiB, 0.5), "bob": (4 * MiB, 0.25)}, (14 * MiB, 0.75))
    assert _pool_terms(ops) == before
    for free in (5 * MiB, 14 * MiB):
        beat(free)
        views, row, gauge = shown(ops)
        size = f"{free // MiB}.0MiB"
        assert (views, row["free (measured)"], gauge) == ([free, size, size], size, [free]), (views, row)
        views, row, _ = shown(alice)  # a tenant: none (nor the column)
        assert views == [False, None, None] and "free (measured)" not in row and row["capacity"] == "16.0MiB", row
        with pytest.raises(errors.ResourceExhausted) as refused:
            ops.set_lease_terms(a_pb.lease_id, memory_bytes=12 * MiB, share=0.5)
        assert (
            f"has {free // MiB}.0MiB free by its daemon's last measure, 3.0MiB of it promised to other leases: a quota "
            "of 12.0MiB (this lease's sessions hold 0B) does not fit; nothing changed" in refused.value.message
        ), refused.value.message
        assert _pool_terms(ops) == before
    beat(15 * MiB)
    ops.set_lease_terms(a_pb.lease_id, memory_bytes=12 * MiB, share=0.5)
    assert _pool_terms(ops)[1] == (16 * MiB, 0.75)
    for c in (host, ops, alice, bob):
        c.close()
