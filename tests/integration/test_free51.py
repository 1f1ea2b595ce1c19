"""free51: what a session's worker is told of its device's memory, against real daemons on loopback (fails on
e23fda42). Until round 51 the daemon sent each slice's worker the device's free bytes (`SliceRequest.device_free`:
the device's size less every session's use), so a worker (code a tenant may influence) knew its co-tenants' total use
at every slice. Now it is told the fewer of those and its quota's room (daemon.py `_device_free`): the co-tenants'
use only where the device's free bytes are the binding limit, which any refusal of an allocation discloses anyway, and
every refusal is what it was (the quota's where the quota binds, "device N full" where the device does)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from gpupool.client.session import Session
from gpupool.server import worker

from gpupool import errors, protocol
from gpupool._proto import device_pb2, device_pb2_grpc

KiB = 1024
MiB = 1024**2


def _told(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[int]]:
    """Each runner's `SliceRequest.device_free`, slice by slice (keyed by the runner's id): what its worker is told,
    recorded at the daemon's end of the worker boundary (`run`, which `flush` calls too), both isolations."""
    told: dict[int, list[int]] = {}
    lock = threading.Lock()
    for cls in (worker.ProcessRunner, worker.InlineRunner):

        def run(self: Any, req: Any, *args: Any, _run: Any = cls.run, **kwargs: Any) -> Any:
            with lock:
                told.setdefault(id(self), []).append(req.device_free)
            return _run(self, req, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return told


def _status_used(s: Session) -> tuple[list[int], list[int]]:
    """The device and session figures of the daemon's Status as `s` may call it (naming its session)."""
    reply = device_pb2_grpc.DeviceStub(s._channel).Status(
        device_pb2.StatusRequest(), timeout=30, metadata=((protocol.SESSION_METADATA, s.session_id),)
    )
    return [int(d.used_bytes) for d in reply.devices], [int(u.used_bytes) for u in reply.sessions]


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_worker_is_told_its_quota_room_not_its_co_tenants_use(
    daemon_factory: Any, monkeypatch: pytest.MonkeyPatch, isolation: str
) -> None:
    """Two tenants on an 8 MiB fake GPU (quotas over-committed: alice 7 MiB + 4 KiB, bob 2 MiB). While the device has
    more free than bob's quota has room, bob's worker is told his quota's room only, the same whether alice holds
    nothing or 4 MiB (on e23fda42: 8 MiB less bob's own, then 4 MiB less it: alice's 4 MiB to the byte), and so are
    Status's figures bob may read; his allocation past his quota is refused by the quota. Once alice holds 7 MiB the
    device binds: bob's 1.5 MiB upload, within his quota, is refused RESOURCE_EXHAUSTED "device 0 full" with his own
    figures, as before, and what still fits fits."""
    told = _told(monkeypatch)
    d = daemon_factory(fake_gpu_memory=8 * MiB, isolation=isolation)
    alice = Session.attach(d.address, d.token(quota_bytes=7 * MiB + 4 * KiB, tenant="alice51"))
    bob = Session.attach(d.address, d.token(quota_bytes=2 * MiB, tenant="bob51"))
    try:
        runner = next(s.runner for s in d.running.daemon.session_list() if s.tenant == "bob51")
        quota = 2 * MiB
        bob.upload(torch.zeros(KiB // 4))  # 1 KiB of bob's own
        bob.sync()
        before = list(told[id(runner)])
        assert before and set(before) <= {quota, quota - KiB}, before

        alice.upload(torch.zeros(4 * MiB // 4))
        alice.sync()
        bob.upload(torch.zeros(KiB // 4))
        bob.sync()
        after = told[id(runner)][len(before) :]
        assert after and set(after) <= {quota - KiB, quota - 2 * KiB}, after  # alice's 4 MiB nowhere
        assert _status_used(bob) == ([2 * KiB], [2 * KiB])

        bob.upload(torch.zeros(quota // 4))  # past his quota's room: the quota refuses it, as before
        with pytest.raises(errors.ResourceExhausted, match="memory quota exceeded") as over:
            bob.sync()
        assert (over.value.used_bytes, over.value.limit_bytes) == (2 * KiB, quota), over.value.message

        alice.upload(torch.zeros(3 * MiB // 4))  # alice holds 7 MiB: 1 MiB - 2 KiB free, under bob's room
        alice.sync()
        bob.upload(torch.zeros(3 * MiB // 2 // 4))  # 1.5 MiB, within his quota: the device refuses it
        with pytest.raises(errors.ResourceExhausted, match="device 0 full") as full:
            bob.sync()
        assert (full.value.used_bytes, full.value.limit_bytes) == (2 * KiB, quota), full.value.message
        assert str(7 * MiB) not in full.value.message and str(MiB - 2 * KiB) not in full.value.message
        assert MiB - 2 * KiB in told[id(runner)]  # (where the device binds its worker is told the free bytes)
        bob.upload(torch.zeros(MiB // 2 // 4))  # what fits still fits
        bob.sync()
        assert _status_used(bob) == ([2 * KiB + MiB // 2], [2 * KiB + MiB // 2])
    finally:
        alice.close()
        bob.close()
