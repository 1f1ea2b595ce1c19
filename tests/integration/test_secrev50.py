"""secrev50: review of round 49's daemon changes and two known items, against real daemons on loopback (each test
fails on 086d7cb1):
1. A session refused for its device's memory ("device N full") was told the device's total use (the message and the
   error's `used_bytes`): the total less its own was its co-tenants' use, which ListPool and Status show a tenant
   only where it is alone on the device. Now its own use and quota (sessions.py `WorkerSession.admit`).
2. A daemon built in code with `--tls-client-auth auto` left unresolved (`TlsConfig(client_auth="auto")`, never
   through server/cli.py `resolve_client_auth`) asked no client for a certificate and took a certificate-bound lease
   token as a bearer's (as a named `none`). Now refused at the daemon's start (INVALID_ARGUMENT).
(Round 49's plans keeping every graph's inputs: tests/unit/test_server_graph_spares.py.)"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from gpupool.client.session import Session
from gpupool.server.daemon import Daemon, DaemonConfig
from support import get_pki

from gpupool import errors, tls

MiB = 1024**2


def test_device_full_tells_a_session_its_own_use_and_not_its_co_tenants(daemon_factory: Any) -> None:
    """Two tenants on a 4 MiB fake GPU: alice holds 3 MiB; bob's 2 MiB upload is refused "device 0 full" naming bob's
    own use (1 KiB) and quota, never alice's 3 MiB nor the device's total or free bytes, in the message or the error's
    numbers. On 086d7cb1: "... 3146752 used of 4194304 bytes", `used_bytes` 3146752 (alice's 3 MiB + bob's 1 KiB)."""
    d = daemon_factory(fake_gpu_memory=4 * MiB)
    alice = Session.attach(d.address, d.token(quota_bytes=3 * MiB + 4096, tenant="alice50"))
    bob = Session.attach(d.address, d.token(quota_bytes=3 * MiB, tenant="bob50"))
    try:
        alice.upload(torch.zeros(3 * MiB // 4))
        alice.sync()
        bob.upload(torch.zeros(256))  # 1 KiB of bob's own
        bob.sync()
        bob.upload(torch.zeros(2 * MiB // 4))
        with pytest.raises(errors.ResourceExhausted, match="device 0 full") as full:
            bob.sync()
        told = full.value.message
        assert (full.value.used_bytes, full.value.limit_bytes) == (1024, 3 * MiB), told
        assert "uses 1024 of its 3145728 byte quota" in told, told
        for figure in (3 * MiB, 3 * MiB + 1024, 4 * MiB - 3 * MiB - 1024, 4 * MiB - 3 * MiB):
            assert str(figure) not in told.replace("3145728 byte quota", ""), (figure, told)
        bob.upload(torch.zeros(MiB // 8))  # what fits still fits
        bob.sync()
    finally:
        alice.close()
        bob.close()


@pytest.mark.parametrize("insecure", [True, False])
def test_a_daemon_built_with_auto_unresolved_does_not_start(insecure: bool) -> None:
    """`DaemonConfig(tls=TlsConfig(client_auth="auto"))`, TLS or `--insecure`: INVALID_ARGUMENT naming the setting, and
    so does a TLS server of such settings (`check_server`). On 086d7cb1 the daemon started asking no client for a
    certificate and attached a certificate-bound token as a bearer's (test_sec49's named `none`)."""
    base = tls.TlsConfig(insecure=True) if insecure else get_pki().server_config()
    auto = dataclasses.replace(base, client_auth="auto")
    config = DaemonConfig(listen="127.0.0.1:0", host_id="secrev50", fake_gpus=1, fake_gpu_memory=MiB, tls=auto)
    with pytest.raises(errors.InvalidArgument, match="--tls-client-auth 'auto' is not a server's setting"):
        Daemon(config)
    if not insecure:
        with pytest.raises(errors.InvalidArgument, match="auto"):
            auto.check_server()
        base.check_server()  # (resolved settings pass as before)
