"""TLS private keys and CA bundles are checked as opened before gRPC or `ssl` reads them (round 32).

Until round 32 gRPC (servers' certificate configuration, clients' channel credentials) and the side sockets' `ssl`
contexts read them whatever their mode: whoever could write the CA bundle made the program trust a CA of their own
(a daemon admitting any client certificate they minted, a client any server), whoever could read a private key could
pose as its holder. Now a key that other users may read or write, or a CA bundle others may write, is refused with
one line naming the file (config.open_trusted, as the trust files of round 31); a group's read bit on a key is how
deployments share it with the service's group (root:gpupool 0640) and stays allowed. `gpupool up` and
`gpupool.pki` write keys 0600 and certificates 0644, which pass.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpupool import pki, tls, tokens
from gpupool.errors import InvalidArgument


@pytest.fixture
def files(tmp_path: Path) -> tuple[pki.LocalCA, pki.CertFiles]:
    ca = pki.LocalCA(tmp_path / "ca")
    os.chmod(ca.directory, 0o755)  # the folder's mode is not what is checked: the files' are
    return ca, ca.issue("host", "h1", tmp_path / "ca" / "host-h1", dns=("localhost",), ips=("127.0.0.1",))


def _server(ca: pki.LocalCA, f: pki.CertFiles) -> tls.TlsConfig:
    return tls.TlsConfig(cert=str(f.cert), key=str(f.key), ca=str(ca.cert_path), client_auth="require")


def _every_reader(cfg: tls.TlsConfig) -> list[object]:
    """What each reader of the files gives (an exception or its product): the gRPC port, the side port, a client's
    gRPC channel, a client's side socket."""
    out: list[object] = []
    for read in (
        tls.server_credentials,
        tls.SocketServerTls,
        tls.channel_credentials,
        tls.socket_client_context,
    ):
        try:
            out.append(read(cfg))  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 - collected for the assertions
            out.append(exc)
    return out


def test_files_as_gpupool_pki_writes_them_are_read(files: tuple[pki.LocalCA, pki.CertFiles]) -> None:
    ca, f = files
    assert not [x for x in _every_reader(_server(ca, f)) if isinstance(x, Exception)]
    os.chmod(f.key, 0o640)  # shared with the service's group (deploy/systemd: root:gpupool 0640)
    assert not [x for x in _every_reader(_server(ca, f)) if isinstance(x, Exception)]


@pytest.mark.parametrize(
    "which, mode, said",
    [
        ("key", 0o644, "readable by other users"),
        ("key", 0o604, "readable by other users"),
        ("key", 0o602, "writable by other users"),
        ("ca", 0o666, "writable by other users"),
        ("ca", 0o646, "writable by other users"),
    ],
)
def test_a_key_others_may_read_or_a_ca_others_may_write_is_refused_by_every_reader(
    files: tuple[pki.LocalCA, pki.CertFiles], which: str, mode: int, said: str
) -> None:
    ca, f = files
    path = f.key if which == "key" else ca.cert_path
    os.chmod(path, mode)
    for got in _every_reader(_server(ca, f)):
        assert isinstance(got, InvalidArgument), got
        assert str(path) in str(got) and said in str(got) and "\n" not in str(got), got


def test_a_ca_others_may_read_is_fine(files: tuple[pki.LocalCA, pki.CertFiles]) -> None:
    ca, f = files
    os.chmod(ca.cert_path, 0o644)
    os.chmod(f.cert, 0o666)  # a certificate alone grants nothing without its key: not checked
    assert not [x for x in _every_reader(_server(ca, f)) if isinstance(x, Exception)]


def test_a_ca_bundle_with_text_beside_its_certificates_is_read_by_every_reader(
    files: tuple[pki.LocalCA, pki.CertFiles],
) -> None:
    """A PEM bundle may carry text outside its BEGIN/END blocks, UTF-8 included (Mozilla-style bundles' `# Issuer:`
    lines, `openssl x509 -text` output): gRPC and `ssl`'s cafile skip it. Round 32 first handed the side sockets'
    `ssl` the bundle as a str `cadata`, which must be ASCII: such a bundle failed there with a TypeError (not even
    the one-line error) while gRPC read it."""
    ca, f = files
    ca.cert_path.write_bytes("# Issuer: CN=Autorité Racine de test\n".encode() + ca.cert_path.read_bytes())
    assert not [x for x in _every_reader(_server(ca, f)) if isinstance(x, Exception)]


def test_a_key_made_readable_while_serving_is_not_loaded_and_said_once(
    files: tuple[pki.LocalCA, pki.CertFiles], caplog: pytest.LogCaptureFixture
) -> None:
    ca, f = files
    reloader = tls._Reloader(_server(ca, f))
    f.key.write_bytes(f.key.read_bytes())  # a change (rewritten in place), now readable by everyone
    os.chmod(f.key, 0o644)
    os.utime(f.key, ns=(1, 1))
    with caplog.at_level(logging.WARNING, logger="gpupool.tls"):
        assert reloader() is None and reloader() is None  # the old configuration is kept
    said = [r for r in caplog.records if "readable by other users" in r.getMessage()]
    assert len(said) == 1, caplog.records


def test_gpupool_serve_refuses_a_world_readable_key_in_one_line(
    files: tuple[pki.LocalCA, pki.CertFiles], tmp_path: Path
) -> None:
    ca, f = files
    os.chmod(f.key, 0o644)
    tokens.generate_key_file(tmp_path / "token.key", tmp_path / "token.pub")
    cmd = [sys.executable, "-m", "gpupool.cli", "serve", "--fake-gpus", "1", "--isolation", "thread",
           "--listen", "127.0.0.1:0", "--token-public-keys", str(tmp_path / "token.pub"), "--tls-cert", str(f.cert),
           "--tls-key", str(f.key), "--tls-ca", str(ca.cert_path)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "readable by other users" in line]
    assert len(errors) == 1 and str(f.key) in errors[0], done.stderr
    assert "Traceback" not in done.stderr, done.stderr
