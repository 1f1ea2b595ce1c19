"""Round 48 (sec48): what round 47 left of the daemon as a tenant boundary and the scheduler as a credential
authority, against real daemons and schedulers on loopback.

1. The library's `gpupool.lease()` named $USER as the tenant when given none, so an operator's own lease taken there
   (an admin certificate, no `tenant=""`) was that tenant's, unbound: a bearer's token (`gpupool run` had stopped
   doing so in secrev47). Both now take `client.pool.default_tenant`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import test_control45
from support import DaemonFactory, get_pki
from test_control45 import _daemon
from test_sec46 import _attach
from test_security import Pool

from gpupool import certrevoke
from gpupool import tokens as token_module

pool = test_control45.pool  # the fixture: a scheduler on a SQLite state of its own

_LEASE = (
    "import sys, gpupool; held = gpupool.lease(fraction=0.25, ttl=600, scheduler=sys.argv[1]); "
    "print(held.tenant, held.devices[0].token, flush=True); sys.stdin.read(); held.release()"
)


@contextlib.contextmanager
def _library_lease(pool: Pool, role: str, name: str, **env: str) -> Iterator[tuple[str, str]]:
    """(tenant, token) of the lease `gpupool.lease()` takes with no tenant named, in a process of its own presenting
    `role` `name`'s certificate (no API token, no $GPUPOOL_TENANT unless `env` sets one); released when the context
    ends."""
    files = get_pki().issue(role, name)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GPUPOOL_TENANT", "GPUPOOL_API_TOKEN"))}
    base.update(get_pki().env(), GPUPOOL_TLS_CERT=str(files.cert), GPUPOOL_TLS_KEY=str(files.key), **env)
    proc = subprocess.Popen(
        [sys.executable, "-c", _LEASE, pool.address],
        env=base, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        shown = proc.stdout.readline().split()
        assert len(shown) == 2, proc.stderr.read() if proc.stderr else ""
        yield shown[0], shown[1]
        proc.stdin.close()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_an_operator_s_own_library_lease_is_bound_to_its_certificate(pool: Pool, daemon_factory: DaemonFactory) -> None:
    """An operator's `gpupool.lease()` naming no tenant: its own lease, shown under its certificate's name and bound
    to it, so its token is refused with another certificate at a daemon under `require` (as `gpupool run`'s since
    secrev47: one rule, `default_tenant`). On dabf16a0 it named $USER, an unbound lease for that tenant: any
    certificate of the pool's CA attached its token. $GPUPOOL_TENANT still names a tenant (unbound: that tenant's
    certificate presents it); a tenant's own lease is bound either way."""
    host = _daemon(daemon_factory, pool)
    assert host.running.registrar.registered.wait(20)
    admin_cert = get_pki().issue("admin", "ops48").cert.read_bytes()
    with _library_lease(pool, "admin", "ops48") as (tenant, token):
        assert tenant == "ops48", tenant
        assert token_module.unverified_claim(token, "cert") == certrevoke.fingerprint_pem(admin_cert)
        code, words = _attach(host.address, "bob48", token)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "bound to client certificate" in words, (code, words)

    with _library_lease(pool, "admin", "ops48", GPUPOOL_TENANT="alice48") as (tenant, token):
        assert tenant == "alice48" and not token_module.unverified_claim(token, "cert"), tenant
        assert _attach(host.address, "alice48", token) == (grpc.StatusCode.OK, "")

    with _library_lease(pool, "tenant", "bob48") as (tenant, token):
        assert tenant == "bob48" and token_module.unverified_claim(token, "cert"), tenant
