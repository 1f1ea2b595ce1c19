"""Revoked client certificates (round 45, control45): the scheduler's deny list, by fingerprint.

A certificate is named by its fingerprint, ``sha256:<64 hex>``: the SHA-256 of its DER (what `openssl x509
-fingerprint -sha256` prints, colons and case aside). An operator revokes one with `gpupool cert revoke` (the
scheduler's `RevokeCertificates`, admins only); the scheduler keeps the list in its state (SQLite, PostgreSQL) and
refuses a revoked certificate on every call (UNAUTHENTICATED, whatever API token the call carries), and tells its
daemons the list in their heartbeat replies (whole, when its version differs from the daemon's), which refuse the
certificate on every call and side-socket hello where they see client certificates (`--tls-client-auth require`).
Until round 45 a certificate of the pool's CA could not be revoked before it expired (an admin's got fresh status
tokens for as long).
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
from collections.abc import Iterable
from typing import Any

from gpupool.errors import InvalidArgument

PREFIX = "sha256:"
MAX_REVOKED = 10_000  # a heartbeat reply carries the list whole (~72 bytes an entry: 720 KB at most)
_HEX = re.compile(r"[0-9a-f]{64}")
_CACHE = 1024  # fingerprints of PEMs seen (a connection's certificate, every call): bounded


def fingerprint_der(der: bytes) -> str:
    return PREFIX + hashlib.sha256(der).hexdigest()


def fingerprint_pem(pem: bytes | str) -> str:
    """The fingerprint of a PEM certificate (the first one of the text); InvalidArgument if it holds none."""
    text = pem.decode(errors="replace") if isinstance(pem, bytes) else pem
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise InvalidArgument("no PEM certificate in it")
    try:
        return fingerprint_der(ssl.PEM_cert_to_DER_cert(text[start : stop + len(end)]))
    except ValueError as exc:
        raise InvalidArgument(f"not a PEM certificate ({exc})") from exc


def normalize(text: str) -> str:
    """``sha256:<64 lowercase hex>`` from what an operator may paste: with or without the prefix, upper or lower
    case, colon-separated (openssl's `SHA256 Fingerprint=AB:CD:...`). InvalidArgument for anything else."""
    raw = text.strip()
    if "=" in raw and raw.lower().startswith("sha256 fingerprint="):
        raw = raw.split("=", 1)[1]
    if raw.lower().startswith(PREFIX):
        raw = raw[len(PREFIX) :]
    raw = raw.replace(":", "").lower()
    if not _HEX.fullmatch(raw):
        shown = text[:80].encode("unicode_escape").decode()
        raise InvalidArgument(f"{shown!r} is no certificate fingerprint: expected sha256:<64 hex digits>")
    return PREFIX + raw


def version_of(fingerprints: Iterable[str]) -> str:
    """A digest of the list (never empty: "" means "no list" on the wire)."""
    return "v1:" + hashlib.sha256("\n".join(sorted(fingerprints)).encode()).hexdigest()[:32]


def peer_pem(context: Any) -> bytes | None:
    """The client certificate (PEM) a gRPC call's TLS layer verified, if it saw exactly one."""
    raw = context.auth_context().get("x509_pem_cert") or []
    pem = [raw] if isinstance(raw, bytes) else list(raw)
    return pem[0] if len(pem) == 1 else None


class RevokedCerts:
    """The set of revoked fingerprints and its version, replaced whole; `refused_pem` answers for a call's
    certificate (its fingerprint cached by the PEM's bytes: a connection presents the same one at every call)."""

    def __init__(self, fingerprints: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._set: frozenset[str] = frozenset()
        self.version = ""
        self._seen: dict[bytes, str] = {}
        self.replace(fingerprints)

    def replace(self, fingerprints: Iterable[str], version: str = "") -> bool:
        """Take this list (whole); True if it differs from the one held."""
        new = frozenset(fingerprints)
        with self._lock:
            changed = new != self._set
            self._set = new
            self.version = version or version_of(new)
            return changed

    def fingerprints(self) -> list[str]:
        with self._lock:
            return sorted(self._set)

    def __len__(self) -> int:
        return len(self._set)

    def refused_der(self, der: bytes) -> str:
        """The fingerprint of `der` if it is revoked, else ""."""
        if not self._set:
            return ""
        fp = fingerprint_der(der)
        return fp if fp in self._set else ""

    def refused_pem(self, pem: bytes | None) -> str:
        """The fingerprint of `pem` (a call's certificate) if it is revoked, else ""."""
        if pem is None or not self._set:
            return ""
        fp = self._seen.get(pem)
        if fp is None:
            try:
                fp = fingerprint_pem(pem)
            except InvalidArgument:
                return ""
            with self._lock:
                if len(self._seen) >= _CACHE:
                    self._seen.clear()
                self._seen[pem] = fp
        return fp if fp in self._set else ""
