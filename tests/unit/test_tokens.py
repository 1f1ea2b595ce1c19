"""Lease tokens: Ed25519 signatures with key ids, one canonical spelling, rotation, revocation."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from gpupool import errors, tokens

SEED = b"0123456789abcdef0123456789abcdef"


def claims(**kw: object) -> tokens.TokenClaims:
    base: dict[str, object] = dict(
        lease_id="L1", host="h", device=0, quota_bytes=1 << 30, share=0.5, expires_at=time.time() + 60, tenant="t"
    )
    base.update(kw)
    return tokens.TokenClaims(**base)  # type: ignore[arg-type]


def verifier_for(*signers: tokens.Signer) -> tokens.Verifier:
    return tokens.Verifier([s.public for s in signers])


def test_round_trip_with_the_public_key_only() -> None:
    signer = tokens.Signer.from_seed(SEED)
    c = claims()
    token = tokens.mint(signer, c)
    assert token.split(".")[0] == signer.kid and len(signer.kid) == 16
    assert verifier_for(signer).verify(token) == c


def test_another_key_is_refused() -> None:
    token = tokens.mint(tokens.Signer.from_seed(b"another key, same length as SEED"), claims())
    with pytest.raises(errors.Unauthenticated, match="unknown key"):
        verifier_for(tokens.Signer.from_seed(SEED)).verify(token)


def test_a_forged_token_under_the_right_key_id_is_refused() -> None:
    """A daemon (or anyone) with the public key and a real token cannot raise its share or re-sign it."""
    signer = tokens.Signer.from_seed(SEED)
    kid, _, sig = tokens.mint(signer, claims(share=0.25)).split(".")
    body = tokens.mint(signer, claims(share=1.0)).split(".")[1]
    with pytest.raises(errors.Unauthenticated, match="signature"):
        verifier_for(signer).verify(f"{kid}.{body}.{sig}")
    rogue = tokens.Signer.from_seed(b"rogue")
    forged = tokens.mint(rogue, claims(share=1.0)).split(".")
    with pytest.raises(errors.Unauthenticated):
        verifier_for(signer).verify(f"{signer.kid}.{forged[1]}.{forged[2]}")


def test_expired_and_too_long_lived_tokens_are_refused() -> None:
    signer = tokens.Signer.from_seed(SEED)
    with pytest.raises(errors.Unauthenticated, match="expired"):
        verifier_for(signer).verify(tokens.mint(signer, claims(expires_at=time.time() - 1)))
    with pytest.raises(errors.Unauthenticated, match="longer"):
        verifier_for(signer).verify(tokens.mint(signer, claims(expires_at=time.time() + 3 * tokens.MAX_TTL)))


def test_one_canonical_spelling() -> None:
    """Padding, other alphabets, non-canonical trailing bits and re-spelled JSON are all refused."""
    signer = tokens.Signer.from_seed(SEED)
    v = verifier_for(signer)
    token = tokens.mint(signer, claims())
    kid, body, sig = token.split(".")
    assert v.verify(token)
    last = sig[-1]
    twin = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    same_bits = [c for c in twin if c != last and (twin.index(c) >> 4) == (twin.index(last) >> 4)]
    variants = [
        f"{kid}.{body}=.{sig}",
        f"{kid}.{body}.{sig}==",
        f"{kid}.{body}.{sig}".replace("-", "+").replace("_", "/") if "-" in token or "_" in token else "+",
        f"{kid}.{body}.{sig[:-1]}{same_bits[0]}",  # decodes to the same bytes, spelled differently
        f" {token}",
        f"{token}.",
    ]
    # the same claims, spelled with spaces: validly signed by the real key, but not the canonical JSON
    loose = json.dumps(json.loads(base64.urlsafe_b64decode(body + "==")), indent=1).encode()
    loose_body = base64.urlsafe_b64encode(loose).rstrip(b"=").decode()
    head = f"{kid}.{loose_body}"
    variants.append(f"{head}.{base64.urlsafe_b64encode(signer._key.sign(head.encode())).rstrip(b'=').decode()}")
    for bad in variants:
        with pytest.raises(errors.Unauthenticated):
            v.verify(bad)


@pytest.mark.parametrize("bad", ["", "x", "a.b", "a.b.c", "!!.!!.!!", "a" * 5000])
def test_malformed_tokens(bad: str) -> None:
    with pytest.raises(errors.Unauthenticated):
        verifier_for(tokens.Signer.from_seed(SEED)).verify(bad)


def test_claims_out_of_range() -> None:
    signer = tokens.Signer.from_seed(SEED)
    with pytest.raises(errors.Unauthenticated, match="range"):
        verifier_for(signer).verify(tokens.mint(signer, claims(share=1.5)))


def test_each_claim_out_of_range_is_refused_and_the_least_share_is_the_schedulers_unit() -> None:
    """Signed by the scheduler's key and still refused: a share of 0, NaN, past 1 or below the scheduler's unit (1e-6:
    a share of 5e-324 made a device's fair queue charge inf, round 52; on da68e41a it and 1e-7 verified), a negative
    quota or device, a device or quota spelled `true`, an infinite or NaN expiry; the scheduler's least share
    verifies."""
    signer = tokens.Signer.from_seed(SEED)
    v = verifier_for(signer)
    for bad in (
        {"share": 0.0}, {"share": float("nan")}, {"share": 1.0000001}, {"share": 5e-324}, {"share": 1e-7},
        {"quota_bytes": -1}, {"device": -1}, {"device": True}, {"quota_bytes": True},
        {"expires_at": float("inf")}, {"expires_at": float("nan")},
    ):  # fmt: skip
        with pytest.raises(errors.Unauthenticated, match="range|malformed|expired|longer"):
            v.verify(tokens.mint(signer, claims(**bad)))
    assert v.verify(tokens.mint(signer, claims(share=1 / 1_000_000))).share == tokens.MIN_SHARE


def test_revoked_leases_are_refused_until_their_tokens_could_expire() -> None:
    signer = tokens.Signer.from_seed(SEED)
    v = verifier_for(signer)
    token = tokens.mint(signer, claims(lease_id="gone"))
    v.revoke(["gone"])
    with pytest.raises(errors.Unauthenticated, match="released"):
        v.verify(token)
    assert v.verify(tokens.mint(signer, claims(lease_id="kept")))
    assert not v.revoked("gone", time.time() + tokens.MAX_TTL + 1)  # forgotten once no token can be alive


def test_key_files_rotation_with_an_overlap(tmp_path: Path) -> None:
    """Daemons' public key file holds old and new keys during a rotation; dropping the old one refuses its tokens.
    The scheduler's key file is re-read: it signs with the new key without a restart."""
    old_key, new_key = tmp_path / "old.key", tmp_path / "new.key"
    old = tokens.generate_key_file(old_key, tmp_path / "old.pub")
    new = tokens.generate_key_file(new_key, tmp_path / "new.pub")
    assert oct(os.stat(old_key).st_mode & 0o777) == "0o600"
    signer = tokens.load_signer(old_key)
    pub = tmp_path / "daemon.pub"
    pub.write_bytes((tmp_path / "old.pub").read_bytes())
    v = tokens.load_verifier(pub)
    old_token = signer.sign(claims())
    assert v.verify(old_token)

    pub.write_bytes((tmp_path / "old.pub").read_bytes() + (tmp_path / "new.pub").read_bytes())
    v._file._checked = 0  # skip the once-a-second re-check
    assert v.key_ids == sorted([old.kid, new.kid])

    os.replace(new_key, old_key)  # the scheduler's file now holds the new key
    signer._file._checked = 0
    new_token = signer.sign(claims())
    assert new_token.split(".")[0] == new.kid != old_token.split(".")[0]
    assert v.verify(old_token) and v.verify(new_token)  # the overlap window

    pub.write_bytes(b"-----BEGIN PUBLIC KEY-----\nMCow")  # caught half-written: the keys we had stay
    v._file._checked = 0
    assert v.verify(old_token) and v.verify(new_token)

    pub.write_bytes((tmp_path / "new.pub").read_bytes())
    time.sleep(0.01)
    v._file._checked = 0
    with pytest.raises(errors.Unauthenticated, match="unknown key"):
        v.verify(old_token)  # rotated out
    assert v.verify(new_token)


def test_key_files_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUPOOL_TOKEN_KEY_FILE", raising=False)
    monkeypatch.delenv("GPUPOOL_TOKEN_PUBLIC_KEYS", raising=False)
    with pytest.raises(errors.InvalidArgument, match="no token key"):
        tokens.load_signer()
    with pytest.raises(errors.InvalidArgument, match="cannot read"):
        tokens.load_signer(tmp_path / "absent")
    (tmp_path / "hmac.key").write_text("0123456789abcdef0123456789abcdef\n")
    os.chmod(tmp_path / "hmac.key", 0o600)
    with pytest.raises(errors.InvalidArgument, match="not a PEM"):
        tokens.load_signer(tmp_path / "hmac.key")
    (tmp_path / "empty.pub").write_text("")
    with pytest.raises(errors.InvalidArgument, match="no Ed25519 public key"):
        tokens.load_verifier(tmp_path / "empty.pub")
    signer = tokens.generate_key_file(tmp_path / "k", tmp_path / "k.pub")
    monkeypatch.setenv("GPUPOOL_TOKEN_PUBLIC_KEYS", str(tmp_path / "k.pub"))
    assert tokens.load_verifier().key_ids == [signer.kid]
    assert b"PRIVATE" not in (tmp_path / "k.pub").read_bytes()


def test_a_signing_key_others_may_read_is_refused_as_a_tls_key_is(tmp_path: Path) -> None:
    """Whoever reads the scheduler's signing key mints any tenant's token for any host. Until round 33 the key file
    was checked for writers only (config.open_trusted without `secret`): a key left 0644 was used. Refused now at
    start, as a TLS private key is (other users' read bit; a group's read bit, root:gpupool 0640, is how a key is
    shared with a service's group); a key that becomes readable while the scheduler runs is not read again (it keeps
    signing with the key it holds, and says so once)."""
    key = tmp_path / "token.key"
    signer = tokens.generate_key_file(key)
    os.chmod(key, 0o644)
    with pytest.raises(errors.InvalidArgument, match="readable by other users"):
        tokens.load_signer(key)
    os.chmod(key, 0o640)  # shared with a group: allowed, as for TLS keys
    assert tokens.load_signer(key).kid == signer.kid
    os.chmod(key, 0o600)
    running = tokens.load_signer(key)
    other = tmp_path / "other.key"
    tokens.generate_key_file(other)
    os.replace(other, key)
    os.chmod(key, 0o604)  # a new key, readable by everyone: never used
    running._file._checked = 0  # skip the once-a-second re-check
    assert running.sign(claims()).split(".")[0] == signer.kid


def test_status_tokens_are_no_lease_tokens_and_have_one_spelling() -> None:
    """A status token (ops43: the scheduler's grant to an operator of one host's full Status view) verifies as such
    for its host only while it lives; its signature covers a prefix of its own, so it never verifies as a lease
    token nor a lease token as it (the same key signs both); claims other than its three, another view, a NaN, a
    boolean or a non-canonical expiry are refused though signed."""
    signer = tokens.Signer.from_seed(SEED)
    v = verifier_for(signer)
    status = tokens.mint_status(signer, "h", ttl=60)
    assert v.verify_status(status) == "h"
    with pytest.raises(errors.Unauthenticated, match="signature does not match"):
        v.verify(status)
    with pytest.raises(errors.Unauthenticated, match="signature does not match"):
        v.verify_status(tokens.mint(signer, claims()))
    with pytest.raises(errors.Unauthenticated, match="expired"):
        v.verify_status(tokens.mint_status(signer, "h", ttl=-1))
    with pytest.raises(errors.Unauthenticated, match="lives longer"):
        v.verify_status(tokens.mint_status(signer, "h", ttl=tokens.STATUS_TTL + 120))
    with pytest.raises(errors.Unauthenticated, match="unknown key"):
        v.verify_status(tokens.mint_status(tokens.Signer.from_seed(b"another"), "h"))
    later = round(time.time() + 60, 3)
    for body in (
        {"expires_at": later, "host": "h", "view": "all", "tenant": "t"},
        {"expires_at": later, "host": "h", "view": "some"},
        {"expires_at": later, "host": "h"},
        {"expires_at": True, "host": "h", "view": "all"},
        {"expires_at": float("nan"), "host": "h", "view": "all"},
        {"expires_at": str(later), "host": "h", "view": "all"},
        {"expires_at": later, "host": 7, "view": "all"},
    ):
        raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        with pytest.raises(errors.Unauthenticated, match="malformed status token"):
            v.verify_status(signer._sign(raw, tokens.STATUS_DOMAIN))
    spaced = json.dumps({"expires_at": later, "host": "h", "view": "all"}, sort_keys=True).encode()  # ", " and ": "
    with pytest.raises(errors.Unauthenticated, match="non-canonical|malformed"):
        v.verify_status(signer._sign(spaced, tokens.STATUS_DOMAIN))
