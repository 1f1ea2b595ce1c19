"""Lease tokens: Ed25519-signed claims that let a daemon admit a session without asking the scheduler.

Format: ``<kid> "." base64url(claims) "." base64url(signature over "<kid>.<claims>")`` where kid is 16 hex
characters naming the signing key (sha256 of its raw public key) and the claims are canonical JSON (sorted keys,
no spaces). There is one spelling per token: base64url without padding whose decoding re-encodes to the same
text, claims that re-serialize to the same bytes; anything else is refused as malformed.

The scheduler holds the private key (`--token-key-file`, PEM) and signs with it; daemons hold only public keys
(`--token-public-keys`, a PEM file of one or more keys), so a compromised GPU host cannot mint tokens. Both files
are re-read when they change: rotate by adding the new public key to every daemon's file, then replacing the
scheduler's private key, then (after the longest lease TTL) removing the old public key. A `Verifier` also keeps
the leases the scheduler revoked (released, expired, lost), refusing their tokens until they could have expired:
each until the time the scheduler says its last token may live (`HeartbeatReply.revoked_until`), at most `MAX_TTL`
from its revocation. Never fewer: until round 43 the oldest of 200,000 was forgotten, and a tenant that cycled leases
past that attached again with the forgotten one's token. Their number is the scheduler's bound
(`--tenant-max-revoked` a tenant, docs/security.md "Red team, round 43").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gpupool.config import UnsafeFile, read_trusted, write_secret
from gpupool.errors import InvalidArgument, Unauthenticated

log = logging.getLogger(__name__)
KEY_FILE_ENV = "GPUPOOL_TOKEN_KEY_FILE"
PUBLIC_KEYS_ENV = "GPUPOOL_TOKEN_PUBLIC_KEYS"
MAX_TOKEN_LENGTH = 4096
MAX_TTL = 24 * 3600.0  # no token lives longer; so a revoked lease is remembered at most this long
_CLAIM_FIELDS = ("device", "expires_at", "host", "lease_id", "quota_bytes", "share", "tenant")
# Written only when they differ from these defaults (one spelling per token): absent = the default.
_OPTIONAL_CLAIMS: dict[str, object] = {"network": False, "group": "", "cert": ""}
# Status tokens (`mint_status`): the same shape as a lease token (kid.claims.signature), their signatures over this
# prefix first, so that no signature of one kind verifies as the other's.
STATUS_DOMAIN = b"gpupool-status-token\0"
STATUS_TTL = 120.0
# The least compute share a token grants: the scheduler's unit (scheduler/capacity.py SHARE_UNITS). A device's fair
# queue charges a session seconds / share (server/fairqueue.py): a share of 5e-324 made it inf, and the device's
# virtual clock with it, after which the queue served its sessions in list order (one busy session starved the rest:
# round 52, tokq52).
MIN_SHARE = 1 / 1_000_000


@dataclass(frozen=True)
class TokenClaims:
    """What a token grants: one device of one host, a memory quota and a compute share, until expiry.

    ``quota_bytes == 0`` means "share x the device's capacity" (tokens minted without knowing the device).
    ``network``: the session's worker may open TCP sockets (torch.distributed between the daemons of a lease of
    several devices; the scheduler grants it to those only). Absent from the encoding when False, so tokens
    minted before it existed keep their one spelling.
    ``group``: a secret the scheduler derives per lease of several devices (`lease_group`), the same in every
    token of the lease, renewed or not: the daemons key a collective group's store and links from it, so ranks
    whose processes renewed the lease at different moments still agree. Absent from hand-minted tokens.
    ``cert``: the fingerprint (``sha256:<64 hex>``, `certrevoke.fingerprint_der`) of the client certificate the lease
    was allocated with (round 46): a daemon that sees client certificates (`--tls-client-auth require`) attaches the
    token only for a caller presenting that certificate, so a token is no bearer credential there. Absent (anyone's)
    for leases allocated with an API token, for an operator's lease for a named tenant, for hand-minted tokens and
    for tokens from before round 46.
    """

    lease_id: str
    host: str
    device: int
    quota_bytes: int
    share: float
    expires_at: float
    tenant: str = ""
    network: bool = False
    group: str = ""
    cert: str = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    """Strict base64url: no padding, no other characters, and the one canonical spelling of its bytes."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def _canonical(claims: TokenClaims) -> bytes:
    raw = asdict(claims)
    for name, value in _OPTIONAL_CLAIMS.items():
        if raw[name] == value:
            del raw[name]
    return json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class _Watched:
    """A small file re-read at most once a second; `changed()` answers its content when that differs from last time
    (content, not timestamps: two writes within one coarse mtime tick must not go unnoticed)."""

    def __init__(
        self, path: str | os.PathLike[str] | None, what: str = "token key file", *, secret: bool = False
    ) -> None:
        self.path = Path(path) if path else None
        self.what = what
        self.secret = secret  # a private key: refused also when other users may read it (config.open_trusted)
        self._data: bytes | None = None
        self._checked = 0.0
        self._unsafe = False  # the last read was refused as writable by others (said once, not every second)
        self._lock = threading.Lock()

    def changed(self) -> bytes | None:
        """The new content when the file changed since last time, else None."""
        if self.path is None:
            return None
        with self._lock:
            now = time.monotonic()
            if self._data is not None and now - self._checked < 1.0:
                return None
            self._checked = now
            try:
                data = read_trusted(self.path, self.what, secret=self.secret)
            except OSError as exc:
                if self._data is None:
                    raise InvalidArgument(f"cannot read {self.what} {self.path}: {exc.strerror or exc}") from exc
                if isinstance(exc, UnsafeFile) and not self._unsafe:
                    log.warning("%s; keeping the keys read before", exc)
                self._unsafe = isinstance(exc, UnsafeFile)
                return None  # keep the keys we have while the file is being replaced (or is refused)
            self._unsafe = False
            if data == self._data:
                return None
            self._data = data
            return data

    def retry(self) -> None:
        """What was read could not be used (e.g. a half-written file): read it again at the next check."""
        with self._lock:
            self._data = b"\0unusable"


class Signer:
    """The scheduler's signing key (reloaded from its file when that changes)."""

    def __init__(self, key: Ed25519PrivateKey, path: str | os.PathLike[str] | None = None) -> None:
        self._key = key
        self.kid = key_id(key.public_key())
        self._file = _Watched(path, secret=True)
        if path:
            self._file.changed()  # remember the stamp of what we loaded

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        """A deterministic key from any secret bytes (tests; `gpupool token --seed`)."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    @property
    def public(self) -> Ed25519PublicKey:
        self._reload()
        return self._key.public_key()

    def secret(self) -> bytes:
        """Key material for derived secrets (`lease_group`), never the signing key itself."""
        self._reload()
        return hashlib.sha256(b"gpupool-derive\0" + self._key.private_bytes_raw()).digest()

    def _reload(self) -> None:
        data = self._file.changed()
        if data is None:
            return
        try:
            key = _parse_private(data, str(self._file.path))
        except InvalidArgument as exc:
            log.warning("token key file changed but is unusable (still signing with key %s): %s", self.kid, exc)
            self._file.retry()
            return
        if key_id(key.public_key()) != self.kid:
            log.info("token signing key changed: now key %s", key_id(key.public_key()))
        self._key, self.kid = key, key_id(key.public_key())

    def sign(self, claims: TokenClaims) -> str:
        return self._sign(_canonical(claims), b"")

    def sign_status(self, host: str, expires_at: float) -> str:
        """A status token (`mint_status`): its signature covers `STATUS_DOMAIN` first, so no lease token's
        signature is one, and the other way round."""
        return self._sign(_status_body(host, expires_at), STATUS_DOMAIN)

    def _sign(self, body: bytes, domain: bytes) -> str:
        self._reload()
        head = f"{self.kid}.{_b64(body)}"
        return f"{head}.{_b64(self._key.sign(domain + head.encode()))}"


class Verifier:
    """Public keys by key id (reloaded from their file) and the set of revoked leases."""

    def __init__(self, keys: list[Ed25519PublicKey] | None = None, path: str | os.PathLike[str] | None = None):
        self._keys = {key_id(k): k for k in keys or []}
        self._file = _Watched(path, "token public keys file")
        # lease -> until when one of its tokens may be presented; the heap orders them by that time (an entry whose
        # time is not the dict's any more, revoked again since, is passed over).
        self._revoked: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []
        # Status tokens minted before this (the scheduler's `HeartbeatReply.status_tokens_not_before`) are refused.
        self._status_not_before = 0.0
        self.changes = 0  # counts what `revoke` and `status_not_before` added (a daemon's revocations file: when due)
        self._lock = threading.Lock()
        self._reload()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Verifier:
        v = cls(path=path)
        if not v.key_ids:
            raise InvalidArgument(f"no Ed25519 public key in {path}")
        return v

    @classmethod
    def from_pems(cls, pems: list[str]) -> Verifier:
        """A verifier of these PEM public keys (no file behind it)."""
        return cls([k for pem in pems for k in _parse_public(pem.encode(), "public keys")])

    def public_pems(self) -> list[str]:
        """The public keys now accepted, as PEM text (for a session worker's own verifier)."""
        self._reload()
        with self._lock:
            return [public_pem(k).decode() for k in self._keys.values()]

    @property
    def key_ids(self) -> list[str]:
        self._reload()
        return sorted(self._keys)

    def _reload(self) -> None:
        data = self._file.changed()
        if data is None:
            return
        try:
            keys = _parse_public(data, str(self._file.path), strict=not self._keys)
            if not keys and self._keys:
                raise InvalidArgument("no public key in it")
        except InvalidArgument as exc:
            if not self._keys:
                raise
            # A half-written file during a rotation must not lock every client out: keep the keys we have.
            log.warning("token public keys file changed but is unusable (keeping %s): %s", sorted(self._keys), exc)
            self._file.retry()
            return
        with self._lock:
            if sorted(key_id(k) for k in keys) != sorted(self._keys):
                log.info("token public keys now: %s", ", ".join(sorted(key_id(k) for k in keys)))
            self._keys = {key_id(k): k for k in keys}

    def revoke(self, lease_ids: list[str], now: float | None = None, until: list[float] | None = None) -> None:
        """Refuse tokens of these leases from now on, each until `until[i]` (when its last token expires, as the
        scheduler knows it; missing, NaN or later than `MAX_TTL` from now: `MAX_TTL` from now). Forgotten only by
        time, never by count: how many there can be is the scheduler's bound (`--tenant-max-revoked`)."""
        now = time.time() if now is None else now
        longest = now + MAX_TTL
        with self._lock:
            for i, lease_id in enumerate(lease_ids):
                when = until[i] if until is not None and i < len(until) else longest
                when = min(when, longest) if math.isfinite(when) else longest
                if when <= now or when <= self._revoked.get(lease_id, 0.0):
                    continue
                self._revoked[lease_id] = when
                heapq.heappush(self._expiry, (when, lease_id))
                self.changes += 1
            self._forget(now)

    def _forget(self, now: float) -> None:
        """Drop the revocations whose tokens have all expired (the lock held)."""
        while self._expiry and self._expiry[0][0] <= now:
            when, lease_id = heapq.heappop(self._expiry)
            if self._revoked.get(lease_id) == when:
                del self._revoked[lease_id]

    def status_not_before(self, when: float) -> None:
        """Refuse from now on the status tokens minted before `when` (the scheduler's clock: its start, or its last
        sight of an admin API token removed): never moved back (a NaN or an older time is passed over)."""
        if math.isfinite(when):
            # Never past our clock and a minute (round 45): a scheduler's clock that ran far ahead made this refuse
            # every status token until the daemon restarted (it only moves forward).
            when = min(when, time.time() + 60.0)
            with self._lock:
                if when > self._status_not_before:
                    self._status_not_before = when
                    self.changes += 1

    def revocations(self, now: float | None = None) -> tuple[dict[str, float], float]:
        """(the revoked leases, each until when its tokens may live; the status tokens' not-before): what a daemon
        keeps on disk (server/revocations.py)."""
        with self._lock:
            self._forget(time.time() if now is None else now)
            return dict(self._revoked), self._status_not_before

    def revoked(self, lease_id: str, now: float) -> bool:
        with self._lock:
            self._forget(now)
            return lease_id in self._revoked

    def verify(self, token: str, now: float | None = None) -> TokenClaims:
        now = time.time() if now is None else now
        claims = _claims(self._signed(token, b"", "lease token"))
        if claims.expires_at <= now:
            raise Unauthenticated(f"lease token of lease {claims.lease_id} expired")
        if claims.expires_at > now + MAX_TTL + 60:
            raise Unauthenticated(f"lease token lives longer than {MAX_TTL:g} s")
        if self.revoked(claims.lease_id, now):
            raise Unauthenticated(f"lease {claims.lease_id} was released or revoked")
        return claims

    def verify_status(self, token: str, now: float | None = None) -> str:
        """The host a status token (`mint_status`) grants the full Status view of; Unauthenticated for anything
        else: a lease token, another signer's, an altered, expired or too long-lived one."""
        now = time.time() if now is None else now
        body = self._signed(token, STATUS_DOMAIN, "status token")
        try:
            raw = json.loads(body)
            if not isinstance(raw, dict) or sorted(raw) != ["expires_at", "host", "view"] or raw["view"] != "all":
                raise ValueError("unexpected fields")
            host, expires_at = raw["host"], raw["expires_at"]
            if not isinstance(host, str) or type(expires_at) not in (int, float) or not math.isfinite(expires_at):
                raise ValueError("wrong types")
            if _status_body(host, expires_at) != body:
                raise ValueError("non-canonical claims")
        except (ValueError, TypeError) as exc:
            raise Unauthenticated("malformed status token claims") from exc
        if expires_at <= now:
            raise Unauthenticated("status token expired (smi fetches a fresh one from the scheduler every poll)")
        if expires_at > now + STATUS_TTL + 60:
            raise Unauthenticated(f"status token lives longer than {STATUS_TTL:g} s")
        if expires_at - STATUS_TTL <= self._status_not_before:
            raise Unauthenticated(
                "status token minted before the scheduler last restarted or lost an admin credential: revoked "
                "(smi fetches a fresh one from the scheduler every poll)"
            )
        return host

    def _signed(self, token: str, domain: bytes, what: str) -> bytes:
        """The claims of `token` (a `what`) whose signature, over `domain` and its head, one of our keys made."""
        self._reload()
        if not token:
            raise Unauthenticated(f"missing {what}")
        if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
            raise Unauthenticated(f"malformed {what}")
        kid, body_b64, sig_b64 = token.split(".")
        try:
            body, sig = _unb64(body_b64), _unb64(sig_b64)
        except (binascii.Error, ValueError) as exc:
            raise Unauthenticated(f"malformed {what}") from exc
        key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated(f"{what} signed with unknown key {kid[:16]!r} (rotated out, or forged)")
        try:
            key.verify(sig, domain + f"{kid}.{body_b64}".encode())
        except InvalidSignature as exc:
            raise Unauthenticated(f"{what} signature does not match (forged or altered)") from exc
        return body


def _status_body(host: str, expires_at: float) -> bytes:
    return json.dumps(
        {"expires_at": expires_at, "host": host, "view": "all"}, sort_keys=True, separators=(",", ":")
    ).encode()


def _claims(body: bytes) -> TokenClaims:
    try:
        raw = json.loads(body)
        if not isinstance(raw, dict) or tuple(sorted(k for k in raw if k not in _OPTIONAL_CLAIMS)) != _CLAIM_FIELDS:
            raise ValueError("unexpected fields")
        claims = TokenClaims(**raw)
        types: tuple[type | tuple[type, ...], ...] = (
            str, str, int, int, (int, float), (int, float), str, bool, str, str,
        )  # fmt: skip
        fields = TokenClaims.__dataclass_fields__
        if any(not isinstance(getattr(claims, f), t) for f, t in zip(fields, types, strict=True)):
            raise ValueError("wrong types")
        # JSON `true` is a Python int too: `"device":true` would be a second spelling of device 1.
        if any(type(getattr(claims, f)) is bool for f in ("device", "quota_bytes", "share", "expires_at")):
            raise ValueError("wrong types")
        if _canonical(claims) != body:
            raise ValueError("non-canonical claims")
    except (ValueError, TypeError) as exc:
        raise Unauthenticated("malformed lease token claims") from exc
    # json.loads reads NaN and Infinity: a NaN expiry passes every comparison with the clock (it never expires).
    if (
        not MIN_SHARE <= claims.share <= 1.0
        or claims.quota_bytes < 0
        or claims.device < 0
        or not math.isfinite(claims.expires_at)
        or (claims.group and not _GROUP_RE.fullmatch(claims.group))
        or (claims.cert and not _CERT_RE.fullmatch(claims.cert))
    ):
        raise Unauthenticated("lease token claims out of range")
    return claims


def _parse_private(data: bytes, where: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: not a PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"{where}: not an Ed25519 key (make one with `gpupool token keygen`)")
    return key


def _parse_public(data: bytes, where: str, *, strict: bool = True) -> list[Ed25519PublicKey]:
    """The Ed25519 public keys of a PEM file. `strict` (a daemon's start): InvalidArgument for a block that is none.
    Otherwise (a file changed while the daemon runs) such blocks are left out with one warning, and the keys of the
    others are the keys: until round 35 one bad block kept every key read before, so the old key an operator removed
    in the same edit (rotation, step 3) still admitted its tokens for as long as the daemon ran."""
    keys = []
    for n, block in enumerate(data.split(b"-----END PUBLIC KEY-----")[:-1], 1):
        try:
            key = serialization.load_pem_public_key(block + b"-----END PUBLIC KEY-----\n")
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 public key")
        except ValueError as exc:
            if strict:
                raise InvalidArgument(f"{where}: bad PEM public key ({exc})") from exc
            log.warning("%s: public key %d left out, not an Ed25519 PEM public key: %s", where, n, exc)
            continue
        keys.append(key)
    return keys


KeyLike = Signer | Verifier | bytes


def _signer(key: Signer | bytes) -> Signer:
    if isinstance(key, Signer):
        return key
    if not key:
        raise InvalidArgument("empty token key")
    return Signer.from_seed(key)


_GROUP_RE = re.compile(r"[0-9a-f]{64}")
_CERT_RE = re.compile(r"sha256:[0-9a-f]{64}")


def lease_group(key: Signer | bytes, lease_id: str) -> str:
    """The `group` claim of a lease's tokens: HMAC-SHA256 of the lease id under the signing key's private bytes
    (stable across renewals, unknowable without the key; a rotated key gives later tokens another value)."""
    return hmac.new(_signer(key).secret(), b"gpupool-lease-group\0" + lease_id.encode(), hashlib.sha256).hexdigest()


def mint(key: Signer | bytes, claims: TokenClaims) -> str:
    """Sign claims (`key` given as bytes is a seed: see Signer.from_seed)."""
    return _signer(key).sign(claims)


def mint_status(key: Signer | bytes, host: str, *, ttl: float = STATUS_TTL, now: float | None = None) -> str:
    """A status token: the scheduler's grant to an operator (an admin's ListPool, one a host) of host `host`'s full
    Status view, every session, for `ttl` seconds, where its daemon sees no client certificate (`--tls-client-auth
    none`, serve's default). Bound to the host (a daemon refuses another's) and short-lived; never a lease token."""
    # (rounded down, never up: its mint time, `expires_at` less STATUS_TTL, is never later than the minting, which
    # `status_tokens_not_before` is compared with)
    return _signer(key).sign_status(host, math.floor(((time.time() if now is None else now) + ttl) * 1000) / 1000)


def verify(key: KeyLike, token: str, *, now: float | None = None) -> TokenClaims:
    """Check the signature, key id, expiry and revocation; raise Unauthenticated for anything else."""
    verifier = key if isinstance(key, Verifier) else Verifier([_signer(key).public])
    return verifier.verify(token, now)


def verify_status(key: KeyLike, token: str, *, now: float | None = None) -> str:
    """The host a status token grants the full Status view of (`Verifier.verify_status`)."""
    verifier = key if isinstance(key, Verifier) else Verifier([_signer(key).public])
    return verifier.verify_status(token, now)


def load_signer(path: str | os.PathLike[str] | None = None) -> Signer:
    """The scheduler's key: from `path`, else $GPUPOOL_TOKEN_KEY_FILE."""
    path = path or os.environ.get(KEY_FILE_ENV) or None
    if not path:
        raise InvalidArgument("no token key: pass --token-key-file (make one with `gpupool token keygen FILE`)")
    try:
        data = read_trusted(path, "token key file", secret=True)
    except UnsafeFile as exc:
        raise InvalidArgument(str(exc)) from exc
    except OSError as exc:
        raise InvalidArgument(f"cannot read token key file {path}: {exc.strerror or exc}") from exc
    return Signer(_parse_private(data, str(path)), path)


def load_verifier(path: str | os.PathLike[str] | None = None) -> Verifier:
    """A daemon's public keys: from `path`, else $GPUPOOL_TOKEN_PUBLIC_KEYS."""
    path = path or os.environ.get(PUBLIC_KEYS_ENV) or None
    if not path:
        raise InvalidArgument(
            "no token public keys: pass --token-public-keys (write them with `gpupool token public-key`)"
        )
    return Verifier.from_file(path)


def generate_key_file(path: str | os.PathLike[str], public_path: str | os.PathLike[str] | None = None) -> Signer:
    """Write a fresh Ed25519 private key (PEM, owner-only) and, if asked, its public key next to it."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_secret(path, pem)
    if public_path is not None:
        Path(public_path).write_bytes(public_pem(key.public_key()))
        os.chmod(public_path, 0o644)  # for every reader, writable by its owner only whatever the umask (read_trusted)
    return Signer(key, path)


def unverified_claim(token: str, name: str) -> str:
    """A claim of a token, without checking it (a client's choices: the daemon's TLS name, whether a collective
    join needs other ranks' tokens); "" if absent or unreadable. The daemon verifies whatever the client sends."""
    try:
        return str(json.loads(_unb64(token.split(".")[1])).get(name, ""))
    except (IndexError, ValueError, AttributeError, binascii.Error):
        return ""


def unverified_host(token: str) -> str:
    """The host a token names, without checking it (a client picks the daemon's TLS name by it); "" if unreadable."""
    return unverified_claim(token, "host")


def public_session_id(session_id: str) -> str:
    """What Status and heartbeats show of a session: a tag that names it without granting it. The session id
    itself is a bearer credential (Stream and Detach take it), so it never leaves the session's own client."""
    return hashlib.sha256(b"gpupool-session:" + session_id.encode()).hexdigest()[:16]


def public_pems(key: KeyLike) -> list[str]:
    """The public keys a verifier of `key` accepts, as PEM text (bytes: a test seed's one public key)."""
    if isinstance(key, Verifier):
        return key.public_pems()
    return [public_pem(_signer(key).public).decode()] if key else []
