"""Revoked client certificates (round 45, control45): the scheduler's deny list, by fingerprint.

A certificate is named by its fingerprint, ``sha256:<64 hex>``: the SHA-256 of its DER (what `openssl x509 -fingerprint
-sha256` prints, colons and case aside); an ECDSA certificate's twins (`twins_der`: its signature's other valid form)
are refused as the certificate (round 45, secrev45). An operator revokes one with `gpupool cert revoke` (the scheduler's
`RevokeCertificates`, admins only); the scheduler keeps the list in its state (SQLite, PostgreSQL) and refuses a revoked
certificate on every call (UNAUTHENTICATED, whatever API token the call carries), and tells its daemons the list in
their heartbeat replies (whole, when its version differs from the daemon's), which refuse the certificate on every call
and side-socket hello where they see client certificates (`--tls-client-auth require`). Until round 45 a certificate of
the pool's CA could not be revoked before it expired (an admin's got fresh status tokens for as long).
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpupool.errors import GpupoolError, InvalidArgument

PREFIX = "sha256:"
MAX_REVOKED = 10_000  # a heartbeat reply carries the list whole (~72 bytes an entry: 720 KB at most)
_HEX = re.compile(r"[0-9a-f]{64}")
_CACHE = 1024  # fingerprints of PEMs seen (a connection's certificate, every call): bounded


def fingerprint_der(der: bytes) -> str:
    return PREFIX + hashlib.sha256(der).hexdigest()


# The orders of the curves a CA's ECDSA key may be on (P-256, P-384, P-521): `twins_der`.
_ORDERS = (
    0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973,
    0x01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409,
)


def _tlv(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, where its content starts, where it ends) of the DER element at `at`; ValueError past the end."""
    tag, size, start = data[at], data[at + 1], at + 2
    if size & 0x80:
        count = size & 0x7F
        size, start = int.from_bytes(data[start : start + count], "big"), start + count
    if start + size > len(data):
        raise ValueError("truncated DER")
    return tag, start, start + size


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def twins_der(der: bytes) -> list[bytes]:
    """The other certificates the CA's signature of `der` also makes valid: an ECDSA signature (r, s) verifies as
    (r, n - s) too, so whoever holds a certificate and its key can present a second one with the same name, key and
    dates, byte for byte different: another SHA-256 fingerprint (round 45, secrev45: a revoked certificate's twin was
    served by the scheduler and the daemons). One twin for each curve order above s; none for a signature that is
    not ECDSA's SEQUENCE of two INTEGERs (RSA, Ed25519: no such twin), or DER that does not parse."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

    try:
        _, body, end = _tlv(der, 0)
        _, _, tbs_end = _tlv(der, body)
        _, _, alg_end = _tlv(der, tbs_end)
        tag, sig_start, sig_end = _tlv(der, alg_end)
        if tag != 0x03 or der[sig_start] != 0 or sig_end != end:
            return []
        r, s = decode_dss_signature(der[sig_start + 1 : sig_end])
    except (IndexError, ValueError):
        return []
    out = []
    for n in _ORDERS:
        if 0 < s < n:
            sig = encode_dss_signature(r, n - s)
            rest = der[body:alg_end] + b"\x03" + _der_len(len(sig) + 1) + b"\x00" + sig
            out.append(b"\x30" + _der_len(len(rest)) + rest)
    return out


def fingerprints_der(der: bytes) -> list[str]:
    """The fingerprint of `der` and of its twins (`twins_der`): a revocation of one names them all."""
    return [fingerprint_der(x) for x in (der, *twins_der(der))]


def fingerprint_pem(pem: bytes | str) -> str:
    """The fingerprint of a PEM certificate (the first one of the text); InvalidArgument if it holds none."""
    return fingerprint_der(der_of_pem(pem))


def der_of_pem(pem: bytes | str) -> bytes:
    """The DER of a PEM certificate (the first one of the text); InvalidArgument if it holds none."""
    text = pem.decode(errors="replace") if isinstance(pem, bytes) else pem
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise InvalidArgument("no PEM certificate in it")
    try:
        return ssl.PEM_cert_to_DER_cert(text[start : stop + len(end)])
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


def fingerprint_given(given: str) -> str:
    """A fingerprint, or the fingerprint of the PEM certificate file `given` names (`gpupool cert revoke
    FILE|sha256:HEX`, `gpupool token mint --cert`); InvalidArgument naming `given` for a file holding no certificate."""
    path = Path(given)
    if path.is_file():
        try:
            return fingerprint_pem(path.read_bytes())
        except GpupoolError as exc:
            raise type(exc)(f"{given}: {exc}") from None
    return normalize(given)


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
        self._seen: dict[bytes, tuple[str, ...]] = {}
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

    def holds(self, fingerprints: Iterable[str]) -> bool:
        """Whether any of `fingerprints` is revoked."""
        held = self._set
        return any(fp in held for fp in fingerprints)

    def refused_der(self, der: bytes) -> str:
        """The fingerprint of `der` if it is revoked, else ""."""
        if not self._set:
            return ""
        return next((fp for fp in fingerprints_der(der) if fp in self._set), "")

    def refused_pem(self, pem: bytes | None) -> str:
        """The fingerprint of `pem` (a call's certificate) if it is revoked, else ""."""
        if pem is None or not self._set:
            return ""
        fps = self._seen.get(pem)
        if fps is None:
            try:
                fps = tuple(fingerprints_der(der_of_pem(pem)))  # (its twins too: `twins_der`)
            except InvalidArgument:
                return ""
            with self._lock:
                if len(self._seen) >= _CACHE:
                    self._seen.clear()
                self._seen[pem] = fps
        return next((fp for fp in fps if fp in self._set), "")
