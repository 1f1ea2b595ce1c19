"""The scheduler with real daemons: `gpupool scheduler` and `gpupool serve --fake-gpus 1 --scheduler ...`
processes on loopback, leases attached on the daemons with the tokens the scheduler signed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from gpupool.client.pool import Lease, SchedulerClient, lease
from gpupool.scheduler.cli import build_parser
from scheduler_fixtures import Proc, key_file, silence_when_down, start_scheduler, wait_until
from support import daemon_status, tls_channel

from gpupool._proto import device_pb2, device_pb2_grpc, scheduler_pb2
from gpupool.errors import FailedPrecondition, ResourceExhausted
from gpupool.tokens import public_session_id

FAKE_MEMORY = "256MiB"
HOST_TIMEOUT = 4  # --host-timeout of the killed-daemon test: heartbeats every 0.5 s, as test_scheduler_ha's


def launch_daemon(tmp: Path, scheduler: str, host_id: str) -> Proc:
    """`gpupool serve` registering with `scheduler`, started (its port: once it listens, `proc.port()`)."""
    return Proc(
        ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "0", "--fake-gpus", "1", "--fake-gpu-memory",
         FAKE_MEMORY, "--token-key-file", str(key_file(tmp)), "--host-id", host_id, "--scheduler", scheduler,
         "--heartbeat-interval", "0.5"]
    )  # fmt: skip


def start_daemon(tmp: Path, scheduler: str, host_id: str) -> tuple[Proc, str]:
    proc = launch_daemon(tmp, scheduler, host_id)
    return proc, f"127.0.0.1:{proc.port()}"


@dataclass
class Cluster:
    tmp: Path
    scheduler: Proc
    address: str
    daemons: dict[str, tuple[Proc, str]]

    def client(self) -> SchedulerClient:
        return SchedulerClient(self.address)

    def wait_hosts_up(self, n: int) -> None:
        wait_until(lambda: sum(h.state == "up" for h in self.client().list_pool().hosts) == n, what=f"{n} hosts up")

    def wait_idle(self) -> None:
        """No lease held, both hosts up: as a fresh cluster (each test's leases are released or expired)."""

        def idle() -> bool:
            pool = self.client().list_pool()
            return not pool.leases and sum(h.state == "up" for h in pool.hosts) == 2

        wait_until(idle, timeout=60, what="the cluster idle: no lease, both hosts up")


@pytest.fixture(scope="module")
def _cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One scheduler and two daemons for the module's tests (a fresh cluster per test until round 52: three starts
    of a scheduler and two `gpupool serve`); the restart test, last, leaves its restarted scheduler to this fixture."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    sched, address = start_scheduler(tmp_path)
    c = Cluster(tmp_path, sched, address, {})
    started: list[Proc] = []
    try:
        for host_id in ("da", "db"):  # the two daemons start side by side
            started.append(launch_daemon(tmp_path, address, host_id))
        for host_id, proc in zip(("da", "db"), started, strict=True):
            c.daemons[host_id] = (proc, f"127.0.0.1:{proc.port()}")
        c.wait_hosts_up(2)
        yield c
    finally:
        for proc in {*started, *(proc for proc, _ in c.daemons.values())}:
            proc.stop()
        c.scheduler.stop()


@pytest.fixture
def cluster(_cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster, idle before the test (and after it: the next test's start does not wait on this one's
    leases)."""
    _cluster.wait_idle()
    yield _cluster
    _cluster.wait_idle()


def attach(x: Lease, i: int = 0) -> tuple[device_pb2_grpc.DeviceStub, device_pb2.AttachReply]:
    d = x.devices[i]
    stub = device_pb2_grpc.DeviceStub(tls_channel(d.address))
    return stub, stub.Attach(device_pb2.AttachRequest(token=d.token), timeout=10)


def session_ids(stub: device_pb2_grpc.DeviceStub, *named: str) -> set[str]:
    """The sessions Status lists, by their public tags (`public_session_id`): it never shows the secret ids. It
    shows the caller the sessions it names (`named`: their secret ids), those that are still open."""
    return {s.session_id for s in daemon_status(stub, *named).sessions}


def where(x: Lease) -> tuple[str, int]:
    return x.devices[0].host_id, x.devices[0].device


def test_binpack_wait_and_tokens_the_daemons_accept(cluster: Cluster) -> None:
    a, b, c = (lease(1, 0.5, scheduler=cluster.address, tenant=t) for t in ("a", "b", "c"))
    assert where(a) == where(b) != where(c)
    stub, reply = attach(a)
    assert reply.share == 0.5 and reply.quota_bytes == 128 * 1024**2
    assert a.devices[0].address == cluster.daemons[where(a)[0]][1]
    d = lease(1, 0.5, scheduler=cluster.address)
    assert where(d) == where(c)  # binpack fills the second device too; now the pool is full
    got: list[Lease] = []
    waiter = threading.Thread(target=lambda: got.append(lease(1, 0.5, scheduler=cluster.address, wait=30)))
    waiter.start()
    wait_until(lambda: cluster.client().list_pool().waiting == 1, what="the next lease to wait")
    assert not got
    b.release()
    waiter.join(30)
    assert got and where(got[0]) == where(a)
    # A released lease: its daemon closes the session at the next heartbeat, long before the token expires.
    assert public_session_id(reply.session_id) in session_ids(stub, reply.session_id)
    a.release()
    wait_until(
        lambda: public_session_id(reply.session_id) not in session_ids(stub, reply.session_id),
        timeout=30,
        what="the daemon to drop the session",
    )
    for x in (c, d, got[0]):
        x.release()


def test_unrenewed_lease_expires_and_the_daemon_drops_its_session(cluster: Cluster) -> None:
    client = cluster.client()
    pb = client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=1.0, ttl_seconds=2, tenant="idle"))
    x = Lease._from_pb(pb, cluster.address)  # never renewed
    stub, reply = attach(x)
    assert public_session_id(reply.session_id) in session_ids(stub, reply.session_id)
    wait_until(
        lambda: public_session_id(reply.session_id) not in session_ids(stub, reply.session_id),
        timeout=30,
        what="the session to close",
    )
    wait_until(lambda: not client.list_pool().leases, timeout=30, what="the lease to expire")
    with pytest.raises(FailedPrecondition, match="expired"):
        x.renew()
    pool = client.list_pool()
    assert all(d.allocated_share == 0 and d.allocated_bytes == 0 for h in pool.hosts for d in h.devices)


def test_scheduler_kill_9_and_restart_keeps_leases_sessions_and_accounting(cluster: Cluster) -> None:
    held = [lease(1, f, scheduler=cluster.address) for f in (0.5, 0.25, 0.75)]
    stub, reply = attach(held[0])
    before = cluster.client().list_pool()
    cluster.scheduler.kill()
    cluster.scheduler = Proc(
        [*cluster.scheduler.args[:2], cluster.address, *cluster.scheduler.args[3:]]
    )  # same --listen port, same --state
    assert cluster.scheduler.port() == int(cluster.address.rsplit(":", 1)[1])
    after = cluster.client().list_pool()
    assert [[(d.allocated_bytes, d.allocated_share) for d in h.devices] for h in after.hosts] == [
        [(d.allocated_bytes, d.allocated_share) for d in h.devices] for h in before.hosts
    ]
    assert sorted(x.lease_id for x in after.leases) == sorted(x.lease_id for x in held)
    for x in held:
        x.renew()
    with pytest.raises(ResourceExhausted):  # 0.25 + 0.25 left on two devices: no 0.5 anywhere
        lease(1, 0.5, scheduler=cluster.address)
    time.sleep(2)  # a few heartbeats of both daemons against the new scheduler
    cluster.wait_hosts_up(2)
    assert public_session_id(reply.session_id) in session_ids(
        stub, reply.session_id
    )  # a live lease's session is not revoked by the restart
    for x in held:
        x.release()


def test_killed_daemon_is_marked_down_and_its_holder_gets_unavailable(tmp_path: Path) -> None:
    assert build_parser().parse_args([]).host_timeout == 10  # the default; this test sets 4 s (it waited 10 s)
    sched, address = start_scheduler(tmp_path, "--host-timeout", str(HOST_TIMEOUT))
    daemon, _ = start_daemon(tmp_path, address, "dz")
    try:
        wait_until(lambda: any(h.state == "up" for h in SchedulerClient(address).list_pool().hosts), what="dz up")
        x = lease(1, 0.5, scheduler=address)
        daemon.kill()
        # down for its silence, at least the --host-timeout (not early) and less than the default 10 s (the flag was
        # honoured); waited for generously, measured from its last heartbeat (scheduler_fixtures.silence_when_down)
        silent = silence_when_down(address, "dz", timeout=6 * HOST_TIMEOUT)
        assert HOST_TIMEOUT <= silent < build_parser().parse_args([]).host_timeout, f"down after {silent:.1f} s"
        with pytest.raises(FailedPrecondition, match="host dz is down"):
            x.renew()
        x.release()
    finally:
        daemon.stop()
        sched.stop()
