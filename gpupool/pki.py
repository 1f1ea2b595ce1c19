"""A small local certificate authority (the `cryptography` package): what `gpupool up` and the tests use to make
the CA, server, host and client certificates of a pool.

Identities: every certificate gpupool issues names its holder in a URI subject alternative name
``gpupool://<role>/<name>`` (role: ``host`` - a daemon, name = host id; ``tenant``; ``admin``; ``server`` - a
scheduler; ``metrics`` - a scraper of the /metrics endpoints, gpupool/metrics_http.py, that no gRPC service
accepts), with the name also as the common name. cert-manager issues the same with ``uris:`` and
``commonName:``. Keys are written owner-only (0600).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpupool.config import UnsafeFile, read_trusted, write_secret
from gpupool.errors import InvalidArgument

ROLES = ("host", "tenant", "admin", "server", "metrics")
URI_PREFIX = "gpupool://"
DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class CertFiles:
    """Where one certificate and its key are."""

    cert: Path
    key: Path


def identity_uri(role: str, name: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    if not name or "/" in name:
        raise ValueError(f"bad {role} name {name!r}: an identity's name is not empty and has no '/'")
    return f"{URI_PREFIX}{role}/{name}"


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only: a new 0600 file renamed over `path` (config.write_secret)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_secret(path, data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class LocalCA:
    """A CA whose key lives in `directory` (ca.crt, ca.key); created on first use, reused afterwards. A key that other
    users may read or write is refused (InvalidArgument, config.open_trusted): whoever reads it issues an admin
    certificate of the pool (until round 33 `gpupool up --ca-dir` read it whatever its mode)."""

    def __init__(self, directory: Path, name: str = "gpupool local CA", days: int = 3650) -> None:
        self.directory = Path(directory)
        self.cert_path = self.directory / "ca.crt"
        self.key_path = self.directory / "ca.key"
        if self.cert_path.exists() and self.key_path.exists():
            self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            try:
                pem = read_trusted(self.key_path, "CA private key", secret=True)
            except UnsafeFile as exc:
                raise InvalidArgument(str(exc)) from exc
            key = serialization.load_pem_private_key(pem, password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self.key = key
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY)
            .not_valid_after(now + days * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        write_private(self.key_path, _key_pem(self.key))
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        role: str,
        name: str,
        out: Path | None = None,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        days: int = 825,
    ) -> CertFiles:
        """Issue `<out>.crt`/`<out>.key` for identity role/name, usable as a server certificate for the given DNS
        names and IP addresses (if any) and as a client certificate."""
        out = out or self.directory / f"{role}-{name}"
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri(role, name))]
        sans += [x509.DNSName(d) for d in dict.fromkeys(dns)]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in dict.fromkeys(ips)]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if dns or ips else [])
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY)
            .not_valid_after(now + days * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        files = CertFiles(out.with_name(out.name + ".crt"), out.with_name(out.name + ".key"))
        write_private(files.key, _key_pem(key))
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return files


def issued_by(cert_pem: bytes, ca: LocalCA) -> bool:
    """Whether `ca` signed this certificate (and it is still valid): else `gpupool up` issues a new one."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + 7 * DAY


def issued_by_bundle(cert: x509.Certificate, bundle_pem: bytes) -> bool:
    """Whether a certificate of the PEM bundle `bundle_pem` signed `cert` directly (its validity is the handshake's)."""
    try:
        cas = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError:
        return False
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def identity_of(cert_pem: bytes) -> tuple[str, str] | None:
    """(role, name) from a certificate's ``gpupool://role/name`` URI, else None."""
    found = identities(x509.load_pem_x509_certificate(cert_pem))
    return found[0] if found else None


def identities(cert: x509.Certificate) -> list[tuple[str, str]]:
    """Every (role, name) the certificate's ``gpupool://role/name`` URIs name, in their order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(URI_PREFIX):
            role, _, name = uri[len(URI_PREFIX) :].partition("/")
            if role in ROLES and name:
                out.append((role, name))
    return out


def loopback_env(directory: Path) -> dict[str, str]:
    """A throwaway CA and one operator certificate valid for loopback, as the GPUPOOL_TLS_* variables that make
    servers (started with them in their environment) and clients use it: for benchmarks and local experiments."""
    ca = LocalCA(Path(directory))
    files = ca.issue("admin", "local", dns=("localhost",), ips=("127.0.0.1", "::1"))
    return {"GPUPOOL_TLS_CA": str(ca.cert_path), "GPUPOOL_TLS_CERT": str(files.cert), "GPUPOOL_TLS_KEY": str(files.key)}
