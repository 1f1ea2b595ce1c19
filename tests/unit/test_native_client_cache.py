"""The C++ client's cached library is loaded only where no other user could have written it (client/native/build.py
`_check_private`, `config.check_private_file`): a build folder or library writable by others is refused with one
BuildError line, never loaded; a private one is used as it is (no compiler needed: the file exists)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from gpupool.client.native import build


def _cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("GPUPOOL_NATIVE_CLIENT_CACHE", str(root))
    lib = build.built_path()
    lib.parent.mkdir(mode=0o700)
    lib.write_bytes(b"not a library: the test never loads it")
    lib.chmod(0o644)
    return lib


def test_a_private_cached_library_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lib = _cached(tmp_path, monkeypatch)
    assert build.build() == lib


@pytest.mark.parametrize("what", ["library", "folder"])
def test_a_cached_library_others_could_replace_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    lib = _cached(tmp_path, monkeypatch)
    target = lib if what == "library" else lib.parent
    os.chmod(target, 0o666 if what == "library" else 0o777)
    with pytest.raises(build.BuildError) as err:
        build.build()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("refusing to load the native client:")
    assert "writable by other users" in message
    assert str(target) in message
