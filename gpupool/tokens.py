"""Lease tokens: HMAC-SHA256-signed claims that let a daemon admit a session without asking the scheduler.

Format: ``base64url(json claims) "." base64url(hmac_sha256(key, json claims))``. The claims are plain JSON
(parsed with `json.loads`, never evaluated); the signature covers their exact bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gpupool.errors import InvalidArgument, Unauthenticated

KEY_ENV = "GPUPOOL_TOKEN_KEY"
KEY_FILE_ENV = "GPUPOOL_TOKEN_KEY_FILE"
MAX_TOKEN_LENGTH = 4096


@dataclass(frozen=True)
class TokenClaims:
    """What a token grants: one device of one host, a memory quota and a compute share, until expiry.

    ``quota_bytes == 0`` means "share x the device's capacity" (tokens minted without knowing the device).
    """

    lease_id: str
    host: str
    device: int
    quota_bytes: int
    share: float
    expires_at: float
    tenant: str = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint(key: bytes, claims: TokenClaims) -> str:
    """Sign claims with the shared key."""
    if not key:
        raise InvalidArgument("empty token key")
    body = json.dumps(asdict(claims), sort_keys=True, separators=(",", ":")).encode()
    sig = hmac.new(key, body, hashlib.sha256).digest()
    return f"{_b64(body)}.{_b64(sig)}"


def verify(key: bytes, token: str, *, now: float | None = None) -> TokenClaims:
    """Check the signature and expiry; raise Unauthenticated for anything forged, malformed or expired."""
    if not token:
        raise Unauthenticated("missing lease token")
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
        raise Unauthenticated("malformed lease token")
    body_b64, sig_b64 = token.split(".")
    try:
        body, sig = _unb64(body_b64), _unb64(sig_b64)
    except (binascii.Error, ValueError) as exc:
        raise Unauthenticated("malformed lease token") from exc
    if not hmac.compare_digest(sig, hmac.new(key, body, hashlib.sha256).digest()):
        raise Unauthenticated("lease token signature does not match (forged, or signed with another key)")
    try:
        raw = json.loads(body)
        claims = TokenClaims(
            lease_id=str(raw["lease_id"]),
            host=str(raw["host"]),
            device=int(raw["device"]),
            quota_bytes=int(raw["quota_bytes"]),
            share=float(raw["share"]),
            expires_at=float(raw["expires_at"]),
            tenant=str(raw.get("tenant", "")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise Unauthenticated("malformed lease token claims") from exc
    if not 0.0 < claims.share <= 1.0 or claims.quota_bytes < 0 or claims.device < 0:
        raise Unauthenticated("lease token claims out of range")
    if claims.expires_at <= (time.time() if now is None else now):
        raise Unauthenticated(f"lease token of lease {claims.lease_id} expired")
    return claims


def load_key(path: str | os.PathLike[str] | None = None) -> bytes:
    """The shared key: from `path`, else $GPUPOOL_TOKEN_KEY_FILE, else $GPUPOOL_TOKEN_KEY (hex or text)."""
    path = path or os.environ.get(KEY_FILE_ENV) or None
    if path:
        try:
            key = Path(path).read_bytes().strip()
        except OSError as exc:
            raise InvalidArgument(f"cannot read token key file {path}: {exc.strerror}") from exc
    else:
        key = os.environ.get(KEY_ENV, "").strip().encode()
    if len(key) < 16:
        raise InvalidArgument(
            "no token key: pass --token-key-file, or set GPUPOOL_TOKEN_KEY_FILE or GPUPOOL_TOKEN_KEY (>= 16 bytes)"
        )
    return key


def generate_key_file(path: str | os.PathLike[str]) -> bytes:
    """Write a fresh random key (64 hex characters), readable by the owner only."""
    key = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    return key


def public_session_id(session_id: str) -> str:
    """What Status and heartbeats show of a session: a tag that names it without granting it. The session id
    itself is a bearer credential (Stream and Detach take it), so it never leaves the session's own client."""
    return hashlib.sha256(b"gpupool-session:" + session_id.encode()).hexdigest()[:16]
