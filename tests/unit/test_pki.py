"""The local CA of `gpupool up`: identities, owner-only keys, reuse and reissue of certificates."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpupool import pki, tokens
from gpupool.up import make_credentials


def test_up_makes_a_ca_keys_and_certificates_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    creds = make_credentials(state, "gpu-7", "127.0.0.1:50050", "10.1.2.3:50051")
    assert state.stat().st_mode & 0o077 == 0
    for key in (creds.key, creds.daemon.key, creds.user.key, creds.admin.key, state / "pki" / "ca.key"):
        assert key.stat().st_mode & 0o077 == 0, key
    assert pki.identity_of(creds.daemon.cert.read_bytes()) == ("host", "gpu-7")
    assert pki.identity_of(creds.user.cert.read_bytes()) == ("tenant", getpass.getuser())
    assert pki.identity_of(creds.admin.cert.read_bytes()) == ("admin", "admin")
    assert pki.identity_of(creds.scheduler.cert.read_bytes()) == ("server", "scheduler")
    text = creds.daemon.cert.read_bytes()
    from cryptography import x509

    san = x509.load_pem_x509_certificate(text).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gpu-7" in san.get_values_for_type(x509.DNSName)  # sessions may check a daemon by host id
    assert "10.1.2.3" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    signer = tokens.load_signer(creds.key)
    assert tokens.load_verifier(creds.public).key_ids == [signer.kid]

    again = make_credentials(state, "gpu-7", "127.0.0.1:50050")
    assert again.daemon.cert.read_bytes() == text and tokens.load_signer(again.key).kid == signer.kid

    other = pki.LocalCA(tmp_path / "other-ca")  # an operator's own CA: certificates are issued from it anew
    mine = make_credentials(state, "gpu-7", "127.0.0.1:50050", ca_dir=tmp_path / "other-ca")
    assert mine.ca == other.cert_path
    assert pki.issued_by(mine.daemon.cert.read_bytes(), other)
    assert not pki.issued_by(text, other)


def test_up_says_it_replaces_a_token_key_others_may_read(tmp_path: Path, capsys: Any) -> None:
    """A token.key others may read is refused (config.read_trusted) and replaced by a fresh one: `up` says so in one
    line (until round 33 silently); a key that was merely absent is made without a word."""
    state = tmp_path / "state"
    creds = make_credentials(state, "gpu-7", "127.0.0.1:50050")
    assert capsys.readouterr().err == ""
    old = tokens.load_signer(creds.key).kid
    os.chmod(creds.key, 0o644)
    again = make_credentials(state, "gpu-7", "127.0.0.1:50050")
    err = capsys.readouterr().err
    assert err.startswith("gpupool up: ") and "replaced by a fresh token key" in err and err.count("\n") == 1, err
    assert again.key.stat().st_mode & 0o077 == 0 and tokens.load_signer(again.key).kid != old
    assert tokens.load_verifier(again.public).key_ids == [tokens.load_signer(again.key).kid]


def test_up_with_a_ca_key_others_may_read_ends_in_one_line(tmp_path: Path) -> None:
    """`gpupool up --ca-dir DIR` whose ca.key others may read: refused in one line and a non-zero exit before
    anything starts (until round 33 a Python traceback)."""
    ca = pki.LocalCA(tmp_path / "ca")
    os.chmod(ca.key_path, 0o644)
    state = tmp_path / "state" / "scheduler.db"
    out = subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "up", "--state", str(state), "--ca-dir", str(tmp_path / "ca")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and out.stderr.startswith("gpupool up: "), out.stderr[-2000:]
    assert str(ca.key_path) in out.stderr and out.stderr.count("\n") == 1, out.stderr


def _names(cert: Path) -> set[str]:
    from cryptography import x509

    san = (
        x509.load_pem_x509_certificate(cert.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    return set(san.get_values_for_type(x509.DNSName)) | {str(i) for i in san.get_values_for_type(x509.IPAddress)}


def test_up_issues_a_server_certificate_anew_when_it_serves_an_address_the_old_one_does_not_name(
    tmp_path: Path,
) -> None:
    """`gpupool up` passes its metrics ports' addresses too (HTTPS since round 40; "0" is a port turned off), and a
    scheduler's or daemon's certificate from an earlier run that does not name an address served now is issued
    anew (fin40: until then it was kept while its role and CA matched, so a new --listen or --metrics-listen host
    failed every client's name check); one that names them all is kept."""
    state = tmp_path / "state"
    first = make_credentials(state, "gpu-7", "127.0.0.1:50050", "127.0.0.1:50051")
    old = first.scheduler.cert.read_bytes()
    again = make_credentials(state, "gpu-7", "127.0.0.1:50050", "127.0.0.1:50051", "10.9.8.7:9451", "0")
    for files in (again.scheduler, again.daemon):
        assert {"10.9.8.7", "127.0.0.1", "localhost"} <= _names(files.cert), _names(files.cert)
    assert again.scheduler.cert.read_bytes() != old
    assert again.user.cert.read_bytes() == first.user.cert.read_bytes()  # a client's certificate names no address
    kept = make_credentials(state, "gpu-7", "127.0.0.1:50050", "10.9.8.7:50051")
    assert kept.scheduler.cert.read_bytes() == again.scheduler.cert.read_bytes()
