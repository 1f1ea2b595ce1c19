"""free51: what a session's worker is told of its device's memory, against real daemons on loopback (fails on
e23fda42). Until round 51 the daemon sent each slice's worker the device's free bytes (`SliceRequest.device_free`:
the device's size less every session's use), so a worker (code a tenant may influence) knew its co-tenants' total use
at every slice. Now it is told the fewer of those and its quota's room (daemon.py `_device_free`): the co-tenants'
use only where the device's free bytes are the binding limit, which any refusal of an allocation discloses anyway, and
every refusal is what it was (the quota's where the quota binds, "device N full" where the device does). And the
scheduler's ListPool showed a tenant a device's memory used (the daemon's total) wherever no other tenant held an
active lease on it, including while its daemon still reported a session of a lease just released (or of none)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from gpupool.client.pool import SchedulerClient
from gpupool.client.session import Session
from gpupool.server import worker
from scheduler_fixtures import wait_until
from support import registered_host
from test_security import start_pool

from gpupool import errors, protocol
from gpupool._proto import device_pb2, device_pb2_grpc, scheduler_pb2

KiB = 1024
MiB = 1024**2
HOST = "free51-host"


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


def test_list_pool_hides_the_memory_of_a_session_whose_lease_is_not_the_callers(
    tmp_path: Path, daemon_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real scheduler and daemon: alice (4,000 bytes) and bob (1.2 MB) share a device. Bob releases his lease while
    his session is still open on the daemon (held open here: the daemon closes it once a heartbeat's reply names the
    lease, and reports it until the heartbeat after): ListPool gives alice 0, not the total holding bob's 1.2 MB (on
    e23fda42: alice held the device's only active lease, so she was shown the total); once the daemon reports bob's
    session gone, her own 4,000 bytes. Then alice releases hers, held open too: carol, who holds no lease, is shown 0
    (on e23fda42: a device nobody holds a lease on showed her alice's usage). An operator sees the totals throughout."""
    pool = start_pool(tmp_path)
    clients: list[SchedulerClient] = []
    sessions: list[Session] = []
    try:
        host = registered_host(daemon_factory, pool.address, pool.public, HOST)
        daemon = host.running.daemon
        alice, bob, carol, admin = (pool.client(*who) for who in [("tenant", "alice")] + [("tenant", "bob")] + [
            ("tenant", "carol"), ("admin", "ops")])  # fmt: skip
        clients += [alice, bob, carol, admin]
        leases = []
        for client, n in ((alice, 1000), (bob, 300_000)):
            lease = client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25))
            sessions.append(Session.attach(host.address, lease.devices[0].token))
            sessions[-1].upload(torch.ones(n))
            sessions[-1].sync()
            leases.append(lease.lease_id)

        def used(client: SchedulerClient) -> int:
            (h,) = [h for h in client.list_pool().hosts if h.host_id == HOST]
            return int(h.devices[0].used_bytes)

        wait_until(lambda: used(admin) >= 1_204_000, timeout=60, what="the heartbeat's memory used")
        assert used(alice) == used(bob) == used(carol) == 0  # shared (round 42)
        real = daemon.revoke_leases
        heard: list[str] = []
        held: set[str] = set()

        def revoke(ids: list[str]) -> None:  # the daemon's close of a revoked lease's sessions, held for `held`
            heard.extend(ids)
            real([x for x in ids if x not in held])

        monkeypatch.setattr(daemon, "revoke_leases", revoke)
        held.add(leases[1])
        bob.release(leases[1])
        wait_until(lambda: leases[1] in heard, timeout=60, what="a heartbeat after bob's release")
        assert used(admin) >= 1_204_000  # the daemon still reports bob's session
        assert used(alice) == 0 and used(carol) == 0
        held.discard(leases[1])
        real([leases[1]])  # bob's session closes now
        wait_until(lambda: 0 < used(admin) < 1_200_000, timeout=60, what="bob's session gone from a heartbeat")
        assert used(alice) == used(admin) == 4000  # hers alone: her own

        held.add(leases[0])
        alice.release(leases[0])
        wait_until(lambda: leases[0] in heard, timeout=60, what="a heartbeat after alice's release")
        assert used(admin) == 4000 and used(carol) == 0 and used(alice) == 0
        held.discard(leases[0])
        real([leases[0]])
    finally:
        for s in sessions:
            s.close()
        for c in clients:
            c.close()
        pool.scheduler.stop(grace=0.5)
