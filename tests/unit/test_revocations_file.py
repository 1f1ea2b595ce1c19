"""A daemon's revocations file (server/revocations.py, round 45): what it keeps, and what it refuses to be read from."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from gpupool.server.revocations import FILE, KEY, Heard, RevocationFile

from gpupool.errors import InvalidArgument


def _saved(tmp_path: Path) -> tuple[RevocationFile, Heard]:
    f = RevocationFile(tmp_path / "state", "gpu-1")
    heard = Heard("gpu-1", time.time(), {"a" * 32: time.time() + 600}, 12.5, ["sha256:" + "0" * 64], "v1:x")
    f.save(heard, (1,))
    return f, heard


def test_what_is_saved_is_read_back_and_both_files_are_the_owners_only(tmp_path: Path) -> None:
    f, heard = _saved(tmp_path)
    assert RevocationFile(tmp_path / "state", "gpu-1").load() == heard
    for name in (FILE, KEY):
        assert stat.S_IMODE(os.stat(tmp_path / "state" / name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700


@pytest.mark.parametrize("edit", ["heard_at", "certs", "mac"])
def test_an_edited_file_is_not_used(tmp_path: Path, edit: str) -> None:
    """A date moved (to pass --revocations-max-age), a certificate taken out, the MAC itself changed: each refused."""
    f, _ = _saved(tmp_path)
    body, sep, mac = f.path.read_bytes().rpartition(b"\nhmac-sha256:")
    raw = json.loads(body)
    if edit == "heard_at":
        raw["heard_at"] = time.time() + 1
    elif edit == "certs":
        raw["certs"] = []
    else:
        mac = b"0" * 64 + b"\n"
    f.path.write_bytes(json.dumps(raw, separators=(",", ":")).encode() + sep + mac)
    assert f.load() is None


def test_another_hosts_file_or_key_is_not_used(tmp_path: Path) -> None:
    _saved(tmp_path)
    assert RevocationFile(tmp_path / "state", "gpu-2").load() is None  # written by gpu-1
    os.unlink(tmp_path / "state" / KEY)  # a new key (the old one lost): the file's MAC no longer matches
    assert RevocationFile(tmp_path / "state", "gpu-1").load() is None


def test_a_file_others_may_read_or_a_folder_others_may_write_is_refused(tmp_path: Path) -> None:
    f, _ = _saved(tmp_path)
    os.chmod(f.path, 0o644)
    assert f.load() is None
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(InvalidArgument, match="writable by"):
        RevocationFile(open_dir, "gpu-1")
