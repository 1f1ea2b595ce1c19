"""A real `gpupool scheduler` process on loopback, daemons simulated by real Register/Heartbeat clients
(the `Registrar` of server/registration.py), clients through `gpupool.client.pool`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from gpupool.client.pool import Lease, SchedulerClient, lease
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scheduler_fixtures import (
    ROOT,
    GiB,
    Proc,
    SimHost,
    key_file,
    pool_state,
    silence_when_down,
    start_scheduler,
    wait_until,
)
from support import scrape, tls_channel

from gpupool import tokens
from gpupool._proto import device_pb2, scheduler_pb2, scheduler_pb2_grpc
from gpupool.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

FAST = ["--host-timeout", "2", "--heartbeat-interval", "0.3"]


@pytest.fixture
def sched(tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    proc, address = start_scheduler(tmp_path, *FAST)
    yield proc, address
    proc.stop()


@pytest.fixture
def hosts(sched: tuple[Proc, str]) -> Iterator[list[SimHost]]:
    started = [SimHost(sched[1], name).start() for name in ("hosta", "hostb")]
    yield started
    for h in started:
        h.stop()


def places(x: Lease) -> list[tuple[str, int]]:
    return [(d.host_id, d.device) for d in x.devices]


def test_binpack_then_wait_in_fifo_order(sched: tuple[Proc, str], hosts: list[SimHost]) -> None:
    address = sched[1]
    a = lease(1, 0.5, scheduler=address)
    b = lease(1, 0.5, scheduler=address)
    c = lease(1, 0.5, scheduler=address)
    assert places(a) == places(b) and places(c) != places(a)
    d = lease(1, 0.5, scheduler=address)
    assert places(d) == places(c)
    with pytest.raises(ResourceExhausted, match=r"1 GPU\(s\) x fraction 0.5.*largest free fraction of any device is 0"):
        lease(1, 0.5, scheduler=address)
    got: list[Lease] = []
    waiter = threading.Thread(target=lambda: got.append(lease(1, 0.5, scheduler=address, wait=20)))
    waiter.start()
    wait_until(lambda: SchedulerClient(address).list_pool().waiting == 1, what="a waiter")
    b.release()
    waiter.join(20)
    assert got and places(got[0]) == places(a)
    for x in (a, c, d, got[0]):
        x.release()
    pool = SchedulerClient(address).list_pool()
    assert not pool.leases and all(dev.allocated_share == 0 for h in pool.hosts for dev in h.devices)


def test_tokens_verify_with_the_shared_key_and_renew_later(
    tmp_path: Path, sched: tuple[Proc, str], hosts: list[SimHost]
) -> None:
    key = tokens.load_signer(key_file(tmp_path))
    with lease(2, memory="2GiB", scheduler=sched[1], tenant="alice", ttl=30) as x:
        assert {d.host_id for d in x.devices} == {"hosta", "hostb"}  # one GPU per host: it must span both
        claims = [tokens.verify(key, d.token) for d in x.devices]
        assert {(c.lease_id, c.quota_bytes, c.share, c.tenant) for c in claims} == {
            (x.lease_id, 2 * GiB, 0.25, "alice")
        }
        seen: list[float] = []
        x.subscribe(lambda lease_: seen.append(lease_.expires_at))
        time.sleep(0.05)
        x.renew()
        assert seen and tokens.verify(key, x.devices[0].token).expires_at > claims[0].expires_at
        env = x.to_env()
        child = Lease.from_env(env)
        assert child is not None and child.devices == x.devices and child.scheduler == sched[1]


def test_unrenewed_lease_expires_and_the_daemon_is_told(sched: tuple[Proc, str], hosts: list[SimHost]) -> None:
    client = SchedulerClient(sched[1])
    pb = client.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=1.0, ttl_seconds=1))  # nobody renews
    host = next(h for h in hosts if h.host_id == pb.devices[0].host_id)
    host.sessions = [device_pb2.SessionUsage(session_id="s1", lease_id=pb.lease_id, device=0)]
    wait_until(lambda: pb.lease_id in host.revoked, timeout=10, what="the revocation")
    with pytest.raises(FailedPrecondition, match="expired"):
        client.renew(pb.lease_id)
    pool = client.list_pool()
    assert all(dev.allocated_share == 0 for h in pool.hosts for dev in h.devices)


def test_lost_host_gives_failed_precondition_and_comes_back(sched: tuple[Proc, str], hosts: list[SimHost]) -> None:
    client = SchedulerClient(sched[1])
    x = lease(1, 1.0, scheduler=sched[1])
    victim = next(h for h in hosts if h.host_id == x.devices[0].host_id)
    victim.stop()
    # down for its silence: at least --host-timeout 2, and well under the default 10 s (the flag was honoured);
    # measured from its last heartbeat, not from the stop (scheduler_fixtures.silence_when_down)
    silent = silence_when_down(sched[1], victim.host_id, timeout=20)
    assert 2 <= silent < 10, f"down after {silent:.1f} s of silence"
    with pytest.raises(FailedPrecondition, match=f"host {victim.host_id} is down"):
        x.renew()
    x.release()
    back = SimHost(sched[1], victim.host_id).start()
    try:
        wait_until(lambda: all(h.state == "up" for h in client.list_pool().hosts), what="host back up")
    finally:
        back.stop()


def test_kill_9_and_restart_keeps_leases_and_accounting(tmp_path: Path) -> None:
    proc, address = start_scheduler(tmp_path, *FAST)
    host = SimHost(address, "hosta", gpus=2).start()
    try:
        leases = [lease(1, f, scheduler=address) for f in (0.5, 0.25, 1.0)]
        before = SchedulerClient(address).list_pool()
        first_id = host.registrar.scheduler_id
        proc.kill()
        proc2 = Proc(proc.args[:2] + ["127.0.0.1:" + address.rsplit(":", 1)[1], *proc.args[3:]])
        try:
            assert proc2.port() == int(address.rsplit(":", 1)[1])
            after = pool_state(address, timeout=20)
            assert [(h.host_id, [(d.allocated_bytes, d.allocated_share) for d in h.devices]) for h in after.hosts] == [
                (h.host_id, [(d.allocated_bytes, d.allocated_share) for d in h.devices]) for h in before.hosts
            ]
            assert {x.lease_id for x in after.leases} == {x.lease_id for x in leases}
            for x in leases:
                x.renew()
            with pytest.raises(ResourceExhausted):  # 0.25 free on one device, nothing handed out twice
                lease(1, 0.5, scheduler=address)
            wait_until(lambda: host.registrar.scheduler_id not in ("", first_id), what="the daemon re-registering")
        finally:
            for x in leases:
                x.release()
            proc2.stop()
    finally:
        host.stop()


def test_bad_input_gets_clear_statuses_and_the_scheduler_keeps_serving(
    sched: tuple[Proc, str], hosts: list[SimHost]
) -> None:
    address = sched[1]
    client = SchedulerClient(address)
    stub = scheduler_pb2_grpc.SchedulerStub(tls_channel(address))
    cases = [
        (dict(gpus=0, fraction=0.5), "gpus"),
        (dict(gpus=1, fraction=0.0), "fraction"),
        (dict(gpus=1, fraction=1.5), "fraction"),
        (dict(gpus=1, fraction=-0.5), "fraction"),
        (dict(gpus=1, memory_bytes=9 * GiB), "larger than any device"),
        (dict(gpus=1), "fraction or a memory"),
        (dict(gpus=1, fraction=0.5, policy="nope"), "policy"),
        (dict(gpus=1, fraction=0.5, wait_seconds=float("nan")), "finite"),
    ]
    for fields, words in cases:
        with pytest.raises(InvalidArgument, match=words):
            client.allocate(scheduler_pb2.AllocateRequest(**fields))  # type: ignore[arg-type]
    for call in (client.renew, client.release):
        with pytest.raises(NotFound, match="unknown lease"):
            call("no-such-lease")
    bad_registers = [
        scheduler_pb2.RegisterRequest(host_id="x", address="127.0.0.1:1"),
        scheduler_pb2.RegisterRequest(
            host_id="x",
            address="127.0.0.1:1",
            devices=[device_pb2.DeviceInfo(index=0, memory_bytes=1), device_pb2.DeviceInfo(index=0, memory_bytes=1)],
        ),
        scheduler_pb2.RegisterRequest(host_id="x", address="127.0.0.1:1", devices=[device_pb2.DeviceInfo(index=0)]),
        scheduler_pb2.RegisterRequest(
            host_id="", address="127.0.0.1:1", devices=[device_pb2.DeviceInfo(memory_bytes=1)]
        ),
        scheduler_pb2.RegisterRequest(host_id="x", address="no port", devices=[device_pb2.DeviceInfo(memory_bytes=1)]),
    ]
    for req in bad_registers:
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(req, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Allocate(b"\xff\xff\xff", timeout=5)  # type: ignore[arg-type]
    # still serving, and nothing changed
    pool = client.list_pool()
    assert sorted(h.host_id for h in pool.hosts) == ["hosta", "hostb"] and not pool.leases
    with lease(1, 0.5, scheduler=address):
        pass


def test_health_and_metrics(sched: tuple[Proc, str], hosts: list[SimHost]) -> None:
    proc, address = sched
    health = health_pb2_grpc.HealthStub(tls_channel(address))
    reply = health.Check(health_pb2.HealthCheckRequest(service="gpupool.v1.Scheduler"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with lease(1, 0.5, scheduler=address):
        with pytest.raises(InvalidArgument):
            lease(0, 0.5, scheduler=address)
        with pytest.raises(ResourceExhausted):
            lease(3, 1.0, scheduler=address)
        text = scrape(proc.metrics_port(), timeout=5)

    def value(name: str) -> float:
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert m, f"{name} missing"
        return float(m.group(1))

    assert value('gpupool_pool_hosts{state="up"}') == 2
    assert value('gpupool_pool_devices{state="up"}') == 2
    assert value('gpupool_leases{state="active"}') == 1
    assert value('gpupool_lease_events_total{event="granted"}') == 1
    assert value('gpupool_allocations_total{result="exhausted"}') == 1
    assert value("gpupool_allocation_requests_waiting") == 0
    share_re = r'^gpupool_pool_share_allocated\{UUID="GPU-\w+-0",device="0",host="(\w+)",model="fake"\} (\S+)$'
    shares = re.findall(share_re, text, re.M)
    assert sorted(float(v) for _, v in shares) == [0.0, 0.5]
    assert "gpupool_allocation_duration_seconds_bucket" in text
    assert "gpupool_pool_memory_capacity_bytes" in text and "gpupool_pool_memory_allocated_bytes" in text


def test_host_marked_down_registers_again_when_told(sched: tuple[Proc, str]) -> None:
    """A daemon whose heartbeats come slower than the host timeout is marked down, told to re-register, and does."""
    client = SchedulerClient(sched[1])
    slow = SimHost(sched[1], "slow", interval=3.0).start()
    try:
        wait_until(lambda: client.list_pool().hosts[0].state == "down", timeout=10, what="the slow host down")
        # up at the scheduler, and registered at the host: the scheduler lists it up as it answers the Register call,
        # the host's registrar knows once the answer is back (one check after the other raced on a loaded box)
        wait_until(
            lambda: client.list_pool().hosts[0].state == "up" and slow.registrar.registered.is_set(),
            timeout=20,
            what="it to register again",
        )
    finally:
        slow.stop()


def test_run_forwards_sigterm_returns_the_child_code_and_releases(
    sched: tuple[Proc, str], hosts: list[SimHost]
) -> None:
    child = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('child got TERM', flush=True), sys.exit(5)))\n"
        "print('child ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    run = Proc(["run", "-n", "2", "-p", "0.25", "--scheduler", sched[1], "--", sys.executable, "-c", child])
    try:
        run.wait_for("child ready")
        assert len(SchedulerClient(sched[1]).list_pool().leases) == 1
        run.popen.send_signal(signal.SIGTERM)
        assert run.popen.wait(20) == 5
        run.wait_for("child got TERM")
        assert not SchedulerClient(sched[1]).list_pool().leases
    finally:
        run.stop()


def test_run_passes_a_terminals_ctrl_c_to_the_command_once(sched: tuple[Proc, str], hosts: list[SimHost]) -> None:
    """Ctrl-C at a terminal sends SIGINT to its foreground process group: `gpupool run` and its command alike. `run`
    forwarded its own as well, so the command got two (journey40: a training script's second KeyboardInterrupt broke
    into its atexit handlers, the client's Detach). Here `run` owns a pseudo-terminal and ^C is typed into it."""
    child = (
        "import signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGINT, lambda *_: got.append(1))\n"
        "print('child ready', flush=True)\n"
        "while not got: time.sleep(0.05)\n"
        "time.sleep(2)\n"  # a forwarded second one arrives well within this
        "print(f'child got {len(got)} SIGINT', flush=True)\n"
        "sys.exit(3)\n"
    )
    # the terminal's session leader takes the pty as its controlling terminal, then becomes `gpupool run`
    take_tty = (
        "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "os.execv(sys.executable, [sys.executable, '-m', 'gpupool.cli', *sys.argv[1:]])"
    )
    master, slave = os.openpty()
    run = subprocess.Popen(
        [sys.executable, "-c", take_tty, "run", "-n", "1", "-p", "0.25", "--scheduler", sched[1], "--",
         sys.executable, "-c", child],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    os.close(slave)
    out = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every end of the terminal closed
                return
            if not chunk:
                return
            out.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: b"child ready" in out, timeout=60, what="the command to start")
        os.write(master, b"\x03")
        assert run.wait(30) == 3, out.decode(errors="replace")
        reader.join(10)
        assert "child got 1 SIGINT" in out.decode(errors="replace"), out.decode(errors="replace")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        os.close(master)


def test_lease_from_env_rejects_malformed_json() -> None:
    assert Lease.from_env({}) is None
    for bad in ("{", "[]", '{"lease_id": "x"}', '{"lease_id": "x", "devices": [{"host_id": 1}], "expires_at": 1}'):
        with pytest.raises(InvalidArgument, match="GPUPOOL_LEASE"):
            Lease.from_env({"GPUPOOL_LEASE": bad})


def test_scheduler_policy_applies_when_the_client_names_none(tmp_path: Path) -> None:
    """`gpupool scheduler --policy spread` spreads leases of library and `gpupool run` users who chose no policy."""
    proc, address = start_scheduler(tmp_path, *FAST, "--policy", "spread")
    host = SimHost(address, "hosta", gpus=2).start()
    child = "import json, os; print('LEASE', json.loads(os.environ['GPUPOOL_LEASE'])['devices'][0]['device'])"
    try:
        held = lease(1, 0.25, scheduler=address)
        run = Proc(["run", "-n", "1", "-p", "0.25", "--scheduler", address, "--", sys.executable, "-c", child])
        try:
            ran = int(run.wait_for(r"LEASE (\d+)").group(1))
        finally:
            run.stop()
        assert places(held) == [("hosta", 1 - ran)], "spread put both quarter leases on one device"
        held.release()
    finally:
        host.stop()
        proc.stop()


def test_list_pool_pages_stay_bounded_however_large_the_pool(sched: tuple[Proc, str]) -> None:
    """1200 hosts with 4 KB of labels each: one reply would pass gRPC's 4 MiB limit; pages do not."""
    stub = scheduler_pb2_grpc.SchedulerStub(tls_channel(sched[1]))
    labels = {f"label-{i:02d}": "x" * 56 for i in range(60)}
    with pytest.raises(grpc.RpcError) as err:  # labels beyond the bounds are refused at Register
        stub.Register(scheduler_pb2.RegisterRequest(
            host_id="big", address="127.0.0.1:1", labels={"k": "v" * 100_000},
            devices=[device_pb2.DeviceInfo(index=0, uuid="u", model="m", memory_bytes=GiB)],
        ), timeout=10)  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "label" in (err.value.details() or "")
    for i in range(1200):
        stub.Register(scheduler_pb2.RegisterRequest(
            host_id=f"h{i:04d}", address=f"127.0.0.1:{1000 + i}", labels=labels,
            devices=[device_pb2.DeviceInfo(index=0, uuid=f"u{i}", model="m", memory_bytes=GiB)],
        ), timeout=10)  # fmt: skip
    first = stub.ListPool(scheduler_pb2.ListPoolRequest(), timeout=10)
    assert first.next_page_token and 0 < first.ByteSize() <= 1.1 * 2**20
    small = stub.ListPool(scheduler_pb2.ListPoolRequest(page_size=7, page_token=first.next_page_token), timeout=10)
    assert len(small.hosts) == 7 and small.hosts[0].host_id > first.hosts[-1].host_id
    with pytest.raises(grpc.RpcError) as err:
        stub.ListPool(scheduler_pb2.ListPoolRequest(page_token="nonsense"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    state = SchedulerClient(sched[1]).list_pool()  # the client joins the pages
    assert [h.host_id for h in state.hosts] == [f"h{i:04d}" for i in range(1200)]


def test_operators_drain_and_remove_a_host_with_gpupool_host(sched: tuple[Proc, str], hosts: list[SimHost]) -> None:
    address = sched[1]

    def host_cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpupool.cli", "host", *args, "--scheduler", address],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert host_cmd("drain", "hosta").returncode == 0
    wait_until(lambda: {h.host_id: h.state for h in SchedulerClient(address).list_pool().hosts}["hosta"] == "draining")
    small = [lease(1, 0.2, scheduler=address) for _ in range(3)]
    assert {places(y)[0][0] for y in small} == {"hostb"}
    assert host_cmd("undrain", "hosta").returncode == 0
    x = lease(1, 1.0, scheduler=address)
    assert places(x)[0][0] == "hosta"
    refused = host_cmd("remove", "hosta")
    assert refused.returncode == 1 and "holds 1 active lease" in refused.stderr
    hosts[0].stop()  # gone for good: its daemon stops heartbeating
    removed = host_cmd("remove", "hosta", "--force")
    assert removed.returncode == 0 and "1 lease(s) lost" in removed.stdout
    assert [h.host_id for h in SchedulerClient(address).list_pool().hosts] == ["hostb"]
    unknown = host_cmd("drain", "nosuch")
    assert unknown.returncode == 1 and "unknown host 'nosuch'" in unknown.stderr
    for y in (*small, x):  # now, not at the interpreter's exit against a scheduler long stopped
        y.release()
