"""Round 49 (sec49): what round 48 left in docs/security.md's Known limits, against real daemons and schedulers.

1. A certificate-bound lease token (its `cert` claim) at a daemon whose `--tls-client-auth auto` chose `none` (no
   scheduler, a join token, `--insecure`) attached as a bearer's, one WARNING said. The choice now travels with the
   daemon's TLS settings (`TlsConfig.client_auth_auto`) and such a daemon refuses the token, PERMISSION_DENIED; a
   daemon whose operator named `--tls-client-auth none` takes it as a bearer's, as before.
2. The daemon's name of a GPU that reports no UUID (`GPU-cuda<index>`) was global at the scheduler: every such host's
   `GPU-cuda0` counted as one GPU, so no multi-GPU lease was placed over two such hosts. It is its host's now.
3. The metrics ports (scheduler, daemon) answered a revoked `metrics` (or `admin`) certificate every tenant's figures,
   which every gRPC call had refused since round 45. Now 403.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from gpupool.client.pool import SchedulerClient
from gpupool.scheduler.hosts import DeviceSpec
from gpupool.scheduler.leases import Core, CoreConfig
from gpupool.scheduler.placement import Request
from gpupool.scheduler.store import MemoryStore
from scheduler_fixtures import SimHost, start_scheduler, wait_until
from support import REGISTER_WAIT_S, DaemonFactory, get_pki, start_serve_process, stop_process
from test_sec46 import _attach, _fingerprint
from test_sec47 import _mint

from gpupool import protocol, tokencli
from gpupool import tokens as token_module
from gpupool._proto import device_pb2, device_pb2_grpc, scheduler_pb2
from gpupool.errors import AlreadyExists

GiB = 1024**3


def _serve_config(tmp_path: Path, public: Path, *flags: str) -> object:
    """The daemon configuration `gpupool serve`'s own parser and config make of `flags` (a host certificate, the
    tests' CA, no scheduler unless `flags` names one)."""
    from gpupool.server.cli import build_parser, config_from_args

    files = get_pki().issue("host", "gpu-49")
    common = ["--token-public-keys", str(public), "--host-id", "gpu-49", "--tls-cert", str(files.cert), "--tls-key"]
    return config_from_args(build_parser().parse_args([*common, str(files.key), "--tls-ca", get_pki().ca_file, *flags]))


def test_a_bound_token_is_refused_where_auto_chose_no_client_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real `gpupool serve` under TLS without a scheduler (`auto` makes `none`: it asks no client for a
    certificate). A token minted with `--cert` (bound to Alice's certificate) is refused at Attach and at Status,
    PERMISSION_DENIED, with Alice's certificate and with none; the log says why once; an unbound token attaches. On
    146577ae the bound token attached with any certificate or none (a bearer's)."""
    token_key, public = tmp_path / "token.key", tmp_path / "token.key.pub"
    assert tokencli.main(["keygen", str(token_key), "--public", str(public)]) == 0
    files = get_pki().issue("host", "gpu-49")
    get_pki().issue("tenant", "alice49")
    bound = _mint(capsys, token_key, "--cert", _fingerprint("tenant", "alice49"))
    unbound = _mint(capsys, token_key)
    proc, address = start_serve_process(
        token_key, "--fake-gpus", "1", "--isolation", "thread", "--tls-cert", str(files.cert), "--tls-key",
        str(files.key), "--tls-ca", get_pki().ca_file,
    )  # fmt: skip
    try:
        for name in ("alice49", None, "alice49"):
            code, words = _attach(address, name, bound)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code, words)
            assert "bound to client certificate" in words and "auto chose none" in words, words
            assert "--tls-client-auth require" in words, words
        assert _attach(address, None, unbound) == (grpc.StatusCode.OK, "")
        from test_sec46 import _stub

        ch, stub = _stub(address, "alice49")
        with ch:
            with pytest.raises(grpc.RpcError) as raised:
                stub.Status(device_pb2.StatusRequest(), timeout=10, metadata=((protocol.LEASE_TOKEN_METADATA, bound),))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, raised.value.details()
    finally:
        stop_process(proc)
    log = "".join(proc.log_lines)  # type: ignore[attr-defined]
    said = [line for line in log.splitlines() if "refused (PERMISSION_DENIED; said once)" in line]
    assert len(said) == 1 and "WARNING" in said[0] and "no --scheduler" in said[0], log[-3000:]
    assert "--tls-client-auth auto chose none" in log and "refuses a lease token bound" in log, log[-3000:]


def test_auto_s_choice_travels_with_the_daemon_s_settings_and_a_named_none_keeps_bearer_tokens(
    daemon_factory: DaemonFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gpupool serve`'s config carries why `auto` chose (`TlsConfig.client_auth_auto`: no scheduler, a join token,
    `--insecure`, or a certificate's link to the scheduler) and "" where the flag is named. Daemons started from
    those settings: `--insecure` (auto's `none`) refuses a bound token; a named `--tls-client-auth none` attaches it
    as a bearer's, the operator's explicit choice (round 48's behaviour, test_warts48). On 146577ae the settings had
    no such field and both attached it."""
    token_key, public = tmp_path / "token.key", tmp_path / "token.pub"
    assert tokencli.main(["keygen", str(token_key), "--public", str(public)]) == 0
    join = tmp_path / "join.token"
    join.write_text("join-secret\n")
    join.chmod(0o600)
    tls_of = {
        what: _serve_config(tmp_path, public, *flags).tls  # type: ignore[attr-defined]
        for what, flags in {
            "alone": (),
            "join": ("--scheduler", "127.0.0.1:1", "--join-token-file", str(join)),
            "by-cert": ("--scheduler", "127.0.0.1:1"),
            "named": ("--scheduler", "127.0.0.1:1", "--tls-client-auth", "none"),
            "insecure": ("--insecure",),
        }.items()
    }
    assert tls_of["alone"].client_auth == "none" and "no --scheduler" in tls_of["alone"].client_auth_auto
    assert tls_of["join"].client_auth == "none" and "--join-token-file" in tls_of["join"].client_auth_auto
    assert tls_of["by-cert"].client_auth == "require" and "its certificate" in tls_of["by-cert"].client_auth_auto
    assert tls_of["named"].client_auth == "none" and tls_of["named"].client_auth_auto == ""
    assert tls_of["insecure"].client_auth_auto.startswith("auto: --insecure")
    get_pki().issue("tenant", "alice49")
    bound = _mint(capsys, token_key, "--cert", _fingerprint("tenant", "alice49"))
    verifier = token_module.load_verifier(public)
    insecure = daemon_factory(tls=tls_of["insecure"], isolation="thread", token_key=verifier)
    ch = grpc.insecure_channel(insecure.address)
    with ch:
        stub = device_pb2_grpc.DeviceStub(ch)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Attach(device_pb2.AttachRequest(token=bound), timeout=30)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, raised.value.details()
    host = daemon_factory(tls=tls_of["named"], isolation="thread", token_key=verifier)
    assert _attach(host.address, None, bound) == (grpc.StatusCode.OK, "")


def _fallback_host(address: str, host_id: str, gpus: int) -> SimHost:
    """A host (the daemon's real Registrar) whose GPUs report no UUID: the daemon names them `GPU-cuda<index>`."""
    host = SimHost(address, host_id, gpus=gpus)
    for d in host._devices:
        d.uuid = f"GPU-cuda{d.index}"
    return host


def test_gpus_without_a_uuid_are_their_own_hosts(tmp_path: Path) -> None:
    """A real scheduler, two hosts whose two GPUs each report no UUID (`GPU-cuda0`, `GPU-cuda1` on both): a lease of
    four whole GPUs is placed on all four, and of three too. A third host naming `GPU-cuda0` registers (its own
    name) and takes nothing of theirs; a host naming one's real UUID is still refused. On 146577ae the pool counted
    the two hosts' four GPUs as two (every host's `GPU-cuda0` one GPU): both leases were refused."""
    proc, address = start_scheduler(tmp_path, "--heartbeat-interval", "0.3")
    hosts = [_fallback_host(address, name, 2).start() for name in ("cuda-a", "cuda-b")]
    client = SchedulerClient(address)
    try:
        lease = client.allocate(scheduler_pb2.AllocateRequest(gpus=4, fraction=1.0, ttl_seconds=60))
        assert sorted((d.host_id, d.device) for d in lease.devices) == [
            ("cuda-a", 0), ("cuda-a", 1), ("cuda-b", 0), ("cuda-b", 1)
        ]  # fmt: skip
        client.release(lease.lease_id)
        hosts.append(_fallback_host(address, "cuda-c", 1).start())
        lease = client.allocate(scheduler_pb2.AllocateRequest(gpus=3, fraction=0.5, ttl_seconds=60))
        assert len({(d.host_id, d.device) for d in lease.devices}) == 3
    finally:
        for h in hosts:
            h.stop()
        client.close()
        proc.stop()


def test_a_fallback_name_binds_to_its_host_and_a_real_uuid_stays_bound() -> None:
    """The binding (`HostBook._check_uuids`) in one process: `GPU-cuda0` of two hosts are two GPUs (neither is
    refused, a two-GPU lease goes over both); a real UUID of a live host stays its own (ALREADY_EXISTS for another),
    also beside fallback names; two devices without any UUID on one host are two. On 146577ae the two-GPU leases
    were refused (no room)."""
    core = Core(MemoryStore(), b"k" * 32, CoreConfig(host_timeout=60))
    devs = lambda *uuids: [DeviceSpec(i, u, "fake", 8 * GiB, True) for i, u in enumerate(uuids)]  # noqa: E731
    core.hosts.register("a", "127.0.0.1:6000", devs("GPU-cuda0"))
    core.hosts.register("b", "127.0.0.1:6001", devs("GPU-cuda0"))
    lease = core.allocate(Request(2, fraction=1.0), tenant="t", ttl=30)
    assert sorted(g.host_id for g in lease.grants) == ["a", "b"]
    core.hosts.register("c", "127.0.0.1:6002", devs("GPU-cuda0", "GPU-real-c"))
    with pytest.raises(AlreadyExists, match="GPU GPU-real-c.*live host c"):
        core.hosts.register("e", "127.0.0.1:6004", devs("GPU-cuda0", "GPU-real-c"))
    core.release(lease.lease_id, "t")
    alone = Core(MemoryStore(), b"k" * 32, CoreConfig(host_timeout=60))
    alone.hosts.register("d", "127.0.0.1:6003", devs("", ""))  # (no UUID at all: an older daemon's, a raw Register)
    lease = alone.allocate(Request(2, fraction=1.0), tenant="t", ttl=30)
    assert sorted((g.host_id, g.device) for g in lease.grants) == [("d", 0), ("d", 1)]


def test_a_revoked_scrapers_certificate_reads_no_metrics(tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    """The metrics ports of a real scheduler and of a daemon registered with it: Prometheus' certificate reads both;
    the operator revokes it (`gpupool cert revoke`): the scheduler answers it 403 at once and the daemon within its
    heartbeats, naming the revocation, while another metrics certificate still reads both. Every gRPC call refused a
    revoked certificate since round 45; on 146577ae the metrics ports went on answering it every tenant's figures
    (and a revoked admin certificate, as the same check reads it)."""
    import urllib.error

    from support import scrape
    from test_control45 import _daemon, _revoke
    from test_security import start_pool

    pool = start_pool(tmp_path, state=str(tmp_path / "state.db"), metrics_listen="127.0.0.1:0")
    try:
        host = _daemon(daemon_factory, pool)
        assert host.running.registrar.registered.wait(REGISTER_WAIT_S)
        ports = {"scheduler": pool.scheduler.metrics_port, "daemon": host.metrics_port}
        for where, port in ports.items():
            assert "gpupool" in scrape(port, "metrics", "prom49"), where
        _revoke(pool, str(get_pki().issue("metrics", "prom49").cert))

        def refused(port: int) -> str:
            try:
                scrape(port, "metrics", "prom49")
            except urllib.error.HTTPError as err:
                assert err.code == 403, err.code
                return str(err.read().decode())
            return ""

        assert "revoked" in refused(ports["scheduler"])
        wait_until(lambda: "revoked" in refused(ports["daemon"]), timeout=15, what="the daemon refusing the scraper")
        for where, port in ports.items():
            assert "gpupool" in scrape(port, "metrics", "prom49-next"), where
    finally:
        pool.scheduler.stop(grace=0.5)


def test_an_unread_replies_refusal_names_no_other_tenants_bytes(daemon_factory: DaemonFactory) -> None:
    """Two tenants' sessions park 4 MiB of unread replies each on a host of `--max-unread-bytes` 10 MiB; a third
    tenant's session that would take the host past it is ended RESOURCE_EXHAUSTED, told its own bytes and the limit.
    On 146577ae it was told the host's total too ("would reach N bytes"): the total less its own is the other
    tenants' unread bytes (one tenant's exactly where it is alone beside it)."""
    import re

    from test_daemon_unread import Hog, _gone, _parked

    mib = 1024 * 1024
    d = daemon_factory(fake_gpu_memory=512 * mib, outbox_bytes=4 * mib, max_unread_bytes=10 * mib)
    a, b = Hog(d, "hog49-a"), Hog(d, "hog49-b")
    try:
        assert min(_parked(d, a, b), default=0) >= 4 * mib
        c = Hog(d, "hog49-c")
        with pytest.raises(grpc.RpcError) as info:
            next(c.call)
        c.end()
        _gone(d, c)
    finally:
        a.end()
        b.end()
    details = info.value.details() or ""
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "--max-unread-bytes" in details and str(10 * mib) in details, details
    assert max(int(n) for n in re.findall(r"\d+", details)) == 10 * mib, details  # (no total: it is past the limit)
