"""Round 41 (sched41): what a host or tenant credential can make the scheduler do before it is refused.

Found and fixed here (fails on 50464ae):
- a host heartbeating past `--host-heartbeat-rate` was refused after gRPC had parsed its message (up to 1 MiB, ~29,000
  session ids): the interceptor now takes the request's bytes and parses them once the caller passed its rate
  (scheduler/auth.py `_wrap`; bench/heartbeat_flood.py: the scheduler's CPU a heartbeat of 4,000 ids 2.1 ms -> 0.7 ms);
- a host credential's ListPool was never limited (`--tenant-rate` was the tenants'), each call a hold of the core's
  lock over the whole pool: now a bucket of that rate per host (scheduler/auth.py `AuthInterceptor.host_rate`);
- a heartbeat's repeated fields were unbounded: ~29,000 lease ids looked up under the core's lock a call; now at most
  `MAX_HOST_SESSIONS` sessions (and `gpupool serve --max-sessions` at most that), `MAX_DEVICES_PER_HOST` devices,
  lease ids of at most `MAX_ID_LENGTH` characters (Heartbeat, Renew, Release), each INVALID_ARGUMENT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from gpupool.scheduler.hosts import MAX_DEVICES_PER_HOST, MAX_ID_LENGTH
from gpupool.server.cli import build_parser
from scheduler_fixtures import GiB
from support import get_pki

from gpupool import tls, tokens
from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc
from gpupool.protocol import MAX_HOST_SESSIONS

HEARTBEAT = "/gpupool.v1.Scheduler/Heartbeat"


def _scheduler(tmp: Path, tenant_rate: float) -> SchedulerServer:
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=str(tmp / "state.db"), metrics_listen="0", tenant_rate=tenant_rate,
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"),
    )  # fmt: skip
    return SchedulerServer(config, tokens.Signer.from_seed(b"sched41")).start()


@pytest.fixture
def sched(tmp_path: Path) -> Iterator[SchedulerServer]:
    server = _scheduler(tmp_path, 0.0)
    yield server
    server.stop(grace=0)


def _host(sched: SchedulerServer, host_id: str) -> tuple[grpc.Channel, scheduler_pb2_grpc.SchedulerStub]:
    channel = tls.channel(f"127.0.0.1:{sched.port}", cfg=get_pki().client_config("host", host_id))
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    info = device_pb2.DeviceInfo(index=0, uuid=f"GPU-{host_id}-0", model="fake", memory_bytes=GiB, fake=True)
    stub.Register(scheduler_pb2.RegisterRequest(host_id=host_id, address="127.0.0.1:40001", devices=[info]), timeout=10)
    return channel, stub


def _code(call: object, *args: object) -> tuple[grpc.StatusCode | None, str]:
    try:
        call(*args, timeout=10)  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code(), err.details()  # type: ignore[attr-defined]
    return None, ""


def test_a_heartbeat_past_the_hosts_rate_is_refused_before_its_bytes_are_parsed(sched: SchedulerServer) -> None:
    """h1 spends its heartbeat bucket, then sends bytes that are no HeartbeatRequest: RESOURCE_EXHAUSTED (the rate,
    taken before the bytes are parsed). Within its rate the same bytes are INVALID_ARGUMENT (parsed, refused: held on
    the base too). On 50464ae gRPC parsed every heartbeat before the rate was looked at: INVALID_ARGUMENT both times
    (a flooding host's every message parsed)."""
    channel, stub = _host(sched, "h1")
    raw = channel.unary_unary(HEARTBEAT)  # (no serializers: bytes as they are)
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, a length past the message's end
    try:
        code, details = _code(raw, garbage)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "well-formed" in details, (code, details)
        for _ in range(200):  # its burst is 50 (10 s of 5 a second)
            code, details = _code(stub.Heartbeat, scheduler_pb2.HeartbeatRequest(host_id="h1"))
            if code is not None:
                break
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--host-heartbeat-rate" in details, (code, details)
        code, details = _code(raw, garbage)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--host-heartbeat-rate" in details, (code, details)
    finally:
        channel.close()


def test_heartbeat_and_lease_ids_are_bounded_before_the_cores_lock(sched: SchedulerServer) -> None:
    """A heartbeat naming `MAX_HOST_SESSIONS` sessions is served; one more or `MAX_DEVICES_PER_HOST` + 1 devices:
    INVALID_ARGUMENT naming the bound, the host still up; a Renew or Release of a lease id one character past
    `MAX_ID_LENGTH`: INVALID_ARGUMENT. On 50464ae all were served (a heartbeat's every lease id
    looked up under the core's lock: ~29,000 in a 1 MiB message), the Renew and Release NOT_FOUND."""
    channel, stub = _host(sched, "h1")
    admin = tls.channel(f"127.0.0.1:{sched.port}", cfg=get_pki().client_config("admin", "ops"))
    admin_stub = scheduler_pb2_grpc.SchedulerStub(admin)

    def beat(sessions: int, length: int = 32, devices: int = 1) -> tuple[grpc.StatusCode | None, str]:
        usage = [device_pb2.SessionUsage(lease_id=f"{i:0{length}x}") for i in range(sessions)]
        used = [device_pb2.DeviceUsage(info=device_pb2.DeviceInfo(index=i)) for i in range(devices)]
        return _code(stub.Heartbeat, scheduler_pb2.HeartbeatRequest(host_id="h1", sessions=usage, devices=used))

    try:
        assert beat(MAX_HOST_SESSIONS) == (None, "")
        code, details = beat(MAX_HOST_SESSIONS + 1)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"at most {MAX_HOST_SESSIONS}" in details, (code, details)
        assert "--max-sessions" in details, details
        assert beat(1, MAX_ID_LENGTH) == (None, "")
        # (a heartbeat's lease id past MAX_ID_LENGTH: revoked, the heartbeat served since schedrev41,
        # test_scheduler_schedrev41.py)
        code, details = beat(0, devices=MAX_DEVICES_PER_HOST + 1)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"at most {MAX_DEVICES_PER_HOST}" in details
        long_id = "a" * (MAX_ID_LENGTH + 1)
        for call, request in (
            (admin_stub.Renew, scheduler_pb2.RenewRequest(lease_id=long_id)),
            (admin_stub.Release, scheduler_pb2.ReleaseRequest(lease_id=long_id)),
        ):
            code, details = _code(call, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and f"at most {MAX_ID_LENGTH}" in details
        code, _ = _code(admin_stub.Renew, scheduler_pb2.RenewRequest(lease_id="a" * 32))
        assert code == grpc.StatusCode.NOT_FOUND, code
        pool = admin_stub.ListPool(scheduler_pb2.ListPoolRequest(), timeout=10)
        assert [(h.host_id, h.state) for h in pool.hosts] == [("h1", "up")]
    finally:
        channel.close()
        admin.close()


def test_a_daemon_holds_no_more_sessions_than_a_heartbeat_may_name() -> None:
    """`gpupool serve --max-sessions` is 1 to `MAX_HOST_SESSIONS` (a daemon with more could never heartbeat them all);
    on 50464ae any number (0, negative) was taken."""
    parser = build_parser()
    assert parser.parse_args(["--max-sessions", str(MAX_HOST_SESSIONS)]).max_sessions == MAX_HOST_SESSIONS
    for bad in (MAX_HOST_SESSIONS + 1, 0):
        with pytest.raises(SystemExit):
            parser.parse_args(["--max-sessions", str(bad)])


def test_a_hosts_listpool_is_limited_at_the_tenants_rate_its_heartbeats_and_tenants_are_not(tmp_path: Path) -> None:
    """With `--tenant-rate 5` (bursts of 50), host h1 calls ListPool 200 times as fast as it can: past its bucket
    RESOURCE_EXHAUSTED naming the flag and the host; meanwhile its heartbeats are served (their own bucket), and so are
    tenant alice's ListPool calls (hers). On 50464ae all 200 were served: a host's calls were never limited but
    Register and Heartbeat, and each ListPool holds the core's lock over the whole pool."""
    sched = _scheduler(tmp_path, 5.0)
    channel, stub = _host(sched, "h1")
    alice = tls.channel(f"127.0.0.1:{sched.port}", cfg=get_pki().client_config("tenant", "alice"))
    try:
        refused = []
        for _ in range(200):
            code, details = _code(stub.ListPool, scheduler_pb2.ListPoolRequest())
            if code is not None:
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
                refused.append(details)
        assert refused and 50 <= 200 - len(refused) < 150, len(refused)
        assert "--tenant-rate" in refused[0] and "h1" in refused[0], refused[0]
        assert _code(stub.Heartbeat, scheduler_pb2.HeartbeatRequest(host_id="h1")) == (None, "")
        tenant = scheduler_pb2_grpc.SchedulerStub(alice)
        assert _code(tenant.ListPool, scheduler_pb2.ListPoolRequest()) == (None, "")
    finally:
        channel.close()
        alice.close()
        sched.stop(grace=0)
