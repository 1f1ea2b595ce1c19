"""Red team, round 37 (rev37): the scheduler as the pool's credential authority, tried through real schedulers on
loopback (the test PKI, mutual TLS). docs/security.md "Red team, round 37" lists what was tried and what held.

Found and fixed here (fails on a490c2a):
- calls that send their headers and never their request message held the scheduler's worker threads for as long as
  their connection lived (gRPC Python waits for a unary call's message in a worker, before any interceptor of ours
  runs): 150 of them from one client - a health Check needs no credential - left every tenant's Allocate and every
  host's heartbeat refused (RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded") or waiting; and health Watch calls
  (open streams, counted among the scheduler's 128 calls in progress) did the same (gpupool/callguard.py,
  gpupool/tls.py `add_health`); a daemon's port likewise: 248 such calls or Watches refused every Attach of the
  host (server/service.py `create_server`);
- connections that never began their TLS handshake were kept 120 s each (gRPC's default), a descriptor each: 1,100 of
  them, from anyone, left a `gpupool scheduler` under systemd's soft limit of 1,024 descriptors refusing every new
  connection (gpupool/tls.py `HANDSHAKE_OPTION`, config.py `more_open_files`; the unit's LimitNOFILE); a daemon alike.
"""

from __future__ import annotations

import dataclasses
import re
import resource
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from gpupool.client.pool import SchedulerClient
from gpupool.client.session import Session
from gpupool.scheduler.auth import credential_line
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from grpc_health.v1 import health_pb2
from scheduler_fixtures import Proc, SimHost, key_file, start_scheduler, wait_until
from support import (
    DaemonFactory,
    get_pki,
    listening_sockets,
    mint_token,
    process_tree,
    scrape,
    start_serve_process,
    stop_process,
)
from test_up import start_up

from gpupool import tls, tokens
from gpupool._proto import scheduler_pb2, scheduler_pb2_grpc
from gpupool.config import write_secret
from gpupool.errors import PermissionDenied, ResourceExhausted, Unauthenticated


def _scheduler(**kw: object) -> SchedulerServer:
    """A scheduler on localhost (127.0.0.1 and ::1: two source addresses on one box), mutual TLS."""
    config = SchedulerConfig(
        listen="localhost:0", state=":memory:", metrics_listen="0",
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"), **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    return SchedulerServer(config, tokens.Signer.from_seed(b"rev37")).start()


def _never(stop: threading.Event) -> Iterator[bytes]:
    """A request stream that sends no message: the call's headers arrive, its one request never does."""
    stop.wait()
    yield from ()


def _raw(channel: grpc.Channel, method: str) -> grpc.StreamUnaryMultiCallable:
    return channel.stream_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def _watch(channel: grpc.Channel) -> Iterator[health_pb2.HealthCheckResponse]:
    """A health Watch (an open stream)."""
    return channel.unary_stream(  # type: ignore[return-value]
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )(health_pb2.HealthCheckRequest())


def _assert_not_watched(watches: list[Iterator[health_pb2.HealthCheckResponse]], channel: grpc.Channel) -> None:
    """Each Watch refused at once (UNIMPLEMENTED; RESOURCE_EXHAUSTED in the instant of a flood), a new one too."""
    for w in watches:
        with pytest.raises(grpc.RpcError) as err:
            next(w)
        assert err.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED)
    with pytest.raises(grpc.RpcError) as err:
        next(_watch(channel))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_calls_whose_request_never_comes_do_not_hold_the_scheduler() -> None:
    """mallory (a tenant's certificate, from 127.0.0.1) opens 180 calls - Allocate, ListPool, health Check and
    Watch, which need no credential at all - sending no request, and 130 health Watches; alice and a host (from
    ::1) go on allocating and heartbeating."""
    server = _scheduler(host_timeout=3.0, heartbeat_interval=0.3)
    port = server.port
    host = SimHost(f"[::1]:{port}", "h1").start()
    alice = SchedulerClient(f"[::1]:{port}", get_pki().client_config("tenant", "alice"))
    stop = threading.Event()
    mallory = get_pki().client_config("tenant", "mallory")
    channels = [tls.channel(f"127.0.0.1:{port}", (("grpc.use_local_subchannel_pool", 1),), mallory) for _ in range(5)]
    held: list[Any] = []  # the calls (grpc.Future)
    try:
        methods = ("/gpupool.v1.Scheduler/Allocate", "/gpupool.v1.Scheduler/ListPool", "/grpc.health.v1.Health/Check")
        for n, ch in enumerate(channels[:3]):
            for _ in range(50):
                held.append(_raw(ch, methods[n]).future(_never(stop)))
        half_watch = channels[0].stream_stream("/grpc.health.v1.Health/Watch", lambda b: b, lambda b: b)
        held += [half_watch(_never(stop)) for _ in range(30)]  # (a Watch's request is awaited as a unary call's)
        watches = [_watch(ch) for ch in channels[3:] for _ in range(65)]
        # the guard cancels all but 8 (a490c2a: none), then RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!" or
        # the deadline for alice
        wait_until(lambda: sum(f.done() for f in held) >= len(held) - 8, timeout=60)
        lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5, ttl_seconds=60))
        alice.renew(lease.lease_id)
        time.sleep(4.0)  # past --host-timeout: the host's heartbeats were served all along
        (h1,) = [h for h in alice.list_pool().hosts if h.host_id == "h1"]
        assert h1.state == "up"
        alice.release(lease.lease_id)
        # Past their source's 8 slow calls, each call of mallory's turning slow cancelled the oldest (or gRPC refused
        # it, past 128 calls in progress, in the instant before); the Watches are not served.
        # (at most 8 still waiting: under load the sequence above can pass the guard's 10 s wait, which ends those
        # 8 too)
        ended = [f.exception() for f in held if f.done()]
        assert len(ended) >= len(held) - 8
        codes = {e.code() for e in ended if isinstance(e, grpc.RpcError)}
        assert codes <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED} and len(codes) > 0
        _assert_not_watched(watches, channels[3])
    finally:
        stop.set()
        for ch in channels:
            ch.close()
        alice.close()
        host.stop()
        server.stop(grace=0)


def test_bursts_of_honest_calls_from_one_source_are_never_cancelled() -> None:
    """The guard counts a call once it has waited 0.25 s for its message: an honest call's message comes with its
    headers, and the server's own hand-off of it takes milliseconds, also in bursts. The guard's first version
    counted every call from its worker's start, and cancelled 76 of 1,280 ListPool calls sent 64 at a time from one
    process (a job's ranks on one node attaching at once would have met the same)."""
    server = _scheduler()
    channels = [tls.channel(server.address, (("grpc.use_local_subchannel_pool", 1),)) for _ in range(4)]
    try:
        stubs = [scheduler_pb2_grpc.SchedulerStub(ch) for ch in channels]
        for _ in range(5):
            calls = [stubs[i % 4].ListPool.future(scheduler_pb2.ListPoolRequest(), timeout=60) for i in range(64)]
            for call in calls:
                call.result()  # raises on CANCELLED
    finally:
        for ch in channels:
            ch.close()
        server.stop(grace=0)


def test_calls_whose_request_never_comes_do_not_starve_the_plaintext_health_port() -> None:
    """`--health-listen` (plaintext, no credential): a490c2a's two threads were both held by two such calls, and
    the probes waited past their deadlines (as with Watch before round 33). Now the port's calls of one source
    wait past 0.25 s at most 2 at once (a newer one cancels the oldest), each at most 5 s."""
    server = _scheduler(health_listen="localhost:0")
    assert server._health_server is not None
    port = server._health_server[1]
    stop = threading.Event()
    attacker = grpc.insecure_channel(f"127.0.0.1:{port}")
    probe = grpc.insecure_channel(f"[::1]:{port}")
    try:
        held = [_raw(attacker, "/grpc.health.v1.Health/Check").future(_never(stop)) for _ in range(10)]
        time.sleep(0.5)
        check = probe.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        for _ in range(3):  # a490c2a: DEADLINE_EXCEEDED
            assert check(health_pb2.HealthCheckRequest(), timeout=3).status == health_pb2.HealthCheckResponse.SERVING
        wait_until(lambda: sum(f.done() for f in held) == 8)  # cancelled as they turned slow, past their source's 2
        wait_until(lambda: all(f.done() for f in held), timeout=tls.HEALTH_REQUEST_SECONDS + 10, what="the bound")
        assert {f.exception().code() for f in held} == {grpc.StatusCode.CANCELLED}  # type: ignore[union-attr]
    finally:
        stop.set()
        attacker.close()
        probe.close()
        server.stop(grace=0)


def test_calls_whose_request_never_comes_do_not_hold_a_daemon(daemon_factory: DaemonFactory) -> None:
    """A daemon's port (TLS, no client certificate asked): 260 calls (Attach, Status, health Check) that send no
    request, and 250 health Watches, from one client; a tenant's session attaches and computes meanwhile."""
    handle = daemon_factory()
    stop = threading.Event()
    anyone = tls.TlsConfig(ca=get_pki().ca_file)
    channels = [tls.channel(handle.address, (("grpc.use_local_subchannel_pool", 1),), anyone) for _ in range(6)]
    try:
        methods = ("/gpupool.v1.Device/Attach", "/gpupool.v1.Device/Status", "/grpc.health.v1.Health/Check")
        held = [_raw(ch, methods[n]).future(_never(stop)) for n, ch in enumerate(channels[:3]) for _ in range(87)]
        watches = [_watch(ch) for ch in channels[3:] for _ in range(84)]
        time.sleep(1.0)
        with Session.attach(handle.address, mint_token(handle.key, host=handle.host_id)) as s:  # a490c2a: refused
            assert torch.equal(s.download(s.upload(torch.arange(6.0))), torch.arange(6.0))
        # Each call turning slow cancelled its source's oldest slow one (or gRPC refused it, past 248 in progress).
        wait_until(lambda: sum(f.done() for f in held) >= len(held) - 8)
        _assert_not_watched(watches, channels[3])
    finally:
        stop.set()
        for ch in channels:
            ch.close()


@pytest.mark.parametrize("program", ["scheduler", "daemon"])
def test_connections_that_never_shake_hands_do_not_take_the_descriptors(
    program: str, tmp_path: Path, token_key_file: Path, token_key: bytes
) -> None:
    """A `gpupool scheduler` or `gpupool serve` started as systemd starts it (soft limit 1,024 descriptors, a higher
    hard one): 1,100 TCP connections that send nothing; a tenant's new connection is served (a490c2a: the deadline,
    every descriptor taken for gRPC's 120 s handshake timeout), and an idle connection is closed after
    tls.HANDSHAKE_SECONDS."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard limit of open files here is {hard}: no room past 1,024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the child inherits systemd's soft limit
    try:
        stop: Callable[[], object]
        if program == "scheduler":
            (tmp_path / "s").mkdir()
            proc, address = start_scheduler(tmp_path / "s")  # (its own key file, not the daemon's)
            stop = proc.stop
        else:
            serve, address = start_serve_process(token_key_file, "--fake-gpus", "1", "--isolation", "thread")
            stop = lambda: stop_process(serve)  # noqa: E731
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    host, port = address.rsplit(":", 1)
    idle = []
    try:
        idle = [socket.create_connection((host, int(port))) for _ in range(1100)]
        if program == "scheduler":
            client = SchedulerClient(address)
            try:
                assert client.list_pool().waiting == 0
            finally:
                client.close()
        else:
            with Session.attach(address, mint_token(token_key)) as s:
                assert torch.equal(s.download(s.upload(torch.arange(3.0))), torch.arange(3.0))
        idle[0].settimeout(tls.HANDSHAKE_SECONDS + 30)
        assert idle[0].recv(1) == b""  # closed by the server
    finally:
        for sock in idle:
            sock.close()
        stop()


def _race(clients: list[SchedulerClient], request: scheduler_pb2.AllocateRequest) -> list[scheduler_pb2.Lease]:
    """Each client's Allocate at once (a barrier); the leases granted."""
    start = threading.Barrier(len(clients))
    granted: list[scheduler_pb2.Lease] = []
    refused: list[str] = []

    def one(client: SchedulerClient) -> None:
        start.wait()
        try:
            granted.append(client.allocate(request))
        except ResourceExhausted as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) + len(refused) == len(clients)
    return granted


def test_racing_requests_for_the_last_fraction_and_the_last_share_of_a_tenants_limit() -> None:
    """Pinned (holds on a490c2a: one decision at a time under the core's lock, written before it is applied). Eight
    tenants racing for a device's last half get one lease between them; one tenant's eight racing requests of 0.3
    under `--tenant-max-share 1` get three; the books (ListPool's allocated shares) add up."""
    server = _scheduler(tenant_max_share=1.0)
    one = SimHost(server.address, "one").start()
    four = SimHost(server.address, "four", gpus=4)
    pki = get_pki()
    owner = SchedulerClient(server.address, pki.client_config("tenant", "owner"))
    racers = [SchedulerClient(server.address, pki.client_config("tenant", f"racer{n}")) for n in range(8)]
    greedy = [SchedulerClient(server.address, pki.client_config("tenant", "greedy")) for _ in range(8)]
    try:
        half = scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5, ttl_seconds=120)
        owner.allocate(half)
        assert len(_race(racers, half)) == 1
        four.start()
        grabbed = _race(greedy, scheduler_pb2.AllocateRequest(gpus=1, fraction=0.3, ttl_seconds=120))
        assert len(grabbed) == 3  # 0.9 of the tenant's 1.0; a fourth would make 1.2
        shares = {h.host_id: sum(d.allocated_share for d in h.devices) for h in owner.list_pool().hosts}
        assert shares == {"one": pytest.approx(1.0), "four": pytest.approx(0.9)}
    finally:
        for c in [owner, *racers, *greedy]:
            c.close()
        one.stop()
        four.stop()
        server.stop(grace=0)


def test_the_schedulers_log_and_metrics_hold_no_secret(tmp_path: Path) -> None:
    """Pinned (holds on a490c2a; round 35 looked by hand): a `gpupool scheduler` (API tokens, debug logging) after
    a host's join, allocations, renewals, releases, another tenant's Renew and Release, and unknown API tokens: its
    whole log and its metrics page hold no API token (good or bad), no lease token, no token's claims or signature."""
    tokens_of = {"alice": "a" * 43, "mallory": "m" * 43, "h1": "h" * 43, "guess": "g" * 43}
    creds = tmp_path / "credentials"
    creds.write_text(
        credential_line("tenant", "alice", tokens_of["alice"])
        + credential_line("tenant", "mallory", tokens_of["mallory"])
        + credential_line("host", "h1", tokens_of["h1"])
    )
    config: dict[str, tls.TlsConfig] = {}
    for name, token in tokens_of.items():
        write_secret(tmp_path / f"{name}.token", (token + "\n").encode())
        config[name] = tls.TlsConfig(ca=get_pki().ca_file, api_token_file=str(tmp_path / f"{name}.token"))
    proc = Proc(
        ["scheduler", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--state", str(tmp_path / "s.db"),
         "--token-key-file", str(key_file(tmp_path)), "--credentials", str(creds), "--tls-client-auth", "none"],
        env={"GPUPOOL_LOG_LEVEL": "DEBUG"},
    )  # fmt: skip
    address = f"127.0.0.1:{proc.port()}"
    host = SimHost(address, "h1", gpus=2)
    host.registrar.tls_config = config["h1"]  # the host joins by its join token
    host.registrar._connect()
    alice, mallory, guess = (SchedulerClient(address, config[n]) for n in ("alice", "mallory", "guess"))
    try:
        host.start()
        seen = list(tokens_of.values())
        for fraction in (0.5, 1.0):
            lease = alice.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=fraction, ttl_seconds=60))
            renewed = alice.renew(lease.lease_id)
            seen += [part for pb in (lease, renewed) for d in pb.devices for part in (d.token, *d.token.split(".")[1:])]
            for call in (mallory.renew, mallory.release):
                with pytest.raises(PermissionDenied):
                    call(lease.lease_id)
            alice.release(lease.lease_id)
        for _ in range(3):
            with pytest.raises(Unauthenticated):
                guess.list_pool()
        page = scrape(proc.metrics_port())
        log = "\n".join(proc.lines)
        assert "host h1 registered" in log and "gpupool_" in page  # both were there to read
        for secret in seen:
            assert secret not in log and secret not in page
    finally:
        for c in (alice, mallory, guess):
            c.close()
        host.stop()
        proc.stop()


def test_every_socket_gpupool_up_listens_on_is_tls(tmp_path: Path) -> None:
    """The scheduler's and the daemon's gRPC ports, the daemon's side port and (since round 40) the two metrics
    pages, whatever the processes of `gpupool up` (the zygote and workers too) listen on, shake hands in TLS with a
    certificate of the pool's CA; all on loopback. The gRPC and side ports: pinned (held on a490c2a); the metrics
    pages answered a plaintext GET until round 40 (the page of every tenant to any local user)."""
    proc, _ = start_up(tmp_path)
    try:
        proc.wait_for(r"export GPUPOOL_TLS_KEY=", timeout=120)
        env = dict(re.findall(r"^\s+export (GPUPOOL_\w+)=(\S+)$", "\n".join(proc.lines), re.M))
        metrics = {int(m) for m in re.findall(r"metrics on https://127\.0\.0\.1:(\d+)", "\n".join(proc.lines))}
        assert len(metrics) == 2, proc.log()
        sockets = listening_sockets(process_tree(proc.popen.pid))
        assert len(sockets) == 5, sockets  # two gRPC ports, the side port, two metrics pages
        context = ssl.create_default_context(cafile=env["GPUPOOL_TLS_CA"])
        context.load_cert_chain(env["GPUPOOL_TLS_CERT"], env["GPUPOOL_TLS_KEY"])
        context.check_hostname = False
        for address, port in sorted(sockets):
            assert address == "127.0.0.1", (address, port)
            if port in metrics:  # a plaintext GET gets no page
                with socket.create_connection((address, port), timeout=10) as raw:
                    raw.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    try:
                        assert not raw.recv(12).startswith(b"HTTP/1."), port
                    except ConnectionResetError:
                        pass
            with socket.create_connection((address, port), timeout=10) as raw:
                with context.wrap_socket(raw) as tls_sock:  # the certificate verified against the pool's CA
                    assert tls_sock.getpeercert(), port
        # The metrics pages: to the Prometheus certificate `up` printed; the user's (a tenant's) is refused (403)
        curl = re.search(r"curl --cacert (\S+) --cert (\S+) --key (\S+) https://", "\n".join(proc.lines))
        assert curl, proc.log()
        scraper = ssl.create_default_context(cafile=curl.group(1))
        scraper.load_cert_chain(curl.group(2), curl.group(3))
        for port in metrics:
            url = f"https://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=10, context=scraper) as resp:
                assert b"gpupool_" in resp.read()
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=10, context=context)
            assert refused.value.code == 403
    finally:
        proc.stop()
