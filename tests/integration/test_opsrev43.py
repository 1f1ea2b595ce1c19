"""A daemon's default host id where it holds a credential of the scheduler (opsrev43, a review of ops43).

ops43 made `gpupool serve` without `--host-id` the host name only on port 50051, `<host name>-PORT` elsewhere and
`<host name>-<6 random hex>` on port 0. The scheduler lets a host credential act only as the host it names (a host
certificate's `gpupool://host/<name>`, a join token's `host <name>` line): a daemon whose certificate or join token
names the host name (the id every daemon given none had until round 43) and listening elsewhere than 50051 registered
as another id and was refused (PERMISSION_DENIED) at every retry, never joining the pool. Now a daemon given no
`--host-id` is its certificate's host name, else with a join token the host name (as before round 43); ops43's
distinct ids remain for daemons that present neither (an `--insecure` scheduler's). Real schedulers and daemons.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from gpupool.client.pool import SchedulerClient
from gpupool.client.session import Session
from gpupool.scheduler.auth import credential_line
from gpupool.server.cli import default_host_id
from scheduler_fixtures import Proc
from support import DaemonFactory, get_pki, registered_host
from test_security import start_pool

from gpupool import errors
from gpupool._proto import scheduler_pb2
from gpupool.config import write_secret

pytestmark = pytest.mark.slow
REGISTERED = r"registered with scheduler \S+ as (\S+) \("
REFUSED = r"scheduler \S+: .*(PERMISSION_DENIED|may not act as host)"


def _serve(address: str, public: Path, *flags: str) -> Proc:
    return Proc(
        ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "0", "--fake-gpus", "1", "--fake-gpu-memory",
         "256MiB", "--token-public-keys", str(public), "--scheduler", address, "--heartbeat-interval", "0.5",
         "--isolation", "thread", *flags]
    )  # fmt: skip


def _outcome(proc: Proc) -> str:
    """The host id the daemon registered as, or the refusal it logged."""
    m = proc.wait_for(f"{REGISTERED}|{REFUSED}", timeout=150)
    return m.group(1) or f"refused: {m.group(0)}"


def test_a_daemon_with_a_host_certificate_registers_as_the_host_it_names(tmp_path: Path) -> None:
    """`serve --listen 127.0.0.1:0 --tls-cert <host certificate>` without --host-id, against a scheduler requiring
    client certificates: it registers as the certificate's host (on 1548fe2: `<host name>-<random>`, refused), both
    for a certificate naming the host name (how a daemon was deployed until round 43) and another name."""
    pool = start_pool(tmp_path)
    daemons = []
    try:
        for name in (socket.gethostname(), "gpu-07"):
            files = get_pki().issue("host", name)
            ca = get_pki().ca_file
            daemons.append(_serve(pool.address, pool.public, "--tls-cert", str(files.cert), "--tls-key",
                                  str(files.key), "--tls-ca", ca))  # fmt: skip
        assert [_outcome(d) for d in daemons] == [socket.gethostname(), "gpu-07"]
    finally:
        for d in daemons:
            d.stop()
        pool.scheduler.stop(grace=0.5)


def test_a_daemon_with_a_join_token_keeps_the_host_name(tmp_path: Path) -> None:
    """`serve --listen 127.0.0.1:0 --join-token-file F` (a `host <host name>` token; the scheduler asks no client
    certificate) without --host-id registers as the host name, as until round 43 (on 1548fe2: refused)."""
    name = socket.gethostname()
    pool = start_pool(tmp_path, tls=get_pki().server_config())  # --tls-client-auth none: API tokens identify
    with pool.credentials.open("a") as f:
        f.write(credential_line("host", name, "j0in"))
    token = tmp_path / "join.token"
    write_secret(token, b"j0in\n")
    server = get_pki().server_config()  # (a certificate naming no host: the token alone says who the daemon is)
    daemon = _serve(pool.address, pool.public, "--join-token-file", str(token), "--tls-cert", server.cert,
                    "--tls-key", server.key, "--tls-ca", server.ca)  # fmt: skip
    try:
        assert _outcome(daemon) == name
    finally:
        daemon.stop()
        pool.scheduler.stop(grace=0.5)


# ---- status tokens (ops43): what a review tried; these pin what holds on 1548fe2 ----

STATUS_HOST = "rev43-host"


def test_status_tokens_reach_no_tenant_or_host_and_renew_no_session(
    tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    """Only an admin credential's ListPool carries status tokens: not a tenant's API token, not a host's certificate
    (ListPool is open to hosts). Presented to RefreshToken in a session's place of a lease token, a status token of
    that very host is refused (UNAUTHENTICATED: its signature covers the status prefix) and the session's end stays."""
    pool = start_pool(tmp_path)
    try:
        host = registered_host(daemon_factory, pool.address, pool.public, STATUS_HOST)
        clients = [
            pool.token_client("t0k"),  # tina's API token (start_pool's credentials file)
            SchedulerClient(pool.address, get_pki().client_config("host", STATUS_HOST)),
            pool.client("admin", "ops"),
        ]
        try:
            tenant, as_host, admin = ([h.status_token for h in c.list_pool().hosts] for c in clients)
            lease = clients[2].allocate(scheduler_pb2.AllocateRequest(gpus=1, fraction=0.25, tenant="alice"))
        finally:
            for c in clients:
                c.close()
        assert tenant == as_host == [""] and len(admin) == 1 and admin[0], (tenant, as_host)
        session = Session.attach(host.address, lease.devices[0].token)
        try:
            before = host.running.daemon._sessions[session.session_id].expires_at
            with pytest.raises(errors.Unauthenticated, match="signature"):
                session.refresh(admin[0])
            assert host.running.daemon._sessions[session.session_id].expires_at == before
        finally:
            session.close()
    finally:
        pool.scheduler.stop(grace=0.5)


def test_only_a_host_certificate_names_the_default_host_id(tmp_path: Path) -> None:
    """A certificate of another role (a server's, a tenant's), a missing or unreadable file: ops43's defaults (a
    tenant's name is never a daemon's host id); a host's certificate: its name, whatever the port or join token."""
    name, p = socket.gethostname(), get_pki()
    host, tenant = p.issue("host", "gpu-07").cert, p.issue("tenant", "alice").cert
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate")
    for cert in (str(tenant), p.server_config().cert, str(tmp_path / "missing.crt"), str(garbage), ""):
        assert default_host_id("127.0.0.1:7001", cert) == f"{name}-7001", cert
        assert default_host_id("127.0.0.1:7001", cert, "join.token") == name, cert
    for listen in ("127.0.0.1:50051", "127.0.0.1:7001", "127.0.0.1:0"):
        assert default_host_id(listen, str(host)) == default_host_id(listen, str(host), "join.token") == "gpu-07"
