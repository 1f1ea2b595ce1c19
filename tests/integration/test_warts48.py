"""Round 48 (warts48): what round 48's reviewers noticed and left, against real daemons (and schedulers) on loopback.

1. A lease token bound to a client certificate (its `cert` claim: every certificate lease the scheduler grants, and
   `gpupool token mint --cert`) presented to a daemon that verifies no client certificate (`--tls-client-auth none`)
   attached there as a bearer's, silently. It still attaches (a certificate pool's daemon under `none` is a
   configuration the docs keep: test_sec46's revocation there), but the daemon now says so once, a WARNING naming
   `--tls-client-auth require`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import grpc
import pytest
from support import DaemonFactory, get_pki, operator_tls
from test_sec46 import _attach, _fingerprint
from test_sec47 import _mint

from gpupool import tokencli
from gpupool import tokens as token_module


def test_a_bound_token_at_a_daemon_that_sees_no_certificate_is_said_once(
    daemon_factory: DaemonFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A token minted with `--cert` (bound to Alice's certificate) at a daemon under `--tls-client-auth none`: it
    attaches (with Bob's certificate, with none) as before, and the daemon logs one WARNING that it is a bearer's
    there, naming the flag that would hold it to Alice's certificate; a second bound token, and an unbound one, add
    no other. On the base (4ebc9e64) nothing was said."""
    token_key_file, public = tmp_path / "token.key", tmp_path / "token.pub"
    assert tokencli.main(["keygen", str(token_key_file), "--public", str(public)]) == 0
    cfg = dataclasses.replace(operator_tls(), client_auth="none")
    host = daemon_factory(tls=cfg, isolation="thread", token_key=token_module.load_verifier(public))
    get_pki().issue("tenant", "alice48w")
    bound = [_mint(capsys, token_key_file, "--cert", _fingerprint("tenant", "alice48w")) for _ in range(2)]
    unbound = _mint(capsys, token_key_file)
    caplog.set_level(logging.WARNING, logger="gpupool.server.daemon")
    assert _attach(host.address, None, unbound) == (grpc.StatusCode.OK, "")
    assert not [r for r in caplog.records if "bearer" in r.getMessage()]
    for token in bound:
        assert _attach(host.address, "bob48w", token) == (grpc.StatusCode.OK, "")
        assert _attach(host.address, None, token) == (grpc.StatusCode.OK, "")
    said = [r.getMessage() for r in caplog.records if "bearer" in r.getMessage()]
    assert len(said) == 1, said
    assert "--tls-client-auth require" in said[0] and "--tls-client-auth none" in said[0], said[0]
    assert token_module.unverified_claim(bound[0], "cert")[:23] in said[0]
