"""certrevoke.twins_der (round 45, secrev45): an ECDSA CA signature's other valid form, on each curve a CA may use;
none for RSA or malformed DER. A revocation names the certificate and its twins (RevokedCerts)."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gpupool import certrevoke


def _issued(ca_key: object) -> tuple[x509.Certificate, bytes]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "twin45")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert, cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()], ids=lambda c: c.name)
def test_an_ecdsa_certificates_twin_verifies_and_is_refused_with_it(curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve)
    cert, der = _issued(key)
    valid = []
    for twin in certrevoke.twins_der(der):
        other = x509.load_der_x509_certificate(twin)
        assert twin != der and other.tbs_certificate_bytes == cert.tbs_certificate_bytes
        try:
            key.public_key().verify(other.signature, other.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
            valid.append(twin)
        except Exception:  # noqa: BLE001, PERF203 - a twin for another curve's order does not verify
            pass
    assert len(valid) == 1
    revoked = certrevoke.RevokedCerts([certrevoke.fingerprint_der(der)])
    assert revoked.refused_der(valid[0]) == certrevoke.fingerprint_der(der)
    assert certrevoke.RevokedCerts([certrevoke.fingerprint_der(valid[0])]).refused_der(der)


def test_rsa_and_malformed_der_have_no_twin() -> None:
    _, der = _issued(rsa.generate_private_key(65537, 2048))
    assert certrevoke.twins_der(der) == []
    assert certrevoke.twins_der(b"\x30\x82\xff") == [] and certrevoke.twins_der(b"") == []
