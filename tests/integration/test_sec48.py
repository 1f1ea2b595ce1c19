"""Round 48 (sec48): what round 47 left of the daemon as a tenant boundary and the scheduler as a credential
authority, against real daemons and schedulers on loopback.

1. The library's `gpupool.lease()` named $USER as the tenant when given none, so an operator's own lease taken there
   (an admin certificate, no `tenant=""`) was that tenant's, unbound: a bearer's token (`gpupool run` had stopped
   doing so in secrev47). Both now take `client.pool.default_tenant`.
2. An idle session (one that sends no frame) after a forward step of the daemon's wall clock past its lease's end
   was closed at the reaper's next look, up to `reap_interval` (10 s) later: now within `clock_look` (1 s). A step
   is simulated as test_sec47.py does (the `time` its module reads).
3. A daemon's `--tls-ca` verified both its scheduler and its clients: accepting client certificates of another CA
   meant trusting that CA for the scheduler too. `--tls-client-ca` (default: `--tls-ca`) verifies the clients alone.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import test_control45
import test_sec47
import torch
from gpupool.client.session import Session
from support import REGISTER_WAIT_S, DaemonFactory, get_pki
from test_control45 import HOST, _code, _daemon, _status
from test_sec46 import _allocate
from test_security import Pool

from gpupool import pki, tls, tokencli
from gpupool._proto import device_pb2, device_pb2_grpc

pool = test_control45.pool  # the fixture: a scheduler on a SQLite state of its own
clock = test_sec47.clock  # the fixture: the daemon's `time`, its clocks stepped by the test


@pytest.mark.parametrize("step", ["wall clock", "both clocks"])
def test_an_idle_session_is_closed_soon_after_its_end_whatever_the_clock_does(
    daemon: Any, clock: test_sec47._Stepped, step: str
) -> None:
    """A session of an hour's lease that sends no frame after the daemon's clock moves two hours on, its wall clock
    alone (a forward step: the lease's end on it has passed, its monotonic end has not) or both (the time passed in a
    blink, as the reaper's sleep sees it): the reaper closes it within about a second (`clock_look`), and its next
    frame finds it expired. On dabf16a0 it ran until the reaper's next look, 10 s after its attach (`reap_interval`)."""
    s = Session.attach(daemon.address, daemon.token(ttl=3600))
    s.upload(torch.ones(4))
    s.sync()
    time.sleep(0.5)  # (the reaper asleep again after the attach woke it)
    if step == "wall clock":
        clock.step = 7200.0
    else:
        clock.elapsed = 7200.0
    test_sec47.ends_by(daemon, s, time.monotonic() + 4.0, "an idle session ran on past its lease's end after the step")


_LEASE = (
    "import sys, gpupool; held = gpupool.lease(fraction=0.25, ttl=600, scheduler=sys.argv[1]); "
    "print('LEASE', held.tenant, held.devices[0].token, flush=True); sys.stdin.read(); held.release()"
)


def _library_lease(pool: Pool, role: str, name: str, **env: str) -> contextlib.AbstractContextManager[tuple[str, str]]:
    """(tenant, token) of the lease `gpupool.lease()` takes with no tenant named, in a process of its own presenting
    `role` `name`'s certificate (no API token, no $GPUPOOL_TENANT unless `env` sets one); released when the context
    ends."""
    return test_sec47.held_lease([sys.executable, "-c", _LEASE, pool.address], role, name, **env)


def test_an_operator_s_own_library_lease_is_bound_to_its_certificate(pool: Pool, daemon_factory: DaemonFactory) -> None:
    """An operator's `gpupool.lease()` naming no tenant: its own lease, shown under its certificate's name and bound
    to it, so its token is refused with another certificate at a daemon under `require` (as `gpupool run`'s since
    secrev47: one rule, `default_tenant`). On dabf16a0 it named $USER, an unbound lease for that tenant: any
    certificate of the pool's CA attached its token. $GPUPOOL_TENANT still names a tenant (unbound: that tenant's
    certificate presents it); a tenant's own lease is bound either way."""
    test_sec47.check_operator_leases(
        _daemon(daemon_factory, pool),
        lambda role, name, tenant: _library_lease(pool, role, name, **({"GPUPOOL_TENANT": tenant} if tenant else {})),
        "48",
    )


_SIDE_SESSION = (
    "import sys, torch; from gpupool.client.session import Session; s = Session.attach(sys.argv[1], sys.argv[2]); "
    "assert s._carrier is not None, 'no side socket'; h = s.upload(torch.arange(6.0)); "
    "print('GOT', s.download(h).tolist(), flush=True); s.close()"
)


def test_a_daemon_verifies_its_clients_by_tls_client_ca_and_its_scheduler_by_tls_ca(
    pool: Pool, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A daemon under `require` whose clients' certificates come from a CA of their own (`--tls-client-ca`), its
    `--tls-ca` the pool's: it registers with its scheduler (verified by the pool's CA), serves a client certificate of
    the clients' CA (Status, Attach; a real session's frames and transfers on the side socket) and refuses one of the
    pool's CA at the handshake (the scheduler's CA is not the clients'). `gpupool serve --help` names the flag, and
    its parser makes the config. On dabf16a0 there was no such flag (`TlsConfig` had no `client_ca`): accepting the
    clients' CA meant naming both in --tls-ca, which the daemon then trusted for its scheduler too."""
    from gpupool.server.cli import build_parser, config_from_args

    clients = pki.LocalCA(tmp_path / "clients-ca", name="sec48 clients CA")
    carol = clients.issue("tenant", "carol48", dns=("localhost",), ips=("127.0.0.1",))
    host_files = get_pki().issue("host", HOST)
    cfg = tls.TlsConfig(
        cert=str(host_files.cert),
        key=str(host_files.key),
        ca=get_pki().ca_file,
        client_ca=str(clients.cert_path),
        client_auth="require",
    )
    host = _daemon(daemon_factory, pool, tls=cfg, bulk_listen="127.0.0.1:0")
    assert host.running.registrar.registered.wait(REGISTER_WAIT_S), (
        "the daemon did not register: its scheduler's CA is --tls-ca's"
    )
    as_carol = tls.TlsConfig(cert=str(carol.cert), key=str(carol.key), ca=get_pki().ca_file)
    with tls.channel(host.address, cfg=as_carol, token=False) as ch:
        stub = device_pb2_grpc.DeviceStub(ch)
        stub.Status(device_pb2.StatusRequest(), timeout=10)
        lease = _allocate(pool, "admin", "ops48", tenant="carol48")  # (unbound: the tenant's certificate presents it)
        reply = stub.Attach(device_pb2.AttachRequest(token=lease.devices[0].token), timeout=30)
        stub.Detach(device_pb2.DetachRequest(session_id=reply.session_id), timeout=10)
    code, words = _code(lambda: _status(host.address, "tenant", "alice48"))
    assert code == grpc.StatusCode.UNAVAILABLE, (code, words)  # (a certificate of the pool's CA: no handshake)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_TENANT", "GPUPOOL_API_TOKEN"))}
    env.update(GPUPOOL_TLS_CA=get_pki().ca_file, GPUPOOL_TLS_CERT=str(carol.cert), GPUPOOL_TLS_KEY=str(carol.key))
    token = _allocate(pool, "admin", "ops48", tenant="carol48").devices[0].token
    done = subprocess.run(
        [sys.executable, "-c", _SIDE_SESSION, host.address, token], env=env, capture_output=True, text=True, timeout=180
    )
    assert "GOT [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]" in done.stdout, (done.stdout, done.stderr[-3000:])

    assert "--tls-client-ca" in build_parser().format_help()
    public = tmp_path / "token.pub"
    assert tokencli.main(["keygen", str(tmp_path / "token.key"), "--public", str(public)]) == 0
    flags = ["--token-public-keys", str(public), "--host-id", HOST, "--tls-cert", str(host_files.cert), "--tls-key"]
    flags += [str(host_files.key), "--tls-ca", get_pki().ca_file, "--scheduler", pool.address]
    parsed = config_from_args(build_parser().parse_args([*flags, "--tls-client-ca", str(clients.cert_path)])).tls
    assert (parsed.ca, parsed.clients_ca, parsed.client_auth) == (get_pki().ca_file, str(clients.cert_path), "require")
    default = config_from_args(build_parser().parse_args(flags)).tls
    assert (default.clients_ca, default.client_auth) == (get_pki().ca_file, "require")
