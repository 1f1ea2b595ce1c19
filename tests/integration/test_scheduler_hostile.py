"""A tenant against the scheduler as the pool's credential and capacity authority (round 31's review): a real
`gpupool scheduler` on loopback, daemons simulated by real Register/Heartbeat clients (`SimHost`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from gpupool.client.pool import Lease, SchedulerClient, lease
from gpupool.client.session import Session
from gpupool.scheduler.auth import credential_line
from gpupool.scheduler.cli import SchedulerConfig, SchedulerServer
from scheduler_fixtures import GiB, Proc, SimHost, start_scheduler, wait_until
from support import DaemonFactory, get_pki, mint_token, register_host, tls_channel

from gpupool import pki, tls, tokens
from gpupool._proto import scheduler_pb2, scheduler_pb2_grpc
from gpupool.config import write_secret
from gpupool.errors import GpupoolError, InvalidArgument, ResourceExhausted, Unauthenticated

FAST = ["--host-timeout", "5", "--heartbeat-interval", "0.3"]


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    proc, address = start_scheduler(tmp_path, *FAST, "--tenant-max-share", "1", "--tenant-max-waiting", "8")
    yield proc, address
    proc.stop()


def held_share(address: str, tenant: str) -> float:
    """The GPUs' worth of shares the tenant's active leases hold, as ListPool shows them."""
    pool = SchedulerClient(address).list_pool()
    return sum(d.share for x in pool.leases if x.tenant == tenant for d in x.devices)


def test_waiting_memory_requests_cannot_pass_the_tenant_share_limit(limited: tuple[Proc, str]) -> None:
    """A waiting request is counted against `--tenant-max-share` by an estimate (its memory over the largest device
    of the pool: a lower bound), and round 30 granted it when room came without counting again: with one 64 GiB
    device in the pool, four waiting requests for 16 GiB were estimated at 0.25 GPU each, passed a limit of 1, and
    got four whole 16 GiB devices - four times the tenant's limit. A grant now counts what it really takes."""
    address = limited[1]
    big, small_host = SimHost(address, "big", memory=64 * GiB), SimHost(address, "small", gpus=4, memory=16 * GiB)
    hosts = [big.start(), small_host.start()]
    fillers = [lease(1, 1.0, scheduler=address, tenant=f"filler{i}") for i in range(5)]  # every device full
    results: list[Lease | GpupoolError] = []
    lock = threading.Lock()

    def ask() -> None:
        try:
            got: Lease | GpupoolError = lease(1, memory=16 * GiB, scheduler=address, tenant="mallory", wait=60)
        except GpupoolError as exc:
            got = exc
        with lock:
            results.append(got)

    waiters = [threading.Thread(target=ask) for _ in range(4)]
    for t in waiters:
        t.start()
    wait_until(lambda: SchedulerClient(address).list_pool().waiting == 4, what="mallory's four requests waiting")
    small = [x for x in fillers if x.devices[0].host_id == "small"]
    assert len(small) == 4
    for x in small:
        x.release()
    for t in waiters:
        t.join(60)
    granted = [x for x in results if isinstance(x, Lease)]
    refused = [x for x in results if not isinstance(x, Lease)]
    later: list[Lease] = []
    try:
        assert held_share(address, "mallory") <= 1.0
        assert len(results) == 4 and len(granted) == 1, results
        assert all(isinstance(x, ResourceExhausted) and "limit of 1" in x.message for x in refused), refused
        # the refused requests took nothing: the devices they would have had are free for others
        later += [lease(1, 1.0, scheduler=address, tenant=f"later{i}") for i in range(3)]
    finally:
        for x in [*granted, *fillers, *later]:
            x.release()
        for h in hosts:
            h.stop()


def _client_cert(tmp: Path, uri: str, *more: str) -> tls.TlsConfig:
    """A client certificate of the tests' CA naming `uri` (and `more` URIs), as any CA may issue one (cert-manager's
    `uris:`; the pool's own LocalCA puts the name in the common name too, which X.509 bounds to 64 characters)."""
    ca = get_pki().ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "long")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in (uri, *more)]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    stem = tmp / f"client-{len(list(tmp.glob('client-*.crt')))}"
    stem.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.write_private(stem.with_suffix(".key"), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))  # fmt: skip
    return tls.TlsConfig(cert=str(stem.with_suffix(".crt")), key=str(stem.with_suffix(".key")), ca=get_pki().ca_file)


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[str]:
    """An in-process scheduler that requires client certificates, with one host (registered by an operator)."""
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=":memory:", metrics_listen="0", heartbeat_interval=0.3,
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"),
    )  # fmt: skip
    server = SchedulerServer(config, tokens.Signer.from_seed(b"sec31")).start()
    host = SimHost(server.address, "h").start()
    yield server.address
    host.stop()
    server.stop(grace=0.5)


def test_two_tenants_whose_names_share_128_characters_are_not_one_tenant(mtls: str, tmp_path: Path) -> None:
    """Round 30 cut every identity's name to 128 characters (`name[:MAX_NAME]`), so the holder of a certificate for
    `<128 t>b` was the tenant `<128 t>`: it released (renewed, listed the tokens' lease ids of) that tenant's
    leases. A name longer than the bound is now refused, never shortened into another's."""
    base = "t" * 128
    owner = SchedulerClient(mtls, _client_cert(tmp_path, f"gpupool://tenant/{base}"))
    other = SchedulerClient(mtls, _client_cert(tmp_path, f"gpupool://tenant/{base}b"))
    got = owner.allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.5))
    assert got.tenant == base
    with pytest.raises(Unauthenticated, match="longer than 128"):
        other.release(got.lease_id)
    with pytest.raises(Unauthenticated, match="longer than 128"):
        other.list_pool()
    assert [x.lease_id for x in owner.list_pool().leases] == [got.lease_id]  # still held, by its tenant only
    owner.release(got.lease_id)
    owner.close()
    other.close()


def test_a_tenant_cannot_hold_leases_without_bound(tmp_path: Path) -> None:
    """A share limit does not bound how many leases a tenant holds: a lease may be one share unit (a millionth of a
    GPU), so under `--tenant-max-share 1` one tenant could hold a million, each costing the scheduler memory (50,000
    held 90 MB of a scheduler on the memory store here), a row of its state, and time under its lock at every
    ListPool page (the page sorts every active lease: 0.56 s at 200,000, while heartbeats and allocations wait).
    `--tenant-max-leases` (1000) bounds them."""
    proc, address = start_scheduler(tmp_path, *FAST, "--tenant-max-leases", "3")
    host = SimHost(address, "h").start()
    held: list[Lease] = []
    try:
        held += [lease(1, 1e-6, scheduler=address, tenant="mallory") for _ in range(3)]
        with pytest.raises(ResourceExhausted, match=r"holds 3 lease\(s\).*at most 3 \(--tenant-max-leases\)"):
            lease(1, 1e-6, scheduler=address, tenant="mallory", wait=5)
        held.append(lease(1, 1e-6, scheduler=address, tenant="alice"))  # others are not held back
        held.pop(0).release()
        held.append(lease(1, 1e-6, scheduler=address, tenant="mallory"))  # a released lease is counted no more
        assert len([x for x in SchedulerClient(address).list_pool().leases if x.tenant == "mallory"]) == 3
    finally:
        for x in held:
            x.release()
        host.stop()
        proc.stop()


def test_a_public_keys_file_others_can_write_is_not_trusted(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """A daemon admits sessions by the public keys in its `--token-public-keys` file, re-read every second. Round 30
    read it whatever its mode: left writable by every local user (0666, a folder under umask 0), any of them added a
    key of their own and minted tokens for every lease of the host. A file others may write is now refused: at
    start, and on a change (the keys read before are kept)."""
    public = tmp_path / "token.pub"
    signer = tokens.generate_key_file(tmp_path / "token.key", public)
    verifier = tokens.load_verifier(public)
    handle = daemon_factory(token_key=verifier)
    mallory = tokens.Signer.from_seed(b"mallory")
    os.chmod(public, 0o666)
    public.write_bytes(public.read_bytes() + tokens.public_pem(mallory.public))
    time.sleep(1.1)  # the file is looked at once a second
    with pytest.raises(Unauthenticated, match="unknown key"):
        Session.attach(handle.address, mint_token(mallory, host=handle.host_id))
    with Session.attach(handle.address, mint_token(signer, host=handle.host_id)) as s:  # the keys read before
        s.sync()
    with pytest.raises(InvalidArgument, match="writable by other users"):
        tokens.load_verifier(public)  # a daemon does not start on it


def test_a_credentials_file_others_can_write_is_not_trusted(tmp_path: Path) -> None:
    """The scheduler's credentials file makes API tokens tenants, hosts and operators: writable by other users, any
    of them added an admin line of their own. Refused at start, and once it becomes so (the table read before is
    kept)."""
    creds = tmp_path / "credentials"
    creds.write_text(credential_line("tenant", "tina", "t0k"))
    os.chmod(creds, 0o666)
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=":memory:", metrics_listen="0", credentials=str(creds),
        tls=dataclasses.replace(get_pki().server_config(), client_auth="none"),
    )  # fmt: skip
    with pytest.raises(InvalidArgument, match="writable by other users"):
        SchedulerServer(config, tokens.Signer.from_seed(b"sec31"))
    os.chmod(creds, 0o644)
    server = SchedulerServer(config, tokens.Signer.from_seed(b"sec31")).start()
    try:
        tokens_dir = tmp_path / "tokens"
        tokens_dir.mkdir()

        def client(token: str) -> SchedulerClient:
            path = tokens_dir / f"{token}.token"
            write_secret(path, (token + "\n").encode())
            return SchedulerClient(server.address, tls.TlsConfig(ca=get_pki().ca_file, api_token_file=str(path)))

        assert not client("t0k").list_pool().leases
        os.chmod(creds, 0o666)
        with creds.open("a") as f:
            f.write(credential_line("admin", "mallory", "m4l"))
        with pytest.raises(Unauthenticated):
            client("m4l").list_pool()
        assert not client("t0k").list_pool().leases  # the table read before still serves
    finally:
        server.stop(grace=0.5)


def test_a_daemon_joins_by_its_own_credential_whatever_api_token_its_environment_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$GPUPOOL_API_TOKEN is a tenant's client setting. Round 30's daemon sent it to the scheduler as its identity
    when it had no `--join-token-file` (an API token decides the identity over the host certificate): a daemon (or
    `gpupool up`, whose children inherit the shell's environment) started where a tenant's token was set presented
    that tenant's secret, and could not register. A program's own configuration names its token file or none."""
    creds = tmp_path / "credentials"
    creds.write_text(credential_line("tenant", "tina", "t0k"))
    config = SchedulerConfig(
        listen="127.0.0.1:0", state=":memory:", metrics_listen="0", credentials=str(creds),
        tls=dataclasses.replace(get_pki().server_config(), client_auth="require"),
    )  # fmt: skip
    server = SchedulerServer(config, tokens.Signer.from_seed(b"sec31")).start()
    try:
        monkeypatch.setenv("GPUPOOL_API_TOKEN", "t0k")
        files = get_pki().issue("host", "gpu-7")
        host_cfg = tls.TlsConfig(cert=str(files.cert), key=str(files.key), ca=get_pki().ca_file)
        assert register_host(server.address, "gpu-7", host_cfg) is None  # as the host its certificate names
        assert SchedulerClient(server.address).list_pool().leases is not None  # a client of the environment: tina
    finally:
        server.stop(grace=0.5)


def _memory_mb(pid: int, field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) // 1024  # type: ignore[union-attr]


def test_one_client_flooding_the_scheduler_with_calls_holds_bounded_memory(tmp_path: Path) -> None:
    """gRPC reads every open stream's first bytes (its flow-control window, 64 KiB) whether or not a worker can
    take the call, and round 30's scheduler let one connection open any number of streams: 3,000 calls of 70 KB at
    once (page tokens it never gave, refused by the handler) took it from 53 to 155 MB, 10,000 of 400 KB to 786 MB,
    without a credential needed (the call is refused after its bytes were read); 4,000 of 70 KB here grew it by
    about 80 MB, and by about 30 MB now. A connection now has at most 100
    streams open (past them the client waits, or gets UNAVAILABLE in its first burst), calls in progress are bounded
    (RESOURCE_EXHAUSTED), and requests larger than 1 MiB refused. Since round 37 a call whose request is still
    coming (these are larger than a stream's first window) when eight newer ones of its source arrive is cancelled
    (CANCELLED: gpupool/callguard.py)."""
    proc, address = start_scheduler(tmp_path, *FAST)
    try:
        before = _memory_mb(proc.popen.pid, "VmRSS")
        channel = tls_channel(address, [("grpc.use_local_subchannel_pool", 1)])
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        request = scheduler_pb2.ListPoolRequest(page_token="x" * 70_000)
        calls = [stub.ListPool.future(request, timeout=120) for _ in range(4000)]
        codes = set()
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call.result()
            codes.add(err.value.code())
        channel.close()
        grown = _memory_mb(proc.popen.pid, "VmHWM") - before
        assert grown < 60, f"the scheduler grew by {grown} MB"
        assert codes <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE,
                         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}, codes  # fmt: skip
        assert SchedulerClient(address).list_pool().waiting == 0  # and serves on
    finally:
        proc.stop()
