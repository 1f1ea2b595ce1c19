"""Every credential file a client or a program reads is checked as a private key is (round 33).

Round 32 checked TLS keys and CA bundles as opened (gpupool/tls.py), and the trust files (the token signing key,
the daemons' public keys, the scheduler's credentials) for writers. Three secrets were still read whatever their
mode: the API token file of a client (`GPUPOOL_API_TOKEN_FILE`, `--api-token-file`) and of a daemon
(`--join-token-file`: the same reader, `tls.api_token`), the token signing key (checked for writers only: see
test_tokens.py), and the local CA's key that `gpupool up` and `gpupool.pki` issue certificates with. Whoever reads an
API token presents it; whoever reads the CA key issues an admin certificate of the pool. Each is now refused, with
one line naming the file, when other users may read or write it; a group's read bit stays allowed as for TLS keys
(root:gpupool 0640, a Kubernetes pod's fsGroup).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpupool import pki, tls
from gpupool.config import write_secret
from gpupool.errors import InvalidArgument


def test_an_api_token_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "alice.token"
    write_secret(path, b"s3cret\n")
    cfg = tls.TlsConfig(insecure=True, api_token_file=str(path))
    assert tls.api_token(cfg) == "s3cret"
    os.chmod(path, 0o640)  # shared with a group: as a TLS key may be
    assert tls.api_token(cfg) == "s3cret"
    for mode, words in ((0o644, "readable by other users"), (0o604, "readable by other users"),
                        (0o606, "writable by other users")):  # fmt: skip
        os.chmod(path, mode)
        with pytest.raises(InvalidArgument, match=words) as caught:
            tls.api_token(cfg)
        assert "s3cret" not in str(caught.value) and str(path) in str(caught.value)
        with pytest.raises(InvalidArgument, match=words):  # a channel is never made with it (nor is the token sent)
            tls.channel("127.0.0.1:1", cfg=cfg)


def test_a_named_pipe_as_api_token_file_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "token"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        tls.api_token(tls.TlsConfig(insecure=True, api_token_file=str(fifo)))


def test_the_environment_token_is_still_read_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUPOOL_API_TOKEN", " t0k \n")
    assert tls.api_token(tls.TlsConfig(env_token=True)) == "t0k"
    assert tls.api_token(tls.TlsConfig()) == ""


def test_a_local_ca_key_others_may_read_is_refused(tmp_path: Path) -> None:
    ca = pki.LocalCA(tmp_path / "ca")
    assert pki.LocalCA(tmp_path / "ca").key.private_numbers() == ca.key.private_numbers()  # reused when 0600
    os.chmod(ca.key_path, 0o644)
    with pytest.raises(InvalidArgument, match="CA private key .* readable by other users"):
        pki.LocalCA(tmp_path / "ca")
    os.chmod(ca.key_path, 0o640)
    assert pki.LocalCA(tmp_path / "ca").key.private_numbers() == ca.key.private_numbers()


def test_a_refused_credential_file_is_one_line_from_the_gpupool_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gpupool up --ca-dir DIR` with a CA key others may read, and `gpupool smi` with such an API token file: exit
    status 1 and one line naming the file, no traceback (round 33's refusals reached the user as a traceback of 30
    lines: `gpupool up` and `gpupool smi` let the InvalidArgument out of their main)."""
    from gpupool import cli

    ca = pki.LocalCA(tmp_path / "ca")
    os.chmod(ca.key_path, 0o644)
    umask = os.umask(0o022)
    try:  # `up` sets its own umask (0077) before it reads the CA: put the test's back after
        code = cli.main(["up", "--ca-dir", str(tmp_path / "ca"), "--state", str(tmp_path / "state" / "scheduler.db")])
    finally:
        os.umask(umask)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"gpupool up: CA private key {ca.key_path} is readable by other users"), err
    assert not (tmp_path / "state" / "scheduler.db").exists()  # nothing started

    token = tmp_path / "alice.token"
    write_secret(token, b"s3cret\n")
    os.chmod(token, 0o644)
    monkeypatch.setenv("GPUPOOL_SCHEDULER", "127.0.0.1:1")
    monkeypatch.setenv("GPUPOOL_INSECURE", "1")
    monkeypatch.setenv("GPUPOOL_API_TOKEN_FILE", str(token))
    code = cli.main(["smi"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("gpupool smi: API token file ") and "s3cret" not in err
