"""Secrets written to files (the token signing key, TLS private keys, API tokens) reach nobody who could read the file
they replace (round 31).

Each writer used to open the existing path with O_TRUNC and write into that same file: whoever could read the old
file (a key or token left 0644, which is why it is being replaced) and held it open read the new secret through
their descriptor, whatever mode the file had afterwards; `gpupool token keygen` even wrote the key before tightening
the mode (a window for a plain read), and into a file another user owned when it was handed such a path. They now
write a fresh owner-only file next to it and rename it over the path: an open descriptor keeps the old file.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from gpupool import pki, tokens


def _loose(path: Path, text: str = "old\n") -> None:
    path.write_text(text)
    os.chmod(path, 0o644)


def test_a_new_token_key_never_reaches_a_reader_of_the_old_file(tmp_path: Path) -> None:
    key = tmp_path / "token.key"
    _loose(key)
    with open(key, "rb") as reader:  # another local user, who could read the old file, keeps it open
        signer = tokens.generate_key_file(key, tmp_path / "token.pub")
        assert reader.read() == b"old\n"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert tokens.load_signer(key).kid == signer.kid


def test_a_new_tls_key_never_reaches_a_reader_of_the_old_file(tmp_path: Path) -> None:
    ca = pki.LocalCA(tmp_path / "ca")
    out = tmp_path / "tenant-alice"
    _loose(out.with_name("tenant-alice.key"))
    with open(out.with_name("tenant-alice.key"), "rb") as reader:
        files = ca.issue("tenant", "alice", out)
        assert reader.read() == b"old\n"
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600 and b"PRIVATE KEY" in files.key.read_bytes()


def test_a_new_api_token_never_reaches_a_reader_of_the_old_file(tmp_path: Path) -> None:
    creds, out = tmp_path / "credentials", tmp_path / "alice.token"
    _loose(out)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPOOL_TOKEN")}
    cmd = [sys.executable, "-m", "gpupool.cli", "token", "api-token", "--name", "alice", "--credentials", str(creds)]
    with open(out, "rb") as reader:
        made = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=60, env=env)
        assert made.returncode == 0, made.stderr
        assert reader.read() == b"old\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and len(out.read_text().strip()) >= 32


def test_secret_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        tokens.generate_key_file(tmp_path / "k", tmp_path / "k.pub")
        files = pki.LocalCA(tmp_path / "ca").issue("tenant", "bob", tmp_path / "bob")
    finally:
        os.umask(old)
    for path in (tmp_path / "k", files.key, tmp_path / "ca" / "ca.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # no temporary file left behind
