"""Round 48's review of sec48 (secrev48): `gpupool serve --tls-client-ca`, against a real daemon and scheduler on
loopback.

1. sec48 believed every identity a certificate of the clients' CA names, an operator's (admin, metrics) too: whoever
   runs that CA (another team's, an organisation's) minted itself a view of every tenant's sessions (Status) and the
   daemon's metrics. Only the pool's CA (--tls-ca) names operators now (`TlsConfig.believed`).
2. `--tls-client-auth auto` beside --tls-client-ca made `none` for a daemon joining with a token or serving without a
   scheduler: the flag verified nobody. It makes `require` now, and `none` beside it does not start.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support import REGISTER_WAIT_S, DaemonFactory, get_pki
from test_control45 import HOST, _daemon
from test_sec46 import _allocate
from test_security import Pool

from gpupool import pki, tls
from gpupool._proto import device_pb2, device_pb2_grpc

pool = __import__("test_control45").pool  # the fixture: a scheduler on a SQLite state of its own


def _status_tenants(address: str, cfg: tls.TlsConfig) -> set[str]:
    with tls.channel(address, cfg=cfg, token=False) as ch:
        reply = device_pb2_grpc.DeviceStub(ch).Status(device_pb2.StatusRequest(), timeout=10)
    return {u.tenant for u in reply.sessions}


def _scrape(port: int, files: pki.CertFiles) -> int:
    """The HTTP status of a scrape of the daemon's metrics port with `files`' certificate."""
    context = ssl.create_default_context(cafile=get_pki().ca_file)
    context.load_cert_chain(str(files.cert), str(files.key))
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=10, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_an_operator_certificate_of_the_clients_ca_is_no_operator_of_the_daemon(
    pool: Pool, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A daemon whose --tls-client-ca names the clients' CA and the pool's (so the pool's operators reach it too):
    a tenant certificate of the clients' CA attaches a session; an admin certificate of the clients' CA sees no
    session of it in Status and its metrics certificate is refused at the metrics port (403), while the pool's admin
    sees it and the pool's metrics certificate scrapes. On dfc67908 the clients' CA's admin saw every session and its
    metrics certificate scraped."""
    clients = pki.LocalCA(tmp_path / "clients-ca", name="secrev48 clients CA")
    bundle = tmp_path / "clients-and-pool.pem"
    bundle.write_bytes(clients.cert_path.read_bytes() + Path(get_pki().ca_file).read_bytes())
    host_files = get_pki().issue("host", HOST)
    cfg = tls.TlsConfig(
        cert=str(host_files.cert),
        key=str(host_files.key),
        ca=get_pki().ca_file,
        client_ca=str(bundle),
        client_auth="require",
    )
    host = _daemon(daemon_factory, pool, tls=cfg, metrics_listen="127.0.0.1:0")
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S)

    def as_(files: pki.CertFiles) -> tls.TlsConfig:
        return tls.TlsConfig(cert=str(files.cert), key=str(files.key), ca=get_pki().ca_file)

    carol = clients.issue("tenant", "carol-r48")
    with tls.channel(host.address, cfg=as_(carol), token=False) as ch:
        stub = device_pb2_grpc.DeviceStub(ch)
        lease = _allocate(pool, "admin", "ops-r48", tenant="carol-r48")
        reply = stub.Attach(device_pb2.AttachRequest(token=lease.devices[0].token), timeout=30)
        try:
            assert _status_tenants(host.address, as_(carol)) == {"carol-r48"}  # (a tenant's own: believed)
            assert _status_tenants(host.address, get_pki().client_config("admin", "ops-r48")) == {"carol-r48"}
            assert _status_tenants(host.address, as_(clients.issue("admin", "mallory-r48"))) == set()
        finally:
            stub.Detach(device_pb2.DetachRequest(session_id=reply.session_id), timeout=10)

    port = host.running.metrics_port
    assert _scrape(port, get_pki().issue("metrics", "prom-r48")) == 200
    assert _scrape(port, clients.issue("metrics", "prom-r48")) == 403
    assert _scrape(port, clients.issue("admin", "mallory-r48")) == 403
    assert _scrape(port, clients.issue("tenant", "carol-r48")) == 403


def test_tls_client_ca_makes_auto_require_and_refuses_none(tmp_path: Path) -> None:
    """`auto` beside --tls-client-ca is `require` for a daemon joining with a token and for one without a scheduler
    (on dfc67908: `none`, the flag then verifying no client); `gpupool serve --tls-client-auth none --tls-client-ca`
    exits 2 at once naming the mix (on dfc67908 it started, asking no client for a certificate)."""
    from gpupool.server.cli import resolve_client_auth

    files = get_pki().issue("host", HOST)
    clients = pki.LocalCA(tmp_path / "clients-ca", name="secrev48 clients CA")
    cfg = tls.TlsConfig(cert=str(files.cert), key=str(files.key), ca=get_pki().ca_file, client_auth="auto")
    with_ca = dataclasses.replace(cfg, client_ca=str(clients.cert_path))
    joins = dataclasses.replace(with_ca, api_token_file=str(tmp_path / "join.token"))
    assert resolve_client_auth(joins, "127.0.0.1:1").client_auth == "require"
    assert resolve_client_auth(with_ca, "").client_auth == "require"
    assert resolve_client_auth(cfg, "").client_auth == "none"  # (as before: a hand-minted tokens' daemon)
    joins_plain = dataclasses.replace(cfg, api_token_file=str(tmp_path / "join.token"))
    assert resolve_client_auth(joins_plain, "127.0.0.1:1").client_auth == "none"
    with pytest.raises(Exception, match="--tls-client-ca"):
        dataclasses.replace(with_ca, client_auth="none").check_server()

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    argv = ["serve", "--tls-cert", str(files.cert), "--tls-key"]
    argv += [str(files.key), "--tls-ca", get_pki().ca_file, "--tls-client-ca", str(clients.cert_path)]
    argv += ["--tls-client-auth", "none", "--metrics-listen", "0", "--listen", "127.0.0.1:0"]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "gpupool.cli", *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "--tls-client-ca" in done.stderr and "--tls-client-auth none" in done.stderr, done.stderr[-2000:]
    assert time.monotonic() - started < 60
