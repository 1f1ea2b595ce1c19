"""`gpupool token`: keygen, public-key, api-token and mint, as an operator runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from gpupool.scheduler.auth import ADMIN, Identity, credential_line, parse_credentials

from gpupool import tokens
from gpupool.errors import InvalidArgument


def gpupool_token(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "token", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_keygen_public_key_and_mint(tmp_path: Path) -> None:
    key, pub = tmp_path / "token.key", tmp_path / "token.pub"
    assert gpupool_token("keygen", str(key), "--public", str(pub)).returncode == 0
    assert key.stat().st_mode & 0o077 == 0
    printed = gpupool_token("public-key", "--token-key-file", str(key))
    assert printed.returncode == 0 and printed.stdout.encode() == pub.read_bytes()
    minted = gpupool_token("--token-key-file", str(key), "--host", "h1", "--device", "1", "--fraction", "0.5")
    assert minted.returncode == 0, minted.stderr
    claims = tokens.load_verifier(pub).verify(minted.stdout.strip())
    assert (claims.host, claims.device, claims.share) == ("h1", 1, 0.5)
    again = gpupool_token("mint", "--token-key-file", str(key), "--ttl", "100000")
    assert again.returncode == 2 and "--ttl" in again.stderr
    missing = gpupool_token("--token-key-file", str(tmp_path / "absent"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_api_token_appends_a_hash_only(tmp_path: Path) -> None:
    creds, out = tmp_path / "credentials", tmp_path / "alice.token"
    made = gpupool_token(
        "api-token", "--role", "tenant", "--name", "alice", "--credentials", str(creds), "--out", str(out)
    )
    assert made.returncode == 0, made.stderr
    secret = out.read_text().strip()
    assert out.stat().st_mode & 0o077 == 0 and len(secret) >= 32
    assert secret not in creds.read_text()
    assert gpupool_token("api-token", "--role", "host", "--name", "gpu-1", "--credentials", str(creds),
                         "--out", str(tmp_path / "join")).returncode == 0  # fmt: skip
    table = parse_credentials(creds.read_text())
    assert Identity("tenant", "alice") in table.values() and Identity("host", "gpu-1") in table.values()
    with pytest.raises(Exception, match="line 1"):
        parse_credentials("tenant alice plaintext-token\n")


def test_identity_names_over_the_bound_are_refused_not_cut_into_anothers() -> None:
    """Round 30 cut a credentials line's name, and the tenant an operator names in Allocate, to 128 characters: two
    names that share their first 128 characters were one tenant (each renewed and released the other's leases)."""
    base = "t" * 128
    assert [x.name for x in parse_credentials(credential_line("tenant", base, "a")).values()] == [base]
    with pytest.raises(InvalidArgument, match="line 2: a name of 129 characters"):
        parse_credentials(credential_line("tenant", base, "a") + credential_line("tenant", base + "b", "b"))
    ops = Identity(ADMIN, "ops")
    assert ops.tenant_for(base) == base
    with pytest.raises(InvalidArgument, match="129 characters"):
        ops.tenant_for(base + "b")
