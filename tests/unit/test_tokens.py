"""Lease tokens: round trip, forgery, expiry, malformed input, key loading."""

from __future__ import annotations

import time

import pytest

from gpupool import tokens
from gpupool.errors import InvalidArgument, Unauthenticated

KEY = b"k" * 32


def claims(**kw: object) -> tokens.TokenClaims:
    base: dict[str, object] = dict(
        lease_id="L1", host="h", device=0, quota_bytes=1 << 30, share=0.5, expires_at=time.time() + 60, tenant="t"
    )
    base.update(kw)
    return tokens.TokenClaims(**base)  # type: ignore[arg-type]


def test_round_trip() -> None:
    c = claims()
    assert tokens.verify(KEY, tokens.mint(KEY, c)) == c


def test_other_key_is_refused() -> None:
    token = tokens.mint(b"x" * 32, claims())
    with pytest.raises(Unauthenticated, match="signature"):
        tokens.verify(KEY, token)


def test_tampered_claims_are_refused() -> None:
    token = tokens.mint(KEY, claims(share=0.25))
    body, sig = token.split(".")
    forged = tokens.mint(KEY, claims(share=1.0)).split(".")[0]
    assert forged != body
    with pytest.raises(Unauthenticated):
        tokens.verify(KEY, f"{forged}.{sig}")


def test_expired_is_refused() -> None:
    token = tokens.mint(KEY, claims(expires_at=time.time() - 1))
    with pytest.raises(Unauthenticated, match="expired"):
        tokens.verify(KEY, token)


@pytest.mark.parametrize("bad", ["", "abc", "a.b.c", "!!!.???", "x" * 5000, "e30.AAAA"])
def test_malformed_is_refused(bad: str) -> None:
    with pytest.raises(Unauthenticated):
        tokens.verify(KEY, bad)


def test_out_of_range_claims_are_refused() -> None:
    with pytest.raises(Unauthenticated, match="range"):
        tokens.verify(KEY, tokens.mint(KEY, claims(share=1.5)))


def test_key_file(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "key"
    key = tokens.generate_key_file(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert tokens.load_key(path) == key
    monkeypatch.setenv("GPUPOOL_TOKEN_KEY_FILE", str(path))
    assert tokens.load_key() == key


def test_missing_key(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("GPUPOOL_TOKEN_KEY_FILE", raising=False)
    monkeypatch.delenv("GPUPOOL_TOKEN_KEY", raising=False)
    with pytest.raises(InvalidArgument, match="no token key"):
        tokens.load_key()
    with pytest.raises(InvalidArgument, match="cannot read"):
        tokens.load_key(tmp_path / "absent")
